#!/usr/bin/env bash
# Fuzzes what Cairn takes from the network and the disk with cargo-fuzz (libFuzzer):
#   decode         every decoder of a peer's bytes (gRPC messages, Raft messages, join tokens,
#                  certificates)
#   meta_commands  the meta state machine fed arbitrary commands and client mutations
#   block_store    block volumes written with lying digests, damaged on disk, reopened, read
#
#   scripts/fuzz.sh [--seconds N | --runs N] [TARGET...]     (default: every target, 60 s each)
#
# Inputs that crash are kept in fuzz/artifacts/TARGET; what was learnt in fuzz/corpus/TARGET.
# Builds with the stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags) and
# without a sanitizer: the code under test is safe Rust, so a panic is the finding.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
limit=(-max_total_time=60)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(decode meta_commands block_store)
command -v cargo-fuzz > /dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build --sanitizer none --debug-assertions
for target in "${targets[@]}"; do
  echo "== fuzz $target (${limit[*]})"
  mkdir -p "fuzz/corpus/$target"
  cargo fuzz run --sanitizer none --debug-assertions "$target" "fuzz/corpus/$target" -- \
    "${limit[@]}" -max_len=65536 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)|panicked|ERROR|SUMMARY' || true
  if ls "fuzz/artifacts/$target"/crash-* > /dev/null 2>&1; then
    echo "fuzz $target: crashing inputs in fuzz/artifacts/$target" >&2
    exit 1
  fi
done
