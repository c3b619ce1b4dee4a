"""A small driver for Nsight Compute: runs the "pallas" forward and forward+backward a few times at one shape.

    ncu --kernel-name regex:fleet --launch-count 4 --section SpeedOfLight ... \
        python -m experiments.profile_pallas --B 4 --T 16384 --H 16 --ops fwd_bwd

Prints the default PallasConfig it runs with (fleetjax.pallas.chunked.default_config: each kernel's tiling
and the piece counts) and the kernels' wall time per call, so that a profile's counters can be read
against both. Where each call's time goes, kernel by kernel (``--untimed``: the calls alone, no timing loop):

    ncu --metrics gpu__time_duration.sum --csv --clock-control none python -m experiments.profile_pallas \
        --ops fwd_bwd --calls 3 --untimed > split.csv
    python -m experiments.profile_pallas --split split.csv     # the last call's kernels, longest first

What each kernel of one call moves through HBM (``--traffic``): its DRAM bytes read and written, the rate
they moved at, and how many [B, T, H, V] tensors of the run's shape and dtype that is (a walk that reads a
tensor twice where the L2 cache does not keep it shows here):

    ncu --csv --clock-control none --metrics "$(python -m experiments.profile_pallas --traffic-metrics)" \
        python -m experiments.profile_pallas --ops fwd_bwd --calls 3 --untimed > traffic.csv
    python -m experiments.profile_pallas --traffic traffic.csv   # the same --B --T --H --V --dtype

What each kernel of one call waits on (``--stalls``): the warps' stall reasons, in cycles per issued
instruction, and the busiest pipes, from ncu's counters (a few minutes: ncu replays each kernel per group of
counters):

    ncu --csv --clock-control none --metrics "$(python -m experiments.profile_pallas --stall-metrics)" \
        python -m experiments.profile_pallas --ops fwd_bwd --calls 3 --untimed > stalls.csv
    python -m experiments.profile_pallas --stalls stalls.csv   # the last call's kernels, longest first

One kernel alone is faster to profile: ``ncu -k regex:dq_sums_walk ... --calls 2``; the readers then take its
last launch.

Whether a call waits on the host for the GPU (a lax.cond's predicate, a blocking copy), which leaves the GPU
idle between the calls of a training loop, and the host's own time per call: ``--host-wait`` enqueues ten
calls behind a long XLA op and times that (:func:`host_wait`).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.inputs import retnet_log_decay, with_walk_fields  # noqa: E402
from experiments.timing import jax_long_op, jax_sync, time_calls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("B", 4), ("T", 16384), ("H", 16), ("K", 128), ("V", 128), ("calls", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ops", default="fwd,fwd_bwd", help="which of fwd, fwd_bwd to run, in this order")
    ap.add_argument("--fixed-decay", action="store_true",
                    help="fwd_bwd without the decay's (gated: the gate's) gradient; by default it is "
                    "differentiated")
    ap.add_argument("--gated", action="store_true",
                    help="a per-token log gate (logsigmoid(N(0, 1)) / 16) and no per-head decay, as the gated "
                    "benchmarks")
    ap.add_argument("--with-decay", action="store_true",
                    help="with --gated: a learned per-head decay beside the gate (fleetjax's gated layers), both "
                    "differentiated")
    ap.add_argument("--walks", default=None, metavar="JSON",
                    help='MosaicWalkConfig fields, or the PallasConfig\'s own, to change from the default config, '
                         'e.g. \'{"block_v": 128}\'')
    ap.add_argument("--untimed", action="store_true", help="run the calls only (under a profiler)")
    ap.add_argument("--host-wait", action="store_true",
                    help="also time enqueueing ten calls behind a long XLA op (see host_wait)")
    ap.add_argument("--split", metavar="CSV", help="print the last call's kernels from ncu's --csv output of "
                    "gpu__time_duration.sum, and exit")
    ap.add_argument("--stalls", metavar="CSV", help="print the last call's kernels' stall reasons and busiest "
                    "pipes from ncu's --csv output of --stall-metrics, and exit")
    ap.add_argument("--traffic", metavar="CSV", help="print the last call's kernels' DRAM bytes, their rate and "
                    "their count in [B, T, H, V] tensors from ncu's --csv output of --traffic-metrics, and exit")
    ap.add_argument("--traffic-metrics", action="store_true", help="print the ncu --metrics argument that "
                    "--traffic reads, and exit")
    ap.add_argument("--stall-metrics", action="store_true", help="print the ncu --metrics argument that "
                    "--stalls reads, and exit")
    args = ap.parse_args(argv)
    if args.split:
        print_split(args.split)
        return 0
    if args.stall_metrics:
        print(",".join(STALL_METRICS))
        return 0
    if args.traffic_metrics:
        print(",".join(TRAFFIC_METRICS))
        return 0
    if args.traffic:
        tensor = args.B * args.T * args.H * args.V * jnp.dtype(args.dtype).itemsize
        print_traffic(args.traffic, tensor_bytes=tensor)
        return 0
    if args.stalls:
        print_stalls(args.stalls)
        return 0
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), dtype) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype) for _ in range(2))
    per_head = jnp.asarray(np.exp(retnet_log_decay(H)), jnp.float32)
    decay = per_head if args.with_decay or not args.gated else None
    log_gate = (jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)) / 16
                if args.gated else None)
    record = fleetjax.IMPLEMENTATIONS["pallas"]
    config = record.config_for(None, q, v)
    if args.walks is not None:
        try:
            config = with_walk_fields(config, args.walks)
        except ValueError as error:
            ap.error(str(error))
    print("config", config, "(Pallas interpret mode)" if record.interpreted() else "", flush=True)
    attend = lambda q, k, v, decay, log_gate: fleetjax.fleet_attention(  # noqa: E731
        q, k, v, decay, log_gate=log_gate, implementation="pallas", config=config)
    # What fwd_bwd differentiates besides q, k and v: the decay and the gate where given, neither with
    # --fixed-decay. Both are arguments of the timed functions, as in the benchmarks: closed over, a gate
    # [B, T, H] is a constant that XLA folds the gate's cumulative sums into (seconds of compilation, and those
    # sums then go unprofiled).
    wanted = () if args.fixed_decay else ("decay",) * (decay is not None) + ("log_gate",) * (log_gate is not None)

    def both(q, k, v, do, decay, log_gate):  # the output too, so that the forward runs as in training
        given = dict(decay=decay, log_gate=log_gate)

        def f(q, k, v, *learned):
            named = {**given, **dict(zip(wanted, learned))}
            return attend(q, k, v, named["decay"], named["log_gate"])

        o, pullback = jax.vjp(f, q, k, v, *(given[name] for name in wanted))
        return o, pullback(do)

    fwd = jax.jit(attend)
    fwd_bwd = jax.jit(both)
    runs = {"fwd": (fwd, (q, k, v, decay, log_gate)), "fwd_bwd": (fwd_bwd, (q, k, v, do, decay, log_gate))}
    for name in args.ops.split(","):
        fn, xs = runs[name]
        for _ in range(args.calls):
            jax.block_until_ready(fn(*xs))
        if args.host_wait:
            wait = host_wait(fn, xs)
            print(f"{name}: a long op of {wait['long_ms']:.1f} ms, then {wait['calls']} calls enqueued in "
                  f"{wait['enqueue_ms']:.2f} ms (a call waits on the host if about the long op's time; else the "
                  f"host's time per call is {wait['enqueue_ms'] / wait['calls']:.3f} ms), all done in "
                  f"{wait['done_ms']:.1f} ms", flush=True)
        if args.untimed:
            continue
        print(name, time_calls(fn, [xs], jax_sync, target_s=0.1).ms, "ms", flush=True)
    return 0


def host_wait(fn, xs: tuple, calls: int = 10) -> dict:
    """Whether ``fn(*xs)`` waits on the host for the GPU: a long device op (timing.jax_long_op, about 20 ms)
    is enqueued, then ``calls`` calls of fn. Without a wait in fn the host enqueues them while the GPU is busy
    with the long op, in far less than its time; with one, the first call blocks until the long op is done.
    Without a wait, enqueue_ms / calls is the host's own time per call (dispatch, launches): where it nears a
    call's wall time, the calls are bound by the host. Returns the long op's time alone (long_ms), the time to
    enqueue the calls behind it (enqueue_ms) and until everything is done (done_ms), ms."""
    long_op = jax_long_op()
    jax.block_until_ready((long_op(), fn(*xs)))
    # One untimed round as the timed one: the allocator then holds the memory of ``calls`` outstanding calls.
    # Without it (XLA_PYTHON_CLIENT_PREALLOCATE=false) each call grew the pool in the timed round and waited:
    # 5.7 ms a forward call enqueued against its 0.52 ms (H100, 2026-12-05).
    jax.block_until_ready((long_op(), [fn(*xs) for _ in range(calls)]))
    t0 = time.perf_counter()
    jax.block_until_ready(long_op())
    long_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    y = long_op()
    outs = [fn(*xs) for _ in range(calls)]
    t1 = time.perf_counter()
    jax.block_until_ready((y, outs))
    t2 = time.perf_counter()
    return dict(long_ms=long_ms, calls=calls, enqueue_ms=(t1 - t0) * 1e3, done_ms=(t2 - t0) * 1e3)


def last_call(names: list[str]) -> int:
    """The number of kernels of one call: the shortest tail that the two before it repeat (compilation
    launches its own kernels first, so the calls are found from the end); 1 where every launch is of one
    kernel (a profile filtered to it)."""
    for m in range(1, len(names) // 3 + 1):
        if names[-m:] == names[-2 * m:-m] == names[-3 * m:-2 * m]:
            return m
    if names and len(set(names)) == 1:
        return 1  # one kernel (ncu -k kept only it): its last launch is the last call's
    raise ValueError(f"no call of kernels repeats three times at the end of {len(names)} launches")


# ncu's time units, in ms.
_MS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3, "ns": 1e-6, "us": 1e-3, "ms": 1.0,
       "s": 1e3}
# Each warp's cycles between two issued instructions, by the reason it was not issued (the stall reasons of
# ncu's Warp State Statistics, which sum to the cycles per issued instruction), the issue rate, and each
# pipe's busy share of the active cycles (which unit, if any, bounds the kernel).
_STALL = "smsp__average_warps_issue_stalled_"
_PIPE = "sm__pipe_"
STALL_REASONS = ("barrier", "branch_resolving", "dispatch_stall", "drain", "imc_miss", "lg_throttle",
                 "long_scoreboard", "math_pipe_throttle", "membar", "mio_throttle", "misc", "no_instruction",
                 "not_selected", "selected", "short_scoreboard", "sleeping", "tex_throttle", "wait")
STALL_METRICS = ("gpu__time_duration.sum", "smsp__issue_active.avg.per_cycle_active",
                 "smsp__warps_active.avg.per_cycle_active", "smsp__inst_executed.sum",
                 "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
                 *(f"{_STALL}{reason}_per_issue_active.ratio" for reason in STALL_REASONS),
                 rf"regex:{_PIPE}.*_cycles_active\.avg\.pct_of_peak_sustained_active")
TRAFFIC_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
_BYTES = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def _csv_rows(path: str) -> list[dict]:
    """ncu's --csv rows (one per kernel launch and metric), from a file or its gzip (the committed ones); its
    own log lines are not quoted."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="") as f:
        return list(csv.DictReader(line for line in f if line.startswith('"')))


def _number(value: str) -> float:
    """ncu's value (thousands separated by commas), NaN where it has none (n/a)."""
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return float("nan")


def _last_call_launches(path: str) -> list[dict]:
    """The last call's kernel launches from ncu's CSV (one row per launch and metric), in launch order: each
    one's name, grid and metrics ({name: (value, unit)})."""
    launches: dict[str, dict] = {}
    for r in _csv_rows(path):
        launch = launches.setdefault(r["ID"], dict(name=r["Kernel Name"], grid=r["Grid Size"], metrics={}))
        launch["metrics"][r["Metric Name"]] = (_number(r["Metric Value"]), r["Metric Unit"])
    launches = list(launches.values())
    return launches[-last_call([launch["name"] for launch in launches]):]


def _scaled(metrics: dict, name: str, units: dict[str, float]) -> float:
    """A launch's metric in the units' base (ms for _MS, bytes for _BYTES); NaN where ncu gave no such metric
    or an unknown unit."""
    value, unit = metrics.get(name, (float("nan"), None))
    return value * units.get(unit, float("nan"))


def _longest_first(table: list[dict]) -> list[dict]:
    """The rows by their ms, longest first; rows without a time last."""
    return sorted(table, key=lambda row: -row["ms"] if row["ms"] == row["ms"] else 0.0)


def traffic_table(path: str) -> list[dict]:
    """The last call's kernels from ncu's CSV of TRAFFIC_METRICS, longest first: name, grid, ms, DRAM bytes
    read and written, and the rate they moved at (GB/s)."""
    table = []
    for launch in _last_call_launches(path):
        metrics = launch["metrics"]
        ms = _scaled(metrics, "gpu__time_duration.sum", _MS)
        read, written = (_scaled(metrics, f"dram__bytes_{way}.sum", _BYTES) for way in ("read", "write"))
        table.append(dict(name=launch["name"], grid=launch["grid"], ms=ms, read=read, written=written,
                          gbps=(read + written) / (ms * 1e6)))
    return _longest_first(table)


def print_traffic(path: str, tensor_bytes: float) -> None:
    """traffic_table with each kernel's bytes also counted in tensors of ``tensor_bytes``, and the call's
    sums."""
    table = traffic_table(path)
    for row in table:
        print(f"{row['ms']:8.4f} ms  {row['read'] / 1e6:9.1f} MB read ({row['read'] / tensor_bytes:5.2f} tensors)  "
              f"{row['written'] / 1e6:8.1f} MB written ({row['written'] / tensor_bytes:5.2f})  "
              f"{row['gbps']:7.1f} GB/s  grid {row['grid']:>12}  {row['name'][:50]}")
    ms = sum(row["ms"] for row in table)
    moved = sum(row["read"] + row["written"] for row in table)
    print(f"{ms:8.4f} ms in {len(table)} kernels: {moved / 1e9:.3f} GB ({moved / tensor_bytes:.2f} tensors of "
          f"{tensor_bytes / 1e6:.1f} MB), {moved / (ms * 1e6):.1f} GB/s")


def print_split(path: str) -> None:
    """The last call's kernels from ncu's CSV (one row per kernel and metric), each with its time, longest
    first, and their sum."""
    launches = _last_call_launches(path)
    kernels = [(launch["name"], launch["metrics"]["gpu__time_duration.sum"], launch["grid"]) for launch in launches]
    tail = sorted(((name, value * _MS[unit], grid) for name, (value, unit), grid in kernels),
                  key=lambda kernel: -kernel[1])
    for name, ms, grid in tail:
        print(f"{ms:8.4f} ms  grid {grid:>16}  {name[:110]}")
    print(f"{sum(ms for _, ms, _ in tail):8.4f} ms  in {len(tail)} kernels")


def stall_table(path: str, top: int = 6) -> list[dict]:
    """The last call's kernels from ncu's CSV of STALL_METRICS, longest first: name, grid, ms, issued
    instructions per cycle and warps per scheduler, the ``top`` stall reasons (cycles per issued instruction,
    which sum to the warps' cycles per instruction) and pipes (% of peak), shared-memory bank conflicts."""
    table = []
    for launch in _last_call_launches(path):
        metrics = launch["metrics"]
        value = lambda name: metrics.get(name, (float("nan"), ""))[0]  # noqa: E731
        stalls = {name[len(_STALL):].split("_per_issue_active")[0]: v for name, (v, _) in metrics.items()
                  if name.startswith(_STALL) and v == v}
        pipes = {name[len(_PIPE):].split("_cycles_active")[0]: v for name, (v, _) in metrics.items()
                 if name.startswith(_PIPE) and v == v}
        table.append(dict(name=launch["name"], grid=launch["grid"], ms=_scaled(metrics, "gpu__time_duration.sum", _MS),
                          ipc=value("smsp__issue_active.avg.per_cycle_active"),
                          warps=value("smsp__warps_active.avg.per_cycle_active"),
                          cpi=sum(stalls.values()),
                          stalls=sorted(stalls.items(), key=lambda kv: -kv[1])[:top],
                          pipes=sorted(pipes.items(), key=lambda kv: -kv[1])[:top],
                          bank_conflicts=value("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum")))
    return _longest_first(table)


def print_stalls(path: str) -> None:
    for row in stall_table(path):
        print(f"{row['ms']:8.4f} ms  grid {row['grid']:>14}  issued {row['ipc']:.2f}/cycle  "
              f"{row['warps']:.2f} warps/scheduler  {row['cpi']:.2f} cycles/instruction  {row['name'][:60]}")
        print("    stalls: " + ", ".join(f"{name} {v:.2f}" for name, v in row["stalls"]))
        print("    pipes:  " + ", ".join(f"{name} {v:.1f}%" for name, v in row["pipes"])
              + f"; shared-memory bank conflicts {row['bank_conflicts']:.0f}")


if __name__ == "__main__":
    sys.exit(main())
