"""The gated Mosaic walk at two compute warpgroups a program, in Mosaic GPU's CPU interpreter.

The interpreter runs each warpgroup of a program as its own XLA execution on the CPU client's threads. With
the suite's one CPU device, on a two-core host, a gated two-warpgroup walk stalled: one warpgroup's
execution never started while the other two waited at their barriers (jax 0.10.2; the constant decay's walk
ran). With four fake CPU devices the client has threads for all three, so these cases run in a subprocess
with that many (tests/devices.py). With one device even the constant decay's two-warpgroup walk stalled at
six chunks a piece (one chunk a piece runs), so the two-warpgroup walks over six chunks run here too, and
the walks that form sums at two compute
warpgroups (MosaicWalkConfig.sums_warpgroups: the dq walk of the decay's alone; gate_dq_warpgroups and
gate_dk_warpgroups: the gate's dq and dk walks). Each two-warpgroup walk runs with the interpreter's race
detector on (InterpretGPUParams.detect_races): two warpgroups writing one interpreter copy of a transposed
tile at K = block_v raced there, unseen at one chunk a piece and hidden by the warpgroups' turns
(MosaicWalkConfig.pingpong, since removed) over six. On Hopper the two-warpgroup walks are checked through the
op (tests/test_mosaic.py).
"""

from __future__ import annotations

import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

import devices
import oracle
from test_mosaic import InterpretGPUParams, _inputs, _log_gate, checked, raced
from test_op import TOLERANCE

DEVICES = 4
CASES = ["forward", "reverse"]
# Two warpgroups over six chunks: with one CPU device even the constant decay's two-warpgroup walk stalled at
# that length (the gated one at any).
LONG_CASES = ["long-constant", "long-gated"]
# The walks that form sums at two compute warpgroups: the dq walk with the decay's tangent
# (MosaicWalkConfig.sums_warpgroups; gated, the gate's sums beside it: gate_dq_warpgroups), the gate's dq walk
# without it (gate_dq_warpgroups) and its dk walk in reverse (gate_dk_warpgroups).
SUMS_CASES = ["sums-constant", "sums-gated", "sums-gate-dq", "sums-reverse-gated"]

def _run_case(direction: str) -> dict[str, Any]:
    """Out and the pieces' final states at one and at two warpgroups (race-checked): bitwise equal? And the
    forward's first piece against the float64 oracle, from random entering states in two pieces, with a hard
    forget (log gate -40) inside the second piece."""
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import mosaic
    B, T, H, K, V = 1, 128, 2, 64, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=0.5)
    decay = jnp.asarray([0.9, 1.0], jnp.float32)
    decays = Decays(jnp.log(decay), _log_gate(B, T, H))
    entering = jnp.asarray(np.random.default_rng(1).standard_normal((B, H, 2, K, V)), jnp.float32)
    reverse = direction == "reverse"
    within = decays.within_chunks(B, T, 64, base2=True)
    one, two, races = mosaic.MosaicWalkConfig(), mosaic.MosaicWalkConfig(warpgroups=2), []
    got = [mosaic.walk(q, k, v, decays.log_decay, entering, Chunking(T, 64, 2), reverse=reverse, scale=0.2,
                       config=one, within=within, interpret=InterpretGPUParams()),
           checked(races, mosaic.walk, q, k, v, decays.log_decay, entering, Chunking(T, 64, 2), reverse=reverse,
                    scale=0.2, config=two, within=within)]
    result = {"out_equal": bool(jnp.array_equal(got[0][0], got[1][0])),
              "finals_equal": bool(jnp.array_equal(got[0][1], got[1][1])),
              "finite": bool(jnp.all(jnp.isfinite(got[1][0].astype(jnp.float32))))}
    # The first piece in the walk's order entered from zero with the others' states alone (entering_states'
    # zero_first) at two warpgroups: bitwise the walk from the full states with that piece's zeroed.
    first = 1 if reverse else 0
    zeroed = entering.at[:, :, first].set(0.0)
    short = entering[:, :, :1] if reverse else entering[:, :, 1:]
    pair = [checked(races, mosaic.walk, q, k, v, decays.log_decay, e, Chunking(T, 64, 2), reverse=reverse,
                     scale=0.2, config=two, within=within) for e in (zeroed, short)]
    result["zero_first_equal"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(*pair))
    result["races"] = raced(races)
    if not reverse:
        ref, final = oracle.forward(q[:, :64], k[:, :64], v[:, :64], decay, scale=0.2,
                                    initial_state=entering[:, :, 0], log_gate=decays.log_gate[:, :64])
        result["out_error"] = float(oracle.rel_err(got[1][0][:, :64], ref, axis=2))
        result["final_error"] = float(oracle.rel_err(got[1][1][:, :, 0], final, axis=1))
    return result


def _run_long(case_id: str) -> dict[str, Any]:
    """Out and the final state of one piece of six chunks, forward and in reverse: one warpgroup against two
    (race-checked), bitwise equal? The constant decay or a gate with a hard forget."""
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import mosaic
    B, T, H, K, V = 1, 384, 1, 64, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=0.5)
    gated = case_id == "long-gated"
    decays = Decays(jnp.log(jnp.asarray([0.95], jnp.float32)), _log_gate(B, T, H) if gated else None)
    within = decays.within_chunks(B, T, 64, base2=True) if gated else None
    result, races = {}, []
    for reverse in (False, True):
        common = dict(reverse=reverse, scale=0.2, within=within)
        one = mosaic.walk(q, k, v, decays.log_decay, None, Chunking(T, 64, 1), config=mosaic.MosaicWalkConfig(),
                          interpret=InterpretGPUParams(), **common)
        two = checked(races, mosaic.walk, q, k, v, decays.log_decay, None, Chunking(T, 64, 1),
                       config=mosaic.MosaicWalkConfig(warpgroups=2), **common)
        name = "reverse" if reverse else "forward"
        result[name] = bool(jnp.array_equal(one[0], two[0]) and jnp.array_equal(one[1], two[1]))
    return result | {"races": raced(races)}


def _run_sums(case_id: str) -> dict[str, Any]:
    """A walk forming sums at one and at two compute warpgroups a program (race-checked): out, the pieces'
    final states and the sums bitwise equal? The dq walk's form (the tangent as a second state, from random
    entering tangents) with the constant decay or the gated one with a hard forget (and the gate's sums), the
    gate's dq walk without the tangent, or its dk walk (in reverse); two pieces of three chunks from random
    entering states, value blocks of 32 (two a program)."""
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
    args = (q, k, v, decays.log_decay, entering, Chunking(T, 64, 2))
    common = dict(reverse=reverse, scale=0.2, rows=v, tangent=tangent, entering_tangents=tangents if tangent else None,
                  within=decays.within_chunks(B, T, 64, base2=True) if gated else None, before=gated)
    races = []
    one = mosaic.sums_walk(*args, config=walks[1], interpret=InterpretGPUParams(), **common)
    two = checked(races, mosaic.sums_walk, *args, config=walks[2], **common)
    names = ["decay"] * tangent + (["before", "state"] if gated else [])
    return {"races": raced(races), "out": bool(jnp.array_equal(one[0], two[0])),
            "finals": bool(jnp.array_equal(one[1], two[1])),
            "sums": sorted(one[2]) == sorted(two[2]) == sorted(names)
            and all(bool(jnp.array_equal(one[2][name], two[2][name])) for name in names),
            "finite": all(bool(jnp.all(jnp.isfinite(two[2][name]))) for name in names)}


def _worker(case_ids: list[str]) -> None:
    results: dict[str, Any] = {}
    for case_id in case_ids:
        try:
            run = _run_long if case_id in LONG_CASES else _run_sums if case_id in SUMS_CASES else _run_case
            results[case_id] = run(case_id)
        except Exception as error:  # noqa: BLE001 - reported by that case's test
            results[case_id] = {"exception": f"{type(error).__name__}: {error}"}
    devices.print_results(results)


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    if InterpretGPUParams is None:
        pytest.skip("no Mosaic GPU interpreter in this jax")
    return devices.run_workers(__file__, DEVICES, [[case] for case in CASES + LONG_CASES + SUMS_CASES],
                               timeout=600)


@pytest.mark.parametrize("direction", CASES)
def test_the_gated_walk_at_two_warpgroups_is_bitwise_the_one_warpgroup_walk(results, direction):
    result = results[direction]
    assert "exception" not in result, result.get("exception")
    assert result["out_equal"] and result["finals_equal"] and result["finite"], result
    assert result["zero_first_equal"], result
    assert result["races"] is not True, "the interpreter's race detector found a data race"
    if direction == "forward":
        assert result["out_error"] < TOLERANCE["bfloat16"], result
        assert result["final_error"] < TOLERANCE["bfloat16"], result


@pytest.mark.parametrize("case", LONG_CASES)
def test_two_warpgroups_walk_as_one_over_many_chunks(results, case):
    result = results[case]
    assert "exception" not in result, result.get("exception")
    assert result.pop("races") is not True, "the interpreter's race detector found a data race"
    assert result == {"forward": True, "reverse": True}, result


@pytest.mark.parametrize("case", SUMS_CASES)
def test_the_sums_walks_at_two_warpgroups_are_bitwise_the_one_warpgroup_walks(results, case):
    result = results[case]
    assert "exception" not in result, result.get("exception")
    assert result.pop("races") is not True, "the interpreter's race detector found a data race"
    assert result == {"out": True, "finals": True, "sums": True, "finite": True}, result


if __name__ == "__main__" and devices.worker_ids(sys.argv) is not None:
    _worker(devices.worker_ids(sys.argv))