"""The farm as one frozen value: every rig, meter and PDU as read this cycle.

The runtime's `SiteState` writes readings as they arrive; once a cycle it freezes them
into a `SiteSnapshot`, and everything downstream (the planner, MQTT, the admin API, the
live view) reads that. Values here never change after they are made, so a slow reader
never sees a half-updated farm and a plan can be replayed from a recorded snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from drivers.errors import DeviceError
from drivers.telemetry import MeterReading, PduReading, RigState, RigTelemetry


@dataclass(slots=True)
class Health:
    """Whether a device answers, and if not, since when and why."""

    reachable: bool | None = None  # None: not polled yet
    last_seen: float | None = None  # last valid reading
    last_error: str | None = None
    last_error_kind: str | None = None
    last_error_ts: float | None = None
    consecutive_failures: int = 0

    def ok(self, ts: float) -> None:
        self.reachable = True
        self.last_seen = ts
        self.consecutive_failures = 0

    def failed(self, ts: float, err: BaseException) -> None:
        self.reachable = False
        self.consecutive_failures += 1
        self.last_error_ts = ts
        if isinstance(err, DeviceError):
            self.last_error, self.last_error_kind = str(err), err.kind
        else:
            # Anything else is a bug in a driver: keep it visible, but keep running.
            self.last_error, self.last_error_kind = f"{type(err).__name__}: {err}", "internal"

    def as_dict(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "last_seen": self.last_seen,
            "last_error": self.last_error,
            "last_error_kind": self.last_error_kind,
            "last_error_ts": self.last_error_ts,
            "consecutive_failures": self.consecutive_failures,
        }

    def copy(self) -> Health:
        return Health(
            self.reachable,
            self.last_seen,
            self.last_error,
            self.last_error_kind,
            self.last_error_ts,
            self.consecutive_failures,
        )


@dataclass(frozen=True, slots=True)
class RigInfo:
    """Static facts about a rig, from config."""

    id: str
    host: str
    port: int
    driver: str
    group: str | None
    outlet: tuple[str, int] | None  # (pdu id, outlet number)


@dataclass(frozen=True, slots=True)
class RigView:
    """One rig as the daemon sees it this cycle: telemetry and outlet combined."""

    info: RigInfo
    state: RigState
    telemetry: RigTelemetry | None
    health: Health
    outlet_on: bool | None
    outlet_power_w: float | None

    @property
    def power_w(self) -> float | None:
        """Best power figure: the outlet's meter when the rig is off or silent, else the rig's."""
        if self.outlet_on is False:
            return 0.0
        t = self.telemetry
        if self.health.reachable and t is not None and t.power_w is not None:
            return t.power_w
        return self.outlet_power_w

    @property
    def hashrate_ths(self) -> float:
        t = self.telemetry
        if self.state in (RigState.MINING, RigState.WAKING) and t and t.hashrate_ths:
            return t.hashrate_ths
        return 0.0

    def as_dict(self) -> dict[str, Any]:
        t = self.telemetry
        tele: dict[str, Any] | None = None
        if t is not None:
            tele = {
                "ts": t.ts,
                "hashrate_ths": _r(t.hashrate_ths, 3),
                "power_w": _r(t.power_w, 1),
                "power_limit_w": _r(t.power_limit_w, 1),
                "nominal_hashrate_ths": _r(t.nominal_hashrate_ths, 2),
                "efficiency_j_th": _r(t.efficiency_j_per_th, 2),
                "temp_c": _r(t.temp_c, 1),
                "chip_temp_c": _r(t.chip_temp_c, 1),
                "fans_rpm": list(t.fans_rpm),
                "hashboards": [
                    {
                        "index": b.index,
                        "hashrate_ths": _r(b.hashrate_ths, 3),
                        "temp_c": _r(b.temp_c, 1),
                        "chip_temp_c": _r(b.chip_temp_c, 1),
                        "chips": b.chips,
                        "active": b.active,
                    }
                    for b in t.hashboards
                ],
                "uptime_s": t.uptime_s,
                "make": t.identity.make,
                "model": t.identity.model,
                "firmware": t.identity.firmware,
                "firmware_version": t.identity.firmware_version,
            }
        outlet = None
        if self.info.outlet is not None:
            outlet = {
                "pdu": self.info.outlet[0],
                "number": self.info.outlet[1],
                "on": self.outlet_on,
                "power_w": _r(self.outlet_power_w, 1),
            }
        return {
            "id": self.info.id,
            "state": self.state.value,
            "host": self.info.host,
            "port": self.info.port,
            "driver": self.info.driver,
            "group": self.info.group,
            "power_w": _r(self.power_w, 1),
            "hashrate_ths": _r(self.hashrate_ths, 3),
            "outlet": outlet,
            "telemetry": tele,
            "health": self.health.as_dict(),
        }


def _r(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


@dataclass(frozen=True, slots=True)
class DeviceView:
    id: str
    kind: str  # "meter" or "pdu"
    health: Health
    reading: MeterReading | PduReading | None

    def as_dict(self) -> dict[str, Any]:
        r = self.reading
        doc: dict[str, Any] = {"id": self.id, "kind": self.kind, "health": self.health.as_dict()}
        if isinstance(r, MeterReading):
            doc["reading"] = {
                "ts": r.ts,
                "power_w": _r(r.power_w, 1),
                "import_kwh": _r(r.import_kwh, 3),
                "export_kwh": _r(r.export_kwh, 3),
                "frequency_hz": _r(r.frequency_hz, 2),
                "voltage_v": [_r(v, 1) for v in r.voltage_v],
                "current_a": [_r(a, 2) for a in r.current_a],
            }
        elif isinstance(r, PduReading):
            doc["reading"] = {
                "ts": r.ts,
                "power_w": _r(r.power_w, 1),
                "energy_kwh": _r(r.energy_kwh, 2),
                "outlets": [
                    {"number": o.number, "on": o.on, "name": o.name, "power_w": _r(o.power_w, 1)}
                    for o in r.outlets
                ],
            }
        else:
            doc["reading"] = None
        return doc


@dataclass(frozen=True, slots=True)
class SiteSnapshot:
    """The farm at the end of one poll cycle. Immutable: safe to hand to any consumer."""

    site: str
    ts: float
    cycle: int
    poll_duration_s: float
    rigs: MappingProxyType[str, RigView]
    meters: MappingProxyType[str, DeviceView]
    pdus: MappingProxyType[str, DeviceView]
    import_meter: str | None

    @property
    def import_reading(self) -> MeterReading | None:
        """The import meter's reading, only while the meter answers."""
        if self.import_meter is None:
            return None
        dev = self.meters[self.import_meter]
        r = dev.reading
        if dev.health.reachable and isinstance(r, MeterReading):
            return r
        return None

    def rig_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in RigState}
        for r in self.rigs.values():
            counts[r.state.value] += 1
        return counts

    def site_document(self) -> dict[str, Any]:
        """The retained `state` topic, and each `--headless` demo line."""
        meter = self.import_reading
        # One pass over the rigs (10,000 of them every cycle), not one per figure.
        counts = {s.value: 0 for s in RigState}
        rig_power = hashrate = 0.0
        for r in self.rigs.values():
            counts[r.state.value] += 1
            if (p := r.power_w) is not None:
                rig_power += p
            hashrate += r.hashrate_ths
        # A rig whose outlet is off is silent by design: count only unexplained silence.
        unreachable = {
            "miners": counts[RigState.UNREACHABLE.value],
            "pdus": sum(1 for d in self.pdus.values() if d.health.reachable is False),
            "meters": sum(1 for d in self.meters.values() if d.health.reachable is False),
        }
        return {
            "ts": round(self.ts, 3),
            "site": self.site,
            "cycle": self.cycle,
            "import_kw": None if meter is None else round(meter.power_w / 1000.0, 3),
            "import_kwh": None if meter is None else round(meter.import_kwh, 3),
            "meter_ok": meter is not None,
            "rigs": counts,
            "rigs_total": len(self.rigs),
            "hashrate_ths": round(hashrate, 2),
            "rig_power_kw": round(rig_power / 1000.0, 3),
            "unreachable": unreachable,
            "poll_duration_s": round(self.poll_duration_s, 3),
        }
