"""The daemon's view of time.

The control loop reads time only through a `Clock`, so the demo and long
simulation tests can drive it with the farm's accelerated clock instead of the
wall clock. `monotonic()` is what intervals and deadlines are measured on, so a
wall-clock step (NTP) never stretches or skips a poll.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Epoch seconds, for timestamps people and other systems read."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards, for intervals and deadlines."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
