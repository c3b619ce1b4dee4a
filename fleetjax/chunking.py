"""How an implementation cuts T positions into chunks, and chunks into sequence pieces (static, numpy).

Every chunked implementation (xla, the Pallas kernels) shares this one geometry: chunks of ``chunk_size``
positions (the last may be shorter), grouped into pieces of whole chunks that a kernel walks in parallel and
joins by state passing (fleetjax.state_passing).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunking:
    """T positions in chunks of ``chunk_size``, grouped into at most ``max_pieces`` pieces of whole chunks."""

    T: int
    chunk_size: int
    max_pieces: int = 1

    @property
    def n_chunks(self) -> int:
        return -(-self.T // self.chunk_size)

    @property
    def chunk_lengths(self) -> np.ndarray:  # [n_chunks]
        return np.minimum(self.chunk_size, self.T - self.chunk_size * np.arange(self.n_chunks))

    @property
    def chunks_per_piece(self) -> int:
        return -(-self.n_chunks // max(1, min(self.max_pieces, self.n_chunks)))

    @property
    def pieces(self) -> int:
        """The number of pieces (at most max_pieces; at least 1, also for T = 0)."""
        return max(1, -(-self.n_chunks // self.chunks_per_piece))

    @property
    def piece_len(self) -> int:
        return self.chunks_per_piece * self.chunk_size

    @property
    def piece_starts(self) -> np.ndarray:  # [pieces]
        return self.piece_len * np.arange(self.pieces)

    @property
    def piece_lengths(self) -> np.ndarray:  # [pieces]
        return np.minimum(self.piece_len, self.T - self.piece_starts)

    @property
    def equal_pieces(self) -> bool:
        """Whether the pieces are equal runs of whole chunks (no shorter last chunk or piece)."""
        return self.piece_len * self.pieces == self.T

    @property
    def padded_T(self) -> int:
        return self.n_chunks * self.chunk_size

    def with_chunk_size(self, chunk_size: int) -> "Chunking":
        """The same pieces cut into chunks of ``chunk_size``, if those tile them; else self."""
        other = Chunking(self.T, chunk_size, self.pieces)
        return other if (other.pieces, other.piece_len) == (self.pieces, self.piece_len) else self

    def split(self, x: jax.Array) -> jax.Array:
        """[B, T, H, D] -> [n_chunks, B, H, chunk_size, D], zero padded."""
        B, _, H, D = x.shape
        x = jnp.pad(x, ((0, 0), (0, self.padded_T - self.T), (0, 0), (0, 0)))
        return x.reshape(B, self.n_chunks, self.chunk_size, H, D).transpose(1, 0, 3, 2, 4)

    def merge(self, x: jax.Array) -> jax.Array:
        """[n_chunks, B, H, chunk_size, D] -> [B, T, H, D]."""
        n, B, H, C, D = x.shape
        return x.transpose(1, 0, 3, 2, 4).reshape(B, n * C, H, D)[:, :self.T]
