"""Forward benchmark (issue 4): fleetjax's implementations against the peers.

    PYTHONPATH=. python -m experiments.bench_forward [--out DIR] [--smoke] [--budget-s 450] ...

Writes <date>-<device>-forward.json and .png to --out (default experiments/results) and prints a table;
each record holds the op, implementation, dtype, shape, median ms, relerr against the float32 reference and
the HBM floor (experiments/records.py). Shapes in two groups, most important first (what does not fit the
budget is recorded as skipped): (1) bfloat16 B4 H16 K=V=128 at T in {1024, 4096, 16384}, bfloat16 B1 H8
K=V=128 at T in {4096, 32768}, then the long-context row bfloat16 B1 H16 T=131072 K=V=128; (2) bfloat16 B4
H16 T=4096 K=V=64, float32 B4 H16 K=V=128 at T in {1024, 4096, 16384}, bfloat16 B4 H16 T=4096 K=V=256 (fla
autotunes for minutes there). In each group the implementations that do not autotune run first, then fla.
"fleetjax.scan" (one position at a time) runs at T <= 4096 only. --smoke runs tiny shapes on the CPU
(Pallas in interpret mode; torch peers under TRITON_INTERPRET=1 if torch is installed).

--gated: every case carries a per-token log gate [B, T, H] float32 = logsigmoid(N(0, 1)) / 16 and no
per-head decay: fleetjax's ``log_gate`` (decay None) against fla's ``g=``; the peers without a per-token
gate are recorded as skipped. A first group of the issue's target shapes, bfloat16 B4 H16 K=V=128 at T in
{4096, 16384}, comes before the groups above (without those two). Results file <date>-<device>-forward-gated.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.environment import setup_jax_environment  # noqa: E402

setup_jax_environment()

from experiments import runner  # noqa: E402
from experiments.inputs import Case  # noqa: E402
from experiments.peers import forward_impls  # noqa: E402

# The long-context row: 2^28 elements per tensor, 1 GiB in float32 (the reference's precision).
LONG_CONTEXT = Case(1, 131072, 16, 128, 128, "bfloat16")
# Its smoke stand-in: longer than the other smoke rows, alone at its B and H (as the full-size row is).
SMOKE_LONG_CONTEXT = Case(1, 96, 4, 32, 32, "bfloat16")


# The gated mode's first group: the per-token gate issue's target shapes.
GATED_TARGETS = [Case(4, T, 16, 128, 128, "bfloat16", gated=True) for T in (4096, 16384)]


def forward_cases(smoke: bool, gated: bool = False) -> list[list[Case]]:
    """Groups of cases, most important first: the main comparison and the long-context row, then the other
    dtypes and head dims. ``gated``: the same cases with a per-token log gate, GATED_TARGETS first (not in
    smoke, whose shapes stay as they are)."""
    if smoke:
        groups = [[Case(1, T, 2, 32, 32, "bfloat16") for T in (16, 40)] + [SMOKE_LONG_CONTEXT],
                  [Case(1, T, 2, 32, 32, "float32") for T in (16, 40)] + [Case(1, 24, 2, 16, 16, "bfloat16")]]
    else:
        groups = [[Case(4, T, 16, 128, 128, "bfloat16") for T in (1024, 4096, 16384)]
                  + [Case(1, T, 8, 128, 128, "bfloat16") for T in (4096, 32768)]
                  + [LONG_CONTEXT],
                  [Case(4, 4096, 16, 64, 64, "bfloat16")]
                  + [Case(4, T, 16, 128, 128, "float32") for T in (1024, 4096, 16384)]
                  + [Case(4, 4096, 16, 256, 256, "bfloat16")]]
    if not gated:
        return groups
    groups = [[dataclasses.replace(case, gated=True) for case in group] for group in groups]
    if smoke:
        return groups
    return [list(GATED_TARGETS)] + [[case for case in group if case not in GATED_TARGETS] for group in groups]


def smoke_limits(impls: list, smoke: bool) -> list:
    """In --smoke, cap the per-position implementations below the smoke long-context row, as the full-size
    caps are below the full-size one (and the Triton interpreter runs LeetDecoding's loop very slowly)."""
    if smoke:
        for impl in impls:
            if impl.name == "leetdecoding.fleet":
                impl.max_T = 16
            if impl.name == "fleetjax.scan":
                impl.max_T = SMOKE_LONG_CONTEXT.T - 1
    return impls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_common_args(parser)
    args = parser.parse_args(argv)
    impls = smoke_limits(forward_impls(smoke=args.smoke, skip_slow_autotune=args.skip_slow_autotune), args.smoke)
    impls = runner.select_impls(impls, args.impls)
    runner.run_main(args, "fwd", forward_cases(args.smoke, args.gated), impls, "forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
