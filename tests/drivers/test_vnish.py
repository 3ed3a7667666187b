"""The VNish driver against its simulator, whose web API is checked against the vendor's
OpenAPI document (`fixtures/vnish-1.3.4/openapi.json`, "xminer-api", VNish 1.3.4; no reply
of a real VNish was available to record, see fixtures/README.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drivers.base import MinerDriver
from drivers.cgminer import CGMinerClient
from drivers.errors import CommandRejected, DeviceAuthError
from drivers.registry import MinerAccess, VNishSettings, make_miner_driver
from drivers.telemetry import RigState
from drivers.vnish import (
    VNishDriver,
    identify,
    make_vnish_driver,
    parse_miner_type,
    parse_vnish_summary,
    preset_watts,
    tuned_presets,
)
from drivers.webjson import JsonHttpClient
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode, SimRig
from simulators.vnish import VNishRpcServer, VNishWebServer

DOC = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "vnish-1.3.4" / "openapi.json").read_text()
)
SCHEMAS = DOC["components"]["schemas"]


# -- a small OpenAPI 3.1 checker: types, required keys, enums, refs ------------------------


def _problems(value: Any, schema: Any, path: str = "$") -> list[str]:
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        return _problems(value, SCHEMAS[schema["$ref"].split("/")[-1]], path)
    out: list[str] = []
    for part in schema.get("allOf", []):
        out += _problems(value, part, path)
    if "oneOf" in schema or "anyOf" in schema:
        options = schema.get("oneOf") or schema.get("anyOf")
        if all(_problems(value, o, path) for o in options):
            out.append(f"{path}: matches none of its alternatives")
        return out
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        kinds = {
            "object": dict, "array": list, "string": str, "boolean": bool,
            "integer": int, "number": (int, float), "null": type(None),
        }  # fmt: skip
        ok = any(
            isinstance(value, kinds[t])
            and not (t in ("integer", "number") and isinstance(value, bool))
            for t in allowed
        )
        if not ok:
            return [*out, f"{path}: {type(value).__name__} is not {allowed}"]
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}: lacks required {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                out += _problems(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value[:3]):
            out += _problems(item, schema["items"], f"{path}[{i}]")
    return out


def _response_schema(path: str, method: str, status: int) -> Any:
    responses = DOC["paths"][path][method]["responses"][str(status)]
    return responses.get("content", {}).get("application/json", {}).get("schema")


# -- the simulated rig ------------------------------------------------------------------------


@dataclass
class VNish:
    clock: ManualClock
    farm: Farm
    rpc: VNishRpcServer
    web: VNishWebServer
    drivers: list[VNishDriver] = field(default_factory=list)

    @property
    def rig(self) -> SimRig:
        return self.rpc.rig

    def driver(self, **kw: Any) -> VNishDriver:
        kw.setdefault("timeout", 1.0)
        kw.setdefault("retries", 0)
        drv = make_vnish_driver("rig-001", self.rpc.host, self.rpc.port, web_port=80, **kw)
        self.drivers.append(drv)
        return drv

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        client = JsonHttpClient(self.web.host, self.web.port, timeout=1.0, retries=0)
        try:
            return await client.request(method, "/api/v1" + path, operation="test", **kw)
        finally:
            await client.close()


def _random_loopback() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


async def _vnish(model: str = "Antminer S19 XP") -> VNish:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1, models={model: 1.0})
        farm.rigs["rig-001"].firmware = "vnish"
        host = _random_loopback()
        rpc = VNishRpcServer(farm, "rig-001", host=host, port=4028)
        web = VNishWebServer(farm, "rig-001", host=host, port=80)
        try:
            await rpc.start()
            await web.start()
        except OSError:  # address taken by a concurrent test
            await rpc.stop()
            await web.stop()
            continue
        return VNish(clock, farm, rpc, web)
    raise RuntimeError("no free loopback address")


@pytest.fixture
async def vn() -> AsyncIterator[VNish]:
    v = await _vnish()
    try:
        yield v
    finally:
        for d in v.drivers:
            await d.close()
        await v.web.stop()
        await v.rpc.stop()


async def test_web_replies_follow_the_openapi_document(vn: VNish) -> None:
    status, unlocked = await vn.call("POST", "/unlock", body={"pw": "admin"})
    assert status == 200 and not _problems(unlocked, _response_schema("/unlock", "post", 200))
    auth = {"Authorization": f"Bearer {unlocked['token']}"}
    for path in ("/summary", "/info", "/status", "/perf-summary", "/autotune/presets",
                 "/settings"):  # fmt: skip
        status, reply = await vn.call("GET", path, headers=auth)
        assert status == 200, path
        assert _problems(reply, _response_schema(path, "get", 200)) == [], path
    status, saved = await vn.call(
        "POST", "/settings", body={"miner": {"overclock": {"preset": "2000"}}}, headers=auth
    )
    assert status == 200 and not _problems(saved, _response_schema("/settings", "post", 200))
    status, refused = await vn.call("POST", "/unlock", body={"pw": "wrong"})
    assert status == 403 and not _problems(refused, _response_schema("/unlock", "post", 403))
    assert (await vn.call("POST", "/mining/stop"))[0] == 401  # secured: needs the token
    assert (await vn.call("GET", "/summary"))[0] == 200  # open: reads need none
    vn.clock.advance(60)
    status, reply = await vn.call("GET", "/summary")
    assert reply["miner"]["miner_status"]["miner_state"] == "mining"
    # The deprecated power_usage is the efficiency, as the document says; power is elsewhere.
    assert reply["miner"]["power_usage"] == round(reply["miner"]["power_efficiency"])


async def test_rpc_side_is_bmminer_with_vnish_marks(vn: VNish) -> None:
    client = CGMinerClient(vn.rpc.host, vn.rpc.port, timeout=1.0)
    version = await client.command("version")
    assert version["STATUS"][0]["Description"] == "vnish 1.3.4"
    assert "Type" not in version["VERSION"][0]
    stats = await client.command("stats")
    assert stats["STATS"][0]["Type"] == "Antminer S19 XP (Vnish 1.3.4)"
    joined = await client.multi("summary", "stats")
    assert joined["stats"]["STATS"][0]["Type"].endswith("(Vnish 1.3.4)")


async def test_read_stop_start_and_presets(vn: VNish) -> None:
    m = vn.rig.model
    drv = vn.driver()
    tel = await drv.read(vn.clock.now())
    assert tel.state is RigState.MINING
    assert tel.hashrate_ths == pytest.approx(m.nominal_ths, rel=0.03)
    assert tel.power_w == pytest.approx(m.nominal_w, rel=0.02)  # power_consumption
    assert tel.power_limit_w == round(m.nominal_w)  # the preset in force
    ident = tel.identity
    assert (ident.model, ident.firmware, ident.firmware_version) == (m.name, "VNish", "1.3.4")
    assert len(tel.hashboards) == m.boards and len(tel.fans_rpm) == m.fans
    caps = drv.capabilities
    assert caps.power_target_min_w == m.min_w and caps.power_target_max_w == round(m.nominal_w)

    await drv.set_power_target(2600)
    chosen = vn.web.preset_named(vn.web.preset)
    assert chosen is not None and chosen.watts <= 2600 and chosen.tuned
    vn.clock.advance(60)
    tel = await drv.read(vn.clock.now())
    assert tel.power_limit_w == chosen.watts
    assert tel.power_w is not None and tel.power_w <= 2600
    with pytest.raises(ValueError, match="outside"):
        await drv.set_power_target(1000)

    await drv.sleep()
    assert vn.rig.mode is RigMode.SLEEPING
    vn.clock.advance(60)
    tel = await drv.read(vn.clock.now())
    assert tel.state is RigState.SLEEPING and tel.hashrate_ths == 0.0
    await drv.wake()
    vn.clock.advance(2)
    assert (await drv.read(vn.clock.now())).state is RigState.WAKING
    await drv.set_power_target(None)  # back to the preset found at the first read
    assert vn.web.preset == str(round(m.nominal_w)) and vn.rig.power_target_w is None
    vn.clock.advance(400)
    assert (await drv.read(vn.clock.now())).state is RigState.MINING
    assert [p for p, _ in vn.web.posts] == [
        "/settings", "/mining/stop", "/mining/start", "/settings",
    ]  # fmt: skip
    assert drv.web.unlocks == 1  # one login for everything


async def test_an_ignored_preset_is_caught_by_reading_back(vn: VNish) -> None:
    drv = vn.driver()
    await drv.read(vn.clock.now())
    # The rig's tuning results were reset meanwhile: the firmware answers as always, and
    # ignores the preset.
    vn.web.presets = tuple(p.__class__(p.name, p.watts, p.ths, False) for p in vn.web.presets)
    with pytest.raises(CommandRejected, match="kept preset"):
        await drv.set_power_target(2600)
    assert vn.rig.power_target_w is None


async def test_login_errors_and_renewal(vn: VNish) -> None:
    drv = vn.driver(password="wrong")
    await drv.read(vn.clock.now())  # reads need no login; the preset list does
    assert not drv.capabilities.can_power_target
    with pytest.raises(DeviceAuthError):
        await drv.sleep()
    good = vn.driver()
    await good.sleep()
    vn.web.tokens.clear()  # a restart of the web API forgets every token
    await good.wake()
    assert good.web.unlocks == 2 and vn.rig.mode is RigMode.MINING


async def test_reads_fall_back_to_4028(vn: VNish) -> None:
    drv = vn.driver()
    await drv.read(vn.clock.now())
    await vn.web.set_fault("refuse")
    tel = await drv.read(vn.clock.now())
    assert tel.state is RigState.MINING and tel.power_w is None
    assert tel.hashrate_ths == pytest.approx(vn.rig.model.nominal_ths, rel=0.03)
    assert tel.identity.firmware == "VNish" and len(tel.hashboards) == vn.rig.model.boards


async def test_identify(vn: VNish) -> None:
    ident = await identify(vn.rpc.host, timeout=1.0, port=vn.rpc.port)
    assert ident is not None and (ident.model, ident.firmware) == ("Antminer S19 XP", "VNish")
    stock = MinerServer(vn.farm, "rig-001", host=vn.rpc.host, port=0)
    vn.rig.firmware = "bmminer"
    await stock.start()
    try:
        assert await identify(stock.host, timeout=1.0, port=stock.port) is None
    finally:
        await stock.stop()
        vn.rig.firmware = "vnish"


async def test_registry_builds_the_kind(vn: VNish) -> None:
    access = MinerAccess(vn.rpc.host, vn.rpc.port, timeout=1.0, retries=0)
    drv = make_miner_driver("vnish", "r", access, VNishSettings(web_port=vn.web.port))
    assert isinstance(drv, VNishDriver) and isinstance(drv, MinerDriver)
    try:
        assert (await drv.read(vn.clock.now())).state is RigState.MINING
    finally:
        await drv.close()


def test_parsing_odd_replies() -> None:
    assert parse_miner_type("Antminer S19j Pro (Vnish 1.2.0-rc5)") == (
        "Antminer S19j Pro",
        "1.2.0-rc5",
    )
    assert parse_miner_type("Antminer L7") == ("Antminer L7", "")
    assert preset_watts({"name": "x", "pretty": "3495 watt ~ 132 TH"}) == 3495.0
    assert preset_watts({"name": "2900", "pretty": "?"}) == 2900.0
    presets = [
        {"name": "a", "pretty": "2000 watt ~ 70 TH", "status": "tuned"},
        {"name": "b", "pretty": "1500 watt ~ 50 TH", "status": "untuned"},
        {"name": 3, "pretty": "3000 watt ~ 100 TH", "status": "tuned"},
    ]
    assert tuned_presets(presets) == [(2000.0, "a")]
    with pytest.raises(Exception, match="no miner"):
        parse_vnish_summary(1.0, {"miner": None})
    tel = parse_vnish_summary(
        1.0, {"miner": {"miner_status": {"miner_state": "failure"}, "chains": "?", "cooling": 1}}
    )
    assert tel.state is RigState.WAKING and tel.hashboards == () and tel.fans_rpm == ()
