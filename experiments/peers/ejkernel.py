"""ejkernel 0.0.80.3's Triton recurrent kernel, the JAX peer (one position at a time, state on chip):
``ejkernel.kernels._triton.recurrent.recurrent(q, k, v, g_gamma=log gamma, softmax_scale=1.0)`` in
[B, T, H, D]. The kernel reads g_gamma[i_h], so a [H] vector is right (its annotation says "... num_heads");
g_gamma is a non-differentiable argument (no decay gradient)."""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from experiments.accuracy import SCALE
from experiments.inputs import Case
from experiments.peers.base import Bound, Impl, jax_bound, with_vjp

_JAX_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_entry_size_bytes",
                      "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_enable_xla_caches")


@functools.lru_cache(maxsize=None)
def _ejkernel_recurrent() -> tuple[Callable | None, str | None]:
    """ejkernel's recurrent. Importing ejkernel turns on JAX's persistent compilation cache for the whole
    process (its ejit decorator sets jax_compilation_cache_dir at import); the options are put back so
    that fleetjax's compile times and compile counts mean the same before and after the import."""
    import jax
    saved = {name: getattr(jax.config, name) for name in _JAX_CACHE_OPTIONS if hasattr(jax.config, name)}
    try:
        from ejkernel.kernels._triton.recurrent import recurrent
        return recurrent, None
    except Exception as e:  # noqa: BLE001 - recorded as the skip reason
        return None, f"import ejkernel.kernels._triton.recurrent failed: {type(e).__name__}: {e}"
    finally:
        for name, value in saved.items():
            if getattr(jax.config, name) != value:
                jax.config.update(name, value)


class EjkernelImpl(Impl):
    """ejkernel's Triton recurrent kernel, the JAX peer (one position at a time, state on chip)."""

    name = "ejkernel.recurrent"
    framework = "jax"
    decay_grad = False

    def unavailable(self) -> str | None:
        return _ejkernel_recurrent()[1]

    def _fns(self, log_decay: np.ndarray) -> tuple[Callable, Callable]:
        import jax.numpy as jnp
        recurrent = _ejkernel_recurrent()[0]
        # A closed-over constant, not a traced argument: g_gamma is one of the custom VJP's
        # non-differentiable arguments, which must not be tracers.
        g_gamma = jnp.asarray(log_decay, jnp.float32)

        def fwd(q, k, v):
            return recurrent(q, k, v, g_gamma=g_gamma, softmax_scale=SCALE)[0]

        return fwd, with_vjp(fwd)

    def skip_reason(self, case: Case, op: str) -> str | None:
        import jax
        reason = super().skip_reason(case, op)
        if reason is None and jax.default_backend() != "gpu":
            # Still check the call convention (shapes, dtypes, argument names) without running the kernel.
            from jax import ShapeDtypeStruct as S
            fwd, fwd_bwd = self._fns(np.zeros(case.H, np.float32))
            dt = jax.numpy.dtype(case.dtype)
            qk, v = S((case.B, case.T, case.H, case.K), dt), S((case.B, case.T, case.H, case.V), dt)
            shapes = jax.eval_shape(fwd, qk, qk, v) if op == "fwd" else jax.eval_shape(fwd_bwd, qk, qk, v, v)
            return (f"its Triton kernels need a GPU (jax backend is {jax.default_backend()}); the call "
                    f"traced with jax.eval_shape to {jax.tree_util.tree_map(lambda s: s.shape, shapes)}")
        return reason

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        fwd, fwd_bwd = self._fns(log_decay)
        return jax_bound(fwd, fwd_bwd, op, grads=("dq", "dk", "dv"))
