"""The miner simulator and the CGMiner/LuxOS drivers, against each other over real sockets.

Fixtures: `fixtures/antminer-stock-2020/` are real replies of an S19 Pro on stock firmware
(asic-rs test captures); `fixtures/luxos/` are LuxOS replies written from Luxor's API
documentation (field names, codes and example values as documented), not captures.
Everything here connects to 127.x addresses only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import MinerCapabilities, MinerDriver
from drivers.cgminer import (
    CGMinerClient,
    CGMinerDriver,
    CGMinerRejected,
    check_status,
    decode_reply,
    parse_telemetry,
)
from drivers.errors import (
    CommandRejected,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
)
from drivers.luxos import LuxOSDriver, choose_profile, parse_profiles
from drivers.registry import MinerAccess, make_miner_driver
from drivers.telemetry import RigState
from simulators.cgminer import LUXOS_READS, MinerServer
from simulators.clock import ManualClock
from simulators.farm import MODELS, Farm, RigMode

FIXTURES = Path(__file__).parent.parent / "fixtures"


def load(folder: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / folder / f"{name}.json").read_text())
    return data


def mode(server: MinerServer) -> RigMode:
    """The rig's firmware mode, read fresh (a helper so type narrowing does not stick)."""
    return server.rig.mode


@dataclass
class Env:
    clock: ManualClock
    farm: Farm
    lux: MinerServer  # rig-001, LuxOS
    stock: MinerServer  # rig-002, stock bmminer

    def driver(self, kind: str, server: MinerServer, **kw: Any) -> MinerDriver:
        return make_miner_driver(kind, server.rig_id, MinerAccess(server.host, server.port, **kw))

    def client(self, server: MinerServer, **kw: Any) -> CGMinerClient:
        return CGMinerClient(server.host, server.port, device=server.rig_id, **kw)


async def _env(model: str = "Antminer S19 Pro") -> Env:
    clock = ManualClock()
    farm = Farm.build(clock, rigs=2, pdus=1, models={model: 1.0})
    farm.rigs["rig-002"].firmware = "bmminer"
    env = Env(clock, farm, MinerServer(farm, "rig-001"), MinerServer(farm, "rig-002"))
    await env.lux.start()
    await env.stock.start()
    return env


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await _env()
    yield e
    await e.lux.stop()
    await e.stock.stop()


async def raw_exchange(host: str, port: int, payload: bytes) -> bytes:
    """Send bytes, half-close, read to EOF: what any client would see from the server."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(2.0):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- real captures and documented replies ------------------------------------------------


def test_stock_capture_parses_into_telemetry() -> None:
    cap = "antminer-stock-2020"
    tel = parse_telemetry(
        123.0,
        summary=load(cap, "summary"),
        stats=load(cap, "stats"),
        version=load(cap, "version"),
    )
    assert tel.ts == 123.0
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(110.56689)
    assert round(tel.hashrate_ths or 0, 2) == 110.57
    assert tel.power_w is None  # stock S19 reports no power: never guessed
    assert tel.power_limit_w is None
    assert tel.nominal_hashrate_ths == pytest.approx(110.0)
    assert tel.uptime_s == 50474
    assert tel.fans_rpm == (6000, 5880, 5040, 5040)
    assert [b.index for b in tel.hashboards] == [0, 1, 2]  # slot 4 is empty, not a dead board
    assert [b.hashrate_ths for b in tel.hashboards] == pytest.approx([37.6033, 35.53622, 37.42738])
    assert [b.chips for b in tel.hashboards] == [114, 114, 114]
    assert [b.temp_c for b in tel.hashboards] == [73, 66, 64]
    assert [b.chip_temp_c for b in tel.hashboards] == [78, 71, 69]
    assert all(b.active for b in tel.hashboards)
    assert tel.temp_c == 73 and tel.chip_temp_c == 78
    assert tel.identity.make == "Antminer"
    assert tel.identity.model == "Antminer S19 Pro"
    assert tel.identity.firmware == "bmminer"
    assert tel.identity.firmware_version == "49.0.1.3"
    assert tel.efficiency_j_per_th is None


def test_stock_capture_quirks_strings_and_missing_version() -> None:
    """S17-era firmware sends numbers as strings; identity then comes from STATS[0]."""
    cap = "antminer-stock-2020"
    summary = load(cap, "summary")
    summary["SUMMARY"][0]["GHS 5s"] = "31947.78"
    summary["SUMMARY"][0]["Elapsed"] = "600"
    stats = load(cap, "stats")
    stats["STATS"][0]["Type"] = "Antminer S17 Pro (A.P. 2.0.3)"
    stats["STATS"][1]["fan1"] = "6000"
    stats["STATS"][1]["chain_acn1"] = "114"
    tel = parse_telemetry(1.0, summary=summary, stats=stats)
    assert tel.hashrate_ths == pytest.approx(31.94778)
    assert tel.uptime_s == 600
    assert tel.fans_rpm[0] == 6000
    assert tel.hashboards[0].chips == 114
    assert tel.identity.model == "Antminer S17 Pro"
    assert tel.identity.firmware == "bmminer"


def test_luxos_documented_replies_parse() -> None:
    lux = "luxos"
    profiles = parse_profiles(load(lux, "profiles"))
    assert [p.name for p in profiles] == ["290MHz", "445MHz", "default"]
    tel = parse_telemetry(
        5.0,
        summary=load("antminer-stock-2020", "summary"),
        power=load(lux, "power"),
        config=load(lux, "config"),
        version=load(lux, "version"),
        atm=load(lux, "atm"),
        profile_watts={p.name: p.watts for p in profiles},
    )
    assert tel.power_w == 1051
    assert tel.power_limit_w == 1188  # ATM off: the active profile's watts
    assert tel.nominal_hashrate_ths == pytest.approx(121.8)
    assert tel.identity.firmware == "LuxOS"
    assert tel.identity.firmware_version == "2025.4.8.220305-57b389c7"
    assert tel.identity.model == "Antminer S19k Pro"
    atm = load(lux, "atm")
    atm["ATM"][0]["Enabled"] = True
    config = load(lux, "config")
    config["CONFIG"][0]["CurtailMode"] = "Sleep"
    tel = parse_telemetry(
        5.0, summary=load("antminer-stock-2020", "summary"), config=config, atm=atm
    )
    assert tel.power_limit_w == 3320  # ATM on: its PowerTarget is what is in force
    assert tel.state is RigState.SLEEPING
    with pytest.raises(CGMinerRejected) as err:
        check_status(load(lux, "logon_conflict"), operation="logon")
    assert err.value.code == 402


def test_choose_profile_never_exceeds_request() -> None:
    profiles = parse_profiles(load("luxos", "profiles"))
    assert choose_profile(profiles, 2500).name == "445MHz"
    assert choose_profile(profiles, 2122).name == "445MHz"
    assert choose_profile(profiles, 99_999).name == "default"
    assert choose_profile(profiles, None).name == "default"
    with pytest.raises(ValueError):
        choose_profile(profiles, 1000)


def test_decode_reply_quirks() -> None:
    joined = b'{"stats":[{"STATUS":[{"STATUS":"S","Code":70}],"STATS":[{"a":1}{"b":2}],"id":1}]}'
    assert decode_reply(joined + b"\x00")["stats"][0]["STATS"] == [{"a": 1}, {"b": 2}]
    assert decode_reply(b'{"STATUS":"BYE","id":1}\x00\x00') == {"STATUS": "BYE", "id": 1}
    for bad in (b"", b"\x00", b"\xff\xfe{", b"[1,2]", b'{"STATUS":[', b"<html>"):
        with pytest.raises(MalformedReply):
            decode_reply(bad, device="d", operation="op")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_reply_only_raises_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedReply):
        assert isinstance(decode_reply(data), dict)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
_KEYS = [
    "GHS 5s", "MHS 5s", "Elapsed", "chain_rate1", "chain_acn1", "temp_pcb1", "temp_chip1",
    "temp1", "fan_num", "fan1", "rate_unit", "total_rateideal", "chain_power", "Type",
    "LUXminer", "BMMiner", "Watts", "Profile", "CurtailMode", "NameplateTHS", "Enabled",
    "PowerTarget",
]  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(_KEYS), _JSONISH),
    st.dictionaries(st.sampled_from(_KEYS), _JSONISH),
    st.sampled_from(["SUMMARY", "STATS", "POWER", "CONFIG", "ATM", "VERSION"]),
)
def test_parse_telemetry_survives_odd_firmware(
    a: dict[str, Any], b: dict[str, Any], sec: str
) -> None:
    """Whatever types firmware puts in known fields, parsing yields telemetry or MalformedReply."""
    replies = {"summary": {"SUMMARY": [a]}, "stats": {"STATS": [b, a]}}
    replies[sec.lower()] = {sec: [a, b]}
    try:
        tel = parse_telemetry(
            1.0,
            summary=replies["summary"],
            stats=replies["stats"],
            power=replies.get("power"),
            config=replies.get("config"),
            atm=replies.get("atm"),
            version=replies.get("version"),
        )
    except MalformedReply:
        return
    assert tel.hashrate_ths is None or math.isfinite(tel.hashrate_ths)


# -- simulator faithfulness --------------------------------------------------------------


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


@pytest.mark.parametrize(
    ("command", "section", "index"),
    [
        ("summary", "SUMMARY", 0),
        ("stats", "STATS", 0),
        ("stats", "STATS", 1),
        ("version", "VERSION", 0),
        ("devs", "DEVS", 0),
        ("pools", "POOLS", 0),
    ],
)
async def test_stock_sim_has_every_captured_field_with_its_type(
    env: Env, command: str, section: str, index: int
) -> None:
    reply = await env.client(env.stock).command(command)
    real = load("antminer-stock-2020", command)
    assert reply["STATUS"][0]["Description"] == real["STATUS"][0]["Description"]
    assert reply["STATUS"][0]["Code"] == real["STATUS"][0]["Code"]
    assert reply["STATUS"][0]["Msg"] == real["STATUS"][0]["Msg"]
    sim_item, real_item = reply[section][index], real[section][index]
    missing = sorted(set(real_item) - set(sim_item))
    assert not missing, f"simulator lacks {missing}"
    wrong = {k: (_kind(real_item[k]), _kind(sim_item[k])) for k in real_item}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong, f"types differ (real, sim): {wrong}"


# -- reads through the drivers -----------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kind", ["luxos", "cgminer"])
async def test_read_normalises_against_the_model(model: str, kind: str) -> None:
    e = await _env(model)
    try:
        server = e.lux if kind == "luxos" else e.stock
        rig = server.rig
        e.clock.advance(123.0)
        drv = e.driver(kind, server)
        tel = await drv.read(e.clock.now())
        t = e.clock.now()
        m = rig.model
        assert tel.ts == t
        assert tel.state is RigState.MINING
        assert tel.hashrate_ths == pytest.approx(rig.hashrate_ths(t), abs=1e-4)
        assert len(tel.hashboards) == m.boards
        for board, ths in zip(tel.hashboards, rig.board_hashrates_ths(t), strict=True):
            assert board.hashrate_ths == pytest.approx(ths, abs=1e-4)
            assert board.chips == m.chips_per_board
        assert tel.temp_c == pytest.approx(max(rig.board_temps_c(t)), abs=0.51)
        assert tel.chip_temp_c == pytest.approx(max(rig.chip_temps_c(t)), abs=0.51)
        assert tel.fans_rpm == tuple(rig.fans_rpm(t))
        assert tel.uptime_s == rig.uptime_s(t)
        assert tel.nominal_hashrate_ths == pytest.approx(m.nominal_ths)
        assert tel.identity.make == "Antminer"
        assert tel.identity.model == m.name
        if kind == "luxos":
            assert isinstance(drv, LuxOSDriver)
            assert tel.power_w == pytest.approx(rig.power_w(t), abs=0.51)
            assert tel.power_limit_w == pytest.approx(m.nominal_w)
            assert tel.identity.firmware == "LuxOS"
            assert drv.capabilities.power_target_max_w == pytest.approx(m.nominal_w)
            assert drv.capabilities.power_target_min_w == pytest.approx(m.min_w)
        else:
            assert isinstance(drv, CGMinerDriver)
            assert tel.power_w is None
            assert tel.power_limit_w is None
            assert tel.identity.firmware == "bmminer"
            assert drv.capabilities == MinerCapabilities(can_sleep=False, can_power_target=False)
    finally:
        await e.lux.stop()
        await e.stock.stop()


async def test_luxos_read_is_one_request_per_poll(env: Env) -> None:
    drv = env.driver("luxos", env.lux)
    await drv.read(env.clock.now())
    before = env.lux.requests
    for _ in range(3):
        await drv.read(env.clock.now())
    assert env.lux.requests - before == 3


async def test_multi_command_reply_shape(env: Env) -> None:
    raw = await raw_exchange(
        env.lux.host, env.lux.port, b'{"command":"summary+version+summary+bogus+curtail"}'
    )
    assert raw.endswith(b"\x00") and raw.count(b"\x00") == 1
    reply = json.loads(raw[:-1])
    assert set(reply) == {"summary", "version", "bogus", "curtail", "id"}
    assert reply["id"] == 1
    assert len(reply["summary"]) == 1 and reply["summary"][0]["STATUS"][0]["Code"] == 11
    assert reply["summary"][0]["id"] == 1
    assert reply["bogus"][0]["STATUS"][0]["Code"] == 14
    assert reply["curtail"][0]["STATUS"][0]["Code"] == 45  # writes cannot be joined
    client = env.client(env.lux)
    replies = await client.multi("summary", "stats", "power")
    assert set(replies) == {"summary", "stats", "power"}
    assert replies["power"]["POWER"][0]["PSU"] is False
    with pytest.raises(CommandRejected):
        await client.multi("summary", "bogus")


async def test_stock_joined_reply_without_commas_still_reads(env: Env) -> None:
    env.stock.joined_without_commas = True
    raw = await raw_exchange(env.stock.host, env.stock.port, b'{"command":"summary+stats"}')
    assert b"}{" in raw  # the quirk is really on the wire
    tel = await env.driver("cgminer", env.stock).read(env.clock.now())
    assert tel.hashrate_ths == pytest.approx(env.stock.rig.hashrate_ths(env.clock.now()), abs=1e-4)
    assert len(tel.hashboards) == 3


async def test_join_refused_falls_back_to_single_commands(env: Env) -> None:
    """Firmware that rejects `+` joins (Code 14) is read one command per connection."""
    connections = 0

    async def old_firmware(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        req = await r.read(4096)
        if b"+" in req:
            w.write(json.dumps({"STATUS": [{"STATUS": "E", "Code": 14}], "id": 1}).encode())
        else:
            w.write(env.stock.respond(req))
        await w.drain()
        w.close()

    server = await asyncio.start_server(old_firmware, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        drv = make_miner_driver("cgminer", "old", MinerAccess("127.0.0.1", port))
        tel = await drv.read(1.0)
        assert tel.identity.model == "Antminer S19 Pro"
        assert connections == 1 + 3  # the failed join, then summary, stats, version
        await drv.read(2.0)
        assert connections == 4 + 2  # remembered: no join attempt, version cached
    finally:
        server.close()
        await server.wait_closed()


async def test_text_mode_requests(env: Env) -> None:
    reply = json.loads((await raw_exchange(env.stock.host, env.stock.port, b"summary"))[:-1])
    assert reply["STATUS"][0]["Code"] == 11
    reply = json.loads((await raw_exchange(env.stock.host, env.stock.port, b"pga|0\n"))[:-1])
    assert reply["STATUS"][0]["Code"] == 45  # cgminer knows pga; stock api-groups deny it
    reply = json.loads((await raw_exchange(env.lux.host, env.lux.port, b"pga|0"))[:-1])
    assert reply["STATUS"][0]["Code"] == 14


# -- LuxOS control -----------------------------------------------------------------------


async def test_luxos_sleep_then_wake(env: Env) -> None:
    rig, clock = env.lux.rig, env.clock
    drv = env.driver("luxos", env.lux)
    assert drv.capabilities.can_sleep
    await drv.sleep()
    assert mode(env.lux) is RigMode.SLEEPING
    assert env.lux.session_id == ""  # logged off again, the miner is free for others
    tel = await drv.read(clock.now())
    assert tel.state is RigState.SLEEPING  # at once, although power is still falling
    clock.advance(rig.model.sleep_s + 1)
    tel = await drv.read(clock.now())
    assert tel.state is RigState.SLEEPING
    assert tel.power_w is not None and tel.power_w <= rig.model.idle_w + 1
    assert tel.hashrate_ths == 0
    assert not any(b.active for b in tel.hashboards)

    await drv.wake()
    assert mode(env.lux) is RigMode.MINING
    tel = await drv.read(clock.now())
    assert tel.state is RigState.WAKING  # told to mine, hashboards still booting
    clock.advance(rig.model.boot_s + 10)
    tel = await drv.read(clock.now())
    assert tel.state is RigState.MINING
    assert tel.power_w is not None and tel.power_w < rig.model.nominal_w * 0.5  # ramping
    clock.advance(rig.model.wake_ramp_s)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(rig.model.nominal_w, rel=0.01)


async def test_luxos_power_target_via_profiles(env: Env) -> None:
    rig, clock, server = env.lux.rig, env.clock, env.lux
    drv = env.driver("luxos", server)
    assert server.atm_enabled
    await drv.set_power_target(2500)
    expected = max((p for p in server.profiles if p.watts <= 2500), key=lambda p: p.watts)
    assert rig.power_target_w == expected.watts
    assert server.profile == expected.name
    assert server.atm_enabled  # restored after the profile change
    assert server.session_id == ""
    assert drv.capabilities.power_target_min_w == rig.model.min_w
    clock.advance(rig.model.target_change_s + 5)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(expected.watts, rel=0.01)
    assert tel.power_limit_w == expected.watts

    server.atm_enabled = False  # left alone when it was off
    await drv.set_power_target(None)
    assert rig.power_target_w is None and server.profile == "default"
    assert not server.atm_enabled

    requests, commands = server.requests, rig.command_count
    for bad in (1000.0, 5000.0, math.nan, -5.0, math.inf):
        with pytest.raises(ValueError):
            await drv.set_power_target(bad)
    assert (server.requests, rig.command_count) == (requests, commands)  # nothing was sent


async def test_luxos_session_conflict_borrows_visible_session(env: Env) -> None:
    client = env.client(env.lux)
    theirs = (await client.command("logon"))["SESSION"][0]["SessionID"]
    with pytest.raises(CGMinerRejected) as err:
        await client.command("logon")
    assert err.value.code == 402
    drv = env.driver("luxos", env.lux)
    await drv.sleep()
    assert mode(env.lux) is RigMode.SLEEPING
    assert env.lux.session_id == theirs  # borrowed, not logged off under its owner


async def test_luxos_session_conflict_with_hidden_session_is_rejected(env: Env) -> None:
    env.lux.hide_session_id = True
    await env.client(env.lux).command("logon")
    drv = env.driver("luxos", env.lux)
    with pytest.raises(CommandRejected, match="another client holds"):
        await drv.sleep()
    assert mode(env.lux) is RigMode.MINING
    env.clock.advance(61)  # the other client's session expires after 60 s idle
    await drv.sleep()
    assert mode(env.lux) is RigMode.SLEEPING


async def test_luxos_sim_session_and_atm_rules(env: Env) -> None:
    client = env.client(env.lux)
    with pytest.raises(CGMinerRejected) as err:
        await client.command("curtail", "nosuchid,sleep")
    assert err.value.code == 401
    sid = (await client.command("logon"))["SESSION"][0]["SessionID"]
    assert len(sid) == 8
    assert (await client.command("session"))["SESSION"][0]["SessionID"] == sid
    with pytest.raises(CGMinerRejected, match="ATM"):
        await client.command("profileset", f"{sid},default")  # ATM is on
    env.clock.advance(45)
    await client.command("atmset", f"{sid},enabled=false")  # use refreshes the session...
    env.clock.advance(45)
    reply = await client.command("profileset", f"{sid},2.5kW")  # ...so it is still valid
    best = max((p for p in env.lux.profiles if p.watts <= 2500), key=lambda p: p.watts)
    assert reply["PROFILE"][0]["Profile"] == best.name
    await client.command("profileset", f"{sid},3250W")
    assert env.lux.profile == "default"
    await client.command("profileset", f"{sid},-2")
    assert env.lux.profile == env.lux.profiles[-3].name
    with pytest.raises(CGMinerRejected):
        await client.command("powertargetset", f"{sid},3000")  # needs ATM on
    await client.command("atmset", f"{sid},enabled=true")
    await client.command("powertargetset", f"{sid},3000")
    assert env.lux.rig.power_target_w == 3000
    atm = await client.command("atm")
    assert atm["ATM"][0]["PowerTarget"] == 3000
    await client.command("logoff", sid)
    assert (await client.command("session"))["SESSION"][0]["SessionID"] == ""
    env.clock.advance(61)
    with pytest.raises(CGMinerRejected):
        await client.command("curtail", f"{sid},sleep")


# -- stock firmware ----------------------------------------------------------------------


async def test_stock_control_is_unsupported_and_writes_denied(env: Env) -> None:
    rig = env.stock.rig
    drv = env.driver("cgminer", env.stock)
    for call in (drv.sleep(), drv.wake(), drv.set_power_target(2000)):
        with pytest.raises(UnsupportedOperation):
            await call
    assert rig.command_count == 0 and rig.mode == RigMode.MINING
    client = env.client(env.stock, retries=3)
    with pytest.raises(CGMinerRejected, match="access denied") as err:
        await client.command("devdetails")
    assert err.value.code == 45
    with pytest.raises(CGMinerRejected) as err:
        await client.command("curtail", "x,sleep")  # not a cgminer command at all
    assert err.value.code == 14
    assert env.stock.requests == 2  # rejections are never retried


def test_unknown_kind_lists_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"luxos, cgminer, antminer, whatsminer, whatsminer-v3, braiins, avalon, epic, vnish",
    ):
        make_miner_driver("innosilicon", "r", MinerAccess("127.0.0.1"))
    assert isinstance(make_miner_driver("LuxOS", "r", MinerAccess("127.0.0.1")), LuxOSDriver)


# -- failures ----------------------------------------------------------------------------


async def test_silent_miner_times_out_with_bounded_retries(env: Env) -> None:
    await env.lux.set_fault("silent")
    client = env.client(env.lux, timeout=0.3, retries=1, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(DeviceTimeout) as err:
        await client.command("summary")
    assert time.monotonic() - start < 1.5
    assert env.lux.requests == 2
    assert err.value.device == "rig-001" and err.value.operation == "summary"
    drv = env.driver("luxos", env.lux, timeout=0.3, retries=0)
    with pytest.raises(DeviceTimeout):
        await drv.read(env.clock.now())
    await env.lux.set_fault(None)
    await drv.read(env.clock.now())


async def test_refused_connections_are_unreachable(env: Env) -> None:
    port = env.lux.port
    await env.lux.set_fault("refuse")
    client = env.client(env.lux, timeout=0.5, retries=1, backoff_s=0.01)
    with pytest.raises(DeviceUnreachable):
        await client.command("summary")
    await env.lux.set_fault(None)
    assert env.lux.port == port
    assert (await client.command("summary"))["STATUS"][0]["Code"] == 11

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(DeviceUnreachable):
        await CGMinerClient("127.0.0.1", closed_port, retries=0).command("summary")


@pytest.mark.parametrize("fault", ["garbage", "truncated"])
async def test_garbage_and_truncated_replies_are_malformed(env: Env, fault: str) -> None:
    await env.lux.set_fault(fault)
    with pytest.raises(MalformedReply):
        await env.client(env.lux, retries=2).command("summary")
    assert env.lux.requests == 1  # malformed is not retried
    drv = env.driver("luxos", env.lux)
    with pytest.raises(MalformedReply):
        await drv.read(env.clock.now())
    await env.lux.set_fault(None)
    assert (await drv.read(env.clock.now())).state is RigState.MINING


async def test_oversized_reply_is_malformed(env: Env) -> None:
    with pytest.raises(MalformedReply, match="exceeds"):
        await env.client(env.stock, max_reply_bytes=200).command("stats")


async def test_dead_host_while_outlet_off(env: Env) -> None:
    pdu_id, outlet = env.farm.outlet_of("rig-001") or ("", 0)
    pdu = env.farm.pdus[pdu_id]
    drv = env.driver("luxos", env.lux, timeout=0.5, retries=0)
    pdu.switch(outlet, "off", env.clock.now())
    with pytest.raises(DeviceUnreachable):
        await drv.read(env.clock.now())
    pdu.switch(outlet, "on", env.clock.now())
    env.clock.advance(5)
    with pytest.raises(DeviceUnreachable):  # control board still booting
        await drv.read(env.clock.now())
    env.clock.advance(11)
    tel = await drv.read(env.clock.now())
    assert tel.state is RigState.WAKING and tel.uptime_s == 16


async def test_idle_client_is_dropped() -> None:
    farm = Farm.build(ManualClock(), rigs=1, pdus=1)
    server = MinerServer(farm, "rig-001", read_timeout=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()
    finally:
        await server.stop()


# -- fuzzing the server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def threaded_servers() -> Iterator[list[MinerServer]]:
    """Servers on their own loop in a thread, so hypothesis can drive them synchronously."""
    loop = asyncio.new_event_loop()
    farm = Farm.build(ManualClock(), rigs=2, pdus=1)
    farm.rigs["rig-002"].firmware = "bmminer"
    servers = [MinerServer(farm, rid, read_timeout=1.0) for rid in farm.rigs]
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        for s in servers:
            loop.run_until_complete(s.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield servers
    for s in servers:
        asyncio.run_coroutine_threadsafe(s.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _blocking_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


_COMMANDS = sorted(LUXOS_READS | {"logon", "curtail", "profileset", "atmset", "pga", "quit"})
_PAYLOADS = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=200).map(str.encode),
    st.builds(
        lambda c, p: json.dumps({"command": c, "parameter": p}).encode(),
        st.sampled_from(_COMMANDS) | st.text(max_size=20),
        st.none() | st.text(max_size=40) | st.integers() | st.floats() | st.lists(st.integers()),
    ),
    st.lists(st.sampled_from([*_COMMANDS, "", "+", "|", ",", "{", "}"]), max_size=6).map(
        lambda parts: "+".join(parts).encode()
    ),
    st.sampled_from([b"{" * 3000, b'{"command":' + b"[" * 2000, b"\x00" * 50, b"{}", b"[]"]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=_PAYLOADS, which=st.integers(0, 1))
def test_fuzzed_requests_never_break_the_server(
    threaded_servers: list[MinerServer], payload: bytes, which: int
) -> None:
    server = threaded_servers[which]
    reply = _blocking_exchange(server.port, payload)
    if payload:
        assert reply.endswith(b"\x00") and reply.count(b"\x00") == 1
        obj = json.loads(reply[:-1])
        assert isinstance(obj, dict) and "id" in obj
    else:
        assert reply == b""
    ok = json.loads(_blocking_exchange(server.port, b'{"command":"summary"}')[:-1])
    assert ok["STATUS"][0]["Code"] == 11


def test_oversized_request_does_not_break_the_server(
    threaded_servers: list[MinerServer],
) -> None:
    server = threaded_servers[0]
    with contextlib.suppress(ConnectionResetError):  # unread excess bytes may reset
        _blocking_exchange(server.port, b'{"command":"summary","parameter":"' + b"x" * 9000)
    ok = json.loads(_blocking_exchange(server.port, b"summary")[:-1])
    assert ok["STATUS"][0]["Code"] == 11


async def test_luxos_build_without_optional_commands_is_still_monitored(env: Env) -> None:
    """An older LuxOS lacking atm/profiles/power still reads; only control detail is lost."""
    env.lux.missing_commands = {"atm", "profiles", "power"}
    driver = env.driver("luxos", env.lux)
    tel = await driver.read(1.0)
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths and tel.hashrate_ths > 50
    assert tel.power_w is None  # not reported: not guessed
    # Essential commands are still essential.
    env.lux.missing_commands = {"summary"}
    with pytest.raises(CommandRejected):
        await driver.read(2.0)


async def test_optional_commands_also_tolerated_without_joins(env: Env) -> None:
    """The one-command-per-connection fallback skips rejected optional commands too."""
    env.lux.missing_commands = {"atm", "profiles"}

    async def no_joins(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await r.read(4096)
        if b"+" in req:
            w.write(json.dumps({"STATUS": [{"STATUS": "E", "Code": 14}], "id": 1}).encode())
        else:
            w.write(env.lux.respond(req))
        await w.drain()
        w.close()

    server = await asyncio.start_server(no_joins, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        drv = make_miner_driver("luxos", "old-lux", MinerAccess("127.0.0.1", port))
        tel = await drv.read(1.0)
        assert tel.state is RigState.MINING and tel.power_w is not None
    finally:
        server.close()
        await server.wait_closed()
