"""The Mosaic GPU walks (fleetjax.pallas.mosaic): when implementation="pallas" selects them; in Mosaic GPU's
CPU interpreter the forward walk and the backward's walks (the decay's and the gate's gradient sums too)
against the float64 oracle, and the whole op through them; on an sm_90 GPU the op through them against the
oracle, the Triton walks, float16's range, non-finite inputs and the gradients."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fleetjax
import oracle
from fleetjax.chunking import Chunking
from fleetjax.pallas import chunked, mosaic
from test_op import DECAY_GRAD_TOLERANCE, TOLERANCE
from test_pallas_chunked import _plain_eqns

hopper = pytest.mark.skipif(not mosaic.on_hopper(), reason="the Mosaic GPU walk runs on sm_90 GPUs only")
try:  # Mosaic GPU's CPU interpreter (a private module of jax: the tests skip where it moved)
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover
    InterpretGPUParams = None
try:  # its happens-before race detector (InterpretGPUParams.detect_races), also private
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
except ImportError:  # pragma: no cover
    get_races = None


def checked(races: list, walk, *args, **kwargs):
    """``walk(*args, **kwargs)`` in the interpreter with its race detector on; appends to ``races`` whether it
    found a data race between the program's threads (None where this jax has no detector to ask)."""
    got = jax.block_until_ready(walk(*args, interpret=InterpretGPUParams(detect_races=True), **kwargs))
    races.append(None if get_races is None else bool(get_races().races_found))
    return got


def raced(races: list) -> bool | None:
    """Whether any :func:`checked` walk raced (None: no detector could be asked)."""
    return None if all(found is None for found in races) else any(races)

# On a GPU host XLA's GPU compiler runs the interpreter's body: its dots at the GPU's default float32
# precision, looser than these tests' tolerances (the eleventh session's H200 run failed them), and its
# float32 -> 16-bit -> float32 converts removed where not kept by a barrier; the two-warpgroup walk aborted its
# process there (2026-12-03). The compiled walks are checked there instead; CI runs these.
ON_CPU = jax.default_backend() == "cpu"
on_cpu = pytest.mark.skipif(not ON_CPU, reason="checks the CPU's XLA (CI runs it)")
interpreted = pytest.mark.skipif(InterpretGPUParams is None or not ON_CPU,
                                 reason="no Mosaic GPU interpreter in this jax, or not on the CPU")


def _walks(text: str) -> int:
    """The Mosaic GPU walks of a lowered program's text, not counting the states-only ones (mosaic.piece_states)."""
    return text.count("custom_call @mosaic_gpu") - text.count(f"{mosaic.STATES_KERNEL}_mosaic_gpu")


def _supports(**changes) -> bool:
    args = dict(dtype=jnp.bfloat16, K=128, V=128, chunking=Chunking(1024, 64, 4), segments=False, gated=False,
                exact_state=False)
    args.update(changes)
    return mosaic.supports(mosaic.MosaicWalkConfig(), **args)


def test_supports_only_the_cases_the_kernel_serves():
    assert _supports()
    assert _supports(dtype=jnp.float16, K=64, V=192)
    assert not _supports(dtype=jnp.float32)
    assert not _supports(K=100)
    assert not _supports(K=256)
    assert not _supports(V=100)
    assert not _supports(chunking=Chunking(1000, 64, 1))  # a short last chunk
    assert not _supports(chunking=Chunking(64 * 10, 64, 4))  # pieces of unequal length
    assert not _supports(chunking=Chunking(1024, 32, 1))
    assert not _supports(segments=True)
    assert _supports(gated=True)
    assert not mosaic.supports(mosaic.MosaicWalkConfig(gated_forward=False), dtype=jnp.bfloat16, K=128, V=128,
                               chunking=Chunking(1024, 64, 4), segments=False, gated=True, exact_state=False)
    assert not _supports(exact_state=True)
    assert not mosaic.supports(None, dtype=jnp.bfloat16, K=128, V=128, chunking=Chunking(1024, 64, 1),
                               segments=False, gated=False, exact_state=False)


@pytest.mark.parametrize("field, value", [("chunk_size", 128), ("block_v", 48), ("sums_block_v", 256),
                                          ("stages", 0), ("stages", 2.0), ("sums_stages", 9),
                                          ("warpgroups", 3), ("backward_warpgroups", 0), ("forward_pieces", 0),
                                          ("forward_pieces", True), ("forward_block_v", 48),
                                          ("sums_warpgroups", 4), ("gate_dk_warpgroups", 3),
                                          ("gate_dq_warpgroups", 0), ("states_block_v", 48)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"MosaicWalkConfig.{field}"):
        mosaic.MosaicWalkConfig(**{field: value})
    with pytest.raises(ValueError, match="sums_stages must be 1 or 2 with sums_warpgroups=2"):
        mosaic.MosaicWalkConfig(sums_warpgroups=2, sums_stages=3, gate_dk_warpgroups=1)
    with pytest.raises(ValueError, match="sums_stages must be 1 or 2 with gate_dk_warpgroups=2.*gate_dk_warpgroups=1"):
        mosaic.MosaicWalkConfig(sums_stages=3)  # the default's two warpgroups for the gate's dk walk
    with pytest.raises(ValueError, match="sums_stages must be 1 or 2 with gate_dq_warpgroups=2"):
        mosaic.MosaicWalkConfig(sums_stages=3, gate_dk_warpgroups=1)
    assert mosaic.MosaicWalkConfig(sums_stages=3, gate_dk_warpgroups=1, gate_dq_warpgroups=1).sums_stages == 3
    with pytest.raises(TypeError, match="mosaic_walks"):
        chunked.PallasConfig(mosaic_walks="yes")


def test_default_config_takes_it_on_hopper_only():
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    config = chunked.default_config(q, q)
    assert (config.mosaic_walks is not None) == mosaic.on_hopper()
    assert chunked.default_config(q.astype(jnp.float32), q.astype(jnp.float32)).mosaic_walks is None


def _inputs(B, T, H, K, V, dtype, seed=0, scale_values=1.0):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q, k = (jnp.asarray(scale_values * rng.standard_normal((B, T, H, K)), dt) for _ in range(2))
    v = jnp.asarray(scale_values * rng.standard_normal((B, T, H, V)), dt)
    return q, k, v


def _run(q, k, v, decay, *, mosaic_walks, pieces=1, **kwargs):
    config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=pieces,
                                 mosaic_walks=mosaic_walks)
    return jax.jit(lambda q, k, v, decay: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas",
                                                                   config=config, **kwargs))(q, k, v, decay)


CASES = [  # B, T, H, K, V, dtype, pieces, initial state, decays
    (2, 1024, 3, 128, 128, "bfloat16", 1, False, (0.999, 0.9, 1.0)),
    (1, 2048, 2, 128, 128, "bfloat16", 4, True, (0.99, 1e-30)),
    (1, 512, 2, 64, 192, "float16", 2, True, (0.95, 1.0)),
    (2, 256, 1, 128, 256, "bfloat16", 1, True, (0.5,)),
]


@hopper
@pytest.mark.parametrize("B, T, H, K, V, dtype, pieces, with_start, decays", CASES)
def test_forward_matches_the_oracle_and_the_triton_walk(B, T, H, K, V, dtype, pieces, with_start, decays):
    q, k, v = _inputs(B, T, H, K, V, dtype)
    decay = jnp.asarray(decays, jnp.float32)
    start = (jnp.asarray(np.random.default_rng(1).standard_normal((B, H, K, V)), jnp.float32)
             if with_start else None)
    o = _run(q, k, v, decay, mosaic_walks=mosaic.MosaicWalkConfig(), pieces=pieces, initial_state=start)
    triton = _run(q, k, v, decay, mosaic_walks=None, pieces=pieces, initial_state=start)
    ref, _ = oracle.forward(q, k, v, decay, initial_state=start)
    assert oracle.rel_err(o, ref, axis=2) < TOLERANCE[dtype]
    # Both walks round the state to 16 bits per chunk in their plain form: they agree beyond the tolerance.
    assert oracle.rel_err(o, triton, axis=2) < TOLERANCE[dtype] / 2
    assert jnp.array_equal(o, _run(q, k, v, decay, mosaic_walks=mosaic.MosaicWalkConfig(), pieces=pieces,
                                   initial_state=start))  # deterministic


@hopper
def test_default_config_selects_it_for_the_common_case():
    q, k, v = _inputs(1, 1024, 2, 128, 128, "bfloat16")
    decay = jnp.asarray([0.9, 0.99], jnp.float32)
    f = jax.jit(lambda q, k, v: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas"))
    assert "mosaic_gpu" in f.lower(q, k, v).as_text()


@hopper
def test_float16_with_large_values_stays_in_range():
    # A state of many large k v^T terms exceeds float16's range unless it is scaled before its rounding.
    q, k, v = _inputs(1, 1024, 1, 128, 128, "float16", scale_values=8.0)
    decay = jnp.asarray([1.0], jnp.float32)
    o = _run(q, k, v, decay, mosaic_walks=mosaic.MosaicWalkConfig(), scale=1 / 128)
    ref, _ = oracle.forward(q, k, v, decay, scale=1 / 128)
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert oracle.rel_err(o, ref) < TOLERANCE["float16"]


@hopper
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nonfinite_input_reaches_only_its_outputs(where):
    q, k, v = _inputs(1, 512, 2, 128, 128, "bfloat16")
    x = dict(q=q, k=k, v=v)
    x[where] = x[where].at[0, 300, 1, 5].set(jnp.nan)
    decay = jnp.asarray([0.9, 0.99], jnp.float32)
    o = _run(x["q"], x["k"], x["v"], decay, mosaic_walks=mosaic.MosaicWalkConfig())
    triton = _run(x["q"], x["k"], x["v"], decay, mosaic_walks=None)
    np.testing.assert_array_equal(np.isnan(np.asarray(o, np.float32)), np.isnan(np.asarray(triton, np.float32)))
    assert np.isfinite(np.asarray(o[:, :300], np.float32)).all()
    assert np.isfinite(np.asarray(o[:, :, 0], np.float32)).all()


@hopper
def test_gradients_after_it_match_the_oracle():
    q, k, v = _inputs(1, 1024, 2, 128, 128, "bfloat16")
    do = _inputs(1, 1024, 2, 128, 128, "bfloat16", seed=3)[2]
    decay = jnp.asarray([0.95, 0.999], jnp.float32)
    config = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=mosaic.MosaicWalkConfig())
    f = lambda q, k, v, decay: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas", config=config)
    o, pullback = jax.vjp(jax.jit(f), q, k, v, decay)
    dq, dk, dv, d_decay = pullback(do)
    ref = oracle.gradients(q, k, v, decay, do=do)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        assert oracle.rel_err(got, ref[name], axis=2) < TOLERANCE["bfloat16"]
    assert oracle.rel_err(d_decay, ref["decay"]) < DECAY_GRAD_TOLERANCE["bfloat16"]


def test_serves_the_backward_without_an_initial_state_gradient():
    from fleetjax.vjp import Wanted
    fixed = Wanted(log_decay=False, log_gate=False, initial_state=False)
    args = dict(dtype=jnp.bfloat16, K=128, V=64, chunking=Chunking(1024, 64, 2), segments=False, gated=False,
                exit_cotangent=False, wanted=fixed)
    config = mosaic.MosaicWalkConfig(decay_sums=False, gated_backward=False)
    assert mosaic.serves_backward(config, **args)
    for change in (dict(wanted=Wanted(log_gate=False, initial_state=False)), dict(wanted=Wanted(log_decay=False,
                   log_gate=False)), dict(exit_cotangent=True), dict(V=256), dict(K=96), dict(segments=True),
                   dict(gated=True)):
        assert not mosaic.serves_backward(config, **{**args, **change}), change
    learned = Wanted(log_gate=False, initial_state=False)
    sums = mosaic.MosaicWalkConfig()
    assert sums.decay_sums
    assert mosaic.serves_backward(sums, **{**args, "wanted": learned, "chunking": Chunking(1024, 64, 1)})
    assert mosaic.serves_backward(sums, **{**args, "wanted": learned})  # the tangents pass between the pieces
    assert not mosaic.serves_backward(sums, **{**args, "wanted": learned, "K": 96})
    gate = Wanted(log_decay=False, initial_state=False)
    assert mosaic.serves_backward(sums, **{**args, "gated": True, "wanted": gate})
    off = mosaic.MosaicWalkConfig(gated_backward=False)
    assert not mosaic.serves_backward(off, **{**args, "gated": True, "wanted": gate})
    both = Wanted(initial_state=False)
    assert sums.gated_decay_sums
    assert mosaic.serves_backward(sums, **{**args, "gated": True, "wanted": both})
    assert mosaic.serves_backward(sums, **{**args, "gated": True, "wanted": learned})
    gate_only = mosaic.MosaicWalkConfig(gated_decay_sums=False)
    assert not mosaic.serves_backward(gate_only, **{**args, "gated": True, "wanted": both})
    assert not mosaic.serves_backward(dataclasses.replace(sums, decay_sums=False),
                                      **{**args, "gated": True, "wanted": both})


def _fixed_decay_grads(q, k, v, do, decay, *, mosaic_walks, pieces, start=None):
    config = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=mosaic_walks,
                                 num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces)
    f = lambda q, k, v: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas", config=config,
                                                 initial_state=start)
    o, pullback = jax.vjp(jax.jit(f), q, k, v)
    return jax.jit(pullback)(do)


@hopper
@pytest.mark.parametrize("pieces, with_start, K, V", [(1, False, 128, 128), (4, True, 128, 128),
                                                       (2, True, 64, 128), (1, False, 128, 64)])
def test_fixed_decay_backward_matches_the_oracle_and_the_triton_walks(pieces, with_start, K, V):
    B, T, H = 2, 1024, 2
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=5)[2]
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    start = (jnp.asarray(np.random.default_rng(2).standard_normal((B, H, K, V)), jnp.float32)
             if with_start else None)
    got = _fixed_decay_grads(q, k, v, do, decay, mosaic_walks=mosaic.MosaicWalkConfig(), pieces=pieces,
                             start=start)
    triton = _fixed_decay_grads(q, k, v, do, decay, mosaic_walks=None, pieces=pieces, start=start)
    ref = oracle.gradients(q, k, v, decay, do=do, initial_state=start)
    for g, t, name in zip(got, triton, ("q", "k", "v")):
        assert oracle.rel_err(g, ref[name], axis=2) < TOLERANCE["bfloat16"], name
        assert oracle.rel_err(g, t, axis=2) < TOLERANCE["bfloat16"] / 2, name


@hopper
@pytest.mark.parametrize("pieces, gate", [(1, None), (4, None), (2, "fixed"), (2, "learned"), (2, "alone")])
def test_the_sums_walks_on_two_warpgroups_give_the_op_bitwise_what_one_gives(pieces, gate):
    """MosaicWalkConfig.sums_warpgroups, gate_dq_warpgroups and gate_dk_warpgroups = 2: the op's gradients
    bitwise those of the one-warpgroup sums walks, the decay's or gate's against the float64 oracle: with the
    decay learned the dq walk on two warpgroups (no gate, or a fixed one), with the gate learned too the gate's
    dk walk as well; with the gate ``alone`` (no per-head decay) the gate's dq and dk walks."""
    B, T, H, K, V = 2, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=5)[2]
    decay = None if gate == "alone" else jnp.asarray([0.97, 1.0], jnp.float32)
    log_gate = None if gate is None else 0.05 * _log_gate(B, T, H)
    gate_learned = gate in ("learned", "alone")
    inputs = (q, k, v) + (() if decay is None else (decay,)) + ((log_gate,) if gate_learned else ())

    def run(walks):
        config = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=walks,
                                     backward_num_sequence_pieces=pieces)

        def f(q, k, v, *learned):
            decay_in = None if decay is None else learned[0]
            gate_in = learned[-1] if gate_learned else log_gate
            return fleetjax.fleet_attention(q, k, v, decay_in, log_gate=gate_in, implementation="pallas",
                                            config=config)
        _, pullback = jax.vjp(jax.jit(f), *inputs)
        return jax.jit(pullback)(do)

    one = run(mosaic.MosaicWalkConfig(sums_warpgroups=1, gate_dk_warpgroups=1, gate_dq_warpgroups=1))
    two = run(mosaic.MosaicWalkConfig(sums_warpgroups=2, gate_dk_warpgroups=2, gate_dq_warpgroups=2))
    names = ("dq", "dk", "dv") + ((() if decay is None else ("decay",))
                                  + (("log_gate",) if gate_learned else ()))
    assert len(one) == len(two) == len(names)
    for a, b, name in zip(one, two, names):
        assert jnp.array_equal(a, b), name
    ref = oracle.gradients(q, k, v, jnp.ones((H,), jnp.float32) if decay is None else decay, do=do,
                           log_gate=log_gate)
    for got, name in zip(two[3:], names[3:]):
        assert oracle.rel_err(got, ref[name], axis=None) < DECAY_GRAD_TOLERANCE["bfloat16"], name


@hopper
@pytest.mark.parametrize("pieces, with_start, gated, K", [(1, False, False, 128), (4, True, False, 128),
                                                          (4, False, True, 128), (2, True, False, 64)])
def test_two_warpgroups_give_the_op_bitwise_what_one_gives(pieces, with_start, gated, K):
    """MosaicWalkConfig.warpgroups and backward_warpgroups = 2: the op's output and its q, k, v gradients
    (the decay fixed: the backward's plain walks) bitwise those of one warpgroup a program."""
    B, T, H, V = 2, 1024, 2, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=5)[2]
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    log_gate = 0.05 * _log_gate(B, T, H) if gated else None
    start = (jnp.asarray(np.random.default_rng(2).standard_normal((B, H, K, V)), jnp.float32)
             if with_start else None)

    def run(walks):
        config = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=walks, num_sequence_pieces=pieces,
                                     backward_num_sequence_pieces=pieces)
        f = lambda q, k, v: fleetjax.fleet_attention(q, k, v, decay, log_gate=log_gate,  # noqa: E731
                                                     implementation="pallas", config=config, initial_state=start)
        o, pullback = jax.vjp(jax.jit(f), q, k, v)
        return (o, *jax.jit(pullback)(do))

    one = run(mosaic.MosaicWalkConfig())
    two = run(mosaic.MosaicWalkConfig(warpgroups=2, backward_warpgroups=2))
    for a, b, name in zip(one, two, ("o", "dq", "dk", "dv")):
        assert jnp.array_equal(a, b), name
    # Two warpgroups of 32 value columns each (MosaicWalkConfig.forward_block_v) in the forward.
    narrow = run(mosaic.MosaicWalkConfig(warpgroups=2, forward_block_v=32))
    for a, b, name in zip(one, narrow, ("o", "dq", "dk", "dv")):
        assert jnp.array_equal(a, b), name
    ref = oracle.forward(q, k, v, decay, initial_state=start, log_gate=log_gate)[0]
    assert oracle.rel_err(two[0], ref, axis=2) < TOLERANCE["bfloat16"]


def test_the_default_takes_two_warpgroups_where_the_sequence_is_split(monkeypatch):
    """On an sm_90 GPU (its count of SMs and shared memory stood in): two warpgroups and twice the forward's
    pieces where the forward already splits the sequence (B1 H8 T=32768); where one-warpgroup programs fill
    the SMs but two-warpgroup ones would not (B4 H16), two warpgroups in pieces of the Mosaic walk's own
    (MosaicWalkConfig.forward_pieces), the Triton forward's staying whole; one where even those fill them
    (B8 H16); the backward's walks one in all. Short sequences: two of 32 value columns in one piece, up to a
    length that is the card's own (2048 on an H200, 32768 on an H100)."""
    monkeypatch.setattr(mosaic, "on_hopper", lambda: True)
    monkeypatch.setattr(chunked, "device_kind", lambda: "NVIDIA H200")
    monkeypatch.setattr(chunked, "multiprocessor_count", lambda: 132)
    monkeypatch.setattr(chunked, "shared_memory_per_block", lambda: 227 * 1024)
    split = chunked.default_config(jnp.zeros((1, 32768, 8, 128), jnp.bfloat16), jnp.zeros((1, 32768, 8, 128)))
    assert (split.mosaic_walks.warpgroups, split.mosaic_walks.backward_warpgroups) == (2, 1)
    assert split.num_sequence_pieces == 16 and split.backward_num_sequence_pieces == 8
    assert split.mosaic_walks.forward_pieces is None
    own = chunked.default_config(jnp.zeros((4, 16384, 16, 128), jnp.bfloat16), jnp.zeros((4, 16384, 16, 128)))
    assert (own.mosaic_walks.warpgroups, own.mosaic_walks.backward_warpgroups) == (2, 1)
    assert own.mosaic_walks.forward_pieces == 2 and own.num_sequence_pieces == 1
    assert own.mosaic_walks.shared_memory_bytes(128, 2) <= 227 * 1024
    assert own.mosaic_walks.forward_block_v is None
    # Shorter (B4 H16 T=2048): two warpgroups of 32 value columns in one piece fill the SMs, no pieces' states.
    narrow_shapes = (jnp.zeros((4, 2048, 16, 128), jnp.bfloat16), jnp.zeros((4, 2048, 16, 128)))
    narrow = chunked.default_config(*narrow_shapes)
    assert (narrow.mosaic_walks.warpgroups, narrow.mosaic_walks.forward_pieces) == (2, 1)
    assert (narrow.mosaic_walks.forward_block_v, narrow.mosaic_walks.block_v) == (32, 64)
    assert narrow.num_sequence_pieces == 1
    assert narrow.mosaic_walks.shared_memory_bytes(128, 2) < own.mosaic_walks.shared_memory_bytes(128, 2)
    # Up to which length is the card's own: T=32768 on an H100, 2048 on an H200 (timed on each).
    at_8192 = (jnp.zeros((4, 8192, 16, 128), jnp.bfloat16), jnp.zeros((4, 8192, 16, 128)))
    on_h200 = chunked.default_config(*at_8192).mosaic_walks
    assert (on_h200.forward_block_v, on_h200.forward_pieces) == (None, 2)
    monkeypatch.setattr(chunked, "device_kind", lambda: "NVIDIA H100 80GB HBM3")
    for T, layout in ((8192, (32, 1)), (32768, (32, 1)), (65536, (None, 2))):
        shapes = (jnp.zeros((4, T, 16, 128), jnp.bfloat16), jnp.zeros((4, T, 16, 128)))
        on_h100 = chunked.default_config(*shapes).mosaic_walks
        assert (on_h100.forward_block_v, on_h100.forward_pieces) == layout, T
    assert chunked.default_config(*narrow_shapes).mosaic_walks.forward_block_v == 32
    whole = chunked.default_config(jnp.zeros((8, 16384, 16, 128), jnp.bfloat16), jnp.zeros((8, 16384, 16, 128)))
    assert (whole.mosaic_walks.warpgroups, whole.mosaic_walks.forward_pieces) == (1, None)
    assert whole.num_sequence_pieces == 1
    # 65 chunks: no two equal pieces, so one warpgroup in one piece as before
    odd = chunked.default_config(jnp.zeros((4, 4160, 16, 128), jnp.bfloat16), jnp.zeros((4, 4160, 16, 128)))
    assert (odd.mosaic_walks.warpgroups, odd.mosaic_walks.forward_pieces, odd.num_sequence_pieces) == (1, None, 1)
    assert whole.mosaic_walks.shared_memory_bytes(128, 2) <= 227 * 1024
    assert split.mosaic_walks.shared_memory_bytes(128, 2) <= 227 * 1024


@pytest.mark.parametrize("T, states", [(1024, 1), (1088, 0)])
def test_the_forward_takes_its_own_pieces_where_they_are_equal(T, states):
    """Lowered for an sm_90 GPU (any host): MosaicWalkConfig.forward_pieces splits the Mosaic forward (its
    pieces' states from the states-only walk) where the pieces are equal whole chunks (T=1024: 2 of 8); where
    they are not (T=1088, 17 chunks) the walk takes the PallasConfig's pieces (one), still on Mosaic."""
    q = jnp.zeros((1, T, 2, 64), jnp.bfloat16)
    walks = mosaic.MosaicWalkConfig(warpgroups=2, forward_pieces=2)
    config = dataclasses.replace(chunked.default_config(q, q), num_sequence_pieces=1, mosaic_walks=walks)
    f = lambda q, k, v: fleetjax.fleet_attention(q, k, v, jnp.asarray([0.9, 0.99]),  # noqa: E731
                                                 implementation="pallas", config=config)
    text = jax.jit(f).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert _walks(text) == 1
    assert text.count(f"{mosaic.STATES_KERNEL}_mosaic_gpu") == states


@hopper
def test_the_backward_runs_on_mosaic_by_default():
    q, k, v = _inputs(1, 1024, 2, 128, 128, "bfloat16")
    decay = jnp.asarray([0.9, 0.99], jnp.float32)
    loss = lambda q, k, v: jnp.sum(fleetjax.fleet_attention(q, k, v, decay, implementation="pallas")
                                   .astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert _walks(text) == 3  # the dq, dv and dk walks (the forward's o is unused)
    # With the decay learned, its sums too (MosaicWalkConfig.decay_sums); with d initial_state, Triton's.
    learned = lambda q, k, v, decay: jnp.sum(fleetjax.fleet_attention(q, k, v, decay, implementation="pallas")
                                             .astype(jnp.float32))
    text = jax.jit(jax.grad(learned, argnums=(0, 1, 2, 3))).lower(q, k, v, decay).as_text()
    assert _walks(text) == 3
    start = jnp.zeros((1, 2, 128, 128), jnp.float32)
    from_start = lambda q, k, v, start: jnp.sum(fleetjax.fleet_attention(  # noqa: E731
        q, k, v, decay, initial_state=start, implementation="pallas").astype(jnp.float32))
    text = jax.jit(jax.grad(from_start, argnums=(0, 1, 2, 3))).lower(q, k, v, start).as_text()
    assert text.count("custom_call @mosaic_gpu") == 0


@hopper
@pytest.mark.parametrize("where", ["q", "k", "v", "do"])
def test_fixed_decay_backward_keeps_a_nonfinite_value_where_it_belongs(where):
    q, k, v = _inputs(1, 512, 2, 128, 128, "bfloat16")
    x = dict(q=q, k=k, v=v, do=_inputs(1, 512, 2, 128, 128, "bfloat16", seed=7)[2])
    x[where] = x[where].at[0, 200, 1, 3].set(jnp.inf)
    decay = jnp.asarray([0.9, 0.99], jnp.float32)
    args = (x["q"], x["k"], x["v"], x["do"], decay)
    got = _fixed_decay_grads(*args, mosaic_walks=mosaic.MosaicWalkConfig(), pieces=1)
    triton = _fixed_decay_grads(*args, mosaic_walks=None, pieces=1)
    for g, t in zip(got, triton):
        np.testing.assert_array_equal(np.isfinite(np.asarray(g, np.float32)),
                                      np.isfinite(np.asarray(t, np.float32)))
        assert np.isfinite(np.asarray(g[:, :, 0], np.float32)).all()



# ------------------------------------------------------------------------------ Mosaic GPU's CPU interpreter

def _decays(values):
    from fleetjax.decay import Decays
    return Decays(jnp.log(jnp.asarray(values, jnp.float32)), None)


def _widened_roundings(fn, x) -> int:
    """How many float32 -> 16-bit -> float32 pairs of converts ``fn``'s program holds back to back (XLA's
    GPU compiler removes such a pair where excess precision is allowed)."""
    narrowed = set()
    pairs = 0
    for eqn in jax.make_jaxpr(fn)(x).eqns:
        if eqn.primitive.name != "convert_element_type":
            continue
        if jnp.dtype(eqn.params["new_dtype"]).itemsize == 2:
            narrowed.add(eqn.outvars[0])
        elif eqn.invars[0] in narrowed:
            pairs += 1
    return pairs


@on_cpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("parts", [2, 3])
def test_the_interpreters_splits_keep_their_roundings(dtype, parts):
    """The hi/lo splits of the interpreted walks (chunk.split with barrier=True): the same terms bitwise as
    the compiled kernels' form, and no float32 -> 16-bit -> float32 round trip left back to back for XLA's GPU
    compiler to remove (which would zero every term but the first: the interpreter tests then failed their
    decay-gradient tolerances on the H200 host, 1.3e-3 against 2e-4)."""
    from fleetjax.chunk import split

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(4096) * 10.0 ** rng.uniform(-8, 4, 4096), jnp.float32)
    plain = jax.jit(lambda x: split(x, jnp.dtype(dtype), parts))(x)
    kept = jax.jit(lambda x: split(x, jnp.dtype(dtype), parts, barrier=True))(x)
    for a, b in zip(plain, kept):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    assert float(jnp.max(jnp.abs(plain[1].astype(jnp.float32)))) > 0
    assert _widened_roundings(lambda x: split(x, jnp.dtype(dtype), parts), x) == parts - 1  # not the last term
    assert _widened_roundings(lambda x: split(x, jnp.dtype(dtype), parts, barrier=True), x) == 0


@pytest.mark.parametrize("parts", [2, 3])
def test_the_split_by_bits_rounds_as_the_conversion_does(parts):
    """split(by_bits=True), the bf16 walks' hi/lo pairs (MosaicWalkConfig.split_by_bits): the first term is
    the conversion's rounding to nearest except at ties (away from zero, not to even), the terms sum to x
    within 2^-16 (two) or exactly (three), as the conversion's split; zeros and infinities pass through the
    first term and a NaN reaches the terms' sum; only bfloat16 and two terms or more are taken."""
    from fleetjax.chunk import split

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(1 << 16) * 10.0 ** rng.uniform(-6, 6, 1 << 16), jnp.float32)
    ties = jnp.asarray([1 + 2.0 ** -8, -(1 + 2.0 ** -8), 3 * 2.0 ** -9 + 2.0 ** -16], jnp.float32)  # half-way
    x = jnp.concatenate([x, ties])
    # As XLA ops the rest's conversions take the barrier (chunk.split's ``barrier``): without it XLA's GPU
    # compiler drops their roundings, and three terms then held x to 7.6e-6 on an H100 (2026-12-05).
    terms = jax.jit(lambda x: split(x, jnp.bfloat16, parts, barrier=True, by_bits=True))(x)
    head, converted = (np.asarray(t.astype(jnp.float32)) for t in (terms[0], x.astype(jnp.bfloat16)))
    tie = (np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint32)) & 0xFFFF) == 0x8000
    assert tie[-3:].all() and tie.sum() < 10
    np.testing.assert_array_equal(head[~tie], converted[~tie])
    assert np.all(np.abs(head[tie]) > np.abs(np.asarray(x)[tie]))  # ties away from zero
    held = sum(np.asarray(t.astype(jnp.float32), np.float64) for t in terms)
    error = np.abs(held - np.asarray(x, np.float64)) / np.abs(np.asarray(x, np.float64))
    assert np.max(error) <= (2.0 ** -16 if parts == 2 else 0.0)
    assert np.all(error[-3:] == 0)  # a tie's rest is exact in one more term
    special = jnp.asarray([0.0, -0.0, np.inf, -np.inf, np.nan], jnp.float32)
    parts_of_special = split(special, jnp.bfloat16, parts, by_bits=True)
    np.testing.assert_array_equal(np.asarray(parts_of_special[0][:4].astype(jnp.float32)), np.asarray(special[:4]))
    assert np.isnan(float(sum(t[4].astype(jnp.float32) for t in parts_of_special)))
    with pytest.raises(ValueError, match="bfloat16"):
        split(x, jnp.float16, parts, by_bits=True)
    with pytest.raises(ValueError, match="two terms or more"):
        split(x, jnp.bfloat16, 1, by_bits=True)


@interpreted
@pytest.mark.parametrize("dtype, with_start", [("bfloat16", True), ("float16", False)])
def test_the_walk_in_the_interpreter_matches_the_oracle(dtype, with_start):
    B, T, H, K, V = 1, 128, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, dtype)
    decay = (0.9, 1.0)
    start = (jnp.asarray(np.random.default_rng(1).standard_normal((B, H, K, V)), jnp.float32)
             if with_start else None)
    o, finals = mosaic.walk(q, k, v, _decays(decay).log_decay, None if start is None else start[:, :, None],
                            Chunking(T, 64, 1), reverse=False, scale=0.2, config=mosaic.MosaicWalkConfig(),
                            interpret=InterpretGPUParams())
    ref, final = oracle.forward(q, k, v, jnp.asarray(decay), scale=0.2, initial_state=start)
    assert oracle.rel_err(o, ref, axis=2) < TOLERANCE[dtype]
    assert oracle.rel_err(finals[:, :, 0], final, axis=1) < TOLERANCE[dtype]


@interpreted
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_the_lazy_carry_renormalizes_where_the_decay_is_small(lazy):
    """MosaicWalkConfig.lazy_carry (S = g T, T multiplied by g only when g < 2^-32) over 16 chunks: at decay
    0.9 T takes g every 4th chunk, at 0.5 and 1e-3 every chunk, at 0.999 and 1 never; the forward walk and
    the backward's (the decay learned: the dq walk's derivative takes the same g) against the oracle, with
    an entering state, as the carry multiplied every chunk does."""
    B, T, H, K, V = 1, 1024, 4, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=4)[2]
    decay = (0.9, 0.5, 1e-3, 0.999)
    start = jnp.asarray(np.random.default_rng(1).standard_normal((B, H, K, V)), jnp.float32)
    walks = mosaic.MosaicWalkConfig(lazy_carry=lazy)
    o, finals = mosaic.walk(q, k, v, _decays(decay).log_decay, start[:, :, None], Chunking(T, 64, 1),
                            reverse=False, scale=0.2, config=walks, interpret=InterpretGPUParams())
    ref, final = oracle.forward(q, k, v, jnp.asarray(decay), scale=0.2, initial_state=start)
    assert oracle.rel_err(o, ref, axis=2) < TOLERANCE["bfloat16"]
    assert oracle.rel_err(finals[:, :, 0], final, axis=1) < TOLERANCE["bfloat16"]
    dq, dk, dv, d_log_decay, witness = _interpreted_backward(q, k, v, do, decay, start, Chunking(T, 64, 1),
                                                             learned=True, scale=0.2, walks=walks)
    grads = oracle.gradients(q, k, v, jnp.asarray(decay), do=do, scale=0.2, initial_state=start)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        assert oracle.rel_err(got, grads[name], axis=2) < TOLERANCE["bfloat16"], name
    assert oracle.rel_err(d_log_decay, grads["log_decay"]) < DECAY_GRAD_TOLERANCE["bfloat16"]
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in witness)


@interpreted
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_two_warpgroups_walk_as_one_does_in_the_interpreter(reverse):
    """MosaicWalkConfig.warpgroups=2 (each warpgroup its own value block, a third copying the shared tiles):
    out and the pieces' final states bitwise those of one warpgroup a program, from random entering states in
    two pieces, forward and in reverse (the backward's dv and dk walks); the forward also against the float64
    oracle; the two warpgroups' walk with the interpreter's race detector on. (The gated decay's, and many
    chunks: tests/test_mosaic_warpgroups.py, with four fake CPU devices.)"""
    B, T, H, K, V = 1, 128, 2, 64, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=0.5)
    decay = (0.9, 1.0)
    entering = jnp.asarray(np.random.default_rng(1).standard_normal((B, H, 2, K, V)), jnp.float32)
    args, races = (q, k, v, _decays(decay).log_decay, entering, Chunking(T, 64, 2)), []
    got = [mosaic.walk(*args, reverse=reverse, scale=0.2, config=mosaic.MosaicWalkConfig(),
                       interpret=InterpretGPUParams()),
           checked(races, mosaic.walk, *args, reverse=reverse, scale=0.2, config=mosaic.MosaicWalkConfig(warpgroups=2))]
    assert jnp.array_equal(got[0][0], got[1][0]) and jnp.array_equal(got[0][1], got[1][1])
    assert raced(races) is not True, "the interpreter's race detector found a data race"
    if not reverse:
        ref, final = oracle.forward(q[:, :64], k[:, :64], v[:, :64], jnp.asarray(decay), scale=0.2,
                                    initial_state=entering[:, :, 0])
        assert oracle.rel_err(got[1][0][:, :64], ref, axis=2) < TOLERANCE["bfloat16"]
        assert oracle.rel_err(got[1][1][:, :, 0], final, axis=1) < TOLERANCE["bfloat16"]


def _log_gate(B, T, H, seed=5):
    """A per-token log gate in [-2, 0) with a hard forget (-40) at position 70 of head 0."""
    gate = -2.0 * np.random.default_rng(seed).random((B, T, H))
    gate[:, 70, 0] = -40.0
    return jnp.asarray(gate, jnp.float32)


@interpreted
@pytest.mark.parametrize("pieces", [1, 2])
def test_the_gated_walk_in_the_interpreter_matches_the_oracle(pieces):
    from fleetjax.decay import Decays
    from fleetjax.pallas import forward as fwd
    B, T, H, K, V = 1, 256, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    decays = Decays(jnp.log(decay), 0.05 * _log_gate(B, T, H))
    chunking = Chunking(T, 64, pieces)
    start = jnp.asarray(np.random.default_rng(1).standard_normal((B, H, K, V)), jnp.float32)
    local = None
    if pieces > 1:  # the Triton piece-state walks, in Pallas interpret mode
        local = fwd.piece_states(k, v, decays.log_decay, None, chunking, reverse=False, all_pieces=False,
                                 chunk_size=64, block_v=32, num_warps=4, num_stages=1, precision=None,
                                 contain=False, gate=decays.gate_tiles())
    entering = mosaic.entering_states(start, local, decays, chunking, B)
    o, finals = mosaic.walk(q, k, v, decays.log_decay, entering, chunking, reverse=False, scale=0.2,
                            config=mosaic.MosaicWalkConfig(), within=decays.within_chunks(B, T, 64, base2=True),
                            interpret=InterpretGPUParams())
    ref, final = oracle.forward(q, k, v, decay, scale=0.2, initial_state=start, log_gate=decays.log_gate)
    assert oracle.rel_err(o, ref, axis=2) < TOLERANCE["bfloat16"]
    assert oracle.rel_err(finals[:, :, -1], final, axis=1) < TOLERANCE["bfloat16"]


@interpreted
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("pieces", [2, 3])
def test_the_first_piece_enters_from_zero_without_a_stored_state(reverse, pieces):
    """entering_states(zero_first=True) with no start: the states entering the pieces after the first in the
    walk's order alone (with two pieces the first one's local state, no XLA op between the two walks); the
    walk then enters the first piece from zero: bitwise the walk from the full [B, H, P] states."""
    from fleetjax.decay import Decays
    B, T, H, K, V = 1, 64 * pieces, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", seed=3)
    decays = Decays(jnp.log(jnp.asarray([0.97, 1.0], jnp.float32)), 0.05 * _log_gate(B, T, H))
    chunking, config = Chunking(T, 64, pieces), mosaic.MosaicWalkConfig()
    within = decays.within_chunks(B, T, 64, base2=True)
    local = mosaic.piece_states(k, v, decays.log_decay, chunking, reverse=reverse, config=config, within=within,
                                interpret=InterpretGPUParams())
    full = mosaic.entering_states(None, local, decays, chunking, B, reverse=reverse)
    short = mosaic.entering_states(None, local, decays, chunking, B, reverse=reverse, zero_first=True)
    assert short.shape == (B, H, pieces - 1, K, V)
    assert jnp.array_equal(short, full[:, :, :-1] if reverse else full[:, :, 1:])
    if pieces == 2:
        assert jnp.array_equal(short, local)
    (o_full, finals_full), (o_short, finals_short) = (
        mosaic.walk(q, k, v, decays.log_decay, entering, chunking, reverse=reverse, scale=0.2, config=config,
                    within=within, interpret=InterpretGPUParams()) for entering in (full, short))
    assert jnp.array_equal(o_short, o_full) and jnp.array_equal(finals_short, finals_full)


@interpreted
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("gated", [False, True], ids=["constant", "gated"])
def test_the_states_only_walk_gives_the_walks_piece_states(reverse, gated):
    """mosaic.piece_states: bitwise the states after each piece that the full walk (from zero states) leaves,
    for the pieces with a successor (forward: all but the last; reverse: all but the first), and the Triton
    piece-state walk's within the tolerance."""
    from fleetjax.decay import Decays
    from fleetjax.pallas import forward as fwd
    B, T, H, K, V = 1, 192, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    decays = Decays(jnp.log(jnp.asarray([0.97, 1.0], jnp.float32)), 0.05 * _log_gate(B, T, H) if gated else None)
    chunking = Chunking(T, 64, 3)
    within = decays.within_chunks(B, T, 64, base2=True) if gated else None
    states = mosaic.piece_states(k, v, decays.log_decay, chunking, reverse=reverse, config=mosaic.MosaicWalkConfig(),
                                 within=within, interpret=InterpretGPUParams())
    _, finals = mosaic.walk(q, k, v, decays.log_decay, None, chunking, reverse=reverse, scale=0.2,
                            config=mosaic.MosaicWalkConfig(), within=within, interpret=InterpretGPUParams())
    assert states.shape == (B, H, 2, K, V)
    assert jnp.array_equal(states, finals[:, :, 1:] if reverse else finals[:, :, :-1])
    triton = fwd.piece_states(k, v, decays.log_decay, None, chunking, reverse=reverse, all_pieces=False,
                              chunk_size=64, block_v=32, num_warps=4, num_stages=1, precision=None, contain=False,
                              exact=False, gate=decays.gate_tiles())
    assert oracle.rel_err(states, triton, axis=None) < TOLERANCE["bfloat16"]
    narrow = mosaic.piece_states(k, v, decays.log_decay, chunking, reverse=reverse, within=within,
                                 config=mosaic.MosaicWalkConfig(states_block_v=32), interpret=InterpretGPUParams())
    # MosaicWalkConfig.states_block_v: 8e-8 apart in the interpreter (jax 0.10.2), whose dot sums by block
    assert oracle.rel_err(narrow, states, axis=None) < 1e-6


@interpreted
@pytest.mark.parametrize("gated", [False, True], ids=["constant", "gated"])
def test_the_exact_states_walk_gives_the_dq_sums_walks_piece_states(gated):
    """mosaic.piece_states(exact=True, tangent=True), the dq walk's pieces under
    MosaicWalkConfig.backward_piece_states: the states bitwise those the dq sums walk leaves after each piece
    from zero, and with their derivatives in log gamma the Triton piece-state walk's (exact, tangent) within
    float32's rounding of the hi/lo products."""
    from fleetjax.decay import Decays
    from fleetjax.pallas import forward as fwd
    B, T, H, K, V = 1, 192, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    decays = Decays(jnp.log(jnp.asarray([0.97, 1.0], jnp.float32)), 0.05 * _log_gate(B, T, H) if gated else None)
    chunking = Chunking(T, 64, 3)
    within = decays.within_chunks(B, T, 64, base2=True) if gated else None
    walks = mosaic.MosaicWalkConfig()
    states, tangents = mosaic.piece_states(k, v, decays.log_decay, chunking, reverse=False, config=walks,
                                           within=within, exact=True, tangent=True, interpret=InterpretGPUParams())
    assert states.shape == tangents.shape == (B, H, 2, K, V)
    _, finals, _ = mosaic.sums_walk(q, k, v, decays.log_decay, None, chunking, reverse=False, scale=0.2, config=walks,
                                    rows=v, tangent=True, within=within, interpret=InterpretGPUParams())
    assert jnp.array_equal(states, finals[:, :, :-1])
    triton_states, triton_tangents = fwd.piece_states(
        k, v, decays.log_decay, None, chunking, reverse=False, all_pieces=False, chunk_size=64, block_v=32,
        num_warps=4, num_stages=1, precision=None, contain=False, exact=True, tangent=True,
        gate=decays.gate_tiles())
    # 2.0e-6 and 9.3e-7 constant, 3.8e-6 and 4.4e-6 gated (jax 0.10.2, CPU, 2026-12-05)
    assert oracle.rel_err(states, triton_states, axis=None) < 2e-5
    assert oracle.rel_err(tangents, triton_tangents, axis=None) < 2e-5
    with pytest.raises(ValueError, match="tangent= needs exact="):
        mosaic.piece_states(k, v, decays.log_decay, chunking, reverse=True, config=walks, exact=True, tangent=True,
                            interpret=InterpretGPUParams())


def _interpreted_backward(q, k, v, do, decay, start, chunking, *, learned: bool, scale: float, log_gate=None,
                          walks: mosaic.MosaicWalkConfig = mosaic.MosaicWalkConfig(gate_dk_warpgroups=1,
                                                                                   gate_dq_warpgroups=1)):
    """dq, dk, dv, d log_decay (learned, no gate) or d log_gate (a gate), the witness: the Mosaic backward
    walks in the interpreter, the pieces' local states from the Triton walks in Pallas interpret mode. The
    gate's walks on one warpgroup: with the suite's one CPU device the interpreter's two-warpgroup walks
    stall over several chunks (tests/test_mosaic_warpgroups.py checks them against one with four)."""
    from fleetjax import vjp
    from fleetjax.decay import Decays
    from fleetjax.pallas import forward as fwd
    decays = Decays(jnp.log(jnp.asarray(decay, jnp.float32)), log_gate)
    counted = learned and log_gate is None
    dq_local = reverse_local = None
    if chunking.pieces > 1:
        common = dict(chunk_size=64, block_v=32, num_warps=4, num_stages=1, precision=None, contain=False,
                      gate=decays.gate_tiles())
        dq_local = fwd.piece_states(v, k, decays.log_decay, None, chunking, reverse=False, all_pieces=False,
                                    tangent=counted, **common)
        dq_local = dq_local if counted else (dq_local, None)  # (states, their derivatives in log gamma)
        reverse_local = fwd.piece_states(q, do, decays.log_decay, None, chunking, reverse=True, all_pieces=False,
                                         **common)
    dq, dk, dv, parts, witness = mosaic.backward_walks(
        q, k, v, do, decays, start, chunking, dq_local, reverse_local, scale=scale,
        config=walks, log_decay_wanted=counted, log_gate_wanted=learned and not counted,
        interpret=InterpretGPUParams())
    if not learned:
        assert parts is None
        return dq, dk, dv, None, witness
    if counted:
        assert "u" not in parts  # the dk walk runs plain: the decay's gradient comes from the dq walk alone
        assert "w" not in parts  # only the summand of d log decay (vjp.log_decay_summand) per position
        d = jnp.sum(parts["decay"], axis=(0, 2))
    else:
        d = jnp.swapaxes(vjp.log_gate_grad(parts["w"], parts["u"], parts["spanned"], None, chunking.chunk_size), 1, 2)
    return dq, dk, dv, d, witness


@interpreted
@pytest.mark.parametrize("learned, pieces, K, V", [(True, 1, 64, 128), (False, 2, 128, 64), (True, 4, 64, 64)])
def test_the_backward_walks_in_the_interpreter_match_the_oracle(learned, pieces, K, V):
    B, T, H = 1, 256, 2
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=4)[2]
    decay = (0.97, 1.0)
    start = jnp.asarray(np.random.default_rng(2).standard_normal((B, H, K, V)), jnp.float32)
    dq, dk, dv, d_log_decay, witness = _interpreted_backward(q, k, v, do, decay, start, Chunking(T, 64, pieces),
                                                             learned=learned, scale=0.1)
    ref = oracle.gradients(q, k, v, jnp.asarray(decay), do=do, scale=0.1, initial_state=start)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        assert oracle.rel_err(got, ref[name], axis=2) < TOLERANCE["bfloat16"], name
    if learned:  # every term but the initial state's carry into the final state (no final state here)
        assert oracle.rel_err(d_log_decay, ref["log_decay"]) < DECAY_GRAD_TOLERANCE["bfloat16"]
    else:
        assert d_log_decay is None
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in witness)


@interpreted
@pytest.mark.parametrize("pieces, dtype", [(1, "bfloat16"), (2, "bfloat16"), (1, "float16")])
def test_the_gated_backward_walks_in_the_interpreter_match_the_oracle(pieces, dtype):
    """float16 too: its spanned sums still take bfloat16 parts (a second register operand's dtype)."""
    B, T, H, K, V = 1, 256, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, dtype)
    do = _inputs(B, T, H, K, V, dtype, seed=4)[2]
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    log_gate = 0.05 * _log_gate(B, T, H)
    start = jnp.asarray(np.random.default_rng(2).standard_normal((B, H, K, V)), jnp.float32)
    dq, dk, dv, d_gate, witness = _interpreted_backward(q, k, v, do, decay, start, Chunking(T, 64, pieces),
                                                        learned=True, scale=0.1, log_gate=log_gate)
    ref = oracle.gradients(q, k, v, decay, do=do, scale=0.1, initial_state=start, log_gate=log_gate)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        assert oracle.rel_err(got, ref[name], axis=2) < TOLERANCE[dtype], name
    # every term but the initial state's carry into the final state (no final state here)
    assert oracle.rel_err(d_gate, ref["log_gate"]) < DECAY_GRAD_TOLERANCE[dtype]
    assert all(bool(jnp.all(jnp.isfinite(w))) for w in witness)


@interpreted
@pytest.mark.parametrize("learned, pieces, backward_states, launch", [
    ("decay", 2, False, False), ("decay", 2, True, False), ("decay", 4, True, False), ("gate", 1, False, False),
    ("gate", 2, False, False), ("gate", 2, True, False), ("both", 2, False, False), ("both", 2, True, False),
    ("gate", 1, False, True), ("gate", 2, True, True)])
def test_the_op_through_the_interpreted_walks_matches_the_oracle(monkeypatch, learned, pieces, backward_states,
                                                                 launch):
    """The Pallas op's forward and backward with every walk it can give Mosaic on Mosaic (in its interpreter):
    the glue of fleetjax.pallas.chunked (the pieces' states and tangents, the gradients' sums) end to end;
    ``backward_states``: the backward's pieces' states from Mosaic's states walk too (the dq walk's exact, with
    the tangent where the decay is learned; MosaicWalkConfig.backward_piece_states); four pieces pass their
    states and tangents through three steps. ``launch``: d log_gate from the walks' per-block parts in one
    launch (PallasConfig.gate_grad_kernel)."""
    from fleetjax.pallas.mosaic import backward as mosaic_backward
    calls = []

    def interpreted(kernel):
        def run(*args, interpret=None, **kwargs):
            calls.append(kwargs.get("reverse"))
            return kernel(*args, interpret=InterpretGPUParams(), **kwargs)
        return run

    # Every walk kernel, where fleetjax.pallas.chunked and the backward's walks call it.
    for module, name in ((mosaic, "walk"), (mosaic, "piece_states"), (mosaic_backward, "walk"),
                         (mosaic_backward, "sums_walk")):
        monkeypatch.setattr(module, name, interpreted(getattr(module, name)))
    B, T, H, K, V = 1, 256, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=4)[2]
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    log_gate = 0.05 * _log_gate(B, T, H) if learned != "decay" else None
    # The forward in pieces of the Mosaic walk's own (their states from its states-only form), the backward
    # in the PallasConfig's (their states from the Triton piece-state walks, or with ``backward_states`` from
    # the Mosaic states walk).
    walks = mosaic.MosaicWalkConfig(gated_decay_sums=learned == "both", forward_pieces=pieces,
                                    backward_piece_states=backward_states, gate_dk_warpgroups=1,
                                    gate_dq_warpgroups=1)
    config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=1,
                                 backward_num_sequence_pieces=pieces, mosaic_walks=walks, gate_grad_kernel=launch)
    assert config.chunking(T, True).chunk_size == walks.chunk_size
    if learned == "gate":  # the gate alone, as GLA's: its gradient, not the per-head decay's
        f = lambda q, k, v, g: fleetjax.fleet_attention(q, k, v, None, log_gate=g, implementation="pallas",  # noqa: E731
                                                        config=config)
        o, pullback = jax.vjp(f, q, k, v, log_gate)
        ref_decay, names = jnp.ones((H,), jnp.float32), ("q", "k", "v", "log_gate")
    elif learned == "both":  # the gate on top of a learned per-head decay, as fleetjax's gated layers
        f = lambda q, k, v, decay, g: fleetjax.fleet_attention(  # noqa: E731
            q, k, v, decay, log_gate=g, implementation="pallas", config=config)
        o, pullback = jax.vjp(f, q, k, v, decay, log_gate)
        ref_decay, names = decay, ("q", "k", "v", "decay", "log_gate")
    else:
        f = lambda q, k, v, decay: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas",  # noqa: E731
                                                            config=config)
        o, pullback = jax.vjp(f, q, k, v, decay)
        ref_decay, names = decay, ("q", "k", "v", "decay")
    ref_o, _ = oracle.forward(q, k, v, ref_decay, log_gate=log_gate)
    ref = oracle.gradients(q, k, v, ref_decay, do=do, log_gate=log_gate)
    assert oracle.rel_err(o, ref_o, axis=2) < TOLERANCE["bfloat16"]
    grads = pullback(do)
    # The forward walk (after its states-only form, with pieces), then (with ``backward_states``) the dq and
    # the reverse walks' pieces' states, then the dq, dv and dk walks.
    assert calls == [False] * (pieces > 1) + [False] + [False, True] * backward_states + [False, True, True]
    for got, name in zip(grads, names):
        axis = 2 if name in ("q", "k", "v") else None
        tolerance = TOLERANCE["bfloat16"] if axis else DECAY_GRAD_TOLERANCE["bfloat16"]
        assert oracle.rel_err(got, ref[name], axis=axis) < tolerance, name
    assert ("name=fleet_gate_grad" in str(jax.make_jaxpr(pullback)(do))) == launch


@pytest.mark.parametrize("compiled", [pytest.param(False, marks=interpreted), pytest.param(True, marks=hopper)])
@pytest.mark.parametrize("where", ["q", "v"])
def test_the_contained_forward_skips_the_rows_whose_witness_is_finite(monkeypatch, where, compiled):
    """After the Mosaic forward walk the contained walk, chosen on the device, reads the walk's witness row by
    row (fleetjax.pallas.launch.call's per-row skip, not the reduction's flag): a NaN in one (batch, head) row
    gives that row the contained walk's o, the Triton op's, and leaves every other row the Mosaic walk's,
    bitwise. ``compiled``: on Hopper, where the skipped programs return at once; else the walk in its
    interpreter. A NaN value shows which walk ran: the plain walk's masked pairs take 0 * NaN before it."""
    if not compiled:
        walk = mosaic.walk
        monkeypatch.setattr(mosaic, "walk", lambda *args, interpret=None, **kwargs: walk(
            *args, interpret=InterpretGPUParams(), **kwargs))
    B, T, H, K, V = 2, 128, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    decay = jnp.asarray([0.97, 0.9], jnp.float32)
    x = dict(q=q, k=k, v=v)
    x[where] = x[where].at[1, 40, 0, 3].set(jnp.nan)
    config = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=mosaic.MosaicWalkConfig())
    f = lambda q, k, v, config: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas",  # noqa: E731
                                                         config=config)
    # The contained launch's skip, its last input but the kept o, is the walk's states [B, H, 1, K, V] float32.
    jaxpr = jax.make_jaxpr(f, static_argnums=3)(*x.values(), config).jaxpr
    [contained] = [eqn for eqn in _plain_eqns(jaxpr) if eqn.params.get("name") == "fleet_forward"]
    assert contained.invars[-2].aval.shape == (B, H, 1, K, V) and contained.invars[-2].aval.dtype == jnp.float32
    plain = np.asarray(f(q, k, v, config), np.float32)
    got = np.asarray(f(*x.values(), config), np.float32)
    triton = np.asarray(f(*x.values(), dataclasses.replace(config, mosaic_walks=None)), np.float32)
    others = np.ones((B, H), bool)
    others[1, 0] = False
    np.testing.assert_array_equal(got.transpose(0, 2, 1, 3)[others], plain.transpose(0, 2, 1, 3)[others])
    # The Triton op takes its contained walk too (the same launch, skipping no row): the row bitwise.
    np.testing.assert_array_equal(got[1, :, 0], triton[1, :, 0])
    assert np.isnan(got[1, 40:, 0]).any() and np.isfinite(got[1, :40]).all()


@interpreted
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("where", ["q", "k", "v", "do"])
def test_the_interpreted_backward_witness_catches_a_nonfinite_value(where, gated):
    """The first rows of the dq and dv walks' states (mosaic.witness_of) catch a NaN in any input, with the
    first entry of every key of theirs (v in the dq walk, q in the dv walk) 0; ``gated``: the gate learned,
    the dq walk then the sums walk."""
    B, T, H, K, V = 1, 128, 1, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=4)[2]
    x = dict(q=q.at[..., 0].set(0), k=k, v=v.at[..., 0].set(0), do=do)
    common = dict(learned=gated, scale=0.1, log_gate=_log_gate(B, T, H) if gated else None)
    *_, finite = _interpreted_backward(*x.values(), (1.0 if gated else 0.9,), None, Chunking(T, 64, 1), **common)
    assert all(w.shape == (B, H, 1, w.shape[-1]) and bool(jnp.all(jnp.isfinite(w))) for w in finite)
    x[where] = x[where].at[0, 70, 0, 3].set(jnp.nan)
    *_, witness = _interpreted_backward(*x.values(), (1.0 if gated else 0.9,), None, Chunking(T, 64, 1), **common)
    assert not all(bool(jnp.all(jnp.isfinite(w))) for w in witness)


@pytest.mark.parametrize("compiled", [pytest.param(False, marks=interpreted), pytest.param(True, marks=hopper)])
@pytest.mark.parametrize("where, position, gated", [
    (None, None, True), ("q", 10, True), ("q", 127, True), ("k", 70, True), ("v", 0, True), ("v", 127, True),
    ("gate", 100, True), ("entering", None, True), (None, None, False), ("q", 70, False), ("v", 30, False),
    ("entering", None, False)])
def test_the_forward_walks_first_state_rows_witness_every_nonfinite_input(where, position, gated, compiled):
    """A query reaches only its outputs, never the state: the 0 * out term carries it there, and with a key, a
    value, the gate or the entering state it reaches every row, so the first rows of the states after the
    pieces (mosaic.witness_of, the caller's witness) are finite exactly when every output is. Every key's first
    entry is 0, so a NaN reaches the first rows only as 0 * NaN; the gate holds a hard forget at 70, after the
    query at 10 (``gated``; else the constant decay 0.9). ``compiled``: the Hopper kernel, whose tensor cores
    must keep 0 * NaN a NaN too."""
    from fleetjax.decay import Decays
    B, T, H, K, V = 1, 128, 1, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    k = k.at[..., 0].set(0)
    log_gate = _log_gate(B, T, H) if gated else None
    entering = None
    if where in ("q", "k", "v"):
        x = dict(q=q, k=k, v=v)
        x[where] = x[where].at[0, position, 0, 5].set(jnp.inf if where == "q" else jnp.nan)
        q, k, v = x["q"], x["k"], x["v"]
    elif where == "gate":
        log_gate = log_gate.at[0, position, 0].set(jnp.nan)
    elif where == "entering":
        entering = jnp.zeros((B, H, 1, K, V), jnp.float32).at[0, 0, 0, 7, 9].set(jnp.inf)
    decays = Decays(jnp.log(jnp.full((H,), 1.0 if gated else 0.9, jnp.float32)), log_gate)
    o, finals = mosaic.walk(q, k, v, decays.log_decay, entering, Chunking(T, 64, 1), reverse=False, scale=0.2,
                            config=mosaic.MosaicWalkConfig(),
                            within=decays.within_chunks(B, T, 64, base2=True) if gated else None,
                            interpret=None if compiled else InterpretGPUParams())
    witness = mosaic.witness_of(finals)
    assert witness.shape == (B, H, 1, V)
    assert bool(jnp.all(jnp.isfinite(witness))) == (where is None) == bool(jnp.all(jnp.isfinite(o)))


@hopper
@pytest.mark.parametrize("pieces", [1, 4])
def test_the_gated_forward_walk_matches_the_oracle_and_the_triton_walk(pieces):
    B, T, H, K, V = 2, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    log_gate = 0.02 * _log_gate(B, T, H)
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    outs = {}
    for walks in (mosaic.MosaicWalkConfig(), None):
        config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=pieces, mosaic_walks=walks)
        f = jax.jit(lambda q, k, v, g, config=config: fleetjax.fleet_attention(
            q, k, v, decay, log_gate=g, implementation="pallas", config=config))
        outs[walks is not None] = f(q, k, v, log_gate)
        if walks is not None:
            assert _walks(f.lower(q, k, v, log_gate).as_text()) == 1
    ref, _ = oracle.forward(q, k, v, decay, log_gate=log_gate)
    assert oracle.rel_err(outs[True], ref, axis=2) < TOLERANCE["bfloat16"]
    assert oracle.rel_err(outs[True], outs[False], axis=2) < TOLERANCE["bfloat16"] / 2


@hopper
@pytest.mark.parametrize("pieces, with_decay", [(1, False), (4, False), (4, True)])
def test_the_gated_backward_walks_match_the_oracle_and_the_triton_walks(pieces, with_decay):
    """The gate alone, and (``with_decay``, MosaicWalkConfig.gated_decay_sums) on top of a learned per-head
    decay."""
    B, T, H, K, V = 2, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    log_gate = 0.02 * _log_gate(B, T, H)
    decay = jnp.asarray([0.97, 0.999], jnp.float32)
    grads = {}
    for walks in (mosaic.MosaicWalkConfig(gated_decay_sums=with_decay), None):
        config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=pieces,
                                     backward_num_sequence_pieces=pieces, mosaic_walks=walks)
        if with_decay:
            f = lambda q, k, v, d, g, config=config: fleetjax.fleet_attention(  # noqa: E731
                q, k, v, d, log_gate=g, implementation="pallas", config=config)
            _, pullback = jax.vjp(jax.jit(f), q, k, v, decay, log_gate)
        else:
            f = lambda q, k, v, g, config=config: fleetjax.fleet_attention(  # noqa: E731
                q, k, v, None, log_gate=g, implementation="pallas", config=config)
            _, pullback = jax.vjp(jax.jit(f), q, k, v, log_gate)
        if walks is not None:
            kernels = _kernel_names(jax.jit(pullback).lower(do).as_text())
            assert {"dv_walk", "dk_sums_walk"} <= kernels, kernels
        grads[walks is not None] = jax.jit(pullback)(do)
    ref = oracle.gradients(q, k, v, decay if with_decay else jnp.ones((H,), jnp.float32), do=do, log_gate=log_gate)
    names = ("q", "k", "v") + (("decay",) if with_decay else ()) + ("log_gate",)
    for got, triton, name in zip(grads[True], grads[False], names):
        tolerance = TOLERANCE["bfloat16"] if name in "qkv" else DECAY_GRAD_TOLERANCE["bfloat16"]
        axis = 2 if name in "qkv" else None
        assert oracle.rel_err(got, ref[name], axis=axis) < tolerance, name
        assert oracle.rel_err(got, triton, axis=axis) < tolerance, name


@hopper
@pytest.mark.parametrize("pieces", [1, 4])
def test_the_gate_sums_launch_and_the_zero_first_piece_match_the_oracle(pieces):
    """MosaicWalkConfig.gate_sums (the gate's sums from one Triton launch, read by the forward and the backward)
    and zero_first (the first piece entered from zero, the others' states alone): the forward and the
    gradients (the gate's too) against the float64 oracle and those without them (XLA's sums, the padded copy)."""
    B, T, H, K, V = 2, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    log_gate = 0.02 * _log_gate(B, T, H)
    results = {}
    for walks in (mosaic.MosaicWalkConfig(gate_sums=True, zero_first=True),
                  mosaic.MosaicWalkConfig(gate_sums=False, zero_first=False)):
        config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=pieces,
                                     backward_num_sequence_pieces=pieces, mosaic_walks=walks)
        f = lambda q, k, v, g, config=config: fleetjax.fleet_attention(  # noqa: E731
            q, k, v, None, log_gate=g, implementation="pallas", config=config)
        both = jax.jit(lambda q, k, v, g, do, f=f: (lambda o, pb: (o,) + pb(do))(*jax.vjp(f, q, k, v, g)))
        assert both.lower(q, k, v, log_gate, do).as_text().count('name = "gate_sums"') == int(walks.gate_sums)
        results[walks.gate_sums] = both(q, k, v, log_gate, do)
    ref_o, _ = oracle.forward(q, k, v, jnp.ones((H,), jnp.float32), log_gate=log_gate)
    ref = oracle.gradients(q, k, v, jnp.ones((H,), jnp.float32), do=do, log_gate=log_gate)
    for got, default, name in zip(results[True], results[False], ("o", "q", "k", "v", "log_gate")):
        tolerance = DECAY_GRAD_TOLERANCE["bfloat16"] if name == "log_gate" else TOLERANCE["bfloat16"]
        axis = None if name == "log_gate" else 2
        assert oracle.rel_err(got, ref_o if name == "o" else ref[name], axis=axis) < tolerance, name
        assert oracle.rel_err(got, default, axis=axis) < tolerance, name


@hopper
@pytest.mark.parametrize("pieces", [1, 4])
def test_the_gate_grad_launch_matches_the_default_on_the_mosaic_walks(pieces):
    """PallasConfig.gate_grad_kernel on Hopper (the Mosaic walks' per-block parts, their spanned pairs from row
    and column sums): dq, dk and dv bitwise the default's, d log_gate within float32 roundings of it and
    within the float64 oracle's tolerance, one fleet_gate_grad launch; with a NaN key the same NaNs."""
    B, T, H, K, V = 2, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    log_gate = 0.02 * _log_gate(B, T, H)
    results = {}
    for launch in (True, False):
        config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=pieces,
                                     backward_num_sequence_pieces=pieces, gate_grad_kernel=launch)
        f = lambda q, k, v, g, config=config: fleetjax.fleet_attention(  # noqa: E731
            q, k, v, None, log_gate=g, implementation="pallas", config=config)
        grads = jax.jit(lambda q, k, v, g, do, f=f: jax.vjp(f, q, k, v, g)[1](do))
        assert grads.lower(q, k, v, log_gate, do).as_text().count('name = "fleet_gate_grad"') == int(launch)
        results[launch] = grads(q, k, v, log_gate, do), grads(q, k.at[1, 300, 1, 7].set(jnp.nan), v, log_gate, do)
    ref = oracle.gradients(q, k, v, jnp.ones((H,), jnp.float32), do=do, log_gate=log_gate)
    for got, default, name in zip(results[True][0], results[False][0], ("q", "k", "v", "log_gate")):
        if name == "log_gate":
            assert oracle.rel_err(got, ref[name]) < DECAY_GRAD_TOLERANCE["bfloat16"]
            np.testing.assert_allclose(got, default, rtol=0, atol=1e-5 * float(jnp.abs(default).max()))
        else:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(default, np.float32), err_msg=name)
    for got, default in zip(*(results[launch][1] for launch in (True, False))):
        np.testing.assert_array_equal(np.isnan(np.asarray(got, np.float32)), np.isnan(np.asarray(default, np.float32)))


@hopper
def test_the_gated_forward_runs_on_the_mosaic_walk_by_default():
    B, T, H, K, V = 1, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    log_gate = 0.02 * _log_gate(B, T, H)
    decay = jnp.asarray([0.97, 1.0], jnp.float32)
    f = jax.jit(lambda q, k, v, g: fleetjax.fleet_attention(q, k, v, decay, log_gate=g, implementation="pallas"))
    assert _walks(f.lower(q, k, v, log_gate).as_text()) == 1
    ref, _ = oracle.forward(q, k, v, decay, log_gate=log_gate)
    assert oracle.rel_err(f(q, k, v, log_gate), ref, axis=2) < TOLERANCE["bfloat16"]


@hopper
@pytest.mark.parametrize("with_start, pieces", [(False, 1), (True, 1), (True, 4)])
def test_learned_decay_backward_on_mosaic_matches_the_oracle_and_the_triton_walks(with_start, pieces):
    B, T, H, K, V = 2, 1024, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    decay = jnp.asarray([0.97, 0.999], jnp.float32)
    start = (jnp.asarray(np.random.default_rng(3).standard_normal((B, H, K, V)), jnp.float32)
             if with_start else None)
    grads = {}
    for sums in (True, False):
        config = dataclasses.replace(chunked.default_config(q, v), backward_num_sequence_pieces=pieces,
                                     mosaic_walks=mosaic.MosaicWalkConfig(decay_sums=sums))
        f = lambda q, k, v, decay: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas",  # noqa: E731
                                                            config=config, initial_state=start)
        _, pullback = jax.vjp(jax.jit(f), q, k, v, decay)
        grads[sums] = jax.jit(pullback)(do)
    ref = oracle.gradients(q, k, v, decay, do=do, initial_state=start)
    for got, triton, name in zip(grads[True], grads[False], ("q", "k", "v", "decay")):
        tolerance = DECAY_GRAD_TOLERANCE["bfloat16"] if name == "decay" else TOLERANCE["bfloat16"]
        assert oracle.rel_err(got, ref[name], axis=None if name == "decay" else 2) < tolerance, name
        assert oracle.rel_err(got, triton, axis=None if name == "decay" else 2) < tolerance, name


def _kernel_names(text: str) -> set[str]:
    """The Mosaic GPU kernels' names in a lowered program's text (a kernel a stage, fleetjax.pallas.mosaic)."""
    return set(re.findall(r"\\00([a-z_]+)_mosaic_gpu", text)) - {"stable"}


@pytest.mark.parametrize("wrt, kernels", [("decay", {"dq_sums_walk", "dv_walk"}), ("q", {"dq_walk", "dv_walk"}),
                                          ("v", {"dq_walk", "dv_walk"}), ("k", {"dq_walk", "dv_walk", "dk_walk"}),
                                          ("all", {"dq_sums_walk", "dv_walk", "dk_walk"})])
def test_a_backward_launches_only_the_walks_its_gradients_need(wrt, kernels):
    """Lowered for an sm_90 GPU (any host), named by stage: the dq walk gives dq and the decay's sums (then it
    is the sums walk), the dv walk dv, both the witness; the dk walk gives dk alone, so a backward that does not
    differentiate k drops its walk: with the plain/contained choice on the device the VJP's primals say which
    inputs are differentiated (a pallas_call is never dropped, so only wanted gradients go through the
    contained walks), with the lax.cond jax's dead-code elimination drops the unused outputs. The backward's four
    pieces take their states from the Mosaic states walk (MosaicWalkConfig.backward_piece_states) in each."""
    B, T, H, K, V = 1, 1024, 2, 64, 64
    q, v = jnp.zeros((B, T, H, K), jnp.bfloat16), jnp.zeros((B, T, H, V), jnp.bfloat16)
    decay = jnp.asarray([0.999, 0.9], jnp.float32)
    config = dataclasses.replace(chunked.default_config(q, v), backward_num_sequence_pieces=4,
                                 mosaic_walks=mosaic.MosaicWalkConfig())
    f = lambda q, k, v, decay: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas",  # noqa: E731
                                                        config=config)
    pick = {"q": 0, "k": 1, "v": 2, "decay": 3}

    def grads(q, k, v, decay, do):
        if wrt == "all":
            return jax.vjp(f, q, k, v, decay)[1](do)
        args = [q, k, v, decay]

        def only(x):  # differentiated with respect to one input alone
            return f(*[x if i == pick[wrt] else a for i, a in enumerate(args)])
        return jax.vjp(only, args[pick[wrt]])[1](do)[0]

    for on_device in (True, False):
        config = dataclasses.replace(config, choice_on_device=on_device)
        text = jax.jit(grads).trace(q, q, v, decay, v).lower(lowering_platforms=("cuda",)).as_text()
        assert _walks(text) == len(kernels) and _kernel_names(text) == kernels | {mosaic.STATES_KERNEL}, on_device


@pytest.fixture
def mosaic_modules():
    """The Mosaic GPU modules that the test lowers (for sm_90, on any host), as text, in order
    (experiments/walk_ops.py's capture)."""
    core = pytest.importorskip("jax.experimental.mosaic.gpu.core")
    if not hasattr(core, "_run_serde_pass"):
        pytest.skip("this jax's Mosaic GPU lowering has no serde pass to read the module from")
    from experiments import walk_ops
    with walk_ops.capture_modules() as modules:
        yield modules


@pytest.mark.parametrize("K, stages, warpgroups, narrow", [
    (64, 2, 1, None), (64, 3, 1, None), (128, 2, 1, None), (128, 3, 1, None), (128, 4, 1, None),
    (64, 3, 2, None), (128, 2, 2, None), (128, 3, 2, None), (128, 3, 2, 32), (128, 3, 1, 32)])
def test_the_shared_memory_model_is_what_the_lowered_forward_walk_asks_for(mosaic_modules, K, stages, warpgroups,
                                                                           narrow):
    """Lowered for an sm_90 GPU (any host): the default config picks the walk's stages by
    MosaicWalkConfig.shared_memory_bytes, so that model must be the kernel's own request, byte for byte."""
    modules = mosaic_modules
    q = jnp.zeros((1, 512, 2, K), jnp.bfloat16)
    v = jnp.zeros((1, 512, 2, 64 * warpgroups), jnp.bfloat16)  # whole programs of value blocks of 64
    walks = mosaic.MosaicWalkConfig(stages=stages, warpgroups=warpgroups, forward_block_v=narrow)
    config = dataclasses.replace(chunked.default_config(q, v), mosaic_walks=walks)
    f = lambda q, k, v: fleetjax.fleet_attention(q, k, v, jnp.asarray([0.9, 0.99]),  # noqa: E731
                                                 implementation="pallas", config=config)
    jax.jit(f).trace(q, q, v).lower(lowering_platforms=("cuda",))
    [module] = modules
    from experiments import walk_ops
    assert walk_ops.shared_bytes(module) == walks.shared_memory_bytes(K, 2)  # scratch and barriers


def _lowered_walks(modules: list[str], walks: mosaic.MosaicWalkConfig, *, log_gate: bool, backward: bool) -> list[str]:
    """The Mosaic modules of the forward, or of fwd+bwd with every gradient (the decay's and the gate's too),
    under ``walks``, lowered for sm_90 at B1 T512 H2, K = V = 128 (experiments/walk_ops.py's lowering)."""
    from experiments import walk_ops
    return walk_ops.lowered(modules, gated=log_gate, backward=backward, scale=None, walks=walks)


def _unnamed(module: str) -> str:
    """A lowered module's text without its name (jax 0.11.2 names each lowered module by a running count)."""
    return re.sub(r'mosaic_gpu\.dump_basename = "\w+"', "", module)


def _wide(module: str) -> bool:
    """Whether a lowered walk runs more than one warpgroup (setmaxnreg splits their registers; jax 0.11.2
    writes the PTX instruction, 0.10.2 the nvvm op)."""
    return "setmaxnreg" in module or "setmaxregister" in module


@pytest.mark.parametrize("log_gate", [False, True], ids=["constant", "gated"])
def test_one_warpgroup_walks_leave_out_the_automatic_barriers(mosaic_modules, log_gate):
    """Lowered for an sm_90 GPU (any host): by default (MosaicWalkConfig.auto_barriers False) the backward's
    one-warpgroup walks lower without the warpgroup barriers Pallas would put around each shared-memory
    store (less than half the bar.sync: the walk's own commits and the pipeline's waits remain); the
    two-warpgroup forward keeps them (as many either way). The gate's walks are taken on one warpgroup here
    (by default they run on two, MosaicWalkConfig.gate_dq_warpgroups and gate_dk_warpgroups)."""
    def lowered(backward, **walks):
        walks = mosaic.MosaicWalkConfig(warpgroups=2, gate_dk_warpgroups=1, gate_dq_warpgroups=1, **walks)
        return _lowered_walks(mosaic_modules, walks, log_gate=log_gate, backward=backward)

    kept, left = lowered(True, auto_barriers=True), lowered(True)
    assert len(kept) == len(left) >= 3  # the backward's dq, dv and dk walks (identical modules lower once)
    for with_them, without in zip(kept, left):
        assert 0 < without.count("bar.sync") < with_them.count("bar.sync") // 2
    [wide_kept], [wide_left] = lowered(False, auto_barriers=True), lowered(False)
    assert _wide(wide_left)  # three warpgroups: the wide forward
    assert wide_left.count("bar.sync") == wide_kept.count("bar.sync") > 0


@pytest.mark.parametrize("log_gate", [False, True], ids=["constant", "gated"])
def test_wide_walks_leave_out_the_automatic_barriers_where_asked(mosaic_modules, log_gate):
    """Lowered for an sm_90 GPU (any host): MosaicWalkConfig.wide_auto_barriers False gives every
    two-warpgroup walk (the forward, the backward's plain walks, the sums walks) less than half the bar.sync
    it lowers with by default (28 -> 7 for the forward, 42 -> 7 for the dq walk with the decay's sums, jax
    0.11.2); here every walk takes two."""
    def lowered(backward, kept):
        walks = mosaic.MosaicWalkConfig(warpgroups=2, backward_warpgroups=2, sums_warpgroups=2,
                                        wide_auto_barriers=kept)
        return _lowered_walks(mosaic_modules, walks, log_gate=log_gate, backward=backward)

    for backward in (False, True):
        kept, bare = lowered(backward, True), lowered(backward, False)
        assert len(kept) == len(bare) >= (3 if backward else 1)
        assert all(map(_wide, kept))
        for with_them, without in zip(kept, bare):
            assert 0 < without.count("bar.sync") < with_them.count("bar.sync") // 2


@pytest.mark.parametrize("case", ["constant", "gated", "gate_only"])
def test_the_sums_walks_take_two_warpgroups_where_asked_and_they_can(mosaic_modules, case):
    """Lowered for an sm_90 GPU (any host): MosaicWalkConfig.sums_warpgroups, gate_dq_warpgroups and
    gate_dk_warpgroups = 2 give each walk that forms sums two compute warpgroups and a copying one (their
    registers split by setmaxnreg: at most 232 a compute thread), within one program's shared memory: the dq
    walk of the decay's sums (sums_warpgroups), the dq walk of the gate's (gate_dq_warpgroups: with the decay
    learned too, the decay's sums beside them), the gate's dk walk; every other walk lowers as before. By
    default the gate's walks take two, the dq walk of the decay's sums alone one."""
    from experiments import walk_ops

    def lowered(**walks):
        return walk_ops.lowered(mosaic_modules, gated=case != "constant", decay=case != "gate_only", backward=True,
                                scale=None, walks=mosaic.MosaicWalkConfig(**walks))

    fields = ("sums_warpgroups", "gate_dq_warpgroups", "gate_dk_warpgroups")
    one, two = lowered(**dict.fromkeys(fields, 1)), lowered(**dict.fromkeys(fields, 2))
    wide = {"constant": {"dq_sums_walk"}, "gated": {"dq_sums_walk", "dk_sums_walk"},
            "gate_only": {"dq_sums_walk", "dk_sums_walk"}}[case]
    wide_by_default = set() if case == "constant" else wide
    assert len(one) == len(two) >= 3

    def walk_of(module):
        return next((name for name in wide if name in module), None)

    assert {walk_of(module) for module in two} - {None} == wide
    for narrow, both, default in zip(one, two, lowered()):
        if walk_of(both) is None:
            assert _unnamed(both) == _unnamed(narrow) == _unnamed(default)
            continue
        # jax 0.11.2 writes the PTX instruction, 0.10.2 the nvvm op
        assert "setmaxnreg.inc.sync.aligned.u32 232" in both or "setmaxregister increase 232" in both
        assert not _wide(narrow)
        assert walk_ops.shared_bytes(both) <= 227 * 1024
        assert _unnamed(default) == _unnamed(both if walk_of(both) in wide_by_default else narrow)


@pytest.mark.parametrize("log_gate", [False, True], ids=["constant", "gated"])
def test_approx_exp_lowers_the_gated_walks_exp_to_the_hardwares(mosaic_modules, log_gate):
    """Lowered for an sm_90 GPU (any host): MosaicWalkConfig.approx_exp gives every exp2 of the gated walks
    (forward and backward: their factors are exp2 of the base-2 log decays) as the hardware's ex2.approx, and
    leaves every walk without it as before; the constant decay's walks form their factors once and never
    take it."""
    def lowered(approx_exp):
        walks = mosaic.MosaicWalkConfig(approx_exp=approx_exp)
        return (_lowered_walks(mosaic_modules, walks, log_gate=log_gate, backward=False)
                + _lowered_walks(mosaic_modules, walks, log_gate=log_gate, backward=True))

    def exps(module):
        """(accurate exp and exp2 ops, approximate ones): approx_math gives a vector's exp2 as inline
        ex2.approx, a scalar's (jax 0.11.2) as math.exp2 with the approximate-function flag (afn)."""
        accurate = [line for line in module.splitlines() if "math.exp" in line]  # math.exp and math.exp2
        afn = sum("afn" in line for line in accurate)
        return len(accurate) - afn, module.count("ex2.approx") + afn

    approx, accurate = lowered(True), lowered(False)
    assert len(approx) == len(accurate) >= 4  # the forward walk, then the backward's
    assert all(exps(module)[1] == 0 for module in accurate)
    if log_gate:
        assert all(exps(module)[0] > 0 for module in accurate)
        assert all(exps(module)[0] == 0 and exps(module)[1] > 0 for module in approx)
    else:
        assert [_unnamed(m) for m in approx] == [_unnamed(m) for m in accurate]


@hopper
@pytest.mark.parametrize("log_gate", [False, True], ids=["constant", "gated"])
def test_walks_without_the_automatic_barriers_give_the_same_bits(log_gate):
    """On an sm_90 GPU: the output and every gradient (q, k, v, the decay's, the gate's) without Pallas's
    automatic barriers (the default) bitwise those with them, on three calls in a row each, in two sequence
    pieces forward and backward (a race between a program's warps would show as a difference)."""
    B, T, H, K, V = 2, 2048, 2, 128, 128
    q, k, v = _inputs(B, T, H, K, V, "bfloat16")
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    decay = jnp.asarray([0.97, 0.999], jnp.float32)
    gate = _log_gate(B, T, H) if log_gate else None

    def run(walks):
        config = dataclasses.replace(chunked.default_config(q, v), num_sequence_pieces=2,
                                     backward_num_sequence_pieces=2, mosaic_walks=walks)
        f = lambda q, k, v, decay, gate: fleetjax.fleet_attention(  # noqa: E731
            q, k, v, decay, log_gate=gate, implementation="pallas", config=config)
        fb = jax.jit(lambda *xs: (lambda o, pullback: (o, pullback(do)))(*jax.vjp(f, *xs)))
        return [jax.tree.leaves(fb(q, k, v, decay, gate)) for _ in range(3)]

    reference = run(mosaic.MosaicWalkConfig(auto_barriers=True))[0]
    for got in run(mosaic.MosaicWalkConfig()):
        assert all(jnp.array_equal(a, b) for a, b in zip(reference, got))


@hopper
@pytest.mark.parametrize("aligned", [False, True], ids=["random", "aligned"])
@pytest.mark.parametrize("mosaic_states", [False, True], ids=["triton_states", "mosaic_states"])
def test_learned_decay_on_mosaic_at_long_T(aligned, mosaic_states):
    """bfloat16 at T = 16384 (256 chunks, 4 sequence pieces, the state's derivative passed between them): d decay
    from the Mosaic walks' sums against the float64 recurrence on the same inputs; ``aligned`` (q = k,
    dO = v) makes every lag-0 pair positive, the case where a difference of absolute-position sums fails;
    ``mosaic_states``: the pieces' states (and derivatives) from the Mosaic states walk
    (MosaicWalkConfig.backward_piece_states), else from the Triton launches."""
    B, T, H, K, V = 1, 16384, 2, 64, 64
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=K ** -0.5)
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    if aligned:
        k, do = q, v
    decay = jnp.asarray([0.999, 0.9], jnp.float32)
    config = dataclasses.replace(chunked.default_config(q, v), backward_num_sequence_pieces=4)
    config = dataclasses.replace(config, mosaic_walks=dataclasses.replace(config.mosaic_walks,
                                                                          backward_piece_states=mosaic_states))
    f = lambda q, k, v, decay: fleetjax.fleet_attention(q, k, v, decay, implementation="pallas",  # noqa: E731
                                                        config=config)
    grad = jax.jit(lambda q, k, v, decay, do: jax.vjp(lambda d: f(q, k, v, d), decay)[1](do)[0])
    text = grad.lower(q, k, v, decay, do).as_text()
    if mosaic_states:  # the forward of this shape takes the Triton launch (V = 64: one warpgroup, no own pieces)
        assert f"{mosaic.STATES_KERNEL}_mosaic_gpu" in text
    # d decay alone needs the dq walk (its sums) and the dv walk (the witness); the dk walk is dropped.
    assert _walks(text) == 2
    ref = oracle.recurrent(*(np.asarray(x, np.float32) for x in (q, k, v)), decay, do=np.asarray(do, np.float32))
    err = np.abs(np.asarray(grad(q, k, v, decay, do), np.float64) - ref["decay"]) / np.abs(ref["decay"])
    assert np.all(err <= DECAY_GRAD_TOLERANCE["bfloat16"]), f"relative error per head {err}"


@hopper
@pytest.mark.parametrize("aligned", [False, True], ids=["random", "aligned"])
@pytest.mark.parametrize("with_decay, K", [(False, 64), (True, 64), (False, 128), (True, 128)],
                         ids=["gate", "gate+decay", "gate-K128", "gate+decay-K128"])
def test_the_gate_on_mosaic_at_long_T(aligned, with_decay, K):
    """bfloat16 at T = 16384 (256 chunks, 4 sequence pieces) with small per-token gates: d log_gate at every
    position (and d decay beside it) from the Mosaic walks' sums against the float64 recurrence on the same
    inputs. The flow across each chunk boundary is a difference of the walks' float32 sums, and the chunk's
    own pairs come from the dq and dk walks' row and column sums: neither may lose the constant decay's
    accuracy at long T. ``aligned`` (q = k, dO = v): every lag-0 pair positive. K = V = 64 or 128."""
    B, T, H = 1, 16384, 2
    V = K
    q, k, v = _inputs(B, T, H, K, V, "bfloat16", scale_values=K ** -0.5)
    do = _inputs(B, T, H, K, V, "bfloat16", seed=6)[2]
    if aligned:
        k, do = q, v
    log_gate = jnp.asarray(-np.abs(np.random.default_rng(7).standard_normal((B, T, H))) * 1e-2, jnp.float32)
    decay = jnp.asarray([0.999, 0.99], jnp.float32)
    config = dataclasses.replace(chunked.default_config(q, v), backward_num_sequence_pieces=4)

    def f(q, k, v, *learned):
        return fleetjax.fleet_attention(q, k, v, learned[0] if with_decay else None, log_gate=learned[-1],
                                        implementation="pallas", config=config)

    learned = (decay, log_gate) if with_decay else (log_gate,)
    grad = jax.jit(lambda q, k, v, do, *learned: jax.vjp(lambda *x: f(q, k, v, *x), *learned)[1](do))
    text = grad.lower(q, k, v, do, *learned).as_text()
    assert _walks(text) >= 3
    got = grad(q, k, v, do, *learned)
    ref = oracle.recurrent_gated(*(np.asarray(x, np.float32) for x in (q, k, v)), decay if with_decay else None,
                                 np.asarray(log_gate), do=np.asarray(do, np.float32))
    assert oracle.rel_err(got[-1], ref["log_gate"], axis=2) < DECAY_GRAD_TOLERANCE["bfloat16"]
    if with_decay:
        err = np.abs(np.asarray(got[0], np.float64) - ref["decay"]) / np.abs(ref["decay"])
        assert np.all(err <= DECAY_GRAD_TOLERANCE["bfloat16"]), f"relative error per head {err}"
