"""Compile the op's forward and backward for a Hopper GPU over a grid of small and odd shapes, on a host
without a GPU (the deviceless compile of experiments/xla_kernels.py), and list the cases that XLA or Pallas
fail to compile. XLA's GPU emitters fail at some fusions that only small shapes form (2026-12-06, jax
0.11.2: the gate's gradient at T <= 7 of a 64-chunk, "Failed to translate module to LLVM IR"); the CPU tests
cannot see such failures, and a device call is short. A case that compiles here is not shown correct: the
GPU tests check values.

    PYTHONPATH=. python -m experiments.compile_sweep [--impls pallas,pallas_fleet] [--T 1,7,70]
                                                     [--dims 5x24,64x64,128x128] [--dtypes bfloat16,float32]
                                                     [--device h100|h200] [--list]

Every case differentiates q, k, v, the per-head decay and the log gate (``--no-gate``: no gate), with and
without segments (with them, an initial state and the final state too); B = 2, H = 3. Prints one line a
case and exits 1 if any failed. Needs what experiments/sass.py needs (jax's CUDA plugin, a C compiler).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass(frozen=True)
class Case:
    implementation: str
    T: int
    K: int
    V: int
    dtype: str
    gated: bool
    segments: bool
    B: int = 2
    H: int = 3

    @property
    def name(self) -> str:
        return (f"{self.implementation} B{self.B} T{self.T} H{self.H} K{self.K} V{self.V} {self.dtype}"
                + " gated" * self.gated + " segments+state" * self.segments)


def cases(impls, Ts, dims, dtypes, gated: bool) -> list[Case]:
    """The grid, implementations outermost; ``dims`` (K, V) pairs."""
    return [Case(impl, T, K, V, dtype, gated, segments)
            for impl, T, (K, V), dtype, segments in itertools.product(impls, Ts, dims, dtypes, (False, True))]


def compile_case(case: Case, device: str, sharding) -> None:
    """Trace, lower and compile ``case``'s forward and VJP for ``device``; raises what the compile raises."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fleetjax
    from experiments import xla_kernels

    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    spec = lambda shape, dtype=case.dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    segment_ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (B, T)), axis=1)) if case.segments \
        else None

    def op(q, k, v, decay, log_gate, initial_state):
        return fleetjax.fleet_attention(q, k, v, decay, log_gate=log_gate, initial_state=initial_state,
                                        segment_ids=segment_ids, return_final_state=case.segments,
                                        implementation=case.implementation)

    def forward_and_backward(q, k, v, decay, log_gate, initial_state, do):
        out, pullback = jax.vjp(op, q, k, v, decay, log_gate, initial_state)
        return out, pullback(out if not case.segments else (do, out[1]))

    operands = (spec((B, T, H, K)), spec((B, T, H, K)), spec((B, T, H, V)), spec((H,), jnp.float32),
                spec((B, T, H), jnp.float32) if case.gated else None,
                spec((B, H, K, V), jnp.float32) if case.segments else None, spec((B, T, H, V)))
    xla_kernels.compiled_for(forward_and_backward, operands, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", default="pallas,pallas_fleet,xla", help="implementations, comma-separated")
    ap.add_argument("--T", default="1,2,7,8,9,65,70,129", help="sequence lengths, comma-separated")
    ap.add_argument("--dims", default="5x24,64x64,128x128", help="KxV head dims, comma-separated")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--no-gate", action="store_true", help="the constant decay alone (default: with a log gate)")
    ap.add_argument("--device", default="h100", choices=("h100", "h200"))
    ap.add_argument("--list", action="store_true", help="print the cases without compiling them")
    args = ap.parse_args(argv)
    try:
        dims = [tuple(int(d) for d in pair.split("x")) for pair in args.dims.split(",")]
        Ts = [int(t) for t in args.T.split(",")]
    except ValueError:
        ap.error(f"--T must be integers and --dims KxV pairs, got {args.T!r} and {args.dims!r}")
    if any(len(pair) != 2 for pair in dims):
        ap.error(f"--dims must be KxV pairs, got {args.dims!r}")
    grid = cases(args.impls.split(","), Ts, dims, args.dtypes.split(","), gated=not args.no_gate)
    if args.list:
        print("\n".join(case.name for case in grid))
        return 0

    from experiments import xla_kernels
    sharding = xla_kernels.described_device(args.device)
    failed = 0
    for case in grid:
        start = time.perf_counter()
        try:
            compile_case(case, args.device, sharding)
            status = "ok"
        except Exception as error:  # noqa: BLE001  any compile failure is the finding
            failed += 1
            status = "FAILED " + next((line for line in str(error).splitlines() if line.strip()), "")[:160]
        print(f"{case.name}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{len(grid) - failed} of {len(grid)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
