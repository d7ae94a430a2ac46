#!/usr/bin/env bash
# Set up (if needed), then run the whole-system demo. Extra arguments go to 'blazil demo'.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/blazil demo "$@"
