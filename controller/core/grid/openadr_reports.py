"""Reports to an OpenADR 3.1 VTN: what was measured per event interval, and the report
objects rigd posts. Pure: observations and time go in, documents come out.

Payloads (Definition 3.1.0, report enumerations), per event interval id:

- `USAGE`: energy imported during the interval so far, kWh (sample and hold between the
  control loop's observations, as the grid-order compliance figures).
- `DEMAND`: mean import over the observed part of the interval, kW (reading type MEAN).
- `BASELINE`: import just before the interval's order started, kW (the order book's).
- `OPERATING_STATE`: RUNNING_CURTAILED or IDLE_CURTAILED while one of the event's orders
  is active, RUNNING_NORMAL or IDLE_NORMAL otherwise, ERROR without a reading.
- `LOAD_SHED_DELTA_AVAILABLE`: how much the site could shed, kW (the power of its rigs
  still running), sent ahead of the event, one value per upcoming interval (a forecast).

When (the event's report descriptors; User Guide 7.5):
- `frequency` N > 0: a report each time N more intervals have ended;
- `frequency` -1 (the default): one report when the last interval ends;
- `frequency` 0 (ad hoc), no descriptor, or an open-ended event: every
  `report_interval_s` of the config while the event is in force, and one at its end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from controller.core.grid.openadr_events import Event, iso_duration, rfc3339

SUPPORTED = ("USAGE", "DEMAND", "OPERATING_STATE", "BASELINE", "LOAD_SHED_DELTA_AVAILABLE")
_DESCRIPTORS: dict[str, dict[str, Any]] = {
    "USAGE": {"readingType": "DIRECT_READ", "units": "KWH"},
    "DEMAND": {"readingType": "MEAN", "units": "KW"},
    "BASELINE": {"readingType": "DIRECT_READ", "units": "KW"},
    "OPERATING_STATE": {},
    "LOAD_SHED_DELTA_AVAILABLE": {"readingType": "FORECAST", "units": "KW"},
}


@dataclass(slots=True)
class Tally:
    """One event interval's measurements."""

    key: str
    interval_id: int
    start: float
    end: float | None
    energy_kwh: float = 0.0
    seconds: float = 0.0
    last_ts: float | None = None
    last_kw: float | None = None
    baseline_kw: float | None = None
    state: str | None = None

    def observe(self, ts: float, kw: float | None, state: str, max_gap_s: float) -> None:
        """Fold the time since the last observation into the interval (sample and hold);
        a silence longer than `max_gap_s` counts as not observed."""
        end = math.inf if self.end is None else self.end
        if ts < self.start:
            return
        if self.last_ts is not None and self.last_kw is not None:
            t0 = max(self.last_ts, self.start)
            t1 = min(ts, end)
            if t1 > t0 and ts - self.last_ts <= max_gap_s:
                self.energy_kwh += self.last_kw * (t1 - t0) / 3600.0
                self.seconds += t1 - t0
        if ts < end:
            self.last_ts, self.last_kw, self.state = ts, kw, state
        elif self.last_ts is None or self.last_ts < end:
            self.last_ts = end

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        return cls(**d)


def operating_state(*, curtailed: bool, import_kw: float | None, idle_kw: float) -> str:
    if import_kw is None:
        return "ERROR"
    running = import_kw > idle_kw
    if curtailed:
        return "RUNNING_CURTAILED" if running else "IDLE_CURTAILED"
    return "RUNNING_NORMAL" if running else "IDLE_NORMAL"


@dataclass(frozen=True, slots=True)
class ReportPlan:
    types: tuple[str, ...]
    mode: str  # "every_n", "end" or "periodic"
    every_n: int = 0


def report_plan(event: Event, default_types: tuple[str, ...], open_ended: bool) -> ReportPlan:
    """Which reports the event asks for, and when (see the module's docstring)."""
    wanted = [d for d in event.reportDescriptors or () if d.payloadType in SUPPORTED]
    if not wanted:
        return ReportPlan(default_types, "periodic")
    types = tuple(dict.fromkeys(d.payloadType for d in wanted))
    freq = min((d.frequency for d in wanted), key=lambda f: (f <= 0, f))
    if open_ended or freq == 0:
        return ReportPlan(types, "periodic")
    if freq > 0:
        return ReportPlan(types, "every_n", freq)
    return ReportPlan(types, "end")


def report_request(
    *,
    event_id: str,
    client_name: str,
    resource_name: str,
    report_name: str,
    types: tuple[str, ...],
    tallies: list[Tally],
    now: float,
    shed_kw: float | None = None,
) -> dict[str, Any]:
    """A reportRequest (OpenAPI 3.1.0) with one interval per tally, tied to the event's
    interval ids."""
    intervals = []
    for t in tallies:
        end = now if t.end is None else min(t.end, max(now, t.start))
        payloads: list[dict[str, Any]] = []
        for typ in types:
            value: Any = None
            if typ == "USAGE":
                value = round(t.energy_kwh, 4)
            elif typ == "DEMAND":
                if t.seconds > 0:
                    value = round(t.energy_kwh * 3600.0 / t.seconds, 3)
                elif t.last_kw is not None:
                    value = round(t.last_kw, 3)
            elif typ == "BASELINE" and t.baseline_kw is not None:
                value = round(t.baseline_kw, 3)
            elif typ == "OPERATING_STATE" and t.state is not None:
                value = t.state
            elif typ == "LOAD_SHED_DELTA_AVAILABLE" and shed_kw is not None:
                value = round(shed_kw, 3)
            if value is not None:
                payloads.append({"type": typ, "values": [value]})
        if payloads:
            intervals.append(
                {
                    "id": t.interval_id,
                    "intervalPeriod": {
                        "start": rfc3339(t.start),
                        "duration": iso_duration(round(max(0.0, end - t.start), 3))
                        if t.end is not None or now >= t.start
                        else "PT0S",
                    },
                    "payloads": payloads,
                }
            )
    return {
        "eventID": event_id,
        "clientName": client_name,
        "reportName": report_name,
        "payloadDescriptors": [
            {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": t, **_DESCRIPTORS[t]}
            for t in types
        ],
        "resources": [{"resourceName": resource_name, "intervals": intervals}],
    }
