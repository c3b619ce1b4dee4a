"""Launching the Pallas kernels: refs passed by name, the device's limits, and each kernel's footprint.

Every kernel of fleetjax is a function of keyword refs (``q_ref=..., o_ref=...``, None where a ref is
absent); :func:`call` builds the ``pallas_call`` from dicts of named inputs and outputs, so a kernel's
signature and its launch can never disagree on the order of its refs.

Shared memory decides which tilings compile: Triton keeps ``num_stages`` copies of every tile a walk loads
per chunk (software pipelining), plus staging buffers for the tensor-core operands that do not come from a
load. :func:`shared_memory_bytes` models that from a kernel's tiles; the configs' defaults shrink the tiling
until the model fits :func:`shared_memory_per_block`, and an explicit config that does not fit is refused
before compilation.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fleetjax.vma import cast_varying, shape_dtype_like, varying_axes

Named = Mapping[str, "tuple[Any, pl.BlockSpec] | None"]


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def call(kernel: Callable[..., None], *, name: str, grid: tuple[int, ...], inputs: Named, outputs: Named,
         num_warps: int, num_stages: int, skip: jax.Array | None = None,
         keep: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """``kernel(**refs)`` over ``grid``. inputs: name -> (array, BlockSpec); outputs: name -> ((shape, dtype),
    BlockSpec); entries that are None are left out (the kernel's parameter keeps its default, None). The
    outputs are typed like the inputs for shard_map's check_vma (fleetjax.vma). Returns name -> array.

    ``skip``: decided on the device (no host wait, unlike a lax.cond around the call), passed to the kernel as
    ``skip_ref`` (read by :func:`skipped`): a bool scalar array, True to skip every program; or per row of
    the grid, its second axis being b * H + h, float states [B, H, n, r, m] (n and m powers of two) whose
    first rows witness (fleetjax.pallas.mosaic.witness_of): the programs of row (b, h) skip where
    states[b, h, :, 0] is all finite, read in place (no reduction launched, no copy of the rows made).
    Skipped programs on a GPU return at once and store nothing (0.7-1.6 us less a skipped launch on an H200,
    2026-12-07); in the interpreter the kernel runs and its walk visits no chunk (fleetjax.pallas.walk.walk).
    Each output named in ``keep`` (name -> an array of its shape and dtype) takes that array's buffer: it holds
    that array when the programs start (a kernel may read it there), and a skipped program leaves its blocks
    so; its other outputs' blocks are undefined."""
    inputs = {n: x for n, x in inputs.items() if x is not None}
    outputs = {n: x for n, x in outputs.items() if x is not None}
    keep = dict(keep or {})
    if skip is not None and jnp.issubdtype(skip.dtype, jnp.floating):
        H, n, _, m = skip.shape[1:]
        rows = pl.BlockSpec((None, None, n, None, m), lambda j, g, *_: (g // H, g % H, 0, 0, 0))
        inputs["skip_ref"] = (skip, rows)
    elif skip is not None:
        skip_spec = pl.BlockSpec((1,), lambda *_: (0,))
        inputs["skip_ref"] = (jnp.reshape(skip, (1,)).astype(jnp.int32), skip_spec)
    for n, array in keep.items():  # passed for its buffer only: the kernel reads it through the output's ref
        inputs[f"kept_{n}"] = (array, outputs[n][1])
    names = list(inputs) + list(outputs)
    aliases = {list(inputs).index(f"kept_{n}"): list(outputs).index(n) for n in keep}

    def body(*refs):
        named = dict(zip(names, refs))
        for n in keep:
            del named[f"kept_{n}"]
        if skip is None or not on_gpu():
            # The interpreter does not lower program_id inside a branch (jax 0.10.2); there the walk's own
            # skip (no chunk visited) is the whole of it.
            kernel(**named)
        else:
            pl.when(jnp.logical_not(skipped(named["skip_ref"])))(lambda: kernel(**named))

    def launch(*arrays):
        out_shape = [shape_dtype_like(shape, dtype, *arrays) for (shape, dtype), _ in outputs.values()]
        return pl.pallas_call(
            body, grid=grid, in_specs=[s for _, s in inputs.values()], out_specs=[s for _, s in outputs.values()],
            out_shape=out_shape, compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            input_output_aliases=aliases, interpret=not on_gpu(), name=name)(*arrays)

    arrays = [a for a, _ in inputs.values()]
    axes = set().union(*(varying_axes(a) or set() for a in arrays))
    if on_gpu() or not axes:
        return dict(zip(outputs, launch(*arrays)))
    # Interpret mode inside shard_map(check_vma=True): the interpreter evaluates the kernel with indices that
    # are not typed like the sliced arrays, which check_vma refuses. So every device runs the kernel on all
    # devices' inputs, gathered (typed alike everywhere), and keeps its own outputs: exact, and P times the
    # work, in a mode meant for tests.
    axes = tuple(sorted(axes, key=str))
    gathered, batched = [], []
    for a in arrays:
        varies = bool(varying_axes(a))
        gathered.append(_gather(a, axes) if varies else a)
        batched.append(0 if varies else None)
    results = jax.vmap(launch, in_axes=batched)(*gathered)
    index = jax.lax.axis_index(axes)
    return {n: r[index] for n, r in zip(outputs, results)}


def skipped(skip_ref) -> jax.Array:
    """Whether the program skips (a bool scalar), from :func:`call`'s ``skip_ref``: the flag [1] int32,
    nonzero; or the first rows [n, m] float of the program's row's states, all finite."""
    if jnp.issubdtype(skip_ref.dtype, jnp.floating):
        return jnp.max(jnp.where(jnp.isfinite(skip_ref[...]), 0, 1)) == 0
    return skip_ref[0] != 0


def _gather(x: jax.Array, axes: tuple) -> jax.Array:
    """x from every device of ``axes``, stacked [devices, ...], typed the same on every device."""
    # all_gather over every axis needs x varying over each.
    x = cast_varying(x, tuple(a for a in axes if a not in (varying_axes(x) or ())))
    try:
        return jax.lax.all_gather(x, axes, to="invarying")
    except TypeError:  # a JAX whose all_gather has no ``to``: the primitive behind it
        from jax._src.lax.parallel import all_gather_invariant
        return all_gather_invariant(x, axes)


# ------------------------------------------------------------------------------------ the device's limits

# Opt-in shared memory per block by compute capability, where the driver cannot be asked.
_SHARED_MEMORY_BY_CAPABILITY = {"7.0": 96 * 1024, "7.5": 64 * 1024, "8.0": 163 * 1024, "8.6": 99 * 1024,
                                "8.7": 163 * 1024, "8.9": 99 * 1024, "9.0": 227 * 1024, "10.0": 227 * 1024,
                                "12.0": 99 * 1024}
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97


def _driver_shared_memory(ordinal: int) -> int | None:
    """The opt-in shared memory per block that the CUDA driver reports, or None if it cannot be asked."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, value = ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return None
        status = cuda.cuDeviceGetAttribute(ctypes.byref(value),
                                           _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device)
        return int(value.value) if status == 0 and value.value > 0 else None
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def shared_memory_per_block() -> int:
    """Bytes of shared memory one program may use on the default device: the driver's answer on an NVIDIA
    GPU, else the table by compute capability; off-GPU (interpret mode) the H100's 227 KiB, so that configs
    chosen on a CPU are the ones a Hopper GPU would take."""
    if not on_gpu():
        return 227 * 1024
    device = jax.devices()[0]
    queried = _driver_shared_memory(int(getattr(device, "local_hardware_id", None) or 0))
    if queried is not None:
        return queried
    return _SHARED_MEMORY_BY_CAPABILITY.get(str(getattr(device, "compute_capability", "")), 99 * 1024)


@functools.lru_cache(maxsize=None)
def multiprocessor_count() -> int:
    """Streaming multiprocessors of the default device (132 off-GPU: an H100's, for the same reason)."""
    if not on_gpu():
        return 132
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


@functools.lru_cache(maxsize=None)
def device_kind() -> str:
    """The default device's name as jax reports it ("NVIDIA H100 80GB HBM3", "NVIDIA H200"); off-GPU an H100's,
    as the other queries answer. Defaults that were timed apart on two cards of one kind of SM look it up."""
    if not on_gpu():
        return "NVIDIA H100 80GB HBM3"
    return str(getattr(jax.devices()[0], "device_kind", ""))


def shared_memory_bytes(*, loads: tuple[tuple[int, int], ...], staged: tuple[tuple[int, int], ...], dtype,
                        num_stages: int) -> int:
    """The shared memory a walk kernel takes: ``num_stages`` copies of the tiles it loads per chunk
    (rows x columns, in the inputs' dtype) and the tiles it stages for the tensor cores once (in the inputs'
    dtype). Fitted to Triton's allocation for sm_90 (see experiments/footprint.py)."""
    itemsize = jnp.dtype(dtype).itemsize
    loaded = sum(r * c for r, c in loads) * itemsize
    staging = sum(r * c for r, c in staged) * itemsize
    return num_stages * loaded + staging
