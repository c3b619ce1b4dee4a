"""Correctness of every implementation on the GPU against the scan reference, plus quick timings.

    PYTHONPATH=. python experiments/gpu_check.py [--out DIR] [--quick]

Checks output, final state and all gradients (q, k, v, decay, initial_state) for odd shapes, segment ids,
initial state, bf16/f32; then times forward and forward+backward of each implementation at a few shapes.
Prints a table and writes gpu_check.json into --out.
"""

from __future__ import annotations

import argparse
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
from experiments import benchlib  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\._src\.pallas.*")


def make(rng, B, T, H, K, V, dtype, segments, with_state):
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype)
    decay = jnp.asarray(1 - 2.0 ** (-5 - np.arange(H) * 5 / max(H - 1, 1)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32) if with_state else None
    seg = jnp.asarray(np.sort(rng.integers(0, 5, (B, T)), axis=1), jnp.int32) if segments else None
    return q, k, v, decay, s0, seg


def grads(impl, q, k, v, decay, s0, seg, wo, wf):
    def loss(q, k, v, decay, s0):
        o, f = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, segment_ids=seg, implementation=impl,
                                        return_final_state=True)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(f * wf), (o, f)
    argnums = (0, 1, 2, 3, 4) if s0 is not None else (0, 1, 2, 3)
    (_, (o, f)), g = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, decay, s0)
    return (o, f) + tuple(g)


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-timing", action="store_true", help="only the correctness checks")
    p.add_argument("--impls", default=",".join(n for n in ("pallas", "pallas_fleet", "xla")
                                               if n in fleetjax.IMPLEMENTATIONS))
    args = p.parse_args(argv)
    impls = args.impls.split(",")
    print("jax", jax.__version__, jax.devices(), "implementations", impls, flush=True)
    rng = np.random.default_rng(0)
    records, failures = [], 0
    cases = [(1, 1, 2, 16, 16, "float32", False, True), (2, 7, 3, 33, 24, "float32", True, True),
             (2, 1000, 3, 64, 48, "float32", True, True), (1, 1000, 2, 128, 128, "bfloat16", True, False),
             (2, 4096, 4, 128, 128, "bfloat16", False, True), (1, 4096, 2, 256, 256, "bfloat16", False, False)]
    for B, T, H, K, V, dtype, segments, with_state in cases:
        q, k, v, decay, s0, seg = make(rng, B, T, H, K, V, jnp.dtype(dtype), segments, with_state)
        wo = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
        wf = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
        up = lambda x: None if x is None else x.astype(jnp.float32)
        ref = grads("scan", up(q), up(k), up(v), decay, s0, seg, wo, wf)
        for impl in impls:
            t0 = time.time()
            try:
                got = grads(impl, q, k, v, decay, s0, seg, wo, wf)
                errs = [relerr(a, b) for a, b in zip(got, ref)]
                tol = 1e-4 if dtype == "float32" else 3e-2
                ok = all(e <= tol for e in errs) and all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in got)
            except Exception as e:  # report and go on: one lowering failure must not hide the others
                errs, ok = [repr(e)[:300]], False
            failures += not ok
            rec = dict(kind="check", impl=impl, B=B, T=T, H=H, K=K, V=V, dtype=dtype, segments=segments,
                       initial_state=with_state, errs=errs, ok=ok, s=round(time.time() - t0, 1))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    shapes = [(4, 4096, 16, 128, 128), (4, 16384, 16, 128, 128), (1, 32768, 8, 128, 128), (1, 4096, 8, 128, 128)]
    if args.quick:
        shapes = shapes[:1]
    if args.skip_timing:
        shapes = []
    for B, T, H, K, V in shapes:
        q, k, v, decay, _, _ = make(rng, B, T, H, K, V, jnp.bfloat16, False, False)
        do = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.bfloat16)
        for impl in impls:
            if impl == "pallas_fleet" and T > 4096:
                continue
            fwd = jax.jit(lambda q, k, v, d, impl=impl: fleetjax.fleet_attention(q, k, v, d, implementation=impl))
            fb = jax.jit(lambda q, k, v, d, impl=impl: jax.vjp(
                lambda *a: fleetjax.fleet_attention(*a, implementation=impl), q, k, v, d)[1](do))
            try:
                timing = benchlib.time_calls(fwd, [(q, k, v, decay)], benchlib.jax_sync)
                ms_f, c_f = timing.ms, timing.first_call_s
                ms_b = (benchlib.time_calls(fb, [(q, k, v, decay)], benchlib.jax_sync).ms
                        if impl != "pallas_fleet" else float("nan"))
            except Exception as e:
                print("bench failed", impl, B, T, H, repr(e)[:500], flush=True)
                continue
            rec = dict(kind="time", impl=impl, B=B, T=T, H=H, K=K, V=V, dtype="bfloat16", fwd_ms=ms_f,
                       fwd_bwd_ms=ms_b, first_s=round(c_f, 1))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), records=records), f, indent=1)
    print(f"{'impl':14s} {'B':>2s} {'T':>6s} {'H':>3s} {'fwd ms':>8s} {'fwd+bwd ms':>10s}")
    for r in records:
        if r["kind"] == "time":
            print(f"{r['impl']:14s} {r['B']:2d} {r['T']:6d} {r['H']:3d} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:10.3f}")
    print("check failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
