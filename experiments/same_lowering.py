"""Whether a change to the Mosaic GPU walks' code changes what they lower to, on a machine without a GPU: the
op is lowered for sm_90 (experiments/walk_ops.py's capture) in a table of variants that between them take
every form of the walk kernels (forward and backward; constant decay, gate and decay, gate alone; bfloat16
and float16; one and two warpgroups, with and without Pallas's automatic barriers, the sums walks
on one and two; own pieces and the states-only walk; scale 1, 0.5 and K^-1/2; K = V = 64; every boolean of
MosaicWalkConfig flipped; the backward's pieces' states from the Triton launches; the decay fixed, or alone
learned),
and each Mosaic module's text is written to a folder; two folders are then compared module by module, the
kernels' names aside (renaming a kernel changes no instruction).

    PYTHONPATH=. python -m experiments.same_lowering dump DIR [--cases NAME,...]
    PYTHONPATH=. python -m experiments.same_lowering compare DIR_BEFORE DIR_AFTER

Dump before and after a change, with the same jax: equal texts mean the same kernels. jax 0.11.2 (the
H200's) canonicalizes the modules before they are captured, so arithmetic that folds away (x * 1 + 0) does
not show there; jax 0.10.2 keeps it. The fleetjax.pallas.mosaic package's split into a kernel a stage was
checked so (2026-12-05): all 79 modules of the table equal under jax 0.11.2; so was the move of the sums walk's
update into Walker.exact_update (the 79 against the 79 of the table before it).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from experiments import walk_ops  # noqa: E402
from fleetjax.pallas import mosaic  # noqa: E402

_PIECES = dict(T=2048, walks=dict(forward_pieces=4), config=dict(num_sequence_pieces=2,
                                                                 backward_num_sequence_pieces=4))
_FLAGS = dict(lazy_carry=False, split_by_bits=False, approx_exp=False, auto_barriers=True)
# Name -> the variant's changes from bfloat16 B1 T=512 H2 K = V = 128, the decay learned, MosaicWalkConfig().
VARIANTS = {
    "default": {}, "gated": dict(gated=True), "gate_only": dict(gated=True, decay=False),
    "f16": dict(dtype="float16"), "f16_gated": dict(dtype="float16", gated=True),
    "wide": dict(walks=dict(warpgroups=2, backward_warpgroups=2)),
    "wide_gated": dict(walks=dict(warpgroups=2, backward_warpgroups=2), gated=True),
    "wide_f16": dict(dtype="float16", walks=dict(warpgroups=2, backward_warpgroups=2)),
    "scale1_gated": dict(scale=1.0, gated=True), "scale05": dict(scale=0.5),
    "pieces": _PIECES, "pieces_gated": dict(_PIECES, gated=True),
    "pieces_triton_states": dict(_PIECES, walks=dict(_PIECES["walks"], backward_piece_states=False)),
    "k64": dict(K=64, V=64, walks=dict(block_v=32)),
    "flags_gated": dict(walks=_FLAGS, gated=True),
    "narrow_forward": dict(walks=dict(forward_block_v=32, warpgroups=2)),
    "sums_wide": dict(walks=dict(sums_warpgroups=2)),
    "gate_dk_narrow": dict(walks=dict(gate_dk_warpgroups=1), gated=True),
    "gate_dq_narrow": dict(walks=dict(gate_dq_warpgroups=1), gated=True, decay=False),
    "wide_bare": dict(walks=dict(warpgroups=2, backward_warpgroups=2, sums_warpgroups=2, wide_auto_barriers=False)),
    "wide_bare_gated": dict(walks=dict(warpgroups=2, backward_warpgroups=2, wide_auto_barriers=False), gated=True),
}
# Backward-only variants: which inputs are differentiated.
GRADIENTS = {"fixed": ("q", "k", "v"), "fixed_gated": ("q", "k", "v"), "gate_only_gate": ("log_gate",),
             "decay_only": ("decay",), "gated_decay_only": ("decay",)}
_BASE_OF = {"fixed_gated": "gated", "gate_only_gate": "gate_only", "gated_decay_only": "gated"}


def lower(*, walks: dict | None = None, wrt: tuple[str, ...] | None = None, **case) -> list[str]:
    """The Mosaic modules' texts, in order, of one case of the table (experiments/walk_ops.lowered's op): its
    forward where ``wrt`` is None, else its gradient with respect to ``wrt`` (argument names)."""
    with walk_ops.capture_modules() as modules:
        return walk_ops.lowered(modules, backward=wrt is not None, walks=mosaic.MosaicWalkConfig(**(walks or {})),
                                wrt=wrt, **case)


def cases() -> dict[str, dict]:
    """Every case of the table: fwd_<variant> and bwd_<variant> (every input with a gradient), then the
    backward-only ones."""
    table = {}
    for backward in (False, True):
        for name, changes in VARIANTS.items():
            every = (walk_ops.ARGUMENTS[:3] + ("decay",) * changes.get("decay", True)
                     + ("log_gate",) * changes.get("gated", False))
            table[f"{'bwd' if backward else 'fwd'}_{name}"] = dict(changes, wrt=every if backward else None)
    for name, wrt in GRADIENTS.items():
        table[f"bwd_{name}"] = dict(VARIANTS[_BASE_OF.get(name, "default")], wrt=wrt)
    return table


def dump(folder: str, names: list[str] | None = None) -> int:
    """Writes <case>_<module index>.mlir for each case (all, or ``names``) into ``folder``; the module count."""
    table = cases()
    unknown = sorted(set(names or ()) - set(table))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(table)}")
    os.makedirs(folder, exist_ok=True)
    written = 0
    for name in names or table:
        for index, text in enumerate(lower(**table[name])):
            Path(folder, f"{name}_{index}.mlir").write_text(text)
            written += 1
        print(name, flush=True)
    return written


def _unnamed(text: str) -> str:
    """The module's text with its kernel's name replaced: its symbol, the module's name and its dump name
    (jax 0.11's, which also counts the modules a process lowered)."""
    text = re.sub(r"^module @\w+", "module @kernel", text, flags=re.M)
    text = re.sub(r'dump_basename = "\w+"', 'dump_basename = "kernel"', text)
    return re.sub(r"@\w+_mosaic_gpu", "@kernel_mosaic_gpu", text)


def compare(before: str, after: str) -> list[str]:
    """The modules (file names) whose texts differ between two dumps, names aside, or that one lacks."""
    files = sorted(set(os.listdir(before)) | set(os.listdir(after)))
    differ = []
    for file in files:
        a, b = (Path(folder, file) for folder in (before, after))
        if not (a.exists() and b.exists()):
            differ.append(file)
            print(f"{file}: only in {before if a.exists() else after}")
            continue
        lines = [_unnamed(path.read_text()).splitlines() for path in (a, b)]
        if lines[0] != lines[1]:
            changed = sum(1 for line in difflib.unified_diff(*lines, lineterm="", n=0)
                          if line[:1] in "+-" and line[:3] not in ("+++", "---"))
            differ.append(file)
            print(f"{file}: {changed} lines differ")
    print(f"{len(files) - len(differ)} of {len(files)} modules the same")
    return differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="lower the table's cases and write their modules to DIR")
    d.add_argument("folder", metavar="DIR")
    d.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    c = sub.add_parser("compare", help="compare two dumps; exit status 1 where any module differs")
    c.add_argument("before")
    c.add_argument("after")
    args = ap.parse_args(argv)
    if args.command == "dump":
        print(f"{dump(args.folder, args.cases.split(',') if args.cases else None)} modules, jax {jax.__version__}")
        return 0
    return 1 if compare(args.before, args.after) else 0


if __name__ == "__main__":
    raise SystemExit(main())
