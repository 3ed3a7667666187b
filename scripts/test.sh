#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lint, types and the test suite.
#   - Python dependencies into .venv (scripts/bootstrap.sh dev)
#   - the mosquitto broker binary via apt when missing (the tests start their own on a free port)
# Extra arguments go to pytest, e.g. scripts/test.sh -k config, or scripts/test.sh --busy-cores 2
# (the suite with two cores kept busy by other processes: RIGD_TEST_LOAD=2 does the same)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev

have_mosquitto() {
  { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } && command -v mosquitto_sub >/dev/null
}
if ! have_mosquitto; then
  echo "installing mosquitto and its clients (the tests run a real broker)..."
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    mosquitto mosquitto-clients
  # The tests start their own broker; Debian's service on 1883 is not needed.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Test files run in parallel, one worker per core (pytest-xdist). --dist loadfile keeps each
# file's tests together and in order: a file's fixed loopback subnet is used by one test at a
# time. RIGD_TEST_WORKERS=0 runs everything in this one process.
.venv/bin/python -m pytest -q -n "${RIGD_TEST_WORKERS:-auto}" --dist loadfile "$@"
