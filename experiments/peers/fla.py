"""flash-linear-attention ("fla") 0.6.0: ``chunk_simple_gla`` / ``fused_recurrent_simple_gla(q, k, v,
g_gamma=log gamma [H] float32, scale=1.0)`` in [B, T, H, K]; they return (o, final_state), and the backward
returns no g_gamma gradient. Gated cases: ``g=log_gate`` [B, T, H] float32 in place of g_gamma; chunk's
backward returns dg, the log gate's gradient. Their first call per shape autotunes (minutes at head dims
above 128).

fla 0.6.0 refuses its gated chunk backward on Hopper with Triton >= 3.4 and < 3.7.1 (fla issue #640: that
Triton miscompiles ``chunk_bwd_dqkwg`` there). ``fla.chunk_unguarded`` times the same kernels with that
guard lifted, for the time alone: its relerr column says whether the gradients came out right."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Any

from experiments.accuracy import SCALE
from experiments.inputs import Case
from experiments.peers.torch_base import TorchImpl, torch_tensor


@functools.lru_cache(maxsize=None)
def _fla_ops() -> tuple[Any, str | None]:
    """fla.ops.simple_gla. fla/__init__ also imports its layers and models (transformers); if that part
    breaks, import the ops without running the package __init__ (the ops do not need it)."""
    try:
        return importlib.import_module("fla.ops.simple_gla"), None
    except Exception as first:  # noqa: BLE001
        spec = importlib.util.find_spec("fla") if "fla" not in sys.modules else None
        for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[name]
        spec = spec or importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            return None, f"import fla.ops.simple_gla failed: {type(first).__name__}: {first}"
        package = types.ModuleType("fla")
        package.__path__ = list(spec.submodule_search_locations)
        try:  # fla's modules read the package version
            package.__version__ = importlib.metadata.version("fla-core")
        except importlib.metadata.PackageNotFoundError:
            package.__version__ = "0.0.0"
        package.fleetjax_note = f"imported without fla/__init__, which failed: {type(first).__name__}: {first}"
        sys.modules["fla"] = package
        try:
            return importlib.import_module("fla.ops.simple_gla"), None
        except Exception as second:  # noqa: BLE001
            return None, (f"import fla.ops.simple_gla failed: {type(first).__name__}: {first}; without "
                          f"fla/__init__: {type(second).__name__}: {second}")


class FlaChunkImpl(TorchImpl):
    name = "fla.chunk"
    decay_grad = False
    gated = True
    gate_grad = True
    autotunes = True
    kernel = "chunk_simple_gla"

    def __init__(self, max_head_dim: int | None = None):
        self.max_head_dim = max_head_dim

    def _import(self):
        return _fla_ops()

    def skip_reason(self, case: Case, op: str) -> str | None:
        if self.max_head_dim is not None and max(case.K, case.V) > self.max_head_dim:
            return (f"skipped (--skip-slow-autotune): fla autotunes for minutes at head dim > "
                    f"{self.max_head_dim}")
        return super().skip_reason(case, op)

    def _forward(self, case, log_decay, device):
        kernel = getattr(self._import()[0], self.kernel)
        if case.gated:  # the per-token gate alone, as fleetjax's log_gate with decay None
            return lambda q, k, v, g: kernel(q, k, v, g=g, scale=SCALE)[0]
        g_gamma = torch_tensor(log_decay, device)
        return lambda q, k, v: kernel(q, k, v, g_gamma=g_gamma, scale=SCALE)[0]


class FlaRecurrentImpl(FlaChunkImpl):
    name = "fla.fused_recurrent"
    ops = ("fwd",)
    kernel = "fused_recurrent_simple_gla"


class FlaChunkUnguardedImpl(FlaChunkImpl):
    """fla.chunk with the Triton-version guard of its gated backward lifted (see the module docstring)."""
    name = "fla.chunk_unguarded"
    by_name_only = True

    def _import(self):
        ops, reason = _fla_ops()
        if ops is not None:
            chunk_o = importlib.import_module("fla.ops.common.chunk_o")
            chunk_o.TRITON_ABOVE_3_7_1 = True  # the module-level flag its guard reads at each call
        return ops, reason
