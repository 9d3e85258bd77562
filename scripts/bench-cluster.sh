#!/usr/bin/env bash
# Benchmarks a three-meta, three-data cluster with three copies of each block, beside the local
# disk and a one-node file system, in one run. Needs root (FUSE, dropping the page cache).
#
#   scripts/bench-cluster.sh [--size-mib N] [--files N] [--runs N]
#
# Replicated writes land on the same disk three times, so the physical limit for sequential
# writes is the local disk's throughput divided by three; the script reports Cairn against it.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=1024 files=10000 runs=3 random_reads=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet
bin=target/release/cairn
scratch=$(mktemp -d /var/tmp/cairn-bench-cluster.XXXXXX)
mkdir -p "$scratch/mnt"
"$bin" dev-cluster --meta 3 --data 3 --replication 3 --dir "$scratch/cluster" --mount "$scratch/mnt" \
  --base-port 7700 > "$scratch/dev-cluster.out" 2>&1 &
cluster=$!
cleanup() { kill -INT "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT
for _ in $(seq 300); do mountpoint -q "$scratch/mnt" && break; sleep 0.1; done
mountpoint -q "$scratch/mnt" || { cat "$scratch/dev-cluster.out"; exit 1; }
echo "== cluster: 3 meta, 3 data, 3 copies per block"
"$bin" bench --mount "$scratch/mnt" --dir "$scratch/local" --size-mib "$size_mib" --files "$files" \
  --random-reads "$random_reads" --runs "$runs" | tee "$scratch/cluster.txt"
# Columns: the workload's words, then local figure, unit, cairn figure, unit, ratio.
awk '/^sequential write/ { printf "sequential write against the physical limit (local / 3): %.2fx\n", $7 / ($5 / 3) }' \
  "$scratch/cluster.txt"
echo "== one-node file system, same disk, for comparison"
"$bin" bench --dir "$scratch/one-node" --size-mib "$size_mib" --files "$files" \
  --random-reads "$random_reads" --runs "$runs" | tee "$scratch/one-node.txt"
awk 'FNR == NR && /^create/ { cluster = $8 } FNR != NR && /^create/ { printf "creates, cluster against one node: %.2fx\n", cluster / $8 }' \
  "$scratch/cluster.txt" "$scratch/one-node.txt"
