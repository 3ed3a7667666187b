"""Where each table and key of a TOML text is, so an error can name its line.

tomllib gives values but no positions; a technician fixing a config wants "line 42", so
this scan maps every table and key path to its first line, keyed as pydantic reports
locations (array-of-table entries by their index).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="
)


def _split_key(key: str) -> list[str]:
    parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+)", key)
    return [a or b or c for a, b, c in parts]


def locate_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table and key path in a TOML text to its line, for error messages.

    tomllib gives values but no positions; this scan covers what configs use
    (tables, arrays of tables, dotted and quoted keys). Array-of-table entries
    are keyed by their index, as pydantic reports them.
    """
    lines: dict[tuple[str, ...], int] = {}
    counts: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline = False
    for no, raw in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = False
            continue
        m = _HEADER.match(raw)
        if m and not _KEY.match(raw):
            names = _split_key(m.group(2))
            if m.group(1) == "[[":
                # An array-of-tables entry: index it under its parent path.
                parent = _resolve(names[:-1], counts)
                base = (*parent, names[-1])
                idx = counts.get(base, -1) + 1
                counts[base] = idx
                table = (*base, str(idx))
            else:
                table = (*_resolve(names[:-1], counts), names[-1])
            lines.setdefault(table, no)
            continue
        k = _KEY.match(raw)
        if k:
            path = (*table, *_split_key(k.group(1)))
            lines.setdefault(path, no)
            rest = raw[k.end() :]
            if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                in_multiline = True
    return lines


def _resolve(names: list[str], counts: dict[tuple[str, ...], int]) -> tuple[str, ...]:
    """A dotted header prefix, with the current index of any array of tables on the way."""
    out: tuple[str, ...] = ()
    for name in names:
        out = (*out, name)
        if out in counts:
            out = (*out, str(counts[out]))
    return out


def line_for(loc: tuple[Any, ...], lines: Mapping[tuple[str, ...], int]) -> int | None:
    key = tuple(str(p) for p in loc)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return None


def dotted(loc: tuple[Any, ...]) -> str:
    """A location as an error shows it: `pdus[1].outlets.3`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
