"""Sequence (context) parallelism by state passing: ``fleet_attention(..., sequence_axis_name=...)``.

Inside ``jax.shard_map`` with T split in P contiguous blocks over a mesh axis, device p holds positions
[p * T_local, (p + 1) * T_local). The state that enters its block is the only thing it needs from the
devices to its left, and it is small: [B, H, K, V] float32, whatever T is (DESIGN.md section 1, "state
passing"):

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

Three ways to order this work (:func:`combine_method`), same result:

- "entering_state" (default). With an implementation that has BlockKernels (fleetjax.state_passing;
  "pallas" has them), L_p comes from the launch that the kernel makes anyway for its sequence pieces, now
  over all of them and folded, and the walk then reuses the pieces' states: a block costs what one device's
  call costs, plus the local state of one piece. The custom VJP runs the exchange mirrored: every device
  computes D_p, the cotangent its own outputs give its entering state (the same launch, reversed), one
  all_gather and the mirrored scan give R_p, the cotangent of the state leaving its block, and the reverse
  walks start from it, so the backward makes no extra pass either. Other implementations take the generic
  composition below.
- "generic": L_p by one XLA product over the block's k and v (the positions of its last run, weighted by
  gamma^(T_local-1-j)); then the implementation runs once per block with S_p as its initial state, and its
  own entering-state term does step 4. Gradients by autodiff through this and the implementation's VJP
  (the transpose of the all_gather sends each device the state cotangents of the devices to its right).
  Extra memory traffic: one read of k and v, and in the backward the product's transpose.
- "correction": the implementation runs from a zero state (o_p and L_p together), and step 4 is a separate
  product q S_p added to o_p. Extra traffic: q read, a float32 [B, T_local, H, V] product written and read,
  and o_p read and written again: about three times the bytes of the generic order at K = V (see
  experiments/README.md). Gradients by autodiff.

With ``check_vma=True`` (shard_map's default) the gathered values are typed invariant across the axis, so
the final state may be returned with ``out_specs=P()``; with ``check_vma=False`` the plain varying
all_gather is used, whose transpose (a reduce-scatter) is the right one in that mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Hashable, Iterator

import jax
import jax.numpy as jnp

from fleetjax import vjp
from fleetjax.segments import run_ids_from_segment_ids
from fleetjax.state_passing import BlockKernels, pass_states

f32 = jnp.float32

AxisName = Hashable | tuple[Hashable, ...]
METHODS = ("entering_state", "generic", "correction")
_method: contextvars.ContextVar[str] = contextvars.ContextVar("fleetjax_sequence_method", default="entering_state")
_exchange_on_one_device: contextvars.ContextVar[bool] = contextvars.ContextVar("fleetjax_exchange_on_one_device",
                                                                              default=False)


@contextlib.contextmanager
def combine_method(name: str) -> Iterator[None]:
    """Within the block, sequence_axis_name calls traced use ``name`` (one of METHODS, see the module
    docstring).

    All give the same result (tested); the choice is about speed, for benchmarks:
    ``with fleetjax.sharding.combine_method("correction"): jax.jit(f).lower(...)``. It acts at trace time.
    """
    if name not in METHODS:
        raise ValueError(f"combine_method must be one of {METHODS}, got {name!r}")
    token = _method.set(name)
    try:
        yield
    finally:
        _method.reset(token)


@contextlib.contextmanager
def exchange_on_one_device() -> Iterator[None]:
    """Within the block, sequence_axis_name calls traced on a mesh axis of one device run the exchange
    anyway instead of the plain call (same result): one device's share of a larger mesh, without the
    communication, for benchmarks on one GPU (experiments/bench_multigpu.py --emulate). Acts at trace time."""
    token = _exchange_on_one_device.set(True)
    try:
        yield
    finally:
        _exchange_on_one_device.reset(token)


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
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # JAX before pcast


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


def _half_on_accelerator(x: jax.Array) -> bool:
    """Half-precision products with float32 accumulation run natively here (the CPU runtime has no
    bfloat16 x bfloat16 -> float32 dot, so there inputs are upcast)."""
    return x.dtype != jnp.float32 and jax.default_backend() != "cpu"


def _state_contribution(q: jax.Array, state: jax.Array, log_decay: jax.Array, reached: jax.Array | None,
                        scale: float) -> jax.Array:
    """scale * gamma^(i+1) q_i^T S at the positions the entering state reaches, else 0.

    q [B, T, H, K], state [B, H, K, V] float32, log_decay [H], reached [B, T] bool or None (everywhere).
    Returns [B, T, H, V] float32. Plain jnp: its gradient is ordinary autodiff.
    """
    T = q.shape[1]
    if _half_on_accelerator(q):
        # Tensor cores in q's dtype with float32 accumulation, as the kernels' own state term does.
        qs = jnp.einsum("bthk,bhkv->bthv", q, state.astype(q.dtype), preferred_element_type=f32)
    else:
        # Full-precision products: tf32 on GPU would miss the float32 contract (as in xla.py).
        qs = jnp.einsum("bthk,bhkv->bthv", q.astype(f32), state, precision=jax.lax.Precision.HIGHEST)
    # Exponents (i + 1) log gamma are <= 0: decay -> 0 gives exact zeros, decay = 1 gives ones.
    powers = scale * jnp.exp(jnp.arange(1, T + 1, dtype=f32)[:, None] * log_decay[None, :])  # [T, H]
    weights = powers[None] if reached is None else jnp.where(reached[:, :, None], powers[None], 0.0)
    return weights[..., None] * qs


def _groups(T: int, max_groups: int = 64, min_group: int = 512) -> int:
    """How many equal groups of positions the local-state product sums (1: one product over all of T)."""
    return max((g for g in range(1, max_groups + 1) if T % g == 0 and T // g >= min_group), default=1)


def _block_final_state(k: jax.Array, v: jax.Array, log_decay: jax.Array, runs: jax.Array | None,
                       groups: int | None = None) -> jax.Array:
    """The state after the block from a zero entering state: sum_j gamma^(T-1-j) k_j v_j^T over the
    positions j of the block's last run.

    k [B, T, H, K], v [B, T, H, V], log_decay [H], runs [B, T] run ids or None (one run); groups (a divisor
    of T, default :func:`_groups`): the product is summed over that many equal groups of positions, each its
    own matrix product: one product per (batch, head) would contract all of T into one K x V output, only
    B * H outputs to spread over a GPU's SMs.
    Returns [B, H, K, V] float32; plain jnp, so autodiff gives dk, dv and the decay term.
    """
    B, T, H, K = k.shape
    G = _groups(T) if groups is None else groups
    # Exponents (T - 1 - j) log gamma are <= 0: no overflow, exact zeros for decay -> 0.
    powers = jnp.exp(jnp.arange(T - 1, -1, -1, dtype=f32)[:, None] * log_decay[None, :])  # [T, H]
    if runs is None:
        weights = powers[None]  # [1, T, H]
    else:
        weights = jnp.where((runs == runs[:, -1:])[:, :, None], powers[None], 0.0)  # [B, T, H]
    weighted_k = (k.astype(f32) * weights[..., None]).reshape(B, G, T // G, H, K)
    v = v.reshape(B, G, T // G, H, v.shape[-1])
    if _half_on_accelerator(k):
        parts = jnp.einsum("bgthk,bgthv->bghkv", weighted_k.astype(k.dtype), v, preferred_element_type=f32)
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


def _pass_forward(local_final: jax.Array, carry: jax.Array, state: jax.Array, axis_name: AxisName,
                  invariant: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Steps 2 and 3 of the module docstring: (this device's entering state, the final state of the whole
    sequence, every device's carry [P, B, H]) from its local final state L_p and carry a_p [B, H]."""
    index = jax.lax.axis_index(axis_name)
    first = index == 0
    # Device 0 folds the initial state into what it publishes; the others never read their copy of it.
    exit_state = local_final + jnp.where(first, carry[..., None, None] * state, 0.0)
    exits, carries = _all_gather((exit_state, carry), axis_name, invariant=invariant)
    # S_1 = E_0 (the initial state's share is in it), S_{p+1} = a_p S_p + E_p.
    entering, final_state = pass_states(exits[0], exits[1:], carries[1:])
    zeros = jnp.zeros_like(local_final)
    return jnp.where(first, state, jnp.concatenate([zeros[None], entering])[index]), final_state, carries


def _pass_backward(local_reverse: jax.Array, carries: jax.Array, d_final: jax.Array, axis_name: AxisName,
                   invariant: bool) -> tuple[jax.Array, jax.Array]:
    """The forward exchange mirrored: (R_p, the cotangent of this device's block's final state, and the
    cotangent of the initial state) from D_p, the cotangent that the block's outputs give its entering state,
    every device's carry [P, B, H] and the final state's cotangent (the same on every device):
    R_{P-1} = d_final, R_{p-1} = a_p R_p + D_p; d initial_state = a_0 R_0 + D_0."""
    reverse = _all_gather(local_reverse, axis_name, invariant=invariant)
    exit_cotangents, d_initial = pass_states(d_final, reverse, carries, reverse=True)
    return exit_cotangents[jax.lax.axis_index(axis_name)], d_initial


def _local_runs(runs: jax.Array | None, B: int) -> tuple[jax.Array | None, jax.Array]:
    """(run ids of the block starting at 0, as the implementations take them, or None; reached [B]: the
    entering state reaches the block's first position) from its run ids (run 0 = continuing from the left)."""
    if runs is None:
        return None, jnp.ones((B,), bool)
    return runs - runs[:, :1], runs[:, 0] == 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _block(kernels: BlockKernels, scale: float, config: Any, axis_name: AxisName, invariant: bool, q, k, v,
           log_decay, state, runs):
    """The block of one device with an implementation's BlockKernels: (o, final state of the sequence).

    runs: the block's run ids (run 0 = the positions the entering state reaches), or None. The custom VJP
    runs the exchange mirrored, so that the reverse walks start from each block's exit cotangent (no extra
    pass over the block, unlike autodiff through the forward's order)."""
    (o, final_state), _ = _block_fwd(kernels, scale, config, axis_name, invariant, q, k, v, log_decay, state,
                                     runs)
    return o, final_state


def _block_fwd(kernels, scale, config, axis_name, invariant, q, k, v, log_decay, state, runs):
    # A second derivative would differentiate the kernels: refuse it with fleetjax.vjp's message.
    q, k, v, log_decay, state = (vjp.first_order_only(x) for x in (q, k, v, log_decay, state))
    local_runs, reached = _local_runs(runs, q.shape[0])
    local_final, reuse = kernels.local_state(k, v, log_decay, local_runs, config=config)
    carry = vjp.whole_row_carry(log_decay, runs, q.shape[0], q.shape[1])
    entering, final_state, carries = _pass_forward(local_final, carry, state, axis_name, invariant)
    entering = jnp.where(reached[:, None, None, None], entering, 0.0)
    o = kernels.forward(q, k, v, log_decay, entering, local_runs, reuse, scale=scale, config=config)
    return (o, final_state), (q, k, v, log_decay, entering, runs, carry, carries)


def _block_bwd(kernels, scale, config, axis_name, invariant, residuals, cotangents):
    q, k, v, log_decay, entering, runs, carry, carries = residuals
    local_runs, reached = _local_runs(runs, q.shape[0])
    do, d_final = cotangents
    if not invariant:
        # Without check_vma typing every device holds its own copy of the final state, each with its share
        # of the cotangent (shard_map divides an out_specs P() cotangent over the devices): their sum.
        d_final = jax.lax.psum(d_final, axis_name)
    local_reverse, reuse = kernels.local_reverse_state(q, do, log_decay, local_runs, scale=scale, config=config)
    local_reverse = jnp.where(reached[:, None, None, None], local_reverse, 0.0)
    exit_cotangent, d_initial = _pass_backward(local_reverse, carries, d_final, axis_name, invariant)
    dq, dk, dv, d_log_decay, _ = kernels.backward(q, k, v, log_decay, entering, local_runs, do, exit_cotangent,
                                                  reuse, scale=scale, config=config)
    d_log_decay = d_log_decay + vjp.carry_log_decay_grad(carry, q.shape[1], exit_cotangent, entering)
    d_initial = jnp.where(jax.lax.axis_index(axis_name) == 0, d_initial, 0.0)
    grads = tuple(vjp.first_order_only(g) for g in (dq, dk, dv, d_log_decay, d_initial))
    return grads + (None,)


_block.defvjp(_block_fwd, _block_bwd)


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

    if T == 0 or B == 0:  # no position reads or changes the state
        return jnp.zeros((B, T, H, v.shape[-1]), f32), state
    if P == 1 and not _exchange_on_one_device.get():  # nothing to exchange: exactly the unsharded call
        run_ids = None if segment_ids is None else run_ids_from_segment_ids(segment_ids)
        o, final_state = impl.fn(q, k, v, log_decay, vary_like(state, q, k, v), run_ids, scale=scale,
                                 config=config)
        # Typed the same on every device of the axis, as with P > 1 (a sum over one device changes nothing).
        return o, jax.lax.psum(final_state, axis_name) if tracks_vma else final_state

    if segment_ids is None:
        runs = None  # every block is one run continuing from the left
    else:
        segment_ids = jnp.asarray(segment_ids)
        # The id just before this block: the last id of the previous device (device 0 has none, and its first
        # run is the one the initial state feeds, so it compares with itself).
        from_left = jax.lax.ppermute(segment_ids[:, -1], axis_name, [(p, p + 1) for p in range(P - 1)])
        previous_id = jnp.where(index == 0, segment_ids[:, 0], from_left)
        # Run 0 = the positions the entering state reaches (none when a segment starts at the first position).
        runs = run_ids_from_segment_ids(segment_ids, previous_id=previous_id)

    method = _method.get()
    zeros = vary_like(jnp.zeros_like(state), q, k, v)
    if method == "entering_state" and impl.block_kernels is not None:
        return _block(impl.block_kernels, scale, config, axis_name, tracks_vma, q, k, v, log_decay,
                      vary_like(state, q, k, v), runs)
    # The implementations take run ids that start at 0 (their entering state feeds run 0); where a segment
    # starts at the block's first position the entering state reaches nothing, so that row gets a zero one.
    local_runs, first_reached = _local_runs(runs, B)
    if method == "correction":
        o_local, local_final = impl.fn(q, k, v, log_decay, zeros, local_runs, scale=scale, config=config)
    else:
        local_final = _block_final_state(k, v, log_decay, runs)

    # a_p: gamma^T where the whole block is one run continuing from the left (run 0), else 0.
    carry = vjp.whole_row_carry(log_decay, runs, B, T)
    entering_state, final_state, _ = _pass_forward(local_final, carry, state, axis_name, tracks_vma)

    if method == "correction":
        reached = None if runs is None else runs == 0
        o = o_local.astype(f32) + _state_contribution(q, entering_state, log_decay, reached, scale)
    else:
        entering_state = jnp.where(first_reached[:, None, None, None], entering_state, 0.0)
        o, _ = impl.fn(q, k, v, log_decay, entering_state, local_runs, scale=scale, config=config)
    return o, final_state
