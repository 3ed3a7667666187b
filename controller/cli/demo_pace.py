"""The demo's farm clock, held to what this machine can run.

In the demo the farm's devices are simulators in rigd's own process, answering over
loopback: a read that times out is never the farm's fault, it is this machine not keeping
up (both cores busy with other work, a slow VM). At `--speed 20` a poll interval is half a
second of wall time and a device's timeout a fifth of one; on a busy machine the reads miss
it, and the demo would show a farm of unreachable rigs and a meter without a reading,
which is a lie about the farm. So the demo watches for reads that time out, says that the
machine cannot keep up, and slows the farm clock (and widens the poll timeouts to match)
until it can. Its story (when the grid order comes, how long the run lasts) is told in
farm time, so a slowed demo tells the same story, only taking longer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from controller.core.snapshot import SiteSnapshot

SLOWDOWN = 2.0  # each step halves the farm clock's speed
MIN_SPEED = 1.0
WINDOW = 3  # cycles judged together
BEHIND_IN_WINDOW = 2  # cycles with timed-out reads, out of WINDOW, that say "behind"
MANY = 0.25  # or a single cycle in which this share of the devices timed out


@dataclass(frozen=True, slots=True)
class Slowdown:
    old_speed: float
    new_speed: float
    timed_out: tuple[str, ...]  # the devices whose reads timed out in the last cycle

    def message(self) -> str:
        n = len(self.timed_out)
        return (
            f"this machine cannot keep up with the farm clock at x{self.old_speed:g}: "
            f"reads of {n} simulated device{'s' if n != 1 else ''} timed out, and the devices "
            f"are in this process, so the farm is not at fault. Farm clock slowed to "
            f"x{self.new_speed:g}."
        )


class Pace:
    """Judges each cycle; says when to slow the farm clock, and to what speed."""

    def __init__(self, speed: float, *, silent: Iterable[str] = ()) -> None:
        self.speed = speed
        self.silent = frozenset(silent)  # staged faults: a rig made to stop answering
        self._recent: deque[bool] = deque(maxlen=WINDOW)
        self.slowdowns: list[Slowdown] = []
        self._skip = 1  # cycles not judged: start-up, and the first at a new pace

    def timed_out(self, snap: SiteSnapshot) -> tuple[str, ...]:
        """Devices whose read timed out in this cycle, the staged silent ones aside."""
        views = [
            *((rid, r.health) for rid, r in snap.rigs.items()),
            *((d.id, d.health) for d in snap.meters.values()),
            *((d.id, d.health) for d in snap.pdus.values()),
        ]
        return tuple(
            sorted(
                dev
                for dev, h in views
                if dev not in self.silent
                and h.reachable is False
                and h.last_error_ts == snap.ts
                and h.last_error_kind == "timeout"
            )
        )

    def judge(self, snap: SiteSnapshot) -> Slowdown | None:
        """A Slowdown when this cycle makes the machine look behind; None otherwise. The
        first cycle (start-up: imports, first connections) is not judged, nor the first at
        a new pace (the devices are connected afresh with their new timeouts)."""
        if self._skip > 0:
            self._skip -= 1
            return None
        if self.speed <= MIN_SPEED:
            return None
        late = self.timed_out(snap)
        self._recent.append(bool(late))
        devices = len(snap.rigs) + len(snap.meters) + len(snap.pdus) - len(self.silent)
        if sum(self._recent) < BEHIND_IN_WINDOW and len(late) < max(2, devices * MANY):
            return None
        self._recent.clear()  # judge the new pace on its own cycles
        self._skip = 1
        new = max(MIN_SPEED, self.speed / SLOWDOWN)
        s = Slowdown(self.speed, new, late)
        self.speed = new
        self.slowdowns.append(s)
        return s
