"""The Whatsminer (btminer) drivers, API v2 and v3, against their simulator over real sockets.

Fixtures: `fixtures/whatsminer-api-v2/` are real replies of a Whatsminer on API v2 (asic-rs
captures); `fixtures/whatsminer-api-v3/` are API v3 replies written from MicroBT's
documentation, not captures. The md5-crypt vectors come from `openssl passwd -1` and
the reference's worked example. Every socket is on a 127.x address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import MinerCapabilities, MinerDriver
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
)
from drivers.telemetry import RigIdentity, RigState
from drivers.whatsminer import (
    DEFAULT_MIN_FRACTION,
    BTMinerV2Client,
    WhatsminerDriver,
    WhatsminerRejected,
    WhatsminerV3Driver,
    check_v2_status,
    driver_kind_for,
    identify,
    make_whatsminer_driver,
    parse_error_codes,
    parse_v2_telemetry,
    parse_v3_telemetry,
)
from drivers.whatsminer.crypto import (
    V2Token,
    aes_ecb_decrypt_b64,
    aes_ecb_encrypt_b64,
    md5_crypt,
    v3_token,
)
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode
from simulators.whatsminer import (
    WHATSMINER_MODELS,
    WhatsminerFleet,
    WhatsminerServer,
    build_whatsminer_farm,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
V2_CAPS = "whatsminer-api-v2"
V3_DOCS = "whatsminer-api-v3"
PASSWORD = "s3cret_1"
MODEL = "Whatsminer M50S_VH50"


def load(folder: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / folder / f"{name}.json").read_text())
    return data


_BLOCK = (random.randrange(1, 255), random.randrange(1, 255))
_next_host = iter(range(2, 250))


def fresh_host() -> str:
    """A loopback address of this module's random 127.x.y.0/24 block, new for each use."""
    return f"127.{_BLOCK[0]}.{_BLOCK[1]}.{next(_next_host)}"


def mode(server: WhatsminerServer) -> RigMode:
    return server.rig.mode


@dataclass
class Env:
    clock: ManualClock
    farm: Farm
    server: WhatsminerServer

    @property
    def rig_id(self) -> str:
        return self.server.rig_id

    def v2(self, **kw: Any) -> WhatsminerDriver:
        kw.setdefault("password", PASSWORD)
        kw.setdefault("clock", self.clock.now)
        return WhatsminerDriver(self.rig_id, self.server.host, self.server.port_v2, **kw)

    def v3(self, **kw: Any) -> WhatsminerV3Driver:
        kw.setdefault("password", PASSWORD)
        kw.setdefault("clock", self.clock.now)
        return WhatsminerV3Driver(self.rig_id, self.server.host, self.server.port_v3, **kw)

    def codes(self, command: str) -> list[int | None]:
        return [r.code for r in self.server.received if r.command == command]


async def make_env(api: str = "v2", model: str = MODEL, **kw: Any) -> Env:
    clock = ManualClock()
    farm = build_whatsminer_farm(clock, rigs=1, models={model: 1.0})
    server = WhatsminerServer(
        farm,
        "wm-001",
        host=fresh_host(),
        api=api,  # type: ignore[arg-type]
        admin_password=PASSWORD,
        super_password=PASSWORD,
        **kw,
    )
    await server.start()
    return Env(clock, farm, server)


@pytest.fixture
async def v2env() -> AsyncIterator[Env]:
    e = await make_env("v2")
    yield e
    await e.server.stop()


@pytest.fixture
async def v3env() -> AsyncIterator[Env]:
    e = await make_env("v3")
    yield e
    await e.server.stop()


async def raw_v2(host: str, port: int, payload: bytes) -> Any:
    """Send one request, read to EOF, parse the JSON before the NUL."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(2.0):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert data.endswith(b"\x00") and data.count(b"\x00") == 1
    return json.loads(data[:-1])


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack("<I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    async with asyncio.timeout(2.0):
        (n,) = struct.unpack("<I", await reader.readexactly(4))
        return json.loads(await reader.readexactly(n))


# -- crypto -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "salt", "expected"),
    [
        ("admin", "BQ5hoXV9", "$1$BQ5hoXV9$RxmaDUO33TS7O26yeMHZ81"),  # the reference's example
        ("password", "xxxxxxxx", "$1$xxxxxxxx$UYCIxa628.9qXjpQCjM4a."),  # OpenSSL's manual
        ("", "ab", "$1$ab$rn6aQS/o7141mj179E/zA."),
        ("p@ss_w0rd", "$1$D6w5gVOb$", "$1$D6w5gVOb$K6eaSAlOkiEQqHNgQZscU."),
        (
            "0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            "saltsaltEXTRA",  # only 8 salt characters count, as in glibc
            "$1$saltsalt$8oYKN7YkEmmNKVNR2RfQa/",
        ),
        ("RxmaDUO33TS7O26yeMHZ811234", "zU4gvW30", "$1$zU4gvW30$yWObfHoyBpen5ZWFKurx6/"),
    ],
)
def test_md5_crypt_matches_openssl(password: str, salt: str, expected: str) -> None:
    assert md5_crypt(password, salt) == expected


def test_v2_token_and_aes_reference_vector() -> None:
    tok = V2Token.derive("admin", "BQ5hoXV9", "lmnbzYlp", "1234")
    assert tok.key == "RxmaDUO33TS7O26yeMHZ81"
    assert tok.sign == "y7.6wmq.mpd9VTd0li9vK."
    assert tok.aes_key.hex().startswith("199e0a20") and tok.aes_key.hex().endswith("d5a2fbf6")
    # pyasic pads with NULs and sends json.dumps' default spacing; both must round-trip.
    for plain in (b'{"cmd": "power_off", "respbefore": "true"}', b"x" * 16, b"{}"):
        enc = aes_ecb_encrypt_b64(tok.aes_key, plain)
        assert "\n" not in enc and len(enc) % 4 == 0
        assert aes_ecb_decrypt_b64(tok.aes_key, enc) == plain
    for bad in ("", "not base64!!", "YWJj"):  # empty, junk, 3 bytes (not a block)
        with pytest.raises(ValueError):
            aes_ecb_decrypt_b64(tok.aes_key, bad)


def test_v3_token_reference_vector() -> None:
    assert v3_token("set.miner.service", "super", "uhCiDyVj", 1_700_000_000) == "fhp2TAJF"
    assert v3_token("set.miner.service", "super", "uhCiDyVj", 1_700_000_001) != "fhp2TAJF"


# -- real captures (v2) and documented replies (v3) ----------------------------------------


def test_v2_captures_parse_into_telemetry() -> None:
    tel = parse_v2_telemetry(
        42.0,
        summary=load(V2_CAPS, "summary"),
        devs=load(V2_CAPS, "devs"),
        status=load(V2_CAPS, "status"),
        version=load(V2_CAPS, "get_version"),
    )
    assert tel.ts == 42.0
    assert tel.state is RigState.MINING  # mineroff "false"
    assert tel.hashrate_ths == pytest.approx(124.5)  # "HS RT" 124500000.0 MH/s
    assert tel.power_w == 3200
    assert tel.power_limit_w == 3300  # the limit in force, not power_limit_set (3600)
    assert tel.nominal_hashrate_ths == pytest.approx(126.0)  # "Factory GHS" 126000
    assert tel.fans_rpm == (5400, 5280)
    assert tel.uptime_s == 25000
    assert [b.index for b in tel.hashboards] == [0, 1, 2]
    assert [b.hashrate_ths for b in tel.hashboards] == pytest.approx([41.5, 41.8, 41.7])
    assert [b.chips for b in tel.hashboards] == [135, 135, 135]
    assert [b.temp_c for b in tel.hashboards] == [65.0, 66.0, 67.0]
    assert tel.temp_c == 67.0 and tel.chip_temp_c == 81.0
    assert all(b.active for b in tel.hashboards)
    assert tel.identity == RigIdentity("Whatsminer", "", "btminer", "20230803.11.REL")
    assert tel.efficiency_j_per_th == pytest.approx(3200 / 124.5)
    assert driver_kind_for(tel.identity) == "whatsminer"


def test_v2_capture_quirks() -> None:
    """Strings for numbers, quoted versions, older `btmineroff`, limits that read 0."""
    summary = load(V2_CAPS, "summary")
    entry = summary["SUMMARY"][0]
    del entry["HS RT"]
    entry.update({"MHS av": "125000000.0", "Power": "3150", "Power Limit": 0, "Elapsed": "9"})
    entry["Firmware Version"] = "'20210322.22.REL'"
    status = load(V2_CAPS, "status")
    msg = status["Msg"]
    del msg["mineroff"]
    msg["btmineroff"] = "true"
    tel = parse_v2_telemetry(1.0, summary=summary, status=status)
    assert tel.hashrate_ths == pytest.approx(125.0)
    assert tel.power_w == 3150
    assert tel.power_limit_w == 3600  # "Power Limit" 0: falls back to power_limit_set
    assert tel.uptime_s == 9
    assert tel.state is RigState.SLEEPING
    assert tel.identity.firmware_version == "20240624.18.REL"  # status beats summary
    del msg["FirmwareVersion"]
    assert parse_v2_telemetry(1.0, summary=summary, status=status).identity.firmware_version == (
        "20210322.22.REL"
    )
    with pytest.raises(MalformedReply):
        parse_v2_telemetry(1.0, summary={"STATUS": [], "SUMMARY": []})


def test_v2_error_codes_and_statuses() -> None:
    assert parse_error_codes(load(V2_CAPS, "get_error_code")) == {}
    assert parse_error_codes(load(V2_CAPS, "get_error_code_with_errors")) == {
        218: "2024-06-15 10:30:00",
        110: "2024-06-15 09:15:00",
    }
    quirk = {"STATUS": "S", "Code": 131, "Msg": {"error_code": {"111": "2024-01-01 00:00:00"}}}
    assert parse_error_codes(quirk) == {111: "2024-01-01 00:00:00"}  # API 2.0.4: a dict
    for name in ("status", "get_version", "get_psu", "get_miner_info", "summary", "pools"):
        check_v2_status(load(V2_CAPS, name))
    with pytest.raises(WhatsminerRejected) as err:
        check_v2_status({"STATUS": "E", "When": 1, "Code": 132, "Msg": "command error"})
    assert err.value.code == 132
    with pytest.raises(DeviceAuthError, match="WhatsMinerTool"):
        check_v2_status({"STATUS": "E", "Code": 45, "Msg": "can't access write cmd"})
    for bad in ({}, {"STATUS": 7}, {"STATUS": "Q", "Code": 1}):
        with pytest.raises(MalformedReply):
            check_v2_status(bad)


def test_v3_documented_replies_parse() -> None:
    info = load(V3_DOCS, "get_device_info")
    tel = parse_v3_telemetry(
        7.0,
        summary=load(V3_DOCS, "get_miner_status_summary"),
        edevs=load(V3_DOCS, "get_miner_status_edevs"),
        device_info=info,
    )
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(171.259)
    assert tel.nominal_hashrate_ths == pytest.approx(181.051)
    assert tel.power_w == 3156.0 and tel.power_limit_w == 3600
    assert tel.uptime_s == 50000
    assert tel.fans_rpm == (5100, 5040)
    assert [b.hashrate_ths for b in tel.hashboards] == pytest.approx([56.9, 57.1, 56.8])
    assert [b.temp_c for b in tel.hashboards] == [61.0, 62.5, 63.0]
    assert [b.chips for b in tel.hashboards] == [160, 160, 160]
    assert tel.chip_temp_c == 79.5 and tel.temp_c == 63.0
    assert tel.identity == RigIdentity(
        "Whatsminer", "Whatsminer M60S_VK40", "btminer", "20251209.16.Rel2"
    )
    assert driver_kind_for(tel.identity) == "whatsminer-v3"
    info["msg"]["miner"]["working"] = "false"
    tel = parse_v3_telemetry(
        7.0, summary=load(V3_DOCS, "get_miner_status_summary"), device_info=info
    )
    assert tel.state is RigState.SLEEPING
    with pytest.raises(MalformedReply):
        parse_v3_telemetry(1.0, summary=load(V3_DOCS, "set_ok"))


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
_V2_KEYS = ["HS RT", "MHS av", "MHS 5s", "Power", "Power Limit", "Factory GHS", "Elapsed",
            "Fan Speed In", "Temperature", "Slot", "Effective Chips", "Chip Temp Max",
            "mineroff", "power_limit_set", "Model", "fw_ver"]  # fmt: skip
_V3_KEYS = ["hash-realtime", "power-realtime", "power-limit", "elapsed", "board-temperature",
            "slot", "effective-chips", "working", "type", "fwversion", "summary", "edevs",
            "miner", "system"]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(_V2_KEYS), _JSONISH),
    st.dictionaries(st.sampled_from(_V3_KEYS), _JSONISH),
)
def test_parsers_survive_odd_firmware(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Whatever types land in known fields, parsing gives telemetry or MalformedReply."""
    with contextlib.suppress(MalformedReply):
        parse_v2_telemetry(
            1.0,
            summary={"SUMMARY": [a]},
            devs={"DEVS": [a, b]},
            status={"STATUS": "S", "Msg": a},
            devdetails={"DEVDETAILS": [a]},
            version={"Msg": b},
        )
    with contextlib.suppress(MalformedReply):
        tel = parse_v3_telemetry(
            1.0,
            summary={"msg": {"summary": b}},
            edevs={"msg": {"edevs": [b, a]}},
            device_info={"msg": b},
        )
        assert tel.hashrate_ths is None or math.isfinite(tel.hashrate_ths)


# -- simulator faithfulness ----------------------------------------------------------------


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    return type(v).__name__  # int vs float matters: clients type-check these


@pytest.mark.parametrize(
    ("request_", "capture", "section"),
    [
        ({"command": "summary"}, "summary", "SUMMARY"),
        ({"command": "devs"}, "devs", "DEVS"),
        ({"command": "pools"}, "pools", "POOLS"),
        ({"command": "status"}, "status", None),
        ({"cmd": "get_version"}, "get_version", None),
        ({"command": "get_psu"}, "get_psu", None),
        ({"command": "get_miner_info", "info": "ip,hostname,mac,ledstat"}, "get_miner_info", None),
        ({"command": "get_error_code"}, "get_error_code", None),
    ],
)
async def test_sim_v2_has_every_captured_field_with_its_type(
    v2env: Env, request_: dict[str, str], capture: str, section: str | None
) -> None:
    s = v2env.server
    reply = await raw_v2(s.host, s.port_v2, json.dumps(request_).encode())
    real = load(V2_CAPS, capture)
    if section is None:  # flat btminer reply
        assert set(real) <= set(reply)
        assert reply["STATUS"] == real["STATUS"] and reply["Code"] == real["Code"]
        assert reply["Description"] == real["Description"]
        sim_item, real_item = reply["Msg"], real["Msg"]
    else:
        assert [reply["STATUS"][0][k] for k in ("STATUS", "Code", "Msg", "Description")] == [
            real["STATUS"][0][k] for k in ("STATUS", "Code", "Msg", "Description")
        ]
        assert reply["id"] == 1
        sim_item, real_item = reply[section][0], real[section][0]
        assert len(reply[section]) == len(real[section])
    missing = sorted(set(real_item) - set(sim_item))
    assert not missing, f"simulator lacks {missing}"
    wrong = {k: (_kind(real_item[k]), _kind(sim_item[k])) for k in real_item}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong, f"types differ (real, sim): {wrong}"


async def test_sim_v2_joins_text_mode_and_errors(v2env: Env) -> None:
    s = v2env.server
    joined = await raw_v2(s.host, s.port_v2, b'{"command":"summary+devs+status+devdetails"}')
    assert set(joined) == {"summary", "devs", "status", "devdetails", "id"}
    assert joined["summary"][0]["STATUS"][0]["Code"] == 11
    assert joined["status"][0]["STATUS"][0]["Code"] == 14  # btminer will not join natives
    assert joined["devdetails"][0]["DEVDETAILS"][0]["Driver"] == "bitmicro"
    assert (await raw_v2(s.host, s.port_v2, b"summary"))["STATUS"][0]["Code"] == 11
    assert (await raw_v2(s.host, s.port_v2, b"{oops"))["Code"] == 23
    assert (await raw_v2(s.host, s.port_v2, b'{"cmd":"power_off"}'))["Code"] == 45  # plaintext
    assert (await raw_v2(s.host, s.port_v2, b'{"cmd":"nonsense"}'))["STATUS"][0]["Code"] == 14
    enc = await raw_v2(s.host, s.port_v2, b'{"enc":1,"data":"%%%"}')
    assert enc["Code"] == 137
    assert mode(s) is RigMode.MINING


async def test_sim_v2_hands_out_at_most_32_tokens_per_address(v2env: Env) -> None:
    s = v2env.server
    for _ in range(32):
        reply = await raw_v2(s.host, s.port_v2, b'{"command":"get_token"}')
        assert reply["Code"] == 134 and set(reply["Msg"]) == {"time", "salt", "newsalt"}
        assert reply["Msg"]["salt"] == s.v2_salt and reply["Msg"]["time"] == str(
            int(v2env.clock.now())
        )
    assert (await raw_v2(s.host, s.port_v2, b'{"command":"get_token"}'))["Code"] == 136
    drv = v2env.v2(retries=0)
    with pytest.raises(CommandRejected) as err:
        await drv.sleep()
    assert err.value.code == 136  # type: ignore[attr-defined]
    assert mode(s) is RigMode.MINING
    v2env.clock.advance(31 * 60)  # tokens expire: the address may ask again
    await drv.sleep()
    assert mode(s) is RigMode.SLEEPING


async def test_sim_v3_framing_and_errors(v3env: Env) -> None:
    s = v3env.server
    reader, writer = await asyncio.open_connection(s.host, s.port_v3)
    try:
        writer.write(b"\x00\x00\x00\x00")  # heartbeat, then two requests on one connection
        writer.write(frame({"cmd": "get.device.info", "param": "salt"}))
        await writer.drain()
        reply = await read_frame(reader)
        assert reply == {"code": 0, "when": int(v3env.clock.now()), "msg": {"salt": s.v3_salt},
                         "desc": "get.device.info"}  # fmt: skip
        writer.write(frame({"cmd": "get.miner.status", "param": "summary,edevs"}))
        await writer.drain()
        msg = (await read_frame(reader))["msg"]
        assert set(msg) == {"summary", "edevs"} and len(msg["edevs"]) == 3
        for request, code in (
            (b"{nope", -3),
            ({"param": 1}, -2),
            ({"cmd": "get.nothing"}, -2),
            ({"cmd": "set.miner.service", "param": "stop"}, -4),  # no token
            (
                {
                    "cmd": "set.miner.service",
                    "param": "stop",
                    "account": "super",
                    "ts": 1,
                    "token": "AAAAAAAA",
                },
                -4,
            ),
        ):
            writer.write(frame(request))
            await writer.drain()
            assert (await read_frame(reader))["code"] == code
    finally:
        writer.close()
    assert mode(s) is RigMode.MINING


# -- reads through the drivers --------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(WHATSMINER_MODELS))
@pytest.mark.parametrize("api", ["v2", "v3"])
async def test_read_normalises_against_the_model(model: str, api: str) -> None:
    e = await make_env(api, model)
    try:
        rig, m = e.server.rig, e.server.rig.model
        e.clock.advance(77.0)
        drv: MinerDriver = e.v2() if api == "v2" else e.v3()
        assert isinstance(drv, MinerDriver)
        tel = await drv.read(e.clock.now())
        t = e.clock.now()
        assert tel.ts == t and tel.state is RigState.MINING
        assert tel.hashrate_ths == pytest.approx(rig.hashrate_ths(t), abs=1e-3)
        assert tel.power_w == pytest.approx(rig.power_w(t), abs=0.51)
        assert tel.power_limit_w == pytest.approx(m.max_w, abs=0.51)  # rated: no limit set
        assert tel.nominal_hashrate_ths == pytest.approx(m.nominal_ths, abs=1e-3)
        assert len(tel.hashboards) == m.boards
        for board, ths in zip(tel.hashboards, rig.board_hashrates_ths(t), strict=True):
            assert board.hashrate_ths == pytest.approx(ths, rel=0.02)  # averaged over 5 s
            assert board.chips == m.chips_per_board and board.active
        assert tel.temp_c == pytest.approx(max(rig.board_temps_c(t)), abs=0.051)
        assert tel.chip_temp_c == pytest.approx(max(rig.chip_temps_c(t)), abs=0.051)
        assert tel.fans_rpm == tuple(rig.fans_rpm(t))
        assert tel.identity == RigIdentity(
            "Whatsminer", m.name, "btminer", e.server.firmware_version
        )
        assert drv.capabilities == MinerCapabilities(
            can_sleep=True,
            can_power_target=True,
            power_target_min_w=round(m.max_w * DEFAULT_MIN_FRACTION),
            power_target_max_w=m.max_w,
            needs_pdu_to_power_off=True,
        )
        assert drv.capabilities.power_target_min_w >= m.min_w  # type: ignore[operator]
    finally:
        await e.server.stop()


async def test_v2_read_costs_two_requests_after_the_first(v2env: Env) -> None:
    drv = v2env.v2()
    await drv.read(v2env.clock.now())
    assert sorted(v2env.server.commands()) == ["get_version", "status", "summary+devs+devdetails"]
    before = v2env.server.requests
    await drv.read(v2env.clock.now())
    assert v2env.server.requests - before == 2
    assert v2env.server.commands()[-2:] in (["summary+devs", "status"], ["status", "summary+devs"])


async def test_capabilities_before_reading_and_configured_range(v2env: Env) -> None:
    drv = v2env.v2()
    assert drv.capabilities == MinerCapabilities(can_sleep=True, can_power_target=True)
    drv = v2env.v2(power_min_w=2000, power_max_w=3000)
    assert (drv.capabilities.power_target_min_w, drv.capabilities.power_target_max_w) == (
        2000,
        3000,
    )
    with pytest.raises(ValueError):
        await drv.set_power_target(3100)
    with pytest.raises(ValueError):
        v2env.v2(power_min_w=3000, power_max_w=2000)
    v2env.server.api_version = "2.0.4"  # before adjust_power_limit existed
    old = v2env.v2()
    await old.read(v2env.clock.now())
    assert old.capabilities.can_power_target is False
    assert old.capabilities.power_target_min_w is None
    with pytest.raises(UnsupportedOperation):
        await old.set_power_target(2500)
    assert "adjust_power_limit" not in v2env.server.commands()


# -- API v2 control -------------------------------------------------------------------------


async def test_v2_sleep_then_wake(v2env: Env) -> None:
    s, rig, clock = v2env.server, v2env.server.rig, v2env.clock
    drv = v2env.v2()
    await drv.sleep()
    assert mode(s) is RigMode.SLEEPING
    writes = [r for r in s.received if r.encrypted]
    assert [(r.command, r.code) for r in writes] == [("power_off", 131)]
    assert s.commands().count("get_token") == 1
    tel = await drv.read(clock.now())
    assert tel.state is RigState.SLEEPING  # at once, while power is still falling
    clock.advance(rig.model.sleep_s + 1)
    tel = await drv.read(clock.now())
    assert tel.power_w is not None and tel.power_w <= rig.model.idle_w + 1
    assert tel.hashrate_ths == 0 and not any(b.active for b in tel.hashboards)
    status = await drv.status()
    assert status["mineroff"] == "true" and status["mineroff_time"]

    await drv.wake()
    assert mode(s) is RigMode.MINING
    assert s.commands().count("get_token") == 1  # the cached token served both writes
    tel = await drv.read(clock.now())
    assert tel.state is RigState.WAKING  # hashboards booting
    clock.advance(rig.model.boot_s + 30)
    summary = await drv.client.cg.command("summary")
    assert summary["SUMMARY"][0]["Upfreq Complete"] == 0  # still ramping
    assert (await drv.read(clock.now())).state is RigState.MINING
    clock.advance(rig.model.wake_ramp_s)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(rig.model.nominal_w, rel=0.01)
    assert (await drv.client.cg.command("summary"))["SUMMARY"][0]["Upfreq Complete"] == 1


async def test_v2_power_target(v2env: Env) -> None:
    s, rig, clock = v2env.server, v2env.server.rig, v2env.clock
    drv = v2env.v2()
    await drv.read(clock.now())
    clock.advance(500)
    elapsed = (await drv.client.cg.command("summary"))["SUMMARY"][0]["Elapsed"]
    await drv.set_power_target(2500)
    assert rig.power_target_w == 2500 and s.limit_set_w == 2500
    assert (await drv.status())["power_limit_set"] == "2500"
    summary = await drv.client.cg.command("summary")
    assert summary["SUMMARY"][0]["Elapsed"] < elapsed  # btminer restarted to apply it
    clock.advance(rig.model.target_change_s + 5)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(2500, rel=0.01) and tel.power_limit_w == 2500

    adjusts = s.commands().count("adjust_power_limit")
    await drv.set_power_target(2500.2)  # already in force: no second restart
    assert s.commands().count("adjust_power_limit") == adjusts

    await drv.set_power_target(None)  # back to the rated maximum
    assert s.limit_set_w == round(rig.model.max_w) and rig.power_target_w is None
    seen, commands = len(s.received), rig.command_count
    for bad in (1000.0, 5000.0, math.nan, -5.0, math.inf):
        with pytest.raises(ValueError):
            await drv.set_power_target(bad)
    assert rig.command_count == commands
    assert s.commands()[seen:] == ["status", "status"]  # range checks read; nothing written


async def test_v2_power_percent(v2env: Env) -> None:
    s, rig, clock = v2env.server, v2env.server.rig, v2env.clock
    drv = v2env.v2()
    await drv.set_power_percent(80)
    assert s.power_pct == 80
    assert rig.power_target_w == pytest.approx(rig.model.nominal_w * 0.8)
    assert s.commands()[-1] == "set_power_pct_v2"
    clock.advance(rig.model.target_change_s + 1)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(rig.model.nominal_w * 0.8, rel=0.01)
    await drv.set_power_percent(None)
    assert s.power_pct == 0 and rig.power_target_w is None
    for bad in (0, 101, -1):
        with pytest.raises(ValueError):
            await drv.set_power_percent(bad)


async def test_v2_wrong_password_is_an_auth_error(v2env: Env) -> None:
    s = v2env.server
    drv = v2env.v2(password="wrong-one")
    with pytest.raises(DeviceAuthError, match="admin password is wrong") as err:
        await drv.sleep()
    assert err.value.device == "wm-001" and err.value.operation == "power_off"
    assert mode(s) is RigMode.MINING and s.rig.command_count == 0
    assert s.commands().count("get_token") == 2  # renewed once, then gave up
    assert [r.code for r in s.received if r.encrypted] == [135, 135]
    default = v2env.v2(password="")
    with pytest.raises(DeviceAuthError, match="default 'admin'"):
        await default.wake()


async def test_v2_write_api_disabled(v2env: Env) -> None:
    v2env.server.write_enabled = False
    with pytest.raises(DeviceAuthError, match="write API"):
        await v2env.v2().sleep()
    assert mode(v2env.server) is RigMode.MINING


async def test_v2_token_renewed_when_30_minutes_old(v2env: Env) -> None:
    s, clock = v2env.server, v2env.clock
    drv = v2env.v2()  # on the farm clock: knows when its token expires
    await drv.sleep()
    clock.advance(20 * 60)
    await drv.wake()
    assert s.commands().count("get_token") == 1
    clock.advance(11 * 60)
    await drv.sleep()
    assert s.commands().count("get_token") == 2
    assert 135 not in [r.code for r in s.received]  # renewed before the miner refused it


async def test_v2_token_refused_by_miner_is_renewed(v2env: Env) -> None:
    s, clock = v2env.server, v2env.clock
    drv = v2env.v2(clock=lambda: 0.0)  # its own clock says the token is still fresh
    await drv.sleep()
    clock.advance(31 * 60)  # ... but the miner expired it
    await drv.wake()
    assert mode(s) is RigMode.MINING
    assert [(r.command, r.code) for r in s.received if r.encrypted] == [
        ("power_off", 131),
        ("power_on", 135),
        ("power_on", 131),
    ]
    assert drv.client.token_fetches == 2


async def test_v2_write_applied_without_reply_is_verified(v2env: Env) -> None:
    s = v2env.server
    s.silent_writes = {"power_off", "power_on"}
    drv = v2env.v2(timeout=0.3, retries=0)
    start = time.monotonic()
    await drv.sleep()  # times out, then reads status: mineroff, so it worked
    assert mode(s) is RigMode.SLEEPING
    assert time.monotonic() - start < 2.0
    assert s.commands()[-1] == "status"
    await s.set_fault("silent")  # now nothing answers, not even the verification
    with pytest.raises(DeviceTimeout) as err:
        await drv.wake()
    assert err.value.operation == "power_on"


# -- API v3 control -------------------------------------------------------------------------


async def test_v3_sleep_wake_power_target_and_percent(v3env: Env) -> None:
    s, rig, clock = v3env.server, v3env.server.rig, v3env.clock
    drv = v3env.v3()
    await drv.read(clock.now())
    assert drv.capabilities.power_target_max_w == rig.model.max_w  # get.miner.setting power
    await drv.sleep()
    assert mode(s) is RigMode.SLEEPING
    assert (await drv.read(clock.now())).state is RigState.SLEEPING
    clock.advance(rig.model.sleep_s + 1)
    await drv.wake()
    assert mode(s) is RigMode.MINING
    assert (await drv.read(clock.now())).state is RigState.WAKING
    sets = [(r.command, r.code) for r in s.received if r.command.startswith("set.")]
    assert sets == [("set.miner.service", 0), ("set.miner.service", 0)]
    assert drv.client.salt_fetches == 1

    clock.advance(400)
    await drv.set_power_target(2400)
    assert s.limit_set_w == 2400 and rig.power_target_w == 2400
    n = s.commands().count("set.miner.power_limit")
    await drv.set_power_target(2400)
    assert s.commands().count("set.miner.power_limit") == n  # unchanged: not resent
    clock.advance(rig.model.target_change_s + 200)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(2400, rel=0.01) and tel.power_limit_w == 2400
    await drv.set_power_percent(90)
    assert s.power_pct == 90 and rig.power_target_w == pytest.approx(2160)
    await drv.set_power_percent(None)
    await drv.set_power_target(None)
    assert s.power_pct == 0 and s.limit_set_w == s.rated_w and rig.power_target_w is None
    with pytest.raises(ValueError):
        await drv.set_power_target(100)


async def test_v3_wrong_password_is_an_auth_error(v3env: Env) -> None:
    s = v3env.server
    drv = v3env.v3(password="nope")
    with pytest.raises(DeviceAuthError, match="account 'super'") as err:
        await drv.sleep()
    assert err.value.operation == "set.miner.service"
    assert v3env.codes("set.miner.service") == [-4, -4]
    assert drv.client.salt_fetches == 2 and mode(s) is RigMode.MINING
    s.write_enabled = False
    with pytest.raises(DeviceAuthError, match="no permission"):
        await v3env.v3().sleep()


async def test_v3_salt_rotation_and_miner_clock_skew(v3env: Env) -> None:
    s = v3env.server
    # Driver on the wall clock, miner on a farm clock a year away: the driver signs with
    # the miner's time (learned from `when`), so the miner accepts the timestamp.
    drv = v3env.v3(clock=time.monotonic)
    await drv.read(v3env.clock.now())
    await drv.sleep()
    assert v3env.codes("set.miner.service") == [0]
    v3env.clock.advance(3600)  # an hour of miner time passes without a reply to learn from
    await drv.wake()  # stale ts: refused, time relearned with the salt, accepted
    assert v3env.codes("set.miner.service") == [0, -4, 0]
    s.v3_salt = "rotated1"  # e.g. after a password change
    await drv.sleep()
    assert v3env.codes("set.miner.service") == [0, -4, 0, -4, 0]
    assert drv.client.salt_fetches == 3 and mode(s) is RigMode.SLEEPING


async def test_v3_write_applied_without_reply_is_verified(v3env: Env) -> None:
    v3env.server.silent_writes = {"set.miner.service"}
    drv = v3env.v3(timeout=0.3, retries=0)
    await drv.sleep()
    assert mode(v3env.server) is RigMode.SLEEPING
    await v3env.server.set_fault("silent")
    with pytest.raises(DeviceTimeout):
        await drv.wake()


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["v2", "v3"])
async def test_silent_refused_garbage_truncated(api: str) -> None:
    e = await make_env(api)
    s = e.server
    drv = (
        e.v2(timeout=0.3, retries=1, backoff_s=0.01)
        if api == "v2"
        else e.v3(timeout=0.3, retries=1, backoff_s=0.01)
    )
    try:
        await s.set_fault("silent")
        start = time.monotonic()
        with pytest.raises(DeviceTimeout) as err:
            await drv.read(e.clock.now())
        assert time.monotonic() - start < 1.5
        assert err.value.device == "wm-001"
        for fault in ("garbage", "truncated"):
            await s.set_fault(fault)
            before = s.requests
            with pytest.raises(MalformedReply):
                await drv.read(e.clock.now())
            assert s.requests - before <= 4  # malformed is never retried
        await s.set_fault("refuse")
        with pytest.raises(DeviceUnreachable):
            await drv.read(e.clock.now())
        with pytest.raises(DeviceUnreachable):
            await drv.sleep()
        await s.set_fault(None)
        assert (await drv.read(e.clock.now())).state is RigState.MINING
        s.reply_delay_s = 0.5  # a slow control board: longer than the client waits
        with pytest.raises(DeviceTimeout):
            await drv.read(e.clock.now())
        assert mode(s) is RigMode.MINING
    finally:
        await s.stop()


async def test_v2_reply_without_nul_and_idle_connection_closed() -> None:
    e = await make_env("v2", read_timeout=0.2)
    s = e.server
    try:
        s.nul_terminated = False  # whether btminer appends the NUL is unverified: both work
        tel = await e.v2().read(e.clock.now())
        assert tel.state is RigState.MINING and len(tel.hashboards) == 3
        reader, writer = await asyncio.open_connection(s.host, s.port_v2)
        start = time.monotonic()
        async with asyncio.timeout(2):
            assert await reader.read() == b""  # said nothing: closed after read_timeout
        assert time.monotonic() - start >= 0.15
        writer.close()
    finally:
        await s.stop()


async def test_outlet_off_then_reboot_forgets_tokens() -> None:
    clock = ManualClock()
    farm = build_whatsminer_farm(clock, rigs=1, models={MODEL: 1.0})
    s = WhatsminerServer(farm, "wm-001", host=fresh_host(), admin_password=PASSWORD)
    await s.start()
    try:
        drv = WhatsminerDriver(
            "wm-001", s.host, s.port_v2, password=PASSWORD, timeout=0.5, retries=0
        )
        await drv.sleep()
        pdu = farm.pdus["pdu-01"]
        pdu.switch(1, "off", clock.now())
        with pytest.raises(DeviceUnreachable):
            await drv.read(clock.now())
        pdu.switch(1, "on", clock.now())
        clock.advance(20)
        tel = await drv.read(clock.now())
        assert tel.state is RigState.WAKING  # a power cycle mines again: sleep is not kept
        await drv.sleep()  # cached token died with the reboot: 135, renewed, accepted
        assert [r.code for r in s.received if r.encrypted] == [131, 135, 131]
        assert mode(s) is RigMode.SLEEPING
    finally:
        await s.stop()


# -- discovery, construction, fleet ----------------------------------------------------------


async def test_identify_on_the_real_ports() -> None:
    clock = ManualClock()
    farm = build_whatsminer_farm(clock, rigs=2, models={MODEL: 1.0})
    v2 = WhatsminerServer(farm, "wm-001", host=fresh_host(), port_v2=4028)
    v3 = WhatsminerServer(farm, "wm-002", host=fresh_host(), api="v3", port_v3=4433)
    lux_farm = Farm.build(clock, rigs=1, pdus=1)
    lux = MinerServer(lux_farm, "rig-001", host=fresh_host(), port=4028)
    for server in (v2, v3, lux):
        await server.start()
    try:
        found = await identify(v2.host, timeout=0.5)
        assert found == RigIdentity("Whatsminer", MODEL, "btminer", "20230803.11.REL")
        assert found is not None and driver_kind_for(found) == "whatsminer"
        found = await identify(v3.host, timeout=0.5)
        assert found == RigIdentity("Whatsminer", MODEL, "btminer", "20251209.16.Rel2")
        assert found is not None and driver_kind_for(found) == "whatsminer-v3"
        start = time.monotonic()
        assert await identify(lux.host, timeout=0.5) is None  # LuxOS: not bitmicro
        assert await identify(fresh_host(), timeout=0.5) is None  # nothing listens
        assert time.monotonic() - start < 1.0
        drv = make_whatsminer_driver("whatsminer-v3", "wm-002", v3.host, password="super")
        assert isinstance(drv, WhatsminerV3Driver) and drv.client.port == 4433
        assert (await drv.read(clock.now())).identity.model == MODEL
    finally:
        for server in (v2, v3, lux):
            await server.stop()


def test_make_whatsminer_driver() -> None:
    v2 = make_whatsminer_driver("Whatsminer", "r", "127.0.0.1", password="x", timeout=1.5)
    assert isinstance(v2, WhatsminerDriver) and isinstance(v2, MinerDriver)
    assert v2.client.port == 4028 and v2.client.timeout == 1.5 and v2.client.password == "x"
    v3 = make_whatsminer_driver("whatsminer-v3", "r", "127.0.0.1", 9999, username="super2")
    assert isinstance(v3, WhatsminerV3Driver) and v3.client.port == 9999
    assert v3.client.account == "super2" and v3.client.password == "super"
    with pytest.raises(ValueError, match="whatsminer-v3"):
        make_whatsminer_driver("whatsminer-v4", "r", "127.0.0.1")
    with pytest.raises(ValueError):
        BTMinerV2Client("127.0.0.1", timeout=0)


async def test_fleet_on_a_subnet_serves_both_apis() -> None:
    clock = ManualClock()
    farm = build_whatsminer_farm(clock, rigs=3, pdus=1)
    subnet = f"127.{_BLOCK[0]}.{(_BLOCK[1] + 1) % 254 + 1}.0/29"
    fleet = WhatsminerFleet(farm, subnet=subnet, api="both", super_password=PASSWORD)
    await fleet.start()
    try:
        host, p2, p3 = fleet.ports_of("wm-002")
        assert (p2, p3) == (4028, 4433) and host.endswith(".2")
        rig = farm.rigs["wm-002"]
        v2 = WhatsminerDriver("wm-002", host, p2, clock=clock.now)
        v3 = WhatsminerV3Driver("wm-002", host, p3, password=PASSWORD, clock=clock.now)
        assert (await v2.read(clock.now())).hashrate_ths == pytest.approx(
            (await v3.read(clock.now())).hashrate_ths, abs=1e-3
        )
        await v3.sleep()  # one firmware behind both ports
        assert (await v2.read(clock.now())).state is RigState.SLEEPING
        assert rig.mode is RigMode.SLEEPING
        with socket.socket() as probe:
            probe.settimeout(1)
            probe.connect(fleet.ports_of("wm-003")[:2])
    finally:
        await fleet.stop()


# -- the server never falls over ------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_server() -> WhatsminerServer:
    farm = build_whatsminer_farm(ManualClock(), rigs=1)
    return WhatsminerServer(farm, "wm-001", api="both")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda c, p: json.dumps({"cmd": c, "param": p, "info": p}).encode(),
            st.sampled_from(["summary", "status", "get_token", "power_off", "get.device.info",
                             "get.miner.status", "set.miner.power_limit", "get_miner_info",
                             "summary+status+devs"]) | st.text(max_size=12),
            _JSONISH,
        ),
        st.builds(lambda d: json.dumps({"enc": 1, "data": d}).encode(), _JSONISH),
    )
)  # fmt: skip
def test_server_answers_anything(bare_server: WhatsminerServer, data: bytes) -> None:
    v2 = bare_server.respond_v2(data)
    assert v2 is not None and v2.endswith(b"\x00")
    assert isinstance(json.loads(v2[:-1]), dict)
    v3 = bare_server.respond_v3(data)
    assert v3 is not None and isinstance(v3["code"], int)
    json.dumps(v3)
    assert bare_server.rig.mode is RigMode.MINING  # nothing unauthenticated changed the rig
