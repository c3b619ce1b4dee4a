"""The plain walk on Hopper: the forward walk(q, k, v), and the backward's dv = reverse walk(k, q, dO), dk =
reverse walk(v, dO, q) and, where no sums are formed, dq = walk(dO, v, k). Per chunk of C positions, with the
state S entering it:

    scores = query key^T                  (wgmma, key transposed in shared memory)
    out    = (query S) * entering + (scores * weights) value
    S     <- carry * S + key^T (leaving * value + 0 * out)

The 0 * out term changes no bit of a finite state and makes it NaN otherwise: a finite state after the piece
says every output of the piece was finite (the caller's witness, fleetjax.nonfinite; its first row is enough,
:func:`witness_of`); a walk whose states after the pieces nobody reads leaves it out (``witness=False``). The
state enters the products rounded to the inputs' dtype, as in the Triton walks' plain form.

Each (value block, batch*head, sequence piece) is one program of one warpgroup, or (``MosaicWalkConfig.
warpgroups``) two value blocks are one program of two compute warpgroups that share the chunk's query and key
tiles, a third warpgroup issuing the copies.
"""

from __future__ import annotations

import jax
from jax import lax

from fleetjax.chunking import Chunking
from fleetjax.pallas.mosaic.common import (Carry, Walker, entering_at, f32, interpreter_copies, launch, meet,
                                           mma_tiles, pipeline, warp_specialized)
from fleetjax.pallas.mosaic.config import MosaicWalkConfig


def witness_of(finals: jax.Array) -> jax.Array:
    """The caller's witness (fleetjax.nonfinite) from a witnessing walk's states after its pieces
    [..., Dk, Dv]: their first rows [..., Dv], a Dk-th of their bytes for the reduction that reads them.

    Every non-finite input reaches a whole column of S, every row of it: a non-finite out_t (a query, key or
    the gate at t, which reach it through the pair (t, t), or an entering state's column) enters row t of
    the update's values through 0 * out_t, and key^T times those values puts it in every row, key_t's zero
    entries included (0 * NaN is NaN in the tensor cores too: tests/test_mosaic.py checks it on Hopper); a
    non-finite value column does the same through the values themselves. No decay, however small, clears a
    NaN, and no select drops one (the walks take no segments)."""
    return finals[..., 0, :]


def walk(query, key, value, log_decay, entering, chunking: Chunking, *, reverse: bool, scale: float,
         config: MosaicWalkConfig, within=None, witness: bool = True, name: str = "walk", interpret=None):
    """(out [B, T, H, Dv] in value's dtype, the state after each piece [B, H, P, Dk, Dv] float32): the plain
    walk of fleetjax.chunk with these roles, forward or ``reverse`` in time, from the states entering the
    pieces ``entering`` [B, H, P, Dk, Dv] float32 (None: zero; reverse: the state from the positions after the
    piece), or [B, H, P-1, Dk, Dv], the first piece in the walk's order entering from zero
    (fleetjax.pallas.mosaic.entering_states with ``zero_first``). query, key [B, T, H, Dk]; value
    [B, T, H, Dv]; log_decay [H] float32. Assumes fleetjax.pallas.mosaic.supports. The forward is
    walk(q, k, v); the backward's plain walks are walk(dO, v, k) (dq), reverse walk(k, q, dO) (dv) and reverse
    walk(v, dO, q) (dk).

    ``within`` [B, H, T] float32 (the gated decay): the log decay summed from each position's chunk start through
    it, in base 2 (fleetjax.decay.Decays.within_chunks with ``base2``); the walk's factors are then 2 to the power
    of its differences within a chunk (only differences <= 0), and log_decay is not read. ``witness``: the state's
    update takes 0 * out, so that a state after a piece is finite only if every out of the piece was; False where
    nobody reads those states (the backward's dk walk: 32 instructions fewer a chunk in sm_90 SASS, 639 -> 607,
    experiments/sass.py, jax 0.11.2). ``name``: the kernel's, in profiles. ``interpret``: Mosaic GPU's
    interpret-mode parameters (CPU tests)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, T, H, K = key.shape
    V = value.shape[-1]
    C, bv, P = config.chunk_size, config.block_v, chunking.pieces
    n = chunking.piece_len // C
    dtype = value.dtype
    # Two compute warpgroups a program, each on its own value block, sharing the chunk's query and key tiles.
    wide = config.warpgroups > 1 and V % (config.warpgroups * bv) == 0
    wgs = config.warpgroups if wide else 1
    # One swizzle for every tile: a wgmma's operands must share it (the value block's row sets it).
    tiles = mma_tiles(dtype, bv)
    gated = within is not None

    def program(*, log_decay_gmem, q_gmem, k_gmem, v_gmem, o_gmem, final_gmem, state_smem, weighted_smem,
                barrier, within_gmem=None, start_gmem=None, out_smem=None, f32_smem=None, rendezvous=None,
                keys_t_smem=None, block_t_smem=None, register_smem=None):
        """One program's walk, its refs by name: inputs and outputs ``*_gmem``, scratch ``*_smem`` and the
        barriers; None where the call has no such ref. Two warpgroups (``wide``): each takes its own slice of
        the scratch that has a leading warpgroup axis."""
        group = lax.axis_index("wg") if wide else 0  # this program's warpgroup
        if wide:
            state_smem, weighted_smem, out_smem, f32_smem, barrier = (
                ref.at[group] for ref in (state_smem, weighted_smem, out_smem, f32_smem, barrier))
            if interpret is not None:
                keys_t_smem, block_t_smem, register_smem = (
                    ref.at[group] for ref in (keys_t_smem, block_t_smem, register_smem))
        w = Walker(config, key_dim=K, dtype=dtype, reverse=reverse, scale=scale, interpret=interpret,
                   keys_t=keys_t_smem, block_t=block_t_smem, register=register_smem)

        j, bh, piece = lax.axis_index("v"), lax.axis_index("bh"), lax.axis_index("piece")
        b, h = bh // H, bh % H
        # Two warpgroups form their registers' values in the compute context (the copying warpgroup keeps few
        # registers) and carry the constant factors; one forms them here, once.
        if not wide:
            lag, lags = w.steps()[:2]
            constant = None if gated else w.constant_factors(log_decay_gmem[h], lag, lags)

        def chunk(indices, *smems):
            *staged_tiles, carried = smems
            carried, g = w.lazy_out(carried)
            tile = dict(zip(staged, staged_tiles))  # the chunk's tiles by name (``staged`` below)
            q_smem, k_smem, v_smem, within_smem = tile["q"], tile["k"], tile["v"], tile.get("within")
            if wide:
                state, chunk_constant = carried
                v_smem = v_smem.at[:, pl.ds(group * bv, bv)]
                chunk_lag = w.steps()[0] if gated else None
            else:
                state = carried
                chunk_constant, chunk_lag = constant, lag if gated else None
            # One warpgroup a program has the registers for the causal mask's bias (Walker.factors).
            weights, entering_rows, leaving_rows, carry = (w.factors(within_smem, chunk_lag, bias=not wide)
                                                           if gated else chunk_constant)
            step = Carry(carry, g)
            entering_rows, leaving_rows = (w.rows(x) for x in step.rows(entering_rows, leaving_rows))

            state_smem[...] = (scale * state if w.scale_state else state).astype(dtype)
            plgpu.commit_smem()
            # The products that read only the chunk's tiles and the state's copy go out together.
            got = w.products(dict(scores=((C, C), [(q_smem, lambda: w.k_t(k_smem))]),
                                  inter=((C, bv), [(q_smem, state_smem)])))
            scores = got["scores"] * weights
            o = w.out(got["inter"] * entering_rows, scores, v_smem)
            if wide:  # out through a ring of two tiles, each copied out by this warpgroup
                (c,) = indices
                slot = c % 2
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copy of two chunks ago has read it
                out_smem.at[slot][...] = o.astype(dtype)
            else:
                tile["o"][...] = o.astype(dtype)
            weighted = v_smem[...].astype(f32) * leaving_rows
            weighted_smem[...] = (weighted + 0.0 * o if witness else weighted).astype(dtype)
            plgpu.commit_smem()
            if wide:
                plgpu.copy_smem_to_gmem(out_smem.at[slot], o_gmem.at[b, pl.ds(at(c) * C, C), h, columns])
            [state] = w.accumulate((step.start(state), w.update(k_smem, weighted_smem)))
            return step.out(state, chunk_constant) if wide else step.out(state)

        columns = pl.ds((j * wgs + group) * bv, bv)
        first = piece * n
        at = (lambda c: first + n - 1 - c) if reverse else (lambda c: first + c)  # noqa: E731
        rows_k = plgpu.BlockSpec((C, K), lambda c: (at(c), 0), transforms=tiles)
        rows_v = plgpu.BlockSpec((C, wgs * bv), lambda c: (at(c), j), transforms=tiles)
        # Each chunk's tiles, name -> (spec, this program's slice of the array): inputs, then outputs.
        loads = dict(q=(rows_k, q_gmem.at[b, :, h]), k=(rows_k, k_gmem.at[b, :, h]), v=(rows_v, v_gmem.at[b, :, h]))
        if gated:
            loads["within"] = (plgpu.BlockSpec((C,), lambda c: (at(c),)), within_gmem.at[b, h])
        state_at = (b, h, piece, slice(None), columns)
        entering_piece, zero = entering_at(entering, piece, P, reverse)
        enter_at = (b, h, entering_piece, slice(None), columns)
        if wide:  # out goes through each warpgroup's own ring (the pipeline's staged outputs serve one)
            staged = [*loads]

            def compute(body):
                entering_state = w.entered(start_gmem, enter_at, barrier, f32_smem, zero)
                meet(rendezvous.at[0])  # the float32 tiles overlap the other warpgroup's scratch
                if gated:
                    init = (entering_state, ())
                else:
                    lag, lags = w.steps()[:2]
                    init = (entering_state, w.constant_factors(log_decay_gmem[h], lag, lags))
                out = body(w.lazy_in(init))
                (state, _), g = w.lazy_out(out)
                state = state if g is None else state * g
                w.store_met(state, f32_smem, final_gmem, state_at, rendezvous.at[1])

            warp_specialized(chunk, n, loads, compute, stages=config.stages, compute_wgs=wgs)
            return
        state = w.entered(start_gmem, enter_at, barrier, zero=zero)
        stores = dict(o=(rows_v, o_gmem.at[b, :, h]))
        staged = [*loads, *stores]
        state = pipeline(chunk, n, [spec for spec, _ in loads.values()], [spec for spec, _ in stores.values()],
                         [gmem for _, gmem in (*loads.values(), *stores.values())], w.lazy_in(state),
                         stages=config.stages, dtype=dtype, interpret=interpret)
        state, g = w.lazy_out(state)
        state = state if g is None else state * g
        pl.run_scoped(lambda tile: w.store(state, tile, final_gmem, state_at), w.state_tile())

    per_group = (wgs,) if wide else ()  # two warpgroups: each its own tiles
    scratch = dict(weighted_smem=plgpu.SMEM((*per_group, C, bv), dtype, transforms=tiles),
                   state_smem=plgpu.SMEM((*per_group, K, bv), dtype, transforms=tiles))
    if wide:
        scratch.update(out_smem=plgpu.SMEM((wgs, 2, C, bv), dtype, transforms=tiles),
                       f32_smem=plgpu.SMEM((wgs, K, bv), f32, transforms=mma_tiles(f32, bv)))
    scratch["barrier"] = plgpu.Barrier(num_barriers=wgs) if wide else plgpu.Barrier()
    if wide:
        scratch["rendezvous"] = plgpu.Barrier(num_arrivals=wgs, num_barriers=2)
    if interpret is not None:
        scratch.update(interpreter_copies(config, K, dtype, per_group))
    inputs = dict(log_decay_gmem=log_decay.astype(f32), q_gmem=query, k_gmem=key, v_gmem=value,
                  within_gmem=None if within is None else within.astype(f32), start_gmem=entering)
    outputs = dict(o_gmem=jax.ShapeDtypeStruct((B, T, H, V), dtype),
                   final_gmem=jax.ShapeDtypeStruct((B, H, P, K, V), f32))
    # On the GPU two warpgroups' float32 tiles share their space with the tiles used only inside the pipeline.
    shared = ("state_smem", "weighted_smem", "out_smem") if wide and interpret is None else ()
    # See MosaicWalkConfig.auto_barriers for why leaving them out is safe (and wide_auto_barriers).
    return launch(program, name=name, inputs=inputs, outputs=outputs, scratch=scratch,
                  grid=(V // (wgs * bv), B * H, P), interpret=interpret, threads=wgs + 1 if wide else 1,
                  shared=shared, no_auto_barriers=not config.keeps_auto_barriers(wide),
                  approx_math=config.approx_exp and gated)
