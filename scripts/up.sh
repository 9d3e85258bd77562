#!/usr/bin/env bash
# Starts a one-node Cairn file system (meta and data in one process) and mounts it.
# Data lives in $CAIRN_DATA (default ~/.cairn/data), the mount in $CAIRN_MOUNT (default
# ~/cairn). Runs in the foreground: Ctrl-C unmounts and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

data="${CAIRN_DATA:-$HOME/.cairn/data}"
mount="${CAIRN_MOUNT:-$HOME/cairn}"

./scripts/setup.sh
cargo build --release -q --bin cairn
mkdir -p "$mount"
exec ./target/release/cairn up --data "$data" --mount "$mount" "$@"
