"""Reading numbers and sections out of what firmware sends, the same way in every driver.

Miner firmware sends numbers as ints, floats or strings ("31947.78", "3250 W", ""), nests
its sections as a list or a single object, and now and then reports a figure no rig can
have. Every driver reads replies through these helpers, so one reply means one reading
whichever protocol carried it, and nothing a device sends becomes NaN, infinity or a
negative power that the planner would add into the farm's import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

# Plausibility bounds of one rig's figures: a reply beyond them is misread, not a rig, and
# the planner adds rig powers up, so one absurd figure would distort the whole farm's estimate.
MAX_RIG_POWER_W: Final = 100_000.0  # ten times the hungriest hydro-cooled rig
MAX_RIG_HASHRATE_THS: Final = 100_000.0  # 100 PH/s; the fastest rigs do about 1 PH/s

# Compiled once: a farm parses thousands of replies a second.
_NUMBER: Final = re.compile(r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def to_float(value: Any) -> float | None:
    """Numbers as firmware sends them: int, float, or a string ("31947.78", "3250 W", "").

    Exact types first: a poll reads dozens of figures from every rig, and the checks a
    subclass needs (bool is an int) cost more than the reading."""
    cls = type(value)
    if cls is float:
        f = value
    elif cls is str:
        whole, dot, frac = value.partition(".")
        if whole.isdecimal() and (not dot or frac.isdecimal()):
            f = float(value)  # the common "64" or "36544.52": what the pattern would read
        else:
            m = _NUMBER.match(value)
            if not m:
                return None
            f = float(m.group(1))
    elif cls is int:
        try:
            f = float(value)
        except OverflowError:  # a JSON integer beyond any float
            return None
    elif value is None or isinstance(value, bool):
        return None
    elif isinstance(value, int | float):
        return to_float(float(value)) if isinstance(value, float) else to_float(int(value))
    elif isinstance(value, str):
        return to_float(str(value))
    else:
        return None
    return f if math.isfinite(f) else None


def to_int(value: Any) -> int | None:
    f = to_float(value)
    return None if f is None else int(f)


def positive(value: Any) -> float | None:
    """A number above zero, or None: firmware reports 0 for a sensor or limit it lacks."""
    f = to_float(value)
    return f if f is not None and f > 0 else None


def measure(value: float | None, limit: float) -> float | None:
    """A power or hashrate fit for telemetry: finite, not negative and at most `limit`.

    Anything else is None, "not known", as for a field the firmware does not send.
    """
    return value if value is not None and 0.0 <= value <= limit else None


def mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is an object, else an empty one: a missing or mistyped branch of a
    reply reads like an absent one. A `dict` (what every JSON decoder gives) is let through
    before the ABC check, which costs more than the rest of most lookups."""
    if type(value) is dict:
        return value
    return value if isinstance(value, Mapping) else {}


def section(reply: Mapping[str, Any] | None, name: str) -> list[Mapping[str, Any]]:
    """The list under a section key (SUMMARY, STATS, ...), keeping only object items."""
    if reply is None:
        return []
    items = reply.get(name)
    if type(items) is list:  # the usual case: a list of dicts, checked without the ABC
        if all(type(i) is dict for i in items):
            return items
        return [i for i in items if isinstance(i, Mapping)]
    if isinstance(items, Mapping):
        return [items]
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, Mapping)]


def first(reply: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    items = section(reply, name)
    return items[0] if items else {}
