"""A driver that hangs costs its own reading only: one timer per poll ends it
(controller/runtime/watchdog.py), and a cancellation from outside still stops the poll."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bench.sim_harness import OfflineLink
from controller.config import parse_config
from controller.runtime.daemon import Daemon
from controller.runtime.watchdog import ReadWatchdog
from simulators.clock import ScaledClock
from simulators.site import SimSite

GUARD_S = 0.3  # the daemon's guard, made short (it is the driver's timeouts plus 2 s)


async def _hang(ts: float) -> Any:
    await asyncio.Event().wait()  # a driver bug: no timeout of its own


async def _cancelled_inside(ts: float) -> Any:
    raise asyncio.CancelledError  # a library cancelled a future of its own (aiohttp may)


async def _task_cancelled_inside(ts: float) -> Any:
    # A library cancels the task it runs in (grpclib, on losing a connection it made).
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)


async def test_a_hung_read_ends_and_the_poll_goes_on(tmp_path: Path) -> None:
    async with SimSite(rigs=4, pdus=0, clock=ScaledClock(1.0)) as site:
        text = site.config_toml(state_dir=tmp_path / "state", timeout_s=0.5, retries=0)
        d = Daemon(parse_config(text, environ={}), link=OfflineLink("sim"))
        try:
            d._guard_s = GUARD_S
            await d.poll_cycle()
            hung, odd, stray = "rig-002", "rig-003", "rig-004"
            d.devices.miners[hung].read = _hang  # type: ignore[method-assign]
            d.devices.miners[odd].read = _cancelled_inside  # type: ignore[method-assign]
            d.devices.miners[stray].read = _task_cancelled_inside  # type: ignore[method-assign]
            with capture_logs() as logs:
                snap = await asyncio.wait_for(d.poll_cycle(), 5 * GUARD_S + 2)
            h = d.state.rig_health(hung)
            assert h.reachable is False and "no answer within" in (h.last_error or "")
            assert d.state.rig_health(odd).reachable is False
            assert d.state.rig_health(stray).reachable is False
            others = [r for r in site.farm.rigs if r not in (hung, odd, stray)]
            assert all(d.state.rig_health(r).reachable for r in others)
            assert d.state.meter_health("meter-main").reachable
            assert [e["device"] for e in logs if e["event"] == "driver_hung"] == [hung]
            cancelled = {e["device"] for e in logs if e["event"] == "driver_cancelled"}
            assert cancelled == {odd, stray}
            assert snap.rigs[hung].state.value == "unreachable"

            # A cancellation that is not the watchdog's (a stop) still ends the poll.
            poll = asyncio.ensure_future(d.poll_cycle())
            await asyncio.sleep(GUARD_S / 3)
            poll.cancel()
            with pytest.raises(asyncio.CancelledError):
                await poll
        finally:
            if d.controller is not None:
                await d.controller.close()
            await d.devices.close()
            if d.store is not None:
                d.store.close()


async def test_the_watchdog_takes_back_only_its_own_cancellation() -> None:
    with ReadWatchdog(0.05) as guard:

        async def read(outside: bool) -> str:
            task = asyncio.current_task()
            assert task is not None
            guard.begin(task)
            try:
                if outside:  # the watchdog fires and someone else cancels, in one turn
                    time.sleep(0.06)  # noqa: ASYNC251 - past the deadline, for certain
                    guard._check()
                    task.cancel()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if guard.fired(task):
                    return "timed out"
                raise
            finally:
                guard.end(task)
            return "read"

        assert await asyncio.wait_for(read(False), 2) == "timed out"
        other = asyncio.ensure_future(read(True))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(other, 2)
