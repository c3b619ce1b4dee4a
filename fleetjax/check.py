"""Checking implementations against each other: the one relative-error measure that the checker
(``fleetjax check``), the benchmarks and the GPU checks report.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def relative_error(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref|, in float64; inf if ``got`` is non-finite where ``ref`` is finite, 0 for
    two empty arrays (and for equal all-zero arrays).

    Raises ValueError if the shapes differ."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} differs from the reference's {ref.shape}")
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got[np.isfinite(ref)])):
        return float("inf")
    error = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    if scale == 0:
        return 0.0 if error == 0 else float("inf")
    return error / scale
