"""``fleetjax check`` with what only a GPU has time for: edge and large shapes, both dtypes, extra configs.

    PYTHONPATH=. python experiments/gpu_check.py [--large] [--configs] [--dtypes float32,bfloat16]
                                                 [--implementations NAMES] [--repeats N] [--out DIR]

Runs :func:`fleetjax.check.report` (every implementation against implementation="scan": output, final state,
every gradient, repeated calls bit for bit, median times) on the default shapes of this backend plus T = 1
and T = 7; --large adds T = 1000 and 4096 with head dims up to 256; --configs also runs the Pallas
implementations with configs that take their other paths (rank and value blocks, sequence pieces, the
per-token walk): fields changed in the default config that each record gives for the shape. Writes every
row, with its per-output errors, to experiments/results/<date>-<device>-gpu_check.json (or --out). Off the
GPU the Pallas implementations run interpreted, on the small shapes only. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import environment, records  # noqa: E402

environment.setup_jax_environment()

from fleetjax import api, check  # noqa: E402
from fleetjax.check import CheckShape, Variant  # noqa: E402

EDGE_SHAPES = (CheckShape(B=1, T=1, H=2, K=16, V=16),
               CheckShape(B=2, T=7, H=3, K=33, V=24, segments=True, gated=True))
LARGE_SHAPES = (
    CheckShape(B=2, T=1000, H=3, K=64, V=48, segments=True, gated=True),
    CheckShape(B=2, T=4096, H=4, K=128, V=128),
    CheckShape(B=1, T=4096, H=2, K=256, V=256, initial_state=False),
)
# Extra configs per implementation: changes to the fields of its default config for each shape.
CONFIGS = {
    "pallas_fleet": {
        "rank blocks": dict(block_k=16, block_v=16, tokens_per_step=16),
        "rank blocks, 3 pieces": dict(block_k=16, block_v=16, tokens_per_step=16, num_sequence_pieces=3),
        "per-token walk": dict(tokens_per_step=1, block_v=32),
    },
    "pallas": {"3 pieces": dict(num_sequence_pieces=3, backward_num_sequence_pieces=3)},
}


def variants(names: Sequence[str], with_configs: bool) -> list[Variant]:
    """Each implementation with its default config, then (with_configs) with each of CONFIGS, applied to the
    default config that its record gives for each shape."""
    chosen = [Variant(name) for name in names]
    for name in names if with_configs else ():
        impl = api.IMPLEMENTATIONS.get(name)
        for label, changes in CONFIGS.get(name, {}).items() if impl is not None else ():
            config = functools.partial(_changed_default, impl.default_config, changes)
            chosen.append(Variant(name, config, label))
    return chosen


def _changed_default(default_config: Callable, changes: dict, q, v):
    return dataclasses.replace(default_config(q, v), **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementations", default=None, help="comma-separated (default: all registered)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated input dtypes")
    parser.add_argument("--large", action="store_true", help="add T = 1000 and 4096, head dims up to 256")
    parser.add_argument("--configs", action="store_true", help="also the Pallas implementations' extra configs")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--out", default=None, help="directory of the JSON (default: experiments/results)")
    args = parser.parse_args(argv)
    names = sorted(api.IMPLEMENTATIONS) if args.implementations is None else args.implementations.split(",")
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in check.TOLERANCE:
            parser.error(f"--dtypes: {dtype!r} is not one of {', '.join(check.TOLERANCE)}")
    shapes = check.default_shapes() + EDGE_SHAPES + (LARGE_SHAPES if args.large else ())
    chosen = variants(names, args.configs)

    results = [(dtype, row) for dtype in dtypes
               for row in check.report(chosen, shapes, dtype=dtype, repeats=args.repeats)]
    path = records.results_path("gpu_check", out_dir=args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": records.device_info(), "date": records.today(),
                                "versions": records.versions(), "tolerance": check.TOLERANCE,
                                "shapes": [str(shape) for shape in shapes],
                                "rows": [dict(dtype=dtype, **dataclasses.asdict(row)) for dtype, row in results]},
                               indent=1) + "\n")
    failed = sum(row.failed for _, row in results)
    print(f"{failed} failed of {len(results)}; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
