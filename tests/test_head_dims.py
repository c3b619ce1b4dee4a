"""Every head dim and layout the GPU kernels must take with their default configs: head dims
{64, 100, 128, 130, 200, 256} x {K = V, V = 2K, K = 2V} x {bfloat16, float16, float32}, forward and
forward+backward, against the float64 oracle.

The default config of a Pallas kernel is chosen from its shared-memory footprint and the device's limit
(fleetjax.pallas.launch); a config that does not fit crashes only when the GPU compiles it, so this grid runs
where the Pallas kernels run compiled (a GPU). In CPU interpret mode the kernels take no shared memory and
the shared test table (tests/test_op.py) already covers these head dims on small shapes: skipped there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fleetjax
import oracle
from test_op import DECAY_GRAD_TOLERANCE, STATE_TOLERANCE, TOLERANCE

DIMS = (64, 100, 128, 130, 200, 256)
LAYOUTS = {"K=V": lambda d: (d, d), "V=2K": lambda d: (d, 2 * d), "K=2V": lambda d: (2 * d, d)}
DTYPES = ("bfloat16", "float16", "float32")
COMPILED_KERNELS = sorted(name for name, impl in fleetjax.IMPLEMENTATIONS.items()
                          if impl.interpret and impl.runs_compiled())


def _grid():
    for name in COMPILED_KERNELS or ["(no compiled Pallas kernel on this backend)"]:
        for dim in DIMS:
            for layout in LAYOUTS:
                for dtype in DTYPES:
                    yield pytest.param(name, dim, layout, dtype, id=f"{name}-{layout}-{dim}-{dtype}")


def _tolerance(dtype: str) -> float:
    # The Pallas kernels' float32 products on a GPU are tf32x3 (about 22 bits): see tests/test_op.py.
    return 3e-5 if dtype == "float32" else TOLERANCE[dtype]


@pytest.mark.parametrize("implementation, dim, layout, dtype", list(_grid()))
def test_default_config_runs_and_matches_the_oracle(implementation, dim, layout, dtype):
    if implementation not in fleetjax.IMPLEMENTATIONS:
        pytest.skip("no Pallas kernel runs compiled here (CPU: interpret mode, covered by tests/test_op.py)")
    K, V = LAYOUTS[layout](dim)
    B, T, H = 1, 150, 2
    rng = np.random.default_rng(dim + K + V)
    dt = jnp.dtype(dtype)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), dt) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dt) for _ in range(2))
    s0, d_final = (jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32) for _ in range(2))
    decay = jnp.asarray([0.99, 0.7], jnp.float32)

    def f(q, k, v, decay, s0):
        return fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, return_final_state=True,
                                        implementation=implementation)

    (o, final), pullback = jax.vjp(jax.jit(f), q, k, v, decay, s0)
    dq, dk, dv, d_decay, d_s0 = pullback((do, d_final))
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    args = dict(initial_state=as64(s0))
    ref_o, ref_final = oracle.forward(as64(q), as64(k), as64(v), as64(decay), **args)
    ref = oracle.gradients(as64(q), as64(k), as64(v), as64(decay), do=as64(do), d_final=as64(d_final), **args)
    tol = _tolerance(dtype)
    state_tol = max(tol, STATE_TOLERANCE) if dtype == "float32" else STATE_TOLERANCE
    decay_tol = max(tol, DECAY_GRAD_TOLERANCE["float32"]) if dtype == "float32" else DECAY_GRAD_TOLERANCE[dtype]
    errors = {"o": (oracle.rel_err(o, ref_o, 2), tol), "final": (oracle.rel_err(final, ref_final, 1), state_tol),
              "dq": (oracle.rel_err(dq, ref["q"], 2), tol), "dk": (oracle.rel_err(dk, ref["k"], 2), tol),
              "dv": (oracle.rel_err(dv, ref["v"], 2), tol),
              "d_initial_state": (oracle.rel_err(d_s0, ref["initial_state"], 1), state_tol),
              "d_decay": (oracle.rel_err(d_decay, ref["decay"], 0), decay_tol)}
    bad = {name: err for name, (err, limit) in errors.items() if not err <= limit}
    assert not bad, f"above tolerance: {bad} (all: {errors})"
