"""Tests that need several devices run in subprocesses with fake CPU devices.

JAX fixes its device count when it starts and the rest of the suite runs with one CPU device, so a test file
that needs a mesh runs itself as a script (``python FILE --worker ID,ID,...``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; the worker computes the cases named on its command
line and prints one ``RESULTS {json}`` line, and each pytest test reads its own case from the merged output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence

_PREFIX = "RESULTS "


def run_workers(script: str, devices: int, groups: Sequence[Sequence[str]], timeout: float = 900) -> dict[str, Any]:
    """Run ``script --worker`` once per group of case ids, all at once, each with ``devices`` fake CPU
    devices; returns the merged results. A worker that fails fails the fixture with its output."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    workers = [subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", ",".join(group)], env=env,
                                cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for group in groups if group]
    merged: dict[str, Any] = {}
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=timeout)
            lines = [line for line in stdout.splitlines() if line.startswith(_PREFIX)]
            assert worker.returncode == 0 and lines, f"worker failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
            merged.update(json.loads(lines[-1][len(_PREFIX):]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return merged


def worker_ids(argv: Sequence[str]) -> list[str] | None:
    """The case ids of ``--worker ID,ID,...`` in argv, or None when this is not a worker."""
    if "--worker" not in argv:
        return None
    return argv[list(argv).index("--worker") + 1].split(",")


def print_results(results: dict[str, Any]) -> None:
    print(_PREFIX + json.dumps(results), flush=True)
