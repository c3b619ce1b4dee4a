"""A small driver for Nsight Compute: runs the "pallas" forward and forward+backward a few times at one shape.

    ncu --kernel-name regex:fleet --launch-count 4 --section SpeedOfLight ... \
        python -m experiments.profile_pallas --B 4 --T 16384 --H 16 --ops fwd_bwd

Prints the default PallasConfig it runs with (fleetjax.pallas.chunked.default_config: each kernel's tiling
and the piece counts) and the kernels' wall time per call, so that a profile's counters can be read
against both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.inputs import retnet_log_decay  # noqa: E402
from experiments.timing import jax_sync, time_calls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("B", 4), ("T", 16384), ("H", 16), ("K", 128), ("V", 128), ("calls", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ops", default="fwd,fwd_bwd", help="which of fwd, fwd_bwd to run, in this order")
    ap.add_argument("--fixed-decay", action="store_true",
                    help="fwd_bwd without the decay's (gated: the gate's) gradient; by default it is "
                    "differentiated")
    ap.add_argument("--gated", action="store_true",
                    help="a per-token log gate (logsigmoid(N(0, 1)) / 16) and no per-head decay, as the gated "
                    "benchmarks")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype) for _ in range(2))
    decay = None if args.gated else jnp.asarray(np.exp(retnet_log_decay(H)), jnp.float32)
    log_gate = (jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)) / 16
                if args.gated else None)
    record = fleetjax.IMPLEMENTATIONS["pallas"]
    print("config", record.config_for(None, q, v), "(Pallas interpret mode)" if record.interpreted() else "",
          flush=True)
    attend = lambda q, k, v, decay, log_gate: fleetjax.fleet_attention(  # noqa: E731
        q, k, v, decay, log_gate=log_gate, implementation="pallas")
    fixed = lambda q, k, v: attend(q, k, v, decay, log_gate)  # noqa: E731
    if args.gated:
        learned, wrt = (lambda q, k, v, g: attend(q, k, v, None, g)), (log_gate,)
    else:
        learned, wrt = (lambda q, k, v, d: attend(q, k, v, d, None)), (decay,)
    if args.fixed_decay:
        learned, wrt = fixed, ()
    pullback = lambda q, k, v: jax.vjp(learned, q, k, v, *wrt)[1]  # noqa: E731
    fwd = jax.jit(fixed)
    fwd_bwd = jax.jit(lambda q, k, v, do: pullback(q, k, v)(do))
    runs = {"fwd": (fwd, (q, k, v)), "fwd_bwd": (fwd_bwd, (q, k, v, do))}
    for name in args.ops.split(","):
        fn, xs = runs[name]
        for _ in range(args.calls):
            jax.block_until_ready(fn(*xs))
        print(name, time_calls(fn, [xs], jax_sync, target_s=0.1).ms, "ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
