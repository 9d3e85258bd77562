#!/usr/bin/env bash
# What TLS costs: the foundation workloads (`cairn bench`) on a one-node file system with TLS
# (the default) and with `--plaintext`, alternating in one run, each beside the local disk.
# Prints each workload's median with TLS and without, and their ratio. Needs root (FUSE,
# dropping the page cache).
#
#   scripts/bench-tls.sh [--size-mib N] [--files N] [--random-reads N] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=1024 files=5000 random_reads=5000 runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --random-reads) random_reads=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet
bin=$PWD/target/release/cairn
scratch=$(mktemp -d /var/tmp/cairn-bench-tls.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
# One `cairn bench` run; its table rows as "workload|cairn figure".
one_run() {
  "$bin" bench --dir "$scratch/run" --size-mib "$size_mib" --files "$files" --random-reads "$random_reads" \
    --runs 1 "$@" 2> /dev/null |
    awk 'NR > 2 && NF >= 6 { name = ""; for (i = 1; i <= NF - 5; i++) name = name (i > 1 ? " " : "") $i; print name "|" $(NF - 2) }'
  rm -rf "$scratch/run"
}
for run in $(seq "$runs"); do
  echo "run $run of $runs" >&2
  one_run | sed 's/^/tls|/' >> "$scratch/figures"
  one_run --plaintext | sed 's/^/plain|/' >> "$scratch/figures"
done
echo "one-node file system, ${size_mib} MiB file, $files small files, $random_reads random reads; median of $runs runs each"
printf '%-26s %12s %12s %8s\n' workload "TLS" "plaintext" "TLS/plain"
python3 - "$scratch/figures" <<'PY'
import statistics, sys
figures = {}
order = []
for line in open(sys.argv[1]):
    mode, name, value = line.rstrip("\n").split("|")
    if name not in order:
        order.append(name)
    figures.setdefault((mode, name), []).append(float(value))
for name in order:
    tls = statistics.median(figures[("tls", name)])
    plain = statistics.median(figures[("plain", name)])
    print(f"{name:<26} {tls:>12.0f} {plain:>12.0f} {tls / plain:>7.2f}x")
PY
