"""The public op: ``fleet_attention`` and ``decode_step``, their validation, and the implementation table."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fleetjax import reference, xla
from fleetjax.segments import run_ids_from_segment_ids
from fleetjax.sharding import vary_like
from fleetjax.state_passing import BlockKernels

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute the op. ``fn(q, k, v, log_decay, initial_state, run_ids, *, scale, config)``
    returns (o [B, T, H, V], final state [B, H, K, V] float32); inputs are already validated."""

    fn: Callable[..., tuple[jax.Array, jax.Array]]
    config_type: type | None = None
    default_config: Callable[[jax.Array, jax.Array], Any] | None = None
    block_kernels: BlockKernels | None = None  # its steps for sequence parallelism, if it has them


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(xla.xla_impl, xla.XlaConfig, xla.default_config),
    "scan": Implementation(reference.scan_impl),
    "quadratic": Implementation(reference.quadratic_impl),
}


def _register_pallas() -> None:
    """Add the Pallas kernels, unless this JAX has no working Pallas (the other implementations stay)."""
    try:
        importlib.import_module("jax.experimental.pallas")
    except ImportError:  # pragma: no cover - only on a JAX built without Pallas
        return
    from fleetjax import pallas_chunked, pallas_fleet
    IMPLEMENTATIONS["pallas"] = Implementation(pallas_chunked.pallas_impl, pallas_chunked.PallasConfig,
                                               pallas_chunked.default_config, pallas_chunked.BLOCK_KERNELS)
    IMPLEMENTATIONS["pallas_fleet"] = Implementation(pallas_fleet.pallas_fleet_impl, pallas_fleet.FleetConfig,
                                                     pallas_fleet.default_config)


def default_implementation() -> str:
    """"pallas" on GPU, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" and "pallas" in IMPLEMENTATIONS else "xla"


# ---------------------------------------------------------------------------------------------- validation

def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def _dtype(x):
    return jnp.result_type(x) if hasattr(x, "dtype") else jnp.asarray(x).dtype


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(_dtype(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), "
                        f"got {_dtype(x)}")


def _concrete(x) -> np.ndarray | None:
    """The value of x if it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_decay(decay, H: int) -> None:
    _check_float("decay", decay)
    if _shape(decay) != (H,):
        raise ValueError(f"decay must have shape [H] = ({H},), one decay per head, got {_shape(decay)}")
    value = _concrete(decay)
    if value is not None and not np.all((value > 0) & (value <= 1)):
        raise ValueError(f"decay must lie in (0, 1], got values in [{value.min()}, {value.max()}]")


def _static_scale(scale) -> float:
    value = _concrete(scale)
    if value is None or value.shape != () or not np.issubdtype(value.dtype, np.number) or not np.isfinite(value):
        raise TypeError(f"scale must be a concrete finite number (it is static), got {scale!r}")
    return float(value)


def _validate(q, k, v, decay, scale, initial_state, segment_ids) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must have rank 4, [B, T, H, {'V' if name == 'v' else 'K'}], "
                             f"got shape {_shape(x)}")
    B, T, H, K = _shape(q)
    if _shape(k) != _shape(q):
        raise ValueError(f"k must have the shape of q, [B, T, H, K] = {_shape(q)}, got {_shape(k)}")
    if _shape(v)[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] with [B, T, H] = {(B, T, H)} from q, got {_shape(v)}")
    V = _shape(v)[3]
    _check_decay(decay, H)
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if _shape(initial_state) != (B, H, K, V):
            raise ValueError(f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, "
                             f"got {_shape(initial_state)}")
    if segment_ids is not None:
        if not jnp.issubdtype(_dtype(segment_ids), jnp.integer):
            raise TypeError(f"segment_ids must have an integer dtype, got {_dtype(segment_ids)}")
        if _shape(segment_ids) != (B, T):
            raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {_shape(segment_ids)}")
    return _static_scale(scale)


def _resolve(implementation: str | None, config: Any, q, v) -> tuple[Implementation, Any]:
    name = default_implementation() if implementation is None else implementation
    if name not in IMPLEMENTATIONS:
        known = ", ".join(repr(n) for n in ["pallas", "pallas_fleet", "xla", "scan", "quadratic"])
        if name in ("pallas", "pallas_fleet"):
            raise ValueError(f"implementation={name!r} is not available: jax.experimental.pallas did not import")
        raise ValueError(f"implementation must be None or one of {known}, got {name!r}")
    impl = IMPLEMENTATIONS[name]
    if impl.config_type is None:
        if config is not None:
            raise TypeError(f"implementation={name!r} takes no config, got {config!r}")
        return impl, None
    if config is None:
        return impl, impl.default_config(q, v)
    if not isinstance(config, impl.config_type):
        raise TypeError(f"config for implementation={name!r} must be a {impl.config_type.__name__}, "
                        f"got {type(config).__name__}")
    return impl, config


# -------------------------------------------------------------------------------------------------- the op

def fleet_attention(q, k, v, decay, *, scale=1.0, initial_state=None, return_final_state=False,
                    segment_ids=None, sequence_axis_name=None, implementation=None, config=None):
    """Exponentially decaying causal linear attention (retention).

        O_t = scale * sum_{s <= t} decay_h^(t-s) (q_t . k_s) v_s

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; any float dtype (computed with float32 accumulation).
      decay: [H], values in (0, 1]. Checked when concrete; when traced (a learned decay), values outside
        (0, 1] are not checked: decay > 1 computes the growing sum and may overflow, decay <= 0 gives NaN.
        Parametrize a learned decay into (0, 1) (for example a sigmoid), as fleetjax.nn does.
      scale: a concrete number multiplying every output.
      initial_state: [B, H, K, V] or None (zeros); it feeds the first segment of each row.
      return_final_state: also return the state after the last position, [B, H, K, V] float32.
      segment_ids: [B, T] integers or None; the state resets wherever the id changes (packed sequences).
      sequence_axis_name: inside jax.shard_map with T split in contiguous blocks over this mesh axis, the
        result equals the unsharded call.
      implementation: None (auto: "pallas" on GPU, "xla" elsewhere), "pallas", "pallas_fleet", "xla",
        "scan" or "quadratic".
      config: the implementation's config dataclass, or None for its heuristic default.

    Returns:
      o [B, T, H, V] in the inputs' result dtype, or (o, final_state) with return_final_state=True.
      Differentiable in q, k, v, decay and initial_state.
    """
    scale = _validate(q, k, v, decay, scale, initial_state, segment_ids)
    impl, config = _resolve(implementation, config, q, v)
    out_dtype = jnp.result_type(q, k, v)
    q, k, v = (jnp.asarray(x, out_dtype) for x in (q, k, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    log_decay = jnp.log(jnp.asarray(decay, f32))
    state = jnp.zeros((B, H, K, V), f32) if initial_state is None else jnp.asarray(initial_state, f32)
    if sequence_axis_name is not None:
        from fleetjax.sharding import sequence_parallel
        o, final_state = sequence_parallel(impl, q, k, v, log_decay, state, segment_ids, scale=scale,
                                           config=config, axis_name=sequence_axis_name)
    elif T == 0 or B == 0:
        o, final_state = jnp.zeros((B, T, H, V), out_dtype), state
    else:
        run_ids = None if segment_ids is None else run_ids_from_segment_ids(jnp.asarray(segment_ids))
        # Inside jax.shard_map(check_vma=True) (data parallelism): the state and decay enter typed like q, k, v.
        log_decay, state = vary_like(log_decay, q, k, v), vary_like(state, q, k, v)
        o, final_state = impl.fn(q, k, v, log_decay, state, run_ids, scale=scale, config=config)
    o = o.astype(out_dtype)
    return (o, final_state) if return_final_state else o


def decode_step(q_t, k_t, v_t, decay, state, *, scale=1.0):
    """One new position from a cached state: q_t, k_t [B, H, K], v_t [B, H, V], state [B, H, K, V].

    Returns (o_t [B, H, V] in the inputs' dtype, new state [B, H, K, V] float32); feeding positions one by
    one from the initial state equals fleet_attention over the whole sequence.
    """
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("state", state)):
        _check_float(name, x)
    if len(_shape(q_t)) != 3 or _shape(k_t) != _shape(q_t):
        raise ValueError(f"q_t and k_t must both have shape [B, H, K], got {_shape(q_t)} and {_shape(k_t)}")
    B, H, K = _shape(q_t)
    if len(_shape(v_t)) != 3 or _shape(v_t)[:2] != (B, H):
        raise ValueError(f"v_t must have shape [B, H, V] with [B, H] = {(B, H)}, got {_shape(v_t)}")
    V = _shape(v_t)[2]
    if _shape(state) != (B, H, K, V):
        raise ValueError(f"state must have shape [B, H, K, V] = {(B, H, K, V)}, got {_shape(state)}")
    _check_decay(decay, H)
    o_t, state = reference.recurrent_step(q_t, k_t, v_t, jnp.asarray(decay, f32), jnp.asarray(state, f32),
                                          _static_scale(scale))
    return o_t.astype(jnp.result_type(q_t, k_t, v_t)), state


_register_pallas()
