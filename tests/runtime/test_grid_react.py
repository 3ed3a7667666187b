"""A grid order does not wait for the poll in progress: on a farm of thousands of rigs a full
poll takes seconds, so an order that changes the limits cuts it short and control acts on
the readings it has (the rigs not yet read keep the last cycle's).

Here two rigs answer their reads 4.5 s late, so every poll lasts that long; the order comes
while they are being read, and every other rig must be commanded to sleep, and have
acknowledged it, before those two reads would even have finished.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt

from controller.config import parse_config
from controller.runtime.daemon import Daemon
from simulators.site import SimSite
from tests.conftest import Mosquitto, watch
from tests.grid_helpers import Operator, grid_toml, order

SLOW_S = 4.5


async def test_an_order_cuts_the_poll_in_progress_short(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    op = Operator.new()
    async with SimSite(rigs=8, pdus=0) as site:
        full = site.nominal_import_kw()
        text = site.config_toml(
            broker_url=mosquitto.url,
            state_dir=tmp_path / "state",
            interval_s=6.0,
            timeout_s=5.5,
            retries=0,
            extra=f"[control]\nmax_import_kw = {round(full * 1.2)}\n" + grid_toml(op),
        )
        cfg = parse_config(text, environ={})
        daemon = Daemon(cfg, clock=site.clock)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            async with watch(mosquitto.host, mosquitto.port) as w:
                await w.wait_json("rigd/sim/state", lambda d: d["rigs"]["mining"] == 8)
                slow = [site.fleet.servers[r] for r in ("rig-001", "rig-002")]
                for srv in slow:
                    srv.slow_s = SLOW_S
                    await srv.set_fault("slow")
                asked = slow[0].requests
                for _ in range(1000):  # until the next poll is reading the slow rigs
                    if slow[0].requests != asked:
                        break
                    await asyncio.sleep(0.02)
                read_started = time.monotonic()
                msg = order(
                    now=site.clock.now(),
                    target={"max_import_kw": 1.0},  # below anything: every rig must sleep
                    respond_within_s=60,
                )
                async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                    await client.publish("rigd/sim/grid/orders", op.sign(msg), qos=1)
                fast = {f"rig-00{n}" for n in range(3, 9)}
                slept: set[str] = set()
                assert daemon.store is not None
                while not fast <= slept and time.monotonic() < read_started + SLOW_S:
                    await asyncio.sleep(0.02)
                    slept = {
                        e.rig_id or ""
                        for e in daemon.store.audit_since(0)
                        if e.action == "sleep" and e.result == "ok"
                    }
                assert fast <= slept, f"only {sorted(slept)} slept while the poll went on"
                assert time.monotonic() < read_started + SLOW_S  # the slow reads still pending
                await w.wait_json("rigd/sim/state", lambda d: d["cap_source"] == "grid")
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
