"""`rigd run` as its own process, on a simulated farm's accelerated clock (runtime/test_faults).

The storm test must SIGKILL the daemon, so the daemon is a process; and it must run
minutes of farm time in seconds, so the process runs the real `Daemon` on the farm's
`ScaledClock` (the host's monotonic clock is shared between processes, so the parent's
farm and this daemon keep one time). A `SteppedWall` lets the test step the daemon's wall
clock: SIGUSR1 steps it by `--usr1-step-s`, and `--wall-offset-s` starts it stepped (as
if NTP had corrected the clock while the daemon was down).

    python -m tests.storm_daemon -c rigd.toml --speed 20 --start T --mono-origin M --boot B
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import structlog

from controller.cli.logs import configure_logging
from controller.config import load_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock, SteppedWall

log = structlog.get_logger("storm_daemon")


async def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, environ={})
    base = ScaledClock(args.speed, args.start, mono_origin=args.mono_origin, boot_id=args.boot)
    wall = SteppedWall(base, args.wall_offset_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def step() -> None:
        wall.step(args.usr1_step_s)
        log.info("test_wall_stepped", step_s=args.usr1_step_s, offset_s=wall.offset_s)

    loop.add_signal_handler(signal.SIGUSR1, step)
    daemon = Daemon(cfg, clock=wall, config_path=args.config)
    await daemon.run(stop)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--speed", type=float, required=True)
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--mono-origin", type=float, required=True)
    p.add_argument("--boot", required=True)
    p.add_argument("--wall-offset-s", type=float, default=0.0)
    p.add_argument("--usr1-step-s", type=float, default=0.0)
    configure_logging("info", json=True)
    asyncio.run(main(p.parse_args()))
