"""The chunked walk on Hopper's own instructions (Pallas Mosaic GPU): wgmma products, tiles brought in by the
bulk tensor copy engine (TMA) several chunks ahead, the [Dk, block_v] float32 state held in the tensor cores'
accumulator registers across the chunks.

One kernel, :func:`walk`, is the walk of fleetjax.chunk with any roles, forward or in reverse: the forward
(q, k, v), and the backward's dq (dO, v, k), dv (reverse: k, q, dO) and dk (reverse: v, dO, q) walks, with
the constant decay or the gated one (``MosaicWalkConfig.gated_forward``, ``gated_backward``).
fleetjax.pallas.chunked selects it through ``PallasConfig.mosaic_walks`` (set by the default config on sm_90
GPUs) for the common case: 16-bit inputs, no segments, finite inputs (the contained
walks stay Triton's), head dims 64 or 128, no float32-accurate state owed (a returned final state,
d initial_state: those stay in the Triton walks). Each (value block, batch*head,
sequence piece) is one program of one warpgroup, or (``MosaicWalkConfig.warpgroups``, plain walks only) two
value blocks are one program of two compute warpgroups that share the chunk's query and key tiles, a third
warpgroup issuing the copies; per chunk of C positions, with the state S entering it:

    scores = query key^T                  (wgmma, key transposed in shared memory)
    out    = (query S) * entering + (scores * weights) value
    S     <- carry * S + key^T (leaving * value + 0 * out)

The 0 * out term changes no bit of a finite state and makes it NaN otherwise: a finite state after the piece
says every output of the piece was finite (the caller's witness, fleetjax.nonfinite). The state enters the
products rounded to the inputs' dtype, as in the Triton walks' plain form. Sequence pieces enter with states
passed in XLA (:func:`entering_states`) from the pieces' local states: those of the walk's states-only form
(:func:`piece_states`, one product a chunk) where the forward walk takes pieces of its own
(``MosaicWalkConfig.forward_pieces``), else those of the Triton piece-state walks.

For the decay's gradient (``MosaicWalkConfig.decay_sums``) the dq walk also forms fleetjax.vjp's
per-position sums with the state's products as hi/lo pairs, and carries the state's derivative in log gamma
(fleetjax.vjp's tangent D) as a second state, which enters each sequence piece passed in XLA like the state
(:func:`entering_tangents`); the dk walk then runs plain. The gate's gradient also takes the dk walk's sums.
With the gated decay the weights, entering, leaving and carry are exp of differences of the log decay summed
within the chunk (Decays.within_chunks), each <= 0, and the dq walk also forms the gate's spanned sums.

Everything runs in Mosaic GPU's CPU interpreter too (``interpret=``, the tests; the gated two-warpgroup
walk with several fake CPU devices, whose client then has threads for its three warpgroups' executions:
with one, on a two-core host, they stalled), which takes a few forms of its own: no register layouts,
accumulators summed after zeroed ones, transposed and register operands copied to shared memory, one chunk
at a time instead of emit_pipeline (two warpgroups keep their warp-specialized pipeline there).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fleetjax.chunk import decayed, split
from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.pallas.launch import on_gpu
from fleetjax.state_passing import pass_states

f32 = jnp.float32
# The name of the states-only walk's kernel (:func:`piece_states`), which profiles and lowered programs show.
STATES_KERNEL = "piece_states"
# The key dims the kernel's wgmma tiling serves (the state [K, block_v] lives in registers).
KEY_DIMS = (64, 128)
# MosaicWalkConfig.lazy_carry: the scale g of S = g T below which T takes it (T stays within 2^32 of S, far
# inside float32's range for any state that fits it with room).
LAZY_FLOOR = 2.0 ** -32


@dataclasses.dataclass(frozen=True)
class MosaicWalkConfig:
    """Tiling of the Mosaic GPU walks.

    chunk_size: positions per chunk (64: one wgmma row tile); block_v: value columns per program (32, 64 or
    128); sums_block_v: the same for the backward's walks that form the decay's gradient sums (their two
    float32 states and hi/lo operands take more registers; 64 lost at all four benchmark shapes, 3.92
    against 2.94 ms for the backward at B4 H16 T=16384, H200, 2026-12-03, ...-tune_sums_block_v64.jsonl); stages:
    chunks whose tiles are in flight at once (the pipeline's depth, each a copy of the walk's input and
    output tiles in shared memory; the default's 168 KiB hold one program per SM, and the tilings that fit
    two, 2 stages of value blocks of 32 or 1 stage, lost everywhere: 0.495 and 0.784 against 0.462 ms
    forward at B4 H16 T=16384, same card and date, ...-tune_occupancy.jsonl);
    sums_stages: the same for the walks that form the sums: 2 against 3, the backward with the decay
    learned 6.99 against 9.90 ms at B1 H16 T=131072, 2.82 against 2.85 at B4 H16 T=16384, the same at
    T=4096 and B1 H8 T=32768 (H200, 2026-12-03, bf16, K = V = 128,
    experiments/results/2026-12-03-h200-tune_sums_stages.jsonl; tune_pallas's fwd_bwd timed the backward
    alone until 2026-12-04, its forward being dead code).
    warpgroups: 2 runs the forward walk as one program of two compute warpgroups for two value blocks (they
    share the chunk's q and k tiles; a third warpgroup copies them in), bitwise the same results; the walk alone
    1.46x faster forward and 1.26x in reverse where the programs fill the SMs (B4 H16 T=16384 in two pieces;
    1.43x and 1.17x at B1 H8 T=32768 in 16), slower where half of them idle (0.81x in one piece), H200,
    2026-12-03, experiments/results/2026-12-03-h200-probe_wide_walk_package.txt. Walks that form sums keep one.
    forward_pieces: the sequence pieces of the Mosaic forward walk (None: PallasConfig.num_sequence_pieces,
    which the Triton forward takes), their local states from :func:`piece_states`. Where they would not be
    equal whole chunks, or the caller passes the pieces' local states (sequence parallelism), the
    PallasConfig's count holds.
    forward_block_v: the forward walk's value block per warpgroup, and its pieces' states walk's (None:
    block_v, which the backward's walks keep); bitwise the same outputs. Where the default sets it (short
    sequences in one piece) and what it measured: fleetjax.pallas.chunked._mosaic_walks.
    backward_warpgroups: the same for the backward's plain walks (dv, dk, and dq where no sums are formed);
    bitwise the same gradients (tests/test_mosaic.py), off by default: on with the forward's, the backward took
    1.295 against 1.233 ms at B1 H8 T=32768 and 7.36 against 6.90 at B1 H16 T=131072 (same card and date,
    ...-tune_warpgroups_default.jsonl), where the backward's pieces leave half the SMs idle at two.
    decay_sums: the backward's walks run on Mosaic also where the decay's gradient is wanted (the dq walk
    then carries the state's derivative in log gamma and forms the per-position sums with hi/lo products):
    forward+backward 1.037 ms at B4 H16 T=4096, 3.243 at T=16384, 1.400 at B1 H8 T=32768, 7.94 at B1 H16
    T=131072; with the Triton walks' sums 1.211, 4.309, 1.712, 10.06 in an earlier run (H200, 2026-12-03,
    bf16, K = V = 128, experiments/results/...-backward_issue15_{sums_stages,triton_sums_ab}.json).
    gated_forward: the forward walk takes the gated decay too: 0.191 against 0.212 ms (the Triton walk) at
    B4 H16 T=4096, 0.562 against 0.729 at T=16384 (H200, 2026-12-03, bf16, K = V = 128,
    experiments/results/2026-12-03-h200-forward_mosaic_gated.json).
    gated_backward: the backward's walks take the gated decay too, the gate's gradient sums included:
    fwd+bwd 1.527 against 1.627 ms at T=4096, 4.711 against 5.085 at T=16384 (same card and date,
    -backward_mosaic_gated.json).
    gated_decay_sums: with ``gated_backward``, also where a learned per-head decay sits beside the gate (the
    gated dq walk then carries the state's derivative and forms intra beside spanned): fwd+bwd with both
    learned 1.566 against 1.752 ms (the Triton walks) at B4 H16 T=4096, 4.978 against 6.408 at T=16384 (H200,
    2026-12-03, bf16, K = V = 128, experiments/results/2026-12-03-h200-gated_decay_sums_timing.txt).
    auto_barriers: keep the warpgroup barriers that Pallas puts around every shared-memory store, copy and
    scoped allocation (``plgpu.CompilerParams.unsafe_no_auto_barriers``) in the one-warpgroup walks; two
    warpgroups always keep them. Off by default: the walk's own barriers order what needs ordering. The tiles
    that threads write (states, weighted values, gate parts, out, sums) are read only by wgmma or TMA, after a
    commit_smem (a fence and a warpgroup barrier); threads read staged tiles (rows, values, within) before the
    chunk's last commit, which precedes the pipeline's refill of their slot; the pipeline's waits on its out
    copies carry their own barrier. Without them the dq walk with the decay's sums lowers with 8 warpgroup
    barriers instead of 47 (32 of those in each chunk's step), and fwd+bwd took 0.975 against 1.004 ms at
    B4 H16 T=4096, 2.846 against 2.965 at T=16384, gated (gate and decay learned) 1.673 against 1.779 and
    6.053 against 6.549, the forward at B1 H8 T=32768 0.198 against 0.205, outputs and gradients bitwise the
    same (H200, 2026-12-04, bf16, K = V = 128, alternated A/B, -auto_barriers_ab.jsonl in experiments/results).
    approx_exp: the gated walks form their per-chunk factors' exp as exp2(x log2(e)) (Mosaic GPU's
    ``approx_math``): a multiply and the special-function unit's base-2 exp for each value, against the
    accurate exp's longer sequence. The rounding of x log2(e) costs a relative error of about |x| 2^-24 (1e-6
    at |x| = 20), well inside the gradients' bf16 tolerances; exp(0) is still exactly 1. The constant
    decay's factors are formed once per program and keep the accurate exp. On by default from its sm_90 SASS
    (experiments/sass.py on the CPU, jax 0.11.2, 2026-12-05): the gated chunk loops take 809 instead of 1014
    instructions (forward), 810 / 1015 (dv), 1125 / 1336 (dk), 2144 / 2363 (dq with the decay learned, 300
    instead of 316 bytes of spills), and the forward 234 registers instead of 255. Not yet timed on a GPU;
    the interpreter computes the accurate exp either way.
    lazy_carry: the bf16 walks hold their float32 state as S = g T with a scalar g, so that a chunk's update
    T <- T + key^T (leaving value / g') skips the carry's multiply of the whole state (g' = g carry; the
    entering rows take g, the leaving ones 1 / g', both on the rows' values), and multiply T by g' only when
    g' would fall below 2^-32 (then g' = 1): at once where the decay is small, every 32 / (C log2(1 / gamma))
    chunks where it is not (every 11th to 180th in RetNet's range of decays), never at gamma = 1. Off for
    float16, whose state copies keep its range.
    split_by_bits: the bf16 walks' hi/lo pairs (their float32-accurate products: the states, the weighted
    and lagged values, the gate's spanned pairs) round their hi part with an integer add and masks on the
    float32 bits instead of a conversion and its widening (fleetjax.chunk.split's ``by_bits``; ties away
    from zero instead of to even, the same 2^-16 held): the dq walk with the decay's sums issues 72
    conversions a chunk instead of 168 at the same 1393 instructions, the gated one with the decay learned
    122 instead of 250 at the same 2181-2186 (experiments/sass.py, jax 0.11.2). A conversion issues at a
    fraction of the float rate; the form that drops the rounding (hi = x's upper 16 bits, 96 instructions
    fewer, 2^-15 held) took 2.73 against 3.00-3.03 ms fwd+bwd at B4 H16 T=16384 (H200, 2026-12-05, bf16,
    K = V = 128, alternated processes, experiments/results/2026-12-05-h200-truncated_split_ab.jsonl) but 4x
    the decay gradient's error at T=2048 in the interpreter (1.4e-4 against 3.4e-5); this form gives the
    conversion's errors there and at T=16384 (1.34e-5 and 3.10e-5 against 1.34e-5 and 3.11e-5) and is not
    yet timed.
    pingpong: the two compute warpgroups of a two-warpgroup walk (``warpgroups``, ``backward_warpgroups``)
    take turns on the tensor cores, as FlashAttention-3's two softmax warpgroups do: each issues its chunk's
    first products (scores, query S), then waits at a barrier of both until the other is about to issue its
    state update, the second warpgroup starting a turn behind. One warpgroup's products then run while the
    other forms its elementwise part, where without turns both issue their products at once and then both
    leave the tensor cores idle. Bitwise the same results. Off by default: not yet timed on a GPU.
    """

    chunk_size: int = 64
    block_v: int = 64
    sums_block_v: int = 32
    stages: int = 3
    warpgroups: int = 1
    forward_pieces: int | None = None
    forward_block_v: int | None = None
    backward_warpgroups: int = 1
    sums_stages: int = 2
    decay_sums: bool = True
    gated_forward: bool = True
    gated_backward: bool = True
    gated_decay_sums: bool = True
    auto_barriers: bool = False
    approx_exp: bool = True
    lazy_carry: bool = True
    split_by_bits: bool = True
    pingpong: bool = False

    def __post_init__(self):
        if self.chunk_size != 64:
            raise ValueError(f"MosaicWalkConfig.chunk_size must be 64, got {self.chunk_size!r}")
        for name in ("block_v", "sums_block_v", "forward_block_v"):
            value = getattr(self, name)
            if value not in (32, 64, 128) and not (name == "forward_block_v" and value is None):
                raise ValueError(f"MosaicWalkConfig.{name} must be 32, 64 or 128, got {value!r}")
        for name in ("warpgroups", "backward_warpgroups"):
            if getattr(self, name) not in (1, 2):
                raise ValueError(f"MosaicWalkConfig.{name} must be 1 or 2, got {getattr(self, name)!r}")
        pieces = self.forward_pieces
        if pieces is not None and (not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1):
            raise ValueError(f"MosaicWalkConfig.forward_pieces must be None or a positive int, got {pieces!r}")
        for name in ("stages", "sums_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
                raise ValueError(f"MosaicWalkConfig.{name} must be an int in [1, 8], got {value!r}")

    def forward(self) -> MosaicWalkConfig:
        """The forward walk's tiling (and its pieces' states walk's): block_v set to forward_block_v."""
        return self if self.forward_block_v is None else dataclasses.replace(self, block_v=self.forward_block_v,
                                                                           forward_block_v=None)

    def shared_memory_bytes(self, K: int, itemsize: int) -> int:
        """Shared memory of one forward program, the launch's whole request. One warpgroup: the state's
        16-bit tile and the weighted values' tile, then the larger of the staged q, k, v, o tiles and the
        float32 state's tile (used before and after the pipeline only); a barrier for each stage's copies and
        one for the state's. Two: the staged q, k and v tiles (v two blocks wide), then for each warpgroup the
        state's, the weighted values' and two output tiles, which share their space with the float32 state's
        tiles; two barriers a stage (loaded, consumed), one for each warpgroup's state, two for their
        rendezvous and, with ``pingpong``, one for their turns. A barrier takes 8 bytes."""
        C, bv = self.chunk_size, self.forward().block_v
        if self.warpgroups == 1:
            return (itemsize * (K * bv + C * bv) + max(itemsize * self.stages * (2 * C * K + 2 * C * bv),
                                                       4 * K * bv)
                    + 8 * (self.stages + 1))
        wgs = self.warpgroups
        return (itemsize * self.stages * (2 * C * K + wgs * C * bv)
                + wgs * max(itemsize * (K * bv + 3 * C * bv), 4 * K * bv)
                + 8 * (2 * self.stages + wgs + 2 + self.pingpong))


def on_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100, H200), where Mosaic GPU's wgmma kernels run."""
    return on_gpu() and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def supports(config: MosaicWalkConfig | None, *, dtype, K: int, V: int, chunking: Chunking, segments: bool,
             gated: bool, exact_state: bool) -> bool:
    """Whether the Mosaic forward walk serves this call: 16-bit inputs, K in KEY_DIMS, V in whole value
    blocks, pieces of equal whole chunks, no segments, and a final state that feeds no float32-accurate use
    (its update is one 16-bit product per chunk); the constant decay, or the gated one (``gated``) where
    ``config.gated_forward``."""
    return (_tiles_fit(config, dtype=dtype, K=K, V=V, chunking=chunking) and not segments and not exact_state
            and (not gated or config.gated_forward))


def _tiles_fit(config: MosaicWalkConfig | None, *, dtype, K: int, V: int, chunking: Chunking) -> bool:
    """16-bit inputs, K in KEY_DIMS, V in whole value blocks, pieces of equal whole chunks."""
    return (config is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and K in KEY_DIMS and V % config.block_v == 0 and chunking.chunk_size == config.chunk_size
            and chunking.equal_pieces)


def serves_backward(config: MosaicWalkConfig | None, *, dtype, K: int, V: int, chunking: Chunking, segments: bool,
                    gated: bool, exit_cotangent: bool, wanted) -> bool:
    """Whether the Mosaic walks serve a backward (fleetjax.pallas.chunked.block_backward): as
    :func:`supports` for each of its three walks (K and V each a query dim there), no d start and no final
    state's cotangent (``wanted``: a fleetjax.vjp.Wanted); the decay's gradient where ``config.decay_sums``;
    the gated decay where ``config.gated_backward``, its gate's gradient too, and the per-head decay's beside
    the gate where ``config.gated_decay_sums``."""
    return (_tiles_fit(config, dtype=dtype, K=K, V=V, chunking=chunking) and not segments
            and V in KEY_DIMS and K % config.block_v == 0 and K % config.sums_block_v == 0
            and not exit_cotangent and not wanted.initial_state
            and (not wanted.log_decay or config.decay_sums)
            and (not gated or (config.gated_backward and (not wanted.log_decay or config.gated_decay_sums))))


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
    tangents, last = pass_states(jnp.zeros_like(moved[:, :, 0]), jnp.moveaxis(moved, 2, 0),
                                 jnp.moveaxis(carry, 2, 0))
    return jnp.concatenate([jnp.moveaxis(tangents, 0, 2), last[:, :, None]], axis=2)


def piece_states(key, value, log_decay, chunking: Chunking, *, reverse: bool, config: MosaicWalkConfig,
                 within=None, interpret=None):
    """The local states [B, H, P-1, K, V] float32 of the pieces that have a successor in the walk (forward:
    0..P-2; reverse: 1..P-1), each walked from zero with keys ``key`` [B, T, H, K] and values ``value``
    [B, T, H, V]: the states-only form of :func:`walk` (one product a chunk, its value block rounded to the
    inputs' dtype as in the plain walks), which :func:`entering_states` passes on. ``within``: the gated
    decay (see :func:`walk`)."""
    return walk(None, key, value, log_decay, None, chunking, reverse=reverse, scale=1.0,
                config=dataclasses.replace(config, warpgroups=1), within=within, interpret=interpret)


def backward_walks(q, k, v, do, decays: Decays, start, chunking: Chunking, dq_local, reverse_local, *,
                   scale: float, config: MosaicWalkConfig, log_decay_wanted: bool, log_gate_wanted: bool = False,
                   interpret=None):
    """(dq, dk, dv, the gradient's per-position sums or None, the witness) where :func:`serves_backward`: dq
    = walk(dO, v, k) from S0^T, dv = reverse walk(k, q, dO), dk = reverse walk(v, dO, q), the pieces
    entering from the local states of the dq walk's ``dq_local`` (keys v, values k: (states, their
    derivatives in log gamma or None)) and of the reverse walks' ``reverse_local`` (keys q, values dO; the dk
    walk's are their transposes), [B, H, P-1, ., .] or None; the gated decay where ``decays`` has a gate.
    The sums [B, H, T] (summed over their value blocks): with ``log_decay_wanted`` "decay" (each position's
    summand of d log decay, fleetjax.vjp.log_decay_summand), with ``log_gate_wanted`` w, u and spanned
    (fleetjax.vjp.log_gate_grad's parts). The witness: the dq and dv walks' states after their pieces,
    non-finite whenever dq or dv is (their 0 * out terms), which each q_t, k_t, v_t and dO_t reaches through
    its own pair. ``interpret``: see :func:`walk`."""
    B, T = q.shape[:2]
    dq_local, dq_local_tangents = (None, None) if dq_local is None else dq_local
    dq_entering = entering_states(None if start is None else jnp.swapaxes(start, -1, -2), dq_local, decays,
                                  chunking, B)
    reverse_entering = entering_states(None, reverse_local, decays, chunking, B, reverse=True)
    dk_entering = None if reverse_entering is None else jnp.swapaxes(reverse_entering, -1, -2)
    within = decays.within_chunks(B, T, chunking.chunk_size) if decays.gated else None
    along = functools.partial(walk, log_decay=decays.log_decay, chunking=chunking, scale=scale, config=config,
                              within=within, interpret=interpret)
    plain = functools.partial(along, config=dataclasses.replace(config, warpgroups=config.backward_warpgroups))
    if not (log_decay_wanted or log_gate_wanted):
        dq, dq_finals, _ = plain(do, v, k, entering=dq_entering, reverse=False)
        dv, dv_finals, _ = plain(k, q, do, entering=reverse_entering, reverse=True)
        dk, _, _ = plain(v, do, q, entering=dk_entering, reverse=True)
        return dq, dk, dv, None, (dq_finals, dv_finals)
    sums = functools.partial(along, config=dataclasses.replace(config, block_v=config.sums_block_v,
                                                                stages=config.sums_stages))
    tangents_entering = (entering_tangents(dq_entering, dq_local_tangents, decays, chunking, B)
                         if log_decay_wanted else None)
    dq, dq_finals, dq_sums = sums(do, v, k, entering=dq_entering, reverse=False, rows=q, tangent=log_decay_wanted,
                                  entering_tangents=tangents_entering, spanned=log_gate_wanted)
    parts = {"w" if name == "state" else name: jnp.sum(part, axis=0) for name, part in dq_sums.items()}
    dv, dv_finals, _ = plain(k, q, do, entering=reverse_entering, reverse=True)
    if log_gate_wanted:  # the gate's gradient takes the dk walk's sums (the decay's come from the dq walk alone)
        dk, _, dk_sums = sums(v, do, q, entering=dk_entering, reverse=True, rows=k)
        parts["u"] = jnp.sum(dk_sums["state"], axis=0)
    else:
        dk, _, _ = plain(v, do, q, entering=dk_entering, reverse=True)
    return dq, dk, dv, parts, (dq_finals, dv_finals)


def _mma_tiles(dtype, columns: int):
    """Shared-memory transforms that wgmma reads: rows of up to 128 bytes in (8, row) tiles, swizzled by the
    row's bytes."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    row = min(128, columns * jnp.dtype(dtype).itemsize)
    return (plgpu.TilingTransform((8, row // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(row))


def walk(query, key, value, log_decay, entering, chunking: Chunking, *, reverse: bool, scale: float,
         config: MosaicWalkConfig, rows=None, tangent: bool = False, entering_tangents=None, within=None,
         spanned: bool = False, interpret=None):
    """(out [B, T, H, Dv] in value's dtype, the state after each piece [B, H, P, Dk, Dv] float32, sums): the
    walk of fleetjax.chunk with these roles, forward or ``reverse`` in time, from the states entering the
    pieces ``entering`` [B, H, P, Dk, Dv] float32 (None: zero; reverse: the state from the positions after the
    piece). query, key [B, T, H, Dk]; value [B, T, H, Dv]; log_decay [H] float32. Assumes :func:`supports`.
    The forward is walk(q, k, v); the backward's walks are walk(dO, v, k) (dq), reverse walk(k, q, dO) (dv)
    and reverse walk(v, dO, q) (dk). With ``query`` None only the states are formed and returned alone, [B, H,
    P-1, Dk, Dv], of the pieces that have a successor, each from zero (:func:`piece_states`).

    For the decay's gradient (fleetjax.vjp), ``rows`` [B, T, H, Dv] (q in the dq walk, k in the dk walk):
    the state's products become float32-accurate (hi/lo pairs) and sums["state"] [Dv blocks, B, H, T] holds
    each position's rows . (the state's part of out) (w, u); with ``tangent`` (the dq walk) also the
    state's derivative in log gamma D (fleetjax.chunk.update_tangent) as a second state, entering the pieces
    as ``entering_tangents`` [B, H, P, Dk, Dv] float32 (None: zero), and sums["decay"] in place of
    sums["state"] (which ``spanned`` keeps for the gate): each position's summand of d log gamma
    (fleetjax.vjp.log_decay_summand), (i + 1) w + tangent (rows . (out's part from D)) + intra (the
    lag-weighted pairs in the chunk); all per value block (their sum over blocks is the position's).

    ``within`` [B, H, T] float32 (the gated decay): the log decay summed from each position's chunk start
    through it (fleetjax.decay.Decays.within_chunks); the walk's factors are then exp of its differences
    within a chunk (only differences <= 0), and log_decay is not read. With ``spanned`` (gated, with
    ``rows``: the dq walk) also sums["spanned"]: per position r the chunk's pairs j < r <= i of
    scale (rows_i . value_j)(query_i . key_j) decayed, the intra-chunk part of d log_gate_r
    (fleetjax.chunk.spanned), its triangle product on a hi/lo pair of bfloat16 parts of the pairs (about 16
    bits, as the state's products; a third part, float32's 24 bits, moved no d log_gate error in the
    interpreter: 1.7e-6 -> 2.2e-6, 2.8e-6 -> 3.1e-6, 1.1e-5 -> 1.2e-5 and 1.1e-5 -> 9.6e-6 against the
    float64 oracle at T 256 and 512, gates of several sizes, 2026-12-04).

    ``interpret``: Mosaic GPU's interpret-mode parameters (CPU tests), which also take the kernel's forms that
    its interpreter lacks: no register layouts, products accumulated after a zeroed accumulator, transposed
    operands copied into shared memory."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, T, H, K = key.shape
    V = value.shape[-1]
    C, bv, P = config.chunk_size, config.block_v, chunking.pieces
    # No query: only the local states of the pieces that have a successor (:func:`piece_states`).
    states_only = query is None
    if states_only and (rows is not None or entering is not None):
        raise ValueError("a walk without a query takes no rows= or entering=")
    launched, piece_offset = (P - 1, int(reverse)) if states_only else (P, 0)
    n = chunking.piece_len // C
    nv = V // bv
    dtype = value.dtype
    exact = rows is not None
    # Plain walks may run two compute warpgroups a program, each on its own value block, sharing the
    # chunk's query and key tiles (a third warpgroup issues the copies).
    wide = config.warpgroups > 1 and not exact and not states_only and V % (config.warpgroups * bv) == 0
    wgs = config.warpgroups if wide else 1
    wg = plgpu.Layout.WGMMA
    # One swizzle for every tile: a wgmma's operands must share it (the value block's row sets it).
    tiles = _mma_tiles(dtype, bv)
    gated = within is not None
    if spanned and not (gated and exact and not reverse):
        raise ValueError("spanned= needs the gated decay, rows= and the forward direction (the dq walk)")
    # float16's range: scale the state before it is rounded; bfloat16 keeps float32's, so the scale rides on
    # the row factors (after the products: a hi/lo pair's sum holds the state either way). The chunk's pair
    # weights carry the scale too: the intra product's operand, the lag-weighted and spanned pairs.
    scale_state = jnp.dtype(dtype) == jnp.dtype(jnp.float16)
    # The gated weights take it in their exponent, added to the [C] log decays before they are broadcast.
    log_scale = math.log(scale) if scale > 0 and scale != 1.0 else None
    if tangent and (reverse or not exact):
        raise ValueError("tangent= needs rows= and the forward direction (the dq walk)")
    # With the tangent only the gate's gradient reads w alone; the decay's reads its summand ("decay").
    sums = ((["state"] if exact and (spanned or not tangent) else []) + (["decay"] if tangent else [])
            + (["spanned"] if spanned else []))
    # With the tangent, the state's and its derivative's updates are one product (key^T with the weighted and
    # lagged values side by side) where this jax's Mosaic GPU lowers a concatenate of register arrays.
    joint_update = tangent and _lowers_concatenate()
    # The state as S = g T (MosaicWalkConfig.lazy_carry); float16's copies of T would leave its range.
    lazy = config.lazy_carry and not scale_state

    def parts_of(x, parts_dtype, parts: int):
        # The interpreter runs the body as XLA ops, whose GPU compiler would drop the hi/lo splits' roundings.
        by_bits = config.split_by_bits and jnp.dtype(parts_dtype) == jnp.dtype(jnp.bfloat16)
        return split(x, parts_dtype, parts, barrier=interpret is not None, by_bits=by_bits)

    def iota(shape, dimension, layout=wg):
        return (lax.broadcasted_iota(jnp.int32, shape, dimension) if interpret is not None
                else plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=layout))

    def laid(x):
        return x if interpret is not None else plgpu.layout_cast(x, wg)

    def accumulate(*jobs):
        """[init + what issue(acc)'s wgmmas add] for each (init, issue) of ``jobs``, accumulated in place from
        init on the GPU, every wgmma issued before the first is waited for."""
        if interpret is not None:
            return [init + pl.run_scoped(lambda acc, issue=issue: (issue(acc), acc[...])[1],
                                         plgpu.ACC(init.shape, f32)) for init, issue in jobs]

        def issue_all(accs):
            for acc, (_, issue) in zip(accs, jobs):
                issue(acc)

        return list(pl.run_state(issue_all)(tuple(plgpu.ACC.init(init) for init, _ in jobs)))

    def program(*, log_decay_gmem, k_gmem, v_gmem, final_gmem, barrier, weighted_smem=None, q_gmem=None, o_gmem=None,
                state_smem=None, rows_gmem=None, within_gmem=None, start_gmem=None, tangent_start_gmem=None,
                state_sums_gmem=None, decay_sums_gmem=None, spanned_sums_gmem=None,
                state_lo_smem=None, weighted_lo_smem=None, tangent_smem=None, tangent_lo_smem=None, lagged_smem=None,
                lagged_lo_smem=None, part_hi_smem=None, part_lo_smem=None, keys_t_smem=None,
                block_t_smem=None, register_smem=None, triangle_smem=None, out_smem=None, f32_smem=None,
                rendezvous=None, turns=None, paired_smem=None, paired_lo_smem=None, moved_smem=None,
                moved_lo_smem=None):
        """One program's walk, its refs by name (see ``kernel`` below): inputs and outputs ``*_gmem``, scratch
        ``*_smem`` and ``barrier``; None where the call has no such ref. Two warpgroups (``wide``): each takes
        its own slice of the scratch that has a leading warpgroup axis."""
        group = lax.axis_index("wg") if wide else 0  # this program's warpgroup
        if tangent:  # the state's copies, then its derivative's, side by side (see ``paired_smem`` below)
            state_smem, tangent_smem = (paired_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
            state_lo_smem, tangent_lo_smem = (paired_lo_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
        if joint_update:  # the weighted values, then the lagged ones, side by side (``moved_smem`` below)
            weighted_smem, lagged_smem = (moved_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
            weighted_lo_smem, lagged_lo_smem = (moved_lo_smem.at[:, pl.ds(i * bv, bv)] for i in range(2))
        if wide:
            state_smem, weighted_smem, out_smem, f32_smem, barrier = (
                ref.at[group] for ref in (state_smem, weighted_smem, out_smem, f32_smem, barrier))
            if interpret is not None:
                keys_t_smem, register_smem = keys_t_smem.at[group], register_smem.at[group]
        sums_gmem = {name: ref for name, ref in (("state", state_sums_gmem), ("decay", decay_sums_gmem),
                                                 ("spanned", spanned_sums_gmem))
                     if name in sums}
        part_smems = [part_hi_smem, part_lo_smem] if spanned else []
        # The interpreter's transposed copies, by the shape of the tile copied (its copy of a register
        # operand A: register_smem).
        transposed_smem = {} if interpret is None else {(C, K): keys_t_smem, (C, bv): block_t_smem}

        def from_registers(x):  # a wgmma operand A in registers (the interpreter reads operands from refs)
            if interpret is None:
                return x
            register_smem[...] = x
            return register_smem

        def meet(barrier_ref):
            """Wait until both compute warpgroups reach here: each arrives at ``barrier_ref`` (one of both's
            arrivals), then waits for the other's."""
            plgpu.barrier_arrive(barrier_ref)
            plgpu.barrier_wait(barrier_ref)

        def take_turn():
            """Two compute warpgroups take turns on the tensor cores (``MosaicWalkConfig.pingpong``): they meet
            at ``turns``. The second one starts a turn behind (see ``compute`` below), so each of its chunks'
            first products go out while the first one forms its chunk's elementwise part, and its update waits
            until the first one's next products are out."""
            if turns is not None:
                meet(turns)

        j, bh, piece = lax.axis_index("v"), lax.axis_index("bh"), lax.axis_index("piece")
        b, h = bh // H, bh % H
        row_factor = 1.0 if scale_state else scale

        def steps():
            """(pair rows, pair columns, lag, lags >= 0 as float32, the rows' leaving steps [C, block_v])."""
            pair_rows, pair_cols = iota((C, C), 0), iota((C, C), 1)
            lag = pair_cols - pair_rows if reverse else pair_rows - pair_cols
            # Exponents masked before exp (only lags >= 0): gamma -> 0 gives exact zeros, gamma = 1 ones.
            lags = jnp.where(lag >= 0, lag, 0).astype(f32)
            # The steps of each row's leaving decay: the tangent's weights (its derivative in log gamma).
            row = iota((C, bv), 0).astype(f32)
            return pair_rows, pair_cols, lag, lags, row + 1.0 if reverse else C - 1.0 - row

        def constant_factors(lag, lags):
            """The constant decay's factors from :func:`steps`'s, the same for every chunk: (weights, the
            rows' entering and leaving factors [C], carry)."""
            log_gamma = log_decay_gmem[h]
            row = iota((C,), 0, wg.reduce(1)).astype(f32)
            enter_steps, leave_steps = (C - 1.0 - row, row + 1.0) if reverse else (row + 1.0, C - 1.0 - row)
            return (decayed(lag >= 0, lags * log_gamma) * scale, jnp.exp(enter_steps * log_gamma) * row_factor,
                    jnp.exp(leave_steps * log_gamma), jnp.exp(C * log_gamma))

        # Two warpgroups form their registers' values in the compute context (the copying warpgroup keeps
        # few registers) and carry the constant factors; one forms them here, once.
        if not wide:
            pair_rows, pair_cols, lag, lags, leave_lag = steps()
            constant = None if gated else constant_factors(lag, lags)

        def k_t(ref):
            if interpret is None:
                return ref.transpose((1, 0))
            copy = transposed_smem[ref.shape]
            copy[...] = ref[...].T
            return copy

        def products(jobs: dict, issued=None):
            """{name: sum of a @ b over its pairs, float32} for jobs {name: (shape, pairs)}: every wgmma is
            issued before the first result is read, so that they share one wait; ``issued()``, if given, runs
            between. An operand b may be a thunk, taken just before its wgmma (the interpreter's transposed
            copies share a buffer per shape)."""
            names = list(jobs)

            def body(*accs):
                for acc, name in zip(accs, names):
                    for a, b_ in jobs[name][1]:
                        plgpu.wgmma(acc, a, b_() if callable(b_) else b_)
                if issued is not None:
                    issued()
                return [acc[...] for acc in accs]

            return dict(zip(names, pl.run_scoped(body, *[plgpu.ACC(jobs[name][0], f32) for name in names])))

        def factors(within_smem, lag):
            """(weights, entering and leaving rows [C], carry) of a gated chunk from its ``within`` tile L [C]:
            forward scale exp(L_i - L_j) for j <= i, exp(L_i), exp(L_last - L_i), exp(L_last); in reverse the
            weights scale exp(L_j - L_i) for j >= i and the entering and leaving rows swapped."""
            if interpret is None:  # the tile as a column and as a row of the wgmma layout
                at_rows = _load(within_smem, layout=wg.reduce(1))
                # Two loads that differ in an attribute: jax 0.11's CSE would merge identical ones (its
                # layout casts are pure) into one value that no layout serves both as row and column.
                at_cols = _load(within_smem, layout=wg.reduce(0), optimized=False)
            else:
                at_rows = at_cols = within_smem[...]
            last = within_smem[C - 1]
            # log(scale) joins the pairs' exponents through the rows' [C] values (their sign flips in reverse).
            shifted = at_rows if log_scale is None else at_rows + (-log_scale if reverse else log_scale)
            pair = (laid(lax.broadcast_in_dim(shifted, (C, C), (0,)))
                    - laid(lax.broadcast_in_dim(at_cols, (C, C), (1,))))
            pair = -pair if reverse else pair
            # The row factors' exp on the [C] values (the chunk broadcasts them): a thread holds two rows.
            from_start, to_end = jnp.exp(at_rows), jnp.exp(last - at_rows)
            enter, leave = (to_end, from_start) if reverse else (from_start, to_end)
            # Unlike fleetjax.chunk.decayed, the exponents are not masked before exp: off the pairs they are
            # differences of finite log decays in the wrong order (>= 0), whose exp at worst overflows to inf,
            # which the select drops (a NaN gate still reaches the pairs, as with the mask).
            weights = jnp.where(lag >= 0, jnp.exp(pair), 0.0)
            weights = weights * scale if log_scale is None and scale != 1.0 else weights
            return weights, enter * row_factor, leave, jnp.exp(last)

        def chunk(indices, *smems):
            *tiles, carried = smems
            if lazy:
                carried, g = carried
            tile = dict(zip(staged, tiles))  # the chunk's tiles by name (``staged`` below)
            q_smem, k_smem, v_smem = tile.get("q"), tile["k"], tile["v"]
            x_smem, within_smem = tile.get("rows"), tile.get("within")
            sum_smem = {name: tile[f"{name}_sums"] for name in sums}
            if wide:
                (state, chunk_constant), derivative = carried, None
                v_smem = v_smem.at[:, pl.ds(group * bv, bv)]
                chunk_lag = steps()[2] if gated else None
            else:
                state, derivative = carried if tangent else (carried, None)
                chunk_constant, chunk_lag = constant, lag if gated else None
            weights, entering_rows, leaving_rows, carry = (factors(within_smem, chunk_lag) if gated
                                                           else chunk_constant)

            if lazy:  # S = g T: the carry joins g, and T is multiplied only where g would become too small
                g_next = g * carry
                renorm = g_next < LAZY_FLOOR
                entering_rows = entering_rows * g  # on the rows' [C] values, two a thread
                leaving_rows = leaving_rows * jnp.where(renorm, 1.0, 1.0 / g_next)

            def start(init):  # an update's accumulator before its product
                if lazy:
                    return lax.cond(renorm, lambda x: x * g_next, lambda x: x, init)
                return init * carry

            def carried_on(*values):  # the chunk's carry out: the state (and derivative, constants), and g
                core = values[0] if len(values) == 1 else values
                return (core, jnp.where(renorm, 1.0, g_next)) if lazy else core

            entering_at_rows = entering_rows  # the [C] values
            entering_rows, leaving_rows = (laid(lax.broadcast_in_dim(rows, (C, bv), (0,)))
                                           for rows in (entering_rows, leaving_rows))

            def update(*tiles):
                def issue(acc):
                    for tile in tiles:
                        plgpu.wgmma(acc, k_t(k_smem), tile)
                return issue

            if states_only:  # S <- carry * S + key^T (leaving * value)
                weighted_smem[...] = (v_smem[...].astype(f32) * leaving_rows).astype(dtype)
                plgpu.commit_smem()
                return carried_on(accumulate((start(state), update(weighted_smem)))[0])

            held = scale * state if scale_state else state
            if exact:
                state_smem[...], state_lo_smem[...] = parts_of(held, dtype, 2)
            else:
                state_smem[...] = held.astype(dtype)
            if tangent:
                tangent_smem[...], tangent_lo_smem[...] = parts_of(scale * derivative if scale_state else derivative,
                                                                   dtype, 2)
            plgpu.commit_smem()

            # The products that read only the chunk's tiles and the states' copies go out together. With the
            # tangent, inter (query S) and through (query D) are one product of twice the columns.
            held = ([paired_smem, paired_lo_smem] if tangent
                    else [state_smem, state_lo_smem] if exact else [state_smem])
            jobs = dict(scores=((C, C), [(q_smem, lambda: k_t(k_smem))]),
                        inter=((C, (1 + tangent) * bv), [(q_smem, copy) for copy in held]))
            if tangent or spanned:  # the pairs (rows_i . value_j) (query_i . key_j), decayed below
                jobs["pairs"] = ((C, C), [(x_smem, lambda: k_t(v_smem))])
            got = products(jobs, issued=take_turn)
            if tangent:
                got["inter"], got["through"] = got["inter"][:, :bv], got["inter"][:, bv:]
            scores = got["scores"] * weights
            inter = got["inter"] * entering_rows
            if tangent or spanned:
                pairs = got["pairs"] * scores
            if tangent:
                intra_rows = jnp.sum(lags * pairs, axis=1)
            if spanned:  # sum over i >= r as one product with the triangle [i >= r], then over j < r
                for part_smem, part in zip(part_smems, parts_of(pairs, jnp.bfloat16, 2)):
                    part_smem[...] = part
                plgpu.commit_smem()
                from_r = products(dict(r=((C, C), [(triangle_smem, part_smem) for part_smem in part_smems])))["r"]
                sum_smem["spanned"][...] = jnp.sum(jnp.where(pair_cols < pair_rows, from_r, 0.0), axis=1)

            def intra(acc):
                plgpu.wgmma(acc, from_registers(scores.astype(dtype)), v_smem)

            [o] = accumulate((inter, intra))
            if wide:  # out through a ring of two tiles, each copied out by this warpgroup
                (c,) = indices
                slot = c % 2
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copy of two chunks ago has read it
                out_smem.at[slot][...] = o.astype(dtype)
            else:
                tile["o"][...] = o.astype(dtype)
            if exact:
                x = x_smem[...].astype(f32)
                w = jnp.sum(inter * x, axis=1)
            if "state" in sums:
                sum_smem["state"][...] = w
            if tangent:  # d log gamma's summand (fleetjax.vjp.log_decay_summand): (i + 1) w + tangent + intra
                # i + 1 on the rows' [C] values (two a thread), not as a [C, block_v] tile live in the loop.
                steps_in = iota((C,), 0, wg.reduce(1)) + 1
                tangent_rows = entering_at_rows * jnp.sum(got["through"] * x, axis=1)
                sum_smem["decay"][...] = steps_in.astype(f32) * w + tangent_rows + intra_rows
            weighted = v_smem[...].astype(f32) * leaving_rows + 0.0 * o
            if exact:
                weighted_smem[...], weighted_lo_smem[...] = parts_of(weighted, dtype, 2)
            else:
                weighted_smem[...] = weighted.astype(dtype)
            if tangent:
                lagged_smem[...], lagged_lo_smem[...] = parts_of(weighted * leave_lag, dtype, 2)
            plgpu.commit_smem()
            if wide:
                plgpu.copy_smem_to_gmem(out_smem.at[slot], o_gmem.at[b, pl.ds(at(c) * C, C), h, columns])

            # With the tangent, D <- carry (D + C S) + key^T (leave_lag leaving value), from the entering S.
            if joint_update:  # S and D as one accumulator of 2 block_v columns: one product
                init = start(jnp.concatenate([state, derivative + C * state], axis=1))
                [both] = accumulate((init, update(moved_smem, moved_lo_smem)))
                state, derivative = both[:, :bv], [both[:, bv:]]
            else:
                take_turn()
                jobs = [(start(state), update(*([weighted_smem, weighted_lo_smem] if exact else [weighted_smem])))]
                if tangent:
                    jobs.append((start(derivative + C * state), update(lagged_smem, lagged_lo_smem)))
                state, *derivative = accumulate(*jobs)
            if wide:
                return carried_on(state, chunk_constant)
            return carried_on(state, derivative[0]) if tangent else carried_on(state)

        columns = pl.ds((j * wgs + group) * bv, bv)

        # Float32 states go through shared memory (registers take tiled loads only from there): one warpgroup
        # scopes its tile outside the pipeline, whose stages then reuse its space; two share theirs with
        # their other scratch, used only while the pipeline runs.
        f32_tile = plgpu.SMEM((K, bv), f32, transforms=_mma_tiles(f32, bv))

        def entered(gmem):
            if gmem is None:
                return laid(jnp.zeros((K, bv), f32))

            def load(tile):
                plgpu.copy_gmem_to_smem(gmem.at[b, h, piece, :, columns], tile, barrier)
                plgpu.barrier_wait(barrier)
                loaded = tile[...] if interpret is not None else _load(tile, layout=wg)
                plgpu.commit_smem()  # every thread has read the tile before its space is reused
                return loaded

            return load(f32_smem) if wide else pl.run_scoped(load, f32_tile)

        def store(state, tile):
            tile[...] = state
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(tile, final_gmem.at[b, h, piece, :, columns])
            plgpu.wait_smem_to_gmem(0)

        first = (piece + piece_offset) * n
        at = (lambda c: first + n - 1 - c) if reverse else (lambda c: first + c)  # noqa: E731
        rows_k = plgpu.BlockSpec((C, K), lambda c: (at(c), 0), transforms=tiles)
        rows_v = plgpu.BlockSpec((C, wgs * bv), lambda c: (at(c), j), transforms=tiles)
        positions = plgpu.BlockSpec((C,), lambda c: (at(c),))
        # Each chunk's tiles, name -> (spec, this program's slice of the array): inputs, then outputs.
        loads = {} if states_only else dict(q=(rows_k, q_gmem.at[b, :, h]))
        loads.update(k=(rows_k, k_gmem.at[b, :, h]), v=(rows_v, v_gmem.at[b, :, h]))
        if exact:
            loads["rows"] = (rows_v, rows_gmem.at[b, :, h])
        if gated:
            loads["within"] = (positions, within_gmem.at[b, h])
        if wide:  # out goes through each warpgroup's own ring (the pipeline's staged outputs serve one)
            staged = [*loads]

            def compute(pipeline):
                entering = entered(start_gmem)
                meet(rendezvous.at[0])  # the float32 tiles overlap the other warpgroup's scratch
                init = (entering, () if gated else constant_factors(*steps()[2:4]))
                pl.when(group == 1)(take_turn)  # a turn behind the first warpgroup
                out = pipeline((init, jnp.asarray(1.0, f32)) if lazy else init)
                pl.when(group == 0)(take_turn)  # the second one's last turn
                (state, _), g = out if lazy else (out, 1.0)
                state = state * g if lazy else state
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                meet(rendezvous.at[1])
                store(state, f32_smem)

            plgpu.emit_pipeline_warp_specialized(
                chunk, grid=(n,), memory_registers=40, in_specs=[spec for spec, _ in loads.values()],
                max_concurrent_steps=config.stages, wg_axis="wg", num_compute_wgs=wgs,
                compute_context=compute)(*[gmem for _, gmem in loads.values()])
            return
        state = entered(start_gmem)
        init = (state, entered(tangent_start_gmem)) if tangent else state
        init = (init, jnp.asarray(1.0, f32)) if lazy else init
        if spanned:  # the spanned sums' triangle [i >= r], a constant operand: written once, not each chunk
            triangle_smem[...] = jnp.where(pair_cols >= pair_rows, 1.0, 0.0).astype(jnp.bfloat16)
            plgpu.commit_smem()
        stores = {} if states_only else dict(o=(rows_v, o_gmem.at[b, :, h]))
        stores.update({f"{name}_sums": (positions, sums_gmem[name].at[j, b, h]) for name in sums})
        staged = [*loads, *stores]
        in_specs, out_specs = [spec for spec, _ in loads.values()], [spec for spec, _ in stores.values()]
        gmems = [gmem for _, gmem in (*loads.values(), *stores.values())]
        if interpret is None:
            state = plgpu.emit_pipeline(chunk, grid=(n,), in_specs=in_specs, out_specs=out_specs,
                                        max_concurrent_steps=config.stages, init_carry=init)(*gmems)
        else:
            state = _stepwise(chunk, n, in_specs, out_specs, gmems, init, dtype)
        state, g = state if lazy else (state, None)
        state = state[0] if tangent else state
        state = state * g if lazy else state
        pl.run_scoped(functools.partial(store, state), f32_tile)

    inputs = dict(log_decay_gmem=log_decay.astype(f32), q_gmem=query, k_gmem=key, v_gmem=value, rows_gmem=rows,
                  within_gmem=None if within is None else within.astype(f32), start_gmem=entering,
                  tangent_start_gmem=entering_tangents)
    outputs = dict(o_gmem=None if states_only else jax.ShapeDtypeStruct((B, T, H, V), dtype),
                   final_gmem=jax.ShapeDtypeStruct((B, H, launched, K, V), f32),
                   **{f"{name}_sums_gmem": jax.ShapeDtypeStruct((nv, B, H, T), f32) for name in sums})
    per_group = (wgs,) if wide else ()  # two warpgroups: each its own tiles
    state_tile = lambda: plgpu.SMEM((*per_group, K, bv), dtype, transforms=tiles)  # noqa: E731
    weighted_tile = lambda: plgpu.SMEM((*per_group, C, bv), dtype, transforms=tiles)  # noqa: E731
    scratch = {} if joint_update else dict(weighted_smem=weighted_tile())
    if not (states_only or tangent):
        scratch["state_smem"] = state_tile()
    if wide:
        scratch.update(out_smem=plgpu.SMEM((wgs, 2, C, bv), dtype, transforms=tiles),
                       f32_smem=plgpu.SMEM((wgs, K, bv), f32, transforms=_mma_tiles(f32, bv)))
    if exact and not joint_update:
        scratch["weighted_lo_smem"] = weighted_tile()
    if exact and not tangent:
        scratch["state_lo_smem"] = state_tile()
    if tangent:  # the state's and its derivative's hi (lo) copies in one tile: columns [0, bv) and [bv, 2 bv)
        # (whole tiles of the swizzle), so that query S and query D are one wgmma product of 2 bv columns:
        # half the wgmmas and reads of the query tile (dq sums walk, sm_90 SASS counted on the CPU by
        # experiments/sass.py: 1691 -> 1564 instructions a chunk, spills 452 -> 336 bytes; bitwise the same
        # gradients in the interpreter).
        scratch.update(paired_smem=plgpu.SMEM((K, 2 * bv), dtype, transforms=tiles),
                       paired_lo_smem=plgpu.SMEM((K, 2 * bv), dtype, transforms=tiles))
    if joint_update:  # likewise the weighted and lagged values' hi (lo) parts, for one update of S and D:
        # 1564 -> 1454 instructions, HGMMA 62 -> 46, spills 336 -> 288 bytes (same count, jax 0.11.2)
        scratch.update(moved_smem=plgpu.SMEM((C, 2 * bv), dtype, transforms=tiles),
                       moved_lo_smem=plgpu.SMEM((C, 2 * bv), dtype, transforms=tiles))
    elif tangent:
        scratch.update(lagged_smem=weighted_tile(), lagged_lo_smem=weighted_tile())
    if spanned:
        scratch.update({f"{part}_smem": plgpu.SMEM((C, C), jnp.bfloat16, transforms=_mma_tiles(jnp.bfloat16, C))
                        for part in ("part_hi", "part_lo", "triangle")})
    scratch["barrier"] = plgpu.Barrier(num_barriers=wgs) if wide else plgpu.Barrier()
    if wide:
        scratch["rendezvous"] = plgpu.Barrier(num_arrivals=wgs, num_barriers=2)
        if config.pingpong:
            scratch["turns"] = plgpu.Barrier(num_arrivals=wgs)
    if interpret is not None:
        scratch.update(keys_t_smem=plgpu.SMEM((*per_group, K, C), dtype), block_t_smem=plgpu.SMEM((bv, C), dtype),
                       register_smem=plgpu.SMEM((*per_group, C, C), dtype))
    inputs = {name: x for name, x in inputs.items() if x is not None}
    outputs = {name: x for name, x in outputs.items() if x is not None}
    shared = [name for name in ("state_smem", "weighted_smem", "out_smem") if wide and interpret is None]
    if shared:  # on the GPU the float32 tiles share their space with the tiles used only inside the pipeline
        union = plgpu.RefUnion(tuple(scratch.pop(name) for name in shared), scratch.pop("f32_smem"))
        scratch = {"shared": union, **scratch}
    names = [*inputs, *outputs, *scratch]

    def kernel(*refs):  # Mosaic GPU passes the refs in order: inputs, outputs, scratch
        named = dict(zip(names, refs))
        if shared:
            pipelined, named["f32_smem"] = named.pop("shared")
            named.update(zip(shared, pipelined))
        program(**named)

    # The kernel's name in profiles and lowered programs: <name>_mosaic_gpu_kernel.
    kernel.__name__ = kernel.__qualname__ = STATES_KERNEL if states_only else "kernel"
    options = dict(num_threads=wgs + 1, thread_name="wg") if wide else {}
    params = {}
    if not (config.auto_barriers or wide):  # see MosaicWalkConfig.auto_barriers for why this is safe
        params["unsafe_no_auto_barriers"] = True
    if config.approx_exp and gated:
        params["approx_math"] = True
    if params:
        options["compiler_params"] = plgpu.CompilerParams(**params)
    call = plgpu.kernel(kernel, out_type=tuple(outputs.values()), grid=(V // (wgs * bv), B * H, launched),
                        grid_names=("v", "bh", "piece"), scratch_types=list(scratch.values()), **options,
                        **({} if interpret is None else dict(interpret=interpret)))
    if states_only:
        (finals,) = call(*inputs.values())
        return finals
    out, finals, *formed = call(*inputs.values())
    return out, finals, dict(zip(sums, formed))


@functools.cache
def _lowers_concatenate() -> bool:
    """Whether this jax's Mosaic GPU lowering takes lax.concatenate of register arrays (jax 0.11.2 does,
    0.10.2 does not)."""
    try:
        from jax._src.pallas.mosaic_gpu import core as gpu_core
        from jax._src.pallas.mosaic_gpu import lowering
        return lax.concatenate_p in lowering.mosaic_lowering_rules[gpu_core.LANExWG_SEMANTICS]
    except (ImportError, AttributeError, KeyError):
        return False


def _load(ref, **kwargs):
    """plgpu.load of the whole ``ref`` (a layout given): jax 0.10's load takes the index as its second
    argument, later versions deprecate it in favour of indexing the ref (ref.at[...])."""
    import inspect

    import jax.experimental.pallas.mosaic_gpu as plgpu
    index = inspect.signature(plgpu.load).parameters["idx"]
    return plgpu.load(ref, **kwargs) if index.default is not inspect.Parameter.empty else plgpu.load(ref, (), **kwargs)


def _stepwise(body, n: int, in_specs, out_specs, gmems, init, dtype):
    """``emit_pipeline(body, grid=(n,), ...)(*gmems)`` one chunk at a time, for Mosaic GPU's interpreter
    (jax 0.10.2's cannot run emit_pipeline's predicated copies): each step copies its input tiles to shared
    memory, runs ``body`` and copies its outputs back."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    specs = list(in_specs) + list(out_specs)
    shapes = [(spec.block_shape, dtype if len(spec.block_shape) == 2 else f32) for spec in specs]

    def scoped(barrier, *smems):
        def step(c, carry):
            for spec, gmem, smem in zip(in_specs, gmems, smems):
                plgpu.copy_gmem_to_smem(gmem.at[_block(spec, c)], smem, barrier)
                plgpu.barrier_wait(barrier)
            carry = body(c, *smems, carry)
            plgpu.commit_smem()
            for spec, gmem, smem in zip(out_specs, gmems[len(in_specs):], smems[len(in_specs):]):
                plgpu.copy_smem_to_gmem(smem, gmem.at[_block(spec, c)])
            plgpu.wait_smem_to_gmem(0)
            return carry

        return jax.lax.fori_loop(0, n, step, init)

    return pl.run_scoped(scoped, plgpu.Barrier(), *[plgpu.SMEM(shape, d) for shape, d in shapes])


def _block(spec, c):
    """The GMEM slice of block ``c`` of a BlockSpec (index_map gives block indices)."""
    import jax.experimental.pallas as pl
    index = spec.index_map(c)
    return tuple(pl.ds(i * size, size) for i, size in zip(index, spec.block_shape))
