"""The Mosaic GPU walks' config and where they serve a call: :class:`MosaicWalkConfig`, one tiling for the
walk kernels of this package (fleetjax.pallas.mosaic.plain, .sums, .states), and :func:`supports` /
:func:`serves_backward`, the cases fleetjax.pallas.chunked hands them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fleetjax.chunking import Chunking
from fleetjax.pallas.launch import on_gpu

# The key dims the kernels' wgmma tiling serves (the state [K, block_v] lives in registers).
KEY_DIMS = (64, 128)


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
    2026-12-03, experiments/results/2026-12-03-h200-probe_wide_walk_package.txt. Walks that form sums keep one
    (but see sums_warpgroups, gate_dq_warpgroups and gate_dk_warpgroups).
    sums_warpgroups: 2 runs the dq walk of the decay's sums (with the tangent, the gate not learned) as one
    program of two compute warpgroups for two value blocks of sums_block_v, sharing the chunk's query and key
    tiles, a third warpgroup copying them in: half the programs, each SM two warps a scheduler where
    one program of one warpgroup leaves one (at B4 H16 the walk's 256 programs ran in two waves). Bitwise the
    same results. A compute thread holds at most 232 registers (setmaxnreg): in sm_90 SASS
    (experiments/sass.py, jax 0.11.2, 2026-12-05) the walk spills 364 bytes at 1380 instructions a chunk,
    against 184 and 1392 on one warpgroup, and asks 216 KiB of shared memory at two stages (so sums_stages
    must be 1 or 2 with it). Off by default: fwd+bwd with the decay learned took 2.96 against 2.91 ms at B4
    H16 T=16384, 0.793 against 0.779 at T=4096, 6.94 against 6.82 at B1 H16 T=131072, 1.22 against 1.24 at
    B1 H8 T=32768 (H100, 2026-12-05, bf16, K = V = 128, three alternated rounds, medians,
    experiments/results/2026-12-05-h100-sums_warpgroups_ab.jsonl).
    gate_dk_warpgroups: the same for the gate's dk walk (reverse, forming u for d log_gate): 8 bytes of spills
    at 1038 instructions a chunk on two warpgroups, against none and 1140 on one (the same SASS count), and
    sums_stages 1 or 2 with it (a config of more stages must set this to 1). On by default: fwd+bwd with the
    gate learned (no decay) took 3.56 against 3.93 ms at B4 H16 T=16384, 1.09 against 1.20 at T=4096, 1.39
    against 1.45 at B1 H8 T=32768 (same card, date and file), gradients bitwise the same (then the dq walk
    formed the gate's intra-chunk sums with a triangle product, on one warpgroup; the dk walk now also forms
    the column sums of the chunk's pairs, fleetjax.pallas.mosaic.sums_walk's ``before``).
    gate_dq_warpgroups: the same for the dq walk where the gate is learned, which forms w and the row sums of
    the chunk's pairs (and with the decay learned too, the decay's sums and the tangent); sums_stages 1 or 2
    with it. On by default: fwd+bwd with the gate learned (no decay) took 3.40 against 3.50 ms at B4 H16
    T=16384 and 0.939 against 1.056 at T=4096 (H100, 2026-12-06, bf16, K = V = 128, two alternated rounds,
    experiments/results/2026-12-06-h100-gate_dq_warpgroups_ab.jsonl; tune_pallas's one call a sample, which
    holds the host's time), with the decay learned beside it 3.60 against 3.71 and 1.048 against 1.136 (same
    card and date, three alternated rounds, ...-gate_decay_dq_warpgroups_ab.jsonl), gradients bitwise the
    same.
    forward_pieces: the sequence pieces of the Mosaic forward walk (None: PallasConfig.num_sequence_pieces,
    which the Triton forward takes), their local states from fleetjax.pallas.mosaic.piece_states. Where they
    would not be equal whole chunks, or the caller passes the pieces' local states (sequence parallelism),
    the PallasConfig's count holds.
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
    gated dq walk then carries the state's derivative and forms intra beside the gate's sums): fwd+bwd with both
    learned 1.566 against 1.752 ms (the Triton walks) at B4 H16 T=4096, 4.978 against 6.408 at T=16384 (H200,
    2026-12-03, bf16, K = V = 128, experiments/results/2026-12-03-h200-gated_decay_sums_timing.txt).
    auto_barriers: keep the warpgroup barriers that Pallas puts around every shared-memory store, copy and
    scoped allocation (``plgpu.CompilerParams.unsafe_no_auto_barriers``) in the one-warpgroup walks (two
    warpgroups: wide_auto_barriers). Off by default: the walk's own barriers order what needs ordering. The tiles
    that threads write (states, weighted values, out, sums) are read only by wgmma or TMA, after a
    commit_smem (a fence and a warpgroup barrier); threads read staged tiles (rows, values, within) before the
    chunk's last commit, which precedes the pipeline's refill of their slot; the pipeline's waits on its out
    copies carry their own barrier. Without them the dq walk with the decay's sums lowers with 8 warpgroup
    barriers instead of 47 (32 of those in each chunk's step), and fwd+bwd took 0.975 against 1.004 ms at
    B4 H16 T=4096, 2.846 against 2.965 at T=16384, gated (gate and decay learned) 1.673 against 1.779 and
    6.053 against 6.549, the forward at B1 H8 T=32768 0.198 against 0.205, outputs and gradients bitwise the
    same (H200, 2026-12-04, bf16, K = V = 128, alternated A/B, -auto_barriers_ab.jsonl in experiments/results).
    wide_auto_barriers: keep those barriers in the two-warpgroup walks (``warpgroups``, ``backward_warpgroups``,
    ``sums_warpgroups``, ``gate_dk_warpgroups``); False leaves them out there too. The reasoning of
    ``auto_barriers`` holds for each compute warpgroup: it writes only its own tiles (state copies, weighted
    values, out and sums rings), read by its wgmma or TMA after a commit_smem; it rewrites a ring's slot only
    after wait_smem_to_gmem, which ends with a warpgroup barrier; it reads the shared staged tiles before its
    chunk's last commit, ahead of the pipeline's consumed barrier; and before its float32 tile overlaps the
    other warpgroup's scratch it meets that warpgroup after a commit_smem (the entering state) or a wait on its
    copies out (the final state). Lowered, the two-warpgroup forward keeps 7 bar.sync instead of 28, the dq
    walk with the decay's sums 7 instead of 42, the gate's dk walk 6 instead of 35 (jax 0.11.2), their chunk
    loops 6 to 20 barrier instructions fewer in SASS. On by default: leaving them out moved nothing beyond
    the rounds' spread, outputs and gradients bitwise the same: fwd+bwd with the gate learned 1.005 against
    1.022 ms at B4 H16 T=4096 and 3.544 against 3.567 at T=16384, the forward 0.531 against 0.532 at
    T=16384 and 0.169 against 0.171 at T=4096 (H100, 2026-12-05, bf16, K = V = 128, three alternated rounds,
    experiments/results/2026-12-05-h100-wide_auto_barriers_ab.jsonl).
    approx_exp: the gated walks form their per-chunk factors with Mosaic GPU's ``approx_math``: each the
    special-function unit's base-2 exp (ex2.approx) of a difference of the chunk's log decays, which the walks
    take in base 2 (fleetjax.decay.Decays.within_chunks(base2=True): times log2(e), a relative error of about
    2^-24 |L| in a factor, well inside the gradients' bf16 tolerances; 2^0 is still exactly 1), against the
    accurate exp2's longer sequence. The constant decay's factors are formed once per program and keep the
    accurate exp. On by default from its sm_90 SASS (experiments/sass.py on the CPU, jax 0.11.2, 2026-12-05,
    then exp2(x log2(e)) of natural-log decays): the gated chunk loops took 809 instead of 1014 instructions
    (forward), 810 / 1015 (dv), 1125 / 1336 (dk), 2144 / 2363 (dq with the decay learned, 300 instead of 316
    bytes of spills), and the forward 234 registers instead of 255. The base-2 decays took the multiply by
    log2(e) off each of the chunk's pairs: 821 -> 786 instructions (forward, gate alone), 822 -> 787 (dv),
    1233 -> 1198 (the gate's dq walk), 1216 -> 1181 (its dk walk), 1727 -> 1699-1701 (dq with the decay
    learned beside the gate, 420 instead of 392 bytes of spills; 2026-12-06,
    experiments/results/2026-12-06-cpu-sass-base2.txt). Not yet timed on a GPU; the interpreter computes the
    accurate exp2 either way.
    lazy_carry: the bf16 walks hold their float32 state as S = g T with a scalar g, so that a chunk's update
    T <- T + key^T (leaving value / g') skips the carry's multiply of the whole state (g' = g carry; the
    entering rows take g, the leaving ones 1 / g', both on the rows' values), and multiply T by g' only when
    g' would fall below 2^-32 (then g' = 1): at once where the decay is small, every 32 / (C log2(1 / gamma))
    chunks where it is not (every 11th to 180th in RetNet's range of decays), never at gamma = 1. Off for
    float16, whose state copies keep its range.
    split_by_bits: the bf16 walks' hi/lo pairs (their float32-accurate products: the states, the weighted
    and lagged values) round their hi part with an integer add and masks on the
    float32 bits instead of a conversion and its widening (fleetjax.chunk.split's ``by_bits``; ties away
    from zero instead of to even, the same 2^-16 held): the dq walk with the decay's sums issues 72
    conversions a chunk instead of 168 at the same 1393 instructions, the gated one with the decay learned
    122 instead of 250 at the same 2181-2186 (experiments/sass.py, jax 0.11.2). A conversion issues at a
    fraction of the float rate; the form that drops the rounding (hi = x's upper 16 bits, 96 instructions
    fewer, 2^-15 held) took 2.73 against 3.00-3.03 ms fwd+bwd at B4 H16 T=16384 (H200, 2026-12-05, bf16,
    K = V = 128, alternated processes, experiments/results/2026-12-05-h200-truncated_split_ab.jsonl) but 4x
    the decay gradient's error at T=2048 in the interpreter (1.4e-4 against 3.4e-5); this form gives the
    conversion's errors there and at T=16384 (1.34e-5 and 3.10e-5 against 1.34e-5 and 3.11e-5), and took
    2.82 against 2.97 ms fwd+bwd at B4 H16 T=16384 and 0.780 against 0.811 at T=4096 (H100, 2026-12-05, bf16,
    K = V = 128, decay learned, five alternated rounds in one process,
    experiments/results/2026-12-05-h100-split_by_bits_ab.jsonl).
    backward_piece_states: where the backward runs on these walks in sequence pieces, the pieces' local states
    come from :func:`fleetjax.pallas.mosaic.piece_states` (one warpgroup, value blocks of ``block_v``;
    float32-accurate, and with the tangent for the decay's gradient, where the walks' sums read them)
    instead of the Triton launches. An H100 profile of fwd+bwd with the decay learned at B1 H16 T=131072
    (2026-12-05, experiments/results/2026-12-05-h100-split_B1H16T131072.txt) had those launches at 0.909
    (the dq walk's, with the tangent) and 0.475 ms (the reverse walks') of the call's 6.72. On by default:
    fwd+bwd with the decay learned took 6.83 against 7.31 ms at B1 H16 T=131072 and 1.31 against 1.38 at
    B1 H8 T=32768 (H100, 2026-12-05, bf16, K = V = 128, three alternated rounds,
    experiments/results/2026-12-05-h100-backward_piece_states_ab.jsonl). The gradients differ from those
    through the Triton launches by bf16 roundings: the two walks' states agree within 2e-6 (interpreter).
    The gated decay takes it too, not yet timed.
    gate_sums: the gate's sums that the walks read (the gate transposed, summed within each chunk in base 2,
    summed over each chunk) from one Triton launch (fleetjax.pallas.gate), formed before the custom VJP and
    read by its forward and backward, instead of XLA's three kernels (a transpose, the cumulative sum's
    reduction, the pieces' sums). On by default, with ``zero_first``: by ncu's kernel times on an H100
    (2026-12-07, bf16 B4 H16 T=4096, K = V = 128, the gate alone, ...-thirtyninth_split_* in
    experiments/results), the gated forward 137.2 us in 7 kernels against 158.3 in 10, and with
    ``PallasConfig.gate_grad_kernel`` fwd+bwd 716.6 in 21 against 731.8 in 24. (A first timing by
    cost_split.py's medians, one sample each, had seen no gain: its spread between runs is larger.)
    zero_first: with no entering state, the forward walk enters its first piece from zero and takes the
    states of the others alone (fleetjax.pallas.mosaic.entering_states' ``zero_first``): two pieces need no
    XLA copy between the states walk and the walk (6.0 us at B4 H16 T=4096 on an H100). On by default, timed
    with ``gate_sums`` (above); bitwise the same walk in Mosaic GPU's interpreter, and the oracle's on an H100.
    states_block_v: the value block of the states-only walk (:func:`fleetjax.pallas.mosaic.piece_states`, the
    pieces' local states; None: the walk's block_v) where it divides V. Its programs hold one warpgroup each
    and walk a piece's chunks one update product at a time: a smaller block gives more programs a piece,
    several to an SM, for the chunks' latency to overlap (at B4 H16, bf16, K = V = 128, the gate alone, the
    forward's states walk took 0.026 and 0.089 ms of the gated fwd+bwd's 0.685 and 2.454 ms of kernels at
    T=4096 and 16384, in 128 programs: ncu, H100, 2026-12-07, experiments/results/2026-12-07-h100-fortyfirst_
    split_fwd_bwd_*_main.csv). The same states to float32's rounding (8e-8 apart in the interpreter, whose dot
    sums each block in its own order). Off (None): at 32 the states walk took 0.0339 against 0.0286 ms in
    the forward at T=4096 and 0.1348 against 0.0995 in fwd+bwd at T=16384 (ncu, H100, 2026-12-07, same
    shapes, ...-fortysecond_split_{fwd_T4096,fwd_bwd_T16384}_{new,sb32}.csv): its programs each read the
    chunk's whole key tile for a quarter of the values.

    Two forms lost and were removed (their code is in the tree up to 8609fc5): two compute warpgroups taking
    turns on the tensor cores (``pingpong``, as FlashAttention-3's softmax warpgroups): the forward 0.559
    against 0.557 ms at B4 H16 T=16384, fwd+bwd with two warpgroups 2.99 against 2.87 without turns (H100,
    2026-12-05, experiments/results/2026-12-05-h100-pingpong_ab.jsonl); and the dv walk and the gate's dk sums
    walk as one reverse walk of two warpgroups holding one state (``joint_reverse``, ``joint_pieces``): meeting
    twice a chunk, the warpgroups walked in lockstep, fwd+bwd with the gate learned 2.59 against 2.13 ms at
    T=16384 and 0.71 against 0.60 at T=4096 (H100, 2026-12-06, ...-thirtysixth_joint_ab.jsonl).
    """

    chunk_size: int = 64
    block_v: int = 64
    sums_block_v: int = 32
    stages: int = 3
    warpgroups: int = 1
    forward_pieces: int | None = None
    forward_block_v: int | None = None
    backward_warpgroups: int = 1
    sums_warpgroups: int = 1
    gate_dk_warpgroups: int = 2
    gate_dq_warpgroups: int = 2
    sums_stages: int = 2
    decay_sums: bool = True
    gated_forward: bool = True
    gated_backward: bool = True
    gated_decay_sums: bool = True
    auto_barriers: bool = False
    wide_auto_barriers: bool = True
    approx_exp: bool = True
    lazy_carry: bool = True
    split_by_bits: bool = True
    backward_piece_states: bool = True
    gate_sums: bool = True
    zero_first: bool = True
    states_block_v: int | None = None

    def __post_init__(self):
        if self.chunk_size != 64:
            raise ValueError(f"MosaicWalkConfig.chunk_size must be 64, got {self.chunk_size!r}")
        for name in ("block_v", "sums_block_v", "forward_block_v", "states_block_v"):
            value = getattr(self, name)
            if value not in (32, 64, 128) and not (name in ("forward_block_v", "states_block_v") and value is None):
                raise ValueError(f"MosaicWalkConfig.{name} must be 32, 64 or 128, got {value!r}")
        for name in ("warpgroups", "backward_warpgroups", "sums_warpgroups", "gate_dk_warpgroups",
                     "gate_dq_warpgroups"):
            if getattr(self, name) not in (1, 2):
                raise ValueError(f"MosaicWalkConfig.{name} must be 1 or 2, got {getattr(self, name)!r}")
        pieces = self.forward_pieces
        if pieces is not None and (not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1):
            raise ValueError(f"MosaicWalkConfig.forward_pieces must be None or a positive int, got {pieces!r}")
        for name in ("stages", "sums_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
                raise ValueError(f"MosaicWalkConfig.{name} must be an int in [1, 8], got {value!r}")
        for name in ("sums_warpgroups", "gate_dk_warpgroups", "gate_dq_warpgroups"):  # 216 KiB at two stages
            if getattr(self, name) == 2 and self.sums_stages > 2:
                raise ValueError(f"MosaicWalkConfig.sums_stages must be 1 or 2 with {name}=2 (shared memory), got "
                                 f"{self.sums_stages!r}; set {name}=1 for more stages")

    def keeps_auto_barriers(self, wide: bool) -> bool:
        """Whether a walk keeps Pallas's automatic barriers: ``wide``, of two compute warpgroups (see
        auto_barriers and wide_auto_barriers)."""
        return self.auto_barriers or (wide and self.wide_auto_barriers)

    def forward(self) -> MosaicWalkConfig:
        """The forward walk's tiling (and its pieces' states walk's): block_v set to forward_block_v."""
        return self if self.forward_block_v is None else dataclasses.replace(self, block_v=self.forward_block_v,
                                                                           forward_block_v=None)

    def states(self, V: int) -> MosaicWalkConfig:
        """The states-only walk's tiling for V value columns: block_v set to states_block_v where that divides
        V."""
        if self.states_block_v is None or V % self.states_block_v:
            return self
        return dataclasses.replace(self, block_v=self.states_block_v, states_block_v=None)

    def shared_memory_bytes(self, K: int, itemsize: int) -> int:
        """Shared memory of one forward program, the launch's whole request. One warpgroup: the state's
        16-bit tile and the weighted values' tile, then the larger of the staged q, k, v, o tiles and the
        float32 state's tile (used before and after the pipeline only); a barrier for each stage's copies and
        one for the state's. Two: the staged q, k and v tiles (v two blocks wide), then for each warpgroup the
        state's, the weighted values' and two output tiles, which share their space with the float32 state's
        tiles; two barriers a stage (loaded, consumed), one for each warpgroup's state, two for their
        rendezvous. A barrier takes 8 bytes."""
        C, bv = self.chunk_size, self.forward().block_v
        if self.warpgroups == 1:
            return (itemsize * (K * bv + C * bv) + max(itemsize * self.stages * (2 * C * K + 2 * C * bv),
                                                       4 * K * bv)
                    + 8 * (self.stages + 1))
        wgs = self.warpgroups
        return (itemsize * self.stages * (2 * C * K + wgs * C * bv)
                + wgs * max(itemsize * (K * bv + 3 * C * bv), 4 * K * bv)
                + 8 * (2 * self.stages + wgs + 2))


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


