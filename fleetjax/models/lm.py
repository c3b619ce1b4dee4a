"""A small byte-level language model built from :class:`fleetjax.nn.FleetAttention`.

    tokens [B, T] -> embedding * sqrt(d) -> L x (x + attn(RMSNorm(x)); x + MLP(RMSNorm(x))) -> RMSNorm
                  -> logits = x E^T (output tied to the embedding E)

The attention is FleetAttention (no positional encoding: the per-head decays give the order), or, for
comparison, causal softmax attention through ``jax.nn.dot_product_attention(is_causal=True)`` with rotary
position embeddings (``LMConfig.attention = "softmax"``); either may add a learned absolute position table
(``LMConfig.learned_positions``).

Also here: the optax optimizer (gradient clipping, AdamW, warmup + cosine learning rate), a jit-compiled
:class:`Trainer` whose step function is traced once, and :func:`generate`, which decodes from the
FleetAttention cache with O(1) work per new token. Checkpoints: :mod:`fleetjax.models.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fleetjax.nn import FleetAttention

f32 = jnp.float32
_ATTENTIONS = ("fleet", "softmax")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The model's shape and numerics (JSON-serializable: dtypes are names).

    attention: "fleet" (FleetAttention) or "softmax" (causal dot-product attention with rotary embeddings).
    implementation: for "fleet", passed to fleet_attention ("pallas", "xla", "scan", ..., None = auto);
      for "softmax", passed to jax.nn.dot_product_attention (None, "xla" or "cudnn").
    dtype: computation dtype; param_dtype: parameters' dtype.
    rope_base: rotary embeddings' base in softmax attention; None for none.
    learned_positions: rows of a learned absolute position table added to the token embeddings (GPT-2's, and
      Zoology's attention baseline's), indexed from each row's start (segment_ids do not restart it); 0 for
      none. Sequences may not be longer; no decoding with it.
    gate_rank: "fleet" only: None for the learned per-head decay alone, or the rank of the GLA-style per-token
      gate on top of it (fleetjax.nn.FleetAttention's gate_rank).
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    attention: str = "fleet"
    implementation: str | None = None
    normalize_heads: bool = True
    output_gate: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_base: float | None = 10000.0
    learned_positions: int = 0
    gate_rank: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"LMConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.attention not in _ATTENTIONS:
            raise ValueError(f"LMConfig.attention must be one of {_ATTENTIONS}, got {self.attention!r}")
        if not isinstance(self.learned_positions, int) or self.learned_positions < 0:
            raise ValueError(f"LMConfig.learned_positions must be an int >= 0, got {self.learned_positions!r}")
        if self.attention == "softmax" and self.rope_base is not None and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"softmax attention uses rotary embeddings and needs an even head dim, got "
                             f"{self.d_model // self.num_heads}")
        if self.gate_rank is not None and self.attention != "fleet":
            raise ValueError(f"LMConfig.gate_rank is FleetAttention's per-token gate; attention={self.attention!r} "
                             "has none (set gate_rank=None)")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as error:
                raise ValueError(f"LMConfig.{name} must name a dtype, got {getattr(self, name)!r}") from error

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LMConfig fields {sorted(unknown)}")
        return cls(**values)


# ------------------------------------------------------------------------------------------------ the model

def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of x [B, T, H, D] (D even) at positions [T], computed in float32."""
    half = x.shape[-1] // 2
    freq = base ** (-np.arange(half, dtype=np.float32) / half)
    angle = positions.astype(f32)[:, None] * freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(f32), x[..., half:].astype(f32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SoftmaxAttention(nnx.Module):
    """Causal softmax attention, the baseline: [B, T, d] -> [B, T, d] (rotary embeddings unless rope_base is None)."""

    def __init__(self, d_model: int, num_heads: int, *, implementation: str | None, rope_base: float | None,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.implementation, self.rope_base = implementation, rope_base
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = linear(d_model, 3 * d_model)
        self.out = linear(d_model, d_model)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 decode: bool | None = None) -> jax.Array:
        if segment_ids is not None or decode:
            raise ValueError("the softmax baseline supports neither segment_ids nor decode; use attention='fleet'")
        B, T, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, T, 3 * self.num_heads, self.head_dim), 3, axis=2)
        if self.rope_base is not None:
            positions = jnp.arange(T)
            q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        return self.out(o.reshape(B, T, d))


class MLP(nnx.Module):
    """d -> ratio * d -> GELU -> d."""

    def __init__(self, d_model: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_model, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        norm = functools.partial(nnx.RMSNorm, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm, self.mlp_norm = norm(), norm()
        if config.attention == "fleet":
            self.attention = FleetAttention(config.num_heads, config.d_model, normalize_heads=config.normalize_heads,
                                            output_gate=config.output_gate, gate_rank=config.gate_rank,
                                            dtype=dtype, param_dtype=param_dtype,
                                            implementation=config.implementation, rngs=rngs)
        else:
            self.attention = SoftmaxAttention(config.d_model, config.num_heads, implementation=config.implementation,
                                              rope_base=config.rope_base, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs)
        self.mlp = MLP(config.d_model, config.mlp_ratio * config.d_model, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None, decode: bool | None) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), segment_ids=segment_ids, decode=decode)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab_size] float32."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = config
        # Unit-norm rows: the tied output starts with logits of order one after the final RMSNorm.
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.dtype),
                               param_dtype=jnp.dtype(config.param_dtype),
                               embedding_init=nnx.initializers.normal(config.d_model ** -0.5), rngs=rngs)
        if config.learned_positions:
            self.position = nnx.Embed(config.learned_positions, config.d_model, dtype=jnp.dtype(config.dtype),
                                      param_dtype=jnp.dtype(config.param_dtype),
                                      embedding_init=nnx.initializers.normal(config.d_model ** -0.5), rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.RMSNorm(config.d_model, dtype=jnp.dtype(config.dtype),
                                      param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 decode: bool | None = None) -> jax.Array:
        """tokens int [B, T]; segment_ids [B, T] (fleet only); decode: continue from the cache."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, T], got {tokens.dtype} {tokens.shape}")
        x = self.embed(tokens)
        if self.config.learned_positions:
            T = tokens.shape[1]
            if decode or T > self.config.learned_positions:
                raise ValueError(f"this model has {self.config.learned_positions} learned positions: it takes "
                                 f"sequences of at most that length and cannot decode, got T={T}, decode={decode}")
            x = x + self.position.embedding[:T].astype(x.dtype)
        x = x * jnp.asarray(self.config.d_model ** 0.5, self.embed.dtype)
        for block in self.blocks:
            x = block(x, segment_ids=segment_ids, decode=decode)
        x = self.final_norm(x)
        return jnp.einsum("btd,vd->btv", x.astype(f32), self.embed.embedding[...].astype(f32))

    def init_cache(self, batch_size: int, dtype: Any = f32) -> None:
        """Zero decoding caches for ``batch_size`` sequences (FleetAttention only)."""
        if self.config.attention != "fleet":
            raise ValueError(f"decoding needs attention='fleet', this model has {self.config.attention!r}")
        for block in self.blocks:
            block.attention.init_cache((batch_size, 1, self.config.d_model), dtype)


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------- training

def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross entropy (nats) over the positions where mask is true (all when None)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(f32), targets)
    if mask is None:
        return ce.mean()
    mask = mask.astype(f32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_fn(model: LanguageModel, inputs: jax.Array, targets: jax.Array, mask: jax.Array | None = None
            ) -> jax.Array:
    return cross_entropy(model(inputs), targets, mask)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm gradient clipping, linear warmup then cosine decay to final_lr_fraction * lr."""

    learning_rate: float = 3e-3
    warmup_steps: int = 50
    total_steps: int = 1000
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(config.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1), end_value=config.learning_rate * config.final_lr_fraction)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (weight decay on matrices only, not on norms, decays or biases)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                    weight_decay=config.weight_decay, mask=decay_mask))


class Trainer:
    """A model and its optimizer as one split nnx state, stepped by a jit-compiled function.

    The step is traced once per input shape (``trace_count`` counts the traces); the state buffers are
    donated, so hold no arrays of an older state: take ``trainer.model`` when you need the model.
    """

    def __init__(self, model: LanguageModel, tx: optax.GradientTransformation,
                 optimizer: nnx.Optimizer | None = None):
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param) if optimizer is None else optimizer
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.trace_count = 0
        self._step = jax.jit(self._step_fn, donate_argnums=0)
        self._steps = jax.jit(self._steps_fn, static_argnums=(1, 3), donate_argnums=0)
        self._eval = jax.jit(self._eval_fn)
        self._compiled: dict[tuple, Any] = {}

    def _step_fn(self, state, inputs, targets, mask):
        self.trace_count += 1  # runs only while tracing
        model, optimizer = nnx.merge(self.graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets, mask)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def _steps_fn(self, state, make_batch, key, num_steps):
        one = lambda state, step_key: self._step_fn(state, *make_batch(step_key))
        return jax.lax.scan(one, state, jax.random.split(key, num_steps))

    def _eval_fn(self, state, inputs, targets, mask):
        model, _ = nnx.merge(self.graphdef, state)
        logits = model(inputs)
        correct = (jnp.argmax(logits, -1) == targets).astype(f32)
        m = jnp.ones_like(correct) if mask is None else mask.astype(f32)
        return {"loss": cross_entropy(logits, targets, mask),
                "accuracy": jnp.sum(correct * m) / jnp.maximum(jnp.sum(m), 1.0)}

    @staticmethod
    def _signature(*arrays: jax.Array | None) -> tuple:
        return tuple(None if a is None else (tuple(a.shape), str(a.dtype)) for a in arrays)

    def compile(self, inputs: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> dict[str, Any]:
        """Compile the step ahead of time for these shapes; later steps with the same shapes use it.

        Returns {"compile_s", and XLA's memory analysis in bytes where the backend reports it: "argument",
        "output", "temp", "alias"} (temp is the step's working memory beyond its inputs and outputs).
        """
        start = time.perf_counter()
        compiled = self._step.lower(self.state, inputs, targets, mask).compile()
        info: dict[str, Any] = {"compile_s": time.perf_counter() - start}
        self._compiled[self._signature(inputs, targets, mask)] = compiled
        try:
            analysis = compiled.memory_analysis()
            info.update({key: int(getattr(analysis, f"{key}_size_in_bytes"))
                         for key in ("argument", "output", "temp", "alias")})
        except Exception:  # noqa: BLE001 - not every backend reports a memory analysis
            pass
        return info

    def step(self, inputs: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """One optimizer step on inputs/targets int [B, T] (mask [B, T]: positions that count in the loss)."""
        step = self._compiled.get(self._signature(inputs, targets, mask), self._step)
        self.state, metrics = step(self.state, inputs, targets, mask)
        return metrics

    def run_steps(self, make_batch, key: jax.Array, num_steps: int) -> dict[str, jax.Array]:
        """num_steps optimizer steps in one compiled call, each on ``make_batch(k)`` for its own key k.

        For small models whose step is shorter than the host's dispatch of it. make_batch(key) -> (inputs,
        targets, mask) must be a traceable function of the key that returns the same shapes every time (data
        made on the device); it is a static argument: pass the same function object to reuse the compilation.
        Returns the metrics of every step, stacked: {"loss": [num_steps], "grad_norm": [num_steps]}.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.state, metrics = self._steps(self.state, make_batch, key, num_steps)
        return metrics

    def evaluate(self, inputs: jax.Array, targets: jax.Array, mask: jax.Array | None = None
                 ) -> dict[str, jax.Array]:
        """Loss and next-token accuracy without updating anything."""
        return self._eval(self.state, inputs, targets, mask)

    @property
    def model(self) -> LanguageModel:
        """The current model (its own copy of the parameters, safe from the next step's donation)."""
        return nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.state))[0]

    @property
    def optimizer(self) -> nnx.Optimizer:
        return nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.state))[1]

    @property
    def step_count(self) -> int:
        return int(self.optimizer.step[...])


# -------------------------------------------------------------------------------------------- generation

def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """logits [B, V] -> int32 [B]; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt, key, *, num_tokens: int, temperature: float, top_k: int | None):
    model = nnx.merge(graphdef, state)
    logits = model(prompt, decode=True)[:, -1]  # the prompt in one pass from the zero cache

    def step(carry, key_t):
        state, logits = carry
        token = _sample(logits, key_t, temperature, top_k)
        model = nnx.merge(graphdef, state)
        logits = model(token[:, None], decode=True)[:, 0]  # O(1): decode_step on each layer's state
        return (nnx.state(model), logits), token

    _, tokens = jax.lax.scan(step, (nnx.state(model), logits), jax.random.split(key, num_tokens))
    return tokens.T


def generate(model: LanguageModel, prompt: jax.Array, num_tokens: int, *, key: jax.Array,
             temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Sample ``num_tokens`` continuations of prompt int [B, P] (P >= 1): int32 [B, num_tokens].

    The prompt goes through each layer once (fleet_attention from a zero state); every new token then
    costs one ``decode_step`` per layer, O(1) in the length so far. The model itself is not modified.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer [B, P] with P >= 1, got {prompt.dtype} {prompt.shape}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be None or in [1, {model.config.vocab_size}], got {top_k}")
    decoder = nnx.clone(model)
    decoder.init_cache(prompt.shape[0])
    graphdef, state = nnx.split(decoder)
    return _generate(graphdef, state, prompt.astype(jnp.int32), key, num_tokens=num_tokens,
                     temperature=float(temperature), top_k=top_k)
