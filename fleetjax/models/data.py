"""Byte-level training text that every machine has offline: the Python standard library's own source.

The corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (installed third-party packages
excluded), read as bytes in sorted order, so the same Python version gives the same bytes everywhere. Files
are split into train and validation by a hash of their relative path (a file never lands in both). The
vocabulary is the 256 byte values.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, relative to ``root``, in sorted (deterministic) order."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
        found += [Path(directory, f).relative_to(root) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.as_posix())


def is_validation_file(relative_path: Path, validation_fraction: float) -> bool:
    """A fixed, path-determined choice: crc32 of the path lands in the first fraction of [0, 2^32)."""
    return zlib.crc32(relative_path.as_posix().encode()) < validation_fraction * 2 ** 32


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Train and validation bytes (uint8 arrays) and where they came from."""

    train: np.ndarray
    validation: np.ndarray
    source: str
    num_files: int


def load_stdlib_corpus(max_bytes: int | None = None, validation_fraction: float = 0.05,
                       root: Path | None = None) -> TextCorpus:
    """Read the standard library's source as bytes, split by file into train and validation.

    max_bytes: stop adding files once this many bytes are read (None: all, about 30 MB on CPython 3.11).
    Files are joined with a blank line.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be None or positive, got {max_bytes!r}")
    root = stdlib_root() if root is None else Path(root)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    total = count = 0
    for path in stdlib_files(root):
        data = (root / path).read_bytes()
        parts[is_validation_file(path, validation_fraction)].append(data)
        total += len(data)
        count += 1
        if max_bytes is not None and total >= max_bytes:
            break
    if not parts[False] or not parts[True]:
        raise ValueError(f"too little text under {root} for a train/validation split ({count} files read)")
    join = lambda chunks: np.frombuffer(b"\n\n".join(chunks), np.uint8)
    return TextCorpus(train=join(parts[False]), validation=join(parts[True]), source=str(root), num_files=count)


def random_windows(data: np.ndarray, batch_size: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``batch_size`` windows of ``length`` consecutive bytes at random offsets: int32 [batch_size, length]."""
    if data.ndim != 1 or data.size < length:
        raise ValueError(f"data must be 1-D with at least length={length} bytes, got shape {data.shape}")
    starts = rng.integers(0, data.size - length + 1, size=batch_size)
    return data[starts[:, None] + np.arange(length)[None, :]].astype(np.int32)


def encode(text: str | bytes) -> np.ndarray:
    """Text -> byte tokens int32 [N] (UTF-8)."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Byte tokens [N] -> text; invalid UTF-8 (a sampled byte sequence may be) is shown as U+FFFD."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")
