"""The op's output under two variants of the default Pallas config on this GPU: whether they agree bit for bit,
and each one's relative error against implementation="xla" on the inputs in float32.

    PYTHONPATH=. python -m experiments.compare_walks [--B 4] [--H 16] [--K 128] [--T 4096,16384]
        [--a '{"forward_pieces": 2, "forward_block_v": null}'] [--b '{"forward_pieces": 1, "forward_block_v": 32}']

--a and --b are ``--walks`` texts (experiments/inputs.py's with_walk_fields); each length runs with the
constant per-head decay and with the gate alone. One JSON line per case on stdout. Needs an sm_90 GPU (the
variants change the Mosaic walks). Layouts that split the sequence differently need not agree bit for bit:
their float32 sums run in another order; their errors against the reference should then be equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fleetjax  # noqa: E402
from experiments.inputs import retnet_log_decay, with_walk_fields  # noqa: E402


def rel_err(x: jax.Array, ref: jax.Array) -> float:
    x, ref = np.asarray(x, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def compare(B: int, T: int, H: int, K: int, gated: bool, variants: dict[str, str]) -> dict:
    rng = np.random.default_rng(T + gated)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / np.sqrt(K), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16)
    decay = None if gated else jnp.asarray(np.exp(retnet_log_decay(H)), jnp.float32)
    log_gate = (jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)) / 16
                if gated else None)
    base = fleetjax.IMPLEMENTATIONS["pallas"].config_for(None, q, v)
    outs = {}
    for name, walks in variants.items():
        config = with_walk_fields(base, walks)
        op = jax.jit(lambda q, k, v, d, g, config=config: fleetjax.fleet_attention(
            q, k, v, d, log_gate=g, implementation="pallas", config=config))
        outs[name] = op(q, k, v, decay, log_gate)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = jax.jit(lambda q, k, v, d, g: fleetjax.fleet_attention(f32(q), f32(k), f32(v), d, log_gate=g,
                                                               implementation="xla"))(q, k, v, decay, log_gate)
    (a, out_a), (b, out_b) = outs.items()
    return dict(B=B, T=T, H=H, K=K, gated=gated, bitwise=bool(jnp.array_equal(out_a, out_b)),
                **{f"relerr_{a}": rel_err(out_a, ref), f"relerr_{b}": rel_err(out_b, ref)},
                default=str(base.mosaic_walks), device=jax.devices()[0].device_kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128, help="K = V")
    ap.add_argument("--T", default="4096,16384", help="comma-separated lengths")
    ap.add_argument("--a", default='{"forward_pieces": 2, "forward_block_v": null}', help="--walks of variant a")
    ap.add_argument("--b", default='{"forward_pieces": 1, "forward_block_v": 32}', help="--walks of variant b")
    args = ap.parse_args(argv)
    for T in (int(t) for t in args.T.split(",")):
        for gated in (False, True):
            try:
                row = compare(args.B, T, args.H, args.K, gated, {"a": args.a, "b": args.b})
            except ValueError as error:
                ap.error(str(error))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
