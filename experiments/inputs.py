"""What a benchmark runs on: its shapes (:class:`Case`), the decays, the per-token gates and the random inputs."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: q, k [B, T, H, K], v [B, T, H, V] in ``dtype`` (one of DTYPES); ``gated``: the
    case also carries a per-token log gate [B, T, H] (:func:`make_inputs`) and no per-head decay."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str
    gated: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"Case.dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        for name in ("B", "T", "H", "K", "V"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Case.{name} must be a positive int, got {getattr(self, name)!r}")

    @property
    def label(self) -> str:
        return f"{self.dtype} B{self.B} H{self.H} T{self.T} K{self.K} V{self.V}" + (" gated" if self.gated else "")

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.B, self.T, self.H, self.K, self.V)

    def fields(self) -> dict[str, Any]:
        """The record's case fields; "gated" only when set, so that records of ungated runs stay as before."""
        out: dict[str, Any] = {"dtype": self.dtype, "B": self.B, "T": self.T, "H": self.H, "K": self.K,
                               "V": self.V}
        if self.gated:
            out["gated"] = True
        return out


# The results file's "decays" in gated mode: the per-token gate alone, as fla's ``g=`` (no g_gamma).
GATED_DECAYS = "none: per-token log_gate [B, T, H] float32 = logsigmoid(N(0, 1)) / 16, no per-head decay"
RETNET_DECAYS = "RetNet: 1 - 2^(-5 - h) for head h"


def retnet_log_decay(H: int) -> np.ndarray:
    """log of RetNet's per-head decays, 1 - 2^(-5 - h) for h = 0..H-1 (from 0.969 towards 1), float32 [H]."""
    return np.log1p(-np.exp2(-5.0 - np.arange(H, dtype=np.float64))).astype(np.float32)


def make_inputs(case: Case, seed: int, *, with_do: bool = True) -> dict[str, Any]:
    """q, k ~ N(0, 1/K) (so q . k stays O(1)), v, dO ~ N(0, 1), drawn in float32 on the default device and
    cast to the case's dtype; for a gated case also log_gate [B, T, H] float32 = logsigmoid(N(0, 1)) / 16
    (GLA's normalization, gates close to 1, as fla's tests draw ``g``). Returns JAX arrays {"q", "k", "v"[,
    "do"][, "log_gate"]} in [B, T, H, D]."""
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(case.dtype)
    root = jax.random.PRNGKey(seed)
    kq, kk, kv, kd = jax.random.split(root, 4)
    kg = jax.random.fold_in(root, 4)  # a key of its own: q, k, v and dO stay the ungated cases' draws
    qk_shape, v_shape = (case.B, case.T, case.H, case.K), (case.B, case.T, case.H, case.V)

    @jax.jit
    def draw(kq, kk, kv, kd, kg):
        scale = case.K ** -0.5
        out = {"q": (jax.random.normal(kq, qk_shape, jnp.float32) * scale).astype(dtype),
               "k": (jax.random.normal(kk, qk_shape, jnp.float32) * scale).astype(dtype),
               "v": jax.random.normal(kv, v_shape, jnp.float32).astype(dtype)}
        if with_do:
            out["do"] = jax.random.normal(kd, v_shape, jnp.float32).astype(dtype)
        if case.gated:
            out["log_gate"] = jax.nn.log_sigmoid(jax.random.normal(kg, qk_shape[:3], jnp.float32)) / 16
        return out

    return jax.block_until_ready(draw(kq, kk, kv, kd, kg))


def with_walk_fields(config, fields: str):
    """``config`` (a fleetjax PallasConfig) with fields changed, ``fields`` a JSON object such as
    '{"gate_sums": false}': fields of its Mosaic walks (MosaicWalkConfig), or of the PallasConfig itself (such
    as gate_grad_kernel; the two share no name): the variants of one checkout that experiments/cost_split.py,
    profile_pallas.py and xla_kernels.py take as ``--walks``. ValueError with the option's message: the config
    has no Mosaic walks (not an sm_90 GPU's default), the text is not JSON, or a config refuses a field or
    value (quoted)."""
    if config.mosaic_walks is None:
        raise ValueError("--walks: the default config has no Mosaic walks here (not an sm_90 GPU?)")
    try:
        walks = json.loads(fields)
        own = {name: walks.pop(name) for name in list(walks)
               if name != "mosaic_walks" and name in {f.name for f in dataclasses.fields(config)}}
        return dataclasses.replace(config, mosaic_walks=dataclasses.replace(config.mosaic_walks, **walks), **own)
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"--walks {fields!r}: {error}") from error
