"""What btminer's replies mean, whichever API generation carried them.

Both generations share a maker, a firmware name, booleans sent as "true"/"false" strings,
versions wrapped in quotes by some builds and a build date at the head of every firmware
version, which is what tells the generations apart (`driver_kind_for`). The per-generation
reply shapes are read in `v2` and `v3`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from drivers.cgminer import CGMinerRejected
from drivers.telemetry import RigIdentity
from drivers.values import MAX_RIG_HASHRATE_THS, MAX_RIG_POWER_W, measure, to_float

MAKE: Final = "Whatsminer"
FIRMWARE: Final = "btminer"
# Firmware dated after this speaks API v3 on 4433 (and no longer obeys v2 writes).
V3_FIRMWARE_SINCE: Final = 20241100
SNIPPET: Final = 80  # how much of an unexpected message an error quotes


class WhatsminerRejected(CGMinerRejected):
    """An error status from btminer; keeps its code so callers can react to specific ones."""


def flag(value: Any) -> bool | None:
    """btminer's booleans: "true"/"false" strings (status, device info) or real bools."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().strip("'\"").lower()
        if v in ("true", "1", "yes"):
            return True
        if v in ("false", "0", "no"):
            return False
    return None


def clean_text(value: Any) -> str:
    """A display string, with the single quotes some builds wrap versions in removed."""
    return value.strip().strip("'\"").strip() if isinstance(value, str) else ""


def as_ths(value: float | None) -> float | None:
    """A hashrate in TH/s fit for telemetry (see `drivers.values.measure`)."""
    return measure(value, MAX_RIG_HASHRATE_THS)


def as_watts(value: float | None) -> float | None:
    """A power in W fit for telemetry (see `drivers.values.measure`)."""
    return measure(value, MAX_RIG_POWER_W)


def encodable(text: str) -> bool:
    """Whether text can go into a hash or onto the wire (JSON may carry lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def first_number(entry: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    """The first of `keys` that holds a number: firmware builds name a figure differently."""
    for key in keys:
        v = to_float(entry.get(key))
        if v is not None:
            return v
    return None


def fw_date(version: str) -> int | None:
    """`20230803.11.REL` -> 20230803 (firmware versions start with their build date)."""
    m = re.match(r"\s*'?(\d{8})", version)
    return int(m.group(1)) if m else None


def api_version_tuple(text: str) -> tuple[int, ...] | None:
    parts = re.findall(r"\d+", text)
    try:
        return tuple(int(p) for p in parts[:3]) if parts else None
    except ValueError:  # more digits than int() converts: not a version
        return None


def model_name(miner_type: str) -> str:
    """Firmware type ("M50S_VH50") -> the model as rigd names it ("Whatsminer M50S_VH50")."""
    t = miner_type.strip()
    if not t:
        return ""
    return t if t.lower().startswith(MAKE.lower()) else f"{MAKE} {t}"


def driver_kind_for(identity: RigIdentity) -> str:
    """Which driver kind suits an identified Whatsminer: v3 for firmware after 2024-11."""
    date = fw_date(identity.firmware_version)
    return "whatsminer-v3" if date is not None and date > V3_FIRMWARE_SINCE else "whatsminer"
