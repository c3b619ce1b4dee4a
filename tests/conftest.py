"""Shared pytest setup: the oracle module is importable from every test file, and the header names the JAX
backend and the implementations under test."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # `import oracle` from any rootdir / xdist worker


def pytest_report_header(config) -> list[str]:
    import jax

    import fleetjax
    return [f"jax {jax.__version__} on {jax.default_backend()}; "
            f"fleetjax implementations: {', '.join(sorted(fleetjax.IMPLEMENTATIONS))}"]
