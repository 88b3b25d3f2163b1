#!/usr/bin/env bash
# Builds the environment if missing, then runs the test suite: all of tests/, or the test paths
# given in one process (`bash launch/test.sh tests/direct -k dpo`); options pass through to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
paths=()
for arg in "$@"; do
  case "$arg" in -*) ;; *) [ -e "${arg%%::*}" ] && paths+=("$arg") ;; esac
done
# The whole suite runs on 2 pytest-xdist workers (ALIGN_TEST_WORKERS; 0 for one process), a test
# module staying on one worker; most tests drive one single-threaded rank, so 2 cores halve it.
workers="${ALIGN_TEST_WORKERS:-2}"
if [ ${#paths[@]} -eq 0 ]; then
  if [ "$workers" -gt 0 ]; then set -- -n "$workers" --dist loadscope tests "$@"; else set -- tests "$@"; fi
fi
exec python -m pytest -q --durations=15 "$@"
