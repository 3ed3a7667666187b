"""Commands in flight, against the socket simulator: a technician's command counts as in
flight for the control loop, a stop leaves a command still unanswered to be settled by the
next start, and a burst of slow commands delays the poll only for a while."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.config import parse_config
from controller.core.planner import Action, ActionKind, Mode
from controller.errors import ManualRefused
from controller.runtime import control as control_mod
from controller.runtime.daemon import Daemon
from simulators.clock import ManualClock
from simulators.farm import RigMode
from simulators.site import SimSite


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, SimSite]]:
    site = SimSite(rigs=4, pdus=0, clock=ManualClock())
    async with site:
        extra = "[control]\nmax_import_kw = 100\n"
        text = site.config_toml(state_dir=tmp_path, extra=extra, timeout_s=0.5, interval_s=1.0)
        d = Daemon(parse_config(text, environ={}), clock=site.clock)
        try:
            await d.cycle()
            yield d, site
        finally:
            if d.controller is not None:
                await d.controller.close()
            await d.devices.close()
            if d.store is not None:
                d.store.close()


def slow(site: SimSite, rid: str, seconds: float) -> None:
    server = site.fleet.servers[rid]
    server.slow_s = seconds
    server.fault = "slow"


async def test_a_technicians_command_is_in_flight_for_the_control_loop(
    daemon: tuple[Daemon, SimSite],
) -> None:
    d, site = daemon
    ctl = d.controller
    assert ctl is not None
    slow(site, "rig-001", 0.3)  # under the 0.5 s timeout: late, not lost
    job = asyncio.create_task(ctl.manual(ActionKind.SLEEP, ["rig-001"], None, "fan", "tech"))
    await asyncio.sleep(0.1)
    assert "rig-001" in ctl._inflight  # a cycle now sees the rig busy and leaves it alone
    with pytest.raises(ManualRefused, match="in flight"):
        ctl.check_manual(ActionKind.WAKE, ["rig-001"], None)
    (res,) = await job
    assert res.ok and site.farm.rigs["rig-001"].mode is RigMode.SLEEPING
    assert "rig-001" not in ctl._inflight and "rig-001" in ctl.pinned
    assert ctl.memory["rig-001"].mode is Mode.SLEEP


async def test_a_command_cut_off_at_stop_is_settled_by_the_next_start(
    daemon: tuple[Daemon, SimSite], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    d, site = daemon
    ctl = d.controller
    assert ctl is not None
    monkeypatch.setattr(control_mod, "CLOSE_WAIT_S", 0.2)
    slow(site, "rig-002", 2.0)
    job = asyncio.create_task(ctl.manual(ActionKind.SLEEP, ["rig-002"], None, "fan", "tech"))
    await asyncio.sleep(0.1)
    await ctl.close()  # a stop while the rig has not answered
    with contextlib.suppress(asyncio.CancelledError):
        await job  # the technician's command was cut off with the stop
    assert "rig-002" in ctl._unconfirmed  # neither booked failed nor forgotten
    assert ctl.memory["rig-002"].mode is Mode.SLEEP  # what was asked, to be checked
    assert d.store is not None
    saved = d.store.get("control.inflight")
    assert isinstance(saved, dict) and "rig-002" in saved  # the next start settles it


async def test_a_burst_of_slow_commands_delays_the_poll_only_for_a_while(
    daemon: tuple[Daemon, SimSite],
) -> None:
    d, site = daemon
    ctl = d.controller
    assert ctl is not None
    ex = ctl.executor
    ex._slots = 1  # one slot, so that commands queue
    ex._sem = asyncio.Semaphore(1)
    for rid in ("rig-001", "rig-002", "rig-003"):
        slow(site, rid, 4.0)
    burst = [
        asyncio.create_task(ex.execute(Action(r, ActionKind.SLEEP, "test")))
        for r in ("rig-001", "rig-002", "rig-003")
    ]
    await asyncio.sleep(0)
    assert ex.queued == 2
    snap = await d.poll_cycle()  # waits at most a poll interval (1 s) for the queue
    assert ex.queued > 0  # the poll went ahead while commands still queued
    assert snap.rigs["rig-004"].health.reachable
    for t in burst:
        t.cancel()
    await asyncio.gather(*burst, return_exceptions=True)
