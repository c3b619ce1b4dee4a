"""One training run's settings as plain data: :class:`TrainOptions` and the size ``PRESETS``.

No JAX here: ``fleetjax --help`` builds its parser from these without loading it, and
:meth:`TrainOptions.validate` refuses a bad flag before any data is read or anything compiles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

ATTENTIONS = ("fleet", "softmax")
# jax.nn.dot_product_attention's implementations, which the softmax baseline takes.
SOFTMAX_IMPLEMENTATIONS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16")

PRESETS: dict[str, dict[str, Any]] = {
    # About 2-3 minutes on 2 CPU cores (a 0.46M-parameter model, 1.2M tokens).
    "cpu": dict(steps=600, batch_size=16, seq_len=128, d_model=128, num_layers=2, num_heads=4,
                learning_rate=6e-3, warmup_steps=50, dtype="float32", eval_every=100),
    # A few minutes on one H100: 19M parameters, 66M tokens.
    "gpu": dict(steps=2000, batch_size=32, seq_len=1024, d_model=512, num_layers=6, num_heads=8,
                learning_rate=2e-3, warmup_steps=200, dtype="bfloat16", eval_every=250),
    # fleetjax demo: about a minute of training on 2 CPU cores.
    "demo": dict(steps=300, batch_size=16, seq_len=128, d_model=128, num_layers=2, num_heads=4,
                 learning_rate=6e-3, warmup_steps=30, dtype="float32", eval_every=100),
}


@dataclasses.dataclass
class TrainOptions:
    """Everything one training run needs (the flags of ``fleetjax train``, named alike)."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    attention: str = "fleet"
    implementation: str | None = None
    gate_rank: int | None = None
    dtype: str = "float32"
    learning_rate: float = 6e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    max_bytes: int | None = None
    seed: int = 0
    out: str = "fleetjax-train"
    resume: str | None = None
    prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.7
    plot: bool = True
    progress: bool = True

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "TrainOptions":
        """The preset's sizes, then ``overrides`` (None values are left out)."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return cls(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})

    def validate(self) -> None:
        """Raise ValueError naming the flag (``--steps``) of the first setting that cannot run."""
        flag = lambda name: "--" + name.replace("_", "-")
        for name in ("steps", "batch_size", "seq_len", "d_model", "num_layers", "num_heads", "eval_every",
                     "eval_batches", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"--max-bytes must be positive, got {self.max_bytes}")
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "temperature"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --num-heads ({self.num_heads})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.gate_rank is not None and (not isinstance(self.gate_rank, int) or self.gate_rank < 1):
            raise ValueError(f"--gate-rank must be a positive integer, got {self.gate_rank!r}")
        if self.gate_rank is not None and self.attention != "fleet":
            raise ValueError("--gate-rank is FleetAttention's per-token gate: it needs --attention fleet, "
                             f"got --attention {self.attention}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention == "softmax" and self.implementation not in (None, *SOFTMAX_IMPLEMENTATIONS):
            raise ValueError(f"--implementation with --attention softmax must be one of "
                             f"{', '.join(SOFTMAX_IMPLEMENTATIONS)} (jax.nn.dot_product_attention's), "
                             f"got {self.implementation!r}")
        if self.attention == "fleet" and self.implementation is not None:
            from fleetjax.api import IMPLEMENTATIONS  # loads JAX: here, not at import (see the module's doc)

            if self.implementation not in IMPLEMENTATIONS:
                raise ValueError(f"--implementation with --attention fleet must be one of fleet_attention's "
                                 f"implementations here ({', '.join(sorted(IMPLEMENTATIONS))}), "
                                 f"got {self.implementation!r}")
        if self.resume is not None and not Path(self.resume).is_dir():
            raise ValueError(f"--resume must be a checkpoint directory (a run's <out>/checkpoint), "
                             f"got {self.resume!r}, which is not a directory")
