#!/usr/bin/env bash
# Creates .venv with rigd installed (editable), on a fresh Debian/Ubuntu machine too.
# Usage: scripts/bootstrap.sh [dev]   ("dev" adds the test and lint tools)
# Re-runs are fast: pip runs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "need root (or sudo) to run: $*" >&2; return 1; fi; }
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then apt_install python3 python3-venv; fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "rigd needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1)" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    # Debian splits venv (and ensurepip) into its own package.
    apt_install "python3-venv" || apt_install "python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    "$PY" -m venv .venv
  fi
fi

extra=""; [ "${1:-}" = dev ] && extra="[dev]"
stamp=".venv/.rigd-installed${extra}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
  echo "$want" > "$stamp"
fi
