"""The NaN marking of fleetjax.nonfinite as a walk kernel, for the choice made on the device.

``nonfinite.mark_reached`` marks an output NaN where a non-finite source entry reaches it: entry [s, c] reaches
[t, c] for s <= t in t's segment (reverse: s >= t). That is the walk's own reach, so this kernel walks the
chunks as every walk kernel does (fleetjax.pallas.walk) with a [block] flag per column for its state: the
columns whose source held a non-finite entry that the state carries into the chunk. In a chunk a row is
reached through the pairs (a product of the pair mask with the chunk's bad entries, counts of at most C)
or, where the state enters it, through that flag. After the walk the flag says which columns of the state
handed on (the final state, forward) a non-finite entry reached.

Its launch takes a ``skip`` flag (fleetjax.pallas.launch.call): with every input finite no program runs and
the marked output is the output itself, its buffer taken over, so that the plain/contained choice needs no
host wait. It is slow where it runs (one sequence piece, a product per chunk), which is only where an input
holds NaN or inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fleetjax import chunk as cm
from fleetjax.chunking import Chunking
from fleetjax.pallas.launch import call
from fleetjax.pallas.walk import Specs, columns, load_rows, padded, program_id, store_rows, value_blocks, walk

f32 = jnp.float32


def reached_kernel(*, source_ref, marked_ref, seen_ref, run_ref=None, skip_ref=None, chunking: Chunking,
                   reverse: bool, width: int, block: int):
    """One (column block, batch*head) program. Refs: source [T, block]; marked [T, block], which holds x when
    the program starts (the launch hands it x's buffer) and is marked in place; run [T] (segments); skip [1]
    (see fleetjax.pallas.walk.walk); seen
    [block] int32: 1 where a non-finite source entry reaches the state after the walk."""
    j = program_id(0, marked_ref)
    cols = columns(marked_ref, width, block, j)
    pairs_dtype = jnp.bfloat16  # 0/1 entries and counts of at most C: exact

    def body(ch: cm.Chunk, seen):
        bad = ~jnp.isfinite(load_rows(source_ref, ch, cols).astype(f32))
        within = jax.lax.dot(ch.pairs.astype(pairs_dtype), bad.astype(pairs_dtype),
                             preferred_element_type=f32) > 0
        reached = within | (ch.enters[:, None] & (seen[None, :] > 0))
        x = load_rows(marked_ref, ch, cols)
        store_rows(marked_ref, ch, jnp.where(reached, jnp.nan, x.astype(f32)), cols)
        handed_on = jnp.max(jnp.where(ch.leaves[:, None] & bad, 1, 0), axis=0)
        return jnp.maximum(jnp.where(ch.carries, seen, 0), handed_on)

    seen = walk(body, jnp.zeros((marked_ref.shape[-1],), jnp.int32), piece=0, chunking=chunking, reverse=reverse,
                log_decay=jnp.float32(0.0), run_ref=run_ref, skip_ref=skip_ref)
    seen_ref[...] = seen


def mark_reached(x: jax.Array, source: jax.Array, run_ids: jax.Array | None, *, reverse: bool, skip: jax.Array,
                 chunk_size: int = 64, block: int = 64, num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
    """(x [B, T, H, D] with NaN where a non-finite entry of ``source`` [B, T, H, D] reaches, as
    fleetjax.nonfinite.mark_reached; [B, H, D] bool: the columns in which a non-finite entry reaches the state
    after the walk, as fleetjax.nonfinite.in_run(bad, run_ids, "last") forward and "first" in reverse).
    ``skip`` (a bool scalar array) True: x itself (its buffer taken over) and no columns, nothing run."""
    B, T, H, D = x.shape
    chunking = Chunking(T, chunk_size, 1)
    bd, nd = value_blocks(D, block)
    s = Specs(H, chunking, padded(D), bd)
    kernel = functools.partial(reached_kernel, chunking=chunking, reverse=reverse, width=D, block=bd)
    seen_spec = pl.BlockSpec((None, None, bd), lambda j, g, p: (g // H, g % H, j))
    out = call(kernel, name="fleet_mark_reached" + ("_reverse" if reverse else ""), grid=(nd, B * H, 1),
               inputs=dict(source_ref=(source, s.values()), run_ref=None if run_ids is None else (run_ids, s.runs())),
               outputs=dict(marked_ref=(((B, T, H, D), x.dtype), s.values()),
                            seen_ref=(((B, H, nd * bd), jnp.int32), seen_spec)),
               num_warps=num_warps, num_stages=1, skip=skip, keep=dict(marked_ref=x))
    seen = out["seen_ref"][..., :D] > 0
    return out["marked_ref"], jnp.where(skip, False, seen)
