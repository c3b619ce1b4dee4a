"""Packed sequences: the canonical form of ``segment_ids`` that every implementation reads.

The public argument ``segment_ids`` [B, T] may hold any integers; the state resets wherever the id changes,
so two runs of the same id separated by another id do not interact. Implementations
never see the user's ids. They receive *run ids*: int32 [B, T], non-decreasing along T, where position t
belongs to run ``run_ids[b, t]`` and the state entering the sequence (the initial state, or the state
passed in from an earlier piece) feeds exactly the positions of run 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def run_ids_from_segment_ids(segment_ids: jax.Array, previous_id: jax.Array | None = None) -> jax.Array:
    """Turn segment ids [B, T] into run ids [B, T] int32.

    ``previous_id`` [B] is the id of the position just before this piece (sequence parallelism); when given,
    the first position opens run 1 instead of run 0 if its id differs, so no entering state reaches it.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    if previous_id is None:
        first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    else:
        first = (segment_ids[:, :1] != previous_id[:, None])
    starts = jnp.concatenate([first, changed], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1, dtype=jnp.int32)
