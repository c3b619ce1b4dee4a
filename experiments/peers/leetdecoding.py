"""LeetDecoding 0.0.3: ``FleetAttention_triton(q, k, v, gamma)`` in [B, H, T, D], gamma = decay [H] (not its
log), no scale; needs D % 32 == 0; forward only. Its rank blocks add into the output with unsynchronized
load/store, so its error is recorded, not assumed. The kernel file is not packaged as an importable module:
it is loaded from .peers/FleetAttention_triton.py (extracted from the leetdecoding sdist)."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np

from experiments.inputs import Case
from experiments.peers.torch_base import TorchImpl, torch_tensor
from experiments.records import REPO_ROOT

LEET_FILE = REPO_ROOT / ".peers" / "FleetAttention_triton.py"


@functools.lru_cache(maxsize=None)
def _leet() -> tuple[Any, str | None]:
    if not LEET_FILE.exists():
        return None, f"{LEET_FILE.relative_to(REPO_ROOT)} is missing (extract it from the leetdecoding sdist)"
    try:
        spec = importlib.util.spec_from_file_location("leetdecoding_fleet_attention_triton", LEET_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.FleetAttention_triton, None
    except Exception as e:  # noqa: BLE001
        return None, f"loading {LEET_FILE.name} failed: {type(e).__name__}: {e}"


class LeetImpl(TorchImpl):
    name = "leetdecoding.fleet"
    ops = ("fwd",)
    decay_grad = False
    input_layout = "BHTD"

    def __init__(self, max_T: int | None = None):
        self.max_T = max_T

    def _import(self):
        return _leet()

    def skip_reason(self, case: Case, op: str) -> str | None:
        if case.V % 32:
            return f"its kernel tiles V by 32 and needs V % 32 == 0, got V={case.V}"
        if self.max_T is not None and case.T > self.max_T:
            return f"timed at T <= {self.max_T} only (one position per step, seconds per call beyond)"
        return super().skip_reason(case, op)

    def _forward(self, case, log_decay, device):
        fleet = self._import()[0]
        gamma = torch_tensor(np.exp(np.asarray(log_decay, np.float64)).astype(np.float32), device)
        return lambda q, k, v: fleet(q, k, v, gamma)
