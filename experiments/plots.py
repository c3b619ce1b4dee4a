"""Figures of the benchmarks' results files (matplotlib on the Agg backend, optional).

Usage as a script: ``python -m experiments.plots RESULTS.json [OUT.png]`` draws (or redraws) the plot of a
results file, by default next to it with the suffix .png.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments.records import DTYPE_SHORT


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


def _group_key(rec: dict[str, Any]) -> tuple:
    return (rec["dtype"], rec["B"], rec["H"], rec["K"], rec["V"])


def _exact_ticks(ax, values: Sequence[int]) -> None:
    """Label a log axis at the measured values (1024, 4096, ...) instead of powers of ten."""
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.xaxis.set_major_locator(FixedLocator(list(values)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in values])


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Time against T per implementation (log-log), one panel per (dtype, B, H, K, V) group with several T;
    one panel of time against head dim for the groups measured at a single T in several head dims; one bar
    panel per shape measured alone (one T, one head dim: the long-context row), with each bar's extra peak
    memory where known; the HBM floor dotted. For
    fwd_bwd files a last panel shows extra peak memory against T."""
    plt = pyplot_or_none()
    if plt is None:
        raise RuntimeError("matplotlib is not installed")
    from matplotlib.ticker import NullFormatter
    data = json.loads(Path(json_path).read_text())
    records = [r for r in data["records"] if r.get("ms") is not None]
    png_path = Path(png_path) if png_path is not None else Path(json_path).with_suffix(".png")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec), []).append(rec)
    multi_t = {k: v for k, v in groups.items() if len({r["T"] for r in v}) > 1}
    # Groups measured at one T only are drawn against K, together with every record of the same dtype, B, H
    # and T (the main group's point at that T included); a shape with no other head dim at its T gets bars.
    at_one_t = {(r["dtype"], r["B"], r["H"], r["T"]) for k, v in groups.items() if k not in multi_t for r in v}
    head_dims: dict[tuple, set[int]] = {}
    for r in records:
        head_dims.setdefault((r["dtype"], r["B"], r["H"], r["T"]), set()).add(r["K"])
    single_t = [r for r in records if (r["dtype"], r["B"], r["H"], r["T"]) in at_one_t
                and len(head_dims[(r["dtype"], r["B"], r["H"], r["T"])]) > 1]
    alone: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r["dtype"], r["B"], r["H"], r["T"])
        if key in at_one_t and len(head_dims[key]) == 1:
            alone.setdefault(key, []).append(r)
    ops = {r["op"] for r in data["records"]}
    mem_records = [r for r in records if r.get("extra_peak_mb") is not None]
    panels = (len(multi_t) + (1 if single_t else 0) + len(alone)
              + (1 if "fwd_bwd" in ops and mem_records else 0))
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
        shapes = sorted({(DTYPE_SHORT.get(r["dtype"], r["dtype"]), r["B"], r["H"], r["T"]) for r in single_t})
        ax.set(xscale="log", yscale="log", xlabel="head dim K (= V)", ylabel="ms (median)",
               title=f"{single_t[0]['op']} " + "; ".join(f"{d} B{b} H{h} T{t}" for d, b, h, t in shapes))
        _exact_ticks(ax, sorted({r["K"] for r in single_t}))
        ax.grid(True, which="both", alpha=0.3)
    for (dtype, B, H, T), recs in sorted(alone.items()):
        ax = axes_list[i]
        i += 1
        recs = sorted(recs, key=lambda r: impls.index(r["impl"]))
        for y, r in enumerate(recs):
            ax.barh(y, r["ms"], color=color[r["impl"]], label=r["impl"])
            if r.get("extra_peak_mb") is not None:  # this shape is in no memory panel: its memory on the bar
                ax.text(r["ms"], y, f" {r['extra_peak_mb']:.0f} MiB", va="center", fontsize=6)
        floor = next((r["hbm_floor_ms"] for r in recs if r.get("hbm_floor_ms")), None)
        if floor:
            ax.axvline(floor, color="black", linestyle=":", linewidth=1, label="HBM floor")
        ax.set_yticks(range(len(recs)), [r["impl"] for r in recs], fontsize=7)
        ax.invert_yaxis()
        ax.set(xscale="log", xlabel="ms (median)",
               title=f"{recs[0]['op']} {dtype} B{B} H{H} T{T} K{recs[0]['K']} V{recs[0]['V']}")
        # Bars start at 0, which a log axis cannot show: begin the axis below the shortest bar or floor.
        ax.set_xlim(left=min([r["ms"] for r in recs] + ([floor] if floor else [])) / 2)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, axis="x", which="both", alpha=0.3)
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
    gated = "  per-token gates (log_gate), no decay" if any(r.get("gated") for r in records) else ""
    fig.suptitle(f"{data.get('device', '?')}  {data.get('date', '')}  "
                 f"copy {data.get('copy_bandwidth', {}).get('gbps', 0) or 0:.0f} GB/s{gated}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * math.ceil(len(handles) / 5), 1, 0.96))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) in (1, 2):
        print(plot_results(argv[0], argv[1] if len(argv) == 2 else None))
        return 0
    print("usage: python -m experiments.plots RESULTS.json [OUT.png]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
