"""implementation="pallas": the fused chunked kernels (Pallas, Triton lowering on GPU).

Forward (DESIGN.md sections 1 and 4). One program per (value block, batch*head, sequence piece) walks the
chunks of its piece with a ``fori_loop``; the [K, block_v] float32 state lives on chip in the loop carry.
Per chunk of C positions: the masked intra-chunk scores q k^T (C x C), their product with v, the state's
contribution gamma^(i+1) q_i^T S, and the state update S <- gamma^len S + sum_j gamma^(len-1-j) k_j v_j^T.
No state of any chunk is written to HBM.

Sequence pieces (when batch*head*value blocks cannot fill the GPU): a first, cheaper launch of the same
kernel computes each piece's local final state from a zero state (it reads only k and v); the entering
state of every piece follows from the exclusive scan S_{p+1} = gamma^len_p S_p + L_p (a few [K, V] adds in
XLA); the second launch runs every piece from its entering state.

Backward (DESIGN.md section 2), through ``jax.custom_vjp``; the residuals are the inputs alone:
- dq is the forward op with roles swapped (query=dO, key=v, value=k, initial state S0^T): the same kernel.
- dk, dv and d initial_state come from one reverse walk over the chunks with a reverse state R (K x V on
  chip): dv_j = sum_i A_ij dO_i + gamma^(len-1-j) R^T k_j, dk_j = sum_i dP_ij q_i + gamma^(len-1-j) R v_j,
  R <- gamma^len R + scale sum_i gamma^(i+1) q_i dO_i^T. It splits the value dimension into blocks; dk,
  which sums over the value dimension, is then written per value block and summed in a fixed order, so the
  result is deterministic. Sequence pieces work as in the forward, right to left.
- d log decay comes from fleetjax.vjp (lag-weighted intra-chunk sums, chunk-local offsets, float32), and
  so do the final state's cotangent terms (the reverse state starts at zero).
Asking for second derivatives raises an error: the kernels have no derivative rules.
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
from fleetjax.state_passing import pass_states

f32 = jnp.float32
_PRECISIONS = {"ieee": jax.lax.Precision.HIGHEST, "tf32": jax.lax.Precision.DEFAULT}


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Tiling of the fused chunked kernels.

    chunk_size: positions per chunk (power of two, >= 16).
    block_v: value-dimension block of one forward program (power of two, >= 16).
    num_sequence_pieces: pieces of the sequence run in parallel (state passing joins them).
    backward_num_sequence_pieces: the same for the reverse kernel.
    num_warps, num_stages: Triton launch parameters of the forward kernels.
    backward_block_v, backward_num_warps, backward_num_stages: the same for the reverse kernel.
    precision: dots of float32/float16 inputs: "ieee" (exact float32) or "tf32" (faster, ~1e-3).
    """

    chunk_size: int = 64
    block_v: int = 64
    num_sequence_pieces: int = 1
    num_warps: int = 4
    num_stages: int = 3
    backward_block_v: int = 64
    backward_num_warps: int = 4
    backward_num_stages: int = 2
    backward_num_sequence_pieces: int = 1
    precision: str = "ieee"

    def __post_init__(self):
        for name in ("chunk_size", "block_v", "backward_block_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or not _pow2(value) or value < 16:
                raise ValueError(f"PallasConfig.{name} must be a power of two >= 16, got {value!r}")
        for name in ("num_sequence_pieces", "num_warps", "num_stages", "backward_num_warps",
                     "backward_num_stages", "backward_num_sequence_pieces"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PallasConfig.{name} must be a positive int, got {value!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"PallasConfig.precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 132) or 132)
    except Exception:  # pragma: no cover
        return 132


def _pieces(programs: int, T: int, cap: int) -> int:
    """Split the sequence only while the grid cannot fill the GPU and each piece keeps >= 1024 positions."""
    pieces = 1
    target = 3 * _sm_count() // 2
    while programs * pieces < target and T // (2 * pieces) >= 1024 and pieces < cap:
        pieces *= 2
    return pieces


def default_config(q: jax.Array, v: jax.Array) -> PallasConfig:
    """Heuristic by shape, dtype and device, from a sweep on an H100 (experiments/tune_pallas.py,
    2026-11-25, bf16 K=V=128): forward chunk 64, block_v 32, 4 warps, 3 stages; backward with the whole value
    dimension in one program (8 warps) when batch*head alone nearly fills the GPU."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    vp = pl.next_power_of_2(max(V, 16))
    block_v = min(32, vp)
    backward_block_v = min(128 if B * H >= 32 and K <= 128 else 64, vp)
    if K > 128:
        backward_block_v = min(32, vp)
    if not _on_gpu():
        return PallasConfig(block_v=block_v, backward_block_v=backward_block_v)
    return PallasConfig(
        block_v=block_v, num_stages=3, backward_block_v=backward_block_v, backward_num_warps=8,
        num_sequence_pieces=_pieces(B * H * (vp // block_v), T, cap=16),
        backward_num_sequence_pieces=_pieces(B * H * (vp // backward_block_v), T, cap=8))


# ------------------------------------------------------------------------------------------- kernel bodies

def chunk_decays(lg, C: int):
    """In-chunk decay factors (i [C], gamma^(i-j) masked to i >= j [C, C], gamma^(i+1) [C]); every exponent
    is masked before exp, so a tiny decay gives exact zeros and no overflow. Shared with pallas_fleet."""
    i = jnp.arange(C)
    lag = i[:, None] - i[None, :]
    causal = lag >= 0
    intra = jnp.where(causal, jnp.exp(jnp.where(causal, lag, 0).astype(f32) * lg), 0.0)  # [C, C]
    entering = jnp.exp((i + 1).astype(f32) * lg)  # [C]
    return i, intra, entering


def leaving_decays(lg, i, length):
    """gamma^(length-1-j) for j < length, else 0."""
    valid = i < length
    return jnp.where(valid, jnp.exp(jnp.where(valid, length - 1 - i, 0).astype(f32) * lg), 0.0)


def _program_span(kp: int, K: int, V: int, block_v: int, chunks_per_piece: int, n_chunks: int):
    """What one (value block j, batch*head, piece p) program covers: the masks of the real key columns
    [kp] and of its value block's real columns [block_v], its first chunk and its number of chunks."""
    j, p = pl.program_id(0), pl.program_id(2)
    k_mask = jnp.arange(kp) < K
    v_mask = j * block_v + jnp.arange(block_v) < V
    first = p * chunks_per_piece
    return k_mask, v_mask, first, jnp.minimum(chunks_per_piece, n_chunks - first)


def _dot(a, b, precision, trans_a=False, trans_b=False):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _forward_kernel(lg_ref, state_ref, *refs, T, C, K, V, block_v, chunks_per_piece, n_chunks, scale,
                    has_runs, with_output, with_dot, precision):
    """One (value block, batch*head, piece) program.
    Refs: [q], k, v, [runs, run_before], [dot_with], [o], [w], final state."""
    refs = list(refs)
    q_ref = refs.pop(0) if with_output else None
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    run_ref, run_before_ref = (refs.pop(0), refs.pop(0)) if has_runs else (None, None)
    dot_ref = refs.pop(0) if with_dot else None
    o_ref = refs.pop(0) if with_output else None
    w_ref = refs.pop(0) if with_dot else None
    (final_ref,) = refs
    lg = lg_ref[0]
    i, intra, entering = chunk_decays(lg, C)
    k_mask, v_mask, first, count = _program_span(k_ref.shape[-1], K, V, block_v, chunks_per_piece, n_chunks)
    dtype = k_ref.dtype

    def body(c, carry):
        state, run_prev = carry
        start = (first + c) * C
        rows = start + i
        in_seq = rows < T
        length = jnp.minimum(C, T - start)
        k = plt.load(k_ref.at[pl.ds(start, C), :], mask=in_seq[:, None] & k_mask[None, :], other=0.0)
        v = plt.load(v_ref.at[pl.ds(start, C), :], mask=in_seq[:, None] & v_mask[None, :], other=0.0)
        leave = leaving_decays(lg, i, length)
        carry_factor = jnp.exp(length.astype(f32) * lg)
        weights = intra
        gate_in = None
        if has_runs:
            run = plt.load(run_ref.at[pl.ds(start, C)], mask=in_seq, other=-1)
            run_last = jnp.max(run)
            weights = jnp.where(run[:, None] == run[None, :], intra, 0.0)
            gate_in = run == run_prev
            leave = jnp.where(run == run_last, leave, 0.0)
            carry_factor = jnp.where(run_last == run_prev, carry_factor, 0.0)
            run_prev = run_last
        if with_output:
            q = plt.load(q_ref.at[pl.ds(start, C), :], mask=in_seq[:, None] & k_mask[None, :], other=0.0)
            scores = _dot(q, k, precision, trans_b=True) * weights
            # gamma^(i+1) scales the rows of the [C, block_v] product, cheaper than scaling q [C, K].
            row_factor = scale * entering if gate_in is None else jnp.where(gate_in, scale * entering, 0.0)
            o_inter = _dot(q, state.astype(dtype), precision) * row_factor[:, None]
            o = scale * _dot(scores.astype(dtype), v, precision) + o_inter
            out_mask = in_seq[:, None] & v_mask[None, :]
            plt.store(o_ref.at[pl.ds(start, C), :], o.astype(o_ref.dtype), mask=out_mask)
            if with_dot:
                other = plt.load(dot_ref.at[pl.ds(start, C), :], mask=out_mask, other=0.0)
                plt.store(w_ref.at[pl.ds(start, C)], jnp.sum(o_inter * other.astype(f32), axis=1), mask=in_seq)
        k_out = (k.astype(f32) * leave[:, None]).astype(dtype)
        state = carry_factor * state + _dot(k_out, v, precision, trans_a=True)
        return state, run_prev

    run_start = run_before_ref[0] if has_runs else jnp.int32(0)
    state, _ = jax.lax.fori_loop(0, count, body, (state_ref[...], run_start))
    final_ref[...] = state


def _backward_kernel(lg_ref, state_ref, *refs, T, C, K, V, block_v, chunks_per_piece, n_chunks, scale,
                     has_runs, with_grads, precision):
    """Reverse walk of one (value block, batch*head, piece). Refs: q, [k], do, [v], [runs, run_after],
    [dk part, dv, u part, intra part], reverse state at the piece start (parts: this value block's share)."""
    refs = list(refs)
    q_ref = refs.pop(0)
    k_ref = refs.pop(0) if with_grads else None
    do_ref = refs.pop(0)
    v_ref = refs.pop(0) if with_grads else None
    run_ref, run_after_ref = (refs.pop(0), refs.pop(0)) if has_runs else (None, None)
    dk_ref, dv_ref, u_ref, intra_ref = refs[:4] if with_grads else (None,) * 4
    r_out_ref = refs[-1]
    lg = lg_ref[0]
    i, intra, entering = chunk_decays(lg, C)
    k_mask, v_mask, first, count = _program_span(q_ref.shape[-1], K, V, block_v, chunks_per_piece, n_chunks)
    dtype = q_ref.dtype

    def body(c_rev, carry):
        r, run_next = carry
        start = (first + count - 1 - c_rev) * C
        rows = start + i
        in_seq = rows < T
        length = jnp.minimum(C, T - start)
        qk_mask = in_seq[:, None] & k_mask[None, :]
        qv_mask = in_seq[:, None] & v_mask[None, :]
        q = plt.load(q_ref.at[pl.ds(start, C), :], mask=qk_mask, other=0.0)
        do = plt.load(do_ref.at[pl.ds(start, C), :], mask=qv_mask, other=0.0)
        carry_factor = jnp.exp(length.astype(f32) * lg)
        weights = scale * intra
        q_gate = None
        leave = leaving_decays(lg, i, length)
        if has_runs:
            run = plt.load(run_ref.at[pl.ds(start, C)], mask=in_seq, other=-1)
            run_first = jnp.min(jnp.where(in_seq, run, jnp.iinfo(jnp.int32).max))
            weights = jnp.where(run[:, None] == run[None, :], weights, 0.0)
            q_gate = run == run_first
            leave = jnp.where(run == run_next, leave, 0.0)
            carry_factor = jnp.where(run_first == run_next, carry_factor, 0.0)
            run_next = run_first
        if with_grads:
            k = plt.load(k_ref.at[pl.ds(start, C), :], mask=qk_mask, other=0.0)
            v = plt.load(v_ref.at[pl.ds(start, C), :], mask=qv_mask, other=0.0)
            scores = _dot(q, k, precision, trans_b=True) * weights  # [i, j]
            d_products = _dot(do, v, precision, trans_b=True)  # [i, j]
            d_scores = d_products * weights
            r_in = r.astype(dtype)
            k_out = (k.astype(f32) * leave[:, None]).astype(dtype)
            v_out = (v.astype(f32) * leave[:, None]).astype(dtype)
            dv = _dot(scores.astype(dtype), do, precision, trans_a=True) + _dot(k_out, r_in, precision)
            dk_inter = _dot(v_out, r_in, precision, trans_b=True)
            dk = _dot(d_scores.astype(dtype), q, precision, trans_a=True) + dk_inter
            plt.store(dv_ref.at[pl.ds(start, C), :], dv.astype(dv_ref.dtype), mask=qv_mask)
            plt.store(dk_ref.at[pl.ds(start, C), :], dk.astype(dk_ref.dtype), mask=qk_mask)
            lag = jnp.maximum(i[:, None] - i[None, :], 0).astype(f32)
            plt.store(u_ref.at[pl.ds(start, C)], jnp.sum(dk_inter * k.astype(f32), axis=1), mask=in_seq)
            plt.store(intra_ref.at[pl.ds(start, C)], jnp.sum(lag * scores * d_products, axis=1), mask=in_seq)
        q_in = q.astype(f32) * (scale * entering)[:, None]
        if q_gate is not None:
            q_in = jnp.where(q_gate[:, None], q_in, 0.0)
        r = carry_factor * r + _dot(q_in.astype(dtype), do, precision, trans_a=True)
        return r, run_next

    run_start = run_after_ref[0] if has_runs else jnp.int32(0)
    r, _ = jax.lax.fori_loop(0, count, body, (state_ref[...], run_start))
    r_out_ref[...] = r


# ------------------------------------------------------------------------------------------------ launches

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one launch: T positions in chunks of C, grouped into pieces."""

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

    @property
    def lengths(self) -> np.ndarray:
        return np.minimum(self.piece_len, self.T - self.piece_len * np.arange(self.P))


def _dims(K: int, V: int, block_v: int) -> tuple[int, int, int]:
    kp = pl.next_power_of_2(max(K, 16))
    bv = min(block_v, pl.next_power_of_2(max(V, 16)))
    return kp, bv, -(-V // bv) * bv


def _call(kernel, grid, in_specs, args, out_specs, out_shape, num_warps, num_stages, name):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=not _on_gpu(), name=name)(*args)


def _specs(B: int, H: int, T_block: int, kp: int, bv: int):
    """BlockSpecs over the grid (value block j, batch*head g, piece p)."""
    return dict(
        lg=pl.BlockSpec((1,), lambda j, g, p: (g % H,)),
        state=pl.BlockSpec((None, None, None, kp, bv), lambda j, g, p: (g // H, g % H, p, 0, j)),
        keys=pl.BlockSpec((None, T_block, None, kp), lambda j, g, p: (g // H, 0, g % H, 0)),
        values=pl.BlockSpec((None, T_block, None, bv), lambda j, g, p: (g // H, 0, g % H, j)),
        runs=pl.BlockSpec((None, T_block), lambda j, g, p: (g // H, 0)),
        run_edge=pl.BlockSpec((None, 1), lambda j, g, p: (g // H, p)),
        partial=pl.BlockSpec((None, None, T_block, None, kp), lambda j, g, p: (j, g // H, 0, g % H, 0)),
        per_position=pl.BlockSpec((None, None, None, T_block), lambda j, g, p: (j, g // H, g % H, 0)),
    )


def _forward_launch(q, k, v, lg, states, run_ids, run_before, plan: _Plan, *, scale, block_v, num_warps,
                    num_stages, precision, out_dtype, dot_with=None):
    """Forward kernel over all pieces from the given entering states [B, H, P, kp, vp]; returns
    (o or None, w or None, final states). With q None, only the pieces' final states are computed (k and v
    are read, nothing else); with dot_with [B, T, H, V], also w = dot_with . o^inter [B, H, T]."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    kp, bv, vp = _dims(K, V, block_v)
    s = _specs(B, H, plan.n_chunks * plan.C, kp, bv)
    with_output = q is not None
    with_dot = dot_with is not None
    has_runs = run_ids is not None
    nv = vp // bv
    kernel = functools.partial(
        _forward_kernel, T=T, C=plan.C, K=K, V=V, block_v=bv, chunks_per_piece=plan.chunks_per_piece,
        n_chunks=plan.n_chunks, scale=scale, has_runs=has_runs, with_output=with_output, with_dot=with_dot,
        precision=precision)
    args = ([lg, states] + ([q] if with_output else []) + [k, v] + ([run_ids, run_before] if has_runs else [])
            + ([dot_with] if with_dot else []))
    in_specs = ([s["lg"], s["state"]] + ([s["keys"]] if with_output else []) + [s["keys"], s["values"]]
                + ([s["runs"], s["run_edge"]] if has_runs else []) + ([s["values"]] if with_dot else []))
    out_shape, out_specs = [], []
    if with_output:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, V), out_dtype))
        out_specs.append(s["values"])
    if with_dot:
        out_shape.append(jax.ShapeDtypeStruct((nv, B, H, T), f32))
        out_specs.append(s["per_position"])
    out_shape.append(jax.ShapeDtypeStruct((B, H, plan.P, kp, vp), f32))
    out_specs.append(s["state"])
    out = list(_call(kernel, (nv, B * H, plan.P), in_specs, args, out_specs, out_shape, num_warps, num_stages,
                     "fleet_chunked_forward" if with_output else "fleet_chunked_piece_states"))
    o = out.pop(0) if with_output else None
    # Each value block holds part of w's sum over the value dimension; add them in a fixed order.
    w = jnp.sum(out.pop(0), axis=0) if with_dot else None
    return o, w, out[0]


def _backward_launch(q, k, v, do, lg, states, run_ids, run_after, plan: _Plan, *, scale, block_v, num_warps,
                     num_stages, precision):
    """Reverse kernel. With k None, only the pieces' reverse states are computed (reads q and dO).
    Returns (dk [B, T, H, K], dv [B, T, H, V], u, intra [B, H, T] f32 (see fleetjax.vjp), reverse
    states [B, H, P, kp, vp]); the first four are None without k."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    kp, bv, vp = _dims(K, V, block_v)
    s = _specs(B, H, plan.n_chunks * plan.C, kp, bv)
    with_grads = k is not None
    has_runs = run_ids is not None
    kernel = functools.partial(
        _backward_kernel, T=T, C=plan.C, K=K, V=V, block_v=bv, chunks_per_piece=plan.chunks_per_piece,
        n_chunks=plan.n_chunks, scale=scale, has_runs=has_runs, with_grads=with_grads, precision=precision)
    args = ([lg, states, q] + ([k] if with_grads else []) + [do] + ([v] if with_grads else [])
            + ([run_ids, run_after] if has_runs else []))
    in_specs = ([s["lg"], s["state"], s["keys"]] + ([s["keys"]] if with_grads else []) + [s["values"]]
                + ([s["values"]] if with_grads else []) + ([s["runs"], s["run_edge"]] if has_runs else []))
    nv = vp // bv
    out_shape = [jax.ShapeDtypeStruct((B, H, plan.P, kp, vp), f32)]
    out_specs = [s["state"]]
    if with_grads:
        position = jax.ShapeDtypeStruct((nv, B, H, T), f32)
        # With one value block dk is complete in one program and is written in the input dtype.
        dk_dtype = q.dtype if nv == 1 else f32
        out_shape = [jax.ShapeDtypeStruct((nv, B, T, H, K), dk_dtype), jax.ShapeDtypeStruct((B, T, H, V), v.dtype),
                     position, position] + out_shape
        out_specs = [s["partial"], s["values"], s["per_position"], s["per_position"]] + out_specs
    out = _call(kernel, (nv, B * H, plan.P), in_specs, args, out_specs, out_shape, num_warps, num_stages,
                "fleet_chunked_backward" if with_grads else "fleet_chunked_reverse_piece_states")
    if not with_grads:
        return None, None, None, None, out[0]
    # Each value block holds part of the sums over the value dimension; add them in a fixed order.
    dk_parts, dv, u_parts, intra_parts, r = out
    dk = dk_parts[0] if nv == 1 else jnp.sum(dk_parts, axis=0)
    return dk, dv, jnp.sum(u_parts, axis=0), jnp.sum(intra_parts, axis=0), r


def _pad_state(x: jax.Array, kp: int, vp: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, 0), (0, kp - x.shape[-2]), (0, vp - x.shape[-1])))


def _piece_runs(run_ids, plan: _Plan):
    """Per piece [B, P]: the run before it, its first and last run, and the run after it (or the last)."""
    starts = plan.piece_len * np.arange(plan.P)
    ends = np.minimum(starts + plan.piece_len, plan.T) - 1
    first, last = run_ids[:, starts], run_ids[:, ends]
    before = jnp.concatenate([jnp.zeros_like(first[:, :1]), run_ids[:, starts[1:] - 1]], axis=1)
    after = jnp.concatenate([first[:, 1:], last[:, -1:]], axis=1)
    return before, first, last, after


def _entering(start, local, carry, reverse: bool) -> jax.Array:
    """Entering states [B, H, P, kp, vp] of the pieces from their local ones (same layout), carry [B, H, P]."""
    entering, _ = pass_states(start, jnp.moveaxis(local, 2, 0), jnp.moveaxis(carry, 2, 0), reverse=reverse)
    return jnp.moveaxis(entering, 0, 2)


def _forward(q, k, v, lg, initial_state, run_ids, scale, config: PallasConfig, out_dtype, dot_with=None):
    """(o [B, T, H, V] out_dtype, final state [B, H, K, V] f32, w [B, H, T] or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    plan = _Plan(T, config.chunk_size, config.num_sequence_pieces)
    kp, bv, vp = _dims(K, V, config.block_v)
    precision = _PRECISIONS[config.precision]
    launch = functools.partial(_forward_launch, lg=lg, plan=plan, scale=scale, block_v=config.block_v,
                               num_warps=config.num_warps, num_stages=config.num_stages, precision=precision,
                               out_dtype=out_dtype)
    start = _pad_state(initial_state, kp, vp)
    run_before = None
    if run_ids is not None:
        run_before, _, run_last, _ = _piece_runs(run_ids, plan)
    if plan.P == 1:
        states = start[:, :, None]
    else:
        _, _, local = launch(None, k, v, states=jnp.zeros((B, H, plan.P, kp, vp), f32), run_ids=run_ids,
                             run_before=run_before)
        carry = jnp.broadcast_to(jnp.exp(plan.lengths[None, :] * lg[:, None]), (B, H, plan.P))
        if run_ids is not None:
            carry = carry * (run_last == run_before)[:, None, :]
        states = _entering(start, local, carry, reverse=False)
    o, w, finals = launch(q, k, v, states=states, run_ids=run_ids, run_before=run_before, dot_with=dot_with)
    return o, finals[:, :, -1, :K, :V], w


def _backward(q, k, v, do, lg, run_ids, scale, config: PallasConfig):
    """(dk, dv [B, T, H, *], d initial_state [B, H, K, V] f32, u, intra [B, H, T]) by the reverse walk
    from a zero reverse state (the final state's cotangent is handled by fleetjax.vjp)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    plan = _Plan(T, config.chunk_size, config.backward_num_sequence_pieces)
    kp, bv, vp = _dims(K, V, config.backward_block_v)
    launch = functools.partial(_backward_launch, lg=lg, plan=plan, scale=scale, block_v=config.backward_block_v,
                               num_warps=config.backward_num_warps, num_stages=config.backward_num_stages,
                               precision=_PRECISIONS[config.precision])
    start = jnp.zeros((B, H, kp, vp), f32)
    run_after = None
    if run_ids is not None:
        _, run_first, _, run_after = _piece_runs(run_ids, plan)
    if plan.P == 1:
        states = start[:, :, None]
    else:
        *_, local = launch(q, None, None, do, states=jnp.zeros((B, H, plan.P, kp, vp), f32), run_ids=run_ids,
                           run_after=run_after)
        carry = jnp.broadcast_to(jnp.exp(plan.lengths[None, :] * lg[:, None]), (B, H, plan.P))
        if run_ids is not None:
            carry = carry * (run_first == run_after)[:, None, :]
        states = _entering(start, local, carry, reverse=True)
    dk, dv, u, intra, r = launch(q, k, v, do, states=states, run_ids=run_ids, run_after=run_after)
    return dk, dv, r[:, :, 0, :K, :V], u, intra


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pallas(q, k, v, lg, initial_state, run_ids, scale, config):
    return _forward(q, k, v, lg, initial_state, run_ids, scale, config, q.dtype)[:2]


def _pallas_fwd(q, k, v, lg, initial_state, run_ids, scale, config):
    *floats, run_ids = jax.custom_derivatives.custom_vjp_primal_tree_values((q, k, v, lg, initial_state, run_ids))
    # A second derivative would differentiate this forward's kernels too: refuse it there as well.
    primals = tuple(vjp.first_order_only(x) for x in floats) + (run_ids,)
    return _pallas(*primals, scale, config), primals


def pallas_backward(scale: float, config: PallasConfig, residuals, cotangents):
    """The VJP shared by both Pallas implementations: residuals (q, k, v, log_decay, initial_state, run_ids),
    cotangents (dO, d final_state), either possibly a symbolic zero. Returns
    (dq, dk, dv, d log_decay, d initial_state, None)."""
    q, k, v, lg, initial_state, run_ids = residuals
    do, d_final = cotangents
    do = jnp.zeros(v.shape, q.dtype) if vjp.is_zero(do) else do.astype(q.dtype)
    dq, _, w = _forward(do, v, k, lg, jnp.swapaxes(initial_state, -1, -2), run_ids, scale, config, q.dtype,
                        dot_with=q)
    dk, dv, d_initial, u, intra = _backward(q, k, v, do, lg, run_ids, scale, config)
    d_initial = vjp.only_first_run(d_initial, run_ids)
    d_lg = vjp.log_decay_grad(w, u, intra)
    if not vjp.is_zero(d_final):
        terms = vjp.final_state_terms(k, v, lg, initial_state, run_ids, d_final)
        dk, dv, d_initial, d_lg = (a + b for a, b in zip((dk, dv, d_initial, d_lg), terms))
    grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_lg, d_initial)
    return tuple(vjp.first_order_only(g) for g in grads) + (None,)


_pallas.defvjp(_pallas_fwd, pallas_backward, symbolic_zeros=True)


_MAX_STATE_TILE = 128 * 128  # float32 values of one program's on-chip state (registers): 64 KiB


def _check_fits(config: PallasConfig, K: int, V: int) -> None:
    kp = pl.next_power_of_2(max(K, 16))
    for name in ("block_v", "backward_block_v"):
        bv = _dims(K, V, getattr(config, name))[1]
        if kp * bv > _MAX_STATE_TILE:
            raise ValueError(f"config cannot fit: PallasConfig.{name}={getattr(config, name)} with K={K} gives a "
                             f"[{kp}, {bv}] float32 state per program, more than {_MAX_STATE_TILE} values; "
                             f"use {name} <= {max(16, _MAX_STATE_TILE // kp)}")


def pallas_impl(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: PallasConfig):
    """The fused chunked Pallas kernels; returns (o [B, T, H, V] in q's dtype, final state f32)."""
    _check_fits(config, q.shape[-1], v.shape[-1])
    return _pallas(q, k, v, log_decay, initial_state, run_ids, scale, config)
