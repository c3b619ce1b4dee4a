"""State passing: one mechanism, three uses.

Pieces of a sequence each run from a zero state and return their local final state L_p; the state entering
every piece then follows from the exclusive scan S_0 = start, S_{p+1} = a_p S_p + L_p, where a_p =
decay^len_p, or 0 when a segment starts inside piece p. The Pallas kernels use it to split one sequence
over the GPU (forward, and mirrored for the backward's reverse states), and sequence parallelism uses it
across devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


def pass_piece(state: jax.Array, carry: jax.Array, local: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """The state after one piece: carry * state + local (state, local [..., K, V]; carry [...]); where
    ``keep`` [...] is False (a segment starts inside the piece) the entering state is dropped by selection,
    so a NaN in it does not reach the next segment."""
    carried = carry[..., None, None] * state
    if keep is not None:
        carried = jnp.where(keep[..., None, None], carried, 0.0)
    return carried + local


def pass_states(start: jax.Array, local: jax.Array, carry: jax.Array, keep: jax.Array | None = None, *,
                reverse: bool = False, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """entering[0] = start, entering[p+1] = carry[p] * entering[p] + local[p] (dropped where keep[p] is False);
    with ``reverse``, the same from the last piece to the first.

    start [..., K, V]; local [P, ..., K, V]; carry, keep [P, ...]. Returns (entering [P, ..., K, V], the state
    after every piece). ``axis``: the pieces' axis of local, carry, keep and entering where it is not the
    first (start lacks it): the pieces are sliced and stacked in place, with no transposes around the loop.
    P is static and small: a Python loop, which XLA fuses.
    """
    P = local.shape[axis]
    if P == 0:
        return jnp.zeros(start.shape[:axis] + (0,) + start.shape[axis:], start.dtype), start
    take = lambda x, p: None if x is None else jax.lax.index_in_dim(x, p, axis, keepdims=False)  # noqa: E731
    entering = [None] * P
    state = start
    for p in (reversed(range(P)) if reverse else range(P)):
        entering[p] = state
        state = pass_piece(state, take(carry, p), take(local, p), take(keep, p))
    return jnp.stack(entering, axis=axis), state


@dataclasses.dataclass(frozen=True)
class BlockKernels:
    """The steps by which an implementation runs one block of a sequence split over devices without extra
    passes over the block (fleetjax.sharding). The forward needs the block's local state before the exchange
    and its walk after it; the backward is the same, mirrored: the local reverse state (the cotangent that the
    block's own outputs give its entering state) before a reverse exchange, the reverse walks after it,
    entered from the right with the cotangent of the block's final state.

    All take and return [B, T, H, *] blocks, ``decays`` (a fleetjax.decay.Decays: log gamma [H] and the
    block's log gate [B, T, H] or None), states [B, H, K, V] float32 and run ids that start at 0 (run 0 is
    the one the entering state feeds), or None:

    - local_state(k, v, decays, run_ids, *, config) -> (L, reuse): the block's final state from a zero
      entering state (its last run's), and anything ``forward`` may reuse (or None);
    - forward(q, k, v, decays, start, run_ids, reuse, *, scale, config) -> o, entered with ``start``;
    - local_reverse_state(q, do, decays, run_ids, *, scale, config) -> (D, reuse): the cotangent that the
      block's outputs give its entering state (over run 0), and what ``backward`` may reuse;
    - backward(q, k, v, decays, start, run_ids, do, exit_cotangent, reuse, *, scale, config, wanted) ->
      (dq, dk, dv, d log_decay [H], d log_gate [B, H, T] or None, d start): the gradients of the block entered
      with ``start`` whose final state has the cotangent ``exit_cotangent`` (None: unused), except the terms
      of the carry of start into the final state, which belong to the exchange; ``wanted``
      (fleetjax.vjp.Wanted): which of the decay's gradients and whether d start are used (those not wanted
      may come as None).
    """

    local_state: Callable[..., tuple[jax.Array, Any]]
    forward: Callable[..., jax.Array]
    local_reverse_state: Callable[..., tuple[jax.Array, Any]]
    backward: Callable[..., tuple[jax.Array, ...]]
