"""The benchmarks' own pieces (experiments/): the sequence-parallel compositions that bench_multigpu.py times,
the relative error, the cases, the tune sweep's configs and the plot.

The compositions need several devices. JAX fixes its device count when it starts and the rest of the suite
runs with one CPU device, so they run in subprocesses (tests/devices.py: this file executed as a script with
4 fake CPU devices), which print every case's errors as JSON; each pytest test reads its case from that
output.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import numpy as np
import pytest

import devices

DEVICES = 4
WORKERS = 2  # subprocesses that share the cases
B, T, H, K, V = 2, 32, 2, 8, 16
DECAY = [0.95, 0.5]
# Row 0: a reset inside the second block (13) and one on the last block's first position (24), where the
# entering state reaches nothing. Row 1: one run through every block.
SEGMENT_IDS = [[0] * 13 + [1] * 11 + [2] * 8, [4] * 32]
TOLERANCE = 2e-5  # float32 inputs: the orders of the work differ only in float32 rounding
OUTPUTS = ("o", "final_state", "dq", "dk", "dv", "d_decay", "d_initial_state")

# (id, method, emulated, check_vma, with segment ids and an initial state)
# ("generic" emulated is the same program as "entering_state" for "xla", which has no BlockKernels.)
CASES = [("correction-novma", "correction", False, False, False),
         ("correction-segments", "correction", False, True, True),
         ("correction-segments-novma", "correction", False, False, True),
         ("emulated-entering_state", "entering_state", True, True, True),
         ("emulated-correction", "correction", True, True, True)]


# ------------------------------------------------------------------------------------ subprocess worker

def _inputs(t: int) -> dict[str, Any]:
    import jax.numpy as jnp
    rng = np.random.default_rng(3)
    shapes = dict(q=(B, t, H, K), k=(B, t, H, K), v=(B, t, H, V), initial_state=(B, H, K, V), do=(B, t, H, V),
                  d_final=(B, H, K, V))
    out = {name: jnp.asarray(rng.standard_normal(shape), jnp.float32) for name, shape in shapes.items()}
    out["decay"] = jnp.asarray(DECAY, jnp.float32)
    out["segment_ids"] = jnp.asarray([row[:t] for row in SEGMENT_IDS], jnp.int32)
    return out


def _with_gradients(attend, x: dict[str, Any]) -> dict[str, Any]:
    """attend(q, k, v, decay, initial_state, segment_ids) -> (o, final state): its outputs and gradients."""
    import jax

    def primal(q, k, v, decay, initial_state):
        return attend(q, k, v, decay, initial_state, x["segment_ids"])

    out, vjp = jax.vjp(primal, x["q"], x["k"], x["v"], x["decay"], x["initial_state"])
    return dict(zip(OUTPUTS, out + vjp((x["do"], x["d_final"]))))


def _run_case(method: str, emulated: bool, check_vma: bool, segments: bool) -> dict[str, float]:
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from experiments.combine_methods import sharded_attention
    from fleetjax import fleet_attention
    from fleetjax.check import relative_error

    # Emulated: one device's share, the first block, on a mesh axis of one device.
    devices = 1 if emulated else DEVICES
    x = _inputs(T // DEVICES if emulated else T)
    if not segments:
        x["initial_state"] = x["initial_state"] * 0
    block = sharded_attention(method, "xla", axis_name="seq", emulated=emulated)

    def sharded(q, k, v, decay, initial_state, segment_ids):
        mapped = jax.shard_map(
            lambda q, k, v, d, s, ids: block(q, k, v, d, s, ids if segments else None),
            mesh=Mesh(np.array(jax.devices()[:devices]), ("seq",)),
            in_specs=(P(None, "seq"),) * 3 + (P(), P(), P(None, "seq")), out_specs=(P(None, "seq"), P()),
            check_vma=check_vma)
        return mapped(q, k, v, decay, initial_state, segment_ids)

    def plain(q, k, v, decay, initial_state, segment_ids):
        return fleet_attention(q, k, v, decay, initial_state=initial_state, return_final_state=True,
                               segment_ids=segment_ids if segments else None, implementation="xla")

    got = jax.jit(lambda x: _with_gradients(sharded, x))(x)
    want = jax.jit(lambda x: _with_gradients(plain, x))(x)
    return {name: relative_error(got[name], want[name]) for name in OUTPUTS}


def _worker(case_ids: list[str]) -> None:
    results: dict[str, Any] = {}
    for case_id, *case in CASES:
        if case_id not in case_ids:
            continue
        try:
            results[case_id] = {"errors": _run_case(*case)}
        except Exception as error:  # noqa: BLE001 - reported by that case's test
            results[case_id] = {"exception": f"{type(error).__name__}: {error}"}
    devices.print_results(results)


# ------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """Every case's errors, from WORKERS subprocesses running at once (the cases' time is compilation)."""
    ids = [case[0] for case in CASES]
    return devices.run_workers(__file__, DEVICES, [ids[i::WORKERS] for i in range(WORKERS)], timeout=600)


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
def test_composition_equals_unsharded(results, case_id):
    """bench_multigpu's orders of the work (correction over 4 devices; every method emulated on one) give the
    unsharded call's output, final state and gradients in q, k, v, decay and the initial state."""
    result = results[case_id]
    assert "exception" not in result, result.get("exception")
    bad = {name: err for name, err in result["errors"].items() if not err <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE}: {bad}"


def test_output_errors_strides_large_outputs():
    """relerr reads every stride-th position above the element cap; the L2 ratio and the non-finite check
    read everything."""
    import jax.numpy as jnp

    from experiments.accuracy import output_errors
    ref = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 2, 4)), jnp.float32)
    off = ref.at[0, 1].add(1.0)  # an error at an odd position only
    full = output_errors(off, ref)
    strided = output_errors(off, ref, max_elements=128)
    assert full["stride"] == 1 and full["relerr"] > 0.1
    assert strided["stride"] == 4 and strided["relerr"] == 0.0 and strided["relerr_l2"] == full["relerr_l2"]
    nan = output_errors(ref.at[0, 1, 0, 0].set(jnp.nan), ref, max_elements=128)
    assert nan["relerr"] is None and nan["nonfinite"]


def test_same_bits_compares_bit_patterns():
    """experiments.accuracy.same_bits, the A/Bs' bitwise equality: a NaN equals itself, -0.0 is not 0.0, and
    arrays of other dtypes or shapes differ (jnp.array_equal says the opposite of the first two)."""
    import jax.numpy as jnp

    from experiments.accuracy import same_bits
    x = jnp.asarray([1.0, jnp.nan, 0.0, -2.5], jnp.bfloat16)
    assert same_bits(x, x + 0) and not bool(jnp.array_equal(x, x))
    zeros = jnp.asarray([0.0, 1.0], jnp.bfloat16)
    assert not same_bits(zeros, zeros.at[0].set(-0.0)) and bool(jnp.array_equal(zeros, zeros.at[0].set(-0.0)))
    assert not same_bits(x, x.at[3].set(-2.0))
    assert not same_bits(x, x.astype(jnp.float32)) and not same_bits(x, x[:3])
    assert same_bits(jnp.arange(4), jnp.arange(4)) and not same_bits(jnp.arange(4), jnp.arange(1, 5))


def test_long_context_row():
    """The long-context row comes after the main rows, before the secondary group; its HBM floor counts
    2^28 elements per tensor in bfloat16 exactly; the per-position scan is not timed there."""
    from experiments.bandwidth import hbm_bytes
    from experiments.bench_forward import LONG_CONTEXT, forward_cases
    from experiments.peers import forward_impls
    main, secondary = forward_cases(smoke=False)
    assert main[-1] == LONG_CONTEXT and LONG_CONTEXT not in secondary
    assert hbm_bytes("fwd", *LONG_CONTEXT.shape, LONG_CONTEXT.itemsize) == 4 * 2 ** 29
    assert hbm_bytes("fwd_bwd", *LONG_CONTEXT.shape, LONG_CONTEXT.itemsize) == 8 * 2 ** 29
    scan = next(impl for impl in forward_impls() if impl.name == "fleetjax.scan")
    assert scan.skip_reason(LONG_CONTEXT, "fwd") is not None


def test_gated_smoke_benchmark(tmp_path):
    """bench_backward --gated on one smoke shape: fleetjax runs with the log gate and returns its gradient
    (relerr_dlog_gate against the gated reference), a peer without a per-token gate is skipped, and the file
    is named backward-gated (with --name X: X-gated, so that a plain run of the same name keeps its file)."""
    from experiments import bench_backward
    from experiments.inputs import Case, make_inputs
    from experiments.timing import jax_long_op
    jax_long_op.cache_clear()  # the run builds its long op (3 compiles), which no record may count as its own
    case = Case(1, 16, 2, 32, 32, "bfloat16", gated=True)
    assert case.fields()["gated"] is True and "gated" not in Case(1, 16, 2, 32, 32, "bfloat16").fields()
    assert make_inputs(case, 0)["log_gate"].shape == (1, 16, 2)
    assert bench_backward.main(["--smoke", "--gated", "--impls", "fleetjax.xla,softmax.xla", "--shapes",
                                "1,16,2,32,32", "--dtypes", "bfloat16", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*-backward-gated.json")
    assert bench_backward.main(["--smoke", "--gated", "--impls", "fleetjax.xla", "--shapes", "1,16,2,32,32",
                                "--dtypes", "bfloat16", "--out", str(tmp_path), "--name", "run"]) == 0
    assert len(list(tmp_path.glob("*-run-gated.json"))) == 1 and not list(tmp_path.glob("*-run.json"))
    data = json.loads(path.read_text())
    assert data["decays"].startswith("none")
    records = {r["impl"]: r for r in data["records"]}
    xla = records["fleetjax.xla"]
    assert xla["gated"] and xla["gate_grad"] and "decay_grad" not in xla
    assert xla["recompiles_on_new_data"] == 0 and "ms_queued" in xla
    assert xla["relerr"] < 2e-2 and xla["relerr_dlog_gate"] < 1e-4
    assert records["softmax.xla"]["skipped"] == "no per-token gate"


def test_unguarded_fla_runs_only_when_named():
    """The peer that lifts fla's Triton-version guard is in the backward's list but runs only when --impls
    names it; the default selection keeps fla.chunk."""
    from experiments.peers import backward_impls
    from experiments.runner import select_impls
    impls = backward_impls()
    default = {impl.name for impl in select_impls(impls, None)}
    assert "fla.chunk" in default and "fla.chunk_unguarded" not in default
    assert [impl.name for impl in select_impls(impls, "fla.chunk_unguarded")] == ["fla.chunk_unguarded"]


def test_tune_candidates_are_valid_configs():
    """Every built-in candidate of the sweep is a valid PallasConfig differing from the default."""
    import jax.numpy as jnp

    from experiments.tune_pallas import apply_changes, candidates
    from fleetjax.pallas.chunked import default_config
    q, v = jnp.zeros((1, 32768, 8, 128), jnp.bfloat16), jnp.zeros((1, 32768, 8, 128), jnp.bfloat16)
    base = default_config(q, v)
    for op in ("fwd", "fwd_bwd"):
        changes = candidates(base, op, 128, 128)
        assert changes[0] == {} and len(changes) > 5
        configs = [apply_changes(base, c) for c in changes]
        assert all(c != base for c in configs[1:]) and len(set(configs)) == len(configs)


def test_plot_draws_every_panel_kind(tmp_path):
    """Several T (lines), several head dims at one T (against K), a shape alone (bars), fwd_bwd memory."""
    pytest.importorskip("matplotlib")
    from experiments.plots import plot_results
    records = []
    for impl, ms in (("fleetjax.pallas", 1.0), ("fla.chunk", 2.0)):
        shapes = [(4, t, 16, 128) for t in (1024, 4096)] + [(4, 4096, 16, 64), (1, 131072, 16, 128)]
        records += [dict(op="fwd_bwd", impl=impl, dtype="bfloat16", B=b, T=t, H=h, K=k, V=k, ms=ms * t / 1024,
                         relerr=1e-3, hbm_floor_ms=0.1 * t / 1024, extra_peak_mb=float(t))
                    for b, t, h, k in shapes]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"device": "cpu", "date": "2026-01-01", "records": records}))
    assert plot_results(path).stat().st_size > 0


def test_the_wide_walk_probe_lowers_for_sm_90(capsys):
    """experiments/probe_wide_walk --lower: the package's walk at one and two warpgroups, lowered for sm_90 on
    this host (the probe's GPU run compares them bitwise and times them)."""
    from experiments import probe_wide_walk
    assert probe_wide_walk.main(["--lower", "--shapes", "1,256,2,2", "--cases", "forward,reverse"]) == 0
    assert capsys.readouterr().out.count("1 Mosaic GPU kernel") == 4


def test_the_streams_probe_moves_a_call_to_an_annotated_stream_and_keeps_its_results():
    """experiments/probe_streams.on_stream: positional and array keyword arguments traced, the other keyword
    arguments static, the results bitwise the function's own, and the call annotated for GPU stream 2 in the
    lowered module (XLA's GPU compiler turns it into an async start/done pair; the CPU ignores it)."""
    import jax
    import jax.numpy as jnp
    from experiments.probe_streams import on_stream

    def walk(x, *, scale, weights, name):
        assert isinstance(scale, float) and name == "w"  # stayed static
        return {"out": jnp.tanh(x * scale) @ weights, "none": None}

    x, weights = jnp.arange(12.0).reshape(3, 4) / 7, jnp.ones((4, 2)) / 3
    moved = on_stream(walk, 2)
    f = jax.jit(lambda x, weights: moved(x, scale=0.5, weights=weights, name="w"))
    assert '_xla_stream_annotation = "2"' in f.lower(x, weights).as_text()
    got, want = f(x, weights), walk(x, scale=0.5, weights=weights, name="w")
    assert got["none"] is None and np.array_equal(np.asarray(got["out"]), np.asarray(want["out"]))


def test_walk_ops_counts_each_walks_chunk_loop(tmp_path, capsys):
    """experiments/walk_ops: the walks lowered for sm_90 on this host, each chunk loop's ops counted. The
    forward walk and the backward's three (dq with the decay's sums, dv, dk: identical modules lower once, so
    the plain dv and dk walks show as the forward's twin) each issue wgmmas in their loop, and only the dq
    walk, which forms d log decay's per-position summand, sums rows across lanes (shuffles)."""
    from experiments import walk_ops
    out = tmp_path / "ops.jsonl"
    assert walk_ops.main(["--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["op"], r["module"]) for r in records] == [("fwd", 0), ("fwd_bwd", 0), ("fwd_bwd", 1), ("fwd_bwd", 2)]
    assert all(r["wgmma"] > 0 and r["total"] > r["float"] > 0 and r["shared_bytes"] > 0 for r in records)
    dq = records[1]
    assert dq["shuffle"] > 0 and dq["total"] > records[0]["total"] and records[0]["shuffle"] == 0
    assert capsys.readouterr().out.count("\n") == 1 + len(records)


def test_walk_ops_gate_only_is_the_gated_op_without_the_decay(tmp_path):
    """walk_ops --gate-only lowers the gated benchmarks' op (no per-head decay): the same forward walk as
    --gated, and a dq walk that forms the gate's sums without the decay's (no tangent state: fewer ops)."""
    from experiments import walk_ops
    runs = {}
    for flag in ("--gated", "--gate-only"):
        out = tmp_path / f"{flag}.jsonl"
        assert walk_ops.main([flag, "--out", str(out)]) == 0
        runs[flag] = [json.loads(line) for line in out.read_text().splitlines()]
    both, gate = runs["--gated"], runs["--gate-only"]
    assert all(r["gated"] and r["decay"] for r in both) and all(r["gated"] and not r["decay"] for r in gate)
    assert gate[0]["total"] == both[0]["total"]
    assert 0 < gate[1]["total"] < both[1]["total"] and gate[1]["float"] < both[1]["float"]


def test_walk_ops_counts_the_backwards_pieces_states_walks(tmp_path):
    """walk_ops --T --config (sequence pieces) with MosaicWalkConfig.backward_piece_states: the backward then
    lowers two states walks before its three walks: the dq pieces' one (float32-accurate, with the tangent:
    more ops, more wgmmas) and the reverse walks' (as many ops as the forward pieces' one; the forward's
    modules, the same in both ops, are listed once)."""
    from experiments import walk_ops
    out = tmp_path / "ops.jsonl"
    assert walk_ops.main(["--T", "2048", "--config", json.dumps(dict(num_sequence_pieces=2,
                                                                     backward_num_sequence_pieces=4)),
                          "--walks", json.dumps(dict(forward_pieces=4, backward_piece_states=True)),
                          "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["op"], r["kernel"]) for r in records] == [
        ("fwd", "piece_states"), ("fwd", "forward_walk"), ("fwd_bwd", "piece_states"), ("fwd_bwd", "piece_states"),
        ("fwd_bwd", "dq_sums_walk"), ("fwd_bwd", "dv_walk"), ("fwd_bwd", "dk_walk")]
    assert all(r["T"] == 2048 and r["config"]["backward_num_sequence_pieces"] == 4 for r in records)
    exact, plain = records[2], records[3]
    assert exact["total"] > plain["total"] and exact["wgmma"] > plain["wgmma"]
    assert plain["total"] == records[0]["total"]


def test_host_wait_times_calls_enqueued_behind_a_long_op():
    """profile_pallas --host-wait's probe on the CPU: the long op alone, the calls enqueued behind it (after an
    untimed round that leaves the allocator what they need) and everything done, in order."""
    import jax
    import jax.numpy as jnp
    from experiments import profile_pallas
    wait = profile_pallas.host_wait(jax.jit(lambda x: 2 * x), (jnp.ones(8),), calls=3)
    assert set(wait) == {"long_ms", "calls", "enqueue_ms", "done_ms"} and wait["calls"] == 3
    assert wait["long_ms"] > 0 and 0 < wait["enqueue_ms"] <= wait["done_ms"]


def test_a_longer_sample_holds_more_calls_and_the_file_records_the_sync_wait(tmp_path):
    """--sample-ms sets how long one sample's calls last before their one sync (so more calls share its
    wake-up), and every results file records the tiny op's enqueue-to-sync time beside the copy bandwidth."""
    import jax
    import jax.numpy as jnp
    from experiments import bench_forward
    from experiments.timing import jax_sync, time_calls
    slow = jax.jit(lambda x: jnp.tanh(x @ x))
    sets = [(jnp.ones((96, 96)),), (jnp.full((96, 96), 0.5),)]
    short = time_calls(slow, sets, jax_sync, target_s=0.01, sample_floor_s=0.0)
    long = time_calls(slow, sets, jax_sync, target_s=0.01, sample_floor_s=0.05)
    assert short.calls_per_sample == 1 and long.calls_per_sample > 1
    assert bench_forward.main(["--smoke", "--impls", "fleetjax.xla", "--shapes", "1,16,2,32,32", "--dtypes",
                               "float32", "--sample-ms", "7", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*-forward.json")
    data = json.loads(path.read_text())
    assert data["sync_wait_us"]["jax_us"] > 0 and "at least 7 ms" in data["timing"]
    [record] = [r for r in data["records"] if r.get("ms")]
    # On a busy CPU the long op's own jitter can outlast a tiny call's time: the difference is clamped at 0.
    assert record["ms_queued"] >= 0 and record["enqueue_ms"] > 0 and record["queued_calls"] >= 2


def test_batched_calls_time_one_program_over_the_sets(tmp_path):
    """timing.batched_calls on the CPU: one jitted program runs the call on every set, timed per call (a
    third of the program's time for three sets); bench_forward --batched records it for JAX
    implementations, with the timing note saying what it is."""
    import jax
    import jax.numpy as jnp
    from experiments import bench_forward
    from experiments.timing import batched_calls
    step = jax.jit(lambda x: jnp.tanh(x @ x))
    sets = [(jnp.ones((64, 64)),), (jnp.full((64, 64), 0.5),), (jnp.full((64, 64), 0.25),)]
    ms, calls = batched_calls(step, sets, target_s=0.01, min_samples=2, sample_floor_s=0.0)
    assert calls == 3 and ms > 0
    assert bench_forward.main(["--smoke", "--batched", "--impls", "fleetjax.xla", "--shapes", "1,16,2,32,32",
                               "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*-forward.json")
    data = json.loads(path.read_text())
    [record] = [r for r in data["records"] if r.get("ms")]
    assert record["ms_batched"] > 0 and record["batched_calls"] == 2 and "ms_batched" in data["timing"]


def test_queued_calls_times_the_calls_behind_a_long_device_op():
    """The queued measurement on the CPU: the long op lasts about what was asked, the call count fills it,
    and the result carries the host's own time per call and whether the host stayed ahead."""
    import jax
    import jax.numpy as jnp
    from experiments.timing import Queued, jax_long_op, jax_sync, queued_calls
    long_op = jax_long_op(10.0)
    assert jax_long_op(10.0) is long_op  # built once per length
    t0 = time.perf_counter()
    jax_sync(long_op())
    assert 2e-3 < time.perf_counter() - t0 < 0.2
    step = jax.jit(lambda x: jnp.tanh(x @ x))
    sets = [(jnp.ones((64, 64)),), (jnp.full((64, 64), 0.5),)]
    queued = queued_calls(step, sets, jax_sync, long_op, call_ms=1.0)
    assert isinstance(queued, Queued) and 2 <= queued.calls <= 400
    assert queued.ms >= 0 and queued.enqueue_ms > 0 and queued.long_ms > 0 and isinstance(queued.ahead, bool)
    assert queued.calls >= 8 and queued.heads >= 1  # at least min_calls, the host's time covered by the head
    # Calls of about the long op's length: still at least min_calls, behind as many long ops as they last.
    long = queued_calls(step, sets, jax_sync, long_op, call_ms=10.0, min_calls=3, rounds=1)
    # 30 ms of calls behind ~10 ms ops: three heads where the long op took its 10 ms, two on a busy CPU.
    assert long.calls == 3 and long.heads >= 2 and long.long_ms > 0
    # The pending outputs' bound: 64 * 64 float32 is 16 KiB a call, so 40 KiB allows two calls.
    assert queued_calls(step, sets, jax_sync, long_op, call_ms=0.01, pending_bytes=40 << 10).calls == 2


def test_queued_calls_add_long_ops_where_the_host_enqueues_slower_than_call_ms_says(monkeypatch):
    """queued_calls on a simulated device queue (ops run in order, each from when the host enqueued it; a sync
    waits for the last) behind 20 ms long ops, calls given as 0.13 ms that the device runs in 0.12 ms. Where the
    host takes 1 ms to enqueue one, the device runs out of calls and waits for it: with the head sized from
    call_ms the calls read 0.74 ms. The first round finds the host behind, the timed ones add long ops, and the
    calls read the device's 0.12 ms with the host ahead. At 0.26 ms the host stays ahead of the device though
    not of the head (``ahead`` is the stricter of the two), and the added long ops make ``ahead`` hold."""
    from experiments import timing

    class Device:
        host = free = 0.0

        def op(self, enqueue_s: float, run_s: float):
            self.host += enqueue_s
            self.free = max(self.free, self.host) + run_s
            return np.zeros(4, np.float32)

        def sync(self, _):
            self.host = max(self.host, self.free)

    device = Device()
    monkeypatch.setattr(timing, "_perf", lambda: device.host)
    long_op = lambda: device.op(1e-6, 20e-3)  # noqa: E731
    for enqueue_ms in (1.0, 0.26):
        call = lambda *_, e=enqueue_ms: device.op(e * 1e-3, 0.12e-3)  # noqa: E731
        behind = timing.queued_calls(call, [()], device.sync, long_op, call_ms=0.13, ahead_margin=1e9)
        queued = timing.queued_calls(call, [()], device.sync, long_op, call_ms=0.13)
        assert not behind.ahead and behind.heads == 2, behind
        assert queued.ahead and queued.heads > 2 and queued.ms == pytest.approx(0.12, rel=1e-6), queued
        assert queued.enqueue_ms == pytest.approx(enqueue_ms, rel=0.01)
        if enqueue_ms == 1.0:
            assert behind.ms > 0.7, behind


def test_same_lowering_dumps_the_walks_and_compares_them_names_aside(tmp_path, capsys):
    """experiments/same_lowering: every case of its table is a distinct variant; a dump of two cases (the
    forward walk; the backward with the gate and the decay learned: the dq walk with both sums, dv, dk with
    the gate's) compares equal to a second dump, and to a copy whose kernels are renamed, but not to a copy with one
    instruction changed or one module missing."""
    from experiments import same_lowering
    table = same_lowering.cases()
    assert len(table) == 2 * len(same_lowering.VARIANTS) + len(same_lowering.GRADIENTS)
    assert len({repr(sorted(case.items())) for case in table.values()}) == len(table)
    names = ["fwd_default", "bwd_gated"]
    before, again, changed = (tmp_path / name for name in ("before", "again", "changed"))
    assert same_lowering.dump(str(before), names) == 4
    assert same_lowering.dump(str(again), names) == 4
    assert same_lowering.compare(str(before), str(again)) == []
    changed.mkdir()
    for path in before.iterdir():
        text = path.read_text()
        name = re.search(r"func\.func @(\w+)_mosaic_gpu", text).group(1)
        (changed / path.name).write_text(text.replace(name, "renamed"))
    assert same_lowering.compare(str(before), str(changed)) == []
    module = changed / "bwd_gated_1.mlir"
    module.write_text(module.read_text().replace("arith.mulf", "arith.addf", 1))
    (changed / "fwd_default_0.mlir").unlink()
    assert same_lowering.compare(str(before), str(changed)) == ["bwd_gated_1.mlir", "fwd_default_0.mlir"]
    assert same_lowering.main(["compare", str(before), str(changed)]) == 1
    with pytest.raises(SystemExit, match="unknown cases"):
        same_lowering.dump(str(tmp_path / "x"), ["fwd_nothing"])
    assert "2 of 4 modules the same" in capsys.readouterr().out


def _stand_in_ncu(tmp_path, calls: list, before: str = ""):
    """A PATH with stand-ins for ncu (it records its arguments, runs ``before``, then prints the CSV of
    ``calls``, as _ncu_csv writes it) and python3 (this interpreter); returns (PATH, the file of ncu's
    arguments)."""
    import os
    csv_path = tmp_path / "synthetic.csv"
    csv_path.write_text(_ncu_csv(calls))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "ncu_calls.txt"
    (bin_dir / "ncu").write_text(f'#!/usr/bin/env bash\necho "$@" >> {asked}\n{before}\ncat {csv_path}\n')
    (bin_dir / "python3").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
    for tool in ("ncu", "python3"):
        (bin_dir / tool).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", asked


@pytest.mark.parametrize("regex_fails", [False, True], ids=["ncu-takes-all", "ncu-lacks-a-pipe"])
def test_run_gpu_profile_script_profiles_and_reads_the_stalls(tmp_path, regex_fails):
    """experiments/run_gpu_profile.sh with stand-ins for ncu and python3 on PATH: it asks ncu for
    profile_pallas's --stall-metrics around the untimed calls, writes the CSV and the --stalls table under
    $OUT, and where ncu fails on the pipes' regex (a metric this ncu lacks) runs it again without it."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    stalled = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    walk = {"gpu__time_duration.sum": ("usecond", "900"), stalled.format("wait"): ("", "2.5")}
    call = [("dq_sums_walk_mosaic_gpu_kernel", "(1, 64, 4)", walk)]
    fail = "1" if regex_fails else "0"
    refusal = f'case "$*" in *regex:*) [ {fail} = 1 ] && {{ echo "==ERROR== Failed to find metric regex" >&2; exit 1; }};; esac'
    path, calls = _stand_in_ncu(tmp_path, [call, call, call], refusal)
    env = dict(os.environ, PATH=path, OUT=str(tmp_path / "out"), PROFILE_NAME="probe")
    done = subprocess.run(["bash", "experiments/run_gpu_profile.sh", "--ops", "fwd_bwd"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    asked = calls.read_text().splitlines()
    assert len(asked) == 1 + regex_fails and all("--untimed --ops fwd_bwd" in line for line in asked)
    assert ("regex:" in asked[0]) and not ("regex:" in asked[-1] and regex_fails)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [name.rsplit("-", 1)[-1] for name in written] == ["probe.csv", "probe.log", "probe.txt"]
    table = next((tmp_path / "out").glob("*probe.txt")).read_text()
    assert "0.9000 ms" in table and "wait 2.50" in table


def test_run_gpu_profile_script_profiles_the_traffic(tmp_path):
    """experiments/run_gpu_profile.sh with PROFILE_KIND=traffic and stand-ins for ncu and python3 on PATH: it
    asks ncu for profile_pallas's --traffic-metrics around the untimed calls and reads the CSV with the run's
    own shape (one [B, T, H, V] tensor of B1 T=1024 H16 bf16 is 4 MiB); an unknown kind is refused."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    walk = {"gpu__time_duration.sum": ("usecond", "100"), "dram__bytes_read.sum": ("byte", "8,388,608"),
            "dram__bytes_write.sum": ("byte", "4,194,304")}
    call = [("dv_walk_mosaic_gpu_kernel", "(1, 16, 2)", walk)]
    path, calls = _stand_in_ncu(tmp_path, [call, call, call])
    env = dict(os.environ, PATH=path, OUT=str(tmp_path / "out"), PROFILE_KIND="traffic")
    args = ["bash", "experiments/run_gpu_profile.sh", "--ops", "fwd_bwd", "--B", "1", "--T", "1024"]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    asked = calls.read_text().splitlines()
    assert len(asked) == 1 and "dram__bytes_read.sum" in asked[0] and "--T 1024" in asked[0]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [name.rsplit("-", 1)[-1] for name in written] == ["traffic.csv", "traffic.log", "traffic.txt"]
    table = next((tmp_path / "out").glob("*traffic.txt")).read_text()
    assert "read ( 2.00 tensors)" in table and "written ( 1.00)" in table and "125.8 GB/s" in table
    refused = subprocess.run(args, cwd=root, env=dict(env, PROFILE_KIND="cycles"), capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "stalls or traffic" in refused.stderr


# A chunk loop as nvdisasm prints it (with control codes), the shape experiments/sass.py reads: a setup
# instruction, the loop (a conditional branch back to .L_x_3, with a block that a conditional branch skips),
# and an out-of-line spin-wait after the function that jumps back into it unconditionally (not a loop).
SASS = """
   -:-:1:Y:01        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_4:
   -:-:-:Y:02        /*0010*/                   MUFU.EX2 R2, R3 ;
.L_x_3:
   -:-:-:Y:01        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
   -:-:-:Y:01        /*0030*/                   FFMA R4, R5, R6, R4 ;
   -:-:-:Y:01        /*0040*/                   F2FP.BF16.F32.PACK_AB R7, R8, R9 ;
   -:-:-:Y:01        /*0050*/                   STL [R1+0x10], R4 ;
   -:-:-:Y:01        /*0060*/               @P0 LDS R5, [R10] ;
   -:-:-:Y:01        /*0068*/               @P1 BRA `(.L_x_5) ;
   -:-:-:Y:01        /*006c*/                   FMUL R4, R4, R13 ;
.L_x_5:
   -:-:-:Y:01        /*0070*/                   IMAD.MOV.U32 R11, RZ, RZ, R12 ;
   -:-:-:Y:05        /*0080*/               @!P2 BRA `(.L_x_3) ;
   -:-:-:Y:05        /*0090*/                   EXIT ;
.L_x_0:
   -:-:-:Y:05        /*00a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R0 ;
   -:-:-:Y:05        /*00b0*/               @!P0 BRA `(.L_x_0) ;
   -:-:-:Y:05        /*00c0*/                   BRA `(.L_x_4) ;
"""


def test_sass_counts_the_chunk_loop_and_reads_ptxas():
    """experiments/sass.py's readers: the loop is the conditional back edge's range (the out-of-line wait's
    unconditional jump back is not one), its opcodes counted by kind, its skipped block of multiplies; ptxas's
    registers and spills."""
    from experiments import sass
    counts = sass.loop_counts(SASS)
    assert counts["total"] == 9 and counts["opcodes"]["HGMMA"] == 1 and counts["renormalization"] == 1
    assert (counts["mma"], counts["float"], counts["convert"], counts["spill"], counts["shared"], counts["other"],
            counts["mufu"]) == (1, 2, 1, 1, 1, 3, 0)
    report = sass.ptxas_report(
        "ptxas warning : Registers are spilled to local memory in function 'k', 452 bytes spill stores, 460 bytes "
        "spill loads\n    456 bytes stack frame, 452 bytes spill stores, 460 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 2 barriers, 456 bytes cumulative stack size")
    assert report == dict(registers=255, spill_stores=452, spill_loads=460, stack_frame=456)


def test_sass_caps_each_entrys_registers_in_the_ptx():
    """experiments/sass.py --maxnreg's PTX edit: the cap beside each entry's thread count, and an error that
    says what is missing where the PTX has no entry directive to put it beside."""
    from experiments import sass
    ptx = ".visible .entry walk(\n.param .u64 a\n)\n.maxntid 128, 1, 1\n{\nret;\n}\n"
    capped = sass.capped_ptx(ptx + ptx.replace("walk", "other"), 232)
    assert capped.count(".maxntid 128, 1, 1\n.maxnreg 232\n{") == 2
    with pytest.raises(ValueError, match="maxntid"):
        sass.capped_ptx(".visible .entry walk()\n{\nret;\n}\n", 232)


def test_sass_compiles_each_walk_without_a_gpu(capsys):
    """experiments/sass.py end to end where jax's CUDA plugin and the CUDA tools are installed (not in CI):
    every walk of the forward and of the backward compiles for sm_90 through the plugin on this host, with
    registers reported and a chunk loop that issues wgmmas."""
    pytest.importorskip("jax_plugins.xla_cuda13", reason="jax's CUDA 13 plugin is not installed")
    from experiments import sass
    if sass._tools_path() is None:
        pytest.skip("no ptxas from the nvidia-cuda-nvcc wheel")
    assert sass.main([]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 4
    for row in rows:
        # op, module, kernel, regs, spill, loop, renorm, float, convert, select, mma, ...
        registers, loop, mma = int(row.split()[3]), int(row.split()[5]), int(row.split()[10])
        assert 0 < registers <= 255 and loop > mma > 0
    assert sass.main(["--maxnreg", "200"]) == 0  # the cap holds every walk's registers, spilling the rest
    assert all(0 < int(row.split()[3]) <= 200 for row in capsys.readouterr().out.splitlines()[1:])


# An optimized HLO module's entry as XLA prints it (trimmed): parameters, a fusion, Mosaic and Triton custom
# calls, a get-tuple-element and a copy, the shapes experiments/xla_kernels.py reads.
HLO = """HloModule jit_f, is_scheduled=true

%fused_transpose (param_0: f32[2,8,4]) -> f32[2,4,8] {
  ROOT %t = f32[2,4,8]{2,1,0} transpose(%param_0), dimensions={0,2,1}
}

ENTRY %main.1 (q.1: bf16[2,64,4,32], gate.1: f32[2,64,4]) -> (bf16[2,64,4,32], f32[2,4,64]) {
  %q.1 = bf16[2,64,4,32]{3,2,1,0} parameter(0), metadata={op_name="q"}
  %gate.1 = f32[2,64,4]{2,1,0} parameter(1), metadata={op_name="gate"}
  %wrapped_transpose = f32[2,4,64]{2,1,0} fusion(%gate.1), kind=kInput, calls=%fused_transpose, \
metadata={op_name="gate" scheduling_name="wrapped_transpose"}
  %mpmd_map.3 = (bf16[2,64,4,32]{3,2,1,0}, f32[2,4,1,32,32]{4,3,2,1,0}) custom-call(%q.1, %wrapped_transpose), \
custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(loss)/transpose(jvp())/dq_sums_walk/mpmd_map"}
  %get-tuple-element.1 = bf16[2,64,4,32]{3,2,1,0} get-tuple-element(%mpmd_map.3), index=0
  %pallas_call.2 = bf16[2,64,4,32]{3,2,1,0} custom-call(%get-tuple-element.1), \
custom_call_target="__gpu$xla.gpu.triton", \
metadata={op_name="jit(loss)/transpose(jvp(fleet_backward_dq))/pallas_call"}
  %copy.4 = f32[2,4,64]{2,1,0} copy(%wrapped_transpose)
  ROOT %tuple.5 = (bf16[2,64,4,32]{3,2,1,0}, f32[2,4,64]{2,1,0}) tuple(%pallas_call.2, %copy.4)
}
"""


def test_xla_kernels_lists_the_entrys_kernels_with_their_bytes():
    """experiments/xla_kernels.py's reader: the entry computation's fusions, custom calls (their targets, the
    stage from the op_name, wrappers such as transpose(jvp(...)) taken off) and copies, in order, with the
    bytes of their operands and results (a tuple's elements summed); parameters, get-tuple-element and the root
    tuple are no kernels. Its target description is a Hopper GPU's."""
    from experiments import xla_kernels
    rows = xla_kernels.kernels(HLO)
    assert [(r["name"], r["op"], r["kind"], r["stage"]) for r in rows] == [
        ("wrapped_transpose", "fusion", "kInput", "gate"),
        ("mpmd_map.3", "custom-call", "mosaic_gpu_v2", "dq_sums_walk"),
        ("pallas_call.2", "custom-call", "__gpu$xla.gpu.triton", "fleet_backward_dq"),
        ("copy.4", "copy", "", "")]
    q, gate, state = 2 * 64 * 4 * 32 * 2, 2 * 64 * 4 * 4, 2 * 4 * 32 * 32 * 4
    assert [(r["read_bytes"], r["written_bytes"]) for r in rows] == [
        (gate, gate), (q + gate, q + state), (q, q), (gate, gate)]
    config = xla_kernels.target_config("h100")
    assert "core_count: 132" in config and "major: 9" in config and "H100" in config


def test_xla_kernels_compiles_the_op_for_a_gpu_it_does_not_have(capsys):
    """experiments/xla_kernels.py end to end where jax's CUDA plugin is installed (not in CI): the gated op's
    forward and backward compile for a described H200 on this host, through the Mosaic walks of the default
    config, and fleetjax's device queries answer as before afterwards."""
    pytest.importorskip("jax_plugins.xla_cuda13", reason="jax's CUDA 13 plugin is not installed")
    from experiments import xla_kernels
    from fleetjax.pallas import launch
    on_gpu = launch.on_gpu
    assert xla_kernels.main(["--gate-only", "--shape", "1,512,2,128,128"]) == 0
    out = capsys.readouterr().out
    for walk in ("forward_walk", "dq_sums_walk", "dv_walk", "dk_sums_walk"):
        assert f"mosaic_gpu_v2          {walk}" in out, walk
    assert out.strip().splitlines()[-1].endswith("XLA's") and launch.on_gpu is on_gpu


@pytest.mark.parametrize("walks, named", [('{"nope": 1}', "nope"), ('{"chunk_size": 32}', "chunk_size"),
                                          ("{not json", "not json")])
def test_xla_kernels_names_a_bad_walks_field_before_compiling(capsys, walks, named):
    """--walks is checked against MosaicWalkConfig before anything is compiled (no CUDA plugin needed)."""
    from experiments import xla_kernels
    with pytest.raises(SystemExit):
        xla_kernels.main(["--gate-only", "--fwd", "--walks", walks])
    err = capsys.readouterr().err
    assert "--walks" in err and named in err


def test_xla_kernels_lists_a_walks_variant(capsys):
    """--walks: the kernels of the default config with Mosaic walk fields changed (where jax's CUDA plugin is
    installed, not in CI): without the gate's sums in one launch and the first piece from zero, the gated
    forward at B4 H16 T=4096 takes three kernels more."""
    pytest.importorskip("jax_plugins.xla_cuda13", reason="jax's CUDA 13 plugin is not installed")
    from experiments import xla_kernels
    counts = []
    for walks in ([], ["--walks", '{"gate_sums": false, "zero_first": false}']):
        assert xla_kernels.main(["--gate-only", "--fwd", "--shape", "4,4096,16,128,128", *walks]) == 0
        out = capsys.readouterr().out
        counts.append(int(out.strip().splitlines()[-1].split()[0]))
        if not walks:
            assert "gate_sums" in out
    assert counts[1] == counts[0] + 3, counts


def _ncu_csv(calls: list[list[tuple[str, str, dict]]]) -> str:
    """ncu's --csv output (a log line, then one quoted row per launch and metric) of launches in ``calls``:
    each a list of (kernel name, grid, {metric: (unit, value)})."""
    header = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
              "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
    lines = ["==PROF== Connected to process 1 (/usr/bin/python3)", ",".join(f'"{h}"' for h in header)]
    launch = 0
    for call in calls:
        for name, grid, metrics in call:
            for metric, (unit, value) in metrics.items():
                row = [str(launch), "1", "python3", "127.0.0.1", name, "1", "7", "(128, 1, 1)", grid, "0", "9.0",
                       "Command line profiler metrics", metric, unit, value]
                lines.append(",".join(f'"{x}"' for x in row))
            launch += 1
    return "\n".join(lines) + "\n"


def test_profile_pallas_reads_ncus_kernel_times_and_stalls(tmp_path, capsys):
    """experiments/profile_pallas.py's readers of ncu's CSV: the last call's kernels (found as the tail that
    repeats three times, after compilation's own launches), longest first, with their times in ms; and each
    one's stall reasons (cycles per issued instruction, largest first, summed to the cycles per instruction)
    and busiest pipes."""
    from experiments import profile_pallas
    stalled = profile_pallas._STALL + "{}_per_issue_active.ratio"
    walk = {"gpu__time_duration.sum": ("usecond", "1,250.5"), "smsp__issue_active.avg.per_cycle_active": ("", "0.29"),
            stalled.format("wait"): ("", "1.5"), stalled.format("barrier"): ("", "0.25"),
            stalled.format("selected"): ("", "1"), stalled.format("tex_throttle"): ("", "n/a"),
            "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": ("%", "31.5"),
            "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active": ("%", "12"),
            "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum": ("", "1,024")}
    small = {"gpu__time_duration.sum": ("nsecond", "2,500")}
    call = [("dq_sums_walk_mosaic_gpu_kernel", "(1, 64, 4)", walk), ("loop_add_fusion", "(512, 1, 1)", small)]
    path = tmp_path / "stalls.csv"
    path.write_text(_ncu_csv([[("compile_probe", "(1, 1, 1)", small)], call, call, call]))
    table = profile_pallas.stall_table(str(path))
    assert [row["name"] for row in table] == ["dq_sums_walk_mosaic_gpu_kernel", "loop_add_fusion"]
    first = table[0]
    assert first["ms"] == pytest.approx(1.2505) and table[1]["ms"] == pytest.approx(0.0025)
    assert first["stalls"] == [("wait", 1.5), ("selected", 1.0), ("barrier", 0.25)]
    assert first["cpi"] == pytest.approx(2.75) and first["bank_conflicts"] == 1024
    assert first["pipes"] == [("tensor_op_gmma", 31.5), ("alu", 12.0)]
    profile_pallas.print_split(str(path))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  1.2505 ms") and out[-1].split()[:5] == ["1.2530", "ms", "in", "2", "kernels"]
    assert profile_pallas.main(["--stalls", str(path)]) == 0
    out = capsys.readouterr().out
    assert "wait 1.50, selected 1.00, barrier 0.25" in out and "tensor_op_gmma 31.5%" in out
    assert all(name in profile_pallas.STALL_METRICS[5 + i] for i, name in enumerate(profile_pallas.STALL_REASONS))
    # A profile that ncu -k filtered to one kernel: two calls' launches of it, the last one read.
    later = dict(walk, **{"gpu__time_duration.sum": ("usecond", "1,000")})
    path.write_text(_ncu_csv([[call[0]], [("dq_sums_walk_mosaic_gpu_kernel", "(1, 64, 4)", later)]]))
    assert [row["ms"] for row in profile_pallas.stall_table(str(path))] == [pytest.approx(1.0)]
    path.write_text(_ncu_csv([[call[0]], [call[1]]]))
    with pytest.raises(ValueError, match="repeats three times"):
        profile_pallas.stall_table(str(path))


def test_profile_pallas_reads_ncus_dram_traffic(tmp_path, capsys):
    """experiments/profile_pallas.py --traffic: the last call's kernels with their DRAM bytes (ncu's units
    converted), the rate they moved at and their count in [B, T, H, V] tensors of the run's shape, longest
    first, and the call's sums; from the CSV or its gzip."""
    import gzip
    from experiments import profile_pallas
    walk = {"gpu__time_duration.sum": ("usecond", "400"), "dram__bytes_read.sum": ("Mbyte", "805.3"),
            "dram__bytes_write.sum": ("byte", "268,435,456")}
    small = {"gpu__time_duration.sum": ("nsecond", "5,000"), "dram__bytes_read.sum": ("Kbyte", "40"),
             "dram__bytes_write.sum": ("byte", "0")}
    call = [("loop_pad_fusion", "(4096, 1, 1)", small), ("dv_walk_mosaic_gpu_kernel", "(1, 64, 2)", walk)]
    path = tmp_path / "traffic.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(_ncu_csv([[("compile_probe", "(1, 1, 1)", small)], call, call, call]))
    table = profile_pallas.traffic_table(str(path))
    assert [row["name"] for row in table] == ["dv_walk_mosaic_gpu_kernel", "loop_pad_fusion"]
    assert table[0]["read"] == pytest.approx(805.3e6) and table[0]["written"] == 268435456
    assert table[0]["gbps"] == pytest.approx((805.3e6 + 268435456) / 0.4e6)
    assert table[1]["read"] == pytest.approx(40e3) and table[1]["ms"] == pytest.approx(0.005)
    # B1 T=1024 H16 V=128 bfloat16: one tensor is 4 MiB, so the walk writes 64 of them.
    assert profile_pallas.main(["--traffic", str(path), "--B", "1", "--T", "1024", "--H", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "(64.00)" in out[0] and "dv_walk" in out[0] and len(out) == 3
    assert out[-1].startswith("  0.4050 ms in 2 kernels") and "tensors of 4.2 MB" in out[-1]
    assert profile_pallas.main(["--traffic-metrics"]) == 0
    assert capsys.readouterr().out.strip().split(",") == list(profile_pallas.TRAFFIC_METRICS)


def test_cost_split_times_the_gated_ops_of_any_checkout(tmp_path, capsys):
    """cost_split --op-only --gated (a before/after of two checkouts): the public op's forward, its backward with
    the gate learned, with a learned decay beside the gate, and with neither, at the shapes asked for, written
    under the label, or the ops asked for alone; shapes that are not B,T,H triples and ops it does not time are
    errors that quote them."""
    from experiments import cost_split
    assert cost_split.main(["--smoke", "--op-only", "--gated", "--shapes", "1,64,2", "--label", "here",
                            "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "cost_split-here.json").read_text())["records"]
    assert [r["op"] for r in records] == ["fwd", "fwd_bwd", "fwd_bwd_fixed", "fwd_bwd_decay"]
    assert all((r["B"], r["T"], r["H"], r["gated"]) == (1, 64, 2, True) and r["ms"] > 0 for r in records)
    assert cost_split.main(["--smoke", "--op-only", "--gated", "--shapes", "1,64,2", "--ops", "fwd_bwd_decay,fwd",
                            "--label", "two", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "cost_split-two.json").read_text())["records"]
    assert [r["op"] for r in records] == ["fwd", "fwd_bwd_decay"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cost_split.main(["--op-only", "--shapes", "1,64"])
    assert "'1,64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # fwd_bwd_decay needs --gated
        cost_split.main(["--op-only", "--ops", "fwd,fwd_bwd_decay"])
    assert "'fwd,fwd_bwd_decay'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the Mosaic walks' variants need an sm_90 GPU's default config
        cost_split.main(["--smoke", "--op-only", "--walks", '{"wide_auto_barriers": false}', "--out", str(tmp_path)])
    assert "--walks: the default config has no Mosaic walks here" in capsys.readouterr().err


def test_profile_pallas_walks_need_the_mosaic_walks(capsys):
    """profile_pallas --walks changes the default config's Mosaic walk fields (experiments.inputs.with_walk_fields,
    as cost_split's): on this host's default config, which has none, it stops with the option's message."""
    from experiments import profile_pallas
    with pytest.raises(SystemExit):
        profile_pallas.main(["--B", "1", "--T", "64", "--H", "2", "--K", "32", "--V", "32", "--walks", "{}",
                             "--untimed"])
    assert "--walks: the default config has no Mosaic walks here" in capsys.readouterr().err


def test_cost_split_walks_name_the_field_it_cannot_set(tmp_path, capsys, monkeypatch):
    """--walks on a config with Mosaic walks (as an sm_90 GPU's default has): a field MosaicWalkConfig lacks,
    or a value it rejects, is an error that quotes the JSON and says why, before anything is timed."""
    import dataclasses

    from experiments import cost_split
    from fleetjax.pallas import chunked, mosaic
    default = chunked.default_config
    monkeypatch.setattr(chunked, "default_config", lambda q, v: dataclasses.replace(
        default(q, v), mosaic_walks=mosaic.MosaicWalkConfig()))
    for walks, why in (('{"no_such_field": 1}', "no_such_field"), ('{"forward_pieces": 0}', "forward_pieces")):
        with pytest.raises(SystemExit):
            cost_split.main(["--smoke", "--op-only", "--walks", walks, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert repr(walks) in err and why in err, err


def test_walk_fields_change_the_walks_and_the_configs_own_flags():
    """experiments.inputs.with_walk_fields: MosaicWalkConfig's fields go to the walks, the PallasConfig's own
    (gate_grad_kernel) to it; a field neither has, a bad value or JSON that is not an object is named."""
    from experiments.inputs import with_walk_fields
    from fleetjax.pallas import chunked, mosaic
    config = chunked.PallasConfig(mosaic_walks=mosaic.MosaicWalkConfig())
    changed = with_walk_fields(config, '{"gate_sums": false, "gate_grad_kernel": false}')
    assert not changed.mosaic_walks.gate_sums and not changed.gate_grad_kernel
    assert config.mosaic_walks.gate_sums and config.gate_grad_kernel
    for fields, why in (('{"nope": 1}', "nope"), ('{"gate_grad_kernel": 1}', "gate_grad_kernel"), ("[1]", "[1]")):
        with pytest.raises(ValueError, match="--walks") as error:
            with_walk_fields(config, fields)
        assert why in str(error.value)


def test_compile_sweep_lists_its_grid_and_refuses_bad_dims(capsys):
    """experiments/compile_sweep.py --list: the grid (implementations outermost, each case with and without
    segments) without compiling anything; head dims that are not KxV pairs are an error that quotes them."""
    from experiments import compile_sweep
    assert compile_sweep.main(["--list", "--impls", "pallas,xla", "--T", "1,7", "--dims", "5x24",
                               "--dtypes", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert lines[0] == "pallas B2 T1 H3 K5 V24 bfloat16 gated"
    assert lines[-1] == "xla B2 T7 H3 K5 V24 bfloat16 gated segments+state"
    for dims in ("5", "5x24x3"):
        with pytest.raises(SystemExit):
            compile_sweep.main(["--list", "--dims", dims])
        assert f"'{dims}'" in capsys.readouterr().err


def test_compare_walks_says_why_it_cannot_run_off_an_sm_90_gpu(capsys):
    """experiments/compare_walks.py changes the default config's Mosaic walks: where the default has none (off
    an sm_90 GPU) it exits with the reason before timing or comparing anything."""
    from fleetjax.pallas import mosaic
    if mosaic.on_hopper():
        pytest.skip("the default config has Mosaic walks here")
    from experiments import compare_walks
    with pytest.raises(SystemExit):
        compare_walks.main(["--B", "1", "--H", "2", "--K", "64", "--T", "128"])
    assert "no Mosaic walks here" in capsys.readouterr().err


@pytest.mark.parametrize("gated", [False, True])
def test_compare_walks_compares_outputs_and_gradients_over_repeated_calls(gated):
    """experiments/compare_walks.compare_configs (what --op and --repeats run on the GPU) with two PallasConfigs on
    the CPU: the default against itself agrees bit for bit, call after call, with every gradient's error against
    the float32 reference reported for both; a config whose chunks split the sequence elsewhere is not bitwise
    the default's and is as accurate."""
    import dataclasses

    import fleetjax
    from experiments.compare_walks import compare_configs
    from experiments.inputs import Case, make_inputs
    case = Case(1, 48, 2, 16, 16, "float32", gated)
    inputs = make_inputs(case, 0)
    base = fleetjax.IMPLEMENTATIONS["pallas"].config_for(None, inputs["q"], inputs["v"])
    small = dataclasses.replace(base, **{walk: dataclasses.replace(getattr(base, walk), chunk_size=16)
                                         for walk in ("forward", "dq", "dv", "dk")})
    last = "dlog_gate" if gated else "ddecay"
    row = compare_configs(case, {"a": base, "b": base}, inputs, op="fwd_bwd", repeats=2)
    assert row["bitwise"] and row["repeats_equal_a"] and row["repeats_equal_b"]
    for output in ("o", "dq", "dk", "dv", last):
        for name in ("a", "b"):
            assert row[f"relerr_{output}_{name}"] < 1e-4, (output, name, row)
    row = compare_configs(case, {"a": base, "b": small}, inputs, op="fwd_bwd")
    assert not row["bitwise"] and row["repeats"] == 1
    assert all(row[f"relerr_{output}_b"] < 1e-4 for output in ("o", "dq", "dk", "dv", last)), row
    forward = compare_configs(case, {"a": base, "b": base}, make_inputs(case, 0, with_do=False))
    assert forward["bitwise"] and forward["relerr_a"] < 1e-4 and "relerr_o_a" not in forward
    with pytest.raises(ValueError, match="repeats"):
        compare_configs(case, {"a": base, "b": base}, inputs, repeats=0)


if __name__ == "__main__" and devices.worker_ids(sys.argv) is not None:
    _worker(devices.worker_ids(sys.argv))
