"""Checking implementations against the scan reference: forward, every gradient, repeatability and time.

Each implementation of ``fleetjax.api.IMPLEMENTATIONS`` (read when the check runs) goes through the same
inputs as ``implementation="scan"``: with an initial state, packed sequences and odd lengths; the output,
the final state and the gradients in q, k, v, decay and the initial state (random cotangents for the output
and the final state) are compared by :func:`relative_error`. What an implementation can do here comes from
its record: one that runs only in Pallas interpret mode gets the small shapes, one that is not available on
this backend is skipped. ``fleetjax check`` prints :func:`report`'s table; experiments/gpu_check.py adds
larger shapes and configs.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import fleetjax
from fleetjax import api
from fleetjax.implementation import Implementation

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
REFERENCE = "scan"
FORWARD_OUTPUTS = ("o", "final_state")
GRADIENTS = ("dq", "dk", "dv", "ddecay", "dinitial_state", "dlog_gate")


def relative_error(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref|, in float64; inf if ``got`` is non-finite where ``ref`` is finite, 0 for
    two empty arrays (and for equal all-zero arrays).

    Raises ValueError if the shapes differ."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} differs from the reference's {ref.shape}")
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got[np.isfinite(ref)])):
        return float("inf")
    error = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    if scale == 0:
        return 0.0 if error == 0 else float("inf")
    return error / scale


@dataclasses.dataclass(frozen=True)
class CheckShape:
    """One problem: q, k [B, T, H, K], v [B, T, H, V]; ``decay`` spreads over the heads from near 1 (a
    memory of about 4T positions) down to ``min_decay``; ``gated``: per-token log gates [B, T, H] too (small,
    with one hard forget). scale None is the op's default, K^-1/2."""

    B: int
    T: int
    H: int
    K: int
    V: int
    initial_state: bool = True
    segments: bool = False
    scale: float | None = None
    min_decay: float = 0.5
    gated: bool = False

    def __str__(self) -> str:
        extras = [name for name, on in (("init", self.initial_state), ("segments", self.segments),
                                        ("gated", self.gated)) if on]
        return f"B{self.B} T{self.T} H{self.H} K{self.K} V{self.V}" + "".join(f" {e}" for e in extras)

    @property
    def interpret_sized(self) -> bool:
        """Small enough for Pallas interpret mode (the kernels run op by op in XLA: slow)."""
        return self.T <= 130 and self.B * self.H <= 8 and max(self.K, self.V) <= 64


# Odd T, K != V, head dims that are not powers of two, chunk edges crossed, packed sequences, per-token gates.
# The first two are small (Pallas interpret mode runs them): --quick's.
CPU_SHAPES = (
    CheckShape(B=2, T=67, H=2, K=24, V=40, segments=True, scale=0.5, min_decay=1e-3),
    CheckShape(B=1, T=70, H=2, K=16, V=24, segments=True, gated=True, min_decay=0.9),
    CheckShape(B=2, T=513, H=4, K=32, V=48),
    CheckShape(B=1, T=1031, H=2, K=16, V=16, segments=True, scale=1.0, min_decay=0.9),
)
GPU_SHAPES = CPU_SHAPES[:2] + (
    CheckShape(B=4, T=2049, H=8, K=128, V=128, segments=True, gated=True),
    CheckShape(B=1, T=8191, H=4, K=64, V=96, scale=0.125, min_decay=0.9),
)


def default_shapes(backend: str | None = None, *, quick: bool = False) -> tuple[CheckShape, ...]:
    """The shapes of ``fleetjax check`` on ``backend`` (default: JAX's); quick: the two small ones."""
    shapes = GPU_SHAPES if (backend or jax.default_backend()) == "gpu" else CPU_SHAPES
    return shapes[:2] if quick else shapes


@dataclasses.dataclass(frozen=True)
class Variant:
    """An implementation of the registry, by name, run with ``config``: None (its default), a config, or a
    function (q, v) -> config for each shape (the default with a field changed, say); ``label`` names the
    config in the table."""

    implementation: str
    config: Any = None
    label: str = ""

    def __str__(self) -> str:
        return self.implementation + (f" [{self.label}]" if self.label else "")


@dataclasses.dataclass
class CheckRow:
    """One variant on one shape. Errors are :func:`relative_error` against the reference, per output
    (``errors``) and their maxima; times are medians in ms; ``repeatable``: a later call gave the same bits."""

    shape: str
    implementation: str
    mode: str = "-"  # compiled, interpret (Pallas interpret mode), reference; "-" where it does not run
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    forward_error: float | None = None
    gradient_error: float | None = None
    forward_ms: float | None = None
    forward_backward_ms: float | None = None
    repeatable: bool | None = None
    status: str = "ok"  # ok, FAIL, ERROR <what>, skipped (<why>)

    @property
    def failed(self) -> bool:
        return not (self.status == "ok" or self.status.startswith("skipped"))


def inputs(shape: CheckShape, dtype: Any, seed: int) -> dict[str, Any]:
    """The arguments of one check: q, k, v in ``dtype``, decay [H], initial_state [B, H, K, V] or None,
    segment_ids [B, T] or None, log_gate [B, T, H] float32 or None, and the cotangents do [B, T, H, V] and
    d_final [B, H, K, V]."""
    rng = np.random.default_rng(seed)
    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    decay = 1.0 - np.geomspace(1.0 / (4 * T), 1.0 - shape.min_decay, H)
    segment_ids = None
    if shape.segments:
        starts = rng.random((B, T)) < 8.0 / T
        starts[:, [t for t in (T // 2, 64) if t < T]] = True  # a boundary inside and one at a chunk edge
        segment_ids = jnp.asarray(np.cumsum(starts, axis=1) % 3, jnp.int32)  # ids recur after other ids
    log_gate = None
    if shape.gated:
        log_gate = -0.2 * np.abs(normal(B, T, H))
        log_gate[:, T // 3, 0] = -40.0  # a hard forget: the state before it all but vanishes
    return dict(q=jnp.asarray(normal(B, T, H, K) / np.sqrt(K), dtype), k=jnp.asarray(normal(B, T, H, K), dtype),
                v=jnp.asarray(normal(B, T, H, V), dtype), decay=jnp.asarray(decay, jnp.float32),
                initial_state=jnp.asarray(normal(B, H, K, V)) if shape.initial_state else None,
                segment_ids=segment_ids, log_gate=None if log_gate is None else jnp.asarray(log_gate),
                do=jnp.asarray(normal(B, T, H, V), dtype),
                d_final=jnp.asarray(normal(B, H, K, V)))


def _functions(implementation: Implementation, config: Any, shape: CheckShape):
    """jit-compiled forward(x) -> (o, final_state) and forward_backward(x) -> ((o, final_state), gradients
    by GRADIENTS' names) of one implementation, x being :func:`inputs`'s dict."""

    def forward(x):
        chosen = config(x["q"], x["v"]) if callable(config) else config
        return api.fleet_attention(x["q"], x["k"], x["v"], x["decay"], scale=shape.scale,
                                   log_gate=x["log_gate"], initial_state=x["initial_state"],
                                   return_final_state=True, segment_ids=x["segment_ids"],
                                   implementation=implementation, config=chosen)

    def forward_backward(x):
        differentiable = [name for name in ("q", "k", "v", "decay", "initial_state", "log_gate")
                          if x[name] is not None]
        run = lambda *values: forward({**x, **dict(zip(differentiable, values))})
        out, vjp = jax.vjp(run, *(x[name] for name in differentiable))
        return out, {"d" + name: g for name, g in zip(differentiable, vjp((x["do"], x["d_final"])))}

    return jax.jit(forward), jax.jit(forward_backward)


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median ms of ``repeats`` calls after a warm-up call, the last call's result)."""
    result = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times), result


def _compare(row: CheckRow, out, grads, ref_out, ref_grads) -> None:
    row.errors = {name: relative_error(g, r) for name, g, r in zip(FORWARD_OUTPUTS, out, ref_out)}
    row.errors.update({name: relative_error(grads[name], ref_grads[name]) for name in GRADIENTS if name in grads})
    row.forward_error = max(row.errors[name] for name in FORWARD_OUTPUTS)
    row.gradient_error = max(row.errors[name] for name in GRADIENTS if name in row.errors)


def _bitwise_equal(a: Any, b: Any) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_check(variants: Sequence[str | Variant], shapes: Sequence[CheckShape], *, dtype: str = "float32",
              repeats: int = 5, seed: int = 0, echo: Callable[[CheckRow], None] | None = None) -> list[CheckRow]:
    """Each variant (an implementation name, or one with a config) on each shape against the reference.

    The check fails where an error exceeds TOLERANCE[dtype], a call raises, or two calls with the same
    inputs differ in a bit. ``echo`` sees each row when it is done.
    """
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(TOLERANCE)}, got {dtype!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    variants = [Variant(v) if isinstance(v, str) else v for v in variants]
    registry = api.IMPLEMENTATIONS  # at call time: a test or a user may have put other records there
    rows = []
    for n, shape in enumerate(shapes):
        x = inputs(shape, jnp.dtype(dtype), seed + n)
        reference = _Reference(registry[REFERENCE], shape, x)
        for variant in variants:
            row = CheckRow(str(shape), str(variant))
            rows.append(row)
            _check_one(row, registry.get(variant.implementation), variant, shape, x, reference,
                       tolerance=TOLERANCE[dtype], repeats=repeats)
            if echo is not None:
                echo(row)
    return rows


class _Reference:
    """The reference's functions and results on one shape's inputs, made when first asked for: a shape
    whose variants are all skipped costs nothing, and the reference's own row reuses them."""

    def __init__(self, implementation: Implementation, shape: CheckShape, x: dict[str, Any]):
        self.implementation, self.shape, self.x = implementation, shape, x

    @functools.cached_property
    def functions(self) -> tuple[Callable, Callable]:
        return _functions(self.implementation, None, self.shape)

    @functools.cached_property
    def results(self) -> tuple[Any, Any]:
        """(output and final state, gradients)."""
        return self.functions[1](self.x)


def _check_one(row: CheckRow, impl: Implementation | None, variant: Variant, shape: CheckShape, x,
               reference: _Reference, *, tolerance: float, repeats: int) -> None:
    if impl is None:
        row.status = "skipped (not in this installation's IMPLEMENTATIONS)"
        return
    if not impl.available():
        row.status = f"skipped (runs on {', '.join(impl.platforms)}, not {jax.default_backend()})"
        return
    row.mode = "interpret" if impl.interpreted() else "compiled"
    if row.mode == "interpret" and not shape.interpret_sized:
        row.status = "skipped (Pallas interpret mode: small shapes only)"
        return
    is_reference = variant.implementation == REFERENCE and variant.config is None
    if is_reference:
        row.mode = "reference"
    try:
        forward, forward_backward = reference.functions if is_reference else _functions(impl, variant.config, shape)
        out, grads = forward_backward(x)
        _compare(row, out, grads, *reference.results)
        row.forward_ms, _ = _timed(lambda: forward(x), repeats)
        row.forward_backward_ms, again = _timed(lambda: forward_backward(x), repeats)
        row.repeatable = _bitwise_equal((out, grads), again)
        if not (max(row.forward_error, row.gradient_error) <= tolerance and row.repeatable):
            row.status = "FAIL"
    except Exception as error:  # noqa: BLE001 - a crash is a failed check, reported in the table
        first_line = str(error).splitlines()[0][:120] if str(error) else ""
        row.status = f"ERROR {type(error).__name__}: {first_line}"


@dataclasses.dataclass(frozen=True)
class Table:
    """The check's table: one column per field of :class:`CheckRow` that it shows, the shape and implementation
    columns as wide as their longest entry (known before the rows are: they print as they finish)."""

    shape_width: int
    implementation_width: int

    @classmethod
    def fitting(cls, variants: Sequence[str | Variant], shapes: Sequence[CheckShape]) -> "Table":
        return cls(max(len(str(x)) for x in ("shape", *shapes)),
                   max(len(str(x)) for x in ("implementation", *variants)))

    def _line(self, cells: Sequence[str]) -> str:
        widths = (self.shape_width, self.implementation_width, 9, 12, 12, 10, 11, 5, 0)
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    @property
    def header(self) -> str:
        return self._line(["shape", "implementation", "mode", "fwd rel err", "grad rel err", "fwd ms", "fwd+bwd ms",
                           "bits", "status"])

    def row(self, row: CheckRow) -> str:
        number = lambda value, spec: "-" if value is None else format(value, spec)
        bits = {None: "-", True: "same", False: "DIFF"}[row.repeatable]
        return self._line([row.shape, row.implementation, row.mode, number(row.forward_error, ".2e"),
                           number(row.gradient_error, ".2e"), number(row.forward_ms, ".3f"),
                           number(row.forward_backward_ms, ".3f"), bits, row.status])


def preamble(dtype: str, repeats: int) -> str:
    device = jax.devices()[0]
    return (f"fleetjax {fleetjax.__version__}, jax {jax.__version__}, {device.platform} ({device.device_kind}); "
            f"{dtype} inputs against implementation={REFERENCE!r}, tolerance {TOLERANCE[dtype]:g}; times are "
            f"medians of {repeats} jit-compiled, warmed-up calls; bits: a repeated call gave the same bits")


def summary(rows: Sequence[CheckRow], seconds: float) -> str:
    failed = sum(row.failed for row in rows)
    skipped = sum(row.status.startswith("skipped") for row in rows)
    return f"{len(rows) - failed - skipped} ok, {failed} failed, {skipped} skipped in {seconds:.0f}s"


def report(variants: Sequence[str | Variant], shapes: Sequence[CheckShape], *, dtype: str = "float32",
           repeats: int = 5, seed: int = 0, echo: Callable[[str], None] = print) -> list[CheckRow]:
    """:func:`run_check` with its table echoed line by line: preamble, header, one row each, summary."""
    table = Table.fitting(variants, shapes)
    echo(preamble(dtype, repeats))
    echo(table.header)
    started = time.perf_counter()
    rows = run_check(variants, shapes, dtype=dtype, repeats=repeats, seed=seed, echo=lambda row: echo(table.row(row)))
    echo(summary(rows, time.perf_counter() - started))
    return rows
