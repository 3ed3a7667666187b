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
import math
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.live import Live

from controller.adapters.broker import EmbeddedBroker
from controller.adapters.grid.sign import KeyPair, build, generate, send, sign
from controller.cli.common import install_stop
from controller.cli.demo_pace import Pace
from controller.cli.liveview import render
from controller.cli.logs import configure_logging
from controller.config import parse_config
from controller.core.status import CycleResult
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite, poll_timeouts

log = structlog.get_logger(__name__)


async def _stage_farm(site: SimSite) -> list[str]:
    """A real farm is never all healthy: one rig is switched off at its outlet (a spare
    awaiting repair) and one has a control board that stopped answering. Returns both."""
    rigs = list(site.farm.rigs)
    if len(rigs) < 4:
        return []
    spare = rigs[-1]
    where = site.farm.outlet_of(spare)
    if where is not None:
        site.farm.pdus[where[0]].switch(where[1], "off", site.farm.now())
    # Mid-farm, on a 4028 simulator (every dialect but the Whatsminers has one).
    hung = next((r for r in rigs[len(rigs) // 2 :] if r in site.fleet.servers), None)
    if hung is not None:
        await site.fleet.servers[hung].set_fault("silent")
    return [spare] + ([hung] if hung is not None else [])


async def _until_farm_time(clock: ScaledClock, t: float, stop: asyncio.Event) -> bool:
    """Wait until farm time `t`, however the clock's speed changes meanwhile; False if
    stopped first. The demo's story is told in farm time (controller/demo_pace.py)."""
    while not stop.is_set():
        left = t - clock.now()
        if left <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(left / clock.speed, 0.5))
    return False


async def _stop_at_farm_time(clock: ScaledClock, t: float | None, stop: asyncio.Event) -> None:
    if t is not None and await _until_farm_time(clock, t, stop):
        stop.set()


SCRIPT_PERIOD_S = 180.0  # wall seconds the cap script spans when no --duration is given


def _control_toml(site: SimSite, args: argparse.Namespace) -> str:
    """The demo site's contract: room for the whole farm, brisk dwell times to watch."""
    full = site.nominal_import_kw()
    return f"""
[control]
max_import_kw = {math.ceil(full * 1.1)}
headroom_pct = 2
deadband_pct = 3
ramp_kw_per_interval = {math.ceil(full * 0.2)}
min_on_s = 60
min_off_s = 60
escalate_after_s = 60
"""


def _grid_toml(operator: KeyPair) -> str:
    """Signed orders only, as in production: the demo plays the operator with its own key."""
    pem = operator.public_pem.decode().strip()
    return f"""
[grid]
allow_unsigned = false
report_interval_s = 5

[[grid.keys]]
kid = "demo-operator"
alg = "EdDSA"
public_key = \"\"\"
{pem}
\"\"\"
"""


HISTORY_STEPS_S = (1, 2, 5, 10, 15, 20, 30, 60)  # divide the 15-minute rollup


def _exports_toml(args: argparse.Namespace) -> str:
    """--metrics serves Prometheus metrics; history is kept at the poll interval (up to a
    minute), so the --report of a short run still has a point per cycle."""
    step = max(s for s in HISTORY_STEPS_S if s <= max(1.0, args.interval))
    out = f"\n[history]\nstep_s = {step}\n"
    if args.metrics:
        out += f"\n[metrics]\nenabled = true\nlisten = {json.dumps(args.metrics)}\n"
    return out


async def _write_report(args: argparse.Namespace, state_dir: Path, console: Console) -> int:
    """The report of the run, from the history the daemon kept in its state database."""
    from controller.adapters.history import HistoryError, read, read_orders
    from controller.cli.report import ReportError, write_report

    out = Path(args.report)
    title = f"rigd demo: {args.rigs} rigs on {args.pdus} PDUs, farm clock x{args.speed:g}"
    try:
        rows = await asyncio.to_thread(read, state_dir / "rigd.sqlite", 0.0)
        book = await asyncio.to_thread(read_orders, state_dir / "rigd.sqlite")
        await asyncio.to_thread(write_report, rows, out, title, None, book)
    except (HistoryError, ReportError, OSError) as e:
        log.error("demo_report_failed", path=str(out), error=str(e))
        if not args.headless:
            console.print(f"[red]report not written: {e}[/red]")
        return 1
    log.info("demo_report_written", path=str(out), steps=len(rows))
    if not args.headless:
        console.print(f"report of the run: {out}")
    return 0


async def _script(
    daemon: Daemon,
    args: argparse.Namespace,
    stop: asyncio.Event,
    operator: KeyPair,
    clock: ScaledClock,
    t0: float,
    measured: deque[dict[str, Any]],
) -> None:
    """A third of the way in, the grid operator orders the farm down to about half of its
    load for a third of the run, sent as a signed order over MQTT exactly as a dispatch
    system would (rigctl grid send does the same); rigd acknowledges, complies, reports
    and, when the order ends, brings the rigs back gradually. In farm time from `t0`, so a
    demo slowed down on a busy machine tells the same story."""
    ctl = daemon.controller
    if ctl is None:
        return
    span = args.duration or SCRIPT_PERIOD_S

    if not await _until_farm_time(clock, t0 + span / 3 * args.speed, stop):
        return
    # The last import measured: on a machine that cannot keep up, the last cycle's meter
    # read may have timed out, and half the site maximum is not half the load.
    load = next(
        (d["import_kw"] for d in reversed(measured) if d.get("import_kw") is not None), None
    )
    kw = round((load or ctl.control.max_import_kw) * 0.5, 1)
    now = daemon.clock.now()
    msg = build(
        "curtail",
        daemon.cfg.site.id,
        now=now,
        ttl_s=600 * args.speed,
        iss="demo dispatch",
        order_id=f"demo-{int(now)}",
        target={"max_import_kw": kw},
        duration_s=round(span / 3 * args.speed),
        respond_within_s=round(max(60.0, 3 * args.interval)),
    )
    key = serialization.load_pem_private_key(operator.private_pem, password=None)
    token = sign(msg, key, "EdDSA", "demo-operator").encode()
    try:
        ack = await send(daemon.cfg.mqtt, daemon.cfg.site.id, token, wait_s=10.0)
    except (aiomqtt.MqttError, OSError) as e:  # the demo goes on: the failure is logged
        log.error("demo_order_not_sent", error=str(e))
        return
    log.info("demo_order_acknowledged", ack=ack)


async def run_demo(args: argparse.Namespace) -> int:
    if args.report and Path(args.report).suffix.lower() not in (".png", ".html"):
        raise ValueError(f"--report writes FILE.png or FILE.html, not {args.report!r}")
    state_dir = Path(tempfile.mkdtemp(prefix="rigd-demo-"))
    log_path = state_dir / "rigd.log"
    log_file = None
    if args.headless:
        configure_logging(args.log_level, json=True, stream=sys.stderr)
    else:
        # The live view owns the terminal; logs go to a file shown at the end.
        log_file = log_path.open("a", encoding="utf-8")
        configure_logging(args.log_level, json=True, stream=log_file)

    site = SimSite(rigs=args.rigs, pdus=args.pdus, speed=args.speed, seed=args.seed, mix=args.mix)
    operator = generate("EdDSA")  # the demo's grid operator, a fresh key each run
    broker: EmbeddedBroker | None = None
    console = Console()
    try:
        await site.start()
        staged = await _stage_farm(site)
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
                extra=_control_toml(site, args) + _grid_toml(operator) + _exports_toml(args),
                # The embedded broker (amqtt) speaks MQTT 3.1.1 only.
                mqtt_protocol="5" if args.broker else "3.1.1",
            ),
            source="<demo>",
            environ={},
        )
        stop = asyncio.Event()
        install_stop(stop)
        clock = site.clock
        assert isinstance(clock, ScaledClock)  # SimSite(speed=...) runs one
        t0 = clock.now()
        # --duration is wall seconds at --speed: farm seconds, if the demo must slow down.
        end = None if args.duration is None else t0 + args.duration * args.speed
        pace = Pace(args.speed, silent=staged)
        note: list[str] = []
        recent: deque[dict[str, Any]] = deque(maxlen=10)  # the last cycles' documents

        async def keep_pace(daemon: Daemon, result: CycleResult) -> None:
            recent.append(result.document)
            slowed = pace.judge(result.snapshot)
            if slowed is None:
                return
            log.warning(
                "demo_cannot_keep_up",
                message=slowed.message(),
                farm_ts=result.snapshot.ts,
                speed=slowed.new_speed,
                was=slowed.old_speed,
                timed_out=list(slowed.timed_out[:10]),
            )
            note[:] = [slowed.message()]
            clock.set_speed(slowed.new_speed)
            await daemon.set_poll_timeouts(*poll_timeouts(args.interval / slowed.new_speed))

        if args.headless:

            async def on_snapshot(result: CycleResult) -> None:
                print(json.dumps(result.document, separators=(",", ":")), flush=True)
                await keep_pace(daemon, result)

            daemon = Daemon(cfg, clock=clock, on_snapshot=on_snapshot, dry_run=args.dry_run)
            await asyncio.gather(
                daemon.run(stop),
                _stop_at_farm_time(clock, end, stop),
                _script(daemon, args, stop, operator, clock, t0, recent),
            )
        else:
            with Live(console=console, auto_refresh=False, screen=False) as live:

                async def on_live(result: CycleResult) -> None:
                    await keep_pace(daemon, result)
                    view = render(result, broker=url, speed=clock.speed, note=" ".join(note))
                    live.update(view, refresh=True)

                daemon = Daemon(cfg, clock=clock, on_snapshot=on_live, dry_run=args.dry_run)
                await asyncio.gather(
                    daemon.run(stop),
                    _stop_at_farm_time(clock, end, stop),
                    _script(daemon, args, stop, operator, clock, t0, recent),
                )
            console.print()
            if note:
                console.print(f"[bold red]{note[0]}[/bold red]")
            console.print(f"demo stopped; daemon log: {log_path}")
        if args.report:
            return await _write_report(args, state_dir, console)
    finally:
        if broker is not None:
            await broker.stop()
        await site.stop()
        if log_file is not None:
            with contextlib.suppress(OSError):
                log_file.close()
    return 0
