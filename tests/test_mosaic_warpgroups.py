"""The gated Mosaic walk at two compute warpgroups a program, in Mosaic GPU's CPU interpreter.

The interpreter runs each warpgroup of a program as its own XLA execution on the CPU client's threads. With
the suite's one CPU device, on a two-core host, a gated two-warpgroup walk stalled: one warpgroup's
execution never started while the other two waited at their barriers (jax 0.10.2; the constant decay's walk
ran). With four fake CPU devices the client has threads for all three, so these cases run in a subprocess
with that many (tests/devices.py). With one device even the constant decay's two-warpgroup walk stalled at
six chunks a piece (one chunk a piece runs), so the walks whose two warpgroups take turns
(MosaicWalkConfig.pingpong) over six chunks run here too, and the walks that form sums at two compute
warpgroups (MosaicWalkConfig.sums_warpgroups: the dq walk of the decay's alone; gate_dq_warpgroups and
gate_dk_warpgroups: the gate's dq and dk walks). On Hopper the two-warpgroup walks are checked through the op
(tests/test_mosaic.py).
"""

from __future__ import annotations

import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

import devices
import oracle
from test_mosaic import InterpretGPUParams, _inputs, _log_gate
from test_op import DECAY_GRAD_TOLERANCE, TOLERANCE

DEVICES = 4
CASES = ["forward", "reverse"]
# Two warpgroups taking turns (MosaicWalkConfig.pingpong) over six chunks: with one CPU device even the
# constant decay's two-warpgroup walk stalled at that length (the gated one at any).
TURNS_CASES = ["turns-constant", "turns-gated"]
# The walks that form sums at two compute warpgroups: the dq walk with the decay's tangent
# (MosaicWalkConfig.sums_warpgroups; gated, the gate's sums beside it: gate_dq_warpgroups), the gate's dq walk
# without it (gate_dq_warpgroups) and its dk walk in reverse (gate_dk_warpgroups).
SUMS_CASES = ["sums-constant", "sums-gated", "sums-gate-dq", "sums-reverse-gated"]
# dk and dv from one reverse walk of two warpgroups (MosaicWalkConfig.joint_reverse): one and two pieces, and
# float16 (its state copies scaled before they are rounded, no lazy carry) in one.
JOINT_CASES = ["joint-1", "joint-2", "joint-float16"]


def _run_case(direction: str) -> dict[str, Any]:
    """Out and the pieces' final states at one and at two warpgroups, also taking turns on the tensor cores
    (MosaicWalkConfig.pingpong): bitwise equal? And the forward's first piece against the float64 oracle,
    from random entering states in two pieces, with a hard forget (log gate -40) inside the second piece."""
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import mosaic
    B, T, H, K, V = 1, 128, 2, 64, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=0.5)
    decay = jnp.asarray([0.9, 1.0], jnp.float32)
    decays = Decays(jnp.log(decay), _log_gate(B, T, H))
    entering = jnp.asarray(np.random.default_rng(1).standard_normal((B, H, 2, K, V)), jnp.float32)
    reverse = direction == "reverse"
    configs = [mosaic.MosaicWalkConfig(), mosaic.MosaicWalkConfig(warpgroups=2),
               mosaic.MosaicWalkConfig(warpgroups=2, pingpong=True)]
    got = [mosaic.walk(q, k, v, decays.log_decay, entering, Chunking(T, 64, 2), reverse=reverse, scale=0.2,
                       config=config, within=decays.within_chunks(B, T, 64, base2=True), interpret=InterpretGPUParams())
           for config in configs]
    result = {"out_equal": all(bool(jnp.array_equal(got[0][0], other[0])) for other in got[1:]),
              "finals_equal": all(bool(jnp.array_equal(got[0][1], other[1])) for other in got[1:]),
              "finite": bool(jnp.all(jnp.isfinite(got[1][0].astype(jnp.float32))))}
    # The first piece in the walk's order entered from zero with the others' states alone (entering_states'
    # zero_first) at two warpgroups: bitwise the walk from the full states with that piece's zeroed.
    first = 1 if reverse else 0
    zeroed = entering.at[:, :, first].set(0.0)
    short = entering[:, :, :1] if reverse else entering[:, :, 1:]
    pair = [mosaic.walk(q, k, v, decays.log_decay, e, Chunking(T, 64, 2), reverse=reverse, scale=0.2,
                        config=configs[1], within=decays.within_chunks(B, T, 64, base2=True),
                        interpret=InterpretGPUParams()) for e in (zeroed, short)]
    result["zero_first_equal"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(*pair))
    if not reverse:
        ref, final = oracle.forward(q[:, :64], k[:, :64], v[:, :64], decay, scale=0.2,
                                    initial_state=entering[:, :, 0], log_gate=decays.log_gate[:, :64])
        result["out_error"] = float(oracle.rel_err(got[1][0][:, :64], ref, axis=2))
        result["final_error"] = float(oracle.rel_err(got[1][1][:, :, 0], final, axis=1))
    return result


def _run_turns(case_id: str) -> dict[str, bool]:
    """Out and the final state of one piece of six chunks, forward and in reverse: one warpgroup against two
    taking turns on the tensor cores (MosaicWalkConfig.pingpong), bitwise equal? The constant decay or a
    gate with a hard forget."""
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import mosaic
    B, T, H, K, V = 1, 384, 1, 64, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=0.5)
    gated = case_id == "turns-gated"
    decays = Decays(jnp.log(jnp.asarray([0.95], jnp.float32)), _log_gate(B, T, H) if gated else None)
    within = decays.within_chunks(B, T, 64, base2=True) if gated else None
    result = {}
    for reverse in (False, True):
        one, two = (mosaic.walk(q, k, v, decays.log_decay, None, Chunking(T, 64, 1), reverse=reverse, scale=0.2,
                                config=config, within=within, interpret=InterpretGPUParams())
                    for config in (mosaic.MosaicWalkConfig(), mosaic.MosaicWalkConfig(warpgroups=2, pingpong=True)))
        name = "reverse" if reverse else "forward"
        result[name] = bool(jnp.array_equal(one[0], two[0]) and jnp.array_equal(one[1], two[1]))
    return result


def _run_sums(case_id: str) -> dict[str, bool]:
    """A walk forming sums at one and at two compute warpgroups a program: out, the pieces' final states and
    the sums bitwise equal? The dq walk's form (the tangent as a second state, from random entering tangents)
    with the constant decay or the gated one with a hard forget (and the gate's sums), the gate's dq walk
    without the tangent, or its dk walk (in reverse); two pieces of three chunks from random entering states,
    value blocks of 32 (two a program)."""
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import mosaic
    B, T, H, K, V = 1, 384, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    gated, reverse = case_id != "sums-constant", case_id == "sums-reverse-gated"
    tangent = case_id in ("sums-constant", "sums-gated")
    decays = Decays(jnp.log(jnp.asarray([0.97, 1.0], jnp.float32)), 0.05 * _log_gate(B, T, H) if gated else None)
    rng = np.random.default_rng(1)
    entering, tangents = (jnp.asarray(rng.standard_normal((B, H, 2, K, V)), jnp.float32) for _ in range(2))
    walks = {wgs: mosaic.MosaicWalkConfig(block_v=32, sums_warpgroups=wgs, gate_dk_warpgroups=wgs,
                                          gate_dq_warpgroups=wgs) for wgs in (1, 2)}
    one, two = (mosaic.sums_walk(q, k, v, decays.log_decay, entering, Chunking(T, 64, 2), reverse=reverse,
                                 scale=0.2, config=walks[wgs], rows=v,
                                 tangent=tangent, entering_tangents=tangents if tangent else None,
                                 within=decays.within_chunks(B, T, 64, base2=True) if gated else None, before=gated,
                                 interpret=InterpretGPUParams())
                for wgs in (1, 2))
    names = ["decay"] * tangent + (["before", "state"] if gated else [])
    return {"out": bool(jnp.array_equal(one[0], two[0])), "finals": bool(jnp.array_equal(one[1], two[1])),
            "sums": sorted(one[2]) == sorted(two[2]) == sorted(names)
            and all(bool(jnp.array_equal(one[2][name], two[2][name])) for name in names),
            "finite": all(bool(jnp.all(jnp.isfinite(two[2][name]))) for name in names)}


def _run_joint(case_id: str) -> dict[str, Any]:
    """fleetjax.pallas.mosaic.joint_walk in one or two pieces from random entering states, a gate with a hard
    forget: its dk, dv, states after the pieces and sums against the dv walk's and the gate's dk sums walk's
    (relative errors), and the backward's gradients through it (in as many pieces of its own) against the
    float64 oracle."""
    import dataclasses

    from fleetjax import vjp
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import mosaic
    from fleetjax.pallas.mosaic import joint
    dtype = "float16" if case_id == "joint-float16" else "bfloat16"
    pieces = 1 if dtype == "float16" else int(case_id.split("-")[1])
    B, T, H, K, V = 1, 256, 1, 128, 128
    q, k, v = _inputs(B, T, H, K, V, dtype)
    do = _inputs(B, T, H, K, V, dtype, seed=4)[2]
    decays = Decays(jnp.log(jnp.asarray([0.97], jnp.float32)), 0.05 * _log_gate(B, T, H))
    chunking = Chunking(T, 64, pieces)
    within = decays.within_chunks(B, T, 64, base2=True)
    entering = jnp.asarray(np.random.default_rng(1).standard_normal((B, H, pieces, K, V)), jnp.float32)
    walks = mosaic.MosaicWalkConfig(joint_reverse=True, gate_dk_warpgroups=1, gate_dq_warpgroups=1)
    params = InterpretGPUParams()
    dk, dv, finals, sums = joint.joint_walk(q, k, v, do, entering, chunking, scale=0.2, config=walks, within=within,
                                            interpret=params)
    dv_two, finals_two = mosaic.walk(k, q, do, decays.log_decay, entering, chunking, reverse=True, scale=0.2,
                                     config=walks, within=within, interpret=params)
    dk_two, _, sums_two = mosaic.sums_walk(
        v, do, q, decays.log_decay, jnp.swapaxes(entering, -1, -2), chunking, reverse=True, scale=0.2,
        config=dataclasses.replace(walks, block_v=walks.sums_block_v, stages=walks.sums_stages), rows=k,
        before=True, witness=False, within=within, interpret=params)
    result = {"dtype": dtype,
              "dk": float(oracle.rel_err(dk, dk_two, axis=2)), "dv": float(oracle.rel_err(dv, dv_two, axis=2)),
              "finals": float(oracle.rel_err(finals, finals_two, axis=None)),
              "u": float(oracle.rel_err(jnp.sum(sums["state"], 0), jnp.sum(sums_two["state"], 0), axis=None)),
              "before": float(oracle.rel_err(sums["before"][0], jnp.sum(sums_two["before"], 0), axis=None))}
    # The backward in one piece, the joint walk in its own (MosaicWalkConfig.joint_pieces).
    start = jnp.asarray(np.random.default_rng(2).standard_normal((B, H, K, V)), jnp.float32)
    dq, dk, dv, parts, witness = mosaic.backward_walks(
        q, k, v, do, decays, start, Chunking(T, 64, 1), None, None, scale=0.1,
        config=dataclasses.replace(walks, joint_pieces=pieces), log_decay_wanted=False, log_gate_wanted=True,
        interpret=params)
    d_gate = jnp.swapaxes(vjp.log_gate_grad(parts["w"], parts["u"], parts["spanned"], None, 64), 1, 2)
    ref = oracle.gradients(q, k, v, jnp.asarray([0.97], jnp.float32), do=do, scale=0.1, initial_state=start,
                           log_gate=decays.log_gate)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        result[f"oracle_{name}"] = float(oracle.rel_err(got, ref[name], axis=2))
    result["oracle_log_gate"] = float(oracle.rel_err(d_gate, ref["log_gate"]))
    result["finite"] = all(bool(jnp.all(jnp.isfinite(x))) for x in witness)
    return result


def _worker(case_ids: list[str]) -> None:
    results: dict[str, Any] = {}
    for case_id in case_ids:
        try:
            run = (_run_turns if case_id in TURNS_CASES else _run_sums if case_id in SUMS_CASES
                   else _run_joint if case_id in JOINT_CASES else _run_case)
            results[case_id] = run(case_id)
        except Exception as error:  # noqa: BLE001 - reported by that case's test
            results[case_id] = {"exception": f"{type(error).__name__}: {error}"}
    devices.print_results(results)


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    if InterpretGPUParams is None:
        pytest.skip("no Mosaic GPU interpreter in this jax")
    return devices.run_workers(__file__, DEVICES, [[case] for case in CASES + TURNS_CASES + SUMS_CASES + JOINT_CASES],
                               timeout=600)


@pytest.mark.parametrize("direction", CASES)
def test_the_gated_walk_at_two_warpgroups_is_bitwise_the_one_warpgroup_walk(results, direction):
    result = results[direction]
    assert "exception" not in result, result.get("exception")
    assert result["out_equal"] and result["finals_equal"] and result["finite"], result
    assert result["zero_first_equal"], result
    if direction == "forward":
        assert result["out_error"] < TOLERANCE["bfloat16"], result
        assert result["final_error"] < TOLERANCE["bfloat16"], result


@pytest.mark.parametrize("case", TURNS_CASES)
def test_two_warpgroups_taking_turns_walk_as_one_over_many_chunks(results, case):
    result = results[case]
    assert "exception" not in result, result.get("exception")
    assert result == {"forward": True, "reverse": True}, result


@pytest.mark.parametrize("case", SUMS_CASES)
def test_the_sums_walks_at_two_warpgroups_are_bitwise_the_one_warpgroup_walks(results, case):
    result = results[case]
    assert "exception" not in result, result.get("exception")
    assert result == {"out": True, "finals": True, "sums": True, "finite": True}, result



@pytest.mark.parametrize("case", JOINT_CASES)
def test_the_joint_reverse_walk_gives_what_the_two_walks_give(results, case):
    """dk and dv within bf16 roundings of the two walks' (the joint walk's state copies are hi/lo, the dv
    walk's one bf16 rounding), u and the column sums within float32's; the gradients through it against the
    float64 oracle."""
    result = results[case]
    assert "exception" not in result, result.get("exception")
    tolerance = TOLERANCE[result["dtype"]]
    assert result["dk"] < tolerance and result["dv"] < tolerance, result
    assert result["finals"] < tolerance, result
    assert result["u"] < 1e-4 and result["before"] < 1e-5, result
    for name in "qkv":
        assert result[f"oracle_{name}"] < tolerance, result
    assert result["oracle_log_gate"] < DECAY_GRAD_TOLERANCE[result["dtype"]], result
    assert result["finite"], result


if __name__ == "__main__" and devices.worker_ids(sys.argv) is not None:
    _worker(devices.worker_ids(sys.argv))