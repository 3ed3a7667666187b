"""Clocks for the simulated farm: wall time, scaled time, and hand-cranked time.

The farm (and a daemon driving it in a demo or a long test) reads time only
through these, so hours of curtailment can run in minutes.
"""

from __future__ import annotations

import asyncio
import time


class ScaledClock:
    """Epoch time that runs `speed` times faster than the wall clock.

    `sleep(s)` sleeps s seconds of *this* clock, i.e. s/speed wall seconds, so a
    poll loop written for a 10 s interval polls every 0.1 s wall at speed 100.
    """

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        if speed <= 0:
            raise ValueError(f"clock speed must be positive, got {speed}")
        self._speed = float(speed)
        self._origin = time.time() if start is None else float(start)
        self._mono0 = time.monotonic()

    @property
    def speed(self) -> float:
        return self._speed

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
