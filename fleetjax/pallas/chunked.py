"""implementation="pallas": the fused chunked walk (Pallas, Triton lowering on GPU), its exact custom VJP, and
its steps for sequence parallelism.

Forward (fleetjax.pallas.forward): one program per (value block, batch*head, sequence piece) walks the
chunks of its piece with the [K, block_v] float32 state on chip; no state of any chunk is written to HBM.
With sequence pieces (when batch*head*value blocks cannot fill the GPU) a cheaper launch first computes
each piece's local state, and each walk program folds those of the pieces before its own into its entering
state.

Backward (fleetjax.pallas.backward): the residuals are the inputs alone; three walks give dq (forward in
time), dv and d initial_state, and dk (both reverse in time), with the decay gradient from their per-position
sums (fleetjax.vjp). Second derivatives raise an error: the kernels have no derivative rules.

Sequence parallelism (fleetjax.sharding) takes the same launches in another order (``BLOCK_KERNELS``): the
local states of all pieces first (folded, they are the block's local state; the walk reuses them), the walk
after the exchange; in the backward the local reverse states first, then the reverse walks entered with the
block's exit cotangent.

Every kernel has its own tiling (:class:`WalkConfig`); :func:`default_config` picks them by shape, dtype and
device, within the device's shared memory (fleetjax.pallas.launch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fleetjax import nonfinite, vjp
from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.implementation import Implementation
from fleetjax.pallas import backward as bwd
from fleetjax.pallas import forward as fwd
from fleetjax.pallas import gate, gate_grad
from fleetjax.pallas import marking
from fleetjax.pallas import mosaic
from fleetjax.pallas.launch import (device_kind, multiprocessor_count, on_gpu, shared_memory_bytes,
                                   shared_memory_per_block)
from fleetjax.pallas.walk import padded
from fleetjax.state_passing import BlockKernels

f32 = jnp.float32
_PRECISIONS = {"ieee": jax.lax.Precision.HIGHEST, "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
               "tf32": jax.lax.Precision.DEFAULT}
# float32 values of one program's on-chip state (registers): [key dim, block] <= 128 x 128 (64 KiB).
MAX_STATE_TILE = 128 * 128
KERNELS = ("forward", "piece_states", "dq", "dv", "dk")


def _pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class WalkConfig:
    """Tiling of one walk kernel.

    chunk_size: positions per chunk (a power of two >= 16); block_v: columns of the walk's values per program
    (a power of two >= 16); num_warps, num_stages: Triton's launch parameters (stages: how many chunks'
    tiles are loaded ahead, each a copy in shared memory).
    """

    chunk_size: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("chunk_size", "block_v"):
            if not _pow2(getattr(self, name)) or getattr(self, name) < 16:
                raise ValueError(f"WalkConfig.{name} must be a power of two >= 16, got {getattr(self, name)!r}")
        if not _pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"WalkConfig.num_warps must be a power of two in [1, 32], got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
            raise ValueError(f"WalkConfig.num_stages must be a positive int, got {self.num_stages!r}")


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """The tiling of every kernel of implementation="pallas".

    forward: the forward walk. dq, dv, dk: the backward's walks (one chunk size: the decay gradient pairs
    their chunks). piece_states: the launches that compute the sequence pieces' local states before a walk
    (they read keys and values only, so they can take longer chunks or more warps); None: each walk's own
    tiling. A piece-state chunk that does not tile the pieces falls back to the walk's.
    num_sequence_pieces, backward_num_sequence_pieces: pieces of the sequence walked in parallel (state
    passing joins them), forward and backward.
    precision: products of float32 inputs: "tf32x3" (three tensor-core passes, about float32's accuracy),
    "ieee" (exact float32 without tensor cores, many times slower) or "tf32" (one pass, ~1e-3). Off-GPU
    "tf32x3" runs exact. 16-bit inputs use their own tensor-core products (hi/lo pairs where float32's
    accuracy is owed).
    mosaic_walks: the Mosaic GPU walks' tiling (fleetjax.pallas.mosaic, sm_90 only), used on finite inputs
    for the forward where :func:`fleetjax.pallas.mosaic.supports` says they serve the call, and for the
    backward where :func:`fleetjax.pallas.mosaic.serves_backward` does; None: the Triton walks always. The
    default config sets it on Hopper GPUs.
    choice_on_device: the forward and the backward choose between their plain walks and the contained ones
    (fleetjax.nonfinite) on the device. The contained walks and the NaN marking (fleetjax.pallas.marking, a launch
    per gradient in the backward; the forward's contained walk marks as it walks) are always launched; on finite
    inputs they visit no chunk and leave the plain walks' outputs in place (their buffers handed on), so no
    lax.cond waits for its predicate on the host, and a jitted step with many layers runs without a host round
    trip per layer. After the Mosaic forward walk the contained launch reads that walk's states and skips row by
    row, with no reduction launched before it: the forward is the Mosaic walk and one skipped launch (deviceless
    sm_90 compile, B4 H16 T=4096: 3 kernels where there were 5, 2026-12-08, not timed yet). Alternated against the
    lax.cond (H200, 2026-12-04, bf16, K = V = 128, experiments/results/2026-12-04-h200-choice_*): the forward
    0.178 -> 0.136 ms at B4 H16 T=4096 and 0.088 -> 0.057 at B1 H8 T=4096, unchanged at T >= 16384; fwd+bwd within
    3% either way. The skipped launches and the contained backward's per-position reductions (which run either
    way) added about 50 us of kernel time to fwd+bwd at B4 H16 T=16384 (ncu), before the contained walks left out
    d log_decay's sums (nobody reads them: the plain walks' gradient is marked; extra memory 68 -> 24 MB there,
    not timed since). Only the gradients the VJP differentiates go through the contained walks (jax never drops a
    pallas_call, so a VJP over every input whose other gradients go unused runs every walk). Sequence
    parallelism's local states (fleetjax.sharding's steps before each exchange) choose on the device too, their
    pieces' states being the witness (not timed on a GPU). False: the lax.cond, as before 2026-12-04, whose
    branches jax prunes to the gradients used (and for the local states a check of their inputs).
    gate_grad_kernel: where the choice is made on the device and the gate's gradient alone is wanted (no final
    state's cotangent, whole chunks), d log_gate from the plain and contained walks' per-block parts in two
    small Triton launches (fleetjax.pallas.gate_grad; one where the row is one tile) instead of XLA's eight
    fusions. On by default: fwd+bwd with the gate learned 731.8 us in 24 kernels against 755.9 in 29 by ncu's
    kernel times on an H100 (2026-12-07, bf16 B4 H16 T=4096, K = V = 128, then in one launch,
    experiments/results/2026-12-07-h100-thirtyninth_split_fwd_bwd_*).
    """

    forward: WalkConfig = WalkConfig()
    dq: WalkConfig = WalkConfig(block_v=32)
    dv: WalkConfig = WalkConfig(block_v=32)
    dk: WalkConfig = WalkConfig(block_v=32)
    piece_states: WalkConfig | None = None
    num_sequence_pieces: int = 1
    backward_num_sequence_pieces: int = 1
    precision: str = "tf32x3"
    mosaic_walks: mosaic.MosaicWalkConfig | None = None
    choice_on_device: bool = True
    gate_grad_kernel: bool = True

    def __post_init__(self):
        for name in ("forward", "dq", "dv", "dk", "piece_states"):
            value = getattr(self, name)
            if not isinstance(value, WalkConfig) and not (name == "piece_states" and value is None):
                raise TypeError(f"PallasConfig.{name} must be a WalkConfig, got {value!r}")
        if len({self.dq.chunk_size, self.dv.chunk_size, self.dk.chunk_size}) != 1:
            raise ValueError("PallasConfig.dq, dv and dk must have one chunk_size, got "
                             f"{self.dq.chunk_size}, {self.dv.chunk_size}, {self.dk.chunk_size}")
        for name in ("num_sequence_pieces", "backward_num_sequence_pieces"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PallasConfig.{name} must be a positive int, got {value!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"PallasConfig.precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")
        if self.mosaic_walks is not None and not isinstance(self.mosaic_walks, mosaic.MosaicWalkConfig):
            raise TypeError(f"PallasConfig.mosaic_walks must be a MosaicWalkConfig or None, got "
                            f"{self.mosaic_walks!r}")
        for name in ("choice_on_device", "gate_grad_kernel"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PallasConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def chunking(self, T: int, backward: bool) -> Chunking:
        if backward:
            return Chunking(T, self.dq.chunk_size, self.backward_num_sequence_pieces)
        return Chunking(T, self.forward.chunk_size, self.num_sequence_pieces)

    def launch(self, name: str, dtype) -> dict:
        """The keyword arguments of kernel ``name``'s launch function."""
        walk = getattr(self, name)
        return dict(block_v=walk.block_v, num_warps=walk.num_warps, num_stages=walk.num_stages,
                    precision=_dot_precision(self.precision, dtype))

    def piece_launch(self, walk: str, dtype) -> dict:
        """The launch of the pieces' states before walk ``walk`` (its own tiling unless piece_states is set)."""
        own = getattr(self, walk)
        states = self.piece_states or own
        return dict(chunk_size=states.chunk_size, block_v=states.block_v, num_warps=states.num_warps,
                    num_stages=states.num_stages, precision=_dot_precision(self.precision, dtype))


def _dot_precision(name: str, dtype):
    """The products' precision for inputs of ``dtype``: the config's choice for float32, else the default."""
    if jnp.dtype(dtype) != f32:
        return None
    if name == "tf32x3" and not on_gpu():  # no tf32 off-GPU: exact is what tf32x3 approximates
        return jax.lax.Precision.HIGHEST
    return _PRECISIONS[name]


# ------------------------------------------------------------------------------------- footprint, defaults

# The walks' query/key and value widths, for key dim K and value dim V (the dq and dk walks run with the value
# dim as their key: query=dO or v, key=v or dO), and those of the pieces' states each walk launches.
def walk_dims(kernel: str, K: int, V: int) -> tuple[tuple[int, int], ...]:
    if kernel in ("dq", "dk"):
        return ((V, K),)
    if kernel == "piece_states":  # the forward's and the reverse walks' (K, V), the dq walk's (V, K)
        return ((K, V), (V, K))
    return ((K, V),)


# Tiles loaded per chunk (rows x columns): query/key tiles [C, key width], value tiles [C, block].
_LOADS = {"forward": (2, 1), "dq": (2, 2), "dv": (2, 1), "dk": (2, 2), "piece_states": (1, 1)}


def footprint(kernel: str, walk: WalkConfig, key_dim: int, value_dim: int, dtype, precision: str = "tf32x3") -> dict:
    """What kernel ``kernel`` holds on chip with tiling ``walk`` for its key width ``key_dim`` and value width
    ``value_dim`` (see :func:`walk_dims`): its state tile (float32 elements) and its shared memory in bytes
    (fleetjax.pallas.launch.shared_memory_bytes, fitted to Triton's allocation for sm_90 by
    experiments/footprint.py). Float32 inputs with ``precision`` "tf32x3" count twice: XLA's Triton on the
    H200 (jax 0.11.2) asked for up to twice what Triton 3.6 allocates offline for those kernels (262144 vs
    131072 bytes, the forward walk at K=200, V=100), and crashed where the offline model said they fit."""
    C, kq = walk.chunk_size, padded(key_dim)
    block = min(walk.block_v, padded(value_dim))
    keys, values = _LOADS[kernel]
    loads = ((C, kq),) * keys + ((C, block),) * values
    staged = _STAGED[kernel](C, kq, block, jnp.dtype(dtype).itemsize < 4)
    shared = shared_memory_bytes(loads=loads, staged=staged, dtype=dtype, num_stages=walk.num_stages)
    if jnp.dtype(dtype) == f32 and precision == "tf32x3":
        shared *= 2
    return dict(state=kq * block, shared=shared)


def _staged_tiles(C: int, kq: int, block: int, half: bool, *, states: int, chunk_square: int = 1,
                  rows: int = 1) -> tuple:
    """The tiles a walk stages once per chunk for the tensor cores: copies of its state [kq, block] (the state
    products; hi/lo pairs with 16-bit inputs double them), [C, C] score tiles and [C, block] value tiles."""
    return ((kq, block),) * (states * (1 + half)) + ((C, C),) * chunk_square + ((C, block),) * (rows * (1 + half))


_STAGED = {
    "forward": lambda C, kq, b, half: _staged_tiles(C, kq, b, half, states=1),
    "dq": lambda C, kq, b, half: _staged_tiles(C, kq, b, half, states=2),
    "dv": lambda C, kq, b, half: _staged_tiles(C, kq, b, half, states=2),
    "dk": lambda C, kq, b, half: _staged_tiles(C, kq, b, half, states=2),
    # Float32 inputs: Triton stages the key tile once more for the IEEE-exact k^T v product (measured).
    "piece_states": lambda C, kq, b, half: (_staged_tiles(C, kq, b, half, states=0, chunk_square=0)
                                            + (() if half else ((C, kq),))),
}


def check_fits(config: PallasConfig, K: int, V: int, dtype, kernels=KERNELS) -> None:
    """ValueError naming the field of ``config`` whose kernel cannot fit the device (its state in registers,
    its tiles in shared memory)."""
    limit = shared_memory_per_block()
    for name in kernels:
        walk = getattr(config, name)
        if walk is None:  # the pieces' states then take each walk's own tiling, checked with it
            continue
        for key_dim, value_dim in walk_dims(name, K, V):
            use = footprint(name, walk, key_dim, value_dim, dtype, config.precision)
            if use["state"] > MAX_STATE_TILE:
                raise ValueError(f"config cannot fit: PallasConfig.{name}.block_v={walk.block_v} gives a float32 "
                                 f"state of {use['state']} values per program for K={K}, V={V}, more than "
                                 f"{MAX_STATE_TILE}; use a smaller block_v")
            if use["shared"] > limit:
                raise ValueError(f"config cannot fit: PallasConfig.{name} = {walk} needs about {use['shared']} "
                                 f"bytes of shared memory for K={K}, V={V}, {jnp.dtype(dtype).name}, more than the "
                                 f"device's {limit}; use fewer num_stages, a smaller block_v or chunk_size"
                                 + (", or precision='ieee'" if jnp.dtype(dtype) == f32 and config.precision == "tf32x3"
                                    else ""))


def _shrink(name: str, walk: WalkConfig, K: int, V: int, dtype, limit: int, chunk_fixed: bool,
            precision: str = "tf32x3") -> WalkConfig | None:
    """The largest tiling at or below ``walk`` that fits: fewer stages first, then narrower blocks, then
    (unless ``chunk_fixed``) shorter chunks. None if nothing fits."""
    chunks = [walk.chunk_size] if chunk_fixed else [c for c in (walk.chunk_size, 32, 16) if c <= walk.chunk_size]
    for chunk_size in chunks:
        for block_v in [b for b in (walk.block_v, 64, 32, 16) if b <= walk.block_v]:
            for num_stages in sorted({walk.num_stages, min(walk.num_stages, 2), 1}, reverse=True):
                candidate = dataclasses.replace(walk, chunk_size=chunk_size, block_v=block_v, num_stages=num_stages)
                uses = [footprint(name, candidate, *dims, dtype, precision) for dims in walk_dims(name, K, V)]
                if all(use["state"] <= MAX_STATE_TILE and use["shared"] <= limit for use in uses):
                    return candidate
    return None


def _most_pieces(T: int) -> int:
    """The most sequence pieces a default config splits T into: each keeps >= 512 positions, at most 64."""
    return max(1, min(64, T // 512))


def _pieces(programs: int, T: int, fill: int) -> int:
    """Split the sequence only while the grid holds fewer than ``fill`` programs, within
    :func:`_most_pieces`."""
    pieces = 1
    while programs * pieces < fill and 2 * pieces <= _most_pieces(T):
        pieces *= 2
    return pieces


def default_config(q: jax.Array, v: jax.Array) -> PallasConfig:
    """By shape, dtype and device, from sweeps on an H100 and H200 (experiments/tune_pallas.py and
    cost_split.py: bf16 K=V=128, chunk 64, 4 warps, 3 stages; forward value blocks of 64, then sequence
    pieces up to about one program per two SMs; the backward's walks in blocks of 32, then pieces up to about
    one program per SM), each kernel's tiling then shrunk until it fits the device's shared memory (float32:
    with tf32x3 products, else IEEE ones).

    The backward's rule, H200 2026-12-02 (results/2026-12-02-h200-tune_pallas_pieces.jsonl, the backward with
    the decay's gradient; that script's fwd_bwd left the forward dead until 2026-12-04): where batch*head is
    small, blocks of 32 at 4 warps beat blocks of 64 at 8, 10.9 -> 8.2 ms at B1 H16 T=131072 (4 pieces; 7.6
    with 8) and 1.70 -> 1.38-1.46 ms at B1 H8 T=32768 (8 pieces); more pieces at blocks of 64 gained less
    (9.9 ms) or lost (1.86 ms); at B4 H16 T=16384 (256 programs) two pieces lost (4.75 vs 4.15 ms)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.dtype(q.dtype)
    sms = multiprocessor_count()
    wide = dtype.itemsize >= 4
    forward_block = 32 if wide else 64
    backward_block = min(32, padded(min(K, V)))
    stages = 2 if wide else 3
    pieces = _pieces(B * H * -(-V // forward_block), T, fill=sms // 2)
    backward_pieces = _pieces(B * H * -(-max(K, V) // backward_block), T, fill=sms)
    piece_states = None
    if not wide and max(pieces, backward_pieces) > 1:
        # Few, long programs: pieces' states in chunks of 128 with 8 warps (fewer, fuller loads), and a
        # forward walk with four stages (loads further ahead hide more latency).
        piece_states = WalkConfig(chunk_size=128, block_v=forward_block, num_warps=8, num_stages=2)
        if pieces > 1:
            stages_forward = 4
        else:
            stages_forward = stages
    else:
        stages_forward = stages
    limit = shared_memory_per_block()
    # Four warps a walk, as the walks run on finite inputs (no containment, fleetjax.nonfinite): faster than
    # eight in every walk at bf16 K=V=128 on the H200 (experiments/cost_split.py).
    warps = dict(forward=4, dq=4, dv=4, dk=4)
    # Float32 heads too wide for tf32x3's staging fall back to IEEE products (exact, slower).
    for precision in ("tf32x3", "ieee") if wide else ("tf32x3",):
        fit = functools.partial(_shrink, K=K, V=V, dtype=dtype, limit=limit, precision=precision)
        forward = fit("forward", WalkConfig(block_v=forward_block, num_warps=warps["forward"],
                                            num_stages=stages_forward), chunk_fixed=False)
        walks = {}
        for chunk_size in (64, 32, 16):  # the backward's walks share one chunk size
            walks = {name: fit(name, WalkConfig(chunk_size=chunk_size, block_v=backward_block,
                                                num_warps=warps[name], num_stages=stages), chunk_fixed=True)
                     for name in ("dq", "dv", "dk")}
            if all(walks.values()):
                break
        states = None if piece_states is None else fit("piece_states", piece_states, chunk_fixed=False)
        if forward is not None and all(walks.values()) and (piece_states is None or states is not None):
            mosaic_walks = _mosaic_walks(K, V, dtype, limit, pieces=pieces, T=T, heads=B * H, fill=sms // 2)
            if mosaic_walks is not None and mosaic_walks.warpgroups == 2 and mosaic_walks.forward_pieces is None:
                # Half the programs, each twice as wide: twice the pieces fill the SMs again. The Triton
                # forward (segments, a returned final state) takes them too: 0.304 against 0.314 ms with the
                # final state at B1 H8 T=32768 (H200, 2026-12-03, ...-tune_warpgroups_default.jsonl).
                pieces *= 2
            return PallasConfig(forward=forward, piece_states=states, num_sequence_pieces=pieces,
                                backward_num_sequence_pieces=backward_pieces, precision=precision,
                                mosaic_walks=mosaic_walks, **walks)
    raise ValueError(f"fleetjax: no tiling of implementation='pallas' fits this device for K={K}, V={V}, "
                     f"{dtype.name} ({limit} bytes of shared memory per program)")


# The longest sequence at which the Mosaic forward takes two warpgroups of 32 value columns in one piece
# rather than of 64 in pieces of its own (see :func:`_mosaic_walks`), by the card's name (jax's device_kind),
# each card's from its own runs; NARROW_FORWARD_T for the others.
NARROW_FORWARD_T = 2048
NARROW_FORWARD_T_BY_CARD = {"H100": 32768}


def narrow_forward_t() -> int:
    """NARROW_FORWARD_T, or the default device's own entry in NARROW_FORWARD_T_BY_CARD."""
    kind = device_kind()
    return next((t for card, t in NARROW_FORWARD_T_BY_CARD.items() if card in kind), NARROW_FORWARD_T)


def _mosaic_walks(K: int, V: int, dtype, limit: int, *, pieces: int, T: int, heads: int,
                  fill: int) -> mosaic.MosaicWalkConfig | None:
    """The Mosaic GPU walks' tiling on sm_90 GPUs for 16-bit inputs with K in mosaic.KEY_DIMS: value blocks
    of 64 and three chunks in flight (H200, 2026-12-03, experiments/results/...-mosaic_forward*: the forward
    walk 0.41 against the Triton op's 0.60 ms at B4 H16 T=16384, 0.11 against 0.17 at T=4096), fewer stages
    where shared memory is short; None elsewhere.

    Two warpgroups a program in the forward walk (MosaicWalkConfig.warpgroups; the caller then doubles the
    forward's pieces) where the sequence is already split (``pieces`` > 1, and twice as many stay within
    :func:`_most_pieces` of ``T``): forward 0.193 against 0.233 ms at B1 H8 T=32768, 0.949 against 1.383 at
    B1 H16 T=131072.
    Where the split would be new (B4 H16 T=16384) the pieces' states cost what the walk gains (0.485 against
    0.486); with the pieces' states from the Mosaic walk's states-only form (mosaic.piece_states) it gains,
    so where one-warpgroup programs fill the SMs and two-warpgroup ones would not (``heads`` * V / 128 under
    ``fill``), two warpgroups take pieces of their own where those are equal whole chunks
    (MosaicWalkConfig.forward_pieces; the Triton forward, which would pay float32-accurate states for them,
    stays whole): forward 0.431 against 0.489 ms at B4 H16 T=16384, gated 0.502 against 0.559, 0.154 against
    0.156 and 0.176 against 0.178 at T=4096, bitwise the same outputs (H200, 2026-12-04, medians of four
    alternated runs, experiments/results/2026-12-04-h200-forward_pieces_ab.jsonl).

    Up to T = :func:`narrow_forward_t`, where those pieces' states and their passing cost more than the walk
    gains, two warpgroups of 32 value columns in one piece instead (MosaicWalkConfig.forward_block_v), where
    they fill as many SMs. On the H200 up to 2048: 0.0638 against 0.0692 ms at B4 H16 T=1024, 0.0831 against
    0.0884 at T=2048; even at T=4096, slower at T=8192 (0.237 against 0.223) and gated at T=4096 (0.154
    against 0.144) (2026-12-04, six alternated runs, ...-narrow_forward_ab.jsonl). On the H100 up to 32768
    (likely its slower HBM: the states walk reads the first piece's keys and values a second time): the
    forward's kernels took 0.1138 against 0.1321 ms at B4 H16 T=4096, 0.2079 against 0.2445 at T=8192, gated
    0.1262 against 0.1368 and 0.2291 against 0.2507 (ncu, one run each, 2026-12-07,
    experiments/results/2026-12-07-h100-fortythird_narrow_forward.txt); again 0.1130 against 0.1322 at
    T=4096, 0.3995 against 0.4582 at T=16384 and 0.8747 against 0.9134 at T=32768, gated 0.4289 against
    0.4664 and 0.8834 against 0.9342 (ncu, 2026-12-07, ...-h100-fortyfourth_narrow_forward.txt); the gain
    shrinks with T (14% at T=4096, 4% at T=32768), so longer sequences keep the pieces until timed.

    The backward's walks keep one warpgroup: with them on two as well, the backward (tune_pallas's fwd_bwd,
    which then timed the backward alone) took 1.295 against 1.233 ms and 7.36 against 6.90 (H200,
    2026-12-03, bf16, K = V = 128, experiments/results/2026-12-03-h200-tune_warpgroups{,_default}.jsonl)."""
    if not mosaic.on_hopper() or dtype.itemsize != 2 or K not in mosaic.KEY_DIMS or V % 64:
        return None
    for stages in (3, 2):
        config = mosaic.MosaicWalkConfig(block_v=64, stages=stages)
        if config.shared_memory_bytes(K, dtype.itemsize) <= limit:
            break
    else:
        return None
    wide = dataclasses.replace(config, warpgroups=2)
    if V % 128 or wide.shared_memory_bytes(K, dtype.itemsize) > limit:
        return config
    if 1 < pieces and 2 * pieces <= _most_pieces(T):
        return wide
    wide_pieces = _pieces(heads * (V // 128), T, fill)
    if pieces == 1 and wide_pieces > 1 and Chunking(T, config.chunk_size, wide_pieces).equal_pieces:
        if T <= narrow_forward_t() and heads * (V // 64) >= fill:
            return dataclasses.replace(wide, forward_block_v=32, forward_pieces=1)
        return dataclasses.replace(wide, forward_pieces=wide_pieces)
    return config


# ---------------------------------------------------------------------------------------- the walks

def _gated(decays: Decays, chunking: Chunking, B: int) -> dict:
    """The gated decay as the kernels read it: the gate [B, H, T] and the pieces' sums of la [B, H, P] (empty
    for the constant decay, which the kernels form from log gamma)."""
    if not decays.gated:
        return {}
    return dict(gate=decays.gate_tiles(), piece_log=_piece_log(decays, chunking, B))


def _piece_log(decays: Decays, chunking: Chunking, B: int) -> jax.Array:
    return decays.block_sums(B, chunking.T, chunking.piece_len)


def _local_states(key, value, decays: Decays, run_ids, *, reverse: bool, config: PallasConfig, launch: dict,
                  total_of):
    """A block's local state from a zero one and the local states of its pieces (the forward's, or mirrored,
    the reverse ones of the cotangent): (total_of(the states folded over the pieces), the pieces' states), the
    total NaN in the columns that a non-finite value of the run it holds reaches (the row's last run; reverse:
    its first).

    With ``config.choice_on_device`` the contained launches run always, skipping their chunks where the
    plain ones' witness is finite: the pieces' states. Every key and value entry enters its piece's state
    through its own product, where 0 * inf is NaN; a segment start may then drop it by selection, but only
    where the contained walk drops its zeroed value too, so a finite witness means the two walks agree.
    Else a lax.cond on the inputs' finiteness."""
    B = key.shape[0]
    chunking = config.chunking(key.shape[1], reverse)
    piece_log = _piece_log(decays, chunking, B)

    def states(contain: bool, skip=None, plain=None):
        local = fwd.piece_states(key, value, decays.log_decay, run_ids, chunking, reverse=reverse, all_pieces=True,
                                 contain=contain, gate=decays.gate_tiles(), skip=skip, **launch)
        total = total_of(fwd.fold_pieces(local, piece_log, run_ids, chunking, reverse))
        if not contain:
            return (total, local), local
        if skip is None:
            columns = nonfinite.in_run(nonfinite.bad(value), run_ids, "first" if reverse else "last")
        else:
            columns = marking.reached_columns(value, run_ids, reverse=reverse, skip=skip,
                                              chunk_size=chunking.chunk_size)
        total = nonfinite.mark(total, columns[:, :, None])
        if skip is not None:
            total, local = (jnp.where(skip, a, b) for a, b in zip(plain, (total, local)))
        return (total, local), None

    if config.choice_on_device:
        return nonfinite.contained_on_device(states)
    return nonfinite.contained_if_needed((key, value), lambda contain: states(contain)[0])


def local_state(k, v, decays: Decays, run_ids, *, config: PallasConfig):
    """A block's final state from a zero entering state (its last run's), [B, H, K, V] float32, and what the
    forward walk reuses of it (the local states of its pieces but the last, or None)."""
    total, local = _local_states(k, v, decays, run_ids, reverse=False, config=config,
                                 launch=config.piece_launch("forward", k.dtype), total_of=lambda total: total)
    return total, (local[:, :, :-1] if local.shape[2] > 1 else None)


def _forward(q, k, v, decays: Decays, start, run_ids, reuse, *, scale: float, config: PallasConfig,
             exact_state: bool):
    """(o, the state after the walk), NaN where a non-finite value reaches (fleetjax.nonfinite)."""
    B, T = q.shape[:2]
    chunking = config.chunking(T, False)
    walks_config = None if config.mosaic_walks is None else config.mosaic_walks.forward()
    # The Mosaic walk may split the sequence its own way (MosaicWalkConfig.forward_pieces), unless the pieces'
    # states come from the caller (``reuse``, in the PallasConfig's pieces).
    mosaic_chunking = chunking
    if reuse is None and walks_config is not None and walks_config.forward_pieces is not None:
        own = Chunking(T, chunking.chunk_size, walks_config.forward_pieces)
        if own.equal_pieces:  # the walk's grid; else the config's pieces
            mosaic_chunking = own
    on_mosaic = mosaic.supports(walks_config, dtype=q.dtype, K=q.shape[-1], V=v.shape[-1],
                                chunking=mosaic_chunking, segments=run_ids is not None, gated=decays.gated,
                                exact_state=exact_state)
    if on_mosaic and walks_config.gate_sums:  # in one launch, for the Mosaic walks and the contained ones beside
        decays = gate.formed(decays, mosaic_chunking.chunk_size)

    # The Mosaic walk's states after its pieces, [B, H, P, K, V]: the contained launch after it skips row by row
    # where their first rows (the witness, mosaic.witness_of) are finite, reading them in place.
    mosaic_finals = {}

    def walks(contain: bool, skip=None, plain=None):
        """((o, final), witness); with ``skip`` (contained only, the choice on the device) every launch visits
        no chunk where ``skip`` is True (after the Mosaic walk: row by row) and o is then ``plain``'s, whose
        buffer it takes."""
        local = reuse
        mosaic_here = on_mosaic and not contain
        gated = mosaic_here and decays.gated
        within = decays.within_chunks(B, T, chunking.chunk_size, base2=True) if gated else None
        if mosaic_here and mosaic_chunking is not chunking:  # its own pieces: states from its states-only form
            if mosaic_chunking.pieces > 1:
                local = mosaic.piece_states(k, v, decays.log_decay, mosaic_chunking, reverse=False,
                                            config=walks_config, within=within)
        elif chunking.pieces > 1 and local is None and not contain:
            # Float32-accurate only where the final state is used: otherwise they feed 16-bit outputs alone. The
            # Mosaic walk in the config's pieces takes these too: the states-only form timed even against them
            # at B1 H8 T=32768 (H200, 2026-12-04, experiments/results/...-forward_pieces_ab_b1h8.txt).
            local = fwd.piece_states(k, v, decays.log_decay, run_ids, chunking, reverse=False, all_pieces=False,
                                     contain=False, exact=exact_state, gate=decays.gate_tiles(),
                                     **config.piece_launch("forward", q.dtype))
        if mosaic_here:
            entering = mosaic.entering_states(start, local, decays, mosaic_chunking, B,
                                              zero_first=walks_config.zero_first)
            o, finals = mosaic.walk(q, k, v, decays.log_decay, entering, mosaic_chunking, reverse=False,
                                    scale=scale, config=walks_config, within=within, name="forward_walk")
            mosaic_finals["plain"] = finals
            return (o, finals[:, :, -1]), mosaic.witness_of(finals)
        # Contained: one piece, the walk marking what a non-finite value reaches (a launch, and the pieces'
        # states, fewer than marking after it; only inputs with a NaN or inf take it).
        walked = Chunking(T, chunking.chunk_size, 1) if contain else chunking
        # Row by row: every non-finite input of a row reaches its witness (mosaic.witness_of), and no other row's
        # outputs. States whose pieces or columns are not powers of two leave it to the reduction's flag.
        rows = mosaic_finals.get("plain") if skip is not None else None
        if rows is not None and not (_pow2(rows.shape[2]) and _pow2(rows.shape[4])):
            rows = None
        o, final, own = fwd.forward_walk(q, k, v, decays.log_decay, start, run_ids, walked, scale=scale,
                                         exact_state=exact_state, contain=contain, local=None if contain else local,
                                         skip=skip if rows is None else rows,
                                         keep_o=None if plain is None else plain[0],
                                         **_gated(decays, walked, B), **config.launch("forward", q.dtype))
        if skip is not None:  # the final state from the plain walks where the contained one was skipped
            if rows is not None:
                skip = jnp.all(jnp.isfinite(mosaic.witness_of(rows)), axis=(2, 3))[:, :, None, None]
            final = jnp.where(skip, plain[1], final)
        # o_t witnesses: q_t, k_t and v_t all reach it through its own pair (t, t); the walk hands on a
        # smaller array that holds a NaN whenever o does.
        return (o, final), own

    choose = nonfinite.contained_on_device if config.choice_on_device else nonfinite.contained_if_reached
    return choose(walks)


def block_forward(q, k, v, decays: Decays, start, run_ids, reuse, *, scale: float, config: PallasConfig):
    """o [B, T, H, V] from the entering state ``start``, with ``reuse`` from :func:`local_state`."""
    return _forward(q, k, v, decays, start, run_ids, reuse, scale=scale, config=config, exact_state=False)[0]


def local_reverse_state(q, do, decays: Decays, run_ids, *, scale: float, config: PallasConfig):
    """The cotangent of a block's entering state from its outputs alone: scale sum_t gamma^(t+1) q_t dO_t^T
    over its first run, [B, H, K, V] float32, and what ``block_backward`` reuses of it (the local reverse
    states of its pieces but the first, or None)."""
    total, local = _local_states(q, do, decays, run_ids, reverse=True, config=config,
                                 launch=config.piece_launch("dv", q.dtype),
                                 total_of=lambda total: vjp.only_first_run(scale * total, run_ids))
    return total, (local[:, :, 1:] if local.shape[2] > 1 else None)


def block_backward(q, k, v, decays: Decays, start, run_ids, do, exit_cotangent, reuse, *, scale: float,
                   config: PallasConfig, wanted: vjp.Wanted = vjp.Wanted()):
    """The three walks of fleetjax.pallas.backward, for a block entered with the state ``start`` whose final
    state has the cotangent ``exit_cotangent`` [B, H, K, V] (None: unused). ``reuse``: from
    :func:`local_reverse_state`, or None (computed here). ``wanted``: which of the decay's gradients and
    whether d start to form.

    Returns (dq, dk, dv in the inputs' dtype, d log_decay [H] and d log_gate [B, T, H] (None for the
    constant decay, or where not wanted) of every term but the one through the carry of ``start`` into the
    final state, d start [B, H, K, V] through the outputs alone (None where not wanted))."""
    do = do.astype(q.dtype)
    B, T = q.shape[:2]
    chunking = config.chunking(T, True)
    wanted = dataclasses.replace(wanted, log_gate=wanted.log_gate and decays.gated)

    on_mosaic = mosaic.serves_backward(config.mosaic_walks, dtype=q.dtype, K=q.shape[-1], V=v.shape[-1],
                                       chunking=chunking, segments=run_ids is not None, gated=decays.gated,
                                       exit_cotangent=exit_cotangent is not None, wanted=wanted)
    if on_mosaic and config.mosaic_walks.gate_sums:  # as in _forward, where the call did not form them
        decays = gate.formed(decays, chunking.chunk_size)
    common = dict(scale=scale, **_gated(decays, chunking, B))
    to_end = decays.to_end(B, T) if decays.gated and exit_cotangent is not None else None
    # Choosing on the device, the walks hand on d log_gate's parts (w, u, spanned, x), and the gradient is
    # formed once, from the chosen ones: from the gradients, XLA forms both walks' (their cumulative sums over
    # every position) and then selects one.
    gate_parts = config.choice_on_device and wanted.log_gate
    # PallasConfig.gate_grad_kernel: the parts stay per value block, both walks', for its launches to choose and sum.
    per_block = (gate_parts and config.gate_grad_kernel and not wanted.log_decay and exit_cotangent is None
                 and gate_grad.serves(T, chunking.chunk_size))

    def walks(contain: bool, skip=None, plain=None):
        """((dq, dk, dv, d log_decay, d log_gate, d start), witness); with ``skip`` (contained only, the choice
        on the device) every launch visits no chunk where ``skip`` is True and the gradients are then
        ``plain``'s: dq, dk and dv in their buffers, the rest selected."""
        mosaic_here = on_mosaic and not contain
        # On the device the contained walks' d log_decay is not read (_marked_on_device takes the plain walks'):
        # its sums are left out, and the products they would have fed stay float32-accurate (``exact``) so that
        # dq and dk are bitwise the lax.cond's.
        sums = wanted if skip is None else dataclasses.replace(wanted, log_decay=False)
        dq_local, reverse_local = None, reuse
        if chunking.pieces > 1:
            # The Mosaic dq walk carries the state's derivative in log gamma, the Triton one its crossing counts,
            # which count the walk's chunks: the local states are walked in those, also where the counts are
            # left out (the contained walks on the device), so that dq is bitwise the lax.cond's.
            counted = wanted.log_decay and not mosaic_here
            # MosaicWalkConfig.backward_piece_states: the pieces' states from the Mosaic states walk.
            mosaic_states = mosaic_here and config.mosaic_walks.backward_piece_states
            gated = mosaic_states and decays.gated
            within = decays.within_chunks(B, T, chunking.chunk_size, base2=True) if gated else None
            if mosaic_states:  # float32-accurate where the dq walk forms sums, with its tangent for the decay's
                dq_local = mosaic.piece_states(v, k, decays.log_decay, chunking, reverse=False,
                                               config=config.mosaic_walks, within=within,
                                               exact=wanted.log_decay or wanted.log_gate, tangent=wanted.log_decay)
            else:
                launch = config.piece_launch("dq", q.dtype)
                dq_local = fwd.piece_states(v, k, decays.log_decay, run_ids, chunking, reverse=False,
                                            all_pieces=False, counts=counted and sums.log_decay,
                                            tangent=wanted.log_decay and mosaic_here, contain=contain,
                                            gate=decays.gate_tiles(), skip=skip,
                                            **(dict(launch, chunk_size=chunking.chunk_size) if counted else launch))
            dq_local = dq_local if sums.log_decay else (dq_local, None)
            if reverse_local is None:  # float32-accurate where d start or the dk walk's sums read them
                sums_read = wanted.log_gate or (wanted.log_decay and not mosaic_here)
                exact = sums_read or wanted.initial_state
                if mosaic_states:
                    reverse_local = mosaic.piece_states(q, do, decays.log_decay, chunking, reverse=True,
                                                        config=config.mosaic_walks, within=within, exact=exact)
                else:
                    reverse_local = fwd.piece_states(q, do, decays.log_decay, run_ids, chunking, reverse=True,
                                                     all_pieces=False, contain=contain, gate=decays.gate_tiles(),
                                                     exact=exact, skip=skip, **config.piece_launch("dv", q.dtype))
        if mosaic_here:
            dq, dk, dv, parts, witness = mosaic.backward_walks(
                q, k, v, do, decays, start, chunking, dq_local, reverse_local,
                scale=scale, config=config.mosaic_walks, log_decay_wanted=wanted.log_decay,
                log_gate_wanted=wanted.log_gate, per_block=per_block)
            if per_block:
                return (dq, dk, dv, None, parts, None), witness
            d_log_decay, d_gate = _decay_gradients(wanted, chunking.chunk_size, gate_parts=gate_parts,
                                                   **(parts or {}))
            return (dq, dk, dv, d_log_decay, d_gate, None), witness
        # Only the wanted gradients' buffers are handed on: a pallas_call is never dropped, so handing on an
        # unwanted one would keep its plain walk.
        kept = (None,) * 3 if plain is None else wanted.inputs(*plain[:3])
        dq, w, counts, intra, spanned = bwd.dq_walk(q, k, v, do, decays.log_decay, start, run_ids, chunking,
                                                    contain=contain, local=dq_local, wanted=sums, exact=wanted.any,
                                                    intra=sums.log_decay or not contain, skip=skip, keep=kept[0],
                                                    per_block=per_block, **common, **config.launch("dq", q.dtype))
        dv, reverse_state = bwd.dv_walk(q, k, do, decays.log_decay, exit_cotangent, run_ids, chunking,
                                        contain=contain, local=reverse_local, to_end=to_end,
                                        start_wanted=wanted.initial_state, skip=skip, keep=kept[2], **common,
                                        **config.launch("dv", q.dtype))
        dk, u, x = bwd.dk_walk(q, k, v, do, decays.log_decay, exit_cotangent, run_ids, chunking, contain=contain,
                               local=reverse_local, to_end=to_end, wanted=sums, exact=wanted.any, skip=skip,
                               keep=kept[1], per_block=per_block, **common, **config.launch("dk", q.dtype))
        d_start = None if reverse_state is None else vjp.only_first_run(scale * reverse_state, run_ids)
        d_log_decay, d_gate = ((None, dict(w=w, u=u, spanned=spanned)) if per_block else _decay_gradients(
            sums, chunking.chunk_size, gate_parts=gate_parts, w=w, u=u, counts=counts, intra=intra,
            spanned=spanned, x=x))
        grads = (dq, dk, dv, d_log_decay, d_gate, d_start)
        if skip is not None:
            return _marked_on_device(grads, plain, q, k, v, do, run_ids=run_ids, skip=skip,
                                     chunk_size=chunking.chunk_size, per_block=per_block), intra
        # intra_t is the witness: scale sum_s (t - s) (q_t . k_s)(dO_t . v_s) over the chunk holds the pair
        # (t, t), lag 0 times a non-finite product being NaN, for q_t, k_t, v_t and dO_t alike.
        return (_mark_gradients(*grads, q, k, v, do, run_ids=run_ids) if contain else grads), intra

    choose = nonfinite.contained_on_device if config.choice_on_device else nonfinite.contained_if_reached
    dq, dk, dv, d_log_decay, d_gate, d_start = choose(walks)
    if per_block:  # both walks' parts, per value block, and the contained walks' marks
        plain_parts, contained_parts, reached, chosen = d_gate
        d_gate = gate_grad.log_gate_grad(plain_parts, contained_parts, reached, chosen,
                                         chunk_size=chunking.chunk_size)
    elif gate_parts:  # the chosen parts and the contained walks' marks (none where the plain walks were chosen)
        parts, marks = d_gate
        d_gate = nonfinite.mark(vjp.log_gate_grad(**parts, chunk_size=chunking.chunk_size), marks)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_decay, d_gate, d_start


def _decay_gradients(wanted: vjp.Wanted, chunk_size: int, *, gate_parts: bool = False, w=None, u=None, counts=None,
                     tangent=None, intra=None, decay=None, spanned=None, x=None):
    """(d log_decay [H], d log_gate [B, H, T]), each None where not ``wanted``, from the walks' per-position
    sums [B, H, T] (fleetjax.vjp: w, u, counts or tangent, intra, or their summand ``decay`` formed by the
    walk (vjp.log_decay_summand); the gate's spanned, the final state's x or None). ``gate_parts``: d log_gate
    as its parts, {w, u, spanned, x} (fleetjax.vjp.log_gate_grad's arguments), to be formed later."""
    d_log_decay = d_gate = None
    if wanted.log_decay:
        d_log_decay = (jnp.sum(decay, axis=(0, 2)) if decay is not None
                       else vjp.log_decay_grad(w, intra, chunk_size, u=u, counts=counts, tangent=tangent))
        if x is not None:
            d_log_decay = d_log_decay + vjp.exit_log_decay_grad(x)
    if wanted.log_gate:
        d_gate = dict(w=w, u=u, spanned=spanned, x=x) if gate_parts else vjp.log_gate_grad(w, u, spanned, x,
                                                                                          chunk_size)
    return d_log_decay, d_gate


def _marked_on_device(grads, plain, q, k, v, do, *, run_ids, skip, chunk_size: int, per_block: bool = False):
    """:func:`_mark_gradients`'s marks made by kernels (fleetjax.pallas.marking.mark_backward, a launch per
    gradient) that ``skip`` (every input finite) turns into none; then the gradients are the plain walks'
    ``plain``: dq, dk and dv through their buffers, the small ones selected (d log_decay: the plain one,
    marked). d log_gate comes as its parts (``_decay_gradients``'s gate_parts) and leaves as (the parts
    selected, its marks [B, H, T] bool, none where skipped); ``per_block``: as (the plain parts, the contained
    ones, the marking's two int32 flags of fleetjax.pallas.marking.mark_backward, ``skip``), chosen by
    fleetjax.pallas.gate_grad."""
    dq, dk, dv, d_log_decay, d_gate, d_start = grads
    dq, dk, dv, first, head, gate = marking.mark_backward(dq, dk, dv, q, k, v, do, run_ids, skip=skip,
                                                          gate_marks=d_gate is not None, chunk_size=chunk_size)
    if d_start is not None:
        d_start = jnp.where(skip, plain[5], nonfinite.mark(d_start, first[:, :, None]))
    if plain[3] is not None:
        # A head's d log_decay sums over its rows alone: the plain walks' is exact for a head without a bad
        # entry, so the contained walks leave its sums out.
        d_log_decay = nonfinite.mark(plain[3], head)
    if d_gate is not None and per_block:
        d_gate = (plain[4], d_gate, gate, skip)
    elif d_gate is not None:
        d_gate = (jax.tree.map(lambda chosen, contained: jnp.where(skip, chosen, contained), plain[4], d_gate),
                  marking.gate_reached(gate, skip))
    return dq, dk, dv, d_log_decay, d_gate, d_start


def _mark_gradients(dq, dk, dv, d_log_decay, d_gate, d_start, q, k, v, do, *, run_ids):
    """NaN into the gradients that a non-finite q, k, v or dO reaches. The kernels took the values of their
    products finite: k in the dq walk, dO in the dv walk, q in the dk walk, and dO in the reverse pieces'
    local states, which the dk walk enters too."""
    bad_q, bad_k, bad_v, bad_do = (nonfinite.bad(x) for x in (q, k, v, do))
    dq = nonfinite.mark_reached(dq, k, run_ids)
    dv = nonfinite.mark_reached(dv, do, run_ids, reverse=True)
    dk = nonfinite.mark_reached(dk, q, run_ids, reverse=True)
    # A bad entry of dO_t reaches every column of dk_s, s <= t in t's segment, through dO_t . v_s: the dk
    # walk's own state carries it within a piece, the pieces' local states (dO made finite) do not.
    any_entry = jnp.where(jnp.any(bad_do, -1, keepdims=True), jnp.nan, 0.0)
    dk = nonfinite.mark_reached(dk, any_entry, run_ids, reverse=True)
    if d_start is not None:
        d_start = nonfinite.mark(d_start, nonfinite.in_run(bad_do, run_ids, "first")[:, :, None])
    any_bad = lambda x: jnp.any(x, axis=(1, 3))  # noqa: E731  [B, H]
    if d_log_decay is not None:
        head = jnp.any(any_bad(bad_q) | any_bad(bad_k) | any_bad(bad_v) | any_bad(bad_do), axis=0)
        d_log_decay = nonfinite.mark(d_log_decay, head)
    if d_gate is not None:
        # d log_gate_r collects the pairs (t >= r > s): a bad key side at s < r, or a bad query side at t >= r.
        key_side = jnp.any(bad_k, -1) | jnp.any(bad_v, -1)
        query_side = jnp.any(bad_q, -1) | jnp.any(bad_do, -1)
        after = nonfinite.reached(key_side[..., None], run_ids, exclusive=True)[..., 0]
        before = nonfinite.reached(query_side[..., None], run_ids, reverse=True)[..., 0]
        d_gate = nonfinite.mark(d_gate, jnp.swapaxes(after | before, 1, 2))
    return dq, dk, dv, d_log_decay, d_gate, d_start


# ------------------------------------------------------------------------------------------- custom VJP

@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _pallas(q, k, v, log_decay, log_gate, initial_state, run_ids, sums, scale, config, exact_state):
    return _forward(q, k, v, gate.with_sums(Decays(log_decay, log_gate), sums), initial_state, run_ids, None,
                    scale=scale, config=config, exact_state=exact_state)


def _pallas_fwd(q, k, v, log_decay, log_gate, initial_state, run_ids, sums, scale, config, exact_state):
    wanted = vjp.wanted(log_decay, log_gate, initial_state, q, k, v)
    *floats, run_ids, sums = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (q, k, v, log_decay, log_gate, initial_state, run_ids, sums))
    # A second derivative would differentiate this forward's kernels too: refuse it there as well.
    primals = tuple(None if x is None else vjp.first_order_only(x) for x in floats) + (run_ids, sums)
    return _pallas(*primals, scale, config, exact_state), primals + (wanted,)


def pallas_backward(scale: float, config: PallasConfig, residuals, cotangents):
    """The VJP shared by both Pallas implementations: residuals (q, k, v, log_decay, log_gate, initial_state,
    run_ids[, the gate's sums formed before the forward (fleetjax.pallas.gate.chunk_sums) or None],
    :class:`fleetjax.vjp.Wanted`), cotangents (dO, d final_state), either possibly a symbolic zero. Returns
    (dq, dk, dv, d log_decay, d log_gate, d initial_state, None), a decay's gradient None where not wanted:
    :func:`block_backward` with the final state's cotangent as the exit's, plus the terms of the carry of the
    initial state into the final state."""
    q, k, v, log_decay, log_gate, initial_state, run_ids, *sums, wanted = residuals
    decays = gate.with_sums(Decays(log_decay, log_gate), sums[0] if sums else None)
    do, d_final = cotangents
    do = jnp.zeros(v.shape, q.dtype) if vjp.is_zero(do) else do
    d_final = None if vjp.is_zero(d_final) else d_final
    dq, dk, dv, d_log_decay, d_gate, d_initial = block_backward(q, k, v, decays, initial_state, run_ids, do,
                                                                d_final, None, scale=scale, config=config,
                                                                wanted=wanted)
    if d_final is not None and initial_state is not None:  # None: a zero state, carried nowhere
        carry = vjp.whole_row_carry(decays, run_ids, q.shape[0], q.shape[1])
        if d_initial is not None:
            d_initial = d_initial + carry[..., None, None] * d_final
        term = vjp.carry_term(carry, d_final, initial_state)  # [B, H]
        if d_log_decay is not None:
            d_log_decay = d_log_decay + q.shape[1] * jnp.sum(term, axis=0)
        if d_gate is not None:
            d_gate = d_gate + term[:, :, None]
    dq, dk, dv = wanted.inputs(dq, dk, dv)
    grads = (dq, dk, dv, d_log_decay, None if d_gate is None else jnp.swapaxes(d_gate, 1, 2), d_initial)
    return tuple(None if g is None else vjp.first_order_only(g) for g in grads) + (None,)


# The gate's sums take no cotangent: they enter with their gradient stopped, and d log_gate is the VJP's own.
_pallas.defvjp(_pallas_fwd, lambda scale, config, exact_state, residuals, cotangents:
               pallas_backward(scale, config, residuals, cotangents) + (None,), symbolic_zeros=True)

# Sequence parallelism (fleetjax.sharding) with no pass over a block beyond what one device's call makes,
# except the launch of the last (in reverse: the first) piece's local state.
BLOCK_KERNELS = BlockKernels(local_state, block_forward, local_reverse_state, block_backward)


def canonical_dtype(q, k, v):
    """The kernels take bfloat16, float16 or float32 inputs; others (float64 with x64) run in float32."""
    if q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        return q, k, v
    return tuple(x.astype(f32) for x in (q, k, v))


def pallas_impl(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale: float, config: PallasConfig,
                final_state: bool = True):
    """The fused chunked Pallas kernels; returns (o [B, T, H, V] in the kernels' dtype, final state f32).
    ``final_state``: the caller uses the final state (its updates are then float32-accurate)."""
    q, k, v = canonical_dtype(q, k, v)
    check_fits(config, q.shape[-1], v.shape[-1], q.dtype)
    # Where the Mosaic walks may take a gate, its sums are formed once here, outside the custom VJP: its
    # forward and backward read the same launch's, and a forward whose outputs nobody reads (a rematerialized
    # one) is still dropped as a whole.
    walks = config.mosaic_walks
    formed = log_gate is not None and walks is not None and walks.gate_sums
    sums = gate.chunk_sums_of(log_decay, log_gate, walks.chunk_size) if formed else None
    return _pallas(q, k, v, log_decay, log_gate, initial_state, run_ids, sums, scale, config, final_state)


IMPLEMENTATION = Implementation(
    "pallas", pallas_impl, "the fused chunked walk: one program per (batch*head, value block[, sequence piece]) "
    "keeps the [K, block_v] state on chip across the chunks", platforms=("gpu",), interpret=True,
    config_type=PallasConfig, default_config=default_config, custom_vjp=True, higher_order=False,
    block_kernels=BLOCK_KERNELS, takes_no_state=True)
