"""The measured device copy bandwidth and the HBM floor derived from it: the least time an op can take
when it only moves the bytes it must."""

from __future__ import annotations

import statistics

from experiments.timing import jax_sync, time_calls


def copy_bandwidth(mib: int = 1024) -> dict[str, float | None]:
    """Device copy bandwidth in GB/s (bytes read + written per second), measured now on this device.

    jax: ``x + 1`` over a float32 array of ``mib`` MiB (XLA cannot elide it); torch: ``dst.copy_(src)``
    timed with CUDA events, when torch sees a GPU. Medians of 20 runs.
    """
    import jax
    import jax.numpy as jnp
    out: dict[str, float | None] = {"copy_mib": float(mib), "jax_gbps": None, "torch_gbps": None}
    n = mib * 2 ** 20 // 4
    xs = [jnp.full((n,), float(i), jnp.float32) for i in range(2)]
    add_one = jax.jit(lambda x: x + 1.0)
    timing = time_calls(add_one, [(x,) for x in xs], jax_sync, target_s=0.2, min_samples=10, max_samples=20,
                        sample_floor_s=0.0)
    out["jax_gbps"] = 2 * n * 4 / (timing.ms * 1e-3) / 1e9
    del xs
    try:
        import torch
        if torch.cuda.is_available():
            src = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
            dst = torch.empty_like(src)
            times = []
            for i in range(23):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            out["torch_gbps"] = 2 * n * 4 / (statistics.median(times) * 1e-3) / 1e9
            del src, dst
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - torch absent: the JAX number stands alone
        pass
    values = [v for k, v in out.items() if k.endswith("_gbps") and v]
    out["gbps"] = max(values)  # the faster copy makes the lower, safer floor
    return out


def hbm_bytes(op: str, B: int, T: int, H: int, K: int, V: int, itemsize: int, *, gated: bool = False) -> int:
    """Bytes that must move: fwd reads q, k, v and writes o; fwd_bwd also reads dO and writes dq, dk, dv;
    ``gated``: the float32 log gate [B, T, H] read too (fwd_bwd: and its gradient written).
    Python integers: exact at any size (B1 H16 T=131072 K=V=128 bfloat16 moves 2 GiB forward)."""
    per_position = {"fwd": 2 * K + V + V, "fwd_bwd": 2 * K + V + V + V + 2 * K + V}
    if op not in per_position:
        raise ValueError(f"op must be 'fwd' or 'fwd_bwd', got {op!r}")
    gate = (4 if op == "fwd" else 8) if gated else 0
    return B * T * H * (per_position[op] * itemsize + gate)


def hbm_floor_ms(op: str, B: int, T: int, H: int, K: int, V: int, itemsize: int, gbps: float, *,
                 gated: bool = False) -> float:
    """Milliseconds to move hbm_bytes at the measured copy bandwidth (GB/s)."""
    return hbm_bytes(op, B, T, H, K, V, itemsize, gated=gated) / (gbps * 1e9) * 1e3
