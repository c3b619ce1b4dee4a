"""implementation="pallas" beyond the shared table: sequence pieces (forward and backward), value blocks,
the config, and the refusals. Pallas runs in interpret mode here; shapes stay tiny."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fleetjax
from fleetjax.pallas.chunked import PallasConfig, WalkConfig
from fleetjax.pallas.fleet import FleetConfig

TILE = WalkConfig(chunk_size=16, block_v=16)
SMALL = dict(forward=TILE, dq=TILE, dv=TILE, dk=TILE)


def _inputs(B=2, T=70, H=2, K=5, V=24, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    decay = np.array([0.97, 0.5][:H], np.float32)
    s0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
    seg = np.sort(rng.integers(0, 4, (B, T)), axis=1)
    seg[0, 16] = seg[0, 15] + 7  # a segment starting exactly at a chunk boundary
    seg[0, 17:] = np.maximum(seg[0, 17:], seg[0, 16])
    wo = rng.standard_normal((B, T, H, V)).astype(np.float32)
    wf = rng.standard_normal((B, H, K, V)).astype(np.float32)
    return q, k, v, decay, s0, seg, wo, wf


def _all(implementation, config, q, k, v, decay, s0, seg, wo, wf):
    def loss(q, k, v, decay, s0):
        o, f = fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, segment_ids=seg, scale=0.7,
                                        return_final_state=True, implementation=implementation, config=config)
        return jnp.sum(o * wo) + jnp.sum(f * wf), (o, f)
    (_, (o, f)), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, decay, s0)
    return (o, f) + tuple(g)


# The last two: the pieces' local states in wider value blocks than the walks' 16, and in chunks of 32 (T=70
# in three pieces of 32 positions; the backward's two pieces of 48 keep the walks' chunks of 16).
@pytest.mark.parametrize("pieces, backward_pieces, state", [
    (3, 1, {}), (1, 4, {}), (5, 2, dict(piece_states=WalkConfig(chunk_size=16, block_v=32))),
    (3, 2, dict(piece_states=WalkConfig(chunk_size=32, block_v=16, num_warps=2)))])
def test_sequence_pieces_match_the_reference(pieces, backward_pieces, state):
    x = _inputs()
    config = PallasConfig(**SMALL, num_sequence_pieces=pieces, backward_num_sequence_pieces=backward_pieces, **state)
    got = _all("pallas", config, *x)
    ref = _all("quadratic", None, *x)
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "ddecay", "dinitial"), got, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_the_crossing_counts_are_of_the_dq_walks_chunks():
    """The pieces' local states in chunks of 32 that tile the backward's pieces (T=128 in two of 64) where the
    walks take chunks of 16: the Triton dq walk's crossing counts, which enter it with those states, count its
    own chunks, so d decay (and the rest) still match the reference."""
    x = _inputs(T=128)
    config = PallasConfig(**SMALL, backward_num_sequence_pieces=2,
                          piece_states=WalkConfig(chunk_size=32, block_v=16, num_warps=2))
    got = _all("pallas", config, *x)
    ref = _all("quadratic", None, *x)
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "ddecay", "dinitial"), got, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("poison", ["q", "do"])
def test_backward_pieces_keep_what_a_nonfinite_value_reaches(poison):
    """A NaN in q or dO reaches the same gradient entries whether the backward walks the sequence in one
    piece or in three (whose local states enter each walk), the first run's d initial_state included; the
    finite entries agree."""
    q, k, v, decay, s0, seg, wo, wf = _inputs(K=20, V=40)
    q, wo = q.copy(), wo.copy()
    if poison == "q":
        q[0, 33, 1, 3] = q[1, 1, 0, 2] = np.nan  # the second in the first run: it reaches d initial_state
    else:
        wo[0, 47, 0, 5] = wo[1, 2, 1, 5] = np.nan
    whole, pieces = (_all("pallas", PallasConfig(**SMALL, backward_num_sequence_pieces=p), q, k, v, decay, s0, seg,
                          wo, wf) for p in (1, 3))
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "ddecay", "dinitial"), pieces, whole):
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        if name in ("dk", "dv", "dinitial"):
            assert np.isnan(a).any(), name
        scale = float(np.nanmax(np.abs(b))) if np.isfinite(b).any() else 1.0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale, equal_nan=True, err_msg=name)


def test_several_value_blocks_and_bitwise_determinism():
    x = _inputs(K=20, V=40)
    config = PallasConfig(**SMALL)  # V = 40 -> three value blocks of 16, the last one partial
    first = _all("pallas", config, *x)
    second = _all("pallas", config, *x)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    ref = _all("quadratic", None, *x)
    for a, b in zip(first, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("implementation", ["pallas", "pallas_fleet"])
def test_second_derivatives_are_refused(implementation):
    q, k, v, decay, *_ = _inputs(T=20)
    f = lambda d: jnp.sum(fleetjax.fleet_attention(q, k, v, d, implementation=implementation))
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.grad(lambda d: jnp.sum(jax.grad(f)(d)))(decay)


@pytest.mark.parametrize("field, value", [("chunk_size", 24), ("block_v", 8), ("num_warps", 0), ("num_warps", 3),
                                          ("num_stages", 0)])
def test_bad_walk_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        WalkConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("num_sequence_pieces", 0), ("precision", "fast"),
                                          ("dk", WalkConfig(chunk_size=32))])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field if field != "dk" else "chunk_size"):
        PallasConfig(**{field: value})


def test_a_config_that_cannot_fit_is_refused():
    q = jnp.ones((1, 8, 1, 256))
    with pytest.raises(ValueError, match="cannot fit"):
        fleetjax.fleet_attention(q, q, q, jnp.array([0.5]), implementation="pallas",
                                 config=PallasConfig(forward=WalkConfig(block_v=128)))


@pytest.mark.parametrize("pieces", [1, 3])
def test_plain_walks_equal_the_contained_ones_on_finite_inputs(monkeypatch, pieces):
    """With every input finite the op runs the walks without containment (fleetjax.nonfinite); they must give
    what the contained walks give, segments, states and sequence pieces included."""
    from fleetjax import nonfinite
    x = _inputs(K=20, V=40)
    config = PallasConfig(**SMALL, num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces)
    results = {}
    for contain in (False, True):
        for choice in ("contained_if_reached", "contained_on_device"):
            monkeypatch.setattr(nonfinite, choice, lambda walks, c=contain: walks(c)[0])
        results[contain] = _all("pallas", config, *x)
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "ddecay", "dinitial"), results[False], results[True]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()), err_msg=name)


def _plain_eqns(jaxpr):
    """The equations of ``jaxpr`` and of its sub-jaxprs, leaving out the contained walks: what lax.cond
    branches hold (fleetjax.nonfinite's choice; the plain path has none), and the kernels' bodies (with the
    choice on the device the contained and marking kernels read their inputs, on finite inputs no chunk)."""
    from jax.extend import core as jcore
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name in ("cond", "pallas_call"):
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                    yield from _plain_eqns(getattr(sub, "jaxpr", sub))


def _finiteness_checks(jaxpr) -> list[tuple[int, ...]]:
    """The shapes that is_finite reads on the plain path (the contained walks' marking has its own)."""
    return [tuple(eqn.invars[0].aval.shape) for eqn in _plain_eqns(jaxpr) if eqn.primitive.name == "is_finite"]


@pytest.mark.parametrize("implementation", ["pallas", "pallas_fleet"])
def test_walks_check_their_witness_not_their_inputs(implementation):
    """Which walks count is decided after the plain walks, from one of their outputs (fleetjax.nonfinite
    .contained_if_reached): the forward reads o's witness (pallas: the states after its pieces, [B, H, P, K, V],
    pallas_fleet: o [B, T, H, V] itself), the backward the dq walk's intra [B, H, T], and neither reads
    its inputs again."""
    B, T, H, K = 1, 16, 2, 8
    q = jnp.ones((B, T, H, K), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fleetjax.fleet_attention(q, k, v, jnp.asarray([0.9, 0.5]), implementation=implementation))

    [forward] = _finiteness_checks(jax.make_jaxpr(loss)(q, q, q).jaxpr)
    # pallas: the value columns padded to the kernel's block
    assert forward[:3] == (B, H, 1) and forward[3] >= K if implementation == "pallas" else forward == (B, T, H, K)
    grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr
    assert sorted(_finiteness_checks(grad)) == sorted([forward, (B, H, T)])


def _kernel_outputs(jaxpr, contained: bool = False) -> dict[str, int]:
    """Kernel name -> its number of outputs, for the pallas_calls of ``jaxpr``'s plain path: the first launch
    of each name (the plain walks run first), or with ``contained`` the last (with the choice on the device,
    the contained walks')."""
    launches = [eqn for eqn in _plain_eqns(jaxpr) if eqn.primitive.name == "pallas_call"]
    return {str(eqn.params["name"]): len(eqn.outvars) for eqn in (launches if contained else launches[::-1])}


# (gated, which arguments are differentiated) -> outputs of the dq walk (dq, intra[, w][, counts][, spanned])
# and of the dk walk (dk[, u]), plain; then of the contained ones with the choice on the device, which leave
# d log_decay's sums out (the plain walks' is read) and intra (the plain walks' is the witness).
@pytest.mark.parametrize("gated, argnums, dq_outputs, dk_outputs, contained_outputs", [
    (False, (0, 1, 2), 2, 1, (1, 1)), (False, (0, 1, 2, 3), 4, 2, (1, 1)),
    (True, (0, 1, 2), 2, 1, (1, 1)), (True, (0, 1, 2, 4), 4, 2, (3, 2)), (True, (0, 1, 2, 3, 4), 5, 2, (3, 2))])
@pytest.mark.parametrize("implementation", ["pallas", "pallas_fleet"])
def test_the_backward_forms_only_the_wanted_decay_gradients(implementation, gated, argnums, dq_outputs, dk_outputs,
                                                            contained_outputs):
    """A fixed decay (or gate) spares the walks its gradient's per-position sums: the dq walk's w and crossing
    counts (and its second state), the dk walk's u, the gated dq walk's spanned sums. With the choice on the
    device (the default) the contained walks form the gate's sums alone."""
    B, T, H, K = 1, 16, 2, 8
    q = jnp.ones((B, T, H, K), jnp.float32)
    gate = jnp.full((B, T, H), -0.1) if gated else None

    def loss(q, k, v, decay, log_gate):
        return jnp.sum(fleetjax.fleet_attention(q, k, v, decay, log_gate=log_gate, implementation=implementation))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(q, q, q, jnp.asarray([0.9, 0.5]), gate).jaxpr
    outputs = _kernel_outputs(jaxpr)
    assert (outputs["fleet_backward_dq"], outputs["fleet_backward_dk"]) == (dq_outputs, dk_outputs), outputs
    contained = _kernel_outputs(jaxpr, contained=True)
    assert (contained["fleet_backward_dq"], contained["fleet_backward_dk"]) == contained_outputs, contained


@pytest.mark.parametrize("state, differentiated, dv_outputs", [(False, False, 1), (True, False, 1), (True, True, 2)])
@pytest.mark.parametrize("implementation", ["pallas", "pallas_fleet"])
def test_the_reverse_state_is_formed_only_for_a_wanted_initial_state(implementation, state, differentiated,
                                                                     dv_outputs):
    """Without an initial state, or with a fixed one, the dv walk returns dv alone: its reverse state (d S0)
    is neither written nor updated float32-accurately."""
    B, T, H, K = 1, 16, 2, 8
    q = jnp.ones((B, T, H, K), jnp.float32)
    s0 = jnp.ones((B, H, K, K), jnp.float32) if state else None

    def loss(q, k, v, s0):
        return jnp.sum(fleetjax.fleet_attention(q, k, v, jnp.asarray([0.9, 0.5]), initial_state=s0,
                                                implementation=implementation))

    argnums = (0, 1, 2, 3) if differentiated else (0, 1, 2)
    outputs = _kernel_outputs(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(q, q, q, s0).jaxpr)
    assert outputs["fleet_backward_dv"] == dv_outputs, outputs


WITNESS_CASES = [("q", 0), ("k", 0), ("v", 0), ("do", 0), ("q", 69), ("k", 69), ("v", 69), ("do", 69),
                 ("k", 16), ("v", 15), ("q", 33), ("do", 47)]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("implementation, config", [
    ("pallas", PallasConfig(**SMALL)), ("pallas", PallasConfig(**SMALL, num_sequence_pieces=3,
                                                               backward_num_sequence_pieces=3)),
    ("pallas_fleet", FleetConfig(block_k=16, block_v=16, tokens_per_step=16)),
    ("pallas_fleet", FleetConfig(tokens_per_step=1, num_sequence_pieces=2))],
    ids=["pallas", "pallas-pieces", "fleet-tiles", "fleet-tokens"])
@pytest.mark.parametrize("segmented", [True, False], ids=["segments", "one-run"])
def test_a_nonfinite_input_always_reaches_the_witness(monkeypatch, request, implementation, config, value,
                                                      segmented):
    """The plain walks' witness is non-finite for one bad entry of any input at any position (the first,
    the last, at and next to chunk edges, a segment's first position): else the op would return the plain
    walks' result, where a NaN crosses segments or reaches earlier positions. Zeros around the bad entry
    (0 * inf) must not hide it. Without segments pallas's forward witness is its pieces' final states."""
    if not segmented and implementation != "pallas":
        pytest.skip("pallas_fleet's forward witness is o with and without segments")
    from fleetjax import nonfinite
    seen = []

    def plain_only(walks):
        result, witness = walks(False)
        # Under jit (pallas_fleet's forward) the witness is traced: record its finiteness when it runs.
        jax.debug.callback(lambda w: seen.append(bool(np.all(np.isfinite(w)))), witness)
        return result

    for choice in ("contained_if_reached", "contained_on_device"):
        monkeypatch.setattr(nonfinite, choice, plain_only)
    # pallas_fleet's jitted forward must trace this test's plain_only, and later tests must not find it cached.
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)
    q, k, v, decay, s0, seg, wo, _ = _inputs(B=1, T=70, K=20, V=40)
    seg = seg[:1] if segmented else None
    for name, t in WITNESS_CASES:
        x = dict(q=q.copy(), k=k.copy(), v=v.copy(), do=wo.copy())
        x[name][0, t, 1, 3] = value
        if name != "q":  # the query at the bad entry's position zero: its products are 0 * inf there
            x["q"][0, t, 1, :] = 0.0
        seen.clear()

        def loss(q, k, v):
            o = fleetjax.fleet_attention(q, k, v, decay, segment_ids=seg, scale=0.7,
                                         implementation=implementation, config=config)
            return jnp.sum(o * x["do"])
        if name == "do":
            jax.block_until_ready(jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"]))
            jax.effects_barrier()
            witnesses = seen[-1:]  # the backward's (the forward's inputs are finite)
        else:
            jax.block_until_ready(fleetjax.fleet_attention(x["q"], x["k"], x["v"], decay, segment_ids=seg,
                                                           scale=0.7, implementation=implementation,
                                                           config=config))
            jax.effects_barrier()
            witnesses = seen[-1:]
            if implementation == "pallas":  # pallas_fleet's backward is pallas's
                jax.block_until_ready(jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"]))
                jax.effects_barrier()
                witnesses = seen[-2:]
        assert witnesses and not any(witnesses), (name, t)


@pytest.mark.parametrize("T, segments, reverse", [(7, False, False), (300, True, False), (300, True, True),
                                                  (256, False, True), (1000, True, True)])
def test_blockwise_marking_equals_the_whole_array_marking(T, segments, reverse):
    """nonfinite.mark_reached (block by block over T, a partial block first or last) marks what reached()
    marks on the whole array."""
    from fleetjax import nonfinite
    rng = np.random.default_rng(T)
    B, H, D = 2, 3, 4
    source = rng.standard_normal((B, T, H, D)).astype(np.float32)
    source[rng.random(source.shape) < 0.004] = np.nan
    source[0, T // 2, 0, 0] = np.inf
    x = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
    runs = jnp.asarray(np.sort(rng.integers(0, 5, (B, T)), axis=1), jnp.int32) if segments else None
    want = nonfinite.mark(x, nonfinite.reached(nonfinite.bad(jnp.asarray(source)), runs, reverse=reverse))
    got = nonfinite.mark_reached(x, jnp.asarray(source), runs, reverse=reverse, block=64)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("exclusive", [False, True])
def test_reached_is_the_definition(reverse, exclusive):
    """nonfinite.reached against loops: a bad entry at s <= t (s < t exclusive; reverse: s >= t, s > t) of
    t's segment, never one of a neighbouring segment (a bad last entry of a segment does not reach the next
    segment's first position)."""
    from fleetjax import nonfinite
    rng = np.random.default_rng(3)
    B, T = 2, 40
    bad = rng.random((B, T, 2, 1)) < 0.1
    runs = np.sort(rng.integers(0, 6, (B, T)), axis=1)
    edge = int(np.nonzero(np.diff(runs[0]))[0][0])  # the last position of row 0's first segment
    bad[0, edge + (1 if reverse else 0), 0, 0] = True
    want = np.zeros_like(bad)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                before = (s >= t if reverse else s <= t) and (s != t or not exclusive)
                want[b, t] |= bad[b, s] & before & (runs[b, s] == runs[b, t])
    got = nonfinite.reached(jnp.asarray(bad), jnp.asarray(runs, jnp.int32), reverse=reverse, exclusive=exclusive)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_float32_tf32x3_footprint_counts_twice():
    """Float32 inputs with tf32x3 products take twice the modelled shared memory (XLA's Triton on the H200
    asked for up to twice Triton 3.6's offline allocation): a forward tiling that fits with "ieee" products
    is refused with "tf32x3", and the default config fits."""
    from fleetjax.pallas import chunked
    walk = WalkConfig(chunk_size=64, block_v=32, num_stages=2)
    ieee = chunked.footprint("forward", walk, 128, 128, jnp.float32, "ieee")["shared"]
    assert chunked.footprint("forward", walk, 128, 128, jnp.float32, "tf32x3")["shared"] == 2 * ieee
    assert chunked.footprint("forward", walk, 128, 128, jnp.bfloat16, "tf32x3")["shared"] < ieee
    config = PallasConfig(forward=walk, precision="ieee")
    chunked.check_fits(config, 128, 128, jnp.float32, kernels=("forward",))
    with pytest.raises(ValueError, match="cannot fit"):
        chunked.check_fits(PallasConfig(forward=walk), 128, 128, jnp.float32, kernels=("forward",))
    q = jnp.zeros((1, 150, 2, 128), jnp.float32)
    chunked.check_fits(chunked.default_config(q, q), 128, 128, jnp.float32)
    # Too wide for tf32x3's staging at any tiling: the default falls back to IEEE products, and fits.
    q, v = jnp.zeros((1, 150, 2, 130), jnp.float32), jnp.zeros((1, 150, 2, 260), jnp.float32)
    config = chunked.default_config(q, v)
    assert config.precision == "ieee"
    chunked.check_fits(config, 130, 260, jnp.float32)
    with pytest.raises(ValueError, match="precision='ieee'"):
        chunked.check_fits(dataclasses.replace(config, precision="tf32x3"), 130, 260, jnp.float32)


def test_bfloat16_decay_gradient_at_long_range():
    """bfloat16 at T=1000 with decay 0.999: the decay gradient's offset sums amplify roundings of the state and
    of its decayed terms to bfloat16 (4.9% error before the hi/lo pairs of the backward walks, 2e-4 after,
    measured 2026-11-25). Beyond the shared table's interpret-mode cap, so checked here on its own."""
    import oracle

    rng = np.random.default_rng(0)
    B, T, H, K, V = 1, 1000, 2, 16, 8
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.bfloat16) for _ in range(2))
    decay = jnp.array([0.999, 0.9], jnp.float32)
    loss = lambda decay: jnp.sum(fleetjax.fleet_attention(q, k, v, decay, scale=0.25, implementation="pallas")
                                 .astype(jnp.float32) * do.astype(jnp.float32))
    got = jax.jit(jax.grad(loss))(decay)
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = oracle.gradients(as64(q), as64(k), as64(v), as64(decay), do=as64(do), scale=0.25)["decay"]
    assert oracle.rel_err(got, ref, axis=0) <= 2e-3, (got, ref)


@pytest.mark.parametrize("poison, segments, pieces, gated", [
    (None, False, 1, False), ("v", False, 1, False), ("k", False, 1, False), ("q", False, 1, False),
    ("do", False, 1, False), ("v inf", True, 3, False), ("v", False, 2, True), ("k", True, 1, True),
    ("do", True, 2, True)])
def test_the_choice_on_the_device_gives_the_conds(poison, segments, pieces, gated):
    """PallasConfig.choice_on_device: the plain/contained choices without a lax.cond (the contained launches and
    the NaN marking kernels skip their chunks on finite inputs) give bitwise the output, the final state and
    the gradients (decay, gate and initial state included) of the lax.cond's choices: finite inputs, and a NaN
    or inf at one position of v, k, q or the output's cotangent (what it reaches marked NaN, nothing else),
    with segments, sequence pieces forward and backward, and a log gate."""
    q, k, v, decay, s0, seg, wo, wf = _inputs()
    if poison is not None:
        name, value = poison.split()[0], np.inf if "inf" in poison else np.nan
        x = dict(q=q, k=k, v=v, do=wo)
        x[name] = x[name].copy()
        x[name][1, 40, 0, 3] = value
        q, k, v, wo = x["q"], x["k"], x["v"], x["do"]
    gate = (-np.abs(np.random.default_rng(3).standard_normal(q.shape[:3])) * 0.3).astype(np.float32) if gated else None

    gate = None if gate is None else jnp.asarray(gate)

    @functools.partial(jax.jit, static_argnums=0)
    def run(on_device, q, k, v, decay, s0, gate, wo, wf):
        config = PallasConfig(**SMALL, num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces,
                              choice_on_device=on_device)

        def f(q, k, v, decay, s0, gate):
            return fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, log_gate=gate,
                                            segment_ids=seg if segments else None, return_final_state=True,
                                            implementation="pallas", config=config)
        out, pullback = jax.vjp(f, q, k, v, decay, s0, gate)
        return jax.tree.leaves((out, pullback((wo, wf))))

    on_device = run(True, q, k, v, decay, s0, gate, wo, wf)
    try:
        conds = run(False, q, k, v, decay, s0, gate, wo, wf)
    except jax.errors.JaxRuntimeError as e:  # the reference, not the choice on the device, failed to compile
        if gated and "Failed to translate module to LLVM IR" in str(e):
            pytest.xfail("XLA's GPU emitter fails to compile the lax.cond's gated backward at these tiles (jax "
                         "0.11.2, H200, 2026-12-04); the choice on the device compiled and ran above")
        raise
    for got, want in zip(on_device, conds):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    reached = np.asarray(on_device[2 if poison == "do" else 0])  # dq for a bad dO, o for the others
    assert np.isfinite(reached[0]).all() and (not np.isfinite(reached[1]).all()) == (poison is not None)


@pytest.mark.parametrize("poison, segments, pieces, gated", [
    (None, False, 2, False), ("key", False, 2, False), ("value inf", False, 1, False), ("value", False, 3, False),
    (None, True, 2, False), ("value", True, 3, False), ("value inf", True, 2, False), ("key", True, 2, False),
    ("key inf", True, 3, False), ("value", "shifted", 2, False), ("value", True, 3, True), ("key", False, 2, True)])
@pytest.mark.parametrize("reverse", [False, True], ids=["local_state", "local_reverse_state"])
def test_the_local_states_choose_on_the_device_as_the_cond(poison, segments, pieces, gated, reverse):
    """Sequence parallelism's local states (chunked.local_state and local_reverse_state) with
    PallasConfig.choice_on_device give the lax.cond's choice: the pieces' states bitwise, the state non-finite
    in the same entries and the rest to float32's rounding (XLA contracts the fold's products differently
    inside a conditional); finite inputs and a NaN or inf in a key or value (the forward's k, v; the reverse's
    q, dO), with segments (a NaN of an earlier segment reaches neither), run ids that do not start at 0 (the
    reverse state of run 0 is then zero) and a log gate; no conditional in the lowered program."""
    from fleetjax.decay import Decays
    from fleetjax.pallas import chunked
    from fleetjax.segments import run_ids_from_segment_ids
    q, k, v, decay, _, seg, wo, _ = _inputs()
    key, value = [x.copy() for x in ((q, wo) if reverse else (k, v))]
    if poison is not None:
        poisoned = key if poison.startswith("key") else value
        poisoned[1, 40, 0, 3] = poisoned[0, 5, 1, 2] = np.inf if "inf" in poison else np.nan
    run_ids = None
    if segments:
        run_ids = run_ids_from_segment_ids(jnp.asarray(seg)) + (1 if segments == "shifted" else 0)
    gate = -np.abs(np.random.default_rng(3).standard_normal(q.shape[:3])).astype(np.float32) * 0.3
    decays = Decays(jnp.log(jnp.asarray(decay)), jnp.asarray(gate) if gated else None)

    def run(on_device):
        config = PallasConfig(**SMALL, num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces,
                              choice_on_device=on_device)
        if reverse:
            f = lambda key, value: chunked.local_reverse_state(key, value, decays, run_ids, scale=0.7,  # noqa: E731
                                                               config=config)
        else:
            f = lambda key, value: chunked.local_state(key, value, decays, run_ids, config=config)  # noqa: E731
        return jax.jit(f).lower(key, value), jax.jit(f)(key, value)

    (lowered, on_device), (_, conds) = run(True), run(False)
    assert "case" not in lowered.as_text()
    (total, local), (want_total, want_local) = ([np.asarray(x) if x is not None else None for x in pair]
                                                for pair in (on_device, conds))
    assert (local is None) == (want_local is None) == (pieces == 1)
    if local is not None:
        np.testing.assert_array_equal(local, want_local)
    finite = np.isfinite(want_total)
    np.testing.assert_array_equal(np.isfinite(total), finite)
    np.testing.assert_array_equal(total[~finite], want_total[~finite])
    np.testing.assert_allclose(total[finite], want_total[finite], rtol=1e-6,
                               atol=1e-6 * np.abs(want_total[finite]).max(initial=0.0))
    if not segments:
        assert np.isnan(total).any() == (poison is not None)


def test_the_choice_on_the_device_launches_no_cond():
    """Forward and backward with PallasConfig.choice_on_device (the default) lower without a conditional (the
    lax.cond's host wait is what it removes); choice_on_device=False keeps one in each."""
    q, k, v, decay, *_ = _inputs()

    def lowered(config):
        f = lambda q, k, v, decay: fleetjax.fleet_attention(  # noqa: E731
            q, k, v, decay, implementation="pallas", config=config)
        return jax.jit(lambda *x: jax.vjp(f, *x)[1](f(*x))).lower(q, k, v, decay).as_text()

    assert "case" not in lowered(PallasConfig(**SMALL))
    assert lowered(PallasConfig(**SMALL, choice_on_device=False)).count("case") >= 2


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_all_finite_sees_one_bad_entry_among_arrays_it_adds(bad):
    """fleetjax.nonfinite.all_finite adds the arrays of one shape and dtype before its reduction: a NaN or inf
    in any of them, at any place, still reads as non-finite (opposite infinities add to NaN), arrays of other
    shapes or dtypes and None are checked too, and a sum of finite entries that overflows is a false alarm."""
    from fleetjax import nonfinite
    rng = np.random.default_rng(0)
    same = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3)]
    other = [rng.standard_normal((5,)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float16)]
    assert bool(nonfinite.all_finite(*same, None, *other))
    if bad is None:  # inf in one array and -inf in another at the same place: NaN in their sum
        same[0][1, 2, 3], same[2][1, 2, 3] = np.inf, -np.inf
        assert not bool(nonfinite.all_finite(*same))
        huge = np.full((2,), 3e38, np.float32)
        assert bool(nonfinite.all_finite(huge)) and not bool(nonfinite.all_finite(huge, huge))  # the false alarm
        return
    for arrays in (same, other):
        for i in range(len(arrays)):
            poisoned = [a.copy() for a in arrays]
            poisoned[i].reshape(-1)[-1] = bad
            assert not bool(nonfinite.all_finite(*poisoned, None)), (i, bad)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_marking_kernel_marks_what_nonfinite_marks(segments, reverse):
    """fleetjax.pallas.marking.mark_reached: NaN exactly where fleetjax.nonfinite.mark_reached puts it (a NaN,
    an inf and a -inf in the source; the last chunk short), the other entries bitwise x; its flags those of
    nonfinite.in_run for the state after the walk (the last segment forward, the first in reverse), also
    without an output to mark (reached_columns); skipped: x itself and no flag."""
    from fleetjax import nonfinite
    from fleetjax.pallas import marking
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 150, 2, 6
    x = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    source = rng.standard_normal((B, T, H, D)).astype(np.float32)
    source[0, 70, 1, 2], source[1, 3, 0, 5], source[1, 140, 1, 0] = np.nan, np.inf, -np.inf
    source = jnp.asarray(source)
    run_ids = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat([40, 50, 60], axis=1), jnp.int32) if segments else None
    got, reached = marking.mark_reached(x, source, run_ids, reverse=reverse, skip=jnp.bool_(False), chunk_size=32,
                                        block=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(nonfinite.mark_reached(x, source, run_ids,
                                                                                     reverse=reverse)))
    which = "first" if reverse else "last"
    np.testing.assert_array_equal(np.asarray(reached),
                                  np.asarray(nonfinite.in_run(nonfinite.bad(source), run_ids, which)))
    skipped, none = marking.mark_reached(x, source, run_ids, reverse=reverse, skip=jnp.bool_(True), chunk_size=32,
                                         block=16)
    np.testing.assert_array_equal(np.asarray(skipped), np.asarray(x))
    assert not np.any(np.asarray(none))
    # The flags alone (reached_columns: no output to mark), run and skipped.
    for skip, want in ((False, reached), (True, none)):
        np.testing.assert_array_equal(np.asarray(marking.reached_columns(
            source, run_ids, reverse=reverse, skip=jnp.bool_(skip), chunk_size=32, block=16)), np.asarray(want))


@pytest.mark.parametrize("segments, gated", [(False, False), (True, False), (True, True)])
def test_the_contained_forward_walk_marks_as_it_walks(segments, gated):
    """fleetjax.pallas.forward.forward_walk with ``contain`` (one piece) marks as it walks: o and the final state
    bitwise fleetjax.nonfinite.mark_forward of the plain walk over the values with their non-finite entries
    zeroed (a NaN, an inf and a -inf in v, several chunks and value blocks, the last of each short, an
    entering state, segments, a log gate); skipped: the o passed in, its buffer taken over, in the rows that a
    per-row witness skips too."""
    from fleetjax import nonfinite
    from fleetjax.chunking import Chunking
    from fleetjax.decay import Decays
    from fleetjax.pallas import forward as fwd
    rng = np.random.default_rng(1)
    B, T, H, K, V = 2, 150, 2, 5, 40
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v, s0 = draw(B, T, H, K), draw(B, T, H, K), draw(B, T, H, V), draw(B, H, K, V)
    v[0, 70, 1, 2], v[1, 3, 0, 35], v[1, 140, 1, 0] = np.nan, np.inf, -np.inf
    q, k, v, s0 = map(jnp.asarray, (q, k, v, s0))
    run_ids = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat([40, 50, 60], axis=1), jnp.int32) if segments else None
    gate = jnp.asarray(-np.abs(draw(B, T, H)) * 0.3) if gated else None
    decays = Decays(jnp.log(jnp.asarray([0.97, 0.5], jnp.float32)), gate)
    walk = functools.partial(fwd.forward_walk, log_decay=decays.log_decay, start=s0, run_ids=run_ids,
                             chunking=Chunking(T, 16, 1), scale=0.7, exact_state=True, local=None,
                             gate=decays.gate_tiles(), **PallasConfig(**SMALL).launch("forward", jnp.float32))
    o, final, _ = walk(q, k, v, contain=True, skip=jnp.bool_(False))
    plain_o, plain_final, _ = walk(q, k, jnp.where(nonfinite.bad(v), 0.0, v), contain=False)
    want_o, want_final = nonfinite.mark_forward(plain_o, plain_final, v, run_ids)
    assert np.isnan(np.asarray(o)).any() and np.isnan(np.asarray(final)).any()
    np.testing.assert_array_equal(np.asarray(o), np.asarray(want_o))
    np.testing.assert_array_equal(np.asarray(final), np.asarray(want_final))
    skipped, _, _ = walk(q, k, v, contain=True, skip=jnp.bool_(True), keep_o=plain_o)
    np.testing.assert_array_equal(np.asarray(skipped), np.asarray(plain_o))
    # Skipped row by row (fleetjax.pallas.launch.call): only row (1, 0), whose states' first rows hold a NaN,
    # walks; row (0, 1)'s NaN is in a second row, which no program reads.
    rows = jnp.zeros((B, H, 2, 3, 8), jnp.float32).at[1, 0, 1, 0, 5].set(jnp.nan).at[0, 1, 0, 1, 2].set(jnp.nan)
    by_row = np.asarray(walk(q, k, v, contain=True, skip=rows, keep_o=jnp.zeros_like(o))[0]).transpose(0, 2, 1, 3)
    walked = np.zeros((B, H), bool)
    walked[1, 0] = True
    np.testing.assert_array_equal(by_row[walked], np.asarray(o).transpose(0, 2, 1, 3)[walked])
    assert not by_row[~walked].any()


@pytest.mark.parametrize("segments", [False, True])
def test_the_backward_marking_kernel_marks_what_the_backward_marks(segments):
    """fleetjax.pallas.marking.mark_backward: dq, dk and dv bitwise those of fleetjax.nonfinite.mark_reached as
    the contained backward marks them (k into dq; dO into dv; q, and any entry of a dO row, into dk), and its
    flags those of the XLA marks: d initial_state's columns (a bad dO of run 0), the heads with a bad entry,
    the positions of d log_gate (a bad k or v before, or a bad q or dO at or after, in the run; the two int32
    flags as joined by marking.gate_reached); skipped: the gradients as passed and no flag."""
    from fleetjax import nonfinite
    from fleetjax.pallas import marking
    rng = np.random.default_rng(0)
    B, T, H, K, V = 2, 150, 2, 5, 7
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v, do = draw(B, T, H, K), draw(B, T, H, K), draw(B, T, H, V), draw(B, T, H, V)
    q[0, 70, 1, 2], k[1, 3, 0, 4], v[1, 100, 1, 0] = np.nan, np.inf, np.nan
    do[0, 20, 0, 6], do[1, 145, 1, 1] = -np.inf, np.nan
    q, k, v, do, dq, dk, dv = map(jnp.asarray, (q, k, v, do, draw(B, T, H, K), draw(B, T, H, K), draw(B, T, H, V)))
    run_ids = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat([40, 50, 60], axis=1), jnp.int32) if segments else None
    bad_q, bad_k, bad_v, bad_do = (nonfinite.bad(x) for x in (q, k, v, do))
    any_entry = jnp.where(jnp.any(bad_do, -1, keepdims=True), jnp.nan, 0.0)
    want = dict(dq=nonfinite.mark_reached(dq, k, run_ids), dv=nonfinite.mark_reached(dv, do, run_ids, reverse=True),
                dk=nonfinite.mark_reached(nonfinite.mark_reached(dk, q, run_ids, reverse=True), any_entry, run_ids,
                                          reverse=True),
                first=nonfinite.in_run(bad_do, run_ids, "first"),
                head=jnp.any(bad_q.any((1, 3)) | bad_k.any((1, 3)) | bad_v.any((1, 3)) | bad_do.any((1, 3)), axis=0))
    after = nonfinite.reached((bad_k.any(-1) | bad_v.any(-1))[..., None], run_ids, exclusive=True)[..., 0]
    before = nonfinite.reached((bad_q.any(-1) | bad_do.any(-1))[..., None], run_ids, reverse=True)[..., 0]
    want["gate"] = jnp.swapaxes(after | before, 1, 2)
    got = marking.mark_backward(dq, dk, dv, q, k, v, do, run_ids, skip=jnp.bool_(False), gate_marks=True,
                                chunk_size=32)
    got = got[:5] + (marking.gate_reached(got[5], jnp.bool_(False)),)
    for name, a in zip(("dq", "dk", "dv", "first", "head", "gate"), got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(want[name]), err_msg=name)
    skipped = marking.mark_backward(dq, dk, dv, q, k, v, do, run_ids, skip=jnp.bool_(True), gate_marks=True,
                                    chunk_size=32)
    for a, b in zip(skipped[:3], (dq, dk, dv)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    flags = skipped[3:5] + (marking.gate_reached(skipped[5], jnp.bool_(True)),)
    assert not any(np.any(np.asarray(flag)) for flag in flags)


@pytest.mark.parametrize("implementation", ["pallas", "pallas_fleet"])
def test_the_triton_kernels_lower_for_a_gpu(monkeypatch, implementation):
    """Lowered for a CUDA GPU on any host: every Triton module of the op's forward and backward (the choice
    on the device, segments, gates, sequence pieces) passes MLIR's verifier, which the GPU's compiler applies
    first. The kernels run in interpret mode here, so this is the one check of their Triton lowering that
    needs no GPU; it is how a select whose literal Pallas-Triton typed as a bool was found (2026-12-04)."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    from fleetjax.pallas import chunked, fleet, launch, walk
    from fleetjax.pallas.mosaic import config as mosaic_config
    lower, modules, refused = registration.lowering.lower_jaxpr_to_triton_module, [], []

    def verified(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result)
        try:
            result.module.operation.verify()
        except Exception as e:  # noqa: BLE001 - the verifier's message is the finding
            refused.append(str(e)[:400])
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", verified)
    gpu_info = getattr(registration, "gpu_info_lib", None)
    if gpu_info is not None:  # jax >= 0.11 asks the device what GPU it lowers for: an H100 here
        monkeypatch.setattr(gpu_info, "get_gpu_info",
                            lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    for module in (launch, walk, chunked, fleet, mosaic_config):  # the kernels as a GPU would launch them
        monkeypatch.setattr(module, "on_gpu", lambda: True)
    rng = np.random.default_rng(0)
    B, T, H, K, V = 2, 200, 2, 16, 16
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.bfloat16)
    decay, s0 = jnp.asarray([0.9, 0.5], jnp.float32), jnp.zeros((B, H, K, V), jnp.float32)
    gate = jnp.asarray(-np.abs(rng.standard_normal((B, T, H))) * 0.3, jnp.float32)
    seg = jnp.asarray(np.repeat([[0, 1]], B, 0).repeat([90, 110], axis=1), jnp.int32)
    for segments, gated, pieces in [(False, False, 1), (True, False, 2), (False, True, 2), (True, True, 1)]:
        config = (PallasConfig(num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces)
                  if implementation == "pallas" else FleetConfig(num_sequence_pieces=pieces))

        def f(q, k, v, decay, s0, gate, segments=segments, gated=gated, config=config):
            return fleetjax.fleet_attention(q, k, v, decay, initial_state=s0, log_gate=gate if gated else None,
                                            segment_ids=seg if segments else None, return_final_state=True,
                                            implementation=implementation, config=config)

        def step(*x, f=f):
            out, pullback = jax.vjp(f, *x)
            return pullback(out)

        jax.jit(step).trace(q, k, v, decay, s0, gate).lower(lowering_platforms=("cuda",))
    if implementation == "pallas":  # the contained forward skipping row by row, as after the Mosaic walk
        from fleetjax.chunking import Chunking
        from fleetjax.pallas import forward
        contained = lambda q, k, v, rows: forward.forward_walk(  # noqa: E731
            q, k, v, jnp.log(decay), None, None, Chunking(T, 64, 1), scale=1.0, exact_state=False, contain=True,
            local=None, skip=rows, keep_o=v, **PallasConfig().launch("forward", q.dtype))[0]
        states = jnp.zeros((B, H, 2, K, V), jnp.float32)
        jax.jit(contained).trace(q, k, v, states).lower(lowering_platforms=("cuda",))
    assert modules and not refused, refused


@pytest.mark.parametrize("implementation", ["pallas", "pallas_fleet"])
def test_a_gradient_of_some_inputs_equals_the_full_vjps(implementation):
    """The VJP forms only the gradients of the inputs it differentiates (fleetjax.vjp.Wanted's q, k, v): each
    subset's gradients equal, bitwise, those of the VJP over q, k, v and the decay if the subset holds it (a
    fixed decay spares the float32-accurate products of its sums, which moves the last bits), with a NaN in
    v (the contained walks' path) too; one array passed as both q and k gets the sum of both gradients."""
    q, k, v, decay, s0, seg, wo, _ = _inputs()
    config = PallasConfig(**SMALL) if implementation == "pallas" else FleetConfig(block_k=16, block_v=16,
                                                                                 tokens_per_step=16)

    def f(q, k, v, decay):
        return fleetjax.fleet_attention(q, k, v, decay, segment_ids=seg, implementation=implementation,
                                        config=config)

    poisoned_v = v.copy()
    poisoned_v[1, 40, 0, 3] = np.nan
    for values in (v, poisoned_v):
        args = tuple(map(jnp.asarray, (q, k, values, decay)))
        full = {learned: jax.jit(lambda *x, learned=learned: jax.vjp(
            lambda q, k, v, d: f(q, k, v, d if learned else args[3]), *x)[1](jnp.asarray(wo)))(*args)
            for learned in (False, True)}
        for subset in [(0,), (2,), (1, 3)]:
            def some(*chosen, subset=subset):
                x = list(args)
                for i, c in zip(subset, chosen):
                    x[i] = c
                return f(*x)

            got = jax.jit(lambda *c, some=some: jax.vjp(some, *c)[1](jnp.asarray(wo)))(*(args[i] for i in subset))
            for i, g in zip(subset, got):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(full[3 in subset][i]), err_msg=f"{subset} {i}")
    same = jax.jit(lambda x: jax.vjp(lambda x: f(x, x, jnp.asarray(v), jnp.asarray(decay)), x)[1](jnp.asarray(wo)))
    both = jax.jit(lambda x: jax.vjp(lambda a, b: f(a, b, jnp.asarray(v), jnp.asarray(decay)), x, x)[1](
        jnp.asarray(wo)))
    np.testing.assert_allclose(np.asarray(same(jnp.asarray(q))[0]),
                               np.asarray(sum(both(jnp.asarray(q))[:2])), rtol=0, atol=0)


@pytest.mark.parametrize("B, T, H, C", [(2, 192, 3, 64), (1, 128, 16, 64), (3, 96, 5, 32)])
def test_the_gate_sums_kernel_forms_what_decays_forms(B, T, H, C):
    """fleetjax.pallas.gate: the gate transposed (bitwise), its log decay summed within chunks in base 2 and
    over blocks of chunks (within float32 roundings of Decays' XLA forms), any head count (padded tiles)."""
    from fleetjax.decay import Decays
    from fleetjax.pallas import gate
    rng = np.random.default_rng(B * T + H)
    log_gate = jnp.asarray(-rng.exponential(0.5, (B, T, H)), jnp.float32).at[0, 5, 0].set(-40.0)
    decays = Decays(jnp.asarray(-rng.exponential(0.05, (H,)), jnp.float32), log_gate)
    formed = gate.formed(decays, C)
    assert isinstance(formed, gate.FormedDecays) and formed.totals.shape == (B, H, T // C)
    assert jnp.array_equal(formed.gate_tiles(), decays.gate_tiles())
    np.testing.assert_allclose(formed.within_chunks(B, T, C, base2=True), decays.within_chunks(B, T, C, base2=True),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(formed.within_chunks(B, T, C), decays.within_chunks(B, T, C), rtol=1e-6, atol=1e-5)
    for length in (C, 2 * C, T, 3 * C // 2):  # 3C/2 is not whole chunks: Decays' own form
        np.testing.assert_allclose(formed.block_sums(B, T, length), decays.block_sums(B, T, length), rtol=1e-6)
    assert gate.formed(Decays(decays.log_decay), C).gated is False
    assert not isinstance(gate.formed(Decays(decays.log_decay, log_gate[:, :T - 1]), C), gate.FormedDecays)


@pytest.mark.parametrize("pieces", [1, 3])
def test_the_formed_gate_sums_serve_the_walks_and_the_backward(pieces):
    """A config with Mosaic walks forms the gate's sums once and hands them to the backward as a residual; on
    the CPU the Triton walks then read the formed gate and pieces' sums: the op's outputs and gradients (the
    gate's too) as without them, within float32 roundings."""
    from fleetjax.pallas import mosaic
    q, k, v, decay, s0, _, wo, wf = _inputs(T=128)  # whole chunks of the Mosaic walks' 64
    log_gate = jnp.asarray(-np.random.default_rng(4).exponential(0.3, q.shape[:3]), jnp.float32)
    plain = PallasConfig(**SMALL, num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces)
    formed = dataclasses.replace(plain, mosaic_walks=mosaic.MosaicWalkConfig(gate_sums=True))

    def run(config):
        def loss(q, k, v, decay, gate, s0):
            o, f = fleetjax.fleet_attention(q, k, v, decay, log_gate=gate, initial_state=s0, scale=0.7,
                                            return_final_state=True, implementation="pallas", config=config)
            return jnp.sum(o * wo) + jnp.sum(f * wf), (o, f)
        (_, (o, f)), g = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(q, k, v, decay, log_gate, s0)
        return (o, f) + tuple(g)

    text = str(jax.make_jaxpr(lambda: run(formed))())
    assert text.count("name=gate_sums") == 1  # formed in the forward, reused by the backward
    assert "name=gate_sums" not in str(jax.make_jaxpr(lambda: run(plain))())
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "ddecay", "dgate", "dinitial"), run(formed), run(plain)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("B, H, T, C, blocks", [(2, 3, 256, 64, (4, 2)), (1, 2, 48 * 16, 16, (1, 3)),
                                                (1, 1, 64, 64, (2, 2))])
@pytest.mark.parametrize("plain_chosen", [True, False])
def test_the_gate_grad_launch_forms_what_vjp_forms(B, H, T, C, blocks, plain_chosen):
    """fleetjax.pallas.gate_grad: d log_gate from the chosen side's per-block parts (the plain side's spanned
    from its row and column sums, the contained side's its own) and NaN where either of the marking's flags
    is positive, with the contained parts alone (the plain ones never read them), within float32 roundings of
    fleetjax.vjp.log_gate_grad's XLA form; chunk counts that 16 does not divide (48 = 3 tiles of 16; 1)."""
    from fleetjax import vjp
    from fleetjax.pallas import gate_grad
    rng = np.random.default_rng(T + B)
    part = lambda n: jnp.asarray(rng.standard_normal((n, B, H, T)), jnp.float32)  # noqa: E731
    plain = dict(w=part(blocks[0]), u=part(blocks[1]), row=part(blocks[0]), column=part(blocks[1]))
    contained = dict(w=part(blocks[1]), u=part(blocks[0]), spanned=part(blocks[1]))
    marks = jnp.asarray(rng.random((B, H, T)) < 0.05)
    # The marking's two flags, each holding some of the marks; read with the contained parts alone.
    split = jnp.asarray(rng.random((B, H, T)) < 0.5)
    reached = (jnp.where(marks & split, 1, 0), jnp.where(marks & ~split, 2, 0))
    got = gate_grad.log_gate_grad(plain, contained, reached, jnp.asarray(plain_chosen), chunk_size=C)
    marks = marks & (not plain_chosen)
    side = {k: jnp.sum(a, axis=0) for k, a in (plain if plain_chosen else contained).items()}
    if plain_chosen:
        side["spanned"] = vjp.spanned_from_sums(side.pop("row"), side.pop("column"), C)
    want = vjp.log_gate_grad(side["w"], side["u"], side["spanned"], None, C)
    assert got.shape == (B, H, T)
    np.testing.assert_array_equal(np.isnan(got), np.asarray(marks))
    np.testing.assert_allclose(np.where(marks, 0, got), np.where(marks, 0, want), rtol=0,
                               atol=2e-6 * float(jnp.abs(want).max()))
    assert gate_grad.serves(T, C) and not gate_grad.serves(T + 1, C) and not gate_grad.serves(C // 2, C)


@pytest.mark.parametrize("pieces", [1, 3])
def test_the_gate_grad_launch_gives_the_ops_gradients(pieces):
    """PallasConfig.gate_grad_kernel: the op's gradients as without it (the gate's within float32 roundings,
    the others bitwise), also with a NaN key (the contained walks' parts chosen, the same NaNs), with one
    gate_grad launch in the backward; a learned decay beside the gate keeps XLA's form (no launch)."""
    q, k, v, _, _, _, wo, _ = (None if x is None else jnp.asarray(x) for x in _inputs(T=128))
    log_gate = jnp.asarray(-np.random.default_rng(5).exponential(0.3, q.shape[:3]), jnp.float32)
    plain = PallasConfig(**SMALL, num_sequence_pieces=pieces, backward_num_sequence_pieces=pieces,
                         gate_grad_kernel=False)
    launch = dataclasses.replace(plain, gate_grad_kernel=True)

    def grads(config, k, decay=None):
        f = lambda q, k, v, gate, decay: fleetjax.fleet_attention(  # noqa: E731
            q, k, v, decay, log_gate=gate, implementation="pallas", config=config)
        argnums = (0, 1, 2, 3) + ((4,) if decay is not None else ())
        return jax.grad(lambda *a: jnp.sum(f(*a) * wo), argnums=argnums)(q, k, v, log_gate, decay)

    for keys in (k, k.at[0, 70, 1, 3].set(jnp.nan)):
        for name, a, b in zip(("dq", "dk", "dv", "dgate"), grads(launch, keys), grads(plain, keys)):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
            tolerance = 2e-6 * float(jnp.nanmax(jnp.abs(b))) if name == "dgate" else 0
            np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=0, atol=tolerance, err_msg=name)
    assert str(jax.make_jaxpr(lambda: grads(launch, k))()).count("name=fleet_gate_grad") == 1
    decay = jnp.full((q.shape[2],), 0.95, jnp.float32)
    assert "name=fleet_gate_grad" not in str(jax.make_jaxpr(lambda: grads(launch, k, decay))())
