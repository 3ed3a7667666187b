"""Home Assistant MQTT discovery: the site and each rig appear in Home Assistant by themselves.

rigd already publishes retained JSON state on rigd/<site>/...; discovery only tells
Home Assistant where to find each value: one retained config message per entity on
`<discovery_prefix>/<component>/rigd_<site>/<object_id>/config`, each pointing at one
of rigd's own state topics with a value template, with a device block (the site, and
each rig as a device "via" the site) and rigd's status topic as availability. Nothing
is published twice: Home Assistant reads the same documents `mosquitto_sub` shows.

Each rig also gets a switch, "Mining": ON wakes it, OFF puts it to sleep, and a rig whose
firmware takes a power target a number, "Power limit" (watts), as hass-miner has. The site
gets a number, "Import cap override" (kW, for an hour, like `rigctl budget override`), and
a button, "Clear override". A command goes through exactly the path `rigctl` takes
(Controller.manual, set_override, clear_override), so its safety checks apply: a rig held
asleep by the cap or a grid order is not woken past the cap, and the refusal is logged.
Commands are taken at QoS 0, so a command sent while rigd was away is not replayed minutes
later. An unknown payload is ignored with a log line. Anyone who may publish on these
command topics can sleep, wake and throttle rigs: restrict them in the broker's ACL to Home
Assistant's user (config/mosquitto/acl.example).

A rig's entities are unavailable while the rig is unreachable (its last readings are not
today's), except its State and Reachable, which say so; every entity is unavailable while
rigd is offline.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from controller.adapters.metrics import CAP_SOURCES, VERSION
from controller.adapters.mqtt import MessageHandler, MqttLink
from controller.config import HomeAssistantConfig
from controller.core.planner import ActionKind
from controller.errors import ManualRefused

if TYPE_CHECKING:
    from controller.adapters.ports import HassView
    from controller.core.status import CycleResult

log = structlog.get_logger(__name__)

ACTOR = "mqtt:homeassistant"
REASON = "Home Assistant switch"
OVERRIDE_S = 3600.0  # an override set from Home Assistant lasts an hour (send it again)
CLEAR = "CLEAR"  # the clear button's payload on the override's command topic
RIG_STATES = ["mining", "waking", "sleeping", "off", "unreachable"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def node_id(site: str) -> str:
    """Discovery ids allow [A-Za-z0-9_-] only; site ids may also hold '.'."""
    return "rigd_" + _UNSAFE.sub("_", site)


def command_topic(site: str, rig_id: str) -> str:
    return f"rigd/{site}/rigs/{rig_id}/set"


def power_limit_topic(site: str, rig_id: str) -> str:
    return f"rigd/{site}/rigs/{rig_id}/power_limit/set"


def override_topic(site: str) -> str:
    return f"rigd/{site}/override/set"


@dataclass(frozen=True, slots=True)
class RigDevice:
    """What Home Assistant is told about one rig."""

    id: str
    make: str = ""
    model: str = ""
    firmware: str = ""
    firmware_version: str = ""
    can_sleep: bool = False
    power_min_w: float | None = None  # the power-target range, if the firmware takes one
    power_max_w: float | None = None


@dataclass(frozen=True, slots=True)
class SiteFeatures:
    control: bool = False
    budget: bool = False
    grid: bool = False
    max_import_kw: float | None = None  # with control: the override number's maximum


def _entity(
    key: str, component: str, name: str, topic: str, template: str, **extra: Any
) -> tuple[str, str, dict[str, Any]]:
    return key, component, {"name": name, "state_topic": topic, "value_template": template, **extra}


def _command(
    key: str, component: str, name: str, topic: str, **extra: Any
) -> tuple[str, str, dict[str, Any]]:
    """A command entity with no state of its own (a button)."""
    return key, component, {"name": name, "command_topic": topic, **extra}


def _site_entities(
    site: str, f: SiteFeatures, cfg: HomeAssistantConfig
) -> list[tuple[str, str, dict[str, Any]]]:
    st = f"rigd/{site}/state"
    kw = {"device_class": "power", "unit_of_measurement": "kW", "state_class": "measurement"}
    out = [
        _entity("import_power", "sensor", "Import", st, "{{ value_json.import_kw }}", **kw),
        _entity(
            "import_energy",
            "sensor",
            "Import energy",
            st,
            "{{ value_json.import_kwh }}",
            device_class="energy",
            unit_of_measurement="kWh",
            state_class="total_increasing",
        ),
        _entity(
            "meter",
            "binary_sensor",
            "Import meter",
            st,
            "{{ 'ON' if value_json.meter_ok else 'OFF' }}",
            device_class="connectivity",
            entity_category="diagnostic",
        ),
        _entity(
            "hashrate",
            "sensor",
            "Hashrate",
            st,
            "{{ value_json.hashrate_ths }}",
            unit_of_measurement="TH/s",
            state_class="measurement",
            icon="mdi:pickaxe",
        ),
        _entity(
            "rig_power",
            "sensor",
            "Rig power",
            st,
            "{{ value_json.rig_power_kw }}",
            **kw,
        ),
    ]
    for state in RIG_STATES:
        out.append(
            _entity(
                f"rigs_{state}",
                "sensor",
                f"Rigs {state}",
                st,
                f"{{{{ value_json.rigs.{state} }}}}",
                unit_of_measurement="rigs",
                state_class="measurement",
                icon="mdi:server",
            )
        )
    if f.control:
        out.append(_entity("cap", "sensor", "Cap", st, "{{ value_json.cap_kw }}", **kw))
        out.append(
            _entity(
                "cap_source",
                "sensor",
                "Cap source",
                st,
                "{{ value_json.cap_source }}",
                device_class="enum",
                options=list(CAP_SOURCES),  # the one list: metrics and the state document
            )
        )
    if f.control and cfg.switches:
        out.append(
            _entity(
                "override",
                "number",
                "Import cap override",
                st,
                "{{ value_json.override.kw if value_json.override else None }}",
                command_topic=override_topic(site),
                min=0,
                max=f.max_import_kw or 1_000_000,
                step=0.1,
                mode="box",
                unit_of_measurement="kW",
                device_class="power",
                icon="mdi:transmission-tower-import",
            )
        )
        out.append(
            _command(
                "override_clear",
                "button",
                "Clear override",
                override_topic(site),
                payload_press=CLEAR,
                icon="mdi:close-circle-outline",
            )
        )
    if f.budget:
        out.append(
            _entity(
                "budget_used",
                "sensor",
                "Energy budget used",
                st,
                "{{ value_json.budget.used_kwh }}",
                device_class="energy",
                unit_of_measurement="kWh",
                state_class="total_increasing",
            )
        )
        out.append(
            _entity(
                "budget_remaining",
                "sensor",
                "Energy budget left",
                st,
                "{{ value_json.budget.remaining_kwh }}",
                device_class="energy_storage",
                unit_of_measurement="kWh",
                state_class="measurement",
            )
        )
    if f.grid:
        out.append(
            _entity(
                "grid_order",
                "binary_sensor",
                "Grid order active",
                st,
                "{{ 'ON' if value_json.grid is defined and value_json.grid.active else 'OFF' }}",
                icon="mdi:transmission-tower",
            )
        )
    return out


# Keys of a rig's entities that stay available while the rig is unreachable: they say so.
ALWAYS_AVAILABLE = frozenset({"state", "reachable"})


def _rig_entities(
    site: str, rig: RigDevice, cfg: HomeAssistantConfig, f: SiteFeatures
) -> list[tuple[str, str, dict[str, Any]]]:
    st = f"rigd/{site}/rigs/{rig.id}/state"
    out = [
        _entity(
            "power",
            "sensor",
            "Power",
            st,
            "{{ value_json.power_w }}",
            device_class="power",
            unit_of_measurement="W",
            state_class="measurement",
        ),
        _entity(
            "hashrate",
            "sensor",
            "Hashrate",
            st,
            "{{ value_json.hashrate_ths }}",
            unit_of_measurement="TH/s",
            state_class="measurement",
            icon="mdi:pickaxe",
        ),
        _entity(
            "temperature",
            "sensor",
            "Temperature",
            st,
            "{{ value_json.telemetry.temp_c if value_json.telemetry else None }}",
            device_class="temperature",
            unit_of_measurement="°C",
            state_class="measurement",
        ),
        _entity(
            "state",
            "sensor",
            "State",
            st,
            "{{ value_json.state }}",
            device_class="enum",
            options=RIG_STATES,
        ),
        _entity(
            "reachable",
            "binary_sensor",
            "Reachable",
            st,
            "{{ 'ON' if value_json.health.reachable else 'OFF' }}",
            device_class="connectivity",
            entity_category="diagnostic",
        ),
    ]
    if cfg.switches and f.control and rig.can_sleep:
        out.append(
            _entity(
                "mining",
                "switch",
                "Mining",
                st,
                "{{ 'ON' if value_json.state in ['mining', 'waking'] else 'OFF' }}",
                command_topic=command_topic(site, rig.id),
                payload_on="ON",
                payload_off="OFF",
                state_on="ON",
                state_off="OFF",
                optimistic=False,
                icon="mdi:pickaxe",
            )
        )
    if (
        cfg.switches
        and f.control
        and rig.power_min_w is not None
        and rig.power_max_w is not None
        and rig.power_max_w > rig.power_min_w
    ):
        out.append(
            _entity(
                "power_limit",
                "number",
                "Power limit",
                st,
                "{{ value_json.telemetry.power_limit_w if value_json.telemetry else None }}",
                command_topic=power_limit_topic(site, rig.id),
                min=rig.power_min_w,
                max=rig.power_max_w,
                step=1,
                mode="box",
                unit_of_measurement="W",
                device_class="power",
                icon="mdi:speedometer",
            )
        )
    return out


def _origin() -> dict[str, Any]:
    return {"name": "rigd", "sw_version": VERSION}


def _message(
    cfg: HomeAssistantConfig,
    site: str,
    object_id: str,
    component: str,
    body: dict[str, Any],
    device: dict[str, Any],
    rig_state: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """One discovery message: (topic, config payload). With `rig_state` (a rig's state
    topic), the entity is available only while rigd is online *and* the rig reachable."""
    topic = f"{cfg.discovery_prefix}/{component}/{node_id(site)}/{object_id}/config"
    status = f"rigd/{site}/status"
    if rig_state is None:
        availability: dict[str, Any] = {
            "availability_topic": status,
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    else:
        availability = {
            "availability": [
                {
                    "topic": status,
                    "payload_available": "online",
                    "payload_not_available": "offline",
                },
                {
                    "topic": rig_state,
                    "value_template": "{{ 'online' if value_json.health.reachable "
                    "else 'offline' }}",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                },
            ],
            "availability_mode": "all",
        }
    return topic, {
        **body,
        "unique_id": object_id,
        **availability,
        "device": device,
        "origin": _origin(),
    }


def site_discovery(
    site: str, site_name: str, cfg: HomeAssistantConfig, features: SiteFeatures
) -> dict[str, dict[str, Any]]:
    """The site device's discovery messages: topic -> config payload (pure)."""
    node = node_id(site)
    device = {
        "identifiers": [node],
        "name": site_name or f"rigd {site}",
        "manufacturer": "rigd",
        "model": "Mining farm power controller",
        "sw_version": VERSION,
    }
    return dict(
        _message(cfg, site, f"{node}_{key}", component, body, device)
        for key, component, body in _site_entities(site, features, cfg)
    )


def rig_discovery(
    site: str, cfg: HomeAssistantConfig, features: SiteFeatures, rig: RigDevice
) -> dict[str, dict[str, Any]]:
    """One rig's discovery messages: topic -> config payload (pure)."""
    node = node_id(site)
    rig_node = f"{node}_{_UNSAFE.sub('_', rig.id)}"
    device: dict[str, Any] = {"identifiers": [rig_node], "name": rig.id, "via_device": node}
    if rig.make:
        device["manufacturer"] = rig.make
    if rig.model:
        device["model"] = rig.model
    fw = " ".join(x for x in (rig.firmware, rig.firmware_version) if x)
    if fw:
        device["sw_version"] = fw
    st = f"rigd/{site}/rigs/{rig.id}/state"
    return dict(
        _message(
            cfg,
            site,
            f"{rig_node}_{key}",
            component,
            body,
            device,
            None if key in ALWAYS_AVAILABLE else st,
        )
        for key, component, body in _rig_entities(site, rig, cfg, features)
    )


def discovery(
    site: str,
    site_name: str,
    cfg: HomeAssistantConfig,
    features: SiteFeatures,
    rigs: Sequence[RigDevice],
) -> dict[str, dict[str, Any]]:
    """Every discovery message: topic -> config payload (pure)."""
    out = site_discovery(site, site_name, cfg, features)
    if cfg.per_rig:
        for rig in rigs:
            out.update(rig_discovery(site, cfg, features, rig))
    return out


def _encode(msgs: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    return {
        topic: json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        for topic, payload in msgs.items()
    }


class HomeAssistantBridge:
    """Publishes discovery when the farm's shape changes, and takes the switches' commands.

    Each device's messages are kept as published: when one rig's identity changes (rigs
    give theirs at their first reading, a few at a time), only that rig's are rebuilt,
    not the tens of thousands of a large farm on the event loop every cycle."""

    def __init__(self, daemon: HassView, cfg: HomeAssistantConfig) -> None:
        self.daemon = daemon
        self.cfg = cfg
        self.site = daemon.cfg.site.id
        self.link: MqttLink = daemon.link
        self._prefix = f"rigd/{self.site}/rigs/"
        self._signature: tuple[Any, ...] | None = None
        # What is published, kept per device so that one rig's change rebuilds that rig only.
        self._features: SiteFeatures | None = None
        self._site_msgs: dict[str, bytes] = {}
        self._rig_msgs: dict[str, tuple[RigDevice, dict[str, bytes]]] = {}
        self._tasks: set[asyncio.Task[bool]] = set()
        self._next: MessageHandler | None = None
        self._override_topic = override_topic(self.site)
        if cfg.switches:
            # QoS 0: a command sent while rigd was away must not be replayed later.
            if cfg.per_rig:
                self.link.subscribe(f"{self._prefix}+/set", 0)
                self.link.subscribe(f"{self._prefix}+/power_limit/set", 0)
            self.link.subscribe(self._override_topic, 0)
            self._next = self.link.on_message  # the grid service's, if any
            self.link.on_message = self.on_message

    # -- discovery --------------------------------------------------------------------

    def on_cycle(self, result: CycleResult) -> None:
        cfg = self.daemon.cfg
        miners = self.daemon.devices.miners
        rigs = []
        for rid, view in result.snapshot.rigs.items():
            ident = view.telemetry.identity if view.telemetry is not None else None
            driver = miners.get(rid)
            caps = driver.capabilities if driver is not None else None
            targets = caps is not None and caps.can_power_target
            rigs.append(
                RigDevice(
                    rid,
                    ident.make if ident else "",
                    ident.model if ident else "",
                    ident.firmware if ident else "",
                    ident.firmware_version if ident else "",
                    bool(caps is not None and caps.can_sleep),
                    caps.power_target_min_w if caps is not None and targets else None,
                    caps.power_target_max_w if caps is not None and targets else None,
                )
            )
        features = SiteFeatures(
            control=self.daemon.controller is not None,
            budget=cfg.budget is not None and self.daemon.controller is not None,
            grid=self.daemon.grid is not None,
            max_import_kw=cfg.control.max_import_kw
            if cfg.control is not None and self.daemon.controller is not None
            else None,
        )
        signature = (features, tuple(rigs))
        if signature == self._signature:
            return  # the common case: nothing to recompute for thousands of rigs
        self._signature = signature
        link = self.link
        if features != self._features:  # the site's entities, and every rig's switch
            msgs = _encode(site_discovery(self.site, cfg.site.name, self.cfg, features))
            for topic in self._site_msgs.keys() - msgs.keys():
                link.set_retained_raw(topic, b"")  # an empty retained config removes it
            for topic, payload in msgs.items():
                link.set_retained_raw(topic, payload)
            self._site_msgs = msgs
            self._features = features
            rebuild_all = True
        else:
            rebuild_all = False
        old_rigs = self._rig_msgs
        new_rigs: dict[str, tuple[RigDevice, dict[str, bytes]]] = {}
        changed = 0
        for rig in rigs if self.cfg.per_rig else ():
            known = old_rigs.get(rig.id)
            if known is not None and not rebuild_all and known[0] == rig:
                new_rigs[rig.id] = known  # unchanged: not rebuilt, not handed to the link
                continue
            changed += 1
            msgs = _encode(rig_discovery(self.site, self.cfg, features, rig))
            for topic in (known[1].keys() - msgs.keys()) if known is not None else ():
                link.set_retained_raw(topic, b"")
            for topic, payload in msgs.items():
                link.set_retained_raw(topic, payload)
            new_rigs[rig.id] = (rig, msgs)
        for rid in old_rigs.keys() - new_rigs.keys():  # rigs that left the config
            for topic in old_rigs[rid][1]:
                link.set_retained_raw(topic, b"")
        self._rig_msgs = new_rigs
        entities = len(self._site_msgs) + sum(len(m) for _, m in new_rigs.values())
        log.info("hass_discovery_published", entities=entities, rigs=len(rigs), changed=changed)

    # -- the switches -----------------------------------------------------------------

    def rig_of(self, topic: str) -> str | None:
        if topic.startswith(self._prefix) and topic.endswith("/set"):
            rid = topic[len(self._prefix) : -len("/set")]
            if rid and "/" not in rid:
                return rid
        return None

    def power_limit_rig_of(self, topic: str) -> str | None:
        tail = "/power_limit/set"
        if topic.startswith(self._prefix) and topic.endswith(tail):
            rid = topic[len(self._prefix) : -len(tail)]
            if rid and "/" not in rid:
                return rid
        return None

    async def on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload
        raw = payload if isinstance(payload, bytes) else str(payload or "").encode()
        job: Any
        if (rid := self.rig_of(topic)) is not None:
            job, name = self.command(rid, raw), f"hass-{rid}"
        elif (rid := self.power_limit_rig_of(topic)) is not None:
            job, name = self.power_limit(rid, raw), f"hass-limit-{rid}"
        elif topic == self._override_topic:
            job, name = self.override(raw), "hass-override"
        else:
            if self._next is not None:
                await self._next(message)
            return
        # Not awaited here: a sleep takes seconds, and grid orders share this receive loop.
        task = asyncio.create_task(job, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def power_limit(self, rig_id: str, raw: bytes) -> bool:
        """A rig's power limit from its number entity: `rigctl limit WATTS ID`."""
        text = raw.decode("utf-8", errors="replace").strip()
        try:
            watts = float(text)
        except ValueError:
            watts = float("nan")
        if not math.isfinite(watts) or watts <= 0:
            log.warning("hass_command_ignored", rig=rig_id, payload=text[:40], why="not watts")
            return False
        ctl = self.daemon.controller
        if ctl is None:
            log.warning("hass_command_ignored", rig=rig_id, payload=text, why="control is off")
            return False
        try:
            results = await ctl.manual(
                ActionKind.SET_POWER, [rig_id], watts, "Home Assistant power limit", ACTOR
            )
        except ManualRefused as e:
            log.warning("hass_command_refused", rig=rig_id, command="set_power", reason=str(e))
            return False
        except Exception:
            log.exception("hass_command_failed", rig=rig_id, command="set_power")
            return False
        res = results[0]
        log.info("hass_command", rig=rig_id, command="set_power", watts=watts, ok=res.ok)
        return res.ok

    async def override(self, raw: bytes) -> bool:
        """The site's override from its number (kW, for OVERRIDE_S), or its clear button:
        `rigctl budget override KW --for 1h` and `rigctl budget clear`."""
        text = raw.decode("utf-8", errors="replace").strip()
        ctl = self.daemon.controller
        if ctl is None:
            log.warning("hass_command_ignored", command="override", why="control is off")
            return False
        if text.upper() == CLEAR:
            was = ctl.override
            ctl.clear_override()
            ctl.audit_change("budget_clear", None, {}, "Home Assistant: clear override", ACTOR)
            log.info("hass_command", command="override_clear", had_override=was is not None)
            return True
        try:
            kw = float(text)
        except ValueError:
            kw = float("nan")
        if not math.isfinite(kw) or kw < 0:
            log.warning("hass_command_ignored", command="override", payload=text[:40], why="not kW")
            return False
        expires = self.daemon.clock.now() + OVERRIDE_S
        ov = ctl.set_override(kw, expires, "Home Assistant", ACTOR)
        ctl.audit_change(
            "budget_override",
            None,
            {"kw": kw, "expires_at": ov.expires_at},
            "Home Assistant",
            ACTOR,
        )
        log.info("hass_command", command="override", kw=kw, expires_at=ov.expires_at)
        return True

    async def command(self, rig_id: str, raw: bytes) -> bool:
        """Carry out one switch command; True if the rig was commanded."""
        text = raw.decode("utf-8", errors="replace").strip()
        kind = {"ON": ActionKind.WAKE, "OFF": ActionKind.SLEEP}.get(text.upper())
        if kind is None:
            log.warning("hass_command_ignored", rig=rig_id, payload=text[:40], why="not ON/OFF")
            return False
        ctl = self.daemon.controller
        if ctl is None:
            log.warning("hass_command_ignored", rig=rig_id, payload=text, why="control is off")
            return False
        try:
            results = await ctl.manual(kind, [rig_id], None, REASON, ACTOR)
        except ManualRefused as e:
            log.warning("hass_command_refused", rig=rig_id, command=kind.value, reason=str(e))
            return False
        except Exception:  # never let a switch take the daemon down
            log.exception("hass_command_failed", rig=rig_id, command=kind.value)
            return False
        res = results[0]
        log.info("hass_command", rig=rig_id, command=kind.value, ok=res.ok, error=res.error)
        return res.ok

    async def stop(self) -> None:
        """Let commands in progress land: a cut-off command is worse than a late one."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10.0)
