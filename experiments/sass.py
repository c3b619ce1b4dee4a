"""Registers, spills and the SASS of each Mosaic GPU walk's chunk loop, compiled for sm_90 on a host without a
GPU: the op is lowered as in experiments/walk_ops.py, and each Mosaic module goes through the compile entry
point of jax's CUDA plugin (MosaicGpuCompile: the module to PTX, ptxas, nvdisasm) with a stand-in for the CUDA
driver (cuda_shim.c, built here with the host's C compiler) that answers as an H100/H200 would. ptxas then
reports registers and spills, and the loop with the most SASS instructions (the chunk loop) is counted by kind.

    PYTHONPATH=. python -m experiments.sass [--gated | --gate-only] [--scale S] [--walks JSON] [--out FILE]
                                            [--maxnreg N]

--maxnreg N: each walk's PTX compiled again by ptxas with the registers of a thread capped at N (``.maxnreg``),
as in a program whose warpgroups split the register file (setmaxnreg): what the cap costs in spills and
instructions before such a kernel is built.

Needs jax's CUDA plugin for the installed jax (jax-cuda13-pjrt or jax-cuda12-pjrt), ptxas and nvdisasm (the
nvidia-cuda-nvcc and nvidia-cuda-nvdisasm wheels: their bin directory is put first on PATH), and a C compiler.
The plugin compiles with the ptxas on PATH where it finds one, else with the compiler built into it (whose
allocation differs: 476 bytes of spills against 452 for the dq sums walk at 5195c21); the ptxas version is
recorded. Repeated runs of one tree may differ by a few instructions and spill bytes (the gated dq walk
compiled to 2181 instructions and 260 bytes of spills or to 2186 and 280 in runs of one command, whatever
the Python hash seed, 2026-12-05): compare trees on the ungated walks or over several runs. A static count:
instructions in the loop's text, every branch of it; the one block that most chunks
skip, the lazy carry's renormalization (MosaicWalkConfig.lazy_carry), is reported apart.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from experiments import walk_ops  # noqa: E402

# SASS opcodes by kind (the opcode before its first dot); the rest count as "other" (integer, address, moves).
OPCODES = {
    "float": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP"),
    "convert": ("F2F", "F2FP", "I2F", "I2FP", "F2I", "F2IP"),
    "select": ("FSEL", "SEL"),
    "mma": ("HGMMA",),
    "shared": ("STS", "LDS", "STSM", "LDSM"),
    "spill": ("STL", "LDL"),
    "mufu": ("MUFU",),
    "shuffle": ("SHFL",),
    "sync": ("BAR", "SYNCS", "WARPGROUP", "MEMBAR", "FENCE", "DEPBAR", "WARPSYNC"),
}
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
# A conditional branch: a loop's back edge where its label lies above it. (Unconditional backward branches
# return from the out-of-line blocks that ptxas puts after the function's end, such as barrier spin-waits.)
_BRANCH = re.compile(r"@!?P[T0-9]+\s+BRA\s+`?\(?(\.L_x_\d+)")


def loop_counts(sass: str) -> dict:
    """The SASS loop with the most instructions (a conditional backward branch to a label above it), by kind
    of opcode, and ``renormalization``: the instructions of its largest block of multiplies that a conditional
    branch jumps over (the lazy carry's, MosaicWalkConfig.lazy_carry), which most chunks do not run. (The
    pipeline's copies sit in such blocks too, of address arithmetic, which most chunks do run.)"""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [_LABEL.match(line)] if m}
    opcodes_in = lambda a, b: [m.group(1) for x in lines[a:b] for m in [_INSTRUCTION.search(x)] if m]  # noqa: E731
    best, span = None, (0, 0)
    for i, line in enumerate(lines):
        branch = _BRANCH.search(line)
        if branch and labels.get(branch.group(1), i) < i:
            ops = opcodes_in(labels[branch.group(1)], i + 1)
            if best is None or len(ops) > len(best):
                best, span = ops, (labels[branch.group(1)], i)
    skipped = [opcodes_in(i + 1, labels[m.group(1)]) for i in range(*span)
               for m in [_BRANCH.search(lines[i])] if m and i < labels.get(m.group(1), -1) <= span[1]]
    multiplies = [block for block in skipped if sum(op.startswith("FMUL") for op in block) >= 0.9 * len(block)]
    opcodes = collections.Counter(op.split(".")[0] for op in best or [])
    counts = {kind: sum(opcodes[name] for name in names) for kind, names in OPCODES.items()}
    counts["other"] = sum(opcodes.values()) - sum(counts.values())
    counts["total"] = sum(opcodes.values())
    return dict(counts, renormalization=max(map(len, multiplies), default=0), opcodes=dict(opcodes.most_common()))


def ptxas_report(text: str) -> dict:
    """Registers, spill bytes and stack frame from ptxas's verbose output."""
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_frame=number(r"(\d+) bytes stack frame"))


def _tools_path() -> str | None:
    """The bin directory of the nvidia-cuda-nvcc wheel (ptxas), if installed."""
    for entry in sys.path:
        for version in ("cu13", "cu12"):
            candidate = Path(entry) / "nvidia" / version / "bin"
            if (candidate / "ptxas").exists():
                return str(candidate)
    return None


def driver_stand_in(scratch: str) -> None:
    """Where the host has no CUDA driver: cuda_shim.c built in ``scratch`` and loaded as libcuda.so.1, its
    symbols global (the CUDA plugin's dlopen of libcuda.so.1 finds it, and a Mosaic kernel's host code links)."""
    if ctypes.util.find_library("cuda") is not None:
        return
    shim = Path(scratch) / "libcuda.so.1"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("a C compiler is needed for the CUDA driver stand-in (experiments/cuda_shim.c)")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(shim),
                    str(Path(__file__).with_name("cuda_shim.c"))], check=True)
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)


@contextlib.contextmanager
def compiler():
    """A function (serialized module) -> (ptxas output, SASS text) through the CUDA plugin's Mosaic GPU
    compile, with the driver stand-in loaded first where the host has no CUDA driver."""
    try:
        from jax_plugins import xla_cuda13 as plugin
    except ImportError:
        try:
            from jax_plugins import xla_cuda12 as plugin
        except ImportError:
            raise SystemExit("experiments/sass.py needs jax's CUDA plugin (pip install jax-cuda13-pjrt)") from None
    with tempfile.TemporaryDirectory() as scratch:
        driver_stand_in(scratch)
        library = ctypes.CDLL(plugin._get_library_path())
        compile_module = library.MosaicGpuCompile
        compile_module.argtypes = [ctypes.c_char_p, ctypes.c_int]
        compile_module.restype = ctypes.POINTER(ctypes.c_void_p)
        unload = library.MosaicGpuUnload
        unload.argtypes = [compile_module.restype]
        tools = _tools_path()

        def run(blob: bytes, maxnreg: int | None = None) -> tuple[str, str]:
            dump = tempfile.mkdtemp(dir=scratch)
            saved = dict(os.environ)
            os.environ.update(MOSAIC_GPU_DUMP_TO=dump, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_SASS="1",
                              MOSAIC_GPU_DUMP_PTX="1")
            if tools:
                os.environ["PATH"] = tools + os.pathsep + os.environ.get("PATH", "")
            try:
                compiled = compile_module(ctypes.c_char_p(blob), ctypes.c_int(len(blob)))
                if compiled:  # a real driver loaded it
                    unload(compiled)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            read = lambda suffixes: next((p.read_text() for s in suffixes  # noqa: E731
                                          for p in sorted(Path(dump).glob(f"*{s}"))), "")
            ptxas, sass, ptx = read([".ptxas"]), read([".sass", ".sass_ctrl"]), read([".ptx"])
            if maxnreg is not None:  # the plugin's PTX again, through ptxas and nvdisasm under the cap
                if not ptx or not tools:
                    raise RuntimeError("--maxnreg needs the module's PTX and the nvidia-cuda-nvcc wheel's ptxas")
                source, cubin = Path(dump) / "capped.ptx", Path(dump) / "capped.cubin"
                source.write_text(capped_ptx(ptx, maxnreg))
                tool = lambda name, *args: subprocess.run([str(Path(tools) / name), *args], check=True,  # noqa: E731
                                                          capture_output=True, text=True)
                done = tool("ptxas", "-arch=sm_90a", "-v", "-o", str(cubin), str(source))
                ptxas, sass = done.stdout + done.stderr, tool("nvdisasm", "-c", str(cubin)).stdout
            shutil.rmtree(dump, ignore_errors=True)
            if not ptxas or not sass:
                raise RuntimeError("the CUDA plugin wrote no ptxas report or SASS for this module")
            return ptxas, sass

        yield run


def capped_ptx(ptx: str, maxnreg: int) -> str:
    """``ptx`` with each entry's registers capped at ``maxnreg`` (a ``.maxnreg`` directive after its
    ``.maxntid``, which Mosaic GPU writes for every kernel)."""
    capped, count = re.subn(r"^(\.maxntid [^\n]*)$", rf"\1\n.maxnreg {maxnreg}", ptx, flags=re.MULTILINE)
    if not count:
        raise ValueError("no .maxntid directive in the PTX to put the register cap beside")
    return capped


def ptxas_version() -> str:
    tools = _tools_path()
    ptxas = shutil.which("ptxas", path=tools) if tools else shutil.which("ptxas")
    if ptxas is None:
        return "the plugin's own"
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return (re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"(.*)", out)).group(1)


def main(argv: list[str] | None = None) -> int:
    cap = argparse.ArgumentParser(add_help=False)
    cap.add_argument("--maxnreg", type=int, default=None)
    known, rest = cap.parse_known_args(argv)
    args = walk_ops.arguments(__doc__.split("\n\n")[0], rest)
    version = ptxas_version()
    with compiler() as compile_module:
        records = []
        for fields, _, blob in walk_ops.each_walk(args, serialized=True):
            ptxas, sass = compile_module(blob, known.maxnreg)
            records.append(dict(fields, ptxas=version, maxnreg=known.maxnreg, **ptxas_report(ptxas),
                                sass_loop=loop_counts(sass)))
    kinds = [*OPCODES, "other"]
    print(f"{'op':8} {'#':>2} {'kernel':14} {'regs':>4} {'spill':>5} {'loop':>5} {'renorm':>6} "
          + " ".join(f"{k:>7}" for k in kinds))
    for r in records:
        loop = r["sass_loop"]
        print(f"{r['op']:8} {r['module']:>2} {r['kernel'] or '':14} {r['registers']:>4} {r['spill_stores']:>5} "
              f"{loop['total']:>5} {loop['renormalization']:>6} " + " ".join(f"{loop[k]:>7}" for k in kinds))
    walk_ops.append(records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
