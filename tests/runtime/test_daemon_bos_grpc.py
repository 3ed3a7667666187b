"""The daemon controls Braiins OS releases that have no REST API (before 25.07) over gRPC.

Three BOS 24.09 rigs, each with its own gRPC port (as `rigd sim` without `--subnet` serves
them): the config `rigd sim` writes carries each rig's `grpc_port`, the driver asks that
port the API version and takes gRPC, and the control loop throttles (power targets), puts
to sleep (pause) and restores (resume, full target) every rig through it, as the mixed
farm's test does for BOS on REST.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from controller.config import parse_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.farm import RigMode, SimRig
from simulators.site import SimSite

SPEED = 20.0  # farm seconds per wall second


def _mode(rig: SimRig) -> RigMode:
    return rig.mode  # read fresh each time (no narrowing carried between asserts)


async def _until(pred: Callable[[], bool], what: str, wall_s: float = 30.0) -> None:
    for _ in range(int(wall_s / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_daemon_throttles_sleeps_and_wakes_bos_2409_over_grpc() -> None:
    site = SimSite(rigs=3, pdus=1, clock=ScaledClock(SPEED), mix="braiins", braiins_release="24.09")
    await site.start()
    state = Path(tempfile.mkdtemp(prefix="bosgrpc-", dir="/tmp"))  # socket paths are capped
    try:
        assert site.braiins_rest.servers == {}  # 24.09: no REST API at all
        text = site.config_toml(
            broker_url="mqtt://127.0.0.1:9",
            state_dir=state,
            interval_s=10,
            extra="[control]\nmax_import_kw = 1000\nmin_off_s = 0\nmin_on_s = 0\n"
            "ramp_kw_per_interval = 100\n",
        )
        grpc = site.braiins_grpc.servers
        for rid, server in grpc.items():
            assert server.port != 50051 and f"grpc_port = {server.port}" in text, rid
        cfg = parse_config(text, environ={})
        sims = {rid: site.farm.rigs[rid] for rid in grpc}
        m = site.farm.meter
        daemon = Daemon(cfg, clock=site.clock)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            await _until(
                lambda: daemon.last is not None and daemon.last.document["rigs"]["mining"] == 3,
                "every rig polled and mining",
            )
            ctl = daemon.controller
            assert ctl is not None
            base_kw = m.overhead_base_w / 1000
            floor_w = sum(
                daemon.devices.miners[r].capabilities.power_target_min_w or 0 for r in sims
            )
            assert floor_w > 0  # power targets are offered over gRPC

            def under(cap: float) -> bool:
                return m.true_power_w(site.farm.now()) / 1000 <= cap

            cap1 = base_kw + floor_w * (1 + m.overhead_frac) / 1000 * 1.15
            ctl.set_override(cap1, site.clock.now() + 3600, "test: throttle", "test")
            throttled: set[str] = set()

            def throttling(cap: float) -> bool:
                for rid, r in sims.items():
                    if r.power_target_w is not None and _mode(r) is RigMode.MINING:
                        throttled.add(rid)
                return under(cap) and bool(throttled)

            # The planner may also pause a rig to fit: one throttled rig is the point here.
            await _until(lambda: throttling(cap1), "throttled under cap 1")

            cap2 = base_kw + 0.5
            ctl.set_override(cap2, site.clock.now() + 3600, "test: sleep", "test")
            await _until(
                lambda: all(_mode(r) is RigMode.SLEEPING for r in sims.values()) and under(cap2),
                "every rig asleep",
            )

            ctl.clear_override()
            await _until(
                lambda: all(
                    _mode(r) is RigMode.MINING and r.power_target_w in (None, r.model.nominal_w)
                    for r in sims.values()
                ),
                "every rig restored",
                wall_s=45,
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
        calls = {c.rsplit("/", 1)[-1] for s in grpc.values() for c in s.calls}
        assert {"GetApiVersion", "PauseMining", "ResumeMining", "SetPowerTarget"} <= calls, calls
    finally:
        await site.stop()
        shutil.rmtree(state, ignore_errors=True)
