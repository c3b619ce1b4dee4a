"""implementation="pallas_fleet" on the GPU: correctness against the scan reference, determinism, timings.

    PYTHONPATH=. python experiments/check_pallas_fleet_gpu.py [--out DIR] [--smoke]

1. Correctness: pallas_fleet against implementation="scan" (float32 inputs to the reference) for T in
   {1, 7, 1000, 4096} in bfloat16 and float32, with initial state, final state, segment ids and scale, plus
   configs that exercise several rank blocks (float32 partials + fixed-order sum), value blocks, head dims
   that are not powers of two, sequence pieces and the per-token walk (tokens_per_step=1). Tolerances
   (DESIGN.md section 5): float32 1e-5, bfloat16 2e-2, relative to the reference's max abs.
2. Determinism: two calls give the same bits (several rank blocks, pieces).
3. Timings, forward, B4 H16 K=V=128 T=4096 bfloat16 (jit, warm-up, median of repeats, block_until_ready):
   the default config, a few variants (block_v, tokens_per_step, warps, stages, a rank split, pieces, the
   per-token walk) and, for reference, implementation="pallas" and "xla" in the same run; one
   forward+backward timing (the backward is the XLA one today). The HBM floor uses the copy bandwidth
   measured in this run.

Writes <date>-<device>-pallas_fleet.json (DESIGN.md section 6) and a PNG beside it into --out (default
experiments/results) and prints a table. --smoke runs tiny shapes (on CPU: Pallas interpret mode) to test
the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import traceback
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore", message=".*Pallas Triton.*", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fleetjax  # noqa: E402
from experiments import benchlib  # noqa: E402
from experiments.gpu_check import make, relerr  # noqa: E402
from fleetjax.pallas_fleet import FleetConfig, default_config  # noqa: E402


TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def run_op(impl: str, config, q, k, v, decay, s0, seg, scale: float):
    fn = jax.jit(lambda q, k, v, decay, s0, seg: fleetjax.fleet_attention(
        q, k, v, decay, scale=scale, initial_state=s0, return_final_state=True, segment_ids=seg,
        implementation=impl, config=config))
    return jax.block_until_ready(fn(q, k, v, decay, s0, seg))


def check_correctness(smoke: bool) -> list[dict]:
    """pallas_fleet vs scan; returns one row per check."""
    if smoke:
        shapes = [(1, 1, 2, 16, 16), (1, 7, 2, 16, 16), (1, 40, 2, 24, 40)]
        dtypes = ["float32", "bfloat16"]
    else:
        shapes = [(2, 1, 4, 128, 128), (2, 7, 4, 128, 128), (2, 1000, 4, 128, 128), (2, 4096, 4, 128, 128),
                  (2, 1000, 3, 24, 40)]
        dtypes = ["bfloat16", "float32"]
    rows = []
    for B, T, H, K, V in shapes:
        for dtype in dtypes:
            for segments, with_state in ((False, True), (True, True)):
                args = make(np.random.default_rng(0), B, T, H, K, V, dtype, segments, with_state)
                q, k, v, decay, s0, seg = args
                up = lambda x: x.astype(jnp.float32)
                o_ref, f_ref = run_op("scan", None, up(q), up(k), up(v), decay, s0, seg, 0.5)
                configs = {"default": None}
                if (K, V) == (24, 40) or smoke:
                    configs["rank_blocks"] = FleetConfig(block_k=16, block_v=16, tokens_per_step=16)
                    configs["pieces"] = FleetConfig(block_k=16, block_v=16, tokens_per_step=16, num_sequence_pieces=3)
                if T == 1000 or smoke:
                    configs["walk"] = FleetConfig(tokens_per_step=1, block_v=32)
                    configs["rank_split_64"] = FleetConfig(block_k=max(16, K // 2), block_v=32)
                for name, config in configs.items():
                    row = dict(B=B, T=T, H=H, K=K, V=V, dtype=dtype, segments=segments, config=name)
                    try:
                        o, f = run_op("pallas_fleet", config, *args, 0.5)
                        row.update(relerr_o=relerr(o, o_ref), relerr_state=relerr(f, f_ref),
                                   finite=bool(np.all(np.isfinite(np.asarray(o, np.float32)))))
                        row["ok"] = row["finite"] and max(row["relerr_o"], row["relerr_state"]) < TOL[dtype]
                    except Exception as e:  # noqa: BLE001 - record the failure and go on with the others
                        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
                        traceback.print_exc()
                    rows.append(row)
                    print("check", json.dumps(row), flush=True)
    return rows


def check_determinism(smoke: bool) -> dict:
    B, T, H, K, V = (1, 40, 2, 24, 40) if smoke else (2, 4096, 4, 128, 128)
    q, k, v, decay, s0, seg = make(np.random.default_rng(1), B, T, H, K, V, "bfloat16", True, True)
    config = FleetConfig(block_k=16 if smoke else 64, block_v=32, num_sequence_pieces=2)
    first = run_op("pallas_fleet", config, q, k, v, decay, s0, seg, 0.5)
    same = all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
               for _ in range(3) for a, b in zip(first, run_op("pallas_fleet", config, q, k, v, decay, s0, seg, 0.5)))
    row = dict(check="determinism", config=str(config), identical_bits=same)
    print("check", json.dumps(row), flush=True)
    return row


def timings(smoke: bool, bandwidth: float) -> list[dict]:
    B, T, H, K, V = (1, 128, 2, 32, 32) if smoke else (4, 4096, 16, 128, 128)
    target_s = 0.02 if smoke else 0.25
    dtype = "bfloat16"
    q, k, v, decay, _, _ = make(np.random.default_rng(2), B, T, H, K, V, dtype, False, False)
    scale = K ** -0.5
    up = lambda x: x.astype(jnp.float32)
    o_ref = run_op("scan", None, up(q), up(k), up(v), decay, None, None, scale)[0]
    base = default_config(q, v)
    variants = {
        "default": base,
        "block_v=64": dataclasses.replace(base, block_v=64),
        "block_v=32": dataclasses.replace(base, block_v=32),
        "block_v=16": dataclasses.replace(base, block_v=16),
        "tokens=32": dataclasses.replace(base, tokens_per_step=32),
        "tokens=128,bv=32": dataclasses.replace(base, tokens_per_step=128, block_v=32),
        "warps=8": dataclasses.replace(base, num_warps=8),
        "stages=2": dataclasses.replace(base, num_stages=2),
        "stages=4": dataclasses.replace(base, num_stages=4),
        "rank_split_64": dataclasses.replace(base, block_k=64),
        "pieces=2": dataclasses.replace(base, num_sequence_pieces=2),
        "walk_bv=32": FleetConfig(tokens_per_step=1, block_v=32, num_warps=4, num_stages=3),
        "walk_bk=32_bv=64": FleetConfig(tokens_per_step=1, block_k=32, block_v=64, num_warps=4, num_stages=3),
    }
    io_bytes = (2 * B * T * H * K + 2 * B * T * H * V) * jnp.dtype(dtype).itemsize  # read q, k, v; write o
    floor_ms = 1e3 * io_bytes / bandwidth
    records = []

    def record(op, impl, variant, fn, *args):
        rec = dict(op=op, impl=impl, variant=variant, dtype=dtype, B=B, T=T, H=H, K=K, V=V,
                   hbm_floor_ms=floor_ms if op == "fwd" else None)
        try:
            rec["ms"] = benchlib.time_calls(fn, [args], benchlib.jax_sync, target_s=target_s).ms
            if op == "fwd":
                rec["relerr"] = relerr(fn(*args), o_ref)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc()
        records.append(rec)
        print("time", json.dumps(rec), flush=True)

    for name, config in variants.items():
        fn = jax.jit(lambda q, k, v, config=config: fleetjax.fleet_attention(
            q, k, v, decay, scale=scale, implementation="pallas_fleet", config=config))
        record("fwd", "fleetjax.pallas_fleet", f"{name}: {config}", fn, q, k, v)
    for impl in ("pallas", "xla"):
        if impl in fleetjax.IMPLEMENTATIONS:
            fn = jax.jit(lambda q, k, v, impl=impl: fleetjax.fleet_attention(
                q, k, v, decay, scale=scale, implementation=impl))
            record("fwd", f"fleetjax.{impl}", "default", fn, q, k, v)
    d_o = jnp.ones(v.shape, dtype)
    fwd_bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fleetjax.fleet_attention(
        q, k, v, decay, scale=scale, implementation="pallas_fleet").astype(jnp.float32) * d_o), (0, 1, 2)))
    record("fwd_bwd", "fleetjax.pallas_fleet", "default (backward: xla)", fwd_bwd, q, k, v)
    return records


def plot(records: list[dict], path: str) -> None:
    plt = benchlib.pyplot_or_none()
    if plt is None:
        return
    rows = [r for r in records if "ms" in r and r["op"] == "fwd"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    labels = [f"{r['impl'].split('.')[-1]} {r['variant'].split(':')[0]}" for r in rows]
    ax.barh(labels, [r["ms"] for r in rows])
    ax.axvline(rows[0]["hbm_floor_ms"], color="k", ls="--", label="HBM floor")
    r0 = rows[0]
    ax.set_xlabel("forward ms (median)")
    ax.set_title(f"B{r0['B']} T{r0['T']} H{r0['H']} K{r0['K']} V{r0['V']} {r0['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script (CPU: interpret)")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {jax.default_backend()}: {device.device_kind}", flush=True)
    bandwidth = benchlib.copy_bandwidth(16 if args.smoke else 1024)["gbps"] * 1e9
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    checks = check_correctness(args.smoke)
    determinism = check_determinism(args.smoke)
    records = timings(args.smoke, bandwidth)

    slug = "".join(c if c.isalnum() else "-" for c in device.device_kind.lower()).strip("-") or "device"
    date = datetime.date.today().isoformat()
    stem = os.path.join(args.out, f"{date}-{slug}-pallas_fleet{'-smoke' if args.smoke else ''}")
    os.makedirs(args.out, exist_ok=True)
    result = {"device": device.device_kind, "date": date, "copy_bandwidth_tb_s": bandwidth / 1e12,
              "versions": {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or
                           __import__("jaxlib").__version__, "fleetjax": fleetjax.__version__},
              "checks": checks, "determinism": determinism, "records": records}
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(records, stem + ".png")

    failed = [c for c in checks if not c["ok"]]
    print(f"\ncorrectness: {len(checks) - len(failed)}/{len(checks)} ok; determinism: "
          f"{determinism['identical_bits']}")
    for c in failed:
        print("FAILED", json.dumps(c))
    print(f"\n{'impl':28s} {'variant':20s} {'ms':>8s} {'relerr':>9s}")
    for r in records:
        ms = f"{r['ms']:.3f}" if "ms" in r else "error"
        err = f"{r['relerr']:.1e}" if r.get("relerr") is not None else ""
        print(f"{r['impl']:28s} {r['variant'].split(':')[0]:20s} {ms:>8s} {err:>9s}")
    print(f"HBM floor {records[0]['hbm_floor_ms']:.3f} ms; wrote {stem}.json")


if __name__ == "__main__":
    main()
