"""fleetjax.nn.FleetAttention (nnx) and fleetjax.nn.linen.FleetAttention: shapes, decoding, gradients."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fleetjax.nn import FleetAttention, multiscale_decays
from fleetjax.nn import linen as fleet_linen

TOL = dict(rtol=2e-5, atol=2e-5)


def _x(B=2, T=11, F=12, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (B, T, F), dtype)


def _nnx_layer(**kwargs) -> FleetAttention:
    # "scan" compiles fastest where the layer runs eagerly (op by op); the implementations agree (test_op.py).
    kwargs.setdefault("implementation", "scan")
    return FleetAttention(3, 12, rngs=nnx.Rngs(0), **kwargs)


# ------------------------------------------------------------------------------------------------------ nnx

@pytest.mark.parametrize("kwargs, out_features", [
    ({}, 12),
    ({"qkv_features": 6, "value_features": 9, "out_features": 5}, 5),
    ({"normalize_heads": False, "output_gate": False, "use_bias": True}, 12),
])
def test_nnx_shapes(kwargs, out_features):
    layer = _nnx_layer(**kwargs)
    y = layer(_x())
    assert y.shape == (2, 11, out_features) and y.dtype == jnp.float32
    assert layer.decay_logit.shape == (3,)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_nnx_dtype_and_param_dtype():
    layer = _nnx_layer(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert layer(_x()).dtype == jnp.bfloat16
    assert layer.query.kernel.dtype == jnp.float32


def test_multiscale_initialisation_is_retnets():
    layer = FleetAttention(8, 16, rngs=nnx.Rngs(0))
    expected = 1 - 2.0 ** (-5 - np.arange(8))  # RetNet's schedule for 8 heads
    np.testing.assert_allclose(np.asarray(layer.decay), expected, rtol=1e-6)
    decays = multiscale_decays(32)
    assert np.all((decays > 0) & (decays < 1)) and np.all(np.diff(decays) > 0)


@pytest.mark.parametrize("kwargs", [{}, {"normalize_heads": False, "output_gate": False},
                                    {"qkv_features": 6, "value_features": 9}, {"gate_rank": 4}])
def test_nnx_decode_token_by_token_equals_forward(kwargs):
    layer = _nnx_layer(**kwargs)
    x = _x()
    full = layer(x)
    layer.init_cache(x.shape)
    steps = [layer(x[:, t:t + 1], decode=True) for t in range(x.shape[1])]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    assert int(layer.cache_index[...]) == x.shape[1]
    assert layer.cached_state.shape == (2, 3, layer.head_dim, layer.value_head_dim)


def test_nnx_decode_prompt_then_tokens_equals_forward():
    layer = _nnx_layer(decode=True)
    x = _x()
    full = layer(x, decode=False)
    layer.init_cache(x.shape)
    parts = [layer(x[:, :5]), layer(x[:, 5:6]), layer(x[:, 6:9]), layer(x[:, 9:10]), layer(x[:, 10:])]
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, **TOL)


def test_nnx_decode_under_jit():
    layer = _nnx_layer()
    x = _x()
    full = layer(x)
    layer.init_cache(x.shape)
    step = nnx.jit(lambda m, x_t: m(x_t, decode=True))
    steps = [step(layer, x[:, t:t + 1]) for t in range(x.shape[1])]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)


def test_nnx_decay_receives_gradients():
    x = _x()
    target = _x(seed=7)
    loss = lambda m: jnp.mean((m(x) - target) ** 2)
    grads = nnx.jit(nnx.grad(loss))(_nnx_layer(implementation="xla"))
    g = np.asarray(grads.decay_logit[...])
    assert g.shape == (3,) and np.all(np.isfinite(g)) and np.all(g != 0)
    # Every parameter's gradient through the custom VJP of "xla" as through plain autodiff of the "scan"
    # recurrence.
    chex.assert_trees_all_close(grads, nnx.jit(nnx.grad(loss))(_nnx_layer(implementation="scan")), rtol=1e-4,
                                atol=1e-7)


def test_nnx_segment_ids_match_separate_sequences():
    layer = _nnx_layer()
    x = _x(B=1, T=10)
    seg = jnp.array([[0] * 4 + [1] * 6])
    packed = layer(x, segment_ids=seg)
    np.testing.assert_allclose(packed[:, :4], layer(x[:, :4]), **TOL)
    np.testing.assert_allclose(packed[:, 4:], layer(x[:, 4:]), **TOL)


def test_nnx_implementation_passthrough():
    x = _x()
    np.testing.assert_allclose(_nnx_layer(implementation="scan")(x), _nnx_layer(implementation="quadratic")(x),
                               **TOL)
    with pytest.raises(ValueError, match="implementation"):
        _nnx_layer(implementation="nope")(x)


def test_nnx_bad_inputs():
    layer = _nnx_layer()
    with pytest.raises(ValueError, match="in_features"):
        layer(_x(F=8))
    with pytest.raises(ValueError, match=r"\[B, T, features\]"):
        layer(jnp.ones((11, 12)))
    with pytest.raises(ValueError, match="init_cache"):
        layer(_x(T=1), decode=True)
    with pytest.raises(ValueError, match="divisible"):
        FleetAttention(3, 10, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="segment_ids"):
        layer(_x(), segment_ids=jnp.zeros((2, 11)))
    layer.init_cache((2, 1, 12))
    with pytest.raises(ValueError, match="batch"):
        layer(_x(B=3, T=1), decode=True)


def test_nnx_arguments_in_multi_head_attentions_order():
    """FleetAttention(num_heads, in_features), as flax.nnx.MultiHeadAttention; the features-first order of old
    is refused with a message that names the order."""
    layer = FleetAttention(4, 32, rngs=nnx.Rngs(0))
    assert (layer.num_heads, layer.in_features, layer.head_dim) == (4, 32, 8)
    reference = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0))
    assert (reference.num_heads, reference.in_features) == (layer.num_heads, layer.in_features)
    with pytest.raises(ValueError, match=r"qkv_features \(4\) must be divisible by num_heads \(32\); "
                                         r"FleetAttention takes \(num_heads, in_features\)"):
        FleetAttention(32, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("input_shape, says", [
    (2, r"input_shape must be a tuple \[B, T, 12\] or \[B, 12\].*got 2; for a batch of 2: init_cache\(\(2, 1, 12\)\)"),
    ((2, 1, 8), r"input_shape must be a tuple \[B, T, 12\] or \[B, 12\].*got \(2, 1, 8\)$"),
    ((2, 3, 1, 12), r"got \(2, 3, 1, 12\)$"),
])
def test_nnx_init_cache_names_the_expected_shape(input_shape, says):
    with pytest.raises(ValueError, match=says):
        _nnx_layer().init_cache(input_shape)


# ---------------------------------------------------------------------------------------------------- linen

def test_linen_shapes_and_param_names():
    layer = fleet_linen.FleetAttention(num_heads=3, qkv_features=6, value_features=9, out_features=5,
                                       implementation="scan")
    x = _x()
    variables = layer.init(jax.random.key(0), x)
    params = variables["params"]
    assert set(params) == {"query", "key", "value", "gate", "out", "decay_logit", "head_norm_scale"}
    assert params["decay_logit"].shape == (3,) and params["head_norm_scale"].shape == (3, 3)
    assert layer.apply(variables, x).shape == (2, 11, 5)


def test_linen_decode_token_by_token_equals_forward():
    layer = fleet_linen.FleetAttention(num_heads=3, implementation="scan")
    x = _x()
    variables = layer.init(jax.random.key(0), x)
    full = layer.apply(variables, x)
    cache = layer.init(jax.random.key(0), x, decode=True)["cache"]
    assert not np.any(np.asarray(cache["cached_state"]))
    outputs = []
    for t in range(x.shape[1]):
        y_t, mutated = layer.apply({**variables, "cache": cache}, x[:, t:t + 1], decode=True, mutable=["cache"])
        cache = mutated["cache"]
        outputs.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, **TOL)
    assert int(cache["cache_index"]) == x.shape[1]
    # A prompt of several positions, then one token.
    cache = layer.init(jax.random.key(0), x, decode=True)["cache"]
    head, mutated = layer.apply({**variables, "cache": cache}, x[:, :10], decode=True, mutable=["cache"])
    tail, _ = layer.apply({**variables, **mutated}, x[:, 10:], decode=True, mutable=["cache"])
    np.testing.assert_allclose(jnp.concatenate([head, tail], axis=1), full, **TOL)


def test_linen_decay_receives_gradients():
    layer = fleet_linen.FleetAttention(num_heads=3, implementation="scan")
    x = _x()
    params = layer.init(jax.random.key(0), x)["params"]
    grads = jax.grad(lambda p: jnp.mean(layer.apply({"params": p}, x) ** 2))(params)
    g = np.asarray(grads["decay_logit"])
    assert np.all(np.isfinite(g)) and np.all(g != 0)


def test_linen_equals_nnx_with_the_same_parameters():
    nnx_layer = _nnx_layer(use_bias=True)
    lin = fleet_linen.FleetAttention(num_heads=3, use_bias=True, implementation="scan")
    x = _x()
    params = {name: {"kernel": getattr(nnx_layer, name).kernel[...], "bias": getattr(nnx_layer, name).bias[...]}
              for name in ("query", "key", "value", "gate", "out")}
    params["decay_logit"] = nnx_layer.decay_logit[...]
    params["head_norm_scale"] = nnx_layer.head_norm_scale[...]
    np.testing.assert_allclose(lin.apply({"params": params}, x), nnx_layer(x), **TOL)


def test_sequence_axis_name_reaches_fleet_attention():
    from jax.sharding import Mesh, PartitionSpec as P

    x = _x()
    plain = _nnx_layer()
    sharded = _nnx_layer(sequence_axis_name="seq")
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    graphdef, state = nnx.split(sharded)
    body = lambda state, x: nnx.merge(graphdef, state)(x)
    y = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq")))(state, x)
    np.testing.assert_allclose(y, plain(x), **TOL)
    with pytest.raises(ValueError, match="sequence_axis_name"):  # really used: outside shard_map it is unbound
        sharded(x)


# ------------------------------------------------------------------------------------- the per-token gate

def test_gated_layers_train_their_gate_and_agree():
    """gate_rank: a GLA-style per-token log gate, logsigmoid(x W_1 W_2 + b) / tau; its parameters receive
    gradients through the op's d log_gate, and linen computes what nnx does with the same parameters."""
    nnx_layer = _nnx_layer(gate_rank=4, gate_bias_init=1.0)
    x = _x()
    gate = nnx_layer.log_gate(x)
    assert gate.shape == (2, 11, 3) and bool(jnp.all(gate <= 0))
    graphdef, params, rest = nnx.split(nnx_layer, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params)
    for name in ("gate_down", "gate_up"):
        g = np.asarray(getattr(grads, name).kernel[...])
        assert np.all(np.isfinite(g)) and np.any(g != 0), name

    lin = fleet_linen.FleetAttention(num_heads=3, gate_rank=4, gate_bias_init=1.0, implementation="scan")
    variables = lin.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a, variables["params"])
    for name in ("query", "key", "value", "gate", "out", "gate_down"):
        params[name]["kernel"] = getattr(nnx_layer, name).kernel[...]
    params["gate_up"] = {"kernel": nnx_layer.gate_up.kernel[...], "bias": nnx_layer.gate_up.bias[...]}
    params["decay_logit"] = nnx_layer.decay_logit[...]
    params["head_norm_scale"] = nnx_layer.head_norm_scale[...]
    np.testing.assert_allclose(lin.apply({"params": params}, x), nnx_layer(x), **TOL)


@pytest.mark.parametrize("bad", [dict(gate_rank=0), dict(gate_rank=2.5), dict(gate_rank=2, gate_temperature=0.0)])
def test_bad_gate_options_are_refused(bad):
    with pytest.raises(ValueError, match="gate_"):
        _nnx_layer(**bad)
