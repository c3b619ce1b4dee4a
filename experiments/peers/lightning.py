"""Lightning Attention-2 (lightning-attn 0.0.5): ``lightning_attn2(q, k, v, s)`` in [B, H, T, D] contiguous,
s = -log gamma [H] float32, no scale argument (scale 1); no gradient for s. Its kernel holds the whole head
dim in one block, so head dims above 128 go through ``lightning_attn_func``, which splits q and k into
64-wide slices and sums (exact for linear attention)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from experiments.inputs import Case
from experiments.peers.torch_base import TorchImpl, torch_tensor


@functools.lru_cache(maxsize=None)
def _lightning() -> tuple[Any, str | None]:
    try:
        from lightning_attn.ops import lightning_attn_func
        from lightning_attn.ops.triton.lightning_attn2 import lightning_attn2
        return (lightning_attn2, lightning_attn_func), None
    except Exception as e:  # noqa: BLE001
        return None, f"import lightning_attn failed: {type(e).__name__}: {e}"


class LightningImpl(TorchImpl):
    name = "lightning.attn2"
    decay_grad = False
    input_layout = "BHTD"

    def _import(self):
        return _lightning()

    def skip_reason(self, case: Case, op: str) -> str | None:
        for name, d in (("K", case.K), ("V", case.V)):
            if d & (d - 1) or d < 16:
                return f"its kernel needs a power-of-two head dim >= 16, got {name}={d}"
        return super().skip_reason(case, op)

    def _forward(self, case, log_decay, device):
        lightning_attn2, lightning_attn_func = self._import()[0]
        s = torch_tensor(-np.asarray(log_decay, np.float32), device)
        fn = lightning_attn2 if case.K <= 128 else lightning_attn_func
        return lambda q, k, v: fn(q, k, v, s)
