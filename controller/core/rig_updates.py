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

from controller.core.snapshot import RigView

POWER_BAND = 0.02  # of the last published figure...
POWER_BAND_MIN_W = 20.0  # ...but not less than this
HASHRATE_BAND = 0.02
TEMP_BAND_C = 2.0


def _moved(a: float | None, b: float | None, rel: float, floor: float = 0.0) -> bool:
    if a is None or b is None:
        return a is not b
    return abs(b - a) > max(abs(a) * rel, floor)


def update_due(sent: RigView | None, cur: RigView, age_s: float, refresh_s: float) -> bool:
    """Whether to publish `cur`, `sent` having gone out `age_s` ago. `refresh_s` 0: every
    time the reading is a new one (the behaviour before the dead band)."""
    if sent is None:
        return True
    if (
        sent.telemetry is cur.telemetry
        and sent.state is cur.state
        and (
            sent.health == cur.health
            and sent.outlet_on == cur.outlet_on
            and sent.outlet_power_w == cur.outlet_power_w
        )
    ):
        return False  # nothing new at all (a meters-only cycle)
    if refresh_s <= 0 or age_s >= refresh_s:
        return True
    if (
        sent.state is not cur.state
        or sent.outlet_on != cur.outlet_on
        or sent.health.reachable != cur.health.reachable
        or sent.health.last_error_kind != cur.health.last_error_kind
        or sent.health.last_error != cur.health.last_error
    ):
        return True
    a, b = sent.telemetry, cur.telemetry
    if a is None or b is None:
        return a is not b
    if (
        a.power_limit_w != b.power_limit_w
        or a.identity != b.identity
        or [h.active for h in a.hashboards] != [h.active for h in b.hashboards]
    ):
        return True
    return (
        _moved(sent.power_w, cur.power_w, POWER_BAND, POWER_BAND_MIN_W)
        or _moved(a.hashrate_ths, b.hashrate_ths, HASHRATE_BAND)
        or _moved(a.temp_c, b.temp_c, 0.0, TEMP_BAND_C)
        or _moved(a.chip_temp_c, b.chip_temp_c, 0.0, TEMP_BAND_C)
    )
