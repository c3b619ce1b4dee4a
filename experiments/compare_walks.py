"""The op's output under two variants of the default Pallas config on this GPU: whether they agree bit for bit,
and each one's errors against the benchmarks' float32 reference (experiments/accuracy.py: relerr, relerr_l2)
on the benchmarks' inputs (experiments/inputs.py's make_inputs, RetNet's decays or the gate alone).

    PYTHONPATH=. python -m experiments.compare_walks [--B 4] [--H 16] [--K 128] [--T 4096,16384]
        [--a '{"forward_pieces": 2, "forward_block_v": null}'] [--b '{"forward_pieces": 1, "forward_block_v": 32}']

--a and --b are ``--walks`` texts (experiments/inputs.py's with_walk_fields); each length runs with the
constant per-head decay and with the gate alone. One JSON line per case on stdout. Needs an sm_90 GPU (the
variants change the Mosaic walks). Layouts that split the sequence differently need not agree bit for bit:
their float32 sums run in another order; their errors against the reference should then be equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments import accuracy  # noqa: E402
from experiments.inputs import Case, make_inputs, retnet_log_decay, with_walk_fields  # noqa: E402


def compare(case: Case, variants: dict[str, str], seed: int = 0) -> dict:
    """One case's row; ``variants``: two names -> ``--walks`` texts, applied to the default config."""
    inputs = make_inputs(case, seed, with_do=False)
    log_decay = retnet_log_decay(case.H)
    decay = None if case.gated else jnp.asarray(np.exp(log_decay))
    q, k, v, log_gate = inputs["q"], inputs["k"], inputs["v"], inputs.get("log_gate")
    base = fleetjax.IMPLEMENTATIONS["pallas"].config_for(None, q, v)
    outs = {}
    for name, walks in variants.items():
        config = with_walk_fields(base, walks)
        op = jax.jit(lambda q, k, v, d, g, config=config: fleetjax.fleet_attention(
            q, k, v, d, log_gate=g, scale=accuracy.SCALE, implementation="pallas", config=config))
        outs[name] = op(q, k, v, decay, log_gate)
    ref = accuracy.reference_outputs("fwd", inputs, log_decay)["o"]
    out_a, out_b = outs.values()
    errors = {f"{key}_{name}": value for name, out in outs.items()
              for key, value in accuracy.output_errors(out, ref).items()}
    return dict(B=case.B, T=case.T, H=case.H, K=case.K, gated=case.gated,
                bitwise=bool(jnp.array_equal(out_a, out_b)), **errors, default=str(base.mosaic_walks),
                device=jax.devices()[0].device_kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128, help="K = V")
    ap.add_argument("--T", default="4096,16384", help="comma-separated lengths")
    ap.add_argument("--a", default='{"forward_pieces": 2, "forward_block_v": null}', help="--walks of variant a")
    ap.add_argument("--b", default='{"forward_pieces": 1, "forward_block_v": 32}', help="--walks of variant b")
    args = ap.parse_args(argv)
    for T in (int(t) for t in args.T.split(",")):
        for gated in (False, True):
            try:
                case = Case(args.B, T, args.H, args.K, args.K, "bfloat16", gated)
                row = compare(case, {"a": args.a, "b": args.b})
            except ValueError as error:
                ap.error(str(error))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
