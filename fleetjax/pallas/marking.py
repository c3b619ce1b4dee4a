"""The NaN marking of fleetjax.nonfinite as a walk kernel, for the choice made on the device.

``nonfinite.mark_reached`` marks an output NaN where a non-finite source entry reaches it: entry [s, c] reaches
[t, c] for s <= t in t's segment (reverse: s >= t). That is the walk's own reach, so this kernel walks the
chunks as every walk kernel does (fleetjax.pallas.walk) with a [block] flag per column for its state: the
columns whose source held a non-finite entry that the state carries into the chunk. In a chunk a row is
reached through the pairs (a product of the pair mask with the chunk's bad entries, counts of at most C)
or, where the state enters it, through that flag (:func:`reach`, a step that the contained forward walk
takes too, marking its o as it walks: fleetjax.pallas.forward). After the walk the flag says which columns of
the state handed on (the final state, forward) a non-finite entry reached.

:func:`mark_backward` makes a contained backward's marks in one launch per gradient: a forward walk per
row marks dq (by k), reverse walks dv (by dO: :func:`mark_reached`'s) and dk (by q and by whole dO rows), each
with the flags the small gradients need. Separate launches keep jax's dead-code elimination: a backward whose dk is
unused drops dk's marking, and with it the walks whose buffers it would take over.

The launches take a ``skip`` flag (fleetjax.pallas.launch.call): with every input finite their programs
visit no chunk and each marked output is the output passed in, its buffer taken over, so that the
plain/contained choice needs no host wait. They are slow where they run (one sequence piece, a product per
chunk), which is only where an input holds NaN or inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fleetjax import chunk as cm
from fleetjax.chunking import Chunking
from fleetjax.pallas.launch import call
from fleetjax.pallas.walk import (Specs, columns, load_rows, padded, program_id, store_positions, store_rows,
                                  value_blocks, walk)

f32 = jnp.float32


def _bad(ref, ch: cm.Chunk, cols):
    """[C, D] bool: the chunk's non-finite entries of a [T, D] ref (False beyond T and ``cols``)."""
    return ~jnp.isfinite(load_rows(ref, ch, cols).astype(f32))


def _through_pairs(ch: cm.Chunk, bad):
    """[C, D] bool: row i is reached by a bad entry [j, c] of the chunk through the pair (i, j): a product of
    the pair mask with the bad entries, counts of at most C, exact in bfloat16."""
    return jax.lax.dot(ch.pairs.astype(jnp.bfloat16), bad.astype(jnp.bfloat16), preferred_element_type=f32) > 0


def _handed_on(ch: cm.Chunk, flag, bad):
    """The per-column int flag [D] (or scalar, with ``bad`` [C]) of the state handed on: what it carried where
    the entering state passes the chunk, and the chunk's bad entries that enter it."""
    leaves = ch.leaves if bad.ndim == 1 else ch.leaves[:, None]
    return jnp.maximum(jnp.where(ch.carries, flag, 0), jnp.max(jnp.where(leaves & bad, 1, 0), axis=0))


def reach(ch: cm.Chunk, bad, seen):
    """(reached [C, D] bool, the flag [D] handed on) for a chunk's non-finite entries ``bad`` [C, D] and the
    flag ``seen`` [D] int32 of the state entering it: row i is reached through its pairs with the chunk's bad
    entries or, where the entering state reaches it, through the flag (:func:`reached_kernel`'s step, and the
    contained forward walk's, fleetjax.pallas.forward)."""
    return _through_pairs(ch, bad) | (ch.enters[:, None] & (seen[None, :] > 0)), _handed_on(ch, seen, bad)


def _mark(ref, ch: cm.Chunk, cols, reached) -> None:
    """NaN into the chunk's rows of ``ref`` [T, D] where ``reached`` [C, D], in place."""
    store_rows(ref, ch, jnp.where(reached, jnp.nan, load_rows(ref, ch, cols).astype(f32)), cols)


def _unless_skipped(skip, flags):
    """``flags`` (bool), all False where ``skip``: a skipped launch leaves its flag outputs undefined."""
    return None if flags is None else jnp.where(skip, False, flags)


def _row_bad(bad):
    """[C] bool: the rows with a non-finite entry."""
    return jnp.max(jnp.where(bad, 1, 0), axis=1) > 0


def _along(step, flags, *, chunking: Chunking, reverse: bool, run_ref, skip_ref):
    """The flags after ``step`` over the row's chunks (one piece, no decay: only the runs' reach counts)."""
    return walk(step, flags, piece=0, chunking=chunking, reverse=reverse, log_decay=jnp.float32(0.0),
                run_ref=run_ref, skip_ref=skip_ref)


def reached_kernel(*, source_ref, seen_ref, marked_ref=None, run_ref=None, skip_ref=None, chunking: Chunking,
                   reverse: bool, width: int, block: int):
    """One (column block, batch*head) program. Refs: source [T, block]; marked [T, block], which holds x when
    the program starts (the launch hands it x's buffer) and is marked in place (None: nothing marked, only
    the flags); run [T] (segments); skip [1] (see fleetjax.pallas.walk.walk); seen [block] int32: 1 where a
    non-finite source entry reaches the state after the walk."""
    j = program_id(0, source_ref)
    cols = columns(source_ref, width, block, j)

    def body(ch: cm.Chunk, seen):
        reached, seen = reach(ch, _bad(source_ref, ch, cols), seen)
        if marked_ref is not None:
            _mark(marked_ref, ch, cols, reached)
        return seen

    seen = _along(body, jnp.zeros((source_ref.shape[-1],), jnp.int32), chunking=chunking, reverse=reverse,
                  run_ref=run_ref, skip_ref=skip_ref)
    seen_ref[...] = seen


def _reached(x, source, run_ids, *, reverse: bool, skip, chunk_size: int, block: int, num_warps: int):
    """The launch of :func:`reached_kernel`: (x marked, or None where ``x`` is None; the seen columns)."""
    B, T, H, D = source.shape
    chunking = Chunking(T, chunk_size, 1)
    bd, nd = value_blocks(D, block)
    s = Specs(H, chunking, padded(D), bd)
    kernel = functools.partial(reached_kernel, chunking=chunking, reverse=reverse, width=D, block=bd)
    seen_spec = pl.BlockSpec((None, None, bd), lambda j, g, p: (g // H, g % H, j))
    name = "fleet_mark_reached" if x is not None else "fleet_reached_columns"
    out = call(kernel, name=name + ("_reverse" if reverse else ""), grid=(nd, B * H, 1),
               inputs=dict(source_ref=(source, s.values()), run_ref=None if run_ids is None else (run_ids, s.runs())),
               outputs=dict(marked_ref=None if x is None else (((B, T, H, D), x.dtype), s.values()),
                            seen_ref=(((B, H, nd * bd), jnp.int32), seen_spec)),
               num_warps=num_warps, num_stages=1, skip=skip, keep=None if x is None else dict(marked_ref=x))
    seen = out["seen_ref"][..., :D] > 0
    if reverse and run_ids is not None:  # in_run's "first" is run 0: none where the row starts another run
        seen = seen & (run_ids[:, 0] == 0)[:, None, None]
    return out.get("marked_ref"), _unless_skipped(skip, seen)


def mark_reached(x: jax.Array, source: jax.Array, run_ids: jax.Array | None, *, reverse: bool, skip: jax.Array,
                 chunk_size: int = 64, block: int = 64, num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
    """(x [B, T, H, D] with NaN where a non-finite entry of ``source`` [B, T, H, D] reaches, as
    fleetjax.nonfinite.mark_reached; [B, H, D] bool: the columns in which a non-finite entry reaches the state
    after the walk, as fleetjax.nonfinite.in_run(bad, run_ids, "last") forward and "first" (run 0) in reverse).
    ``skip`` (a bool scalar array) True: x itself (its buffer taken over) and no columns, no chunk visited."""
    return _reached(x, source, run_ids, reverse=reverse, skip=skip, chunk_size=chunk_size, block=block,
                    num_warps=num_warps)


def reached_columns(source: jax.Array, run_ids: jax.Array | None, *, reverse: bool, skip: jax.Array,
                    chunk_size: int = 64, block: int = 64, num_warps: int = 4) -> jax.Array:
    """:func:`mark_reached`'s columns [B, H, D] alone, where there is no output to mark (the local states of
    sequence parallelism); no chunk visited and no column where ``skip``."""
    return _reached(None, source, run_ids, reverse=reverse, skip=skip, chunk_size=chunk_size, block=block,
                    num_warps=num_warps)[1]


def dq_marks_kernel(*, q_ref, k_ref, v_ref, do_ref, dq_ref, any_ref, after_ref=None, run_ref=None, skip_ref=None,
                    chunking: Chunking, K: int, V: int):
    """One batch*head program, a forward walk over the row: dq [T, K'] marked in place where a bad k reaches;
    ``after`` [T] (a bad k or v entry at s < t of t's run); ``any`` [16] (a bad q, k, v or dO entry anywhere).
    Refs: q, k [T, K']; v, do [T, V']; run [T]; skip [1]."""
    k_cols, v_cols = columns(q_ref, K), columns(v_ref, V)

    def step(ch: cm.Chunk, carry):
        seen_k, seen_key_side, anywhere = carry
        bad_k, bad_v = _bad(k_ref, ch, k_cols), _bad(v_ref, ch, v_cols)
        reached, handed_k = reach(ch, bad_k, seen_k)
        _mark(dq_ref, ch, k_cols, reached)
        key_side = _row_bad(bad_k) | _row_bad(bad_v)
        if after_ref is not None:  # the pairs (t, s) with s < t: lag > 0
            inside = jnp.max(jnp.where(ch.pairs & (ch.lag > 0) & key_side[None, :], 1, 0), axis=1)
            store_positions(after_ref, ch, jnp.maximum(inside, jnp.where(ch.enters, seen_key_side, 0)))
        rows = key_side | _row_bad(_bad(q_ref, ch, k_cols)) | _row_bad(_bad(do_ref, ch, v_cols))
        return (handed_k, _handed_on(ch, seen_key_side, key_side),
                jnp.maximum(anywhere, jnp.max(jnp.where(rows, 1, 0))))

    none = jnp.int32(0)
    _, _, anywhere = _along(step, (jnp.zeros((q_ref.shape[-1],), jnp.int32), none, none), chunking=chunking,
                            reverse=False, run_ref=run_ref, skip_ref=skip_ref)
    any_ref[...] = jnp.full(any_ref.shape, anywhere, jnp.int32)


def dk_marks_kernel(*, q_ref, do_ref, dk_ref, before_ref=None, run_ref=None, skip_ref=None, chunking: Chunking,
                    K: int, V: int):
    """One batch*head program, a reverse walk over the row: dk [T, K'] marked in place where a bad q reaches
    and where any entry of a bad dO row does; ``before`` [T] (a bad q or dO entry at s >= t of t's run).
    Refs: q [T, K']; do [T, V']; run [T]; skip [1]."""
    k_cols, v_cols = columns(q_ref, K), columns(do_ref, V)

    def step(ch: cm.Chunk, carry):
        seen_q, seen_do_row, seen_query_side = carry
        bad_q = _bad(q_ref, ch, k_cols)
        do_row = _row_bad(_bad(do_ref, ch, v_cols))
        row_reached = ((jnp.max(jnp.where(ch.pairs & do_row[None, :], 1, 0), axis=1) > 0)
                       | (ch.enters & (seen_do_row > 0)))
        reached, handed_q = reach(ch, bad_q, seen_q)
        _mark(dk_ref, ch, k_cols, reached | row_reached[:, None])
        query_side = _row_bad(bad_q) | do_row
        if before_ref is not None:  # the pairs (t, s) with s >= t
            inside = jnp.max(jnp.where(ch.pairs & query_side[None, :], 1, 0), axis=1)
            store_positions(before_ref, ch, jnp.maximum(inside, jnp.where(ch.enters, seen_query_side, 0)))
        return (handed_q, _handed_on(ch, seen_do_row, do_row),
                _handed_on(ch, seen_query_side, query_side))

    none = jnp.int32(0)
    _along(step, (jnp.zeros((q_ref.shape[-1],), jnp.int32), none, none), chunking=chunking, reverse=True,
           run_ref=run_ref, skip_ref=skip_ref)


def mark_backward(dq, dk, dv, q, k, v, do, run_ids, *, skip: jax.Array, gate_marks: bool, chunk_size: int = 64,
                  num_warps: int = 4):
    """The marks of a contained backward (fleetjax.pallas.chunked's _mark_gradients), which ``skip`` (a bool
    scalar array) turns into none: (dq, dk, dv [B, T, H, *] with NaN where a non-finite q, k, v or dO reaches,
    in the buffers passed in; ``first`` [B, H, V] bool: the columns of d initial_state that a bad dO of the
    row's run 0 reaches; ``head`` [H] bool: a bad entry anywhere in the head; ``gate``: None, or if
    ``gate_marks`` the positions of d log_gate that a bad entry reaches as two int32 [B, H, T], positive there
    (the dq marking's flag for a bad k or v before the position, the dk marking's for a bad q or dO at or after
    it), undefined where skipped: :func:`gate_reached` joins them). Skipped: the gradients as passed, no flags.
    One launch per gradient (dq with ``head``, dv with ``first``, dk), so that jax drops those of the gradients
    that a caller does not use, and the walks that would form them."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunking = Chunking(T, chunk_size, 1)
    kp, vp = padded(K), padded(V)
    sk, sv = Specs(H, chunking, kp, kp), Specs(H, chunking, vp, vp)
    per_position = (((B, H, T), jnp.int32), sk.positions()) if gate_marks else None
    any_row = (((B, H, 16), jnp.int32), pl.BlockSpec((None, None, 16), lambda j, g, p: (g // H, g % H, 0)))
    runs = None if run_ids is None else (run_ids, sk.runs())
    launch = functools.partial(call, grid=(1, B * H, 1), num_warps=num_warps, num_stages=1, skip=skip)
    marked_dq = launch(functools.partial(dq_marks_kernel, chunking=chunking, K=K, V=V), name="fleet_mark_dq",
                       inputs=dict(q_ref=(q, sk.keys()), k_ref=(k, sk.keys()), v_ref=(v, sv.keys()),
                                   do_ref=(do, sv.keys()), run_ref=runs),
                       outputs=dict(dq_ref=((dq.shape, dq.dtype), sk.keys()), any_ref=any_row,
                                    after_ref=per_position), keep=dict(dq_ref=dq))
    # dv: marked where a bad dO reaches, in reverse, with the columns of the state after the walk (mark_reached).
    dv, first = mark_reached(dv, do, run_ids, reverse=True, skip=skip, chunk_size=chunk_size, num_warps=num_warps)
    marked_dk = launch(functools.partial(dk_marks_kernel, chunking=chunking, K=K, V=V), name="fleet_mark_dk",
                       inputs=dict(q_ref=(q, sk.keys()), do_ref=(do, sv.keys()), run_ref=runs),
                       outputs=dict(dk_ref=((dk.shape, dk.dtype), sk.keys()), before_ref=per_position),
                       keep=dict(dk_ref=dk))
    head = jnp.any(marked_dq["any_ref"][..., 0] > 0, axis=0)
    gate = (marked_dq["after_ref"], marked_dk["before_ref"]) if gate_marks else None
    return marked_dq["dq_ref"], marked_dk["dk_ref"], dv, first, _unless_skipped(skip, head), gate


def gate_reached(gate: tuple[jax.Array, jax.Array], skip: jax.Array) -> jax.Array:
    """:func:`mark_backward`'s ``gate`` as one bool [B, H, T], all False where ``skip``."""
    after, before = gate
    return _unless_skipped(skip, (after > 0) | (before > 0))
