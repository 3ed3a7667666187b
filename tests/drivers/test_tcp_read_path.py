"""The 4028 read path made cheaper (issue 19) reads exactly what it read before.

Each faster function is checked against the implementation it replaced, kept here as the
oracle, on the recorded replies (tests/fixtures, sources and licences in its README) and on
Hypothesis' damage of them (tests/fuzz_support.py): NUL terminators, `}{` joins, bytes that
are not UTF-8, strings where numbers belong, Unicode digits, figures too big for a float.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from drivers import avalon, cgminer
from drivers.errors import MalformedReply, snippet
from drivers.values import to_float
from tests.drivers.test_jsonwire import same
from tests.fuzz_support import fixture, fuzz_settings, replies, wire

LUXOS_STATS = fixture("luxos/captured-2025.4.8/stats.json")
STOCK_STATS = fixture("antminer-stock-2020/stats.json")
SEEDS = (
    LUXOS_STATS,
    fixture("luxos/captured-2025.4.8/summary.json"),
    STOCK_STATS,
    fixture("avalon-cgminer/a15-194/estats.json"),
    fixture("avalon-cgminer/stats.json"),
    fixture("whatsminer-api-v2/summary.json"),
)
AVALON_STRINGS = tuple(
    value
    for name in ("a15-194/estats", "stats", "avalon_a_stats", "litestats")
    for item in fixture(f"avalon-cgminer/{name}.json")["STATS"]
    for value in item.values()
    if isinstance(value, str) and "[" in value
)
_SENSOR = st.text(st.sampled_from("0123456789-.٣ ae+%x"), max_size=24)
_FIGURES = st.text(st.sampled_from("0123456789 \t.-%e٣x"), max_size=40)


# -- the oracles: the code these replaced, as it was -----------------------------------------


def old_decode_reply(raw: bytes) -> dict[str, Any]:
    data = raw.split(b"\x00", 1)[0]
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise MalformedReply(f"reply is not UTF-8 text: {snippet(data)}") from exc
    if not text:
        raise MalformedReply("empty reply")
    try:
        obj = json.loads(text, strict=False)
    except (ValueError, RecursionError) as exc:
        if "}{" not in text:
            raise MalformedReply("reply is not JSON") from exc
        try:
            obj = json.loads(text.replace("}{", "},{"), strict=False)
        except (ValueError, RecursionError) as exc2:
            raise MalformedReply("reply is not JSON") from exc2
    if not isinstance(obj, dict):
        raise MalformedReply("not an object")
    return obj


_OLD_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def old_to_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            f = float(value)
        except OverflowError:
            return None
    elif isinstance(value, str):
        whole, dot, frac = value.partition(".")
        if whole.isdecimal() and (not dot or frac.isdecimal()):
            f = float(value)
        else:
            m = _OLD_NUMBER.match(value)
            if not m:
                return None
            f = float(m.group(1))
    else:
        return None
    return f if math.isfinite(f) else None


def old_temps(value: Any) -> list[float]:
    if isinstance(value, str):
        parts = [old_to_float(p) for p in value.split("-")]
        return [p for p in parts if p is not None and p > 0]
    f = old_to_float(value)
    return [f] if f is not None and f > 0 else []


def old_chain_numbers(dev: Mapping[Any, Any]) -> list[int]:
    key_re = re.compile(r"chain_(?:acn|rate)(\d+)")
    nums = set()
    for key in dev:
        m = (
            key_re.fullmatch(key)
            if isinstance(key, str) and key.startswith(("chain_acn", "chain_rate"))
            else None
        )
        if m:
            nums.add(int(m.group(1)))
    return sorted(nums)


def old_numbers(value: str | None) -> list[float]:
    if not value:
        return []
    out = []
    for part in value.replace("%", " ").split():
        f = old_to_float(part)
        if f is not None:
            out.append(f)
    return out


def old_parse_fans(mm: Mapping[str, str]) -> tuple[int, ...]:
    nums = sorted(int(m.group(1)) for k in mm if (m := re.fullmatch(r"Fan(\d+)", k)))
    fans = []
    for n in nums[: cgminer.MAX_FANS]:
        f = old_to_float(mm.get(f"Fan{n}"))
        if f is not None and int(f) >= 0:
            fans.append(int(f))
    return tuple(fans)


# -- decoding -------------------------------------------------------------------------------


def _outcome(decode: Any, raw: bytes) -> Any:
    try:
        return decode(raw)
    except MalformedReply:
        return MalformedReply


@fuzz_settings()
@given(wire(replies(*SEEDS)))
@example(b'{"a":[{"b":1}{"c":2}]}\x00junk')
@example(b'\x0c {"a":1} \x0b\x00')
@example(b'{"a":"\xff"}')
@example(b'{"a":NaN,"b":"x\ty"}')
@example(b"[" * 1100 + b"]" * 1100)
def test_decode_reply_reads_what_it_read_before(raw: bytes) -> None:
    want, got = _outcome(old_decode_reply, raw), _outcome(cgminer.decode_reply, raw)
    assert (want is MalformedReply) == (got is MalformedReply)
    if got is not MalformedReply:
        assert same(want, got)


def test_request_bytes_are_built_once_and_checked_as_before() -> None:
    assert cgminer._encoded("summary+stats") == b'{"command":"summary+stats"}'
    assert cgminer._encoded("stats") is cgminer._encoded("stats")
    assert cgminer._joinable((" summary", "stats", "summary ", "")) == ("summary", "stats")
    for bad in ((), ("",), ("summary", "pools+stats"), ("ascset|0",)):
        with pytest.raises(ValueError):
            cgminer._joinable(bad)


# -- figures --------------------------------------------------------------------------------


@fuzz_settings()
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        _SENSOR,
        st.lists(st.integers(), max_size=2),
    )
)
@example(10**400)
@example("9" * 400)
@example("\u0663\u0664.\u0665")  # Arabic-Indic digits
def test_to_float_as_before(value: Any) -> None:
    assert same(to_float(value), old_to_float(value))


@fuzz_settings()
@given(st.one_of(_SENSOR, st.integers(), st.floats(), st.none()))
@example("64-41-41-64")
@example("0-0-0-0")
@example("5--3")
@example("9" * 400)
def test_hottest_sensor_as_before(value: Any) -> None:
    temps = old_temps(value)
    assert cgminer._hottest(value) == (max(temps) if temps else None)
    assert cgminer._temps(value) == temps


_CHAIN_KEYS = st.sampled_from(
    ["chain_acn1", "chain_rate12", "chain_acn٣", "chain_rate", "xchain_acn1", "chain_acn1x",
     "chain_acs1", "temp_pcb2", "fan1", "chain_rate007"]
)  # fmt: skip


@fuzz_settings()
@given(st.dictionaries(st.one_of(_CHAIN_KEYS, st.text(max_size=12)), st.integers(), max_size=12))
def test_chain_numbers_as_before(dev: dict[str, Any]) -> None:
    assert cgminer._chain_numbers(dev) == old_chain_numbers(dev)


def test_chain_numbers_with_keys_that_are_not_text() -> None:
    dev: dict[Any, Any] = {1: 2, "chain_acn3": 1, None: 0}
    assert cgminer._chain_numbers(dev) == old_chain_numbers(dev) == [3]


@pytest.mark.parametrize("stats", [LUXOS_STATS, STOCK_STATS], ids=["luxos", "stock"])
def test_recorded_boards_as_the_old_reading(stats: dict[str, Any]) -> None:
    """The boards of a real reply, read field by field the old way."""
    dev = cgminer._device_stats(stats)
    boards = cgminer.parse_hashboards(stats)
    assert [b.index for b in boards] == list(range(len(boards))) and boards
    first = old_chain_numbers(dev)[0]
    for board in boards:
        n = first + board.index
        pcb = old_temps(dev.get(f"temp_pcb{n}")) or old_temps(dev.get(f"temp{n}"))
        chip = old_temps(dev.get(f"temp_chip{n}")) or old_temps(dev.get(f"temp2_{n}"))
        assert board.temp_c == (max(pcb) if pcb else None)
        assert board.chip_temp_c == (max(chip) if chip else None)


# -- Avalon ---------------------------------------------------------------------------------


@fuzz_settings()
@given(_FIGURES)
@example("62  58  57  57  59  ")
@example("9" * 299 + " " + "9" * 400)
@example(" ".join(["9" * 350] * 2))
@example("٣ 4")
@example("1\t2\n3")
def test_numbers_and_their_count_as_before(value: str) -> None:
    assert avalon.numbers(value) == old_numbers(value)
    assert avalon.count_numbers(value) == len(old_numbers(value))


@pytest.mark.parametrize("text", AVALON_STRINGS, ids=lambda t: t[:12])
def test_recorded_controller_strings_count_as_before(text: str) -> None:
    mm = avalon.parse_mm(text)
    for value in mm.values():
        assert avalon.count_numbers(value) == len(old_numbers(value))
        assert avalon.numbers(value) == old_numbers(value)
    assert avalon.parse_fans(mm) == old_parse_fans(mm)


@fuzz_settings()
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(["Fan1", "Fan12", "Fan", "FanR", "Fan٣", "xFan1", "Fan1x"]),
                  st.text(max_size=6)),
        st.text(st.sampled_from("0123456789-x "), max_size=6),
        max_size=8,
    )
)  # fmt: skip
def test_fans_as_before(mm: dict[str, str]) -> None:
    assert avalon.parse_fans(mm) == old_parse_fans(mm)
