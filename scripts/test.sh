#!/usr/bin/env bash
# Sets up .venv (see setup.sh) and runs every test tier: unit, integration (real NIXL between
# processes), e2e (real vLLM servers on CPU). GPU tests skip without a device; every other tier
# must run: a package a tier needs that does not import fails the run (KVCONNECT_REQUIRE_ALL).
# Pass pytest arguments to narrow it, e.g. scripts/test.sh -m unit
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo} KVCONNECT_REQUIRE_ALL=1
exec .venv/bin/python -m pytest tests "$@"
