"""experiments/mqar.py's task generator (Zoology's format) and its summary of several result files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "experiments" / "mqar.py"
_spec = importlib.util.spec_from_file_location("mqar", _PATH)
mqar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mqar)


@pytest.mark.parametrize("seed", range(4))
def test_every_key_is_queried_once_and_its_value_is_only_a_target(seed):
    T, N, vocab = 40, 6, 64
    inputs, targets, mask = map(np.asarray, mqar.mqar_example(jax.random.key(seed), T, N, vocab))
    assert inputs.shape == targets.shape == mask.shape == (T,)
    keys, values = inputs[0:2 * N:2], inputs[1:2 * N:2]
    assert len(set(keys)) == N and keys.min() >= 1 and keys.max() < vocab // 2 and values.min() >= vocab // 2
    np.testing.assert_array_equal(targets[:2 * N - 1], inputs[1:2 * N])  # the context is next-token
    where = np.flatnonzero(mask)
    assert len(where) == N and np.all(where >= 2 * N) and np.all(where % 2 == 0)
    assert sorted(inputs[where]) == sorted(keys)
    answer = dict(zip(keys, values))
    assert [answer[k] for k in inputs[where]] == list(targets[where])
    # No value after the context: showing it would let a model rule out the keys already queried.
    assert np.all(inputs[2 * N:] < vocab // 2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="too short"):
        mqar.mqar_example(jax.random.key(0), 15, 4, 64)
    with pytest.raises(ValueError, match="too few distinct keys"):
        mqar.mqar_example(jax.random.key(0), 64, 8, 16)


def _results(path, seq_len, runs):
    settings = {"seq_len": seq_len, "num_pairs": 4, "vocab_size": 64, "num_layers": 2, "learning_rate": 1e-3,
                "batch_size": 8, "steps": 100, "softmax_positions": "learned"}
    records = [{"attention": a, "d_model": d, "steps_done": 100, "accuracy": acc} for a, d, acc in runs]
    path.write_text(json.dumps({"settings": settings, "records": records}))
    return path


def test_summary_takes_the_best_run_per_model_and_width(tmp_path):
    first = _results(tmp_path / "a.json", 32, [("fleet", 64, 0.25), ("softmax", 64, 0.5)])
    second = _results(tmp_path / "b.json", 32, [("fleet", 64, 0.75)])
    table = mqar.summarize([first, second], tmp_path / "summary")
    assert "| fleet | 0.750 |" in table and "| softmax (learned positions) | 0.500 |" in table
    assert (tmp_path / "summary.md").exists()
    with pytest.raises(ValueError, match="another task"):
        mqar.summarize([first, _results(tmp_path / "c.json", 64, [])], tmp_path / "summary")
