"""The decay gradient, shared by every custom VJP (DESIGN.md section 2).

    d log gamma = sum_t (t+1) q_t . dq_t - sum_s (s+1) k_s . dk_s + T <dS_T, S_T>

where dq, dk are the full gradients (initial-state and final-state terms included), S_T the final state and
dS_T its cotangent (the initial state sits at position -1 and the final state at position T). Taken
literally this subtracts two sums of size ~T * sum|q . dq| and cancels catastrophically in float32 at long
T. Here every position is weighted by its offset inside a block of ``block`` positions, and the long-range
part becomes sum_b len_b F_b, where F_b, the flow of (s, t) pairs across the boundary after block b, is a
suffix sum of per-block differences: no term is ever multiplied by an absolute position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def log_decay_grad(q: jax.Array, dq: jax.Array, k: jax.Array, dk: jax.Array, final_state: jax.Array,
                   d_final_state: jax.Array, block: int = 64) -> jax.Array:
    """d loss / d log decay [H] from q, dq, k, dk [B, T, H, K] and the final state and its cotangent
    [B, H, K, V] (all read in float32)."""
    B, T, H, _ = q.shape
    w = jnp.einsum("bthk,bthk->bht", q.astype(f32), dq.astype(f32))
    u = jnp.einsum("bthk,bthk->bht", k.astype(f32), dk.astype(f32))
    block = min(block, T)
    n = -(-T // block)
    diff = jnp.pad(w - u, ((0, 0), (0, 0), (0, n * block - T))).reshape(B, H, n, block)
    offsets = jnp.arange(1, block + 1, dtype=f32)
    local = jnp.sum(diff * offsets, axis=(-1, -2))  # [B, H]
    per_block = jnp.sum(diff, axis=-1)  # [B, H, n]
    end_flow = jnp.sum(final_state.astype(f32) * d_final_state.astype(f32), axis=(-1, -2))  # [B, H]
    # F_b = <dS_T, S_T> + sum_{m > b} per_block[m]: a reverse exclusive cumsum.
    later = jnp.flip(jnp.cumsum(jnp.flip(per_block, -1), axis=-1), -1) - per_block
    flow = end_flow[..., None] + later
    lengths = jnp.full((n,), block, f32).at[-1].set(T - (n - 1) * block)
    return jnp.sum(local + jnp.sum(flow * lengths, axis=-1), axis=0)
