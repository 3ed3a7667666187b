"""The Braiins OS driver against its simulators (4028 "bosminer" dialect + REST), and real replies.

Fixtures: `fixtures/braiins-os-25.07/*.json` are REST replies captured from a BOS 25.07 S19 XP
(asic-rs); `fixtures/braiins-os-25.07/rpc-4028/` are 4028 replies of real BOSminer/BOSer
builds (see fixtures/README.md). Every socket here is on a random 127.x.y.z address, with
the firmware's real ports (4028 and 80) as on a farm LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import MinerDriver
from drivers.braiins import (
    FIRMWARE,
    BraiinsDriver,
    BraiinsRejected,
    identify,
    is_braiins,
    make_braiins_driver,
    parse_bos_identity,
    parse_bosminer_telemetry,
    parse_miner_status,
    parse_power_range,
    parse_tuner_target,
    parse_watt,
)
from drivers.cgminer import CGMinerClient, check_status
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
)
from drivers.telemetry import RigState
from simulators.braiins import BOS_VERSION, BraiinsRestFleet, BraiinsRestServer
from simulators.cgminer import BOSER_BUILD, MinerFleet, MinerServer
from simulators.clock import ManualClock
from simulators.farm import MODELS, Farm, RigMode, SimRig

FIXTURES = Path(__file__).parent.parent / "fixtures"
REST_CAPTURES = FIXTURES / "braiins-os-25.07"
RPC_CAPTURES = REST_CAPTURES / "rpc-4028"
PASSWORD = "s3cret-pass"


def rest_capture(name: str) -> Any:
    return json.loads((REST_CAPTURES / f"{name}.json").read_text())


def rpc_capture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RPC_CAPTURES / f"{name}.json").read_text())
    return data


def mode(rig: SimRig) -> RigMode:
    """The rig's firmware mode, read fresh (a helper so type narrowing does not stick)."""
    return rig.mode


@dataclass
class Bos:
    clock: ManualClock
    farm: Farm
    rpc: MinerServer
    rest: BraiinsRestServer
    drivers: list[BraiinsDriver] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.rpc.host

    @property
    def rig(self) -> SimRig:
        return self.rpc.rig

    def driver(self, **kw: Any) -> BraiinsDriver:
        kw.setdefault("password", PASSWORD)
        kw.setdefault("timeout", 1.0)
        if self.rest.port != 80:
            kw.setdefault("rest_port", self.rest.port)
        drv = make_braiins_driver(self.rpc.rig_id, self.host, self.rpc.port, **kw)
        drv.rest.backoff_s = 0.01
        self.drivers.append(drv)
        return drv

    def rest_calls(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.rest.requests if (m, p) == (method, path))

    async def close(self) -> None:
        for d in self.drivers:
            await d.close()
        await self.rest.stop()
        await self.rpc.stop()


def _random_loopback() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


async def _bos(model: str = "Antminer S19 Pro") -> Bos:
    """One BOS rig on its own 127.x.y.z, 4028 and REST on the firmware's default ports."""
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1, models={model: 1.0})
        farm.rigs["rig-001"].firmware = "bosminer"
        host = _random_loopback()
        rpc = MinerServer(farm, "rig-001", host=host, port=4028)
        rest = BraiinsRestServer(farm, "rig-001", host=host, port=80, password=PASSWORD)
        try:
            await rpc.start()
            await rest.start()
        except OSError:  # address taken by a concurrent test: pick another
            await rpc.stop()
            await rest.stop()
            continue
        return Bos(clock, farm, rpc, rest)
    raise RuntimeError("no free loopback address")


@pytest.fixture
async def bos() -> AsyncIterator[Bos]:
    b = await _bos()
    try:
        yield b
    finally:
        await b.close()


async def rest_call(
    bos: Bos, method: str, path: str, *, token: str | None = None, **kw: Any
) -> tuple[int, str]:
    headers = {"Authorization": token} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
        s.request(method, bos.rest.url + path, headers=headers, **kw) as r,
    ):
        return r.status, await r.text()


async def login(bos: Bos) -> str:
    status, text = await rest_call(
        bos, "POST", "/api/v1/auth/login", json={"username": "root", "password": PASSWORD}
    )
    assert status == 200
    token: str = json.loads(text)["token"]
    return token


# -- recorded replies of real firmware -------------------------------------------------------


def test_rest_captures_parse() -> None:
    details = rest_capture("miner_details")
    ident = parse_bos_identity(None, None, details)
    assert ident.make == "Antminer"
    assert ident.model == "Antminer S19 XP"
    assert ident.firmware == FIRMWARE
    assert ident.firmware_version == "2025-08-06-0-3881c51d-25.07-plus"
    assert parse_miner_status(details) == 2  # normal: mining
    assert parse_tuner_target(rest_capture("performance_tuner_state")) == 3031
    assert parse_watt(rest_capture("configuration_miner")["tuner"]["power_target"]) == 3031
    assert parse_power_range(rest_capture("configuration_miner")) is None  # not constraints
    assert rest_capture("actions_locate") is False


def test_rpc_captures_parse() -> None:
    """BOSminer+ on an S9: MH/s, chain IDs 6-8, no chip sensor (0.0), two absent fans."""
    tel = parse_bosminer_telemetry(
        7.0,
        summary=rpc_capture("bosminer-plus-0.2.0-s9-summary"),
        devs=rpc_capture("bosminer-plus-0.4.0-s9-devs"),
        temps=rpc_capture("bosminer-plus-0.2.0-s9-temps"),
        fans=rpc_capture("bosminer-plus-0.2.0-s9-fans"),
        tunerstatus=rpc_capture("bosminer-plus-0.2.0-s9-tunerstatus"),
        version=rpc_capture("bosminer-plus-0.2.0-s9-version"),
        devdetails=rpc_capture("bosminer-plus-0.2.0-s9-devdetails"),
    )
    assert tel.ts == 7.0
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(15.740915842676325)
    assert tel.uptime_s == 3680
    assert [b.index for b in tel.hashboards] == [0, 1, 2]
    assert [b.hashrate_ths for b in tel.hashboards] == pytest.approx([4.68307, 4.68791, 4.21310])
    assert [b.temp_c for b in tel.hashboards] == [75.0, 63.0, 70.0]
    assert [b.chip_temp_c for b in tel.hashboards] == [None, None, None]
    assert [b.chips for b in tel.hashboards] == [63, 63, 63]
    assert tel.temp_c == 75.0 and tel.chip_temp_c is None
    assert tel.fans_rpm == (2820, 3780, 0, 0)
    assert tel.power_w == 1419
    assert tel.power_limit_w == 1420
    assert tel.nominal_hashrate_ths == pytest.approx(3 * 4.6683)
    assert tel.identity.make == "Antminer"
    assert tel.identity.model == "Antminer S9"
    assert tel.identity.firmware == FIRMWARE
    assert tel.identity.firmware_version == "0.2.0-36c56a9363"


def test_version_captures_tell_bos_from_others() -> None:
    for name, build in (
        ("boser-24.09-version", "boser-buildroot 0.1.0-75912fc7"),
        ("boser-25.05-version", "boser-buildroot 0.1.0-45f356ea"),
    ):
        reply = rpc_capture(name)
        assert is_braiins(reply)
        ident = parse_bos_identity(reply)
        assert ident.firmware == FIRMWARE and ident.firmware_version == build
        assert ident.model == ""  # BOSer's `version` names no model: devdetails does
    stock = json.loads((FIXTURES / "antminer-stock-2020" / "version.json").read_text())
    lux = json.loads((FIXTURES / "luxos" / "version.json").read_text())
    assert not is_braiins(stock) and not is_braiins(lux)
    pause = rpc_capture("bosminer-plus-0.6.0-s17-pause")
    check_status(pause, operation="pause")
    assert pause["PAUSE"] == [True]


# -- simulator faithfulness -------------------------------------------------------------------


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


def assert_same_shape(real: Any, sim: Any, where: str = "$") -> None:
    """Every field of the real reply exists in the simulator's, with the same JSON type."""
    if real is None:
        return  # the firmware left it null; the simulator may fill it
    assert _kind(real) == _kind(sim), f"{where}: real {_kind(real)}, sim {_kind(sim)}"
    if isinstance(real, dict):
        missing = sorted(set(real) - set(sim))
        assert not missing, f"{where}: simulator lacks {missing}"
        for k, v in real.items():
            assert_same_shape(v, sim[k], f"{where}.{k}")
    elif isinstance(real, list) and real:
        assert sim, f"{where}: simulator's list is empty"
        assert_same_shape(real[0], sim[0], f"{where}[0]")


@pytest.mark.parametrize(
    ("path", "capture"),
    [
        ("/api/v1/miner/details", "miner_details"),
        ("/api/v1/miner/stats", "miner_stats"),
        ("/api/v1/miner/hw/hashboards", "miner_hw_hashboards"),
        ("/api/v1/cooling/state", "cooling_state"),
        ("/api/v1/performance/tuner-state", "performance_tuner_state"),
        ("/api/v1/configuration/miner", "configuration_miner"),
        ("/api/v1/actions/locate", "actions_locate"),
        ("/api/v1/version", "version"),
    ],
)
async def test_rest_sim_has_every_captured_field_with_its_type(
    bos: Bos, path: str, capture: str
) -> None:
    token = await login(bos)
    status, text = await rest_call(bos, "GET", path, token=token)
    assert status == 200
    assert_same_shape(rest_capture(capture), json.loads(text))


@pytest.mark.parametrize(
    ("command", "capture", "section"),
    [
        ("summary", "bosminer-plus-0.2.0-s9-summary", "SUMMARY"),
        ("devs", "bosminer-plus-0.4.0-s9-devs", "DEVS"),
        ("temps", "bosminer-plus-0.2.0-s9-temps", "TEMPS"),
        ("fans", "bosminer-plus-0.2.0-s9-fans", "FANS"),
        ("tunerstatus", "bosminer-plus-0.2.0-s9-tunerstatus", "TUNERSTATUS"),
        ("devdetails", "bosminer-plus-0.2.0-s9-devdetails", "DEVDETAILS"),
        ("version", "boser-25.05-version", "VERSION"),
    ],
)
async def test_rpc_sim_has_every_captured_field_with_its_type(
    bos: Bos, command: str, capture: str, section: str
) -> None:
    reply = await CGMinerClient(bos.host, device="t").command(command)
    real = rpc_capture(capture)
    for key in ("Code", "Msg"):
        if command != "fans" and command != "temps":  # their Msg counts items: "3 Temp(s)"
            assert reply["STATUS"][0][key] == real["STATUS"][0][key]
    assert reply["STATUS"][0]["Description"] == f"BOSer {BOSER_BUILD}"
    assert_same_shape(real[section], reply[section])
    item = reply[section][0]
    assert list(item) == sorted(item), "BOSer (serde) sorts keys"


async def test_rpc_sim_quirks_and_refusals(bos: Bos) -> None:
    client = CGMinerClient(bos.host, device="t")
    stats = await client.command("stats")
    assert not any(k.startswith("chain_") for item in stats["STATS"] for k in item)
    devs = await client.command("devs")
    assert [d["ID"] for d in devs["DEVS"]] == [1, 2, 3]  # X19 chains are 1-based
    assert all(d["Temperature"] == 0.0 for d in devs["DEVS"])  # temps live in `temps`
    for cmd, code in (("privileged", 14), ("curtail", 14), ("quit", 14), ("power", 14)):
        with pytest.raises(CommandRejected) as err:
            await client.command(cmd)
        assert getattr(err.value, "code", None) == code
    with pytest.raises(CommandRejected) as err:
        await client.command("asc")
    assert getattr(err.value, "code", None) == 15
    with pytest.raises(CommandRejected, match="range is 0 - 2"):
        await client.command("asc", "9")
    joined = await client.multi("summary", "tunerstatus", "fans", "temps", "devs", "devdetails")
    assert joined["tunerstatus"]["TUNERSTATUS"][0]["PowerLimit"] == round(bos.rig.target_w)
    with pytest.raises(CommandRejected):
        await client.multi("summary", "pause")  # writes cannot be joined (Code 45)
    assert mode(bos.rig) is RigMode.MINING


# -- reads through the driver ----------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
async def test_read_normalises_against_the_model(model: str) -> None:
    b = await _bos(model)
    try:
        rig, m = b.rig, b.rig.model
        b.clock.advance(123.0)
        drv = b.driver()
        assert isinstance(drv, MinerDriver)
        assert drv.capabilities.power_target_min_w is None  # not known before the first read
        tel = await drv.read(b.clock.now())
        t = b.clock.now()
        assert tel.ts == t
        assert tel.state is RigState.MINING
        assert tel.hashrate_ths == pytest.approx(rig.hashrate_ths(t), abs=1e-6)
        assert len(tel.hashboards) == m.boards
        for board, ths in zip(tel.hashboards, rig.board_hashrates_ths(t), strict=True):
            assert board.hashrate_ths == pytest.approx(ths, abs=1e-6)
            assert board.chips == m.chips_per_board
            assert board.active
        assert tel.temp_c == pytest.approx(max(rig.board_temps_c(t)), abs=0.01)
        assert tel.chip_temp_c == pytest.approx(max(rig.chip_temps_c(t)), abs=0.01)
        assert tel.fans_rpm == tuple(rig.fans_rpm(t))
        assert tel.uptime_s == rig.uptime_s(t)
        assert tel.nominal_hashrate_ths == pytest.approx(m.nominal_ths)
        assert tel.power_w == pytest.approx(rig.power_w(t), abs=0.51)
        assert tel.power_limit_w == pytest.approx(m.nominal_w, abs=0.5)
        assert tel.identity.make == "Antminer"
        assert tel.identity.model == m.name
        assert tel.identity.firmware == FIRMWARE
        assert tel.identity.firmware_version == BOS_VERSION  # the REST details' release
        assert drv.capabilities.can_sleep and drv.capabilities.can_power_target
        assert drv.capabilities.power_target_min_w == m.min_w
        assert drv.capabilities.power_target_max_w == m.max_w
        assert drv.capabilities.needs_pdu_to_power_off
        assert b.rest_calls("GET", "/api/v1/configuration/constraints") == 1
        # A mining rig costs one 4028 request per poll and nothing on REST.
        rpc_before, rest_before = b.rpc.requests, len(b.rest.requests)
        for _ in range(3):
            assert (await drv.read(b.clock.now())).state is RigState.MINING
        assert b.rpc.requests - rpc_before == 3
        assert len(b.rest.requests) == rest_before
    finally:
        await b.close()


async def test_sleep_then_wake(bos: Bos) -> None:
    rig, clock = bos.rig, bos.clock
    drv = bos.driver()
    await drv.read(clock.now())
    await drv.sleep()
    assert mode(rig) is RigMode.SLEEPING
    assert bos.rest_calls("PUT", "/api/v1/actions/pause") == 1
    tel = await drv.read(clock.now())
    assert tel.state is RigState.SLEEPING  # at once, although the MH/s are still decaying
    clock.advance(rig.model.sleep_s + 1)
    tel = await drv.read(clock.now())
    assert tel.state is RigState.SLEEPING
    assert tel.hashrate_ths == 0
    assert tel.power_w is not None and tel.power_w <= rig.model.idle_w + 1
    assert not any(b.active for b in tel.hashboards)
    await drv.sleep()  # pausing twice is harmless ("already paused")
    assert mode(rig) is RigMode.SLEEPING

    await drv.wake()
    assert mode(rig) is RigMode.MINING
    assert bos.rest_calls("PUT", "/api/v1/actions/resume") == 1
    tel = await drv.read(clock.now())
    assert tel.state is RigState.WAKING  # told to mine, hashboards still starting
    clock.advance(rig.model.boot_s + 10)
    tel = await drv.read(clock.now())
    assert tel.state is RigState.MINING
    assert tel.power_w is not None and tel.power_w < rig.model.nominal_w * 0.5  # ramping
    assert bos.rest.logins == 1  # one token for every call


async def test_pause_by_another_client_is_seen_and_booting_is_not_paused(bos: Bos) -> None:
    """4028 shows only zero MH/s; the REST status tells a paused rig from a booting one."""
    rig, clock = bos.rig, bos.clock
    await CGMinerClient(bos.host, device="other").command("pause")  # e.g. a pool's tool
    assert mode(rig) is RigMode.SLEEPING
    clock.advance(rig.model.sleep_s + 1)
    drv = bos.driver()  # a daemon that just started: it paused nothing itself
    tel = await drv.read(clock.now())
    assert tel.state is RigState.SLEEPING
    assert bos.rest_calls("GET", "/api/v1/miner/details") == 1
    await CGMinerClient(bos.host, device="other").command("resume")
    tel = await drv.read(clock.now())
    assert tel.state is RigState.WAKING
    pdu_id, outlet = bos.farm.outlet_of("rig-001") or ("", 0)
    pdu = bos.farm.pdus[pdu_id]
    pdu.switch(outlet, "off", clock.now())
    with pytest.raises(DeviceUnreachable):
        await drv.read(clock.now())
    pdu.switch(outlet, "on", clock.now())
    clock.advance(16)
    tel = await drv.read(clock.now())
    assert tel.state is RigState.WAKING and tel.uptime_s == 16  # booting, not paused
    assert tel.identity.firmware_version == BOS_VERSION  # re-learned after the restart


async def test_power_target(bos: Bos) -> None:
    rig, clock = bos.rig, bos.clock
    drv = bos.driver()
    await drv.set_power_target(2500.7)  # range fetched on demand, watts rounded down
    assert rig.power_target_w == 2500
    assert drv.capabilities.power_target_min_w == rig.model.min_w
    clock.advance(rig.model.target_change_s + 5)
    tel = await drv.read(clock.now())
    assert tel.power_w == pytest.approx(2500, rel=0.01)
    assert tel.power_limit_w == 2500
    await drv.set_power_target(None)
    assert rig.power_target_w is None
    assert bos.rest_calls("PUT", "/api/v1/performance/power-target/default") == 1

    puts, commands = bos.rest_calls("PUT", "/api/v1/performance/power-target"), rig.command_count
    for bad in (1000.0, 5000.0, math.nan, -5.0, math.inf, 0.0):
        with pytest.raises(ValueError):
            await drv.set_power_target(bad)
    assert bos.rest_calls("PUT", "/api/v1/performance/power-target") == puts  # nothing sent
    assert rig.command_count == commands


async def test_power_target_while_paused_applies_on_resume(bos: Bos) -> None:
    rig, clock = bos.rig, bos.clock
    drv = bos.driver()
    await drv.sleep()
    await drv.set_power_target(2000)
    clock.advance(rig.model.sleep_s + 1)
    assert (await drv.read(clock.now())).state is RigState.SLEEPING
    await drv.wake()
    clock.advance(rig.model.boot_s + rig.model.wake_ramp_s + 5)
    tel = await drv.read(clock.now())
    assert tel.state is RigState.MINING
    assert tel.power_w == pytest.approx(2000, rel=0.01)


# -- credentials and tokens --------------------------------------------------------------------


async def test_wrong_password_is_an_auth_error_and_reads_go_on(bos: Bos) -> None:
    drv = bos.driver(password="wrong")
    with pytest.raises(DeviceAuthError, match="wrong username or password") as err:
        await drv.sleep()
    assert err.value.kind == "auth"
    assert err.value.device == "rig-001" and err.value.operation == "sleep"
    assert "auth:" in str(err.value)
    assert mode(bos.rig) is RigMode.MINING
    assert bos.rest.failed_logins == 1  # an auth error is never retried
    tel = await drv.read(bos.clock.now())  # 4028 needs no credentials
    assert tel.state is RigState.MINING and tel.hashrate_ths
    assert bos.rest.failed_logins == 2  # the first read tried once to learn the range...
    await drv.read(bos.clock.now())
    assert bos.rest.failed_logins == 2  # ...and then leaves REST alone for a while
    with pytest.raises(DeviceAuthError):
        await drv.set_power_target(2500)
    assert bos.rig.power_target_w is None


async def test_token_is_cached_and_renewed_after_expiry(bos: Bos) -> None:
    drv = bos.driver()
    await drv.sleep()
    await drv.wake()
    assert bos.rest.logins == 1
    bos.clock.advance(3601)  # the firmware forgets tokens idle longer than timeout_s
    await drv.sleep()
    assert mode(bos.rig) is RigMode.SLEEPING
    assert bos.rest.logins == 2
    pauses = [i for i, r in enumerate(bos.rest.requests) if r == ("PUT", "/api/v1/actions/pause")]
    assert bos.rest.requests[pauses[-2] + 1] == ("POST", "/api/v1/auth/login")  # 401, re-login
    assert len(pauses) == 3  # the refused one and its retry


# -- failures --------------------------------------------------------------------------------


async def test_rest_timeout_is_bounded_and_retried(bos: Bos) -> None:
    drv = bos.driver(timeout=0.3, retries=1)
    await drv.read(bos.clock.now())  # logs in while the API still answers
    await bos.rest.set_fault("silent")
    seen = len(bos.rest.requests)
    start = time.monotonic()
    with pytest.raises(DeviceTimeout) as err:
        await drv.sleep()
    assert time.monotonic() - start < 1.5
    assert err.value.operation == "sleep"
    assert len(bos.rest.requests) - seen == 2  # one retry
    await bos.rest.set_fault(None)
    await drv.sleep()
    assert mode(bos.rig) is RigMode.SLEEPING


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("garbage", MalformedReply),
        ("truncated", MalformedReply),
        ("error500", CommandRejected),
        ("refuse", DeviceUnreachable),
    ],
)
async def test_rest_faults_are_typed(bos: Bos, fault: str, error: type[Exception]) -> None:
    drv = bos.driver(retries=0, timeout=5.0)  # each fault answers at once; a busy host is slow
    await drv.read(bos.clock.now())
    await bos.rest.set_fault(fault)
    with pytest.raises(error) as err:
        await drv.sleep()
    if fault == "error500":
        assert isinstance(err.value, BraiinsRejected) and err.value.status == 500
    tel = await drv.read(bos.clock.now())  # monitoring does not depend on REST
    assert tel.state is RigState.MINING
    await bos.rest.set_fault(None)
    await drv.sleep()
    assert mode(bos.rig) is RigMode.SLEEPING


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("silent", DeviceTimeout),
        ("garbage", MalformedReply),
        ("truncated", MalformedReply),
        ("refuse", DeviceUnreachable),
    ],
)
async def test_rpc_faults_are_typed(bos: Bos, fault: str, error: type[Exception]) -> None:
    drv = bos.driver(timeout=0.3, retries=0)
    await bos.rpc.set_fault(fault)
    with pytest.raises(error) as err:
        await drv.read(bos.clock.now())
    assert isinstance(err.value, Exception) and getattr(err.value, "device", "") == "rig-001"
    await bos.rpc.set_fault(None)
    assert (await drv.read(bos.clock.now())).state is RigState.MINING


async def test_rest_body_quirks_of_the_simulator(bos: Bos) -> None:
    """What the driver must get right: integer watts, JSON content type, the raw token."""
    token = await login(bos)
    path = "/api/v1/performance/power-target"
    assert (await rest_call(bos, "PUT", path, json={"watt": 2500}))[0] == 401
    bearer = f"Bearer {token}"  # the firmware takes the token raw
    assert (await rest_call(bos, "PUT", path, token=bearer, json={"watt": 2500}))[0] == 401
    assert (await rest_call(bos, "PUT", path, token=token, json={"watt": 2500.5}))[0] == 422
    assert (await rest_call(bos, "PUT", path, token=token, json={"watt": -1}))[0] == 422
    assert (await rest_call(bos, "PUT", path, token=token, data=b'{"watt":2500}'))[0] == 415
    assert (await rest_call(bos, "PUT", path, token=token, json={"watt": 100}))[0] == 400
    assert bos.rig.power_target_w is None
    status, text = await rest_call(bos, "PUT", path, token=token, json={"watt": 2500})
    assert (status, json.loads(text)) == (200, {"watt": 2500})
    status, _ = await rest_call(
        bos, "POST", "/api/v1/auth/login", json={"username": "root", "password": "x"}
    )
    assert status == 401
    assert (await rest_call(bos, "GET", "/api/v1/nope", token=token))[0] == 404


class NoTunerRest(BraiinsRestServer):
    """A BOS whose tuner is off or absent: constraints carry no power-target range."""

    async def _constraints(self, request: web.Request) -> web.Response:
        return web.json_response({"tuner_constraints": None})


async def test_firmware_without_tuner_or_without_rest_api(bos: Bos) -> None:
    await bos.rest.stop()
    no_tuner = NoTunerRest(bos.farm, "rig-001", host=bos.host, port=80, password=PASSWORD)
    await no_tuner.start()
    try:
        bos.rest = no_tuner  # so the fixture stops this one
        drv = bos.driver()
        await drv.read(bos.clock.now())
        assert drv.capabilities.can_sleep and not drv.capabilities.can_power_target
        with pytest.raises(UnsupportedOperation, match="no power-target range"):
            await drv.set_power_target(2000)
        assert bos.rig.power_target_w is None
        await drv.sleep()
        assert mode(bos.rig) is RigMode.SLEEPING
    finally:
        await no_tuner.stop()
    # An HTTP server without the API at all (an older BOS, or something else on port 80).
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, bos.host, 80).start()
    try:
        bos.clock.advance(bos.rig.model.sleep_s + 1)
        with pytest.raises(UnsupportedOperation, match="HTTP 404"):
            await drv.wake()
        assert mode(bos.rig) is RigMode.SLEEPING
        # Without the status from REST, the driver keeps what it last knew...
        assert (await drv.read(bos.clock.now())).state is RigState.SLEEPING
        # ...and a driver that knows nothing can only say "not hashing".
        assert (await bos.driver().read(bos.clock.now())).state is RigState.WAKING
    finally:
        await runner.cleanup()


async def test_dead_rig_is_unreachable_everywhere(bos: Bos) -> None:
    drv = bos.driver(timeout=0.5, retries=0)
    pdu_id, outlet = bos.farm.outlet_of("rig-001") or ("", 0)
    bos.farm.pdus[pdu_id].switch(outlet, "off", bos.clock.now())
    with pytest.raises(DeviceUnreachable):
        await drv.read(bos.clock.now())
    with pytest.raises(DeviceUnreachable):
        await drv.sleep()


# -- discovery ---------------------------------------------------------------------------------


async def test_identify(bos: Bos) -> None:
    ident = await identify(bos.host, timeout=1.0)
    assert ident is not None
    assert ident.firmware == FIRMWARE
    assert ident.model == "Antminer S19 Pro"
    assert ident.firmware_version == BOSER_BUILD
    # Another firmware on 4028 is not BOS.
    bos.rig.firmware = "luxos"
    assert await identify(bos.host, timeout=1.0) is None
    bos.rig.firmware = "bmminer"
    assert await identify(bos.host, timeout=1.0) is None
    bos.rig.firmware = "bosminer"
    # Silence costs at most the timeout; a closed port nothing.
    await bos.rpc.set_fault("silent")
    start = time.monotonic()
    assert await identify(bos.host, timeout=0.3) is None
    assert time.monotonic() - start < 1.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert await identify("127.0.0.1", timeout=1.0, port=closed) is None


# -- parsing never fails with anything but MalformedReply --------------------------------------

_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
_KEYS = [
    "MHS 5s", "Elapsed", "ID", "Board", "Chip", "RPM", "Chips", "Model", "Nominal MHS",
    "ApproximateMinerPowerConsumption", "PowerLimit", "BOSer", "Description",
]  # fmt: skip
_SECTIONS = ["SUMMARY", "DEVS", "TEMPS", "FANS", "TUNERSTATUS", "VERSION", "DEVDETAILS", "STATUS"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(_KEYS), _JSONISH),
    st.dictionaries(st.sampled_from(_SECTIONS), _JSONISH | st.lists(_JSONISH, max_size=2)),
    _JSONISH,
)
def test_parsers_survive_odd_firmware(a: dict[str, Any], b: dict[str, Any], rest: Any) -> None:
    replies = {s.lower(): {s: [a], **b} for s in _SECTIONS}
    try:
        tel = parse_bosminer_telemetry(
            1.0,
            summary=replies["summary"],
            devs=replies["devs"],
            temps=replies["temps"],
            fans=replies["fans"],
            tunerstatus=replies["tunerstatus"],
            version=replies["version"],
            devdetails=replies["devdetails"],
        )
        assert tel.hashrate_ths is None or math.isfinite(tel.hashrate_ths)
    except MalformedReply:
        pass
    details = rest if isinstance(rest, dict) else {"miner_identity": rest, "bos_version": rest}
    parse_bos_identity(b, b, details)
    parse_miner_status(details)
    parse_power_range({"tuner_constraints": {"power_target": rest}})
    parse_tuner_target({"mode_state": {"powertargetmodestate": rest}})
    with contextlib.suppress(MalformedReply):
        parse_watt(rest)


async def test_concurrent_calls_share_one_login(bos: Bos) -> None:
    drv = bos.driver()
    await asyncio.gather(drv.sleep(), drv.set_power_target(2400), drv.read(bos.clock.now()))
    assert bos.rest.logins == 1
    assert mode(bos.rig) is RigMode.SLEEPING and bos.rig.power_target_w == 2400


async def test_slow_firmware_within_and_beyond_the_timeout(bos: Bos) -> None:
    bos.rest.delays.update(login=0.2, action=0.4)
    drv = bos.driver(timeout=0.3, retries=0)
    with pytest.raises(DeviceTimeout):
        await drv.sleep()  # the login fits, the pause does not
    assert bos.rest.logins == 1
    await asyncio.sleep(0.3)
    assert mode(bos.rig) is RigMode.SLEEPING  # a timeout is not "not done": verify by reading
    patient = bos.driver(timeout=1.0, retries=0)
    start = time.monotonic()
    await patient.wake()
    assert time.monotonic() - start >= 0.6  # login and action both waited
    assert mode(bos.rig) is RigMode.MINING


async def test_fleet_of_mixed_firmware_on_a_loopback_subnet() -> None:
    farm = Farm.build(ManualClock(), rigs=3, pdus=1, models={"Antminer S19 XP": 1.0})
    farm.rigs["rig-001"].firmware = "bosminer"
    farm.rigs["rig-003"].firmware = "bosminer"
    for _ in range(10):
        subnet = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/29"
        fleet = MinerFleet(farm, subnet=subnet)
        rest = BraiinsRestFleet(farm, {rid: fleet.address_of(rid)[0] for rid in farm.rigs})
        try:
            await fleet.start()
            await rest.start()
        except OSError:
            await fleet.stop()
            await rest.stop()
            continue
        break
    else:
        pytest.skip("no free loopback subnet")
    drivers = []
    try:
        assert set(rest.servers) == {"rig-001", "rig-003"}
        for rid in rest.servers:
            host, port = fleet.address_of(rid)
            assert rest.address_of(rid) == (host, 80) and port == 4028
            drv = make_braiins_driver(rid, host, password="root")  # the defaults: 4028 and 80
            drivers.append(drv)
            tel = await drv.read(farm.now())
            assert tel.identity.model == "Antminer S19 XP" and tel.state is RigState.MINING
            await drv.sleep()
            assert mode(farm.rigs[rid]) is RigMode.SLEEPING
        assert mode(farm.rigs["rig-002"]) is RigMode.MINING
    finally:
        for d in drivers:
            await d.close()
        await rest.stop()
        await fleet.stop()
