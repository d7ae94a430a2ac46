#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the test suite. Extra arguments go to pytest.
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
python -m pytest -q -p no:cacheprovider "$@"
