"""A real third-party client against the simulators: pyasic, as a new user would run it.

Each test starts a one-rig `SimSite` on its own loopback subnet with the rig's firmware on
its real ports (80, 4028, 4433, 50051), as `rigd sim --subnet` does, and points
`pyasic.get_miner` at that address. pyasic probes the real ports, and ports below 1024 need
root (CI runs as root), so elsewhere these tests skip.

The farm runs on a `ManualClock` started at the wall clock's time: a test commands the
rig through pyasic, moves the clock past the firmware's transition, and reads again, so a
minute of farm time takes no wall time.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from simulators.clock import ManualClock
from simulators.site import SimSite

# Every test module here carries this mark (`pytestmark = ROOT_ONLY`).
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="pyasic probes the miners' real ports (80 among them), which only root may bind",
)


class Rig:
    """One simulated rig as pyasic sees it: its address, the site and the farm clock."""

    def __init__(self, site: SimSite, clock: ManualClock) -> None:
        self.site = site
        self.clock = clock
        self.rig_id = next(iter(site.farm.rigs))
        self.host = site.address_of(self.rig_id)[0]

    @property
    def sim(self) -> Any:
        return self.site.farm.rigs[self.rig_id]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


async def start_site(dialect: str, rigs: int = 1, **kw: Any) -> tuple[SimSite, ManualClock]:
    """A site of `rigs` rigs taking the comma-separated `dialect`s in turn (one rig by
    default) on a free loopback /29 (other test runs share the host)."""
    last: OSError | None = None
    for _ in range(20):
        subnet = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/29"
        # The farm's clock starts at the wall clock's time: clients stamp their requests
        # with it (API v3 Whatsminer tokens carry a `ts` the miner checks against its own).
        clock = ManualClock(float(int(time.time())))
        site = SimSite(rigs=rigs, pdus=1, subnet=subnet, mix=dialect, clock=clock, **kw)
        try:
            await site.start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            last = e
            continue
        return site, clock
    raise RuntimeError(f"no free loopback subnet: {last}")


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig_of() -> AsyncIterator[RigFactory]:
    """`await rig_of("luxos")`: a started one-rig site of that firmware, stopped after."""
    sites: list[SimSite] = []

    async def make(dialect: str, **kw: Any) -> Rig:
        site, clock = await start_site(dialect, **kw)
        sites.append(site)
        return Rig(site, clock)

    yield make
    for site in sites:
        await site.stop()


def ths(rate: Any) -> float:
    """A pyasic hashrate (AlgoHashRate, or None) in TH/s."""
    return 0.0 if rate is None else float(rate.into(rate.unit.TH).rate)
