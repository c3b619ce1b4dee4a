#!/usr/bin/env bash
# The forward or forward+backward benchmark on a GPU machine of the device tool, one device call each:
#
#   bash experiments/run_gpu_bench.sh forward  [benchmark options]   # issue 4: bench_forward
#   bash experiments/run_gpu_bench.sh backward [benchmark options]   # issue 5: bench_backward
#
# carry: [".whl", ".peers"] (the peers' wheels and LeetDecoding's kernel file); timeout_s 600.
# Writes <date>-<device>-forward.json, .png and forward.log (or backward; --gated: -gated after each name,
# so that a call's plain and gated runs keep their own files; so does --name X) to $OUT, else to
# experiments/results. Each benchmark keeps to --budget-s (default 470 s) plus start-up; whatever does not
# fit is recorded as skipped. Options after the first argument go to the benchmark (see --help), e.g.
# --impls fleetjax.pallas,fla.chunk, --skip-slow-autotune or --gated (per-token gates: <what>-gated.json).
set -uo pipefail

what=${1:-}
case "$what" in
  forward) module=bench_forward ;;
  backward) module=bench_backward ;;
  *) echo "usage: bash experiments/run_gpu_bench.sh forward|backward [benchmark options]" >&2; exit 2 ;;
esac
shift
log_name=$what
for arg in "$@"; do [ "$arg" = --gated ] && log_name="$what-gated"; done

out=${OUT:-experiments/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU

# The peers' wheels, installed without their dependencies: each missing dependency is a wheel of its own.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || echo "run_gpu_bench: installing the carried wheels failed; the peers will be recorded as skipped"
else
  echo "run_gpu_bench: no .whl/*.whl (carry .whl); the peers will be recorded as skipped"
fi
[ -f .peers/FleetAttention_triton.py ] || echo "run_gpu_bench: no .peers/FleetAttention_triton.py (carry .peers)"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# fla's Triton autotuning (85-130 s of a backward call) kept between calls: Triton writes each search's
# winner to TRITON_CACHE_DIR (TRITON_CACHE_AUTOTUNING=1, keyed by Triton, the GPU architecture, the kernel's
# source, the shapes and the configs), so a call seeded with an earlier call's winners for this GPU model
# compiles the winners alone. The winners come back in $OUT as triton-autotune-<gpu>.tar.gz; commit that
# file as experiments/peers/triton-autotune-<gpu>.tar.gz to seed the next calls.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cd '[:alnum:]' \
  | tr '[:upper:]' '[:lower:]')
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/triton-autotune-cache
mkdir -p "$TRITON_CACHE_DIR"
seed="experiments/peers/triton-autotune-${gpu:-unknown}.tar.gz"
export BENCH_TRITON_AUTOTUNE_SEED=""
if [ -n "$gpu" ] && [ -f "$seed" ] && tar -xzf "$seed" -C "$TRITON_CACHE_DIR"; then
  export BENCH_TRITON_AUTOTUNE_SEED="$seed"
  echo "run_gpu_bench: Triton's autotuning winners from $seed"
fi

# A hard stop inside the device's 600 s: the results file is rewritten after every record, so a stop
# keeps what was measured; the plot is then drawn from it below.
timeout -k 10 "${BENCH_HARD_LIMIT_S:-555}" python3 -m "experiments.$module" --out "$out" "$@" 2>&1 | tee "$out/$log_name.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || echo "run_gpu_bench: the benchmark exited with status $rc"
if [ -n "$gpu" ]; then  # every winner this call knows (the seed's and its own searches')
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | sort \
    | tar -czf "$out/triton-autotune-$gpu.tar.gz" -T -) \
    || echo "run_gpu_bench: could not pack Triton's autotuning winners"
fi
for json in "$out"/*-"$what".json "$out"/*-"$what"-gated.json; do
  [ -f "$json" ] || continue
  if [ ! -f "${json%.json}.png" ]; then  # stopped before its end: draw the plot, print the table
    python3 -m experiments.plots "$json" || true
    python3 -m experiments.records table "$json" || true
  fi
done
exit "$rc"
