"""Shared machinery of the benchmarks (DESIGN.md section 6).

What lives here: device and version information, the measured copy bandwidth and the HBM floor derived from
it, one wall-clock timing method used for every implementation (JAX and torch alike, so the numbers compare),
compile and recompilation accounting for jitted JAX functions, peak-memory helpers, relative errors against a
float32 reference, the results file (written again after every record, so a run cut short keeps what it
measured), a time budget with a per-call time limit, and the plot.

Usage as a script: ``python -m experiments.benchlib plot RESULTS.json [OUT.png]`` redraws the plot of a
results file and ``python -m experiments.benchlib table RESULTS.json`` prints its table (the GPU script
does both when a benchmark was stopped before it finished).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "experiments" / "results"
MIB = 2.0 ** 20

# Packages whose versions go into every results file (absent ones are recorded as None).
_PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "numpy", "flax", "torch", "triton", "flash-linear-attention",
             "fla-core", "lightning-attn", "ejkernel", "pydantic", "beartype", "matplotlib")



def prepare_devices(smoke_devices: int = 0) -> None:
    """Call before jax is imported. Keeps NVLink multicast off, as the device machines require (set, never
    unset); with ``smoke_devices`` > 0, runs on that many fake CPU devices instead of the accelerators."""
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                        ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(name, value)
    if smoke_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={smoke_devices}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"


def setup_jax_environment() -> None:
    """Environment that must be set before jax is imported when JAX and torch share one GPU.

    JAX preallocates 75% of GPU memory by default, which would leave torch's peers too little; without
    preallocation JAX grows its pool as needed. The Pallas Triton deprecation warning (jax >= 0.11) is
    filtered narrowly, as DESIGN.md section 4 asks.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import warnings
    warnings.filterwarnings("ignore", message=".*Pallas Triton.*", category=DeprecationWarning)


# ------------------------------------------------------------------------------------------- device, versions

def device_info() -> dict[str, Any]:
    """What the benchmark runs on: JAX's backend and device kind, and torch's view of the GPU if it has one."""
    import jax
    dev = jax.devices()[0]
    info: dict[str, Any] = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
                            "platform_version": getattr(dev.client, "platform_version", None),
                            "device_count": jax.device_count(), "host": platform.node(),
                            "cpu": platform.processor() or platform.machine()}
    try:
        import torch
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["torch_device"] = torch.cuda.get_device_name(0)
            info["sm_count"] = props.multi_processor_count
            info["memory_gib"] = round(props.total_memory / 2 ** 30, 1)
            info["torch_cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - torch absent or broken: the JAX fields above still describe the device
        pass
    return info


def device_slug(info: dict[str, Any] | None = None) -> str:
    """A short file-name word for the device: 'h100', 'h200', 'a100', ... or 'cpu'."""
    info = device_info() if info is None else info
    if info.get("backend") == "cpu":
        return "cpu"
    kind = str(info.get("torch_device") or info.get("device_kind") or "device")
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", kind)
    word = match.group(1) if match else kind
    return re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") or "device"


def versions() -> dict[str, Any]:
    """Versions of Python, the packages in _PACKAGES, fleetjax, the git commit (when the tree has one) and
    git_modified: the tracked files that differ from that commit (a tree copied onto another machine may
    carry a stale commit under newer files)."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import fleetjax
        out["fleetjax"] = fleetjax.__version__
    except Exception:  # noqa: BLE001
        out["fleetjax"] = None
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                           timeout=10).stdout
        out["git_commit"] = git("rev-parse", "HEAD").strip() or None
        out["git_modified"] = git("diff", "--name-only", "HEAD").split() if out["git_commit"] else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = out["git_modified"] = None
    return out


def today() -> str:
    return _dt.date.today().isoformat()


def results_path(name: str, *, device: str | None = None, date: str | None = None,
                 out_dir: str | os.PathLike | None = None, suffix: str = ".json") -> Path:
    """experiments/results/<date>-<device>-<name>.json (DESIGN.md section 6), or the same name in out_dir."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must hold only letters, digits, '.', '_' and '-', got {name!r}")
    device = device_slug() if device is None else device
    date = today() if date is None else date
    return Path(RESULTS_DIR if out_dir is None else out_dir) / f"{date}-{device}-{name}{suffix}"


# ------------------------------------------------------------------------------------------------ timing

@dataclasses.dataclass
class Timing:
    """Median milliseconds per call, and how they were measured."""

    ms: float
    ms_min: float
    samples: int
    calls_per_sample: int
    first_call_s: float


def _perf() -> float:
    return time.perf_counter()


def time_calls(call: Callable[..., Any], arg_sets: Sequence[tuple], sync: Callable[[Any], None], *,
               target_s: float = 0.25, min_samples: int = 5, max_samples: int = 25,
               sample_floor_s: float = 2e-3) -> Timing:
    """Wall-clock time per call of ``call(*args)``, the argument sets rotated from call to call.

    The first call (compilation, autotuning) is timed on its own and reported as first_call_s; every set is
    then run once as a warm-up. A sample is ``calls_per_sample`` back-to-back calls (enough to last about
    ``sample_floor_s``, so launch overhead overlaps the work as in a real program) followed by one ``sync``;
    the result is the median over samples of the time per call. Rotating inputs keeps a later call from
    finding its inputs in L2. The same method times JAX (sync = block_until_ready) and torch (sync =
    torch.cuda.synchronize), so their numbers compare.
    """
    if not arg_sets:
        raise ValueError("arg_sets must hold at least one tuple of arguments")
    n = len(arg_sets)
    t0 = _perf()
    sync(call(*arg_sets[0]))
    first = _perf() - t0
    for args in arg_sets[1:]:
        sync(call(*args))
    t0 = _perf()
    sync(call(*arg_sets[1 % n]))
    estimate = max(_perf() - t0, 1e-7)
    per_sample = int(min(50, max(1, math.ceil(sample_floor_s / estimate))))
    if estimate > 0.5:
        min_samples = min(min_samples, 3)
    samples = int(min(max_samples, max(min_samples, target_s // (estimate * per_sample))))
    times = []
    i = 0
    for _ in range(samples):
        t0 = _perf()
        out = None
        for _ in range(per_sample):
            out = call(*arg_sets[i % n])
            i += 1
        sync(out)
        times.append((_perf() - t0) / per_sample)
        del out
    return Timing(ms=statistics.median(times) * 1e3, ms_min=min(times) * 1e3, samples=samples,
                  calls_per_sample=per_sample, first_call_s=first)


def jax_sync(out: Any) -> None:
    import jax
    jax.block_until_ready(out)


def torch_sync(out: Any) -> None:
    del out
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_do_bench_ms(fn: Callable[[], Any]) -> float | None:
    """triton.testing.do_bench's median (CUDA events, L2 flushed between calls), recorded beside our own
    number for the torch peers; None without CUDA or triton."""
    try:
        import torch
        import triton.testing
        if not torch.cuda.is_available():
            return None
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - a second opinion only; its absence must not lose the record
        return None


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events), to show that new data does not recompile."""

    _count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        import jax.monitoring
        try:
            from jax._src.dispatch import BACKEND_COMPILE_EVENT as event
        except ImportError:  # pragma: no cover - name moved in a later jax
            event = "/jax/core/compile/backend_compile_duration"

        def listener(name: str, duration: float, **kwargs) -> None:
            del duration, kwargs
            if name == event:
                cls._count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True

    @classmethod
    def count(cls) -> int:
        return cls._count


def jit_cache_size(jitted: Any) -> int | None:
    """Entries in a jax.jit function's dispatch cache (None where jax hides it)."""
    size = getattr(jitted, "_cache_size", None)
    try:
        return int(size()) if callable(size) else None
    except Exception:  # noqa: BLE001
        return None


def compile_jax(jitted: Any, args: tuple) -> tuple[Any, float, dict[str, float] | None]:
    """Lower and compile ``jitted`` for ``args``: (compiled, seconds, XLA's memory analysis in MiB)."""
    t0 = _perf()
    compiled = jitted.lower(*args).compile()
    seconds = _perf() - t0
    memory = None
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            memory = {key: getattr(analysis, f"{key}_size_in_bytes") / MIB
                      for key in ("argument", "output", "temp", "alias")}
    except Exception:  # noqa: BLE001 - not every backend reports it
        memory = None
    return compiled, seconds, memory


# ------------------------------------------------------------------------------------------------ memory

def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (JAX or torch) in a nested tuple/list/dict."""
    if tree is None:
        return 0
    if isinstance(tree, dict):
        return sum(tree_bytes(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return sum(tree_bytes(v) for v in tree)
    nbytes = getattr(tree, "nbytes", None)
    if nbytes is not None and not callable(nbytes):
        return int(nbytes)
    if hasattr(tree, "element_size") and hasattr(tree, "numel"):  # torch.Tensor
        return int(tree.element_size() * tree.numel())
    return 0


def jax_runtime_extra_peak_mb(call: Callable[..., Any], args: tuple) -> tuple[float | None, str]:
    """Peak GPU bytes above what was live before one call, less the call's outputs, from
    device.memory_stats(). JAX's peak counter cannot be reset, so the number is known only when this call
    sets a new process-wide peak; otherwise (None, reason)."""
    import jax
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None, "device.memory_stats() has no peak_bytes_in_use on this backend"
    before_peak, before_live = stats["peak_bytes_in_use"], stats["bytes_in_use"]
    out = call(*args)
    jax.block_until_ready(out)
    after_peak = dev.memory_stats()["peak_bytes_in_use"]
    out_bytes = tree_bytes(out)
    del out
    if after_peak <= before_peak:
        return None, "inconclusive: this call stayed below an earlier process-wide peak"
    return (after_peak - before_live - out_bytes) / MIB, "memory_stats peak delta"


def torch_extra_peak_mb(call: Callable[..., Any], args: tuple) -> tuple[float | None, float | None]:
    """(extra peak MiB = peak above the memory live before the call, less the outputs; output MiB) from
    torch.cuda.max_memory_allocated after reset_peak_memory_stats. (None, None) without CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None, None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out_bytes = tree_bytes(out)
    del out
    return (peak - base - out_bytes) / MIB, out_bytes / MIB


# ---------------------------------------------------------------------------------------- bandwidth, floor

def copy_bandwidth(mib: int = 1024) -> dict[str, float | None]:
    """Device copy bandwidth in GB/s (bytes read + written per second), measured now on this device.

    jax: ``x + 1`` over a float32 array of ``mib`` MiB (XLA cannot elide it); torch: ``dst.copy_(src)``
    timed with CUDA events, when torch sees a GPU. Medians of 20 runs.
    """
    import jax
    import jax.numpy as jnp
    out: dict[str, float | None] = {"copy_mib": float(mib), "jax_gbps": None, "torch_gbps": None}
    n = mib * 2 ** 20 // 4
    xs = [jnp.full((n,), float(i), jnp.float32) for i in range(2)]
    add_one = jax.jit(lambda x: x + 1.0)
    timing = time_calls(add_one, [(x,) for x in xs], jax_sync, target_s=0.2, min_samples=10, max_samples=20,
                        sample_floor_s=0.0)
    out["jax_gbps"] = 2 * n * 4 / (timing.ms * 1e-3) / 1e9
    del xs
    try:
        import torch
        if torch.cuda.is_available():
            src = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
            dst = torch.empty_like(src)
            times = []
            for i in range(23):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
            out["torch_gbps"] = 2 * n * 4 / (statistics.median(times) * 1e-3) / 1e9
            del src, dst
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - torch absent: the JAX number stands alone
        pass
    values = [v for k, v in out.items() if k.endswith("_gbps") and v]
    out["gbps"] = max(values)  # the faster copy makes the lower, safer floor
    return out


def hbm_bytes(op: str, B: int, T: int, H: int, K: int, V: int, itemsize: int) -> int:
    """Bytes that must move: fwd reads q, k, v and writes o; fwd_bwd also reads dO and writes dq, dk, dv."""
    per_position = {"fwd": 2 * K + V + V, "fwd_bwd": 2 * K + V + V + V + 2 * K + V}
    if op not in per_position:
        raise ValueError(f"op must be 'fwd' or 'fwd_bwd', got {op!r}")
    return B * T * H * per_position[op] * itemsize


def hbm_floor_ms(op: str, B: int, T: int, H: int, K: int, V: int, itemsize: int, gbps: float) -> float:
    """Milliseconds to move hbm_bytes at the measured copy bandwidth (GB/s)."""
    return hbm_bytes(op, B, T, H, K, V, itemsize) / (gbps * 1e9) * 1e3


# --------------------------------------------------------------------------------------------- accuracy

def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def rel_errors(out: Any, ref: Any) -> dict[str, float | None]:
    """max|out - ref| / max|ref| (the tests' convention) and the L2 ratio, computed in float32 on the device
    holding the JAX arrays. Non-finite results are None with nonfinite=True."""
    import jax.numpy as jnp
    out = jnp.asarray(out, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    diff = out - ref
    ref_max = float(jnp.max(jnp.abs(ref)))
    ref_l2 = float(jnp.sqrt(jnp.sum(ref * ref)))
    max_err = float(jnp.max(jnp.abs(diff))) / ref_max if ref_max > 0 else float(jnp.max(jnp.abs(diff)))
    l2_err = float(jnp.sqrt(jnp.sum(diff * diff))) / ref_l2 if ref_l2 > 0 else float("nan")
    result = {"relerr": _finite_or_none(max_err), "relerr_l2": _finite_or_none(l2_err)}
    if result["relerr"] is None or not bool(jnp.all(jnp.isfinite(out))):
        result["nonfinite"] = True
    return result


# ---------------------------------------------------------------------------------------- budget, limits

class Budget:
    """A wall-clock budget for a whole benchmark: what is left, and whether a step may still start."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = _perf()

    def elapsed(self) -> float:
        return _perf() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


class CallTimeout(Exception):
    """Raised inside a step that ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CallTimeout in the main thread after ``seconds`` (SIGALRM). Python checks signals between
    bytecodes, so a long C++ call (an XLA or Triton compile) finishes before the timeout lands; autotuning
    loops are Python, so they stop at the next configuration. No limit off the main thread or where
    SIGALRM does not exist."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading_is_main())
    if not usable:
        yield
        return
    if seconds <= 0:
        raise CallTimeout("no time left")

    def handler(signum, frame):
        del signum, frame
        raise CallTimeout(f"ran past its limit of {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------- results file

def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


class ResultsFile:
    """{"device", "date", "versions", ..., "records": [...]} (DESIGN.md section 6), rewritten atomically after
    every added record so that a run stopped early still leaves a valid file."""

    REQUIRED = ("op", "impl", "dtype", "B", "T", "H", "K", "V", "ms", "relerr", "hbm_floor_ms")

    def __init__(self, path: str | os.PathLike, *, device: str, date: str, versions: dict[str, Any],
                 **meta: Any):
        self.path = Path(path)
        self.data: dict[str, Any] = {"device": device, "date": date, "versions": versions, **meta,
                                     "records": []}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, record: dict[str, Any]) -> None:
        missing = [key for key in self.REQUIRED if key not in record]
        if missing:
            raise ValueError(f"record lacks the fields {missing}: {record}")
        self.data["records"].append(record)
        self.write()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.data["records"]

    def write(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(_json_safe(self.data), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------ display

_DTYPE_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A compact table of the measured (and failed) records, then one line per distinct skip reason.

    Kept narrow because the device tool returns only the last 12,000 characters of output."""
    def fmt(value: Any, kind: str) -> str:
        if value is None:
            return "-"
        if kind == "err":
            return f"{value:.1e}"
        return f"{value:.3f}" if abs(value) < 10 else (f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}")

    has_mem = any(r.get("extra_peak_mb") is not None for r in records)
    header = ["impl", "shape", "ms", "floor", "relerr"] + (["xtra_MB"] if has_mem else []) + ["note"]
    rows, skips = [], {}
    for r in records:
        shape = f"{_DTYPE_SHORT.get(r['dtype'], r['dtype'])} {r['B']}x{r['H']}x{r['T']}x{r['K']}"
        if r.get("skipped") and not str(r["skipped"]).startswith("timeout"):
            skips.setdefault((r["impl"], str(r["skipped"])[:90]), []).append(shape)
            continue
        note = ""
        if r.get("error") or r.get("skipped"):
            note = str(r.get("error") or r.get("skipped"))[:60]
        elif r.get("recompiles_on_new_data"):
            note = f"RECOMPILED x{r['recompiles_on_new_data']}"
        elif r.get("nonfinite"):
            note = "NONFINITE"
        row = [r["impl"], shape, fmt(r.get("ms"), "ms"), fmt(r.get("hbm_floor_ms"), "ms"),
               fmt(r.get("relerr"), "err")]
        if has_mem:
            row.append(fmt(r.get("extra_peak_mb"), "mb"))
        rows.append(row + [note])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    for (impl, reason), shapes in skips.items():
        lines.append(f"skipped {impl} ({len(shapes)} cases): {reason}")
    return "\n".join(lines)


def _group_key(rec: dict[str, Any]) -> tuple:
    return (rec["dtype"], rec["B"], rec["H"], rec["K"], rec["V"])


def _exact_ticks(ax, values: Sequence[int]) -> None:
    """Label a log axis at the measured values (1024, 4096, ...) instead of powers of ten."""
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.xaxis.set_major_locator(FixedLocator(list(values)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in values])


def pyplot_or_none() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a note on stderr) where matplotlib is missing: the
    experiments still write their JSON without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Time against T per implementation (log-log), one panel per (dtype, B, H, K, V) group with several T,
    plus one panel of time against head dim for groups measured at a single T; the HBM floor dashed. For
    fwd_bwd files a last panel shows extra peak memory against T."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    records = [r for r in data["records"] if r.get("ms") is not None]
    png_path = Path(png_path) if png_path is not None else Path(json_path).with_suffix(".png")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec), []).append(rec)
    multi_t = {k: v for k, v in groups.items() if len({r["T"] for r in v}) > 1}
    # Groups measured at one T only (the head-dim variants) are drawn against K, together with every
    # record of the same dtype, B, H and T (the main group's point at that T included).
    at_one_t = {(r["dtype"], r["B"], r["H"], r["T"]) for k, v in groups.items() if k not in multi_t for r in v}
    single_t = [r for r in records if (r["dtype"], r["B"], r["H"], r["T"]) in at_one_t]
    ops = {r["op"] for r in data["records"]}
    mem_records = [r for r in records if r.get("extra_peak_mb") is not None]
    panels = len(multi_t) + (1 if single_t else 0) + (1 if "fwd_bwd" in ops and mem_records else 0)
    panels = max(panels, 1)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    axes_list = list(axes.flat)
    impls = sorted({r["impl"] for r in records})
    cmap = plt.get_cmap("tab20")
    color = {name: cmap(i % 20) for i, name in enumerate(impls)}
    marker = {name: "os^vD<>ph*"[i % 10] for i, name in enumerate(impls)}

    def draw_lines(ax, recs, x_key, y_key):
        for name in impls:
            pts = sorted((r[x_key], r[y_key]) for r in recs if r["impl"] == name and r.get(y_key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker=marker[name], color=color[name], label=name,
                        linestyle="-" if name.startswith("fleetjax") else "--", linewidth=1.2)

    i = 0
    for key, recs in sorted(multi_t.items()):
        ax = axes_list[i]
        i += 1
        draw_lines(ax, recs, "T", "ms")
        floor = sorted({(r["T"], r["hbm_floor_ms"]) for r in recs if r.get("hbm_floor_ms")})
        if floor:
            ax.plot(*zip(*floor), color="black", linestyle=":", linewidth=1, label="HBM floor")
        dtype, B, H, K, V = key
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms (median)",
               title=f"{recs[0]['op']} {dtype} B{B} H{H} K{K} V{V}")
        _exact_ticks(ax, sorted({r["T"] for r in recs}))
        ax.grid(True, which="both", alpha=0.3)
    if single_t:
        ax = axes_list[i]
        i += 1
        draw_lines(ax, single_t, "K", "ms")
        shapes = sorted({(_DTYPE_SHORT.get(r["dtype"], r["dtype"]), r["B"], r["H"], r["T"]) for r in single_t})
        ax.set(xscale="log", yscale="log", xlabel="head dim K (= V)", ylabel="ms (median)",
               title=f"{single_t[0]['op']} " + "; ".join(f"{d} B{b} H{h} T{t}" for d, b, h, t in shapes))
        _exact_ticks(ax, sorted({r["K"] for r in single_t}))
        ax.grid(True, which="both", alpha=0.3)
    if "fwd_bwd" in ops and mem_records:
        ax = axes_list[i]
        i += 1
        biggest = max(groups, key=lambda k: sum(1 for r in groups[k] if r.get("extra_peak_mb") is not None))
        recs = [r for r in mem_records if _group_key(r) == biggest]
        draw_lines(ax, recs, "T", "extra_peak_mb")
        dtype, B, H, K, V = biggest
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="extra peak MiB",
               title=f"fwd_bwd extra peak memory {dtype} B{B} H{H} K{K}")
        _exact_ticks(ax, sorted({r["T"] for r in recs}))
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes_list[i:]:
        ax.axis("off")
    handles: dict[str, Any] = {}  # one legend for all panels, each label once
    for ax in axes_list[:i]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                   ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(f"{data.get('device', '?')}  {data.get('date', '')}  "
                 f"copy {data.get('copy_bandwidth', {}).get('gbps', 0) or 0:.0f} GB/s", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * math.ceil(len(handles) / 5), 1, 0.96))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ------------------------------------------------------------------------------------------------ runner

def retnet_log_decay(H: int) -> np.ndarray:
    """log of RetNet's per-head decays, 1 - 2^(-5 - h) for h = 0..H-1 (from 0.969 towards 1), float32 [H]."""
    return np.log1p(-np.exp2(-5.0 - np.arange(H, dtype=np.float64))).astype(np.float32)


def make_inputs(case, seed: int, *, with_do: bool = True) -> dict[str, Any]:
    """q, k ~ N(0, 1/K) (so q . k stays O(1)), v, dO ~ N(0, 1), drawn in float32 on the default device and
    cast to the case's dtype. Returns JAX arrays {"q", "k", "v"[, "do"]} in [B, T, H, D]."""
    import jax
    import jax.numpy as jnp
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[case.dtype]
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    qk_shape, v_shape = (case.B, case.T, case.H, case.K), (case.B, case.T, case.H, case.V)

    @jax.jit
    def draw(kq, kk, kv, kd):
        scale = case.K ** -0.5
        out = {"q": (jax.random.normal(kq, qk_shape, jnp.float32) * scale).astype(dtype),
               "k": (jax.random.normal(kk, qk_shape, jnp.float32) * scale).astype(dtype),
               "v": jax.random.normal(kv, v_shape, jnp.float32).astype(dtype)}
        if with_do:
            out["do"] = jax.random.normal(kd, v_shape, jnp.float32).astype(dtype)
        return out

    return jax.block_until_ready(draw(kq, kk, kv, kd))


REFERENCE = ("fleetjax.xla on the benchmark's own inputs upcast to float32 (exact), float32 arithmetic with "
             "Precision.HIGHEST; fwd_bwd: jax.vjp with the same dO, gradients for q, k, v and decay")


def reference_outputs(case, op: str, inputs: dict[str, Any], log_decay: np.ndarray) -> dict[str, Any]:
    """The float32 reference (see REFERENCE): {"o"} for fwd, {"o", "dq", "dk", "dv", "ddecay"} for fwd_bwd."""
    import jax
    import jax.numpy as jnp
    from fleetjax import fleet_attention
    up = {name: x.astype(jnp.float32) for name, x in inputs.items()}
    decay = jnp.exp(jnp.asarray(log_decay, jnp.float32))
    attend = lambda q, k, v, d: fleet_attention(q, k, v, d, implementation="xla")  # noqa: E731
    if op == "fwd":
        return {"o": jax.block_until_ready(jax.jit(attend)(up["q"], up["k"], up["v"], decay))}

    @jax.jit
    def fwd_bwd(q, k, v, d, do):
        o, vjp = jax.vjp(attend, q, k, v, d)
        return (o,) + tuple(vjp(do))

    out = jax.block_until_ready(fwd_bwd(up["q"], up["k"], up["v"], decay, up["do"]))
    return dict(zip(("o", "dq", "dk", "dv", "ddecay"), out))


def _release_memory() -> None:
    import gc
    gc.collect()
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.0f}s] {message}", flush=True)


def measure(impl, case, op: str, input_sets: list[dict[str, Any]], ref: dict[str, Any], log_decay: np.ndarray,
            *, target_s: float, min_samples: int = 5) -> dict[str, Any]:
    """Time one implementation on one case; its errors against ``ref``; compile time and recompilations
    (JAX); extra peak memory (fwd_bwd). Returns the record's measured fields."""
    rec: dict[str, Any] = {}
    bound = impl.bind(case, op, log_decay)
    if bound.notes:
        rec["notes"] = bound.notes
    arg_sets = [bound.prepare(x) for x in input_sets]
    rec["inputs_mb"] = tree_bytes(arg_sets[0]) / MIB
    if bound.jitted is not None:
        CompileCounter.install()
        compiled, rec["compile_s"], memory = compile_jax(bound.jitted, arg_sets[0])
        del compiled
        if memory is not None:
            rec["xla_memory_mb"] = memory
        if op == "fwd_bwd":
            rec["extra_peak_mb_runtime"], rec["extra_peak_runtime_note"] = jax_runtime_extra_peak_mb(
                bound.jitted, arg_sets[0])
            if memory is not None:
                rec["extra_peak_mb"] = memory["temp"]
                rec["outputs_mb"] = memory["output"]
        # After the explicit compile: the first call on data set 0 (Pallas interpret mode may compile
        # callbacks here), then every other data set and the timed calls, which must compile nothing.
        count = CompileCounter.count()
        jax_sync(bound.jitted(*arg_sets[0]))
        rec["compiles_first_call"] = CompileCounter.count() - count
        count = CompileCounter.count()
        for args in arg_sets[1:]:
            jax_sync(bound.jitted(*args))
        timing = time_calls(bound.jitted, arg_sets, jax_sync, target_s=target_s, min_samples=min_samples)
        rec["recompiles_on_new_data"] = CompileCounter.count() - count
        rec["jit_cache_size"] = jit_cache_size(bound.jitted)
    else:
        # Timing first: its first call carries Triton's compilation and autotuning (first_call_s), whose
        # scratch buffers must not count as the peer's memory.
        timing = time_calls(bound.call, arg_sets, torch_sync, target_s=target_s, min_samples=min_samples)
        if op == "fwd_bwd":
            extra, out_mb = torch_extra_peak_mb(bound.call, arg_sets[0])
            if extra is not None:
                rec["extra_peak_mb"], rec["outputs_mb"] = extra, out_mb
        rec["ms_do_bench"] = torch_do_bench_ms(lambda: bound.call(*arg_sets[0]))
    rec.update(ms=timing.ms, ms_min=timing.ms_min, samples=timing.samples,
               calls_per_sample=timing.calls_per_sample, first_call_s=timing.first_call_s)
    if rec.get("extra_peak_mb") is not None:
        rec["peak_mb"] = rec["inputs_mb"] + rec.get("outputs_mb", 0.0) + rec["extra_peak_mb"]

    parts = bound.unpack(bound.call(*arg_sets[0]))
    for name, value in parts.items():
        errors = rel_errors(value, ref[name])
        rec[f"relerr_{name}"] = errors["relerr"]
        rec[f"relerr_l2_{name}"] = errors["relerr_l2"]
        if errors.get("nonfinite"):
            rec["nonfinite"] = True
    del parts
    if op == "fwd":
        rec["relerr"] = rec.get("relerr_o")
    else:
        grads = [rec[f"relerr_{n}"] for n in ("dq", "dk", "dv") if f"relerr_{n}" in rec]
        rec["relerr"] = None if not grads or any(g is None for g in grads) else max(grads)
    return rec


def _record_line(rec: dict[str, Any], label: str) -> str:
    if rec.get("ms") is None:
        return f"{rec['impl']:22s} {label}: {rec.get('skipped') or rec.get('error')}"[:300]
    relerr = rec.get("relerr")
    return (f"{rec['impl']:22s} {label}: {rec['ms']:.3f} ms (floor {rec['hbm_floor_ms']:.3f}) relerr "
            + ("-" if relerr is None else f"{relerr:.1e}")
            + (f" compile {rec['compile_s']:.1f}s" if "compile_s" in rec else "")
            + (f" first call {rec['first_call_s']:.1f}s" if rec.get("first_call_s", 0) > 2 else "")
            + (f" extra {rec['extra_peak_mb']:.0f}MB" if rec.get("extra_peak_mb") is not None else ""))


def run_benchmark(op: str, cases: Sequence[Any], impls: Sequence[Any], *, results: ResultsFile,
                  budget: Budget, impl_timeout_s: float, target_s: float, n_sets: int = 3,
                  min_samples: int = 5, gbps: float, timed_out: set[tuple] | None = None) -> None:
    """Every impl on every case, in order; each record added to ``results`` as soon as it exists.

    Inputs and the reference of a case are made only if some implementation runs on it. An implementation
    starts only with at least 10 s of budget left and runs under a time limit of min(impl_timeout_s, what
    is left). An implementation that autotunes (``impl.autotunes``) and timed out is not started again on
    a case with the same autotuning key (H, K, V, dtype): it would start the same search again. What does
    not run is recorded as skipped, with why.
    """
    timed_out = set() if timed_out is None else timed_out  # shared between calls by run_main
    for case in cases:
        base = {"op": op, **case.fields(), "ms": None, "relerr": None,
                "hbm_floor_ms": hbm_floor_ms(op, case.B, case.T, case.H, case.K, case.V, case.itemsize, gbps)}
        log_decay = retnet_log_decay(case.H)
        data: dict[str, Any] = {}

        def case_data() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            """Inputs and reference, made once per case under their own time limit; a failure is kept
            and raised again for every later implementation of the case."""
            if not data:
                try:
                    with time_limit(min(120.0, budget.remaining())):
                        # Rotation beats L2 with 2 sets as well as 3; the largest shapes keep 2 (memory).
                        one_set = case.B * case.T * case.H * (2 * case.K + 2 * case.V) * case.itemsize
                        sets = n_sets if one_set < 2 ** 30 else 2
                        inputs = [make_inputs(case, seed, with_do=op == "fwd_bwd") for seed in range(sets)]
                        ref = reference_outputs(case, op, inputs[0], log_decay)
                    data["value"] = (inputs, ref)
                except Exception as e:  # noqa: BLE001 - CallTimeout included
                    data["error"] = RuntimeError(f"inputs/reference failed: {type(e).__name__}: {e}")
            if "error" in data:
                raise data["error"]
            return data["value"]

        for impl in impls:
            rec = {**base, "impl": impl.name, "framework": impl.framework, "input_layout": impl.input_layout}
            if op == "fwd_bwd":
                rec["decay_grad"] = impl.decay_grad
            tune_key = (impl.name, case.H, case.K, case.V, case.dtype)
            reason = impl.unavailable()
            if reason is None:
                try:
                    reason = impl.skip_reason(case, op)
                except Exception as e:  # noqa: BLE001
                    reason = f"skip check failed: {type(e).__name__}: {e}"
            if reason is None and getattr(impl, "autotunes", False) and tune_key in timed_out:
                reason = "its autotuning timed out on an earlier case with the same H, K, V and dtype"
            if reason is None and budget.remaining() < 10:
                reason = "global time budget spent"
            if reason is not None:
                rec["skipped"] = reason[:400]
                results.add(rec)
                continue
            t0 = time.perf_counter()
            try:
                input_sets, ref = case_data()
                with time_limit(min(impl_timeout_s, budget.remaining())):
                    rec.update(measure(impl, case, op, input_sets, ref, log_decay, target_s=target_s,
                                       min_samples=min_samples))
            except CallTimeout as e:
                rec.update(ms=None, relerr=None, skipped=f"timeout: {e}")
                timed_out.add(tune_key)
            except Exception as e:  # noqa: BLE001 - one failing peer must not stop the run
                import traceback
                rec.update(ms=None, relerr=None, error=f"{type(e).__name__}: {e}"[:400])
                traceback.print_exc(limit=4, file=sys.stderr)
            rec["wall_s"] = time.perf_counter() - t0
            if impl.name == "fleetjax.xla" and case.dtype == "float32":
                rec["relerr_note"] = "this is the reference computation (float32 inputs): error 0 by construction"
            results.add(rec)
            _release_memory()
            _log(budget, _record_line(rec, case.label))
        data.clear()
        _release_memory()


def add_common_args(parser) -> None:
    """The command-line options both benchmarks share."""
    parser.add_argument("--out", default=str(RESULTS_DIR),
                        help="folder for <date>-<device>-<name>.json and .png (default experiments/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, quick timing: checks every code path on the CPU in about a minute")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="wall-clock budget for all cases; what does not fit is recorded as skipped")
    parser.add_argument("--impl-timeout-s", type=float, default=120.0,
                        help="time limit of one implementation on one case (compilation included)")
    parser.add_argument("--autotune-timeout-s", type=float, default=240.0,
                        help="time limit of one autotuning implementation (fla) on one case")
    parser.add_argument("--target-s", type=float, default=None,
                        help="seconds of timed calls per measurement (default 0.25, smoke 0.02)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated implementation names to run (default: all)")
    parser.add_argument("--skip-slow-autotune", action="store_true",
                        help="skip fla at head dim > 128, whose first call autotunes for minutes")
    parser.add_argument("--name", default=None, help="results file name part (default forward/backward)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes of the cases to run (default: all)")
    parser.add_argument("--shapes", default=None, help="B,T,H,K,V;... : run only these shapes (default: all)")


def select_impls(impls: Sequence[Any], names: str | None) -> list[Any]:
    if names is None:
        return list(impls)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {impl.name for impl in impls}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; known: {sorted(known)}")
    return [impl for impl in impls if impl.name in wanted]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"B,T,H,K,V;B,T,H,K,V;..." -> [(B, T, H, K, V), ...] (the --shapes option of the benchmarks and tunes)."""
    return [tuple(int(n) for n in shape.split(",")) for shape in text.split(";")]


def run_main(args, op: str, case_groups: Sequence[Sequence[Any]], impls: Sequence[Any], name: str) -> ResultsFile:
    """Measure the copy bandwidth, run the benchmark over the groups of cases (most important first),
    draw the plot, print the table."""
    if getattr(args, "dtypes", None):
        wanted = args.dtypes.split(",")
        case_groups = [[case for case in group if case.dtype in wanted] for group in case_groups]
    if getattr(args, "shapes", None):
        shapes = set(parse_shapes(args.shapes))
        case_groups = [[case for case in group if (case.B, case.T, case.H, case.K, case.V) in shapes]
                       for group in case_groups]
    import jax
    budget = Budget(args.budget_s)
    info = device_info()
    slug = device_slug(info)
    path = results_path(args.name or name, device=slug, out_dir=args.out)
    _log(budget, f"{op}: {sum(map(len, case_groups))} cases x {len(impls)} implementations on "
         f"{info.get('torch_device') or info['device_kind']} (jax {jax.__version__}, backend {info['backend']}); "
         f"results {path}")
    bandwidth = copy_bandwidth(64 if args.smoke else 1024)
    _log(budget, f"copy bandwidth {bandwidth['gbps']:.0f} GB/s (jax {bandwidth['jax_gbps']}, "
         f"torch {bandwidth['torch_gbps']})")
    results = ResultsFile(path, device=slug, date=today(), versions=versions(), device_info=info,
                          copy_bandwidth=bandwidth, reference=REFERENCE, smoke=bool(args.smoke),
                          decays="RetNet: 1 - 2^(-5 - h) for head h", scale=1.0,
                          timing=("median over samples of wall-clock time per call; each sample is back-to-back "
                                  "calls on rotated input sets followed by one sync (jax.block_until_ready or "
                                  "torch.cuda.synchronize); torch peers also carry triton's do_bench median as "
                                  "ms_do_bench"),
                          memory=("extra_peak_mb = peak device memory of one call above what was live before "
                                  "it, less the call's outputs; JAX: XLA's temp allocation from "
                                  "compiled.memory_analysis() (extra_peak_mb_runtime: device.memory_stats() "
                                  "peak delta, known only when the call set a new process-wide peak); torch: "
                                  "torch.cuda.max_memory_allocated() after reset_peak_memory_stats()"))
    target_s = args.target_s if args.target_s is not None else (0.02 if args.smoke else 0.25)
    # Cases come in groups, most important first. Within a group, every implementation that does not
    # autotune runs on all its cases first, then the autotuning ones (fla), whose first call per shape can
    # take minutes and whose time limit cannot interrupt a compilation already under way.
    timed_out: set[tuple] = set()
    quick = [impl for impl in impls if not getattr(impl, "autotunes", False)]
    tuning = [impl for impl in impls if getattr(impl, "autotunes", False)]
    for g, group in enumerate(case_groups):
        for kind, members in (("quick", quick), ("autotuning", tuning)):
            if not members or not group:
                continue
            _log(budget, f"case group {g + 1}, {kind}: {', '.join(impl.name for impl in members)}")
            run_benchmark(op, group, members, results=results, budget=budget,
                          impl_timeout_s=args.impl_timeout_s if kind == "quick" else args.autotune_timeout_s,
                          target_s=target_s, n_sets=2 if args.smoke else 3,
                          min_samples=2 if args.smoke else 5, gbps=bandwidth["gbps"], timed_out=timed_out)
    cases = [case for group in case_groups for case in group]
    notes = {name: getattr(sys.modules[name], "fleetjax_note") for name in ("fla",)
             if hasattr(sys.modules.get(name), "fleetjax_note")}
    if notes:
        results.set("import_notes", notes)
    # Records in case order, then implementation order, for the table and the file.
    case_index = {(c.dtype, c.B, c.T, c.H, c.K, c.V): i for i, c in enumerate(cases)}
    impl_index = {impl.name: i for i, impl in enumerate(impls)}
    results.records.sort(key=lambda r: (case_index.get((r["dtype"], r["B"], r["T"], r["H"], r["K"], r["V"]), 0),
                                        impl_index.get(r["impl"], 0)))
    results.set("wall_s", budget.elapsed())
    try:
        png = plot_results(path)
        _log(budget, f"plot {png}")
    except Exception as e:  # noqa: BLE001 - the JSON is the result; a plot failure is reported, not fatal
        _log(budget, f"plot failed: {type(e).__name__}: {e}")
    print(format_table(results.records), flush=True)
    print(f"results: {path}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) in (2, 3) and argv[0] == "plot":
        print(plot_results(argv[1], argv[2] if len(argv) == 3 else None))
        return 0
    if len(argv) == 2 and argv[0] == "table":
        print(format_table(json.loads(Path(argv[1]).read_text())["records"]))
        return 0
    print("usage: python -m experiments.benchlib plot RESULTS.json [OUT.png]\n"
          "       python -m experiments.benchlib table RESULTS.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
