"""The results of a benchmark: where they go, what describes the machine, and the results file itself.

A results file is JSON, ``{"device", "date", "versions", ...run metadata..., "records": [...]}``, named
experiments/results/<date>-<device>-<name>.json. A benchmark record holds at least REQUIRED: the op ("fwd"
or "fwd_bwd"), the implementation, dtype and shape, the median time in ms (None when it did not run, with
"skipped" or "error" saying why), the relative error against the float32 reference (relerr) and the HBM
floor in ms.

Usage as a script: ``python -m experiments.records table RESULTS.json`` prints a results file's table.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "experiments" / "results"

# Packages whose versions go into every results file (absent ones are recorded as None).
_PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "numpy", "flax", "torch", "triton", "flash-linear-attention",
             "fla-core", "lightning-attn", "ejkernel", "pydantic", "beartype", "matplotlib")

DTYPE_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


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
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        out["git_commit"] = git("rev-parse", "HEAD").strip() or None
        out["git_modified"] = git("diff", "--name-only", "HEAD").split() if out["git_commit"] else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = out["git_modified"] = None
    return out


def today() -> str:
    return _dt.date.today().isoformat()


def results_path(name: str, *, device: str | None = None, date: str | None = None,
                 out_dir: str | os.PathLike | None = None, suffix: str = ".json") -> Path:
    """experiments/results/<date>-<device>-<name>.json, or the same name in out_dir."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must hold only letters, digits, '.', '_' and '-', got {name!r}")
    device = device_slug() if device is None else device
    date = today() if date is None else date
    return Path(RESULTS_DIR if out_dir is None else out_dir) / f"{date}-{device}-{name}{suffix}"


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
    """{"device", "date", "versions", ..., "records": [...]} (see the module docstring), rewritten atomically
    after every added record so that a run stopped early still leaves a valid file."""

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


# ------------------------------------------------------------------------------------------------ table

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
        shape = (f"{DTYPE_SHORT.get(r['dtype'], r['dtype'])} {r['B']}x{r['H']}x{r['T']}x{r['K']}"
                 + (" gated" if r.get("gated") else ""))
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "table":
        print(format_table(json.loads(Path(argv[1]).read_text())["records"]))
        return 0
    print("usage: python -m experiments.records table RESULTS.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
