"""``FleetAttention`` for flax.linen: the layer of :mod:`fleetjax.nn` with features inferred from the input.

Decoding goes through the ``"cache"`` collection, as flax.linen.MultiHeadDotProductAttention does:

    variables = layer.init(key, x_full)                       # params
    cache = layer.init(key, x_full, decode=True)["cache"]     # a zero state for x_full's batch
    y_t, mutated = layer.apply({**variables, "cache": cache}, x_t, decode=True, mutable=["cache"])

The cache holds ``cached_state`` [B, H, K, V] float32 and ``cache_index`` (positions decoded so far). When
``init`` runs with ``decode=True`` the cache is created and left at zero, and the call returns the plain
forward; every later ``apply`` with ``decode=True`` continues from the cache and updates it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fleetjax.nn import (Dtype, check_gate_options, check_layer_input, decay_from_logits, decay_logits_init,
                         gate_from_logits, head_dim, head_rms_norm, retention)

__all__ = ["FleetAttention"]

f32 = jnp.float32


class FleetAttention(nn.Module):
    """Multi-head decaying linear attention (retention): [B, T, F] -> [B, T, out_features or F].

    Attributes:
      num_heads: number of heads H; each has its own learned decay (sigmoid of a logit, in (0, 1)).
      qkv_features: total query/key features (H * K); defaults to the input's F.
      value_features: total value features (H * V); defaults to qkv_features.
      out_features: output features; defaults to F.
      normalize_heads: RMS-normalize each head's output (learned scale [H, V]).
      output_gate: multiply by swish(x W_g) before the output projection.
      use_bias: biases in the projections.
      scale: multiplies every attention output; defaults to K^-1/2.
      dtype: computation dtype (None: from the input and parameters); param_dtype: parameters' dtype.
      kernel_init: initializer of the projection kernels.
      decay_init: initializer of the decay logits [H] (default: RetNet's multi-scale schedule).
      gate_rank, gate_temperature, gate_bias_init: the optional per-token gate, logsigmoid(x W_1 W_2 + b) / tau
        (see fleetjax.nn.FleetAttention).
      implementation, config, sequence_axis_name: passed to :func:`fleetjax.fleet_attention`.
      decode: default of ``__call__``'s decode flag.
    """

    num_heads: int
    qkv_features: int | None = None
    value_features: int | None = None
    out_features: int | None = None
    normalize_heads: bool = True
    output_gate: bool = True
    use_bias: bool = False
    scale: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = f32
    kernel_init: Callable = nn.initializers.lecun_normal()
    decay_init: Callable = decay_logits_init
    gate_rank: int | None = None
    gate_temperature: float = 16.0
    gate_bias_init: float = 0.0
    implementation: str | None = None
    config: Any = None
    sequence_axis_name: str | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 decode: bool | None = None) -> jax.Array:
        """x [B, T, F] -> [B, T, out_features]; segment_ids [B, T] for packed sequences.

        decode: continue from the "cache" collection and update it (any T; T = 1 is the O(1) step).
        """
        check_layer_input(x, None, segment_ids)
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {self.num_heads!r}")
        check_gate_options(self.gate_rank, self.gate_temperature)
        decode = self.decode if decode is None else decode
        B, T, features = x.shape
        H = self.num_heads
        qkv_features = self.qkv_features or features
        value_features = self.value_features or qkv_features
        K = head_dim("qkv_features", qkv_features, H)
        V = head_dim("value_features", value_features, H)
        scale = float(K ** -0.5 if self.scale is None else self.scale)

        def dense(n_out: int, name: str) -> nn.Dense:
            return nn.Dense(n_out, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=self.kernel_init, name=name)

        q = dense(qkv_features, "query")(x).reshape(B, T, H, K)
        k = dense(qkv_features, "key")(x).reshape(B, T, H, K)
        v = dense(value_features, "value")(x).reshape(B, T, H, V)
        decay = decay_from_logits(self.param("decay_logit", self.decay_init, (H,), self.param_dtype))
        log_gate = None
        if self.gate_rank is not None:
            down = nn.Dense(self.gate_rank, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=self.kernel_init, name="gate_down")(x)
            logits = nn.Dense(H, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              bias_init=nn.initializers.constant(self.gate_bias_init), name="gate_up")(down)
            log_gate = gate_from_logits(logits, self.gate_temperature)

        state = None
        if decode:
            # Absent cache means init is running: create it at zero and return the plain forward.
            initialized = self.has_variable("cache", "cached_state")
            cached_state = self.variable("cache", "cached_state", jnp.zeros, (B, H, K, V), f32)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialized:
                state = cached_state.value
                if state.shape != (B, H, K, V):
                    raise ValueError(f"the cache holds a state of shape {state.shape}, x of shape {x.shape} "
                                     f"needs {(B, H, K, V)}")
        o, new_state = retention(q, k, v, decay, scale=scale, segment_ids=segment_ids,
                                 implementation=self.implementation, config=self.config, state=state,
                                 sequence_axis_name=self.sequence_axis_name, log_gate=log_gate)
        if new_state is not None:
            cached_state.value = new_state
            cache_index.value = cache_index.value + T

        if self.normalize_heads:
            o = head_rms_norm(o, self.param("head_norm_scale", nn.initializers.ones, (H, V), self.param_dtype))
        o = o.reshape(B, T, value_features)
        if self.output_gate:
            o = o * jax.nn.swish(dense(value_features, "gate")(x)).astype(o.dtype)
        return dense(self.out_features or features, "out")(o)
