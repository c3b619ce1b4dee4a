"""Process environment that the benchmarks set before jax is imported."""

from __future__ import annotations

import os


def prepare_devices(smoke_devices: int = 0) -> None:
    """Call before jax is imported. Keeps NVLink multicast off, as the device machines require (set, never
    unset); with ``smoke_devices`` > 0, runs on that many fake CPU devices instead of the accelerators."""
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                        ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(name, value)
    if smoke_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={smoke_devices}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"


def setup_jax_environment() -> None:
    """Environment that must be set before jax is imported when JAX and torch share one GPU.

    JAX preallocates 75% of GPU memory by default, which would leave torch's peers too little; without
    preallocation JAX grows its pool as needed. The Pallas Triton deprecation warning (jax >= 0.11) is
    filtered by its message only, so that every other deprecation still shows.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import warnings
    warnings.filterwarnings("ignore", message=".*Pallas Triton.*", category=DeprecationWarning)
