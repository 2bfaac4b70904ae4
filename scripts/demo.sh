#!/usr/bin/env bash
# Sets up .venv and runs the kvconnect demo (P/D on this CPU with a tiny model, next to one instance).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvconnect demo "$@"
