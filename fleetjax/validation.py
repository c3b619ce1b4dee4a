"""Checks at the public boundary: every error names the argument and says what was expected.

Implementations assume valid input; ``fleet_attention``, ``decode_step``, the references and the layers call
these first. Values are checked when they are concrete; a traced decay or gate (a learned one, under jit) is
taken as given. No check is staged into the computation: a ``checkify`` check, even a debug one, puts an
effect into the caller's jaxpr, and a jitted function with an effect leaves JAX's fast C++ dispatch path (on
the GPU that cost 0.1-0.4 ms a call). A caller who wants traced values checked adds its own
``checkify.check`` on its parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def dtype(x):
    return jnp.result_type(x) if hasattr(x, "dtype") else jnp.asarray(x).dtype


def concrete(x) -> np.ndarray | None:
    """The value of x if it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_array(name: str, x) -> None:
    """x must be an array (or something jnp.asarray takes), not None."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")


def check_float(name: str, x) -> None:
    check_array(name, x)
    if not jnp.issubdtype(dtype(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {dtype(x)}")


def check_decay(decay, H: int, *, head_first_hint: str = "", optional: bool = False) -> None:
    """decay [H] float in (0, 1]; concrete values are checked now, traced ones are not. ``optional``:
    None is allowed (a log gate carries the decay)."""
    if decay is None and optional:
        return
    if decay is None:
        raise TypeError("decay must be an array [H] of values in (0, 1], got None (None is allowed only with "
                        "a log_gate)")
    check_float("decay", decay)
    if shape(decay) != (H,):
        raise ValueError(f"decay must have shape [H] = ({H},), one decay per head, got {shape(decay)}"
                         + head_first_hint)
    value = concrete(decay)
    if value is not None:
        if not np.all((value > 0) & (value <= 1)):
            raise ValueError(f"decay must lie in (0, 1], got values in [{np.min(value)}, {np.max(value)}]")
        return


def check_log_gate(log_gate, B: int, T: int, H: int) -> None:
    """log_gate [B, T, H] float, finite and <= 0 (the log of a forget gate in (0, 1]); concrete values are
    checked now, traced ones are not."""
    check_float("log_gate", log_gate)
    if shape(log_gate) != (B, T, H):
        raise ValueError(f"log_gate must have shape [B, T, H] = {(B, T, H)}, one log forget gate per position "
                         f"and head, got {shape(log_gate)}")
    value = concrete(log_gate)
    if value is not None:
        if value.size and not (np.all(np.isfinite(value)) and np.all(value <= 0)):
            raise ValueError(f"log_gate must be finite and <= 0 (the log of a gate in (0, 1]), got values in "
                             f"[{np.min(value)}, {np.max(value)}]")


def static_scale(scale, K: int) -> float:
    """The scale as a Python float: K^-1/2 for None, else a concrete finite number."""
    if scale is None:
        return float(K) ** -0.5 if K > 0 else 1.0
    value = concrete(scale)
    if value is None or value.shape != () or not np.issubdtype(value.dtype, np.number) or not np.isfinite(value):
        raise TypeError(f"scale must be None (K^-1/2) or a concrete finite number (it is static), got {scale!r}")
    return float(value)


def check_inputs(q, k, v, decay, initial_state, segment_ids, log_gate=None) -> None:
    """The arguments of fleet_attention (layout [B, T, H, D])."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if len(shape(x)) != 4:
            raise ValueError(f"{name} must have rank 4, [B, T, H, {'V' if name == 'v' else 'K'}], "
                             f"got shape {shape(x)}")
    B, T, H, K = shape(q)
    if shape(k) != shape(q):
        raise ValueError(f"k must have the shape of q, [B, T, H, K] = {shape(q)}, got {shape(k)}")
    if shape(v)[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] with [B, T, H] = {(B, T, H)} from q, got {shape(v)}")
    V = shape(v)[3]
    hint = ""
    if len(shape(decay)) == 1 and shape(decay)[0] == T != H:
        hint = (f"; q, k, v are laid out [B, T, H, K] (batch, time, heads, dim) and q has shape {shape(q)}: if "
                "your arrays are head-first [B, H, T, K], swap axes 1 and 2")
    check_decay(decay, H, head_first_hint=hint, optional=log_gate is not None)
    if log_gate is not None:
        check_log_gate(log_gate, B, T, H)
    if initial_state is not None:
        check_float("initial_state", initial_state)
        if shape(initial_state) != (B, H, K, V):
            raise ValueError(f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, "
                             f"got {shape(initial_state)}")
    if segment_ids is not None:
        if not jnp.issubdtype(dtype(segment_ids), jnp.integer):
            raise TypeError(f"segment_ids must have an integer dtype, got {dtype(segment_ids)}")
        if shape(segment_ids) != (B, T):
            raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {shape(segment_ids)}")


def check_step(q_t, k_t, v_t, decay, state, log_gate=None) -> None:
    """The arguments of decode_step (one position: [B, H, D])."""
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_float(name, x)
    if state is None:
        raise TypeError("state must be the cached state [B, H, K, V] float32 (zeros before the first "
                        "position), got None")
    check_float("state", state)
    if len(shape(q_t)) != 3:
        raise ValueError(f"q_t must have shape [B, H, K] (one position), got {shape(q_t)}")
    if shape(k_t) != shape(q_t):
        raise ValueError(f"k_t must have the shape of q_t, [B, H, K] = {shape(q_t)}, got {shape(k_t)}")
    B, H, K = shape(q_t)
    if len(shape(v_t)) != 3 or shape(v_t)[:2] != (B, H):
        raise ValueError(f"v_t must have shape [B, H, V] with [B, H] = {(B, H)}, got {shape(v_t)}")
    V = shape(v_t)[2]
    if shape(state) != (B, H, K, V):
        raise ValueError(f"state must have shape [B, H, K, V] = {(B, H, K, V)}, got {shape(state)}")
    check_decay(decay, H, optional=log_gate is not None)
    if log_gate is not None:
        check_float("log_gate", log_gate)
        if shape(log_gate) != (B, H):
            raise ValueError(f"log_gate must have shape [B, H] = {(B, H)} (one position), got {shape(log_gate)}")
        check_log_gate(jnp.asarray(log_gate)[:, None], B, 1, H)
