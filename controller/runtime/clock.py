"""The daemon's view of time, and what keeps durations right when the wall clock steps.

The control loop reads time only through a `Clock`, so the demo and long simulation
tests can drive it with the farm's accelerated clock instead of the wall clock.
`monotonic()` is what the poll cadence is measured on, so a wall-clock step (NTP)
never stretches or skips a poll.

Everything rigd remembers is stamped in epoch seconds, because it must survive a
restart: when a rig was put to sleep, when its command settles, when a failed command
may be retried, when an override or a hold expires, the energy counter's last reading,
the grid heartbeat. Those are durations in disguise, and a wall-clock step of an hour
would end them all at once (or stretch them by an hour). `StepGuard` is the cure: the
daemon's epoch time moves at the monotonic clock's pace between two checks, and the
check at the start of each cycle measures any step (the wall clock's movement minus the
monotonic clock's) so that the daemon can shift every remembered stamp by it, all at
one moment. A step while the daemon was down is found the same way from the mark it
saved, as long as the host has not rebooted (`boot_id`).

One kind of time is not the farm's: what the host's own work costs (how long a poll
took, how long a command attempt ran, how long reads may wait for commands). It is
measured with a `Stopwatch` on the process's own clock, even when a simulation drives
the farm's clock, since a frozen or accelerated farm clock would make a poll look free.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Protocol

# A smaller difference between the wall clock's and the monotonic clock's movement is
# slewing, scheduling jitter or float dust, not a step: nothing rigd times is that short.
STEP_THRESHOLD_S = 1.0

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# Linux: like CLOCK_MONOTONIC, but it keeps counting while the host is suspended, so a
# resumed host's wall clock does not look like a step.
_CLOCK_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class Clock(Protocol):
    def now(self) -> float:
        """Epoch seconds, for timestamps people and other systems read."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards, for intervals and deadlines."""
        ...

    async def sleep(self, seconds: float) -> None: ...


def _read_boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class SystemClock:
    def __init__(self) -> None:
        # The monotonic clock counts from boot: a mark saved before a restart is comparable
        # with one taken after it only on the same boot.
        self.boot_id = _read_boot_id()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        if _CLOCK_BOOTTIME is not None:
            return time.clock_gettime(_CLOCK_BOOTTIME)
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class StepGuard:
    """A `Clock` whose epoch time cannot step between two `check()`s.

    `now()` is the wall time of the last check plus the monotonic time since, so every
    stamp taken between two checks is on one timeline; `check()` re-reads the wall clock
    and returns the step found (0.0 below `threshold_s`), which the caller applies to
    what it remembers before anything else reads the time.
    """

    def __init__(self, base: Clock, *, threshold_s: float = STEP_THRESHOLD_S) -> None:
        self.base = base
        self.threshold_s = threshold_s
        self.boot_id: str | None = getattr(base, "boot_id", None)
        self._wall0 = base.now()
        self._mono0 = base.monotonic()

    def now(self) -> float:
        return self._wall0 + (self.base.monotonic() - self._mono0)

    def monotonic(self) -> float:
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)

    def check(self) -> float:
        """Seconds the wall clock stepped since the last check (+ forward); 0.0 if none."""
        # The wall clock is read between two monotonic readings: a thread switch between the
        # reads (which an accelerated test clock magnifies) is not mistaken for a step.
        m1 = self.base.monotonic()
        wall = self.base.now()
        m2 = self.base.monotonic()
        mono = (m1 + m2) / 2
        step = wall - (self._wall0 + (mono - self._mono0))
        self._wall0, self._mono0 = wall, mono
        return step if abs(step) >= self.threshold_s + (m2 - m1) / 2 else 0.0

    def mark(self) -> dict[str, Any]:
        """What to save so that a restarted daemon can tell a step made while it was down."""
        return {"wall": self.now(), "mono": self.monotonic(), "boot": self.boot_id}

    def step_since(self, mark: Any) -> float:
        """The step between a saved `mark` and now; 0.0 if none, or if it cannot be known
        (no mark, another boot, a clock without a boot id)."""
        if not isinstance(mark, dict) or self.boot_id is None or mark.get("boot") != self.boot_id:
            return 0.0
        try:
            wall, mono = float(mark["wall"]), float(mark["mono"])
        except (KeyError, TypeError, ValueError):
            return 0.0
        step = (self.now() - wall) - (self.monotonic() - mono)
        return step if abs(step) >= self.threshold_s else 0.0


class Stopwatch:
    """Real seconds spent on this host's own work since it was started (see the module's
    docstring): never farm time, never the wall clock."""

    __slots__ = ("_t0",)

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0
