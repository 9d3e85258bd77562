#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (real processes, real
# FUSE mounts, pjdfstest against the mount and the local disk, the random-operations checker
# across a server kill), and a short run of each fuzz target. Installs what it needs first. The test runner's summary is the last
# thing it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./scripts/setup.sh --test-tools

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy -q --profile checked --all-targets -- -D warnings

# One profile for the whole run: release optimizations with debug assertions and overflow
# checks (Cargo.toml, `[profile.checked]`).
echo "== build"
cargo build -q --profile checked --all-targets

echo "== fuzz (a short run of each target; scripts/fuzz.sh runs them longer)"
./scripts/fuzz.sh --seconds 10

echo "== tests"
# Tests that mount file systems share the machine's two cores; keep them few at a time.
exec cargo nextest run --cargo-profile checked --no-fail-fast --test-threads 2 --failure-output final --status-level fail
