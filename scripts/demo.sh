#!/usr/bin/env bash
# Set up ./.venv and run `megavod demo` (writes ./megavod-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/megavod demo "$@"
