"""Checks that span sections of a validated config: ids, outlets, groups, who acts on what.

Each section's model checks itself (`schema.py`); what no single section can see is
checked here, once the whole config has validated, and reported with the path of the
setting at fault so the loader can locate it in the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controller.config.credentials import unread
from controller.config.locate import dotted
from controller.config.schema import Config
from drivers.luxos import RENEW_MARGIN_S, SESSION_TTL_S, renew_after_s

Problem = tuple[tuple[Any, ...], str]  # (location, message)


def cross_check(cfg: Config) -> list[Problem]:
    """Checks that span sections: unique ids, outlets naming real rigs, known groups."""
    problems: list[Problem] = _held_sessions_fit_poll(cfg)
    seen: dict[str, tuple[Any, ...]] = {}
    hosts: dict[tuple[str, int], str] = {}
    for i, m in enumerate(cfg.miners):
        if m.group is not None and m.group not in cfg.groups:
            known = ", ".join(sorted(cfg.groups)) or "none defined"
            problems.append(
                (("miners", i, "group"), f"unknown group {m.group!r} (groups: {known})")
            )
        for rid, host in m.expand():
            if rid in seen:
                problems.append(
                    (("miners", i), f"duplicate rig id {rid!r} (also {dotted(seen[rid])})")
                )
            else:
                seen[rid] = ("miners", i)
            where = (host, m.port)
            if where in hosts and hosts[where] != rid:
                problems.append((("miners", i), f"{host}:{m.port} is also rig {hosts[where]!r}"))
            hosts.setdefault(where, rid)
    outlet_owner: dict[str, str] = {}
    for section, dev_ids in (
        ("meters", [m.id for m in cfg.meters]),
        ("pdus", [p.id for p in cfg.pdus]),
    ):
        ids: set[str] = set()
        for i, dev_id in enumerate(dev_ids):
            if dev_id in ids:
                problems.append(((section, i, "id"), f"duplicate {section[:-1]} id {dev_id!r}"))
            ids.add(dev_id)
    for i, pdu in enumerate(cfg.pdus):
        for n, rid in pdu.outlets.items():
            loc = ("pdus", i, "outlets", str(n))  # a table key, not a list index
            if rid not in seen:
                problems.append((loc, f"rig {rid!r} is not a configured miner"))
            elif rid in outlet_owner:
                problems.append((loc, f"rig {rid!r} is already on {outlet_owner[rid]}"))
            else:
                outlet_owner[rid] = f"{pdu.id} outlet {n}"
    if cfg.budget is not None:
        if cfg.control is None:
            problems.append((("budget",), "an energy budget needs a [control] section to act on"))
        if not any(m.role == "import" for m in cfg.meters):
            problems.append(
                (("budget",), "an energy budget is counted from an import meter: add one")
            )
    if cfg.grid is not None and cfg.grid.enabled:
        if cfg.control is None or not cfg.control.enabled:
            problems.append((("grid",), "grid orders need an enabled [control] section to obey"))
        if not cfg.grid.allow_unsigned and not cfg.grid.keys:
            problems.append(
                (("grid", "keys"), "no operator keys and unsigned orders refused: add a key")
            )
        kids = [k.kid for k in cfg.grid.keys]
        for i, kid in enumerate(kids):
            if kid in kids[:i]:
                problems.append((("grid", "keys", i, "kid"), f"duplicate key id {kid!r}"))
    if cfg.zone is not None:
        if cfg.control is None or not cfg.control.enabled:
            problems.append((("zone",), "a zone's share of the site needs an enabled [control]"))
        if not any(m.role == "import" for m in cfg.meters):
            problems.append((("zone",), "a zone reports its load from its sub-meter: add one"))
    if len([m for m in cfg.meters if m.role == "import"]) > 1:
        problems.append(
            (("meters",), "more than one import meter: which one does the cap apply to?")
        )
    return problems


def missing_files(cfg: Config) -> list[Problem]:
    """File settings that do not name a readable file. `check-config` refuses them: a typo
    in `ca_file` would otherwise surface as a daemon that cannot connect, hours later. The
    daemon itself only warns and keeps retrying, since a certificate may be provisioned
    after it starts. (A credential `check-config` did not read cannot be looked at.)"""
    files: list[tuple[tuple[Any, ...], Path | None]] = [
        (("mqtt", "ca_file"), cfg.mqtt.ca_file),
        (("mqtt", "cert_file"), cfg.mqtt.cert_file),
        (("mqtt", "key_file"), cfg.mqtt.key_file),
    ]
    if cfg.grid is not None:
        files += [
            (("grid", "keys", i, "public_key_file"), k.public_key_file)
            for i, k in enumerate(cfg.grid.keys)
        ]
    problems: list[Problem] = []
    for loc, path in files:
        if path is None or unread(path):
            continue
        if not path.is_file():
            why = "is not a file" if path.exists() else "does not exist"
            problems.append((loc, f"{path} {why}"))
        elif not os.access(path, os.R_OK):
            problems.append((loc, f"{path} cannot be read by this user"))
    return problems


def raw_duplicate_ids(raw: Mapping[str, Any]) -> list[Problem]:
    """Duplicate ids found in the file as written, for a config that did not validate: they
    are reported with the other problems at once rather than after those are fixed."""
    problems: list[Problem] = []
    for section, key in (("miners", "id"), ("meters", "id"), ("pdus", "id")):
        rows = raw.get(section)
        if not isinstance(rows, list):
            continue
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            ident = row.get(key) if isinstance(row, Mapping) else None
            if not isinstance(ident, str):
                continue
            if ident in seen:
                what = "rig" if section == "miners" else section[:-1]
                problems.append(
                    (
                        (section, i, key),
                        f"duplicate {what} id {ident!r} (also {section}[{seen[ident]}])",
                    )
                )
            else:
                seen[ident] = i
    return problems


def _held_sessions_fit_poll(cfg: Config) -> list[Problem]:
    """A LuxOS session lapses after 60 s unused, so holding one needs a poll at least
    every ~50 s. The default then quietly logs on per write; asking for it explicitly
    is an error worth seeing."""
    if renew_after_s(cfg.poll.interval_s) is not None:
        return []
    problems: list[Problem] = []
    for i, m in enumerate(cfg.miners):
        s = m.settings
        if "session" in s.model_fields_set and getattr(s, "session", None) == "hold":
            problems.append(
                (
                    ("miners", i, "session"),
                    f'session = "hold" needs poll.interval_s under '
                    f"{SESSION_TTL_S - RENEW_MARGIN_S:g} s (a LuxOS session lapses after "
                    f"{SESSION_TTL_S:g} s unused); poll.interval_s is "
                    f'{cfg.poll.interval_s:g}: use session = "per-write"',
                )
            )
    return problems
