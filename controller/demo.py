"""`rigd demo`: a simulated farm, a broker and the daemon in one process, on embedded defaults.

The daemon here is the production one, reading the farm over the real device
protocols on loopback and publishing on a real MQTT broker; only the farm is
simulated, and its clock may run faster than the wall clock (`--speed`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.live import Live

from controller.broker import EmbeddedBroker
from controller.cli import _install_stop, _stop_after
from controller.config import parse_config
from controller.daemon import Daemon
from controller.liveview import render
from controller.logs import configure_logging
from controller.state import SiteSnapshot
from simulators.site import SimSite, poll_timeouts


async def _stage_farm(site: SimSite) -> None:
    """A real farm is never all healthy: one rig is switched off at its outlet (a spare
    awaiting repair) and one has a control board that stopped answering."""
    rigs = list(site.farm.rigs)
    if len(rigs) < 4:
        return
    spare, hung = rigs[-1], rigs[len(rigs) // 2]
    where = site.farm.outlet_of(spare)
    if where is not None:
        site.farm.pdus[where[0]].switch(where[1], "off", site.farm.now())
    await site.fleet.servers[hung].set_fault("silent")


async def run_demo(args: argparse.Namespace) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="rigd-demo-"))
    log_path = state_dir / "rigd.log"
    log_file = None
    if args.headless:
        configure_logging(args.log_level, json=True, stream=sys.stderr)
    else:
        # The live view owns the terminal; logs go to a file shown at the end.
        log_file = log_path.open("a", encoding="utf-8")
        configure_logging(args.log_level, json=True, stream=log_file)

    site = SimSite(rigs=args.rigs, pdus=args.pdus, speed=args.speed, seed=args.seed)
    broker: EmbeddedBroker | None = None
    console = Console()
    try:
        await site.start()
        await _stage_farm(site)
        if args.broker:
            url = args.broker
        else:
            broker = EmbeddedBroker()
            await broker.start()
            url = broker.url
        # Timeouts are wall-clock; keep a silent device well inside one (scaled) interval.
        timeout_s, retries = poll_timeouts(args.interval / args.speed)
        cfg = parse_config(
            site.config_toml(
                site_id="demo",
                broker_url=url,
                state_dir=state_dir,
                interval_s=args.interval,
                timeout_s=timeout_s,
                retries=retries,
            ),
            source="<demo>",
            environ={},
        )
        stop = asyncio.Event()
        _install_stop(stop)

        if args.headless:

            def on_snapshot(snap: SiteSnapshot) -> None:
                print(json.dumps(snap.site_document(), separators=(",", ":")), flush=True)

            daemon = Daemon(cfg, clock=site.clock, on_snapshot=on_snapshot)
            await asyncio.gather(daemon.run(stop), _stop_after(stop, args.duration))
        else:
            with Live(console=console, auto_refresh=False, screen=False) as live:

                def on_live(snap: SiteSnapshot) -> None:
                    live.update(render(snap, broker=url, speed=args.speed), refresh=True)

                daemon = Daemon(cfg, clock=site.clock, on_snapshot=on_live)
                await asyncio.gather(daemon.run(stop), _stop_after(stop, args.duration))
            console.print()
            console.print(f"demo stopped; daemon log: {log_path}")
    finally:
        if broker is not None:
            await broker.stop()
        await site.stop()
        if log_file is not None:
            with contextlib.suppress(OSError):
                log_file.close()
    return 0
