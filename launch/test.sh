#!/usr/bin/env bash
# Builds the environment if missing, then runs the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python -m pytest -q --durations=15 tests "$@"
