#!/usr/bin/env bash
# Kills the meta leader under a create-and-fsync workload N times (the integration test
# `leader_killed_under_load_loses_nothing_acknowledged`) and reports how long the workload
# stood still: median and maximum. Needs root (FUSE).
#
#   scripts/failover-pause.sh [runs]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
pauses=()
for i in $(seq "$runs"); do
  pause=$(cargo nextest run --release --no-capture -E 'test(leader_killed_under_load)' 2>&1 \
    | sed -n 's/^failover pause: \([0-9]*\) ms$/\1/p')
  [ -n "$pause" ] || { echo "run $i failed" >&2; exit 1; }
  echo "run $i: ${pause} ms"
  pauses+=("$pause")
done
printf '%s\n' "${pauses[@]}" | sort -n | awk '{ v[NR] = $1 } END {
  printf "failover pause over %d runs: median %d ms, max %d ms\n", NR, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR] }'
