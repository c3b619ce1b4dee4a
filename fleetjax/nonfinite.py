"""Non-finite inputs in the Pallas kernels: what a NaN or inf may reach, marked after the kernels ran.

A product over positions multiplies every value by its weight, masked pairs included (0 * inf = NaN), so
the kernels take the value operand of their products (v; in the backward k, dO and q) with its non-finite
entries set to 0, and report per program whether they saw one (fleetjax.chunk.finite_part). Only then, under
``jax.lax.cond``, the outputs that depend on such an entry are set to NaN here: output column c at position
t depends on the value entries [s, c] of the same segment with s <= t (forward in time) or s >= t (the
reverse walks). A run without non-finite values pays one reduction over the kernels' flags.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def any_flag(*flags: jax.Array | None) -> jax.Array:
    """True if a kernel reported a non-finite value (flags: arrays of 0/1, or None)."""
    return jnp.any(jnp.stack([jnp.max(f) > 0 for f in flags if f is not None]))


def _segment_starts(run_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, T]: the first position of each position's segment."""
    t = jnp.arange(T)
    if run_ids is None:
        return jnp.zeros((B, T), jnp.int32)
    changed = jnp.concatenate([jnp.ones((B, 1), bool), run_ids[:, 1:] != run_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(changed, t, 0), axis=1)


def reached(bad: jax.Array, run_ids: jax.Array | None, *, reverse: bool = False, exclusive: bool = False
            ) -> jax.Array:
    """[B, T, H, D] bool: a bad entry (bad [B, T, H, D]) at a position s <= t of t's segment (reverse:
    s >= t; ``exclusive``: s < t, or s > t)."""
    if reverse:
        flip = lambda x: None if x is None else jnp.flip(x, axis=1)  # noqa: E731
        # Run ids decrease along the flipped row; only where they change matters.
        return flip(reached(flip(bad), None if run_ids is None else -flip(run_ids), exclusive=exclusive))
    B, T = bad.shape[:2]
    count = jnp.cumsum(bad.astype(jnp.int32), axis=1) - (bad.astype(jnp.int32) if exclusive else 0)
    start = _segment_starts(run_ids, B, T)
    before = jnp.take_along_axis(jnp.pad(count, ((0, 0), (1, 0), (0, 0), (0, 0))), start[:, :, None, None], axis=1)
    return count - before > 0


def in_run(bad: jax.Array, run_ids: jax.Array | None, which: str) -> jax.Array:
    """[B, H, D] bool: a bad entry in the row's first (``which="first"``: run 0) or last run."""
    if run_ids is not None:
        run = jnp.zeros_like(run_ids[:, :1]) if which == "first" else run_ids[:, -1:]
        bad = bad & (run_ids == run)[:, :, None, None]
    return jnp.any(bad, axis=1)


def mark(x: jax.Array, where: jax.Array) -> jax.Array:
    return jnp.where(where, jnp.nan, x)


def mark_final(final: jax.Array, bad_v: jax.Array, run_ids: jax.Array | None) -> jax.Array:
    """The final state [B, H, K, V] with NaN in the columns that a bad value (bad_v [B, T, H, V]) of the
    row's last run reaches."""
    return mark(final, in_run(bad_v, run_ids, "last")[:, :, None])


def mark_forward(o: jax.Array, final: jax.Array, v: jax.Array, run_ids: jax.Array | None) -> tuple:
    """(o, final state) of a forward walk with NaN where a non-finite v reaches: o_t[c] from v_s[c] of t's
    segment with s <= t, and the final state's columns (:func:`mark_final`)."""
    bad_v = bad(v)
    return mark(o, reached(bad_v, run_ids)), mark_final(final, bad_v, run_ids)


def unless_finite(flags, fix: Callable, outputs: tuple, inputs: tuple) -> tuple:
    """``fix(*outputs, *inputs)`` (the outputs, marked) if a kernel flagged a non-finite value, else
    ``outputs``."""
    return jax.lax.cond(any_flag(*flags), lambda o, i: tuple(fix(*o, *i)), lambda o, i: tuple(o), outputs, inputs)


def bad(x: jax.Array) -> jax.Array:
    return ~jnp.isfinite(x)
