"""What each Mosaic GPU walk does per chunk, counted on a machine without a GPU: the op (forward, or forward and
backward with every gradient, the decay's included) is lowered for an sm_90 GPU, each Mosaic kernel's module
is read as text, and the ops in its chunk loop (the scf.for with the most ops: the pipeline's body) are
counted by kind, with the kernel's shared-memory request.

    PYTHONPATH=. python -m experiments.walk_ops [--gated | --gate-only] [--scale S] [--walks JSON] [--out FILE]

The counts are of the lowered module, before LLVM: an op on a register pair (vector<2xf32>) counts once, a
multiply by the constant 1.0 is still there (LLVM drops it later), and dead ops are not removed. So they
compare two trees' walks, kind by kind; the GPU's instruction counts (MOSAIC_GPU_DUMP_PTX, ptxas) and times
stay the measure. The default config is MosaicWalkConfig() at B1 T=512 H2, K = V = 128, bfloat16, so every
walk runs in one piece on one warpgroup; ``--walks`` changes its fields (two warpgroups, say).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fleetjax  # noqa: E402
from fleetjax.pallas import chunked, mosaic  # noqa: E402

# Op kinds, by the op's name in the lowered module.
KINDS = {
    "float": ("arith.addf", "arith.subf", "arith.mulf", "arith.negf", "arith.divf", "arith.maximumf",
              "arith.minimumf", "math.fma"),
    "exp": ("math.exp", "math.exp2"),
    "convert": ("arith.truncf", "arith.extf"),
    "select": ("arith.select",),
    "shuffle": ("nvvm.shfl.sync",),
}
# Ops by a phrase of their line: those without a result, and inline assembly by the instruction it holds.
# jax 0.10.2 and 0.11.2 (the H200's) spell some differently: 0.11.2 writes a warpgroup's tile to shared memory
# with stmatrix where 0.10.2 stores each register, waits on wgmmas and takes approx_math's exp2 in inline
# assembly.
LINES = {"store": ("llvm.store ", "vector.store ", "nvvm.stmatrix"), "wgmma": ("wgmma.mma_async",),
         "wgmma_wait": ("wgmma.wait.group", "wgmma.wait_group"), "barrier": ("nvvm.barrier", "bar.sync"),
         "exp": ("ex2.approx",)}


@contextlib.contextmanager
def capture_modules(serialized: list | None = None):
    """A list that fills with the text of every Mosaic GPU module lowered inside the context; ``serialized``,
    a list, also fills with each module as the CUDA plugin's compile entry point takes it (serialized
    bytecode, experiments/sass.py)."""
    from jax.experimental.mosaic.gpu import core
    if not hasattr(core, "_run_serde_pass"):
        raise SystemExit("this jax's Mosaic GPU lowering has no serde pass to read the modules from")
    modules, serde = [], core._run_serde_pass

    def capture(module, *args, **kwargs):
        modules.append(module.operation.get_asm(enable_debug_info=False))
        if serialized is not None:  # a copy through the serde pass, as Mosaic GPU's own compile path takes it
            copy = io.BytesIO()
            module.operation.write_bytecode(copy)
            copy = type(module).parse(copy.getvalue(), context=module.context)
            out = io.BytesIO()
            serde(copy, serialize=True, ir_version=None).operation.write_bytecode(out)
            serialized.append(out.getvalue())
        return serde(module, *args, **kwargs)

    core._run_serde_pass = capture
    try:
        yield modules
    finally:
        core._run_serde_pass = serde


def _loop_bodies(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every scf.for's body: up to the brace at the loop's own indentation."""
    bodies = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        end = next(j for j in range(i + 1, len(lines))
                   if lines[j].strip().startswith("}") and len(lines[j]) - len(lines[j].lstrip()) == indent)
        bodies.append((i + 1, end))
    return bodies


def count(module: str) -> dict:
    """The chunk loop's ops by kind (and by op name) and the module's shared-memory request in bytes."""
    lines = module.splitlines()
    ops_in = lambda a, b: collections.Counter(  # noqa: E731
        m.group(1) for line in lines[a:b] for m in [re.search(r"= ([a-z_]+\.[a-z_.0-9]+)", line)] if m)
    first, last = max(_loop_bodies(lines), key=lambda body: sum(ops_in(*body).values()))
    ops = ops_in(first, last)
    body = lines[first:last]
    kinds = collections.Counter({kind: sum(ops[name] for name in names) for kind, names in KINDS.items()})
    kinds.update({kind: sum(any(phrase in line for phrase in phrases) for line in body)
                  for kind, phrases in LINES.items()})
    return dict(kinds, total=sum(kinds.values()), shared_bytes=shared_bytes(module),
                ops={name: n for name, n in sorted(ops.items()) if any(name in names for names in KINDS.values())})


def shared_bytes(module: str) -> int:
    """The kernel's dynamic shared-memory request in bytes: its scratch and its barriers (the limit a launch
    is checked against)."""
    return int(re.search(r"dynamic_shared_memory_size %c(\d+)_i32", module).group(1))


# The op's arguments by name, in order (``lowered``'s ``wrt``).
ARGUMENTS = ("q", "k", "v", "decay", "log_gate")


def lowered(modules: list[str], *, gated: bool = False, backward: bool, scale: float | None = None,
            walks: mosaic.MosaicWalkConfig, decay: bool = True, dtype: str = "bfloat16", T: int = 512, K: int = 128,
            V: int = 128, config: dict | None = None, wrt: tuple[str, ...] | None = None) -> list[str]:
    """The Mosaic modules of the op at B1 H2 (T=512, K = V = 128 bfloat16 unless said), lowered for sm_90, in
    order (``modules``: the list of :func:`capture_modules`, in whose context this runs): its forward, or with
    ``backward`` its gradient with respect to ``wrt`` (names of ARGUMENTS; None: every input it has). ``decay``
    False (with ``gated``): no per-head decay, the gate alone, as the gated benchmarks run. ``config``:
    PallasConfig fields to change from the default config."""
    if not (decay or gated):
        raise ValueError("the op needs a per-head decay or a gate: decay=False takes gated=True")
    modules.clear()
    q = jnp.zeros((1, T, 2, K), dtype)
    v = jnp.zeros((1, T, 2, V), dtype)
    gate = jnp.full((1, T, 2), -0.01, jnp.float32) if gated else None
    pallas = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=walks, **(config or {}))

    def f(q, k, v, decay, gate):
        return fleetjax.fleet_attention(q, k, v, decay, scale=scale, log_gate=gate, implementation="pallas",
                                        config=pallas).astype(jnp.float32).sum()

    if backward:
        wrt = ARGUMENTS[:3] + ("decay",) * decay + ("log_gate",) * gated if wrt is None else wrt
        f = jax.grad(f, argnums=tuple(ARGUMENTS.index(name) for name in wrt))
    per_head = jnp.asarray([0.9, 0.99]) if decay else None
    jax.jit(f).trace(q, q, v, per_head, gate).lower(lowering_platforms=("cuda",))
    return list(modules)


def arguments(description: str, argv: list[str] | None):
    """The options this tool and experiments/sass.py share: --gated, --gate-only, --scale, --walks, --T,
    --config, --out."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--gated", action="store_true", help="with a log gate (its gradient too), beside the decay")
    ap.add_argument("--gate-only", action="store_true",
                    help="a log gate and no per-head decay (the gated benchmarks' op); implies --gated")
    ap.add_argument("--scale", type=float, default=None, help="the op's scale (default None: K^-1/2)")
    ap.add_argument("--walks", default=None, metavar="JSON",
                    help='MosaicWalkConfig fields to change from its defaults, e.g. \'{"warpgroups": 2}\' (the '
                         'forward on two warpgroups)')
    ap.add_argument("--T", type=int, default=512, help="the sequence length (default 512)")
    ap.add_argument("--config", default=None, metavar="JSON",
                    help='PallasConfig fields to change from the default config, e.g. \'{"num_sequence_pieces": 2, '
                         '"backward_num_sequence_pieces": 4}\' with --T 2048 (the walks in sequence pieces, with '
                         'their pieces\' states walks)')
    ap.add_argument("--out", default=None, help="append one JSON line per kernel to this file")
    args = ap.parse_args(argv)
    args.gated = args.gated or args.gate_only
    return args


def each_walk(args, serialized: bool = False):
    """(the walk's record fields, its module's text, the module serialized or None) for every Mosaic walk of
    the forward, then of forward and backward, as :func:`lowered` gives them under ``args``."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    changes = json.loads(args.walks) if args.walks else {}
    walks = mosaic.MosaicWalkConfig(**changes)
    config = json.loads(args.config) if args.config else None
    for backward in (False, True):
        blobs: list[bytes] | None = [] if serialized else None
        with capture_modules(serialized=blobs) as captured:
            modules = lowered(captured, gated=args.gated, backward=backward, scale=args.scale, walks=walks,
                              decay=not args.gate_only, T=args.T, config=config)
        for index, module in enumerate(modules):
            name = re.search(r"func\.func @(\w+?)(?:_mosaic_gpu)?\b", module)
            fields = dict(op="fwd_bwd" if backward else "fwd", module=index,
                          kernel=name.group(1) if name else None, gated=args.gated, scale=args.scale,
                          decay=not args.gate_only,
                          walks=changes, T=args.T, config=config, git_commit=commit, jax=jax.__version__)
            yield fields, module, blobs[index] if serialized else None


def append(records: list[dict], path: str | None) -> None:
    """One JSON line per record at the end of ``path`` (None: nowhere)."""
    if path:
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.split("\n\n")[0], argv)
    records = [dict(fields, **count(module)) for fields, module, _ in each_walk(args)]
    print(f"{'op':8} {'#':>2} {'kernel':14} {'total':>6} {'float':>6} {'exp':>4} {'convert':>7} {'select':>6} "
          f"{'shuffle':>7} {'store':>6} {'wgmma':>6} {'wait':>5} {'barrier':>7} {'smem KiB':>8}")
    for r in records:
        print(f"{r['op']:8} {r['module']:>2} {r['kernel'] or '':14} {r['total']:>6} {r['float']:>6} {r['exp']:>4} "
              f"{r['convert']:>7} {r['select']:>6} {r['shuffle']:>7} {r['store']:>6} {r['wgmma']:>6} "
              f"{r['wgmma_wait']:>5} {r['barrier']:>7} {r['shared_bytes'] / 1024:>8.1f}")
    append(records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
