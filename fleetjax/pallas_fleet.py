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

Sequence pieces (num_sequence_pieces = P > 1, DESIGN.md section 1): the grid gains a fourth axis; piece p
walks its positions from a zero state (piece 0 from the initial state) and returns its local final state
L_p. The entering states follow from an exclusive scan, S_1 = L_0 and S_{p+1} = c_p S_p + L_p with
c_p = gamma^len_p (0 if the piece opens a new run), and positions of the piece's first run get
scale * gamma^(i+1) q_i^T S_p added (i local to the piece). This fills the GPU when B*H is small.

Packed sequences (run ids, fleetjax/segments.py): inside a tile, positions interact only within the same run;
the state entering a tile reaches only the positions of the run it belongs to, and the state leaving a tile
keeps only the tile's last run. The initial state reaches exactly run 0.

Float32 accumulation always; 16-bit inputs go to the tensor cores in their own dtype (the score tile and
the state are rounded to it for the products, as fla's kernels do), float32 inputs use IEEE float32
products. T and the head dims are arbitrary: loads and stores are masked (the tail tile of the sequence,
the columns beyond K and V), so nothing is read or written out of bounds. On CPU the kernel runs in Pallas
interpret mode.

The gradient does not depend on the forward partition: the custom VJP's backward is ``_backward`` (one small
function: the fused chunked Pallas backward of fleetjax.pallas_chunked, shared with implementation="pallas").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fleetjax import pallas_chunked, vjp
from fleetjax.state_passing import pass_states

f32 = jnp.float32

_MAX_STATE_TILE = 128 * 128  # [block_k, block_v] float32 elements kept in registers per program
_MAX_LOAD_TILE = 128 * 128  # elements of one [tokens_per_step, block] input tile


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


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
            if not _is_power_of_two(self.block_k):
                raise ValueError(f"FleetConfig.block_k must be None or a power of two >= 16, got {self.block_k}")
        check_int("block_v", self.block_v, 16)
        if not _is_power_of_two(self.block_v):
            raise ValueError(f"FleetConfig.block_v must be a power of two >= 16, got {self.block_v}")
        check_int("tokens_per_step", self.tokens_per_step, 1)
        if self.tokens_per_step != 1 and (self.tokens_per_step < 16 or not _is_power_of_two(self.tokens_per_step)):
            raise ValueError("FleetConfig.tokens_per_step must be 1 or a power of two >= 16, "
                             f"got {self.tokens_per_step}")
        check_int("num_sequence_pieces", self.num_sequence_pieces, 1)
        check_int("num_warps", self.num_warps, 1)
        if not _is_power_of_two(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"FleetConfig.num_warps must be a power of two in [1, 32], got {self.num_warps}")
        check_int("num_stages", self.num_stages, 1)
        if self.block_k is not None and self.block_k * self.block_v > _MAX_STATE_TILE:
            raise ValueError(f"FleetConfig: block_k * block_v = {self.block_k * self.block_v} exceeds "
                             f"{_MAX_STATE_TILE} float32 state elements per program")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shape of one call: blocks, tiles and pieces, with the config's sizes clipped to the problem."""

    T: int
    K: int
    V: int
    block_k: int
    block_v: int
    tokens: int  # tokens per step
    piece_len: int  # positions per sequence piece, a multiple of ``tokens``

    @property
    def n_rank_blocks(self) -> int:
        return -(-self.K // self.block_k)

    @property
    def n_value_blocks(self) -> int:
        return -(-self.V // self.block_v)

    @property
    def n_pieces(self) -> int:
        return -(-self.T // self.piece_len)

    @property
    def piece_lengths(self) -> np.ndarray:  # [P]
        return np.minimum(self.piece_len, self.T - self.piece_len * np.arange(self.n_pieces))


def _geometry(config: FleetConfig, T: int, K: int, V: int) -> _Geometry:
    """Clip the config to the shapes and check that it fits; raises ValueError naming ``config``."""
    k_padded = max(16, _next_power_of_two(K))
    block_k = k_padded if config.block_k is None else min(config.block_k, k_padded)
    block_v = min(config.block_v, max(16, _next_power_of_two(V)))
    if block_k * block_v > _MAX_STATE_TILE:
        raise ValueError(f"config: the state tile block_k x block_v = {block_k} x {block_v} for K={K}, V={V} "
                         f"exceeds {_MAX_STATE_TILE} float32 elements per program; set FleetConfig.block_k "
                         "(for example 64) or a smaller block_v")
    tokens = config.tokens_per_step
    if tokens > 1:
        tokens = min(tokens, max(16, _next_power_of_two(T)))
        if tokens * max(block_k, block_v) > _MAX_LOAD_TILE:
            raise ValueError(f"config: a tile of tokens_per_step x block = {tokens} x {max(block_k, block_v)} "
                             f"exceeds {_MAX_LOAD_TILE} elements; use a smaller tokens_per_step or blocks")
    pieces = min(config.num_sequence_pieces, T)
    piece_len = -(-T // pieces)
    piece_len = -(-piece_len // tokens) * tokens
    return _Geometry(T=T, K=K, V=V, block_k=block_k, block_v=block_v, tokens=tokens, piece_len=piece_len)


def default_config(q: jax.Array, v: jax.Array) -> FleetConfig:
    """A heuristic config for q [B, T, H, K], v [B, T, H, V] on the default backend.

    All ranks in one program up to K = 128 (no partial outputs to sum), rank blocks of 128 above; tiles of
    64 positions (32 for float32 inputs); value blocks and, when B*H is small and T long, sequence pieces
    chosen so that there is at least one program per multiprocessor (each program is one long dependent
    walk, so an idle SM is time lost for the whole call).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    wide = jnp.dtype(q.dtype).itemsize >= 4
    tokens = 32 if wide else 64
    if jax.default_backend() != "gpu":
        # Interpret mode: the smallest grid is the fastest; tiles as long as the sequence needs.
        return FleetConfig(block_k=None if K <= 128 else 128, block_v=min(128, max(16, _next_power_of_two(V))),
                           tokens_per_step=tokens)
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132
    block_k = None if K <= 128 else 128
    # Value blocks of 64 when they alone give every SM a program, else 32 (each value block re-reads q, k
    # and recomputes the q k^T scores, so narrower blocks only pay off when they fill the GPU).
    block_v = 64 if B * H * -(-V // 64) >= num_sms else 32
    programs = -(-K // 128) * B * H * -(-V // block_v)  # rank blocks x batch*head x value blocks
    pieces = 1
    if 0 < programs < num_sms:  # (no programs: an empty batch)
        # Pieces of at least 1024 positions: shorter ones spend more on the state passing than they save.
        pieces = max(1, min(-(-num_sms // programs), T // 1024))
    num_warps = 4
    return FleetConfig(block_k=block_k, block_v=block_v, tokens_per_step=tokens, num_sequence_pieces=pieces,
                       num_warps=num_warps, num_stages=3)


# ------------------------------------------------------------------------------------------------- kernel

def _dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int, precision) -> jax.Array:
    """2-D product contracting the given axes, float32 accumulation (lowers to tl.dot with transposes)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=f32)


def _fleet_kernel(log_decay_ref, q_ref, k_ref, v_ref, s0_ref, *refs, geo: _Geometry, n_heads: int,
                  has_runs: bool, scale: float, dot_dtype, precision):
    """One program: rank block r, (batch, head) bh, value block j, sequence piece p.

    Refs (leading grid dims squeezed): q_ref, k_ref [T, BK]; v_ref [T, BV]; s0_ref [BK, BV] float32;
    run_ref [T] int32 (when has_runs); o_ref [T, BV]; sf_ref [BK, BV] float32 (the piece's final state).
    """
    if has_runs:
        run_ref, o_ref, sf_ref = refs
    else:
        run_ref = None
        o_ref, sf_ref = refs
    BK, BV, C = geo.block_k, geo.block_v, geo.tokens
    r, bh, j, p = (pl.program_id(axis) for axis in range(4))
    log_g = log_decay_ref[jax.lax.rem(bh, n_heads)]  # scalar float32

    k_cols = r * BK + jnp.arange(BK) < geo.K  # [BK]: rank rows that exist
    v_cols = j * BV + jnp.arange(BV) < geo.V  # [BV]
    start = p * geo.piece_len
    end = jnp.minimum(start + geo.piece_len, geo.T)
    state = plgpu.load(s0_ref, mask=k_cols[:, None] & v_cols[None, :], other=0.0)
    # Only piece 0 enters with the initial state; later pieces start from zero (state passing adds the rest).
    state = jnp.where(p == 0, state, 0.0)
    # Run of the position before the piece: the entering state reaches only that run (run 0 at the start).
    if has_runs:
        before = jnp.where(start > 0, run_ref[jnp.maximum(start - 1, 0)], 0)
    else:
        before = jnp.int32(0)

    if C == 1:
        gamma = jnp.exp(log_g)

        def token(t, carry):
            state, before = carry
            q_t = plgpu.load(q_ref.at[t, :], mask=k_cols, other=0.0).astype(f32)
            k_t = plgpu.load(k_ref.at[t, :], mask=k_cols, other=0.0).astype(f32)
            v_t = plgpu.load(v_ref.at[t, :], mask=v_cols, other=0.0).astype(f32)
            if has_runs:
                run_t = run_ref[t]
                state = jnp.where(run_t == before, state, 0.0)  # a new run starts from zero
                before = run_t
            state = gamma * state + k_t[:, None] * v_t[None, :]
            o_t = scale * jnp.sum(q_t[:, None] * state, axis=0)
            plgpu.store(o_ref.at[t, :], o_t.astype(o_ref.dtype), mask=v_cols)
            return state, before

        state, _ = jax.lax.fori_loop(start, end, token, (state, before))
        plgpu.store(sf_ref, state, mask=k_cols[:, None] & v_cols[None, :])
        return

    # Loop-invariant decay factors of a full tile; exponents are masked before exp (no gamma^-n anywhere).
    _, intra = pallas_chunked.intra_decays(log_g, C)  # [C, C]: gamma^(i-j) on j <= i
    i = jnp.arange(C)

    def tile(step, carry):
        state, before = carry
        t0 = start + step * C
        length = jnp.minimum(C, end - t0)
        valid = i < length  # [C]: the tail tile is masked
        rows = pl.ds(t0, C)
        q = plgpu.load(q_ref.at[rows, :], mask=valid[:, None] & k_cols[None, :], other=0.0)
        k = plgpu.load(k_ref.at[rows, :], mask=valid[:, None] & k_cols[None, :], other=0.0)
        v = plgpu.load(v_ref.at[rows, :], mask=valid[:, None] & v_cols[None, :], other=0.0)
        q_factor, k_decay = pallas_chunked.edge_decays(log_g, C, length)  # gamma^(i+1), gamma^(length-1-j)
        carry_decay = jnp.exp(length.astype(f32) * log_g)
        weights = intra
        if has_runs:
            run = plgpu.load(run_ref.at[rows], mask=valid, other=-1)  # padding joins no run
            last = run_ref[t0 + length - 1]
            weights = jnp.where(run[:, None] == run[None, :], weights, 0.0)
            q_factor = jnp.where(run == before, q_factor, 0.0)
            k_decay = jnp.where(run == last, k_decay, 0.0)
            carry_decay = jnp.where(last == before, carry_decay, 0.0)
            before = last
        q, k, v = (x.astype(dot_dtype) for x in (q, k, v))
        scores = _dot(q, k, 1, 1, precision) * weights  # [C, C]
        o = _dot(scores.astype(dot_dtype), v, 1, 0, precision)
        o = o + _dot(q, state.astype(dot_dtype), 1, 0, precision) * q_factor[:, None]
        plgpu.store(o_ref.at[rows, :], (scale * o).astype(o_ref.dtype), mask=valid[:, None] & v_cols[None, :])
        k_weighted = (k.astype(f32) * k_decay[:, None]).astype(dot_dtype)
        state = carry_decay * state + _dot(k_weighted, v, 0, 0, precision)  # [BK, BV]
        return state, before

    n_steps = (end - start + C - 1) // C
    state, _ = jax.lax.fori_loop(0, n_steps, tile, (state, before))
    plgpu.store(sf_ref, state, mask=k_cols[:, None] & v_cols[None, :])


def _fleet_call(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: FleetConfig,
                geo: _Geometry):
    """The pallas_call. Returns (o or rank-block partials, local final states [P, B, H, K, V] float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    nk, nv, P = geo.n_rank_blocks, geo.n_value_blocks, geo.n_pieces
    BK, BV = geo.block_k, geo.block_v
    if q.dtype in (jnp.bfloat16, jnp.float16):
        dot_dtype, precision = q.dtype, None
    else:
        dot_dtype, precision = f32, jax.lax.Precision.HIGHEST  # IEEE float32 products, not tf32
    has_runs = run_ids is not None
    # The rank blocks share one output only when there is one of them; otherwise each has its own float32
    # slice. Pieces add a float32 correction later, so they also keep o in float32.
    direct = nk == 1
    out_dtype = q.dtype if direct and P == 1 else f32

    batch, head = (lambda bh: jax.lax.div(bh, H)), (lambda bh: jax.lax.rem(bh, H))
    in_specs = [
        pl.BlockSpec((H,), lambda r, bh, j, p: (0,)),
        pl.BlockSpec((None, T, None, BK), lambda r, bh, j, p: (batch(bh), 0, head(bh), r)),
        pl.BlockSpec((None, T, None, BK), lambda r, bh, j, p: (batch(bh), 0, head(bh), r)),
        pl.BlockSpec((None, T, None, BV), lambda r, bh, j, p: (batch(bh), 0, head(bh), j)),
        pl.BlockSpec((None, None, BK, BV), lambda r, bh, j, p: (batch(bh), head(bh), r, j)),
    ]
    args = [log_decay, q, k, v, initial_state]
    if has_runs:
        in_specs.append(pl.BlockSpec((None, T), lambda r, bh, j, p: (batch(bh), 0)))
        args.append(run_ids)
    if direct:
        o_shape = jax.ShapeDtypeStruct((B, T, H, V), out_dtype)
        o_spec = pl.BlockSpec((None, T, None, BV), lambda r, bh, j, p: (batch(bh), 0, head(bh), j))
    else:
        o_shape = jax.ShapeDtypeStruct((nk, B, T, H, V), f32)
        o_spec = pl.BlockSpec((None, None, T, None, BV), lambda r, bh, j, p: (r, batch(bh), 0, head(bh), j))
    sf_shape = jax.ShapeDtypeStruct((P, B, H, K, V), f32)
    sf_spec = pl.BlockSpec((None, None, None, BK, BV), lambda r, bh, j, p: (p, batch(bh), head(bh), r, j))

    kernel = functools.partial(_fleet_kernel, geo=geo, n_heads=H, has_runs=has_runs, scale=scale,
                               dot_dtype=dot_dtype, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(nk, B * H, nv, P),
        in_specs=in_specs,
        out_specs=[o_spec, sf_spec],
        out_shape=[o_shape, sf_shape],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=jax.default_backend() != "gpu",
        name="fleet_attention_fwd",
    )(*args)


def _join_pieces(q, o, local_final, log_decay, run_ids, scale: float, geo: _Geometry):
    """State passing between sequence pieces: entering states by an exclusive scan, then the correction.

    o [B, T, H, V] float32 from pieces that started from zero (piece 0 from the initial state);
    local_final [P, B, H, K, V]. Returns (o, final state).
    """
    B, T, H, _ = q.shape
    P, L = geo.n_pieces, geo.piece_len
    starts = np.arange(P) * L
    ends = starts + geo.piece_lengths
    # Gate of each piece: does its last position still belong to the run that entered it?
    if run_ids is None:
        entering_run = None
        keeps = jnp.ones((P, B), bool)
    else:
        entering_run = jnp.concatenate([jnp.zeros((B, 1), run_ids.dtype), run_ids[:, starts[1:] - 1]], 1)  # [B, P]
        keeps = (run_ids[:, ends - 1] == entering_run).T  # [P, B]
    carry = jnp.exp(jnp.asarray(geo.piece_lengths, f32)[:, None] * log_decay[None, :])  # [P, H]
    carry = carry[:, None, :] * keeps[:, :, None]  # [P, B, H]
    # S_1 = L_0 (piece 0 already started from the initial state, so it needs no correction).
    later, final_state = pass_states(local_final[0], local_final[1:], carry[1:])
    entering = jnp.concatenate([jnp.zeros_like(local_final[:1]), later])  # [P, B, H, K, V]

    pad = P * L - T
    qp = jnp.pad(q.astype(f32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, P, L, H, -1)
    local = np.arange(L)
    factor = jnp.exp((local + 1)[:, None].astype(np.float32) * log_decay[None, :])  # [L, H]
    factor = jnp.broadcast_to(factor[None, None], (B, P, L, H))
    if run_ids is not None:
        runs = jnp.pad(run_ids, ((0, 0), (0, pad)), mode="edge").reshape(B, P, L)
        factor = factor * (runs == entering_run[:, :, None])[..., None]
    correction = jnp.einsum("bplhk,pbhkv->bplhv", qp, entering, precision=jax.lax.Precision.HIGHEST)
    correction = (scale * factor[..., None] * correction).reshape(B, P * L, H, -1)[:, :T]
    return o + correction, final_state


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _forward(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: FleetConfig):
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        q, k, v = (x.astype(f32) for x in (q, k, v))  # e.g. float64 with x64 enabled: computed in float32
    geo = _geometry(config, q.shape[1], q.shape[3], v.shape[3])
    o, local_final = _fleet_call(q, k, v, log_decay.astype(f32), initial_state.astype(f32), run_ids,
                                 scale=scale, config=config, geo=geo)
    if geo.n_rank_blocks > 1:
        # Fixed-order sum of the rank blocks' float32 partials: element-wise, no atomics, same bits every run.
        o = functools.reduce(jnp.add, [o[r] for r in range(geo.n_rank_blocks)])
    if geo.n_pieces > 1:
        return _join_pieces(q, o, local_final, log_decay.astype(f32), run_ids, scale, geo)
    return o, local_final[0]


# ---------------------------------------------------------------------------------------------- custom VJP

@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pallas_fleet(q, k, v, log_decay, initial_state, run_ids, scale, config):
    return _forward(q, k, v, log_decay, initial_state, run_ids, scale=scale, config=config)


def _pallas_fleet_fwd(q, k, v, log_decay, initial_state, run_ids, scale, config):
    # symbolic_zeros=True: the primals arrive wrapped; an unused output's cotangent stays a SymbolicZero,
    # which lets the backward skip its terms (the final state's, most often).
    q, k, v, log_decay, initial_state, run_ids = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (q, k, v, log_decay, initial_state, run_ids))
    # A second derivative would differentiate this forward's kernel: refuse it with a clear message.
    q, k, v, log_decay, initial_state = (vjp.first_order_only(x) for x in (q, k, v, log_decay, initial_state))
    o, final_state = _forward(q, k, v, log_decay, initial_state, run_ids, scale=scale, config=config)
    return (o, final_state), (q, k, v, log_decay, initial_state, run_ids)


def _backward(scale: float, residuals, cotangents):
    """The gradient; it does not depend on the forward's partition: the fused chunked Pallas backward.

    residuals: (q, k, v, log_decay, initial_state, run_ids); cotangents: (do, d final state), either may be
    a SymbolicZero. Returns the cotangents of (q, k, v, log_decay, initial_state, run_ids).
    """
    q, v = residuals[0], residuals[2]
    return pallas_chunked.pallas_backward(scale, pallas_chunked.default_config(q, v), residuals, cotangents)


def _pallas_fleet_bwd(scale, config, residuals, cotangents):
    del config
    return _backward(scale, residuals, cotangents)


_pallas_fleet.defvjp(_pallas_fleet_fwd, _pallas_fleet_bwd, symbolic_zeros=True)


def pallas_fleet_impl(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: FleetConfig):
    """FleetAttention's partition; returns (o [B, T, H, V], final state [B, H, K, V] float32).

    q, k [B, T, H, K]; v [B, T, H, V] in one float dtype; log_decay [H] float32; initial_state
    [B, H, K, V] float32; run_ids None or int32 [B, T]. o is in the inputs' dtype with one rank block and
    one piece, float32 otherwise (the API casts it).
    """
    if not isinstance(config, FleetConfig):
        raise TypeError(f"config must be a FleetConfig, got {type(config).__name__}")
    return _pallas_fleet(q, k, v, log_decay, initial_state, run_ids, float(scale), config)
