#!/usr/bin/env bash
# The main job: installs rigd into .venv if needed, then runs `rigd demo` (arguments pass through),
# a simulated farm, a broker and the daemon in one process, with no external service.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/rigd demo "$@"
