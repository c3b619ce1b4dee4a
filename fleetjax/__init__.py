"""fleetjax: exponentially decaying causal linear attention (retention) for JAX."""

from fleetjax import reference
from fleetjax.api import IMPLEMENTATIONS, decode_step, default_implementation, fleet_attention

__all__ = ["fleet_attention", "decode_step", "reference", "IMPLEMENTATIONS", "default_implementation"]
__version__ = "0.1.0"
