"""Where the "pallas" implementation's time goes on a GPU: the op, the op with the non-finite marking's
``lax.cond`` removed, and the forward walk kernel alone, at the long-context benchmark shapes (bf16,
K = V = 128), with XLA's temp allocation of each compiled call.

    PYTHONPATH=. python -m experiments.cost_split [--out DIR] [--smoke]

Writes DIR/cost_split.json. A diagnostic for the speed work: it reaches into fleetjax.pallas.forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.inputs import retnet_log_decay  # noqa: E402
from experiments.timing import jax_sync, time_calls  # noqa: E402
from fleetjax import nonfinite  # noqa: E402
from fleetjax.pallas import forward as fwd  # noqa: E402

SHAPES = ((4, 16384, 16), (1, 32768, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape (CPU, Pallas interpret mode)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    records = []
    for B, T, H in ((1, 128, 2),) if args.smoke else SHAPES:
        K = V = 32 if args.smoke else 128
        sets = [tuple(jnp.asarray(rng.standard_normal((B, T, H, d)) / 8, jnp.bfloat16) for d in (K, K, V, V))
                for _ in range(2)]
        log_decay = jnp.asarray(retnet_log_decay(H))
        attend = lambda q, k, v: fleetjax.fleet_attention(q, k, v, jnp.exp(log_decay), implementation="pallas")  # noqa: E731
        calls = {"fwd": lambda q, k, v, do: attend(q, k, v),
                 "fwd_bwd": lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do)}
        config = fleetjax.IMPLEMENTATIONS["pallas"].config_for(None, sets[0][0], sets[0][2])
        chunking = config.chunking(T, False)
        local = None if chunking.pieces == 1 else jnp.zeros((B, H, chunking.pieces - 1, K, V), jnp.float32)

        def walk_alone(q, k, v, do):
            return fwd.forward_walk(q, k, v, log_decay, None, None, chunking, scale=K ** -0.5, exact_state=False,
                                    local=local, **config.launch("forward", q.dtype))[0]

        real = nonfinite.unless_finite
        for what, patched in (("op", False), ("op without the non-finite cond", True)):
            nonfinite.unless_finite = (lambda flags, fix, outputs, inputs: tuple(outputs)) if patched else real
            for op, call in calls.items():
                jitted = jax.jit(call)
                ms = time_calls(jitted, sets, jax_sync, target_s=0.3).ms
                temp = jitted.lower(*sets[0]).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
                records.append(dict(B=B, T=T, H=H, K=K, V=V, what=what, op=op, ms=ms, temp_mb=temp))
                print(records[-1], flush=True)
        nonfinite.unless_finite = real
        ms = time_calls(jax.jit(walk_alone), sets, jax_sync, target_s=0.3).ms
        records.append(dict(B=B, T=T, H=H, K=K, V=V, what="forward walk kernel alone", op="fwd", ms=ms))
        print(records[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost_split.json"), "w") as fh:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, records=records), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
