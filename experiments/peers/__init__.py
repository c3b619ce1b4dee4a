"""Every implementation the benchmarks time, behind one interface (:class:`Impl`, bound to a case as a
:class:`Bound`; see experiments/peers/base.py), one module per peer:

  - fleetjax.py: fleetjax's own implementations, read from their records in fleetjax.IMPLEMENTATIONS;
  - softmax.py: causal softmax attention through cuDNN (a different operator, no error recorded);
  - ejkernel.py: ejkernel's Triton recurrent kernel (JAX);
  - fla.py, lightning.py, leetdecoding.py: the torch peers (torch_base.py: their device, tensor conversion
    and the shared binding).

Each module's docstring gives the peer's calling convention, read from its source. Scale 1 everywhere; the
decay gamma in (0, 1] per head. The module names are the peers' own; their imports of the peers' packages
are absolute, so ``experiments.peers.fla`` and ``fla`` do not mix.

Run ``python -m experiments.peers`` for a report of which peers import here and why the others do not.
"""

from __future__ import annotations

from experiments.peers.base import Bound, Impl
from experiments.peers.ejkernel import EjkernelImpl
from experiments.peers.fla import FlaChunkImpl, FlaChunkUnguardedImpl, FlaRecurrentImpl
from experiments.peers.fleetjax import FleetjaxImpl
from experiments.peers.leetdecoding import LeetImpl
from experiments.peers.lightning import LightningImpl
from experiments.peers.softmax import SoftmaxImpl

__all__ = ["Bound", "Impl", "forward_impls", "backward_impls", "availability"]

# The reference implementation that walks one position at a time: timed only up to this length.
SCAN_MAX_T = 4096


def forward_impls(*, smoke: bool = False, skip_slow_autotune: bool = False) -> list[Impl]:
    """The forward benchmark's implementations; fla's kernels (their first call per shape autotunes) last."""
    max_head_dim = 128 if skip_slow_autotune else None
    return [FleetjaxImpl("pallas"), FleetjaxImpl("pallas", walks="triton"),
            FleetjaxImpl("pallas", walks="triton_gated"), FleetjaxImpl("pallas_fleet"),
            FleetjaxImpl("xla"),
            FleetjaxImpl("scan", max_T=SCAN_MAX_T), SoftmaxImpl(None if smoke else "cudnn"),
            LightningImpl(), EjkernelImpl(), LeetImpl(),
            FlaChunkImpl(max_head_dim=max_head_dim), FlaRecurrentImpl(max_head_dim=max_head_dim)]


def backward_impls(*, smoke: bool = False, skip_slow_autotune: bool = False) -> list[Impl]:
    """The forward+backward benchmark's implementations, fla last (``fla.chunk_unguarded``: its gated backward
    where its own Triton-version guard refuses it, selected by name only). ``fleetjax.pallas.fixed_decay``:
    the same op with the decay not learned, as fla's (no decay gradient)."""
    return [FleetjaxImpl("pallas"), FleetjaxImpl("pallas", learn_decay=False), FleetjaxImpl("pallas", walks="triton"),
            FleetjaxImpl("pallas", walks="triton_sums"), FleetjaxImpl("pallas", walks="triton_gated"),
            FleetjaxImpl("pallas", learn_decay=False, walks="triton"),
            FleetjaxImpl("pallas_fleet"), FleetjaxImpl("xla"),
            SoftmaxImpl(None if smoke else "cudnn"), LightningImpl(), EjkernelImpl(),
            FlaChunkImpl(max_head_dim=128 if skip_slow_autotune else None),
            FlaChunkUnguardedImpl(max_head_dim=128 if skip_slow_autotune else None)]


def availability() -> dict[str, str]:
    """Every implementation's name -> "ok" where it is usable here, else why not."""
    seen: dict[str, Impl] = {}
    for impl in forward_impls() + backward_impls():
        seen.setdefault(impl.name, impl)
    return {name: impl.unavailable() or "ok" for name, impl in seen.items()}
