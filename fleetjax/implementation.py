"""What an implementation of the op is, and how one is called with the public arguments.

Each implementation module defines one :class:`Implementation` record: its function on canonical inputs,
its config type and default, and what it supports (where it runs, how it is differentiated, its steps for
sequence parallelism). ``fleetjax.api.IMPLEMENTATIONS`` maps names to these records; adding a backend is one
module and one line there. Tests, the checker and the benchmarks read capabilities from the record.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fleetjax import validation
from fleetjax.decay import log_decay_of
from fleetjax.segments import run_ids_from_segment_ids
from fleetjax.state_passing import BlockKernels
from fleetjax.vma import vary_like

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute the op.

    fn(q, k, v, log_decay, log_gate, initial_state, run_ids, *, scale, config, final_state) -> (o [B, T, H, V],
      final state [B, H, K, V] float32), on validated canonical inputs: q, k, v of one float dtype,
      log_decay [H] float32, log_gate [B, T, H] float32 or None, initial_state float32 (None for zeros where
      takes_no_state), run ids int32 [B, T] or None (fleetjax.segments); ``final_state`` says whether the
      caller uses the final state. The state update at t multiplies by exp(log_decay + log_gate_t).
    platforms: JAX backends where it runs compiled. interpret: elsewhere it runs in Pallas interpret mode
      (exact but slow: tests keep its shapes small).
    config_type, default_config(q, v): its config dataclass and heuristic default (None: it takes none).
    custom_vjp: its gradient is a hand-written VJP (else JAX's autodiff). higher_order: second derivatives in
      reverse mode (jax.grad of jax.grad); else they raise NotImplementedError. Forward mode (jax.jvp,
      jax.jacfwd, jax.hessian) only where custom_vjp is False (:attr:`forward_mode`): JAX's custom VJPs
      take reverse mode alone.
    block_kernels: its steps for sequence parallelism without extra passes (fleetjax.state_passing), if any.
    backward_of: the implementation whose backward its VJP runs, from the inputs alone (so its gradients are
      that one's, bit for bit), if any.
    takes_no_state: fn takes initial_state None for a zero state, which its kernels then neither read nor
      carry (no array of zeros is formed for them: on a GPU, a kernel of its own).
    """

    name: str
    fn: Callable[..., tuple[jax.Array, jax.Array]]
    summary: str
    platforms: tuple[str, ...] = ("cpu", "gpu", "tpu")
    interpret: bool = False
    config_type: type | None = None
    default_config: Callable[[jax.Array, jax.Array], Any] | None = None
    custom_vjp: bool = False
    higher_order: bool = True
    block_kernels: BlockKernels | None = None
    backward_of: str | None = None
    takes_no_state: bool = False

    @property
    def forward_mode(self) -> bool:
        """Whether jax.jvp (and jax.jacfwd, jax.hessian) differentiate it: JAX's autodiff only."""
        return not self.custom_vjp

    def runs_compiled(self, backend: str | None = None) -> bool:
        return (backend or jax.default_backend()) in self.platforms

    def interpreted(self, backend: str | None = None) -> bool:
        """It runs here only in Pallas interpret mode (slow)."""
        return not self.runs_compiled(backend) and self.interpret

    def available(self, backend: str | None = None) -> bool:
        return self.runs_compiled(backend) or self.interpret

    def config_for(self, config: Any, q, v) -> Any:
        """The config to run with: ``config`` checked against config_type, or the default."""
        if self.config_type is None:
            if config is not None:
                raise TypeError(f"implementation={self.name!r} takes no config, got {config!r}")
            return None
        if config is None:
            return self.default_config(q, v)
        if not isinstance(config, self.config_type):
            raise TypeError(f"config for implementation={self.name!r} must be a {self.config_type.__name__}, "
                            f"got {type(config).__name__}")
        return config


def run(impl: Implementation, q, k, v, decay, *, scale=None, log_gate=None, initial_state=None,
        return_final_state=False, segment_ids=None, sequence_axis_name=None, config=None):
    """``impl`` called with the arguments of :func:`fleetjax.fleet_attention` (validated here)."""
    validation.check_inputs(q, k, v, decay, initial_state, segment_ids, log_gate)
    B, T, H, K = validation.shape(q)
    V = validation.shape(v)[3]
    scale = validation.static_scale(scale, K)
    out_dtype = jnp.result_type(q, k, v)
    q, k, v = (jnp.asarray(x, out_dtype) for x in (q, k, v))
    config = impl.config_for(config, q, v)
    log_decay = log_decay_of(decay, H)
    log_gate = None if log_gate is None else jnp.asarray(log_gate, f32)
    state = jnp.zeros((B, H, K, V), f32) if initial_state is None else jnp.asarray(initial_state, f32)
    if sequence_axis_name is not None:
        from fleetjax.sharding import sequence_parallel
        o, final_state = sequence_parallel(impl, q, k, v, log_decay, log_gate, state, segment_ids, scale=scale,
                                           config=config, axis_name=sequence_axis_name)
    elif T == 0 or B == 0:
        o, final_state = jnp.zeros((B, T, H, V), out_dtype), state
    else:
        run_ids = None if segment_ids is None else run_ids_from_segment_ids(jnp.asarray(segment_ids))
        # Inside jax.shard_map(check_vma=True) (data parallelism): the state and decay enter typed like q, k, v.
        log_decay, state = vary_like(log_decay, q, k, v), vary_like(state, q, k, v)
        start = None if initial_state is None and impl.takes_no_state else state
        o, final_state = impl.fn(q, k, v, log_decay, log_gate, start, run_ids, scale=scale, config=config,
                                 final_state=bool(return_final_state))
    o = o.astype(out_dtype)
    return (o, final_state) if return_final_state else o
