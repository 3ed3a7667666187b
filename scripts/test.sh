#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lint, types and the test suite.
#   - Python dependencies into .venv (scripts/bootstrap.sh dev)
#   - the mosquitto broker binary via apt when missing (the tests start their own on a free port)
#   - promtool via apt when missing (Debian's prometheus package): the tests check the
#     Prometheus scrape config and alert rules in config/prometheus/ with it
# Extra arguments go to pytest, e.g. scripts/test.sh -k config, or scripts/test.sh --busy-cores 2
# (the suite with two cores kept busy by other processes: RIGD_TEST_LOAD=2 does the same)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  apt_updated=1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
# The tests start their own programs; Debian's services of the same packages are not needed.
no_service() {
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now "$1" >/dev/null 2>&1 || true
  fi
}

have_mosquitto() {
  { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } && command -v mosquitto_sub >/dev/null
}
if ! have_mosquitto; then
  echo "installing mosquitto and its clients (the tests run a real broker)..."
  apt_install mosquitto mosquitto-clients
  no_service mosquitto  # Debian's broker on 1883
fi
if ! command -v promtool >/dev/null; then
  echo "installing promtool (the tests check config/prometheus/ with it)..."
  apt_install prometheus
  no_service prometheus  # Debian's Prometheus server on 9090
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
# Test files run in parallel, one worker per core (pytest-xdist). --dist loadfile keeps each
# file's tests together and in order: a file's fixed loopback subnet is used by one test at a
# time. RIGD_TEST_WORKERS=0 runs everything in this one process.
.venv/bin/python -m pytest -q -n "${RIGD_TEST_WORKERS:-auto}" --dist loadfile "$@"
