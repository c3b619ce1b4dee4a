"""The readable definitions of the operator (DESIGN.md section 1).

    O_t = scale * sum_{s <= t} decay_h^(t-s) (q_t . k_s) v_s,   S_t = decay_h S_{t-1} + k_t v_t^T

``scan`` walks the recurrence one position at a time; ``quadratic`` builds the masked decay matrix. Both take
the arguments of :func:`fleetjax.fleet_attention` (without ``implementation``/``config``), are plain
autodiff, and are what every fast implementation is tested against. The functions ending in ``_impl`` are
the implementation-level forms behind them: canonical inputs (log decay, run ids, a float32 initial state),
already validated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
f32 = jnp.float32


def recurrent_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, decay: jax.Array, state: jax.Array,
                   scale: float) -> tuple[jax.Array, jax.Array]:
    """One position: ``S <- decay S + k v^T``, ``o = scale q^T S``.

    q_t, k_t: [B, H, K]; v_t: [B, H, V]; decay: [H]; state: [B, H, K, V] float32.
    Returns (o_t [B, H, V] float32, new state [B, H, K, V] float32).
    """
    outer = jnp.einsum("bhk,bhv->bhkv", k_t.astype(f32), v_t.astype(f32), precision=HIGHEST)
    state = decay.astype(f32)[None, :, None, None] * state + outer
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(f32), state, precision=HIGHEST)
    return o_t, state


def scan_impl(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: Any = None):
    """``jax.lax.scan`` over time with a float32 [B, H, K, V] state; the state resets where the run changes."""
    del config
    decay = jnp.exp(log_decay)
    if run_ids is None:
        resets = jnp.zeros(q.shape[:2], bool)
    else:
        # Run 0 continues the entering state; a row whose first run is not 0 starts from zero.
        resets = jnp.concatenate([run_ids[:, :1] != 0, run_ids[:, 1:] != run_ids[:, :-1]], 1)

    def step(state, xs):
        q_t, k_t, v_t, reset_t = xs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        return recurrent_step(q_t, k_t, v_t, decay, state, scale)[::-1]

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    final_state, o = jax.lax.scan(step, initial_state, (time_major(q), time_major(k), time_major(v),
                                                        time_major(resets)))
    return jnp.moveaxis(o, 0, 1), final_state


def quadratic_impl(q, k, v, log_decay, initial_state, run_ids, *, scale: float, config: Any = None):
    """The masked [T, T] decay matrix, O(T^2) memory: for small T and tests."""
    del config
    T = q.shape[1]
    t = jnp.arange(T)
    if run_ids is None:
        run_ids = jnp.zeros(q.shape[:2], jnp.int32)
    # Mask before exp: exponents stay <= 0, so decay -> 0 gives exact zeros and decay = 1 gives ones.
    lag = t[:, None] - t[None, :]
    mask = (lag >= 0)[None] & (run_ids[:, :, None] == run_ids[:, None, :])  # [B, T, S]
    exponent = jnp.where(mask[:, None], lag[None, None] * log_decay[None, :, None, None], -jnp.inf)
    weights = scale * jnp.exp(exponent)  # [B, H, T, S]
    scores = jnp.einsum("bthk,bshk->bhts", q.astype(f32), k.astype(f32), precision=HIGHEST) * weights
    o = jnp.einsum("bhts,bshv->bthv", scores, v.astype(f32), precision=HIGHEST)

    first_run = (run_ids == 0)[:, :, None, None]  # [B, T, 1, 1]: positions the initial state reaches
    q_decay = jnp.exp((t + 1)[:, None] * log_decay[None, :])[None, :, :, None]  # [1, T, H, 1]
    o = o + jnp.where(first_run, scale * q_decay * jnp.einsum(
        "bthk,bhkv->bthv", q.astype(f32), initial_state, precision=HIGHEST), 0.0)

    last_run = run_ids[:, -1:]
    k_weight = jnp.where((run_ids == last_run)[:, :, None],
                         jnp.exp((T - 1 - t)[:, None] * log_decay[None, :])[None], 0.0)  # [B, T, H]
    final_state = jnp.einsum("bsh,bshk,bshv->bhkv", k_weight, k.astype(f32), v.astype(f32), precision=HIGHEST)
    carried = jnp.where(last_run[:, 0] == 0, 1.0, 0.0)[:, None] * jnp.exp(T * log_decay)[None]  # [B, H]
    final_state = final_state + carried[:, :, None, None] * initial_state
    return o, final_state


def scan(q, k, v, decay, *, scale=1.0, initial_state=None, return_final_state=False, segment_ids=None,
         sequence_axis_name=None):
    """Reference by recurrence; arguments and result as :func:`fleetjax.fleet_attention`."""
    from fleetjax.api import fleet_attention
    return fleet_attention(q, k, v, decay, scale=scale, initial_state=initial_state,
                           return_final_state=return_final_state, segment_ids=segment_ids,
                           sequence_axis_name=sequence_axis_name, implementation="scan")


def quadratic(q, k, v, decay, *, scale=1.0, initial_state=None, return_final_state=False, segment_ids=None,
              sequence_axis_name=None):
    """Reference by the masked decay matrix; arguments and result as :func:`fleetjax.fleet_attention`."""
    from fleetjax.api import fleet_attention
    return fleet_attention(q, k, v, decay, scale=scale, initial_state=initial_state,
                           return_final_state=return_final_state, segment_ids=segment_ids,
                           sequence_axis_name=sequence_axis_name, implementation="quadratic")
