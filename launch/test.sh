#!/usr/bin/env bash
# Builds the environment if missing, then runs the test suite: all of tests/, or the test paths
# given (`bash launch/test.sh tests/direct -k dpo`); options pass through to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
paths=()
for arg in "$@"; do
  case "$arg" in -*) ;; *) [ -e "${arg%%::*}" ] && paths+=("$arg") ;; esac
done
if [ ${#paths[@]} -eq 0 ]; then set -- tests "$@"; fi
exec python -m pytest -q --durations=15 "$@"
