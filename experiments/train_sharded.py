"""Train the byte-level LM (fleetjax.models.lm) on a 2-D mesh, data x sequence (issue 7, item 2).

    PYTHONPATH=. python experiments/train_sharded.py [--data 2 --seq 4] [--steps 300] [--smoke]

Mesh axes "data" (the batch is split) and "seq" (T is split in contiguous blocks). Parameters and optimizer
state are replicated. Each step runs the loss and its gradient under ``jax.shard_map``: every FleetAttention
layer calls ``fleet_attention(..., sequence_axis_name="seq")`` and exchanges one [B, H, K, V] state per
device; embeddings, norms, MLPs and the cross entropy work position by position, so nothing else needs to
know that T is split. The loss is the pmean over both axes of each device's mean cross entropy; with
``check_vma=True`` its gradient with respect to the replicated parameters is the global gradient (JAX sums
it over the devices where the replicated parameters meet the device-varying activations).

Before training, the sharded loss and gradient on the first batch are compared with the unsharded model's
(same parameters, one device's view of the whole batch); the run stops if they differ. The log (loss per
step, tokens/s, the check) goes to <out>/<date>-<device>-train_sharded.json.

--smoke: 8 fake CPU devices (2 x 4 mesh), a tiny model and a few steps. On GPUs the default mesh is
1 x (all devices); NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are set when absent, never unset).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMOKE_DEVICES = 8
SMOKE = dict(data=2, seq=4, steps=20, batch_size=4, seq_len=64, d_model=32, num_layers=2, num_heads=2,
             learning_rate=3e-3, warmup_steps=5, dtype="float32", max_bytes=300_000, log_every=5)
FULL = dict(data=None, seq=None, steps=300, batch_size=8, seq_len=8192, d_model=512, num_layers=4,
            num_heads=8, learning_rate=2e-3, warmup_steps=50, dtype="bfloat16", max_bytes=None, log_every=25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_DEVICES} fake CPU devices, tiny model, {SMOKE['steps']} steps")
    parser.add_argument("--data", type=int, default=None, help="devices on the data axis (default: 1; smoke 2)")
    parser.add_argument("--seq", type=int, default=None,
                        help="devices on the sequence axis (default: the remaining devices; smoke 4)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (divisible by --data)")
    parser.add_argument("--seq-len", type=int, default=None, help="global T (divisible by --seq)")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="computation dtype: float32 or bfloat16")
    parser.add_argument("--implementation", default=None, help="fleet_attention implementation (None: auto)")
    parser.add_argument("--max-bytes", type=int, default=None, help="read at most this much training text")
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder of the JSON log (default experiments/results)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from experiments.environment import prepare_devices
    prepare_devices(smoke_devices=SMOKE_DEVICES if args.smoke else 0)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments import records
    from fleetjax.models import data as text_data
    from fleetjax.models import lm
    from fleetjax.nn import FleetAttention

    # ----------------------------------------------------------------------------------------- the mesh
    count = jax.device_count()
    data_size = args.data or 1
    seq_size = args.seq or count // data_size
    if data_size * seq_size > count:
        raise SystemExit(f"--data {data_size} x --seq {seq_size} needs {data_size * seq_size} devices, "
                         f"{count} exist")
    if args.batch_size % data_size or args.seq_len % seq_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by --data {data_size} and "
                         f"--seq-len {args.seq_len} by --seq {seq_size}")
    mesh = Mesh(np.array(jax.devices()[:data_size * seq_size]).reshape(data_size, seq_size), ("data", "seq"))
    tokens_spec = P("data", "seq")
    tokens_sharding = NamedSharding(mesh, tokens_spec)
    replicated = NamedSharding(mesh, P())

    # ---------------------------------------------------------------------------------- model, optimizer
    config = lm.LMConfig(d_model=args.d_model, num_layers=args.num_layers, num_heads=args.num_heads,
                         implementation=args.implementation, dtype=args.dtype)
    model = lm.LanguageModel(config, rngs=nnx.Rngs(0))
    plain_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The same parameters, run sharded: only the attention layers need to know the sequence axis.
    for block in model.blocks:
        if isinstance(block.attention, FleetAttention):
            block.attention.sequence_axis_name = "seq"
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    tx = lm.make_optimizer(lm.OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                                              total_steps=args.steps))
    params, rest = jax.device_put((params, rest), replicated)
    opt_state = jax.device_put(tx.init(params), replicated)

    def local_loss(graph, params, rest, inputs, targets):
        return lm.cross_entropy(nnx.merge(graph, params, rest)(inputs), targets)

    def sharded_loss_and_grad(params, rest, inputs, targets):
        def body(params, rest, inputs, targets):
            # Equal shards: the global mean is the mean of the local means.
            mean = lambda p: jax.lax.pmean(local_loss(graphdef, p, rest, inputs, targets), ("data", "seq"))
            return jax.value_and_grad(mean)(params)
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), tokens_spec, tokens_spec),
                             out_specs=(P(), P()))(params, rest, inputs, targets)

    @jax.jit
    def check(params, rest, inputs, targets):
        """Sharded and unsharded loss and gradient on one batch."""
        sharded = sharded_loss_and_grad(params, rest, inputs, targets)
        plain = jax.value_and_grad(lambda p: local_loss(plain_graphdef, p, rest, inputs, targets))(params)
        return sharded, plain

    @jax.jit
    def train_step(params, opt_state, rest, inputs, targets):
        loss, grads = sharded_loss_and_grad(params, rest, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    @jax.jit
    def eval_loss(params, rest, inputs, targets):
        return jax.shard_map(
            lambda p, r, x, y: jax.lax.pmean(local_loss(graphdef, p, r, x, y), ("data", "seq")), mesh=mesh,
            in_specs=(P(), P(), tokens_spec, tokens_spec), out_specs=P())(params, rest, inputs, targets)

    # -------------------------------------------------------------------------------------------- data
    corpus = text_data.load_stdlib_corpus(max_bytes=args.max_bytes)
    rng = np.random.default_rng(0)

    def batch(source: np.ndarray) -> tuple[jax.Array, jax.Array]:
        windows = text_data.random_windows(source, args.batch_size, args.seq_len + 1, rng)
        return (jax.device_put(windows[:, :-1], tokens_sharding), jax.device_put(windows[:, 1:], tokens_sharding))

    info = records.device_info()
    print(f"[train_sharded] mesh data={data_size} x seq={seq_size} on {count} x "
          f"{info.get('torch_device') or info['device_kind']}; model {lm.count_params(model):,} parameters, "
          f"{args.num_layers} layers, d_model {args.d_model}, {args.num_heads} heads; batch {args.batch_size} x "
          f"T {args.seq_len} (T per device {args.seq_len // seq_size}); {args.dtype}", flush=True)

    # ------------------------------------------------------------------- sharded equals unsharded, once
    inputs, targets = batch(corpus.train)
    (loss_s, grads_s), (loss_u, grads_u) = check(params, rest, inputs, targets)
    grad_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_u))
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads_s),
                                                                     jax.tree.leaves(grads_u)))
    agreement = {"loss_sharded": float(loss_s), "loss_unsharded": float(loss_u),
                 "loss_relerr": abs(float(loss_s) - float(loss_u)) / abs(float(loss_u)),
                 "grad_relerr": grad_diff / grad_scale}
    tolerance = 1e-4 if args.dtype == "float32" else 5e-2
    print(f"[train_sharded] check on the first batch: loss {agreement['loss_sharded']:.6f} sharded, "
          f"{agreement['loss_unsharded']:.6f} unsharded; gradient relerr {agreement['grad_relerr']:.2e} "
          f"(tolerance {tolerance})", flush=True)
    if not (agreement["loss_relerr"] <= tolerance and agreement["grad_relerr"] <= tolerance):
        raise SystemExit(f"sharded and unsharded disagree: {agreement}")

    # ------------------------------------------------------------------------------------------- train
    log: list[dict[str, Any]] = []
    start = time.perf_counter()
    timed_from, timed_tokens = None, 0
    for step in range(1, args.steps + 1):
        params, opt_state, loss, grad_norm = train_step(params, opt_state, rest, inputs, targets)
        if step == 1:
            jax.block_until_ready(loss)
            timed_from = time.perf_counter()  # the first step compiled; time the rest
        else:
            timed_tokens += args.batch_size * args.seq_len
        if step % args.log_every == 0 or step == args.steps:
            loss = float(loss)
            elapsed = time.perf_counter() - timed_from
            rate = timed_tokens / elapsed if elapsed > 0 and timed_tokens else None
            log.append({"step": step, "loss": loss, "grad_norm": float(grad_norm), "tokens_per_s": rate})
            print(f"  step {step:5d}  loss {loss:.4f}  grad_norm {float(grad_norm):.3f}"
                  f"  tokens/s {rate or 0:,.0f}", flush=True)
        inputs, targets = batch(corpus.train)
    eval_losses = [float(eval_loss(params, rest, *batch(corpus.validation))) for _ in range(4)]
    wall = time.perf_counter() - start
    print(f"[train_sharded] validation loss {np.mean(eval_losses):.4f} nats/byte after {args.steps} steps "
          f"({wall:.1f} s)", flush=True)

    out_dir = Path(args.out) if args.out else records.RESULTS_DIR
    path = records.results_path("train_sharded", device=records.device_slug(info), out_dir=out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "device": records.device_slug(info), "date": records.today(), "versions": records.versions(),
        "device_info": info, "smoke": bool(args.smoke), "mesh": {"data": data_size, "seq": seq_size},
        "config": config.to_dict(), "args": {k: v for k, v in vars(args).items()},
        "check_first_batch": agreement, "log": log, "validation_loss": float(np.mean(eval_losses)),
        "wall_s": wall}, indent=1) + "\n")
    print(f"[train_sharded] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
