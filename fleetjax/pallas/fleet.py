"""implementation="pallas_fleet": FleetAttention's partition as a race-free, bitwise-deterministic Pallas kernel.

FleetAttention (LeetDecoding, arXiv 2501.02573) writes the operator as a sum over the rank (the K axis) of
rank-one causal products, and its Triton kernel splits the work over (rank block, batch*head, value block):
each program walks the sequence keeping a running accumulator of its rank rows of the state,

    S[r] <- gamma S[r] + k_t[r] v_t[vb]^T            ([BK, BV], float32, on chip for the whole walk)
    o_t[vb] += scale * q_t[r]^T S[r]                 (the rank block's share of the output)

and the published kernel adds the shares of the rank blocks into the output with unsynchronized
load/add/store, which races (its result is wrong for K > 1 and changes from run to run). This module keeps
that grid, (rank blocks, batch*head, value blocks, sequence pieces), and reduces the rank blocks without
any race:

- block_k >= K (the default for K <= 128): one rank block, all ranks in one program, which writes o directly.
  Nothing to reduce, no extra HBM traffic.
- block_k < K: rank block r writes its share into its own slice ``partial[r]`` of a float32
  [n_rank_blocks, B, T, H, V] buffer; a fixed-order sum ``partial[0] + partial[1] + ...`` (an element-wise
  XLA fusion, no atomics) follows. Every output element is written by exactly one program, so the result
  is the same bits on every run.

How a program walks its piece of the sequence (``tokens_per_step``):

- tokens_per_step = 1: the published kernel's walk, one position per loop iteration, with element-wise
  outer products (``k[:, None] * v[None, :]``) and a reduction over the rank rows for o_t.
- tokens_per_step = C >= 16 (the default): the same walk, C positions per loop iteration. The tile's q, k,
  v are loaded in one wide load each, and the C per-position steps are evaluated together with tensor-core
  products (local index i, entering state S of the rank block):

      o_i[r]  = scale * ( gamma^(i+1) q_i[r]^T S[r]  +  sum_{j <= i} gamma^(i-j) (q_i[r] . k_j[r]) v_j )
      S[r]   <- gamma^C S[r]  +  sum_j gamma^(C-1-j) k_j[r] v_j^T

  which is exactly what C single steps produce (the rank block's share of o_i is q_i[r]^T S_i[r] with
  S_i[r] the running accumulator after position i). Sum over the rank blocks gives the operator.

Sequence pieces (num_sequence_pieces = P > 1, fleetjax.state_passing): the grid gains a fourth axis; piece p
walks its positions from a zero state (piece 0 from the initial state) and returns its local final state
L_p. The entering states follow from an exclusive scan, S_1 = L_0 and S_{p+1} = c_p S_p + L_p with
c_p = gamma^len_p (0 if the piece opens a new run), and positions of the piece's first run get
scale * gamma^(i+1) q_i^T S_p added (i local to the piece). This fills the GPU when B*H is small.

Packed sequences (run ids, fleetjax/segments.py): inside a tile, positions interact only within the same run;
the state entering a tile reaches only the positions of the run it belongs to, and the state leaving a tile
keeps only the tile's last run. The initial state reaches exactly run 0.

Float32 accumulation always; 16-bit inputs go to the tensor cores in their own dtype (the score tile and
the state, scaled first so that float16 stays in range, are rounded to it for the products; the state is
updated with float32's accuracy where it leaves the kernel), float32 inputs use IEEE float32 products. The
tile path is the chunk math of fleetjax.pallas.chunk, non-finite inputs included. T and the head dims are arbitrary: loads and stores are masked (the tail tile of the sequence,
the columns beyond K and V), so nothing is read or written out of bounds. On CPU the kernel runs in Pallas
interpret mode.

The gradient does not depend on the forward partition: the custom VJP's backward is the fused chunked Pallas
backward of implementation="pallas" (fleetjax.pallas.chunked.pallas_backward) with its default config.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fleetjax import nonfinite, vjp
from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.implementation import Implementation
from fleetjax import chunk as cm
from fleetjax.pallas import chunked
from fleetjax.pallas.launch import call, multiprocessor_count, on_gpu, shared_memory_bytes, shared_memory_per_block
from fleetjax.pallas.walk import columns, load_rows, padded, program_id, store_rows, walk
from fleetjax.state_passing import pass_states

f32 = jnp.float32

_MAX_STATE_TILE = 128 * 128  # [block_k, block_v] float32 elements kept in registers per program
_MAX_LOAD_TILE = 128 * 128  # elements of one [tokens_per_step, block] input tile


def _pow2(n) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """How the Fleet kernel partitions and walks the problem.

    block_k: rank rows per program (a power of two >= 16), or None for all of K in one program (K padded to a
      power of two). With block_k < K the rank blocks write float32 partial outputs that are summed after.
    block_v: value columns per program (a power of two >= 16; clipped to V padded to a power of two).
    tokens_per_step: positions per loop iteration: 1 (the published per-token walk, element-wise) or a
      power of two >= 16 (a tile per iteration with tensor-core products). Clipped to T padded.
    num_sequence_pieces: pieces of the sequence walked in parallel and joined by state passing.
    num_warps, num_stages: Triton launch parameters (powers of two for num_warps, 1..32; num_stages >= 1).
    """

    block_k: int | None = None
    block_v: int = 64
    tokens_per_step: int = 64
    num_sequence_pieces: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        def check_int(name, value, minimum):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"FleetConfig.{name} must be an int >= {minimum}, got {value!r}")

        if self.block_k is not None:
            check_int("block_k", self.block_k, 16)
            if not _pow2(self.block_k):
                raise ValueError(f"FleetConfig.block_k must be None or a power of two >= 16, got {self.block_k}")
        check_int("block_v", self.block_v, 16)
        if not _pow2(self.block_v):
            raise ValueError(f"FleetConfig.block_v must be a power of two >= 16, got {self.block_v}")
        check_int("tokens_per_step", self.tokens_per_step, 1)
        if self.tokens_per_step != 1 and (self.tokens_per_step < 16 or not _pow2(self.tokens_per_step)):
            raise ValueError("FleetConfig.tokens_per_step must be 1 or a power of two >= 16, "
                             f"got {self.tokens_per_step}")
        check_int("num_sequence_pieces", self.num_sequence_pieces, 1)
        check_int("num_warps", self.num_warps, 1)
        if not _pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"FleetConfig.num_warps must be a power of two in [1, 32], got {self.num_warps}")
        check_int("num_stages", self.num_stages, 1)
        if self.block_k is not None and self.block_k * self.block_v > _MAX_STATE_TILE:
            raise ValueError(f"FleetConfig: block_k * block_v = {self.block_k * self.block_v} exceeds "
                             f"{_MAX_STATE_TILE} float32 state elements per program")


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """The config clipped to one call's shapes: rank and value blocks, and the chunking of the walk."""

    block_k: int
    block_v: int
    chunking: Chunking  # chunks of tokens_per_step positions, grouped into the sequence pieces

    def count(self, K: int, V: int) -> tuple[int, int]:
        return -(-K // self.block_k), -(-V // self.block_v)


def _shared_memory(config: FleetConfig, block_k: int, block_v: int, tokens: int, dtype) -> int:
    if tokens == 1:
        return 0
    return shared_memory_bytes(loads=((tokens, block_k), (tokens, block_k), (tokens, block_v)),
                               staged=((block_k, block_v), (tokens, tokens), (tokens, block_v), (tokens, block_v)),
                               dtype=dtype, num_stages=config.num_stages)


def _blocks(config: FleetConfig, T: int, K: int, V: int, dtype) -> _Blocks:
    """Clip the config to the shapes and check that it fits; raises ValueError naming ``config``."""
    block_k = padded(K) if config.block_k is None else min(config.block_k, padded(K))
    block_v = min(config.block_v, padded(V))
    if block_k * block_v > _MAX_STATE_TILE:
        raise ValueError(f"config: the state tile block_k x block_v = {block_k} x {block_v} for K={K}, V={V} "
                         f"exceeds {_MAX_STATE_TILE} float32 elements per program; set FleetConfig.block_k "
                         "(for example 64) or a smaller block_v")
    tokens = config.tokens_per_step
    if tokens > 1:
        tokens = min(tokens, padded(T))
        if tokens * max(block_k, block_v) > _MAX_LOAD_TILE:
            raise ValueError(f"config: a tile of tokens_per_step x block = {tokens} x {max(block_k, block_v)} "
                             f"exceeds {_MAX_LOAD_TILE} elements; use a smaller tokens_per_step or blocks")
    shared, limit = _shared_memory(config, block_k, block_v, tokens, dtype), shared_memory_per_block()
    if shared > limit:
        raise ValueError(f"config cannot fit: {config} needs about {shared} bytes of shared memory for K={K}, "
                         f"V={V}, {jnp.dtype(dtype).name}, more than the device's {limit}; use fewer num_stages, "
                         "a smaller block_k, block_v or tokens_per_step")
    return _Blocks(block_k, block_v, Chunking(T, tokens, min(config.num_sequence_pieces, max(T, 1))))


def default_config(q: jax.Array, v: jax.Array) -> FleetConfig:
    """A heuristic config for q [B, T, H, K], v [B, T, H, V] on the default backend.

    All ranks in one program up to K = 128 (no partial outputs to sum), rank blocks of 128 above; tiles of
    64 positions (32 for float32 inputs); value blocks and, when B*H is small and T long, sequence pieces
    chosen so that there is at least one program per multiprocessor (each program is one long dependent
    walk, so an idle SM is time lost for the whole call); then stages and value blocks reduced until the
    tiles fit the device's shared memory.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    wide = jnp.dtype(q.dtype).itemsize >= 4
    tokens = 32 if wide else 64
    block_k = None if K <= 128 else 128
    if not on_gpu():
        # Interpret mode: the smallest grid is the fastest; tiles as long as the sequence needs.
        return FleetConfig(block_k=block_k, block_v=min(128 if K <= 64 else 64, padded(V)), tokens_per_step=tokens)
    sms = multiprocessor_count()
    # Value blocks of 64 when they alone give every SM a program, else 32 (each value block re-reads q, k
    # and recomputes the q k^T scores, so narrower blocks only pay off when they fill the GPU).
    block_v = 64 if B * H * -(-V // 64) >= sms else 32
    programs = -(-K // 128) * B * H * -(-V // block_v)  # rank blocks x batch*head x value blocks
    pieces = 1
    if 0 < programs < sms:  # (no programs: an empty batch)
        # Pieces of at least 1024 positions: shorter ones spend more on the state passing than they save.
        pieces = max(1, min(-(-sms // programs), T // 1024))
    limit = shared_memory_per_block()
    bk = padded(K) if block_k is None else block_k
    for stages in (3, 2, 1):
        for bv in (b for b in (block_v, 32, 16) if b <= block_v):
            config = FleetConfig(block_k=block_k, block_v=bv, tokens_per_step=tokens, num_sequence_pieces=pieces,
                                 num_warps=4, num_stages=stages)
            if _shared_memory(config, bk, min(bv, padded(V)), min(tokens, padded(T)), q.dtype) <= limit:
                return config
    return FleetConfig(block_k=block_k, block_v=16, tokens_per_step=16, num_sequence_pieces=pieces, num_stages=1)


# ------------------------------------------------------------------------------------------------- kernel

def fleet_kernel(*, log_decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, final_ref, run_ref=None, gate_ref=None,
                 blocks: _Blocks, n_heads: int, K: int, V: int, scale: float, exact_state: bool, contain: bool,
                 precision):
    """One program: rank block r, (batch, head) bh, value block j, sequence piece p. Refs (leading grid dims
    squeezed): q, k [T, block_k]; v, o [T, block_v]; s0 [block_k, block_v] float32 (read by piece 0);
    run [T] int32; gate [T] (gated); final [block_k, block_v] float32 (the piece's state from its entering
    one). ``contain``: keep non-finite values where they belong (fleetjax.nonfinite)."""
    r, bh, j, p = (program_id(axis, log_decay_ref) for axis in range(4))
    log_decay = log_decay_ref[jax.lax.rem(bh, n_heads)]
    chunking = blocks.chunking
    k_cols = columns(k_ref, K, blocks.block_k, r)
    v_cols = columns(v_ref, V, blocks.block_v, j)
    dtype = k_ref.dtype
    start = p * chunking.piece_len
    # Only piece 0 enters with the initial state; later pieces start from zero (state passing adds the rest).
    state = jnp.where(p == 0, plt.load(s0_ref, mask=k_cols[:, None] & v_cols[None, :], other=0.0), 0.0)
    # The run of the position before the piece: the entering state reaches only that run (run 0 at the start).
    edge = None if run_ref is None else jnp.where(start > 0, run_ref[jnp.maximum(start - 1, 0)], 0)

    def store_state(state):
        # Masked: the final state is [K, V], not padded to the blocks, and a compiled kernel does not bound
        # a plain block write, so the rows beyond K and the columns beyond V would land in other programs'
        # states and in whatever buffer follows the array.
        plt.store(final_ref, state, mask=k_cols[:, None] & v_cols[None, :])

    if chunking.chunk_size == 1:
        end = jnp.minimum(start + chunking.piece_len, chunking.T)

        def token(t, carry):
            state, before = carry
            q_t = plt.load(q_ref.at[t, :], mask=k_cols, other=0.0).astype(f32)
            k_t = plt.load(k_ref.at[t, :], mask=k_cols, other=0.0).astype(f32)
            v_t = plt.load(v_ref.at[t, :], mask=v_cols, other=0.0).astype(f32)
            if contain:
                v_t = jnp.where(jnp.isfinite(v_t), v_t, 0.0)
            if run_ref is not None:
                run_t = run_ref[t]
                state = jnp.where(run_t == before, state, 0.0)  # a new run starts from zero (selected)
                before = run_t
            la = log_decay if gate_ref is None else log_decay + gate_ref[t]
            state = jnp.exp(la) * state + k_t[:, None] * v_t[None, :]
            o_t = scale * jnp.sum(q_t[:, None] * state, axis=0)
            plt.store(o_ref.at[t, :], o_t.astype(o_ref.dtype), mask=v_cols)
            return state, before

        state, _ = jax.lax.fori_loop(start, end, token, (state, jnp.int32(0) if edge is None else edge))
        store_state(state)
        return

    def body(ch: cm.Chunk, state):
        q, k = load_rows(q_ref, ch, k_cols), load_rows(k_ref, ch, k_cols)
        v = cm.finite_values(load_rows(v_ref, ch, v_cols), contain)
        o, _ = cm.output(q, cm.scores(q, k, ch, precision, contain), v, state, ch, scale=scale, dtype=dtype,
                         precision=precision, exact=False)
        state = cm.update(state, k, v, ch, dtype=dtype, precision=precision, exact=exact_state)
        store_rows(o_ref, ch, o, v_cols)
        return state

    store_state(walk(body, state, piece=p, chunking=chunking, reverse=False, log_decay=log_decay, run_ref=run_ref,
                     edge_ref=None if edge is None else edge[None], gate_ref=gate_ref))


def _fleet_call(q, k, v, log_decay, gate, initial_state, run_ids, *, scale: float, config: FleetConfig,
                blocks: _Blocks, exact_state: bool, contain: bool):
    """The pallas_call. Returns (o or rank-block partials, local final states [P, B, H, K, V] float32). gate:
    the log gate [B, H, T] or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    nk, nv = blocks.count(K, V)
    P = blocks.chunking.pieces
    BK, BV = blocks.block_k, blocks.block_v
    precision = None if q.dtype in (jnp.bfloat16, jnp.float16) else jax.lax.Precision.HIGHEST  # IEEE, not tf32
    # The rank blocks share one output only when there is one of them; otherwise each has its own float32
    # slice. Pieces add a float32 correction later, so they also keep o in float32.
    direct = nk == 1
    out_dtype = q.dtype if direct and P == 1 else f32
    batch, head = (lambda bh: jax.lax.div(bh, H)), (lambda bh: jax.lax.rem(bh, H))
    rows = lambda width, block: pl.BlockSpec((None, T, None, width), lambda r, bh, j, p: (batch(bh), 0, head(bh), block(r, j)))
    if direct:
        o_out = (((B, T, H, V), out_dtype), rows(BV, lambda r, j: j))
    else:
        o_out = (((nk, B, T, H, V), f32),
                 pl.BlockSpec((None, None, T, None, BV), lambda r, bh, j, p: (r, batch(bh), 0, head(bh), j)))
    kernel = functools.partial(fleet_kernel, blocks=blocks, n_heads=H, K=K, V=V, scale=scale,
                               exact_state=exact_state, contain=contain, precision=precision)
    out = call(kernel, name="fleet_attention_fwd", grid=(nk, B * H, nv, P),
               inputs=dict(log_decay_ref=(log_decay, pl.BlockSpec((H,), lambda r, bh, j, p: (0,))),
                           q_ref=(q, rows(BK, lambda r, j: r)), k_ref=(k, rows(BK, lambda r, j: r)),
                           v_ref=(v, rows(BV, lambda r, j: j)),
                           s0_ref=(initial_state, pl.BlockSpec((None, None, BK, BV),
                                                               lambda r, bh, j, p: (batch(bh), head(bh), r, j))),
                           run_ref=None if run_ids is None else (run_ids, pl.BlockSpec(
                               (None, T), lambda r, bh, j, p: (batch(bh), 0))),
                           gate_ref=None if gate is None else (gate, pl.BlockSpec(
                               (None, None, T), lambda r, bh, j, p: (batch(bh), head(bh), 0)))),
               outputs=dict(o_ref=o_out, final_ref=(((P, B, H, K, V), f32), pl.BlockSpec(
                   (None, None, None, BK, BV), lambda r, bh, j, p: (p, batch(bh), head(bh), r, j)))),
               num_warps=config.num_warps, num_stages=config.num_stages)
    return out["o_ref"], out["final_ref"]


def _join_pieces(q, o, local_final, decays: Decays, run_ids, scale: float, chunking: Chunking):
    """State passing between sequence pieces: entering states by an exclusive scan, then the correction.

    o [B, T, H, V] float32 from pieces that started from zero (piece 0 from the initial state);
    local_final [P, B, H, K, V]. Returns (o, final state).
    """
    B, T, H, _ = q.shape
    P, L = chunking.pieces, chunking.piece_len
    starts = chunking.piece_starts
    ends = starts + chunking.piece_lengths
    # Does each piece's last position still belong to the run that entered it?
    if run_ids is None:
        entering_run = None
        keeps = jnp.ones((P, B), bool)
    else:
        entering_run = jnp.concatenate([jnp.zeros((B, 1), run_ids.dtype), run_ids[:, starts[1:] - 1]], 1)  # [B, P]
        keeps = (run_ids[:, ends - 1] == entering_run).T  # [P, B]
    carry = jnp.moveaxis(jnp.exp(decays.block_sums(B, T, L)), 2, 0)  # [P, B, H]
    keep = jnp.broadcast_to(keeps[:, :, None], (P, B, H))
    # S_1 = L_0 (piece 0 already started from the initial state, so it needs no correction).
    later, final_state = pass_states(local_final[0], local_final[1:], carry[1:], keep[1:])
    entering = jnp.concatenate([jnp.zeros_like(local_final[:1]), later])  # [P, B, H, K, V]

    pad = P * L - T
    qp = jnp.pad(q.astype(f32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, P, L, H, -1)
    # The decay from each piece's start through each of its positions: the entering state's factor.
    la = jnp.pad(decays.per_position(B, T), ((0, 0), (0, 0), (0, pad))).reshape(B, H, P, L)
    factor = jnp.exp(jnp.cumsum(la, axis=-1)).transpose(0, 2, 3, 1)  # [B, P, L, H]
    reached = jnp.ones((B, P, L, H), bool)
    if run_ids is not None:
        runs = jnp.pad(run_ids, ((0, 0), (0, pad)), mode="edge").reshape(B, P, L)
        reached = jnp.broadcast_to((runs == entering_run[:, :, None])[..., None], (B, P, L, H))
    correction = jnp.einsum("bplhk,pbhkv->bplhv", qp, entering, precision=jax.lax.Precision.HIGHEST)
    # Selected, not multiplied: a NaN state of one segment must not reach another.
    correction = jnp.where(reached[..., None], scale * factor[..., None] * correction, 0.0)
    return o + correction.reshape(B, P * L, H, -1)[:, :T], final_state


@functools.partial(jax.jit, static_argnames=("scale", "config", "exact_state"))
def _forward(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale: float, config: FleetConfig,
             exact_state: bool):
    q, k, v = chunked.canonical_dtype(q, k, v)
    decays = Decays(log_decay.astype(f32), log_gate)
    blocks = _blocks(config, q.shape[1], q.shape[3], v.shape[3], q.dtype)

    def walks(contain: bool):
        o, local_final = _fleet_call(q, k, v, decays.log_decay, decays.gate_tiles(), initial_state.astype(f32),
                                     run_ids, scale=scale, config=config, blocks=blocks, exact_state=exact_state,
                                     contain=contain)
        if blocks.count(q.shape[3], v.shape[3])[0] > 1:
            # Fixed-order sum of the rank blocks' float32 partials: element-wise, no atomics, same bits every run.
            o = functools.reduce(jnp.add, list(o))
        if blocks.chunking.pieces > 1:
            o, final = _join_pieces(q, o, local_final, decays, run_ids, scale, blocks.chunking)
        else:
            o, final = o, local_final[0]
        # o_t is the witness: q_t, k_t and v_t all reach it through its own pair (t, t).
        return (nonfinite.mark_forward(o, final, v, run_ids) if contain else (o, final)), o

    return nonfinite.contained_if_reached(walks)


# ---------------------------------------------------------------------------------------------- custom VJP

@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pallas_fleet(q, k, v, log_decay, log_gate, initial_state, run_ids, scale, config, exact_state):
    return _forward(q, k, v, log_decay, log_gate, initial_state, run_ids, scale=scale, config=config,
                    exact_state=exact_state)


def _pallas_fleet_fwd(q, k, v, log_decay, log_gate, initial_state, run_ids, scale, config, exact_state):
    # symbolic_zeros=True: the primals arrive wrapped (saying which are differentiated); an unused output's
    # cotangent stays a SymbolicZero, which lets the backward skip its terms (the final state's, most often).
    wanted = vjp.wanted(log_decay, log_gate, initial_state, q, k, v)
    *floats, run_ids = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (q, k, v, log_decay, log_gate, initial_state, run_ids))
    # A second derivative would differentiate this forward's kernel: refuse it with a clear message.
    q, k, v, log_decay, log_gate, initial_state = (None if x is None else vjp.first_order_only(x) for x in floats)
    o, final_state = _forward(q, k, v, log_decay, log_gate, initial_state, run_ids, scale=scale, config=config,
                              exact_state=exact_state)
    return (o, final_state), (q, k, v, log_decay, log_gate, initial_state, run_ids, wanted)


def _pallas_fleet_bwd(scale, config, exact_state, residuals, cotangents):
    """The gradient does not depend on the forward's partition: implementation="pallas"'s backward."""
    del config, exact_state
    q0, k0, v0 = residuals[:3]
    q, k, v = chunked.canonical_dtype(q0, k0, v0)
    dq, dk, dv, *rest = chunked.pallas_backward(scale, chunked.default_config(q, v), (q, k, v) + tuple(residuals[3:]),
                                                cotangents)
    return (*(None if g is None else g.astype(x.dtype) for g, x in ((dq, q0), (dk, k0), (dv, v0))), *rest)


_pallas_fleet.defvjp(_pallas_fleet_fwd, _pallas_fleet_bwd, symbolic_zeros=True)


def pallas_fleet_impl(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale: float, config: FleetConfig,
                      final_state: bool = True):
    """FleetAttention's partition; returns (o [B, T, H, V], final state [B, H, K, V] float32).

    q, k [B, T, H, K]; v [B, T, H, V] in one float dtype; log_decay [H] float32; initial_state
    [B, H, K, V] float32; run_ids None or int32 [B, T]. o is in the inputs' dtype with one rank block and
    one piece, float32 otherwise (the API casts it). ``final_state``: the caller uses the final state (its
    updates are then float32-accurate).
    """
    if not isinstance(config, FleetConfig):
        raise TypeError(f"config must be a FleetConfig, got {type(config).__name__}")
    return _pallas_fleet(q, k, v, log_decay, log_gate, initial_state, run_ids, float(scale), config, final_state)


IMPLEMENTATION = Implementation(
    "pallas_fleet", pallas_fleet_impl, "FleetAttention's partition (rank block x batch*head x value block) with "
    "a running accumulator on chip, rank blocks reduced deterministically", platforms=("gpu",), interpret=True,
    config_type=FleetConfig, default_config=default_config, custom_vjp=True, higher_order=False,
    backward_of="pallas")
