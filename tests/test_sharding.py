"""Sequence parallelism (``sequence_axis_name``): sharded equals unsharded, on CPU with fake devices.

JAX fixes its device count when it starts, and the rest of the suite runs with one CPU device, so the
multi-device checks run in two subprocesses at once (tests/devices.py: this file executed as a script with
8 fake CPU devices), which compute the cases and print JSON; each pytest test below reads its own case from
that output. The refusals that one device can show run in this process.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from typing import Any

import numpy as np
import pytest

import devices

DEVICES = 8
B, T, H, K, V = 2, 32, 4, 4, 5
DECAY = [1.0, 0.9, 0.3, 1e-4]
SCALE = 0.7
# Row 0: a reset in the middle of a block (13), one exactly on every device boundary at 16, and a segment
# covering whole blocks (16..31). Row 1: the same id before and after another one (a reset, not a join),
# a segment covering whole blocks (5..24) and a boundary inside a block.
SEGMENT_IDS = [[0] * 13 + [1] * 3 + [2] * 16, [5] * 5 + [3] * 20 + [5] * 7]
# T = 64 over 2 devices in chunks of 16 and 2 pieces per block: pieces [0, 16), [16, 32) | [32, 48), [48, 64).
# Row 0: a reset inside a piece (13), a segment through a whole piece and across the device boundary, a
# reset inside the second block's first piece (42). Row 1: resets on piece boundaries (16, 48) and a segment
# across the device boundary.
SEGMENT_IDS_64 = [[0] * 13 + [1] * 29 + [2] * 22, [5] * 16 + [3] * 32 + [6] * 16]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# An implementation with reference BlockKernels (_reference_blocks, passed as implementation=): the exchange of
# fleetjax.sharding and its custom VJP checked on the CPU under both check_vma modes, which the Pallas kernels
# cannot do in interpret mode.
BLOCKS = "scan_blocks"


def _cases() -> list[dict[str, Any]]:
    """The matrix: every cheap implementation over 2, 4 and 8 devices, plus layouts and modes."""
    cases = []
    impls = ["scan", "quadratic", "xla"]
    for impl in impls:
        for n in (2, 4, 8):
            cases.append(dict(impl=impl, seq=n))
    # Pallas kernels run in interpret mode on CPU (slow): one small case each when they are registered, under
    # shard_map's default check_vma=True (interpret mode then runs every device's kernel on gathered inputs).
    cases += [dict(impl=name, seq=2) for name in ("pallas", "pallas_fleet") if _registered(name)]
    # Each device's block in sequence pieces (forward and backward): the local states of all pieces, folded.
    if _registered("pallas"):
        cases.append(dict(impl="pallas", seq=2, check_vma=False, T=64, config="pieces"))
    cases += [dict(impl=BLOCKS, seq=n) for n in (2, 4, 8)]
    # The generic composition for an implementation that has BlockKernels (its record without them).
    cases += [dict(impl=BLOCKS, seq=4, method="generic")]
    if _registered("pallas"):
        cases.append(dict(impl="pallas", seq=2, check_vma=False, method="generic"))
    # Per-token log gates: the exchange carries the blocks' gated decays; d log_gate through every order.
    cases += [dict(impl=name, seq=4, gated=True) for name in ("xla", BLOCKS)]
    cases += [dict(impl=BLOCKS, seq=2, gated=True, method="generic")]
    if _registered("pallas"):
        cases.append(dict(impl="pallas", seq=2, check_vma=False, gated=True))
    cases += [dict(impl=BLOCKS, seq=4, check_vma=False), dict(impl=BLOCKS, seq=4, data=2),
              dict(impl=BLOCKS, seq=(2, 2), state_on_first_device_only=True),
              dict(impl=BLOCKS, seq=4, check_vma=False, state_on_first_device_only=True),
              dict(impl=BLOCKS, seq=8, segments=False, initial_state=False, final_state=False)]
    cases += [
        # No segment_ids (every block continues from the left), no initial or final state: the LM's call.
        dict(impl="xla", seq=4, segments=False, initial_state=False, final_state=False),
        dict(impl="scan", seq=4, check_vma=False),  # shard_map(check_vma=False) takes the varying all_gather
        dict(impl="xla", seq=8, check_vma=False, segments=False),
        dict(impl="xla", seq=4, data=2),  # 2-D mesh: B over "data", T over "seq"
        dict(impl="xla", seq=4, dtype="bfloat16"),
        # T split over a tuple of mesh axes; only the first device holds the initial state (others: garbage).
        dict(impl="xla", seq=(2, 2), state_on_first_device_only=True),
    ]
    for case in cases:
        case.setdefault("segments", True)
        case.setdefault("initial_state", True)
        case.setdefault("final_state", True)
        case.setdefault("check_vma", True)
        case.setdefault("data", 1)
        case.setdefault("state_on_first_device_only", False)
        case.setdefault("dtype", "float32")
        case.setdefault("method", "block_kernels")
        case.setdefault("T", T)
        case.setdefault("config", None)
        case.setdefault("gated", False)
        seq = case["seq"]
        flags = [k for k in ("segments", "initial_state", "final_state", "check_vma") if not case[k]]
        extra = [k for k in ("state_on_first_device_only",) if case[k]]
        case["id"] = "-".join([case["impl"], f"seq{'x'.join(map(str, np.atleast_1d(seq)))}"]
                              + ([f"data{case['data']}"] if case["data"] > 1 else [])
                              + [f"no_{f}" for f in flags] + extra
                              + ([case["dtype"]] if case["dtype"] != "float32" else [])
                              + ([case["method"]] if case["method"] != "block_kernels" else [])
                              + ([f"T{case['T']}"] if case["T"] != T else [])
                              + (["gated"] if case["gated"] else [])
                              + ([case["config"]] if case["config"] else []))
    return cases


def _registered(name: str) -> bool:
    import fleetjax
    return name in fleetjax.IMPLEMENTATIONS


# ------------------------------------------------------------------------------------ subprocess worker

def _inputs(dtype, t: int = T):
    import jax.numpy as jnp
    rng = np.random.default_rng(7)
    arrays = dict(
        q=rng.standard_normal((B, t, H, K)), k=rng.standard_normal((B, t, H, K)),
        v=rng.standard_normal((B, t, H, V)), initial_state=rng.standard_normal((B, H, K, V)),
        do=rng.standard_normal((B, t, H, V)), d_final=rng.standard_normal((B, H, K, V)))
    out = {name: jnp.asarray(x, jnp.float32) for name, x in arrays.items()}
    for name in ("q", "k", "v"):
        out[name] = out[name].astype(dtype)
    out["decay"] = jnp.asarray(DECAY, jnp.float32)
    gate = -np.abs(rng.standard_normal((B, t, H))) * 0.2
    gate[0, t // 3, 1] = -40.0  # a hard forget
    out["log_gate"] = jnp.asarray(gate, jnp.float32)
    out["segment_ids"] = jnp.asarray({T: SEGMENT_IDS, 64: SEGMENT_IDS_64}[t], jnp.int32)
    return out


def _config(case):
    # Chunks of 3 do not divide the per-device blocks (16, 8, 4): partial chunks at every block end.
    from fleetjax.xla import XlaConfig
    if case["impl"] == "xla":
        return XlaConfig(chunk_size=3)
    if case["config"] == "pieces":
        from fleetjax.pallas.chunked import PallasConfig, WalkConfig
        tile = WalkConfig(chunk_size=16, block_v=16)
        return PallasConfig(forward=tile, dq=tile, dv=tile, dk=tile, num_sequence_pieces=2,
                            backward_num_sequence_pieces=2)
    return None


def _reference_blocks():
    """The scan reference's record named BLOCKS, with BlockKernels made of its own autodiff."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    import fleetjax
    from fleetjax import reference, vjp
    from fleetjax.state_passing import BlockKernels
    from fleetjax.vma import vary_like

    def scan(q, k, v, lg, gate, start, runs, scale):
        return reference.scan_impl(q, k, v, lg, gate, start, runs, scale=scale)

    def local_state(k, v, decays, runs, *, config):
        zero = vary_like(jnp.zeros(k.shape[:1] + k.shape[2:] + v.shape[-1:], jnp.float32), k, v)
        return scan(jnp.zeros_like(k), k, v, decays.log_decay, decays.log_gate, zero, runs, 1.0)[1], None

    def forward(q, k, v, decays, start, runs, reuse, *, scale, config):
        return scan(q, k, v, decays.log_decay, decays.log_gate, start, runs, scale)[0]

    def local_reverse_state(q, do, decays, runs, *, scale, config):
        # The entering state's terms of o do not involve k or v.
        zero_v = jnp.zeros(do.shape, q.dtype)
        start = vary_like(jnp.zeros(q.shape[:1] + q.shape[2:] + do.shape[-1:], jnp.float32), q, do)
        o, pullback = jax.vjp(lambda s: scan(q, jnp.zeros_like(q), zero_v, decays.log_decay, decays.log_gate, s,
                                             runs, scale)[0], start)
        return pullback(do.astype(o.dtype))[0], None

    def backward(q, k, v, decays, start, runs, do, exit_cotangent, reuse, *, scale, config, wanted):
        del wanted  # the reference forms every gradient
        (o, final), pullback = jax.vjp(lambda *a: scan(*a, runs, scale), q, k, v, decays.log_decay, decays.log_gate,
                                       start)
        exit_cotangent = jnp.zeros_like(final) if exit_cotangent is None else exit_cotangent
        dq, dk, dv, d_lg, d_gate, d_start = pullback((do.astype(o.dtype), exit_cotangent))
        carry = vjp.whole_row_carry(decays, runs, q.shape[0], q.shape[1])  # its terms belong to the exchange
        term = vjp.carry_term(carry, exit_cotangent, start)
        d_gate = None if d_gate is None else jnp.swapaxes(d_gate, 1, 2) - term[:, :, None]
        return (dq, dk, dv, d_lg - q.shape[1] * jnp.sum(term, axis=0), d_gate,
                d_start - carry[..., None, None] * exit_cotangent)

    return dataclasses.replace(fleetjax.IMPLEMENTATIONS["scan"], name=BLOCKS,
                               block_kernels=BlockKernels(local_state, forward, local_reverse_state, backward))


def _implementation(case, sharded: bool):
    """The record the case runs: BLOCKS is built here; method "generic" drops the block kernels (sharded)."""
    import dataclasses

    import fleetjax
    record = _reference_blocks() if case["impl"] == BLOCKS else fleetjax.IMPLEMENTATIONS[case["impl"]]
    if sharded and case["method"] == "generic":
        record = dataclasses.replace(record, block_kernels=None)
    return record


def _loss_and_grads(fn, x, case):
    """value_and_grad of <o, dO> (+ <S, dS>) over q, k, v, decay and the initial state; aux (o, S)."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, decay, initial_state, log_gate):
        o, final = fn(q, k, v, decay, initial_state, log_gate)
        value = jnp.sum(o.astype(jnp.float32) * x["do"])
        if case["final_state"]:
            value = value + jnp.sum(final * x["d_final"])
        return value, (o, final)

    args = (x["q"], x["k"], x["v"], x["decay"], x["initial_state"], x["log_gate"])
    argnums = (0, 1, 2, 3) + ((4,) if case["initial_state"] else ()) + ((5,) if case["gated"] else ())
    (_, (o, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
    names = [{0: "dq", 1: "dk", 2: "dv", 3: "d_decay", 4: "d_initial_state", 5: "d_log_gate"}[i] for i in argnums]
    out = {"o": o, **dict(zip(names, grads))}
    if case["final_state"]:
        out["final_state"] = final
    return out


def _call(case, sequence_axis_name=None):
    """fleet_attention with the case's options, as fn(q, k, v, decay, initial_state) -> (o, final)."""
    import jax
    import jax.numpy as jnp

    import fleetjax

    def fn(q, k, v, decay, initial_state, log_gate, segment_ids):
        if sequence_axis_name is not None and case["state_on_first_device_only"]:
            first = jax.lax.axis_index(sequence_axis_name) == 0
            initial_state = jnp.where(first, initial_state, 1e3)  # only device 0's value may be read
        return fleetjax.fleet_attention(
            q, k, v, decay, scale=SCALE, initial_state=initial_state if case["initial_state"] else None,
            log_gate=log_gate if case["gated"] else None,
            return_final_state=True, segment_ids=segment_ids if case["segments"] else None,
            sequence_axis_name=sequence_axis_name, implementation=_implementation(case, sequence_axis_name is not None),
            config=_config(case))
    return fn


def _sharded(case, x):
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    seq = case["seq"]
    seq_shape = tuple(np.atleast_1d(seq))
    seq_names = ("seq",) if len(seq_shape) == 1 else tuple(f"seq{i}" for i in range(len(seq_shape)))
    axis = seq_names[0] if len(seq_names) == 1 else seq_names
    n = case["data"] * int(np.prod(seq_shape))
    mesh = Mesh(np.array(jax.devices()[:n]).reshape((case["data"],) + seq_shape), ("data",) + seq_names)
    data = "data" if case["data"] > 1 else None
    fn = _call(case, axis)
    mapped = jax.shard_map(
        fn, mesh=mesh, check_vma=case["check_vma"],
        in_specs=(P(data, axis), P(data, axis), P(data, axis), P(), P(data), P(data, axis), P(data, axis)),
        out_specs=(P(data, axis), P(data)))
    return lambda q, k, v, decay, s0, gate: mapped(q, k, v, decay, s0, gate, x["segment_ids"])


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    errors = {}
    for name, w in want.items():
        g = np.asarray(got[name], np.float64)
        w = np.asarray(w, np.float64)
        errors[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
    return errors


def _collectives(case: dict[str, Any], t: int) -> list[str]:
    """The shapes of every collective in the compiled sharded forward+backward, at total length t."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import fleetjax

    mesh = Mesh(np.array(jax.devices()[:case["seq"]]), ("seq",))
    q = jnp.ones((B, t, H, K))
    v = jnp.ones((B, t, H, V))
    segment_ids = jnp.zeros((B, t), jnp.int32)

    def fn(q, k, v, decay, s0, seg):
        return fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, segment_ids=seg,
                                        return_final_state=True, sequence_axis_name="seq",
                                        implementation=case["impl"])

    mapped = jax.shard_map(fn, mesh=mesh, check_vma=case["check_vma"],
                           in_specs=(P(None, "seq"),) * 3 + (P(), P(), P(None, "seq")),
                           out_specs=(P(None, "seq"), P()))

    def loss(q, k, v, decay, s0):
        o, final = mapped(q, k, v, decay, s0, segment_ids)
        return jnp.sum(o) + jnp.sum(final)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    text = grad.lower(q, q, v, jnp.full((H,), 0.9), jnp.ones((B, H, K, V))).compile().as_text()
    pattern = r"=\s*(.*?)\s+(all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)(-start)?\("
    return sorted(f"{m.group(2)} {m.group(1)}" for m in re.finditer(pattern, text))


def _refusals() -> dict[str, str]:
    """Error messages of layouts that only several devices can show."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import fleetjax

    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    decay = jnp.full((H,), 0.9)
    messages = {}

    def attempt(name, fn, *args):
        try:
            jax.block_until_ready(fn(*args))
            messages[name] = "no error"
        except (ValueError, TypeError) as error:
            messages[name] = f"{type(error).__name__}: {error}"

    def body(q):
        return fleetjax.fleet_attention(q, q, q, decay, sequence_axis_name="seq", implementation="xla")

    # T = 30 over 4 devices: shard_map itself refuses before the op runs.
    attempt("indivisible_T", jax.shard_map(body, mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")),
            jnp.ones((1, 30, H, K)))
    # q, k, v replicated over the axis (T not split on it): refused by the op, with check_vma typing.
    attempt("replicated_T", jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()), jnp.ones((1, 8, H, K)))
    return messages


def _worker(ids: list[str]) -> None:
    import jax
    import jax.numpy as jnp

    assert len(jax.devices()) >= DEVICES, jax.devices()
    results: dict[str, Any] = {}
    references: dict[tuple, dict] = {}
    for case in (case for case in _cases() if case["id"] in ids):
        start = time.perf_counter()
        try:
            x = _inputs(jnp.dtype(case["dtype"]), case["T"])
            key = tuple(case[k] for k in ("impl", "segments", "initial_state", "final_state", "dtype", "T",
                                          "config", "gated"))
            if key not in references:
                unsharded = _call(case)
                references[key] = _loss_and_grads(
                    lambda q, k, v, d, s0, g: unsharded(q, k, v, d, s0, g, x["segment_ids"]), x, case)
            got = _loss_and_grads(_sharded(case, x), x, case)
            results[case["id"]] = {"errors": _relative_errors(got, references[key])}
        except Exception as error:  # reported by the test of this case
            results[case["id"]] = {"exception": f"{type(error).__name__}: {error}"}
        results[case["id"]]["seconds"] = time.perf_counter() - start
    for check_vma in (True, False):
        if f"collectives-vma{check_vma}" not in ids:
            continue
        case = dict(impl="xla", seq=4, check_vma=check_vma)
        try:
            results[f"collectives-vma{check_vma}"] = {t: _collectives(case, t) for t in (32, 64)}
        except Exception as error:
            results[f"collectives-vma{check_vma}"] = {"exception": f"{type(error).__name__}: {error}"}
    if "refusals" in ids:
        try:
            results["refusals"] = _refusals()
        except Exception as error:
            results["refusals"] = {"exception": f"{type(error).__name__}: {error}"}
    devices.print_results(results)


# ------------------------------------------------------------------------------------------- the tests

def _groups() -> list[list[str]]:
    """The cases in two workers of about equal cost: the interpret-mode Pallas cases (compile-bound, the
    slowest) dealt out first, then the rest; the shape-independent checks ride with the second."""
    ordered = sorted(_cases(), key=lambda case: not case["impl"].startswith("pallas"))
    groups = [[case["id"] for case in ordered[i::2]] for i in range(2)]
    groups[0] += ["collectives-vmaTrue", "collectives-vmaFalse"]
    groups[1] += ["refusals"]
    return groups


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return devices.run_workers(__file__, DEVICES, _groups())


@pytest.mark.parametrize("case", _cases(), ids=lambda case: case["id"])
def test_sharded_equals_unsharded(results, case):
    """Output, final state and the gradients in q, k, v, decay, initial_state match the unsharded call."""
    result = results[case["id"]]
    assert "exception" not in result, result.get("exception")
    tolerance = TOLERANCE[case["dtype"]]
    expected = {"o", "dq", "dk", "dv", "d_decay"} | ({"final_state"} if case["final_state"] else set()) \
        | ({"d_initial_state"} if case["initial_state"] else set()) | ({"d_log_gate"} if case["gated"] else set())
    assert set(result["errors"]) == expected
    bad = {name: err for name, err in result["errors"].items() if not err <= tolerance}
    assert not bad, f"relative error above {tolerance}: {bad}"


@pytest.mark.parametrize("check_vma", [True, False])
def test_exchange_does_not_grow_with_T(results, check_vma):
    """Forward+backward move only [B, H, K, V]-sized states (and scalars per head), whatever T is."""
    by_length = results[f"collectives-vma{check_vma}"]
    assert "exception" not in by_length, by_length["exception"]
    assert by_length["32"] == by_length["64"], by_length
    assert any(op.startswith("all-gather") and f"f32[4,{B},{H},{K},{V}]" in op for op in by_length["32"])


def test_indivisible_T_is_refused(results):
    message = results["refusals"]["indivisible_T"]
    assert message.startswith("ValueError") and "divisible" in message, message


def test_replicated_sequence_is_refused(results):
    message = results["refusals"]["replicated_T"]
    assert message.startswith("ValueError") and "replicated over sequence_axis_name='seq'" in message, message


# ------------------------------------------------------------------------ refusals on a single device

def _one_device_call(axis_name, in_spec):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import fleetjax
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    body = lambda q: fleetjax.fleet_attention(q, q, q, jnp.full((2,), 0.5), sequence_axis_name=axis_name)
    mapped = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_spec, out_specs=P(None, "seq")))
    return mapped(jnp.ones((1, 4, 2, 3)))


def test_outside_shard_map_is_refused():
    import jax.numpy as jnp

    import fleetjax
    q = jnp.ones((1, 4, 2, 3))
    with pytest.raises(ValueError, match=r"sequence_axis_name='seq' is not a mesh axis .* inside jax.shard_map"):
        fleetjax.fleet_attention(q, q, q, jnp.full((2,), 0.5), sequence_axis_name="seq")


def test_unknown_axis_name_is_refused():
    from jax.sharding import PartitionSpec as P
    with pytest.raises(ValueError, match=r"sequence_axis_name='sequence' is not a mesh axis"):
        _one_device_call("sequence", P(None, "seq"))


def test_one_device_axis_is_the_plain_call():
    """A mesh axis of size 1 runs the unsharded computation (the baseline of bench_multigpu.py)."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import fleetjax
    q = jnp.ones((1, 4, 2, 3))
    want = fleetjax.fleet_attention(q, q, q, jnp.full((2,), 0.5))
    np.testing.assert_allclose(np.asarray(_one_device_call("seq", P(None, "seq"))), np.asarray(want), rtol=1e-6)


def test_vary_like_and_shape_dtype_like_follow_the_mesh_axes():
    """The helpers for implementations: a scan carry made with vary_like matches varying data; a
    pallas_call out_shape from shape_dtype_like says which axes it varies over; outside shard_map, no-ops."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from fleetjax.vma import shape_dtype_like, vary_like
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))

    def varying_axes_of(struct):
        mat = getattr(struct, "manual_axis_type", None)
        return set(getattr(mat, "varying", None) or getattr(struct, "vma", None) or ())
    seen = {}

    def body(x):
        carry = vary_like(jnp.zeros(x.shape[1:]), x)
        total, _ = jax.lax.scan(lambda c, row: (c + row, None), carry, x)
        seen["struct"] = shape_dtype_like((2, 3), jnp.float32, x)
        return total[None]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("seq"), out_specs=P("seq")))(jnp.ones((4, 3)))
    np.testing.assert_allclose(np.asarray(out), np.full((1, 3), 4.0))
    assert seen["struct"].shape == (2, 3) and "seq" in varying_axes_of(seen["struct"])
    x = jnp.ones((2,))
    assert vary_like(x, x) is x
    assert shape_dtype_like((2,), jnp.float32, x).shape == (2,) and not varying_axes_of(shape_dtype_like((2,), jnp.float32, x))


if __name__ == "__main__" and devices.worker_ids(sys.argv) is not None:
    _worker(devices.worker_ids(sys.argv))


@pytest.mark.parametrize("with_runs", [False, True])
def test_grouped_local_state_equals_one_product(with_runs):
    import jax
    import jax.numpy as jnp

    from fleetjax.decay import Decays
    from fleetjax.sharding import _block_final_state, _groups
    assert _groups(131072) == 64 and _groups(1000) == 1 and _groups(3000) == 5
    rng = np.random.default_rng(0)
    B, T, H, K, V = 2, 24, 3, 4, 5
    k, v = jnp.asarray(rng.standard_normal((B, T, H, K))), jnp.asarray(rng.standard_normal((B, T, H, V)))
    log_decay = jnp.log(jnp.asarray([1.0, 0.9, 1e-3], jnp.float32))
    runs = jnp.asarray(np.repeat(np.array([[0, 1, 1], [0, 0, 2]]), 8, axis=1)) if with_runs else None
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    state = lambda k, v, d, groups: _block_final_state(k, v, Decays(d), runs, groups)  # noqa: E731
    grads = lambda groups: jax.grad(lambda k, v, d: jnp.sum(jnp.sin(state(k, v, d, groups))),
                                    argnums=(0, 1, 2))(k, v, log_decay)
    one, six = state(k, v, log_decay, 1), state(k, v, log_decay, 6)
    np.testing.assert_allclose(six, one, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(6), grads(1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("check_vma", [True, False])
def test_sequence_parallel_backward_with_a_fixed_decay(check_vma):
    """A fixed decay and gate under sequence parallelism: the block's custom VJP forms no decay gradient (its
    dq walk has no crossing counts), the final state's cotangent is a symbolic zero (not returned), and dq,
    dk, dv equal the plain call's."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import fleetjax
    from test_pallas_chunked import _kernel_outputs
    rng = np.random.default_rng(5)
    t = 24
    q, k = (jnp.asarray(rng.standard_normal((1, t, 2, 4)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, t, 2, 5)), jnp.float32)
    decay = jnp.asarray([0.9, 0.5])
    gate = jnp.asarray(-np.abs(rng.standard_normal((1, t, 2))) * 0.1, jnp.float32)

    def attend(axis):
        return lambda q, k, v, gate: fleetjax.fleet_attention(q, k, v, decay, log_gate=gate, scale=0.5,
                                                              sequence_axis_name=axis, implementation="pallas")

    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    mapped = jax.shard_map(attend("seq"), mesh=mesh, in_specs=(P(None, "seq"),) * 4, out_specs=P(None, "seq"),
                           check_vma=check_vma)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))  # noqa: E731
    assert _kernel_outputs(jax.make_jaxpr(grad(mapped))(q, k, v, gate).jaxpr)["fleet_backward_dq"] == 2
    got, want = jax.jit(grad(mapped))(q, k, v, gate), jax.jit(grad(attend(None)))(q, k, v, gate)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_one_device_axis_equals_the_plain_call(impl, exchange, check_vma):
    """On a one-device axis the op is the plain call; fleetjax.sharding.exchange runs the sharded algorithm
    anyway (the benchmark's emulation of one device of a larger mesh). Output, final state and gradients as
    the plain call, also under shard_map's check_vma typing."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import fleetjax
    from fleetjax import sharding
    from fleetjax.vma import vary_like
    if impl not in fleetjax.IMPLEMENTATIONS:
        pytest.skip(f"{impl} is not registered")
    rng = np.random.default_rng(3)
    t = 24
    q, k = (jnp.asarray(rng.standard_normal((1, t, 2, 4)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, t, 2, 5)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((1, 2, 4, 5)), jnp.float32)
    decay = jnp.asarray([0.9, 0.5])
    segments = jnp.asarray([[0] * 10 + [1] * 14], jnp.int32)
    record = fleetjax.IMPLEMENTATIONS[impl]

    def loss(fn, q, k, v, decay, s0):
        o, final = fn(q, k, v, decay, s0, segments)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final))

    def attend(axis):
        return lambda q, k, v, decay, s0, seg: fleetjax.fleet_attention(
            q, k, v, decay, scale=0.5, initial_state=s0, segment_ids=seg, return_final_state=True,
            sequence_axis_name=axis, implementation=impl)

    def exchanged(q, k, v, decay, s0, seg):
        log_decay = vary_like(jnp.log(decay), q, k, v)
        return sharding.exchange(record, q, k, v, log_decay, None, s0, sharding.block_run_ids(seg, "seq"),
                                 scale=0.5, config=record.config_for(None, q, v), axis_name="seq")

    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    mapped = jax.shard_map(exchanged if exchange else attend("seq"), mesh=mesh,
                           in_specs=(P(None, "seq"),) * 3 + (P(), P(), P(None, "seq")),
                           out_specs=(P(None, "seq"), P()), check_vma=check_vma)
    grad = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4)))  # noqa: E731
    got = grad(mapped)(q, k, v, decay, s0)
    want = grad(attend(None))(q, k, v, decay, s0)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("axis", [0, 2])
def test_pass_states_follows_the_recurrence_along_any_axis(axis, reverse):
    """fleetjax.state_passing.pass_states against the float64 recurrence, the pieces along ``axis`` (the
    Pallas walks pass [B, H, P, K, V] states in place), with a segment start that drops its entering NaN."""
    import jax.numpy as jnp
    from fleetjax.state_passing import pass_states
    rng = np.random.default_rng(axis + 2 * reverse)
    Bn, Hn, P, Kn, Vn = 2, 3, 5, 4, 2
    start = rng.standard_normal((Bn, Hn, Kn, Vn))
    local = rng.standard_normal((P, Bn, Hn, Kn, Vn))
    carry = rng.uniform(0.0, 1.0, (P, Bn, Hn))
    keep = rng.uniform(size=(P, Bn, Hn)) > 0.3
    first = P - 1 if reverse else 0
    keep[first + (-1 if reverse else 1), 0, 0] = False  # the state entering here is NaN and must not pass
    local[first, 0, 0] = np.nan
    want = np.zeros((P, Bn, Hn, Kn, Vn))
    state = start
    for p in (reversed(range(P)) if reverse else range(P)):
        want[p] = state
        carried = np.where(keep[p][..., None, None], carry[p][..., None, None] * state, 0.0)
        state = carried + local[p]
    moved = lambda x, dtype=jnp.float32: jnp.moveaxis(jnp.asarray(x, dtype), 0, axis)  # noqa: E731
    got, last = pass_states(jnp.asarray(start, jnp.float32), moved(local), moved(carry), moved(keep, jnp.bool_),
                            reverse=reverse, axis=axis)
    np.testing.assert_allclose(np.moveaxis(np.asarray(got), axis, 0), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(last), state, rtol=1e-6, atol=1e-6)
    assert np.isfinite(np.asarray(last)[0, 0]).all()
