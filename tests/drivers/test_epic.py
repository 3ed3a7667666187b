"""The ePIC PowerPlay driver against real PowerPlay replies and against its simulator.

Fixtures: `fixtures/epic-powerplay-v1/` are replies of a real S19 XP on PowerPlay-BMS
1.5.13 (asic-rs; see fixtures/README.md), served back over HTTP so they go through the
driver's real read path.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from controller.adapters.discovery import probe
from drivers.base import MinerDriver
from drivers.cgminer import CGMinerClient
from drivers.epic import (
    EpicDriver,
    identify,
    make_epic_driver,
    parse_epic_telemetry,
    target_range,
)
from drivers.errors import DeviceAuthError, MalformedReply, UnsupportedOperation
from drivers.registry import MinerAccess, make_miner_driver
from drivers.telemetry import RigState
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.epic import PRESET_FRACTIONS, EpicServer, power_for_ths
from simulators.farm import MODELS, Farm, RigMode, SimRig

CAPTURES = Path(__file__).parent.parent / "fixtures" / "epic-powerplay-v1"


def capture(name: str) -> Any:
    return json.loads((CAPTURES / f"{name}.json").read_text())


# -- the captures, served back --------------------------------------------------------------


@dataclass
class Replay:
    runner: web.AppRunner
    port: int
    posts: list[tuple[str, Any]] = field(default_factory=list)
    answer: dict[str, Any] = field(default_factory=lambda: {"error": None, "result": True})
    missing: set[str] = field(default_factory=set)  # paths answered 404


async def _replay() -> Replay:
    replay: Replay | None = None

    async def get(request: web.Request) -> web.Response:
        name = request.path.strip("/")
        assert replay is not None
        if name in replay.missing or not (CAPTURES / f"{name}.json").exists():
            raise web.HTTPNotFound()
        return web.json_response(capture(name))

    async def post(request: web.Request) -> web.Response:
        assert replay is not None
        body = await request.json()
        replay.posts.append((request.path, body))
        return web.json_response(replay.answer)

    app = web.Application()
    app.router.add_get("/{name:.*}", get)
    app.router.add_post("/{name:.*}", post)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    replay = Replay(runner, port)
    return replay


@pytest.fixture
async def replay() -> AsyncIterator[Replay]:
    r = await _replay()
    try:
        yield r
    finally:
        await r.runner.cleanup()


async def test_captured_summary_reads_through_the_driver(replay: Replay) -> None:
    drv = make_epic_driver("ep", "127.0.0.1", replay.port, timeout=2.0, retries=0)
    try:
        tel = await drv.read(5.0)
    finally:
        await drv.close()
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(99.37, abs=0.01)  # two boards, MH/s
    assert tel.power_w == pytest.approx(2166.6174)  # the PSU's input power
    assert tel.power_limit_w is None  # the voltage optimiser aims at 143 TH/s, no preset
    assert tel.nominal_hashrate_ths == 143.0
    assert tel.fans_rpm == (5971, 0, 5942, 5745)  # fans 5-12 are null: absent
    assert [(b.index, b.chips, b.temp_c) for b in tel.hashboards] == [
        (1, 110, 67.0),
        (2, 110, 64.312),
    ]
    assert tel.temp_c == 67.0 and tel.uptime_s == 23170
    ident = tel.identity
    assert (ident.make, ident.model, ident.firmware, ident.firmware_version) == (
        "Antminer",
        "Antminer S19 XP",
        "ePIC PowerPlay",
        "1.5.13",
    )
    # 1.5.13 offers no "Power" algorithm: targets go through its presets' power figures.
    caps = drv.capabilities
    assert (caps.can_power_target, caps.power_target_min_w, caps.power_target_max_w) == (
        True,
        1700.0,
        4400.0,
    )


async def test_captured_firmware_takes_stop_start_and_preset_targets(replay: Replay) -> None:
    drv = make_epic_driver("ep", "127.0.0.1", replay.port, password="pw", timeout=2.0)
    try:
        await drv.read(5.0)
        await drv.sleep()
        await drv.wake()
        await drv.set_power_target(2500)  # the 2200 W preset: 100 TH/s
        await drv.set_power_target(None)  # the voltage optimiser at the default 143 TH/s
        with pytest.raises(ValueError, match="outside"):
            await drv.set_power_target(1000)
        replay.answer = {"error": "BadPassword", "result": False}
        with pytest.raises(DeviceAuthError):
            await drv.sleep()
        replay.answer = {"error": {"LastCmdStillPending": "Stop"}, "result": False}
        with pytest.raises(Exception, match="refused"):
            await drv.wake()
    finally:
        await drv.close()
    assert replay.posts[:4] == [
        ("/miner", {"param": "Stop", "password": "pw"}),
        ("/miner", {"param": "Autostart", "password": "pw"}),
        ("/perpetualtune/algo", {"param": {"algo": "VoltageOptimizer", "target": 100},
                                 "password": "pw"}),
        ("/perpetualtune/algo", {"param": {"algo": "VoltageOptimizer", "target": 143},
                                 "password": "pw"}),
    ]  # fmt: skip


async def test_reads_go_on_without_capabilities(replay: Replay) -> None:
    replay.missing.add("capabilities")
    drv = make_epic_driver("ep", "127.0.0.1", replay.port, timeout=2.0, retries=0)
    try:
        tel = await drv.read(5.0)
        assert tel.state is RigState.MINING and tel.power_w is not None
        assert tel.identity.model == "" and not drv.capabilities.can_power_target
        replay.missing.clear()
        tel = await drv.read(6.0)  # asked again, and now known
        assert tel.identity.model == "Antminer S19 XP" and drv.capabilities.can_power_target
    finally:
        await drv.close()


def test_stopped_and_odd_summaries() -> None:
    summary = capture("summary")
    summary["Status"]["Operating State"] = "Idling"
    assert parse_epic_telemetry(1.0, summary).state is RigState.SLEEPING
    summary["Status"]["Operating State"] = "Initializing"
    assert parse_epic_telemetry(1.0, summary).state is RigState.WAKING
    with pytest.raises(MalformedReply):
        parse_epic_telemetry(1.0, ["not", "a", "summary"])
    odd = parse_epic_telemetry(1.0, {"HBs": [{"Index": "x"}, {"Index": 0, "Hashrate": "?"}]})
    assert odd.hashrate_ths is None and odd.power_w is None and odd.state is RigState.WAKING
    assert target_range({"Tune Presets": [{"power": 3000, "hashrate": 100}]}) is None


# -- against the simulator ------------------------------------------------------------------


@dataclass
class Epic:
    clock: ManualClock
    farm: Farm
    server: EpicServer
    drivers: list[EpicDriver] = field(default_factory=list)

    @property
    def rig(self) -> SimRig:
        return self.server.rig

    def driver(self, **kw: Any) -> EpicDriver:
        kw.setdefault("timeout", 1.0)
        kw.setdefault("retries", 0)
        drv = make_epic_driver("rig-001", self.server.host, self.server.port, **kw)
        self.drivers.append(drv)
        return drv


def _random_loopback() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


async def _epic(model: str = "Antminer S19 XP", **kw: Any) -> Epic:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1, models={model: 1.0})
        farm.rigs["rig-001"].firmware = "epic"
        server = EpicServer(farm, "rig-001", host=_random_loopback(), port=4028, **kw)
        try:
            await server.start()
        except OSError:  # address taken by a concurrent test
            continue
        return Epic(clock, farm, server)
    raise RuntimeError("no free loopback address")


@pytest.fixture
async def ep() -> AsyncIterator[Epic]:
    e = await _epic()
    try:
        yield e
    finally:
        for d in e.drivers:
            await d.close()
        await e.server.stop()


def _shape(v: Any) -> Any:
    """The keys and value types of a reply, nested."""
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_shape(v[0])] if v else []
    if isinstance(v, bool) or v is None:
        return type(v).__name__
    return "number" if isinstance(v, int | float) else type(v).__name__


def _differences(real: Any, sim: Any, path: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(real, dict) and isinstance(sim, dict):
        for k in real:
            if k not in sim:
                out.append(f"{path}/{k} missing")
            else:
                out += _differences(real[k], sim[k], f"{path}/{k}")
    elif isinstance(real, list) and isinstance(sim, list):
        if real and sim:
            out += _differences(real[0], sim[0], f"{path}[0]")
    elif real != sim and "NoneType" not in (real, sim):  # null where the capture had a value
        out.append(f"{path}: {real} vs {sim}")
    return out


@pytest.mark.parametrize("name", ["summary", "capabilities", "network"])
async def test_sim_replies_have_the_captured_keys_and_types(ep: Epic, name: str) -> None:
    status, reply = await ep.driver().client.request("GET", f"/{name}", operation="test")
    assert status == 200
    real = capture(name)
    assert _differences(_shape(real), _shape(reply)) == []
    assert list(reply) == sorted(reply)  # sorted keys, as the firmware serialises


async def test_read_stop_start_and_preset_targets(ep: Epic) -> None:
    m = ep.rig.model
    drv = ep.driver()
    tel = await drv.read(ep.clock.now())
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(m.nominal_ths, rel=0.03)
    assert tel.power_w == pytest.approx(m.nominal_w, rel=0.02)
    assert tel.identity.model == m.name and len(tel.hashboards) == m.boards
    presets = [power_for_ths(m, m.nominal_ths * f) for f in PRESET_FRACTIONS]
    caps = drv.capabilities
    assert caps.power_target_min_w == round(presets[0])
    assert caps.power_target_max_w == round(presets[-1])

    target = (presets[1] + presets[2]) / 2
    await drv.set_power_target(target)
    ep.clock.advance(60)
    tel = await drv.read(ep.clock.now())
    assert tel.power_w is not None and tel.power_w <= target  # never above the target
    assert tel.power_w == pytest.approx(presets[1], rel=0.02)
    assert tel.power_limit_w == round(presets[1])

    await drv.sleep()
    ep.clock.advance(60)
    tel = await drv.read(ep.clock.now())
    assert tel.state is RigState.SLEEPING and tel.hashrate_ths == 0.0
    assert ep.server.operating_state(ep.clock.now()) == "Idling"
    await drv.wake()
    ep.clock.advance(5)
    assert (await drv.read(ep.clock.now())).state is RigState.WAKING
    await drv.set_power_target(None)
    ep.clock.advance(400)
    tel = await drv.read(ep.clock.now())
    assert tel.state is RigState.MINING and ep.rig.power_target_w is None
    assert tel.power_w == pytest.approx(m.nominal_w, rel=0.02)


async def test_power_algorithm_when_offered() -> None:
    e = await _epic("Antminer S21", power_algorithm=True)
    try:
        drv = e.driver()
        await drv.read(e.clock.now())
        m = e.rig.model
        assert (drv.capabilities.power_target_min_w, drv.capabilities.power_target_max_w) == (
            m.min_w,
            m.max_w,
        )
        await drv.set_power_target(2500.7)
        assert e.rig.power_target_w == 2500.0
        e.clock.advance(60)
        assert (await drv.read(e.clock.now())).power_limit_w == 2500.0
        # Perpetual tune switched off elsewhere: the driver turns it back on first.
        e.server.tune_running = False
        await drv.read(e.clock.now())
        await drv.set_power_target(2000)
        assert [p for p, _ in e.server.posts[-2:]] == ["/perpetualtune", "/perpetualtune/algo"]
        assert e.rig.power_target_w == 2000.0
    finally:
        for d in e.drivers:
            await d.close()
        await e.server.stop()


async def test_wrong_password_is_an_auth_error(ep: Epic) -> None:
    drv = ep.driver(password="nope")
    await drv.read(ep.clock.now())  # reads need no password
    with pytest.raises(DeviceAuthError):
        await drv.sleep()
    assert ep.rig.mode is RigMode.MINING


async def test_no_target_without_presets_or_power(ep: Epic) -> None:
    drv = ep.driver()
    await drv.read(ep.clock.now())
    drv._caps = {"Default Hashrate": 141}  # a firmware that lists neither
    drv._update_capabilities()
    assert not drv.capabilities.can_power_target
    with pytest.raises(UnsupportedOperation):
        await drv.set_power_target(2500)


async def test_a_cgminer_client_finds_no_json_on_4028(ep: Epic) -> None:
    """The issue's symptom: PowerPlay's 4028 is HTTP."""
    with pytest.raises(MalformedReply, match="not JSON"):
        await CGMinerClient(ep.server.host, ep.server.port, timeout=1.0).command("version")
    assert await probe(ep.server.host, ep.server.port, 1.0) is None


async def test_identify(ep: Epic) -> None:
    ident = await identify(ep.server.host, timeout=1.0, port=ep.server.port)
    assert ident is not None and ident.firmware == "ePIC PowerPlay"
    assert ident.model == "Antminer S19 XP"
    lux = MinerServer(ep.farm, "rig-001", host=ep.server.host, port=0)
    await lux.start()
    try:
        assert await identify(lux.host, timeout=1.0, port=lux.port) is None
    finally:
        await lux.stop()
    assert await identify("127.0.0.1", timeout=0.5, port=1) is None


async def test_registry_builds_the_kind(ep: Epic) -> None:
    drv = make_miner_driver(
        "epic", "r", MinerAccess(ep.server.host, ep.server.port, timeout=1.0, retries=0)
    )
    assert isinstance(drv, EpicDriver) and isinstance(drv, MinerDriver)
    try:
        assert (await drv.read(ep.clock.now())).state is RigState.MINING
    finally:
        await drv.close()


@pytest.mark.parametrize("model", sorted(MODELS))
async def test_every_model_reads(model: str) -> None:
    e = await _epic(model)
    try:
        tel = await e.driver().read(e.clock.now())
        assert tel.identity.model == model
        assert tel.hashrate_ths == pytest.approx(e.rig.model.nominal_ths, rel=0.03)
    finally:
        for d in e.drivers:
            await d.close()
        await e.server.stop()
