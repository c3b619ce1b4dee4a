"""What a benchmark runs on: its shapes (:class:`Case`), the decays and the random inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: q, k [B, T, H, K], v [B, T, H, V] in ``dtype`` (one of DTYPES)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"Case.dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        for name in ("B", "T", "H", "K", "V"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Case.{name} must be a positive int, got {getattr(self, name)!r}")

    @property
    def label(self) -> str:
        return f"{self.dtype} B{self.B} H{self.H} T{self.T} K{self.K} V{self.V}"

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.B, self.T, self.H, self.K, self.V)

    def fields(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "B": self.B, "T": self.T, "H": self.H, "K": self.K, "V": self.V}


def retnet_log_decay(H: int) -> np.ndarray:
    """log of RetNet's per-head decays, 1 - 2^(-5 - h) for h = 0..H-1 (from 0.969 towards 1), float32 [H]."""
    return np.log1p(-np.exp2(-5.0 - np.arange(H, dtype=np.float64))).astype(np.float32)


def make_inputs(case: Case, seed: int, *, with_do: bool = True) -> dict[str, Any]:
    """q, k ~ N(0, 1/K) (so q . k stays O(1)), v, dO ~ N(0, 1), drawn in float32 on the default device and
    cast to the case's dtype. Returns JAX arrays {"q", "k", "v"[, "do"]} in [B, T, H, D]."""
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(case.dtype)
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    qk_shape, v_shape = (case.B, case.T, case.H, case.K), (case.B, case.T, case.H, case.V)

    @jax.jit
    def draw(kq, kk, kv, kd):
        scale = case.K ** -0.5
        out = {"q": (jax.random.normal(kq, qk_shape, jnp.float32) * scale).astype(dtype),
               "k": (jax.random.normal(kk, qk_shape, jnp.float32) * scale).astype(dtype),
               "v": jax.random.normal(kv, v_shape, jnp.float32).astype(dtype)}
        if with_do:
            out["do"] = jax.random.normal(kd, v_shape, jnp.float32).astype(dtype)
        return out

    return jax.block_until_ready(draw(kq, kk, kv, kd))
