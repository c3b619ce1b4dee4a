"""The gated form's rows of one checkout, for a before/after of two trees in one device call: run it once per
tree, alternating the trees' processes, each with its own package first on the path
(``git archive <commit> fleetjax | tar -x -C old`` for the older one):

    cd /tmp && PYTHONPATH=$REPO/old:$REPO python -m experiments.tree_rows --label old >> rows.jsonl
    cd /tmp && PYTHONPATH=$REPO python -m experiments.tree_rows --label new >> rows.jsonl

(from a directory other than the repository's, which ``python -m`` would put first on the path). One JSON line
a row: bf16, B4 H16, K = V = 128, ``implementation="pallas"``, the median of up to 25 samples
(experiments.timing.time_calls, two input sets). The rows:

- ``gate_bwd``: the backward of the log gate alone (no per-head decay): ``jax.vjp(op, q, k, v, log_gate)``'s
  pullback of dO, with the op's output not returned, so XLA drops the forward walk: the backward alone;
- ``both_bwd``: the same with a learned per-head decay beside the gate (the gated layers' op);
- ``decay_bwd``: the learned per-head decay alone, no gate;
- ``gate_fwd``: the gated forward.

``--rows gate_bwd4096,both_bwd16384`` picks rows by kind and T. ``--check`` also compares each row's results
with ``implementation="xla"`` on the same inputs (fleetjax.check.relative_error, per output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from fleetjax.check import relative_error  # noqa: E402
from experiments.inputs import Case, make_inputs  # noqa: E402
from experiments.timing import jax_sync, time_calls  # noqa: E402

ROWS = (("gate_bwd", 4096), ("gate_bwd", 16384), ("both_bwd", 16384), ("gate_fwd", 4096), ("gate_fwd", 16384),
        ("decay_bwd", 16384))


def row_call(kind: str, implementation: str):
    """The row's function of (q, k, v, log_gate, dO, decay)."""
    def op(q, k, v, decay, log_gate):
        return fleetjax.fleet_attention(q, k, v, decay, log_gate=log_gate, implementation=implementation)

    def call(q, k, v, log_gate, do, decay):
        if kind == "gate_fwd":
            return op(q, k, v, None, log_gate)
        if kind == "gate_bwd":
            return jax.vjp(lambda q, k, v, g: op(q, k, v, None, g), q, k, v, log_gate)[1](do)
        if kind == "both_bwd":
            return jax.vjp(op, q, k, v, decay, log_gate)[1](do)
        if kind == "decay_bwd":
            return jax.vjp(lambda q, k, v, d: op(q, k, v, d, None), q, k, v, decay)[1](do)
        raise ValueError(f"unknown row kind {kind!r}; expected one of gate_bwd, both_bwd, decay_bwd, gate_fwd")
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="", help="the tree's name in each record")
    parser.add_argument("--rows", default="", help="kind+T, comma-separated (default: all)")
    parser.add_argument("--shape", default="4,16,128,128", help="B,H,K,V (default 4,16,128,128)")
    parser.add_argument("--target-s", type=float, default=0.6, help="time_calls' target per row")
    parser.add_argument("--check", action="store_true", help="compare with implementation='xla' too")
    args = parser.parse_args(argv)
    picked = set(filter(None, args.rows.split(",")))
    unknown = picked - {f"{kind}{T}" for kind, T in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; expected kind+T from {[f'{k}{t}' for k, t in ROWS]}")
    B, H, K, V = (int(x) for x in args.shape.split(","))
    for kind, T in ROWS:
        if picked and f"{kind}{T}" not in picked:
            continue
        case = Case(B, T, H, K, V, "bfloat16", gated=kind != "decay_bwd")
        decay = jnp.asarray(np.linspace(0.97, 0.999, H), jnp.float32)
        sets = [(x["q"], x["k"], x["v"], x.get("log_gate"), x["do"], decay)
                for x in (make_inputs(case, seed) for seed in (0, 1))]
        run = jax.jit(row_call(kind, "pallas"))
        t = time_calls(run, sets, jax_sync, target_s=args.target_s, min_samples=7, max_samples=25)
        record = dict(tree=args.label, kind=kind, B=B, T=T, H=H, K=K, V=V, ms=t.ms, ms_min=t.ms_min,
                      samples=t.samples, device=jax.devices()[0].device_kind)
        if args.check:
            got, ref = run(*sets[0]), jax.jit(row_call(kind, "xla"))(*sets[0])
            record["relative_difference_to_xla"] = [relative_error(g, r) for g, r in
                                                    zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
