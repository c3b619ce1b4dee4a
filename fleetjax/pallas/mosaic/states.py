"""The states of sequence pieces on Hopper: :func:`piece_states`, the walk's states-only kernel (one product a
chunk), and the states entering each piece, passed in XLA from the pieces' local states
(:func:`entering_states`, and :func:`entering_tangents` for the dq walk's second state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.pallas.mosaic.common import (Carry, Walker, f32, interpreter_copies, launch,
                                           lowers_concatenate, mma_tiles, pipeline)
from fleetjax.pallas.mosaic.config import MosaicWalkConfig
from fleetjax.state_passing import pass_states

# The name of the states-only walk's kernel, which profiles and lowered programs show.
STATES_KERNEL = "piece_states"


def piece_states(key, value, log_decay, chunking: Chunking, *, reverse: bool, config: MosaicWalkConfig,
                 within=None, exact: bool = False, tangent: bool = False, interpret=None):
    """The local states [B, H, P-1, K, V] float32 of the pieces that have a successor in the walk (forward:
    0..P-2; reverse: 1..P-1), each walked from zero with keys ``key`` [B, T, H, K] and values ``value``
    [B, T, H, V], on one warpgroup: per chunk S <- carry * S + key^T (leaving * value), the value block rounded
    to the inputs' dtype as in the plain walks (fleetjax.pallas.mosaic.plain), which :func:`entering_states`
    passes on. log_decay [H] float32; ``within``: the gated decay (see fleetjax.pallas.mosaic.plain).

    ``exact``: the products float32-accurate instead (hi/lo parts of the leaving values, as the walks that
    form sums update their state: fleetjax.pallas.mosaic.sums), for the dq walk with the decay's sums, whose
    pieces enter with them. ``tangent`` (forward, with ``exact``): (the states, their derivatives in log gamma
    [B, H, P-1, K, V] float32, fleetjax.chunk.update_tangent), which :func:`entering_tangents` passes on."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    config = config.states(value.shape[-1])
    B, T, H, K = key.shape
    V = value.shape[-1]
    C, bv, P = config.chunk_size, config.block_v, chunking.pieces
    n = chunking.piece_len // C
    dtype = value.dtype
    tiles = mma_tiles(dtype, bv)
    gated = within is not None
    if tangent and (reverse or not exact):
        raise ValueError("tangent= needs exact= and the forward direction (the dq walk's pieces)")
    joint = tangent and lowers_concatenate()  # S and D updated by one product, as the dq sums walk does

    def program(*, log_decay_gmem, k_gmem, v_gmem, final_gmem, barrier, tangent_final_gmem=None,
                weighted_smem=None, weighted_lo_smem=None, lagged_smem=None, lagged_lo_smem=None, moved_smem=None,
                moved_lo_smem=None, within_gmem=None, keys_t_smem=None, block_t_smem=None, register_smem=None):
        """One program's walk of one piece from zero, its refs by name (None where the call has none)."""
        w = Walker(config, key_dim=K, dtype=dtype, reverse=reverse, scale=1.0, interpret=interpret,
                   keys_t=keys_t_smem, block_t=block_t_smem, register=register_smem)
        j, bh, piece = lax.axis_index("v"), lax.axis_index("bh"), lax.axis_index("piece")
        b, h = bh // H, bh % H
        lag, lags, leave_lag = w.steps()
        constant = None if gated else w.constant_factors(log_decay_gmem[h], lag, lags)
        update_tiles = w.update_tiles(weighted=weighted_smem, weighted_lo=weighted_lo_smem, lagged=lagged_smem,
                                      lagged_lo=lagged_lo_smem, moved=moved_smem, moved_lo=moved_lo_smem)

        def chunk(indices, *smems):
            *staged_tiles, carried = smems
            carried, g = w.lazy_out(carried)
            tile = dict(zip(staged, staged_tiles))
            k_smem, v_smem = tile["k"], tile["v"]
            _, entering_rows, leaving_rows, carry = (w.factors(tile["within"], lag) if gated else constant)
            step = Carry(carry, g)
            leaving_rows = w.rows(step.rows(entering_rows, leaving_rows)[1])
            weighted = v_smem[...].astype(f32) * leaving_rows
            if exact:
                state, derivative = carried if tangent else (carried, None)
                return w.exact_update(step, k_smem, weighted, state, derivative, leave_lag=leave_lag,
                                      tiles=update_tiles, joint=joint)
            weighted_smem[...] = weighted.astype(dtype)
            plgpu.commit_smem()
            return step.out(w.accumulate((step.start(carried), w.update(k_smem, weighted_smem)))[0])

        columns = pl.ds(j * bv, bv)
        # The pieces that have a successor: forward 0..P-2, reverse 1..P-1.
        first = (piece + int(reverse)) * n
        at = (lambda c: first + n - 1 - c) if reverse else (lambda c: first + c)  # noqa: E731
        rows = plgpu.BlockSpec((C, K), lambda c: (at(c), 0), transforms=tiles)
        loads = dict(k=(rows, k_gmem.at[b, :, h]),
                     v=(plgpu.BlockSpec((C, bv), lambda c: (at(c), j), transforms=tiles), v_gmem.at[b, :, h]))
        if gated:
            loads["within"] = (plgpu.BlockSpec((C,), lambda c: (at(c),)), within_gmem.at[b, h])
        staged = [*loads]
        state_at = (b, h, piece, slice(None), columns)
        zero = w.laid(jnp.zeros((K, bv), f32))  # each piece from zero
        state = pipeline(chunk, n, [spec for spec, _ in loads.values()], [],
                         [gmem for _, gmem in loads.values()], w.lazy_in((zero, zero) if tangent else zero),
                         stages=config.stages, dtype=dtype, interpret=interpret)
        state, g = w.lazy_out(state)
        for final, gmem in zip(state if tangent else (state,), (final_gmem, tangent_final_gmem)):
            final = final if g is None else final * g
            pl.run_scoped(lambda tile, final=final, gmem=gmem: w.store(final, tile, gmem, state_at), w.state_tile())

    tile_of = lambda columns=bv: plgpu.SMEM((C, columns), dtype, transforms=tiles)  # noqa: E731
    if joint:
        scratch = dict(moved_smem=tile_of(2 * bv), moved_lo_smem=tile_of(2 * bv))
    else:
        scratch = dict(weighted_smem=tile_of())
        if exact:
            scratch["weighted_lo_smem"] = tile_of()
        if tangent:
            scratch.update(lagged_smem=tile_of(), lagged_lo_smem=tile_of())
    scratch["barrier"] = plgpu.Barrier()
    if interpret is not None:
        scratch.update(interpreter_copies(config, K, dtype))
    inputs = dict(log_decay_gmem=log_decay.astype(f32), k_gmem=key, v_gmem=value,
                  within_gmem=None if within is None else within.astype(f32))
    finals = jax.ShapeDtypeStruct((B, H, P - 1, K, V), f32)
    outputs = dict(final_gmem=finals, tangent_final_gmem=finals if tangent else None)
    formed = launch(program, name=STATES_KERNEL, inputs=inputs, outputs=outputs, scratch=scratch,
                    grid=(V // bv, B * H, P - 1), interpret=interpret,
                    no_auto_barriers=not config.keeps_auto_barriers(False), approx_math=config.approx_exp and gated)
    return tuple(formed) if tangent else formed[0]


def entering_states(start, local, decays: Decays, chunking: Chunking, B: int, reverse: bool = False,
                    zero_first: bool = False):
    """The states entering each piece [B, H, P, K, V] float32 (None: one piece and no start), from the
    entering state ``start`` [B, H, K, V] and the local states of the pieces that have a successor ``local``
    [B, H, P-1, K, V] (forward: all but the last; reverse: all but the first), for the constant decay without
    segments: the state passing of fleetjax.state_passing, in XLA (the Triton walks fold them on chip).

    ``zero_first`` with no start: only the states entering the pieces after the first in the walk's order
    [B, H, P-1, K, V] (forward 1..P-1, reverse 0..P-2), which the plain walk takes (the first then enters
    from zero): the next piece's is the first one's local state, so two pieces need no XLA kernel between
    the states walk and the walk (a padded copy of 6 us at B4 H16 T=4096 on an H100).

    A closed form (one float32 product of [P, P] weights a row, in place of pass_states' loop) lost to it on
    the H200: fwd+bwd 1.210 against 1.187 ms at B1 H8 T=32768 (16 pieces), forward 0.209 against 0.185, even
    at B1 H16 T=131072 (2026-12-06, experiments/results/2026-12-06-h200-closed_form_ab.jsonl); dropped."""
    if chunking.pieces == 1:
        return None if start is None else start.astype(f32)[:, :, None]
    carry = jnp.exp(decays.block_sums(B, chunking.T, chunking.piece_len))
    carry = carry[:, :, 1:] if reverse else carry[:, :, :-1]
    if start is None and zero_first:  # passed on from the first piece's local state, whose own is zero
        first, rest = (-1, slice(None, -1)) if reverse else (0, slice(1, None))
        start, local, carry = local[:, :, first], local[:, :, rest], carry[:, :, rest]
    elif start is None:
        start = jnp.zeros(local.shape[:2] + local.shape[3:], f32)
    entering, last = pass_states(start.astype(f32), local, carry, reverse=reverse, axis=2)
    parts = [last[:, :, None], entering] if reverse else [entering, last[:, :, None]]
    return jnp.concatenate(parts, axis=2)


def entering_tangents(entering, local_tangents, decays: Decays, chunking: Chunking, B: int):
    """The state's derivatives in log gamma entering each piece of the dq walk [B, H, P, K, V] float32 (None:
    one piece), from the states entering the pieces ``entering`` [B, H, P, K, V] (:func:`entering_states`)
    and the local derivatives of all but the last piece ``local_tangents`` [B, H, P-1, K, V] (the Triton
    piece-state walks from zero): a piece of n positions with (S, D) entering leaves carry * (D + n S) + its
    local derivative, since every term of S decays n more steps (fleetjax.chunk.update_tangent)."""
    if chunking.pieces == 1:
        return None
    carry = jnp.exp(decays.block_sums(B, chunking.T, chunking.piece_len))[:, :, :-1]  # [B, H, P-1]
    moved = carry[..., None, None] * (chunking.piece_len * entering[:, :, :-1]) + local_tangents
    tangents, last = pass_states(jnp.zeros_like(moved[:, :, 0]), moved, carry, axis=2)
    return jnp.concatenate([tangents, last[:, :, None]], axis=2)
