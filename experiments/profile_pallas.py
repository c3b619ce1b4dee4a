"""A small driver for Nsight Compute: runs the "pallas" forward and forward+backward a few times at one shape.

    ncu --kernel-name regex:fleet --launch-count 4 --section SpeedOfLight ... \
        python -m experiments.profile_pallas --B 4 --T 16384 --H 16 --ops fwd_bwd

Prints the kernels' wall time per call too, so that a profile's counters can be read against it.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fleetjax
from experiments import benchlib


def main(argv=None):
    ap = argparse.ArgumentParser()
    for name, default in (("B", 4), ("T", 16384), ("H", 16), ("K", 128), ("V", 128), ("calls", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ops", default="fwd,fwd_bwd", help="which of fwd, fwd_bwd to run, in this order")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype) for _ in range(2))
    decay = jnp.asarray(np.exp(benchlib.retnet_log_decay(H)), jnp.float32)
    attend = lambda q, k, v: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas")
    fwd = jax.jit(attend)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    runs = {"fwd": (fwd, (q, k, v)), "fwd_bwd": (fwd_bwd, (q, k, v, do))}
    for name in args.ops.split(","):
        fn, xs = runs[name]
        for _ in range(args.calls):
            jax.block_until_ready(fn(*xs))
        print(name, benchlib.time_calls(fn, [xs], benchlib.jax_sync, target_s=0.1).ms, "ms", flush=True)


if __name__ == "__main__":
    main()
