"""implementation="xla": the chunked form in pure jnp, with a memory-lean custom VJP.

The chunked form (fleetjax.reference) with the decay factors and masks of fleetjax.chunk, computed for all
chunks at once: the intra-chunk products of every chunk are batched [C, C] products, and the state is passed
between chunks by a ``jax.lax.scan``. What is kept in memory: the inputs in chunk layout (float32), one
[B, H, C, C] float32 score block per chunk (T * C per head, never T x T), the output, and a single
[B, H, K, V] float32 carry: no state of every chunk. The backward recomputes instead of storing (its
residuals are the inputs alone): the forward with roles swapped gives dq (query=dO, key=v, value=k), one
reverse scan gives dk, dv and the initial state's gradient together, and fleetjax.vjp the final state's terms.

The decay gradient comes from the dq pass without cancellation: besides the dq state
Sigma_c = sum_{s < c} gamma^(c-1-s) v_s k_s^T it carries its derivative in log gamma,
Sigma'_c = sum_{s < c} (c-1-s) gamma^(c-1-s) v_s k_s^T (c the chunk's start), so that the pairs across chunks
give sum_t ((i+1) w_t + q_t . scale gamma^(i+1) dO_t^T Sigma'_c) with w_t = q_t . dq_t^inter: every term has
its own non-negative lag weight; nothing large is subtracted (fleetjax.vjp explains why that matters, and
its log_decay_grad sums the parts; the Mosaic dq walk forms their summand in its chunks).

Non-finite values: masks select; the value operand of each product (v; in the backward k, dO and q) enters
with its non-finite entries zeroed and the outputs and states that depend on one are set to NaN
(fleetjax.chunk).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fleetjax import chunk as cm
from fleetjax import vjp
from fleetjax.chunking import Chunking
from fleetjax.decay import Decays
from fleetjax.implementation import Implementation
from fleetjax.vma import vary_like

f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """chunk_size: positions per chunk (the last chunk may be shorter)."""

    chunk_size: int = 64

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"XlaConfig.chunk_size must be a positive int, got {self.chunk_size!r}")


def default_config(q: jax.Array, v: jax.Array) -> XlaConfig:
    del q, v
    return XlaConfig()


def _precision(dtype) -> jax.lax.Precision:
    """Products of raw inputs: full float32 for float32 inputs (tf32 on GPU would miss the 1e-5 contract);
    the default for 16-bit inputs, whose values the tensor cores' tf32 holds exactly. Products with states
    and decayed values always run at HIGHEST: the outputs that leave as float32 (states, the decay
    gradient) must keep float32's accuracy."""
    return HIGHEST if jnp.dtype(dtype) == f32 else jax.lax.Precision.DEFAULT


def _dot(spec: str, a, b, precision=HIGHEST):
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=f32)


def _chunks(chunking: Chunking, decays: Decays, run_ids: jax.Array | None, reverse: bool) -> cm.Chunk:
    """The decay factors and masks of every chunk (fleetjax.chunk.chunk), fields [n, B or 1, H, ...]."""
    n, C, T = chunking.n_chunks, chunking.chunk_size, chunking.T
    starts = jnp.arange(n) * C
    one = functools.partial(cm.chunk, C=C, T=T, reverse=reverse)
    if run_ids is None and not decays.gated:
        per_head = jax.vmap(lambda start, lg: one(start, log_decay=lg), in_axes=(None, 0))
        return jax.tree.map(lambda x: x[:, None], jax.vmap(per_head, in_axes=(0, None))(starts, decays.log_decay))
    B = (decays.log_gate if run_ids is None else run_ids).shape[0]
    H = decays.log_decay.shape[0]
    if run_ids is None:
        runs, edge = jnp.zeros((n, B, C), jnp.int32), jnp.zeros((n, B), jnp.int32)
    else:
        padded = jnp.pad(run_ids, ((0, 0), (0, chunking.padded_T - T)), constant_values=-1)
        runs = padded.reshape(B, n, C).transpose(1, 0, 2)  # [n, B, C]
        ends = np.minimum(np.arange(n) * C + C, T)
        if reverse:  # the run after each chunk (the row's last for the last chunk)
            edge = jnp.concatenate([run_ids[:, ends[:-1]], run_ids[:, -1:]], axis=1).T
        else:  # the run before each chunk (0, the entering state's run, for the first)
            edge = jnp.concatenate([jnp.zeros((B, 1), run_ids.dtype), run_ids[:, np.arange(1, n) * C - 1]],
                                   axis=1).T
    if decays.gated:  # [n, B, H, C]
        gate = jnp.pad(decays.gate_tiles(), ((0, 0), (0, 0), (0, chunking.padded_T - T)))
        gate = gate.reshape(B, H, n, C).transpose(2, 0, 1, 3)
    else:
        gate = jnp.zeros((n, B, H, C), f32)
    with_runs = run_ids is not None

    def at(start, lg, r, e, g):
        return one(start, log_decay=lg, runs=r if with_runs else None, edge_run=e if with_runs else None,
                   gate=g if decays.gated else None)

    per_head = jax.vmap(at, in_axes=(None, 0, None, None, 0))
    per_row = jax.vmap(per_head, in_axes=(None, None, 0, 0, 0))
    return jax.vmap(per_row, in_axes=(0, None, 0, 0, 0))(starts, decays.log_decay, runs, edge, gate)


def _reach(ch: cm.Chunk, bad: jax.Array) -> jax.Array:
    """[n, B, H, C, D] bool: the outputs that a bad value entry (bad [n, B, H, C, D]) reaches within chunks."""
    return _dot("nbhij,nbhjd->nbhid", ch.pairs.astype(f32), bad.astype(f32)) > 0


def _poisoned(x: jax.Array, ch: cm.Chunk, bad: jax.Array) -> jax.Array:
    """x [n, B, H, C, D] with NaN where a bad value reaches it; the product is made only if there is one."""
    return jax.lax.cond(jnp.any(bad), lambda x: jnp.where(_reach(ch, bad), jnp.nan, x), lambda x: x, x)


def _columns(ch: cm.Chunk, bad: jax.Array) -> jax.Array:
    """[n, B, H, D] bool: columns of the state handed on that a bad value of a leaving key makes NaN."""
    return jnp.any(ch.leaves[..., None] & bad, axis=-2)


def _causal_pass(q, k, v, decays: Decays, initial_state, run_ids, scale, chunking: Chunking, precision,
                 dot_with=None):
    """The forward op in float32: (o [B, T, H, V], final state [B, H, K, V]).

    With ``dot_with`` [B, T, H, V] (the dq pass, where it is the original q), also the decay gradient of the
    pairs [H] (see the module docstring), and w, spanned [B, H, T] for the log gate's (fleetjax.vjp)."""
    ch = _chunks(chunking, decays, run_ids, reverse=False)
    qc, kc, vc = (chunking.split(x.astype(f32)) for x in (q, k, v))
    vc, bad = cm.finite_part(vc)
    scores = jnp.where(ch.pairs, _dot("nbhik,nbhjk->nbhij", qc, kc, precision) * ch.weights, 0.0)
    o_intra = _dot("nbhij,nbhjv->nbhiv", scores, vc, precision)
    queries = jnp.where(ch.enters[..., None], qc * ch.entering[..., None], 0.0)
    # The state's rows of the output are selected as well: a NaN state must not reach another segment.
    enters = jnp.broadcast_to(ch.enters, qc.shape[:-1])
    keys = jnp.where(ch.leaves[..., None], kc * ch.leaving[..., None], 0.0)
    poison = _columns(ch, bad)
    tangent = dot_with is not None
    lengths = jnp.asarray(chunking.chunk_lengths, f32)[:, None, None, None]  # [n, 1, 1, 1]

    def step(carry, xs):
        state, derivative = carry
        q_n, enters_n, k_n, v_n, carry_n, carries_n, poison_n, length_n, lag_n = xs
        o_n = jnp.where(enters_n[..., None], _dot("bhik,bhkv->bhiv", q_n, state), 0.0)
        new = jnp.where(carries_n[..., None, None], carry_n[..., None, None] * state, 0.0)
        new = jnp.where(poison_n[..., None, :], jnp.nan, new + _dot("bhjk,bhjv->bhkv", k_n, v_n))
        if not tangent:
            return (new, derivative), (o_n, o_n)
        d_n = jnp.where(enters_n[..., None], _dot("bhik,bhkv->bhiv", q_n, derivative), 0.0)
        moved = carry_n[..., None, None] * (derivative + length_n * state)
        derivative = jnp.where(carries_n[..., None, None], moved, 0.0) + _dot(
            "bhjk,bhjv->bhkv", k_n * lag_n[..., None], v_n)
        return (new, derivative), (o_n, d_n)

    B, H = qc.shape[1:3]
    carries = jnp.broadcast_to(ch.carries, (chunking.n_chunks, B, H))
    carry = jnp.broadcast_to(ch.carry, (chunking.n_chunks, B, H))
    (final_state, _), (o_inter, d_inter) = jax.lax.scan(
        step, (initial_state, jnp.zeros_like(initial_state)),
        (queries, enters, keys, vc, carry, carries, poison, lengths, ch.leave_lag))  # the keys' own lags
    o = _poisoned(scale * (o_intra + o_inter), ch, bad)
    if not tangent:
        return chunking.merge(o), final_state
    other = chunking.split(dot_with.astype(f32))
    # Per query: its lag-weighted intra-chunk pairs, and the pairs across chunks through both states.
    pairs = _dot("nbhik,nbhjk->nbhij", other, vc, precision) * scores
    per_position = lambda x: jnp.swapaxes(chunking.merge(x[..., None])[..., 0], 1, 2)  # noqa: E731  [B, H, T]
    w = per_position(scale * jnp.sum(o_inter * other, axis=-1))
    intra = per_position(scale * jnp.sum(ch.lag * pairs, axis=-1))
    tangent = per_position(scale * jnp.sum(d_inter * other, axis=-1))
    d_log_decay = vjp.log_decay_grad(w, intra, chunking.chunk_size, tangent=tangent)
    # A bad value poisons the decay gradient as it does its outputs (the gradient sums over all pairs).
    d_log_decay = jnp.where(jnp.any(bad, axis=(0, 1, 3, 4)), jnp.nan, d_log_decay)
    spanned_of = functools.partial(cm.spanned, precision=HIGHEST)
    spanned = per_position(scale * jax.vmap(jax.vmap(jax.vmap(spanned_of)))(pairs))
    return chunking.merge(o), final_state, d_log_decay, w, spanned


def _anticausal_pass(q, k, v, do, decays: Decays, run_ids, scale, chunking: Chunking, precision):
    """dk, dv [B, T, H, *], d initial_state and u = k . dk^inter [B, H, T] from one reverse scan over chunks.

    The reverse state R (K x V) collects gamma^(t-c+1) q_t dO_t^T of the positions t from chunk start c on,
    starting from zero (the final state's cotangent is fleetjax.vjp.final_state_terms' part);
    dk_s = scale gamma^(len-1-s) R v_s and dv_s = scale gamma^(len-1-s) R^T k_s within a chunk, and
    d initial_state = scale R after the first chunk."""
    ch = _chunks(chunking, decays, run_ids, reverse=True)
    qc, kc, vc, dc_raw = (chunking.split(x.astype(f32)) for x in (q, k, v, do))
    # The values of these products: dO (for dv and the reverse state) and q (for dk); as keys they stay raw.
    dc, bad_do = cm.finite_part(dc_raw)
    qv, bad_q = cm.finite_part(qc)
    scores = jnp.where(ch.pairs, _dot("nbhik,nbhjk->nbhij", kc, qc, precision) * ch.weights, 0.0)  # [s, t]
    d_scores = jnp.where(ch.pairs, _dot("nbhiv,nbhjv->nbhij", vc, dc_raw, precision) * ch.weights, 0.0)
    dv_intra = _dot("nbhij,nbhjv->nbhiv", scores, dc, precision)
    dk_intra = _dot("nbhij,nbhjk->nbhik", d_scores, qv, precision)
    k_in = jnp.where(ch.enters[..., None], kc * ch.entering[..., None], 0.0)
    v_in = jnp.where(ch.enters[..., None], vc * ch.entering[..., None], 0.0)
    enters = jnp.broadcast_to(ch.enters, qc.shape[:-1])
    q_out = jnp.where(ch.leaves[..., None], qc * ch.leaving[..., None], 0.0)
    poison = _columns(ch, bad_do)

    def step(r, xs):
        k_n, v_n, enters_n, q_n, d_n, carry_n, carries_n, poison_n = xs
        dv_n = jnp.where(enters_n[..., None], _dot("bhsk,bhkv->bhsv", k_n, r), 0.0)
        dk_n = jnp.where(enters_n[..., None], _dot("bhsv,bhkv->bhsk", v_n, r), 0.0)
        new = jnp.where(carries_n[..., None, None], carry_n[..., None, None] * r, 0.0)
        r = jnp.where(poison_n[..., None, :], jnp.nan, new + _dot("bhtk,bhtv->bhkv", q_n, d_n))
        return r, (dk_n, dv_n)

    B, H = qc.shape[1:3]
    carries = jnp.broadcast_to(ch.carries, (chunking.n_chunks, B, H))
    carry = jnp.broadcast_to(ch.carry, (chunking.n_chunks, B, H))
    start = vary_like(jnp.zeros((B, H, qc.shape[-1], dc.shape[-1]), f32), q, k, v, do)
    r, (dk_inter, dv_inter) = jax.lax.scan(step, start, (k_in, v_in, enters, q_out, dc, carry, carries, poison),
                                           reverse=True)
    dk = _poisoned(scale * (dk_intra + dk_inter), ch, bad_q)
    dv = _poisoned(scale * (dv_intra + dv_inter), ch, bad_do)
    u = jnp.swapaxes(chunking.merge(scale * jnp.sum(dk_inter * kc, axis=-1)[..., None])[..., 0], 1, 2)
    return chunking.merge(dk), chunking.merge(dv), scale * r, u


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _xla(q, k, v, log_decay, log_gate, initial_state, run_ids, scale, chunk_size):
    chunking = Chunking(q.shape[1], min(chunk_size, q.shape[1]))
    return _causal_pass(q, k, v, Decays(log_decay, log_gate), initial_state, run_ids, scale, chunking,
                        _precision(q.dtype))


def _xla_fwd(q, k, v, log_decay, log_gate, initial_state, run_ids, scale, chunk_size):
    primals = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (q, k, v, log_decay, log_gate, initial_state, run_ids))
    return _xla(*primals, scale, chunk_size), primals


def _xla_bwd(scale, chunk_size, residuals, cotangents):
    q, k, v, log_decay, log_gate, initial_state, run_ids = residuals
    decays = Decays(log_decay, log_gate)
    do, d_final = cotangents
    chunking = Chunking(q.shape[1], min(chunk_size, q.shape[1]))
    precision = _precision(q.dtype)
    do = jnp.zeros_like(v, f32) if vjp.is_zero(do) else do
    dq, _, d_log_decay, w, spanned = _causal_pass(do, v, k, decays, jnp.swapaxes(initial_state, -1, -2), run_ids,
                                                  scale, chunking, precision, dot_with=q)
    dk, dv, d_initial, u = _anticausal_pass(q, k, v, do, decays, run_ids, scale, chunking, precision)
    d_initial = vjp.only_first_run(d_initial, run_ids)
    d_gate_final = None
    if not vjp.is_zero(d_final):
        dk_f, dv_f, d_initial_f, d_log_decay_f, d_gate_final = vjp.final_state_terms(k, v, decays, initial_state,
                                                                                     run_ids, d_final)
        dk, dv, d_initial, d_log_decay = dk + dk_f, dv + dv_f, d_initial + d_initial_f, d_log_decay + d_log_decay_f
    d_gate = None
    if decays.gated:
        # The final state's terms come whole from vjp.final_state_terms, not as the kernels' per-position x.
        d_gate = vjp.log_gate_grad(w, u, spanned, None, chunking.chunk_size)
        if d_gate_final is not None:
            d_gate = d_gate + d_gate_final
        d_gate = jnp.swapaxes(d_gate, 1, 2)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_decay, d_gate, d_initial, None)


_xla.defvjp(_xla_fwd, _xla_bwd, symbolic_zeros=True)


def xla_impl(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale: float, config: XlaConfig,
             final_state: bool = True):
    """Chunked pure-jnp implementation; returns (o float32 [B, T, H, V], final state [B, H, K, V]).
    log_gate: [B, T, H] float32 or None (constant decay)."""
    del final_state  # always float32-accurate
    return _xla(q, k, v, log_decay, log_gate, initial_state, run_ids, scale, config.chunk_size)


IMPLEMENTATION = Implementation(
    "xla", xla_impl, "the chunked form in pure jnp: [C, C] products per chunk, lax.scan over chunks carrying one "
    "state", config_type=XlaConfig, default_config=default_config, custom_vjp=True)
