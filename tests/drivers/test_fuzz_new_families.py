"""Fuzzing the parsers of the Avalon, ePIC and VNish drivers: whatever the device sends, a
well-typed, sane reading or a `DeviceError`, never a crash (the contract of
tests/drivers/test_fuzz_drivers.py, whose checks are reused).

Seeds: the recorded Avalon and ePIC replies (tests/fixtures), and for VNish the simulator's
replies, which follow the vendor's API document (no real reply was available).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from drivers import avalon, epic, vnish
from drivers.webjson import JsonHttpClient
from simulators.clock import ManualClock
from simulators.farm import Farm
from simulators.vnish import VNishWebServer
from tests.drivers.test_fuzz_drivers import check_telemetry, typed
from tests.fuzz_support import fixture, fuzz_settings, optional, replies, wire

FUZZ = fuzz_settings()
FUZZ_LIGHT = fuzz_settings(max(25, FUZZ.max_examples // 4))  # small parsers, big seeds

AVALON = {
    n: fixture(f"avalon-cgminer/{n}.json")
    for n in ("summary", "stats", "litestats", "version", "avalon_a_stats", "a15-194/estats")
}
EPIC = {n: fixture(f"epic-powerplay-v1/{n}.json") for n in ("summary", "capabilities")}


def _vnish_seeds() -> dict[str, Any]:
    farm = Farm.build(ManualClock(), rigs=1, pdus=1)
    web = VNishWebServer(farm, "rig-001", host="127.0.0.1", port=0)
    return {
        "summary": web.summary(farm.now()),
        "presets": [p.as_reply() for p in web.presets],
    }


VNISH = _vnish_seeds()


@given(
    summary=optional(replies(AVALON["summary"])),
    stats=replies(
        AVALON["stats"], AVALON["litestats"], AVALON["avalon_a_stats"], AVALON["a15-194/estats"]
    ),
    version=optional(replies(AVALON["version"])),
)
@FUZZ_LIGHT
@example(summary=None, stats={"STATS": [{"MM ID0": "WALLPOWER[1e400] PS[nan 1 2 3 4 5 inf]"}]},
         version=None)  # fmt: skip
def test_avalon_parse_telemetry(summary: Any, stats: Any, version: Any) -> None:
    tel = typed(
        lambda: avalon.parse_avalon_telemetry(
            2.0, summary=summary, stats=stats, version=version, device="a1"
        )
    )
    if tel is not None:
        check_telemetry(tel)
    assert isinstance(avalon.is_avalon(version, stats), bool)


@given(st.text(max_size=400))
@FUZZ_LIGHT
def test_avalon_mm_strings(text: str) -> None:
    stats = {"STATS": [{"MM ID0": text, "HBinfo": text}]}
    tel = typed(lambda: avalon.parse_avalon_telemetry(2.0, summary=None, stats=stats))
    if tel is not None:
        check_telemetry(tel)
    assert all(isinstance(k, str) for k in avalon.parse_mm(text))


@given(summary=replies(EPIC["summary"]), capabilities=optional(replies(EPIC["capabilities"])))
@FUZZ_LIGHT
def test_epic_parse_telemetry(summary: Any, capabilities: Any) -> None:
    tel = typed(lambda: epic.parse_epic_telemetry(3.0, summary, capabilities=capabilities))
    if tel is not None:
        check_telemetry(tel)
    span = epic.target_range(capabilities)
    if span is not None:
        assert all(math.isfinite(w) and w > 0 for w in span) and span[0] <= span[1]
    ident = epic.parse_epic_identity(summary, capabilities)
    assert isinstance(ident.model, str) and isinstance(ident.firmware_version, str)


@given(replies(VNISH["summary"]))
@FUZZ_LIGHT
def test_vnish_parse_summary(summary: Any) -> None:
    tel = typed(lambda: vnish.parse_vnish_summary(4.0, summary, device="v1"))
    if tel is not None:
        check_telemetry(tel)


@given(st.one_of(replies({"presets": VNISH["presets"]}).map(lambda d: d.get("presets", d)),
                 st.lists(replies(*VNISH["presets"]), max_size=6)))  # fmt: skip
@FUZZ_LIGHT
def test_vnish_presets(presets: Any) -> None:
    table = vnish.tuned_presets(presets)
    assert all(math.isfinite(w) and w > 0 and isinstance(n, str) for w, n in table)
    assert table == sorted(table)


@given(st.integers(100, 599), wire(replies(EPIC["summary"])) | st.binary(max_size=100))
@FUZZ_LIGHT
def test_web_json_decode(status: int, data: bytes) -> None:
    client = JsonHttpClient("127.0.0.1", 80, device="w1")
    typed(lambda: client._decode(status, data, "GET", "/summary", "read"))
