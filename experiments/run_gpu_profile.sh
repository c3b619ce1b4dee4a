#!/usr/bin/env bash
# What each kernel of one "pallas" call waits on, on a machine of the device tool (one call): Nsight Compute's
# warp stall reasons, issue rate and busiest pipes for every kernel of the last of three calls
# (experiments/profile_pallas.py --stall-metrics / --stalls), the default config at B4 H16 T=16384 unless
# the arguments say otherwise.
#
#   bash experiments/run_gpu_profile.sh [profile_pallas options, e.g. --ops fwd_bwd --gated]
#
# Writes <date>-<device>-<PROFILE_NAME, default stalls>.{csv,log,txt} to $OUT (else experiments/results).
# Where this ncu lacks a metric of the pipes' regex and fails, it runs again without that entry.
set -uo pipefail

out=${OUT:-experiments/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-')
base="$out/$(date +%F)-${device:-gpu}-${PROFILE_NAME:-stalls}"
metrics=$(python3 -m experiments.profile_pallas --stall-metrics) || exit 1

profile() {  # $1: the --metrics list
  timeout -k 10 "${PROFILE_LIMIT_S:-300}" ncu --csv --clock-control none --metrics "$1" \
    python3 -m experiments.profile_pallas --calls 3 --untimed "${@:2}" > "$base.csv" 2>> "$base.log"
}

profile "$metrics" "$@"
rc=$?
if ! grep -q '"Metric Name"' "$base.csv"; then
  echo "ncu gave no metrics (exit $rc); again without the pipes' regex" | tee -a "$base.log"
  profile "${metrics%,regex:*}" "$@"
  rc=$?
fi
python3 -m experiments.profile_pallas --stalls "$base.csv" | tee "$base.txt"
parsed=${PIPESTATUS[0]}
exit $(( rc ? rc : parsed ))
