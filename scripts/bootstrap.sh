#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv.
# CPU build of torch when no NVIDIA GPU is visible; flash-attn's Python part only when its CUDA build is impossible.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.openrlhf-irl-stamp"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] creating environment in $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
  $PIP install -q --no-build-isolation "flash-attn==2.8.3"
  extras="test,gpu"
else
  $PIP install -q "torch==2.13.0"
  $PIP install -q packaging psutil ninja einops
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    $PIP install -q --no-build-isolation "flash-attn==2.8.3"
  extras="test"
fi
$PIP install -q -e ".[$extras]"
echo "$want" > "$STAMP"
echo "[bootstrap] ready" >&2
