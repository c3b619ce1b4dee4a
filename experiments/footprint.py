"""Shared memory, registers and spills of fleetjax's Pallas kernels for sm_90, measured on a machine without a
GPU: the kernels are lowered to Triton IR for the CUDA platform (jax.export), compiled by Triton for sm_90
and assembled by ptxas, and the numbers are compared with the model in fleetjax.pallas.launch.

    PYTHONPATH=. python -m experiments.footprint --triton-python /tmp/tvenv/bin/python [--grid small|full|defaults]

``--triton-python``: a Python with ``triton`` installed (``python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip
install triton==3.6.0``; the GPU machine has Triton 3.6 too, and XLA's Triton agreed with it to the byte on
the kernels measured). Writes one JSON line per kernel and configuration to --out and prints the largest
ratio of measured to modelled shared memory; the model is used to choose default configs, so it must not
under-estimate. ``--grid defaults`` instead compiles every Pallas implementation with its *default* config
(as chosen for an H100/H200: 227 KiB of shared memory, 132 SMs) over the head dims {64, 100, 128, 130, 200,
256} x {K = V, V = 2K, K = 2V} x {bfloat16, float32} (float16 takes bfloat16's tiles) and exits 1 if a
kernel needs more shared memory than the device has or Triton refuses it: the crash a user would meet on
the GPU, found without one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: E402

import fleetjax  # noqa: E402
from fleetjax.pallas import chunked, fleet, launch  # noqa: E402
from fleetjax.pallas import walk as walk_module  # noqa: E402

_COMPILE = r'''
import json, os, re, subprocess, sys, tempfile, triton
from triton.backends.compiler import GPUTarget
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
for line in sys.stdin:
    job = json.loads(line)
    try:
        kernel = triton.compile(job["path"], target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                text=True).stderr
        regs = re.search(r"Used (\d+) registers", report)
        spill = re.search(r"(\d+) bytes spill stores", report)
        job.update(shared=kernel.metadata.shared, registers=int(regs.group(1)) if regs else None,
                   spill_bytes=int(spill.group(1)) if spill else None,
                   wgmma=kernel.asm["ptx"].count("wgmma.mma_async"))
    except Exception as error:  # a kernel Triton refuses is a result too
        job.update(error=str(error)[-300:])
    print(json.dumps(job), flush=True)
'''


class Capture:
    """Collects the Triton modules that Pallas lowers, with each kernel's launch parameters."""

    def __init__(self):
        self.modules: list[str] = []
        self._lower = registration.lowering.lower_jaxpr_to_triton_module

        def lower(*args, **kwargs):
            result = self._lower(*args, **kwargs)
            self.modules.append(result.module.operation.get_asm())
            return result

        registration.lowering.lower_jaxpr_to_triton_module = lower

    def kernels(self, fn, *avals, directory: str) -> list[dict]:
        start = len(self.modules)
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*avals)
        params = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32',
                            exported.mlir_module())
        jobs, seen = [], {}
        for module in self.modules[start:]:
            name = re.search(r"module @(\S+)", module).group(1)
            matches = [p for p in params if p[0] == name]
            index = seen.get(name, 0)
            seen[name] = index + 1
            _, stages, warps = matches[index]
            path = os.path.join(directory, f"{len(os.listdir(directory))}_{name}.ttir")
            Path(path).write_text(module)
            jobs.append(dict(kernel=name, path=path, num_warps=int(warps), num_stages=int(stages)))
        return jobs


_KERNEL_OF = {"fleet_forward": "forward", "fleet_piece_states": "piece_states",
              "fleet_piece_states_reverse": "piece_states", "fleet_backward_dq": "dq", "fleet_backward_dv": "dv",
              "fleet_backward_dk": "dk"}


def grid(size: str):
    """(dtype, K, V, walk) to measure. float16 takes the shared memory of bfloat16 (both 2 bytes)."""
    dims = [(128, 128), (128, 256), (256, 256)] if size == "small" else [(64, 64), (128, 128), (128, 256),
                                                                       (256, 128), (256, 256)]
    walks = ((64, 64, 3), (64, 32, 3), (64, 32, 2), (32, 32, 3), (64, 16, 2))
    if size == "full":
        walks = tuple((c, b, s) for c in (32, 64) for b in (16, 32, 64) for s in (1, 2, 3, 4))
    for dtype in ("bfloat16", "float32"):
        for K, V in dims:
            for chunk_size, block_v, stages in walks:
                yield dtype, K, V, chunked.WalkConfig(chunk_size=chunk_size, block_v=block_v, num_stages=stages)


H100_SHARED_MEMORY = 227 * 1024  # opt-in bytes per block on sm_90 (H100 and H200 alike)
DEFAULT_DIMS = (64, 100, 128, 130, 200, 256)
DEFAULT_LAYOUTS = {"K=V": lambda d: (d, d), "V=2K": lambda d: (d, 2 * d), "K=2V": lambda d: (2 * d, d)}


def default_jobs(capture: Capture, directory: str) -> list[dict]:
    """Every compiled Pallas implementation with the config its record chooses, forward and backward, on the
    head-dim grid; shapes as tests/test_head_dims.py and a long one (its defaults split the sequence)."""
    jobs = []
    for implementation in ("pallas", "pallas_fleet"):
        record = fleetjax.IMPLEMENTATIONS[implementation]
        for dtype in ("bfloat16", "float32"):
            dt = jnp.dtype(dtype)
            for dim in DEFAULT_DIMS:
                for layout, dims in DEFAULT_LAYOUTS.items():
                    K, V = dims(dim)
                    for B, T, H in ((1, 150, 2), (1, 16384, 8)):
                        q, v = jax.ShapeDtypeStruct((B, T, H, K), dt), jax.ShapeDtypeStruct((B, T, H, V), dt)
                        decay = jax.ShapeDtypeStruct((H,), jnp.float32)
                        config = record.config_for(None, jnp.zeros(q.shape, dt), jnp.zeros(v.shape, dt))

                        def loss(q, k, v, decay):
                            o, final = fleetjax.fleet_attention(q, k, v, decay, implementation=implementation,
                                                                config=config, return_final_state=True)
                            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

                        label = dict(implementation=implementation, dtype=dtype, K=K, V=V, layout=layout,
                                     shape=[B, T, H], config=str(config))
                        try:
                            found = capture.kernels(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), q, q, v,
                                                    decay, directory=directory)
                        except ValueError as error:  # the default refused by its own check: a failure
                            jobs.append(dict(label, kernel="(config check)", error=str(error)))
                            continue
                        jobs.extend(dict(job, **label) for job in found)
    return jobs


def report_defaults(lines: list[str], out) -> int:
    failures = 0
    for line in lines:
        job = json.loads(line)
        out.write(line + "\n")
        over = job.get("shared", 0) > H100_SHARED_MEMORY
        failed = "error" in job or over
        failures += failed
        print(f"{'FAIL' if failed else 'ok  '} {job['implementation']:12s} {job['dtype']:9s} {job['layout']:5s} "
              f"K{job['K']:<4d} V{job['V']:<4d} T{job['shape'][1]:<6d} {job['kernel']:28s} "
              f"shared {job.get('shared', '-')!s:>7s} regs {job.get('registers')} spill {job.get('spill_bytes')}"
              + (f" {job['error'][-160:]}" if "error" in job else ""))
    print(f"{failures} of {len(lines)} kernels fail (limit {H100_SHARED_MEMORY} bytes of shared memory)")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-python", required=True)
    parser.add_argument("--grid", choices=("small", "full", "defaults"), default="small")
    parser.add_argument("--out", default="footprint.jsonl")
    args = parser.parse_args(argv)
    for module in (launch, chunked, fleet, walk_module):  # lower as a GPU would: Triton, not interpret mode
        module.on_gpu = lambda: True
    for module in (launch, chunked, fleet):  # the limits of an sm_90 GPU, as its driver reports them
        module.shared_memory_per_block = lambda: H100_SHARED_MEMORY
        module.multiprocessor_count = lambda: 132
    capture = Capture()
    directory = tempfile.mkdtemp(prefix="fleetjax-ttir-")
    if args.grid == "defaults":
        jobs = default_jobs(capture, directory)
        # Many shapes lower to the same kernel: compile each distinct module and launch once.
        key = lambda job: (hashlib.sha1(Path(job["path"]).read_bytes()).hexdigest(), job["num_warps"],  # noqa: E731
                           job["num_stages"])
        unique = {key(j): j for j in jobs if "error" not in j}
        result = subprocess.run([args.triton_python, "-c", _COMPILE], capture_output=True, text=True,
                                input="\n".join(json.dumps(j) for j in unique.values()))
        if result.stderr.strip():
            print(result.stderr[-2000:], file=sys.stderr)
        measured = {key(m): m for m in map(json.loads, result.stdout.splitlines())}
        fields = ("shared", "registers", "spill_bytes", "wgmma", "error")
        lines = [json.dumps(dict(j, **{f: measured[key(j)][f] for f in fields if f in measured[key(j)]})
                                if "error" not in j else j) for j in jobs]
        with open(args.out, "w") as out:
            return report_defaults(lines, out)
    chunked.check_fits = lambda *args, **kwargs: None  # measure what the model would refuse, too
    jobs = []
    seen_pieces: dict = {}
    for dtype, K, V, walk in grid(args.grid):
        dt = jnp.dtype(dtype)
        q, v = jax.ShapeDtypeStruct((2, 256, 2, K), dt), jax.ShapeDtypeStruct((2, 256, 2, V), dt)
        decay = jax.ShapeDtypeStruct((2,), jnp.float32)
        config = chunked.PallasConfig(forward=walk, dq=walk, dv=walk, dk=walk, num_sequence_pieces=2,
                                      backward_num_sequence_pieces=2)

        def loss(q, k, v, decay):
            o, final = fleetjax.fleet_attention(q, k, v, decay, implementation="pallas", config=config,
                                                return_final_state=True, initial_state=jnp.ones(
                                                    (2, 2, K, V), jnp.float32))
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

        try:
            found = capture.kernels(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), q, q, v, decay,
                                    directory=directory)
        except ValueError as error:  # the config check refused it: record the refusal
            print(json.dumps(dict(dtype=dtype, K=K, V=V, walk=dataclasses.asdict(walk), refused=str(error))))
            continue
        for job in found:
            kind = _KERNEL_OF[job["kernel"]]
            walk_used = dataclasses.replace(walk, num_stages=job["num_stages"])
            dims = chunked.walk_dims(kind, K, V)
            if job["kernel"] == "fleet_piece_states":  # the forward's (K, V) and the dq walk's (V, K) pieces
                dims = dims[seen_pieces.get((dtype, K, V, str(walk)), 0) % 2:][:1]
                seen_pieces[(dtype, K, V, str(walk))] = seen_pieces.get((dtype, K, V, str(walk)), 0) + 1
            job.update(dtype=dtype, K=K, V=V, key_dim=dims[0][0], value_dim=dims[0][1],
                       walk=dataclasses.asdict(walk_used),
                       model=chunked.footprint(kind, walk_used, *dims[0], dt)["shared"])
            jobs.append(job)
    result = subprocess.run([args.triton_python, "-c", _COMPILE], input="\n".join(json.dumps(j) for j in jobs),
                            capture_output=True, text=True) if jobs else None
    worst = 0.0
    with open(args.out, "w") as out:
        for line in result.stdout.splitlines():
            job = json.loads(line)
            out.write(line + "\n")
            if "shared" in job:
                worst = max(worst, job["shared"] / job["model"])
                print(f"{job['kernel']:28s} {job['dtype']:9s} K{job['K']:<4d} V{job['V']:<4d} {job['walk']} "
                      f"shared {job['shared']:7d} model {job['model']:7d} regs {job['registers']} "
                      f"spill {job['spill_bytes']}")
            else:
                print(job.get("kernel"), job.get("error"))
    print(f"largest measured / modelled shared memory: {worst:.3f}")
    if result.stderr.strip():
        print(result.stderr[-2000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
