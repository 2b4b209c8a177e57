#!/usr/bin/env bash
# Builds uet and the plugins, then runs the quickstart workflow (examples/quickstart/).
set -euo pipefail
cd "$(dirname "$0")"
scripts/build-plugins
cargo build --release --locked -p uet
exec target/release/uet run examples/quickstart/workflow.toml "$@"
