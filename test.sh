#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: installs what it needs, checks
# formatting and lints, then runs every test (unit, doc and end-to-end against the real binary).
set -euo pipefail
cd "$(dirname "$0")"

# rustup ships rustfmt and clippy in its default profile; add them where a minimal profile left
# them out (both calls are no-ops when present).
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo test --workspace --locked
