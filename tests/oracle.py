"""A float64 numpy oracle for the operator, written from the operator's definition alone (it never imports fleetjax).

    O_t = scale * sum_{s <= t, same run} gamma_h^(t-s) (q_t . k_s) v_s  +  scale gamma_h^(t+1) q_t^T S0  [t in run 0]

With per-token log gates g [B, T, H] (<= 0) the state update at t multiplies by a_t = gamma_h exp(g_t), so
gamma^(t-s) becomes exp(L_t - L_s) with L the cumulative sum of la_t = log gamma_h + g_t, gamma^(t+1)
becomes exp(L_t), and so on; the constant decay is g = 0.

A *run* is a maximal stretch of positions with equal segment id: the state resets wherever the id changes,
so two stretches of the same id separated by another id are different runs. The initial state S0 feeds the
first run of each row; the final state is the state after the last position.

``forward`` and ``gradients`` build the masked [T, T] decay matrix (O(T^2) memory, for T up to a few
thousand). ``recurrent`` walks the recurrence with O(T) time and O(B H K V) memory and also returns the
decay gradient, for long T (16384).
"""

from __future__ import annotations

import dataclasses

import numpy as np

f64 = np.float64


def runs(segment_ids: np.ndarray | None, B: int, T: int) -> np.ndarray:
    """Run index [B, T] (0, 1, 2, ... along each row): a new run starts wherever the segment id changes."""
    if segment_ids is None or T == 0:
        return np.zeros((B, T), np.int64)
    ids = np.asarray(segment_ids)
    changes = np.concatenate([np.zeros((B, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return np.cumsum(changes, axis=1)


def _as64(x) -> np.ndarray:
    return np.asarray(x, dtype=f64)


@dataclasses.dataclass
class _Terms:
    """The pieces of the quadratic form, float64, for one call."""

    q: np.ndarray  # [B, T, H, K]
    k: np.ndarray
    v: np.ndarray  # [B, T, H, V]
    log_gamma: np.ndarray  # [H]
    cumulative: np.ndarray  # [B, H, T]: L_t, the sum of la_r = log gamma + g_r over r <= t
    scale: float
    s0: np.ndarray  # [B, H, K, V]
    weights: np.ndarray  # [B, H, T, S]: scale * gamma^(t-s), zero outside s <= t in the same run
    lags: np.ndarray  # [T, S]: t - s
    pair_exponent: np.ndarray  # [B, H, T, S]: L_t - L_s on the kept pairs (-inf elsewhere)
    enter: np.ndarray  # [B, H, T]: gamma^(t+1) where t is in run 0, else 0
    leave: np.ndarray  # [B, H, S]: gamma^(T-1-s) where s is in the last run, else 0
    carry: np.ndarray  # [B, H]: gamma^T if the whole row is run 0, else 0


def _default_scale(scale, K: int) -> float:
    """None means K^-1/2 (the op's default)."""
    return K ** -0.5 if scale is None else float(scale)


def _terms(q, k, v, decay, scale, initial_state, segment_ids, log_gate=None) -> _Terms:
    q, k, v = _as64(q), _as64(k), _as64(v)
    scale = _default_scale(scale, q.shape[-1])
    B, T, H, K = q.shape
    V = v.shape[-1]
    gamma = np.ones(H) if decay is None else _as64(decay)
    if np.any(gamma <= 0) or np.any(gamma > 1):
        raise ValueError(f"oracle: decay must lie in (0, 1], got {gamma}")
    log_gamma = np.log(gamma)
    gate = np.zeros((B, T, H)) if log_gate is None else _as64(log_gate)
    if np.any(gate > 0):
        raise ValueError("oracle: log_gate must be <= 0")
    cumulative = np.cumsum(log_gamma[None, :, None] + gate.transpose(0, 2, 1), axis=-1)  # [B, H, T]
    s0 = np.zeros((B, H, K, V)) if initial_state is None else _as64(initial_state)
    run = runs(segment_ids, B, T)
    t = np.arange(T)
    lags = t[:, None] - t[None, :]
    same = (lags >= 0)[None] & (run[:, :, None] == run[:, None, :])  # [B, T, S]
    # The decay of each kept pair as exp(L_t - L_s), an exponent <= 0: no gamma^-n ever appears.
    exponent = np.where(same[:, None], cumulative[:, :, :, None] - cumulative[:, :, None, :], -np.inf)
    weights = scale * np.exp(exponent)
    enter = np.where((run == 0)[:, None, :], np.exp(cumulative), 0.0)
    last = run[:, -1:] if T else np.zeros((B, 1), np.int64)
    total = cumulative[:, :, -1:] if T else np.zeros((B, H, 1))
    leave = np.where((run == last)[:, None, :], np.exp(total - cumulative), 0.0)
    carry = np.where((last[:, 0] == 0)[:, None], np.exp(total[..., 0]), 0.0)
    return _Terms(q, k, v, log_gamma, cumulative, float(scale), s0, weights, lags, exponent, enter, leave, carry)


def forward(q, k, v, decay, *, scale: float | None = None, initial_state=None, segment_ids=None, log_gate=None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(o [B, T, H, V], final state [B, H, K, V]), float64, from the user-level arguments."""
    z = _terms(q, k, v, decay, scale, initial_state, segment_ids, log_gate)
    scores = np.einsum("bthk,bshk->bhts", z.q, z.k) * z.weights
    o = np.einsum("bhts,bshv->bthv", scores, z.v)
    o += z.scale * np.einsum("bht,bthk,bhkv->bthv", z.enter, z.q, z.s0)
    final = np.einsum("bhs,bshk,bshv->bhkv", z.leave, z.k, z.v) + z.carry[:, :, None, None] * z.s0
    return o, final


def gradients(q, k, v, decay, *, do, d_final=None, scale: float | None = None, initial_state=None, segment_ids=None,
              log_gate=None) -> dict[str, np.ndarray]:
    """The analytic gradients, float64, for the loss <do, o> + <d_final, final state>.

    Returns dict(q, k, v [like the inputs], decay [H] (= d log decay / decay), log_decay [H],
    initial_state [B, H, K, V], log_gate [B, T, H]).

    Every decay factor is exp(a sum of la_r over a range of positions r); its derivative in la_r is the
    factor itself where r lies in the range. So d la_r collects the pairs (s, t) with s < r <= t, the initial
    state's terms of positions t >= r, the final state's terms of positions s < r and the carry of the
    initial state into the final state; d log gamma sums d la over the positions (and rows).
    """
    z = _terms(q, k, v, decay, scale, initial_state, segment_ids, log_gate)
    do = _as64(do)
    B, T, H, K = z.q.shape
    V = z.v.shape[-1]
    d_final = np.zeros((B, H, K, V)) if d_final is None else _as64(d_final)
    qk = np.einsum("bthk,bshk->bhts", z.q, z.k)  # q_t . k_s
    dov = np.einsum("bthv,bshv->bhts", do, z.v)  # dO_t . v_s
    a_dov = z.weights * dov
    a_qk = z.weights * qk

    dq = np.einsum("bhts,bshk->bthk", a_dov, z.k)
    dq += z.scale * np.einsum("bht,bhkv,bthv->bthk", z.enter, z.s0, do)  # from o_t += scale gamma^(t+1) q_t^T S0
    dk = np.einsum("bhts,bthk->bshk", a_dov, z.q)
    dk += np.einsum("bhs,bhkv,bshv->bshk", z.leave, d_final, z.v)  # from S_T += gamma^(T-1-s) k_s v_s^T
    dv = np.einsum("bhts,bthv->bshv", a_qk, do)
    dv += np.einsum("bhs,bhkv,bshk->bshv", z.leave, d_final, z.k)
    ds0 = z.scale * np.einsum("bht,bthk,bthv->bhkv", z.enter, z.q, do) + z.carry[:, :, None, None] * d_final

    pairs = z.weights * qk * dov  # [B, H, T, S]
    # d la_r: pairs with s < r <= t. before[b, h, t, r] = sum_{s < r} pairs[t, s]; then sum over t >= r.
    before = np.concatenate([np.zeros(pairs.shape[:3] + (1,)), np.cumsum(pairs, axis=-1)[..., :-1]], axis=-1)
    t = np.arange(T)
    d_la = np.einsum("bhtr,tr->bhr", before, (t[:, None] >= t[None, :]).astype(f64))
    # The initial state's term of o_t (t >= r), the final state's term of k_s v_s (s < r), and the carry.
    s0_terms = z.scale * np.einsum("bht,bthk,bhkv,bthv->bht", z.enter, z.q, z.s0, do)
    d_la += np.cumsum(s0_terms[..., ::-1], axis=-1)[..., ::-1]
    exit_terms = np.einsum("bhs,bshk,bhkv,bshv->bhs", z.leave, z.k, d_final, z.v)
    d_la += np.concatenate([np.zeros((B, H, 1)), np.cumsum(exit_terms, axis=-1)[..., :-1]], axis=-1)
    d_la += np.einsum("bh,bhkv,bhkv->bh", z.carry, d_final, z.s0)[..., None]
    dlog = d_la.sum(axis=(0, 2))
    return dict(q=dq, k=dk, v=dv, decay=dlog / np.exp(z.log_gamma), log_decay=dlog, initial_state=ds0,
                log_gate=d_la.transpose(0, 2, 1))


def recurrent(q, k, v, decay, *, do, d_final=None, scale: float | None = None, initial_state=None, segment_ids=None
              ) -> dict[str, np.ndarray]:
    """The recurrence S_t = gamma S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t, in float64 with O(T) time and
    O(B H K V) memory, together with d log gamma of <do, o> + <d_final, S_T>.

    W_t = dS_t / d log gamma = sum_{s <= t} (t - s) gamma^(t-s) k_s v_s^T + (t + 1) gamma^(t+1) S0 obeys
    W_t = gamma (W_{t-1} + S_{t-1}) with W_{-1} = 0 and S_{-1} = S0 (differentiate S_t = gamma S_{t-1} + k_t
    v_t^T; k_t v_t^T does not depend on gamma). A reset zeroes both S_{t-1} and W_{t-1}. Then
    d log gamma = sum_t scale q_t^T W_t dO_t + <d_final, W_{T-1}>.

    Returns dict(o [B, T, H, V], final_state [B, H, K, V], log_decay [H], decay [H]).
    """
    q, k, v, do = _as64(q), _as64(k), _as64(v), _as64(do)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _default_scale(scale, K)
    gamma = _as64(decay)[None, :, None, None]
    run = runs(segment_ids, B, T)
    state = np.zeros((B, H, K, V)) if initial_state is None else _as64(initial_state).copy()
    w = np.zeros((B, H, K, V))
    o = np.zeros((B, T, H, V))
    dlog = np.zeros((B, H))
    for t in range(T):
        if t > 0:
            keep = (run[:, t] == run[:, t - 1]).astype(f64)[:, None, None, None]
            state, w = state * keep, w * keep
        w = gamma * (w + state)
        state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], state)
        dlog += scale * np.einsum("bhk,bhkv,bhv->bh", q[:, t], w, do[:, t])
    if d_final is not None:
        dlog += np.einsum("bhkv,bhkv->bh", _as64(d_final), w)
    dlog = dlog.sum(0)
    return dict(o=o, final_state=state, log_decay=dlog, decay=dlog / _as64(decay))


def recurrent_gated(q, k, v, decay, log_gate, *, do, d_final=None, scale: float | None = None, initial_state=None,
                    segment_ids=None) -> dict[str, np.ndarray]:
    """The gated recurrence S_t = a_t S_{t-1} + k_t v_t^T with a_t = gamma exp(g_t), in float64 with O(T K V)
    memory, and the gradients in the log gates of <do, o> + <d_final, S_T>: with the adjoint
    G_t = dL/dS_t = scale q_t dO_t^T + a_{t+1} G_{t+1} (G_{T-1} gains d_final), d la_t = a_t <G_t, S_{t-1}>;
    a reset at t cuts both S_{t-1} and the adjoint's path through a_t.

    Returns dict(o [B, T, H, V], final_state, log_gate [B, T, H], log_decay [H], decay [H])."""
    q, k, v, do = _as64(q), _as64(k), _as64(v), _as64(do)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _default_scale(scale, K)
    gamma = np.ones(H) if decay is None else _as64(decay)
    a = gamma[None, None, :] * np.exp(_as64(log_gate))  # [B, T, H]
    run = runs(segment_ids, B, T)
    keep = np.concatenate([np.ones((B, 1)), (run[:, 1:] == run[:, :-1]).astype(f64)], axis=1)  # [B, T]
    state = np.zeros((B, H, K, V)) if initial_state is None else _as64(initial_state).copy()
    before = np.zeros((T, B, H, K, V))
    o = np.zeros((B, T, H, V))
    for t in range(T):
        state = state * keep[:, t, None, None, None]
        before[t] = state
        state = a[:, t, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], state)
    adjoint = np.zeros((B, H, K, V)) if d_final is None else _as64(d_final).copy()
    d_la = np.zeros((B, T, H))
    for t in range(T - 1, -1, -1):
        adjoint = adjoint + scale * q[:, t, :, :, None] * do[:, t, :, None, :]
        d_la[:, t] = a[:, t] * np.einsum("bhkv,bhkv->bh", adjoint, before[t])
        adjoint = a[:, t, :, None, None] * adjoint * keep[:, t, None, None, None]
    dlog = d_la.sum(axis=(0, 1))
    return dict(o=o, final_state=state, log_gate=d_la, log_decay=dlog, decay=dlog / gamma)


# ------------------------------------------------------------------------------- helpers for the tests

def segment_pattern(B: int, T: int, seed: int = 0) -> np.ndarray:
    """Packed-sequence ids [B, T] int32 that exercise every boundary kind the kernels care about.

    Row 0: boundaries at chunk edges (15/16/17, 31/32/33, 63/64/65, 127/128/129) and right after the first
    position, ids alternating 7, 3, 7, ... so equal ids come back after another id (they must not
    interact). Row 1: one segment (id -2), so the initial state reaches the end. Row 2: random boundaries
    with ids drawn from {0, 1}. Row 3: a new segment at every position. Further rows repeat the pattern.
    """
    rng = np.random.default_rng(seed)
    edges = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129]
    rows = []
    for b in range(B):
        kind = b % 4
        if kind == 0:
            starts = np.zeros(T, np.int64)
            starts[[e for e in edges if e < T]] = 1
            row = np.where(np.cumsum(starts) % 2 == 0, 7, 3)
        elif kind == 1:
            row = np.full(T, -2)
        elif kind == 2:
            row = rng.integers(0, 2, size=T)
            row = np.repeat(row, rng.integers(1, 9, size=T))[:T]  # runs of random length
        else:
            row = np.arange(T) % 2
        rows.append(row)
    return np.asarray(rows, np.int32).reshape(B, T)


def rel_err(x, ref, axis: int | None = None) -> float:
    """max |x - ref| / max |ref|; with ``axis`` (the head axis), the worst of that ratio over the heads,
    so a head with small values is not hidden behind a head with large ones."""
    x, ref = _as64(x), _as64(ref)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} != oracle shape {ref.shape}")
    if ref.size == 0:
        return 0.0
    if axis is None:
        x, ref = x[None], ref[None]
        axis = 0
    x, ref = np.moveaxis(x, axis, 0), np.moveaxis(ref, axis, 0)
    worst = 0.0
    for xh, rh in zip(x, ref):
        err = np.max(np.abs(xh - rh))
        scale = np.max(np.abs(rh))
        if not np.isfinite(err):
            return float("inf")
        worst = max(worst, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
    return float(worst)
