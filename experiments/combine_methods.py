"""Three orders of the sequence-parallel work that experiments/bench_multigpu.py compares, composed from
the pieces fleetjax/sharding.py offers (the library itself runs only the first).

With T split in contiguous blocks over a mesh axis, each device needs the state entering its block, S_p,
and the blocks exchange their local final states L_p (fleetjax.sharding.pass_forward). The orders differ in
how a block's output gets the entering state's share, scale * gamma^(i+1) q_i^T S_p:

- "entering_state": what ``fleet_attention(sequence_axis_name=...)`` does. With an implementation that has
  BlockKernels ("pallas"), L_p comes from the kernel's own sequence-piece launch and the walk starts from
  S_p, so a block costs about one device's call; otherwise as "generic".
- "generic": L_p by one XLA product over the block's k and v, then the implementation runs from S_p (its
  own entering-state term adds the share): ``dataclasses.replace(record, block_kernels=None)``.
- "correction": the implementation runs from a zero state, giving o and L_p together, and the share is a
  separate product added afterwards (:func:`state_contribution`): q read, a float32 [B, T_local, H, V]
  product written and read, o read and written again. Gradients by autodiff.

All three give the same result. ``emulated``: one device's share of a larger mesh, timed alone: the
exchange runs on a mesh axis of one device (fleetjax.sharding.exchange; its all_gather moves nothing), where
``fleet_attention`` would run the plain call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp

from fleetjax import fleet_attention, vjp
from fleetjax.implementation import Implementation
from fleetjax.decay import Decays, log_decay_of
from fleetjax.sharding import block_run_ids, exchange, local_runs, pass_forward, tracks_vma
from fleetjax.vma import vary_like

f32 = jnp.float32

METHODS = ("entering_state", "generic", "correction")


def state_contribution(q: jax.Array, state: jax.Array, log_decay: jax.Array, reached: jax.Array | None,
                       scale: float) -> jax.Array:
    """scale * gamma^(i+1) q_i^T S at the positions the entering state reaches, else 0.

    q [B, T, H, K], state [B, H, K, V] float32, log_decay [H], reached [B, T] bool or None (everywhere).
    Returns [B, T, H, V] float32. Plain jnp: its gradient is ordinary autodiff.
    """
    T = q.shape[1]
    if q.dtype != f32 and jax.default_backend() != "cpu":
        # Tensor cores in q's dtype with float32 accumulation, as the kernels' own state term does (the CPU
        # runtime has no 16-bit dot with float32 accumulation, so there the inputs are widened).
        qs = jnp.einsum("bthk,bhkv->bthv", q, state.astype(q.dtype), preferred_element_type=f32)
    else:
        # Full-precision products: tf32 on a GPU would miss float32 inputs' accuracy.
        qs = jnp.einsum("bthk,bhkv->bthv", q.astype(f32), state, precision=jax.lax.Precision.HIGHEST)
    # Exponents (i + 1) log gamma are <= 0: decay -> 0 gives exact zeros, decay = 1 gives ones.
    powers = scale * jnp.exp(jnp.arange(1, T + 1, dtype=f32)[:, None] * log_decay[None, :])  # [T, H]
    weights = powers[None] if reached is None else jnp.where(reached[:, :, None], powers[None], 0.0)
    return weights[..., None] * qs


def correction_exchange(impl: Implementation, q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
                        state: jax.Array, runs: jax.Array | None, *, scale: float, config: Any,
                        axis_name: Hashable) -> tuple[jax.Array, jax.Array]:
    """The "correction" order for this device's block, with the arguments of fleetjax.sharding.exchange:
    (o [B, T_local, H, V] float32, final state of the whole sequence)."""
    B, T = q.shape[:2]
    state = vary_like(state, q, k, v)
    block_runs, _ = local_runs(runs, B)
    o_local, local_final = impl.fn(q, k, v, log_decay, None, jnp.zeros_like(state), block_runs, scale=scale,
                                   config=config)
    # a_p: gamma^T where the whole block is one run continuing from the left (run 0), else 0.
    carry = vjp.whole_row_carry(Decays(log_decay), runs, B, T)
    entering, final_state, _ = pass_forward(local_final, carry, state, axis_name, tracks_vma(axis_name))
    reached = None if runs is None else runs == 0
    return o_local.astype(f32) + state_contribution(q, entering, log_decay, reached, scale), final_state


def sharded_attention(method: str, implementation: str | Implementation, *, axis_name: Hashable,
                      emulated: bool = False, scale: float | None = None) -> Callable[..., tuple]:
    """attend(q, k, v, decay, initial_state=None, segment_ids=None) -> (o, final state), for inside
    jax.shard_map with T split over ``axis_name``: the op in the order ``method`` (one of METHODS, or "none":
    the plain ``fleet_attention(sequence_axis_name=...)``). o has q's dtype, as fleet_attention's."""
    import fleetjax.api
    if method not in METHODS + ("none",):
        raise ValueError(f"method must be one of {METHODS + ('none',)}, got {method!r}")
    record = fleetjax.api.get_implementation(implementation)
    if method == "generic":
        record = dataclasses.replace(record, block_kernels=None)

    def attend(q, k, v, decay, initial_state=None, segment_ids=None):
        K = q.shape[-1]
        block_scale = K ** -0.5 if scale is None else float(scale)
        if method in ("none", "entering_state", "generic") and not emulated:
            return fleet_attention(q, k, v, decay, scale=block_scale, initial_state=initial_state,
                                   return_final_state=True, segment_ids=segment_ids,
                                   sequence_axis_name=axis_name, implementation=record)
        # The canonical inputs of fleetjax.sharding.exchange, as fleet_attention makes them.
        B, _, H, _ = q.shape
        log_decay = vary_like(log_decay_of(decay, H), q, k, v)
        state = (jnp.zeros((B, H, K, v.shape[-1]), f32) if initial_state is None
                 else jnp.asarray(initial_state, f32))
        runs = block_run_ids(segment_ids, axis_name)
        if method == "correction":
            o, final_state = correction_exchange(record, q, k, v, log_decay, state, runs, scale=block_scale,
                                                 config=record.config_for(None, q, v), axis_name=axis_name)
        else:
            o, final_state = exchange(record, q, k, v, log_decay, None, state, runs, scale=block_scale,
                                      config=record.config_for(None, q, v), axis_name=axis_name)
        return o.astype(q.dtype), final_state

    return attend


def uses_block_kernels(method: str, implementation: str | Implementation) -> bool:
    """Whether ``method`` runs the implementation's BlockKernels (only "entering_state", where it has them)."""
    import fleetjax.api
    return method == "entering_state" and fleetjax.api.get_implementation(implementation).block_kernels is not None
