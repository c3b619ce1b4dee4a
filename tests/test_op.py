"""One table of cases, run against every implementation in fleetjax.IMPLEMENTATIONS.

Each case compares the output, the final state and the gradients in q, k, v, decay and initial_state
(random cotangents for the output and the final state) with the float64 oracle in tests/oracle.py. Errors
are max |x - oracle| / max |oracle|, taken per head, so a head with small values (decay 1e-4) is checked
as strictly as a head with large ones (decay 1).

Implementations that run here in Pallas interpret mode (``Implementation.interpreted()``) are slow: they get
the cases within INTERPRET_CAP only; where they run compiled (a GPU), every case.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fleetjax
import oracle

IMPLEMENTATIONS = sorted(fleetjax.IMPLEMENTATIONS)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}
# The float32 outputs of 16-bit inputs (final state, d initial_state, d decay) owe float32's accuracy: the
# inputs are exact 16-bit numbers. The decay gradient's offset sums amplify the hi/lo products of the Pallas
# kernels (about 16 bits for bfloat16) up to this.
STATE_TOLERANCE = 1e-5
DECAY_GRAD_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-4, "float16": 1e-4}


def tolerance(implementation: str, case: "Case") -> float:
    """TOLERANCE, widened for float32 where an implementation's arithmetic cannot reach 1e-5 (seen on an
    H100): the Pallas kernels' default float32 products on a GPU (precision "tf32x3") keep about 22 bits,
    and the decay gradient's offset sums amplify that past 1e-5 at T=1000. (The scan's per-step factor is
    the float32 nearest exp(la) on every backend: fleetjax.reference.step_factor.)"""
    tol = TOLERANCE[case.dtype]
    impl = fleetjax.IMPLEMENTATIONS[implementation]
    if case.dtype == "float32" and impl.interpret and impl.runs_compiled():
        tol = max(tol, 3e-5)
    return tol


# Interpret mode runs the kernels' grid sequentially: keep their cases small (positions x heads x dims).
INTERPRET_CAP = 70_000
ALL_DECAYS = (1.0, 0.999, 0.5, 1e-4)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table. ``decay`` has one value per head (so H = len(decay))."""

    B: int
    T: int
    K: int
    V: int
    decay: tuple[float, ...]
    scale: float = 1.0
    initial_state: bool = False
    final_state: bool = True
    segments: bool = False
    dtype: str = "float32"
    magnitude: float = 1.0  # q and k drawn as magnitude * N(0, 1)
    gated: bool = False  # a per-token log gate (with a hard forget, -40, a third of the way in)

    @property
    def H(self) -> int:
        return len(self.decay) or 2  # no decay (decay=None): two heads decayed by their gates alone

    @property
    def id(self) -> str:
        parts = [f"B{self.B}T{self.T}H{self.H}K{self.K}V{self.V}", self.dtype,
                 "decay=" + (",".join(f"{d:g}" for d in self.decay) or "None")]
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        parts += [name for name, on in (("init", self.initial_state), ("final", self.final_state),
                                        ("segments", self.segments)) if on]
        if self.magnitude != 1.0:
            parts.append(f"qk*{self.magnitude:g}")
        if self.gated:
            parts.append("gated")
        return "-".join(parts)

    def fits(self, implementation: str) -> bool:
        if not fleetjax.IMPLEMENTATIONS[implementation].interpreted():
            return True
        return self.B * self.H * self.T * (self.K + self.V) <= INTERPRET_CAP


CASES = [
    Case(B=2, T=1, K=5, V=3, decay=(1.0, 0.5), initial_state=True),
    Case(B=2, T=1, K=4, V=6, decay=(1e-4,), final_state=False),
    Case(B=2, T=7, K=5, V=24, decay=(0.999, 0.5, 1e-4), scale=0.7, initial_state=True, segments=True),
    Case(B=1, T=7, K=1, V=2, decay=(1.0,), final_state=False),
    Case(B=1, T=64, K=24, V=33, decay=ALL_DECAYS),
    Case(B=2, T=65, K=33, V=24, decay=ALL_DECAYS, scale=0.3, initial_state=True),
    Case(B=4, T=65, K=8, V=5, decay=(0.999, 0.5), initial_state=True, segments=True),
    Case(B=4, T=130, K=5, V=7, decay=(1.0, 1e-4), scale=2.0, initial_state=True, segments=True),
    Case(B=1, T=1000, K=24, V=5, decay=ALL_DECAYS, scale=0.125, initial_state=True),
    Case(B=4, T=1000, K=5, V=8, decay=(0.999, 0.5), initial_state=True, segments=True),
    Case(B=2, T=65, K=24, V=33, decay=ALL_DECAYS, initial_state=True, segments=True, dtype="bfloat16"),
    Case(B=2, T=130, K=24, V=33, decay=ALL_DECAYS, initial_state=True, dtype="bfloat16"),
    Case(B=1, T=1000, K=16, V=8, decay=(0.999, 0.9), scale=0.25, initial_state=True, dtype="bfloat16"),
    Case(B=2, T=65, K=5, V=7, decay=(0.999, 0.5), initial_state=True, segments=True, dtype="float16"),
    # float16 products whose intra-chunk scores (q . k ~ 1e5) exceed float16's range where the result does
    # not: the scale must be applied before the rounding (880 of 1024 outputs were NaN/inf).
    Case(B=1, T=64, K=32, V=16, decay=(0.9,), scale=1e-4, dtype="float16", magnitude=100.0),
    # bfloat16 inputs with a long memory: the final state and d initial_state owe float32's accuracy.
    Case(B=1, T=211, K=32, V=1, decay=(0.9999,), initial_state=True, dtype="bfloat16"),
    # V = 2K (RetNet's layout) and K = 2V, head dims 100, 200 and 256 (crashed the GPU kernels' shared memory).
    Case(B=1, T=70, K=100, V=200, decay=(0.999, 0.5), scale=0.1, initial_state=True, dtype="bfloat16"),
    Case(B=1, T=40, K=256, V=128, decay=(0.99,), initial_state=True, segments=True, dtype="float16"),
    Case(B=1, T=40, K=64, V=128, decay=(0.9, 0.999), initial_state=True),
    Case(B=1, T=40, K=200, V=100, decay=(0.95,), scale=0.1, dtype="float32"),
    # Per-token log gates: with segments and an initial state, without a per-head decay (decay None), and
    # in bfloat16 across several chunks.
    Case(B=4, T=65, K=8, V=5, decay=(0.999, 0.5), scale=0.7, initial_state=True, segments=True, gated=True),
    Case(B=2, T=70, K=6, V=9, decay=(), initial_state=True, gated=True),
    Case(B=1, T=130, K=16, V=24, decay=(0.99, 1.0), initial_state=True, dtype="bfloat16", gated=True),
    # Gated sequences shorter than an eighth of a chunk: the gate's gradient over one chunk padded from T
    # failed XLA's GPU compile (jax 0.11.2: "Failed to translate module to LLVM IR" at T <= 7 of 64).
    Case(B=2, T=1, K=5, V=24, decay=(0.5,), initial_state=True, gated=True),
    Case(B=2, T=7, K=5, V=24, decay=(0.999, 0.5), segments=True, dtype="bfloat16", gated=True),
]


def _table():
    for name in IMPLEMENTATIONS:
        for case in CASES:
            if case.fits(name):
                yield pytest.param(name, case, id=f"{name}-{case.id}")


# --------------------------------------------------------------------------------------------- helpers

def _inputs(case: Case, seed: int = 0) -> dict:
    """Random inputs in the case's dtype; the oracle reads the same (rounded) values in float64."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(
        q=jnp.asarray(case.magnitude * normal(B, T, H, K), dtype),
        k=jnp.asarray(case.magnitude * normal(B, T, H, K), dtype),
        v=jnp.asarray(normal(B, T, H, V), dtype),
        decay=jnp.asarray(case.decay, jnp.float32) if case.decay else None,
        initial_state=jnp.asarray(normal(B, H, K, V)) if case.initial_state else None,
        segment_ids=jnp.asarray(oracle.segment_pattern(B, T, seed)) if case.segments else None,
        log_gate=jnp.asarray(_log_gate(rng, B, T, H)) if case.gated else None,
        do=jnp.asarray(normal(B, T, H, V), dtype),
        d_final=jnp.asarray(normal(B, H, K, V)) if case.final_state else None)


def _log_gate(rng, B: int, T: int, H: int) -> np.ndarray:
    """Log forget gates [B, T, H] <= 0: mostly small, and from T = 3 on a hard forget (-40) a third of the way
    in. Below T = 3 it would fall on the first position, leaving d log_gate only terms of order e^-40 (about
    1e-17 here), which the Pallas walks form to within that order of zero, not to their own relative error."""
    gate = -np.abs(rng.standard_normal((B, T, H))).astype(np.float32) * 0.2
    if T >= 3:
        gate[:, T // 3, 0] = -40.0
    return gate


@functools.lru_cache(maxsize=None)
def _value_and_grads_fn(implementation: str, case: Case):
    """jit(inputs -> (o, final state or None, gradients dict)) for one implementation and case."""

    def run(q, k, v, decay, initial_state, segment_ids, log_gate, do, d_final):
        def f(q, k, v, decay, initial_state, log_gate):
            return fleetjax.fleet_attention(q, k, v, decay, scale=case.scale, initial_state=initial_state,
                                            return_final_state=case.final_state, segment_ids=segment_ids,
                                            log_gate=log_gate, implementation=implementation)

        out, vjp = jax.vjp(f, q, k, v, decay, initial_state, log_gate)
        dq, dk, dv, ddecay, dinit, dgate = vjp((do, d_final) if case.final_state else do)
        o, final = out if case.final_state else (out, None)
        return o, final, dict(q=dq, k=dk, v=dv, decay=ddecay, initial_state=dinit, log_gate=dgate)

    return jax.jit(run)


def _run(implementation: str, case: Case, x: dict):
    return _value_and_grads_fn(implementation, case)(x["q"], x["k"], x["v"], x["decay"], x["initial_state"],
                                                     x["segment_ids"], x["log_gate"], x["do"], x["d_final"])


def _run_forward(implementation: str, case: Case, x: dict):
    """(o, final state or None) alone."""
    out = jax.jit(lambda q, k, v, decay, initial_state, segment_ids, log_gate: fleetjax.fleet_attention(
        q, k, v, decay, scale=case.scale, initial_state=initial_state, return_final_state=case.final_state,
        segment_ids=segment_ids, log_gate=log_gate, implementation=implementation))(
        x["q"], x["k"], x["v"], x["decay"], x["initial_state"], x["segment_ids"], x["log_gate"])
    return out if case.final_state else (out, None)


def _gradients_checked_by(implementation: str, case: Case) -> str | None:
    """The implementation whose row of ``case`` checks this one's gradients: the one whose backward its VJP
    runs from the inputs alone (its record's backward_of), when that one runs the case too."""
    other = fleetjax.IMPLEMENTATIONS[implementation].backward_of
    return other if other in IMPLEMENTATIONS and case.fits(other) else None


def _oracle(case: Case, x: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    args = {name: None if x[name] is None else np.asarray(x[name], np.float64)
            for name in ("q", "k", "v", "decay", "initial_state", "do", "d_final", "log_gate")}
    kwargs = dict(scale=case.scale, initial_state=args["initial_state"], log_gate=args["log_gate"],
                  segment_ids=None if x["segment_ids"] is None else np.asarray(x["segment_ids"]))
    o, final = oracle.forward(args["q"], args["k"], args["v"], args["decay"], **kwargs)
    grads = oracle.gradients(args["q"], args["k"], args["v"], args["decay"], do=args["do"],
                             d_final=args["d_final"], **kwargs)
    return o, final, grads


# ------------------------------------------------------------------------------------------- the table

@pytest.mark.parametrize("implementation, case", list(_table()))
def test_matches_oracle(implementation: str, case: Case):
    x = _inputs(case)
    forward_only = _gradients_checked_by(implementation, case) is not None
    if forward_only:  # the same gradients, bit for bit, are checked in the other implementation's row
        (o, final), grads = _run_forward(implementation, case, x), None
    else:
        o, final, grads = _run(implementation, case, x)
    ref_o, ref_final, ref_grads = _oracle(case, x)
    tol = tolerance(implementation, case)

    assert o.shape == ref_o.shape and o.dtype == jnp.dtype(case.dtype)
    checks = [("o", o, ref_o, 2)]
    if case.final_state:
        assert final.shape == ref_final.shape and final.dtype == jnp.float32
        checks.append(("final_state", final, ref_final, 1))
    if forward_only:
        state_tol = max(tol, STATE_TOLERANCE) if case.dtype == "float32" else STATE_TOLERANCE
        errors = {name: oracle.rel_err(got, ref, axis) for name, got, ref, axis in checks}
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in (o, final) if a is not None), "NaN or inf"
        assert errors["o"] <= tol and errors.get("final_state", 0.0) <= state_tol, errors
        return
    checks += [(f"d{name}", grads[name], ref_grads[name], 2) for name in ("q", "k", "v")]
    if case.initial_state:
        checks.append(("dinitial_state", grads["initial_state"], ref_grads["initial_state"], 1))
    else:
        assert grads["initial_state"] is None
    for name in ("q", "k", "v"):
        assert grads[name].dtype == x[name].dtype, f"d{name} dtype"

    arrays = [o, final] + list(grads.values())
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in arrays if a is not None), "NaN or inf"
    # The float32 outputs: float32's accuracy whatever the input dtype.
    state_tol = max(tol, STATE_TOLERANCE) if case.dtype == "float32" else STATE_TOLERANCE
    tols = {name: state_tol if name in ("final_state", "dinitial_state") else tol for name, *_ in checks}
    errors = {name: oracle.rel_err(got, ref, axis) for name, got, ref, axis in checks}
    bad = {name: err for name, err in errors.items() if not err <= tols[name]}
    assert not bad, f"relative error above {tols}: {bad} (all: {errors})"
    decay_tol = max(tol, DECAY_GRAD_TOLERANCE["float32"]) if case.dtype == "float32" else DECAY_GRAD_TOLERANCE[case.dtype]
    if case.decay:
        err = oracle.rel_err(grads["decay"], ref_grads["decay"], axis=0)
        assert err <= decay_tol, (f"d decay relative error {err:.3g} > {decay_tol} (got {grads['decay']}, "
                                  f"oracle {ref_grads['decay']})")
    else:
        assert grads["decay"] is None
    if case.gated:
        err = oracle.rel_err(grads["log_gate"], ref_grads["log_gate"], axis=2)
        assert err <= decay_tol, f"d log_gate relative error {err:.3g} > {decay_tol}"
    else:
        assert grads["log_gate"] is None


# Cases where the decay (and the gate) is fixed: a custom VJP then skips its gradient's sums and the float32-
# accurate products that feed them (fleetjax.vjp.Wanted). 16-bit inputs, where those products differ.
FIXED_DECAY_CASES = [case for case in CASES if case.dtype != "float32" and case.B * case.H * case.T * (case.K + case.V)
                     <= 30_000 and case.magnitude == 1.0]


def _fixed_decay_table():
    for name in IMPLEMENTATIONS:
        record = fleetjax.IMPLEMENTATIONS[name]
        if record.custom_vjp and record.backward_of is None:
            for case in FIXED_DECAY_CASES:
                if case.fits(name):
                    yield pytest.param(name, case, id=f"{name}-{case.id}")


@pytest.mark.parametrize("implementation, case", list(_fixed_decay_table()))
def test_gradients_with_a_fixed_decay_match_oracle(implementation: str, case: Case):
    """dq, dk, dv and d initial_state when neither the decay nor the gate is differentiated (a RetNet with its
    fixed decays): the backward forms no decay gradient, and what it forms still meets the table's bounds."""
    x = _inputs(case)

    def f(q, k, v, initial_state):
        return fleetjax.fleet_attention(q, k, v, x["decay"], scale=case.scale, initial_state=initial_state,
                                        return_final_state=case.final_state, segment_ids=x["segment_ids"],
                                        log_gate=x["log_gate"], implementation=implementation)

    _, pullback = jax.vjp(f, x["q"], x["k"], x["v"], x["initial_state"])
    grads = jax.jit(pullback)((x["do"], x["d_final"]) if case.final_state else x["do"])
    _, _, ref = _oracle(case, x)
    tol = tolerance(implementation, case)
    for name, got in zip(("q", "k", "v", "initial_state"), grads):
        if name == "initial_state" and not case.initial_state:
            continue
        bound = STATE_TOLERANCE if name == "initial_state" else tol
        err = oracle.rel_err(got, ref[name], 1 if name == "initial_state" else 2)
        assert err <= bound, f"d{name} relative error {err:.3g} > {bound}"


# ------------------------------------------------------------------------------ the oracle checks itself

def _naive_forward(q, k, v, decay, scale, s0, segment_ids):
    """The definition as loops, for tiny shapes: a second, independent oracle for the oracle."""
    B, T, H, _ = q.shape
    o = np.zeros(v.shape[:3] + (v.shape[3],))
    final = np.zeros(s0.shape)
    for b in range(B):
        for h in range(H):
            state = s0[b, h].copy()
            for t in range(T):
                if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    state = np.zeros_like(state)
                state = decay[h] * state + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * q[b, t, h] @ state
            final[b, h] = state
    return o, final


def test_oracle_forward_matches_loops():
    rng = np.random.default_rng(1)
    B, T, H, K, V = 4, 19, 2, 3, 4
    q, k = rng.standard_normal((2, B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    s0 = rng.standard_normal((B, H, K, V))
    decay = np.array([0.9, 0.3])
    seg = oracle.segment_pattern(B, T, 1)
    o, final = oracle.forward(q, k, v, decay, scale=0.5, initial_state=s0, segment_ids=seg)
    o_ref, final_ref = _naive_forward(q, k, v, decay, 0.5, s0, seg)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final, final_ref, rtol=1e-12, atol=1e-12)


def test_oracle_gradients_match_finite_differences():
    """Central differences in float64 of <do, o> + <d_final, S_T> against the analytic gradients."""
    rng = np.random.default_rng(2)
    B, T, H, K, V = 4, 9, 2, 3, 2
    args = dict(q=rng.standard_normal((B, T, H, K)), k=rng.standard_normal((B, T, H, K)),
                v=rng.standard_normal((B, T, H, V)), decay=np.array([0.8, 0.35]),
                initial_state=rng.standard_normal((B, H, K, V)))
    do, d_final = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V))
    seg = oracle.segment_pattern(B, T, 3)

    def loss(a):
        o, final = oracle.forward(a["q"], a["k"], a["v"], a["decay"], scale=1.3,
                                  initial_state=a["initial_state"], segment_ids=seg)
        return np.sum(o * do) + np.sum(final * d_final)

    grads = oracle.gradients(args["q"], args["k"], args["v"], args["decay"], do=do, d_final=d_final, scale=1.3,
                             initial_state=args["initial_state"], segment_ids=seg)
    eps = 1e-6
    for name, x in args.items():
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            plus, minus = dict(args), dict(args)
            plus[name], minus[name] = x.copy(), x.copy()
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric[index] = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------------------------ composition, edges

def _small_inputs(seed=0, B=2, T=9, H=2, K=3, V=5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)
    return (normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V), jnp.asarray([0.9, 0.6][:H]),
            jnp.asarray(rng.standard_normal((B, H, K, V)).astype(np.float32)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_deterministic(implementation):
    """The same call twice gives the same bits, forward and backward."""
    q, k, v, decay, s0 = _small_inputs(T=37)
    seg = jnp.asarray(oracle.segment_pattern(2, 37))

    def loss(q, k, v, decay, s0):
        o, final = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, segment_ids=seg,
                                            return_final_state=True, implementation=implementation)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(final ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    first, second = fn(q, k, v, decay, s0), fn(q, k, v, decay, s0)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    o1 = fleetjax.fleet_attention(q, k, v, decay, implementation=implementation)
    o2 = fleetjax.fleet_attention(q, k, v, decay, implementation=implementation)
    assert np.array_equal(np.asarray(o1), np.asarray(o2))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_vmap_grad_compose(implementation):
    """grad of a vmapped call under jit equals the per-example gradients, decay and state batched too."""
    N = 3
    batches = [_small_inputs(seed) for seed in range(N)]
    stacked = [jnp.stack(xs) for xs in zip(*batches)]
    stacked[3] = jnp.asarray([[0.9, 0.6], [0.5, 1.0], [0.99, 0.2]])

    def loss(q, k, v, decay, s0):
        o, final = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, return_final_state=True,
                                            scale=0.5, implementation=implementation)
        return jnp.sum(jnp.sin(o)) + jnp.sum(final * 0.1)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    batched, summed = jax.jit(lambda *a: (jax.vmap(grad)(*a),
                                          jax.grad(lambda *b: jnp.sum(jax.vmap(loss)(*b)),
                                                   argnums=(0, 1, 2, 3, 4))(*a)))(*stacked)
    grad = jax.jit(grad)
    for n in range(N):
        single = grad(*(x[n] for x in stacked))
        for a, b, c in zip(batched, summed, single):
            np.testing.assert_allclose(np.asarray(a[n]), np.asarray(c), rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(np.asarray(b[n]), np.asarray(c), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_checkpoint_recomputes_to_the_same_gradients(implementation):
    """Two stacked calls, each under jax.checkpoint (nothing saved: the backward recomputes the forward),
    give the gradients of the plain composition, under jit."""
    q, k, v, decay, s0 = _small_inputs(seed=4)

    def block(x, k, v, decay, s0):
        o, final = fleetjax.fleet_attention(x, k, v, decay, initial_state=s0, return_final_state=True,
                                            scale=0.5, implementation=implementation)
        return jnp.tanh(o[..., : x.shape[-1]]), final

    def loss(wrap, q, k, v, decay, s0):
        layer = wrap(block)
        h, f1 = layer(q, k, v, decay, s0)
        h, f2 = layer(h, k, v, decay, f1)
        return jnp.sum(h ** 2) + jnp.sum(f2 * 0.1)

    remat = functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    args = (q, k, v, decay, s0)
    want = jax.jit(jax.grad(functools.partial(loss, lambda f: f), argnums=(0, 1, 2, 3, 4)))(*args)
    got = jax.jit(jax.grad(functools.partial(loss, remat), argnums=(0, 1, 2, 3, 4)))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_check_grads(implementation):
    """jax.test_util.check_grads (reverse mode, order 1) on a tiny case with segments and state."""
    q, k, v, decay, s0 = _small_inputs(B=2, T=6, H=2, K=2, V=3)
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]])

    def f(q, k, v, decay, s0):
        return fleetjax.fleet_attention(q, k, v, decay, scale=0.8, initial_state=s0, segment_ids=seg,
                                        return_final_state=True, implementation=implementation)

    check_grads(jax.jit(f), (q, k, v, decay, s0), order=1, modes=["rev"], eps=1e-3, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_derivative_orders_follow_the_record(implementation):
    """What the record says of derivatives holds: second derivatives in reverse mode where ``higher_order``
    (check_grads of order 2 through the VJP, gate, segments and state included), else NotImplementedError
    naming the alternatives; forward mode where ``forward_mode``, else JAX's refusal of custom VJPs."""
    record = fleetjax.IMPLEMENTATIONS[implementation]
    q, k, v, decay, s0 = _small_inputs(B=2, T=6, H=2, K=2, V=3)
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    gate = jnp.asarray(-np.abs(np.random.default_rng(3).standard_normal((2, 6, 2))) * 0.3, jnp.float32)

    def f(q, decay, gate, s0):
        return fleetjax.fleet_attention(q, k, v, decay, scale=0.8, log_gate=gate, initial_state=s0,
                                        segment_ids=seg, return_final_state=True, implementation=implementation)

    args = (q, decay, gate, s0)
    if record.higher_order:
        check_grads(jax.jit(f), args, order=2, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    else:
        loss = lambda *a: sum(jnp.sum(jnp.sin(x)) for x in f(*a))  # noqa: E731
        with pytest.raises(NotImplementedError, match="implementation='xla' for reverse mode"):
            jax.grad(lambda d: sum(jnp.sum(g) for g in jax.grad(loss, argnums=(0, 1))(q, d, gate, s0)))(decay)
    if record.forward_mode:
        check_grads(jax.jit(f), args, order=1, modes=["fwd"], eps=1e-3, atol=5e-3, rtol=5e-3)
    else:
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(f, args, args)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("decay", [1.0, 1e-4], ids=["decay=1", "decay=1e-4"])
def test_extreme_decay_is_finite(implementation, decay):
    """decay = 1 (no decay) and decay = 1e-4 (almost none kept) give finite values and gradients."""
    T = 130 if fleetjax.IMPLEMENTATIONS[implementation].interpreted() else 300
    q, k, v, _, s0 = _small_inputs(T=T, H=1)
    decay = jnp.asarray([decay])

    def loss(q, k, v, decay, s0):
        o, final = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, return_final_state=True,
                                            implementation=implementation)
        return jnp.mean(o ** 2) + jnp.mean(final ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, decay, s0)
    for x in (value,) + grads:
        assert bool(jnp.all(jnp.isfinite(x)))


def _compare_to_oracle(o, final, q, k, v, decay, s0, tol, scale=None, segment_ids=None):
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref_o, ref_final = oracle.forward(as64(q), as64(k), as64(v), as64(decay), scale=scale,
                                      initial_state=as64(s0), segment_ids=segment_ids)
    assert oracle.rel_err(o, ref_o, axis=2) <= tol
    assert oracle.rel_err(final, ref_final, axis=1) <= tol


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mixed_input_dtypes(implementation):
    """q float32, k bfloat16, v float16: the output takes the promoted dtype (float32), values are exact."""
    q, k, v, decay, s0 = _small_inputs(T=20)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.float16)
    o, final = jax.jit(functools.partial(fleetjax.fleet_attention, return_final_state=True,
                                         implementation=implementation))(q, k, v, decay, initial_state=s0)
    assert o.dtype == jnp.float32 and final.dtype == jnp.float32
    _compare_to_oracle(o, final, q, k, v, decay, s0, TOLERANCE["float32"])
    loss = lambda q, k, v: jnp.sum(fleetjax.fleet_attention(q, k, v, decay, implementation=implementation))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("B, T", [(0, 5), (2, 0), (0, 0)], ids=["B=0", "T=0", "B=T=0"])
def test_empty(implementation, B, T):
    """B = 0 or T = 0: empty output, the final state is the initial state, gradients exist."""
    q, k, v, decay, s0 = _small_inputs(B=B, T=T)

    def f(q, k, v, decay, s0):
        return fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, return_final_state=True,
                                        implementation=implementation)

    (o, final), vjp = jax.vjp(f, q, k, v, decay, s0)
    assert o.shape == (B, T, 2, 5) and final.shape == (B, 2, 3, 5)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(s0))
    d_final = jnp.ones_like(final)
    dq, dk, dv, ddecay, ds0 = vjp((jnp.ones_like(o), d_final))
    assert dq.shape == q.shape and dv.shape == v.shape and ddecay.shape == (2,)
    # S_T = decay^T S0 with T = 0 is S0: the state passes through unchanged, so does its cotangent.
    np.testing.assert_array_equal(np.asarray(ds0), np.asarray(d_final))
    assert bool(jnp.all(ddecay == 0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_steps_equal_full_forward(dtype):
    """Feeding positions one at a time through decode_step, from an initial state, gives the full
    forward's output and final state."""
    q, k, v, decay, s0 = _small_inputs(T=11, dtype=jnp.dtype(dtype))
    decay = jnp.asarray([0.95, 1e-4])
    state, outputs = s0, []
    for t in range(q.shape[1]):
        o_t, state = fleetjax.decode_step(q[:, t], k[:, t], v[:, t], decay, state, scale=0.5)
        assert o_t.dtype == jnp.dtype(dtype) and state.dtype == jnp.float32
        outputs.append(o_t)
    o = jnp.stack(outputs, axis=1)
    _compare_to_oracle(o, state, q, k, v, decay, s0, TOLERANCE[dtype], scale=0.5)
    full, full_final = fleetjax.fleet_attention(q, k, v, decay, scale=0.5, initial_state=s0,
                                                return_final_state=True, implementation="xla")
    assert oracle.rel_err(o, full, axis=2) <= TOLERANCE[dtype]
    assert oracle.rel_err(state, full_final, axis=1) <= TOLERANCE["float32"]


def test_decode_step_under_jit_and_scan():
    """decode_step composes with jit and lax.scan (how a generation loop calls it)."""
    q, k, v, decay, s0 = _small_inputs(T=8)

    @jax.jit
    def generate(q, k, v, state):
        def step(state, xs):
            o_t, state = fleetjax.decode_step(*xs, decay, state)
            return state, o_t
        state, o = jax.lax.scan(step, state, (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1)))
        return o.swapaxes(0, 1), state

    o, final = generate(q, k, v, s0)
    _compare_to_oracle(o, final, q, k, v, decay, s0, TOLERANCE["float32"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_return_final_state_false_gives_same_output(implementation):
    q, k, v, decay, s0 = _small_inputs(T=17)
    o = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, implementation=implementation)
    o2, _ = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, return_final_state=True,
                                     implementation=implementation)
    assert not isinstance(o, tuple)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))


def test_default_implementation_matches_oracle():
    """implementation=None dispatches (to "xla" on CPU) and computes the op."""
    q, k, v, decay, s0 = _small_inputs(T=13)
    o, final = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, return_final_state=True)
    _compare_to_oracle(o, final, q, k, v, decay, s0, TOLERANCE["float32"])
    assert fleetjax.default_implementation() in fleetjax.IMPLEMENTATIONS


def test_references_are_public():
    """fleetjax.reference.scan / quadratic take the op's arguments and agree with the oracle."""
    q, k, v, decay, s0 = _small_inputs(T=10)
    seg = jnp.asarray(oracle.segment_pattern(2, 10))
    for fn in (fleetjax.reference.scan, fleetjax.reference.quadratic):
        o, final = fn(q, k, v, decay, scale=0.3, initial_state=s0, return_final_state=True, segment_ids=seg)
        _compare_to_oracle(o, final, q, k, v, decay, s0, TOLERANCE["float32"], scale=0.3,
                           segment_ids=np.asarray(seg))


def test_no_decay_is_zeros_that_xla_keeps_as_a_constant():
    """decay=None is log gamma = 0 for every head (the test table's no-decay cases check the op against the
    oracle), formed as a constant XLA keeps: compiled, no broadcast (all zeros, a splat, becomes one, on a
    GPU a kernel of its own before the Pallas walks)."""
    from fleetjax.decay import log_decay_of
    zero = np.asarray(log_decay_of(None, 5))
    np.testing.assert_array_equal(zero, np.zeros(5, np.float32))
    compiled = jax.jit(lambda: log_decay_of(None, 5)).lower().compile().as_text()
    assert "broadcast" not in compiled and "constant(" in compiled
    assert "broadcast" in jax.jit(lambda: jnp.zeros((5,), jnp.float32)).lower().compile().as_text()
    np.testing.assert_allclose(np.asarray(log_decay_of(np.float32([0.5, 1.0]), 2)), np.log([0.5, 1.0]))


# ------------------------------------------------------------------------------------ the scan's step factor

# Factors near 1 (the long memories, where a factor's error compounds), far from it, a hard forget, and 1.
STEP_LOG_FACTORS = np.float32([np.log(0.999), np.log(0.9999), -1e-6, -0.01, -0.3, -3.0, -40.0, 0.0])


def test_step_factor_pair_is_exp_to_logs_rounding():
    """hi + lo is exp(la) (float64, of the float32 la) to within log's rounding of a value near la (up to 2
    ulp of la, at most 2^-22 |la| of the factor, plus float64-level terms): far below hi's own rounding
    where the factor is near 1, below 1e-12 for |la| <= 1e-6. hi alone misses that bound. Jitted, as the
    scan runs it: XLA rewrites an unguarded log(exp(la)) to la, which would make lo 0 and fail this."""
    hi, lo = (np.asarray(a, np.float64) for a in jax.jit(fleetjax.reference.step_factor)(STEP_LOG_FACTORS))
    exact = np.exp(STEP_LOG_FACTORS.astype(np.float64))
    bound = 2.0 ** -22 * np.abs(STEP_LOG_FACTORS) + 1e-13
    pair_err, hi_err = np.abs(hi + lo - exact) / exact, np.abs(hi - exact) / exact
    assert np.all(pair_err <= bound), dict(zip(STEP_LOG_FACTORS.tolist(), pair_err.tolist()))
    assert np.any(hi_err > bound), "hi alone meets the bound: the test cannot tell the pair from hi"


def test_step_factor_of_log_gamma_is_gamma():
    """For a constant decay near 1 the scan's factor, the pair's float32 sum, is gamma itself (as the
    oracle's), so nothing compounds over the steps; hi alone need not be (it is not where exp is an ulp
    off, as on an H200). la = log gamma in float32, as fleetjax.implementation.run forms it."""
    gamma = np.float32([0.9, 0.99, 0.995, 0.999, 0.9999, 0.99999, 1.0])
    hi, lo = jax.jit(lambda g: fleetjax.reference.step_factor(jnp.log(g)))(gamma)
    np.testing.assert_array_equal(np.asarray(hi + lo), gamma)


def test_step_through_an_underflowing_factor_is_finite():
    """la = -200 (a hard forget on a small decay): exp underflows to 0 in float32. hi + lo is 0 there (as
    at -100 and -120), and recurrent_step's value and gradients, in la too, are finite: the new state is
    the outer product alone. The other head's d la is (hi + lo) times the state's cotangent paired with
    the state."""
    for la in (-100.0, -120.0, -200.0):
        hi, lo = jax.jit(fleetjax.reference.step_factor)(jnp.float32(la))
        assert float(lo) == 0.0 and 0.0 <= float(hi) < np.finfo(np.float32).tiny, (la, hi, lo)
    q, k, v, _, s0 = _small_inputs(T=1)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    la = jnp.float32([-200.0, np.log(0.9)])
    rng = np.random.default_rng(3)
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    do, ds = normal(v.shape), normal(s0.shape)

    def loss(la, q, k, v, s0):
        o, state = fleetjax.reference.recurrent_step(q, k, v, la, s0, 0.5)
        return jnp.sum(o * do) + jnp.sum(state * ds), state

    (value, state), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(la, q, k, v, s0)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (value, state, *grads)), "NaN or inf"
    outer = np.einsum("bk,bv->bkv", np.float64(k[:, 0]), np.float64(v[:, 0]))
    np.testing.assert_allclose(np.asarray(state[:, 0]), outer, rtol=1e-6, atol=1e-6)
    dla = np.asarray(grads[0])
    assert dla[0] == 0.0
    # d state_new = ds + 0.5 q do^T; d la = (hi + lo) sum(s0 * d state_new), with hi + lo = 0.9.
    d_state = np.float64(ds) + 0.5 * np.einsum("bhk,bhv->bhkv", np.float64(q), np.float64(do))
    np.testing.assert_allclose(dla[1], 0.9 * np.sum(np.float64(s0[:, 1]) * d_state[:, 1]), rtol=1e-5)


# ----------------------------------------------------------------------------------- non-finite values

def _poisoned_case(where: str):
    """(inputs, segment ids, poisoned (b, t, h), what it may reach). A non-finite k and v at one position."""
    rng = np.random.default_rng(11)
    B, T, H, K, V = 2, 130, 2, 8, 6
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = dict(q=normal(B, T, H, K), k=normal(B, T, H, K), v=normal(B, T, H, V), s0=normal(B, H, K, V),
             do=normal(B, T, H, V), d_final=normal(B, H, K, V))
    if where == "late position":  # one sequence per row: a NaN at t = 100 of 130
        seg, t, value = None, 100, np.nan
    else:  # packed rows: an inf in the middle segment of row 0 (segments [0, 40), [40, 90), [90, 130))
        seg, t, value = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat([40, 50, 40], axis=1)), 50, np.inf
    return x, seg, (0, t, 0), value


@pytest.mark.parametrize("where", ["late position", "packed segment"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_non_finite_values_stay_where_they_belong(implementation, where):
    """A NaN or inf in k and v at one position changes no output that does not depend on it: earlier
    positions, later segments of the row, other rows and heads, the final state of other rows/heads, and
    likewise the gradients (with a finite cotangent). Masks and segment resets select, never multiply."""
    x, seg, (b, t, h), value = _poisoned_case(where)
    bad = dict(x, k=x["k"].at[b, t, h].set(value), v=x["v"].at[b, t, h].set(value))

    def run(x):
        def f(q, k, v, s0):
            return fleetjax.fleet_attention(q, k, v, jnp.asarray([0.9, 0.5]), initial_state=s0, segment_ids=seg,
                                            return_final_state=True, implementation=implementation)
        (o, final), pullback = jax.vjp(f, x["q"], x["k"], x["v"], x["s0"])
        return (o, final) + pullback((x["do"], x["d_final"]))

    o, final, dq, dk, dv, ds0 = (np.asarray(a) for a in jax.jit(run)(bad))
    ref = [np.asarray(a) for a in jax.jit(run)(x)]
    T = o.shape[1]
    # What the position may reach: later positions of its segment, in its row and head.
    end = T if seg is None else int(np.max(np.nonzero(np.asarray(seg)[b] == np.asarray(seg)[b, t])[0])) + 1
    reach = np.zeros(o.shape[:3], bool)
    reach[b, t:end, h] = True
    reaches_final = end == T
    for name, got, want, affected in (("o", o, ref[0], reach), ("dq", dq, ref[2], reach)):
        assert np.all(np.isfinite(got[~affected])), f"{name}: a non-finite value leaked"
        np.testing.assert_allclose(got[~affected], want[~affected], rtol=1e-5, atol=1e-6, err_msg=name)
    # dk_s and dv_s depend on v_s and k_s of their own position only (and on later q, dO, which are finite).
    own = np.zeros(o.shape[:3], bool)
    own[b, t, h] = True
    for name, got, want in (("dk", dk, ref[3]), ("dv", dv, ref[4])):
        assert np.all(np.isfinite(got[~own])), f"{name}: a non-finite value leaked"
        np.testing.assert_allclose(got[~own], want[~own], rtol=1e-5, atol=1e-6, err_msg=name)
    others = np.ones(final.shape[:2], bool)
    if reaches_final:
        others[b, h] = False
    np.testing.assert_allclose(final[others], ref[1][others], rtol=1e-5, atol=1e-6, err_msg="final state")
    np.testing.assert_allclose(ds0, ref[5], rtol=1e-5, atol=1e-6, err_msg="d initial_state")


def test_gated_decode_steps_equal_full_forward():
    """decode_step with per-token log gates (and decay None) equals the gated full forward."""
    q, k, v, _, s0 = _small_inputs(T=11)
    gate = jnp.asarray(-np.abs(np.random.default_rng(5).standard_normal((2, 11, 2))) * 0.5, jnp.float32)
    for decay in (jnp.asarray([0.95, 0.5]), None):
        state, outputs = s0, []
        for t in range(q.shape[1]):
            o_t, state = fleetjax.decode_step(q[:, t], k[:, t], v[:, t], decay, state, log_gate=gate[:, t])
            outputs.append(o_t)
        o, final = fleetjax.fleet_attention(q, k, v, decay, log_gate=gate, initial_state=s0, return_final_state=True,
                                            implementation="scan")
        np.testing.assert_allclose(np.asarray(jnp.stack(outputs, axis=1)), np.asarray(o), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state), np.asarray(final), rtol=1e-5, atol=1e-6)
