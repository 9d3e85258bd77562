#!/usr/bin/env bash
# Installs what running Cairn needs on a Debian machine (FUSE) and, with --test-tools, what
# testing needs (the library pjdfstest links against, cargo-nextest, pjdfstest, cargo-fuzz). Safe to run
# again: only what is missing is installed.
set -euo pipefail

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
# Whole-file copies (`--passthrough`) live on an ext4 volume the mount makes.
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
if [ "${1:-}" = "--test-tools" ]; then
  # pjdfstest links against libacl; the lock tests run SQLite databases on the mount.
  [ -e /usr/include/sys/acl.h ] || need_apt+=(libacl1-dev)
  command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
  # getfattr reads a mount's metrics; setpriv runs the permission tests as other users.
  command -v getfattr >/dev/null 2>&1 || need_apt+=(attr)
  command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ "${1:-}" = "--test-tools" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked -q
  fi
  if ! command -v pjdfstest >/dev/null 2>&1; then
    echo "setup: installing pjdfstest" >&2
    cargo install pjdfstest --locked -q
  fi
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked -q
  fi
  # pjdfstest switches to this unprivileged user for its permission tests.
  if ! id tests >/dev/null 2>&1; then
    echo 'tests:x:::Dummy User:/:/usr/sbin/nologin' | newusers
  fi
fi
