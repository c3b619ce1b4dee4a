"""Shared pytest setup: the oracle module is importable from every test file; on the CPU, compiles without
LLVM's optimizations; the multi-device files each on one xdist worker; the header names the JAX backend and
the implementations under test."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import oracle` from any rootdir / xdist worker

import jax  # noqa: E402

if jax.default_backend() == "cpu":
    # On the CPU the tests are compile-bound (Pallas interpret mode above all) and their programs are small:
    # LLVM's optimization of the compiled code costs more than it saves. XLA's HLO, and so every result, is
    # the same. The subprocesses of the tests (fake devices, the CLI, README blocks) inherit it.
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


# Files whose tests all read one module fixture that computes every case in subprocesses with fake devices
# (tests/devices.py): under ``-n N`` each of them runs on one worker, and first, so that the other worker
# takes the rest meanwhile instead of computing the fixture again or waiting for it at the end.
ONE_WORKER_FILES = ("test_sharding.py", "test_experiments.py", "test_mosaic_warpgroups.py")


def _one_worker_file(nodeid: str) -> bool:
    return nodeid.split("::", 1)[0].endswith(ONE_WORKER_FILES)


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: not _one_worker_file(item.nodeid))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Test by test, except that each of ONE_WORKER_FILES goes to one worker whole."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::", 1)[0] if _one_worker_file(nodeid) else nodeid

    return Scheduling(config, log)


def pytest_report_header(config) -> list[str]:
    import jax

    import fleetjax
    return [f"jax {jax.__version__} on {jax.default_backend()}; "
            f"fleetjax implementations: {', '.join(sorted(fleetjax.IMPLEMENTATIONS))}"]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session) -> None:
    """An xdist worker frees JAX's compiled programs before it reports that it has finished: execnet
    interrupts (SIGINT) a worker still busy 5 s after that, and the interrupt used to land in JAX's garbage
    collection callback while it freed them (a PytestUnraisableExceptionWarning at the end of the run)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "jax" in sys.modules:
        import gc

        import jax
        jax.clear_caches()
        gc.collect()
