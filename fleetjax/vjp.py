"""What every custom VJP of fleetjax shares (DESIGN.md section 2): the decay gradient and the terms of
the final state's cotangent.

    d log gamma = sum_{s <= t} (t - s) A_ts (q_t . k_s)(dO_t . v_s)  + initial- and final-state terms

The identity  sum_t (t+1) q_t . dq_t - sum_s (s+1) k_s . dk_s + T <dS_T, S_T>  gives it from the gradients,
but taken literally it cancels catastrophically in float32: at long T (absolute positions multiply huge
sums) and at small decay (a lag-0 pair such as (q_t . k_t)(dO_t . v_t) dominates both sides while
contributing nothing). So the backward kernels split their work:

- intra-chunk pairs are summed directly with their lag as weight: ``intra`` [B, H, T] holds, per query
  position i, sum_{j <= i in its chunk} (i - j) A_ij (q_i . k_j)(dO_i . v_j);
- pairs across chunks enter the identity only through their inter-chunk parts ``w`` = q_t . dq_t^inter
  (initial state included) and ``u`` = k_s . dk_s^inter, [B, H, T]; it is evaluated with offsets local to
  blocks, the long-range part becoming sum_b len_b F_b, where F_b, the flow of pairs across the boundary
  after block b, is a suffix sum of per-block differences: nothing is multiplied by an absolute position;
- the final state's cotangent dS_T is kept out of every carried reverse state (those start at zero), so it
  never enters ``u``: its terms over the positions, x_s = gamma^(T-1-s) k_s^T dS_T v_s, are summed with
  their own weight T-1-s (``exit_log_decay_grad``), and the term of the carry gamma^T of the entering state
  with weight T (``carry_log_decay_grad``). The xla backward computes them here (``final_state_terms``);
  the Pallas reverse walks add dS_T's terms to dk and dv as their own product and return x. All of them are
  skipped when the cotangent is a symbolic zero (the final state was not used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def is_zero(cotangent) -> bool:
    return isinstance(cotangent, SymbolicZero)


def only_first_run(d_initial: jax.Array, run_ids: jax.Array | None) -> jax.Array:
    """The reverse walk ends with the reverse state of the row's first run; the initial state reaches that
    run only if it is run 0 (a row may start a new run at its first position under sequence parallelism)."""
    if run_ids is None:
        return d_initial
    return jnp.where((run_ids[:, 0] == 0)[:, None, None, None], d_initial, 0.0)


def log_decay_grad(w: jax.Array, u: jax.Array, intra: jax.Array, block: int = 64) -> jax.Array:
    """d loss / d log decay [H] of the pairs among positions and of the initial state, from w, u, intra
    [B, H, T] float32 (see the module docstring)."""
    B, H, T = w.shape
    block = min(block, T)
    n = -(-T // block)
    diff = jnp.pad(w - u, ((0, 0), (0, 0), (0, n * block - T))).reshape(B, H, n, block)
    offsets = jnp.arange(1, block + 1, dtype=f32)
    local = jnp.sum(diff * offsets, axis=(-1, -2))  # [B, H]
    per_block = jnp.sum(diff, axis=-1)  # [B, H, n]
    # F_b = sum_{m > b} per_block[m]: a reverse exclusive cumsum.
    flow = jnp.flip(jnp.cumsum(jnp.flip(per_block, -1), axis=-1), -1) - per_block
    lengths = jnp.full((n,), block, f32).at[-1].set(T - (n - 1) * block)
    return jnp.sum(local + jnp.sum(flow * lengths, axis=-1) + jnp.sum(intra, axis=-1), axis=0)


def whole_row_carry(log_decay: jax.Array, run_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, H]: gamma^T where the row is one run (the entering state reaches the final state), else 0."""
    carry = jnp.exp(T * log_decay)[None, :] * jnp.ones((B, 1), f32)
    if run_ids is None:
        return carry
    return jnp.where((run_ids[:, -1] == 0)[:, None], carry, 0.0)


def exit_log_decay_grad(x: jax.Array) -> jax.Array:
    """d log decay [H] of the final state's terms over the positions: sum_s (T-1-s) x_s, where x [B, H, T]
    holds gamma^(T-1-s) k_s^T dS_T v_s (its own weight, so nothing cancels)."""
    T = x.shape[-1]
    return jnp.sum(x * jnp.arange(T - 1, -1, -1, dtype=f32), axis=(0, 2))


def carry_log_decay_grad(carry: jax.Array, T: int, d_final: jax.Array, start: jax.Array) -> jax.Array:
    """d log decay [H] of the term carry * start in the final state (carry [B, H] from whole_row_carry)."""
    return T * jnp.sum(carry * jnp.sum(d_final * start, axis=(-1, -2)), axis=0)


def final_state_terms(k: jax.Array, v: jax.Array, log_decay: jax.Array, initial_state: jax.Array,
                      run_ids: jax.Array | None, d_final: jax.Array):
    """The gradients that flow from the final state S_T = sum_s gamma^(T-1-s) k_s v_s^T (+ gamma^T S0 when the
    row is one run): (dk [B, T, H, K], dv [B, T, H, V], d initial_state [B, H, K, V], d log decay [H])."""
    B, T, H, _ = k.shape
    lag = jnp.arange(T - 1, -1, -1, dtype=f32)
    weight = jnp.exp(lag[None, :, None] * log_decay[None, None, :])  # [1, T, H]
    whole = whole_row_carry(log_decay, run_ids, B, T)  # [B, H]
    if run_ids is not None:
        weight = jnp.where((run_ids == run_ids[:, -1:])[:, :, None], weight, 0.0)  # [B, T, H]
    kf, vf, d_final = k.astype(f32), v.astype(f32), d_final.astype(f32)
    dk_raw = jnp.einsum("bhkv,bshv->bshk", d_final, vf, precision=HIGHEST)
    dv_raw = jnp.einsum("bhkv,bshk->bshv", d_final, kf, precision=HIGHEST)
    pair = jnp.einsum("bshk,bshk->bhs", dk_raw, kf)  # k_s^T dS_T v_s
    d_log_decay = (exit_log_decay_grad(jnp.swapaxes(weight, 1, 2) * pair)
                   + carry_log_decay_grad(whole, T, d_final, initial_state))
    return (weight[..., None] * dk_raw, weight[..., None] * dv_raw, whole[..., None, None] * d_final,
            d_log_decay)


@jax.custom_jvp
def first_order_only(x):
    """Identity whose derivative raises: wraps what the Pallas VJPs compute, so that a second derivative
    fails with this message instead of differentiating kernels that have no derivative rules."""
    return x


@first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise NotImplementedError(
        "fleetjax: second derivatives through implementation='pallas' or 'pallas_fleet' are not supported "
        "(the Pallas kernels have no derivative rules); use implementation='xla' for higher-order derivatives.")
