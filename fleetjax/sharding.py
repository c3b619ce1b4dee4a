"""Sequence (context) parallelism by state passing: ``fleet_attention(..., sequence_axis_name=...)``.

Inside ``jax.shard_map`` with T split in P contiguous blocks over a mesh axis, device p holds positions
[p * T_local, (p + 1) * T_local). The state that enters its block is the only thing it needs from the
devices to its left, and it is small: [B, H, K, V] float32, whatever T is (fleetjax.state_passing):

1. Every device computes L_p, the final state of its block from a zero entering state, and a_p, the factor
   by which its block carries an entering state to its end: gamma^T_local when the whole block is one run
   continuing from the left, else 0 (a reset inside the block, or at its first position, stops it).
2. It publishes E_p = L_p (device 0: L_0 + a_0 S_init). One all_gather over the axis moves the P small
   states and factors; segment ids need one more exchange of B integers (the previous device's last id).
3. Every device runs the same tiny exclusive scan over the gathered values, S_1 = E_0,
   S_{p+1} = a_p S_p + E_p, and takes its entering state S_p (device 0 keeps S_init); S_P is the whole
   sequence's final state, computed identically everywhere.
4. The block's output gains scale * gamma^(i+1) q_i^T S_p at the positions i of its first run, if that run
   continues from the previous device.

How a block is computed:

- With an implementation that has BlockKernels (fleetjax.state_passing; "pallas" has them), L_p comes from
  the launch that the kernel makes anyway for its sequence pieces, now over all of them and folded, and the
  walk then reuses the pieces' states: a block costs what one device's call costs, plus the local state of
  one piece. The custom VJP runs the exchange mirrored: every device computes D_p, the cotangent its own
  outputs give its entering state (the same launch, reversed), one all_gather and the mirrored scan give
  R_p, the cotangent of the state leaving its block, and the reverse walks start from it, so the backward
  makes no extra pass either.
- Any other implementation: L_p by one XLA product over the block's k and v (the positions of its last run,
  weighted by gamma^(T_local-1-j)); then the implementation runs once per block with S_p as its initial
  state, and its own entering-state term does step 4. Gradients by autodiff through this and the
  implementation's VJP (the transpose of the all_gather sends each device the state cotangents of the
  devices to its right). Extra memory traffic: one read of k and v, and in the backward the product's
  transpose.

A one-device axis runs the plain call. :func:`exchange` is the exchange itself for any axis size (a
benchmark on one GPU runs it to emulate one device of a larger mesh: experiments/bench_multigpu.py).

With ``check_vma=True`` (shard_map's default) the gathered values are typed invariant across the axis, so
the final state may be returned with ``out_specs=P()``; with ``check_vma=False`` the plain varying
all_gather is used, whose transpose (a reduce-scatter) is the right one in that mode.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable

import jax
import jax.numpy as jnp

from fleetjax import vjp
from fleetjax.decay import Decays
from fleetjax.segments import run_ids_from_segment_ids
from fleetjax.state_passing import BlockKernels, pass_states
from fleetjax.vma import instantiate, varying_axes, vary_like

f32 = jnp.float32

AxisName = Hashable | tuple[Hashable, ...]
def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _axis_size(axis_name: AxisName) -> int:
    """The number of devices on the sequence axis; a clear error outside shard_map or for an unknown name."""
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError as error:
        raise ValueError(
            f"sequence_axis_name={axis_name!r} is not a mesh axis of the enclosing jax.shard_map ({error}). "
            "Call fleet_attention with sequence_axis_name inside jax.shard_map (or a function it maps), with "
            "T split in contiguous blocks over that axis, e.g. in_specs=P(None, 'seq') for q, k, v "
            "[B, T, H, D]; outside shard_map, leave sequence_axis_name=None.") from None
    return int(size)


def _check_layout(axis_name: AxisName, tracks_vma: bool, **arrays: jax.Array | None) -> None:
    """With check_vma typing, refuse inputs that are replicated over the sequence axis (T not split on it)."""
    if not tracks_vma:
        return
    for name, x in arrays.items():
        if x is None:
            continue
        varying = varying_axes(x)
        if varying is not None and not set(_names(axis_name)) <= varying:
            raise ValueError(
                f"{name} is replicated over sequence_axis_name={axis_name!r}, but sequence parallelism needs "
                f"its T axis split in contiguous blocks over that mesh axis (in_specs P(None, {axis_name!r}) "
                f"for [B, T, ...] arrays); got a local block of shape {tuple(x.shape)} that is the same on "
                "every device of the axis")


def _half_on_accelerator(x: jax.Array) -> bool:
    """Half-precision products with float32 accumulation run natively here (the CPU runtime has no
    bfloat16 x bfloat16 -> float32 dot, so there inputs are upcast)."""
    return x.dtype != jnp.float32 and jax.default_backend() != "cpu"


def _groups(T: int, max_groups: int = 64, min_group: int = 512) -> int:
    """How many equal groups of positions the local-state product sums (1: one product over all of T)."""
    return max((g for g in range(1, max_groups + 1) if T % g == 0 and T // g >= min_group), default=1)


def _block_final_state(k: jax.Array, v: jax.Array, decays: Decays, runs: jax.Array | None,
                       groups: int | None = None) -> jax.Array:
    """The state after the block from a zero entering state: sum_j exp(the sum of la after j) k_j v_j^T over
    the positions j of the block's last run.

    k [B, T, H, K], v [B, T, H, V], runs [B, T] run ids or None (one run); groups (a divisor
    of T, default :func:`_groups`): the product is summed over that many equal groups of positions, each its
    own matrix product: one product per (batch, head) would contract all of T into one K x V output, only
    B * H outputs to spread over a GPU's SMs.
    Returns [B, H, K, V] float32; plain jnp, so autodiff gives dk, dv and the decay term.
    """
    B, T, H, K = k.shape
    G = _groups(T) if groups is None else groups
    # Exponents (sums of la <= 0) are <= 0: no overflow, exact zeros for decay -> 0.
    powers = jnp.swapaxes(jnp.exp(decays.to_end(B, T)), 1, 2)  # [B, T, H]
    keep = jnp.ones((1, T), bool) if runs is None else runs == runs[:, -1:]
    weighted_k = jnp.where(keep[:, :, None, None], k.astype(f32) * powers[..., None], 0.0).reshape(B, G, T // G, H, K)
    v = jnp.where(keep[:, :, None, None], v, jnp.zeros((), v.dtype)).reshape(B, G, T // G, H, v.shape[-1])
    product = lambda a: jnp.einsum("bgthk,bgthv->bghkv", a, v, preferred_element_type=f32)  # noqa: E731
    if _half_on_accelerator(k):
        # The state leaves as float32: the decayed keys as a hi/lo pair in k's dtype, two tensor-core products.
        hi = weighted_k.astype(k.dtype)
        parts = product(hi) + product((weighted_k - hi.astype(f32)).astype(k.dtype))
    else:
        parts = jnp.einsum("bgthk,bgthv->bghkv", weighted_k, v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(parts, axis=1)


def _all_gather(x: Any, axis_name: AxisName, *, invariant: bool) -> Any:
    """all_gather over the axis; ``invariant``: typed the same on every device (check_vma), so its transpose
    is a psum then a slice, and values computed from it may leave shard_map with out_specs P()."""
    if not invariant:
        return jax.lax.all_gather(x, axis_name)
    try:
        return jax.lax.all_gather(x, axis_name, to="invarying")
    except TypeError:  # a JAX whose all_gather has no ``to``: the primitive behind it
        from jax._src.lax.parallel import all_gather_invariant
        return all_gather_invariant(x, axis_name)


def pass_forward(local_final: jax.Array, carry: jax.Array, state: jax.Array, axis_name: AxisName,
                  invariant: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Steps 2 and 3 of the module docstring: (this device's entering state, the final state of the whole
    sequence, every device's carry [P, B, H]) from its local final state L_p and carry a_p [B, H]."""
    index = jax.lax.axis_index(axis_name)
    first = index == 0
    # Device 0 folds the initial state into what it publishes; the others never read their copy of it.
    exit_state = local_final + jnp.where(first, carry[..., None, None] * state, 0.0)
    exits, carries = _all_gather((exit_state, carry), axis_name, invariant=invariant)
    # S_1 = E_0 (the initial state's share is in it), S_{p+1} = a_p S_p + E_p.
    entering, final_state = pass_states(exits[0], exits[1:], carries[1:], carries[1:] > 0)
    zeros = jnp.zeros_like(local_final)
    return jnp.where(first, state, jnp.concatenate([zeros[None], entering])[index]), final_state, carries


def _pass_backward(local_reverse: jax.Array, carries: jax.Array, d_final: jax.Array, axis_name: AxisName,
                   invariant: bool) -> tuple[jax.Array, jax.Array]:
    """The forward exchange mirrored: (R_p, the cotangent of this device's block's final state, and the
    cotangent of the initial state) from D_p, the cotangent that the block's outputs give its entering state,
    every device's carry [P, B, H] and the final state's cotangent (the same on every device):
    R_{P-1} = d_final, R_{p-1} = a_p R_p + D_p; d initial_state = a_0 R_0 + D_0."""
    reverse = _all_gather(local_reverse, axis_name, invariant=invariant)
    exit_cotangents, d_initial = pass_states(d_final, reverse, carries, carries > 0, reverse=True)
    return exit_cotangents[jax.lax.axis_index(axis_name)], d_initial


def local_runs(runs: jax.Array | None, B: int) -> tuple[jax.Array | None, jax.Array]:
    """(run ids of the block starting at 0, as the implementations take them, or None; reached [B]: the
    entering state reaches the block's first position) from its run ids (run 0 = continuing from the left)."""
    if runs is None:
        return None, jnp.ones((B,), bool)
    return runs - runs[:, :1], runs[:, 0] == 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _block(kernels: BlockKernels, scale: float, config: Any, axis_name: AxisName, invariant: bool, q, k, v,
           log_decay, log_gate, state, runs):
    """The block of one device with an implementation's BlockKernels: (o, final state of the sequence).

    runs: the block's run ids (run 0 = the positions the entering state reaches), or None. The custom VJP
    runs the exchange mirrored, so that the reverse walks start from each block's exit cotangent (no extra
    pass over the block, unlike autodiff through the forward's order)."""
    return _block_forward(kernels, scale, config, axis_name, invariant, q, k, v, log_decay, log_gate, state,
                          runs)[0]


def _block_forward(kernels, scale, config, axis_name, invariant, q, k, v, log_decay, log_gate, state, runs):
    # A second derivative would differentiate the kernels: refuse it with fleetjax.vjp's message.
    q, k, v, log_decay, log_gate, state = (None if x is None else vjp.first_order_only(x)
                                           for x in (q, k, v, log_decay, log_gate, state))
    decays = Decays(log_decay, log_gate)
    block_runs, reached = local_runs(runs, q.shape[0])
    local_final, reuse = kernels.local_state(k, v, decays, block_runs, config=config)
    carry = vjp.whole_row_carry(decays, runs, q.shape[0], q.shape[1])
    entering, final_state, carries = pass_forward(local_final, carry, state, axis_name, invariant)
    entering = jnp.where(reached[:, None, None, None], entering, 0.0)
    o = kernels.forward(q, k, v, decays, entering, block_runs, reuse, scale=scale, config=config)
    return (o, final_state), (q, k, v, decays, entering, runs, carry, carries)


def _block_fwd(kernels, scale, config, axis_name, invariant, q, k, v, log_decay, log_gate, state, runs):
    # symbolic_zeros=True: the primals arrive wrapped, saying which are differentiated (a fixed decay spares
    # the backward its gradient's sums, fleetjax.vjp.Wanted).
    # A block's d start comes from the exchange (the local reverse states), not from its backward walks.
    wanted = vjp.wanted(log_decay, log_gate, None)
    primals = jax.custom_derivatives.custom_vjp_primal_tree_values((q, k, v, log_decay, log_gate, state, runs))
    out, residuals = _block_forward(kernels, scale, config, axis_name, invariant, *primals)
    return out, residuals + (wanted,)


def _block_bwd(kernels, scale, config, axis_name, invariant, residuals, cotangents):
    q, k, v, decays, entering, runs, carry, carries, wanted = residuals
    block_runs, reached = local_runs(runs, q.shape[0])
    do, d_final = (instantiate(c) for c in cotangents)
    if not invariant:
        # Without check_vma typing every device holds its own copy of the final state, each with its share
        # of the cotangent (shard_map divides an out_specs P() cotangent over the devices): their sum.
        d_final = jax.lax.psum(d_final, axis_name)
    local_reverse, reuse = kernels.local_reverse_state(q, do, decays, block_runs, scale=scale, config=config)
    local_reverse = jnp.where(reached[:, None, None, None], local_reverse, 0.0)
    exit_cotangent, d_initial = _pass_backward(local_reverse, carries, d_final, axis_name, invariant)
    dq, dk, dv, d_log_decay, d_gate, _ = kernels.backward(q, k, v, decays, entering, block_runs, do,
                                                          exit_cotangent, reuse, scale=scale, config=config,
                                                          wanted=wanted)
    # The carry of the entering state through the block into its final state spans every position.
    term = vjp.carry_term(carry, exit_cotangent, entering)
    if d_log_decay is not None:
        d_log_decay = d_log_decay + q.shape[1] * jnp.sum(term, axis=0)
    if d_gate is not None:
        d_gate = jnp.swapaxes(d_gate + term[:, :, None], 1, 2)
    d_initial = jnp.where(jax.lax.axis_index(axis_name) == 0, d_initial, 0.0)
    grads = tuple(None if g is None else vjp.first_order_only(g) for g in (dq, dk, dv, d_log_decay, d_gate,
                                                                           d_initial))
    return grads + (None,)


_block.defvjp(_block_fwd, _block_bwd, symbolic_zeros=True)


def block_run_ids(segment_ids: jax.Array | None, axis_name: AxisName) -> jax.Array | None:
    """The run ids of this device's block [B, T_local] (run 0 = the positions the state entering the block
    reaches: none when a segment starts at its first position), from its segment ids; None without them."""
    if segment_ids is None:
        return None  # every block is one run continuing from the left
    segment_ids = jnp.asarray(segment_ids)
    P = _axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
    # The id just before this block: the last id of the previous device (device 0 has none, and its first run
    # is the one the initial state feeds, so it compares with itself).
    from_left = jax.lax.ppermute(segment_ids[:, -1], axis_name, [(p, p + 1) for p in range(P - 1)])
    previous_id = jnp.where(index == 0, segment_ids[:, 0], from_left)
    return run_ids_from_segment_ids(segment_ids, previous_id=previous_id)


def tracks_vma(axis_name: AxisName) -> bool:
    """Inside shard_map(check_vma=True) over this axis (values are typed by the axes they vary over)."""
    varying = varying_axes(jax.lax.axis_index(axis_name))
    return varying is not None and set(_names(axis_name)) <= varying


def exchange(impl: Any, q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
             log_gate: jax.Array | None, state: jax.Array, runs: jax.Array | None, *, scale: float, config: Any,
             axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """Steps 1-4 of the module docstring for this device's block, whatever the axis size: (o [B, T_local, H,
    V] float32, final state of the whole sequence). runs: from :func:`block_run_ids`; log_decay typed like
    q, k, v (fleetjax.vma); log_gate: this block's [B, T_local, H] or None."""
    B, T, _, _ = q.shape
    invariant = tracks_vma(axis_name)
    state = vary_like(state, q, k, v)
    if impl.block_kernels is not None:
        return _block(impl.block_kernels, scale, config, axis_name, invariant, q, k, v, log_decay, log_gate, state,
                      runs)
    # The implementations take run ids that start at 0 (their entering state feeds run 0); where a segment
    # starts at the block's first position the entering state reaches nothing, so that row gets a zero one.
    decays = Decays(log_decay, log_gate)
    block_runs, first_reached = local_runs(runs, B)
    local_final = _block_final_state(k, v, decays, runs)
    # a_p: the block's whole decay where it is one run continuing from the left (run 0), else 0.
    carry = vjp.whole_row_carry(decays, runs, B, T)
    entering_state, final_state, _ = pass_forward(local_final, carry, state, axis_name, invariant)
    entering_state = jnp.where(first_reached[:, None, None, None], entering_state, 0.0)
    o, _ = impl.fn(q, k, v, log_decay, log_gate, entering_state, block_runs, scale=scale, config=config)
    return o, final_state


def sequence_parallel(impl: Any, q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
                      log_gate: jax.Array | None, state: jax.Array, segment_ids: jax.Array | None, *, scale: float,
                      config: Any, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """The op on one device's block of a sequence split over the mesh axis ``axis_name``.

    Args:
      impl: an ``fleetjax.implementation.Implementation``; ``impl.fn`` computes each block.
      q, k: [B, T_local, H, K]; v: [B, T_local, H, V]: this device's contiguous block of T.
      log_decay: [H] float32, the same on every device; log_gate: this block's [B, T_local, H] or None.
      state: [B, H, K, V] float32, the initial state of the whole sequence; only the first device's value is
        read (replicated inputs are the usual way to pass it).
      segment_ids: [B, T_local] integers (the user's ids) or None.
      scale, config: as for ``impl.fn``.
      axis_name: the mesh axis (or tuple of axes) over which T is split, in device order.

    Returns:
      (o [B, T_local, H, V] float32, final state [B, H, K, V] float32 of the whole sequence, the same on
      every device).
    """
    P = _axis_size(axis_name)
    typed = tracks_vma(axis_name)
    _check_layout(axis_name, typed, q=q, k=k, v=v, segment_ids=segment_ids, log_gate=log_gate)
    B, T, H, _ = q.shape
    # Mark log_decay varying once, here: a custom VJP must return cotangents typed like its inputs (a
    # replicated log_decay would get a varying cotangent), and autodiff then sums d log_decay over the
    # devices with one psum of [H] floats instead of one of each per-position use.
    log_decay = vary_like(log_decay, q, k, v)
    if T == 0 or B == 0:  # no position reads or changes the state
        return jnp.zeros((B, T, H, v.shape[-1]), f32), state
    if P == 1:  # nothing to exchange: exactly the unsharded call
        run_ids = None if segment_ids is None else run_ids_from_segment_ids(jnp.asarray(segment_ids))
        o, final_state = impl.fn(q, k, v, log_decay, log_gate, vary_like(state, q, k, v), run_ids, scale=scale,
                                 config=config)
        # Typed the same on every device of the axis, as with P > 1 (a sum over one device changes nothing).
        return o, jax.lax.psum(final_state, axis_name) if typed else final_state
    return exchange(impl, q, k, v, log_decay, log_gate, state, block_run_ids(segment_ids, axis_name), scale=scale,
                    config=config, axis_name=axis_name)
