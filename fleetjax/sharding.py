"""Sequence (context) parallelism by state passing: ``fleet_attention(..., sequence_axis_name=...)``.

Inside ``jax.shard_map`` with T split in P contiguous blocks over a mesh axis, device p holds positions
[p * T_local, (p + 1) * T_local). The state that enters its block is the only thing it needs from the
devices to its left, and it is small: [B, H, K, V] float32, whatever T is (DESIGN.md section 1, "state
passing"):

1. Every device runs the implementation on its block from a zero entering state: o_p (the output without
   the contribution of earlier blocks) and L_p (its final state).
2. It publishes E_p = L_p (device 0: L_0 + a_0 S_init) and a_p, the factor by which its block carries an
   entering state to its end: gamma^T_local when the whole block is one run continuing from the left,
   else 0 (a reset inside, or at its first position, stops the entering state). One all_gather over the
   axis moves these P small states.
3. Every device runs the same tiny exclusive scan over the gathered values, S_1 = E_0,
   S_{p+1} = a_p S_p + E_p, and takes its entering state S_p (device 0 keeps S_init); S_P is the whole
   sequence's final state, computed identically everywhere.
4. It adds scale * gamma^(i+1) q_i^T S_p to the positions i of its first run, if that run continues from
   the previous device.

Gradients come from plain autodiff through this composition and the implementations' own VJPs: the
transpose of the all_gather sends each device the state cotangents that the devices to its right produced
(the reverse direction), and the transpose of the correction gives dq, d S_p and the decay terms.
With ``check_vma=True`` (shard_map's default) the gathered values are typed invariant across the axis, so the
final state may be returned with ``out_specs=P()``; with ``check_vma=False`` the plain varying all_gather is
used, whose transpose (a reduce-scatter) is the right one in that mode.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
import jax.numpy as jnp

from fleetjax.segments import run_ids_from_segment_ids

f32 = jnp.float32

AxisName = Hashable | tuple[Hashable, ...]


def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _varying_axes(x: jax.Array) -> frozenset | None:
    """The mesh axes over which x may differ (shard_map's check_vma typing), or None if JAX does not say."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None)
        vma = getattr(mat, "varying", None)
    return None if vma is None else frozenset(vma)


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """x marked as varying over every mesh axis over which one of refs varies (shard_map's check_vma typing).

    Inside ``jax.shard_map(check_vma=True)`` every value carries the set of mesh axes over which it may
    differ. A fresh ``jnp.zeros`` or a replicated input is invariant, and lax.scan / fori_loop carries and
    custom-VJP cotangents must keep their input's type: a state carried next to the varying q, k, v must
    enter varying. Outside shard_map, or with check_vma=False, x is returned unchanged.
    """
    have = _varying_axes(x)
    if have is None:
        return x
    need: set = set()
    for ref in refs:
        need |= _varying_axes(ref) or set()
    missing = tuple(sorted(need - have, key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def shape_dtype_like(shape: tuple[int, ...], dtype: Any, *refs: jax.Array) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` for a ``pallas_call`` output, varying over the mesh axes of refs.

    With check_vma=True, pallas_call requires its out_shape to say over which manual mesh axes the output
    varies (jax 0.10 names the field ``manual_axis_type``; later versions may call it ``vma``).
    """
    axes: set = set()
    for ref in refs:
        axes |= _varying_axes(ref) or set()
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(vary_like(jnp.zeros((), dtype), *refs))
    if getattr(aval, "mat", None) is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.mat)
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset(axes))


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
        varying = _varying_axes(x)
        if varying is not None and not set(_names(axis_name)) <= varying:
            raise ValueError(
                f"{name} is replicated over sequence_axis_name={axis_name!r}, but sequence parallelism needs "
                f"its T axis split in contiguous blocks over that mesh axis (in_specs P(None, {axis_name!r}) "
                f"for [B, T, ...] arrays); got a local block of shape {tuple(x.shape)} that is the same on "
                "every device of the axis")


def _state_contribution(q: jax.Array, state: jax.Array, log_decay: jax.Array, reached: jax.Array,
                        scale: float) -> jax.Array:
    """scale * gamma^(i+1) q_i^T S at the positions the entering state reaches, else 0.

    q [B, T, H, K], state [B, H, K, V] float32, log_decay [H], reached [B, T] bool.
    Returns [B, T, H, V] float32. Plain jnp: its gradient is ordinary autodiff.
    """
    T = q.shape[1]
    # float32 inputs get full-precision products (tf32 on GPU would miss the 1e-5 contract), as in xla.py.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    # Exponents (i + 1) log gamma are <= 0: decay -> 0 gives exact zeros, decay = 1 gives ones.
    powers = jnp.exp(jnp.arange(1, T + 1, dtype=f32)[:, None] * log_decay[None, :])  # [T, H]
    weights = jnp.where(reached[:, :, None], scale * powers[None], 0.0)  # [B, T, H]
    qs = jnp.einsum("bthk,bhkv->bthv", q.astype(f32), state, precision=precision,
                    preferred_element_type=f32)
    return weights[..., None] * qs


def _combine(exits: jax.Array, carries: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """The exclusive scan over devices: S_1 = E_0, S_{p+1} = a_p S_p + E_p.

    exits [P, B, H, K, V] (E_0 already holds the initial state's share), carries [P, B, H].
    Returns ([S_1, ..., S_{P-1}], S_P). P is static and small, so a Python loop that XLA fuses suffices.
    """
    entering = []
    state = exits[0]
    for p in range(1, exits.shape[0]):
        entering.append(state)
        state = carries[p][..., None, None] * state + exits[p]
    return entering, state


def sequence_parallel(impl: Any, q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
                      state: jax.Array, segment_ids: jax.Array | None, *, scale: float, config: Any,
                      axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """The op on one device's block of a sequence split over the mesh axis ``axis_name``.

    Args:
      impl: an ``api.Implementation``; ``impl.fn`` computes each block.
      q, k: [B, T_local, H, K]; v: [B, T_local, H, V]: this device's contiguous block of T.
      log_decay: [H] float32, the same on every device.
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
    index = jax.lax.axis_index(axis_name)
    varying = _varying_axes(index)
    tracks_vma = varying is not None and set(_names(axis_name)) <= varying  # shard_map(check_vma=True)
    _check_layout(axis_name, tracks_vma, q=q, k=k, v=v, segment_ids=segment_ids)
    B, T, H, _ = q.shape

    # Mark log_decay varying once, here: a custom VJP must return cotangents typed like its inputs (a
    # replicated log_decay would get a varying cotangent), and autodiff then sums d log_decay over the
    # devices with one psum of [H] floats instead of one of each per-position use.
    log_decay = vary_like(log_decay, q, k, v)

    if P == 1:  # nothing to exchange: exactly the unsharded call
        run_ids = None if segment_ids is None else run_ids_from_segment_ids(segment_ids)
        if T == 0 or B == 0:
            return jnp.zeros((B, T, H, v.shape[-1]), f32), state
        return impl.fn(q, k, v, log_decay, vary_like(state, q, k, v), run_ids, scale=scale, config=config)

    if T == 0 or B == 0:  # global T = P * 0; no position reads or changes the state
        return jnp.zeros((B, T, H, v.shape[-1]), f32), state

    if segment_ids is None:
        run_ids = None
        # Every block is one run continuing from the left: the entering state reaches every position.
        reached = jnp.ones((B, T), bool)
        continues = jnp.ones((B,), bool)
    else:
        segment_ids = jnp.asarray(segment_ids)
        # The id just before this block: the last id of the previous device (device 0 has none, and its first
        # run is the one the initial state feeds, so it compares with itself).
        from_left = jax.lax.ppermute(segment_ids[:, -1], axis_name, [(p, p + 1) for p in range(P - 1)])
        previous_id = jnp.where(index == 0, segment_ids[:, 0], from_left)
        runs_from_left = run_ids_from_segment_ids(segment_ids, previous_id=previous_id)
        reached = runs_from_left == 0  # positions the entering state reaches
        continues = reached[:, -1]  # the whole block is one run continuing from the left
        # The block's own computation starts from a zero state, so the run numbering may start at 0 here.
        run_ids = run_ids_from_segment_ids(segment_ids)

    zeros = vary_like(jnp.zeros_like(state), q, k, v)
    o_local, local_final = impl.fn(q, k, v, log_decay, zeros, run_ids, scale=scale, config=config)

    carry = jnp.where(continues[:, None], jnp.exp(T * log_decay)[None, :], 0.0)  # [B, H]
    first = index == 0
    # Device 0 folds the initial state into what it publishes; the others never read their copy of it.
    exit_state = local_final + jnp.where(first, carry[..., None, None] * state, 0.0)
    exits, carries = jax.lax.all_gather((exit_state, carry), axis_name,
                                        to="invarying" if tracks_vma else "varying")
    entering, final_state = _combine(exits, carries)
    entering_state = jnp.where(first, state, jnp.stack([zeros] + entering)[index])

    o = o_local.astype(f32) + _state_contribution(q, entering_state, log_decay, reached, scale)
    return o, final_state
