"""The public op: ``fleet_attention`` and ``decode_step``, and the table of implementations."""

from __future__ import annotations

import types
from typing import Mapping

import jax
import jax.numpy as jnp

from fleetjax import reference, validation, xla
from fleetjax.decay import log_decay_of
from fleetjax.implementation import Implementation, run

f32 = jnp.float32


def _implementations() -> Mapping[str, Implementation]:
    """Every implementation of this installation, by name (the Pallas ones only where Pallas imports)."""
    records = [xla.IMPLEMENTATION, reference.SCAN, reference.QUADRATIC]
    try:
        from fleetjax.pallas import chunked, fleet
    except ImportError:  # pragma: no cover - a JAX built without Pallas
        pass
    else:
        records += [chunked.IMPLEMENTATION, fleet.IMPLEMENTATION]
    return types.MappingProxyType({record.name: record for record in records})


IMPLEMENTATIONS: Mapping[str, Implementation] = _implementations()
KNOWN = ("pallas", "pallas_fleet", "xla", "scan", "quadratic")


def default_implementation() -> str:
    """"pallas" on GPU, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" and "pallas" in IMPLEMENTATIONS else "xla"


def get_implementation(name: str | Implementation | None) -> Implementation:
    """The record of implementation ``name`` (None: the default for this backend; a record: itself)."""
    if isinstance(name, Implementation):
        return name
    name = default_implementation() if name is None else name
    if name not in IMPLEMENTATIONS:
        if name in KNOWN:
            raise ValueError(f"implementation={name!r} is not available: jax.experimental.pallas did not import")
        known = ", ".join(repr(n) for n in KNOWN)
        raise ValueError(f"implementation must be None or one of {known}, got {name!r}")
    return IMPLEMENTATIONS[name]


def fleet_attention(q, k, v, decay, *, scale=None, log_gate=None, initial_state=None, return_final_state=False,
                    segment_ids=None, sequence_axis_name=None, implementation=None, config=None):
    """Exponentially decaying causal linear attention (retention), constant per head or gated per token.

        O_t = scale * sum_{s <= t} decay_h^(t-s) (q_t . k_s) v_s
        S_t = decay_h * exp(log_gate[b, t, h]) * S_{t-1} + k_t v_t^T,   o_t = scale * q_t^T S_t

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V] (batch, time, heads, dim, as Flax and fla); any float dtype
        (computed with float32 accumulation).
      decay: [H], values in (0, 1]. Checked when concrete. A traced decay (a learned one, under jit) is not
        checked (a staged check would slow every call's dispatch): a decay > 1 computes the growing sum and
        may overflow, and decay <= 0 gives NaN. Parametrize a learned decay into (0, 1) (a sigmoid), as
        fleetjax.nn does. None with a log_gate means 1 (the gate alone decays).
      scale: multiplies every output; None (the default) means K^-1/2, as jax.nn.dot_product_attention and
        fla. A concrete number otherwise (it is static).
      log_gate: [B, T, H] float, finite and <= 0 (the log of a forget gate in (0, 1], as fla's ``g``, Mamba-2's
        dt * A, GLA's log forget gate), or None (the constant decay alone). Differentiable.
      initial_state: [B, H, K, V] or None (zeros); it feeds the first segment of each row.
      return_final_state: also return the state after the last position, [B, H, K, V] float32.
      segment_ids: [B, T] integers or None; the state resets wherever the id changes (packed sequences).
      sequence_axis_name: inside jax.shard_map with T split in contiguous blocks over this mesh axis, the
        result equals the unsharded call.
      implementation: None (auto: "pallas" on GPU, "xla" elsewhere), a name of ``IMPLEMENTATIONS``, or an
        ``fleetjax.implementation.Implementation`` record (your own).
      config: the implementation's config dataclass, or None for its heuristic default.

    Returns:
      o [B, T, H, V] in the inputs' result dtype, or (o, final_state) with return_final_state=True.
      Differentiable in q, k, v, decay, log_gate and initial_state. A NaN or inf input changes only the outputs that
      depend on it (later positions of its segment), never earlier positions or other segments.
    """
    return run(get_implementation(implementation), q, k, v, decay, scale=scale, log_gate=log_gate,
               initial_state=initial_state, return_final_state=return_final_state, segment_ids=segment_ids,
               sequence_axis_name=sequence_axis_name, config=config)


def decode_step(q_t, k_t, v_t, decay, state, *, scale=None, log_gate=None):
    """One new position from a cached state: q_t, k_t [B, H, K], v_t [B, H, V], state [B, H, K, V],
    log_gate [B, H] or None (decay may then be None).

    Returns (o_t [B, H, V] in the inputs' dtype, new state [B, H, K, V] float32); feeding positions one by
    one from the initial state equals fleet_attention over the whole sequence (same ``scale``: None is
    K^-1/2 in both).
    """
    validation.check_step(q_t, k_t, v_t, decay, state, log_gate)
    B, H, K = validation.shape(q_t)
    scale = validation.static_scale(scale, K)
    log_decay = log_decay_of(decay, H)
    log_factor = log_decay[None, :] + (0.0 if log_gate is None else jnp.asarray(log_gate, f32))
    o_t, state = reference.recurrent_step(q_t, k_t, v_t, jnp.broadcast_to(log_factor, (B, H)),
                                          jnp.asarray(state, f32), scale)
    return o_t.astype(jnp.result_type(q_t, k_t, v_t)), state
