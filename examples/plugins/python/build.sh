#!/usr/bin/env bash
# Builds the Python example plugin (app.py) into a WebAssembly component.
#   ./build.sh [OUTPUT]    (default: pygreet.wasm next to this script)
# On first use, installs componentize-py (pinned below) into the repository's
# target/pytools/componentize-py-VERSION (or under $PYTOOLS_DIR) with
# `python3 -m pip install --target`: nothing is installed globally, no virtualenv is needed.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
wit="$repo/wit"
tools="${PYTOOLS_DIR:-$repo/target/pytools}/componentize-py-$COMPONENTIZE_PY_VERSION"
out="${1:-$here/pygreet.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
python="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -d "$tools/componentize_py" ]; then
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $tools" >&2
    # Into a temporary folder beside it, then renamed: an interrupted install leaves no half.
    mkdir -p "$(dirname "$tools")"
    staging="$(mktemp -d "$tools.tmp.XXXXXX")"
    trap 'rm -rf "$work" "$staging"' EXIT
    chmod 755 "$staging"
    PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check \
        --no-warn-script-location --target "$staging" "componentize-py==$COMPONENTIZE_PY_VERSION"
    mv -T "$staging" "$tools"
fi

# componentize-py runs the app once at build time and leaves a __pycache__ beside it: build
# from a copy, so the source folder stays clean.
mkdir -p "$work/app" "$(dirname "$out")"
cp "$here"/*.py "$work/app/"
PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$tools${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
    'import sys, componentize_py; sys.argv[0] = "componentize-py"; sys.exit(componentize_py.script())' \
    -q -d "$wit" -w plugin componentize -p "$work/app" -o "$out" app
echo "built $out ($(wc -c <"$out") bytes)" >&2
