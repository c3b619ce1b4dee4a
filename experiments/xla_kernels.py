"""The kernels that one call of the op launches on a Hopper GPU, listed on a host without a GPU: the op (forward,
or forward and backward) is compiled by XLA for an H100 or H200 that is only described (a deviceless compile
through jax's CUDA plugin, with the CUDA driver stand-in of experiments/cuda_shim.c), and the compiled
program's top-level kernels are listed in launch order: XLA's fusions, the Mosaic GPU and Triton custom calls
(by stage name), copies, with the bytes of their operands and results.

    PYTHONPATH=. python -m experiments.xla_kernels [--gated | --gate-only] [--fwd] [--shape B,T,H,K,V]
                                                   [--dtype bfloat16] [--device h100|h200] [--walks JSON]
                                                   [--out FILE] [--label TEXT]

``--walks JSON`` changes fields of the default config's Mosaic walks (as the described GPU's), or of the
config itself, e.g. ``'{"gate_sums": false, "gate_grad_kernel": false}'``: the kernels of a variant of one
checkout.

What runs on the GPU between the walks (transposes, the cumulative sums of the decay's gradient, the
witnesses' reductions, the contained walks' skipped launches) is what this counts; their times stay the
profiles' (experiments/run_gpu_profile.sh). fleetjax's own device queries answer as on the described GPU
(Hopper, its SM count and shared memory), and Pallas's Triton lowering takes that GPU's description, so the
program is the one that GPU would run with the default config. Bytes are each operand's and result's whole
size (a kernel may read part of an operand, or read one several times).

Needs what experiments/sass.py needs (jax's CUDA plugin for the installed jax, a C compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# What XLA's GPU compiler takes as the GPU it compiles for: Hopper (sm_90), 132 SMs, 228 KiB of shared memory
# an SM (227 KiB for one block), 64 Ki registers, 50 MiB of L2; the memory's size and bandwidth by card.
DEVICES = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", memory_bandwidth=3_352_320_000_000,
                 device_memory_size=84_978_434_048),
    "h200": dict(description="NVIDIA H200", memory_bandwidth=4_800_000_000_000, device_memory_size=150_754_820_096),
}


def target_config(device: str) -> str:
    """The GpuTargetConfig text proto of ``device`` (a key of DEVICES)."""
    d = DEVICES[device]
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
                shared_memory_per_core=228 * 1024, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
                block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=d["memory_bandwidth"], l2_cache_size=50 * 1024 * 1024, clock_rate_ghz=1.98,
                device_memory_size=d["device_memory_size"], shared_memory_per_block_optin=227 * 1024,
                registers_per_core_limit=65536, registers_per_block_limit=65536)
    fields = "\n".join(f"  {key}: {value}" for key, value in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
            f'platform_name: "CUDA"\ndevice_description_str: "{d["description"]}"\n')


@contextlib.contextmanager
def as_on_hopper(device: str):
    """fleetjax's device queries (fleetjax.pallas.launch, mosaic.config and their importers) and Pallas's Triton
    lowering answer as the described GPU would, inside the context (a jax without Pallas's gpu_info, such as
    0.10, has no Triton lowering that asks; it builds configs here, and compiles nothing without the plugin)."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        gpu_info = None

    from fleetjax.pallas import chunked, fleet, launch, mosaic, walk
    from fleetjax.pallas.mosaic import config as mosaic_config
    answers = dict(on_gpu=lambda: True, multiprocessor_count=lambda: 132,
                   shared_memory_per_block=lambda: 227 * 1024, on_hopper=lambda: True,
                   device_kind=lambda: DEVICES[device]["description"])
    saved = []
    for module in (launch, walk, chunked, fleet, mosaic, mosaic_config):
        for name, answer in answers.items():
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, answer)
    if gpu_info is not None:
        version = gpu_info.GpuVersion.H200 if device == "h200" else gpu_info.GpuVersion.H100
        saved.append((gpu_info, "get_gpu_info", gpu_info.get_gpu_info))
        gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(version)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def compiled_text(args, config=None) -> str:
    """The optimized HLO of the op compiled for the described GPU, with ``config`` (None: the op's default)."""
    import jax
    import jax.numpy as jnp

    import fleetjax

    B, T, H, K, V = args.shape
    sharding = described_device(args.device)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    dtype = jnp.dtype(args.dtype)
    qk, vo = spec((B, T, H, K), dtype), spec((B, T, H, V), dtype)
    gate = spec((B, T, H), jnp.float32) if args.gated else None
    decay = None if args.gate_only else spec((H,), jnp.float32)

    def op(q, k, v, decay, gate):
        return fleetjax.fleet_attention(q, k, v, decay, log_gate=gate, implementation="pallas", config=config)

    def forward_and_backward(q, k, v, decay, gate, do):  # every input that the call has is differentiated
        out, pullback = jax.vjp(op, q, k, v, decay, gate)
        return out, pullback(do)

    fn, operands = (op, (qk, qk, vo, decay, gate)) if args.fwd else (forward_and_backward,
                                                                    (qk, qk, vo, decay, gate, vo))
    return compiled_for(fn, operands, args.device).as_text()


def walks_config(args):
    """The described GPU's default config at the call's shape with ``args.walks`` (JSON) applied to its Mosaic
    walks (experiments.inputs.with_walk_fields), or None (the op's own default) without ``--walks``."""
    if args.walks is None:
        return None
    import jax.numpy as jnp

    from experiments.inputs import with_walk_fields
    from fleetjax.pallas import chunked
    B, T, H, K, V = args.shape
    with as_on_hopper(args.device):
        default = chunked.default_config(jnp.zeros((B, T, H, K), args.dtype), jnp.zeros((B, T, H, V), args.dtype))
    return with_walk_fields(default, args.walks)


def described_device(device: str):
    """The sharding onto the one GPU of ``device`` (a key of DEVICES), described to XLA's deviceless compile
    (jax's CUDA plugin with experiments/cuda_shim.c's driver stand-in loaded)."""
    import jax
    from jax.experimental import topologies

    from experiments import sass
    with tempfile.TemporaryDirectory() as scratch:  # the stand-in stays loaded once its file is gone
        sass.driver_stand_in(scratch)
    topology = topologies.get_topology_desc(device, "cuda", topology="1x1x1", target_config=target_config(device))
    return jax.sharding.SingleDeviceSharding(topology.devices[0])


def compiled_for(fn, operands, device: str):
    """``fn`` jitted and compiled for ``device`` at ``operands`` (ShapeDtypeStructs on
    :func:`described_device`'s sharding), fleetjax's device queries answering as on that GPU."""
    import jax
    with as_on_hopper(device):
        return jax.jit(fn).trace(*operands).lower(lowering_platforms=("cuda",)).compile()


_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "pred": 1, "s8": 1, "u8": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_KERNEL = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (fusion|custom-call|copy)\((.*?)\)(?:,|$)")
_VALUE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) [\w\-]+\(")


def nbytes(types: str) -> int:
    """The bytes of every array in an HLO type (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(types):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES[dtype]
    return total


def kernels(text: str) -> list[dict]:
    """The entry computation's kernels in order: name, op (fusion, custom-call, copy), kind (a fusion's kind,
    a custom call's target), stage (the op_name's last part: a walk's or a primitive's name), read and
    written bytes (its operands' and results' sizes)."""
    entry = text[text.index("\nENTRY"):].splitlines()[1:]
    sizes: dict[str, int] = {}
    rows = []
    for line in entry:
        value = _VALUE.match(line)
        if value:
            sizes[value.group(1)] = nbytes(value.group(2))
        m = _KERNEL.match(line)
        if not m:
            continue
        name, types, op, operands = m.groups()
        kind = re.search(r'custom_call_target="([^"]*)"', line) or re.search(r"kind=(\w+)", line)
        stage = re.search(r'op_name="([^"]*)"', line)
        parts = [] if not stage else [p for p in stage.group(1).split("/") if p not in ("mpmd_map", "pallas_call")]
        read = sum(sizes.get(o.strip().split(" ")[-1].lstrip("%"), 0) for o in operands.split(","))
        stage = re.sub(r"^(?:[\w.]+\()+", "", parts[-1]).rstrip(")") if parts else ""  # transpose(jvp(name))
        rows.append(dict(name=name, op=op, kind=kind.group(1) if kind else "", stage=stage,
                         read_bytes=read, written_bytes=nbytes(types)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gated", action="store_true", help="with a log gate (its gradient too), beside the decay")
    ap.add_argument("--gate-only", action="store_true", help="a log gate and no per-head decay; implies --gated")
    ap.add_argument("--fwd", action="store_true", help="the forward alone (default: forward and backward)")
    ap.add_argument("--shape", default="4,16384,16,128,128", help="B,T,H,K,V (default 4,16384,16,128,128)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="h200", choices=sorted(DEVICES))
    ap.add_argument("--walks", default=None, metavar="JSON",
                    help="MosaicWalkConfig fields, or the PallasConfig's own, to change from the default config's, "
                         "e.g. '{\"gate_sums\": false}'")
    ap.add_argument("--out", default=None, help="append one JSON line (the kernels and the fields) to this file")
    ap.add_argument("--label", default="", help="a note for the record (which tree, say)")
    args = ap.parse_args(argv)
    args.gated = args.gated or args.gate_only
    args.shape = tuple(int(x) for x in args.shape.split(","))
    if len(args.shape) != 5:
        ap.error(f"--shape takes B,T,H,K,V, got {args.shape}")
    try:  # before the compile: a bad field or value is named at once
        config = walks_config(args)
    except ValueError as error:
        ap.error(str(error))
    rows = kernels(compiled_text(args, config))
    for r in rows:
        print(f"{r['op']:11} {r['kind'][:22]:22} {r['stage'][:28]:28} read {r['read_bytes'] / 1e6:9.2f} MB  "
              f"wrote {r['written_bytes'] / 1e6:8.2f} MB  {r['name']}")
    custom = sum(r["op"] == "custom-call" for r in rows)
    print(f"{len(rows)} kernels: {custom} custom calls, {len(rows) - custom} XLA's")
    if args.out:
        import jax
        import fleetjax
        record = dict(shape=args.shape, dtype=args.dtype, gated=args.gated, decay=not args.gate_only,
                      op="fwd" if args.fwd else "fwd_bwd", device=args.device, walks=args.walks, jax=jax.__version__,
                      package=str(Path(fleetjax.__file__).parent), label=args.label, count=len(rows),
                      custom_calls=custom, kernels=rows)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
