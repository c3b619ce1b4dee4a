"""What the torch peers share: the device they run on, tensor conversion to and from JAX, and
:class:`TorchImpl`, which binds a peer's forward function to a case."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import numpy as np

from experiments.inputs import Case
from experiments.peers.base import Bound, Impl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def torch_device() -> tuple[str | None, str | None]:
    """("cuda", None) with a GPU; ("cpu", None) under TRITON_INTERPRET=1 (Triton's CPU interpreter, for
    checking call conventions here); else (None, reason)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return None, f"import torch failed: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        return "cuda", None
    if _interpreting():
        _interpreter_single_config()
        return "cpu", None
    return None, "needs CUDA: torch sees no GPU (TRITON_INTERPRET=1 runs the Triton kernels on the CPU)"


def _interpreter_single_config() -> None:
    """Under Triton's interpreter there is no GPU to benchmark autotuning candidates on: keep each
    autotuned kernel's first configuration. Used only when TRITON_INTERPRET=1 (CPU checks)."""
    import triton.runtime.autotuner as autotuner
    if getattr(autotuner.Autotuner, "_fleetjax_single_config", False):
        return
    original = autotuner.Autotuner.__init__

    def __init__(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, list(configs)[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = __init__
    autotuner.Autotuner._fleetjax_single_config = True


def to_torch(x: Any, device: str) -> Any:
    """A JAX array as a torch tensor of the same dtype on ``device`` (its own copy). DLPack when it works,
    else through float32 numpy (exact for bfloat16 and float16)."""
    import jax
    import torch
    jax.block_until_ready(x)
    try:
        t = torch.from_dlpack(x)
        if str(t.device).split(":")[0] != device.split(":")[0]:
            raise RuntimeError("dlpack gave a tensor on another device")
        return t.clone()
    except Exception:  # noqa: BLE001 - any DLPack refusal falls back to the host copy
        dtype = getattr(torch, str(x.dtype))
        return torch.from_numpy(np.asarray(x.astype("float32"))).to(device=device, dtype=dtype)


def to_jax(t: Any) -> Any:
    """A torch tensor as a JAX array (its own copy); DLPack when it works, else through float32 numpy."""
    import jax.numpy as jnp
    import torch
    t = t.detach()
    if t.is_cuda:
        torch.cuda.synchronize()
    try:
        import jax.dlpack
        return jnp.array(jax.dlpack.from_dlpack(t.contiguous()), copy=True)
    except Exception:  # noqa: BLE001
        return jnp.asarray(t.float().cpu().numpy())


def torch_tensor(values: np.ndarray, device: str) -> Any:
    """A float32 torch tensor of a small host array (a peer's per-head decay argument) on ``device``."""
    import torch
    return torch.tensor(np.asarray(values, np.float32), device=device)


class TorchImpl(Impl):
    """A torch peer: inputs converted once (not timed), fwd under no_grad, fwd_bwd through
    torch.autograd.grad with the same dO. Gated cases (a peer with ``gated = True``): the log gate [B, T, H]
    float32 is a fourth argument of the forward, and fwd_bwd returns its gradient as "dlog_gate"."""

    framework = "torch"

    def _import(self) -> tuple[Any, str | None]:
        raise NotImplementedError

    def unavailable(self) -> str | None:
        device, reason = torch_device()
        if device is None:
            return reason
        return self._import()[1]

    def _forward(self, case: Case, log_decay: np.ndarray, device: str) -> Callable:
        """fn(q, k, v) -> o (gated cases: fn(q, k, v, log_gate)), all in the peer's own layout."""
        raise NotImplementedError

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import torch
        device = torch_device()[0]
        forward = self._forward(case, log_decay, device)
        to_native = (lambda t: t) if self.input_layout == "BTHD" else (lambda t: t.transpose(1, 2).contiguous())
        from_native = (lambda t: t) if self.input_layout == "BTHD" else (lambda t: t.transpose(1, 2))
        # The differentiable inputs: q, k, v, and the log gate in gated cases ([B, T, H]: the same transpose
        # of axes 1 and 2 gives a head-first peer's [B, H, T]).
        names = ("q", "k", "v") + (("log_gate",) if case.gated else ())

        if op == "fwd":
            def prepare(x):
                return tuple(to_native(to_torch(x[n], device)) for n in names)

            def call(*args):
                with torch.no_grad():
                    return forward(*args)

            return Bound(prepare=prepare, call=call, unpack=lambda o: {"o": to_jax(from_native(o))},
                         framework="torch")

        def prepare(x):
            return (*(to_native(to_torch(x[n], device)).requires_grad_(True) for n in names),
                    to_native(to_torch(x["do"], device)))

        def call(*args):
            *inputs, do = args
            o = forward(*inputs)
            return (o,) + tuple(torch.autograd.grad(o, inputs, do))

        grads = ("o", "dq", "dk", "dv", "dlog_gate")[:len(names) + 1]

        def unpack(out):
            return {name: to_jax(from_native(t)) for name, t in zip(grads, out)}

        return Bound(prepare=prepare, call=call, unpack=unpack, framework="torch")
