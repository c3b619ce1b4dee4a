"""The forward and forward+backward benchmarks' driver: every implementation on every case under a time
budget, each record written to the results file as soon as it exists, then the plot and the table.

The command-line options are in :func:`add_common_args`; bench_forward.py and bench_backward.py give the
cases and implementations.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from experiments.accuracy import REFERENCE, SCALE, output_errors, reference_outputs
from experiments.bandwidth import copy_bandwidth, hbm_floor_ms
from experiments.inputs import GATED_DECAYS, RETNET_DECAYS, Case, make_inputs, retnet_log_decay
from experiments.memory import MIB, jax_runtime_extra_peak_mb, release_memory, torch_extra_peak_mb, tree_bytes
from experiments.peers import Impl
from experiments.plots import plot_results
from experiments.records import (RESULTS_DIR, ResultsFile, device_info, device_slug, format_table, results_path,
                                 today, versions)
from experiments.timing import (Budget, CallTimeout, CompileCounter, batched_calls, compile_jax, jax_sync,
                                jit_cache_size, jax_long_op, queued_calls, sync_wait_us, time_calls, time_limit,
                                torch_do_bench_ms, torch_long_op, torch_sync)


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.0f}s] {message}", flush=True)


def measure(impl: Impl, case: Case, op: str, input_sets: list[dict[str, Any]], ref: dict[str, Any],
            log_decay: np.ndarray, *, target_s: float, min_samples: int = 5,
            sample_floor_s: float = 2e-3, batched: bool = False) -> dict[str, Any]:
    """Time one implementation on one case; its errors against ``ref``; compile time and recompilations
    (JAX); extra peak memory (fwd_bwd). ``batched``: JAX's also as one program over the input sets
    (ms_batched, timing.batched_calls). Returns the record's measured fields."""
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
        # The queued measure's long op compiles once per run, before the window in which the op's calls
        # must compile nothing (else the first record of a run was flagged with the long op's compiles).
        _build(jax_long_op)
        # After the explicit compile: the first call on data set 0 (Pallas interpret mode may compile
        # callbacks here), then every other data set, the timed and the queued calls: none may compile.
        count = CompileCounter.count()
        jax_sync(bound.jitted(*arg_sets[0]))
        rec["compiles_first_call"] = CompileCounter.count() - count
        count = CompileCounter.count()
        for args in arg_sets[1:]:
            jax_sync(bound.jitted(*args))
        timing = time_calls(bound.jitted, arg_sets, jax_sync, target_s=target_s, min_samples=min_samples,
                            sample_floor_s=sample_floor_s)
        queued = _queued(bound.jitted, arg_sets, jax_sync, jax_long_op, timing.ms)
        rec["recompiles_on_new_data"] = CompileCounter.count() - count
        rec["jit_cache_size"] = jit_cache_size(bound.jitted)
        if batched:  # after the count: the program over every set compiles here
            rec["ms_batched"], rec["batched_calls"] = batched_calls(
                bound.jitted, arg_sets, target_s=target_s, min_samples=min_samples, sample_floor_s=sample_floor_s)
    else:
        # Timing first: its first call carries Triton's compilation and autotuning (first_call_s), whose
        # scratch buffers must not count as the peer's memory.
        timing = time_calls(bound.call, arg_sets, torch_sync, target_s=target_s, min_samples=min_samples,
                            sample_floor_s=sample_floor_s)
        queued = _queued(bound.call, arg_sets, torch_sync, torch_long_op, timing.ms)
        if op == "fwd_bwd":
            extra, out_mb = torch_extra_peak_mb(bound.call, arg_sets[0])
            if extra is not None:
                rec["extra_peak_mb"], rec["outputs_mb"] = extra, out_mb
        rec["ms_do_bench"] = torch_do_bench_ms(lambda: bound.call(*arg_sets[0]))
    rec.update(ms=timing.ms, ms_min=timing.ms_min, samples=timing.samples,
               calls_per_sample=timing.calls_per_sample, first_call_s=timing.first_call_s, **queued)
    if rec.get("extra_peak_mb") is not None:
        rec["peak_mb"] = rec["inputs_mb"] + rec.get("outputs_mb", 0.0) + rec["extra_peak_mb"]

    parts = bound.unpack(bound.call(*arg_sets[0]))
    for name, value in parts.items():
        errors = output_errors(value, ref[name])
        rec[f"relerr_{name}"] = errors["relerr"]
        rec[f"relerr_l2_{name}"] = errors["relerr_l2"]
        if errors["stride"] > 1:  # the max-norm error read every stride-th position (experiments/accuracy.py)
            rec["relerr_stride"] = max(errors["stride"], rec.get("relerr_stride", 1))
        if errors.get("nonfinite"):
            rec["nonfinite"] = True
    del parts
    if op == "fwd":
        rec["relerr"] = rec.get("relerr_o")
    else:
        grads = [rec[f"relerr_{n}"] for n in ("dq", "dk", "dv") if f"relerr_{n}" in rec]
        rec["relerr"] = None if not grads or any(g is None for g in grads) else max(grads)
    return rec


def _build(long_op) -> None:
    """Build (and compile) the queued measure's long op; a failure is left for :func:`_queued` to record."""
    try:
        long_op()
    except CallTimeout:  # the step's time limit stays the step's
        raise
    except Exception:  # noqa: BLE001
        pass


def _queued(call, arg_sets: list[tuple], sync, long_op, call_ms: float) -> dict[str, Any]:
    """queued_calls' fields for the record; a failure is recorded, not raised (a second measure must not
    lose the record's first)."""
    try:
        queued = queued_calls(call, arg_sets, sync, long_op(), call_ms=call_ms)
    except CallTimeout:  # the step's time limit stays the step's
        raise
    except Exception as e:  # noqa: BLE001
        return {"queued_error": f"{type(e).__name__}: {e}"[:300]}
    return dict(ms_queued=queued.ms, enqueue_ms=queued.enqueue_ms, queued_calls=queued.calls,
                queued_heads=queued.heads, queued_ahead=queued.ahead)


def _record_line(rec: dict[str, Any], label: str) -> str:
    if rec.get("ms") is None:
        return f"{rec['impl']:22s} {label}: {rec.get('skipped') or rec.get('error')}"[:300]
    relerr = rec.get("relerr")
    return (f"{rec['impl']:22s} {label}: {rec['ms']:.3f} ms (floor {rec['hbm_floor_ms']:.3f}) relerr "
            + ("-" if relerr is None else f"{relerr:.1e}")
            + (f" queued {rec['ms_queued']:.3f} (host {rec['enqueue_ms']:.3f} a call)" if "ms_queued" in rec else "")
            + (f" batched {rec['ms_batched']:.3f}" if "ms_batched" in rec else "")
            + (f" compile {rec['compile_s']:.1f}s" if "compile_s" in rec else "")
            + (f" first call {rec['first_call_s']:.1f}s" if rec.get("first_call_s", 0) > 2 else "")
            + (f" extra {rec['extra_peak_mb']:.0f}MB" if rec.get("extra_peak_mb") is not None else ""))


def run_benchmark(op: str, cases: Sequence[Case], impls: Sequence[Impl], *, results: ResultsFile,
                  budget: Budget, impl_timeout_s: float, target_s: float, n_sets: int = 3,
                  min_samples: int = 5, sample_floor_s: float = 2e-3, gbps: float,
                  timed_out: set[tuple] | None = None, batched: bool = False) -> None:
    """Every impl on every case, in order; each record added to ``results`` as soon as it exists.

    Inputs and the reference of a case are made only if some implementation runs on it. An implementation
    starts only with at least 10 s of budget left and runs under a time limit of min(impl_timeout_s, what
    is left). An implementation that autotunes (``impl.autotunes``) and timed out is not started again on
    a case with the same autotuning key (H, K, V, dtype): it would start the same search again. What does
    not run is recorded as skipped, with why. ``batched``: see :func:`measure`.
    """
    timed_out = set() if timed_out is None else timed_out  # shared between calls by run_main
    for case in cases:
        base = {"op": op, **case.fields(), "ms": None, "relerr": None,
                "hbm_floor_ms": hbm_floor_ms(op, case.B, case.T, case.H, case.K, case.V, case.itemsize, gbps,
                                             gated=case.gated)}
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
                        ref = reference_outputs(op, inputs[0], log_decay)
                    data["value"] = (inputs, ref)
                except Exception as e:  # noqa: BLE001 - CallTimeout included
                    data["error"] = RuntimeError(f"inputs/reference failed: {type(e).__name__}: {e}")
            if "error" in data:
                raise data["error"]
            return data["value"]

        for impl in impls:
            rec = {**base, "impl": impl.name, "framework": impl.framework, "input_layout": impl.input_layout}
            if op == "fwd_bwd":  # gated cases have no decay: whether the log gate's gradient comes back
                rec.update({"gate_grad": impl.gate_grad} if case.gated else {"decay_grad": impl.decay_grad})
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
                                       min_samples=min_samples, sample_floor_s=sample_floor_s,
                                       batched=batched))
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
            release_memory()
            log(budget, _record_line(rec, case.label))
        data.clear()
        release_memory()


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
    parser.add_argument("--sample-ms", type=float, default=20.0,
                        help="the least wall time of one sample's back-to-back calls, which one sync ends "
                             "(default 20, 2 before 2026-12-06); a longer sample spreads the sync's wake-up "
                             "over more calls, as a training loop that syncs rarely does")
    parser.add_argument("--impls", default=None,
                        help="comma-separated implementation names to run (default: all)")
    parser.add_argument("--skip-slow-autotune", action="store_true",
                        help="skip fla at head dim > 128, whose first call autotunes for minutes")
    parser.add_argument("--name", default=None,
                        help="results file name part (default forward/backward; --gated appends -gated)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes of the cases to run (default: all)")
    parser.add_argument("--shapes", default=None, help="B,T,H,K,V;... : run only these shapes (default: all)")
    parser.add_argument("--batched", action="store_true",
                        help="also time JAX implementations as one jitted program over the input sets "
                             "(ms_batched: the device's time per call where the host's is longer)")
    parser.add_argument("--gated", action="store_true",
                        help="per-token log gates [B, T, H] (logsigmoid(N(0,1))/16) and no per-head decay, "
                             "as fla's g=; peers without a per-token gate are skipped; results file "
                             "<name>-gated")


def select_impls(impls: Sequence[Impl], names: str | None) -> list[Impl]:
    if names is None:
        return [impl for impl in impls if not impl.by_name_only]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {impl.name for impl in impls}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; known: {sorted(known)}")
    return [impl for impl in impls if impl.name in wanted]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"B,T,H,K,V;B,T,H,K,V;..." -> [(B, T, H, K, V), ...] (the --shapes option of the benchmarks and tunes)."""
    return [tuple(int(n) for n in shape.split(",")) for shape in text.split(";")]


def _autotune_note() -> str:
    """Where the torch peers' Triton autotuning winners came from (experiments/run_gpu_bench.sh)."""
    if os.environ.get("TRITON_CACHE_AUTOTUNING") != "1":
        return "searched in this run (no autotuning cache)"
    seed = os.environ.get("BENCH_TRITON_AUTOTUNE_SEED")
    if seed:
        return f"Triton's on-disk autotuning cache, seeded from {seed}: a search whose winner it held was not run again"
    return "searched in this run (Triton's on-disk autotuning cache, empty at the start)"


def run_main(args, op: str, case_groups: Sequence[Sequence[Case]], impls: Sequence[Impl], name: str) -> ResultsFile:
    """Measure the copy bandwidth, run the benchmark over the groups of cases (most important first),
    draw the plot, print the table. With ``args.gated`` (whose cases the caller made gated) the results
    file is <name>-gated and its "decays" says that the per-token gate alone decays."""
    if getattr(args, "dtypes", None):
        wanted = args.dtypes.split(",")
        case_groups = [[case for case in group if case.dtype in wanted] for group in case_groups]
    if getattr(args, "shapes", None):
        shapes = set(parse_shapes(args.shapes))
        case_groups = [[case for case in group if case.shape in shapes] for group in case_groups]
    import jax
    budget = Budget(args.budget_s)
    info = device_info()
    slug = device_slug(info)
    gated = bool(getattr(args, "gated", False))
    batched = bool(getattr(args, "batched", False))
    base = args.name or name  # --gated suffixes --name too: a call's plain and gated runs keep their own files
    path = results_path(f"{base}-gated" if gated else base, device=slug, out_dir=args.out)
    log(budget, f"{op}: {sum(map(len, case_groups))} cases x {len(impls)} implementations on "
        f"{info.get('torch_device') or info['device_kind']} (jax {jax.__version__}, backend {info['backend']}); "
        f"results {path}")
    bandwidth = copy_bandwidth(64 if args.smoke else 1024)
    log(budget, f"copy bandwidth {bandwidth['gbps']:.0f} GB/s (jax {bandwidth['jax_gbps']}, "
        f"torch {bandwidth['torch_gbps']})")
    sync_wait = sync_wait_us()
    log(budget, f"a tiny op's enqueue to its sync's return: jax {sync_wait['jax_us']:.0f} us, torch "
        + ("-" if sync_wait["torch_us"] is None else f"{sync_wait['torch_us']:.0f} us"))
    results = ResultsFile(path, device=slug, date=today(), versions=versions(), device_info=info,
                          copy_bandwidth=bandwidth, sync_wait_us=sync_wait, reference=REFERENCE,
                          smoke=bool(args.smoke),
                          decays=GATED_DECAYS if gated else RETNET_DECAYS, scale=SCALE,
                          timing=("median over samples of wall-clock time per call; each sample is back-to-back "
                                  f"calls on rotated input sets lasting at least {args.sample_ms:g} ms, followed "
                                  "by one sync (jax.block_until_ready or torch.cuda.synchronize); torch peers "
                                  "also carry triton's do_bench median as ms_do_bench. ms_queued: the calls "
                                  "(queued_calls: those of one ~20 ms device op, at least 8, fewer where 8 GiB of "
                                  "their outputs would not fit) enqueued behind such ops (queued_heads of them, "
                                  "as many as the calls last) and synced once, (all done - those ops alone, "
                                  "timed in the same round) / calls, median of 3 rounds: the device's time per "
                                  "call with the host kept ahead (queued_ahead false where it was not); "
                                  "enqueue_ms: the host's time to enqueue one call"
                                  + ("; ms_batched (JAX, --batched): one jitted program running the call on "
                                     "each of its batched_calls input sets in turn, timed as one call, / the "
                                     "sets: no host between the calls" if batched
                                     else "")),
                          memory=("extra_peak_mb = peak device memory of one call above what was live before "
                                  "it, less the call's outputs; JAX: XLA's temp allocation from "
                                  "compiled.memory_analysis() (extra_peak_mb_runtime: device.memory_stats() "
                                  "peak delta, known only when the call set a new process-wide peak); torch: "
                                  "torch.cuda.max_memory_allocated() after reset_peak_memory_stats()"),
                          autotune=_autotune_note())
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
            log(budget, f"case group {g + 1}, {kind}: {', '.join(impl.name for impl in members)}")
            run_benchmark(op, group, members, results=results, budget=budget,
                          impl_timeout_s=args.impl_timeout_s if kind == "quick" else args.autotune_timeout_s,
                          target_s=target_s, n_sets=2 if args.smoke else 3,
                          min_samples=2 if args.smoke else 5, sample_floor_s=args.sample_ms * 1e-3,
                          gbps=bandwidth["gbps"], timed_out=timed_out,
                          batched=batched)
    cases = [case for group in case_groups for case in group]
    notes = {name: getattr(sys.modules[name], "fleetjax_note") for name in ("fla",)
             if hasattr(sys.modules.get(name), "fleetjax_note")}
    if notes:
        results.set("import_notes", notes)
    # Records in case order, then implementation order, for the table and the file.
    case_index = {(c.dtype, c.B, c.T, c.H, c.K, c.V, c.gated): i for i, c in enumerate(cases)}
    impl_index = {impl.name: i for i, impl in enumerate(impls)}
    results.records.sort(key=lambda r: (case_index.get((r["dtype"], r["B"], r["T"], r["H"], r["K"], r["V"],
                                                        r.get("gated", False)), 0),
                                        impl_index.get(r["impl"], 0)))
    results.set("wall_s", budget.elapsed())
    try:
        png = plot_results(path)
        log(budget, f"plot {png}")
    except Exception as e:  # noqa: BLE001 - the JSON is the result; a plot failure is reported, not fatal
        log(budget, f"plot failed: {type(e).__name__}: {e}")
    print(format_table(results.records), flush=True)
    print(f"results: {path}", flush=True)
    return results
