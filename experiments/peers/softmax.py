"""Causal softmax attention, ``jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")``
in [B, T, N, H]: a different operator, timed as what a user would otherwise pick (no error recorded)."""

from __future__ import annotations

import functools

import numpy as np

from experiments.inputs import Case
from experiments.peers.base import Bound, Impl, jax_bound, with_vjp


class SoftmaxImpl(Impl):
    """Causal softmax attention through jax.nn.dot_product_attention: what a user would otherwise pick."""

    framework = "jax"
    decay_grad = False

    def __init__(self, implementation: str | None):
        self.implementation = implementation
        self.name = f"softmax.{implementation or 'xla'}"

    def unavailable(self) -> str | None:
        import jax
        if self.implementation == "cudnn" and jax.default_backend() != "gpu":
            return f"cuDNN attention needs a GPU (jax backend is {jax.default_backend()})"
        return None

    def skip_reason(self, case: Case, op: str) -> str | None:
        if self.implementation == "cudnn" and case.dtype == "float32":
            return "cuDNN attention takes float16/bfloat16 only"
        if case.K != case.V:
            return "dot_product_attention needs K == V"
        return super().skip_reason(case, op)

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import jax
        attend = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                   implementation=self.implementation)
        return jax_bound(attend, with_vjp(attend), op, grads=("dq", "dk", "dv"),
                         notes="different operator: no error recorded", errors=False)
