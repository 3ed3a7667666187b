"""The demo's pace: a machine that cannot keep up is said to, and the farm clock slowed,
rather than the demo showing a farm of unreachable rigs (controller/demo_pace.py)."""

from __future__ import annotations

import asyncio

from controller.cli.demo import _until_farm_time
from controller.cli.demo_pace import Pace
from controller.core.snapshot import RigInfo, SiteSnapshot
from controller.runtime.state import SiteState
from drivers.errors import DeviceTimeout, DeviceUnreachable
from simulators.clock import ScaledClock

RIGS = [RigInfo(f"rig-{n}", "127.0.0.1", 4028, "luxos", None, None) for n in range(1, 5)]


class Farm:
    def __init__(self) -> None:
        self.state = SiteState("demo", RIGS, ["meter"], [], "meter")
        self.ts = 1_800_000_000.0

    def cycle(self, *timed_out: str, refused: tuple[str, ...] = ()) -> SiteSnapshot:
        """One cycle in which the reads of `timed_out` time out (the others answer nothing
        worth keeping: only health matters here)."""
        self.ts += 10.0
        self.state.cycle += 1
        for dev in timed_out:
            fail = self.state.meter_failed if dev == "meter" else self.state.rig_failed
            fail(dev, self.ts, DeviceTimeout("no reply within 0.2s", device=dev))
        for dev in refused:
            self.state.rig_failed(dev, self.ts, DeviceUnreachable("refused", device=dev))
        return self.state.snapshot(self.ts, 0.1)


def test_reads_timing_out_in_two_of_three_cycles_slow_the_clock_and_say_why() -> None:
    farm, pace = Farm(), Pace(20.0, silent=["rig-4"])
    assert pace.judge(farm.cycle("rig-1", "rig-2", "meter")) is None  # start-up: not judged
    assert pace.judge(farm.cycle("rig-4")) is None  # the staged silent rig: the farm's fault
    assert pace.judge(farm.cycle(refused=("rig-3",))) is None  # refused: not the machine
    assert pace.judge(farm.cycle("meter")) is None  # one blip
    slowed = pace.judge(farm.cycle("rig-1", "rig-2"))
    assert slowed is not None and (slowed.old_speed, slowed.new_speed) == (20.0, 10.0)
    assert slowed.timed_out == ("rig-1", "rig-2") and pace.speed == 10.0
    assert "cannot keep up" in slowed.message() and "x10" in slowed.message()
    # The first cycle at the new pace is not judged (fresh connections); then a cycle in
    # which a quarter of the devices timed out says it at once.
    assert pace.judge(farm.cycle("rig-1", "rig-2", "rig-3")) is None
    assert pace.judge(farm.cycle("rig-1", "rig-2")) is not None and pace.speed == 5.0
    # Otherwise the new pace is judged on its own cycles, down to x1 and no further.
    assert pace.judge(farm.cycle()) is None
    assert pace.judge(farm.cycle("meter")) is None
    assert pace.judge(farm.cycle("meter")) is not None and pace.speed == 2.5
    for _ in range(20):
        pace.judge(farm.cycle("meter"))
    assert pace.speed == 1.0


async def test_the_story_is_told_in_farm_time_however_the_clock_slows() -> None:
    clock = ScaledClock(200.0)
    stop = asyncio.Event()
    t = clock.now() + 20.0  # 0.1 s of wall time at x200
    waiting = asyncio.create_task(_until_farm_time(clock, t, stop))
    await asyncio.sleep(0.02)
    clock.set_speed(100.0)  # now 0.2 s of wall time at most
    assert await asyncio.wait_for(waiting, 5.0) is True
    assert clock.now() >= t
    stop.set()
    assert await _until_farm_time(clock, t + 1000.0, stop) is False
