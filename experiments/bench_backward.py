"""Forward+backward benchmark (issue 5): time and extra peak memory.

    PYTHONPATH=. python -m experiments.bench_backward [--out DIR] [--smoke] [--budget-s 450] ...

Writes <date>-<device>-backward.json (op "fwd_bwd") and .png to --out (default experiments/results) and
prints a table. One call computes o and the gradients for q, k, v (fleetjax: and the decay) from the same
dO; each record says whether the implementation returns a decay gradient ("decay_grad"), its relative
errors per gradient against the float32 reference (relerr = the largest of dq, dk, dv), and its extra
peak memory (peak above the inputs, less the outputs). Shapes and order as bench_forward, the long-context
row B1 H16 T=131072 K=V=128 included.

--gated: per-token log gates and no per-head decay, cases as bench_forward --gated; fleetjax (``log_gate``)
against fla's chunk_simple_gla (``g=``), both returning the log gate's gradient: the records say
"gate_grad" instead of "decay_grad" and carry relerr_dlog_gate (relerr stays the largest of dq, dk, dv).
Results file <date>-<device>-backward-gated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.environment import setup_jax_environment  # noqa: E402

setup_jax_environment()

from experiments import runner  # noqa: E402
from experiments.bench_forward import forward_cases  # noqa: E402
from experiments.peers import backward_impls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_common_args(parser)
    args = parser.parse_args(argv)
    impls = runner.select_impls(backward_impls(smoke=args.smoke, skip_slow_autotune=args.skip_slow_autotune),
                                args.impls)
    runner.run_main(args, "fwd_bwd", forward_cases(args.smoke, args.gated), impls, "backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
