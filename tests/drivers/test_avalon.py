"""The Avalon driver against real Avalon replies and against its simulator.

Fixtures: `fixtures/avalon-cgminer/` are replies of real Avalons (an idle Avalon Q and an
A1246, from asic-rs; an A15-194 from pyasic's tests; see fixtures/README.md). The
captures are served back over a socket, so they go through the driver's real read path.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers import avalon
from drivers.avalon import (
    AvalonDriver,
    identify,
    make_avalon_driver,
    mm_fields,
    parse_avalon_telemetry,
    parse_mm,
)
from drivers.base import MinerDriver
from drivers.cgminer import CGMinerClient
from drivers.errors import CommandRejected, UnsupportedOperation
from drivers.registry import AvalonSettings, MinerAccess, make_miner_driver
from drivers.telemetry import RigState
from drivers.values import to_float
from simulators.avalon import AVALON_MODELS, AvalonServer, avalon_rig
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode, SimRig

CAPTURES = Path(__file__).parent.parent / "fixtures" / "avalon-cgminer"


def capture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CAPTURES / f"{name}.json").read_text())
    return data


# -- the captures, served back --------------------------------------------------------------


async def _replay(replies: dict[str, dict[str, Any]]) -> tuple[asyncio.Server, list[str]]:
    """A 4028 server answering each command (joined or not) with its captured reply;
    a command without one is cgminer's "Invalid command"."""
    seen: list[str] = []
    invalid = {
        "STATUS": [
            {"STATUS": "E", "When": 1, "Code": 14, "Msg": "Invalid command",
             "Description": "cgminer 4.11.1"}
        ],
        "id": 1,
    }  # fmt: skip

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = await reader.read(4096)
        req = json.loads(raw)
        cmd, param = req["command"], req.get("parameter")
        seen.append(cmd if param is None else f"{cmd}|{param}")
        if "+" in cmd:
            body: dict[str, Any] = {n: [replies.get(n, invalid)] for n in cmd.split("+")}
            body["id"] = 1
        else:
            body = replies.get(cmd, invalid)
        writer.write(json.dumps(body).encode() + b"\x00")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, seen


async def _read_captured(replies: dict[str, dict[str, Any]], **kw: Any) -> Any:
    server, _ = await _replay(replies)
    port = server.sockets[0].getsockname()[1]
    try:
        drv = make_avalon_driver("av", "127.0.0.1", port, timeout=2.0, retries=0, **kw)
        return await drv.read(1000.0)
    finally:
        server.close()
        await server.wait_closed()


async def test_idle_avalon_q_reads_as_asleep_with_its_power_fans_and_temps() -> None:
    """The issue's case: soft-off, nothing hashing, everything inside `MM ID0`."""
    tel = await _read_captured(
        {"summary": capture("summary"), "estats": capture("stats"), "version": capture("version")}
    )
    assert tel.state is RigState.SLEEPING
    assert tel.hashrate_ths == 0.0
    assert tel.power_w == 146.0  # PS[...]'s last figure: an idle controller and PSU
    assert tel.power_limit_w == 800.0  # MPO
    assert tel.fans_rpm == (0, 0, 0, 0)
    assert tel.temp_c == 27.0  # the board's inlet/outlet sensors while idle
    assert tel.uptime_s == 37714
    assert len(tel.hashboards) == 1 and tel.hashboards[0].chips == 160  # HBinfo's PVT_T0
    ident = tel.identity
    assert (ident.make, ident.model, ident.firmware_version) == (
        "Avalon",
        "Avalon Q",
        "25052801_14a19a2",
    )


async def test_litestats_reads_alike() -> None:
    tel = await _read_captured(
        {
            "summary": capture("summary"),
            "estats": capture("litestats"),
            "version": capture("version"),
        }
    )
    assert tel.state is RigState.SLEEPING and tel.power_w == 146.0 and len(tel.fans_rpm) == 4


async def test_mining_a1246_without_a_version_reply() -> None:
    """An older build (no WALLPOWER): the wall power is PS[...]'s last figure, the model
    comes from the controller's Ver[] when `version` is refused."""
    tel = await _read_captured({"summary": capture("summary"), "estats": capture("avalon_a_stats")})
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(81.07, abs=0.01)  # GHSspd
    assert tel.power_w == 3504.0 and tel.power_limit_w == 3200.0
    assert tel.fans_rpm == (5344, 5392, 5349, 5309)
    assert [b.chips for b in tel.hashboards] == [120, 120, 120]
    assert [b.chip_temp_c for b in tel.hashboards] == [77.0, 77.0, 76.0]  # MTmax
    assert tel.chip_temp_c == 77.0 and tel.temp_c == 66.0
    assert tel.identity.model == "AvalonMiner 1246"
    assert tel.identity.firmware_version == "21072802_4ec6bb0_211fc46"


async def test_mining_a15_reads_wallpower() -> None:
    a15 = {
        "summary": capture("summary"),  # the A15's own summary was not captured
        "estats": capture("a15-194/estats"),
        "version": capture("a15-194/version"),
    }
    tel = await _read_captured(a15)
    assert tel.power_w == 3731.0 and tel.power_limit_w == 3515.0
    assert tel.hashrate_ths == pytest.approx(199.24, abs=0.01)
    assert tel.nominal_hashrate_ths == pytest.approx(201.92, abs=0.01)
    assert tel.fans_rpm == (4275, 4282)
    assert tel.identity.model == "AvalonMiner 15-194"


async def test_captured_control_replies_are_understood() -> None:
    """softoff/softon answer STATUS I "success ..."; workmode answers S "set OK"."""
    replies = {
        "summary": capture("a15-194/devs") | {"SUMMARY": [{"Elapsed": 975, "MHS 5s": 1.0}]},
        "estats": capture("a15-194/estats"),
        "version": capture("a15-194/version"),
    }
    server, seen = await _replay(replies)
    port = server.sockets[0].getsockname()[1]
    drv = AvalonDriver(
        "av", CGMinerClient("127.0.0.1", port, timeout=2.0, retries=0), low_power_w=2900,
        clock=lambda: 1753434816.0,
    )  # fmt: skip
    try:
        await drv.read(1.0)  # learns the normal mode's figure (MPO 3515 in WORKMODE 1)
        assert drv.capabilities.can_power_target
        assert (drv.capabilities.power_target_min_w, drv.capabilities.power_target_max_w) == (
            2900,
            3515.0,
        )
        replies["ascset"] = capture("ascset_softoff")
        await drv.sleep()
        replies["ascset"] = capture("ascset_softon")
        await drv.wake()
        replies["ascset"] = capture("ascset_workmode")
        await drv.set_power_target(3000)
        await drv.set_power_target(3000)  # already in the low mode: nothing sent
        replies["ascset"] = capture("ascset_help")  # no "success": refused
        with pytest.raises(CommandRejected):
            await drv.sleep()
    finally:
        server.close()
        await server.wait_closed()
    writes = [s for s in seen if s.startswith("ascset")]
    assert writes == [
        "ascset|0,softoff,1:1753434816",
        "ascset|0,softon,1:1753434816",
        "ascset|0,workmode,set,0",
        "ascset|0,softoff,1:1753434816",
    ]


def test_mm_string_parsing() -> None:
    mm = parse_mm("'STATS':{Ver[Q-1] SYSTEMSTATU[Work: In Idle, Hash Board: 1] Nonce Mask[25]}")
    assert mm["SYSTEMSTATU"] == "Work: In Idle, Hash Board: 1" and mm["Ver"] == "Q-1"
    assert mm_fields({"STATS": [{"ID": "AVA100"}]}) == ({}, {})
    # Garbled strings are never a crash, only missing figures.
    tel = parse_avalon_telemetry(
        1.0, summary=None, stats={"STATS": [{"MM ID0": "PS[a b] WALLPOWER[-5] Fan1[x]"}]}
    )
    assert tel.power_w is None and tel.fans_rpm == () and tel.state is RigState.WAKING


# -- against the simulator ------------------------------------------------------------------


@dataclass
class Av:
    clock: ManualClock
    farm: Farm
    server: AvalonServer

    @property
    def rig(self) -> SimRig:
        return self.server.rig

    def driver(self, **kw: Any) -> AvalonDriver:
        kw.setdefault("timeout", 1.0)
        kw.setdefault("retries", 0)
        return make_avalon_driver("rig-001", self.server.host, self.server.port, **kw)


def _random_loopback() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


async def _avalon(model: str = "AvalonMiner 15-194", port: int = 0) -> Av:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1)
        rig = avalon_rig("rig-001", model, clock.now())
        farm.rigs["rig-001"] = rig
        farm.pdus["pdu-01"].outlets[1].rig = rig
        server = AvalonServer(farm, "rig-001", host=_random_loopback(), port=port)
        try:
            await server.start()
        except OSError:  # address taken by a concurrent test
            continue
        return Av(clock, farm, server)
    raise RuntimeError("no free loopback address")


@pytest.fixture
async def av() -> AsyncIterator[Av]:
    a = await _avalon()
    try:
        yield a
    finally:
        await a.server.stop()


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    return "number" if isinstance(v, int | float) else type(v).__name__


@pytest.mark.parametrize(
    ("command", "section", "real"),
    [
        ("version", "VERSION", "a15-194/version"),
        ("devs", "DEVS", "a15-194/devs"),
        ("summary", "SUMMARY", "summary"),
        ("pools", "POOLS", "pools"),
        ("devdetails", "DEVDETAILS", "devdetails"),
        ("config", "CONFIG", "config"),
        ("coin", "COIN", "coin"),
        ("estats", "STATS", "a15-194/estats"),
    ],
)
async def test_sim_replies_have_every_captured_key_with_its_type(
    av: Av, command: str, section: str, real: str
) -> None:
    reply = await CGMinerClient(av.server.host, av.server.port, timeout=1.0).command(command)
    want = capture(real)
    for key in ("Code", "Msg", "Description"):
        assert reply["STATUS"][0][key] == want["STATUS"][0][key], key
    sim_item, real_item = reply[section][0], want[section][0]
    missing = sorted(set(real_item) - set(sim_item))
    assert not missing, f"simulator lacks {missing}"
    wrong = {k: (_kind(real_item[k]), _kind(sim_item[k])) for k in real_item}
    assert not {k: v for k, v in wrong.items() if v[0] != v[1]}


async def test_sim_mm_string_has_the_captured_fields(av: Av) -> None:
    reply = await CGMinerClient(av.server.host, av.server.port, timeout=1.0).command("estats")
    sim, _ = mm_fields(reply)
    real, _ = mm_fields(capture("a15-194/estats"))
    # Not simulated: per-chip nonce counters (MW*) and factory/tuning option strings.
    skipped = {k for k in real if k.startswith(("MW", "FACOPTS", "ATAOPTS"))}
    assert sorted(set(real) - set(sim) - skipped) == []
    assert len(sim["PVT_T0"].split()) == 160  # one entry per chip, as pyasic counts them


async def test_read_sleep_wake_and_work_modes(av: Av) -> None:
    low, normal, high = AVALON_MODELS["AvalonMiner 15-194"].work_mode_w
    drv = av.driver(low_power_w=low)
    tel = await drv.read(av.clock.now())
    assert tel.state is RigState.MINING and tel.power_limit_w == normal
    assert tel.identity.model == "AvalonMiner 15-194"
    assert len(tel.hashboards) == 3 and tel.fans_rpm and tel.temp_c and tel.chip_temp_c
    assert tel.power_w == pytest.approx(normal, rel=0.02)
    caps = drv.capabilities
    assert (caps.can_sleep, caps.power_target_min_w, caps.power_target_max_w) == (
        True,
        low,
        normal,
    )

    await drv.set_power_target(low + 10)
    assert av.server.work_mode == 0
    av.clock.advance(60)
    tel = await drv.read(av.clock.now())
    assert tel.power_limit_w == low and tel.power_w == pytest.approx(low, rel=0.02)
    with pytest.raises(ValueError, match="outside"):
        await drv.set_power_target(low - 100)
    await drv.set_power_target(None)
    assert av.server.work_mode == 1

    await drv.sleep()
    assert av.rig.mode is RigMode.SLEEPING
    av.clock.advance(60)
    tel = await drv.read(av.clock.now())
    assert tel.state is RigState.SLEEPING and tel.hashrate_ths == 0.0
    assert tel.power_w is not None and tel.power_w < 50

    await drv.wake()
    av.clock.advance(5)
    assert (await drv.read(av.clock.now())).state is RigState.WAKING  # booting the boards
    av.clock.advance(400)
    tel = await drv.read(av.clock.now())
    assert tel.state is RigState.MINING and tel.power_w == pytest.approx(normal, rel=0.02)
    assert av.server.commands_seen == ["workmode", "workmode", "softoff", "softon"]
    assert high > normal  # the high mode exists, but the driver never writes it


async def test_without_a_low_figure_no_power_target(av: Av) -> None:
    drv = av.driver()
    await drv.read(av.clock.now())
    assert not drv.capabilities.can_power_target
    with pytest.raises(UnsupportedOperation):
        await drv.set_power_target(3000)
    await drv.set_power_target(5000)  # at or above normal: no write needed
    assert av.server.commands_seen == []


async def test_refused_and_malformed_ascset(av: Av) -> None:
    client = CGMinerClient(av.server.host, av.server.port, timeout=1.0)
    for bad in ("1,softoff,1:5", "0,softoff,tomorrow", "0,workmode,set,7", "0,fly,away"):
        with pytest.raises(CommandRejected):
            await client.command("ascset", bad)
    help_reply = await client.command("ascset", "0,help")
    assert "softoff" in help_reply["STATUS"][0]["Msg"]
    # asic-rs sends the parameter as a JSON list; the firmware takes it too.
    raw = await _raw(av, b'{"command":"ascset","parameter":["0","softoff,1:17"]}')
    assert b"success softoff:17" in raw


async def _raw(av: Av, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(av.server.host, av.server.port)
    writer.write(payload)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_identify_tells_an_avalon_from_other_cgminers(av: Av) -> None:
    ident = await identify(av.server.host, timeout=1.0, port=av.server.port)
    assert ident is not None and ident.model == "AvalonMiner 15-194" and ident.make == "Avalon"
    lux = MinerServer(av.farm, "rig-001", host=av.server.host, port=0)
    lux.rig.firmware = "luxos"
    await lux.start()
    try:
        assert await identify(lux.host, timeout=1.0, port=lux.port) is None
    finally:
        await lux.stop()
        lux.rig.firmware = "avalon"
    assert await identify("127.0.0.1", timeout=0.5, port=1) is None


async def test_registry_builds_the_kind(av: Av) -> None:
    drv = make_miner_driver(
        "avalon",
        "r",
        MinerAccess(av.server.host, av.server.port, timeout=1.0, retries=0),
        AvalonSettings(low_power_w=2900),
    )
    assert isinstance(drv, AvalonDriver) and isinstance(drv, MinerDriver)
    await drv.read(av.clock.now())
    assert drv.capabilities.power_target_min_w == 2900


@pytest.mark.parametrize("model", sorted(AVALON_MODELS))
async def test_every_simulated_model_reads(model: str) -> None:
    a = await _avalon(model)
    try:
        tel = await a.driver().read(a.clock.now())
        m = a.rig.model
        assert tel.identity.model.startswith(f"AvalonMiner {model.split()[-1].split('-')[0]}")
        assert len(tel.fans_rpm) == m.fans and len(tel.hashboards) == m.boards
        assert tel.hashrate_ths == pytest.approx(m.nominal_ths, rel=0.05)
    finally:
        await a.server.stop()


async def test_a_poll_reads_the_controller_string_once(
    av: Av, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MM ID string is most of an Avalon poll's parsing: read once, not once for the
    reading and again for the work mode."""
    from drivers import avalon

    calls = []

    def counted(text: str) -> dict[str, str]:
        calls.append(text)
        return parse_mm(text)

    drv = av.driver()
    await drv.read(av.clock.now())  # the first poll also asks for `version`
    monkeypatch.setattr(avalon, "parse_mm", counted)
    av.clock.advance(10)
    tel = await drv.read(av.clock.now())
    assert len(calls) == 1 and tel.state is RigState.MINING and drv.mode == 1
    assert tel.hashboards and all(b.chips == 160 for b in tel.hashboards)


def _numbers_one_by_one(value: str) -> list[float]:
    """What `numbers` reads, figure by figure (its fast path must agree)."""
    return [f for p in value.replace("%", " ").split() if (f := to_float(p)) is not None]


@pytest.mark.parametrize(
    "value",
    ["29808.48 29952.52 30505.66", "72 72 73", " 58  57  62 ", "1.2.3 4", ".5 3", "5. 4",
     "1e5 2", "nan inf 3", "-4 5", "1_000 2", "3%  4", "1" * 400 + " 2", "\u0663 4", "\u00b2 5"],
)  # fmt: skip
def test_numbers_fast_path_reads_as_figure_by_figure(value: str) -> None:
    assert avalon.numbers(value) == _numbers_one_by_one(value)
    assert avalon.count_numbers(value) == len(_numbers_one_by_one(value))
