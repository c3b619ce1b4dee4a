"""Flax layers built on :func:`fleetjax.fleet_attention`.

``FleetAttention`` (flax.nnx, this module) and ``fleetjax.nn.linen.FleetAttention`` (flax.linen) are the same
multi-head layer (RetNet's multi-scale retention, arXiv:2307.08621, without the rotary part):

    q, k, v = x W_q, x W_k, x W_v                       split into H heads: [B, T, H, K], [B, T, H, V]
    g       = logsigmoid(x W_1 W_2 + b) / tau           optional (gate_rank): a per-token log gate [B, T, H]
    o       = fleet_attention(q, k, v, decay, scale, log_gate=g)
                                                        per-head decay in (0, 1), decay = sigmoid(decay_logit)
    o       = RMSNorm_per_head(o)                       optional (normalize_heads)
    o       = o * swish(x W_g)                          optional (output_gate)
    y       = o W_o                                     [B, T, out_features]

The decay is learned through its logit, so it stays inside (0, 1) whatever the optimizer does and its
gradient flows from the op's custom VJP through the sigmoid. The data-dependent gate is GLA's (Yang et al.,
arXiv:2312.06635): a low-rank projection to one logit per head, its log-sigmoid divided by a temperature tau
(16 in GLA) so that the gates start near 1; with it the state forgets more where the input says so, on top
of the per-head decay. Its bias starts at ``gate_bias_init``. The default initialisation is RetNet's
multi-scale schedule: decay_h = 1 - 2^(-e_h) with exponents e_h spread evenly over [5, 12] (exactly RetNet's
1 - 2^(-5-h) for 8 heads), so the heads remember from about 32 to about 4096 positions.

Decoding keeps the [B, H, K, V] float32 state in a cache: one new token costs O(1) work (``decode_step``);
several tokens at once (a prompt) go through ``fleet_attention(..., initial_state=cache,
return_final_state=True)``. Feeding a sequence token by token equals the full forward.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleetjax.api import decode_step, fleet_attention

__all__ = ["FleetAttention", "multiscale_decays", "decay_logits_init", "head_dim"]

f32 = jnp.float32
Dtype = Any


def multiscale_decays(num_heads: int, exponent_range: tuple[float, float] = (5.0, 12.0)) -> np.ndarray:
    """RetNet's multi-scale decays [H] float64: 1 - 2^(-e_h), e_h evenly spaced over ``exponent_range``.

    With 8 heads and the default range this is RetNet's 1 - 2^(-5-h), h = 0..7.
    """
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    low, high = exponent_range
    if not 0 < low <= high:
        raise ValueError(f"exponent_range must satisfy 0 < low <= high, got {exponent_range!r}")
    exponents = np.linspace(low, high, num_heads) if num_heads > 1 else np.array([low], np.float64)
    return 1.0 - np.exp2(-exponents)


def decay_logits_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = f32) -> jax.Array:
    """Initializer of the decay logits [H]: logit(multiscale_decays(H)); ``key`` is unused (deterministic)."""
    del key
    (num_heads,) = shape
    decays = multiscale_decays(num_heads)
    return jnp.asarray(np.log(decays) - np.log1p(-decays), dtype)


def decay_from_logits(logits: jax.Array) -> jax.Array:
    """[H] logits -> [H] float32 decays in (0, 1)."""
    return jax.nn.sigmoid(jnp.asarray(logits, f32))


def head_rms_norm(o: jax.Array, scale: jax.Array | None, eps: float = 1e-6) -> jax.Array:
    """RMS normalization over the last axis of o [B, T, H, V] in float32, times scale [H, V] if given."""
    o32 = o.astype(f32)
    o32 = o32 * jax.lax.rsqrt(jnp.mean(jnp.square(o32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        o32 = o32 * jnp.asarray(scale, f32)
    return o32.astype(o.dtype)


def check_layer_input(x: jax.Array, in_features: int | None, segment_ids: jax.Array | None) -> None:
    """x [B, T, F] float with F = in_features (when known); segment_ids None or [B, T] integers."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"x must have a floating dtype, got {jnp.result_type(x)}")
    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, T, features], got shape {x.shape}")
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features (in_features), got shape {x.shape}")
    if segment_ids is not None:
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise TypeError(f"segment_ids must have an integer dtype, got {jnp.result_type(segment_ids)}")
        if tuple(segment_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(f"segment_ids must have shape [B, T] = {tuple(x.shape[:2])}, "
                             f"got {tuple(segment_ids.shape)}")


def retention(q: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array, *, scale: float,
              segment_ids: jax.Array | None, implementation: str | None, config: Any,
              state: jax.Array | None, sequence_axis_name: str | None = None,
              log_gate: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The attention core shared by both layers: (o [B, T, H, V], new state or None).

    ``state`` None: the plain forward over the sequence. ``state`` [B, H, K, V]: decoding; one position with
    no segment ids takes ``decode_step`` (O(1) per token), several positions continue from the state with
    ``fleet_attention(initial_state=state, return_final_state=True)``. ``sequence_axis_name`` goes to every
    fleet_attention call (inside jax.shard_map with T split over that axis); the one-token step ignores it.
    ``log_gate`` [B, T, H] or None: the per-token log gate.
    """
    if state is None:
        o = fleet_attention(q, k, v, decay, scale=scale, log_gate=log_gate, segment_ids=segment_ids,
                            sequence_axis_name=sequence_axis_name, implementation=implementation, config=config)
        return o, None
    if q.shape[1] == 1 and segment_ids is None:
        o_t, new_state = decode_step(q[:, 0], k[:, 0], v[:, 0], decay, state.astype(f32), scale=scale,
                                     log_gate=None if log_gate is None else log_gate[:, 0])
        return o_t[:, None], new_state.astype(state.dtype)
    o, new_state = fleet_attention(q, k, v, decay, scale=scale, log_gate=log_gate, initial_state=state.astype(f32),
                                   return_final_state=True, segment_ids=segment_ids,
                                   sequence_axis_name=sequence_axis_name, implementation=implementation,
                                   config=config)
    return o, new_state.astype(state.dtype)


def gate_from_logits(logits: jax.Array, temperature: float) -> jax.Array:
    """The per-token log gate [B, T, H] float32 from the gate logits: logsigmoid(logits) / temperature (<= 0,
    finite for finite logits)."""
    return jax.nn.log_sigmoid(jnp.asarray(logits, f32)) / temperature


def check_gate_options(gate_rank: int | None, gate_temperature: float) -> None:
    if gate_rank is not None and (not isinstance(gate_rank, (int, np.integer)) or gate_rank < 1):
        raise ValueError(f"gate_rank must be None (no per-token gate) or a positive int, got {gate_rank!r}")
    if not gate_temperature > 0:
        raise ValueError(f"gate_temperature must be positive, got {gate_temperature!r}")


def head_dim(name: str, features: int, num_heads: int) -> int:
    """Features per head of the ``features`` total features called ``name`` (qkv_features: K; value_features:
    V); raises ValueError naming both numbers unless num_heads divides features."""
    if features % num_heads:
        raise ValueError(f"{name} ({features}) must be divisible by num_heads ({num_heads})")
    return features // num_heads


class FleetAttention(nnx.Module):
    """Multi-head decaying linear attention (retention) for flax.nnx: [B, T, in_features] -> [B, T, out_features].

    The arguments come in ``flax.nnx.MultiHeadAttention``'s order, heads first. Example::

        layer = FleetAttention(8, 256, rngs=nnx.Rngs(0))   # 8 heads, 256 input features
        y = layer(x)                                        # x [B, T, 256]
        layer.init_cache((B, 1, 256))
        y_t = layer(x_t, decode=True)                       # x_t [B, 1, 256], O(1) per token

    Args:
      num_heads: number of heads H; each has its own learned decay.
      in_features: features of the input.
      qkv_features: total query/key features (H * K); defaults to in_features.
      value_features: total value features (H * V); defaults to qkv_features.
      out_features: output features; defaults to in_features.
      normalize_heads: RMS-normalize each head's output (learned scale [H, V]), as RetNet's group norm.
      output_gate: multiply by swish(x W_g) before the output projection, as RetNet does.
      use_bias: biases in the projections.
      scale: multiplies every attention output; defaults to K^-1/2.
      dtype: computation dtype (None: from the input and parameters); param_dtype: parameters' dtype.
      kernel_init: initializer of the projection kernels.
      decay_init: initializer of the decay logits [H] (default: RetNet's multi-scale schedule).
      gate_rank: None (no per-token gate) or the rank of the gate's projection x W_1 W_2 (GLA uses 16).
      gate_temperature: tau of the gate, logsigmoid(x W_1 W_2 + b) / tau (GLA: 16).
      gate_bias_init: the gate bias's initial value (a large bias keeps the gates near 1 at the start).
      implementation, config: passed to :func:`fleetjax.fleet_attention` ("pallas", "xla", ...).
      sequence_axis_name: passed to :func:`fleetjax.fleet_attention`: inside jax.shard_map with T split in
        contiguous blocks over this mesh axis, the layer equals the unsharded one.
      decode: default of ``__call__``'s decode flag.
      rngs: random keys for the parameters.
    """

    def __init__(self, num_heads: int, in_features: int, *, qkv_features: int | None = None,
                 value_features: int | None = None, out_features: int | None = None,
                 normalize_heads: bool = True, output_gate: bool = True, use_bias: bool = False,
                 scale: float | None = None, dtype: Dtype | None = None, param_dtype: Dtype = f32,
                 kernel_init: Callable = nnx.initializers.lecun_normal(),
                 decay_init: Callable = decay_logits_init, gate_rank: int | None = None,
                 gate_temperature: float = 16.0, gate_bias_init: float = 0.0, implementation: str | None = None,
                 config: Any = None, sequence_axis_name: str | None = None, decode: bool = False,
                 rngs: nnx.Rngs):
        for name, value in (("num_heads", num_heads), ("in_features", in_features)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_heads = int(num_heads)
        self.in_features = int(in_features)
        self.qkv_features = int(qkv_features or in_features)
        self.value_features = int(value_features or self.qkv_features)
        self.out_features = int(out_features or in_features)
        try:
            self.head_dim = head_dim("qkv_features", self.qkv_features, self.num_heads)
            self.value_head_dim = head_dim("value_features", self.value_features, self.num_heads)
        except ValueError as error:
            if self.num_heads > self.in_features:  # likely the arguments of the old order, features first
                raise ValueError(f"{error}; FleetAttention takes (num_heads, in_features), in "
                                 f"flax.nnx.MultiHeadAttention's order, got num_heads={self.num_heads}, "
                                 f"in_features={self.in_features}") from None
            raise
        check_gate_options(gate_rank, gate_temperature)
        self.scale = float(self.head_dim ** -0.5 if scale is None else scale)
        self.gate_temperature = float(gate_temperature)
        self.normalize_heads = normalize_heads
        self.output_gate = output_gate
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = implementation
        self.config = config
        self.sequence_axis_name = sequence_axis_name
        self.decode = decode

        def linear(n_in: int, n_out: int) -> nnx.Linear:
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=kernel_init, rngs=rngs)

        self.query = linear(self.in_features, self.qkv_features)
        self.key = linear(self.in_features, self.qkv_features)
        self.value = linear(self.in_features, self.value_features)
        self.gate = linear(self.in_features, self.value_features) if output_gate else nnx.data(None)
        self.out = linear(self.value_features, self.out_features)
        self.decay_logit = nnx.Param(decay_init(rngs.params(), (self.num_heads,), param_dtype))
        if gate_rank is None:
            self.gate_down = self.gate_up = nnx.data(None)
        else:
            self.gate_down = nnx.Linear(self.in_features, int(gate_rank), use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
            self.gate_up = nnx.Linear(int(gate_rank), self.num_heads, use_bias=True, dtype=dtype,
                                      param_dtype=param_dtype, kernel_init=kernel_init,
                                      bias_init=nnx.initializers.constant(gate_bias_init), rngs=rngs)
        self.head_norm_scale = (nnx.Param(jnp.ones((self.num_heads, self.value_head_dim), param_dtype))
                                if normalize_heads else nnx.data(None))
        self.cached_state: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    @property
    def decay(self) -> jax.Array:
        """The per-head decays [H] float32, in (0, 1)."""
        return decay_from_logits(self.decay_logit[...])

    def log_gate(self, x: jax.Array) -> jax.Array | None:
        """The per-token log gate [B, T, H] float32 of x [B, T, in_features] (None without gate_rank)."""
        if self.gate_down is None:
            return None
        return gate_from_logits(self.gate_up(self.gate_down(x)), self.gate_temperature)

    def init_cache(self, input_shape: tuple[int, ...], dtype: Dtype = f32) -> None:
        """Create the decoding cache (zero state) for inputs of shape [B, T, in_features] (T is ignored).

        The cache holds ``cached_state`` [B, H, K, V] (``dtype``, float32 recommended: it is the running sum)
        and ``cache_index``, the number of positions decoded so far.
        """
        if (not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (2, 3)
                or input_shape[-1] != self.in_features):
            hint = (f"; for a batch of {input_shape}: init_cache(({input_shape}, 1, {self.in_features}))"
                    if isinstance(input_shape, (int, np.integer)) else "")
            raise ValueError(f"input_shape must be a tuple [B, T, {self.in_features}] or [B, {self.in_features}] "
                             f"(the input's shape, in_features last), got {input_shape!r}{hint}")
        shape = (input_shape[0], self.num_heads, self.head_dim, self.value_head_dim)
        self.cached_state = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 decode: bool | None = None) -> jax.Array:
        """x [B, T, in_features] -> [B, T, out_features].

        segment_ids [B, T]: packed sequences, positions of different segments never interact.
        decode: continue from the cache (``init_cache`` first) and update it; any T is allowed, T = 1 is the
        O(1) step. None takes the constructor's flag.
        """
        check_layer_input(x, self.in_features, segment_ids)
        decode = self.decode if decode is None else decode
        B, T, _ = x.shape
        q = self.query(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.key(x).reshape(B, T, self.num_heads, self.head_dim)
        v = self.value(x).reshape(B, T, self.num_heads, self.value_head_dim)
        state = None
        if decode:
            if self.cached_state is None:
                raise ValueError("decode=True needs the cache: call init_cache(input_shape) first")
            state = self.cached_state[...]
            if state.shape[0] != B:
                raise ValueError(f"the cache was made for batch {state.shape[0]}, got x of shape {x.shape}")
        o, new_state = retention(q, k, v, self.decay, scale=self.scale, segment_ids=segment_ids,
                                 implementation=self.implementation, config=self.config, state=state,
                                 sequence_axis_name=self.sequence_axis_name, log_gate=self.log_gate(x))
        if decode:
            self.cached_state[...] = new_state
            self.cache_index[...] += T
        if self.normalize_heads:
            o = head_rms_norm(o, self.head_norm_scale[...])
        o = o.reshape(B, T, self.value_features)
        if self.output_gate:
            o = o * jax.nn.swish(self.gate(x)).astype(o.dtype)
        return self.out(o)
