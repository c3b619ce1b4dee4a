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

import fleetjax  # noqa: E402
from experiments import accuracy  # noqa: E402
from experiments.inputs import Case, make_inputs, retnet_log_decay, with_walk_fields  # noqa: E402
from experiments.peers.base import jax_bound, with_vjp  # noqa: E402


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
    decay = jnp.exp(jnp.asarray(log_decay, jnp.float32))
    ref = accuracy.reference_outputs(op, inputs, log_decay)
    outs, repeats_equal = {}, {}
    for name, config in configs.items():
        # Bound as the benchmarks bind fleetjax (experiments/peers): the inputs as the jitted call's arguments,
        # fwd_bwd the gradient of the one decaying input beside q, k, v (the gate's where gated), as the
        # reference's.
        attend = functools.partial(fleetjax.fleet_attention, scale=accuracy.SCALE, implementation="pallas",
                                   config=config)
        if case.gated:
            def gated(q, k, v, log_gate, attend=attend):
                return attend(q, k, v, None, log_gate=log_gate)

            bound = jax_bound(gated, with_vjp(gated), op, inputs=("log_gate",), grads=("dq", "dk", "dv", "dlog_gate"))
        else:
            bound = jax_bound(attend, with_vjp(attend), op, extra=(decay,), grads=("dq", "dk", "dv", "ddecay"))
        args = bound.prepare(inputs)
        calls = (bound.unpack(bound.call(*args)) for _ in range(repeats))
        outs[name] = first = next(calls)
        repeats_equal[name] = all(all(accuracy.same_bits(first[key], again[key]) for key in first)
                                  for again in calls)
    out_a, out_b = outs.values()
    errors = {}
    for name, out in outs.items():
        for output, got in out.items():
            for key, value in accuracy.output_errors(got, ref[output]).items():
                errors[f"{key}_{name}" if op == "fwd" else f"{key}_{output}_{name}"] = value
    return dict(B=case.B, T=case.T, H=case.H, K=case.K, gated=case.gated, op=op, repeats=repeats,
                bitwise=all(accuracy.same_bits(out_a[key], out_b[key]) for key in out_a),
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
