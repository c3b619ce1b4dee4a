"""Memory accounting of one call: the bytes of its arrays and its extra peak device memory (JAX and torch)."""

from __future__ import annotations

from typing import Any, Callable

MIB = 2.0 ** 20


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (JAX or torch) in a nested tuple/list/dict."""
    if tree is None:
        return 0
    if isinstance(tree, dict):
        return sum(tree_bytes(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return sum(tree_bytes(v) for v in tree)
    nbytes = getattr(tree, "nbytes", None)
    if nbytes is not None and not callable(nbytes):
        return int(nbytes)
    if hasattr(tree, "element_size") and hasattr(tree, "numel"):  # torch.Tensor
        return int(tree.element_size() * tree.numel())
    return 0


def xla_memory_mb(compiled: Any) -> dict[str, float] | None:
    """XLA's memory analysis of a compiled function in MiB (argument, output, temp, alias), or None where the
    backend does not report it."""
    try:
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        return {key: getattr(analysis, f"{key}_size_in_bytes") / MIB for key in ("argument", "output", "temp", "alias")}
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def jax_runtime_extra_peak_mb(call: Callable[..., Any], args: tuple) -> tuple[float | None, str]:
    """Peak GPU bytes above what was live before one call, less the call's outputs, from
    device.memory_stats(). JAX's peak counter cannot be reset, so the number is known only when this call
    sets a new process-wide peak; otherwise (None, reason)."""
    import jax
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None, "device.memory_stats() has no peak_bytes_in_use on this backend"
    before_peak, before_live = stats["peak_bytes_in_use"], stats["bytes_in_use"]
    out = call(*args)
    jax.block_until_ready(out)
    after_peak = dev.memory_stats()["peak_bytes_in_use"]
    out_bytes = tree_bytes(out)
    del out
    if after_peak <= before_peak:
        return None, "inconclusive: this call stayed below an earlier process-wide peak"
    return (after_peak - before_live - out_bytes) / MIB, "memory_stats peak delta"


def torch_extra_peak_mb(call: Callable[..., Any], args: tuple) -> tuple[float | None, float | None]:
    """(extra peak MiB = peak above the memory live before the call, less the outputs; output MiB) from
    torch.cuda.max_memory_allocated after reset_peak_memory_stats. (None, None) without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None, None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out_bytes = tree_bytes(out)
    del out
    return (peak - base - out_bytes) / MIB, out_bytes / MIB


def release_memory() -> None:
    """Free what the last measurement left: Python garbage, and torch's cached GPU blocks."""
    import gc
    import sys
    gc.collect()
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
