#!/usr/bin/env bash
# Builds the environment if missing, then runs the main job on the embedded default task.
# Extra arguments are key=value overrides, e.g. `bash launch/quickstart.sh train.max_steps=50`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python -m launch.cli main "$@"
