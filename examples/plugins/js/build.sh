#!/usr/bin/env bash
# Builds the JavaScript example plugin (plugin.js) into a WebAssembly component.
#   ./build.sh [OUTPUT]    (default: jsgreet.wasm next to this script)
# On first use (or when package-lock.json is newer than the install), installs componentize-js
# and its dependencies with `npm ci` into this folder's node_modules; nothing global.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
wit="$repo/wit"
out="${1:-$here/jsgreet.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

cd "$here"
# The version pinned in package.json, and the one installed (if any).
wanted="$(node -p 'require("./package.json").devDependencies["@bytecodealliance/componentize-js"]')"
have="$(node -p 'try { require("./node_modules/@bytecodealliance/componentize-js/package.json").version } catch { "" }')"
if [ "$have" != "$wanted" ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "installing componentize-js $wanted into $here/node_modules" >&2
    npm ci --no-audit --no-fund --loglevel=error >&2
fi

mkdir -p "$(dirname "$out")"
# The host links WASI 0.2 (cli, clocks, filesystem, io, random, sockets) but not wasi:http, so
# the engine's fetch() and fetch-event support are left out.
./node_modules/.bin/componentize-js plugin.js --wit "$wit" --world-name plugin \
    --disable http fetch-event --out "$out"
echo "built $out ($(wc -c <"$out") bytes)" >&2
