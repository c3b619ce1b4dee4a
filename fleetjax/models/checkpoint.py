"""Checkpoints of the byte-level LM with orbax-checkpoint, the way flax documents saving nnx state.

A checkpoint is one directory (``<out>/checkpoint`` after ``fleetjax train``) that orbax writes atomically,
with one item each:

    config     the LMConfig (JSON), to rebuild the model
    model      nnx.state(model): the parameters
    optimizer  nnx.state(optimizer): the optimizer's step count and moments (when saved)
    metadata   free-form JSON (the training step, ...)

Restoring builds the abstract model and optimizer from the config (``nnx.eval_shape``: no initialisation
runs) and lets orbax fill their state, which checks every array's shape and dtype against it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optax
import orbax.checkpoint as ocp
from flax import nnx

from fleetjax.models.lm import LanguageModel, LMConfig

_ITEMS = ("config", "model", "optimizer", "metadata")


def save_checkpoint(path: str | os.PathLike, model: LanguageModel, optimizer: nnx.Optimizer | None = None, *,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write the config, the parameters (and the optimizer state) to the directory ``path``, replacing a
    checkpoint there; returns the absolute path."""
    path = Path(path).absolute()
    items = dict(config=ocp.args.JsonSave(model.config.to_dict()), model=ocp.args.StandardSave(nnx.state(model)),
                 metadata=ocp.args.JsonSave(metadata or {}))
    if optimizer is not None:
        items["optimizer"] = ocp.args.StandardSave(nnx.state(optimizer))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**items), force=True)
    return path


def restore_checkpoint(path: str | os.PathLike, tx: optax.GradientTransformation | None = None
                       ) -> tuple[LanguageModel, nnx.Optimizer | None, dict[str, Any]]:
    """(model, optimizer or None, metadata) from :func:`save_checkpoint`'s directory.

    tx: the optimizer's transformation; with it the optimizer is restored too (the checkpoint must hold one).
    """
    path = Path(path).absolute()
    saved = {item for item in _ITEMS if (path / item).is_dir()}
    if not {"config", "model", "metadata"} <= saved:
        raise ValueError(f"{path} is not a fleetjax LM checkpoint: it should be a directory with "
                         f"config/, model/ and metadata/ (from fleetjax.models.checkpoint.save_checkpoint)")
    if tx is not None and "optimizer" not in saved:
        raise ValueError(f"{path} holds no optimizer state (it was saved without an optimizer)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        head = checkpointer.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             metadata=ocp.args.JsonRestore()))
        config = LMConfig.from_dict(head.config)

        def build() -> tuple[LanguageModel, nnx.Optimizer | None]:
            model = LanguageModel(config, rngs=nnx.Rngs(0))
            return model, None if tx is None else nnx.Optimizer(model, tx, wrt=nnx.Param)

        abstract_model, abstract_optimizer = nnx.eval_shape(build)
        model_def, model_state = nnx.split(abstract_model)
        items = dict(model=ocp.args.StandardRestore(model_state))
        if tx is not None:
            optimizer_def, optimizer_state = nnx.split(abstract_optimizer)
            items["optimizer"] = ocp.args.StandardRestore(optimizer_state)
        restored = checkpointer.restore(path, ocp.args.Composite(**items))
    model = nnx.merge(model_def, restored.model)
    optimizer = None if tx is None else nnx.merge(optimizer_def, restored.optimizer)
    return model, optimizer, dict(head.metadata)
