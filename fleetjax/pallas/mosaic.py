"""The chunked walk on Hopper's own instructions (Pallas Mosaic GPU): wgmma products, tiles brought in by the
bulk tensor copy engine (TMA) several chunks ahead, the [Dk, block_v] float32 state held in the tensor cores'
accumulator registers across the chunks.

One kernel, :func:`walk`, is the walk of fleetjax.chunk (constant decay) with any roles, forward or in
reverse: the forward (q, k, v), and the backward's dq (dO, v, k), dv (reverse: k, q, dO) and dk (reverse:
v, dO, q) walks in their plain form. fleetjax.pallas.chunked selects it through
``PallasConfig.mosaic_forward`` (set by the default config on sm_90 GPUs) for the common case: 16-bit inputs,
no segments, no per-token gate, finite inputs (the contained walks stay Triton's), head dims 64 or 128, no
float32-accurate state owed (a returned final state, d initial_state, the decay's gradient sums: those stay
in the Triton walks). Each (value block, batch*head, sequence piece) is one program of one warpgroup; per
chunk of C positions, with the state S entering it:

    scores = query key^T                  (wgmma, key transposed in shared memory)
    out    = (query S) * entering + (scores * weights) value
    S     <- carry * S + key^T (leaving * value + 0 * out)

The 0 * out term changes no bit of a finite state and makes it NaN otherwise: a finite state after the piece
says every output of the piece was finite (the caller's witness, fleetjax.nonfinite). The state enters the
products rounded to the inputs' dtype, as in the Triton walks' plain form. Sequence pieces enter with states
passed in XLA (:func:`entering_states`) from the local states of the Triton piece-state walks.

It cannot run in CPU interpret mode (the Mosaic GPU interpreter has no transposed wgmma operands); its tests
run on the GPU (tests/test_mosaic.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.state_passing import pass_states

f32 = jnp.float32
# The key dims the kernel's wgmma tiling serves (the state [K, block_v] lives in registers).
KEY_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class MosaicWalkConfig:
    """Tiling of the Mosaic GPU forward walk.

    chunk_size: positions per chunk (64: one wgmma row tile); block_v: value columns per program (64 or
    128); stages: chunks whose tiles are in flight at once (the pipeline's depth, each a copy of the q, k,
    v and o tiles in shared memory).
    """

    chunk_size: int = 64
    block_v: int = 64
    stages: int = 3

    def __post_init__(self):
        if self.chunk_size != 64:
            raise ValueError(f"MosaicWalkConfig.chunk_size must be 64, got {self.chunk_size!r}")
        if self.block_v not in (64, 128):
            raise ValueError(f"MosaicWalkConfig.block_v must be 64 or 128, got {self.block_v!r}")
        if not isinstance(self.stages, int) or isinstance(self.stages, bool) or not 1 <= self.stages <= 8:
            raise ValueError(f"MosaicWalkConfig.stages must be an int in [1, 8], got {self.stages!r}")

    def shared_memory_bytes(self, K: int, itemsize: int) -> int:
        """Shared memory of one program: the staged q, k, v, o tiles, the state's 16-bit and float32 tiles and
        the weighted values' tile."""
        C, bv = self.chunk_size, self.block_v
        return itemsize * (self.stages * (2 * C * K + 2 * C * bv) + K * bv + C * bv) + 4 * K * bv


def on_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100, H200), where Mosaic GPU's wgmma kernels run."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def supports(config: MosaicWalkConfig | None, *, dtype, K: int, V: int, chunking: Chunking, segments: bool,
             gated: bool, exact_state: bool) -> bool:
    """Whether the Mosaic walk serves this call: 16-bit inputs, K in KEY_DIMS, V in whole value blocks, pieces
    of equal whole chunks, no segments or gate, and a final state that feeds no float32-accurate use (its
    update is one 16-bit product per chunk)."""
    return (config is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and K in KEY_DIMS and V % config.block_v == 0 and chunking.chunk_size == config.chunk_size
            and chunking.T % (chunking.pieces * config.chunk_size) == 0
            and chunking.piece_len * chunking.pieces == chunking.T
            and not segments and not gated and not exact_state)


def serves_backward(config: MosaicWalkConfig | None, *, dtype, K: int, V: int, chunking: Chunking, segments: bool,
                    gated: bool, exit_cotangent: bool, wanted) -> bool:
    """Whether the Mosaic walks serve a backward (fleetjax.pallas.chunked.block_backward): as
    :func:`supports` for each of its three walks (K and V each a query dim there), no gradient of the decay
    (a fixed one: the decay's sums are Triton's alone), no d start and no final state's cotangent
    (``wanted``: a fleetjax.vjp.Wanted)."""
    return (supports(config, dtype=dtype, K=K, V=V, chunking=chunking, segments=segments, gated=gated,
                     exact_state=False)
            and V in KEY_DIMS and K % config.block_v == 0 and not exit_cotangent
            and not wanted.any and not wanted.initial_state)


def entering_states(start, local, decays: Decays, chunking: Chunking, B: int, reverse: bool = False):
    """The states entering each piece [B, H, P, K, V] float32 (None: one piece and no start), from the
    entering state ``start`` [B, H, K, V] and the local states of the pieces that have a successor ``local``
    [B, H, P-1, K, V] (forward: all but the last; reverse: all but the first), for the constant decay without
    segments: the state passing of fleetjax.state_passing, in XLA (the Triton walks fold them on chip)."""
    if chunking.pieces == 1:
        return None if start is None else start.astype(f32)[:, :, None]
    if start is None:
        start = jnp.zeros(local.shape[:2] + local.shape[3:], f32)
    carry = jnp.exp(decays.block_sums(B, chunking.T, chunking.piece_len))
    carry = carry[:, :, 1:] if reverse else carry[:, :, :-1]
    entering, last = pass_states(start.astype(f32), jnp.moveaxis(local, 2, 0), jnp.moveaxis(carry, 2, 0),
                                 reverse=reverse)
    entering = jnp.moveaxis(entering, 0, 2)
    parts = [last[:, :, None], entering] if reverse else [entering, last[:, :, None]]
    return jnp.concatenate(parts, axis=2)


def backward_walks(q, k, v, do, decays: Decays, start, chunking: Chunking, dq_local, reverse_local, *,
                   scale: float, config: MosaicWalkConfig):
    """(dq, dk, dv, the witness) for a fixed decay and no d start or exit cotangent (:func:`serves_backward`):
    dq = walk(dO, v, k) from S0^T, dv = reverse walk(k, q, dO), dk = reverse walk(v, dO, q), the pieces
    entering from the local states of the dq walk's ``dq_local`` (keys v, values k) and of the reverse walks'
    ``reverse_local`` (keys q, values dO; the dk walk's are their transposes), [B, H, P-1, ., .] or None.
    The witness: the dq and dv walks' states after their pieces, non-finite whenever dq or dv is (their
    0 * out terms), which each q_t, k_t, v_t and dO_t reaches through its own pair."""
    B = q.shape[0]
    dq_entering = entering_states(None if start is None else jnp.swapaxes(start, -1, -2), dq_local, decays,
                                  chunking, B)
    reverse_entering = entering_states(None, reverse_local, decays, chunking, B, reverse=True)
    along = functools.partial(walk, log_decay=decays.log_decay, chunking=chunking, scale=scale, config=config)
    dq, dq_finals = along(do, v, k, entering=dq_entering, reverse=False)
    dv, dv_finals = along(k, q, do, entering=reverse_entering, reverse=True)
    dk, _ = along(v, do, q, entering=None if reverse_entering is None else jnp.swapaxes(reverse_entering, -1, -2),
                  reverse=True)
    return dq, dk, dv, (dq_finals, dv_finals)


def _mma_tiles(dtype):
    """Shared-memory transforms that wgmma reads: rows of 128 bytes, 128-byte swizzle."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def walk(query, key, value, log_decay, entering, chunking: Chunking, *, reverse: bool, scale: float,
         config: MosaicWalkConfig):
    """(out [B, T, H, Dv] in value's dtype, the state after each piece [B, H, P, Dk, Dv] float32): the walk of
    fleetjax.chunk with these roles, forward or ``reverse`` in time, from the states entering the pieces
    ``entering`` [B, H, P, Dk, Dv] float32 (None: zero; reverse: the state from the positions after the
    piece). query, key [B, T, H, Dk]; value [B, T, H, Dv]; log_decay [H] float32. Assumes :func:`supports`.
    The forward is walk(q, k, v); the backward's walks are walk(dO, v, k) (dq), reverse walk(k, q, dO) (dv)
    and reverse walk(v, dO, q) (dk)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, T, H, K = query.shape
    V = value.shape[-1]
    C, bv, P = config.chunk_size, config.block_v, chunking.pieces
    n = chunking.piece_len // C
    dtype = value.dtype
    wg = plgpu.Layout.WGMMA
    tiles = _mma_tiles(dtype)
    # float16's range: scale the state before it is rounded; bfloat16 keeps float32's, scale the row factors.
    scale_state = jnp.dtype(dtype) == jnp.dtype(jnp.float16)

    def kernel(log_decay_gmem, q_gmem, k_gmem, v_gmem, *rest):
        if entering is None:
            o_gmem, final_gmem, state_smem, weighted_smem, exact_smem, barrier = rest
        else:
            start_gmem, o_gmem, final_gmem, state_smem, weighted_smem, exact_smem, barrier = rest
        j, bh, piece = lax.axis_index("v"), lax.axis_index("bh"), lax.axis_index("piece")
        b, h = bh // H, bh % H
        log_gamma = log_decay_gmem[h]
        rows = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=wg)
        cols = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=wg)
        lag = cols - rows if reverse else rows - cols
        # Exponents masked before exp (only lags >= 0): gamma -> 0 gives exact zeros, gamma = 1 ones.
        weights = jnp.where(lag >= 0, jnp.exp(jnp.where(lag >= 0, lag, 0).astype(f32) * log_gamma), 0.0) * scale
        row = plgpu.broadcasted_iota(jnp.int32, (C, bv), 0, layout=wg).astype(f32)
        enter_lag, leave_lag = (C - 1.0 - row, row + 1.0) if reverse else (row + 1.0, C - 1.0 - row)
        entering_rows = jnp.exp(enter_lag * log_gamma) * (1.0 if scale_state else scale)
        leaving_rows = jnp.exp(leave_lag * log_gamma)
        carry = jnp.exp(C * log_gamma)
        k_t = lambda ref: plgpu.transpose_ref(ref, (1, 0))

        def chunk(_, q_smem, k_smem, v_smem, o_smem, state):
            state_smem[...] = (scale * state if scale_state else state).astype(dtype)
            plgpu.commit_smem()

            def scores(acc):
                plgpu.wgmma(acc, q_smem, k_t(k_smem))
                return acc[...]

            def from_state(acc):
                plgpu.wgmma(acc, q_smem, state_smem)
                return acc[...]

            def intra(acc):
                plgpu.wgmma(acc, (pl.run_scoped(scores, plgpu.ACC((C, C), f32)) * weights).astype(dtype), v_smem)

            inter = pl.run_scoped(from_state, plgpu.ACC((C, bv), f32)) * entering_rows
            o = pl.run_state(intra)(plgpu.ACC.init(inter))
            o_smem[...] = o.astype(dtype)
            weighted_smem[...] = (v_smem[...].astype(f32) * leaving_rows + 0.0 * o).astype(dtype)
            plgpu.commit_smem()

            def update(acc):
                plgpu.wgmma(acc, k_t(k_smem), weighted_smem)

            return pl.run_state(update)(plgpu.ACC.init(carry * state))

        columns = pl.ds(j * bv, bv)
        if entering is None:
            state = plgpu.layout_cast(jnp.zeros((K, bv), f32), wg)
        else:  # float32 states go through shared memory: registers take tiled loads only from there
            plgpu.copy_gmem_to_smem(start_gmem.at[b, h, piece, :, columns], exact_smem, barrier)
            plgpu.barrier_wait(barrier)
            state = plgpu.load(exact_smem, (), layout=wg)
        first = piece * n
        at = (lambda c: first + n - 1 - c) if reverse else (lambda c: first + c)
        rows_k = plgpu.BlockSpec((C, K), lambda c: (at(c), 0), transforms=tiles)
        rows_v = plgpu.BlockSpec((C, bv), lambda c: (at(c), j), transforms=tiles)
        pipeline = plgpu.emit_pipeline(chunk, grid=(n,), in_specs=[rows_k, rows_k, rows_v], out_specs=[rows_v],
                                       max_concurrent_steps=config.stages, init_carry=state)
        state = pipeline(q_gmem.at[b, :, h], k_gmem.at[b, :, h], v_gmem.at[b, :, h], o_gmem.at[b, :, h])
        exact_smem[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(exact_smem, final_gmem.at[b, h, piece, :, columns])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((B, T, H, V), dtype), jax.ShapeDtypeStruct((B, H, P, K, V), f32)),
        grid=(V // bv, B * H, P), grid_names=("v", "bh", "piece"),
        scratch_types=[plgpu.SMEM((K, bv), dtype, transforms=tiles), plgpu.SMEM((C, bv), dtype, transforms=tiles),
                       plgpu.SMEM((K, bv), f32, transforms=_mma_tiles(f32)), plgpu.Barrier()])
    args = (log_decay.astype(f32), query, key, value) + (() if entering is None else (entering,))
    return call(*args)
