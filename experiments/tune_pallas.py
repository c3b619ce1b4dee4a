"""Sweep PallasConfig on the GPU: forward and backward times per shape; prints the best configs.

    PYTHONPATH=. python experiments/tune_pallas.py --out DIR [--budget-s 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fleetjax  # noqa: E402
from fleetjax.pallas_chunked import default_config  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


def median_ms(fn, *args, reps=15):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    start = time.time()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    shapes = [(4, 4096, 16, 128, 128), (4, 16384, 16, 128, 128), (1, 32768, 8, 128, 128), (1, 4096, 8, 128, 128)]
    records = []
    for B, T, H, K, V in shapes:
        q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
        v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype) for _ in range(2))
        decay = jnp.asarray(1 - 2.0 ** (-5 - np.arange(H) * 5 / (H - 1)), jnp.float32)
        base = default_config(q, v)
        fwd_grid = [dict(chunk_size=c, block_v=bv, num_warps=w, num_stages=st, num_sequence_pieces=p)
                    for c, bv, w, st, p in itertools.product((64, 128), (32, 64, 128), (4, 8), (2,), (1, 2, 4, 8))
                    if not (c == 128 and bv == 128)]
        best = None
        for kw in fwd_grid:
            if time.time() - start > args.budget_s * 0.6 * (shapes.index((B, T, H, K, V)) + 1) / len(shapes):
                break
            cfg = dataclasses.replace(base, **kw)
            f = jax.jit(lambda q, k, v, d, cfg=cfg: fleetjax.fleet_attention(q, k, v, d, implementation="pallas",
                                                                            config=cfg))
            try:
                ms = median_ms(f, q, k, v, decay)
            except Exception as e:
                ms = None
                print("fail", kw, repr(e)[:200], flush=True)
            records.append(dict(op="fwd", B=B, T=T, H=H, K=K, V=V, cfg=kw, ms=ms))
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, cfg)
        print(f"FWD B{B} T{T} H{H}: default {base} ; best {best}", flush=True)
        fcfg = best[1] if best else base
        bwd_grid = [dict(backward_block_v=bv, backward_num_warps=w, backward_num_stages=st, num_sequence_pieces=p)
                    for bv, w, st, p in itertools.product((64, 128), (4, 8), (1, 2), (1, 2, 4))]
        bbest = None
        for kw in bwd_grid:
            if time.time() - start > args.budget_s * (shapes.index((B, T, H, K, V)) + 1) / len(shapes):
                break
            cfg = dataclasses.replace(fcfg, **kw)
            g = jax.jit(lambda q, k, v, d, do, cfg=cfg: jax.vjp(
                lambda *a: fleetjax.fleet_attention(*a, implementation="pallas", config=cfg), q, k, v, d)[1](do))
            try:
                ms = median_ms(g, q, k, v, decay, do)
            except Exception as e:
                ms = None
                print("fail", kw, repr(e)[:200], flush=True)
            records.append(dict(op="fwd_bwd", B=B, T=T, H=H, K=K, V=V, cfg=dataclasses.asdict(cfg), ms=ms))
            if ms is not None and (bbest is None or ms < bbest[0]):
                bbest = (ms, cfg)
        print(f"FWD+BWD B{B} T{T} H{H}: best {bbest}", flush=True)
    with open(os.path.join(args.out, "tune_pallas.json"), "w") as fh:
        json.dump(dict(device=jax.devices()[0].device_kind, records=records), fh)


if __name__ == "__main__":
    main()
