"""The op's output under two variants of the default Pallas config on this GPU: whether they agree bit for bit,
and each one's errors against the benchmarks' float32 reference (experiments/accuracy.py: relerr, relerr_l2)
on the benchmarks' inputs (experiments/inputs.py's make_inputs, RetNet's decays or the gate alone).

    PYTHONPATH=. python -m experiments.compare_walks [--B 4] [--H 16] [--K 128] [--T 4096,16384]
        [--a '{"forward_pieces": 2, "forward_block_v": null}'] [--b '{"forward_pieces": 1, "forward_block_v": 32}']
        [--op fwd | fwd_bwd] [--repeats N]

--a and --b are ``--walks`` texts (experiments/inputs.py's with_walk_fields); each length runs with the
constant per-head decay and with the gate alone. ``--op fwd_bwd``: the output and the gradients of q, k, v
and the decay (gated: the log gate) for the benchmarks' dO, each compared and measured. ``--repeats N``: each
variant called N times, and whether every call is bitwise its first (``repeats_equal``): a variant that
leaves out a barrier it needs shows as calls that differ. One JSON line per case on stdout. Needs an sm_90
GPU (the variants change the Mosaic walks). Layouts that split the sequence differently need not agree bit
for bit: their float32 sums run in another order; their errors against the reference should then be equal.
"""

from __future__ import annotations

import argparse
import functools
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


def compare(case: Case, variants: dict[str, str], seed: int = 0, *, op: str = "fwd", repeats: int = 1) -> dict:
    """One case's row; ``variants``: two names -> ``--walks`` texts, applied to the default config."""
    inputs = make_inputs(case, seed, with_do=op == "fwd_bwd")
    base = fleetjax.IMPLEMENTATIONS["pallas"].config_for(None, inputs["q"], inputs["v"])
    configs = {name: with_walk_fields(base, walks) for name, walks in variants.items()}
    return dict(compare_configs(case, configs, inputs, op=op, repeats=repeats), default=str(base.mosaic_walks))


def compare_configs(case: Case, configs: dict, inputs: dict, *, op: str = "fwd", repeats: int = 1) -> dict:
    """:func:`compare`'s row for two named PallasConfigs on ``inputs`` (make_inputs's, with dO for fwd_bwd):
    ``bitwise`` (every output of the two the same bits), ``repeats_equal_<name>`` (each of ``repeats`` calls the
    same bits as its first), and each output's errors (``<key>_<output>_<name>``; fwd: ``<key>_<name>``) against
    the float32 reference."""
    if op not in ("fwd", "fwd_bwd"):
        raise ValueError(f"op must be 'fwd' or 'fwd_bwd', got {op!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats!r}")
    log_decay = retnet_log_decay(case.H)
    decay = None if case.gated else jnp.asarray(np.exp(log_decay))
    q, k, v, log_gate = inputs["q"], inputs["k"], inputs["v"], inputs.get("log_gate")
    ref = accuracy.reference_outputs(op, inputs, log_decay)
    outs, repeats_equal = {}, {}
    for name, config in configs.items():
        def attend(q, k, v, d, g, config=config):
            return fleetjax.fleet_attention(q, k, v, d, log_gate=g, scale=accuracy.SCALE, implementation="pallas",
                                            config=config)

        if op == "fwd":
            def run(q, k, v, d, g, do, attend=attend):
                return {"o": attend(q, k, v, d, g)}
        else:
            # The gradient of the one decaying input differentiated, as the reference's: the gate's where gated.
            def run(q, k, v, d, g, do, attend=attend):
                if case.gated:
                    o, pullback = jax.vjp(lambda q, k, v, g: attend(q, k, v, None, g), q, k, v, g)
                else:
                    o, pullback = jax.vjp(lambda q, k, v, d: attend(q, k, v, d, None), q, k, v, d)
                return dict(zip(("o", "dq", "dk", "dv", "dlog_gate" if case.gated else "ddecay"),
                                (o, *pullback(do))))

        # The inputs are arguments, not constants closed over (which XLA would fold into the program).
        run = functools.partial(jax.jit(run), q, k, v, decay, log_gate, inputs.get("do"))
        first = run()
        outs[name] = first
        repeats_equal[name] = all(all(bool(jnp.array_equal(first[key], again[key])) for key in first)
                                  for again in (run() for _ in range(repeats - 1)))
    out_a, out_b = outs.values()
    errors = {}
    for name, out in outs.items():
        for output, got in out.items():
            for key, value in accuracy.output_errors(got, ref[output]).items():
                errors[f"{key}_{name}" if op == "fwd" else f"{key}_{output}_{name}"] = value
    return dict(B=case.B, T=case.T, H=case.H, K=case.K, gated=case.gated, op=op, repeats=repeats,
                bitwise=all(bool(jnp.array_equal(out_a[key], out_b[key])) for key in out_a),
                **{f"repeats_equal_{name}": same for name, same in repeats_equal.items()}, **errors,
                device=jax.devices()[0].device_kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128, help="K = V")
    ap.add_argument("--T", default="4096,16384", help="comma-separated lengths")
    ap.add_argument("--a", default='{"forward_pieces": 2, "forward_block_v": null}', help="--walks of variant a")
    ap.add_argument("--b", default='{"forward_pieces": 1, "forward_block_v": 32}', help="--walks of variant b")
    ap.add_argument("--op", choices=("fwd", "fwd_bwd"), default="fwd",
                    help="fwd: the output; fwd_bwd: the output and the gradients (see the module's docstring)")
    ap.add_argument("--repeats", type=int, default=1, help="calls of each variant compared with its first")
    args = ap.parse_args(argv)
    for T in (int(t) for t in args.T.split(",")):
        for gated in (False, True):
            try:
                case = Case(args.B, T, args.H, args.K, args.K, "bfloat16", gated)
                row = compare(case, {"a": args.a, "b": args.b}, op=args.op, repeats=args.repeats)
            except ValueError as error:
                ap.error(str(error))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
