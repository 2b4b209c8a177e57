#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: installs what it needs, checks
# formatting and lints, builds the plugins for wasm32-wasip2, then runs every test (unit, doc,
# and end-to-end against the real binary and the real plugins).
set -euo pipefail
cd "$(dirname "$0")"

# rustup's default profile ships rustfmt and clippy; a minimal profile may not (no-ops when
# present). The WASM target is needed to build the plugins.
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add wasm32-wasip2
# the live views (`uet top`, `uet run`'s bar) are tested in a real terminal: tmux
if ! command -v tmux >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq tmux >/dev/null
fi

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== plugins (wasm32-wasip2)"
scripts/build-plugins
echo "== tests"
# release: the tests drive the real binary, and plugin compilation by a debug-built Cranelift
# would dominate their time
cargo test --workspace --release --locked
