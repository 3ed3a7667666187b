"""What the daemon knows about the farm: the latest reading and the health of every device.

Pollers write into `SiteState`; everything downstream (MQTT, the live view,
later the planner) reads an immutable `SiteSnapshot` taken once per cycle, so a
slow publisher never sees a half-updated farm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from controller.core.snapshot import DeviceView, Health, RigInfo, RigView, SiteSnapshot
from controller.runtime.devices import Devices
from drivers.telemetry import MeterReading, OutletReading, PduReading, RigState, RigTelemetry

HISTORY = 50  # state changes kept per rig


@dataclass(slots=True)
class _Device:
    health: Health = field(default_factory=Health)
    reading: Any = None
    # A PDU's outlets by number, made once per reading: a snapshot looks up every rig's
    # outlet, and a scan of 24 outlets for each of 10,000 rigs was a cost every cycle.
    outlets: dict[int, OutletReading] = field(default_factory=dict)


class SiteState:
    """Mutable store the pollers write to; `snapshot()` freezes it for everyone else."""

    def __init__(
        self,
        site: str,
        rigs: list[RigInfo],
        meters: list[str],
        pdus: list[str],
        import_meter: str | None,
    ) -> None:
        self.site = site
        self.rig_info = {r.id: r for r in rigs}
        self._rigs = {r.id: _Device() for r in rigs}
        self._meters = {m: _Device() for m in meters}
        self._pdus = {p: _Device() for p in pdus}
        self.import_meter = import_meter
        self.cycle = 0
        # Recent state changes per rig, for `rigctl rig`: bounded, in memory only. Lists,
        # not deques: most rigs hold one entry, and an empty deque alone is 600 bytes.
        self.history: dict[str, list[tuple[float, str]]] = {r.id: [] for r in rigs}

    @classmethod
    def of(cls, site: str, devices: Devices) -> SiteState:
        """The state of a farm as configured: every device known, none read yet."""
        return cls(
            site, devices.rigs, list(devices.meters), list(devices.pdus), devices.import_meter
        )

    # writers ------------------------------------------------------------------

    def rig_health(self, rig_id: str) -> Health:
        return self._rigs[rig_id].health

    def meter_health(self, meter_id: str) -> Health:
        return self._meters[meter_id].health

    def pdu_health(self, pdu_id: str) -> Health:
        return self._pdus[pdu_id].health

    def rig_ok(self, rig_id: str, t: RigTelemetry) -> None:
        d = self._rigs[rig_id]
        d.reading = t
        d.health.ok(t.ts)

    def rig_failed(self, rig_id: str, ts: float, err: BaseException) -> None:
        self._rigs[rig_id].health.failed(ts, err)

    def meter_ok(self, meter_id: str, r: MeterReading) -> None:
        d = self._meters[meter_id]
        d.reading = r
        d.health.ok(r.ts)

    def meter_failed(self, meter_id: str, ts: float, err: BaseException) -> None:
        self._meters[meter_id].health.failed(ts, err)

    def pdu_ok(self, pdu_id: str, r: PduReading) -> None:
        d = self._pdus[pdu_id]
        d.reading = r
        d.outlets = {o.number: o for o in r.outlets}
        d.health.ok(r.ts)

    def pdu_failed(self, pdu_id: str, ts: float, err: BaseException) -> None:
        self._pdus[pdu_id].health.failed(ts, err)

    # the frozen view ------------------------------------------------------------

    def _outlet(self, info: RigInfo) -> tuple[bool | None, float | None]:
        if info.outlet is None:
            return None, None
        pdu_id, number = info.outlet
        dev = self._pdus.get(pdu_id)
        if dev is None or not dev.health.reachable or not isinstance(dev.reading, PduReading):
            return None, None
        o = dev.outlets.get(number)
        return (None, None) if o is None else (o.on, o.power_w)

    def adopt(self, old: SiteState) -> None:
        """Carry readings, health and history over from before a reload, device by device."""
        self.cycle = old.cycle
        for mine, theirs in (
            (self._rigs, old._rigs),
            (self._meters, old._meters),
            (self._pdus, old._pdus),
        ):
            for k, dev in mine.items():
                if k in theirs:
                    dev.reading, dev.health = theirs[k].reading, theirs[k].health
                    dev.outlets = theirs[k].outlets
        for k, h in old.history.items():
            if k in self.history:
                self.history[k] = (h + self.history[k])[-HISTORY:]

    def outlet_known_off(self, rig_id: str) -> bool:
        info = self.rig_info.get(rig_id)
        return info is not None and self._outlet(info)[0] is False

    def _rig_view(self, info: RigInfo) -> RigView:
        d = self._rigs[info.id]
        outlet_on, outlet_w = self._outlet(info)
        tele: RigTelemetry | None = d.reading
        if outlet_on is False:
            state = RigState.OFF
        elif d.health.reachable and tele is not None:
            state = tele.state
        else:
            state = RigState.UNREACHABLE
        return RigView(info, state, tele, d.health.copy(), outlet_on, outlet_w)

    def snapshot(self, ts: float, poll_duration_s: float) -> SiteSnapshot:
        def devs(kind: str, src: dict[str, _Device]) -> MappingProxyType[str, DeviceView]:
            return MappingProxyType(
                {k: DeviceView(k, kind, d.health.copy(), d.reading) for k, d in src.items()}
            )

        rigs: dict[str, RigView] = {}
        history = self.history
        for k, info in self.rig_info.items():
            view = rigs[k] = self._rig_view(info)
            h = history[k]
            if not h or h[-1][1] != view.state.value:
                h.append((ts, view.state.value))
                if len(h) > HISTORY:
                    del h[0]
        return SiteSnapshot(
            site=self.site,
            ts=ts,
            cycle=self.cycle,
            poll_duration_s=poll_duration_s,
            rigs=MappingProxyType(rigs),
            meters=devs("meter", self._meters),
            pdus=devs("pdu", self._pdus),
            import_meter=self.import_meter,
        )
