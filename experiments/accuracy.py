"""How close an implementation's outputs are to the float32 reference.

relerr is :func:`fleetjax.check.relative_error` (max |got - ref| / max |ref| in float64 on the host), the one
measure the library's checker, the benchmarks and the GPU checks report. It copies both arrays to the host
and widens them to float64, about 1 s per 2^26 elements on one CPU core: for larger outputs (B1 H16
T=131072 K=V=128 is 2^28 elements) it reads every ``stride``-th position along T, which keeps the start and
the end of the sequence and bounds the host's time and memory. relerr_l2 (the L2 ratio) and the
non-finite check read every element, on the device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# At most this many elements per output go through the host's float64 max-norm error (see the docstring).
MAX_ERROR_ELEMENTS = 2 ** 26

# The benchmarks' scale for every implementation: the peers' kernels multiply q . k by 1 (or take 1.0).
SCALE = 1.0

REFERENCE = ("fleetjax.xla on the benchmark's own inputs upcast to float32 (exact), float32 arithmetic with "
             "Precision.HIGHEST; fwd_bwd: jax.vjp with the same dO, gradients for q, k, v and decay (gated "
             "cases: for q, k, v and log_gate, with decay None)")


def reference_outputs(op: str, inputs: dict[str, Any], log_decay: np.ndarray) -> dict[str, Any]:
    """The float32 reference (see REFERENCE): {"o"} for fwd, {"o", "dq", "dk", "dv", "ddecay"} for fwd_bwd.
    With a "log_gate" among the inputs (a gated case) the gate alone decays (decay None, ``log_decay``
    unused) and fwd_bwd returns "dlog_gate" in place of "ddecay".

    The chunked XLA form holds O(T) memory (no T x T product), so it stays feasible at the long-context row:
    at B1 H16 T=131072 K=V=128 each float32 tensor is 1 GiB, the forward+backward about 10 in all."""
    import jax
    import jax.numpy as jnp
    from fleetjax import fleet_attention
    up = {name: x.astype(jnp.float32) for name, x in inputs.items()}
    if "log_gate" in up:
        def attend(q, k, v, g):
            return fleet_attention(q, k, v, None, log_gate=g, scale=SCALE, implementation="xla")

        last, last_name = up["log_gate"], "dlog_gate"
    else:
        def attend(q, k, v, d):
            return fleet_attention(q, k, v, d, scale=SCALE, implementation="xla")

        last, last_name = jnp.exp(jnp.asarray(log_decay, jnp.float32)), "ddecay"

    if op == "fwd":
        return {"o": jax.block_until_ready(jax.jit(attend)(up["q"], up["k"], up["v"], last))}

    @jax.jit
    def fwd_bwd(q, k, v, d, do):
        o, vjp = jax.vjp(attend, q, k, v, d)
        return (o,) + tuple(vjp(do))

    out = jax.block_until_ready(fwd_bwd(up["q"], up["k"], up["v"], last, up["do"]))
    return dict(zip(("o", "dq", "dk", "dv", last_name), out))


def same_bits(a: Any, b: Any) -> bool:
    """Whether two arrays hold the same bits: shape, dtype and every element's bit pattern, on the device.
    Stricter than ``jnp.array_equal``, which calls -0.0 and 0.0 equal and a NaN unequal to itself: the A/Bs that
    call two variants bitwise equal (a form that leaves a barrier out, a second warpgroup) mean this."""
    import jax
    import jax.numpy as jnp
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if jnp.issubdtype(a.dtype, jnp.floating):
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(a.dtype).itemsize]
        a, b = (jax.lax.bitcast_convert_type(x, unsigned) for x in (a, b))
    return bool(jnp.array_equal(a, b))


def error_stride(shape: tuple[int, ...], max_elements: int = MAX_ERROR_ELEMENTS) -> int:
    """Every how many positions (axis 1) relerr reads so that at most about ``max_elements`` are compared."""
    size = math.prod(shape)
    if len(shape) < 2 or size <= max_elements:
        return 1
    return min(shape[1], math.ceil(size / max_elements))


def output_errors(got: Any, ref: Any, *, max_elements: int = MAX_ERROR_ELEMENTS) -> dict[str, Any]:
    """{"relerr", "relerr_l2", "stride"[, "nonfinite": True]} of one output against its reference.

    relerr: fleetjax.check.relative_error over every ``stride``-th position (all positions up to
    ``max_elements`` elements); None, with nonfinite, if ``got`` holds a non-finite value anywhere.
    relerr_l2: |got - ref|_2 / |ref|_2 in float32 on the device (None if not finite)."""
    import jax.numpy as jnp

    from fleetjax.check import relative_error
    got = jnp.asarray(got)
    ref = jnp.asarray(ref)
    if got.shape != ref.shape:
        raise ValueError(f"output shape {got.shape} differs from the reference's {ref.shape}")
    stride = error_stride(got.shape, max_elements)
    sample = (slice(None), slice(None, None, stride)) if stride > 1 else ...
    # Widened to float32 on the device first: the copy is exact and numpy's float32 -> float64 is fast,
    # where converting a JAX bfloat16 array to float64 directly takes several times longer.
    relerr = relative_error(*(np.asarray(x[sample].astype(jnp.float32)) for x in (got, ref)))
    got32, ref32 = got.astype(jnp.float32), ref.astype(jnp.float32)
    ref_l2 = float(jnp.sqrt(jnp.sum(ref32 * ref32)))
    l2 = float(jnp.sqrt(jnp.sum((got32 - ref32) ** 2))) / ref_l2 if ref_l2 > 0 else float("nan")
    result: dict[str, Any] = {"relerr": relerr if math.isfinite(relerr) else None,
                              "relerr_l2": l2 if math.isfinite(l2) else None, "stride": stride}
    if result["relerr"] is None or not bool(jnp.all(jnp.isfinite(got32))):
        result.update(relerr=None, nonfinite=True)
    return result
