#!/usr/bin/env bash
# What TLS costs in CPU time: a one-node file system (`cairn up`) with TLS (the default) and with
# `--plaintext`, alternating; in each, `dd` writes a file with 1 MiB writes and an fsync, the page
# cache is dropped, and `dd` reads it back. Reports throughput and the CPU seconds the file
# system's process and `dd` used per GiB (user + system), medians of the runs, and the ratios.
#
# Throughput on this shared two-core machine swings by a third between runs of the same build;
# CPU time per byte moves far less, and since both cores are busy in these workloads it is what
# TLS takes out of throughput. Needs root (FUSE, dropping the page cache).
#
#   scripts/bench-tls-cpu.sh [--size-mib N] [--runs N] [--bin PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=2048 runs=5 bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=$PWD/target/release/cairn
fi
scratch=$(mktemp -d /var/tmp/cairn-bench-tls-cpu.XXXXXX)
server=""
cleanup() {
  if [ -n "$server" ]; then kill -INT "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
# CPU seconds (user + system) process $1 has used so far.
cpu_of() { awk -v t="$ticks" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
# Runs `dd` with the given operands; prints "seconds cpu_seconds" for dd itself.
timed_dd() {
  local out
  out=$( { /usr/bin/time -f 'cpu %U %S' dd "$@" bs=1M status=none; } 2>&1)
  echo "$out" | awk '/^cpu / { print $2 + $3 }'
}
one_run() {
  local mode=$1 flag=""
  [ "$mode" = plaintext ] && flag=--plaintext
  local dir="$scratch/$mode"
  mkdir -p "$dir/mnt"
  "$bin" up --data "$dir/data" --mount "$dir/mnt" --listen 127.0.0.1:7431 $flag > "$dir/log" 2>&1 &
  server=$!
  for _ in $(seq 300); do mountpoint -q "$dir/mnt" && break; sleep 0.1; done
  mountpoint -q "$dir/mnt" || { cat "$dir/log" >&2; exit 1; }
  local c0 t0 dd_w t1 c1 c2 t2 dd_r t3 c3
  c0=$(cpu_of "$server"); t0=$(date +%s.%N)
  dd_w=$(timed_dd if=/dev/zero of="$dir/mnt/big" count="$size_mib" conv=fsync)
  t1=$(date +%s.%N); c1=$(cpu_of "$server")
  sync
  echo 3 > /proc/sys/vm/drop_caches
  c2=$(cpu_of "$server"); t2=$(date +%s.%N)
  dd_r=$(timed_dd if="$dir/mnt/big" of=/dev/null)
  t3=$(date +%s.%N); c3=$(cpu_of "$server")
  kill -INT "$server"; wait "$server" 2>/dev/null || true; server=""
  rm -rf "$dir"
  local gib
  gib=$(echo "$size_mib / 1024" | bc -l)
  echo "$mode|write|$(echo "$size_mib * 1.048576 / ($t1 - $t0)" | bc -l)|$(echo "($c1 - $c0 + $dd_w) / $gib" | bc -l)"
  echo "$mode|read|$(echo "$size_mib * 1.048576 / ($t3 - $t2)" | bc -l)|$(echo "($c3 - $c2 + $dd_r) / $gib" | bc -l)"
}
for run in $(seq "$runs"); do
  echo "run $run of $runs" >&2
  one_run tls >> "$scratch/figures"
  one_run plaintext >> "$scratch/figures"
done
echo "one-node file system, ${size_mib} MiB written with fsync and read cold; median of $runs runs each"
python3 - "$scratch/figures" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    mode, workload, rate, cpu = line.strip().split("|")
    rows.setdefault((mode, workload), []).append((float(rate), float(cpu)))
print(f"{'workload':<12} {'TLS MB/s':>9} {'plain MB/s':>11} {'ratio':>6}   {'TLS cpu s/GiB':>13} {'plain cpu s/GiB':>15} {'TLS extra':>9}")
for workload in ("write", "read"):
    tls, plain = rows[("tls", workload)], rows[("plaintext", workload)]
    tr, pr = statistics.median(r for r, _ in tls), statistics.median(r for r, _ in plain)
    tc, pc = statistics.median(c for _, c in tls), statistics.median(c for _, c in plain)
    print(f"{workload:<12} {tr:>9.0f} {pr:>11.0f} {tr / pr:>5.2f}x   {tc:>13.2f} {pc:>15.2f} {tc / pc - 1:>8.0%}")
PY
