#!/usr/bin/env bash
# Set up Blazil AI in ./.venv: Python packages (torch pinned to the CPU build unless BLAZIL_TORCH_SPEC
# says otherwise), the package itself (editable), and the Aeron media driver and binding.
# Idempotent: a second run with an unchanged pyproject.toml installs nothing and rebuilds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${BLAZIL_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.blazil-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing Python packages into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[llm,aeron,dev]"
    echo "$want" > "$stamp"
else
    echo "setup: Python packages up to date"
fi

# The wire format's native fast path (a small C extension next to framing.py); without it the pure-Python
# reference does the same work, slower.
wire_want=$(cat blazil_ai/transport/_wire.c blazil_ai/transport/build_wire.py | sha256sum | cut -d' ' -f1)
wire_stamp=.venv/.blazil-wire-stamp
if [ "$(cat "$wire_stamp" 2>/dev/null || true)" = "$wire_want" ] && ls blazil_ai/transport/_wire*.so >/dev/null 2>&1; then
    echo "setup: native wire module up to date"
elif .venv/bin/python blazil_ai/transport/build_wire.py; then
    echo "$wire_want" > "$wire_stamp"
else
    echo "setup: WARNING: the native wire module did not build (see above); the pure-Python wire format is used" >&2
fi

if [ -x scripts/build_aeron.sh ]; then
    if ! scripts/build_aeron.sh; then
        echo "setup: WARNING: the Aeron build failed (see above); everything else works over tcp:// URIs" >&2
    fi
fi
