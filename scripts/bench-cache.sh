#!/usr/bin/env bash
# Benchmarks what callback promises let a client keep: re-reading a cached file (against the
# local disk's page cache, in the same run), and a second `find -ls` and `ls -lR` over many
# cached files (against the first pass on a fresh mount, counting the RPCs each pass sent to
# meta), and SQLite transactions, each taking locks, against the local disk. Needs root (FUSE).
#
#   scripts/bench-cache.sh [--size-mib N] [--files N] [--transactions N] [--rows N] [--runs N]
#                          [--only reread|walks|sqlite]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=1024 files=10000 transactions=200 rows=20000 runs=3 only=
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --transactions) transactions=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$only" in '' | reread | walks | sqlite) ;; *) echo "--only: reread, walks or sqlite" >&2; exit 2 ;; esac
wanted() { [ -z "$only" ] || [ "$only" = "$1" ]; }
cargo build --release --quiet
bin=$PWD/target/release/cairn
scratch=$(mktemp -d /var/tmp/cairn-bench-cache.XXXXXX)
mkdir -p "$scratch/mnt" "$scratch/local"
"$bin" dev-cluster --meta 1 --data 1 --replication 1 --dir "$scratch/cluster" --mount "$scratch/mnt" \
  --base-port 7750 > "$scratch/dev-cluster.out" 2>&1 &
cluster=$!
mounts=()
cleanup() {
  for pid in "${mounts[@]}"; do kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  kill -INT "$cluster" 2>/dev/null || true
  wait "$cluster" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
for _ in $(seq 300); do mountpoint -q "$scratch/mnt" && break; sleep 0.1; done
mountpoint -q "$scratch/mnt" || { cat "$scratch/dev-cluster.out"; exit 1; }
meta=127.0.0.1:7750

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Seconds a command takes.
seconds() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
rpcs() { getfattr --absolute-names --only-values -n user.cairn.metrics "$1" | sed 's/.*"meta_rpcs":\([0-9]*\).*/\1/'; }

reread() {
  echo "== re-reading a cached ${size_mib} MiB file (MB/s, median of $runs, taken in turns with the local disk)"
  dd if=/dev/urandom of="$scratch/local/big" bs=1M count="$size_mib" status=none
  cp "$scratch/local/big" "$scratch/mnt/big"
  cat "$scratch/local/big" "$scratch/mnt/big" > /dev/null
  bytes=$((size_mib * 1024 * 1024))
  rate() { echo "$bytes / $(seconds dd if="$1" of=/dev/null bs=1M status=none) / 1000000" | bc -l; }
  # Re-reads of `$1` and of the local file in turns: "local-median cairn-median meta-RPCs".
  in_turns() {
    local local_rates=() cairn_rates=() before after
    before=$(rpcs "$2")
    for _ in $(seq "$runs"); do
      local_rates+=("$(rate "$scratch/local/big")")
      cairn_rates+=("$(rate "$1")")
    done
    after=$(rpcs "$2")
    echo "$(printf '%s\n' "${local_rates[@]}" | median) $(printf '%s\n' "${cairn_rates[@]}" | median) $((after - before))"
  }
  read -r local_rate cairn_rate sent < <(in_turns "$scratch/mnt/big" "$scratch/mnt")
  printf 'page cache: local %.0f MB/s, cairn %.0f MB/s: %.2fx (%d meta RPCs in %d re-reads)\n' \
    "$local_rate" "$cairn_rate" "$(echo "$cairn_rate / $local_rate" | bc -l)" "$sent" "$runs"
  # Another mount, with --passthrough: its first read fills the file's whole copy. Measured
  # after the first, whose kernel pages the copy's may push out of memory.
  pt="$scratch/passthrough"
  mkdir -p "$pt"
  "$bin" mount --meta "$meta" --credential "$scratch/cluster/meta0/tls/admin.cred" --mount "$pt" \
    --cache-dir "$pt.cache" --passthrough > "$pt.log" 2>&1 &
  mounts+=($!)
  for _ in $(seq 300); do mountpoint -q "$pt" && break; sleep 0.1; done
  cat "$pt/big" > /dev/null
  read -r local_rate cairn_rate sent < <(in_turns "$pt/big" "$pt")
  printf 'passthrough: local %.0f MB/s, cairn --passthrough %.0f MB/s: %.2fx (%d meta RPCs in %d re-reads)\n' \
    "$local_rate" "$cairn_rate" "$(echo "$cairn_rate / $local_rate" | bc -l)" "$sent" "$runs"
  rm -f "$scratch/local/big" "$scratch/mnt/big"
}

walks() {
  dirs=$(( (files + 99) / 100 ))
  for d in $(seq "$dirs"); do
    mkdir -p "$scratch/mnt/tree/$d" "$scratch/local/tree/$d"
    (cd "$scratch/mnt/tree/$d" && touch $(seq 100))
    (cd "$scratch/local/tree/$d" && touch $(seq 100))
  done
  walk_twice "find -ls" find_ls
  walk_twice "ls -lR" ls_lr
}

# A walk over the tree: a first pass on a fresh mount, then a second one; RPCs counted for each.
walk_twice() {
  local name=$1; shift
  echo "== $name over $files files: first pass on a fresh mount, then again (seconds, median of $runs)"
  "$@" "$scratch/local/tree" > /dev/null
  local local_pass firsts=() seconds_=() first_rpcs=() second_rpcs=()
  local_pass=$(for _ in $(seq "$runs"); do seconds "$@" "$scratch/local/tree"; done | median)
  for run in $(seq "$runs"); do
    fresh="$scratch/fresh-$name-$run"
    fresh=${fresh// /}
    mkdir -p "$fresh"
    "$bin" mount --meta "$meta" --credential "$scratch/cluster/meta0/tls/admin.cred" --mount "$fresh" --cache-dir "$fresh.cache" > "$fresh.log" 2>&1 &
    mounts+=($!)
    for _ in $(seq 300); do mountpoint -q "$fresh" && break; sleep 0.1; done
    r0=$(rpcs "$fresh")
    firsts+=("$(seconds "$@" "$fresh/tree")")
    r1=$(rpcs "$fresh")
    seconds_+=("$(seconds "$@" "$fresh/tree")")
    r2=$(rpcs "$fresh")
    first_rpcs+=($((r1 - r0))) second_rpcs+=($((r2 - r1)))
  done
  first=$(printf '%s\n' "${firsts[@]}" | median)
  second=$(printf '%s\n' "${seconds_[@]}" | median)
  printf 'first pass %.3f s (%s meta RPCs), second pass %.3f s (%s meta RPCs): %.1fx; local disk %.3f s\n' \
    "$first" "${first_rpcs[*]}" "$second" "${second_rpcs[*]}" "$(echo "$first / $second" | bc -l)" "$local_pass"
}
find_ls() { find "$1" -ls; }
ls_lr() { ls -lR "$1"; }

# SQLite takes fcntl locks at each transaction: with the promise on the database file held, a
# lock costs its own call to meta only, and the reads after it are the kernel's cached pages.
# One sqlite3 process runs the transactions, as an application keeping its database open would:
# reads that scan the table (about 650 bytes a row), and single-row inserts.
run_sql() { sqlite3 "$1" < "$2"; }
sqlite() {
  echo "== SQLite, $transactions transactions of each kind from one process on a table of $rows rows (per second, median of $runs, in turns with the local disk)"
  local dbs=("$scratch/local/app.db" "$scratch/mnt/app.db")
  for n in $(seq "$transactions"); do
    echo "SELECT count(*), max(length(pad)) FROM t WHERE n % 97 = $((n % 97));" >> "$scratch/read.sql"
    echo "BEGIN IMMEDIATE; INSERT INTO t VALUES ($n, hex(randomblob(300))); COMMIT;" >> "$scratch/write.sql"
  done
  for db in "${dbs[@]}"; do
    {
      echo "CREATE TABLE t (n INTEGER, pad TEXT); BEGIN;"
      for n in $(seq "$rows"); do echo "INSERT INTO t VALUES ($n, hex(randomblob(300)));"; done
      echo "COMMIT;"
    } | sqlite3 "$db"
  done
  for kind in read write; do
    local local_rates=() cairn_rates=() before after
    before=$(rpcs "$scratch/mnt")
    for _ in $(seq "$runs"); do
      local_rates+=("$(echo "$transactions / $(seconds run_sql "${dbs[0]}" "$scratch/$kind.sql")" | bc -l)")
      cairn_rates+=("$(echo "$transactions / $(seconds run_sql "${dbs[1]}" "$scratch/$kind.sql")" | bc -l)")
    done
    after=$(rpcs "$scratch/mnt")
    local local_rate cairn_rate
    local_rate=$(printf '%s\n' "${local_rates[@]}" | median)
    cairn_rate=$(printf '%s\n' "${cairn_rates[@]}" | median)
    printf '%s transactions: local %.0f/s, cairn %.0f/s: %.3fx (%.1f meta RPCs per transaction)\n' "$kind" \
      "$local_rate" "$cairn_rate" "$(echo "$cairn_rate / $local_rate" | bc -l)" \
      "$(echo "($after - $before) / ($transactions * $runs)" | bc -l)"
  done
  for db in "${dbs[@]}"; do
    [ "$(sqlite3 "$db" 'PRAGMA integrity_check;')" = ok ] || { echo "$db: integrity check failed" >&2; exit 1; }
  done
}

if wanted reread; then reread; fi
if wanted walks; then walks; fi
if wanted sqlite; then sqlite; fi
