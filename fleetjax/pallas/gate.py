"""The gated decay's sums for the Hopper walks, formed in one launch (MosaicWalkConfig.gate_sums, on by
default): :func:`chunk_sums`, handed out by :class:`FormedDecays`.

The Mosaic walks read the log gate three ways: transposed to [B, H, T] (the contained Triton walks that the
choice on the device launches beside them), summed within each chunk (their factors) and summed over whole
chunks (the states passed between sequence pieces). fleetjax.decay.Decays defines all three in XLA, where
they take three to four small kernels (a transpose, the cumulative sum's two passes, a reduction) before
the first walk. Here one Triton kernel, one program per batch row and chunk, reads the gate's [C, H] tile
once and writes the three; :class:`FormedDecays` hands them out where Decays' methods are asked for them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fleetjax.decay import Decays
from fleetjax.pallas.launch import call
from fleetjax.pallas.walk import padded

f32 = jnp.float32
LOG2_E = math.log2(math.e)


def sums_kernel(*, log_decay_ref, gate_ref, tiles_ref, within_ref, totals_ref, heads: int):
    """One chunk of one row: gate [C, Hp] (the heads padded to a power of two), log_decay [Hp]; out: the
    gate transposed [Hp, C], la = log_decay + gate summed from the chunk's start through each position in
    base 2 [Hp, C], and summed over the chunk [Hp] (natural log)."""
    live = jnp.arange(gate_ref.shape[-1]) < heads
    gate = plt.load(gate_ref, mask=live[None, :], other=0.0)
    la = gate + plt.load(log_decay_ref, mask=live, other=0.0)[None, :]
    plt.store(tiles_ref, gate.T, mask=live[:, None])
    plt.store(within_ref, (jnp.cumsum(la, axis=0) * LOG2_E).T, mask=live[:, None])
    plt.store(totals_ref, jnp.sum(la, axis=0), mask=live)


def chunk_sums(log_decay: jax.Array, log_gate: jax.Array, chunk_size: int):
    """(the gate [B, H, T], la summed within each chunk in base 2 [B, H, T], la summed over each chunk
    [B, H, T / C]) for log_decay [H] and log_gate [B, T, H] float32, T a multiple of C = ``chunk_size``."""
    B, T, H = log_gate.shape
    C, hp = chunk_size, padded(H)
    n = T // C
    by_position = pl.BlockSpec((None, hp, C), lambda b, c: (b, 0, c))
    outputs = call(functools.partial(sums_kernel, heads=H), name="gate_sums", grid=(B, n),
                   inputs=dict(log_decay_ref=(log_decay.astype(f32), pl.BlockSpec((hp,), lambda b, c: (0,))),
                               gate_ref=(log_gate.astype(f32), pl.BlockSpec((None, C, hp), lambda b, c: (b, c, 0)))),
                   outputs=dict(tiles_ref=(((B, H, T), f32), by_position),
                                within_ref=(((B, H, T), f32), by_position),
                                totals_ref=(((B, H, n), f32), pl.BlockSpec((None, hp, None), lambda b, c: (b, 0, c)))),
                   num_warps=1, num_stages=1)
    return outputs["tiles_ref"], outputs["within_ref"], outputs["totals_ref"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FormedDecays(Decays):
    """A gated :class:`Decays` with its sums for chunks of ``chunk_size`` formed by :func:`chunk_sums`: its
    methods hand them out where asked for those chunks, and fall back to Decays' XLA forms elsewhere."""

    chunk_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    tiles: jax.Array | None = None
    within: jax.Array | None = None
    totals: jax.Array | None = None

    def gate_tiles(self) -> jax.Array:
        return self.tiles

    def within_chunks(self, B: int, T: int, chunk_size: int, base2: bool = False) -> jax.Array:
        if chunk_size != self.chunk_size or not base2:
            return super().within_chunks(B, T, chunk_size, base2)
        return self.within

    def block_sums(self, B: int, T: int, length: int) -> jax.Array:
        if length % self.chunk_size:
            return super().block_sums(B, T, length)
        per_block = length // self.chunk_size
        n = -(-self.totals.shape[-1] // per_block)
        totals = jnp.pad(self.totals, ((0, 0), (0, 0), (0, n * per_block - self.totals.shape[-1])))
        return jnp.sum(totals.reshape(*totals.shape[:2], n, per_block), axis=-1)


def chunk_sums_of(log_decay: jax.Array, log_gate: jax.Array, chunk_size: int):
    """:func:`chunk_sums` with the gradient stopped (the walks' VJP forms d log_gate itself), or None where the
    length is not a positive multiple of ``chunk_size``."""
    T = log_gate.shape[1]
    if T == 0 or T % chunk_size:
        return None
    return chunk_sums(jax.lax.stop_gradient(log_decay), jax.lax.stop_gradient(log_gate), chunk_size)


def with_sums(decays: Decays, sums) -> Decays:
    """``decays`` handing out ``sums`` (:func:`chunk_sums`'s three arrays; None: itself)."""
    if sums is None or not decays.gated:
        return decays
    tiles, within, totals = sums
    return FormedDecays(decays.log_decay, decays.log_gate, chunk_size=tiles.shape[-1] // totals.shape[-1],
                        tiles=tiles, within=within, totals=totals)


def formed(decays: Decays, chunk_size: int) -> Decays:
    """``decays`` with its gate's sums for chunks of ``chunk_size`` formed in one launch (itself for the
    constant decay, where it already has them, or where the length is not a multiple of ``chunk_size``)."""
    if not decays.gated or isinstance(decays, FormedDecays):
        return decays
    return with_sums(decays, chunk_sums_of(decays.log_decay, decays.log_gate, chunk_size))
