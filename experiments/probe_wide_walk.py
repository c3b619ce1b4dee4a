"""Probe: the package's Mosaic walk (fleetjax.pallas.mosaic.walk) with two compute warpgroups a program
(``MosaicWalkConfig.warpgroups=2``: each its own value block, sharing the chunk's q and k tiles, a third
warpgroup issuing the copies) against one warpgroup a program, alone, outside the op.

    PYTHONPATH=. python -m experiments.probe_wide_walk [--shapes "4,16384,16,1;8,8192,16,1"] [--stages 2,3]
    PYTHONPATH=. python -m experiments.probe_wide_walk --lower     # any host: lower the walks for sm_90 only

Each shape B,T,H,P (K = V = 128, bf16, P sequence pieces entered from random states): the forward and the
reverse walk, with the constant decay and the gated one; prints whether the two-warpgroup walk's outputs and
final states are bitwise those of the one-warpgroup walk, and the times of both (experiments.timing.
time_calls, the benchmarks' method).

History (H200, 2026-12-03): a first stand-alone kernel of this layout (this file's earlier form) was
bitwise equal to the package's walk and, with the decay's factors carried, 0.313 against 0.466 ms at B8 H16
T=8192 (the SMs filled for both), 0.523 against 0.413 at B4 H16 T=16384 (64 programs on 132 SMs),
results/2026-12-03-h200-probe_wide_walk_carried.txt; the layout then moved into mosaic.walk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.accuracy import same_bits  # noqa: E402
from experiments.inputs import retnet_log_decay  # noqa: E402
from fleetjax.chunking import Chunking  # noqa: E402
from fleetjax.decay import Decays  # noqa: E402
from fleetjax.pallas import mosaic  # noqa: E402

C = 64  # positions per chunk


def walks(B: int, T: int, H: int, P: int, *, stages: int, reverse: bool, gated: bool, K: int = 128,
          V: int = 128, seed: int = 0):
    """(inputs, {warpgroups: jitted walk returning (out, finals)}) for one case."""
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.bfloat16)
    log_decay = jnp.asarray(retnet_log_decay(H), jnp.float32)
    entering = None if P == 1 else jnp.asarray(rng.standard_normal((B, H, P, K, V)), jnp.float32)
    gate = jnp.asarray(-0.05 * rng.random((B, T, H)), jnp.float32) if gated else None
    within = Decays(log_decay, gate).within_chunks(B, T, C, base2=True) if gated else None
    chunking = Chunking(T, C, P)

    def one(warpgroups: int):
        config = mosaic.MosaicWalkConfig(stages=stages, warpgroups=warpgroups)
        return jax.jit(lambda q, k, v, entering: mosaic.walk(q, k, v, log_decay, entering, chunking,
                                                             reverse=reverse, scale=K ** -0.5, config=config,
                                                             within=within)[:2])

    return (q, k, v, entering), {n: one(n) for n in (1, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4,16384,16,1;4,16384,16,2;8,8192,16,1;1,32768,8,16",
                    help="B,T,H,P;... (K = V = 128)")
    ap.add_argument("--stages", default="3", help="pipeline depths, comma-separated")
    ap.add_argument("--cases", default="forward,reverse,gated",
                    help="comma-separated: forward, reverse (constant decay), gated (forward)")
    ap.add_argument("--lower", action="store_true", help="lower for sm_90 on this host and exit (no GPU needed)")
    args = ap.parse_args(argv)
    for shape in args.shapes.split(";"):
        B, T, H, P = (int(x) for x in shape.split(","))
        for stages in (int(x) for x in args.stages.split(",")):
            for case in args.cases.split(","):
                probe(B, T, H, P, stages=stages, case=case, lower=args.lower)
    return 0


def probe(B: int, T: int, H: int, P: int, *, stages: int, case: str, lower: bool) -> None:
    inputs, fns = walks(B, T, H, P, stages=stages, reverse=case == "reverse", gated=case == "gated")
    name = f"B{B} T{T} H{H} P{P} stages {stages} {case}"
    if lower:
        for n, fn in fns.items():
            text = fn.trace(*inputs).lower(lowering_platforms=("cuda",)).as_text()
            print(f"{name} warpgroups {n}: lowered for sm_90,", text.count("custom_call @mosaic_gpu"),
                  "Mosaic GPU kernel", flush=True)
        return
    from experiments.timing import jax_sync, time_calls
    (o1, f1), (o2, f2) = (fns[n](*inputs) for n in (1, 2))
    same = same_bits(o1, o2) and same_bits(f1, f2)
    times = {n: time_calls(lambda *a, fn=fn: fn(*a)[0], [inputs], jax_sync, target_s=0.1).ms
             for n, fn in fns.items()}
    print(f"{name}: bitwise equal {same}; one warpgroup {times[1]:.4f} ms, two {times[2]:.4f} ms "
          f"({times[1] / times[2]:.2f}x)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
