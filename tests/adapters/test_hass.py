"""Home Assistant MQTT discovery: payloads checked against what Home Assistant accepts, their
value templates rendered (with Jinja2, as Home Assistant does) against rigd's real state
documents, topics appearing retained on a real mosquitto, and the per-rig switch sleeping a
simulated rig through the same checks as `rigctl`, or refused when waking it is unsafe."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiomqtt
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from structlog.testing import capture_logs

from bench.sim_harness import SimHarness
from controller.adapters.grid.sign import send
from controller.adapters.hass import (
    ACTOR,
    RigDevice,
    SiteFeatures,
    command_topic,
    discovery,
    node_id,
    override_topic,
    power_limit_topic,
)
from controller.adapters.metrics import CAP_SOURCES
from controller.config import HomeAssistantConfig, parse_config
from controller.core.status import CycleResult
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite
from tests.conftest import Mosquitto, watch
from tests.grid_helpers import order, plain

SPEED = 20.0
SCHEMA = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "homeassistant" / "mqtt-discovery.json").read_text(
        encoding="utf-8"
    )
)
JINJA = ImmutableSandboxedEnvironment()


def render(template: str, payload: bytes) -> str:
    """A value template as Home Assistant renders it: `value` and `value_json`."""
    text = payload.decode()
    return JINJA.from_string(template).render(value=text, value_json=json.loads(text)).strip()


def check_payload(topic: str, cfg: dict[str, Any]) -> None:
    """Everything Home Assistant would check of one discovery config, and then some."""
    assert re.match(SCHEMA["topic"], topic), topic
    component = topic.split("/")[-4]
    platform = SCHEMA["platforms"][component]
    allowed = set(SCHEMA["common_keys"]) | set(platform["keys"])
    assert set(cfg) <= allowed, f"{topic}: unknown keys {set(cfg) - allowed}"
    for key in platform["required"]:
        assert cfg.get(key), f"{topic}: {key} is required"
    assert re.match(SCHEMA["id_chars"], cfg["unique_id"]), cfg["unique_id"]
    assert topic.split("/")[-2] == cfg["unique_id"]  # object id: the unique id
    dev = cfg["device"]
    assert set(dev) <= set(SCHEMA["device_keys"]), set(dev)
    assert isinstance(dev["identifiers"], list) and dev["identifiers"] and dev["name"]
    assert set(cfg["origin"]) <= set(SCHEMA["origin_keys"]) and cfg["origin"]["name"] == "rigd"
    if "availability" in cfg:  # a rig's: rigd online and the rig reachable
        assert "availability_topic" not in cfg
        assert cfg["availability_mode"] in SCHEMA["availability_modes"]
        for a in cfg["availability"]:
            assert set(a) <= set(SCHEMA["availability_keys"]) and a["topic"]
            assert a["payload_available"] == "online" and a["payload_not_available"] == "offline"
        assert cfg["availability"][0]["topic"].endswith("/status")
    else:
        assert cfg["payload_available"] == "online" and cfg["payload_not_available"] == "offline"
    dc = cfg.get("device_class")
    if component == "sensor":
        sc = cfg.get("state_class")
        assert sc is None or sc in SCHEMA["state_classes"]
        if dc is not None:
            rule = SCHEMA["sensor_device_classes"][dc]
            if dc == "enum":
                assert cfg["options"] and "unit_of_measurement" not in cfg and sc is None
            else:
                assert cfg["unit_of_measurement"] in rule["units"], (topic, dc)
                assert sc in rule["state_classes"], (topic, dc, sc)
    elif component == "binary_sensor":
        assert dc is None or dc in SCHEMA["binary_sensor_device_classes"]
    elif component == "switch":
        assert dc is None or dc in SCHEMA["switch_device_classes"]
        assert cfg["payload_on"] != cfg["payload_off"]
    elif component == "number":
        assert cfg["mode"] in SCHEMA["number_modes"]
        assert cfg["min"] < cfg["max"] and cfg["step"] > 0
        if dc is not None:
            assert cfg["unit_of_measurement"] in SCHEMA["number_device_classes"][dc]["units"]
    elif component == "button":
        assert dc is None or dc in SCHEMA["button_device_classes"]
        assert cfg["payload_press"]


def check_value(cfg: dict[str, Any], state: bytes) -> str:
    """Render the entity's template against its state document; the value must fit it."""
    out = render(cfg["value_template"], state)
    is_switch = "payload_on" in cfg
    if "min" in cfg:  # a number: a value in its range, or unknown
        assert out == "None" or cfg["min"] <= float(out) <= cfg["max"], (cfg["unique_id"], out)
    elif cfg.get("options"):
        assert out in cfg["options"] or out == "None", (cfg["unique_id"], out)
    elif "unit_of_measurement" in cfg or cfg.get("state_class"):
        if out != "None":  # unknown, as Home Assistant shows a null
            float(out)
    elif is_switch:
        assert out in (cfg["state_on"], cfg["state_off"])
    else:  # binary sensor
        assert out in ("ON", "OFF"), (cfg["unique_id"], out)
    return out


# -- the payloads themselves (pure) ------------------------------------------------------------


RIGS = [
    RigDevice(
        "rig-001",
        "Antminer",
        "Antminer S19 Pro",
        "LuxOS",
        "2025.4.8",
        can_sleep=True,
        power_min_w=1200.0,
        power_max_w=3600.0,
    ),
    RigDevice("rig.002", "", "", "", "", can_sleep=False),  # silent so far, and stock firmware
]


def test_every_payload_is_what_home_assistant_accepts() -> None:
    cfg = HomeAssistantConfig(enabled=True)
    full = SiteFeatures(control=True, budget=True, grid=True, max_import_kw=400.0)
    msgs = discovery("kg.chui-01", "Chui valley", cfg, full, RIGS)
    for topic, payload in msgs.items():
        check_payload(topic, payload)
    ids = [p["unique_id"] for p in msgs.values()]
    assert len(ids) == len(set(ids))
    node = node_id("kg.chui-01")
    assert node == "rigd_kg_chui-01"
    site = [p for p in msgs.values() if p["device"]["identifiers"] == [node]]
    assert {p["name"] for p in site} >= {
        "Import",
        "Cap",
        "Cap source",
        "Energy budget used",
        "Import cap override",
        "Clear override",
    }
    (override,) = [p for p in site if p["name"] == "Import cap override"]
    assert override["command_topic"] == override_topic("kg.chui-01") and override["max"] == 400
    (clear,) = [p for p in site if p["name"] == "Clear override"]
    assert clear["command_topic"] == override_topic("kg.chui-01")
    assert clear["payload_press"] == "CLEAR"
    assert all(p["device"]["name"] == "Chui valley" for p in site)
    rig1 = [p for p in msgs.values() if p["device"]["identifiers"] == [f"{node}_rig-001"]]
    assert {p["name"] for p in rig1} == {
        "Power",
        "Hashrate",
        "Temperature",
        "State",
        "Reachable",
        "Mining",
        "Power limit",
    }
    assert rig1[0]["device"]["via_device"] == node
    (limit,) = [p for p in rig1 if p["name"] == "Power limit"]
    assert limit["command_topic"] == power_limit_topic("kg.chui-01", "rig-001")
    assert (limit["min"], limit["max"], limit["unit_of_measurement"]) == (1200, 3600, "W")
    # unavailable while the rig is unreachable, except what says it is
    for p in rig1:
        if p["name"] in ("State", "Reachable"):
            assert p["availability_topic"] == "rigd/kg.chui-01/status"
        else:
            rig_avail = p["availability"][1]
            assert rig_avail["topic"] == "rigd/kg.chui-01/rigs/rig-001/state"
            unreachable = json.dumps({"health": {"reachable": False}}).encode()
            reachable = json.dumps({"health": {"reachable": True}}).encode()
            assert render(rig_avail["value_template"], unreachable) == "offline"
            assert render(rig_avail["value_template"], reachable) == "online"
    assert rig1[0]["device"]["model"] == "Antminer S19 Pro"
    (switch,) = [p for p in rig1 if "payload_on" in p]
    assert switch["command_topic"] == command_topic("kg.chui-01", "rig-001")
    assert switch["state_topic"] == "rigd/kg.chui-01/rigs/rig-001/state"
    assert all(
        p.get("availability_topic", p.get("availability", [{}])[0].get("topic"))
        == "rigd/kg.chui-01/status"
        for p in msgs.values()
    )
    # a rig that cannot sleep over its API gets no switch, and no made-up model
    rig2 = [p for p in msgs.values() if p["device"]["identifiers"] == [f"{node}_rig_002"]]
    assert rig2 and not [p for p in rig2 if "command_topic" in p]
    assert "model" not in rig2[0]["device"]
    # without control there is no cap and no switch; per_rig=false: the site only
    bare = discovery("s", "", cfg, SiteFeatures(), RIGS)
    assert not [p for p in bare.values() if p["name"].startswith("Cap")]
    assert not [p for p in bare.values() if "command_topic" in p]
    site_only = discovery("s", "", HomeAssistantConfig(enabled=True, per_rig=False), full, RIGS)
    assert all(p["device"]["identifiers"] == ["rigd_s"] for p in site_only.values())
    no_switch = discovery("s", "", HomeAssistantConfig(switches=False), full, RIGS)
    assert not [p for p in no_switch.values() if "command_topic" in p]


def test_cap_source_sensor_accepts_every_cap_source_rigd_publishes() -> None:
    """A zoned site's cap source is `zone`: Home Assistant must be told it is a valid state."""
    cfg = HomeAssistantConfig(enabled=True)
    msgs = discovery("s", "", cfg, SiteFeatures(control=True), [])
    (cap_source,) = [p for p in msgs.values() if p["name"] == "Cap source"]
    assert "zone" in CAP_SOURCES
    for source in CAP_SOURCES:
        state = json.dumps({"cap_source": source}).encode()
        assert check_value(cap_source, state) == source


def test_discovery_is_off_by_default_and_its_prefix_is_checked() -> None:
    cfg = parse_config('[site]\nid = "x"\n', environ={})
    assert cfg.homeassistant.enabled is False
    assert cfg.homeassistant.discovery_prefix == "homeassistant"
    for bad in ("ha/#", "/ha", "ha/", "a+b"):
        with pytest.raises(Exception, match="discovery_prefix"):
            parse_config(
                f'[site]\nid = "x"\n[homeassistant]\ndiscovery_prefix = "{bad}"\n', environ={}
            )


async def test_off_by_default_publishes_nothing_and_removed_rigs_are_cleared(
    tmp_path: Path,
) -> None:
    h = SimHarness.create(tmp_path, rigs=4, pdus=1, control={})
    await h.step()
    assert h.daemon.exports.hass is None
    assert not [t for t in h.link._retained if t.startswith("homeassistant/")]
    await h.close()

    h = SimHarness.create(tmp_path / "on", rigs=4, pdus=1, control={})
    h.cfg = h.cfg.model_copy(update={"homeassistant": HomeAssistantConfig(enabled=True)})
    h.daemon = h._new_daemon()
    result = await h.step()
    bridge = h.daemon.exports.hass
    assert bridge is not None
    mine = {t: p for t, p in h.link._retained.items() if t.startswith("homeassistant/")}
    gone = [t for t in mine if "_rig-004_" in t]
    assert len(gone) == 7 and all(json.loads(mine[t]) for t in gone)
    # rig-004 leaves the config (a reload): its entities are removed by empty retained configs
    rigs = {k: v for k, v in result.snapshot.rigs.items() if k != "rig-004"}
    smaller = dataclasses.replace(result.snapshot, rigs=MappingProxyType(rigs))
    bridge.on_cycle(CycleResult(smaller, result.control, result.document))
    assert all(h.link._retained[t] == b"" for t in gone)
    assert all(json.loads(h.link._retained[t]) for t in mine if t not in gone)
    await h.close()


async def test_a_rigs_new_identity_rebuilds_that_rig_only(tmp_path: Path) -> None:
    """Rigs give their identity at their first reading, a few a cycle: each such change
    must rebuild and hand to the link that rig's messages, not the whole farm's."""
    h = SimHarness.create(tmp_path, rigs=5, pdus=1, control={})
    h.cfg = h.cfg.model_copy(update={"homeassistant": HomeAssistantConfig(enabled=True)})
    h.daemon = h._new_daemon()
    result = await h.step()
    bridge = h.daemon.exports.hass
    assert bridge is not None
    before = {t: p for t, p in h.link._retained.items() if t.startswith("homeassistant/")}
    assert len(before) > 5 * 6
    handed: list[str] = []
    real = h.link.set_retained_raw

    def counting(topic: str, payload: bytes) -> None:
        handed.append(topic)
        real(topic, payload)

    h.link.set_retained_raw = counting  # type: ignore[method-assign]
    rig = result.snapshot.rigs["rig-003"]
    assert rig.telemetry is not None
    tele = dataclasses.replace(
        rig.telemetry,
        identity=dataclasses.replace(rig.telemetry.identity, firmware_version="9.9.9-new"),
    )
    rigs = dict(result.snapshot.rigs)
    rigs["rig-003"] = dataclasses.replace(rig, telemetry=tele)
    snap = dataclasses.replace(result.snapshot, rigs=MappingProxyType(rigs))
    bridge.on_cycle(CycleResult(snap, result.control, result.document))
    node = node_id(h.cfg.site.id)
    mine = [t for t in before if f"/{node}_rig-003_" in t]
    assert mine and sorted(handed) == sorted(mine)  # that rig's messages, and no other's
    for t in mine:
        assert "9.9.9-new" in json.loads(h.link._retained[t])["device"]["sw_version"]
    assert all(h.link._retained[t] == p for t, p in before.items() if t not in mine)
    handed.clear()
    bridge.on_cycle(CycleResult(snap, result.control, result.document))  # nothing changed
    assert handed == []
    await h.close()


# -- on a real broker, with a running daemon and a simulated farm --------------------------------


def config_text(site: SimSite, broker: Mosquitto, tmp_path: Path) -> str:
    full = site.nominal_import_kw()
    return site.config_toml(
        broker_url=broker.url,
        state_dir=tmp_path / "state",
        interval_s=0.5 * SPEED,
        timeout_s=0.4,
        retries=0,
        extra=f"""
[control]
max_import_kw = {math.ceil(full * 1.1)}
min_on_s = 30
min_off_s = 30

[budget]
period = "month"
kwh = 1000000

[grid]
allow_unsigned = true

[homeassistant]
enabled = true
""",
    )


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="ha-test") as c:
        await c.publish(topic, payload, qos=0)


async def cycles(daemon: Daemon, n: int) -> None:
    assert daemon.last is not None
    start = daemon.last.snapshot.cycle
    for _ in range(200):
        await asyncio.sleep(0.05)
        if daemon.last.snapshot.cycle >= start + n:
            return
    raise AssertionError(f"{n} cycles did not pass")


async def test_topics_appear_and_the_switch_sleeps_or_is_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with SimSite(rigs=6, pdus=1, clock=ScaledClock(SPEED)) as site:
        cfg = parse_config(config_text(site, mosquitto, tmp_path), environ={})
        daemon = Daemon(cfg, clock=site.clock)
        async with (
            watch(mosquitto.host, mosquitto.port, "homeassistant/#") as ha,
            watch(mosquitto.host, mosquitto.port) as w,
            running(daemon),
        ):
            await w.wait_json("rigd/sim/state", lambda d: d["rigs"]["mining"] == 6)
            node = node_id("sim")
            switch_topic = f"homeassistant/switch/{node}/{node}_rig-002_mining/config"
            await ha.wait_for(switch_topic)
            await ha.wait_for(f"homeassistant/sensor/{node}/{node}_import_power/config")
            await asyncio.sleep(0.3)  # the rest of the batch
            configs = {t: json.loads(p) for t, p in ha.latest.items()}
            # the site's entities, 7 per rig (power limit with LuxOS's power targets)
            assert len(configs) == 17 + 6 * 7
            # retained: a Home Assistant that starts later (or restarts) finds them all
            async with watch(mosquitto.host, mosquitto.port, "homeassistant/#") as late:
                await late.wait_for(switch_topic)
                await asyncio.sleep(0.3)
                assert set(late.latest) == set(configs) and all(late.retained.values())
            for topic, cfg_doc in configs.items():
                check_payload(topic, cfg_doc)
                if "state_topic" in cfg_doc:  # not a button
                    check_value(cfg_doc, w.latest[cfg_doc["state_topic"]])
            power = configs[f"homeassistant/sensor/{node}/{node}_import_power/config"]
            state_doc = w.latest["rigd/sim/state"]
            assert float(render(power["value_template"], state_doc)) == pytest.approx(
                json.loads(state_doc)["import_kw"]
            )
            switch = configs[switch_topic]
            rig_state = w.latest["rigd/sim/rigs/rig-002/state"]
            assert render(switch["value_template"], rig_state) == "ON"
            await w.wait_for("rigd/sim/status", lambda p: p == b"online")

            # OFF sleeps the rig, as `rigctl sleep` does: audited, pinned
            await publish(mosquitto, switch["command_topic"], b"OFF")
            await w.wait_json("rigd/sim/rigs/rig-002/state", lambda d: d["state"] == "sleeping")
            assert site.farm.rigs["rig-002"].mode.value == "sleeping"
            ctl = daemon.controller
            assert ctl is not None and "rig-002" in ctl.pinned
            store = daemon.store
            assert store is not None
            (entry,) = [e for e in store.audit_for_rig("rig-002") if e.action == "sleep"]
            assert entry.actor == ACTOR and entry.result == "ok"
            assert render(switch["value_template"], w.latest["rigd/sim/rigs/rig-002/state"]) == (
                "OFF"
            )

            # unsafe: with the cap at today's import, waking it would push import over the cap
            last = daemon.last
            assert last is not None
            kw = float(last.document["import_kw"])
            ctl.set_override(kw, site.clock.now() + 3600, "test: no room", "test")
            await cycles(daemon, 2)
            with capture_logs() as logs:
                await publish(mosquitto, switch["command_topic"], b"ON")
                await publish(mosquitto, switch["command_topic"], b"TOGGLE")
                await cycles(daemon, 4)
            refused = [e for e in logs if e["event"] == "hass_command_refused"]
            assert refused and "over the" in refused[0]["reason"], logs
            ignored = [e for e in logs if e["event"] == "hass_command_ignored"]
            assert ignored and ignored[0]["payload"] == "TOGGLE"
            assert site.farm.rigs["rig-002"].mode.value == "sleeping"
            assert not [e for e in store.audit_for_rig("rig-002") if e.action == "wake"]
            bridge = daemon.exports.hass
            assert bridge is not None
            assert await bridge.command("rig-002", b"ON") is False

            # with room again, ON wakes it and hands it back to the control loop
            ctl.clear_override()
            await cycles(daemon, 2)
            await publish(mosquitto, switch["command_topic"], b"ON")
            await w.wait_json(
                "rigd/sim/rigs/rig-002/state",
                lambda d: d["state"] in ("waking", "mining"),
                within=15,
            )
            assert "rig-002" not in ctl.pinned

            # the power limit number throttles a rig, as `rigctl limit` does (and pins it)
            (limit_cfg,) = [
                c for t, c in configs.items() if t.endswith(f"{node}_rig-003_power_limit/config")
            ]
            watts = limit_cfg["min"] + 100
            await publish(mosquitto, limit_cfg["command_topic"], str(watts).encode())
            await w.wait_json(
                "rigd/sim/rigs/rig-003/state",
                lambda d: (
                    d["telemetry"]["power_limit_w"] is not None
                    and abs(d["telemetry"]["power_limit_w"] - watts) <= 150
                ),
                within=15,
            )
            assert "rig-003" in ctl.pinned
            mine = [e for e in store.audit_for_rig("rig-003") if e.actor == ACTOR]
            assert [(e.action, e.result) for e in mine] == [("set_power", "ok")]

            # the override number caps import for an hour; the button clears it
            override_cfg = configs[f"homeassistant/number/{node}/{node}_override/config"]
            clear_cfg = configs[f"homeassistant/button/{node}/{node}_override_clear/config"]
            assert cfg.control is not None
            cap = cfg.control.max_import_kw - 0.5  # under the site's maximum: it sets the cap
            await publish(mosquitto, override_cfg["command_topic"], str(cap).encode())
            doc = await w.wait_json(
                "rigd/sim/state", lambda d: (d.get("override") or {}).get("kw") == cap
            )
            assert doc["cap_source"] == "override" and doc["cap_kw"] == cap
            assert float(render(override_cfg["value_template"], json.dumps(doc).encode())) == cap
            assert ctl.override is not None and ctl.override.actor == ACTOR
            await publish(
                mosquitto, clear_cfg["command_topic"], clear_cfg["payload_press"].encode()
            )
            doc = await w.wait_json("rigd/sim/state", lambda d: d.get("override") is None)
            assert render(override_cfg["value_template"], json.dumps(doc).encode()) == "None"
            assert ctl.override is None

            # grid orders share the connection: they still reach the grid service
            msg = order(site="sim", now=site.clock.now(), order_id="ha-1", duration_s=60)
            ack = await send(cfg.mqtt, "sim", plain(msg), wait_s=10)
            assert ack is not None and ack["status"] == "accepted", ack
        # a clean stop: Home Assistant shows every entity unavailable
        assert w.latest["rigd/sim/status"] == b"offline"
