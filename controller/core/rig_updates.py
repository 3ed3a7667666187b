"""When a rig's retained MQTT document is worth sending again.

A miner's readings move a little at every poll (the hashrate is a 5-second average, power
and temperatures wander), so "publish what changed" alone still sends every rig every
cycle: at 10,000 rigs that is 1,000 messages and 0.9 MB a second to the broker, often over
the site's only uplink. A rig is therefore republished at once when something a person or
an automation acts on changes (state, reachability, error, outlet, power limit, identity,
hashboards going down), when power, hashrate or temperature move past a small dead band,
and otherwise at least every `mqtt.rig_refresh_s`, so that its `ts` shows it is watched.
The site document (`rigd/<site>/state`) still goes out every cycle, and metrics are not
affected: they are read from the daemon's snapshot, not from MQTT.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.core.snapshot import Health, RigView
from drivers.telemetry import RigIdentity, RigState

POWER_BAND = 0.02  # of the last published figure...
POWER_BAND_MIN_W = 20.0  # ...but not less than this
HASHRATE_BAND = 0.02
TEMP_BAND_C = 2.0


@dataclass(frozen=True, slots=True)
class Sent:
    """What `update_due` compares of the document last sent for a rig, and when it went
    out: a few numbers, not the sent `RigView`, whose reading (hashboards, fans) would stay
    alive a whole refresh interval beside the current one (1.5 KB a rig, 15 MB at 10,000)."""

    at: float  # when it was sent
    reading_ts: float | None  # the reading it carried (None: none); a new reading, a new ts
    state: RigState
    health: Health  # the snapshot's own copy: never changed after
    outlet_on: bool | None
    outlet_power_w: float | None
    power_w: float | None
    power_limit_w: float | None
    identity: RigIdentity | None
    boards_active: tuple[bool, ...]
    hashrate_ths: float | None
    temp_c: float | None
    chip_temp_c: float | None

    @classmethod
    def of(cls, view: RigView, at: float) -> Sent:
        t = view.telemetry
        return cls(
            at,
            None if t is None else t.ts,
            view.state,
            view.health,
            view.outlet_on,
            view.outlet_power_w,
            view.power_w,
            None if t is None else t.power_limit_w,
            None if t is None else t.identity,
            () if t is None else tuple(h.active for h in t.hashboards),
            None if t is None else t.hashrate_ths,
            None if t is None else t.temp_c,
            None if t is None else t.chip_temp_c,
        )


def _moved(a: float | None, b: float | None, rel: float, floor: float = 0.0) -> bool:
    if a is None or b is None:
        return a is not b
    return abs(b - a) > max(abs(a) * rel, floor)


def update_due(sent: Sent | None, cur: RigView, now: float, refresh_s: float) -> bool:
    """Whether to publish `cur` at `now`, `sent` being what went out last. `refresh_s` 0:
    every time the reading is a new one (the behaviour before the dead band)."""
    if sent is None:
        return True
    b = cur.telemetry
    if (
        sent.reading_ts == (None if b is None else b.ts)
        and sent.state is cur.state
        and (
            sent.health == cur.health
            and sent.outlet_on == cur.outlet_on
            and sent.outlet_power_w == cur.outlet_power_w
        )
    ):
        return False  # nothing new at all (a meters-only cycle)
    if refresh_s <= 0 or now - sent.at >= refresh_s:
        return True
    if (
        sent.state is not cur.state
        or sent.outlet_on != cur.outlet_on
        or sent.health.reachable != cur.health.reachable
        or sent.health.last_error_kind != cur.health.last_error_kind
        or sent.health.last_error != cur.health.last_error
    ):
        return True
    if sent.reading_ts is None or b is None:
        return (sent.reading_ts is None) is not (b is None)
    if (
        sent.power_limit_w != b.power_limit_w
        or sent.identity != b.identity
        or sent.boards_active != tuple(h.active for h in b.hashboards)
    ):
        return True
    return (
        _moved(sent.power_w, cur.power_w, POWER_BAND, POWER_BAND_MIN_W)
        or _moved(sent.hashrate_ths, b.hashrate_ths, HASHRATE_BAND)
        or _moved(sent.temp_c, b.temp_c, 0.0, TEMP_BAND_C)
        or _moved(sent.chip_temp_c, b.chip_temp_c, 0.0, TEMP_BAND_C)
    )
