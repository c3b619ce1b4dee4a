"""The operator, and its readable definitions: the references every fast implementation is tested against.

For batch b, head h, positions t = 0..T-1, with one decay gamma_h in (0, 1] per head:

    O_t = scale * sum_{s <= t} gamma_h^(t-s) (q_t . k_s) v_s            (scale defaults to K^-1/2)

Recurrent form, with a K x V state per (batch, head) kept in float32:

    S_t = gamma S_{t-1} + k_t v_t^T,   S_{-1} = initial_state (or 0),   o_t = scale * q_t^T S_t

Chunked form (what the fast implementations compute), for a chunk of C positions with local index i and the
state S entering it:

    o_i    = scale * ( gamma^(i+1) q_i^T S  +  sum_{j <= i} gamma^(i-j) (q_i . k_j) v_j )
    S_next = gamma^C S  +  sum_j gamma^(C-1-j) k_j v_j^T

Numerics: gamma^(-i) is never formed (it overflows for small gamma); decay factors are exp(n * log gamma)
with the mask applied to the exponent before exp, so gamma -> 0 gives exact zeros and gamma = 1 gives ones.
States and products accumulate in float32 whatever the input dtype. The scan multiplies its state by the
float32 nearest each step's factor (for a constant decay near 1, gamma itself), the sum of a float32 pair
hi + lo (:func:`step_factor`): exp is not correctly rounded on every backend, and one factor's rounding
error, repeated at every step, would compound over T steps.

Gated form: with a per-token log gate g [B, T, H] (<= 0, as fla's ``g``, Mamba-2's dt * A, GLA's log forget
gate) the update at t multiplies by a_t = gamma_h exp(g_t). With la_t = log gamma_h + g_t and L the cumulative
sum of la inside a chunk (relative to the chunk's start), gamma^(i-j) becomes exp(L_i - L_j), gamma^(i+1)
becomes exp(L_i), gamma^(C-1-j) becomes exp(L_last - L_j) and gamma^C becomes exp(L_last); only differences
with i >= j are exponentiated, so a hard forget (g = -40) gives exact zeros. The constant decay is g = 0.

Packed sequences: with segment_ids [B, T], positions with different ids never interact; the state resets
wherever the id changes (so two stretches of one id separated by another are separate sequences). The
initial state feeds the first segment of each row; the final state is the state after the row's last
position. Implementations receive run ids instead of the user's ids (fleetjax.segments).

The gradients (fleetjax.vjp) and the splitting of a sequence into pieces joined by their states
(fleetjax.state_passing) follow from these forms.

``scan`` walks the recurrence one position at a time; ``quadratic`` builds the masked decay matrix. Both take
the arguments of :func:`fleetjax.fleet_attention` (without ``implementation``/``config``) and are plain
autodiff. The functions ending in ``_impl`` are their implementation-level forms (fleetjax.implementation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fleetjax.decay import Decays
from fleetjax.implementation import Implementation, run

HIGHEST = jax.lax.Precision.HIGHEST
f32 = jnp.float32


def step_factor(log_factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """exp(log_factor) as an unevaluated float32 sum hi + lo; log_factor (la) float32, <= 0.

    exp is not correctly rounded on every backend (XLA's float32 exp on a GPU is up to ~2 ulp off), and the
    recurrence multiplies by the same factor at every step (a constant decay): hi's error repeats, so hi
    alone leaves the state off by ~T ulp after T steps (3e-5 in the final state at T=1000, decay 0.999, on
    an H200).

    lo = hi (la - log hi) is hi's first-order correction: la - log hi is hi's relative error, resolved up to
    log's rounding of a value near la, about |la| 2^-23 of the factor. So the pair is far more accurate than
    hi where the factor is near 1, which is where the memory is long enough for an error to compound (beyond
    |la| ~ 1 it is no better than hi, and such a factor forgets within a few steps). Rounded to float32,
    hi + lo is the float32 nearest exp(la) there: for la = log gamma (gamma near 1), gamma itself.

    Below float32's smallest normal number (la below about -87: exp underflows or flushes to zero) lo is
    0, and log sees a safe value instead, so that neither lo nor its gradient is NaN. That where also keeps
    XLA from simplifying log(exp(la)) to la, which would make lo 0 everywhere. The derivative of hi + lo in
    la is hi + lo, as it should be.
    """
    hi = jnp.exp(log_factor)
    normal = hi >= jnp.finfo(f32).tiny
    lo = jnp.where(normal, hi * (log_factor - jnp.log(jnp.where(normal, hi, 1.0))), 0.0)
    return hi, lo


def recurrent_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, log_factor: jax.Array, state: jax.Array,
                   scale: float) -> tuple[jax.Array, jax.Array]:
    """One position: ``S <- exp(la) S + k v^T``, ``o = scale q^T S``, with exp(la) from :func:`step_factor`.

    q_t, k_t: [B, H, K]; v_t: [B, H, V]; log_factor (la): [H] or [B, H] float32, <= 0 (log gamma, plus the
    log gate where gated); state: [B, H, K, V] float32.
    Returns (o_t [B, H, V] float32, new state [B, H, K, V] float32).
    """
    outer = jnp.einsum("bhk,bhv->bhkv", k_t.astype(f32), v_t.astype(f32), precision=HIGHEST)
    hi, lo = step_factor(jnp.broadcast_to(log_factor.astype(f32), state.shape[:2]))
    # One factor, the pair's float32 sum. As hi S + lo S, lo S (about an ulp of hi S) would be rounded
    # with a bias where what it is added to lies on the state's grid (the outer product of 16-bit k and v,
    # the rounded hi S in autodiff's transposed step), which compounds like hi's error.
    state = (hi + lo)[..., None, None] * state + outer
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(f32), state, precision=HIGHEST)
    return o_t, state


def scan_impl(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale: float, config: Any = None,
              final_state: bool = True):
    """``jax.lax.scan`` over time with a float32 [B, H, K, V] state; the state resets where the run changes."""
    del config, final_state
    B, T, H, _ = q.shape
    gate = jnp.zeros((B, T, H), f32) if log_gate is None else log_gate
    log_factors = log_decay[None, None, :] + gate  # [B, T, H]: the log of the update's factor at each position
    if run_ids is None:
        resets = jnp.zeros(q.shape[:2], bool)
    else:
        # Run 0 continues the entering state; a row whose first run is not 0 starts from zero.
        resets = jnp.concatenate([run_ids[:, :1] != 0, run_ids[:, 1:] != run_ids[:, :-1]], 1)

    def step(state, xs):
        q_t, k_t, v_t, log_factor_t, reset_t = xs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        return recurrent_step(q_t, k_t, v_t, log_factor_t, state, scale)[::-1]

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    final_state, o = jax.lax.scan(step, initial_state, (time_major(q), time_major(k), time_major(v),
                                                        time_major(log_factors), time_major(resets)))
    return jnp.moveaxis(o, 0, 1), final_state


def _finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x in float32 with its non-finite entries set to 0, the mask of those entries)."""
    x = x.astype(f32)
    bad = ~jnp.isfinite(x)
    return jnp.where(bad, 0.0, x), bad


def _poison(x: jax.Array, reached: jax.Array) -> jax.Array:
    """x, NaN where ``reached``, with the gradient of x everywhere."""
    return x + jax.lax.stop_gradient(jnp.where(reached, jnp.nan, 0.0))


def quadratic_impl(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale: float, config: Any = None,
                   final_state: bool = True):
    """The masked [T, T] decay matrix, O(T^2) memory: for small T and tests.

    A non-finite input must reach only what depends on it, also through autodiff, whose products multiply
    by the masked zeros too (0 * inf = NaN): q, k and v enter the products finite, and the outputs that
    depend on a non-finite entry are made NaN afterwards by adding a NaN that carries no gradient (the
    gradient of those outputs is still their finite one, as the terms it sends to other inputs are)."""
    del config, final_state
    T = q.shape[1]
    t = jnp.arange(T)
    if run_ids is None:
        run_ids = jnp.zeros(q.shape[:2], jnp.int32)
    (q, bad_q), (k, bad_k), (v, bad_v) = _finite(q), _finite(k), _finite(v)
    B = q.shape[0]
    decays = Decays(log_decay, log_gate)
    # Mask before exp: exponents stay <= 0, so decay -> 0 gives exact zeros and decay = 1 gives ones.
    lag = t[:, None] - t[None, :]
    mask = (lag >= 0)[None] & (run_ids[:, :, None] == run_ids[:, None, :])  # [B, T, S]
    if log_gate is None:  # the lag times log gamma: exact for the constant decay
        pair_exponent = lag[None, None] * log_decay[None, :, None, None]
    else:  # the sum of la over s < r <= t, each pair's from its own terms: [B, H, T, S]
        la = log_decay[None, :, None] + jnp.swapaxes(log_gate, 1, 2)  # [B, H, T]
        pair_exponent = jnp.cumsum(jnp.where((lag > 0)[None, None], la[:, :, :, None], 0.0), axis=2)
    exponent = jnp.where(mask[:, None], pair_exponent, -jnp.inf)
    weights = scale * jnp.exp(exponent)  # [B, H, T, S]
    scores = jnp.einsum("bthk,bshk->bhts", q, k, precision=HIGHEST) * weights
    o = jnp.einsum("bhts,bshv->bthv", scores, v, precision=HIGHEST)

    first_run = (run_ids == 0)[:, :, None, None]  # [B, T, 1, 1]: positions the initial state reaches
    q_decay = jnp.exp(jnp.swapaxes(decays.from_start(B, T), 1, 2))[..., None]  # [B, T, H, 1]
    o = o + jnp.where(first_run, scale * q_decay * jnp.einsum(
        "bthk,bhkv->bthv", q, initial_state, precision=HIGHEST), 0.0)
    # o_t[c] depends on q_t, and on k_s (all of it) and v_s[c] for every pair (t, s).
    bad_kv = jnp.any(bad_k, axis=-1, keepdims=True) | bad_v  # [B, S, H, V]
    reached = jnp.einsum("bts,bshv->bthv", mask.astype(f32), bad_kv.astype(f32)) > 0
    o = _poison(o, reached | jnp.any(bad_q, axis=-1, keepdims=True))

    last_run = run_ids[:, -1:]
    in_last = (run_ids == last_run)[:, :, None]  # [B, T, 1]
    k_weight = jnp.where(in_last, jnp.exp(jnp.swapaxes(decays.to_end(B, T), 1, 2)), 0.0)  # [B, T, H]
    final_state = jnp.einsum("bsh,bshk,bshv->bhkv", k_weight, k, v, precision=HIGHEST)
    carried = jnp.where((last_run[:, 0] == 0)[:, None, None, None],
                        jnp.exp(decays.total(B, T))[..., None, None] * initial_state, 0.0)
    final_state = final_state + carried
    # The final state's columns that a non-finite k or v of the last run reaches.
    reached = jnp.any(in_last[..., None] & bad_kv, axis=1)[:, :, None, :]  # [B, H, 1, V]
    return o, _poison(final_state, reached)


SCAN = Implementation("scan", scan_impl, "jax.lax.scan over time with the float32 state: the recurrence, readable")
QUADRATIC = Implementation("quadratic", quadratic_impl, "the masked T x T decay matrix, O(T^2) memory")


def scan(q, k, v, decay, *, scale=None, log_gate=None, initial_state=None, return_final_state=False,
         segment_ids=None, sequence_axis_name=None):
    """Reference by recurrence; arguments and result as :func:`fleetjax.fleet_attention`."""
    return run(SCAN, q, k, v, decay, scale=scale, log_gate=log_gate, initial_state=initial_state,
               return_final_state=return_final_state, segment_ids=segment_ids,
               sequence_axis_name=sequence_axis_name)


def quadratic(q, k, v, decay, *, scale=None, log_gate=None, initial_state=None, return_final_state=False,
              segment_ids=None, sequence_axis_name=None):
    """Reference by the masked decay matrix; arguments and result as :func:`fleetjax.fleet_attention`."""
    return run(QUADRATIC, q, k, v, decay, scale=scale, log_gate=log_gate, initial_state=initial_state,
               return_final_state=return_final_state, segment_ids=segment_ids,
               sequence_axis_name=sequence_axis_name)
