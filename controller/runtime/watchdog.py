"""One timer that bounds every read of a poll, instead of one timeout per read.

A driver bounds its own requests (timeout and retries); the daemon's guard around a read
only catches a driver bug that hangs. `asyncio.wait_for` per read made a task, a timer
and two extra turns of the loop for each of the 10,000 reads of a cycle (7 us each on a
busy 2-core host, about 1% of the daemon's CPU per rig); `asyncio.timeout` still a timer.
Here the poll's workers say when each read began (an assignment), and a single timer,
armed for the whole poll, cancels a worker whose read has run past the limit: that read
then raises TimeoutError in the worker, as `asyncio.timeout` would, and the worker goes
on with its next device.
"""

from __future__ import annotations

import asyncio
import math


class ReadWatchdog:
    """Bounds the current read of each registered worker task to `limit_s` (checked every
    `limit_s / 4`, so a hung read ends within 1.25 x the limit)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._loop = asyncio.get_running_loop()
        self._deadlines: dict[asyncio.Task[object], float] = {}  # worker -> its read's end
        self._fired: set[asyncio.Task[object]] = set()  # cancelled by us, not yet told
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> ReadWatchdog:
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()

    def begin(self, task: asyncio.Task[object]) -> None:
        """`task` starts a read now."""
        self._deadlines[task] = self._loop.time() + self.limit_s

    def end(self, task: asyncio.Task[object]) -> None:
        """`task`'s read is over (however it ended). A read that ended otherwise than by
        our CancelledError swallowed it (a driver turning it into an error of its own):
        the cancellation is taken back all the same, so the task is not left cancelling."""
        self._deadlines[task] = math.inf
        if task in self._fired:
            self._fired.discard(task)
            task.uncancel()

    def fired(self, task: asyncio.Task[object]) -> bool:
        """Whether a CancelledError in `task` came from this watchdog alone: then it is
        taken back (`uncancel`) and the read counts as timed out. False for a cancellation
        from elsewhere (the poll itself cancelled), which must go on."""
        if task not in self._fired:
            return False
        self._fired.discard(task)
        return task.uncancel() == 0

    def _arm(self) -> None:
        self._timer = self._loop.call_later(max(self.limit_s / 4, 0.05), self._check)

    def _check(self) -> None:
        now = self._loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._fired and not task.done():
                self._deadlines[task] = math.inf
                self._fired.add(task)
                task.cancel()
        self._arm()
