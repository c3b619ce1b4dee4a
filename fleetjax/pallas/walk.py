"""How one program of a walk kernel visits its piece of the sequence, and the XLA side of its launch.

Every walk kernel runs on the grid (value block, batch*head, sequence piece). Its program folds the local
states of the pieces before its own into the state entering its piece (the state passing of
fleetjax.state_passing, on chip), then visits its chunks in the walk's order (:func:`walk`). The blocks give
each program the whole sequence of its (batch, head) and value block; loads and stores are masked per
chunk, so nothing is read or written beyond T, K or V.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fleetjax.chunking import Chunking
from fleetjax.chunk import Chunk, chunk
from fleetjax.pallas.launch import on_gpu, skipped

f32 = jnp.float32


# ------------------------------------------------------------------------------------------- in-kernel

def program_id(axis: int, like_ref):
    """``pl.program_id(axis)``, in interpret mode typed like the data of ``like_ref``: inside
    ``shard_map(check_vma=True)`` the interpreter's dynamic slices need their indices to vary over the mesh
    axes that the sliced arrays vary over, and the grid's own indices do not. On a GPU, the plain id."""
    index = pl.program_id(axis)
    if on_gpu():
        return index
    x = like_ref[0]
    return index + jnp.where(x == x, 0, 0).astype(index.dtype)  # an integer 0, typed like x

def _rows(ch: Chunk):
    return pl.ds(ch.start, ch.valid.shape[0])


def load_rows(ref, ch: Chunk, columns):
    """The chunk's rows of a [T, D] ref, masked to valid positions and ``columns`` [D] (0 elsewhere)."""
    return plt.load(ref.at[_rows(ch), :], mask=ch.valid[:, None] & columns[None, :], other=0.0)


def store_rows(ref, ch: Chunk, x, columns) -> None:
    plt.store(ref.at[_rows(ch), :], x.astype(ref.dtype), mask=ch.valid[:, None] & columns[None, :])


def load_positions(ref, ch: Chunk):
    """The chunk's [C] entries of a [T] ref, 0 beyond T."""
    return plt.load(ref.at[_rows(ch)], mask=ch.valid, other=0.0)


def store_positions(ref, ch: Chunk, x) -> None:
    """x [C] into a [T] ref at the chunk's valid positions."""
    plt.store(ref.at[_rows(ch)], x, mask=ch.valid)


def columns(ref, n: int, block: int = 0, index=0):
    """[ref's last dim] bool: the columns of block ``index`` (of ``block`` columns; 0: the whole ref) < n."""
    width = ref.shape[-1]
    return index * block + jnp.arange(width) < n


def enter_piece(state, *, piece, chunking: Chunking, reverse: bool, log_decay, local_ref, link_ref=None,
                counts=None, local_counts_ref=None, piece_log_ref=None):
    """The state entering ``piece``: ``state`` (entering the walk) carried through the pieces the walk passes
    first, each adding its local state. local_ref [P - 1, ...]: the local states of the pieces that have a
    successor in the walk (forward: 0..P-2; reverse: 1..P-1); link_ref [P]: a state passes the piece unbroken
    by a segment start (None: always). With ``counts`` (the crossing counts of fleetjax.vjp) and the pieces'
    local counts, returns (state, counts): passing a piece of n whole chunks adds n to every count.
    piece_log_ref [P]: each piece's sum of la (gated; None: its length times log gamma)."""
    P, L, T = chunking.pieces, chunking.piece_len, chunking.T
    zero = piece - piece  # typed like the program id (see program_id)

    def fold(n, carry):
        state, counts = carry
        before = ((P - 1 - n) if reverse else n) + zero
        if piece_log_ref is None:
            decay = jnp.exp(jnp.minimum(L, T - before * L).astype(f32) * log_decay)
        else:
            decay = jnp.exp(piece_log_ref[before])
        keep = True if link_ref is None else link_ref[before] > 0  # selected: a reset drops a NaN state
        index = before - int(reverse)
        if counts is not None:
            moved = decay * (counts + chunking.chunks_per_piece * state)
            counts = jnp.where(keep, moved, 0.0) + local_counts_ref[index]
        return jnp.where(keep, decay * state, 0.0) + local_ref[index], counts

    state, counts = jax.lax.fori_loop(0, (P - 1 - piece) if reverse else piece, fold, (state, counts))
    return state if counts is None else (state, counts)


def walk(body: Callable[[Chunk, jax.Array], jax.Array], state, *, piece, chunking: Chunking, reverse: bool,
         log_decay, run_ref=None, edge_ref=None, gate_ref=None, skip_ref=None):
    """``state = body(chunk, state)`` over the chunks of ``piece``, first to last (reverse: last to first);
    ``state`` may be any pytree of arrays. run_ref [T]: run ids; edge_ref [1]: the run of the state entering
    the piece (None: one run); gate_ref [T]: the log gate (None: the constant decay); skip_ref: where
    fleetjax.pallas.launch.skipped says so, no chunk is visited and ``state`` comes back as it went in
    (fleetjax.pallas.launch.call's ``skip``)."""
    C, T = chunking.chunk_size, chunking.T
    first = piece * chunking.chunks_per_piece
    count = jnp.minimum(chunking.chunks_per_piece, chunking.n_chunks - first)
    if skip_ref is not None:  # a product, not a select: Pallas-Triton lowers this select's literal as a bool
        count = count * (1 - skipped(skip_ref).astype(jnp.int32))

    def step(c, carry):
        state, edge_run = carry
        start = (first + (count - 1 - c if reverse else c)) * C
        valid = start + jnp.arange(C) < T
        runs = None if run_ref is None else plt.load(run_ref.at[pl.ds(start, C)], mask=valid, other=-1)
        gate = None if gate_ref is None else plt.load(gate_ref.at[pl.ds(start, C)], mask=valid, other=0.0)
        ch = chunk(start, C, T, log_decay, reverse=reverse, runs=runs, edge_run=edge_run, gate=gate)
        return body(ch, state), (edge_run if runs is None else ch.far_run)

    edge = edge_ref[0] if edge_ref is not None else jnp.int32(0)
    state, _ = jax.lax.fori_loop(0, count, step, (state, edge))
    return state


# ------------------------------------------------------------------------------------- the launch's side

def padded(n: int) -> int:
    """A head dim padded to a power of two >= 16 (the tiles' width)."""
    return pl.next_power_of_2(max(n, 16))


def value_blocks(V: int, block_v: int) -> tuple[int, int]:
    """(the value block, the number of blocks) for value dim V and a requested block."""
    bv = min(block_v, padded(V))
    return bv, -(-V // bv)


class Specs:
    """BlockSpecs over the grid (value block j, batch*head g, program p along the sequence) for H heads; the
    program's piece is p + piece_offset."""

    def __init__(self, H: int, chunking: Chunking, key_width: int, block_v: int, piece_offset: int = 0):
        self.H, self.T, self.kp, self.bv = H, chunking.padded_T, key_width, block_v
        self.P, self.offset = chunking.pieces, piece_offset

    def _bh(self, g):
        return g // self.H, g % self.H

    def head(self):
        """A [H] per-head array, one element per program."""
        return pl.BlockSpec((1,), lambda j, g, p: (g % self.H,))

    def keys(self):
        """[B, T, H, K] -> the program's [T, K]."""
        return pl.BlockSpec((None, self.T, None, self.kp), lambda j, g, p: (g // self.H, 0, g % self.H, 0))

    def values(self):
        """[B, T, H, V] -> the program's [T, block_v]."""
        return pl.BlockSpec((None, self.T, None, self.bv), lambda j, g, p: (g // self.H, 0, g % self.H, j))

    def state(self):
        """[B, H, K, V] -> [K, block_v]."""
        return pl.BlockSpec((None, None, self.kp, self.bv), lambda j, g, p: (g // self.H, g % self.H, 0, j))

    def piece_states(self, count: int):
        """[B, H, count, K, V] -> every piece's [count, K, block_v]."""
        return pl.BlockSpec((None, None, count, self.kp, self.bv),
                            lambda j, g, p: (g // self.H, g % self.H, 0, 0, j))

    def piece_state(self):
        """[B, H, launched, K, V] -> the program's own [K, block_v]."""
        return pl.BlockSpec((None, None, None, self.kp, self.bv), lambda j, g, p: (g // self.H, g % self.H, p, 0, j))

    def row(self, width: int):
        """[B, width] -> the program's row."""
        return pl.BlockSpec((None, width), lambda j, g, p: (g // self.H, 0))

    def runs(self):
        return self.row(self.T)

    def edge(self):
        """[B, P] -> the program's piece's entry."""
        return pl.BlockSpec((None, 1), lambda j, g, p: (g // self.H, p + self.offset))

    def positions(self):
        """[B, H, T] -> the program's [T] (a per-position input, such as the log gate)."""
        return pl.BlockSpec((None, None, self.T), lambda j, g, p: (g // self.H, g % self.H, 0))

    def pieces(self):
        """[B, H, P] -> the program's row's [P]."""
        return pl.BlockSpec((None, None, self.P), lambda j, g, p: (g // self.H, g % self.H, 0))

    def per_position(self):
        """[value blocks, B, H, T] -> the program's [T]."""
        return pl.BlockSpec((None, None, None, self.T), lambda j, g, p: (j, g // self.H, g % self.H, 0))


def pad_state(x: jax.Array, kp: int, vp: int) -> jax.Array:
    """[..., K, V] zero padded to [..., kp, vp]."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, kp - x.shape[-2]), (0, vp - x.shape[-1])])


def piece_edges(run_ids: jax.Array, chunking: Chunking, reverse: bool) -> tuple[jax.Array, jax.Array]:
    """Per piece [B, P]: the run just outside the piece where the walk enters it (the run before it; reverse:
    the run after it, or the row's last run), and the run where the walk leaves it (its last; its first)."""
    starts = chunking.piece_starts
    ends = np.minimum(starts + chunking.piece_len, chunking.T) - 1
    if reverse:
        after = jnp.concatenate([run_ids[:, starts[1:]], run_ids[:, -1:]], axis=1)
        return after, run_ids[:, starts]
    before = jnp.concatenate([jnp.zeros_like(run_ids[:, :1]), run_ids[:, starts[1:] - 1]], axis=1)
    return before, run_ids[:, ends]


def piece_links(run_ids: jax.Array | None, chunking: Chunking, reverse: bool) -> jax.Array | None:
    """[B, P] float32: 1 where a state passes through the piece unbroken by a segment start, else 0; None
    without run ids."""
    if run_ids is None:
        return None
    edge, leave = piece_edges(run_ids, chunking, reverse)
    return (leave == edge).astype(f32)
