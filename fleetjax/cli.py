"""The ``fleetjax`` command line, above the library: ``check``, ``train`` and ``demo``.

    fleetjax check [--quick] [--implementations xla,scan] [--dtype float32] [--repeats N]
    fleetjax train [--preset cpu|gpu|demo] [--steps N] ... [--resume DIR]
    fleetjax demo

Building the parser imports no JAX (``fleetjax --help`` answers at once): each command imports what it
runs. A mistake in the arguments is one line on stderr and exit status 2, before any data is read or
anything compiles.

Every subcommand is one function ``(args) -> exit status`` and one registration: a ``register_*`` function
that takes the argparse subparsers, adds its parser and sets ``func``. ``REGISTRARS`` lists them; ``main``
parses and calls ``args.func(args)``. To add a subcommand: write ``register_<name>(subparsers)`` (parser,
arguments, ``set_defaults(func=<the command>)``) and append it to ``REGISTRARS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable, NoReturn, Sequence

from fleetjax import __version__
from fleetjax.models.options import ATTENTIONS, DTYPES, PRESETS, SOFTMAX_IMPLEMENTATIONS, TrainOptions

Registrar = Callable[[argparse._SubParsersAction], None]

# The names of fleetjax.api.IMPLEMENTATIONS and the keys of fleetjax.check.TOLERANCE, written out because the
# parser must not import JAX; tests/test_cli.py holds them equal.
IMPLEMENTATION_NAMES = ("pallas", "pallas_fleet", "quadratic", "scan", "xla")
CHECK_DTYPES = ("bfloat16", "float16", "float32")


class UsageError(Exception):
    """A command's arguments that cannot run; ``main`` prints it as one line and exits with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage text is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- check

def _implementation_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated implementation names, got {text!r}")
    unknown = [name for name in names if name not in IMPLEMENTATION_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {', '.join(map(repr, unknown))}; "
                                         f"known: {', '.join(IMPLEMENTATION_NAMES)}")
    return names


def check_command(args: argparse.Namespace) -> int:
    """``fleetjax check``: 0 when every implementation matches the reference, 1 otherwise."""
    from fleetjax import api, check

    names = args.implementations if args.implementations is not None else sorted(api.IMPLEMENTATIONS)
    shapes = check.default_shapes(quick=args.quick)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    rows = check.report(names, shapes, dtype=args.dtype, repeats=repeats, seed=args.seed)
    return 1 if any(row.failed for row in rows) else 0


def register_check(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="compare every implementation with the scan reference and time them",
        description="Run every available implementation (those that run here only in Pallas interpret mode "
                    "on the small shapes) on a few shapes with initial state, packed sequences, per-token gates "
                    "and odd T; compare the output, the final state and every gradient with "
                    "implementation='scan'; print errors, median times and whether a repeated call gives the "
                    "same bits. Exits 1 on any mismatch beyond the tolerance, any difference between repeated "
                    "calls or any error.")
    parser.add_argument("--quick", action="store_true",
                        help="the two small shapes only (plain and gated), fewer timing repeats")
    parser.add_argument("--implementations", type=_implementation_list, default=None, metavar="NAMES",
                        help=f"comma-separated, of {', '.join(IMPLEMENTATION_NAMES)} (default: all available)")
    parser.add_argument("--dtype", choices=CHECK_DTYPES, default="float32", help="input dtype")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed calls per measurement (default 5, 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=check_command)


# ---------------------------------------------------------------------------------------- train, demo

def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """The preset's sizes overridden by the flags given; raises UsageError naming a flag that cannot run."""
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    options = TrainOptions.from_preset(args.preset, **{k: v for k, v in vars(args).items() if k in fields})
    try:
        options.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    return options


def _print_sample(log: dict) -> None:
    sample = log["sample"]
    print(f"--- sample (temperature {sample['temperature']}) ---")
    print(sample["prompt"] + sample["text"])
    print("---")


def train_command(args: argparse.Namespace) -> int:
    """``fleetjax train``: the run's exit status."""
    options = options_from_args(args)
    from fleetjax.models.train import run_train

    _print_sample(run_train(options))
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``fleetjax demo``: the quick check, then a short training run and a sample."""
    options = options_from_args(args)
    started = time.perf_counter()
    print("== fleetjax check (quick) ==")
    status = check_command(build_parser().parse_args(["check", "--quick"]))
    if status:
        print(f"check failed (exit status {status}); not training")
        return status
    print("== training a small byte-level LM on the Python standard library ==")
    from fleetjax.models.train import run_train

    _print_sample(run_train(options))
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    """The flags of ``fleetjax train``: a TrainOptions field each; a flag left out takes the preset's value,
    or the field's default."""
    default = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    parser.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                        help=f"sizes: cpu (minutes on 2 cores), gpu (one GPU), demo (default: {preset})")
    size = parser.add_argument_group("model and run size (override the preset)")
    size.add_argument("--steps", type=int)
    size.add_argument("--batch-size", type=int)
    size.add_argument("--seq-len", type=int, help="bytes per training sequence")
    size.add_argument("--d-model", type=int)
    size.add_argument("--num-layers", type=int)
    size.add_argument("--num-heads", type=int)
    size.add_argument("--dtype", choices=DTYPES, help="computation dtype (parameters stay float32)")
    size.add_argument("--learning-rate", type=float, help="peak learning rate (warmup then cosine decay)")
    size.add_argument("--warmup-steps", type=int)
    size.add_argument("--eval-every", type=int, help="validation loss every N steps")
    parser.add_argument("--attention", choices=ATTENTIONS, default=default["attention"],
                        help="FleetAttention or the causal softmax baseline (default: %(default)s)")
    parser.add_argument("--gate-rank", type=int, help="fleet: add a GLA-style per-token gate of this rank to the "
                        "learned per-head decay (default: none)")
    parser.add_argument("--implementation", choices=IMPLEMENTATION_NAMES + SOFTMAX_IMPLEMENTATIONS[1:],
                        help="fleet: fleet_attention's implementation; softmax: jax.nn.dot_product_attention's "
                             f"({', '.join(SOFTMAX_IMPLEMENTATIONS)}); default: the backend's")
    parser.add_argument("--weight-decay", type=float, help=f"AdamW's (default: {default['weight_decay']})")
    parser.add_argument("--clip-norm", type=float, help=f"global gradient norm clip (default: {default['clip_norm']})")
    parser.add_argument("--eval-batches", type=int, help=f"batches per validation (default: {default['eval_batches']})")
    parser.add_argument("--max-bytes", type=int, help="read at most this much of the stdlib (default: all)")
    parser.add_argument("--seed", type=int, help=f"(default: {default['seed']})")
    parser.add_argument("--out", help=f"directory of the log, checkpoint/, loss.png (default: {default['out']})")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue from a run's <out>/checkpoint directory (model, optimizer and step count; "
                             "the model's size flags are ignored); the learning-rate schedule from --steps and "
                             "--warmup-steps is read at the restored step count, so steps past its end run at "
                             "the final rate")
    parser.add_argument("--prompt", help=f"prompt of the sample printed at the end (default: {default['prompt']!r})")
    parser.add_argument("--sample-tokens", type=int, help=f"(default: {default['sample_tokens']})")
    parser.add_argument("--temperature", type=float,
                        help=f"sampling temperature, 0 = greedy (default: {default['temperature']})")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip loss.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def register_training(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a byte-level LM on the stdlib's source (offline)",
        description="Train the byte-level LM of fleetjax.models.lm on the Python standard library's source "
                    "(offline, no download), with a progress bar; writes <out>/log.json, loss.png, a checkpoint "
                    "directory <out>/checkpoint (orbax) and prints a generated sample. The cpu preset finishes "
                    "in a few minutes on 2 CPU cores; every size flag overrides the preset.")
    add_train_arguments(train, "cpu")
    train.set_defaults(func=train_command)
    demo = subparsers.add_parser("demo", help="check, then a short training run and a generated sample")
    add_train_arguments(demo, "demo")
    demo.set_defaults(func=demo_command, out="fleetjax-demo")


# --------------------------------------------------------------------------------------------- wiring

REGISTRARS: list[Registrar] = [register_check, register_training]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fleetjax", description="Exponentially decaying causal linear attention (retention) for "
                    "JAX: a self-check, a training run and a demo.")
    parser.add_argument("--version", action="version", version=f"fleetjax {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for registrar in REGISTRARS:
        registrar(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the subcommand; returns its exit status (2, with one
    line on stderr, for arguments that cannot run)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as error:
        print(f"fleetjax {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
