"""implementation="xla": the chunked form in pure jnp, with a memory-lean custom VJP.

Chunked form (DESIGN.md section 1), chunk of C positions, local index i, state S entering the chunk:

    o_i    = scale * ( gamma^(i+1) q_i^T S  +  sum_{j <= i} gamma^(i-j) (q_i . k_j) v_j )
    S_next = gamma^len S  +  sum_j gamma^(len-1-j) k_j v_j^T        (len = C except in the last chunk)

The intra-chunk part of every chunk is computed at once as batched [C, C] products; the state is passed
between chunks by a ``jax.lax.scan``. What is kept in memory: the inputs in chunk layout (float32), one
[B, H, C, C] float32 score block per chunk (T * C per head, never T x T), the output, and a single
[B, H, K, V] float32 carry: no state of every chunk. The backward pass recomputes instead of storing: its
residuals are the inputs alone. It runs the forward with roles swapped for dq (query=dO, key=v, value=k)
and one reverse scan that yields dk, dv and the initial-state gradient together; the final state's
cotangent and the decay gradient come from fleetjax.vjp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fleetjax import vjp
from fleetjax.implementation import Implementation
from fleetjax.vma import vary_like

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """chunk_size: positions per chunk (the last chunk may be shorter)."""

    chunk_size: int = 64

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"XlaConfig.chunk_size must be a positive int, got {self.chunk_size!r}")


def default_config(q: jax.Array, v: jax.Array) -> XlaConfig:
    del q, v
    return XlaConfig()


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """Static geometry of T positions cut into n chunks of C (numpy, known at trace time)."""

    T: int
    C: int

    @property
    def n(self) -> int:
        return -(-self.T // self.C)

    @property
    def lengths(self) -> np.ndarray:  # [n]
        return np.minimum(self.C, self.T - self.C * np.arange(self.n))

    def split(self, x: jax.Array) -> jax.Array:
        """[B, T, H, D] -> [n, B, H, C, D], zero padded."""
        B, _, H, D = x.shape
        x = jnp.pad(x, ((0, 0), (0, self.n * self.C - self.T), (0, 0), (0, 0)))
        return x.reshape(B, self.n, self.C, H, D).transpose(1, 0, 3, 2, 4)

    def merge(self, x: jax.Array) -> jax.Array:
        """[n, B, H, C, D] -> [B, T, H, D]."""
        n, B, H, C, D = x.shape
        return x.transpose(1, 0, 3, 2, 4).reshape(B, n * C, H, D)[:, :self.T]

    def decays(self, log_decay: jax.Array) -> dict[str, jax.Array]:
        """Decay factors, each exp(exponent * log decay) with the exponent masked before exp."""
        i = np.arange(self.C)
        lengths = self.lengths[:, None]
        lag = i[:, None] - i[None, :]
        lg = log_decay[None, None, :, None]  # [1, 1, H, 1]
        entering = (i + 1)[None, None, None, :] * lg  # [1, 1, H, C]: gamma^(i+1)
        leaving = jnp.where(i[None] < lengths, lengths - 1 - i[None], 0)  # [n, C]
        leaving = jnp.where((i[None] < lengths)[:, None, None, :], jnp.exp(leaving[:, None, None, :] * lg), 0.0)
        intra = jnp.where(lag >= 0, lag, 0)[None, None, None] * log_decay[None, None, :, None, None]
        return dict(
            entering=jnp.exp(entering)[..., None],  # [1, 1, H, C, 1]
            leaving=leaving[..., None],  # [n, 1, H, C, 1]
            intra=jnp.where(lag >= 0, jnp.exp(intra), 0.0),  # [1, 1, H, C, C]
            carry=jnp.exp(self.lengths[:, None, None] * log_decay[None, None, :]),  # [n, 1, H]
        )

    def runs(self, run_ids: jax.Array) -> jax.Array:
        """[B, T] -> [n, B, C], edge padded (padding joins the last run; its k, v are zero)."""
        padded = jnp.pad(run_ids, ((0, 0), (0, self.n * self.C - self.T)), mode="edge")
        return padded.reshape(run_ids.shape[0], self.n, self.C).transpose(1, 0, 2)


def _dot(spec: str, a, b, precision):
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=f32)


def _precision(dtype) -> jax.lax.Precision:
    # float32 inputs get full-precision products (tf32 on GPU would miss the 1e-5 contract).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


# The backward's products with the float32 states (and with the decayed keys and queries that build them)
# feed w and u, whose differences the decay gradient sums with offsets (fleetjax.vjp): rounded to tf32 (the
# GPU's default for float32 products) they gave a 10% error there on a bfloat16 case. The products of raw
# bfloat16/float16 inputs stay exact under the default precision.
_STATE_PRECISION = jax.lax.Precision.HIGHEST


def _causal_pass(q, k, v, log_decay, initial_state, run_ids, scale, chunk_size, precision, dot_with=None):
    """The forward op in float32: (o [B, T, H, V], final state [B, H, K, V]).

    With ``dot_with`` [B, T, H, V] (the dq pass: the original q), also returns dot_with_t . o_t^inter
    [B, H, T], the inter-chunk part that fleetjax.vjp needs; the products with the state then run in full
    float32 whatever the input dtype (see _STATE_PRECISION)."""
    geo = _Chunks(q.shape[1], min(chunk_size, q.shape[1]))
    qc, kc, vc = (geo.split(x.astype(f32)) for x in (q, k, v))
    d = geo.decays(log_decay)
    intra = d["intra"]
    q_factor, k_factor, carry = d["entering"], d["leaving"], d["carry"]
    if run_ids is not None:
        rc = geo.runs(run_ids)  # [n, B, C]
        before = jnp.concatenate([jnp.zeros_like(rc[:1, :, 0]), rc[:-1, :, -1]])  # [n, B]
        last = rc[:, :, -1]
        intra = intra * (rc[:, :, None, :, None] == rc[:, :, None, None, :])
        q_factor = q_factor * (rc == before[..., None])[:, :, None, :, None]
        k_factor = k_factor * (rc == last[..., None])[:, :, None, :, None]
        carry = carry * (last == before)[..., None]
    scores = _dot("nbhik,nbhjk->nbhij", qc, kc, precision) * intra
    o_intra = _dot("nbhij,nbhjv->nbhiv", scores, vc, precision)

    state_precision = precision if dot_with is None else _STATE_PRECISION

    def step(state, xs):
        q_n, k_n, v_n, carry_n = xs
        o_n = _dot("bhik,bhkv->bhiv", q_n, state, state_precision)
        state = carry_n[..., None, None] * state + _dot("bhjk,bhjv->bhkv", k_n, v_n, state_precision)
        return state, o_n

    carry = jnp.broadcast_to(carry, (geo.n,) + qc.shape[1:3])
    final_state, o_inter = jax.lax.scan(step, initial_state, (qc * q_factor, kc * k_factor, vc, carry))
    o = geo.merge(scale * (o_intra + o_inter))
    if dot_with is None:
        return o, final_state
    w = jnp.einsum("bthv,bthv->bht", geo.merge(scale * o_inter), dot_with.astype(f32))
    return o, final_state, w


def _anticausal_pass(q, k, v, do, log_decay, run_ids, scale, chunk_size, precision):
    """dk, dv [B, T, H, *], d initial_state, and the decay-gradient parts u, intra [B, H, T] (see
    fleetjax.vjp) from one reverse scan over chunks.

    The reverse state R (K x V) collects scale * gamma^(t-s+1) q_t dO_t^T of the later positions, starting
    from zero (the final state's cotangent is fleetjax.vjp.final_state_terms' part);
    dk_s = gamma^(len-1-j) R v_s and dv_s = gamma^(len-1-j) R^T k_s.
    """
    geo = _Chunks(q.shape[1], min(chunk_size, q.shape[1]))
    qc, kc, vc, dc = (geo.split(x.astype(f32)) for x in (q, k, v, do))
    d = geo.decays(log_decay)
    intra = d["intra"]
    q_factor, k_factor, carry = d["entering"], d["leaving"], d["carry"]
    if run_ids is not None:
        rc = geo.runs(run_ids)
        first = rc[:, :, 0]
        after = jnp.concatenate([rc[1:, :, 0], rc[-1:, :, -1]])  # run reached by R from the right
        intra = intra * (rc[:, :, None, :, None] == rc[:, :, None, None, :])
        q_factor = q_factor * (rc == first[..., None])[:, :, None, :, None]
        k_factor = k_factor * (rc == after[..., None])[:, :, None, :, None]
        carry = carry * (first == after)[..., None]
    weights = scale * intra  # [i, j], i >= j
    scores = _dot("nbhik,nbhjk->nbhij", qc, kc, precision) * weights
    d_products = _dot("nbhiv,nbhjv->nbhij", dc, vc, precision)
    d_scores = d_products * weights
    lag = np.arange(geo.C)[:, None] - np.arange(geo.C)[None, :]
    intra_lag = jnp.sum(scores * d_products * np.maximum(lag, 0), axis=-1)  # [n, B, H, C]
    dv_intra = _dot("nbhij,nbhiv->nbhjv", scores, dc, precision)
    dk_intra = _dot("nbhij,nbhik->nbhjk", d_scores, qc, precision)

    def step(r, xs):
        qd_n, d_n, kd_n, vd_n, carry_n = xs
        dk_n = _dot("bhjv,bhkv->bhjk", vd_n, r, _STATE_PRECISION)
        dv_n = _dot("bhjk,bhkv->bhjv", kd_n, r, precision)
        r = carry_n[..., None, None] * r + scale * _dot("bhik,bhiv->bhkv", qd_n, d_n, _STATE_PRECISION)
        return r, (dk_n, dv_n)

    carry = jnp.broadcast_to(carry, (geo.n,) + qc.shape[1:3])
    d_initial, (dk_inter, dv_inter) = jax.lax.scan(
        step, vary_like(jnp.zeros(qc.shape[1:3] + (qc.shape[-1], dc.shape[-1]), f32), q, k, v, do),
        (qc * q_factor, dc, kc * k_factor, vc * k_factor, carry), reverse=True)
    u = jnp.einsum("bthk,bthk->bht", geo.merge(dk_inter), k.astype(f32))
    intra_lag = geo.merge(intra_lag[..., None])[..., 0].transpose(0, 2, 1)
    return geo.merge(dk_intra + dk_inter), geo.merge(dv_intra + dv_inter), d_initial, u, intra_lag


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _xla(q, k, v, log_decay, initial_state, run_ids, scale, chunk_size):
    return _causal_pass(q, k, v, log_decay, initial_state, run_ids, scale, chunk_size, _precision(q.dtype))


def _xla_fwd(q, k, v, log_decay, initial_state, run_ids, scale, chunk_size):
    q, k, v, log_decay, initial_state, run_ids = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (q, k, v, log_decay, initial_state, run_ids))
    o, final_state = _xla(q, k, v, log_decay, initial_state, run_ids, scale, chunk_size)
    return (o, final_state), (q, k, v, log_decay, initial_state, run_ids)


def _xla_bwd(scale, chunk_size, residuals, cotangents):
    q, k, v, log_decay, initial_state, run_ids = residuals
    do, d_final = cotangents
    precision = _precision(q.dtype)
    do = jnp.zeros_like(v, f32) if vjp.is_zero(do) else do
    dq, _, w = _causal_pass(do, v, k, log_decay, jnp.swapaxes(initial_state, -1, -2), run_ids, scale,
                            chunk_size, precision, dot_with=q)
    dk, dv, d_initial, u, intra = _anticausal_pass(q, k, v, do, log_decay, run_ids, scale, chunk_size, precision)
    d_initial = vjp.only_first_run(d_initial, run_ids)
    d_log_decay = vjp.log_decay_grad(w, u, intra)
    if not vjp.is_zero(d_final):
        terms = vjp.final_state_terms(k, v, log_decay, initial_state, run_ids, d_final)
        dk, dv, d_initial, d_log_decay = (a + b for a, b in zip((dk, dv, d_initial, d_log_decay), terms))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_decay, d_initial, None)


_xla.defvjp(_xla_fwd, _xla_bwd, symbolic_zeros=True)


def xla_impl(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: XlaConfig,
             final_state: bool = True):
    """Chunked pure-jnp implementation; returns (o float32 [B, T, H, V], final state [B, H, K, V])."""
    del final_state  # always float32-accurate
    return _xla(q, k, v, log_decay, initial_state, run_ids, scale, config.chunk_size)


IMPLEMENTATION = Implementation(
    "xla", xla_impl, "the chunked form in pure jnp: [C, C] products per chunk, lax.scan over chunks carrying one "
    "state", config_type=XlaConfig, default_config=default_config, custom_vjp=True, higher_order=False)
