"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology", arXiv:2312.04927): FleetAttention
(with the learned per-head decay alone, or with a per-token gate too: --attentions fleet_gated) against
causal softmax attention in the same 2-layer model of fleetjax.models.lm.

    PYTHONPATH=. python experiments/mqar.py [--out DIR] [--smoke] [--d-models 64,128,256] [--steps 40000]

The task: a sequence opens with N key-value pairs ``k_1 v_1 ... k_N v_N`` (keys distinct, drawn from the
lower half of the vocabulary, values from the upper half); later every key appears once more, at random
even positions, and the model must name its value there (the next input is the filler token 0, as are all
places that hold no pair). The model is trained (cross entropy) and scored (argmax accuracy) only on those
values.
Training batches are fresh random sequences every step (generated on the device); the accuracy is measured
on a fixed held-out set of --eval-examples sequences.

Writes <date>-<device>-mqar.json, .png (accuracy against d_model, accuracy during training) and .md into
--out (default experiments/results). --smoke runs a small vocabulary, short sequences and few steps on the
CPU to check every code path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import environment, plots, records  # noqa: E402

environment.setup_jax_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fleetjax.models import lm  # noqa: E402


def mqar_example(key: jax.Array, seq_len: int, num_pairs: int, vocab_size: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One MQAR sequence: (inputs int32 [T], targets int32 [T], mask bool [T]).

    As Zoology's generator: the context ``k_1 v_1 ... k_N v_N`` then each key once more at a random even
    position; the input after a queried key is the filler 0 and its value is only the target there (the mask
    marks those places). Showing the values in the inputs too would let a model narrow each answer down to the
    pairs not yet queried (accuracy H_N / N without recall: 0.52 for 4 pairs, 0.34 for 8).
    """
    if vocab_size < 4 or num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"vocab_size={vocab_size} leaves too few distinct keys for num_pairs={num_pairs}")
    slots = (seq_len - 2 * num_pairs) // 2  # even places for the queries after the context
    if slots < num_pairs:
        raise ValueError(f"seq_len={seq_len} is too short for {num_pairs} pairs and their {num_pairs} queries "
                         f"(needs seq_len >= {4 * num_pairs})")
    half = vocab_size // 2
    k_keys, k_values, k_slots, k_order = jax.random.split(key, 4)
    keys = jax.random.permutation(k_keys, jnp.arange(1, half))[:num_pairs]  # distinct, never the filler 0
    values = jax.random.randint(k_values, (num_pairs,), half, vocab_size)
    context = jnp.stack([keys, values], axis=1).reshape(-1)
    where = 2 * num_pairs + 2 * jax.random.permutation(k_slots, slots)[:num_pairs]  # query positions
    order = jax.random.permutation(k_order, num_pairs)
    inputs = jnp.zeros(seq_len, jnp.int32).at[:2 * num_pairs].set(context).at[where].set(keys[order])
    targets = jnp.zeros(seq_len, jnp.int32).at[:2 * num_pairs - 1].set(context[1:]).at[where].set(values[order])
    mask = jnp.zeros(seq_len, bool).at[where].set(True)
    return inputs, targets, mask


def mqar_batch(key: jax.Array, batch_size: int, seq_len: int, num_pairs: int, vocab_size: int):
    """[B, T] inputs, targets and mask (see :func:`mqar_example`)."""
    return jax.vmap(lambda k: mqar_example(k, seq_len, num_pairs, vocab_size))(jax.random.split(key, batch_size))


# FleetAttention's variants: the learned per-head decay alone, and with the GLA-style per-token gate of rank 16.
FLEET_VARIANTS = {"fleet": None, "fleet_gated": 16}


def run_one(attention: str, d_model: int, args: argparse.Namespace, log, deadline: float) -> dict[str, Any]:
    """Train one model for args.steps steps (fewer if time.perf_counter() passes ``deadline``)."""
    heads = max(1, d_model // args.head_dim)
    fleet = attention in FLEET_VARIANTS
    implementation = args.fleet_implementation if fleet else args.softmax_implementation
    layer = dict(attention="fleet", gate_rank=FLEET_VARIANTS[attention]) if fleet else dict(
        attention="softmax", **{"learned": dict(rope_base=None, learned_positions=args.seq_len),
                                "rotary": {}}[args.softmax_positions])
    config = lm.LMConfig(vocab_size=args.vocab_size, d_model=d_model, num_layers=args.num_layers, num_heads=heads,
                         implementation=implementation, dtype=args.dtype, **layer)
    opt = lm.OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10),
                             total_steps=args.steps, weight_decay=args.weight_decay)
    trainer = lm.Trainer(lm.LanguageModel(config, rngs=nnx.Rngs(args.seed)), lm.make_optimizer(opt))
    make_batch = lambda k: mqar_batch(k, args.batch_size, args.seq_len, args.num_pairs, args.vocab_size)
    eval_sets = [jax.jit(make_batch)(k) for k in jax.random.split(jax.random.key(10_000 + args.seed),
                                                                    max(1, args.eval_examples // args.batch_size))]

    def accuracy() -> float:
        return float(np.mean([float(trainer.evaluate(*batch)["accuracy"]) for batch in eval_sets]))

    started = time.perf_counter()
    # The steps run eval_every at a time in one compiled call (data made on the device): a step of these
    # small models is shorter than the host's dispatch of it.
    chunk = min(args.eval_every, args.steps)
    curve, first_call_s = [], None
    key = jax.random.key(args.seed)
    step = 0
    while step < args.steps:
        key, sub = jax.random.split(key)
        count = min(chunk, args.steps - step)
        losses = trainer.run_steps(make_batch, sub, count)["loss"]
        step += count
        curve.append({"step": step, "accuracy": accuracy(), "loss": float(np.mean(jax.device_get(losses[-20:])))})
        if first_call_s is None:  # compilations, the first chunk of steps and its evaluation
            first_call_s = time.perf_counter() - started
        log(f"  {attention} d_model={d_model} step {step}: accuracy {curve[-1]['accuracy']:.3f}, "
            f"loss {curve[-1]['loss']:.3f}")
        if time.perf_counter() > deadline:
            break
    wall = time.perf_counter() - started
    final = curve[-1]
    # Steady state (evaluations included), without the first chunk's compilations when there was a second.
    later = final["step"] - chunk
    ms = (wall - first_call_s) / later * 1e3 if later else wall / final["step"] * 1e3
    log(f"{attention:8s} d_model={d_model:4d} H={heads}: accuracy {final['accuracy']:.3f}, loss {final['loss']:.3f} "
        f"after {final['step']} steps ({wall:.0f}s, first call {first_call_s:.1f}s)"
        + ("" if final["step"] == args.steps else " STOPPED by the time budget"))
    return {"op": "mqar", "impl": f"{'fleetjax' if fleet else 'softmax'}.{implementation or 'auto'}",
            "attention": attention, "dtype": args.dtype, "B": args.batch_size, "T": args.seq_len, "H": heads,
            "K": d_model // heads, "V": d_model // heads, "ms": ms, "relerr": None,
            "hbm_floor_ms": None, "d_model": d_model, "num_pairs": args.num_pairs, "vocab_size": args.vocab_size,
            "steps_done": final["step"], "accuracy": final["accuracy"], "final_loss": final["loss"], "curve": curve,
            "parameters": lm.count_params(trainer.model), "first_call_s": first_call_s, "wall_s": wall,
            "trace_count": trainer.trace_count}


def _plot(results: dict[str, Any], png: Path) -> Path | None:
    plt = plots.pyplot_or_none()
    if plt is None:
        return None
    records = [r for r in results["records"] if "accuracy" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, attention in enumerate((*FLEET_VARIANTS, "softmax")):
        rows = sorted((r for r in records if r["attention"] == attention), key=lambda r: r["d_model"])
        if not rows:
            continue
        left.plot([r["d_model"] for r in rows], [r["accuracy"] for r in rows], "o-", color=f"C{n}", label=attention)
        for m, r in enumerate(rows):
            right.plot([c["step"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], color=f"C{n}",
                       ls=("-", "--", ":", "-.")[m % 4], label=f"{attention} d={r['d_model']}")
    left.set_xscale("log", base=2)
    left.set_xlabel("d_model")
    left.set_ylabel("MQAR accuracy (held out)")
    left.set_ylim(-0.02, 1.02)
    left.grid(alpha=0.3)
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("accuracy")
    right.set_ylim(-0.02, 1.02)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    s = results["settings"]
    fig.suptitle(f"MQAR on {results['device']}: T={s['seq_len']}, {s['num_pairs']} pairs, vocab {s['vocab_size']}, "
                 f"{s['num_layers']} layers, {s['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def format_table(records: list[dict[str, Any]]) -> str:
    lines = ["| attention | d_model | heads | parameters | steps | accuracy | loss | ms/step | first call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['attention']} | {r['d_model']} | | | | failed: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['attention']} ({r['impl']}) | {r['d_model']} | {r['H']} | {r['parameters']:,} | "
                         f"{r['steps_done']} | "
                         f"{r['accuracy']:.3f} | {r['final_loss']:.3f} | {r['ms']:.2f} | {r['first_call_s']:.1f} |")
    return "\n".join(lines)


def summarize(paths: list[Path], out: Path) -> str:
    """One table and plot of the runs in several result files of one task (a sweep made of separate calls).

    Writes out.md and out.png: every run's accuracy by d_model, and per model the best over the runs, as
    Zoology reports its learning-rate sweeps. Files of another task setting (T, pairs, vocabulary) are refused.
    """
    runs, task = [], None
    for path in paths:
        data = json.loads(Path(path).read_text())
        s = data["settings"]
        setting = (s["seq_len"], s["num_pairs"], s["vocab_size"], s["num_layers"])
        if task is None:
            task = setting
        elif setting != task:
            raise ValueError(f"{path} is another task (T, pairs, vocab, layers) {setting}, expected {task}")
        for r in data["records"]:
            if "accuracy" not in r:
                continue
            # Files written before --softmax-positions existed used rotary embeddings.
            model = (f"softmax ({s.get('softmax_positions', 'rotary')} positions)" if r["attention"] == "softmax"
                     else r["attention"])
            runs.append({"model": model, "d_model": r["d_model"], "lr": s["learning_rate"], "B": s["batch_size"],
                         "steps": r["steps_done"], "planned": s["steps"], "accuracy": r["accuracy"],
                         "file": Path(path).name})
    runs.sort(key=lambda r: (r["model"], r["d_model"], r["lr"], r["B"], r["planned"]))
    lines = ["| model | d_model | peak lr | batch | steps (planned) | accuracy | file |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['d_model']} | {r['lr']:g} | {r['B']} | {r['steps']} ({r['planned']}) | "
              f"{r['accuracy']:.3f} | {r['file']} |" for r in runs]
    models = sorted({r["model"] for r in runs})
    widths = sorted({r["d_model"] for r in runs})
    best = {(m, d): max((r["accuracy"] for r in runs if r["model"] == m and r["d_model"] == d), default=None)
            for m in models for d in widths}
    lines += ["", "Best over the runs:", "", "| model | " + " | ".join(f"d_model {d}" for d in widths) + " |",
              "|---|" + "---|" * len(widths)]
    lines += [f"| {m} | " + " | ".join("-" if best[m, d] is None else f"{best[m, d]:.3f}" for d in widths) + " |"
              for m in models]
    table = "\n".join(lines)
    T, pairs, vocab, layers = task
    out.with_suffix(".md").write_text(f"MQAR: T={T}, {pairs} pairs, vocab {vocab}, {layers} layers\n\n{table}\n")
    plt = plots.pyplot_or_none()
    if plt is None:
        return table
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, m in enumerate(models):
        mine = [r for r in runs if r["model"] == m]
        ax.scatter([r["d_model"] * (1 + 0.04 * (n - 1)) for r in mine], [r["accuracy"] for r in mine],
                   color=f"C{n}", alpha=0.45, s=18)
        ds = [d for d in widths if best[m, d] is not None]
        ax.plot(ds, [best[m, d] for d in ds], "o-", color=f"C{n}", label=f"{m}: best")
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(d) for d in widths])
    ax.set_xlabel("d_model")
    ax.set_ylabel("MQAR accuracy (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"MQAR T={T}, {pairs} pairs, vocab {vocab}: every run (dots), best per width (lines)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(records.RESULTS_DIR))
    parser.add_argument("--smoke", action="store_true", help="small and short, on the CPU")
    parser.add_argument("--d-models", default=None, help="comma-separated widths (default 64,128,256; smoke 32)")
    parser.add_argument("--attentions", default="fleet,softmax",
                        help="comma-separated: fleet (per-head decay), fleet_gated (plus a per-token gate), softmax")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (smoke 32)")
    parser.add_argument("--num-pairs", type=int, default=None, help="key-value pairs (default 8; smoke 4)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 8192, as Zoology (smoke 64)")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32, help="heads = d_model // head_dim")
    parser.add_argument("--steps", type=int, default=None,
                        help="default 40000 (smoke 60); --budget-s may stop a run earlier")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (smoke 16)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak (default 3e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW's, on the matrices (embedding included)")
    parser.add_argument("--eval-every", type=int, default=None, help="default 2000 (smoke 20); also the steps of one compiled call")
    parser.add_argument("--eval-examples", type=int, default=None, help="default 1024 (smoke 64)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fleet-implementation", default=None, help="fleet_attention implementation (auto)")
    parser.add_argument("--softmax-implementation", default=None, help="jax.nn.dot_product_attention's")
    parser.add_argument("--softmax-positions", choices=("learned", "rotary"), default="learned",
                        help="the softmax baseline's positions: a learned absolute table (Zoology's attention "
                             "baseline) or rotary embeddings; FleetAttention has none (its decays give the order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget of all runs: a run that passes its share stops early (recorded)")
    parser.add_argument("--name", default="mqar")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                        help="no training: gather these result files into <out>/<name>.md and .png")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize([Path(p) for p in args.summarize], Path(args.out) / args.name))
        return 0
    smoke = args.smoke
    defaults = dict(d_models="32" if smoke else "64,128,256", seq_len=32 if smoke else 128,
                    num_pairs=4 if smoke else 8, vocab_size=64 if smoke else 8192, steps=60 if smoke else 40000,
                    batch_size=16 if smoke else 64, learning_rate=3e-3,
                    eval_every=20 if smoke else 2000, eval_examples=64 if smoke else 1024)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    d_models = [int(d) for d in args.d_models.split(",")]
    attentions = [a.strip() for a in args.attentions.split(",")]
    unknown = [a for a in attentions if a not in (*FLEET_VARIANTS, "softmax")]
    if unknown:
        parser.error(f"--attentions: unknown {unknown}; choose from {', '.join((*FLEET_VARIANTS, 'softmax'))}")
    mqar_example(jax.random.key(0), args.seq_len, args.num_pairs, args.vocab_size)  # validate the settings early

    info = records.device_info()
    slug = records.device_slug(info)
    path = records.results_path(args.name, device=slug, out_dir=args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    results = records.ResultsFile(path, device=slug, date=records.today(), versions=records.versions(),
                                   device_info=info, smoke=smoke, settings=settings,
                                   task=("MQAR (Zoology): N key-value pairs then every key queried once at random "
                                         "pair-aligned positions; accuracy = argmax of the value after each "
                                         "queried key, on a fixed held-out set"))
    started = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)
    log(f"MQAR on {info.get('device_kind')}: T={args.seq_len}, {args.num_pairs} pairs, vocab {args.vocab_size}, "
        f"{args.steps} steps of {args.batch_size}; results {path}")
    runs = [(d_model, attention) for d_model in d_models for attention in attentions]
    for n, (d_model, attention) in enumerate(runs):
        # Each run may use an equal share of what is left of the budget (the rest keeps its share).
        deadline = time.perf_counter() + (args.budget_s - (time.perf_counter() - started)) / (len(runs) - n)
        try:
            record = run_one(attention, d_model, args, log, deadline)
        except Exception as error:  # noqa: BLE001 - one failed configuration is recorded, the rest still run
            log(f"{attention} d_model={d_model}: {type(error).__name__}: {error}")
            record = {"op": "mqar", "impl": attention, "attention": attention, "dtype": args.dtype,
                      "B": args.batch_size, "T": args.seq_len, "H": None, "K": None, "V": None, "ms": None,
                      "relerr": None, "hbm_floor_ms": None, "d_model": d_model,
                      "error": f"{type(error).__name__}: {error}"}
        results.add(record)
    results.set("wall_s", time.perf_counter() - started)
    table = format_table(results.records)
    path.with_suffix(".md").write_text(
        f"MQAR on {slug}: T={args.seq_len}, {args.num_pairs} pairs, vocab {args.vocab_size}, {args.num_layers} "
        f"layers, {args.steps} steps of {args.batch_size}\n\n{table}\n")
    png = _plot(results.data, path.with_suffix(".png"))
    print(table)
    print(f"wrote {path}, {path.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
