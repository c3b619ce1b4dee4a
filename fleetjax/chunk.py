"""The math of one chunk, shared by every chunked implementation: the Pallas kernels apply it to one chunk
in a program (jnp on tiles), implementation="xla" to all chunks at once (vmapped).

A walk visits the sequence in chunks of C positions, carrying a float32 state S on chip. For a chunk with
local positions i (queries) and j (keys), the chunked form of the operator (fleetjax.reference) is

    forward:  o_i = scale (sum_{j <= i} gamma^(i-j) (query_i . key_j) value_j + gamma^(i+1) query_i^T S)
              S  <- gamma^len S + sum_j gamma^(len-1-j) key_j value_j^T
    reverse:  o_i = scale (sum_{j >= i} gamma^(j-i) (query_i . key_j) value_j + gamma^(len-1-i) query_i^T S)
              S  <- gamma^len S + sum_j gamma^(j+1) key_j value_j^T

The forward walk runs from the first chunk to the last; the reverse walk from the last to the first, and its
state after the first chunk is sum_t gamma^(t+1) key_t value_t^T, the cotangent of an entering state. Every
Pallas kernel (the forward, the sequence pieces' states, the dq, dv and dk walks of the backward, and the
Fleet partition) is one of these walks with its own query, key and value (see fleetjax.pallas.chunked).

Decay factors are exp(exponent) with the exponent masked before exp (exponents <= 0 only): a decay near 0
gives exact zeros, a decay of 1 gives ones, and nothing overflows.

Non-finite inputs stay where they belong: a NaN or inf at one position reaches only the outputs that depend
on it. So every mask is applied by selection (``jnp.where``), never by multiplying with a 0/1 factor
(0 * inf = NaN); and since a product over positions multiplies every value by its weight, masked or not, the
value tile enters the products with its non-finite entries set to 0 (:func:`finite_part`), and the outputs
that depend on it are set to NaN after the kernels (fleetjax.nonfinite; implementation="xla" does it in its
scan). That containment costs the Pallas walks registers in every chunk, so they also come in a plain form,
run when every input is finite (``contain=False`` in :func:`finite_values` and :func:`scores`; the selects
that only segments need stay, as their masks are needed for finite inputs too).
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

f32 = jnp.float32


def dot(a, b, precision, trans_a: bool = False, trans_b: bool = False):
    """a @ b with float32 accumulation; ``trans_a``/``trans_b`` contract a's rows / b's columns instead."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def dot_exact(a, b, dtype, precision, trans_a: bool = False, parts: int = 2):
    """a @ b for a float32 ``b`` taken as a sum of ``parts`` terms in ``dtype``, one product each: each part
    keeps 8 (bfloat16) or 11 (float16) more bits of b, so two keep 16 or 22 bits where rounding b to ``dtype``
    once keeps 8 or 11, and three bfloat16 parts keep float32's 24. For float32 inputs it is one product."""
    if dtype == f32:
        return dot(a, b, precision, trans_a=trans_a)
    out = None
    for part in split(b, dtype, parts):
        term = dot(a, part, precision, trans_a=trans_a)
        out = term if out is None else out + term
    return out


def split(x, dtype, parts: int, *, barrier: bool = False, by_bits: bool = False) -> list:
    """``parts`` terms in ``dtype`` whose sum holds float32 ``x``: each the rest of x not yet held, rounded.

    ``barrier``: each rounded term passes an optimization barrier before it is widened again, for kernel
    bodies run as XLA ops (Mosaic GPU's interpreter): XLA's GPU compiler removes a float32 -> 16-bit ->
    float32 pair of converts where excess precision is allowed (its default), which would leave every
    later term zero. The same values either way; compiled kernels lower their converts themselves.

    ``by_bits`` (bfloat16 only): the first term is rounded with integer operations on x's bits instead of a
    conversion (which a GPU issues at a fraction of its float rate) and widened again by a mask: the upper
    16 bits of x plus half a unit in their last place, to nearest with ties away from zero (ties to even
    with a conversion); the rest as without. A NaN may leave the first term as a zero or an infinity, but
    its rest is NaN, and so is the sum of the terms; so it takes two terms or more (a lone first term could
    turn a NaN into a number)."""
    if by_bits:
        if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
            raise ValueError(f"split(by_bits=True) takes bfloat16 terms, got {jnp.dtype(dtype)}")
        if parts < 2:
            raise ValueError(f"split(by_bits=True) takes two terms or more (one could lose a NaN), got {parts}")
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32) + jnp.uint32(0x8000)
        head = jax.lax.bitcast_convert_type(jax.lax.shift_right_logical(bits, jnp.uint32(16)).astype(jnp.uint16),
                                            dtype)
        rest = x - jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), f32)
        return [head, *split(rest, dtype, parts - 1, barrier=barrier)]
    out = [x.astype(dtype)]
    for _ in range(parts - 1):  # the rest after the last term is not formed (kernels' lowered loops stay lean)
        x = x - (jax.lax.optimization_barrier(out[-1]) if barrier else out[-1]).astype(f32)
        out.append(x.astype(dtype))
    return out


def decayed(mask, exponent):
    """exp(exponent) where mask, exactly 0 elsewhere; the exponent is masked before exp."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Chunk:
    """One chunk of a walk: its positions and its decay factors. Factors are float32 and exactly 0 where the
    matching mask is False (selected, see the module docstring).

    start: the first position; valid [C]: positions < T.
    pairs [C, C]: query i and key j interact (in the walk's direction, same run; positions beyond T are not
      masked out: their tiles are zeros and their rows unused); weights: their decay; lag: |i - j| on pairs,
      else 0 (float32, for the decay gradient).
    enters [C]: the state entering the chunk reaches query i; entering: its decay.
    leaves [C]: key j enters the state handed on; leaving: its decay; leave_lag: the steps of that decay (its
      derivative in log gamma over it), 0 where not leaves.
    carries (scalar): the entering state passes through the chunk; carry: its decay.
    far_run: the run next to the chunk the walk visits next (its last run; reverse: its first).
    position [C]: the positions; runs [C]: their run ids (None: one run); log_decay: the head's (scalar).
    """

    start: jax.Array
    valid: jax.Array
    pairs: jax.Array
    weights: jax.Array
    lag: jax.Array
    enters: jax.Array
    entering: jax.Array
    leaves: jax.Array
    leaving: jax.Array
    leave_lag: jax.Array
    carries: jax.Array
    carry: jax.Array
    far_run: jax.Array
    position: jax.Array
    runs: jax.Array | None
    log_decay: jax.Array


def chunk_log_decays(log_decay, gate, valid):
    """L [C]: the log decay accumulated from the chunk's start through each position (inclusive), and its
    total over the chunk's valid positions; gate [C] is the chunk's log gate (None: the constant decay, where
    L_i = (i + 1) log gamma)."""
    la = jnp.where(valid, log_decay + (0.0 if gate is None else gate.astype(f32)), 0.0)
    return jnp.cumsum(la), jnp.sum(la)


def chunk(start, C: int, T: int, log_decay, *, reverse: bool, runs=None, edge_run=None, gate=None) -> Chunk:
    """The chunk of C positions from ``start`` of a walk over T positions with the per-head ``log_decay``
    (a float32 scalar) and, gated, the chunk's log gate ``gate`` [C]. ``runs`` [C]: the chunk's run ids (-1
    beyond T), with ``edge_run`` the run of the state entering the chunk; None: one run."""
    i = jnp.arange(C)
    valid = start + i < T
    length = jnp.minimum(C, T - start)
    lag = (i[None, :] - i[:, None]) if reverse else (i[:, None] - i[None, :])
    # Causal pairs only: beyond T every walk's tiles are loaded as zeros and its rows are not stored, and a
    # loop-invariant mask lets the compiler keep it out of each chunk's register budget.
    pairs = lag >= 0
    enters = leaves = valid
    carries = jnp.bool_(True)
    far_run = jnp.int32(0)
    if runs is not None:
        far_run = (jnp.min(jnp.where(valid, runs, jnp.iinfo(jnp.int32).max)) if reverse
                   else jnp.max(jnp.where(valid, runs, -1)))
        pairs = pairs & (runs[:, None] == runs[None, :])
        enters = valid & (runs == edge_run)
        leaves = valid & (runs == far_run)
        carries = far_run == edge_run
    lg = jnp.asarray(log_decay, f32)
    if gate is None:  # lags times log gamma: exact for the constant decay
        pair_exponent = lag.astype(f32) * lg
        enter_exponent = ((length - 1 - i) if reverse else (i + 1)).astype(f32) * lg
        leave_exponent = ((i + 1) if reverse else (length - 1 - i)).astype(f32) * lg
        total = length.astype(f32) * lg
    else:  # differences of the cumulative log decay, masked to the pairs where they are <= 0
        L, total = chunk_log_decays(lg, gate, valid)
        pair_exponent = (L[None, :] - L[:, None]) if reverse else (L[:, None] - L[None, :])
        enter_exponent = (total - L) if reverse else L
        leave_exponent = L if reverse else (total - L)
    return Chunk(
        start=jnp.asarray(start), valid=valid, pairs=pairs,
        weights=decayed(pairs, pair_exponent),
        lag=jnp.where(pairs, lag, 0).astype(f32),
        enters=enters, entering=decayed(enters, enter_exponent),
        leaves=leaves, leaving=decayed(leaves, leave_exponent),
        leave_lag=jnp.where(leaves, (i + 1) if reverse else (length - 1 - i), 0).astype(f32),
        carries=carries, carry=jnp.where(carries, jnp.exp(total), 0.0), far_run=far_run,
        position=start + i, runs=runs, log_decay=lg)


def exit_decay(ch: Chunk, T: int, last_run=None, to_end=None):
    """[C]: the factor by which position t reaches the state after the last position, gamma^(T-1-t) (gated:
    exp(to_end), the chunk's [C] sums of la after each position), in the row's last run ``last_run`` only
    when the walk has runs, 0 elsewhere."""
    reach = ch.valid if ch.runs is None else ch.valid & (ch.runs == last_run)
    exponent = (T - 1 - ch.position).astype(f32) * ch.log_decay if to_end is None else to_end
    return decayed(reach, exponent)


def select_rows(ch: Chunk, rows, x):
    """x [C, n] where rows [C], exactly 0 elsewhere. Without runs the rows left out are the positions beyond
    T, whose tiles are zeros and whose outputs are not stored: then x as it is, which saves the select's
    registers in every walk."""
    return x if ch.runs is None else jnp.where(rows[:, None], x, 0.0)


def carried(ch: Chunk, x):
    """carry * x, exactly 0 where the entering state does not pass the chunk (a run starts in it); without
    runs it always passes, and no select is made."""
    return ch.carry * x if ch.runs is None else jnp.where(ch.carries, ch.carry * x, 0.0)


def finite_part(value):
    """(value with its non-finite entries set to 0, the mask of those entries)."""
    bad = ~jnp.isfinite(value)
    return jnp.where(bad, jnp.zeros_like(value), value), bad


def finite_values(value, contain: bool):
    """The value tile with its non-finite entries set to 0 when ``contain``, else as it is (every input
    finite: the walk then spends no registers or instructions on containment)."""
    return finite_part(value)[0] if contain else value


def scores(query, key, ch: Chunk, precision, contain: bool = True):
    """[C, C] float32: (query_i . key_j) times the pair's decay on pairs, 0 elsewhere: exactly 0 (selected)
    with ``contain``, else by the weights' zeros (the same for finite inputs)."""
    product = dot(query, key, precision, trans_b=True) * ch.weights
    return jnp.where(ch.pairs, product, 0.0) if contain else product


def output(query, pair_scores, value, state, ch: Chunk, *, scale: float, dtype, precision, exact: bool):
    """(o [C, bv] float32, its part from the entering state) of the chunk, from the finite value tile.

    The scale is applied before the score tile is rounded to the inputs' dtype for the tensor cores, and
    before the state is with float16 inputs, so that float16 intermediates stay in range where the result
    does; with bfloat16 (float32's range) it scales the state's [C] row factors instead. ``exact``: the state
    as a hi/lo pair (its term then has float32's accuracy, for the decay gradient's sums)."""
    intra = dot((scale * pair_scores).astype(dtype), value, precision)
    if exact:
        inter = dot_exact(query, scale * state, dtype, precision)
        entering = ch.entering
    elif dtype == jnp.float16:
        inter = dot(query, (scale * state).astype(dtype), precision)
        entering = ch.entering
    else:  # bfloat16 and float32 keep float32's range: scale the [C] row factors, not the [K, bv] state
        inter = dot(query, state.astype(dtype), precision)
        entering = scale * ch.entering
    inter = select_rows(ch, ch.enters, inter * entering[:, None])
    return intra + inter, inter


def update(state, key, value, ch: Chunk, *, dtype, precision, exact: bool, witness=None):
    """The state handed on: carry * state + sum_j leaving_j key_j value_j^T, from the finite value tile.

    ``exact``: the decayed values as a hi/lo pair, so that the new state has float32's accuracy with 16-bit
    inputs (a state that leaves the kernel, or feeds a gradient's sums); else one product in ``dtype``.
    ``witness`` [C, n] (walks without runs): 0 * witness is added to the decayed values, which changes no
    bit when it is finite and makes the state NaN when it is not, so that a finite state after the walk
    says the witness was finite throughout, for one multiply-add a value and no reduction."""
    key = select_rows(ch, ch.leaves, key)
    weighted = select_rows(ch, ch.leaves, value.astype(f32) * ch.leaving[:, None])
    if witness is not None:
        weighted = weighted + 0.0 * witness
    if exact:
        new = dot_exact(key, weighted, dtype, precision, trans_a=True)
    else:
        new = dot(key, weighted.astype(dtype), precision, trans_a=True)
    return carried(ch, state) + new


def count_crossings(counts, state, ch: Chunk):
    """The crossing count handed on (fleetjax.vjp): every term of the state entering the chunk has crossed
    one more whole chunk, counts <- carry * (counts + state); the chunk's own keys enter with count 0."""
    return carried(ch, counts + state)


def update_tangent(tangent, state, key, value, ch: Chunk, *, dtype, precision):
    """The derivative in log gamma of the state handed on (fleetjax.vjp's tangent D, exact where S is):
    carry * (D + len * S) + sum_j leave_lag_j leaving_j key_j value_j^T, from the state S entering the chunk
    and the finite value tile. Every term of S decays len more steps and each key its own leave_lag; the
    weighted values enter as a hi/lo pair (float32's accuracy with 16-bit inputs)."""
    key = select_rows(ch, ch.leaves, key)
    lagged = select_rows(ch, ch.leaves, value.astype(f32) * (ch.leaving * ch.leave_lag)[:, None])
    length = jnp.sum(ch.valid.astype(f32))
    return carried(ch, tangent + length * state) + dot_exact(key, lagged, dtype, precision, trans_a=True)


def spanned(pair_terms, precision=None):
    """[C]: for each position r, the sum of pair_terms [C, C] (query i, key j, zero off the pairs) over the
    pairs with j < r <= i: the pairs whose decay spans r, the intra-chunk part of d log_gate_r. The sums over
    the queries i >= r come as one product with the triangle [i >= r], then a masked sum over the keys
    j < r. Every term keeps its sign, nothing cancels.

    In a kernel (``precision`` None) the terms enter the product as three bfloat16 parts: float32's 24 bits
    and range on the tensor cores, where a prefix sum across a tile is slow. Under XLA give a float32
    ``precision`` (HIGHEST): one float32 product, as XLA may fold the parts' float32 -> bfloat16 -> float32
    round trips away (its excess-precision rewrites), which left one bfloat16 part on a GPU. The Mosaic walks
    form the same sums from the pairs' row and column sums instead (fleetjax.vjp.spanned_from_sums)."""
    C = pair_terms.shape[0]
    i = jnp.arange(C)
    at_or_after = i[None, :] >= i[:, None]  # [r, i]: i >= r
    if precision is None:
        from_r = dot_exact(at_or_after.astype(jnp.bfloat16), pair_terms, jnp.bfloat16, None, parts=3)
    else:
        from_r = dot(at_or_after.astype(f32), pair_terms, precision)  # [r, j]: the sum over i >= r
    return jnp.sum(jnp.where(i[None, :] < i[:, None], from_r, 0.0), axis=1)
