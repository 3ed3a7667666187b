"""JSON off the wire, decoded once, for every TCP driver (4028 and Whatsminer's 4433).

With the standard library, decoding was about a quarter of what a LuxOS poll cost above
its floor (bench/floors); orjson decodes the same replies three to four times faster. It
is strict (RFC 8259 in valid UTF-8), so anything it refuses is handed to the standard
library, which takes what it always took: `NaN`/`Infinity`, control characters in
strings (with `strict=False`), integers of any size. Firmware quirks beyond that (a NUL
terminator, `}{` between the parts of a joined reply) stay with the protocol's own
decoder (drivers/cgminer.py).

One difference remains and is accepted: an integer beyond 64 bits, which no rig's figure
is, comes back from orjson as the nearest float rather than as an exact int.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["loads"]


def loads(data: bytes | bytearray | memoryview | str, *, strict: bool = True) -> Any:
    """The JSON value in `data`; bytes must be UTF-8.

    Raises what `json.loads` raises for text it cannot read: `UnicodeDecodeError` for
    bytes that are not UTF-8, a `ValueError` (`json.JSONDecodeError`) for anything else,
    `RecursionError` for nesting the standard library cannot follow. `strict` is the
    standard library's: False lets control characters stand inside strings."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    return json.loads(text, strict=strict)
