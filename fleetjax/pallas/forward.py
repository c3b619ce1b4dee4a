"""The forward kernels of implementation="pallas": the forward walk, and the pieces' local states.

forward walk: one program per (value block, batch*head, sequence piece) walks its piece from the entering
  state, writing o = scale (masked scores @ v + decayed q @ S) per chunk and handing the [K, block_v]
  float32 state on (fleetjax.pallas.chunk); it returns the state after its piece.
piece states: the local final state of each piece from a zero state (k and v only), forward or reverse.
  A walk with sequence pieces launches it first: each walk program then folds the states of the pieces
  before its own into its entering state on chip, so no entering state goes through HBM. The backward's
  reverse walks use the reverse form (query=k, key=q's pieces, see fleetjax.pallas.backward).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from fleetjax.chunking import Chunking
from fleetjax import chunk as cm
from fleetjax.pallas import marking
from fleetjax.pallas.launch import call
from fleetjax.state_passing import pass_states
from fleetjax.pallas.walk import (Specs, columns, enter_piece, program_id, load_rows, pad_state, padded, piece_edges,
                                  piece_links, store_rows, value_blocks, walk)

f32 = jnp.float32


def forward_kernel(*, log_decay_ref, q_ref, k_ref, v_ref, o_ref, final_ref, start_ref=None, local_ref=None,
                   link_ref=None, run_ref=None, edge_ref=None, gate_ref=None, piece_log_ref=None, skip_ref=None,
                   chunking: Chunking,
                   K: int, V: int, block_v: int, scale: float, exact_state: bool, contain: bool, precision):
    """One (value block, batch*head, piece) program of the forward walk. Refs: q, k [T, K]; v, o [T, block_v];
    start [K, block_v] (the state entering the walk); local [P-1, K, block_v], link [P] (pieces); run [T],
    edge [1] (segments); gate [T], piece_log [P] (gated); skip [1] (see fleetjax.pallas.walk.walk); final
    [K, block_v]: the state after the piece.
    ``contain``: keep non-finite values where they belong (fleetjax.chunk), for inputs that hold some, and
    mark what they reach (fleetjax.nonfinite.mark_forward): o NaN where a non-finite value reaches it, and
    the final state's columns that one reaches, with the flag of fleetjax.pallas.marking carried beside the
    state (one piece only: the flag does not cross the pieces' edges). Without containment and without
    segments, each chunk's o is the state update's witness (fleetjax.chunk.update): a finite final state
    then says every o of the piece was finite."""
    j, piece = program_id(0, log_decay_ref), program_id(2, log_decay_ref)
    log_decay = log_decay_ref[0]
    k_cols, v_cols = columns(k_ref, K), columns(v_ref, V, block_v, j)
    dtype = k_ref.dtype
    state = start_ref[...] if start_ref is not None else jnp.zeros(final_ref.shape, f32)
    if local_ref is not None:
        state = enter_piece(state, piece=piece, chunking=chunking, reverse=False, log_decay=log_decay,
                            local_ref=local_ref, link_ref=link_ref, piece_log_ref=piece_log_ref)

    def body(ch: cm.Chunk, carry):
        state, seen = carry
        q, k = load_rows(q_ref, ch, k_cols), load_rows(k_ref, ch, k_cols)
        v = load_rows(v_ref, ch, v_cols)
        if contain:
            v, bad = cm.finite_part(v)
        o, _ = cm.output(q, cm.scores(q, k, ch, precision, contain), v, state, ch, scale=scale, dtype=dtype,
                         precision=precision, exact=False)
        state = cm.update(state, k, v, ch, dtype=dtype, precision=precision, exact=exact_state,
                          witness=None if contain or run_ref is not None else o)
        if contain:
            reached, seen = marking.reach(ch, bad, seen)
            o = jnp.where(reached, jnp.nan, o)
        store_rows(o_ref, ch, o, v_cols)
        return state, seen

    seen = jnp.zeros((v_ref.shape[-1],), jnp.int32) if contain else None
    state, seen = walk(body, (state, seen), piece=piece, chunking=chunking, reverse=False, log_decay=log_decay,
                       run_ref=run_ref, edge_ref=edge_ref, gate_ref=gate_ref, skip_ref=skip_ref)
    final_ref[...] = jnp.where(seen[None, :] > 0, jnp.nan, state) if contain else state


def piece_states_kernel(*, log_decay_ref, k_ref, v_ref, final_ref, counts_ref=None, tangent_ref=None, run_ref=None,
                        edge_ref=None, gate_ref=None, skip_ref=None, chunking: Chunking, K: int, V: int, block_v: int,
                        reverse: bool, piece_offset: int, contain: bool, exact: bool, precision):
    """One (value block, batch*head, piece) program: the piece's state from a zero one (``exact``:
    float32-accurate with 16-bit inputs, for a final state or a gradient's sums it enters). Refs: k [T, K];
    v [T, block_v]; run [T], edge [1]; skip [1] (see fleetjax.pallas.walk.walk); final [K, block_v]; counts
    [K, block_v]: the state's crossing counts (fleetjax.vjp), for the Triton dq walk; tangent [K, block_v]:
    the state's derivative in log gamma, for the Mosaic one (fleetjax.chunk.update_tangent)."""
    j, piece = program_id(0, log_decay_ref), program_id(2, log_decay_ref) + piece_offset
    log_decay = log_decay_ref[0]
    k_cols, v_cols = columns(k_ref, K), columns(v_ref, V, block_v, j)
    dtype = k_ref.dtype
    second_ref = counts_ref if counts_ref is not None else tangent_ref

    def body(ch: cm.Chunk, carry):
        state, second = carry
        k = load_rows(k_ref, ch, k_cols)
        v = cm.finite_values(load_rows(v_ref, ch, v_cols), contain)
        if counts_ref is not None:
            second = cm.count_crossings(second, state, ch)
        elif tangent_ref is not None:
            second = cm.update_tangent(second, state, k, v, ch, dtype=dtype, precision=precision)
        state = cm.update(state, k, v, ch, dtype=dtype, precision=precision, exact=exact)
        return state, second

    zero = jnp.zeros(final_ref.shape, f32)
    final_ref[...], second = walk(body, (zero, None if second_ref is None else zero), piece=piece,
                                  chunking=chunking, reverse=reverse, log_decay=log_decay, run_ref=run_ref,
                                  edge_ref=edge_ref, gate_ref=gate_ref, skip_ref=skip_ref)
    if second_ref is not None:
        second_ref[...] = second


# ------------------------------------------------------------------------------------------------ launches

def piece_states(key, value, log_decay, run_ids, chunking: Chunking, *, reverse: bool, all_pieces: bool,
                 chunk_size: int, block_v: int, num_warps: int, num_stages: int, precision, contain: bool,
                 exact: bool = True, counts: bool = False, tangent: bool = False, gate=None, skip=None):
    """The local states [B, H, n, K, V] float32 of the pieces that have a successor in the walk (forward: 0..P-2;
    reverse: 1..P-1), or of all P pieces with ``all_pieces``. Each piece is walked from a zero state with its
    keys ``key`` [B, T, H, K] and values ``value`` [B, T, H, V], in chunks of ``chunk_size`` where those tile the
    pieces (else the walk's). With ``counts`` the states come as (states, their crossing counts): counts of the
    chunks walked, so the dq walk that enters them passes its own chunk size; with ``tangent`` as (states, their
    derivatives in log gamma), in any chunks. gate: the log gate [B, H, T] (None: constant). skip: a bool scalar
    array; True: the programs visit no chunk and the states are undefined (fleetjax.pallas.launch.call)."""
    B, T, H, K = key.shape
    V = value.shape[-1]
    chunking = chunking.with_chunk_size(chunk_size)
    kp = padded(K)
    bv, nv = value_blocks(V, block_v)
    launched, offset = (chunking.pieces, 0) if all_pieces else (chunking.pieces - 1, int(reverse))
    s = Specs(H, chunking, kp, bv, offset)
    edge = piece_edges(run_ids, chunking, reverse)[0] if run_ids is not None else None
    kernel = functools.partial(piece_states_kernel, chunking=chunking, K=K, V=V, block_v=bv, reverse=reverse,
                               piece_offset=offset, contain=contain, exact=exact, precision=precision)
    out = call(kernel, name="fleet_piece_states" + ("_reverse" if reverse else ""), grid=(nv, B * H, launched),
               inputs=dict(log_decay_ref=(log_decay, s.head()), k_ref=(key, s.keys()), v_ref=(value, s.values()),
                           run_ref=None if run_ids is None else (run_ids, s.runs()),
                           edge_ref=None if run_ids is None else (edge, s.edge()),
                           gate_ref=None if gate is None else (gate, s.positions())),
               outputs=dict(final_ref=(((B, H, launched, kp, nv * bv), f32), s.piece_state()),
                            counts_ref=(((B, H, launched, kp, nv * bv), f32), s.piece_state()) if counts else None,
                            tangent_ref=(((B, H, launched, kp, nv * bv), f32), s.piece_state()) if tangent else None),
               num_warps=num_warps, num_stages=num_stages, skip=skip)
    states = out["final_ref"][..., :K, :V]
    if counts or tangent:
        states = (states, out["counts_ref" if counts else "tangent_ref"][..., :K, :V])
    return states


def forward_walk(q, k, v, log_decay, start, run_ids, chunking: Chunking, *, scale: float, exact_state: bool,
                 contain: bool, local, block_v: int, num_warps: int, num_stages: int, precision, gate=None,
                 piece_log=None, skip=None, keep_o=None):
    """(o [B, T, H, V] in q's dtype, the state after the walk [B, H, K, V] float32, a witness of o), from the
    entering state ``start`` (None: zero). The witness is NaN somewhere whenever some o is not finite (in float32,
    before its rounding): without ``contain`` and segments, the states after every piece [B, H, P, K', V'] (see
    :func:`forward_kernel`), a read of a few MB instead of o; else o itself. ``contain``: o and the final state
    come marked NaN where a non-finite value reaches (fleetjax.nonfinite.mark_forward), in one piece (``chunking``
    must have one). ``local``: the pieces' local states (see :func:`piece_states`), None with one piece.
    gate [B, H, T] and piece_log [B, H, P] (the pieces' sums of la): the gated decay (None: constant). skip: a
    bool scalar array, or states whose first rows witness each (batch, head) row (fleetjax.pallas.launch.call);
    where it skips, the programs visit no chunk, o is ``keep_o``'s (an o computed elsewhere, whose buffer o
    takes) and the rest undefined."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    kp = padded(K)
    bv, nv = value_blocks(V, block_v)
    s = Specs(H, chunking, kp, bv)
    P = chunking.pieces
    assert P == 1 or not contain, "the contained forward walk marks in one piece"
    edge = piece_edges(run_ids, chunking, False)[0] if run_ids is not None else None
    links = piece_links(run_ids, chunking, False) if P > 1 else None
    kernel = functools.partial(forward_kernel, chunking=chunking, K=K, V=V, block_v=bv, scale=scale,
                               exact_state=exact_state, contain=contain, precision=precision)
    out = call(kernel, name="fleet_forward", grid=(nv, B * H, P),
               inputs=dict(log_decay_ref=(log_decay, s.head()), q_ref=(q, s.keys()), k_ref=(k, s.keys()),
                           v_ref=(v, s.values()),
                           start_ref=None if start is None else (pad_state(start, kp, nv * bv), s.state()),
                           local_ref=None if P == 1 else (pad_state(local, kp, nv * bv), s.piece_states(P - 1)),
                           link_ref=None if links is None else (links, s.row(P)),
                           run_ref=None if run_ids is None else (run_ids, s.runs()),
                           edge_ref=None if run_ids is None else (edge, s.edge()),
                           gate_ref=None if gate is None else (gate, s.positions()),
                           piece_log_ref=None if gate is None or P == 1 else (piece_log, s.pieces())),
               outputs=dict(o_ref=(((B, T, H, V), q.dtype), s.values()),
                            final_ref=(((B, H, P, kp, nv * bv), f32), s.piece_state())),
               num_warps=num_warps, num_stages=num_stages, skip=skip,
               keep=None if keep_o is None else dict(o_ref=keep_o))
    o, finals = out["o_ref"], out["final_ref"]
    return o, finals[:, :, -1, :K, :V], (o if contain or run_ids is not None else finals)


def fold_pieces(local, piece_log, run_ids, chunking: Chunking, reverse: bool):
    """The state after all pieces from a zero one, from the local states of all P pieces [B, H, P, K, V] and
    the pieces' sums of la [B, H, P]: the state passing of fleetjax.state_passing over the pieces (reverse:
    from the last piece to the first)."""
    carry = jnp.broadcast_to(jnp.exp(piece_log), local.shape[:3])
    links = piece_links(run_ids, chunking, reverse)
    keep = None if links is None else jnp.broadcast_to(links[:, None, :] > 0, local.shape[:3])
    zero = jnp.zeros_like(local[:, :, 0])
    _, total = pass_states(zero, local, carry, keep, reverse=reverse, axis=2)
    return total
