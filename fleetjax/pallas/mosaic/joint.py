"""The backward's two reverse walks in one on Hopper, for the gate's gradient: dk and dv from one state.

The dv walk (reverse walk(k, q, dO)) carries H = sum over later positions of the decayed q_t dO_t^T [K, V];
the dk walk (reverse walk(v, dO, q)) carries its transpose. One program of two compute warpgroups walks both:
warpgroup g holds H's value columns V_g in float32 and, per chunk of C positions,

    scores = k q^T * weights,  pairs = v dO^T * weights            (both [C, C], every key and value column)
    dv[:, V_g] = (k H[:, V_g]) * entering + scores dO[:, V_g]     (H's hi/lo copies: float32-accurate)
    dk[:, K_g] = (v H[K_g, :]^T) * entering + pairs q[:, K_g]     (H's hi copies of both warpgroups)
    H[:, V_g] <- carry H[:, V_g] + q^T (leaving * dO[:, V_g])     (hi/lo parts of the weighted values)

so each reads its key half's rows of the other's hi copy through shared memory, meeting it twice a chunk
(both halves copied; both read). The gate's sums come out beside: u, each position's k . (dk's state part) = v . (dv's
state part), from the accurate dv product (per warpgroup, over its value columns), and the column sums of the
chunk's pairs (k_i . q_j)(v_i . dO_j) weighted, j after i (fleetjax.vjp.spanned_from_sums's second), from the
two score tiles. Against the dv walk beside the gate's dk sums walk (fleetjax.pallas.mosaic.sums) the chunk's
tiles are read once, the state is updated once and its scores once a warpgroup instead of once a value block.

Serves K = V = 128 (:func:`serves`): the weighted values' and the outputs' tiles then share the space of the
state's copies (rows [0, C) and [C, 2C) of each), which nobody reads between the second meeting and the next
chunk's copies; the chunk's q, k, v and dO tiles at two stages take the rest of shared memory.

Off by default (MosaicWalkConfig.joint_reverse, which has its times): meeting twice a chunk, the two
warpgroups run the same phase at the same time, and the walk lost to the two it replaces on an H100.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from fleetjax.chunking import Chunking
from fleetjax.pallas.mosaic.common import (Carry, Walker, f32, interpreter_copies, launch, meet,
                                           mma_tiles, warp_specialized)
from fleetjax.pallas.mosaic.config import MosaicWalkConfig

# The rendezvous of the two compute warpgroups: the entering state read, the final state's tiles free, this
# chunk's copies of H written, and read.
_ENTERED, _FINAL, _COPIED, _READ = range(4)


def serves(config: MosaicWalkConfig | None, *, K: int, V: int) -> bool:
    """Whether :func:`joint_walk` serves these dims: K = V = 2 C (each warpgroup a half of 64 columns, whose
    copies of H hold the weighted values' and the outputs' tiles), ``config.joint_reverse`` set."""
    return config is not None and config.joint_reverse and K == V == 2 * config.chunk_size


def joint_walk(q, k, v, do, entering, chunking: Chunking, *, scale: float, config: MosaicWalkConfig, within,
               witness: bool = True, name: str = "dkv_walk", interpret=None):
    """(dk [B, T, H, K], dv [B, T, H, V] in dO's dtype, H after each piece [B, H, P, K, V] float32, sums): the
    gated reverse walks of dk and dv from one state (the module's docstring), from the states entering the
    pieces ``entering`` [B, H, P, K, V] float32 (the dv walk's orientation; None: zero). ``within`` [B, H, T]
    float32: the log decay summed within each chunk, in base 2 (fleetjax.decay.Decays.within_chunks). sums["state"]
    [2, B, H, T] float32: each warpgroup's part of u (summed over the two, fleetjax.vjp.log_gate_grad's u);
    sums["before"] [1, B, H, T]: per position i the sum over the chunk's positions j from i on of
    scale (k_i . q_j)(v_i . dO_j) decayed (its own pair too, as the dq sums walk's row sums hold it).
    ``witness``: H's update takes 0 * dv (plain.walk's), so that its state after a piece is finite only if
    every dv of the piece was. Assumes :func:`serves` and fleetjax.pallas.mosaic.serves_backward."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, T, H, K = q.shape
    V = do.shape[-1]
    half = V // 2
    C, P = config.chunk_size, chunking.pieces
    n = chunking.piece_len // C
    dtype = do.dtype
    tiles = mma_tiles(dtype, half)
    config = dataclasses.replace(config, block_v=half)

    def program(*, q_gmem, k_gmem, v_gmem, do_gmem, within_gmem, dk_gmem, dv_gmem, final_gmem, state_sums_gmem,
                before_sums_gmem, copy_smem, copy_lo_smem, sums_smem, f32_smem, barrier, rendezvous,
                start_gmem=None, keys_t_smem=None, block_t_smem=None, register_smem=None):
        """One program's walk, its refs by name: ``*_gmem`` the inputs and outputs, ``*_smem`` scratch, each
        warpgroup its own slice of the scratch with a leading warpgroup axis but for H's copies, which both
        read."""
        group = lax.axis_index("wg")
        own_f32, own_sums, own_barrier = f32_smem.at[group], sums_smem.at[group], barrier.at[group]
        if interpret is not None:
            keys_t_smem, block_t_smem, register_smem = (ref.at[group] for ref in (keys_t_smem, block_t_smem,
                                                                                  register_smem))
        w = Walker(config, key_dim=K, dtype=dtype, reverse=True, scale=scale, interpret=interpret,
                   keys_t=keys_t_smem, block_t=block_t_smem, register=register_smem)
        own = pl.ds(group * half, half)  # this warpgroup's columns of V (of H and dv) and of K (of dk)
        hi, lo = copy_smem.at[group], copy_lo_smem.at[group]
        # Between the second meeting and the next chunk's copies nobody reads H's copies: rows [0, C) of each
        # take the weighted values' hi and lo parts, rows [C, 2C) dv's and dk's tiles for their copies out.
        weighted_tiles = dict(weighted=hi.at[pl.ds(0, C)], weighted_lo=lo.at[pl.ds(0, C)])
        dv_smem, dk_smem = hi.at[pl.ds(C, C)], lo.at[pl.ds(C, C)]
        bh, piece = lax.axis_index("bh"), lax.axis_index("piece")
        b, h = bh // H, bh % H
        first = piece * n
        at = lambda c: first + n - 1 - c  # noqa: E731  (in reverse)

        def chunk(indices, q_smem, k_smem, v_smem, do_smem, within_smem, carried):
            (c,) = indices
            carried, g = w.lazy_out(carried)
            state = carried
            rows = pl.ds(at(c) * C, C)
            # The last chunk's copies out have read rows [C, 2C) of H's copies before they take the new ones.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            hi[...], lo[...] = w.parts_of(scale * state if w.scale_state else state, dtype, 2)
            plgpu.commit_smem()
            # Two rounds of products, each of two accumulators beside the float32 state (four at once spilled
            # 688 bytes in sm_90 SASS): the chunk's scores first, while the other warpgroup copies its half.
            got = w.products(dict(scores=((C, C), [(k_smem, lambda: w.k_t(q_smem))]),
                                  pairs=((C, C), [(v_smem, lambda: w.k_t(do_smem))])))
            # The factors after the scores: formed beside them, they spilled (the weights and the lags live
            # with both accumulators and the state).
            lag = w.steps()[0]
            weights, entering_rows, leaving_rows, carry = w.factors(within_smem, lag)
            step = Carry(carry, g)
            entering_rows, leaving_rows = (w.rows(x) for x in step.rows(entering_rows, leaving_rows))
            pairs = got["pairs"] * weights
            # lag 0 too, as in the dq sums walk's row sums (fleetjax.pallas.mosaic.sums_walk's ``before``)
            before = jnp.sum(got["scores"] * pairs, axis=1)
            scores, pairs = (got["scores"] * weights).astype(dtype), pairs.astype(dtype)
            meet(rendezvous.at[_COPIED])

            def dk_inter(other):  # v's columns V_other times H[K_g, V_other]^T, from that warpgroup's hi copy
                return (v_smem.at[:, pl.ds(other * half, half)],
                        lambda: w.k_t(copy_smem.at[other].at[own]))

            got = w.products(dict(dv=((C, half), [(k_smem, hi), (k_smem, lo)]),
                                  dk=((C, half), [dk_inter(0), dk_inter(1)])))
            meet(rendezvous.at[_READ])
            dv_inter = got["dv"] * entering_rows
            own_sums.at[0][...] = jnp.sum(dv_inter * v_smem.at[:, own][...].astype(f32), axis=1)

            @pl.when(group == 0)
            def _():
                own_sums.at[1][...] = before

            dv, dk = w.accumulate(
                (dv_inter, lambda acc: plgpu.wgmma(acc, w.from_registers(scores), do_smem.at[:, own])),
                (got["dk"] * entering_rows, lambda acc: plgpu.wgmma(acc, w.from_registers(pairs), q_smem.at[:, own])))
            dv_smem[...], dk_smem[...] = dv.astype(dtype), dk.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dv_smem, dv_gmem.at[b, rows, h, own])
            plgpu.copy_smem_to_gmem(dk_smem, dk_gmem.at[b, rows, h, own])
            plgpu.copy_smem_to_gmem(own_sums.at[0], state_sums_gmem.at[group, b, h, rows])

            @pl.when(group == 0)
            def _():
                plgpu.copy_smem_to_gmem(own_sums.at[1], before_sums_gmem.at[0, b, h, rows])

            weighted = do_smem.at[:, own][...].astype(f32) * leaving_rows
            weighted = weighted + 0.0 * dv if witness else weighted
            return w.exact_update(step, q_smem, weighted, state, tiles=dict(weighted_tiles))

        rows_k = plgpu.BlockSpec((C, K), lambda c: (at(c), 0), transforms=tiles)
        rows_v = plgpu.BlockSpec((C, V), lambda c: (at(c), 0), transforms=tiles)
        loads = dict(q=(rows_k, q_gmem.at[b, :, h]), k=(rows_k, k_gmem.at[b, :, h]), v=(rows_v, v_gmem.at[b, :, h]),
                     do=(rows_v, do_gmem.at[b, :, h]),
                     within=(plgpu.BlockSpec((C,), lambda c: (at(c),)), within_gmem.at[b, h]))
        state_at = (b, h, piece, slice(None), own)

        def compute(body):
            entering_state = w.entered(start_gmem, state_at, own_barrier, own_f32)
            meet(rendezvous.at[_ENTERED])  # the float32 tiles overlap H's copies
            state, g = w.lazy_out(body(w.lazy_in(entering_state)))
            state = state if g is None else state * g
            w.store_met(state, own_f32, final_gmem, state_at, rendezvous.at[_FINAL])

        warp_specialized(chunk, n, loads, compute, stages=config.sums_stages, compute_wgs=2)

    scratch = dict(copy_smem=plgpu.SMEM((2, K, half), dtype, transforms=tiles),
                   copy_lo_smem=plgpu.SMEM((2, K, half), dtype, transforms=tiles),
                   sums_smem=plgpu.SMEM((2, 2, C), f32),
                   f32_smem=plgpu.SMEM((2, K, half), f32, transforms=mma_tiles(f32, half)),
                   barrier=plgpu.Barrier(num_barriers=2),
                   rendezvous=plgpu.Barrier(num_arrivals=2, num_barriers=4))
    if interpret is not None:
        scratch.update(interpreter_copies(config, K, dtype, (2,), blocks_per_group=True))
    inputs = dict(q_gmem=q, k_gmem=k, v_gmem=v, do_gmem=do, within_gmem=within.astype(f32), start_gmem=entering)
    outputs = dict(dk_gmem=jax.ShapeDtypeStruct((B, T, H, K), dtype), dv_gmem=jax.ShapeDtypeStruct((B, T, H, V), dtype),
                   final_gmem=jax.ShapeDtypeStruct((B, H, P, K, V), f32),
                   state_sums_gmem=jax.ShapeDtypeStruct((2, B, H, T), f32),
                   before_sums_gmem=jax.ShapeDtypeStruct((1, B, H, T), f32))
    # On the GPU the float32 tiles of the entering and final states share their space with H's copies.
    shared = ("copy_smem", "copy_lo_smem") if interpret is None else ()
    dk, dv, finals, state_sums, before_sums = launch(
        program, name=name, inputs=inputs, outputs=outputs, scratch=scratch, grid=(1, B * H, P), interpret=interpret,
        threads=3, shared=shared, no_auto_barriers=not config.keeps_auto_barriers(True), approx_math=config.approx_exp)
    return dk, dv, finals, dict(state=state_sums, before=before_sums)
