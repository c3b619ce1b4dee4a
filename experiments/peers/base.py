"""The interface every benchmarked implementation has: :class:`Impl`, bound to a case as a :class:`Bound`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from experiments.inputs import Case


@dataclasses.dataclass
class Bound:
    """An implementation bound to one case and op.

    ``prepare`` turns the shared inputs (JAX arrays q, k [B, T, H, K], v and dO [B, T, H, V] in the case's
    dtype; gated cases: log_gate [B, T, H] float32) into the implementation's own arguments (torch tensors,
    another layout: not timed), ``call`` is what is timed, and ``unpack`` turns its result back into JAX
    arrays in our layout for the error check: {"o", "dq", "dk", "dv", "ddecay" or "dlog_gate"}, whichever it
    returns.
    """

    prepare: Callable[[dict[str, Any]], tuple]
    call: Callable[..., Any]
    unpack: Callable[[Any], dict[str, Any]]
    framework: str  # "jax" or "torch"
    jitted: Any = None  # the jax.jit function, for compile time and recompilation counts
    notes: str = ""


class Impl:
    """Base class: a named implementation with its import check and its limits. A peer whose import fails,
    or that cannot run a case, is skipped with the reason recorded (:meth:`unavailable`, :meth:`skip_reason`)."""

    name: str = ""
    framework: str = "jax"
    ops: tuple[str, ...] = ("fwd", "fwd_bwd")
    autotunes: bool = False  # its first call per shape searches configurations (the benchmark runs it last)
    decay_grad: bool | None = None  # whether its fwd_bwd returns a gradient for the decay
    gated: bool = False  # it takes a per-token log gate [B, T, H] (runs the gated cases)
    gate_grad: bool = False  # whether its fwd_bwd returns a gradient for the log gate
    input_layout: str = "BTHD"
    by_name_only: bool = False  # runs only when --impls names it

    def unavailable(self) -> str | None:
        """None if usable here, else why not (import failure, missing device)."""
        return None

    def skip_reason(self, case: Case, op: str) -> str | None:
        if op not in self.ops:
            return f"{self.name} has no {op}"
        if case.gated and not self.gated:
            return "no per-token gate"
        return None

    def bind(self, case: Case, op: str, log_decay: np.ndarray) -> Bound:
        raise NotImplementedError


def jax_bound(fwd: Callable, fwd_bwd: Callable, op: str, *, extra: tuple = (), inputs: tuple[str, ...] = (),
              grads: tuple[str, ...], notes: str = "", errors: bool = True) -> Bound:
    """A Bound for a JAX implementation: ``fwd(q, k, v, *inputs, *extra)`` or ``fwd_bwd(q, k, v, *inputs,
    *extra, do)`` (its outputs: o, then the gradients named in ``grads``), jitted; ``inputs`` names further
    arrays of the case's inputs (the log gate), passed as arguments so that every input set is its own data.
    ``errors=False``: a different operator, nothing to compare."""
    import jax
    if op == "fwd":
        jitted = jax.jit(fwd)
        unpack = (lambda o: {"o": o}) if errors else (lambda o: {})
        return Bound(prepare=lambda x: (x["q"], x["k"], x["v"], *(x[n] for n in inputs), *extra), call=jitted,
                     unpack=unpack, framework="jax", jitted=jitted, notes=notes)
    jitted = jax.jit(fwd_bwd)
    names = ("o",) + grads
    unpack = (lambda out: dict(zip(names, out))) if errors else (lambda out: {})
    return Bound(prepare=lambda x: (x["q"], x["k"], x["v"], *(x[n] for n in inputs), *extra, x["do"]),
                 call=jitted, unpack=unpack, framework="jax", jitted=jitted, notes=notes)


def with_vjp(fwd: Callable) -> Callable:
    """(*args, do) -> (o, *gradients in args) of ``fwd(*args)`` with the cotangent ``do``."""
    import jax

    def fwd_bwd(*args):
        *primals, do = args
        o, vjp = jax.vjp(fwd, *primals)
        return (o,) + tuple(vjp(do))

    return fwd_bwd
