"""fleetjax.lm, fleetjax.data and fleetjax.train on tiny models: training, checkpoints, decoding, the CLI run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fleetjax
from fleetjax import data, lm, train

TINY = dict(d_model=16, num_layers=2, num_heads=2, mlp_ratio=2)


def _model(seed: int = 0, **kwargs) -> lm.LanguageModel:
    config = lm.LMConfig(**{**TINY, "implementation": "xla", **kwargs})
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


def test_a_few_steps_reduce_the_loss_without_recompiling():
    trainer = lm.Trainer(_model(), _tx())
    inputs, targets = _batch()
    losses = [float(trainer.step(inputs, targets)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert trainer.trace_count == 1  # one trace for 30 steps: no recompilation
    other_inputs, other_targets = _batch(seed=1)
    trainer.step(other_inputs, other_targets)
    assert trainer.trace_count == 1  # new values, same shapes
    assert trainer.step_count == 31


def test_run_steps_equals_single_steps():
    text = jnp.asarray(np.frombuffer(b"def add(a, b):\n    return a + b\n\n" * 40, np.uint8).astype(np.int32))

    def make_batch(key):
        starts = jax.random.randint(key, (4,), 0, text.shape[0] - 25)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(text, (s,), (25,)))(starts)
        return windows[:, :-1], windows[:, 1:], None

    key = jax.random.key(3)
    fused, single = lm.Trainer(_model(), _tx()), lm.Trainer(_model(), _tx())
    losses = fused.run_steps(make_batch, key, 6)["loss"]
    expected = [float(single.step(*make_batch(k))["loss"]) for k in jax.random.split(key, 6)]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 nnx.state(fused.model, nnx.Param), nnx.state(single.model, nnx.Param))
    fused.run_steps(make_batch, jax.random.key(4), 6)
    assert fused.trace_count == 1 and fused.step_count == 12  # same function and count: compiled once
    with pytest.raises(ValueError, match="num_steps"):
        fused.run_steps(make_batch, key, 0)


def test_decay_parameters_are_trained():
    model = _model()
    before = np.asarray(model.blocks[0].attention.decay_logit[...])
    inputs, targets = _batch()
    grads = nnx.jit(nnx.grad(lm.loss_fn))(model, inputs, targets)
    for i in range(len(model.blocks)):
        g = np.asarray(grads.blocks[i].attention.decay_logit[...])
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    trainer = lm.Trainer(model, _tx())
    for _ in range(3):
        trainer.step(inputs, targets)
    after = np.asarray(trainer.model.blocks[0].attention.decay_logit[...])
    assert not np.array_equal(before, after)


def test_pallas_loss_matches_scan():
    if "pallas" not in fleetjax.IMPLEMENTATIONS:
        pytest.skip("implementation 'pallas' is not registered yet (fleetjax/pallas_chunked.py missing or "
                    "not importable)")
    inputs, targets = _batch(B=1, T=8)
    config = dict(d_model=8, num_layers=1, num_heads=2, mlp_ratio=1)
    scan_model = _model(implementation="scan", **config)
    pallas_model = _model(implementation="pallas", **config)
    np.testing.assert_allclose(lm.loss_fn(pallas_model, inputs, targets), lm.loss_fn(scan_model, inputs, targets),
                               rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    trainer = lm.Trainer(_model(), _tx())
    inputs, targets = _batch()
    for _ in range(3):
        trainer.step(inputs, targets)
    path = trainer.save(tmp_path / "ckpt.msgpack", metadata={"note": "x"})
    model, optimizer, metadata = lm.restore_checkpoint(path, _tx())
    assert metadata == {"note": "x"} and model.config == trainer.model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(trainer.model, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.step[...]) == 3
    # The restored trainer continues exactly as the original.
    restored = lm.Trainer.restore(path, _tx())
    np.testing.assert_array_equal(restored.step(inputs, targets)["loss"], trainer.step(inputs, targets)["loss"])
    # Params only, and a mismatched model is refused.
    model_only, no_optimizer, _ = lm.restore_checkpoint(lm.save_checkpoint(tmp_path / "p.msgpack", model))
    assert no_optimizer is None
    with pytest.raises(ValueError, match="no optimizer state"):
        lm.restore_checkpoint(tmp_path / "p.msgpack", _tx())
    (tmp_path / "bad.msgpack").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        lm.restore_checkpoint(tmp_path / "bad.msgpack")


def test_checkpoint_refuses_another_shape(tmp_path):
    path = lm.save_checkpoint(tmp_path / "a.msgpack", _model())
    with pytest.raises(ValueError, match="model"):
        lm._load_flat(_model(num_layers=1), lm.serialization.msgpack_restore(path.read_bytes())["params"], "params")


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
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train.register(sub, check=lambda: 0)
    argv = ["train", "--preset", "demo", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--d-model", "16",
            "--num-layers", "1", "--num-heads", "2", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "5",
            "--max-bytes", "200000", "--implementation", "xla", "--no-progress", "--out", str(tmp_path / "run")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["steps"] == [1, 2, 3, 4] and len(log["eval"]) == 2 and len(log["sample"]["text"]) > 0
    assert all(np.isfinite(log["train_loss"]))
    assert (tmp_path / "run" / "checkpoint.msgpack").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    resume = parser.parse_args(argv[:-2] + ["--out", str(tmp_path / "run2"), "--resume",
                                            str(tmp_path / "run" / "checkpoint.msgpack"), "--no-plot"])
    assert resume.func(resume) == 0
    assert json.loads((tmp_path / "run2" / "log.json").read_text())["steps"] == [5, 6, 7, 8]
    assert "sample" in capsys.readouterr().out
