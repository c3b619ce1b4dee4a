"""The byte-level LM of fleetjax.models.lm trained with different attentions: tokens/s, peak memory, loss curves.

    PYTHONPATH=. python experiments/lm_bench.py [--out DIR] [--smoke] [--steps 300] [--seq-lens 2048,8192]

Variants (--variants): fleet:pallas and fleet:xla (FleetAttention through fleet_attention's "pallas" and
"xla" implementations) and softmax:cudnn (causal jax.nn.dot_product_attention, implementation="cudnn", with
rotary embeddings), all in the same model: d_model 512, 4 layers, 8 heads (K = V = 64), MLP 4x, bfloat16
compute, float32 parameters, AdamW. Every variant sees the same batches (the same seed), and every step
holds the same number of tokens (--tokens-per-step) at every sequence length, so the loss curves compare
step by step.

Each (variant, T) runs in its own process, so that device.memory_stats()["peak_bytes_in_use"] (which JAX
cannot reset) is that run's peak. Recorded per run: tokens/s over the timed steps (all steps after
--warmup-steps, one sync at either end), ms per step, peak memory, XLA's memory analysis of the compiled
step, compile time, the loss of every step, and a validation loss at the end.

Writes <date>-<device>-lm_bench.json, .png (loss curves per T, tokens/s, peak memory) and .md (a table)
into --out (default experiments/results). --smoke runs a tiny model on the CPU ("xla" and softmax "xla"; add
fleet:pallas to --variants for Pallas in interpret mode) to check every code path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import environment, memory, plots, records  # noqa: E402

GPU_MODEL = dict(d_model=512, num_layers=4, num_heads=8)
SMOKE_MODEL = dict(d_model=32, num_layers=2, num_heads=2)


def _variant(name: str) -> tuple[str, str | None]:
    attention, _, implementation = name.partition(":")
    if attention not in ("fleet", "softmax"):
        raise SystemExit(f"--variants: {name!r} must be fleet:<implementation> or softmax:<implementation>")
    return attention, implementation or None


# ------------------------------------------------------------------------------------------- one run (child)

def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one variant at one T; returns its record. Runs in a fresh process (see the module docstring)."""
    environment.setup_jax_environment()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fleetjax.models import data, lm

    attention, implementation = _variant(spec["variant"])
    T, steps, warmup = spec["T"], spec["steps"], spec["warmup_steps"]
    B = max(1, spec["tokens_per_step"] // T)
    config = lm.LMConfig(**spec["model"], attention=attention, implementation=implementation, dtype=spec["dtype"])
    opt = lm.OptimizerConfig(learning_rate=spec["learning_rate"], warmup_steps=min(50, steps // 5), total_steps=steps)
    trainer = lm.Trainer(lm.LanguageModel(config, rngs=nnx.Rngs(0)), lm.make_optimizer(opt))

    corpus = data.load_stdlib_corpus()
    rng = np.random.default_rng(spec["seed"])  # the same batches for every variant at this T
    batches = jnp.asarray(np.stack([data.random_windows(corpus.train, B, T + 1, rng) for _ in range(steps)]))
    val = jnp.asarray(data.random_windows(corpus.validation, B * spec["eval_batches"], T + 1,
                                          np.random.default_rng(1)).reshape(spec["eval_batches"], B, T + 1))
    compiled = trainer.compile(batches[0, :, :-1], batches[0, :, 1:])

    losses = []
    start = time.perf_counter()
    deadline = time.perf_counter() + spec["train_budget_s"]
    for i in range(steps):
        if i == warmup:
            jax.block_until_ready(losses)
            timed_start = time.perf_counter()
        if i > warmup and i % 25 == 0 and time.perf_counter() > deadline:
            jax.block_until_ready(losses)
            if time.perf_counter() > deadline:  # out of time: stop here, the record says how far it got
                break
        losses.append(trainer.step(batches[i, :, :-1], batches[i, :, 1:])["loss"])
    jax.block_until_ready(losses)
    end = time.perf_counter()
    steps_done = len(losses)
    timed = steps_done - warmup
    ms = (end - timed_start) / timed * 1e3
    val_loss = float(np.mean([float(trainer.evaluate(b[:, :-1], b[:, 1:])["loss"]) for b in val]))

    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    K = config.d_model // config.num_heads
    return {
        "op": "lm_train", "impl": f"{'fleetjax' if attention == 'fleet' else 'softmax'}.{implementation or 'auto'}",
        "variant": spec["variant"], "dtype": spec["dtype"], "B": B, "T": T, "H": config.num_heads, "K": K, "V": K,
        "ms": ms, "relerr": None, "hbm_floor_ms": None,
        "tokens_per_s": timed * B * T / (end - timed_start),
        "peak_memory_mb": stats["peak_bytes_in_use"] / memory.MIB if stats and "peak_bytes_in_use" in stats else None,
        "xla_memory_mb": {k: v / memory.MIB for k, v in compiled.items() if k != "compile_s"} or None,
        "compile_s": compiled["compile_s"], "wall_s": end - start, "steps": steps, "steps_done": steps_done,
        "timed_steps": timed,
        "parameters": lm.count_params(trainer.model), "model": config.to_dict(),
        "losses": [float(x) for x in jax.device_get(losses)], "validation_loss": val_loss,
        "final_loss": float(np.mean(jax.device_get(losses[-10:]))), "trace_count": trainer.trace_count,
    }


# ------------------------------------------------------------------------------------------- the benchmark

def _value(record: dict[str, Any], key: str, have_peak: bool) -> float:
    if key != "memory":
        return record.get(key) or 0.0
    if have_peak:
        return record["peak_memory_mb"]
    xla = record.get("xla_memory_mb") or {}
    return xla.get("argument", 0) + xla.get("output", 0) + xla.get("temp", 0) - xla.get("alias", 0)


def _plot(results: dict[str, Any], png: Path) -> Path | None:
    plt = plots.pyplot_or_none()
    if plt is None:
        return None
    import numpy as np
    records = [r for r in results["records"] if "losses" in r]
    if not records:
        return None
    seq_lens = sorted({r["T"] for r in records})
    variants = list(dict.fromkeys(r["variant"] for r in records))
    fig, axes = plt.subplots(1, len(seq_lens) + 2, figsize=(4.2 * (len(seq_lens) + 2), 3.6))
    for ax, T in zip(axes, seq_lens):
        for n, r in enumerate(r for r in records if r["T"] == T):
            losses = np.asarray(r["losses"])
            window = max(1, min(20, len(losses) // 10))
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(range(1, len(losses) + 1), losses, lw=0.5, alpha=0.3, color=f"C{n}")
            ax.plot(range(window, len(losses) + 1), smooth, lw=1.2, color=f"C{n}", label=r["variant"])
        ax.set_title(f"training loss, T = {T}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per byte")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    width = 0.8 / max(len(variants), 1)
    have_peak = all(r.get("peak_memory_mb") for r in records)
    memory_label = "peak memory (MiB)" if have_peak else "XLA memory analysis: arguments + outputs + temp (MiB)"
    for ax, key, label in ((axes[-2], "tokens_per_s", "tokens/s"), (axes[-1], "memory", memory_label)):
        for j, variant in enumerate(variants):
            values = [next((_value(r, key, have_peak) for r in records if r["T"] == T and r["variant"] == variant), 0)
                      for T in seq_lens]
            ax.bar([i + j * width for i in range(len(seq_lens))], values, width, label=variant)
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(seq_lens))])
        ax.set_xticklabels([f"T={T}" for T in seq_lens])
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"fleetjax LM on {results['device']} ({results['model_summary']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def format_table(records: list[dict[str, Any]]) -> str:
    lines = ["| variant | T | B | steps | tokens/s | ms/step | peak MiB | XLA temp MiB | compile s | loss (last 10) | val loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['T']} | | | failed: {r['error'][:80]} | | | | | | |")
            continue
        temp = (r.get("xla_memory_mb") or {}).get("temp")
        peak = r.get("peak_memory_mb")
        lines.append(f"| {r['variant']} | {r['T']} | {r['B']} | {r['steps_done']} | {r['tokens_per_s']:,.0f} | {r['ms']:.2f} | "
                     f"{'-' if peak is None else f'{peak:,.0f}'} | {'-' if temp is None else f'{temp:,.0f}'} | "
                     f"{r['compile_s']:.1f} | {r['final_loss']:.3f} | {r['validation_loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(records.RESULTS_DIR), help="folder for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code paths")
    parser.add_argument("--variants", default=None,
                        help="comma-separated attention:implementation (default fleet:pallas,fleet:xla,softmax:cudnn; "
                             "smoke fleet:xla,softmax:xla)")
    parser.add_argument("--seq-lens", default=None, help="comma-separated T (default 2048,8192; smoke 64,128)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; smoke 8)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (default 10; smoke 2)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="B * T (default 16384; smoke 256)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--dtype", default=None, help="computation dtype (default bfloat16; smoke float32)")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="wall-clock budget of all runs; each run's training loop gets an equal share of what "
                             "is left and stops early (recorded as steps_done) when it passes it")
    parser.add_argument("--run-timeout-s", type=float, default=240.0, help="time limit of one run (one process)")
    parser.add_argument("--name", default="lm_bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one run: read the spec, write the record
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result_path"]).write_text(json.dumps(run_one(spec)))
        return 0

    smoke = args.smoke
    variants = (args.variants or ("fleet:xla,softmax:xla" if smoke else "fleet:pallas,fleet:xla,softmax:cudnn")).split(",")
    for v in variants:
        _variant(v)
    seq_lens = [int(t) for t in (args.seq_lens or ("64,128" if smoke else "2048,8192")).split(",")]
    steps = args.steps or (8 if smoke else 300)
    warmup = args.warmup_steps if args.warmup_steps is not None else (2 if smoke else 10)
    if not 0 <= warmup < steps:
        raise SystemExit(f"--warmup-steps must lie in [0, --steps), got {warmup}")
    base = dict(model=SMOKE_MODEL if smoke else GPU_MODEL, steps=steps, warmup_steps=warmup,
                tokens_per_step=args.tokens_per_step or (256 if smoke else 16384), learning_rate=args.learning_rate,
                dtype=args.dtype or ("float32" if smoke else "bfloat16"), eval_batches=args.eval_batches, seed=0)

    # The parent touches the device only to describe it; without preallocation it leaves the memory to the runs.
    environment.setup_jax_environment()
    info = records.device_info()
    slug = records.device_slug(info)
    path = records.results_path(args.name, device=slug, out_dir=args.out)
    model = base["model"]
    summary = (f"d={model['d_model']}, L={model['num_layers']}, H={model['num_heads']}, {base['dtype']}, "
               f"{base['tokens_per_step']} tokens/step, {steps} steps")
    results = records.ResultsFile(
        path, device=slug, date=records.today(), versions=records.versions(), device_info=info, smoke=smoke,
        model_summary=summary, settings=base,
        timing=f"tokens/s and ms/step over steps {warmup + 1}..{steps} (one sync before and after)",
        memory=("peak_memory_mb: device.memory_stats()['peak_bytes_in_use'] at the end of a run in its own "
                "process (parameters, optimizer state, the run's batches and the step's working memory); "
                "xla_memory_mb: compiled.memory_analysis() of the training step"))
    print(f"lm_bench on {info.get('device_kind')}: {summary}; results {path}", flush=True)
    started = time.perf_counter()
    runs = [(T, variant) for T in seq_lens for variant in variants]
    with tempfile.TemporaryDirectory() as tmp:
        for n, (T, variant) in enumerate(runs):
            share = (args.budget_s - (time.perf_counter() - started)) / (len(runs) - n)
            # The share covers the whole process; about 40 s of it go to start-up, data and compilation.
            spec = {**base, "variant": variant, "T": T, "result_path": str(Path(tmp) / "record.json"),
                    "train_budget_s": max(5.0, share - (5.0 if smoke else 40.0))}
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            Path(spec["result_path"]).unlink(missing_ok=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], capture_output=True,
                                      text=True, timeout=args.run_timeout_s, env={**os.environ})
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    raise RuntimeError(" | ".join(tail) or f"exit status {proc.returncode}")
                record = json.loads(Path(spec["result_path"]).read_text())
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                record = {"op": "lm_train", "impl": variant, "variant": variant, "dtype": base["dtype"], "B": None,
                          "T": T, "H": model["num_heads"], "K": None, "V": None, "ms": None, "relerr": None,
                          "hbm_floor_ms": None, "error": f"{type(error).__name__}: {error}"}
            results.add(record)
            status = record.get("error") or (f"{record['tokens_per_s']:,.0f} tokens/s, {record['ms']:.2f} ms/step, "
                                             f"peak {record['peak_memory_mb'] or float('nan'):,.0f} MiB, "
                                             f"loss {record['final_loss']:.3f}")
            print(f"[{time.perf_counter() - started:6.1f}s] T={T} {variant}: {status} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    results.set("wall_s", time.perf_counter() - started)
    table = format_table(results.records)
    path.with_suffix(".md").write_text(f"LM benchmark on {slug} ({summary})\n\n{table}\n")
    png = _plot(results.data, path.with_suffix(".png"))
    print(table)
    print(f"wrote {path}, {path.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
