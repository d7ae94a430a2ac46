#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the test suite. Extra arguments go to pytest.
# The long sweeps (tests marked slow: fault injection, fuzzing, exactness sweeps) run with BLAZIL_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
echo "== ruff check"
ruff check .
echo "== mypy blazil_ai"
mypy blazil_ai
echo "== pytest"
if [ "${BLAZIL_SLOW:-0}" = "1" ]; then
    python -m pytest -q -p no:cacheprovider "$@"
else
    python -m pytest -q -p no:cacheprovider -m "not slow" "$@"
fi
