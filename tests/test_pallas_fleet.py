"""implementation="pallas_fleet" in Pallas interpret mode against fleetjax.reference (scan / quadratic).

Shapes are tiny but chosen so that every path of the kernel runs: several rank blocks (float32 partials and
their fixed-order sum) and several value blocks, head dims that are not powers of two (masked columns), a
tail tile (T not a multiple of tokens_per_step), sequence pieces joined by state passing, run ids, and
both walks (one position per step, and a tile per step). Interpret mode fills the padding of blocks that
stick out of an array with NaN, so a kernel that used an unmasked out-of-bounds value would fail here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fleetjax import reference
from fleetjax.pallas.fleet import FleetConfig, default_config, pallas_fleet_impl

f32 = jnp.float32
DECAYS = (1.0, 0.999, 0.5, 1e-4)


@dataclasses.dataclass(frozen=True)
class Problem:
    B: int
    T: int
    H: int
    K: int
    V: int
    initial_state: bool = True
    runs: bool = False
    first_run: int = 0  # 1: the row opens a new run, so the initial state reaches no position
    dtype: str = "float32"
    scale: float = 0.75
    gated: bool = False  # per-token log gates

    def arrays(self, seed: int = 0):
        keys = jax.random.split(jax.random.PRNGKey(seed), 5)
        dtype = jnp.dtype(self.dtype)
        q = jax.random.normal(keys[0], (self.B, self.T, self.H, self.K)).astype(dtype)
        k = jax.random.normal(keys[1], (self.B, self.T, self.H, self.K)).astype(dtype)
        v = jax.random.normal(keys[2], (self.B, self.T, self.H, self.V)).astype(dtype)
        log_decay = jnp.log(jnp.asarray([DECAYS[h % len(DECAYS)] for h in range(self.H)], f32))
        state = (jax.random.normal(keys[3], (self.B, self.H, self.K, self.V)) if self.initial_state
                 else jnp.zeros((self.B, self.H, self.K, self.V), f32))
        log_gate = None
        if self.gated:
            log_gate = -jnp.abs(jax.random.normal(keys[4], (self.B, self.T, self.H))) * 0.3
        run_ids = None
        if self.runs:
            starts = jax.random.bernoulli(keys[4], 0.2, (self.B, self.T)).at[:, 0].set(self.first_run == 1)
            run_ids = jnp.cumsum(starts.astype(jnp.int32), axis=1, dtype=jnp.int32)
        return q, k, v, log_decay, log_gate, state, run_ids


def _relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _check(problem: Problem, config: FleetConfig, tol: float, oracle=reference.scan_impl):
    q, k, v, log_decay, log_gate, state, run_ids = problem.arrays()
    o, final = pallas_fleet_impl(q, k, v, log_decay, log_gate, state, run_ids, scale=problem.scale, config=config)
    assert o.shape == (problem.B, problem.T, problem.H, problem.V)
    assert final.shape == (problem.B, problem.H, problem.K, problem.V) and final.dtype == f32
    up = lambda x: x.astype(f32)
    o_ref, final_ref = oracle(up(q), up(k), up(v), log_decay, log_gate, state, run_ids, scale=problem.scale)
    assert np.all(np.isfinite(np.asarray(o, np.float32)))
    assert _relative_error(o, o_ref) < tol, _relative_error(o, o_ref)
    assert _relative_error(final, final_ref) < tol, _relative_error(final, final_ref)
    return o, final


TILE = FleetConfig(block_k=16, block_v=16, tokens_per_step=16)  # several rank and value blocks when dims > 16

CASES = [
    (Problem(1, 1, 2, 5, 24), FleetConfig()),  # T = 1, dims not powers of two, one rank block
    (Problem(2, 7, 4, 24, 5), TILE),  # 2 rank blocks (24 > 16), K != V, every decay
    (Problem(1, 33, 2, 24, 40, scale=1.0), TILE),  # tail tile, 2 rank x 3 value blocks
    (Problem(2, 33, 2, 24, 40, runs=True), TILE),  # packed sequences across tile boundaries
    (Problem(1, 33, 3, 24, 24, runs=True, initial_state=False), dataclasses.replace(TILE, tokens_per_step=1)),
    (Problem(1, 70, 2, 5, 24, runs=True), FleetConfig(tokens_per_step=16, num_sequence_pieces=3)),
    (Problem(1, 70, 2, 24, 24), dataclasses.replace(TILE, num_sequence_pieces=4)),  # pieces x rank blocks
    (Problem(1, 37, 2, 24, 16, runs=True), FleetConfig(tokens_per_step=1, num_sequence_pieces=3)),
    # Per-token log gates: the tile walk with rank blocks and pieces, and the per-token walk.
    (Problem(1, 50, 2, 24, 16, runs=True, gated=True), dataclasses.replace(TILE, num_sequence_pieces=2)),
    (Problem(1, 21, 2, 5, 16, gated=True), FleetConfig(tokens_per_step=1)),
]


@pytest.mark.parametrize("problem,config", CASES, ids=lambda x: repr(x) if isinstance(x, Problem) else "")
def test_matches_scan_float32(problem, config):
    _check(problem, config, tol=1e-5)


def test_row_opening_a_new_run_gets_no_initial_state():
    # run ids that start at 1 (sequence parallelism: the row continues no run): the quadratic reference
    # feeds the entering state to run 0 only. Two pieces: the kernel's gate (piece 0) and the join's.
    problem = Problem(2, 40, 2, 24, 24, runs=True, first_run=1)
    _check(problem, dataclasses.replace(TILE, num_sequence_pieces=2), tol=1e-5, oracle=reference.quadratic_impl)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float16", 2e-3)])
def test_16_bit_inputs(dtype, tol):
    problem = Problem(1, 33, 2, 24, 40, runs=True, dtype=dtype)
    o, _ = _check(problem, TILE, tol=tol)
    assert o.dtype == f32  # several rank blocks: float32 partials, summed in float32


def test_16_bit_output_dtype_with_one_rank_block():
    problem = Problem(1, 20, 2, 16, 16, dtype="bfloat16")
    o, _ = _check(problem, FleetConfig(tokens_per_step=16), tol=2e-2)
    assert o.dtype == jnp.bfloat16


def test_deterministic():
    problem = Problem(1, 33, 2, 24, 40, runs=True)
    args = problem.arrays(seed=3)
    config = dataclasses.replace(TILE, num_sequence_pieces=2)
    first = pallas_fleet_impl(*args, scale=0.5, config=config)
    second = pallas_fleet_impl(*args, scale=0.5, config=config)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradients_are_those_of_the_implementation_its_record_names():
    """The record's backward_of holds: every gradient is implementation="pallas"'s, bit for bit (the shared
    table checks pallas_fleet's gradients in pallas's rows only)."""
    import fleetjax
    assert fleetjax.IMPLEMENTATIONS["pallas_fleet"].backward_of == "pallas"
    problem = Problem(2, 37, 2, 6, 20, runs=True)
    q, k, v, log_decay, _, state, _ = problem.arrays(seed=3)
    segments = jnp.asarray(np.repeat(np.arange(3), [10, 20, 7])[None].repeat(2, 0))
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    log_gate = -jax.nn.softplus(jax.random.normal(keys[0], (2, 37, 2)))
    d_o, d_final = jax.random.normal(keys[1], v.shape), jax.random.normal(keys[2], state.shape)

    def grads(implementation):  # the same cotangents for both (a loss linear in o and the final state)
        def loss(q, k, v, decay, state, log_gate):
            o, final = fleetjax.fleet_attention(q, k, v, decay, initial_state=state, log_gate=log_gate,
                                                segment_ids=segments, return_final_state=True,
                                                implementation=implementation)
            return jnp.sum(o * d_o) + jnp.sum(final * d_final)
        return jax.grad(loss, argnums=tuple(range(6)))(q, k, v, jnp.exp(log_decay), state, log_gate)

    for got, want in zip(grads("pallas_fleet"), grads("pallas")):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_api_dispatch_and_default_config():
    import fleetjax
    problem = Problem(1, 9, 2, 5, 7, initial_state=False)
    q, k, v, log_decay, *_ = problem.arrays()
    config = default_config(q, v)
    assert isinstance(config, FleetConfig)
    decay = jnp.exp(log_decay)
    got = fleetjax.fleet_attention(q, k, v, decay, scale=0.5, implementation="pallas_fleet")
    want = fleetjax.fleet_attention(q, k, v, decay, scale=0.5, implementation="scan")
    assert _relative_error(got, want) < 1e-5


@pytest.mark.parametrize("kwargs", [
    dict(block_k=8), dict(block_k=24), dict(block_v=48), dict(block_v=0), dict(tokens_per_step=8),
    dict(tokens_per_step=24), dict(num_sequence_pieces=0), dict(num_warps=3), dict(num_warps=64),
    dict(num_stages=0), dict(block_k=256, block_v=128), dict(block_v=32.0),
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="FleetConfig"):
        FleetConfig(**kwargs)


def test_config_that_cannot_fit_the_shape():
    problem = Problem(1, 4, 1, 200, 200, initial_state=False)  # K padded to 256: 256 x 128 state tile
    with pytest.raises(ValueError, match="block_k"):
        pallas_fleet_impl(*problem.arrays(), scale=1.0, config=FleetConfig(block_v=128))


@pytest.mark.parametrize("B, T", [(0, 64), (2, 0)])
def test_gpu_default_configs_of_empty_inputs(monkeypatch, B, T):
    """The GPU heuristics of both Pallas kernels accept an empty batch or sequence (pallas_fleet's once divided
    by its zero program count there: seen on an H100)."""
    from fleetjax.pallas import chunked as pallas_chunked
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((B, T, 2, 16), jnp.bfloat16)
    assert isinstance(default_config(q, q), FleetConfig)
    assert isinstance(pallas_chunked.default_config(q, q), pallas_chunked.PallasConfig)
