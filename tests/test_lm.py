"""fleetjax.models (lm, data, checkpoint, train) on tiny models: training, checkpoints, decoding, the CLI run."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fleetjax import cli
from fleetjax.models import checkpoint, data, lm

TINY = dict(d_model=16, num_layers=1, num_heads=2, mlp_ratio=2)


def _model(seed: int = 0, **kwargs) -> lm.LanguageModel:
    # "scan" compiles fastest; the implementations agree (test_op.py), the layer passes the name on (test_nn.py).
    config = lm.LMConfig(**{**TINY, "implementation": "scan", **kwargs})
    return lm.LanguageModel(config, rngs=nnx.Rngs(seed))


def _batch(B: int = 4, T: int = 24, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    text = np.frombuffer(b"def add(a, b):\n    return a + b\n\n" * 40, np.uint8)
    windows = data.random_windows(text, B, T + 1, np.random.default_rng(seed))
    return jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])


def _tx(steps: int = 30) -> lm.optax.GradientTransformation:
    return lm.make_optimizer(lm.OptimizerConfig(learning_rate=1e-2, warmup_steps=3, total_steps=steps))


def test_shapes_and_tied_output():
    model = _model()
    inputs, _ = _batch()
    logits = nnx.jit(lambda m, x: m(x))(model, inputs)
    assert logits.shape == (4, 24, 256) and logits.dtype == jnp.float32
    assert not hasattr(model, "output")  # the output projection is the embedding itself
    assert lm.count_params(model) > 0


def test_softmax_baseline_shapes_and_no_decode():
    model = _model(attention="softmax", implementation=None)
    inputs, _ = _batch()
    assert model(inputs).shape == (4, 24, 256)
    with pytest.raises(ValueError, match="fleet"):
        lm.generate(model, inputs[:, :3], 2, key=jax.random.key(0))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        lm.LMConfig(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="attention"):
        lm.LMConfig(attention="linear")
    with pytest.raises(ValueError, match="unknown"):
        lm.LMConfig.from_dict({"d_model": 16, "width": 3})


def test_learned_positions():
    model = _model(attention="softmax", implementation=None, rope_base=None, learned_positions=24)
    inputs, _ = _batch()
    assert model(inputs).shape == (4, 24, 256)
    assert model.position.embedding.shape == (24, 16)
    same = jnp.full((1, 8), 7)  # one token repeated: only positions can tell the places apart
    assert not np.allclose(model(same)[0, 0], model(same)[0, 5], atol=1e-3)
    blind = _model(attention="softmax", implementation=None, rope_base=None)
    np.testing.assert_allclose(blind(same)[0, 0], blind(same)[0, 5], atol=1e-5)
    with pytest.raises(ValueError, match="learned positions"):
        model(jnp.concatenate([inputs, inputs], axis=1))
    fleet = _model(learned_positions=24)
    fleet.init_cache(4)
    with pytest.raises(ValueError, match="cannot decode"):
        fleet(inputs[:, :1], decode=True)
    with pytest.raises(ValueError, match="learned_positions"):
        lm.LMConfig(learned_positions=-1)


def test_a_few_steps_reduce_the_loss_and_train_the_decays_without_recompiling():
    model = _model()
    decays_before = [np.asarray(block.attention.decay_logit[...]) for block in model.blocks]
    trainer = lm.Trainer(model, _tx())
    inputs, targets = _batch()
    losses = [float(trainer.step(inputs, targets)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert trainer.trace_count == 1  # one trace for 30 steps: no recompilation
    other_inputs, other_targets = _batch(seed=1)
    trainer.step(other_inputs, other_targets)
    assert trainer.trace_count == 1  # new values, same shapes
    assert trainer.step_count == 31
    for block, before in zip(trainer.model.blocks, decays_before):  # the decays learn through the op's VJP
        assert not np.array_equal(np.asarray(block.attention.decay_logit[...]), before)


def test_the_gated_model_trains_its_gates_and_decays():
    """gate_rank adds the per-token gate to every layer; its parameters and the decays learn together."""
    model = _model(gate_rank=4)
    before = nnx.state(model, nnx.Param)
    trainer = lm.Trainer(model, _tx())
    inputs, targets = _batch()
    losses = [float(trainer.step(inputs, targets)["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    after = nnx.state(trainer.model, nnx.Param)
    for block_before, block_after in zip(before["blocks"].values(), after["blocks"].values()):
        for name in ("gate_down", "gate_up", "decay_logit"):
            changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), block_before["attention"][name],
                                   block_after["attention"][name])
            assert all(jax.tree.leaves(changed)), name
    with pytest.raises(ValueError, match="gate_rank"):
        lm.LMConfig(**TINY, attention="softmax", gate_rank=4)


def test_run_steps_equals_single_steps():
    text = jnp.asarray(np.frombuffer(b"def add(a, b):\n    return a + b\n\n" * 40, np.uint8).astype(np.int32))

    def make_batch(key):
        starts = jax.random.randint(key, (4,), 0, text.shape[0] - 25)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(text, (s,), (25,)))(starts)
        return windows[:, :-1], windows[:, 1:], None

    key = jax.random.key(3)
    fused, single = lm.Trainer(_model(), _tx()), lm.Trainer(_model(), _tx())
    losses = fused.run_steps(make_batch, key, 3)["loss"]
    expected = [float(single.step(*make_batch(k))["loss"]) for k in jax.random.split(key, 3)]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5)
    chex.assert_trees_all_close(nnx.state(fused.model, nnx.Param), nnx.state(single.model, nnx.Param), rtol=1e-4,
                                atol=1e-6)
    fused.run_steps(make_batch, jax.random.key(4), 3)
    assert fused.trace_count == 1 and fused.step_count == 6  # same function and count: compiled once
    with pytest.raises(ValueError, match="num_steps"):
        fused.run_steps(make_batch, key, 0)


def test_checkpoint_round_trip(tmp_path):
    trainer = lm.Trainer(_model(), _tx())
    inputs, targets = _batch()
    trainer.step(inputs, targets)
    path = checkpoint.save_checkpoint(tmp_path / "checkpoint", trainer.model, trainer.optimizer,
                                      metadata={"note": "x"})
    assert path.is_absolute() and {"config", "model", "optimizer", "metadata"} <= {p.name for p in path.iterdir()}
    model, optimizer, metadata = checkpoint.restore_checkpoint(path, _tx())
    assert metadata == {"note": "x"} and model.config == trainer.model.config
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(trainer.model))
    chex.assert_trees_all_equal(nnx.state(optimizer), nnx.state(trainer.optimizer))
    assert int(optimizer.step[...]) == 1  # every bit of the trainer's state: a trainer of them continues alike
    # Saved again over the same directory; parameters only, then asked for an optimizer state it does not hold.
    checkpoint.save_checkpoint(path, model)
    model_only, no_optimizer, metadata = checkpoint.restore_checkpoint(path)
    assert no_optimizer is None and metadata == {}
    chex.assert_trees_all_equal(nnx.state(model_only), nnx.state(model))
    with pytest.raises(ValueError, match="holds no optimizer state"):
        checkpoint.restore_checkpoint(path, _tx())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a fleetjax LM checkpoint"):
        checkpoint.restore_checkpoint(tmp_path / "empty")


def test_generation_with_the_cache_equals_greedy_full_forward():
    model = _model(seed=3)
    prompt = jnp.asarray(data.encode("def f(x):"))[None].repeat(2, 0)
    new = lm.generate(model, prompt, 12, key=jax.random.key(0), temperature=0.0)
    assert new.shape == (2, 12) and new.dtype == jnp.int32
    sequence = jnp.concatenate([prompt, new], axis=1)
    greedy = jnp.argmax(model(sequence[:, :-1])[:, prompt.shape[1] - 1:], axis=-1)
    np.testing.assert_array_equal(greedy, new)
    assert model.blocks[0].attention.cached_state is None  # the model itself is left without a cache
    sampled = lm.generate(model, prompt, 12, key=jax.random.key(1), temperature=1.0, top_k=5)
    assert sampled.shape == (2, 12) and int(sampled.min()) >= 0 and int(sampled.max()) < 256


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    files = data.stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and len(files) > 100
    assert not any("site-packages" in p.parts for p in files)
    corpus = data.load_stdlib_corpus(max_bytes=300_000)
    again = data.load_stdlib_corpus(max_bytes=300_000)
    np.testing.assert_array_equal(corpus.train, again.train)
    assert corpus.train.dtype == np.uint8 and corpus.validation.size > 0 and corpus.train.size > 0
    windows = data.random_windows(corpus.train, 3, 17, np.random.default_rng(0))
    assert windows.shape == (3, 17) and windows.dtype == np.int32 and windows.max() < 256
    assert data.decode(data.encode("déf")) == "déf"


def test_train_command_writes_log_plot_checkpoint_and_resumes(tmp_path, capsys):
    argv = ["train", "--preset", "demo", "--steps", "2", "--batch-size", "2", "--seq-len", "8", "--d-model", "8",
            "--num-layers", "1", "--num-heads", "2", "--eval-every", "1", "--eval-batches", "1", "--sample-tokens",
            "3", "--max-bytes", "100000", "--implementation", "scan", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "run")]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["steps"] == [1, 2] and len(log["eval"]) == 2 and len(log["sample"]["text"]) > 0
    assert all(np.isfinite(log["train_loss"])) and log["model"]["implementation"] == "scan"
    assert log["checkpoint"] == str(tmp_path / "run" / "checkpoint")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    resume = ["--out", str(tmp_path / "run2"), "--resume", str(tmp_path / "run" / "checkpoint"), "--no-plot"]
    assert cli.main(argv + resume) == 0
    assert json.loads((tmp_path / "run2" / "log.json").read_text())["steps"] == [3, 4]
    assert not (tmp_path / "run2" / "loss.png").exists()
    assert "resumed from" in capsys.readouterr().out
