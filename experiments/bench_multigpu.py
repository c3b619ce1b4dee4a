"""Sequence-parallel scaling (issue 8): fleet_attention with sequence_axis_name over 1, 2, 4 and 8 devices.

    PYTHONPATH=. python experiments/bench_multigpu.py [--devices 1,2,4,8] [--impl pallas] [--smoke] ...

T is split in contiguous blocks over a 1-D mesh axis "seq" (jax.shard_map); each device runs the kernel on
its block and the blocks exchange one [B, H, K, V] float32 state each (fleetjax/sharding.py). Two series:

- weak scaling: fixed T per device (default 32768 and 131072), total T = P * T_local: ideal is flat time;
- strong scaling: fixed total T (default 262144 and 1048576), T_local = T / P: ideal is time / P.

Shape B1 H16 K=V=128 bfloat16 by default; forward ("fwd") and forward+backward ("fwd_bwd": jax.vjp with
random cotangents for o and the final state, gradients for q, k, v and decay). The final state is an output
(a model that carries state uses it; and one device emulating device 0 of P would otherwise drop L_p as
dead code). Device counts above jax.device_count() are skipped, so the same command runs on one GPU (the
baseline) and on eight. Each sharded result is compared with the single-device call of the same
implementation on the gathered inputs, where that fits on device 0 (relerr: fleetjax.check.relative_error,
max abs difference over max abs of the reference, the largest over o, the final state and, for fwd_bwd,
dq, dk, dv).

--methods: the order of the work (experiments/combine_methods.py): entering_state (the library's, with the
implementation's BlockKernels where it has them), generic (the same implementation record without them),
correction (the block from a zero state, then the entering state's share added as a separate product).

Writes <date>-<device>-multigpu.json and .png to --out (default experiments/results) and prints a table.
--smoke runs tiny shapes on 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).

--emulate 2,4,8 (for one GPU): each of those device counts is emulated by one device's share of the work,
timed alone: the sharded program at T_local on a mesh axis of one device, with the exchange run anyway
(fleetjax.sharding.exchange called directly, where fleet_attention would run the plain call; its
all_gather then moves nothing). Its efficiency,
t_1(T) / (P t_device(T / P)), is an upper bound of the real one: it leaves out the communication (a few
microseconds to tens of them for the 1 MiB states) and any slowdown of P GPUs running at once. Those
records say "emulated": true; their relerr is against the plain call at T_local (the emulated device 0).

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1
are set here if the environment lacks them, and never unset or overridden.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.accuracy import SCALE  # noqa: E402 - numpy only: jax is imported after prepare_devices

SMOKE_DEVICES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8",
                        help="device counts on the sequence axis (those above jax.device_count() are skipped)")
    parser.add_argument("--weak", default=None,
                        help="T per device for weak scaling, comma-separated (default 32768,131072)")
    parser.add_argument("--strong", default=None,
                        help="total T for strong scaling, comma-separated (default 262144,1048576)")
    parser.add_argument("--ops", default="fwd,fwd_bwd", help="fwd, fwd_bwd or both")
    parser.add_argument("--impl", default=None, help="fleetjax implementation (default: pallas on GPU, xla else)")
    parser.add_argument("--methods", default="entering_state",
                        help="orders of the work (experiments/combine_methods.py): entering_state, generic, "
                             "correction (comma-separated)")
    parser.add_argument("--emulate", default="",
                        help="device counts to emulate on one device (comma-separated; see the module docstring)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32")
    parser.add_argument("--B", type=int, default=None)
    parser.add_argument("--H", type=int, default=None)
    parser.add_argument("--K", type=int, default=None, help="head dim of q and k (V follows unless --V)")
    parser.add_argument("--V", type=int, default=None)
    parser.add_argument("--check-vma", action="store_true",
                        help="shard_map(check_vma=True): values typed by the mesh axes they vary over "
                             "(fleetjax.vma); off by default, as in the earlier measurements")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with one device")
    parser.add_argument("--no-final-state", action="store_true",
                        help="return o alone (training without a carried state). With --emulate the generic "
                             "method's L_p then feeds nothing on the emulated device 0 and is dropped as dead "
                             "code: its emulated times are too low; entering_state's are not (the walk reuses "
                             "its pieces' states, and the reverse walks run their exit terms, zero or not)")
    parser.add_argument("--out", default=None, help="results folder (default experiments/results)")
    parser.add_argument("--name", default="multigpu", help="results file name part")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all cases")
    parser.add_argument("--case-timeout-s", type=float, default=180.0, help="time limit of one case")
    parser.add_argument("--target-s", type=float, default=None, help="seconds of timed calls per measurement")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny shapes on {SMOKE_DEVICES} fake CPU devices: checks every code path")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    args.devices = ints(args.devices)
    args.emulate = ints(args.emulate)
    args.weak = ints(args.weak) if args.weak else ([16, 32] if args.smoke else [32768, 131072])
    args.strong = ints(args.strong) if args.strong else ([128] if args.smoke else [262144, 1048576])
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method not in ("entering_state", "generic", "correction"):
            parser.error(f"--methods: unknown {method!r}; use entering_state, generic, correction")
    for op in args.ops:
        if op not in ("fwd", "fwd_bwd"):
            parser.error(f"--ops: unknown {op!r}; use fwd, fwd_bwd")
    defaults = dict(B=1, H=2, K=16, dtype="float32") if args.smoke else dict(B=1, H=16, K=128, dtype="bfloat16")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.V = args.K if args.V is None else args.V
    return args


def plan(args: argparse.Namespace, available: int) -> list[dict[str, Any]]:
    """The cases, baselines (P = 1) first within each series, as dicts (op, method, scaling, P, T, T_local,
    emulated).

    One device runs no exchange at all (the plain call), so P = 1 is measured once and shared by the methods.
    Emulated device counts (--emulate) come after the real ones.
    """
    cases = []
    counts = [(p, False) for p in args.devices if p <= available]
    counts += [(p, True) for p in args.emulate if p > 1 and (p, False) not in counts]
    for op in args.ops:
        for scaling, sizes in (("weak", args.weak), ("strong", args.strong)):
            for size in sizes:
                for i, method in enumerate(args.methods):
                    for p, emulated in counts:
                        T, t_local = (p * size, size) if scaling == "weak" else (size, size // p)
                        if (p == 1 and i > 0) or T % p:
                            continue
                        cases.append(dict(op=op, method=method if p > 1 else "none", scaling=scaling, P=p, T=T,
                                          T_local=t_local, emulated=emulated))
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from experiments.environment import prepare_devices, setup_jax_environment
    prepare_devices(smoke_devices=SMOKE_DEVICES if args.smoke else 0)
    setup_jax_environment()
    import jax

    import fleetjax
    from experiments.bandwidth import copy_bandwidth, hbm_floor_ms
    from experiments.combine_methods import uses_block_kernels
    from experiments.records import (RESULTS_DIR, ResultsFile, device_info, device_slug, results_path, today,
                                     versions)
    from experiments.timing import Budget, CallTimeout, time_limit

    budget = Budget(args.budget_s)
    info = device_info()
    slug = device_slug(info)
    impl = args.impl or fleetjax.default_implementation()
    if impl not in fleetjax.IMPLEMENTATIONS or not fleetjax.IMPLEMENTATIONS[impl].available():
        usable = sorted(name for name, record in fleetjax.IMPLEMENTATIONS.items() if record.available())
        raise SystemExit(f"--impl {impl!r} is not available here; usable: {usable}")
    skipped_counts = [p for p in args.devices if p > jax.device_count() and p not in args.emulate]
    cases = plan(args, jax.device_count())
    out_dir = args.out or str(RESULTS_DIR)
    path = results_path(args.name, device=slug, out_dir=out_dir)
    bandwidth = copy_bandwidth(64 if args.smoke else 1024)
    results = ResultsFile(
        path, device=slug, date=today(), versions=versions(), device_info=info,
        copy_bandwidth=bandwidth, smoke=bool(args.smoke), implementation=impl, check_vma=bool(args.check_vma),
        final_state=not args.no_final_state,
        skipped_device_counts=skipped_counts, emulated_device_counts=args.emulate,
        decays="RetNet: 1 - 2^(-5 - h) for head h", scale=SCALE,
        environment={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                    "NVSHMEM_DISABLE_NVLS", "XLA_FLAGS")},
        reference=("the single-device call of the same implementation on the gathered inputs, on device 0; "
                   "relerr = max over o, the final state (and dq, dk, dv for fwd_bwd) of "
                   "fleetjax.check.relative_error(sharded, single) = max|sharded - single| / max|single| "
                   "(outputs above 2^26 elements: every relerr_stride-th position)"),
        outputs=("o and the final state (random cotangents for both in fwd_bwd): the state is live, as in a "
                 "model that carries it, and in an emulation L_p is not dropped as dead code"),
        timing="median wall-clock ms per call of the jitted shard_map (experiments/timing.time_calls, one input set)",
        exchange=("exchange_bytes_per_device: bytes each device receives in the forward all_gather of the "
                  "[B, H, K, V] float32 states and [B, H] carries from the other P - 1 devices"),
        hbm_floor=("hbm_floor_ms: one device's share (T_local positions) of the bytes that must move, at the "
                   "measured copy bandwidth"))
    print(f"[bench_multigpu] {len(cases)} cases, impl {impl}, {jax.device_count()} x "
          f"{info.get('torch_device') or info['device_kind']}; device counts skipped: {skipped_counts}; "
          f"results {path}", flush=True)
    target_s = args.target_s if args.target_s is not None else (0.02 if args.smoke else 0.3)
    for case in cases:
        record = dict(op=case["op"], impl=f"fleetjax.{impl}", dtype=args.dtype, B=args.B, T=case["T"], H=args.H,
                      K=args.K, V=args.V, ms=None, relerr=None, method=case["method"], scaling=case["scaling"],
                      devices=case["P"], emulated=case["emulated"],
                      block_kernels=uses_block_kernels(case["method"], impl) if case["P"] > 1 else None,
                      T_per_device=case["T_local"],
                      hbm_floor_ms=hbm_floor_ms(case["op"], args.B, case["T_local"], args.H, args.K, args.V,
                                                2 if args.dtype == "bfloat16" else 4, bandwidth["gbps"]),
                      exchange_bytes_per_device=(case["P"] - 1) * (args.B * args.H * args.K * args.V + args.B
                                                                   * args.H) * 4)
        if budget.remaining() < 10:
            record["skipped"] = "budget exhausted"
        else:
            try:
                with time_limit(min(args.case_timeout_s, budget.remaining())):
                    record.update(run_case(case, args, impl, target_s))
            except CallTimeout as error:
                record["skipped"] = f"timeout: {error}"
            except Exception as error:  # noqa: BLE001 - one failed case (OOM, ...) must not lose the others
                record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        results.add(record)
        print(f"  {record['op']:7s} {record['method'][:8]:8s} {record['scaling']:6s} P={record['devices']}"
              f"{'e' if record['emulated'] else ' '} "
              f"T={record['T']:>8d} "
              f"T/dev={record['T_per_device']:>7d}  ms={_fmt(record['ms'])}  relerr={_fmt(record['relerr'], 'e')}"
              f"{'  ' + str(record.get('error') or record.get('skipped') or '')[:120]}", flush=True)
    add_efficiency(results.records)
    results.write()
    results.set("wall_s", budget.elapsed())
    png = plot(path)
    print(f"[bench_multigpu] wrote {path}" + (f" and {png}" if png else ""), flush=True)
    return 0


def _fmt(value: float | None, kind: str = "f") -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" if kind == "e" else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------ one case

def run_case(case: dict[str, Any], args: argparse.Namespace, impl: str, target_s: float) -> dict[str, Any]:
    """Time the sharded call at one (P, T); compare with the single-device call where it fits."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments.combine_methods import sharded_attention
    from experiments.inputs import retnet_log_decay
    from experiments.timing import jax_sync, time_calls

    emulated = case["emulated"]
    mesh = Mesh(np.array(jax.devices()[:1 if emulated else case["P"]]), ("seq",))
    split = NamedSharding(mesh, P(None, "seq"))
    replicated = NamedSharding(mesh, P())
    dtype = jnp.dtype(args.dtype)
    # Emulated: one device's block, the first (its entering state is the zero initial state).
    B, T, H, K, V = args.B, case["T_local"] if emulated else case["T"], args.H, args.K, args.V
    with_do = case["op"] == "fwd_bwd"

    @jax.jit
    def draw(key):
        kq, kk, kv, kd = jax.random.split(key, 4)
        out = {"q": (jax.random.normal(kq, (B, T, H, K), jnp.float32) * K ** -0.5).astype(dtype),
               "k": (jax.random.normal(kk, (B, T, H, K), jnp.float32) * K ** -0.5).astype(dtype),
               "v": jax.random.normal(kv, (B, T, H, V), jnp.float32).astype(dtype)}
        if with_do:
            out["do"] = jax.random.normal(kd, (B, T, H, V), jnp.float32).astype(dtype)
        return out

    # Drawn directly in the sharded layout: no device ever holds the whole sequence for the timed call.
    x = jax.jit(draw, out_shardings={name: split for name in ("q", "k", "v", "do")[:4 if with_do else 3]})(
        jax.random.PRNGKey(case["T"]))
    decay = jax.device_put(jnp.exp(jnp.asarray(retnet_log_decay(H))), replicated)
    d_final = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (B, H, K, V), jnp.float32), replicated)
    final = not args.no_final_state

    # By default the final state is returned (and has a cotangent), as a model that carries its state uses
    # it: with one device emulating device 0 of P, nothing else would read L_p, and XLA would drop it.
    attend = _outputs(sharded_attention(case["method"], impl, axis_name="seq", emulated=emulated, scale=SCALE),
                      final)
    sharded = jax.shard_map(attend, mesh=mesh, in_specs=(P(None, "seq"),) * 3 + (P(),),
                            out_specs=(P(None, "seq"), P()) if final else (P(None, "seq"),),
                            check_vma=args.check_vma)
    if with_do:
        fn, call_args = jax.jit(_with_gradients(sharded, final)), (x["q"], x["k"], x["v"], decay, x["do"], d_final)
    else:
        fn, call_args = jax.jit(sharded), (x["q"], x["k"], x["v"], decay)
    timing = time_calls(fn, [call_args], jax_sync, target_s=target_s, min_samples=2 if args.smoke else 5)
    out = dict(ms=timing.ms, ms_min=timing.ms_min, samples=timing.samples, first_call_s=timing.first_call_s,
               tokens_per_s=B * T / (timing.ms * 1e-3))
    if args.no_check:
        return out
    if case["P"] == 1:
        out["relerr_note"] = "one device: this is the single-device call"
        return out
    if emulated:
        out["relerr_note"] = "emulated: against the plain call at T_local, the first device's block alone"
    got = fn(*call_args)
    try:
        out.update(compare_with_one_device(got, call_args, impl, with_do, split, replicated, final))
    except Exception as error:  # noqa: BLE001 - typically out of memory on device 0 at the longest T
        out["relerr_note"] = f"single-device reference did not run: {type(error).__name__}: {str(error)[:200]}"
    return out


def _outputs(attend: Callable[..., tuple], final: bool) -> Callable[..., tuple]:
    """attend(q, k, v, decay) returning a tuple: (o, final state), or (o,) without ``final``."""
    def call(q, k, v, d):
        o, final_state = attend(q, k, v, d)
        return (o, final_state) if final else (o,)
    return call


def _plain(impl: str) -> Callable[..., tuple]:
    """The unsharded fleet_attention(q, k, v, decay) -> (o, final state), at the benchmark's scale."""
    from fleetjax import fleet_attention

    def attend(q, k, v, d):
        return fleet_attention(q, k, v, d, scale=SCALE, implementation=impl, return_final_state=True)
    return attend


def _with_gradients(attend: Callable[..., tuple], final: bool) -> Callable[..., tuple]:
    """(q, k, v, decay, dO, d final state) -> the outputs of ``attend`` and the gradients in q, k, v, decay."""
    import jax

    def call(q, k, v, d, do, d_final):
        out, vjp = jax.vjp(attend, q, k, v, d)
        return out + tuple(vjp((do, d_final) if final else (do,)))
    return call


def compare_with_one_device(got: Any, call_args: tuple, impl: str, with_do: bool, split: Any,
                            replicated: Any, final: bool) -> dict[str, Any]:
    """relerr of the sharded outputs (o, final state and, for fwd_bwd, dq, dk, dv) against the unsharded call
    on device 0 (inputs gathered there)."""
    import jax

    from experiments.accuracy import output_errors

    device = jax.devices()[0]
    local = [jax.device_put(a, device) for a in call_args]
    attend = _outputs(_plain(impl), final)
    call = _with_gradients(attend, final) if with_do else attend
    # zip stops at the names: the decay's gradient is not compared.
    names = ("o",) + ("final_state",) * final + ("dq", "dk", "dv") * with_do
    want = jax.jit(call)(*local)
    del local
    errors, stride = {}, 1
    for name, g, w in zip(names, got, want):
        layout = replicated if name == "final_state" else split
        result = output_errors(g, jax.device_put(w, layout))
        errors[name], stride = result["relerr"], max(stride, result["stride"])
    worst = max((e for e in errors.values() if e is not None), default=None)
    return {"relerr": worst, "relerr_by_output": errors, **({"relerr_stride": stride} if stride > 1 else {})}


# --------------------------------------------------------------------------------------- scaling, the plot

def add_efficiency(records: list[dict[str, Any]]) -> None:
    """Parallel efficiency against the P = 1 record of the same series: weak t1 / tP, strong t1 / (P tP)."""
    base = {}
    for r in records:
        if r.get("ms") is not None and r["devices"] == 1:
            key = (r["op"], r["scaling"], r["T_per_device"] if r["scaling"] == "weak" else r["T"])
            base[key] = r["ms"]
    for r in records:
        if r.get("ms") is None:
            continue
        key = (r["op"], r["scaling"], r["T_per_device"] if r["scaling"] == "weak" else r["T"])
        if key in base:
            ideal = base[key] if r["scaling"] == "weak" else base[key] / r["devices"]
            r["efficiency"] = ideal / r["ms"]


def plot(json_path: Path) -> Path | None:
    """One row per (op, scaling): ms against device count (one line per T, weak: per device, and method;
    ideal dotted) and the parallel efficiency (strong-scaling target 0.9 dashed). None without matplotlib."""
    import json

    from experiments.plots import pyplot_or_none
    plt = pyplot_or_none()
    if plt is None:
        return None

    data = json.loads(Path(json_path).read_text())
    records = [r for r in data["records"] if r.get("ms") is not None]
    panels = sorted({(r["op"], r["scaling"]) for r in records}) or [("fwd", "weak")]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.8 * len(panels)), squeeze=False)
    for (ax, eff_ax), (op, scaling) in zip(axes, panels):
        recs = [r for r in records if (r["op"], r["scaling"]) == (op, scaling)]
        key = "T_per_device" if scaling == "weak" else "T"
        methods = sorted({r["method"] for r in recs if r["devices"] > 1}) or ["none"]
        for i, size in enumerate(sorted({r[key] for r in recs})):
            color = plt.get_cmap("tab10")(i)
            one = next((r["ms"] for r in recs if r[key] == size and r["devices"] == 1), None)
            for j, method in enumerate(methods):
                # The one-device point (no exchange) starts every method's line.
                line = sorted((r["devices"], r["ms"], r.get("efficiency")) for r in recs
                              if r[key] == size and (r["method"] == method or r["devices"] == 1))
                label = f"{'T/dev' if scaling == 'weak' else 'T'}={size}" + (f" {method}" if len(methods) > 1 else "")
                style = dict(marker="os^"[j % 3], color=color, linestyle=["-", "--", "-."][j % 3], label=label)
                ax.plot([p for p, _, _ in line], [ms for _, ms, _ in line], **style)
                eff_ax.plot([p for p, _, e in line if e is not None], [e for _, _, e in line if e is not None],
                            **style)
            if one is not None:
                ps = sorted({r["devices"] for r in recs if r[key] == size})
                ax.plot(ps, [one if scaling == "weak" else one / p for p in ps], linestyle=":", color=color,
                        linewidth=1)
        counts = sorted({r["devices"] for r in recs})
        title = f"{op} {scaling} scaling ({'fixed T per device' if scaling == 'weak' else 'fixed total T'})"
        ax.set(xscale="log", yscale="log" if scaling == "strong" else "linear", xlabel="devices on the sequence axis",
               ylabel="ms (median)", title=title)
        if scaling == "weak":
            ax.set_ylim(bottom=0)
        eff_ax.set(xscale="log", ylim=(0, 1.1), xlabel="devices on the sequence axis",
                   ylabel="efficiency (ideal time / time)", title=title)
        if scaling == "strong":
            eff_ax.axhline(0.9, color="gray", linestyle="--", linewidth=1)
        for a in (ax, eff_ax):
            a.set_xticks(counts, [str(c) for c in counts])
            a.minorticks_off()
            a.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    first = records[0] if records else {}
    emulated = sorted({r["devices"] for r in records if r.get("emulated")})
    note = f"; P = {', '.join(map(str, emulated))} emulated on one device (no communication)" if emulated else ""
    state = "" if data.get("final_state", True) else ", final state unused"
    fig.suptitle(f"fleet_attention sequence_axis_name, {data.get('implementation')} {first.get('dtype', '')} "
                 f"B{first.get('B', '')} H{first.get('H', '')} K{first.get('K', '')} V{first.get('V', '')}{state} "
                 f"on {data.get('device')} ({data.get('date')}); dotted: ideal{note}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


if __name__ == "__main__":
    sys.exit(main())
