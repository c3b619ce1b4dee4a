"""The decay of one call, in one place: a per-head decay gamma_h, and optionally a per-token log gate g.

The state update at position t multiplies by a_t = gamma_h exp(g_t), so every decay factor of the operator
is exp(a sum of la_r = log gamma_h + g_r over a range of positions r); the constant decay is g = 0, where
such a sum is the range's length times log gamma. :class:`Decays` holds (log gamma [H], g [B, T, H] or None)
and gives the sums the implementations need outside their chunks: over whole rows, pieces of a row, and
from each position to the row's end. Inside a chunk the kernels form their own sums from the same la
(fleetjax.chunk.chunk). Every sum is a sum of values <= 0 over a contiguous range, formed relative to the
range's start, so nothing is exponentiated but differences <= 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def log_decay_of(decay, H: int) -> jax.Array:
    """log gamma [H] float32 from a call's ``decay`` [H], or for None (no per-head decay) zeros."""
    if decay is not None:
        return jnp.log(jnp.asarray(decay, f32))
    # A constant that XLA keeps in the executable: all zeros would be a splat, which XLA turns into a broadcast,
    # on a GPU a kernel of its own before the walks that read it (2.2 us a call on an H100); one entry of -0.0
    # keeps it a literal (where H > 1). Its uses add, scale and exponentiate it, where -0.0 acts as 0.
    zero = np.zeros((H,), np.float32)
    zero[-1] = -0.0
    return jnp.asarray(zero)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decays:
    """log_decay [H] float32 (log gamma); log_gate [B, T, H] float32 or None (constant decay)."""

    log_decay: jax.Array
    log_gate: jax.Array | None = None

    @property
    def gated(self) -> bool:
        return self.log_gate is not None

    def per_position(self, B: int, T: int) -> jax.Array:
        """la [B, H, T] float32: the log of the update's factor at each position."""
        la = jnp.broadcast_to(self.log_decay[None, :, None], (B, self.log_decay.shape[0], T))
        return la if self.log_gate is None else la + jnp.swapaxes(self.log_gate, 1, 2)

    def block_sums(self, B: int, T: int, length: int) -> jax.Array:
        """[B, H, n]: the sum of la over each block of ``length`` consecutive positions (the last may be
        shorter), each summed from its own terms."""
        n = -(-T // length) if T else 0
        if self.log_gate is None:
            lengths = jnp.asarray(np.minimum(length, T - length * np.arange(n)), f32)
            return jnp.broadcast_to(lengths[None, None, :] * self.log_decay[None, :, None],
                                    (B, self.log_decay.shape[0], n))
        la = jnp.pad(self.per_position(B, T), ((0, 0), (0, 0), (0, n * length - T)))
        return jnp.sum(la.reshape(B, -1, n, length), axis=-1)

    def total(self, B: int, T: int) -> jax.Array:
        """[B, H]: the sum of la over the whole row (the carry of a state through it)."""
        return self.block_sums(B, T, max(T, 1))[..., 0] if T else jnp.zeros((B, self.log_decay.shape[0]), f32)

    def to_end(self, B: int, T: int) -> jax.Array:
        """[B, H, T]: the sum of la over the positions after t (t's term in the final state is
        exp(this) k_t v_t^T)."""
        if self.log_gate is None:
            return jnp.broadcast_to(jnp.arange(T - 1, -1, -1, dtype=f32)[None, None, :] * self.log_decay[None, :, None],
                                    (B, self.log_decay.shape[0], T))
        after = jnp.pad(self.per_position(B, T)[..., 1:], ((0, 0), (0, 0), (0, 1)))
        return jnp.flip(jnp.cumsum(jnp.flip(after, -1), axis=-1), -1)

    def from_start(self, B: int, T: int) -> jax.Array:
        """[B, H, T]: the sum of la over positions <= t (the initial state's factor in o_t is exp(this))."""
        if self.log_gate is None:
            return jnp.broadcast_to(jnp.arange(1, T + 1, dtype=f32)[None, None, :] * self.log_decay[None, :, None],
                                    (B, self.log_decay.shape[0], T))
        return jnp.cumsum(self.per_position(B, T), axis=-1)

    def within_chunks(self, B: int, T: int, chunk_size: int, base2: bool = False) -> jax.Array:
        """[B, H, T]: the sum of la from the start of t's chunk of ``chunk_size`` through t (inclusive), the
        exponents a chunked walk differences (T a multiple of ``chunk_size``); ``base2``: times log2(e), for
        walks that exponentiate in base 2 (a relative error of about 2^-24 |sum| more)."""
        la = self.per_position(B, T)
        within = jnp.cumsum(la.reshape(B, -1, T // chunk_size, chunk_size), axis=-1).reshape(la.shape)
        return within * math.log2(math.e) if base2 else within

    def gate_tiles(self) -> jax.Array | None:
        """The log gate as the kernels read it, [B, H, T] float32 (None for the constant decay)."""
        return None if self.log_gate is None else jnp.swapaxes(self.log_gate, 1, 2)
