"""One training run of the byte-level LM (:mod:`fleetjax.models.lm`) on the Python standard library's source
(offline, no download): a progress bar, validation, a JSON log, a loss-curve PNG, a checkpoint directory and
a generated sample. ``fleetjax train`` and ``fleetjax demo`` call :func:`run_train`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint
from flax import nnx

from fleetjax.models import checkpoint, lm
from fleetjax.models import data as text_data
from fleetjax.models.options import TrainOptions

CHECKPOINT = "checkpoint"  # the run's checkpoint directory, under its out directory


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax-checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__}


def _device() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')}".rstrip(":")


def plot_losses(log: dict[str, Any], path: Path) -> Path | None:
    """Train and validation loss (bits per byte) against step; None (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fleetjax[bench]'): skipping the loss plot",
              file=sys.stderr)
        return None
    ln2 = np.log(2.0)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(log["steps"], np.asarray(log["train_loss"]) / ln2, lw=0.8, alpha=0.6, label="train")
    if log["eval"]:
        ax.plot([e["step"] for e in log["eval"]], [e["bits_per_byte"] for e in log["eval"]], "o-",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    c = log["model"]
    ax.set_title(f"fleetjax LM ({c['attention']}, d={c['d_model']}, L={c['num_layers']}, H={c['num_heads']}) "
                 f"on the stdlib", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_train(options: TrainOptions, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate, checkpoint, sample; returns the log (also written to <out>/log.json)."""
    options.validate()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = text_data.load_stdlib_corpus(max_bytes=options.max_bytes)
    echo(f"data: {corpus.num_files} stdlib files from {corpus.source}: {corpus.train.size:,} train bytes, "
         f"{corpus.validation.size:,} validation bytes")

    opt_config = lm.OptimizerConfig(learning_rate=options.learning_rate, warmup_steps=options.warmup_steps,
                                    total_steps=options.steps, weight_decay=options.weight_decay,
                                    clip_norm=options.clip_norm)
    tx = lm.make_optimizer(opt_config)
    if options.resume:
        model, optimizer, _ = checkpoint.restore_checkpoint(options.resume, tx)
        trainer = lm.Trainer(model, tx, optimizer)
        config = model.config
        echo(f"resumed from {options.resume} at step {trainer.step_count}")
    else:
        config = lm.LMConfig(d_model=options.d_model, num_layers=options.num_layers, num_heads=options.num_heads,
                             attention=options.attention, implementation=options.implementation,
                             gate_rank=options.gate_rank, dtype=options.dtype)
        trainer = lm.Trainer(lm.LanguageModel(config, rngs=nnx.Rngs(options.seed)), tx)
    first_step = trainer.step_count
    n_params = lm.count_params(trainer.model)
    echo(f"model: {n_params:,} parameters, {config.attention} attention, d={config.d_model}, "
         f"L={config.num_layers}, H={config.num_heads}, {config.dtype}; device {_device()}")

    rng = np.random.default_rng(options.seed + first_step)
    val = text_data.random_windows(corpus.validation, options.batch_size * options.eval_batches,
                                   options.seq_len + 1, np.random.default_rng(12345))
    val_batches = [val[i * options.batch_size:(i + 1) * options.batch_size] for i in range(options.eval_batches)]

    def evaluate() -> float:
        losses = [trainer.evaluate(jnp.asarray(b[:, :-1]), jnp.asarray(b[:, 1:]))["loss"] for b in val_batches]
        return float(np.mean(jax.device_get(losses)))

    log: dict[str, Any] = {"model": config.to_dict(), "optimizer": dataclasses.asdict(opt_config),
                           "options": dataclasses.asdict(options), "parameters": n_params,
                           "data": {"source": corpus.source, "files": corpus.num_files,
                                    "train_bytes": int(corpus.train.size),
                                    "validation_bytes": int(corpus.validation.size)},
                           "device": _device(), "versions": _versions(), "steps": [], "train_loss": [],
                           "eval": []}
    tokens_per_step = options.batch_size * options.seq_len
    pending: list[tuple[int, jax.Array]] = []
    progress = None
    if options.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=options.steps, desc="train", unit="step", dynamic_ncols=True)

    start = time.perf_counter()
    timed_start = None  # the clock for tokens/s starts after the first (compiling) step
    compile_s = 0.0
    tokens_per_s = float("nan")
    for i in range(options.steps):
        step = first_step + i + 1
        batch = jnp.asarray(text_data.random_windows(corpus.train, options.batch_size, options.seq_len + 1, rng))
        pending.append((step, trainer.step(batch[:, :-1], batch[:, 1:])["loss"]))
        last = i == options.steps - 1
        if i == 0 or (i + 1) % 10 == 0 or last:  # fetch losses in groups: no host sync every step
            losses = jax.device_get([loss for _, loss in pending])
            log["steps"] += [s for s, _ in pending]
            log["train_loss"] += [float(x) for x in losses]
            pending.clear()
            now = time.perf_counter()
            if timed_start is None:
                compile_s, timed_start, timed_from = now - start, now, i + 1
            elif i + 1 > timed_from:
                tokens_per_s = (i + 1 - timed_from) * tokens_per_step / (now - timed_start)
            if progress is not None:
                progress.set_postfix(loss=f"{log['train_loss'][-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                progress.update(i + 1 - progress.n)
        if (i + 1) % options.eval_every == 0 or last:
            val_loss = evaluate()
            log["eval"].append({"step": step, "loss": val_loss, "bits_per_byte": val_loss / np.log(2.0)})
            if progress is not None:
                progress.write(f"step {step}: validation loss {val_loss:.4f} "
                               f"({val_loss / np.log(2.0):.3f} bits/byte)")
    if progress is not None:
        progress.close()
    wall_s = time.perf_counter() - start
    log.update(wall_s=wall_s, compile_s=compile_s, tokens_per_s=tokens_per_s,
               final_train_loss=float(np.mean(log["train_loss"][-10:])), final_validation_loss=log["eval"][-1]["loss"])

    saved = checkpoint.save_checkpoint(out / CHECKPOINT, trainer.model, trainer.optimizer,
                                       metadata={"step": trainer.step_count})
    log["checkpoint"] = str(saved)
    prompt = text_data.encode(options.prompt or "\n")
    tokens = lm.generate(trainer.model, jnp.asarray(prompt)[None], options.sample_tokens,
                         key=jax.random.key(options.seed), temperature=options.temperature)
    log["sample"] = {"prompt": options.prompt, "temperature": options.temperature,
                     "text": text_data.decode(np.asarray(tokens[0]))}
    (out / "log.json").write_text(json.dumps(log, indent=1))
    plot = plot_losses(log, out / "loss.png") if options.plot else None
    echo(f"done in {wall_s:.1f}s (first step incl. compilation {compile_s:.1f}s), {tokens_per_s:,.0f} tokens/s; "
         f"train loss {log['final_train_loss']:.3f}, validation loss {log['final_validation_loss']:.3f} nats "
         f"({log['final_validation_loss'] / np.log(2.0):.3f} bits/byte)")
    echo(f"wrote {out / 'log.json'}, {saved}/" + (f", {plot}" if plot else ""))
    return log
