"""Which rig documents go out again: changes at once, wandering readings past a dead band,
everything else at the refresh interval. The policy, then the daemon applying it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controller.config import parse_config
from controller.core.rig_updates import Sent, update_due
from controller.core.snapshot import Health, RigInfo, RigView
from controller.runtime.daemon import Daemon
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from simulators.clock import ManualClock
from simulators.site import SimSite

INFO = RigInfo("r1", "127.0.0.1", 4028, "luxos", None, None)
LUX = RigIdentity("Antminer", "Antminer S19 Pro", "LuxOS", "2025.4.8")


def view(
    *,
    ts: float = 100.0,
    state: RigState = RigState.MINING,
    power: float | None = 3250.0,
    ths: float = 110.0,
    temp: float = 70.0,
    limit: float | None = 3250.0,
    boards: tuple[bool, ...] = (True, True, True),
    reachable: bool = True,
    error: str | None = None,
) -> RigView:
    tel = RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=ths,
        power_w=power,
        power_limit_w=limit,
        temp_c=temp,
        hashboards=tuple(Hashboard(i, ths / 3, temp, active=a) for i, a in enumerate(boards)),
        identity=LUX,
    )
    health = Health(reachable=reachable, last_seen=ts, last_error=error)
    return RigView(INFO, state, tel, health, None, None)


def sent_at(v: RigView, at: float = 0.0) -> Sent:
    return Sent.of(v, at)


def test_first_sight_and_nothing_new() -> None:
    cur = view()
    assert update_due(None, cur, 0, 60)
    assert not update_due(sent_at(cur), cur, 3600, 60)  # the very same reading: never twice


@pytest.mark.parametrize(
    "changed",
    [
        {"state": RigState.SLEEPING},
        {"reachable": False},
        {"error": "no reply within 3 s"},
        {"limit": 2800.0},
        {"boards": (True, False, True)},
        {"power": 3250.0 * 1.03},  # past 2 %
        {"power": None},
        {"ths": 110.0 * 0.97},
        {"temp": 72.5},
    ],
)
def test_what_matters_goes_out_at_once(changed: dict[str, object]) -> None:
    sent = sent_at(view(ts=100))
    assert update_due(sent, view(ts=110, **changed), 10, 60)  # type: ignore[arg-type]


def test_wandering_readings_wait_for_the_refresh() -> None:
    sent = sent_at(view(ts=100))
    drift = view(ts=110, power=3250 * 1.01, ths=110 * 1.015, temp=71.5)
    assert not update_due(sent, drift, 10, 60)
    assert update_due(sent, drift, 60, 60)  # but a rig is never silent for longer
    assert update_due(sent, drift, 10, 0)  # refresh 0: every new reading, as before
    low = view(power=100.0)  # at low power the band is 20 W, not 2 W
    small = sent_at(low)
    assert not update_due(small, dataclasses.replace(low, health=Health(True, 1.0)), 5, 60)
    assert not update_due(small, view(ts=110, power=115.0), 10, 60)
    assert update_due(small, view(ts=110, power=125.0), 10, 60)


async def test_the_daemon_sends_changes_and_refreshes(tmp_path: Path) -> None:
    site = SimSite(rigs=3, pdus=0, clock=ManualClock())
    async with site:
        text = site.config_toml(state_dir=tmp_path)
        cfg = parse_config(text.replace("[mqtt]", "[mqtt]\nrig_refresh_s = 60", 1), environ={})
        daemon = Daemon(cfg, clock=site.clock)
        link = daemon.link

        def sent() -> set[str]:
            topics = {t for t in link._dirty if "/rigs/" in t}
            link._dirty.clear()
            return topics

        try:
            await daemon.cycle()
            assert len(sent()) == 3  # every rig once at the start
            quiet = 0
            for _ in range(5):  # 50 s of steady mining
                site.clock.advance(10)
                await daemon.cycle()
                quiet += 3 - len(sent())
            assert quiet > 0  # small wanderings were not sent
            site.farm.rigs["rig-002"].sleep(site.clock.now())
            site.clock.advance(10)
            await daemon.cycle()
            assert "rigd/sim/rigs/rig-002/state" in sent()  # a state change, at once
            for _ in range(6):
                site.clock.advance(10)
                await daemon.cycle()
                sent()
            refreshed = daemon._published
            assert all(site.clock.now() - s.at <= 60 + 10 for s in refreshed.values())
        finally:
            await daemon.devices.close()
