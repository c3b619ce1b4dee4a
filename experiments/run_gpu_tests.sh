#!/usr/bin/env bash
# The test suite's rows that need a GPU, on a machine of the device tool (one call): the shared table with every
# Pallas case compiled (no interpret-mode cap), the head-dim x layout x dtype grid of the Pallas kernels' default
# configs (tests/test_head_dims.py), the Pallas tests, the long-T decay-gradient tests and the one-device
# sequence-parallel checks under shard_map's check_vma. The multi-device sharding matrix runs on fake CPU
# devices in CI and is left out here.
#
#   bash experiments/run_gpu_tests.sh [pytest -k expression]
#
# Writes <date>-<device>-pytest.log to $OUT (else experiments/results). Keep inside the device's 600 s.
set -uo pipefail

out=${OUT:-experiments/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
log="$out/$(date +%F)-${device:-gpu}-pytest.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, fleetjax.pallas.launch as l; print('jax', jax.__version__, jax.devices()[0].device_kind, \
'shared memory per block', l.shared_memory_per_block(), 'SMs', l.multiprocessor_count())"
} 2>&1 | tee "$log"
select=${1:-"not sharded_equals and not exchange_does_not and not indivisible and not replicated"}
# -v names every result as it comes (a run stopped by the time limit still says what failed); --tb=line gives
# each failure's one line at the end.
timeout -k 10 "${TESTS_LIMIT_S:-400}" python3 -m pytest -v --tb=line -rf -n "${TESTS_WORKERS:-8}" -p no:cacheprovider \
  tests/test_op.py tests/test_pallas_chunked.py tests/test_pallas_fleet.py tests/test_head_dims.py tests/test_mosaic.py \
  tests/test_decay_grad.py tests/test_sharding.py -k "$select" 2>&1 | tee -a "$log" | grep -E "FAILED|ERROR|passed|failed" | tail -60
exit "${PIPESTATUS[0]}"
