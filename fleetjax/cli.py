"""The ``fleetjax`` command line.

    fleetjax check [--quick] [--implementations xla,scan] [--dtype float32] [--repeats N]

Every subcommand is one function ``(args) -> exit status`` and one registration: a ``register_*``
function that takes the argparse subparsers, adds its parser and sets ``func``. ``REGISTRARS`` lists them;
``main`` parses and calls ``args.func(args)``. To add a subcommand: write ``register_<name>(subparsers)``
(parser, arguments, ``set_defaults(func=<the command>)``) and append it to ``REGISTRARS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

Registrar = Callable[[argparse._SubParsersAction], None]


# ---------------------------------------------------------------------------------------------- check

@dataclasses.dataclass(frozen=True)
class CheckShape:
    """One shape of ``fleetjax check``; ``decay`` is spread over the heads from near 1 to ``min_decay``."""

    B: int
    T: int
    H: int
    K: int
    V: int
    initial_state: bool = True
    segments: bool = False
    scale: float = 1.0
    min_decay: float = 0.5

    def __str__(self) -> str:
        extras = [name for name, on in (("init", self.initial_state), ("segments", self.segments)) if on]
        return f"B{self.B} T{self.T} H{self.H} K{self.K} V{self.V}" + "".join(f" {e}" for e in extras)

    @property
    def interpret_sized(self) -> bool:
        """Small enough for Pallas interpret mode (off-GPU the kernels run op by op in XLA)."""
        return self.T <= 130 and self.B * self.H <= 8 and max(self.K, self.V) <= 64


# Odd T, K != V, head dims that are not powers of two, chunk edges crossed, packed sequences.
CPU_SHAPES = (
    CheckShape(B=2, T=67, H=2, K=24, V=40, segments=True, scale=0.5, min_decay=1e-3),
    CheckShape(B=2, T=513, H=4, K=32, V=48, scale=0.25),
    CheckShape(B=1, T=1031, H=2, K=16, V=16, segments=True, min_decay=0.9),
)
GPU_SHAPES = (
    CheckShape(B=2, T=67, H=2, K=24, V=40, segments=True, scale=0.5, min_decay=1e-3),
    CheckShape(B=4, T=2049, H=8, K=128, V=128, segments=True, scale=128 ** -0.5),
    CheckShape(B=1, T=8191, H=4, K=64, V=96, scale=0.125, min_decay=0.9),
)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
REFERENCE = "scan"


@dataclasses.dataclass
class CheckRow:
    shape: str
    implementation: str
    forward_error: float | None = None  # max over o and the final state of max|x - ref| / max|ref|
    gradient_error: float | None = None  # the same over dq, dk, dv, d decay, d initial_state
    forward_ms: float | None = None
    forward_backward_ms: float | None = None
    status: str = "ok"  # ok, FAIL, ERROR, skipped


def _inputs(shape: CheckShape, dtype, seed: int) -> dict[str, Any]:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    # Decay spread log-uniformly from 1 - 1/(4T) (long memory) down to min_decay.
    decay = 1.0 - np.geomspace(1.0 / (4 * T), 1.0 - shape.min_decay, H)
    segment_ids = None
    if shape.segments:
        starts = rng.random((B, T)) < 8.0 / T
        starts[:, [t for t in (T // 2, 64) if t < T]] = True  # a boundary inside and one at a chunk edge
        segment_ids = jnp.asarray(np.cumsum(starts, axis=1) % 3, jnp.int32)  # ids recur after other ids
    return dict(q=jnp.asarray(normal(B, T, H, K) / np.sqrt(K), dtype), k=jnp.asarray(normal(B, T, H, K), dtype),
                v=jnp.asarray(normal(B, T, H, V), dtype), decay=jnp.asarray(decay, jnp.float32),
                initial_state=jnp.asarray(normal(B, H, K, V)) if shape.initial_state else None,
                segment_ids=segment_ids, do=jnp.asarray(normal(B, T, H, V), dtype),
                d_final=jnp.asarray(normal(B, H, K, V)))


def _functions(implementation: str, shape: CheckShape):
    """jit-compiled (forward, forward+backward) of one implementation for one shape."""
    import jax

    import fleetjax

    def forward(q, k, v, decay, initial_state, segment_ids):
        return fleetjax.fleet_attention(q, k, v, decay, scale=shape.scale, initial_state=initial_state,
                                        return_final_state=True, segment_ids=segment_ids,
                                        implementation=implementation)

    def forward_backward(q, k, v, decay, initial_state, segment_ids, do, d_final):
        diff = (q, k, v, decay) + ((initial_state,) if initial_state is not None else ())
        f = lambda *a: forward(*a[:4], a[4] if len(a) > 4 else None, segment_ids)
        out, vjp = jax.vjp(f, *diff)
        return out, vjp((do, d_final))

    return jax.jit(forward), jax.jit(forward_backward)


def _relative_error(got, ref) -> float:
    import numpy as np

    errors = [0.0]
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        scale = np.max(np.abs(r)) if r.size else 0.0
        err = np.max(np.abs(g - r)) if r.size else 0.0
        errors.append(float(err / scale) if scale > 0 else (0.0 if err == 0 else float("inf")))
    return max(errors) if all(np.isfinite(errors)) else float("inf")


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def run_check(implementations: Sequence[str], shapes: Sequence[CheckShape], *, dtype: str = "float32",
              repeats: int = 5, seed: int = 0, echo: Callable[[str], None] = print) -> list[CheckRow]:
    """Each implementation on each shape against the scan reference (same inputs, float32 accumulation):
    forward and gradients (random cotangents for the output and the final state), and median times."""
    import jax
    import jax.numpy as jnp

    on_gpu = jax.default_backend() == "gpu"
    tolerance = TOLERANCE[dtype]
    rows = []
    for n, shape in enumerate(shapes):
        x = _inputs(shape, jnp.dtype(dtype), seed + n)
        args = (x["q"], x["k"], x["v"], x["decay"], x["initial_state"], x["segment_ids"])
        _, reference = _functions(REFERENCE, shape)
        ref_out, ref_grads = reference(*args, x["do"], x["d_final"])
        for name in implementations:
            row = CheckRow(str(shape), name + (" (reference)" if name == REFERENCE else ""))
            rows.append(row)
            if name.startswith("pallas") and not on_gpu:
                row.implementation += " (interpret)"
                if not shape.interpret_sized:
                    row.status = "skipped"
                    echo(_format_row(row))
                    continue
            try:
                forward, forward_backward = _functions(name, shape)
                out, grads = forward_backward(*args, x["do"], x["d_final"])
                row.forward_error = _relative_error(out, ref_out)
                row.gradient_error = _relative_error(grads, ref_grads)
                row.forward_ms = _median_ms(lambda: forward(*args), repeats)
                row.forward_backward_ms = _median_ms(lambda: forward_backward(*args, x["do"], x["d_final"]),
                                                     repeats)
                if not max(row.forward_error, row.gradient_error) <= tolerance:
                    row.status = "FAIL"
            except Exception as error:  # a crash is a failed check, reported in the table
                row.status = f"ERROR {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            echo(_format_row(row))
    return rows


_COLUMNS = (("shape", 34), ("implementation", 26), ("fwd rel err", 12), ("grad rel err", 12),
            ("fwd ms", 10), ("fwd+bwd ms", 11), ("status", 0))


def _format_row(row: CheckRow) -> str:
    number = lambda v, f: "-" if v is None else format(v, f)
    cells = (row.shape, row.implementation, number(row.forward_error, ".2e"), number(row.gradient_error, ".2e"),
             number(row.forward_ms, ".3f"), number(row.forward_backward_ms, ".3f"), row.status)
    return "  ".join(cell.ljust(width) if width else cell for cell, (_, width) in zip(cells, _COLUMNS))


def _header() -> str:
    return "  ".join(title.ljust(width) if width else title for title, width in _COLUMNS)


def check_command(args: argparse.Namespace) -> int:
    """``fleetjax check``: 0 when every implementation matches the reference, 1 otherwise."""
    import jax

    import fleetjax

    available = sorted(fleetjax.IMPLEMENTATIONS)
    names = available if args.implementations is None else args.implementations
    unknown = [n for n in names if n not in fleetjax.IMPLEMENTATIONS]
    if unknown:
        print(f"fleetjax check: unknown implementation(s) {', '.join(unknown)}; available: {', '.join(available)}",
              file=sys.stderr)
        return 2
    shapes = GPU_SHAPES if jax.default_backend() == "gpu" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    device = jax.devices()[0]
    print(f"fleetjax {fleetjax.__version__}, jax {jax.__version__}, {device.platform} ({device.device_kind}); "
          f"{args.dtype} inputs against implementation={REFERENCE!r}, tolerance {TOLERANCE[args.dtype]:g}; "
          f"times are medians of {repeats} jit-compiled, warmed-up calls")
    print(_header())
    started = time.perf_counter()
    rows = run_check(names, shapes, dtype=args.dtype, repeats=repeats, seed=args.seed)
    failed = [row for row in rows if row.status not in ("ok", "skipped")]
    skipped = sum(row.status == "skipped" for row in rows)
    print(f"{len(rows) - len(failed) - skipped} ok, {len(failed)} failed, {skipped} skipped "
          f"(Pallas interpret mode runs the small shape only) in {time.perf_counter() - started:.0f}s")
    return 1 if failed else 0


def quick_check() -> int:
    """``fleetjax check --quick`` with the defaults, for other commands (``fleetjax demo``)."""
    return check_command(build_parser().parse_args(["check", "--quick"]))


def _implementation_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one implementation name")
    return names


def register_check(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="compare every implementation with the scan reference and time them",
        description="Run every available implementation (Pallas ones in interpret mode off-GPU, on the small "
                    "shape) on a few shapes with initial state, packed sequences and odd T; compare forward "
                    "and gradients with implementation='scan'; print errors and median times. Exits 1 on "
                    "any mismatch beyond the tolerance or any error.")
    parser.add_argument("--quick", action="store_true", help="the first shape only, fewer timing repeats")
    parser.add_argument("--implementations", type=_implementation_list, default=None, metavar="NAMES",
                        help="comma-separated names (default: all available)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32", help="input dtype")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=check_command)


# --------------------------------------------------------------------------------------------- wiring

def register_training(subparsers: argparse._SubParsersAction) -> None:
    """``train`` and ``demo`` from fleetjax.train, when that module is present."""
    try:
        train = importlib.import_module("fleetjax.train")
    except ModuleNotFoundError as error:
        if error.name != "fleetjax.train":
            raise
        return
    train.register(subparsers, check=quick_check)


REGISTRARS: list[Registrar] = [register_check, register_training]


def build_parser() -> argparse.ArgumentParser:
    from fleetjax import __version__

    parser = argparse.ArgumentParser(prog="fleetjax", description="Exponentially decaying causal linear "
                                     "attention (retention) for JAX: checks, benchmarks and demos.")
    parser.add_argument("--version", action="version", version=f"fleetjax {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for registrar in REGISTRARS:
        registrar(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
