"""The backward of the operator, and what every custom VJP of fleetjax shares: the decay gradient and the
terms of the final state's cotangent.

With A_ts = scale * gamma^(t-s) for s <= t in the same segment (0 otherwise) and dO the output's cotangent:

    dq_t = sum_{s <= t} A_ts (dO_t . v_s) k_s        (the op with query=dO, key=v, value=k)
    dk_s = sum_{t >= s} A_ts (dO_t . v_s) q_t        (the op reversed in time: query=v, key=dO, value=q)
    dv_s = sum_{t >= s} A_ts (q_t . k_s) dO_t        (reversed: query=k, key=q, value=dO)
    d log gamma = sum_{s <= t} (t - s) A_ts (q_t . k_s)(dO_t . v_s)
                  + sum_t (t+1) scale gamma^(t+1) q_t^T S0 dO_t          (the initial state S0, first segment)
                  + sum_s (T-1-s) gamma^(T-1-s) k_s^T dS_T v_s + T gamma^T <dS_T, S0>   (the final state's dS_T)
    d S0 = scale sum_t gamma^(t+1) q_t dO_t^T + gamma^T dS_T,    d gamma = d log gamma / gamma.

The identity d log gamma = sum_t t (q_t . dq_t) - sum_s s (k_s . dk_s) would give the decay gradient from the
other gradients, but in float32 it cancels catastrophically: at long T absolute positions multiply huge sums,
and at small decay the lag-0 pairs (q_t . k_t)(dO_t . v_t), which carry nothing, dominate both sides. So the
implementations sum every pair with its own non-negative lag weight instead, in chunks of C positions
(position t is at index i of its chunk, s at index j of its chunk, m whole chunks lie between them):

- pairs inside a chunk: ``intra`` [B, H, T], per query i, sum_{j <= i} (i - j) A_ij (q_i . k_j)(dO_i . v_j);
- pairs across chunks have lag (i + 1) + (len_s - 1 - j) + C m, summed as three positive-weighted parts:
  ``w`` = q_t . dq_t^inter (the part of dq from earlier chunks, initial state included) weighted by i + 1;
  ``u`` = k_s . dk_s^inter (from later chunks) weighted by len_s - 1 - j; and ``counts`` = q_t . dq'_t^inter
  weighted by C, where dq' comes from a second state that counts, for every term of the dq state, the whole
  chunks it has crossed (the initial state's term crosses all chunks before t, so its lag t + 1 comes out
  whole as well). Nothing large is subtracted; the rounding of each part is relative to itself.
- the final state's cotangent dS_T is kept out of every carried reverse state, so it never enters ``u``: its
  terms x_s = gamma^(T-1-s) k_s^T dS_T v_s are summed with their own weight T-1-s (``exit_log_decay_grad``),
  and the term of the carry gamma^T of the entering state with weight T (``carry_term``). The xla
  backward computes them here (``final_state_terms``); the Pallas reverse walks add dS_T's terms to dk and dv
  as their own product and return x. All of them are skipped when the cotangent is a symbolic zero.

Or, instead of u and counts, one part from the dq walk alone: ``tangent`` = q_t . dq''_t^inter weighted by 1,
where dq'' comes from the derivative of the dq state in log gamma, D = sum_s (c-1-s) gamma^(c-1-s) v_s k_s^T
(c the chunk's start), carried as a second state, D <- carry (D + len S) + sum_j (len-1-j) leaving_j v_j k_j^T
(fleetjax.chunk.update_tangent): every weight is still a non-negative lag. implementation="xla" and the Mosaic
dq walk carry it (one more product per chunk, where the counts need the dk walk's sums besides); the Triton
walks the counts.

With a gate, d log gamma also equals sum over the batch and positions of d log_gate (every step's decay is
gamma exp(g_t), and a pair spans t - s steps), which would spare the dq walk its second state. It is not used:
:func:`log_gate_grad`'s flow across chunk boundaries is a difference of sums, and summed over every position it
becomes the chunk-level form of the cancelling identity above (float32, T = 16384, gamma = 0.9: relative error
1.5e-4 on random inputs and 1e-3 on aligned ones, against 5e-8 and 5e-6 from the tangent).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from fleetjax.decay import Decays

f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["log_decay", "log_gate", "initial_state", "q", "k", "v"])
@dataclasses.dataclass(frozen=True)
class Wanted:
    """Which of the decay's inputs and the initial state a backward differentiates: a residual with no arrays
    (its fields are static), taken from the forward's primals (:func:`wanted`). A decay that is not learned,
    the common case (RetNet's fixed decays; ``decay=None`` with a gate), spares the backward the sums of its
    gradient, among them the dq walk's second state (the crossing counts); with no gate learned either, also
    the float32-accurate products that only those sums need. No initial state (or a fixed one) spares the
    float32-accurate update of the reverse state that only its gradient reads. q, k, v: whether their
    gradients are wanted; a backward that makes its plain/contained choice on the device hands each wanted
    one's buffer from its plain walk to its contained one, which jax never drops (a pallas_call), so an
    unwanted one is not handed on and its plain walk can be dropped."""

    log_decay: bool = True
    log_gate: bool = True
    initial_state: bool = True
    q: bool = True
    k: bool = True
    v: bool = True

    @property
    def any(self) -> bool:
        return self.log_decay or self.log_gate

    def inputs(self, dq, dk, dv) -> tuple:
        """(dq, dk, dv), each None where its input's gradient is not wanted."""
        return tuple(g if want else None for g, want in zip((dq, dk, dv), (self.q, self.k, self.v)))


def wanted(log_decay, log_gate, initial_state, q=None, k=None, v=None) -> Wanted:
    """The :class:`Wanted` of a custom VJP's forward rule with ``symbolic_zeros=True`` from its
    ``jax.custom_derivatives.CustomVJPPrimal`` log decay, log gate and initial state (None arrives as None;
    pass None for a state whose gradient comes from elsewhere) and q, k, v (None: wanted)."""
    perturbed = lambda x: x is not None and bool(x.perturbed)  # noqa: E731
    inputs = {name: x is None or perturbed(x) for name, x in (("q", q), ("k", k), ("v", v))}
    return Wanted(log_decay=perturbed(log_decay), log_gate=perturbed(log_gate), initial_state=perturbed(initial_state),
                  **inputs)


def is_zero(cotangent) -> bool:
    return isinstance(cotangent, SymbolicZero)


def only_first_run(d_initial: jax.Array, run_ids: jax.Array | None) -> jax.Array:
    """The reverse walk ends with the reverse state of the row's first run; the initial state reaches that
    run only if it is run 0 (a row may start a new run at its first position under sequence parallelism)."""
    if run_ids is None:
        return d_initial
    return jnp.where((run_ids[:, 0] == 0)[:, None, None, None], d_initial, 0.0)


def log_decay_summand(w: jax.Array, intra: jax.Array, chunk_size: int, *, u: jax.Array | None = None,
                      counts: jax.Array | None = None, tangent: jax.Array | None = None) -> jax.Array:
    """[B, H, T] float32: each position's summand of d loss / d log decay (:func:`log_decay_grad`), from its
    parts [B, H, T] float32 in chunks of ``chunk_size`` (see the module docstring): intra + (i + 1) w +
    (len - 1 - i) u + C counts, or with the tangent's part intra + (i + 1) w + tangent (u and counts None),
    with i the position's index in its chunk. The Mosaic dq walk forms the tangent's form in its chunks."""
    T = w.shape[-1]
    t = jnp.arange(T)
    i = t % chunk_size
    weighted = intra + (i + 1).astype(f32) * w
    if tangent is not None:
        return weighted + tangent
    length = jnp.minimum(chunk_size, T - (t - i))
    return weighted + (length - 1 - i).astype(f32) * u + float(chunk_size) * counts


def log_decay_grad(w: jax.Array, intra: jax.Array, chunk_size: int, *, u: jax.Array | None = None,
                   counts: jax.Array | None = None, tangent: jax.Array | None = None) -> jax.Array:
    """d loss / d log decay [H] of the pairs among positions and of the initial state: the sum over the batch
    and the positions of :func:`log_decay_summand` (same arguments)."""
    return jnp.sum(log_decay_summand(w, intra, chunk_size, u=u, counts=counts, tangent=tangent), axis=(0, 2))


def log_gate_grad(w: jax.Array, u: jax.Array, spanned: jax.Array, x: jax.Array | None, chunk_size: int) -> jax.Array:
    """d loss / d log_gate [B, H, T]: per position r, the terms whose decay spans r, from the parts w, u
    (see the module docstring), spanned (the intra-chunk pairs j < r <= i) and x (the final state's terms,
    or None), [B, H, T] float32, of chunks of ``chunk_size``:

        spanned_r + sum_{t >= r in r's chunk} w_t + sum_{s < r in r's chunk} u_s + sum_{s < r} x_s
        + (the pairs from before r's chunk to after it: the flow into the chunk, less what ends in it)

    The last part is the only difference of sums (fla forms the whole gradient so); its rounding is relative
    to the flow across one chunk boundary, not to anything absolute in T. The carry of the initial state into
    the final state spans every position: the caller adds it."""
    B, H, T = w.shape
    w_c, u_c = _in_chunks(w, chunk_size), _in_chunks(u, chunk_size)
    n, C = w_c.shape[-2:]
    from_here = jnp.flip(jnp.cumsum(jnp.flip(w_c, -1), axis=-1), -1)  # sum over t >= r in the chunk
    before_here = jnp.cumsum(u_c, axis=-1) - u_c  # sum over s < r in the chunk
    into, out_of = jnp.sum(w_c, axis=-1), jnp.sum(u_c, axis=-1)  # [B, H, n]
    # Pairs across the boundary after chunk m: the flow F_m = sum over later chunks of (into - out_of).
    flow_after = jnp.flip(jnp.cumsum(jnp.flip(into - out_of, -1), axis=-1), -1) - (into - out_of)
    through = flow_after - out_of  # pairs from before chunk m to after it
    d = spanned + (from_here + before_here + through[..., None]).reshape(B, H, n * C)[..., :T]
    if x is not None:
        d = d + jnp.cumsum(x, axis=-1) - x
    return d


def spanned_from_sums(row: jax.Array, column: jax.Array, chunk_size: int) -> jax.Array:
    """log_gate_grad's spanned [B, H, T] from the chunk's pairs' row sums ``row`` (per query i, its pairs with
    the keys j < i of its chunk) and column sums ``column`` (per key j, its pairs with the queries i > j),
    [B, H, T] float32, of chunks of ``chunk_size``: per position r, sum_{t < r in r's chunk} (column_t - row_t),
    the pairs that start before r less those that also end before it. Both may also hold each position's own
    pair (t, t), as the Mosaic walks' do: it cancels in their difference. Its rounding is relative to the
    chunk's row and column sums, which a kernel forms in float32 from its products (no triangle product over a
    tile)."""
    B, H, T = row.shape
    difference = _in_chunks(column - row, chunk_size)
    return (jnp.cumsum(difference, axis=-1) - difference).reshape(B, H, -1)[..., :T]


def _in_chunks(a: jax.Array, chunk_size: int) -> jax.Array:
    """[B, H, T] -> [B, H, n, C]: a's positions in chunks of C = ``chunk_size``, the last padded with zeros.
    A sequence shorter than a chunk is one chunk of T: the same sums over it without the padding, whose fusion
    failed XLA's GPU compile at T <= 7 of 64 ("Failed to translate module to LLVM IR", jax 0.11.2)."""
    B, H, T = a.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    return jnp.pad(a, ((0, 0), (0, 0), (0, n * C - T))).reshape(B, H, n, C)


def whole_row_carry(decays: Decays, run_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, H]: the decay of the state entering the row through all of it, where the row is one run (the
    entering state reaches the final state), else 0."""
    carry = jnp.exp(decays.total(B, T))
    if run_ids is None:
        return carry
    return jnp.where((run_ids[:, -1] == 0)[:, None], carry, 0.0)


def exit_log_decay_grad(x: jax.Array) -> jax.Array:
    """d log decay [H] of the final state's terms over the positions: sum_s (T-1-s) x_s, where x [B, H, T]
    holds the decayed k_s^T dS_T v_s (its own weight, so nothing cancels)."""
    T = x.shape[-1]
    return jnp.sum(x * jnp.arange(T - 1, -1, -1, dtype=f32), axis=(0, 2))


def carry_term(carry: jax.Array, d_final: jax.Array, start: jax.Array) -> jax.Array:
    """[B, H]: carry * <d_final, start>, the term of the entering state carried into the final state; its
    decay spans every position (d log decay: T times it, d log_gate_r: it)."""
    return carry * jnp.sum(d_final * start, axis=(-1, -2))


def final_state_terms(k: jax.Array, v: jax.Array, decays: Decays, initial_state: jax.Array,
                      run_ids: jax.Array | None, d_final: jax.Array):
    """The gradients that flow from the final state S_T = sum_s exp(sum of la after s) k_s v_s^T (+ the
    carried S0 when the row is one run): (dk [B, T, H, K], dv [B, T, H, V], d initial_state [B, H, K, V],
    d log decay [H], d log_gate [B, H, T] or None)."""
    B, T, H, _ = k.shape
    weight = jnp.swapaxes(jnp.exp(decays.to_end(B, T)), 1, 2)  # [B, T, H]
    whole = whole_row_carry(decays, run_ids, B, T)  # [B, H]
    if run_ids is not None:
        weight = jnp.where((run_ids == run_ids[:, -1:])[:, :, None], weight, 0.0)
    kf, vf, d_final = k.astype(f32), v.astype(f32), d_final.astype(f32)
    dk_raw = jnp.einsum("bhkv,bshv->bshk", d_final, vf, precision=HIGHEST)
    dv_raw = jnp.einsum("bhkv,bshk->bshv", d_final, kf, precision=HIGHEST)
    x = jnp.swapaxes(weight, 1, 2) * jnp.einsum("bshk,bshk->bhs", dk_raw, kf)  # [B, H, T]
    term = carry_term(whole, d_final, initial_state)
    d_log_decay = exit_log_decay_grad(x) + T * jnp.sum(term, axis=0)
    d_gate = None
    if decays.gated:
        d_gate = jnp.cumsum(x, axis=-1) - x + term[:, :, None]
    return (weight[..., None] * dk_raw, weight[..., None] * dv_raw, whole[..., None, None] * d_final,
            d_log_decay, d_gate)


@jax.custom_jvp
def first_order_only(x):
    """Identity whose derivative raises: wraps what the Pallas VJPs compute, so that a second derivative
    fails with this message instead of differentiating kernels that have no derivative rules."""
    return x


@first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise NotImplementedError(
        "fleetjax: second derivatives through implementation='pallas' or 'pallas_fleet' are not supported "
        "(the Pallas kernels have no derivative rules); use implementation='xla' for reverse mode (jax.grad of "
        "jax.grad), or 'scan' or 'quadratic' for forward mode too (jax.jvp, jax.hessian).")
