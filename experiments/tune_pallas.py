"""Sweep the "pallas" implementation's PallasConfig on the GPU: forward and forward+backward times per shape,
around the default config.

    PYTHONPATH=. python -m experiments.tune_pallas --out DIR [--budget-s 300] [--only-default] [--label L] [--gated]

A PallasConfig holds one WalkConfig (chunk_size, block_v, num_warps, num_stages) per kernel: the forward walk, the
backward's dq, dv and dk walks (one chunk size between them) and optionally the sequence pieces' state launches;
and the number of sequence pieces, forward and backward (fleetjax/pallas/chunked.py). The built-in candidates
change one thing of the default at a time: a kernel's value block (halved, doubled), its stages (one fewer, one
more) or its warps (4 <-> 8), the piece counts (halved, doubled); fwd varies the forward's fields, fwd_bwd the
backward's. Times with experiments/timing.time_calls (two input sets rotated, back-to-back calls, one sync per
sample), the same method as the benchmarks. --only-default times the default config alone: to compare two versions
of the package in one device call, run it in turn from each checkout's directory with PYTHONPATH set to it
(``python -m`` puts the working directory first on sys.path, so the package beside the script is the one
imported), with this script copied into the older checkout's experiments/: an older script may time something else
(before 2026-12-04's 55142c4 its fwd_bwd timed the backward alone, which once read as a 7% slowdown of the newer
package). --gated: a per-token log gate and no per-head decay, as the benchmarks' --gated. --smoke: a tiny shape
on the CPU (Pallas interpret mode), the default and two candidates per op. --rounds N: the configs of an op are
compiled first and timed in turn N times (an alternated A/B: the device's drift between calls falls on every
config alike), each record then carrying its N times (all_ms), their median (ms), whether its outputs equal the
default config's bitwise and, where they do not, their largest relative difference (relative_difference).
Appends to DIR/tune_pallas.jsonl, one record per (op, shape, config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.accuracy import same_bits  # noqa: E402
from experiments.inputs import retnet_log_decay  # noqa: E402
from experiments.runner import parse_shapes  # noqa: E402
from experiments.timing import jax_sync, time_calls  # noqa: E402
from fleetjax.check import relative_error  # noqa: E402
from fleetjax.pallas.chunked import PallasConfig, WalkConfig  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

SHAPES = [(4, 4096, 16, 128, 128), (4, 16384, 16, 128, 128), (1, 4096, 8, 128, 128), (1, 32768, 8, 128, 128)]
SMOKE_SHAPES = [(1, 64, 2, 32, 32)]
WALKS = {"fwd": ("forward",), "fwd_bwd": ("dq", "dv", "dk")}
PIECES = {"fwd": "num_sequence_pieces", "fwd_bwd": "backward_num_sequence_pieces"}


def _walk_variants(walk: WalkConfig, widest: int) -> list[dict[str, int]]:
    """One-field changes of a kernel's tiling: value block halved and doubled (16 to ``widest``), one stage
    fewer and one more, the other of 4 and 8 warps."""
    out = [dict(block_v=b) for b in (walk.block_v // 2, walk.block_v * 2) if 16 <= b <= widest]
    out += [dict(num_stages=s) for s in (walk.num_stages - 1, walk.num_stages + 1) if s >= 1]
    out.append(dict(num_warps=8 if walk.num_warps == 4 else 4))
    return out


def candidates(base: PallasConfig, op: str, K: int, V: int) -> list[dict[str, Any]]:
    """The default (an empty change) and the changes around it for ``op``, as :func:`apply_changes` takes them:
    {kernel: {WalkConfig field: value}} or {PallasConfig field: value}."""
    widest = 1 << max(4, (max(K, V) - 1).bit_length())
    out: list[dict[str, Any]] = [{}]
    for name in WALKS[op]:
        out += [{name: change} for change in _walk_variants(getattr(base, name), widest)]
    if op == "fwd":
        out.append({"forward": dict(chunk_size=128, num_warps=8)})  # longer chunks need more warps
        if base.piece_states is not None:  # the pieces' states in each walk's own tiling instead
            out.append({"piece_states": None})
    pieces = getattr(base, PIECES[op])
    out += [{PIECES[op]: p} for p in (pieces * 2, pieces // 2) if p >= 1 and p != pieces]
    return out


def apply_changes(base: PallasConfig, changes: dict[str, Any]) -> PallasConfig:
    """``base`` with ``changes``: a dict value changes fields of that kernel's WalkConfig (of the walk's own
    tiling where piece_states is None), any other value replaces the PallasConfig field."""
    fields: dict[str, Any] = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            current = getattr(base, name) or (base.forward if name == "piece_states" else None)
            if current is None:  # mosaic_walks off this GPU (the default config sets it on sm_90 only)
                raise SystemExit(f"tune_pallas: the default config has no {name} here to change ({value})")
            fields[name] = dataclasses.replace(current, **value)
        else:
            fields[name] = value
    return dataclasses.replace(base, **fields)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only-default", action="store_true")
    ap.add_argument("--ops", default="fwd,fwd_bwd", help="comma-separated ops to time: fwd, fwd_bwd (default both)")
    ap.add_argument("--label", default="current")
    ap.add_argument("--shapes", default=None, help="B,T,H,K,V;... (default: the four benchmark shapes)")
    ap.add_argument("--final-state", action="store_true",
                    help="fwd_bwd with a random cotangent for the final state too (the state is returned)")
    ap.add_argument("--configs", default=None,
                    help='JSON list of {"op": "fwd" or "fwd_bwd", ...changes} to time instead of the built-in '
                         'candidates, a change being {kernel: {WalkConfig field: value}} (kernels: forward, dq, '
                         'dv, dk, piece_states) or {PallasConfig field: value}, e.g. {"op": "fwd", "forward": '
                         '{"block_v": 32}, "num_sequence_pieces": 2}; the default config is always timed first')
    ap.add_argument("--gated", action="store_true",
                    help="a per-token log gate [B, T, H] float32 = logsigmoid(N(0, 1)) / 16 and no per-head decay, as "
                         "the benchmarks' --gated (fwd_bwd: the gate's gradient instead of the decay's)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the op's configs in turn this many times (medians; outputs compared bitwise with the "
                         "default's)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny shape on the CPU (Pallas interpret mode): the default and two candidates per op")
    args = ap.parse_args(argv)
    start = time.time()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_pallas.jsonl")
    device = jax.devices()[0].device_kind
    record = fleetjax.IMPLEMENTATIONS["pallas"]
    shapes = (SMOKE_SHAPES if args.smoke else SHAPES) if args.shapes is None else parse_shapes(args.shapes)
    configs = None if args.configs is None else json.loads(args.configs)
    warm_s, target_s = (0.02, 0.02) if args.smoke else (0.5, 0.2)
    for B, T, H, K, V in shapes:
        # The per-head decay or (--gated) a per-token log gate: the one input of the decay differentiated. It is
        # an argument of the timed function, as in the benchmarks: closed over, a gate [B, T, H] is a constant
        # that XLA folds the gate's cumulative sums into (minutes of compilation at T=16384, and those sums then
        # go untimed).
        decay = (jnp.asarray(jax.nn.log_sigmoid(rng.standard_normal((B, T, H))) / 16, jnp.float32) if args.gated
                 else jnp.asarray(np.exp(retnet_log_decay(H)), jnp.float32))
        sets = []
        for _ in range(2):
            q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
            v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype) for _ in range(2))
            sets.append((q, k, v, do, decay))
        base = record.config_for(None, sets[0][0], sets[0][2])
        warm = True
        for op in [op for op in ("fwd", "fwd_bwd") if op in args.ops.split(",")]:
            if args.only_default:
                todo = [{}]
            elif configs is not None:
                todo = [{}] + [{k: v for k, v in c.items() if k != "op"} for c in configs if c["op"] == op]
            else:
                todo = candidates(base, op, K, V)[:3 if args.smoke else None]
            built = []
            for changes in todo:
                cfg = apply_changes(base, changes)
                # The decay is differentiated too (the benchmarks' fwd_bwd): a fixed decay has a cheaper backward.
                attend = lambda q, k, v, decay, cfg=cfg: fleetjax.fleet_attention(  # noqa: E731
                    q, k, v, None if args.gated else decay, log_gate=decay if args.gated else None,
                    implementation="pallas", config=cfg, return_final_state=args.final_state)
                if op == "fwd":
                    fn = jax.jit(lambda q, k, v, do, decay, attend=attend: attend(q, k, v, decay))
                else:
                    # The output is returned with the gradients, as the benchmarks do: without it the forward
                    # is dead code (the backward's residuals are the inputs) and fwd_bwd times the backward
                    # alone, as this script's fwd_bwd did until 2026-12-04.
                    d_final = (jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32) if args.final_state
                               else None)

                    def fn(q, k, v, do, decay, d_final=d_final, attend=attend):
                        out, pullback = jax.vjp(attend, q, k, v, decay)
                        return out, pullback(do if d_final is None else (do, d_final))

                    fn = jax.jit(fn)
                built.append((changes, cfg, fn))
            times: list[list[float | None]] = [[] for _ in built]
            outputs: list[list | None] = [None for _ in built]
            spent = False
            for _ in range(args.rounds):
                for i, (changes, cfg, fn) in enumerate(built):
                    if time.time() - start > args.budget_s:
                        spent = True
                        break
                    try:
                        if warm:  # the GPU idled while the inputs were drawn: let its clocks come up first
                            time_calls(fn, sets, jax_sync, target_s=warm_s)
                            warm = False
                        times[i].append(time_calls(fn, sets, jax_sync, target_s=target_s).ms)
                        if args.rounds > 1 and outputs[i] is None:
                            outputs[i] = jax.tree.leaves(fn(*sets[0]))
                    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                        times[i].append(None)
                        print("fail", changes, repr(e)[:300], flush=True)
                if spent:
                    print("budget spent", flush=True)
                    break
            for i, (changes, cfg, _) in enumerate(built):
                if not times[i]:
                    continue
                timed = [t for t in times[i] if t is not None]
                ms = statistics.median(timed) if timed else None
                rec = dict(label=args.label, device=device, op=op, B=B, T=T, H=H, K=K, V=V, dtype=args.dtype,
                           gated=args.gated, changed=changes, cfg=dataclasses.asdict(cfg), ms=ms,
                           final_state=args.final_state, interpreted=record.interpreted())
                if args.rounds > 1:
                    compared = outputs[i] is not None and outputs[0] is not None
                    same = (all(same_bits(a, b) for a, b in zip(outputs[0], outputs[i])) if compared
                            else None)
                    # Where not bitwise (a config that rounds differently), how far: the largest of
                    # max |x - default| / max |default| over the outputs.
                    apart = (max(relative_error(b, a) for a, b in zip(outputs[0], outputs[i]))
                             if compared and not same else None)
                    rec.update(all_ms=times[i], equal_to_default=same, relative_difference=apart)
                print(f"{args.label:8s} {op:7s} B{B} T{T} H{H}: {ms and round(ms, 4)} ms  {changes or 'default'}",
                      flush=True)
                with open(path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if spent:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
