"""fleetjax itself: ``fleet_attention(q, k, v, decay, scale=1, implementation=...)`` in [B, T, H, K]; its
fwd_bwd returns the decay gradient too, except as ``fleetjax.<implementation>.fixed_decay`` (the decay closed
over, as fla's ``g_gamma``: the backward then forms no decay gradient, fleetjax.vjp.Wanted), and with the
suffix ``.triton`` (by name only) the Pallas op with its Triton walks alone (``PallasConfig.mosaic_walks``
None: the A/B of the Mosaic GPU walks in one run), with ``.triton_sums`` (by name only) the decay's gradient
sums on the Triton walks (``MosaicWalkConfig.decay_sums`` False), with ``.triton_gated`` (by name only) the
gated forward and backward on the Triton walks (``gated_forward`` and ``gated_backward`` False). Gated cases:
``fleet_attention(q, k, v, None, log_gate=log_gate, ...)`` (the gate alone, as fla's ``g=``), fwd_bwd with
the log gate's gradient. What an implementation supports here (whether it is installed, runs compiled or
only in Pallas interpret mode) is read from its record in ``fleetjax.IMPLEMENTATIONS``."""

from __future__ import annotations

import functools

import numpy as np

from experiments.accuracy import SCALE
from experiments.inputs import Case
from experiments.peers.base import Bound, Impl, jax_bound, with_vjp


WALKS = {"triton": "no Mosaic GPU walks", "triton_sums": "the decay's gradient sums on the Triton walks",
         "triton_gated": "the gated forward and backward on the Triton walks"}


class FleetjaxImpl(Impl):
    """fleetjax.fleet_attention with one implementation; fwd_bwd includes the decay (gated: log gate)
    gradient."""

    framework = "jax"
    decay_grad = True
    gated = True
    gate_grad = True

    def __init__(self, implementation: str, max_T: int | None = None, learn_decay: bool = True,
                 walks: str | None = None):
        if walks is not None and walks not in WALKS:
            raise ValueError(f"walks must be None or one of {sorted(WALKS)}, got {walks!r}")
        self.implementation = implementation
        self.learn_decay = learn_decay
        self.walks = walks
        self.by_name_only = walks is not None
        self.name = (f"fleetjax.{implementation}" + ("" if learn_decay else ".fixed_decay")
                     + (f".{walks}" if walks else ""))
        self.max_T = max_T
        if not learn_decay:
            self.decay_grad = False
            self.gated = False  # the gated cases have no per-head decay: the plain row is the same call

    def record(self):
        """The implementation's ``fleetjax.implementation.Implementation`` record."""
        import fleetjax
        return fleetjax.IMPLEMENTATIONS[self.implementation]

    def unavailable(self) -> str | None:
        try:
            import fleetjax
        except Exception as e:  # noqa: BLE001
            return f"import fleetjax failed: {type(e).__name__}: {e}"
        if self.implementation not in fleetjax.IMPLEMENTATIONS:
            return (f"implementation {self.implementation!r} is not registered in fleetjax.IMPLEMENTATIONS "
                    "(its module is missing or failed to import)")
        record = self.record()
        if not record.available():
            import jax
            return f"{self.name} runs on {', '.join(record.platforms)} only (jax backend is {jax.default_backend()})"
        return None

    def skip_reason(self, case: Case, op: str) -> str | None:
        if self.max_T is not None and case.T > self.max_T:
            return f"{self.name} is timed at T <= {self.max_T} only"
        return super().skip_reason(case, op)

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        import jax.numpy as jnp
        from fleetjax import fleet_attention

        notes = "Pallas interpret mode: exact, but its times say nothing" if self.record().interpreted() else ""
        if case.gated:
            def gated(q, k, v, log_gate):
                config = None if self.walks is None else _walks_config(self.walks, q, v)
                return fleet_attention(q, k, v, None, log_gate=log_gate, scale=SCALE,
                                       implementation=self.implementation, config=config)

            return jax_bound(gated, with_vjp(gated), op, inputs=("log_gate",),
                             grads=("dq", "dk", "dv", "dlog_gate"), notes=notes)
        decay = jnp.exp(jnp.asarray(log_decay, jnp.float32))
        attend = functools.partial(fleet_attention, scale=SCALE, implementation=self.implementation)
        if self.walks is not None:
            attend = functools.partial(_with_walks, attend, self.walks)
        if not self.learn_decay:
            fixed = lambda q, k, v: attend(q, k, v, decay)  # noqa: E731
            return jax_bound(fixed, with_vjp(fixed), op, grads=("dq", "dk", "dv"), notes=notes)
        return jax_bound(attend, with_vjp(attend), op, extra=(decay,), grads=("dq", "dk", "dv", "ddecay"),
                         notes=notes)


def _with_walks(attend, walks: str, q, k, v, decay):
    """``attend`` with the default Pallas config but its walks chosen (:func:`_walks_config`)."""
    return attend(q, k, v, decay, config=_walks_config(walks, q, v))


def _walks_config(walks: str, q, v):
    """The default Pallas config with its walks chosen (:data:`WALKS`); as the default where no Mosaic walks
    serve."""
    import dataclasses

    from fleetjax.pallas import chunked

    config = chunked.default_config(q, v)
    if walks == "triton":
        return dataclasses.replace(config, mosaic_walks=None)
    if config.mosaic_walks is None:
        return config
    change = dict(decay_sums=False) if walks == "triton_sums" else dict(gated_forward=False, gated_backward=False)
    return dataclasses.replace(config, mosaic_walks=dataclasses.replace(config.mosaic_walks, **change))
