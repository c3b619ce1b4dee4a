"""Sweep PallasConfig on the GPU: forward and forward+backward times per shape, around the default config.

    PYTHONPATH=. python experiments/tune_pallas.py --out DIR [--budget-s 300] [--only-default] [--label L]

Times with experiments/benchlib.time_calls (two input sets rotated, back-to-back calls, one sync per
sample), the same method as the benchmarks. --only-default times the default config alone (run it with
PYTHONPATH pointing at another checkout to compare two versions of the package in one device call).
Appends to DIR/tune_pallas.jsonl, one record per (op, shape, config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import fleetjax
from experiments import benchlib
from fleetjax.pallas_chunked import default_config

warnings.filterwarnings("ignore", category=DeprecationWarning)

SHAPES = [(4, 4096, 16, 128, 128), (4, 16384, 16, 128, 128), (1, 4096, 8, 128, 128), (1, 32768, 8, 128, 128)]


def _candidates(base, op: str, B: int, T: int, H: int) -> list[dict]:
    """Configs near the default: the fields that the earlier sweeps found to matter."""
    if op == "fwd":
        pieces = base.num_sequence_pieces
        out = [dict(), dict(num_warps=8), dict(num_stages=2), dict(num_stages=4), dict(block_v=32),
               dict(chunk_size=128, num_warps=8)]
        out += [dict(num_sequence_pieces=p) for p in (pieces * 2, max(1, pieces // 2)) if p != pieces]
        return out
    pieces = base.backward_num_sequence_pieces
    out = [dict(), dict(backward_num_stages=4), dict(backward_block_v=64)]
    out += [dict(backward_num_sequence_pieces=p) for p in (pieces * 2, max(1, pieces // 2)) if p != pieces]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only-default", action="store_true")
    ap.add_argument("--label", default="current")
    ap.add_argument("--shapes", default=None, help="B,T,H,K,V;... (default: the four benchmark shapes)")
    ap.add_argument("--final-state", action="store_true",
                    help="fwd_bwd with a random cotangent for the final state too (the state is returned)")
    ap.add_argument("--configs", default=None,
                    help='JSON list of {"op": "fwd" or "fwd_bwd", field: value, ...} to time instead of the '
                         'built-in candidates (the default config is always timed first)')
    args = ap.parse_args(argv)
    start = time.time()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    path = os.path.join(args.out, "tune_pallas.jsonl")
    device = jax.devices()[0].device_kind
    shapes = SHAPES if args.shapes is None else benchlib.parse_shapes(args.shapes)
    configs = None if args.configs is None else json.loads(args.configs)
    for B, T, H, K, V in shapes:
        sets = []
        for _ in range(2):
            q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
            v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype) for _ in range(2))
            sets.append((q, k, v, do))
        decay = jnp.asarray(np.exp(benchlib.retnet_log_decay(H)), jnp.float32)
        base = default_config(sets[0][0], sets[0][2])
        warm = True
        for op in ("fwd", "fwd_bwd"):
            if args.only_default:
                todo = [dict()]
            elif configs is not None:
                todo = [dict()] + [{k: v for k, v in c.items() if k != "op"} for c in configs if c["op"] == op]
            else:
                todo = _candidates(base, op, B, T, H)
            for kw in todo:
                if time.time() - start > args.budget_s:
                    print("budget spent", flush=True)
                    return
                cfg = dataclasses.replace(base, **kw)
                attend = lambda q, k, v, cfg=cfg: fleetjax.fleet_attention(  # noqa: E731
                    q, k, v, decay, implementation="pallas", config=cfg, return_final_state=args.final_state)
                if op == "fwd":
                    fn = jax.jit(lambda q, k, v, do: attend(q, k, v))
                elif args.final_state:
                    d_final = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
                    fn = jax.jit(lambda q, k, v, do, d_final=d_final: jax.vjp(attend, q, k, v)[1]((do, d_final)))
                else:
                    fn = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
                try:
                    if warm:  # the GPU idled while the inputs were drawn: let its clocks come up first
                        benchlib.time_calls(fn, sets, benchlib.jax_sync, target_s=0.5)
                        warm = False
                    ms = benchlib.time_calls(fn, sets, benchlib.jax_sync, target_s=0.2).ms
                except Exception as e:  # a config that does not compile is a result too
                    ms = None
                    print("fail", kw, repr(e)[:300], flush=True)
                rec = dict(label=args.label, device=device, op=op, B=B, T=T, H=H, K=K, V=V, dtype=args.dtype,
                           changed=kw, cfg=dataclasses.asdict(cfg), ms=ms, final_state=args.final_state)
                print(f"{args.label:8s} {op:7s} B{B} T{T} H{H}: {ms and round(ms, 4)} ms  {kw or 'default'}",
                      flush=True)
                with open(path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
