"""The walks that also form the decay's gradient sums on Hopper: the dq walk(dO, v, k) with rows q, and for
the gate's gradient the dk reverse walk(v, dO, q) with rows k. As the plain walk (fleetjax.pallas.mosaic.plain)
on one warpgroup, with the state's products float32-accurate: hi/lo pairs of 16-bit parts (fleetjax.chunk.
split) for the state's copies and the weighted values. For d log gamma the dq walk carries the state's
derivative in log gamma (fleetjax.vjp's tangent D) as a second state beside S, entering each sequence piece
as the state does (fleetjax.pallas.mosaic.states.entering_tangents); for the gate's gradient both walks also
sum each position's pairs with the chunk's earlier positions (in the walk's order).

A walk may run as one program of two compute warpgroups for two value blocks (MosaicWalkConfig's
gate_dq_warpgroups for the dq walk forming the gate's sums, sums_warpgroups for the one forming the decay's
alone, gate_dk_warpgroups for the gate's dk walk, the one walk in reverse), as the plain walk's two-warpgroup
form does: they share the chunk's query and key tiles (the dq walk's dO and v, the dk walk's v and dO), which
a third warpgroup copies in, and each copies out its own out and sums through rings of two tiles; its float32
tiles for the entering and final states share their space with the state's copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fleetjax.chunking import Chunking
from fleetjax.pallas.mosaic.common import (Carry, Walker, f32, interpreter_copies, launch,
                                           lowers_concatenate, meet, mma_tiles, pipeline, warp_specialized)
from fleetjax.pallas.mosaic.config import MosaicWalkConfig


def sums_walk(query, key, value, log_decay, entering, chunking: Chunking, *, reverse: bool, scale: float,
              config: MosaicWalkConfig, rows, tangent: bool = False, entering_tangents=None, within=None,
              before: bool = False, witness: bool = True, name: str = "sums_walk", interpret=None):
    """(out [B, T, H, Dv] in value's dtype, the state after each piece [B, H, P, Dk, Dv] float32, sums): the
    walk of fleetjax.pallas.mosaic.plain (its arguments; one or two warpgroups, see the module's docstring)
    with ``rows`` [B, T, H, Dv] (q in the dq walk, k in the dk walk): sums["state"] [Dv blocks, B, H, T] holds
    each position's rows . (the state's part of out) (fleetjax.vjp's w, u).

    With ``tangent`` (the dq walk) also the state's derivative in log gamma D (fleetjax.chunk.update_tangent)
    as a second state, entering the pieces as ``entering_tangents`` [B, H, P, Dk, Dv] float32 (None: zero), and
    sums["decay"] in place of sums["state"] (which ``before`` keeps for the gate): each position's summand of
    d log gamma (fleetjax.vjp.log_decay_summand), (i + 1) w + tangent (rows . (out's part from D)) + intra (the
    lag-weighted pairs in the chunk); all per value block (their sum over blocks is the position's).

    With ``before`` (the gated decay) also sums["before"]: per position i the sum over the chunk's positions j
    up to i in the walk's order of the pairs scale (rows_i . value_j)(query_i . key_j) decayed, in float32
    from the products' accumulators: in the dq walk each query's pairs with earlier keys, in the dk walk
    (reverse) each key's pairs with later queries, each with its own pair (lag 0) too, the row and column
    sums of the chunk's pairs whose difference's prefix sum is the intra-chunk part of d log_gate
    (fleetjax.vjp.spanned_from_sums): a position's own pair is in both and cancels there.

    ``witness``: as plain.walk's (False for the dk walk: 1232 -> 1216 instructions a chunk, the gate's)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, T, H, K = key.shape
    V = value.shape[-1]
    C, bv, P = config.chunk_size, config.block_v, chunking.pieces
    n = chunking.piece_len // C
    nv = V // bv
    dtype = value.dtype
    tiles = mma_tiles(dtype, bv)
    gated = within is not None
    if before and not gated:
        raise ValueError("before= needs the gated decay")
    if tangent and reverse:
        raise ValueError("tangent= needs the forward direction (the dq walk)")
    # With the tangent only the gate's gradient reads w alone; the decay's reads its summand ("decay").
    sums = (["state"] if before or not tangent else []) + ["decay"] * tangent + ["before"] * before
    # With the tangent, the state's and its derivative's updates are one product (key^T with the weighted and
    # lagged values side by side) where this jax's Mosaic GPU lowers a concatenate of register arrays.
    joint_update = tangent and lowers_concatenate()
    # Two compute warpgroups a program, each on its own value block, sharing the chunk's query and key tiles.
    wanted = (config.gate_dk_warpgroups if reverse else config.gate_dq_warpgroups if before
              else config.sums_warpgroups)
    wide = wanted > 1 and nv % 2 == 0
    wgs = 2 if wide else 1

    def program(*, log_decay_gmem, q_gmem, k_gmem, v_gmem, rows_gmem, o_gmem, final_gmem, barrier,
                within_gmem=None, start_gmem=None, tangent_start_gmem=None, state_sums_gmem=None,
                decay_sums_gmem=None, before_sums_gmem=None, parts_smem=None, weighted_smem=None,
                weighted_lo_smem=None, paired_smem=None, paired_lo_smem=None, lagged_smem=None,
                lagged_lo_smem=None, moved_smem=None, moved_lo_smem=None, keys_t_smem=None, block_t_smem=None,
                register_smem=None, out_smem=None, ring_smem=None, f32_smem=None, rendezvous=None):
        """One program's walk, its refs by name: inputs and outputs ``*_gmem``, scratch ``*_smem`` and
        ``barrier``; None where the call has no such ref. Two warpgroups (``wide``): each takes its own slice
        of the scratch that has a leading warpgroup axis, and its out and sums go through its own rings."""
        group = lax.axis_index("wg") if wide else 0  # this program's warpgroup
        if wide:
            paired_smem, paired_lo_smem, moved_smem, moved_lo_smem, weighted_smem, weighted_lo_smem, lagged_smem, \
                lagged_lo_smem, parts_smem, out_smem, ring_smem, f32_smem, barrier = (
                    None if ref is None else ref.at[group]
                    for ref in (paired_smem, paired_lo_smem, moved_smem, moved_lo_smem, weighted_smem,
                                weighted_lo_smem, lagged_smem, lagged_lo_smem, parts_smem, out_smem,
                                ring_smem, f32_smem, barrier))
            if interpret is not None:
                keys_t_smem, block_t_smem, register_smem = (
                    ref.at[group] for ref in (keys_t_smem, block_t_smem, register_smem))
        if tangent:  # the state's copies, then its derivative's, side by side (see ``paired_smem`` below)
            state_smem, tangent_smem = (paired_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
            state_lo_smem, tangent_lo_smem = (paired_lo_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
        else:  # the state's hi copy, then its lo copy, side by side (see ``parts_smem`` below)
            state_smem, state_lo_smem = (parts_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
        sums_gmem = dict(state=state_sums_gmem, decay=decay_sums_gmem, before=before_sums_gmem)
        w = Walker(config, key_dim=K, dtype=dtype, reverse=reverse, scale=scale, interpret=interpret,
                   keys_t=keys_t_smem, block_t=block_t_smem, register=register_smem)
        # With the joint update, the weighted values, then the lagged ones, side by side (``moved_smem`` below).
        update_tiles = w.update_tiles(weighted=weighted_smem, weighted_lo=weighted_lo_smem, lagged=lagged_smem,
                                      lagged_lo=lagged_lo_smem, moved=moved_smem, moved_lo=moved_lo_smem)
        j, bh, piece = lax.axis_index("v"), lax.axis_index("bh"), lax.axis_index("piece")
        b, h = bh // H, bh % H

        def statics():
            """The chunks' constant values: (lag, lags, leaving lags, the constant decay's factors or None). Two
            warpgroups form them in the compute context and carry them (the copying warpgroup keeps few
            registers); one forms them here, once."""
            lag, lags, leave_lag = w.steps()
            return lag, lags, leave_lag, (None if gated else w.constant_factors(log_decay_gmem[h], lag, lags))

        program_statics = None if wide else statics()

        def chunk(indices, *smems):
            *staged_tiles, carried = smems
            carried, g = w.lazy_out(carried)
            tile = dict(zip(staged, staged_tiles))  # the chunk's tiles by name (``staged`` below)
            q_smem, k_smem, v_smem, x_smem = tile["q"], tile["k"], tile["v"], tile["rows"]
            if wide:  # the carried statics
                carried, held_statics = carried
            lag, lags, leave_lag, constant = held_statics if wide else program_statics
            if wide:
                v_smem, x_smem = (ref.at[:, pl.ds(group * bv, bv)] for ref in (v_smem, x_smem))
                (c,) = indices
                slot = c % 2
                # The copies out of two chunks ago (this slot's) have read it; the last chunk's may still run.
                plgpu.wait_smem_to_gmem(1 + len(sums), wait_read_only=True)
                tile["o"] = out_smem.at[slot]
                sum_smem = {name: ring_smem.at[i, slot] for i, name in enumerate(sums)}
            else:
                sum_smem = {name: tile[f"{name}_sums"] for name in sums}
            state, derivative = carried if tangent else (carried, None)
            weights, entering_rows, leaving_rows, carry = (w.factors(tile["within"], lag) if gated else constant)
            step = Carry(carry, g)
            entering_at_rows, leaving_rows = step.rows(entering_rows, leaving_rows)  # the [C] values
            entering_rows, leaving_rows = w.rows(entering_at_rows), w.rows(leaving_rows)

            state_smem[...], state_lo_smem[...] = w.parts_of(scale * state if w.scale_state else state, dtype, 2)
            if tangent:
                tangent_smem[...], tangent_lo_smem[...] = w.parts_of(scale * derivative if w.scale_state
                                                                     else derivative, dtype, 2)
            plgpu.commit_smem()

            # The products that read only the chunk's tiles and the states' copies go out together, inter as
            # one product of twice the columns: with the tangent inter (query S) beside through (query D), else
            # query S_hi beside query S_lo, whose halves add up.
            held = [paired_smem, paired_lo_smem] if tangent else [parts_smem]
            jobs = dict(scores=((C, C), [(q_smem, lambda: w.k_t(k_smem))]),
                        inter=((C, 2 * bv), [(q_smem, copy) for copy in held]))
            if tangent or before:  # the pairs (rows_i . value_j) (query_i . key_j), decayed below
                jobs["pairs"] = ((C, C), [(x_smem, lambda: w.k_t(v_smem))])
            got = w.products(jobs)
            if tangent:
                got["inter"], got["through"] = got["inter"][:, :bv], got["inter"][:, bv:]
            else:
                got["inter"] = got["inter"][:, :bv] + got["inter"][:, bv:]
            scores = got["scores"] * weights
            inter = got["inter"] * entering_rows
            if tangent or before:
                pairs = got["pairs"] * scores
            if tangent:
                intra_rows = jnp.sum(lags * pairs, axis=1)
            if before:  # lag 0 too: the dq walk's row sums and the dk walk's column sums both hold it and it
                # cancels in their difference, where leaving it out took a select of every pair (sm_90 SASS,
                # experiments/sass.py: 1208 -> 1143 instructions a chunk, spills 68 -> 24 bytes).
                sum_smem["before"][...] = jnp.sum(pairs, axis=1)

            o = w.out(inter, scores, v_smem)
            tile["o"][...] = o.astype(dtype)
            x = x_smem[...].astype(f32)
            w_rows = jnp.sum(inter * x, axis=1)
            if "state" in sums:
                sum_smem["state"][...] = w_rows
            if tangent:  # d log gamma's summand (fleetjax.vjp.log_decay_summand): (i + 1) w + tangent + intra
                # i + 1 on the rows' [C] values (two a thread), not as a [C, block_v] tile live in the loop.
                steps_in = w.iota((C,), 0, w.wg.reduce(1)) + 1
                tangent_rows = entering_at_rows * jnp.sum(got["through"] * x, axis=1)
                sum_smem["decay"][...] = steps_in.astype(f32) * w_rows + tangent_rows + intra_rows
            # out's value keeps the weighted values from being formed before it (the witness, plain.walk's).
            weighted = v_smem[...].astype(f32) * leaving_rows
            weighted = weighted + 0.0 * o if witness else weighted
            out = w.exact_update(step, k_smem, weighted, state, derivative, leave_lag=leave_lag,
                                 tiles=update_tiles, joint=joint_update)
            if not wide:
                return out
            # exact_update's commit_smem follows the writes of out and the sums: copy them out now.
            plgpu.copy_smem_to_gmem(tile["o"], o_gmem.at[b, pl.ds(at(c) * C, C), h, columns])
            for name in sums:
                plgpu.copy_smem_to_gmem(sum_smem[name], sums_gmem[name].at[j * wgs + group, b, h,
                                                                           pl.ds(at(c) * C, C)])
            core, g_next = w.lazy_out(out)
            return (core, held_statics) if g_next is None else ((core, held_statics), g_next)

        columns = pl.ds((j * wgs + group) * bv, bv) if wide else pl.ds(j * bv, bv)
        first = piece * n
        at = (lambda c: first + n - 1 - c) if reverse else (lambda c: first + c)  # noqa: E731
        rows_k = plgpu.BlockSpec((C, K), lambda c: (at(c), 0), transforms=tiles)
        rows_v = plgpu.BlockSpec((C, wgs * bv), lambda c: (at(c), j), transforms=tiles)
        positions = plgpu.BlockSpec((C,), lambda c: (at(c),))
        # Each chunk's tiles, name -> (spec, this program's slice of the array): inputs, then outputs.
        loads = dict(q=(rows_k, q_gmem.at[b, :, h]), k=(rows_k, k_gmem.at[b, :, h]), v=(rows_v, v_gmem.at[b, :, h]),
                     rows=(rows_v, rows_gmem.at[b, :, h]))
        if gated:
            loads["within"] = (positions, within_gmem.at[b, h])
        state_at = (b, h, piece, slice(None), columns)
        if wide:  # out and the sums go through each warpgroup's own rings
            staged = [*loads]

            def compute(body):
                entering = w.entered(start_gmem, state_at, barrier, f32_smem)
                if tangent:
                    entering = (entering, w.entered(tangent_start_gmem, state_at, barrier, f32_smem))
                meet(rendezvous.at[0])  # the float32 tiles overlap the other warpgroup's scratch
                (core, _), g = w.lazy_out(body(w.lazy_in((entering, statics()))))
                state = core[0] if tangent else core
                state = state if g is None else state * g
                w.store_met(state, f32_smem, final_gmem, state_at, rendezvous.at[1])

            warp_specialized(chunk, n, loads, compute, stages=config.stages, compute_wgs=wgs)
            return
        state = w.entered(start_gmem, state_at, barrier)
        init = (state, w.entered(tangent_start_gmem, state_at, barrier)) if tangent else state
        init = w.lazy_in(init)
        stores = dict(o=(rows_v, o_gmem.at[b, :, h]))
        stores.update({f"{name}_sums": (positions, sums_gmem[name].at[j, b, h]) for name in sums})
        staged = [*loads, *stores]
        state = pipeline(chunk, n, [spec for spec, _ in loads.values()], [spec for spec, _ in stores.values()],
                         [gmem for _, gmem in (*loads.values(), *stores.values())], init,
                         stages=config.stages, dtype=dtype, interpret=interpret)
        state, g = w.lazy_out(state)
        state = state[0] if tangent else state
        state = state if g is None else state * g
        pl.run_scoped(lambda tile: w.store(state, tile, final_gmem, state_at), w.state_tile())

    per_group = (wgs,) if wide else ()  # two warpgroups: each its own tiles
    tile_of = lambda rows, columns=bv: plgpu.SMEM((*per_group, rows, columns), dtype, transforms=tiles)  # noqa: E731
    scratch = {} if joint_update else dict(weighted_smem=tile_of(C))
    if not tangent:  # the state's hi and lo copies in one tile, columns [0, bv) and [bv, 2 bv), so that
        # query S_hi + query S_lo is one wgmma product of 2 bv columns whose halves add up: half the wgmmas of
        # the gate's sums walks' inter (sm_90 SASS, experiments/sass.py --gate-only --T 4096, jax 0.11.2: the
        # dq walk 1143 -> 1114 instructions a chunk, the dk walk 1127 -> 1097, HGMMA 46 -> 38, where each
        # wgmma takes about six instructions to form its operands' descriptors)
        scratch["parts_smem"] = tile_of(K, 2 * bv)
    if not joint_update:
        scratch["weighted_lo_smem"] = tile_of(C)
    if tangent:  # the state's and its derivative's hi (lo) copies in one tile: columns [0, bv) and [bv, 2 bv)
        # (whole tiles of the swizzle), so that query S and query D are one wgmma product of 2 bv columns:
        # half the wgmmas and reads of the query tile (dq sums walk, sm_90 SASS counted on the CPU by
        # experiments/sass.py: 1691 -> 1564 instructions a chunk, spills 452 -> 336 bytes; bitwise the same
        # gradients in the interpreter).
        scratch.update(paired_smem=tile_of(K, 2 * bv), paired_lo_smem=tile_of(K, 2 * bv))
    if joint_update:  # likewise the weighted and lagged values' hi (lo) parts, for one update of S and D:
        # 1564 -> 1454 instructions, HGMMA 62 -> 46, spills 336 -> 288 bytes (same count, jax 0.11.2)
        scratch.update(moved_smem=tile_of(C, 2 * bv), moved_lo_smem=tile_of(C, 2 * bv))
    elif tangent:
        scratch.update(lagged_smem=tile_of(C), lagged_lo_smem=tile_of(C))
    if wide:
        scratch.update(out_smem=plgpu.SMEM((wgs, 2, C, bv), dtype, transforms=tiles),
                       ring_smem=plgpu.SMEM((wgs, len(sums), 2, C), f32),
                       f32_smem=plgpu.SMEM((wgs, K, bv), f32, transforms=mma_tiles(f32, bv)))
        scratch["barrier"] = plgpu.Barrier(num_barriers=wgs)
        scratch["rendezvous"] = plgpu.Barrier(num_arrivals=wgs, num_barriers=2)
    else:
        scratch["barrier"] = plgpu.Barrier()
    if interpret is not None:
        scratch.update(interpreter_copies(config, K, dtype, per_group))
    inputs = dict(log_decay_gmem=log_decay.astype(f32), q_gmem=query, k_gmem=key, v_gmem=value, rows_gmem=rows,
                  within_gmem=None if within is None else within.astype(f32), start_gmem=entering,
                  tangent_start_gmem=entering_tangents)
    outputs = dict(o_gmem=jax.ShapeDtypeStruct((B, T, H, V), dtype),
                   final_gmem=jax.ShapeDtypeStruct((B, H, P, K, V), f32),
                   **{f"{name}_sums_gmem": jax.ShapeDtypeStruct((nv, B, H, T), f32) for name in sums})
    # On the GPU two warpgroups' float32 tiles share their space with the state's copies, used only inside the
    # pipeline.
    copies = ("paired_smem", "paired_lo_smem") if tangent else ("parts_smem",)
    shared = copies if wide and interpret is None else ()
    out, finals, *formed = launch(program, name=name, inputs=inputs, outputs=outputs, scratch=scratch,
                                  grid=(nv // wgs, B * H, P), interpret=interpret, threads=wgs + 1 if wide else 1,
                                  shared=shared, no_auto_barriers=not config.keeps_auto_barriers(wide),
                                  approx_math=config.approx_exp and gated)
    return out, finals, dict(zip(sums, formed))
