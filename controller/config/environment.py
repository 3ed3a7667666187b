"""Settings from the environment: RIGD_<SECTION>__<KEY>=value overrides the file.

Double underscores separate levels (RIGD_MQTT__URL, RIGD_POLL__INTERVAL_S), so one file
serves several environments and systemd can inject the broker; lists and tables are given
in TOML syntax (RIGD_X__Y='["a", "b"]'). Overrides are applied to the parsed file before
validation, so they are checked like any setting, and an error in one names the variable.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

ENV_PREFIX = "RIGD_"


def env_overrides(environ: Mapping[str, str]) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(variable, path, value) for every RIGD_A__B[__C] variable."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            continue
        parsed: Any = value
        if value[:1] in ("[", "{"):
            # Lists and tables are given in TOML syntax: RIGD_X__Y='["a", "b"]'.
            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except (ValueError, RecursionError):  # not TOML, too deep, too many digits
                parsed = value
        yield name, path, parsed


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    applied: dict[tuple[str, ...], str] = {}
    for name, path, value in env_overrides(environ):
        node = raw
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
        applied[path] = name
    return applied
