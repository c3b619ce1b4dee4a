"""State passing (DESIGN.md section 1): one mechanism, three uses.

Pieces of a sequence each run from a zero state and return their local final state L_p; the state entering
every piece then follows from the exclusive scan S_0 = start, S_{p+1} = a_p S_p + L_p, where a_p =
decay^len_p, or 0 when a segment starts inside piece p. The Pallas kernels use it to split one sequence
over the GPU (forward, and mirrored for the backward's reverse states), and sequence parallelism uses it
across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pass_piece(state: jax.Array, carry: jax.Array, local: jax.Array) -> jax.Array:
    """The state after one piece: carry * state + local (state, local [..., K, V]; carry [...]). Also used
    inside the Pallas kernels, where each program folds the pieces before its own."""
    return carry[..., None, None] * state + local


def pass_states(start: jax.Array, local: jax.Array, carry: jax.Array, *,
                reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """entering[0] = start, entering[p+1] = carry[p] * entering[p] + local[p]; with ``reverse``, the same
    from the last piece to the first.

    start [..., K, V]; local [P, ..., K, V]; carry [P, ...]. Returns (entering [P, ..., K, V], the state
    after every piece). P is static and small: a Python loop, which XLA fuses.
    """
    if local.shape[0] == 0:
        return jnp.zeros((0,) + start.shape, start.dtype), start
    pieces = range(local.shape[0])
    entering = [None] * local.shape[0]
    state = start
    for p in (reversed(pieces) if reverse else pieces):
        entering[p] = state
        state = pass_piece(state, carry[p], local[p])
    return jnp.stack(entering), state
