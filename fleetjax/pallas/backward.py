"""The backward kernels of implementation="pallas": three walks, each the forward walk with other roles
(fleetjax.pallas.chunk), each with a small on-chip state and none holding all value columns.

dq walk, forward in time: query=dO, key=v, value=k (state [V, K block]), entered with S0^T:
    dq_t = scale sum_{s <= t} gamma^(t-s) (dO_t . v_s) k_s + scale gamma^(t+1) S0 dO_t
  It also returns, per value block (summed after in a fixed order), the parts of the decay gradient that
  fleetjax.vjp needs: w_t = q_t . dq_t^inter (the state's part), counts_t (the same through a second state
  that counts the whole chunks each term of the first has crossed) and intra_t = scale sum_{s <= t in the
  chunk} (t - s) gamma^(t-s) (q_t . k_s)(dO_t . v_s).
dv walk, reverse in time: query=k, key=q, value=dO (state [K, V block]):
    dv_s = scale sum_{t >= s} gamma^(t-s) (q_t . k_s) dO_t;
  its state after the first position is R = sum_t gamma^(t+1) q_t dO_t^T, and d initial_state = scale R.
dk walk, reverse in time: query=v, key=dO, value=q (state [V, K block]):
    dk_s = scale sum_{t >= s} gamma^(t-s) (dO_t . v_s) q_t,  and u_s = k_s . dk_s^inter.
The final state's cotangent dS_T reaches position s with gamma^(T-1-s) (in the row's last run): the dv and
dk walks add gamma^(T-1-s) dS_T^T k_s and gamma^(T-1-s) dS_T v_s as a product of their own, not part of the
carried state, and the dk walk returns x_s = gamma^(T-1-s) k_s^T dS_T v_s, its share of the decay gradient.

Every product that feeds w, u, x or a state leaving the kernel keeps float32's accuracy with 16-bit inputs
(hi/lo pairs, fleetjax.pallas.chunk.dot_exact): the decay gradient's offset sums amplify roundings.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from fleetjax.chunking import Chunking
from fleetjax import chunk as cm
from fleetjax.pallas.launch import call
from fleetjax.pallas.walk import (Specs, columns, enter_piece, load_positions, load_rows, pad_state, padded,
                                  piece_edges, piece_links, program_id, store_positions, store_rows, value_blocks,
                                  walk)
from fleetjax.vjp import Wanted

f32 = jnp.float32


def _entered(state, local_ref, link_ref, piece_log_ref, *, piece, chunking, reverse, log_decay):
    if local_ref is None:
        return state
    return enter_piece(state, piece=piece, chunking=chunking, reverse=reverse, log_decay=log_decay,
                       local_ref=local_ref, link_ref=link_ref, piece_log_ref=piece_log_ref)


def dq_kernel(*, log_decay_ref, do_ref, v_ref, k_ref, q_ref, dq_ref, intra_ref=None, w_ref=None, counts_ref=None,
              start_ref=None, local_ref=None, local_counts_ref=None, link_ref=None, run_ref=None, edge_ref=None,
              gate_ref=None, piece_log_ref=None, spanned_ref=None, skip_ref=None, chunking: Chunking, K: int, V: int,
              block: int,
              scale: float, contain: bool, exact: bool, precision):
    """One (K block, batch*head, piece) program of the dq walk. Refs: do, v [T, V]; k, q, dq [T, block];
    start [V, block] (S0^T); local, local_counts [P-1, V, block], link [P]; run [T], edge [1]; intra, w,
    counts [T] (each None where not wanted; without counts their state is not carried). Gated: gate [T],
    piece_log [P], and spanned [T]: per position r, the chunk's pairs i >= r > j (the intra-chunk part of
    d log_gate_r, fleetjax.vjp). ``exact``: the state's products keep float32's accuracy (they feed w; kept
    without w where dq must be bitwise that of a walk that forms w)."""
    j, piece = program_id(0, log_decay_ref), program_id(2, log_decay_ref)
    log_decay = log_decay_ref[0]
    v_cols, k_cols = columns(v_ref, V), columns(k_ref, K, block, j)
    dtype = v_ref.dtype
    state = start_ref[...] if start_ref is not None else jnp.zeros((v_ref.shape[-1], block), f32)
    counts = None if counts_ref is None else jnp.zeros_like(state)
    if local_ref is not None:
        entered = enter_piece(state, piece=piece, chunking=chunking, reverse=False, log_decay=log_decay,
                              local_ref=local_ref, link_ref=link_ref, counts=counts,
                              local_counts_ref=local_counts_ref, piece_log_ref=piece_log_ref)
        state, counts = entered if counts is not None else (entered, None)

    def body(ch: cm.Chunk, carry):
        state, counts = carry
        do, v = load_rows(do_ref, ch, v_cols), load_rows(v_ref, ch, v_cols)
        k = cm.finite_values(load_rows(k_ref, ch, k_cols), contain)
        q = load_rows(q_ref, ch, k_cols)
        scores = cm.scores(do, v, ch, precision, contain)
        dq, inter = cm.output(do, scores, k, state, ch, scale=scale, dtype=dtype, precision=precision, exact=exact)
        if counts is not None:
            counted = cm.dot_exact(do, scale * counts, dtype, precision)
            counted = cm.select_rows(ch, ch.enters, counted * ch.entering[:, None])
        # This block's share of (q_i . k_j), times the pair's weighted (dO_i . v_j).
        pair = None
        if intra_ref is not None or spanned_ref is not None:
            pair = cm.dot(q, k, precision, trans_b=True) * scores
        if spanned_ref is not None:
            store_positions(spanned_ref, ch, scale * cm.spanned(pair))
        if counts is not None:
            counts = cm.count_crossings(counts, state, ch)
        state = cm.update(state, v, k, ch, dtype=dtype, precision=precision, exact=exact)
        store_rows(dq_ref, ch, dq, k_cols)
        if w_ref is not None:
            store_positions(w_ref, ch, jnp.sum(inter * q.astype(f32), axis=1))
        if counts is not None:
            store_positions(counts_ref, ch, jnp.sum(counted * q.astype(f32), axis=1))
        if intra_ref is not None:
            store_positions(intra_ref, ch, scale * jnp.sum(ch.lag * pair, axis=1))
        return state, counts

    walk(body, (state, counts), piece=piece, chunking=chunking, reverse=False, log_decay=log_decay,
         run_ref=run_ref, edge_ref=edge_ref, gate_ref=gate_ref, skip_ref=skip_ref)


def dv_kernel(*, log_decay_ref, k_ref, q_ref, do_ref, dv_ref, reverse_ref=None, exit_ref=None,
              last_run_ref=None, local_ref=None, link_ref=None, run_ref=None, edge_ref=None, gate_ref=None,
              piece_log_ref=None, to_end_ref=None, skip_ref=None, chunking: Chunking, K: int, V: int, block: int,
              scale: float, contain: bool, precision):
    """One (V block, batch*head, piece) program of the dv walk. Refs: k, q [T, K]; do, dv [T, block]; exit
    [K, block] (dS_T), last_run [1]; local [P-1, K, block], link [P]; run [T], edge [1]; reverse
    [K, block]: the reverse state after the piece's first position (d S0; None: not wanted, and the state's
    update is then one 16-bit product, as it feeds dv alone).
    Gated: gate [T], piece_log [P], to_end [T] (the sums of la after each position, with exit)."""
    j, piece = program_id(0, log_decay_ref), program_id(2, log_decay_ref)
    log_decay = log_decay_ref[0]
    k_cols, v_cols = columns(k_ref, K), columns(do_ref, V, block, j)
    dtype = k_ref.dtype
    state = _entered(jnp.zeros((k_ref.shape[-1], do_ref.shape[-1]), f32), local_ref, link_ref, piece_log_ref,
                     piece=piece, chunking=chunking, reverse=True, log_decay=log_decay)
    exit_state = None if exit_ref is None else exit_ref[...].astype(dtype)
    last_run = None if last_run_ref is None else last_run_ref[0]

    def body(ch: cm.Chunk, state):
        k, q = load_rows(k_ref, ch, k_cols), load_rows(q_ref, ch, k_cols)
        do = cm.finite_values(load_rows(do_ref, ch, v_cols), contain)
        dv, _ = cm.output(k, cm.scores(k, q, ch, precision, contain), do, state, ch, scale=scale, dtype=dtype,
                          precision=precision, exact=False)
        if exit_state is not None:
            to_end = None if to_end_ref is None else load_positions(to_end_ref, ch)
            dv = dv + cm.dot(k, exit_state, precision) * cm.exit_decay(ch, chunking.T, last_run, to_end)[:, None]
        state = cm.update(state, q, do, ch, dtype=dtype, precision=precision, exact=reverse_ref is not None)
        store_rows(dv_ref, ch, dv, v_cols)
        return state

    state = walk(body, state, piece=piece, chunking=chunking, reverse=True, log_decay=log_decay, run_ref=run_ref,
                 edge_ref=edge_ref, gate_ref=gate_ref, skip_ref=skip_ref)
    if reverse_ref is not None:
        reverse_ref[...] = state


def dk_kernel(*, log_decay_ref, v_ref, do_ref, q_ref, k_ref, dk_ref, u_ref=None, x_ref=None, exit_ref=None,
              last_run_ref=None, local_ref=None, link_ref=None, run_ref=None, edge_ref=None, gate_ref=None,
              piece_log_ref=None, to_end_ref=None, skip_ref=None, chunking: Chunking, K: int, V: int, block: int,
              scale: float, contain: bool, exact: bool, precision):
    """One (K block, batch*head, piece) program of the dk walk. Refs: v, do [T, V]; q, k, dk [T, block];
    exit [V, block] (dS_T^T, float32), last_run [1]; local [P-1, V, block], link [P]; run [T], edge [1];
    u, x [T] (None when no decay gradient is wanted). Gated: gate [T], piece_log [P], to_end [T].
    ``exact``: the state's and dS_T's products keep float32's accuracy (they feed u and x; kept without them
    where dk must be bitwise that of a walk that forms them)."""
    j, piece = program_id(0, log_decay_ref), program_id(2, log_decay_ref)
    log_decay = log_decay_ref[0]
    v_cols, k_cols = columns(v_ref, V), columns(q_ref, K, block, j)
    dtype = v_ref.dtype
    state = _entered(jnp.zeros((v_ref.shape[-1], block), f32), local_ref, link_ref, piece_log_ref, piece=piece,
                     chunking=chunking, reverse=True, log_decay=log_decay)
    last_run = None if last_run_ref is None else last_run_ref[0]

    def body(ch: cm.Chunk, state):
        v, do = load_rows(v_ref, ch, v_cols), load_rows(do_ref, ch, v_cols)
        q = cm.finite_values(load_rows(q_ref, ch, k_cols), contain)
        k = load_rows(k_ref, ch, k_cols)
        dk, inter = cm.output(v, cm.scores(v, do, ch, precision, contain), q, state, ch, scale=scale, dtype=dtype,
                              precision=precision, exact=exact)
        if exit_ref is not None:
            # Its own product, so that its share of the decay gradient is weighted by T-1-s (fleetjax.vjp).
            to_end = None if to_end_ref is None else load_positions(to_end_ref, ch)
            exit_state = exit_ref[...]
            through_exit = (cm.dot_exact(v, exit_state, dtype, precision) if exact
                            else cm.dot(v, exit_state.astype(dtype), precision))
            o_exit = through_exit * cm.exit_decay(ch, chunking.T, last_run, to_end)[:, None]
            dk = dk + o_exit
            if x_ref is not None:
                store_positions(x_ref, ch, jnp.sum(o_exit * k.astype(f32), axis=1))
        state = cm.update(state, do, q, ch, dtype=dtype, precision=precision, exact=exact)
        store_rows(dk_ref, ch, dk, k_cols)
        if u_ref is not None:
            store_positions(u_ref, ch, jnp.sum(inter * k.astype(f32), axis=1))
        return state

    walk(body, state, piece=piece, chunking=chunking, reverse=True, log_decay=log_decay, run_ref=run_ref,
         edge_ref=edge_ref, gate_ref=gate_ref, skip_ref=skip_ref)


# ------------------------------------------------------------------------------------------------ launches

def _common(query_key_dim: int, value_dim: int, block: int, H: int, chunking: Chunking, run_ids, reverse: bool,
            local, local_counts=None, gate=None, piece_log=None):
    """Specs and the inputs every walk shares: pieces (and their crossing counts), links, runs, the gate."""
    kp = padded(query_key_dim)
    bv, nv = value_blocks(value_dim, block)
    s = Specs(H, chunking, kp, bv)
    P = chunking.pieces
    links = piece_links(run_ids, chunking, reverse) if P > 1 else None
    inputs = dict(
        local_ref=None if P == 1 else (pad_state(local, kp, nv * bv), s.piece_states(P - 1)),
        local_counts_ref=None if P == 1 or local_counts is None else (pad_state(local_counts, kp, nv * bv),
                                                                      s.piece_states(P - 1)),
        link_ref=None if links is None else (links, s.row(P)),
        run_ref=None if run_ids is None else (run_ids, s.runs()),
        edge_ref=None if run_ids is None else (piece_edges(run_ids, chunking, reverse)[0], s.edge()),
        gate_ref=None if gate is None else (gate, s.positions()),
        piece_log_ref=None if gate is None or P == 1 else (piece_log, s.pieces()))
    return s, kp, bv, nv, inputs


def _exit_inputs(exit_state, run_ids, s: Specs, kp: int, width: int, dtype=None, to_end=None):
    if exit_state is None:
        return dict()
    exit_state = pad_state(exit_state, kp, width)
    return dict(exit_ref=(exit_state if dtype is None else exit_state.astype(dtype), s.state()),
                last_run_ref=None if run_ids is None else (run_ids[:, -1:], s.row(1)),
                to_end_ref=None if to_end is None else (to_end, s.positions()))


def _summed(out: dict, name: str, per_block: bool = False):
    """A per-position output [blocks, B, H, T] summed over the blocks (each holds part of a sum over the key
    dim) in a fixed order (``per_block``: as it is), or None if the launch left it out."""
    if name not in out:
        return None
    return out[name] if per_block else jnp.sum(out[name], axis=0)


def dq_walk(q, k, v, do, log_decay, start, run_ids, chunking: Chunking, *, scale: float, contain: bool, local,
            block_v: int, num_warps: int, num_stages: int, precision, gate=None, piece_log=None,
            wanted: Wanted = Wanted(), exact: bool | None = None, intra: bool = True, skip=None, keep=None,
            per_block: bool = False):
    """(dq [B, T, H, K] in q's dtype, w, counts, intra, spanned [B, H, T] float32). start: S0 [B, H, K, V] or
    None; local: (the pieces' local states, their crossing counts or None) or None; gate [B, H, T],
    piece_log [B, H, P]: the gated decay. What the decay's gradient needs comes as ``wanted`` asks, else
    None: counts for the log decay's, spanned for the gate's (gated only), w for either; intra with
    ``intra`` (the log decay's, and the plain walks' witness of non-finite inputs). ``exact``: the state's
    products float32-accurate (default: where ``wanted`` asks for sums; a caller that leaves the sums out
    may keep them for a dq bitwise the same). skip, keep: a bool scalar array and an array for dq's buffer
    (fleetjax.pallas.launch.call). ``per_block``: w and spanned [value blocks, B, H, T], not summed."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    local, local_counts = (None, None) if local is None else local
    s, kp, bk, nk, inputs = _common(V, K, block_v, H, chunking, run_ids, False, local, local_counts, gate,
                                    piece_log)
    if start is not None:
        inputs["start_ref"] = (pad_state(jnp.swapaxes(start, -1, -2), kp, nk * bk), s.state())
    kernel = functools.partial(dq_kernel, chunking=chunking, K=K, V=V, block=bk, scale=scale, contain=contain,
                               exact=wanted.any if exact is None else exact, precision=precision)
    per_position = (((nk, B, H, T), f32), s.per_position())
    out = call(kernel, name="fleet_backward_dq", grid=(nk, B * H, chunking.pieces),
               inputs=dict(log_decay_ref=(log_decay, s.head()), do_ref=(do, s.keys()), v_ref=(v, s.keys()),
                           k_ref=(k, s.values()), q_ref=(q, s.values()), **inputs),
               outputs=dict(dq_ref=(((B, T, H, K), q.dtype), s.values()), intra_ref=per_position if intra else None,
                            w_ref=per_position if wanted.any else None,
                            counts_ref=per_position if wanted.log_decay else None,
                            spanned_ref=per_position if gate is not None and wanted.log_gate else None),
               num_warps=num_warps, num_stages=num_stages, skip=skip,
               keep=None if keep is None else dict(dq_ref=keep))
    return (out["dq_ref"], _summed(out, "w_ref", per_block), _summed(out, "counts_ref"), _summed(out, "intra_ref"),
            _summed(out, "spanned_ref", per_block))


def dv_walk(q, k, do, log_decay, exit_state, run_ids, chunking: Chunking, *, scale: float, contain: bool, local,
            block_v: int, num_warps: int, num_stages: int, precision, gate=None, piece_log=None, to_end=None,
            start_wanted: bool = True, skip=None, keep=None):
    """(dv [B, T, H, V] in do's dtype, R [B, H, K, V] float32: the reverse state after the first position, or
    None unless ``start_wanted``). exit_state: dS_T [B, H, K, V] or None. skip, keep: as :func:`dq_walk`'s."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    s, kp, bv, nv, inputs = _common(K, V, block_v, H, chunking, run_ids, True, local, None, gate, piece_log)
    inputs.update(_exit_inputs(exit_state, run_ids, s, kp, nv * bv, to_end=to_end))
    kernel = functools.partial(dv_kernel, chunking=chunking, K=K, V=V, block=bv, scale=scale, contain=contain,
                               precision=precision)
    out = call(kernel, name="fleet_backward_dv", grid=(nv, B * H, chunking.pieces),
               inputs=dict(log_decay_ref=(log_decay, s.head()), k_ref=(k, s.keys()), q_ref=(q, s.keys()),
                           do_ref=(do, s.values()), **inputs),
               outputs=dict(dv_ref=(((B, T, H, V), do.dtype), s.values()),
                            reverse_ref=(((B, H, chunking.pieces, kp, nv * bv), f32), s.piece_state())
                            if start_wanted else None),
               num_warps=num_warps, num_stages=num_stages, skip=skip,
               keep=None if keep is None else dict(dv_ref=keep))
    return out["dv_ref"], out["reverse_ref"][:, :, 0, :K, :V] if start_wanted else None


def dk_walk(q, k, v, do, log_decay, exit_state, run_ids, chunking: Chunking, *, scale: float, contain: bool, local,
            block_v: int, num_warps: int, num_stages: int, precision, gate=None, piece_log=None, to_end=None,
            wanted: Wanted = Wanted(), exact: bool | None = None, skip=None, keep=None, per_block: bool = False):
    """(dk [B, T, H, K] in k's dtype, u [B, H, T], x [B, H, T] (float32; None without exit_state, both None
    when no decay gradient is ``wanted``)). local: the dv walk's local states [B, H, P-1, K, V] (transposed
    here); exit_state: dS_T [B, H, K, V] or None. exact, skip, keep, per_block (u): as :func:`dq_walk`'s."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    local = None if local is None else jnp.swapaxes(local, -1, -2)
    s, kp, bk, nk, inputs = _common(V, K, block_v, H, chunking, run_ids, True, local, None, gate, piece_log)
    exit_t = None if exit_state is None else jnp.swapaxes(exit_state, -1, -2)
    inputs.update(_exit_inputs(exit_t, run_ids, s, kp, nk * bk, to_end=to_end))
    kernel = functools.partial(dk_kernel, chunking=chunking, K=K, V=V, block=bk, scale=scale, contain=contain,
                               exact=wanted.any if exact is None else exact, precision=precision)
    per_position = (((nk, B, H, T), f32), s.per_position()) if wanted.any else None
    out = call(kernel, name="fleet_backward_dk", grid=(nk, B * H, chunking.pieces),
               inputs=dict(log_decay_ref=(log_decay, s.head()), v_ref=(v, s.keys()), do_ref=(do, s.keys()),
                           q_ref=(q, s.values()), k_ref=(k, s.values()), **inputs),
               outputs=dict(dk_ref=(((B, T, H, K), k.dtype), s.values()), u_ref=per_position,
                            x_ref=per_position if exit_state is not None else None),
               num_warps=num_warps, num_stages=num_stages, skip=skip,
               keep=None if keep is None else dict(dk_ref=keep))
    return out["dk_ref"], _summed(out, "u_ref", per_block), _summed(out, "x_ref")
