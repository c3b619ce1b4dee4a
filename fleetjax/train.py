"""``fleetjax train`` and ``fleetjax demo``: train the byte-level LM of :mod:`fleetjax.lm` on the Python
standard library's source (offline, no download), with a progress bar, a JSON log, a loss-curve PNG, a
checkpoint and a generated sample.

The defaults (preset "cpu") finish in a few minutes on a 2-core CPU; ``--preset gpu`` is a longer run for
one GPU, and every size flag overrides the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleetjax import data as text_data
from fleetjax import lm

PRESETS: dict[str, dict[str, Any]] = {
    # About 2-3 minutes on 2 CPU cores (a 0.46M-parameter model, 1.2M tokens).
    "cpu": dict(steps=600, batch_size=16, seq_len=128, d_model=128, num_layers=2, num_heads=4,
                learning_rate=6e-3, warmup_steps=50, dtype="float32", eval_every=100),
    # A few minutes on one H100: 19M parameters, 66M tokens.
    "gpu": dict(steps=2000, batch_size=32, seq_len=1024, d_model=512, num_layers=6, num_heads=8,
                learning_rate=2e-3, warmup_steps=200, dtype="bfloat16", eval_every=250),
    # fleetjax demo: about a minute of training on 2 CPU cores.
    "demo": dict(steps=300, batch_size=16, seq_len=128, d_model=128, num_layers=2, num_heads=4,
                 learning_rate=6e-3, warmup_steps=30, dtype="float32", eval_every=100),
}


@dataclasses.dataclass
class TrainOptions:
    """Everything one training run needs (the CLI flags)."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    attention: str = "fleet"
    implementation: str | None = None
    dtype: str = "float32"
    learning_rate: float = 6e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    max_bytes: int | None = None
    seed: int = 0
    out: str = "fleetjax-train"
    resume: str | None = None
    prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.7
    plot: bool = True
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")


def add_train_arguments(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    """The flags of ``fleetjax train`` (size flags default to the preset's values)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset,
                        help=f"size defaults: cpu (minutes on 2 cores), gpu (one GPU), demo (default: {default_preset})")
    size = parser.add_argument_group("model and run size (override the preset)")
    size.add_argument("--steps", type=int)
    size.add_argument("--batch-size", type=int)
    size.add_argument("--seq-len", type=int, help="bytes per training sequence")
    size.add_argument("--d-model", type=int)
    size.add_argument("--num-layers", type=int)
    size.add_argument("--num-heads", type=int)
    size.add_argument("--dtype", choices=["float32", "bfloat16"], help="computation dtype (params stay float32)")
    size.add_argument("--learning-rate", type=float, help="peak learning rate (warmup then cosine decay)")
    size.add_argument("--warmup-steps", type=int)
    size.add_argument("--eval-every", type=int, help="validation loss every N steps")
    parser.add_argument("--attention", choices=["fleet", "softmax"], default="fleet",
                        help="FleetAttention or the causal softmax baseline")
    parser.add_argument("--implementation", default=None,
                        help="fleet_attention implementation (pallas, xla, scan, ...; default: auto)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="global gradient norm clip")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=None, help="read at most this much of the stdlib")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fleetjax-train", help="directory for log.json, loss.png, checkpoint")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint (model, optimizer and step count; the model's size flags are "
                        "ignored); the learning-rate schedule from --steps/--warmup-steps is read at the restored "
                        "step count, so steps past its end run at the final rate")
    parser.add_argument("--prompt", default="def ", help="prompt of the sample printed at the end")
    parser.add_argument("--sample-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip loss.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    values = dict(PRESETS[args.preset])
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    for name, value in vars(args).items():
        if name in fields and value is not None:
            values[name] = value
    options = TrainOptions(**values)
    options.validate()
    return options


def _versions() -> dict[str, str]:
    import flax
    import optax
    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__}


def _device() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')}".rstrip(":")


def plot_losses(log: dict[str, Any], path: Path) -> Path | None:
    """Train and validation loss (bits per byte) against step; None (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fleetjax[bench]'): skipping the loss plot",
              file=sys.stderr)
        return None
    ln2 = np.log(2.0)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(log["steps"], np.asarray(log["train_loss"]) / ln2, lw=0.8, alpha=0.6, label="train")
    if log["eval"]:
        ax.plot([e["step"] for e in log["eval"]], [e["bits_per_byte"] for e in log["eval"]], "o-",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    c = log["model"]
    ax.set_title(f"fleetjax LM ({c['attention']}, d={c['d_model']}, L={c['num_layers']}, H={c['num_heads']}) "
                 f"on the stdlib", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_train(options: TrainOptions, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate, checkpoint, sample; returns the log (also written to <out>/log.json)."""
    options.validate()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = text_data.load_stdlib_corpus(max_bytes=options.max_bytes)
    echo(f"data: {corpus.num_files} stdlib files from {corpus.source}: {corpus.train.size:,} train bytes, "
         f"{corpus.validation.size:,} validation bytes")

    opt_config = lm.OptimizerConfig(learning_rate=options.learning_rate, warmup_steps=options.warmup_steps,
                                    total_steps=options.steps, weight_decay=options.weight_decay,
                                    clip_norm=options.clip_norm)
    tx = lm.make_optimizer(opt_config)
    if options.resume:
        trainer = lm.Trainer.restore(options.resume, tx)
        config = trainer.model.config
        echo(f"resumed from {options.resume} at step {trainer.step_count}")
    else:
        config = lm.LMConfig(d_model=options.d_model, num_layers=options.num_layers, num_heads=options.num_heads,
                             attention=options.attention, implementation=options.implementation,
                             dtype=options.dtype)
        trainer = lm.Trainer(lm.LanguageModel(config, rngs=nnx.Rngs(options.seed)), tx)
    first_step = trainer.step_count
    n_params = lm.count_params(trainer.model)
    echo(f"model: {n_params:,} parameters, {config.attention} attention, d={config.d_model}, "
         f"L={config.num_layers}, H={config.num_heads}, {config.dtype}; device {_device()}")

    rng = np.random.default_rng(options.seed + first_step)
    val = text_data.random_windows(corpus.validation, options.batch_size * options.eval_batches,
                                   options.seq_len + 1, np.random.default_rng(12345))
    val_batches = [val[i * options.batch_size:(i + 1) * options.batch_size] for i in range(options.eval_batches)]

    def evaluate() -> float:
        losses = [trainer.evaluate(jnp.asarray(b[:, :-1]), jnp.asarray(b[:, 1:]))["loss"] for b in val_batches]
        return float(np.mean(jax.device_get(losses)))

    log: dict[str, Any] = {"model": config.to_dict(), "optimizer": dataclasses.asdict(opt_config),
                           "options": dataclasses.asdict(options), "parameters": n_params,
                           "data": {"source": corpus.source, "files": corpus.num_files,
                                    "train_bytes": int(corpus.train.size),
                                    "validation_bytes": int(corpus.validation.size)},
                           "device": _device(), "versions": _versions(), "steps": [], "train_loss": [],
                           "eval": []}
    tokens_per_step = options.batch_size * options.seq_len
    pending: list[tuple[int, jax.Array]] = []
    progress = None
    if options.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=options.steps, desc="train", unit="step", dynamic_ncols=True)

    start = time.perf_counter()
    timed_start = None  # the clock for tokens/s starts after the first (compiling) step
    compile_s = 0.0
    tokens_per_s = float("nan")
    for i in range(options.steps):
        step = first_step + i + 1
        batch = jnp.asarray(text_data.random_windows(corpus.train, options.batch_size, options.seq_len + 1, rng))
        pending.append((step, trainer.step(batch[:, :-1], batch[:, 1:])["loss"]))
        last = i == options.steps - 1
        if i == 0 or (i + 1) % 10 == 0 or last:  # fetch losses in groups: no host sync every step
            losses = jax.device_get([loss for _, loss in pending])
            log["steps"] += [s for s, _ in pending]
            log["train_loss"] += [float(x) for x in losses]
            pending.clear()
            now = time.perf_counter()
            if timed_start is None:
                compile_s, timed_start, timed_from = now - start, now, i + 1
            elif i + 1 > timed_from:
                tokens_per_s = (i + 1 - timed_from) * tokens_per_step / (now - timed_start)
            if progress is not None:
                progress.set_postfix(loss=f"{log['train_loss'][-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                progress.update(i + 1 - progress.n)
        if (i + 1) % options.eval_every == 0 or last:
            val_loss = evaluate()
            log["eval"].append({"step": step, "loss": val_loss, "bits_per_byte": val_loss / np.log(2.0)})
            if progress is not None:
                progress.write(f"step {step}: validation loss {val_loss:.4f} "
                               f"({val_loss / np.log(2.0):.3f} bits/byte)")
    if progress is not None:
        progress.close()
    wall_s = time.perf_counter() - start
    log.update(wall_s=wall_s, compile_s=compile_s, tokens_per_s=tokens_per_s,
               final_train_loss=float(np.mean(log["train_loss"][-10:])), final_validation_loss=log["eval"][-1]["loss"])

    checkpoint = trainer.save(out / "checkpoint.msgpack", metadata={"step": trainer.step_count})
    log["checkpoint"] = str(checkpoint)
    prompt = text_data.encode(options.prompt or "\n")
    tokens = lm.generate(trainer.model, jnp.asarray(prompt)[None], options.sample_tokens,
                         key=jax.random.key(options.seed), temperature=options.temperature)
    log["sample"] = {"prompt": options.prompt, "temperature": options.temperature,
                     "text": text_data.decode(np.asarray(tokens[0]))}
    (out / "log.json").write_text(json.dumps(log, indent=1))
    plot = plot_losses(log, out / "loss.png") if options.plot else None
    echo(f"done in {wall_s:.1f}s (first step incl. compilation {compile_s:.1f}s), {tokens_per_s:,.0f} tokens/s; "
         f"train loss {log['final_train_loss']:.3f}, validation loss {log['final_validation_loss']:.3f} nats "
         f"({log['final_validation_loss'] / np.log(2.0):.3f} bits/byte)")
    echo(f"wrote {out / 'log.json'}, {checkpoint}" + (f", {plot}" if plot else ""))
    return log


def _print_sample(log: dict[str, Any], echo: Callable[[str], None]) -> None:
    sample = log["sample"]
    echo(f"--- sample (temperature {sample['temperature']}) ---")
    echo(sample["prompt"] + sample["text"])
    echo("---")


def train_command(args: argparse.Namespace) -> int:
    """``fleetjax train``: returns the exit status."""
    log = run_train(options_from_args(args))
    _print_sample(log, print)
    return 0


def demo_command(args: argparse.Namespace, check: Callable[[], int] | None = None) -> int:
    """``fleetjax demo``: the quick check (when given), a short training run, and a sample."""
    started = time.perf_counter()
    if check is not None:
        print("== fleetjax check (quick) ==")
        status = check()
        if status:
            print(f"check failed (exit status {status}); not training")
            return status
    print("== training a small byte-level LM on the Python standard library ==")
    log = run_train(options_from_args(args))
    _print_sample(log, print)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


def register(subparsers: argparse._SubParsersAction, check: Callable[[], int] | None = None) -> None:
    """Add the ``train`` and ``demo`` subcommands; ``check`` runs the quick self-check for ``demo``.

    Each subparser's ``func`` default takes the parsed arguments and returns an exit status.
    """
    train = subparsers.add_parser("train", help="train a byte-level LM on the stdlib's source (offline)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(train, "cpu")
    train.set_defaults(func=train_command)
    demo = subparsers.add_parser("demo", help="check, then a short training run and a generated sample")
    add_train_arguments(demo, "demo")
    demo.set_defaults(func=lambda args: demo_command(args, check), out="fleetjax-demo")
