"""Whether the backward's dq sums walk, latency-bound at one program an SM, gains from running on a second GPU
stream beside the dv and dk walks (memory-bound): the op's gradients with the decay learned (the gradients
alone: the Pallas VJP keeps only the inputs as residuals, so XLA drops the forward walk and this times the
backward's kernels), with the Mosaic dq sums walk as it is and wrapped in ``jax.experimental.compute_on``
on ``gpu_stream:N`` (XLA's stream annotation: an async start/done pair around the walk, the other walks free to
run between them on the main stream). The two forms alternate (A, B, A, B, ...), their gradients are compared
bitwise, and the annotated module is checked to hold the annotation.

    PYTHONPATH=. python -m experiments.probe_streams [--out DIR] [--rounds 3] [--stream 1] [--smoke]

A diagnostic for the speed work: it reaches into fleetjax.pallas.mosaic.backward. ``--smoke`` runs one tiny
shape on the CPU (Pallas interpret mode; the annotation is then ignored and times say nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.accuracy import same_bits  # noqa: E402
from experiments.inputs import retnet_log_decay  # noqa: E402
from experiments.timing import jax_long_op, jax_sync, queued_calls, time_calls  # noqa: E402

SHAPES = ((4, 16384, 16), (4, 4096, 16), (1, 32768, 8))


def on_stream(fn, stream: int):
    """``fn`` with its array arguments (positional, and keyword ones that are arrays) traced into a
    computation that XLA runs on GPU stream ``stream``; its other keyword arguments stay static. Through
    ``compute_on``'s function form where this jax has one, else its context around a jit call."""
    import inspect

    from jax._src import core  # MemorySpace: the function form asks where each output lives
    from jax.experimental import compute_on as module
    # jax 0.10 has the context manager compute_on and the function form compute_on2; jax 0.11 has the
    # function form alone, named compute_on.
    function_form = getattr(module, "compute_on2", None)
    if function_form is None and "compute_type" in inspect.signature(module.compute_on).parameters:
        function_form = module.compute_on

    @functools.wraps(fn)
    def call(*args, **kwargs):
        arrays = {name: x for name, x in kwargs.items() if isinstance(x, jax.Array)}
        static = {name: x for name, x in kwargs.items() if name not in arrays}
        body = lambda args, arrays: fn(*args, **arrays, **static)  # noqa: E731
        if function_form is not None:
            return function_form(body, compute_type=f"gpu_stream:{stream}",
                                 out_memory_spaces=core.MemorySpace.Device)(args, arrays)
        with module.compute_on(f"gpu_stream:{stream}"):
            return jax.jit(body)(args, arrays)
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs per shape")
    parser.add_argument("--stream", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape (CPU, interpret mode)")
    args = parser.parse_args(argv)
    from fleetjax.pallas.mosaic import backward as mosaic_backward

    rng = np.random.default_rng(0)
    records = []
    for B, T, H in ((1, 128, 2),) if args.smoke else SHAPES:
        K = V = 64 if args.smoke else 128
        sets = [tuple(jnp.asarray(rng.standard_normal((B, T, H, d)) / 8, jnp.bfloat16) for d in (K, K, V, V))
                for _ in range(2)]
        decay = jnp.exp(jnp.asarray(retnet_log_decay(H)))

        def grads(q, k, v, do):
            attend = lambda q, k, v, d: fleetjax.fleet_attention(q, k, v, d, scale=K ** -0.5,  # noqa: E731
                                                                 implementation="pallas")
            return jax.vjp(attend, q, k, v, decay)[1](do)

        compiled = {}
        for form in ("default", "stream"):
            patch = (mock.patch.object(mosaic_backward, "sums_walk", on_stream(mosaic_backward.sums_walk,
                                                                                args.stream))
                     if form == "stream" else contextlib.nullcontext())
            with patch:  # a fresh function per form: a cached trace would keep the other form's walk
                lowered = jax.jit(lambda *a: grads(*a)).lower(*sets[0])
                compiled[form] = lowered.compile()
            annotated = "_xla_stream_annotation" in lowered.as_text()
            starts = (compiled[form].as_text() or "").count("-start")
            print(f"B{B} H{H} T{T} {form}: stream annotation in the lowered module: {annotated}; async starts in "
                  f"the compiled one: {starts}", flush=True)
        outs = {form: c(*sets[0]) for form, c in compiled.items()}
        same = all(same_bits(a, b) for a, b in zip(jax.tree.leaves(outs["default"]), jax.tree.leaves(outs["stream"])))
        for r in range(args.rounds):
            for form, c in compiled.items():
                t = time_calls(c, sets, jax_sync, target_s=0.3)
                q = queued_calls(c, sets, jax_sync, jax_long_op(), call_ms=t.ms)
                rec = dict(B=B, T=T, H=H, K=K, V=V, round=r, form=form, ms=t.ms, ms_min=t.ms_min, ms_queued=q.ms,
                           queued_ahead=q.ahead, bitwise_same=same)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_streams.json"), "w") as fh:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, stream=args.stream,
                       records=records), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
