"""fleetjax: exponentially decaying causal linear attention (retention) for JAX."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["fleet_attention", "decode_step", "reference", "IMPLEMENTATIONS", "default_implementation"]
# 0.2: scale=None is K^-1/2 and the layers take (num_heads, in_features) (README, "Conventions").
__version__ = "0.2.0"

if TYPE_CHECKING:
    from fleetjax import reference
    from fleetjax.api import IMPLEMENTATIONS, decode_step, default_implementation, fleet_attention


def __getattr__(name: str) -> Any:
    # The op's names load JAX on first use, not at ``import fleetjax``: the command line (fleetjax.cli) builds
    # its parser and answers --help without JAX. Read at each access, so fleetjax.IMPLEMENTATIONS is always
    # fleetjax.api's.
    if name == "reference":
        return importlib.import_module("fleetjax.reference")
    if name in __all__:
        return getattr(importlib.import_module("fleetjax.api"), name)
    raise AttributeError(f"module 'fleetjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
