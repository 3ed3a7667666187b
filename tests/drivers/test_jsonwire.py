"""drivers/jsonwire.py: orjson where it can, the standard library where it cannot, one result.

Seeds are real replies (tests/fixtures, see its README for sources and licences), damaged
the way the fuzz tests damage them (tests/fuzz_support.py)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import jsonwire
from tests.fuzz_support import dumps, fixture, fuzz_settings, json_values, replies

SEEDS = (
    fixture("luxos/captured-2025.4.8/stats.json"),
    fixture("antminer-stock-2020/stats.json"),
    fixture("avalon-cgminer/a15-194/estats.json"),
    fixture("whatsminer-api-v2/summary.json"),
    fixture("whatsminer-api-v3/get_miner_status_edevs.json"),
)


def same(a: Any, b: Any) -> bool:
    """Equal values, NaN equal to NaN; an int and a float are the same number if the float
    is the int's nearest (orjson's reading of an integer beyond 64 bits)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, float) and isinstance(b, float):
            return a == b or (math.isnan(a) and math.isnan(b))
        if type(a) is type(b):
            return a == b
        big = a if isinstance(a, int) else b
        return abs(big) >= 2**63 and float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def outcome(load: Any, data: bytes | str) -> Any:
    try:
        return ("value", load(data))
    except UnicodeDecodeError:
        return ("not utf-8", None)
    except (ValueError, RecursionError):
        return ("not json", None)


def stdlib(data: bytes | str, strict: bool = True) -> Any:
    text = data if isinstance(data, str) else data.decode("utf-8")
    return json.loads(text, strict=strict)


@fuzz_settings()
@given(st.one_of(replies(*SEEDS), json_values), st.booleans(), st.booleans())
def test_same_value_as_the_standard_library(doc: Any, as_text: bool, strict: bool) -> None:
    raw = dumps(doc)
    data: bytes | str = raw.decode() if as_text else raw
    want, got = (
        outcome(lambda d: stdlib(d, strict), data),
        outcome(lambda d: jsonwire.loads(d, strict=strict), data),
    )
    assert want[0] == got[0] and same(want[1], got[1])


@fuzz_settings()
@given(st.binary(max_size=200), st.booleans())
def test_same_errors_as_the_standard_library_on_any_bytes(data: bytes, strict: bool) -> None:
    want = outcome(lambda d: stdlib(d, strict), data)
    got = outcome(lambda d: jsonwire.loads(d, strict=strict), data)
    assert want[0] == got[0] and same(want[1], got[1])


def test_what_only_the_standard_library_reads_is_still_read() -> None:
    assert math.isnan(jsonwire.loads(b'{"a":NaN}')["a"])
    assert jsonwire.loads(b'{"a":Infinity}')["a"] == math.inf
    assert jsonwire.loads(b'{"a":"x\ty"}', strict=False) == {"a": "x\ty"}
    with pytest.raises(ValueError):
        jsonwire.loads(b'{"a":"x\ty"}')  # strict, as json.loads is by default
    assert jsonwire.loads(b'{"a":' + b"9" * 400 + b"}")["a"] == int("9" * 400)
    assert jsonwire.loads(bytearray(b'{"a":1}')) == {"a": 1}
    with pytest.raises(UnicodeDecodeError):
        jsonwire.loads(b'{"a":"\xff"}')
