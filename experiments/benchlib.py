"""Temporary re-exports for the experiments that still import ``experiments.benchlib`` (mqar.py, lm_bench.py,
train_sharded.py, gpu_check.py, check_pallas_fleet_gpu.py). The shared machinery now lives by concern:
environment.py, timing.py, memory.py, bandwidth.py, records.py, plots.py, inputs.py, accuracy.py and
runner.py. Import from those; this module goes once nothing imports it.
"""

from experiments.bandwidth import copy_bandwidth
from experiments.environment import prepare_devices, setup_jax_environment
from experiments.memory import MIB
from experiments.plots import pyplot_or_none
from experiments.records import RESULTS_DIR, ResultsFile, device_info, device_slug, results_path, today, versions
from experiments.timing import jax_sync, time_calls

__all__ = ["MIB", "RESULTS_DIR", "ResultsFile", "copy_bandwidth", "device_info", "device_slug", "jax_sync",
           "prepare_devices", "pyplot_or_none", "results_path", "setup_jax_environment", "time_calls", "today",
           "versions"]
