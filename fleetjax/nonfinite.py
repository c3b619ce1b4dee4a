"""Non-finite inputs in the Pallas kernels: what a NaN or inf may reach, marked after the kernels ran.

A product over positions multiplies every value by its weight, masked pairs included (0 * inf = NaN), so
containment costs a walk registers and instructions in every chunk. implementation="pallas" therefore runs
its kernels in one of two forms: without containment when every input of the walks is finite, else with
it. The plain walks run first, and one of their outputs that every non-finite input reaches decides
(:func:`contained_if_reached`); with ``PallasConfig(choice_on_device=False)`` the sequence-parallel steps'
local states check their inputs instead (:func:`contained_if_needed`). With containment the kernels take the
value operand of their products (v; in the backward k, dO and q) with its non-finite entries set to 0 and keep
masked pairs exactly 0 (fleetjax.chunk), and the outputs that depend on a non-finite entry are set to NaN
here: output column c at position t depends on the value entries [s, c] of the same segment with s <= t
(forward in time) or s >= t (the reverse walks). implementation="pallas_fleet" takes the same two forms.

:func:`contained_if_reached` chooses with a lax.cond, whose predicate XLA's GPU runtime reads on the host.
implementation="pallas" makes its choices on the device instead by default (:func:`contained_on_device`,
``PallasConfig.choice_on_device``), its sequence-parallel local states included: the contained launches run
always and skip their chunks on finite inputs, the marking made by kernels too (the forward's contained walk
marks as it walks; fleetjax.pallas.marking).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _segment_starts(run_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, T]: the first position of each position's segment."""
    t = jnp.arange(T)
    if run_ids is None:
        return jnp.zeros((B, T), jnp.int32)
    changed = jnp.concatenate([jnp.ones((B, 1), bool), run_ids[:, 1:] != run_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(changed, t, 0), axis=1)


def _segment_ends(run_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, T]: the last position of each position's segment."""
    t = jnp.arange(T)
    if run_ids is None:
        return jnp.full((B, T), T - 1, jnp.int32)
    last = jnp.concatenate([run_ids[:, 1:] != run_ids[:, :-1], jnp.ones((B, 1), bool)], axis=1)
    return jax.lax.cummin(jnp.where(last, t, T), axis=1, reverse=True)


def _segment_edges(run_ids: jax.Array | None, B: int, T: int, reverse: bool) -> jax.Array:
    """[B, T]: where each position's segment begins in the walk's direction (reverse: its last position)."""
    return (_segment_ends if reverse else _segment_starts)(run_ids, B, T)


def _hits(bad: jax.Array, positions: jax.Array, edges: jax.Array, nearest: jax.Array, T: int, reverse: bool):
    """(hit, nearest) over a stretch of positions [B, n, ...]: the nearest bad entry at or before each position
    (reverse: at or after) in the walk's order, ``nearest`` [B, ...] being the one before the stretch (-1 or
    T: none), and whether it lies in the position's segment (edges [B, n, 1, 1]). ``positions``: the
    positions the bad entries stand for."""
    if reverse:
        near = jnp.minimum(jax.lax.cummin(jnp.where(bad, positions, T), axis=1, reverse=True), nearest[:, None])
        return near <= edges, near[:, 0]
    near = jnp.maximum(jax.lax.cummax(jnp.where(bad, positions, -1), axis=1), nearest[:, None])
    return near >= edges, near[:, -1]


def _none_yet(shape: tuple, T: int, reverse: bool) -> jax.Array:
    return jnp.full(shape, T if reverse else -1, jnp.int32)


def reached(bad: jax.Array, run_ids: jax.Array | None, *, reverse: bool = False, exclusive: bool = False
            ) -> jax.Array:
    """[B, T, H, D] bool: a bad entry (bad [B, T, H, D]) at a position s <= t of t's segment (reverse:
    s >= t; ``exclusive``: s < t, or s > t). Whole arrays: for [B, T, H, 1] masks; :func:`mark_reached`
    marks [B, T, H, D] outputs block by block."""
    B, T = bad.shape[:2]
    positions = jnp.arange(T)[None, :, None, None]
    if exclusive:  # each bad entry is seen one position later in the walk, as itself
        step = -1 if reverse else 1
        bad = jnp.roll(bad, step, axis=1).at[:, -1 if reverse else 0].set(False)
        positions = positions - step
    edges = _segment_edges(run_ids, B, T, reverse)[:, :, None, None]
    return _hits(bad, positions, edges, _none_yet((B,) + bad.shape[2:], T, reverse), T, reverse)[0]


def mark_reached(x: jax.Array, source: jax.Array, run_ids: jax.Array | None, *, reverse: bool = False,
                 block: int = 256) -> jax.Array:
    """x [B, T, H, D] with NaN where ``reached(bad(source))`` (a non-finite source entry at s <= t of t's
    segment; reverse: s >= t), in blocks of ``block`` positions: what it holds beyond x is one block's worth,
    never a full-size array (the nearest non-finite position so far is carried from block to block)."""
    B, T = x.shape[:2]
    edge = _segment_edges(run_ids, B, T, reverse)
    full, tail = divmod(T, block)

    def visit(s0, n, nearest, x):
        bad_here = bad(jax.lax.dynamic_slice_in_dim(source, s0, n, axis=1))
        edges = jax.lax.dynamic_slice_in_dim(edge, s0, n, axis=1)[:, :, None, None]
        hit, nearest = _hits(bad_here, s0 + jnp.arange(n)[None, :, None, None], edges, nearest, T, reverse)
        marked = jnp.where(hit, jnp.nan, jax.lax.dynamic_slice_in_dim(x, s0, n, axis=1)).astype(x.dtype)
        return nearest, jax.lax.dynamic_update_slice_in_dim(x, marked, s0, axis=1)

    def body(i, state):
        start = ((full - 1 - i) if reverse else i) * block
        return visit(start, block, *state)

    state = (_none_yet((B,) + x.shape[2:], T, reverse), x)
    if reverse and tail:  # the walk starts at the end: the partial block first
        state = visit(full * block, tail, *state)
    if full:
        state = jax.lax.fori_loop(0, full, body, state)
    if not reverse and tail:
        state = visit(full * block, tail, *state)
    return state[1]


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
    return mark_reached(o, v, run_ids), mark_final(final, bad(v), run_ids)


def all_finite(*xs: jax.Array | None) -> jax.Array:
    """True if no entry of the arrays (None: left out) is NaN or inf. Arrays of one shape and dtype are added
    first, so that one reduction (on a GPU, two kernels) reads them: a NaN or inf entry keeps their sum
    non-finite, and a sum of finite entries that overflows is a false alarm, never a miss (a caller then takes
    its contained walks, which give the same result on finite inputs)."""
    groups: dict[tuple, jax.Array] = {}
    for x in xs:
        if x is not None:
            key = (x.shape, jnp.dtype(x.dtype))
            groups[key] = x if key not in groups else jnp.add(groups[key], x)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in groups.values()]))


def contained_if_needed(inputs: tuple, walks: Callable[[bool], Any]) -> Any:
    """``walks(contain=False)`` if every array of ``inputs`` is finite, else ``walks(contain=True)`` (the
    kernels with containment and the marking after them). One branch runs; both are compiled."""
    return jax.lax.cond(all_finite(*inputs), lambda: walks(False), lambda: walks(True))


def contained_if_reached(walks: Callable[[bool], tuple[Any, jax.Array]]) -> Any:
    """The plain walks' result, unless a NaN or inf reached their ``witness``: then the contained walks'.

    ``walks(contain)`` returns (result, witness), the witness an array or a tuple of arrays. The witness
    must be non-finite whenever any input of the walks is: an output that every input entry reaches through
    its own position's product (the diagonal of the chunk's pairs, whose decay weight is exp(0) = 1 and which
    no mask removes), where 0 * inf is NaN, not 0 (or a smaller array that a walk makes non-finite whenever
    that output is, as the forward walk's final states, fleetjax.chunk.update). Then a finite witness says
    every input was finite, and the plain walks' result is the contained one's. Unlike
    :func:`contained_if_needed` this reads the witness instead of the inputs; the plain walks run in both
    cases (wasted when an input is non-finite). A cond, not a loop of zero or one trip: jax prunes a cond's
    branches to the outputs used (a backward that drops dk drops its walk), where a loop keeps its whole state
    alive; on the H200 the loop was no faster either."""
    plain, witness = walks(False)
    return jax.lax.cond(all_finite(*jax.tree.leaves(witness)), lambda: plain, lambda: walks(True)[0])


def contained_on_device(walks: Callable[..., tuple[Any, Any]]) -> Any:
    """:func:`contained_if_reached`'s choice made on the device: ``walks(contain, skip=None, plain=None)``
    runs the plain walks, then always the contained ones with ``skip`` (a bool scalar array: the plain walks'
    witness is finite) and the plain result, which must come back where ``skip`` is True, their launches
    then visiting no chunk (fleetjax.pallas.launch.call). No lax.cond: nothing waits on the host."""
    plain, witness = walks(False)
    skip = all_finite(*jax.tree.leaves(witness))
    return walks(True, skip=skip, plain=plain)[0]


def bad(x: jax.Array) -> jax.Array:
    return ~jnp.isfinite(x)
