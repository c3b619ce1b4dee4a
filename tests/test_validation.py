"""Bad input at the public boundary raises ValueError/TypeError whose message names the argument
and what was expected."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fleetjax
import fleetjax.api

B, T, H, K, V = 2, 5, 3, 4, 6


def _args(**override):
    rng = np.random.default_rng(0)
    args = dict(q=jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32),
                k=jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32),
                v=jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32),
                decay=jnp.asarray([0.9, 0.5, 1.0], jnp.float32))
    args.update(override)
    return args


def _call(**override):
    args = _args(**{name: value for name, value in override.items() if name in ("q", "k", "v", "decay")})
    kwargs = {name: value for name, value in override.items() if name not in ("q", "k", "v", "decay")}
    return fleetjax.fleet_attention(args["q"], args["k"], args["v"], args["decay"], **kwargs)


def _names(argument: str) -> str:
    """A regex that finds the argument's name as a word of the message."""
    return rf"(^|[^\w.]){re.escape(argument)}(?!\w)"


f32 = jnp.float32
BAD = [
    # (argument named in the message, exception, overrides)
    ("q", ValueError, dict(q=jnp.zeros((B, T, H), f32))),
    ("q", ValueError, dict(q=jnp.zeros((B, T, H, K, 1), f32))),
    ("q", TypeError, dict(q=jnp.zeros((B, T, H, K), jnp.int32))),
    ("k", ValueError, dict(k=jnp.zeros((B, T, H, K + 1), f32))),
    ("k", ValueError, dict(k=jnp.zeros((B, T + 1, H, K), f32))),
    ("k", ValueError, dict(k=jnp.zeros((B, T, H), f32))),
    ("k", TypeError, dict(k=jnp.zeros((B, T, H, K), jnp.int8))),
    ("v", ValueError, dict(v=jnp.zeros((B + 1, T, H, V), f32))),
    ("v", ValueError, dict(v=jnp.zeros((B, T, H + 1, V), f32))),
    ("v", ValueError, dict(v=jnp.zeros((B, T, H * V), f32))),
    ("v", TypeError, dict(v=jnp.zeros((B, T, H, V), bool))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, 0.5], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray(0.9, f32))),
    ("decay", ValueError, dict(decay=jnp.full((1, H), 0.9, f32))),
    ("decay", TypeError, dict(decay=jnp.ones((H,), jnp.int32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, 0.0, 0.5], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, -0.5, 0.5], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, 1.5, 0.5], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, np.nan, 0.5], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray([np.inf, 0.5, 0.5], f32))),
    ("decay", ValueError, dict(decay=np.asarray([0.9, 1.0 + 1e-6, 0.5]))),
    ("initial_state", ValueError, dict(initial_state=jnp.zeros((B, H, K, V + 1), f32))),
    ("initial_state", ValueError, dict(initial_state=jnp.zeros((H, K, V), f32))),
    ("initial_state", ValueError, dict(initial_state=jnp.zeros((B, H, V, K), f32))),
    ("initial_state", TypeError, dict(initial_state=jnp.zeros((B, H, K, V), jnp.int32))),
    ("segment_ids", ValueError, dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32))),
    ("segment_ids", ValueError, dict(segment_ids=jnp.zeros((B * T,), jnp.int32))),
    ("segment_ids", ValueError, dict(segment_ids=jnp.zeros((B, T, 1), jnp.int32))),
    ("segment_ids", TypeError, dict(segment_ids=jnp.zeros((B, T), f32))),
    ("segment_ids", TypeError, dict(segment_ids=jnp.zeros((B, T), bool))),
    ("log_gate", ValueError, dict(log_gate=jnp.full((B, T, H), 0.1, f32))),  # a gate above 1
    ("log_gate", ValueError, dict(log_gate=jnp.full((B, T, H), -np.inf, f32))),
    ("log_gate", ValueError, dict(log_gate=jnp.zeros((B, H, T), f32))),
    ("log_gate", ValueError, dict(log_gate=jnp.zeros((B, T), f32))),
    ("log_gate", TypeError, dict(log_gate=jnp.zeros((B, T, H), jnp.int32))),
    ("decay", TypeError, dict(decay=None)),  # None needs a log_gate
    ("implementation", ValueError, dict(implementation="flash")),
    ("implementation", ValueError, dict(implementation="XLA")),
    ("config", TypeError, dict(implementation="xla", config={"chunk_size": 16})),
    ("config", TypeError, dict(implementation="scan", config=fleetjax.api.IMPLEMENTATIONS["xla"].config_type())),
    ("scale", TypeError, dict(scale=jnp.asarray([1.0, 2.0]))),
    ("scale", TypeError, dict(scale=float("nan"))),
    ("scale", TypeError, dict(scale="2")),
]


def _id(row) -> str:
    argument, error, override = row
    shown = ",".join(f"{name}={getattr(value, 'shape', value)!s}" if hasattr(value, "shape") else f"{name}={value!r}"
                     for name, value in override.items())
    return f"{argument}-{error.__name__}-{shown}"


@pytest.mark.parametrize("argument, error, override", BAD, ids=[_id(row) for row in BAD])
def test_bad_input_names_the_argument(argument, error, override):
    with pytest.raises(error, match=_names(argument)):
        _call(**override)


@pytest.mark.parametrize("implementation", sorted(fleetjax.IMPLEMENTATIONS))
def test_every_implementation_is_validated(implementation):
    """Validation happens before dispatch, whatever the implementation."""
    with pytest.raises(ValueError, match=_names("v")):
        _call(v=jnp.zeros((B, T + 1, H, V), f32), implementation=implementation)
    with pytest.raises(ValueError, match=_names("decay")):
        _call(decay=jnp.asarray([0.9, 2.0, 0.5], f32), implementation=implementation)


def test_wrong_config_type_for_every_configurable_implementation():
    """Each implementation with a config rejects another implementation's config."""
    configurable = {name: impl for name, impl in fleetjax.IMPLEMENTATIONS.items() if impl.config_type is not None}
    assert "xla" in configurable
    for name in configurable:
        for other, impl in configurable.items():
            if impl.config_type is configurable[name].config_type:
                continue
            with pytest.raises(TypeError, match=_names("config")):
                _call(implementation=name, config=impl.config_type())


def test_bad_xla_config_values():
    config_type = fleetjax.IMPLEMENTATIONS["xla"].config_type
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            config_type(chunk_size=bad)


def test_traced_scale_is_rejected():
    args = _args()
    with pytest.raises(TypeError, match=_names("scale")):
        jax.jit(lambda s: fleetjax.fleet_attention(args["q"], args["k"], args["v"], args["decay"], scale=s))(0.5)


def test_concrete_scale_forms_are_accepted():
    args = _args()
    ref = fleetjax.fleet_attention(**args, scale=0.5)
    for scale in (np.float32(0.5), jnp.asarray(0.5), np.asarray(0.5)):
        np.testing.assert_array_equal(np.asarray(fleetjax.fleet_attention(**args, scale=scale)), np.asarray(ref))


def test_traced_decay_under_jit_is_accepted():
    """A learned decay is a tracer: its values cannot be checked and the call must go through."""
    args = _args()
    eager = fleetjax.fleet_attention(**args)
    traced = jax.jit(lambda d: fleetjax.fleet_attention(args["q"], args["k"], args["v"], d))(args["decay"])
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda d: jnp.sum(fleetjax.fleet_attention(args["q"], args["k"], args["v"], d)))(args["decay"])
    assert grad.shape == (H,) and bool(jnp.all(jnp.isfinite(grad)))


def test_traced_inputs_are_shape_checked():
    """Shape checks need no concrete values: they fire under jit too."""
    args = _args()
    with pytest.raises(ValueError, match=_names("k")):
        jax.jit(lambda q, k: fleetjax.fleet_attention(q, k, args["v"], args["decay"]))(
            args["q"], jnp.zeros((B, T, H, K + 2), f32))


def test_numpy_and_python_inputs_are_accepted():
    args = _args()
    ref = fleetjax.fleet_attention(**args)
    got = fleetjax.fleet_attention(np.asarray(args["q"]), np.asarray(args["k"]), np.asarray(args["v"]),
                                   [0.9, 0.5, 1.0])
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
    seg = np.zeros((B, T), np.int64)  # any integer dtype
    np.testing.assert_allclose(np.asarray(fleetjax.fleet_attention(**args, segment_ids=seg)), np.asarray(ref),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ decode_step

def _step_args(**override):
    rng = np.random.default_rng(1)
    args = dict(q_t=jnp.asarray(rng.standard_normal((B, H, K)), f32),
                k_t=jnp.asarray(rng.standard_normal((B, H, K)), f32),
                v_t=jnp.asarray(rng.standard_normal((B, H, V)), f32),
                decay=jnp.asarray([0.9, 0.5, 1.0], f32), state=jnp.zeros((B, H, K, V), f32))
    args.update(override)
    return args


BAD_STEP = [
    ("q_t", ValueError, dict(q_t=jnp.zeros((B, 1, H, K), f32))),
    ("q_t", TypeError, dict(q_t=jnp.zeros((B, H, K), jnp.int32))),
    ("k_t", ValueError, dict(k_t=jnp.zeros((B, H, K + 1), f32))),
    ("v_t", ValueError, dict(v_t=jnp.zeros((B, H + 1, V), f32))),
    ("v_t", ValueError, dict(v_t=jnp.zeros((B, H), f32))),
    ("state", ValueError, dict(state=jnp.zeros((B, H, K, V + 1), f32))),
    ("state", ValueError, dict(state=jnp.zeros((B, H, V, K), f32))),
    ("state", TypeError, dict(state=jnp.zeros((B, H, K, V), jnp.int32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, 0.5], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, 0.0, 1.0], f32))),
    ("decay", ValueError, dict(decay=jnp.asarray([0.9, 1.01, 1.0], f32))),
    ("log_gate", ValueError, dict(log_gate=jnp.zeros((B, H, 1), f32))),
    ("log_gate", ValueError, dict(log_gate=jnp.full((B, H), 0.5, f32))),
    ("state", TypeError, dict(state=None)),
]


@pytest.mark.parametrize("argument, error, override", BAD_STEP, ids=[_id(row) for row in BAD_STEP])
def test_decode_step_bad_input_names_the_argument(argument, error, override):
    args = _step_args(**override)
    with pytest.raises(error, match=_names(argument)):
        fleetjax.decode_step(args["q_t"], args["k_t"], args["v_t"], args["decay"], args["state"],
                             log_gate=args.get("log_gate"))


def test_decode_step_traced_scale_is_rejected():
    args = _step_args()
    with pytest.raises(TypeError, match=_names("scale")):
        jax.jit(lambda s: fleetjax.decode_step(*args.values(), scale=s))(1.0)


def test_head_first_layout_is_named():
    """q, k, v given as [B, H, T, K] with the decay's length equal to axis 1: the message says so."""
    args = _args()
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    decay = jnp.full((H,), 0.9, f32)  # one per head: the length of axis 1 of the head-first arrays
    with pytest.raises(ValueError, match="head-first"):
        fleetjax.fleet_attention(swap(args["q"]), swap(args["k"]), swap(args["v"]), decay)


@pytest.mark.parametrize("impl", sorted(fleetjax.IMPLEMENTATIONS))
def test_traced_decay_and_gate_stage_no_effect(impl):
    """A traced decay or gate is taken as given: nothing is staged that would give the caller's jaxpr an
    effect (a jitted function with one leaves JAX's fast dispatch path), forward, gradient or decode step."""
    args = _args()

    def loss(decay, log_gate):
        o = fleetjax.fleet_attention(args["q"], args["k"], args["v"], decay, log_gate=log_gate, implementation=impl)
        return jnp.sum(o.astype(f32))

    gate = jnp.zeros((B, T, H), f32)
    assert not jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(args["decay"], gate).effects
    state = jnp.zeros((B, H, K, V), f32)
    step = lambda decay, g: fleetjax.decode_step(args["q"][:, 0], args["k"][:, 0], args["v"][:, 0], decay,  # noqa: E731
                                                state, log_gate=g)
    assert not jax.make_jaxpr(step)(args["decay"], gate[:, 0]).effects


def test_a_caller_checks_its_traced_decay_with_checkify():
    """The README's recipe: the caller's own checkify.check on its parameter reports a bad traced decay."""
    from jax.experimental import checkify
    args = _args()

    def f(decay):
        checkify.check(jnp.all((decay > 0) & (decay <= 1)), "decay must lie in (0, 1]")
        return fleetjax.fleet_attention(args["q"], args["k"], args["v"], decay)

    checked = checkify.checkify(jax.jit(f))
    error, _ = checked(jnp.asarray([0.9, 1.5, 0.5], f32))
    assert error.get() is not None and "decay must lie in (0, 1]" in error.get()
    error, _ = checked(args["decay"])
    assert error.get() is None
