#!/usr/bin/env bash
# What each kernel of one "pallas" call waits on, or what it moves through HBM, on a machine of the device
# tool (one call): Nsight Compute's counters for every kernel of the last of three calls, the default config
# at B4 H16 T=16384 unless the arguments say otherwise.
#
#   bash experiments/run_gpu_profile.sh [profile_pallas options, e.g. --ops fwd_bwd --gated]
#   PROFILE_KIND=traffic bash experiments/run_gpu_profile.sh --ops fwd_bwd [--B 1 --H 8 --T 32768 ...]
#
# PROFILE_KIND: stalls (default; the warps' stall reasons, issue rate and busiest pipes:
# experiments/profile_pallas.py --stall-metrics / --stalls) or traffic (each kernel's DRAM bytes and their
# rate: --traffic-metrics / --traffic, which reads the shape from the same options).
# Writes <date>-<device>-<PROFILE_NAME, default the kind>.{csv,log,txt} to $OUT (else experiments/results).
# Where this ncu lacks a metric of the pipes' regex and fails, the stalls run again without that entry.
set -uo pipefail

out=${OUT:-experiments/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
kind=${PROFILE_KIND:-stalls}
case "$kind" in
  stalls) asks=--stall-metrics; reads=--stalls; shape=() ;;
  traffic) asks=--traffic-metrics; reads=--traffic; shape=("$@") ;;  # the tensors are counted at the run's shape
  *) echo "run_gpu_profile: PROFILE_KIND must be stalls or traffic, got $kind" >&2; exit 2 ;;
esac
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-')
base="$out/$(date +%F)-${device:-gpu}-${PROFILE_NAME:-$kind}"
metrics=$(python3 -m experiments.profile_pallas "$asks") || exit 1

profile() {  # $1: the --metrics list
  timeout -k 10 "${PROFILE_LIMIT_S:-300}" ncu --csv --clock-control none --metrics "$1" \
    python3 -m experiments.profile_pallas --calls 3 --untimed "${@:2}" > "$base.csv" 2>> "$base.log"
}

profile "$metrics" "$@"
rc=$?
if [ "$kind" = stalls ] && ! grep -q '"Metric Name"' "$base.csv"; then
  echo "ncu gave no metrics (exit $rc); again without the pipes' regex" | tee -a "$base.log"
  profile "${metrics%,regex:*}" "$@"
  rc=$?
fi
python3 -m experiments.profile_pallas "$reads" "$base.csv" "${shape[@]}" | tee "$base.txt"
parsed=${PIPESTATUS[0]}
exit $(( rc ? rc : parsed ))
