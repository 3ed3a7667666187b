"""A host whose cores are busy must not make answering rigs look silent.

An edge host is rarely idle. When other processes (or a flood of its own work) keep the
event loop from running, a reply that came in time is read after its timeout has fired.
Here the loop is starved for real: a task blocks it (as a busy core would) while every
rig's request is in flight, over real sockets to the simulated miners.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from structlog.testing import capture_logs

from bench.sim_harness import OfflineLink
from controller.config import parse_config
from controller.runtime.daemon import STARVED_MISSES, Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite

TIMEOUT_S = 0.3
SLOW_S = 0.1  # how late the miners answer: a third of the timeout


async def _close(d: Daemon) -> None:
    """What `Daemon.run` does on stop, for a daemon driven cycle by cycle."""
    if d.controller is not None:
        await d.controller.close()
    await d.devices.close()
    if d.store is not None:
        d.store.close()


async def _poll_starved(d: Daemon, block_s: float) -> None:
    """One poll during which the loop is held for `block_s` once the reads are in flight
    (the miners answer in `SLOW_S`, well within the timeout, had the loop run)."""

    async def hog() -> None:
        await asyncio.sleep(SLOW_S / 4)  # the requests are out, the answers on their way
        time.sleep(block_s)  # noqa: ASYNC251 - the point: a loop that cannot run

    hogging = asyncio.create_task(hog())
    await d.poll_cycle()
    await hogging


async def test_timeouts_while_the_loop_was_starved_keep_the_rigs(tmp_path: Path) -> None:
    async with SimSite(rigs=3, pdus=0, clock=ScaledClock(1.0)) as site:
        text = site.config_toml(
            state_dir=tmp_path / "state", interval_s=10.0, timeout_s=TIMEOUT_S, retries=0
        )
        d = Daemon(parse_config(text, environ={}), link=OfflineLink("sim"))
        try:
            await d.poll_cycle()
            assert all(d.state.rig_health(r).reachable for r in site.farm.rigs)
            for server in site.fleet.servers.values():
                server.slow_s = SLOW_S
                await server.set_fault("slow")
            site.meter.slow_s, site.meter.fault = SLOW_S, "slow"
            with capture_logs() as logs:
                for _ in range(STARVED_MISSES):
                    await _poll_starved(d, 3 * TIMEOUT_S)
            health = [d.state.rig_health(r) for r in site.farm.rigs]
            assert all(h.reachable for h in health), [h.last_error for h in health]
            # The meter is never trusted on an old reading: read again at once, it answered.
            assert d.state.meter_health("meter-main").reachable
            assert sum(e["event"] == "meter_read_again" for e in logs) == STARVED_MISSES
            starved = [e for e in logs if e["event"] == "poll_starved"]
            assert len(starved) == STARVED_MISSES and starved[0]["devices"] == 3

            # A starved host does not hide a silent rig for ever: one more miss marks it.
            await _poll_starved(d, 3 * TIMEOUT_S)
            assert not any(d.state.rig_health(r).reachable for r in site.farm.rigs)

            # And a good read starts the count again.
            await d.poll_cycle()
            assert all(d.state.rig_health(r).reachable for r in site.farm.rigs)
            await _poll_starved(d, 3 * TIMEOUT_S)
            assert all(d.state.rig_health(r).reachable for r in site.farm.rigs)
        finally:
            await _close(d)


async def test_a_silent_rig_on_a_host_that_keeps_up_is_unreachable_at_once(
    tmp_path: Path,
) -> None:
    async with SimSite(rigs=2, pdus=0, clock=ScaledClock(1.0)) as site:
        text = site.config_toml(
            state_dir=tmp_path / "state", interval_s=10.0, timeout_s=TIMEOUT_S, retries=0
        )
        d = Daemon(parse_config(text, environ={}), link=OfflineLink("sim"))
        try:
            await d.poll_cycle()
            await site.fleet.servers["rig-001"].set_fault("silent")
            await d.poll_cycle()
            assert d.state.rig_health("rig-001").reachable is False
            assert d.state.rig_health("rig-002").reachable is True
        finally:
            await _close(d)
