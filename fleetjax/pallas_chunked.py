"""implementation="pallas": the fused chunked kernel (Pallas, Triton lowering on GPU), run forward in time
for the output and for dq, and mirrored in time for dk and dv.

One kernel, one program per (value block, batch*head, sequence piece), walks the chunks of its piece with a
``fori_loop``; the [K, block_v] float32 state lives on chip in the loop carry (DESIGN.md sections 1 and 4).
Per chunk of C positions: the masked intra-chunk scores query.key^T (C x C), their product with the values,
the entering state's contribution gamma^d query^T S, and the state handed on, S <- gamma^len S + sum_j
gamma^d_j key_j value_j^T. No state of any chunk is written to HBM. ``reverse`` walks from the last chunk
to the first and mirrors every lag (o_s = scale sum_{t >= s} gamma^(t-s) (query_s . key_t) value_t).

Sequence pieces (when batch*head*value blocks cannot fill the GPU): a first, cheaper launch computes each
piece's local final state from a zero state (it reads only keys and values; the walk's last piece needs
none); the second launch runs every piece, each program first folding the local states of the pieces before
its own into its entering state (the state passing of fleetjax.state_passing, on chip).

Backward (DESIGN.md section 2), through ``jax.custom_vjp``; the residuals are the inputs alone. The three
input gradients are three walks of the same kernel, each with a small on-chip state, none of which carries
all value columns (so many programs, few registers each):
- dq_t = scale sum_{s <= t} gamma^(t-s) (dO_t . v_s) k_s + scale gamma^(t+1) S0 dO_t: forward, with
  query=dO, key=v, value=k, entering state S0^T. It also returns w_t = q_t . dq_t^inter and the lag-weighted
  intra-chunk sums of the decay gradient (fleetjax.vjp), per value block, added in a fixed order;
- dv_s = scale sum_{t >= s} gamma^(t-s) (q_t . k_s) dO_t: reverse, query=k, key=q, value=dO; its final
  reverse state R gives d initial_state = scale gamma R;
- dk_s = scale sum_{t >= s} gamma^(t-s) (dO_t . v_s) q_t: reverse, query=v, key=dO, value=q, returning
  u_s = k_s . dk_s^inter. Its pieces' local reverse states are the dv walk's, transposed.
The final state's cotangent dS_T enters the dv and dk walks as a term of its own, gamma^(T-1-s) k_s^T dS_T and
gamma^(T-1-s) dS_T v_s (one more product per chunk, not part of the carried state), and the dk walk returns
its share x of the decay gradient, which fleetjax.vjp weights by T-1-s.
Asking for second derivatives raises an error: the kernels have no derivative rules.

Sequence parallelism (fleetjax.sharding) takes the same launches in another order (``BLOCK_KERNELS``):
the local states of all pieces first (folded, they are the block's local state L_p; the walk reuses them),
the walk after the exchange; in the backward the local reverse states first, then the reverse walks from
the exit cotangent of the block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fleetjax import vjp
from fleetjax.sharding import shape_dtype_like
from fleetjax.state_passing import BlockKernels, pass_piece, pass_states

f32 = jnp.float32
_PRECISIONS = {"ieee": jax.lax.Precision.HIGHEST, "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
               "tf32": jax.lax.Precision.DEFAULT}


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Tiling of the fused chunked kernel.

    chunk_size: positions per chunk (power of two, >= 16).
    block_v: value-dimension block of one forward program (power of two, >= 16).
    num_sequence_pieces: pieces of the sequence run in parallel (state passing joins them).
    num_warps, num_stages: Triton launch parameters of the forward walk.
    backward_block_v, backward_num_warps, backward_num_stages, backward_num_sequence_pieces: the same for
    the backward's three walks (dq, dv, dk).
    state_chunk_size, state_block_v, state_num_warps: the launch that computes the pieces' local states
    before a walk with sequence pieces (it reads keys and values only and has no chunk-by-chunk products, so
    it can take longer chunks or wider value blocks); None: the walk's own. A state chunk that does not
    divide the pieces falls back to the walk's chunk.
    precision: dots of float32 inputs: "tf32x3" (three tensor-core passes, about float32's accuracy), "ieee"
    (exact float32 without tensor cores, many times slower) or "tf32" (one pass, ~1e-3). Off-GPU "tf32x3"
    runs exact. Other dtypes use their own tensor-core dots.
    """

    chunk_size: int = 64
    block_v: int = 64
    num_sequence_pieces: int = 1
    num_warps: int = 4
    num_stages: int = 3
    backward_block_v: int = 64
    backward_num_warps: int = 4
    backward_num_stages: int = 3
    backward_num_sequence_pieces: int = 1
    state_chunk_size: int | None = None
    state_block_v: int | None = None
    state_num_warps: int | None = None
    precision: str = "tf32x3"

    def __post_init__(self):
        for name in ("chunk_size", "block_v", "backward_block_v", "state_chunk_size", "state_block_v"):
            value = getattr(self, name)
            if name.startswith("state_") and value is None:
                continue
            if not isinstance(value, int) or not _pow2(value) or value < 16:
                raise ValueError(f"PallasConfig.{name} must be a power of two >= 16, got {value!r}")
        for name in ("num_sequence_pieces", "num_warps", "num_stages", "backward_num_warps",
                     "backward_num_stages", "backward_num_sequence_pieces", "state_num_warps"):
            value = getattr(self, name)
            if name.startswith("state_") and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PallasConfig.{name} must be a positive int, got {value!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"PallasConfig.precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")

    def launch(self, backward: bool, states: bool = False) -> dict:
        """Launch parameters of the forward walk, or of the backward's walks; with ``states``, of the launch
        that computes their pieces' local states."""
        if backward:
            walk = dict(block_v=self.backward_block_v, num_warps=self.backward_num_warps,
                        num_stages=self.backward_num_stages, precision=self.precision)
        else:
            walk = dict(block_v=self.block_v, num_warps=self.num_warps, num_stages=self.num_stages,
                        precision=self.precision)
        if states:
            walk.update(block_v=self.state_block_v or walk["block_v"],
                        num_warps=self.state_num_warps or walk["num_warps"],
                        chunk_size=self.state_chunk_size or self.chunk_size)
        return walk

    def plan(self, T: int, backward: bool) -> "_Plan":
        return _Plan(T, self.chunk_size, self.backward_num_sequence_pieces if backward else self.num_sequence_pieces)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _dot_precision(name: str, dtype):
    """The dots' precision for inputs of ``dtype``: the config's choice for float32, else the default."""
    if dtype != jnp.float32:
        return None
    if name == "tf32x3" and not _on_gpu():  # no tf32 off-GPU: exact is what tf32x3 approximates
        return jax.lax.Precision.HIGHEST
    return _PRECISIONS[name]


def _sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 132) or 132)
    except Exception:  # pragma: no cover
        return 132


def _pieces(programs: int, T: int) -> int:
    """Split the sequence only while the grid holds fewer programs than half the SMs (the kernel runs one
    program per SM: its tiles take more than half an SM's shared memory) and pieces keep >= 512 positions."""
    pieces = 1
    while programs * pieces < _sm_count() // 2 and T // (2 * pieces) >= 512 and pieces < 64:
        pieces *= 2
    return pieces


def default_config(q: jax.Array, v: jax.Array) -> PallasConfig:
    """Heuristic by shape, dtype and device, from sweeps on an H100 (experiments/tune_pallas.py, 2026-11-25,
    bf16 K=V=128; results/2026-11-25-h100-tune_pallas.jsonl): chunk 64, 4 warps, 3 stages; forward value
    blocks of 64; the backward's walks in blocks of 32 where batch*head alone fills the GPU, else 64; then
    sequence pieces up to about one program per SM."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    # Key dims over 128 leave shared memory for three stages of value blocks of 32 only.
    wide = max(K, V) <= 128
    block_v = min(64 if wide else 32, pl.next_power_of_2(max(V, 16)))
    narrow = min(32, pl.next_power_of_2(max(min(K, V), 16)))
    backward_block_v = narrow if not wide or B * H * -(-max(K, V) // narrow) >= _sm_count() else 2 * narrow
    if not _on_gpu():
        return PallasConfig(block_v=block_v, backward_block_v=backward_block_v)
    if q.dtype == jnp.float32:  # tiles twice as large: two stages and value blocks of 32 fit shared memory
        block_v = backward_block_v = min(32, block_v)
        extra = dict(num_stages=2, backward_num_stages=2)
    else:
        extra = {}
    pieces = _pieces(B * H * -(-V // block_v), T)
    backward_pieces = _pieces(B * H * -(-max(K, V) // backward_block_v), T)
    if q.dtype != jnp.float32 and wide and max(pieces, backward_pieces) > 1:
        # With pieces: their local states in chunks of 128 with 8 warps (fewer, fuller loads), and a forward
        # walk with four stages (its programs are few and long: loads further ahead hide more latency).
        extra = dict(state_chunk_size=128, state_num_warps=8, num_stages=4 if pieces > 1 else 3)
    return PallasConfig(block_v=block_v, backward_block_v=backward_block_v, num_sequence_pieces=pieces,
                        backward_num_sequence_pieces=backward_pieces, **extra)


# ------------------------------------------------------------------------------------------- kernel body

def _masked_pow(lg, exponent, valid):
    """gamma^exponent where valid, else 0; the exponent is masked before exp, so a tiny decay gives exact
    zeros and nothing overflows."""
    return jnp.where(valid, jnp.exp(jnp.where(valid, exponent, 0).astype(f32) * lg), 0.0)


def intra_decays(lg, C: int, reverse: bool = False):
    """(lag [C, C] int, gamma^lag [C, C]) for query row i and key column j of one chunk, on the pairs that
    interact (forward: j <= i, lag i - j; reverse: j >= i, lag j - i), 0 elsewhere. Shared with pallas_fleet."""
    i = jnp.arange(C)
    lag = i[None, :] - i[:, None] if reverse else i[:, None] - i[None, :]
    causal = lag >= 0
    return jnp.where(causal, lag, 0), _masked_pow(lg, lag, causal)


def edge_decays(lg, C: int, length, reverse: bool = False):
    """(entering [C]: the factor of the state entering the chunk in query i's output; leaving [C]: the factor
    of key j in the state handed on), 0 at or beyond ``length``. Forward: gamma^(i+1), gamma^(length-1-j);
    reverse: gamma^(length-i), gamma^j. Shared with pallas_fleet."""
    i = jnp.arange(C)
    valid = i < length
    if reverse:
        return _masked_pow(lg, length - i, valid), _masked_pow(lg, i, valid)
    return _masked_pow(lg, i + 1, valid), _masked_pow(lg, length - 1 - i, valid)


def _dot(a, b, precision, trans_a=False, trans_b=False):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _dot_hi_lo(a, b, dtype, precision, trans_a=False):
    """a @ b for a float32 ``b`` taken as a hi/lo pair in ``dtype`` (b = hi + lo): two products that keep b
    to about float32's accuracy, where rounding it to ``dtype`` once would not."""
    hi = b.astype(dtype)
    lo = (b - hi.astype(f32)).astype(dtype)
    return _dot(a, hi, precision, trans_a=trans_a) + _dot(a, lo, precision, trans_a=trans_a)


def _kernel(lg_ref, *refs, T, C, K, V, block_v, chunks_per_piece, n_chunks, pieces, piece_offset, scale,
            reverse, has_start, has_exit, has_local, has_runs, with_output, with_dot, with_intra, precision):
    """One (value block, batch*head, piece) program. Refs: [start], [exit, [the row's last run]], [the pieces'
    local states, [links]], [query], key, value, [runs, run at the piece's edge], [dot_with], [o], [w],
    [intra], [x], final state. K and V are the key and value dims of this walk."""
    refs = list(refs)
    start_ref = refs.pop(0) if has_start else None
    exit_ref = refs.pop(0) if has_exit else None
    last_run_ref = refs.pop(0) if has_exit and has_runs else None
    local_ref = refs.pop(0) if has_local else None
    link_ref = refs.pop(0) if has_local and has_runs else None
    q_ref = refs.pop(0) if with_output else None
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    run_ref, edge_ref = (refs.pop(0), refs.pop(0)) if has_runs else (None, None)
    dot_ref = refs.pop(0) if with_dot else None
    o_ref = refs.pop(0) if with_output else None
    w_ref = refs.pop(0) if with_dot else None
    intra_ref = refs.pop(0) if with_intra else None
    x_ref = refs.pop(0) if has_exit and with_dot else None
    (final_ref,) = refs
    lg = lg_ref[0]
    j, p = pl.program_id(0), pl.program_id(2) + piece_offset
    i = jnp.arange(C)
    k_mask = jnp.arange(k_ref.shape[-1]) < K
    v_mask = j * block_v + jnp.arange(block_v) < V
    first = p * chunks_per_piece
    count = jnp.minimum(chunks_per_piece, n_chunks - first)
    lag, intra = intra_decays(lg, C, reverse)
    dtype = k_ref.dtype
    state = start_ref[...] if has_start else jnp.zeros(final_ref.shape, f32)
    if has_local:
        # The state entering this piece: fold in the local states of the pieces the walk passes first (the
        # state passing of fleetjax.state_passing, here in registers: no entering states go through HBM).
        def enter(n, state):
            before = (pieces - 1 - n) if reverse else n
            length = jnp.minimum(chunks_per_piece * C, T - before * chunks_per_piece * C)
            carry = jnp.exp(length.astype(f32) * lg)
            if has_runs:
                carry = carry * link_ref[before]
            # local holds the pieces that have a successor in the walk: forward 0..P-2, reverse 1..P-1.
            return pass_piece(state, carry, local_ref[before - int(reverse)])

        state = jax.lax.fori_loop(0, (pieces - 1 - p) if reverse else p, enter, state)

    def body(c, carry):
        state, edge_run = carry
        start = (first + (count - 1 - c if reverse else c)) * C
        in_seq = start + i < T
        length = jnp.minimum(C, T - start)
        k = plt.load(k_ref.at[pl.ds(start, C), :], mask=in_seq[:, None] & k_mask[None, :], other=0.0)
        v = plt.load(v_ref.at[pl.ds(start, C), :], mask=in_seq[:, None] & v_mask[None, :], other=0.0)
        entering, leaving = edge_decays(lg, C, length, reverse)
        carry_factor = jnp.exp(length.astype(f32) * lg)
        weights = intra
        if has_runs:
            run = plt.load(run_ref.at[pl.ds(start, C)], mask=in_seq, other=-1)
            # The run next to the following chunk of the walk (run ids never decrease along a row).
            far = jnp.min(jnp.where(in_seq, run, jnp.iinfo(jnp.int32).max)) if reverse else jnp.max(run)
            weights = jnp.where(run[:, None] == run[None, :], intra, 0.0)
            entering = jnp.where(run == edge_run, entering, 0.0)
            leaving = jnp.where(run == far, leaving, 0.0)
            carry_factor = jnp.where(far == edge_run, carry_factor, 0.0)
            edge_run = far
        if with_output:
            q = plt.load(q_ref.at[pl.ds(start, C), :], mask=in_seq[:, None] & k_mask[None, :], other=0.0)
            scores = _dot(q, k, precision, trans_b=True) * weights
            if with_dot and dtype != f32:
                # w feeds the decay gradient, where the offsets of fleetjax.vjp amplify the state's rounding to
                # the input dtype ~chunk-size-fold: a hi/lo split of the state.
                o_inter = _dot_hi_lo(q, state, dtype, precision)
            else:
                o_inter = _dot(q, state.astype(dtype), precision)
            # The decay scales the rows of the [C, block_v] product, cheaper than scaling the query [C, K].
            o_inter = o_inter * (scale * entering)[:, None]
            o = scale * _dot(scores.astype(dtype), v, precision) + o_inter
            out_mask = in_seq[:, None] & v_mask[None, :]
            if with_dot:
                other = plt.load(dot_ref.at[pl.ds(start, C), :], mask=out_mask, other=0.0)
            if has_exit:
                # The cotangent of the state after position T - 1 reaches position s with gamma^(T-1-s), in the
                # row's last run only. Its own product, not part of the carried state, so that its share x of
                # the decay gradient is weighted by T-1-s, not by the position. One product in the inputs'
                # dtype: x has no offsets to amplify its rounding, unlike w and u.
                reach = in_seq & (run == last_run_ref[0]) if has_runs else in_seq
                o_exit = _dot(q, exit_ref[...], precision) * _masked_pow(lg, T - 1 - (start + i), reach)[:, None]
                o = o + o_exit
                if with_dot:
                    plt.store(x_ref.at[pl.ds(start, C)], jnp.sum(o_exit * other.astype(f32), axis=1), mask=in_seq)
            plt.store(o_ref.at[pl.ds(start, C), :], o.astype(o_ref.dtype), mask=out_mask)
            if with_dot:
                plt.store(w_ref.at[pl.ds(start, C)], jnp.sum(o_inter * other.astype(f32), axis=1), mask=in_seq)
                if with_intra:
                    # This value block's share of (other_i . value_j), times the pair's weighted score
                    # (query_i . key_j) gamma^lag: summed over the blocks, the lag-weighted intra-chunk part of
                    # the decay gradient.
                    pair = _dot(other, v, precision, trans_b=True) * scores
                    plt.store(intra_ref.at[pl.ds(start, C)], scale * jnp.sum(lag.astype(f32) * pair, axis=1),
                              mask=in_seq)
        if with_dot and dtype != f32:
            # The same for the decay factors of the state's terms: their products with the inputs, rounded
            # to the input dtype, would enter w too. A hi/lo pair on the value side (the narrower tile).
            update = _dot_hi_lo(k, v.astype(f32) * leaving[:, None], dtype, precision, trans_a=True)
        else:
            update = _dot((k.astype(f32) * leaving[:, None]).astype(dtype), v, precision, trans_a=True)
        state = carry_factor * state + update
        return state, edge_run

    edge = edge_ref[0] if has_runs else jnp.int32(0)
    state, _ = jax.lax.fori_loop(0, count, body, (state, edge))
    final_ref[...] = state


# ------------------------------------------------------------------------------------------------ launches

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one walk: T positions in chunks of C, grouped into pieces."""

    T: int
    C: int
    pieces: int

    @property
    def n_chunks(self) -> int:
        return -(-self.T // self.C)

    @property
    def chunks_per_piece(self) -> int:
        return -(-self.n_chunks // max(1, min(self.pieces, self.n_chunks)))

    @property
    def P(self) -> int:
        return -(-self.n_chunks // self.chunks_per_piece)

    @property
    def piece_len(self) -> int:
        return self.chunks_per_piece * self.C


def _dims(K: int, V: int, block_v: int) -> tuple[int, int, int]:
    """(padded key dim, value block, padded value dim)."""
    kp = pl.next_power_of_2(max(K, 16))
    bv = min(block_v, pl.next_power_of_2(max(V, 16)))
    return kp, bv, -(-V // bv) * bv


def _specs(H: int, T_block: int, kp: int, bv: int, P: int, piece_offset: int = 0):
    """BlockSpecs over the grid (value block j, batch*head g, program p along the sequence); the piece is
    p + piece_offset."""
    return dict(
        lg=pl.BlockSpec((1,), lambda j, g, p: (g % H,)),
        start=pl.BlockSpec((None, None, kp, bv), lambda j, g, p: (g // H, g % H, 0, j)),
        local=pl.BlockSpec((None, None, P - 1, kp, bv), lambda j, g, p: (g // H, g % H, 0, 0, j)),
        links=pl.BlockSpec((None, P), lambda j, g, p: (g // H, 0)),
        state=pl.BlockSpec((None, None, None, kp, bv), lambda j, g, p: (g // H, g % H, p, 0, j)),
        keys=pl.BlockSpec((None, T_block, None, kp), lambda j, g, p: (g // H, 0, g % H, 0)),
        values=pl.BlockSpec((None, T_block, None, bv), lambda j, g, p: (g // H, 0, g % H, j)),
        runs=pl.BlockSpec((None, T_block), lambda j, g, p: (g // H, 0)),
        row=pl.BlockSpec((None, 1), lambda j, g, p: (g // H, 0)),
        run_edge=pl.BlockSpec((None, 1), lambda j, g, p: (g // H, p + piece_offset)),
        per_position=pl.BlockSpec((None, None, None, T_block), lambda j, g, p: (j, g // H, g % H, 0)),
    )


def _launch(query, key, value, lg, start, local, links, run_ids, run_edge, plan: _Plan, *, reverse, scale, block_v,
            num_warps, num_stages, precision, out_dtype, dot_with=None, with_intra=False, exit=None,
            all_pieces=False):
    """The kernel over the pieces; returns (o or None, w or None, intra or None, x or None, the final states of
    the pieces launched [B, H, P or P - 1, kp, vp]). ``start`` [B, H, kp, vp]: the state entering the walk
    (None: zero); ``local`` [B, H, P - 1, kp, vp]: the local states of the pieces that have a successor in the
    walk (forward: 0..P-2; reverse: 1..P-1), None with one piece; ``links`` [B, P]: 1 where a state passes
    through the piece unbroken by a segment start, else 0 (with run_ids only).

    With query None only those local states are computed, each piece walked from zero (keys and values are
    read, nothing else): the last piece of the walk is not launched, no later piece needs its state, unless
    ``all_pieces``. With dot_with [B, T, H, V], also w = dot_with . o^inter [B, H, T], and with with_intra
    the intra-chunk decay-gradient sums [B, H, T]. ``exit`` [B, H, kp, vp] in the inputs' dtype (reverse
    walks): the cotangent of the state after position T - 1, whose terms the outputs gain; with dot_with also
    their share x [B, H, T] of dot_with . o (see _kernel)."""
    B, T, H, K = key.shape
    V = value.shape[-1]
    kp, bv, vp = _dims(K, V, block_v)
    with_output, with_dot, has_runs = query is not None, dot_with is not None, run_ids is not None
    has_start, has_local, has_exit = start is not None, local is not None, exit is not None
    # Only pieces' local states: the last piece of the walk (reverse: the first) is not launched.
    launched, offset = (plan.P, 0) if with_output or all_pieces else (plan.P - 1, int(reverse))
    s = _specs(H, plan.n_chunks * plan.C, kp, bv, plan.P, offset)
    nv = vp // bv
    kernel = functools.partial(
        _kernel, T=T, C=plan.C, K=K, V=V, block_v=bv, chunks_per_piece=plan.chunks_per_piece,
        n_chunks=plan.n_chunks, pieces=plan.P, piece_offset=offset, scale=scale, reverse=reverse,
        has_start=has_start, has_exit=has_exit, has_local=has_local, has_runs=has_runs, with_output=with_output,
        with_dot=with_dot, with_intra=with_intra, precision=_dot_precision(precision, key.dtype))
    last_run = run_ids[:, -1:] if has_exit and has_runs else None
    inputs = ([(start, s["start"])] * has_start + [(exit, s["start"])] * has_exit
              + [(last_run, s["row"])] * (has_exit and has_runs) + [(local, s["local"])] * has_local
              + [(links, s["links"])] * (has_local and has_runs) + [(query, s["keys"])] * with_output
              + [(key, s["keys"]), (value, s["values"])] + [(run_ids, s["runs"]), (run_edge, s["run_edge"])] * has_runs
              + [(dot_with, s["values"])] * with_dot)
    with_x = has_exit and with_dot
    # Typed like the inputs inside shard_map(check_vma=True) (fleetjax.sharding.shape_dtype_like).
    per_position = shape_dtype_like((nv, B, H, T), f32, key, value)
    states = shape_dtype_like((B, H, launched, kp, vp), f32, key, value)
    out_shape = ([shape_dtype_like((B, T, H, V), out_dtype, key, value)] if with_output else []) + \
        [per_position] * (with_dot + with_intra + with_x) + [states]
    out_specs = [s["values"]] * with_output + [s["per_position"]] * (with_dot + with_intra + with_x) + [s["state"]]
    name = "fleet_chunked_" + ("reverse" if reverse else "forward") + ("" if with_output else "_piece_states")
    out = list(pl.pallas_call(
        kernel, grid=(nv, B * H, launched), in_specs=[s["lg"]] + [spec for _, spec in inputs], out_specs=out_specs,
        out_shape=out_shape, compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=not _on_gpu(), name=name)(lg, *(x for x, _ in inputs)))
    o = out.pop(0) if with_output else None
    # Each value block holds part of the sums over the value dimension; add them in a fixed order.
    w = jnp.sum(out.pop(0), axis=0) if with_dot else None
    intra = jnp.sum(out.pop(0), axis=0) if with_intra else None
    x = jnp.sum(out.pop(0), axis=0) if with_x else None
    return o, w, intra, x, out[0]


def _pad_state(x: jax.Array, kp: int, vp: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, kp - x.shape[-2]), (0, vp - x.shape[-1])])


def _piece_edges(run_ids, plan: _Plan, reverse: bool):
    """Per piece [B, P]: the run just outside the piece where the walk enters it (the run before it; reverse:
    the run after it, or the row's last run), and the run where the walk leaves it (its last; first)."""
    starts = plan.piece_len * np.arange(plan.P)
    ends = np.minimum(starts + plan.piece_len, plan.T) - 1
    if reverse:
        after = jnp.concatenate([run_ids[:, starts[1:]], run_ids[:, -1:]], axis=1)
        return after, run_ids[:, starts]
    before = jnp.concatenate([jnp.zeros_like(run_ids[:, :1]), run_ids[:, starts[1:] - 1]], axis=1)
    return before, run_ids[:, ends]


def _piece_links(run_ids, plan: _Plan, reverse: bool):
    """[B, P] float: 1 where a state passes through the piece unbroken by a segment start, else 0; None
    without run_ids."""
    if run_ids is None:
        return None
    edge, leave = _piece_edges(run_ids, plan, reverse)
    return (leave == edge).astype(f32)


def _piece_states(key, value, lg, run_ids, plan: _Plan, *, reverse: bool, chunk_size: int, all_pieces=False,
                  **launch):
    """Local final states [B, H, P - 1, K, V] of the pieces that have a successor in the walk (forward:
    0..P-2; reverse: 1..P-1), or of all P pieces with ``all_pieces``, each walked from a zero state in chunks
    of ``chunk_size`` where those tile the pieces (else the plan's)."""
    K, V = key.shape[-1], value.shape[-1]
    rechunked = _Plan(plan.T, chunk_size, plan.P)
    if (rechunked.P, rechunked.piece_len) == (plan.P, plan.piece_len):
        plan = rechunked
    edge = _piece_edges(run_ids, plan, reverse)[0] if run_ids is not None else None
    *_, local = _launch(None, key, value, lg, None, None, None, run_ids, edge, plan, reverse=reverse, scale=1.0,
                        out_dtype=None, all_pieces=all_pieces, **launch)
    return local[..., :K, :V]


def _walk(query, key, value, lg, start, run_ids, plan: _Plan, *, reverse, scale, dot_with=None, with_intra=False,
          local=None, exit=None, state_launch=None, **launch):
    """The op forward in time (reverse: mirrored) from the state ``start`` [B, H, K, V] (None: zero).
    Returns (o [B, T, H, V] in the query's dtype, the state after the walk [B, H, K, V] f32, w, intra, x).
    ``local``: the pieces' local states [B, H, P - 1, K, V] (see _piece_states) if already known, else
    computed with the launch parameters ``state_launch``. ``exit`` [B, H, K, V]: see _launch."""
    K, V = key.shape[-1], value.shape[-1]
    kp, _, vp = _dims(K, V, launch["block_v"])
    edge = None
    if run_ids is not None:
        edge = _piece_edges(run_ids, plan, reverse)[0]
    links = _piece_links(run_ids, plan, reverse) if plan.P > 1 else None
    if plan.P > 1:
        if local is None:
            local = _piece_states(key, value, lg, run_ids, plan, reverse=reverse, **state_launch)
        local = _pad_state(local, kp, vp)
    else:
        local = None
    start = None if start is None else _pad_state(start, kp, vp)
    exit = None if exit is None else _pad_state(exit, kp, vp).astype(key.dtype)
    o, w, intra, x, finals = _launch(query, key, value, lg, start, local, links, run_ids, edge, plan,
                                     reverse=reverse, scale=scale, out_dtype=query.dtype, dot_with=dot_with,
                                     with_intra=with_intra, exit=exit, **launch)
    return o, finals[:, :, 0 if reverse else -1, :K, :V], w, intra, x


def _fold_pieces(local, lg, run_ids, plan: _Plan, reverse: bool):
    """The state after all pieces from a zero one, from the local states of all P pieces [B, H, P, K, V]:
    the state passing of fleetjax.state_passing over the pieces (reverse: from the last piece to the first)."""
    lengths = np.minimum(plan.piece_len, plan.T - plan.piece_len * np.arange(plan.P))
    carry = jnp.exp(jnp.asarray(lengths, f32)[None, None, :] * lg[None, :, None])  # [1, H, P]
    links = _piece_links(run_ids, plan, reverse)
    if links is not None:
        carry = carry * links[:, None, :]
    carry = jnp.broadcast_to(carry, local.shape[:3])
    zero = jnp.zeros_like(local[:, :, 0])
    _, total = pass_states(zero, jnp.moveaxis(local, 2, 0), jnp.moveaxis(carry, 2, 0), reverse=reverse)
    return total


# ------------------------------------------------------------------------------- forward, backward, blocks

def local_state(k, v, lg, run_ids, *, config: PallasConfig):
    """A block's final state from a zero entering state (its last run's), [B, H, K, V] float32, and what the
    forward walk reuses of it (the local states of its pieces but the last, or None). One launch reads k and
    v; ``block_forward`` then reads them once more, as a walk with sequence pieces does anyway."""
    _check_fits(config, k.shape[-1], v.shape[-1])
    plan = config.plan(k.shape[1], False)
    local = _piece_states(k, v, lg, run_ids, plan, reverse=False, all_pieces=True, **config.launch(False, states=True))
    return _fold_pieces(local, lg, run_ids, plan, False), (local[:, :, :-1] if plan.P > 1 else None)


def block_forward(q, k, v, lg, start, run_ids, reuse, *, scale: float, config: PallasConfig):
    """o [B, T, H, V] from the entering state ``start``, with ``reuse`` from :func:`local_state`."""
    o, *_ = _walk(q, k, v, lg, start, run_ids, config.plan(q.shape[1], False), reverse=False, scale=scale,
                  local=reuse, state_launch=config.launch(False, states=True), **config.launch(False))
    return o


def _entering_cotangent(reverse_state, lg, run_ids, scale: float):
    """The cotangent of the state entering a walk, scale gamma R, from the reverse state R [B, H, K, V] that
    the reverse walks reach at its first position (run 0 only)."""
    return vjp.only_first_run(scale * jnp.exp(lg)[None, :, None, None] * reverse_state, run_ids)


def local_reverse_state(q, do, lg, run_ids, *, scale: float, config: PallasConfig):
    """The cotangent of a block's entering state from its outputs alone (no later block): scale sum_t
    gamma^(t+1) q_t dO_t^T over its first run, [B, H, K, V] float32, and what ``block_backward`` reuses of
    it (the local reverse states of its pieces but the first, or None)."""
    plan = config.plan(q.shape[1], True)
    local = _piece_states(q, do, lg, run_ids, plan, reverse=True, all_pieces=True, **config.launch(True, states=True))
    total = _entering_cotangent(_fold_pieces(local, lg, run_ids, plan, True), lg, run_ids, scale)
    return total, (local[:, :, 1:] if plan.P > 1 else None)


def block_backward(q, k, v, lg, start, run_ids, do, exit_cotangent, reuse, *, scale: float, config: PallasConfig):
    """The three walks of the module docstring, for a block entered with the state ``start`` whose final state
    has the cotangent ``exit_cotangent`` [B, H, K, V] (None: unused). ``reuse``: from
    :func:`local_reverse_state`, or None (computed here).

    Returns (dq, dk, dv in the inputs' dtype, d log_decay [H] of every term but the one through the carry
    gamma^T of ``start`` into the final state, d start [B, H, K, V] through the outputs alone)."""
    do = do.astype(q.dtype)
    plan, launch, state_launch = config.plan(q.shape[1], True), config.launch(True), config.launch(True, states=True)
    walk = functools.partial(_walk, lg=lg, run_ids=run_ids, plan=plan, scale=scale, state_launch=state_launch,
                             **launch)
    dq, _, w, intra, _ = walk(do, v, k, start=jnp.swapaxes(start, -1, -2), reverse=False, dot_with=q,
                              with_intra=True)
    # The dv and dk walks' pieces start from the same local reverse states, transposed.
    if reuse is None and plan.P > 1:
        reuse = _piece_states(q, do, lg, run_ids, plan, reverse=True, **state_launch)
    transpose = lambda x: None if x is None else jnp.swapaxes(x, -1, -2)  # noqa: E731
    dv, r, _, _, _ = walk(k, q, do, start=None, reverse=True, local=reuse, exit=exit_cotangent)
    dk, _, u, _, x = walk(v, do, q, start=None, reverse=True, dot_with=k, local=transpose(reuse),
                          exit=transpose(exit_cotangent))
    d_start = _entering_cotangent(r, lg, run_ids, scale)
    d_lg = vjp.log_decay_grad(w, u, intra)
    if x is not None:
        d_lg = d_lg + vjp.exit_log_decay_grad(x)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_lg, d_start


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pallas(q, k, v, lg, initial_state, run_ids, scale, config):
    o, final, *_ = _walk(q, k, v, lg, initial_state, run_ids, config.plan(q.shape[1], False), reverse=False,
                         scale=scale, state_launch=config.launch(False, states=True), **config.launch(False))
    return o, final


def _pallas_fwd(q, k, v, lg, initial_state, run_ids, scale, config):
    *floats, run_ids = jax.custom_derivatives.custom_vjp_primal_tree_values((q, k, v, lg, initial_state, run_ids))
    # A second derivative would differentiate this forward's kernels too: refuse it there as well.
    primals = tuple(vjp.first_order_only(x) for x in floats) + (run_ids,)
    return _pallas(*primals, scale, config), primals


def pallas_backward(scale: float, config: PallasConfig, residuals, cotangents):
    """The VJP shared by both Pallas implementations: residuals (q, k, v, log_decay, initial_state, run_ids),
    cotangents (dO, d final_state), either possibly a symbolic zero. Returns
    (dq, dk, dv, d log_decay, d initial_state, None): :func:`block_backward` with the final state's
    cotangent as the exit's, plus the terms of the carry gamma^T of the initial state into the final state."""
    q, k, v, lg, initial_state, run_ids = residuals
    do, d_final = cotangents
    do = jnp.zeros(v.shape, q.dtype) if vjp.is_zero(do) else do
    d_final = None if vjp.is_zero(d_final) else d_final
    dq, dk, dv, d_lg, d_initial = block_backward(q, k, v, lg, initial_state, run_ids, do, d_final, None,
                                                 scale=scale, config=config)
    if d_final is not None:
        carry = vjp.whole_row_carry(lg, run_ids, q.shape[0], q.shape[1])
        d_initial = d_initial + carry[..., None, None] * d_final
        d_lg = d_lg + vjp.carry_log_decay_grad(carry, q.shape[1], d_final, initial_state)
    grads = (dq, dk, dv, d_lg, d_initial)
    return tuple(vjp.first_order_only(g) for g in grads) + (None,)


_pallas.defvjp(_pallas_fwd, pallas_backward, symbolic_zeros=True)

# Sequence parallelism (fleetjax.sharding) with no pass over a block beyond what one device's call makes,
# except the launch of the last (in reverse: the first) piece's local state.
BLOCK_KERNELS = BlockKernels(local_state, block_forward, local_reverse_state, block_backward)


_MAX_STATE_TILE = 128 * 128  # float32 values of one program's on-chip state (registers): 64 KiB


def _check_fits(config: PallasConfig, K: int, V: int) -> None:
    # The forward walk's state is [K, block_v]; the backward's walks hold [V, K block] and [K, V block].
    for name, key_dims in (("block_v", (K,)), ("backward_block_v", (K, V)), ("state_block_v", (K, V))):
        if getattr(config, name) is None:
            continue
        for key_dim in key_dims:
            value_dim = K + V - key_dim
            kp, bv, _ = _dims(key_dim, value_dim, getattr(config, name))
            if kp * bv > _MAX_STATE_TILE:
                raise ValueError(
                    f"config cannot fit: PallasConfig.{name}={getattr(config, name)} with a key dim of {key_dim} "
                    f"gives a [{kp}, {bv}] float32 state per program, more than {_MAX_STATE_TILE} values; "
                    f"use {name} <= {max(16, _MAX_STATE_TILE // kp)}")


def pallas_impl(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: PallasConfig):
    """The fused chunked Pallas kernel; returns (o [B, T, H, V] in q's dtype, final state f32)."""
    _check_fits(config, q.shape[-1], v.shape[-1])
    return _pallas(q, k, v, log_decay, initial_state, run_ids, scale, config)
