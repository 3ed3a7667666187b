"""Clocks for the simulated farm: wall time, scaled time, and hand-cranked time.

The farm (and a daemon driving it in a demo or a long test) reads time only
through these, so hours of curtailment can run in minutes. `SteppedWall` plays a host
whose wall clock NTP steps, while the farm's physics (and the host's monotonic clock)
carry on undisturbed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Protocol


class ScaledClock:
    """Epoch time that runs `speed` times faster than the wall clock.

    `sleep(s)` sleeps s seconds of *this* clock, i.e. s/speed wall seconds, so a
    poll loop written for a 10 s interval polls every 0.1 s wall at speed 100.
    """

    def __init__(
        self,
        speed: float = 1.0,
        start: float | None = None,
        *,
        mono_origin: float | None = None,
        boot_id: str | None = None,
    ) -> None:
        """`start` is the time shown at `mono_origin` (a `time.monotonic()` reading, by
        default now). The host's monotonic clock is shared by its processes, so two
        processes given the same `start`, `mono_origin` and `boot_id` run one clock."""
        if speed <= 0:
            raise ValueError(f"clock speed must be positive, got {speed}")
        self._speed = float(speed)
        self._origin = time.time() if start is None else float(start)
        self._mono0 = time.monotonic() if mono_origin is None else float(mono_origin)
        self.boot_id = boot_id or uuid.uuid4().hex  # one "boot" per clock

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def anchor(self) -> tuple[float, float]:
        """(start, mono_origin): with the speed and boot id, this clock in another process."""
        return self._origin, self._mono0

    def set_speed(self, speed: float) -> None:
        """Change speed without a jump in the time already shown."""
        if speed <= 0:
            raise ValueError(f"clock speed must be positive, got {speed}")
        now = self.now()
        self._origin, self._mono0, self._speed = now, time.monotonic(), float(speed)

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._mono0) * self._speed

    def monotonic(self) -> float:
        return self.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self._speed)


class ManualClock:
    """Time that moves only when a test calls `advance`; for pure model tests."""

    def __init__(self, start: float = 1_764_000_000.0) -> None:
        self._now = float(start)
        self.boot_id = uuid.uuid4().hex

    @property
    def speed(self) -> float:
        return 1.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a manual clock does not go backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


class _BaseClock(Protocol):
    boot_id: str

    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SteppedWall:
    """The daemon's clock on a host whose wall clock can be stepped (an NTP correction).

    Give the farm the `base` clock and the daemon this one: `step(s)` moves only the wall
    time the daemon reads (`now`), never its monotonic clock, its sleeps or the farm's
    physics, exactly as `settimeofday` does on a real host.
    """

    def __init__(self, base: _BaseClock, offset_s: float = 0.0) -> None:
        self.base = base
        self.offset_s = float(offset_s)
        self.boot_id = base.boot_id

    @property
    def speed(self) -> float:
        return float(getattr(self.base, "speed", 1.0))

    def step(self, seconds: float) -> None:
        self.offset_s += seconds

    def now(self) -> float:
        return self.base.now() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)
