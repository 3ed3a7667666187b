"""Timeouts that count the event loop's time, not the time it spent starved.

A connect to an address on the farm LAN, or on loopback, is answered in microseconds by
the kernel; what can take a second is the event loop getting round to it, when the host's
cores are busy with other processes or the loop itself is flooded (a scan of a /24 opens
hundreds of connections while a control cycle runs). A plain `asyncio.timeout(1)` then
declares an answering miner silent. `within` waits in a few turns instead and counts each
turn for at most its share of the time allowed: a turn that comes back late was starved,
and the lateness is not the remote side's. On a loop that keeps up this is the same
timeout; on a starved one it lasts as many loop turns as a healthy loop would need.

Where the timeouts are a library's own (a driver's request timeout), `LoopLag` measures
how starved the loop was meanwhile, so that a caller can tell a negative answer from one
the machine could not wait for, and ask again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")

TURNS = 5  # a timeout is waited out in this many turns of the loop, at least


async def within(
    aw: Awaitable[T],
    wait_s: float,
    *,
    discard: Callable[[T], object] | None = None,
) -> T:
    """`aw`'s result, or TimeoutError after `wait_s` seconds of loop time not starved.

    `discard` receives a result that arrives after the wait was given up (a connection
    opened just too late, to be closed)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(aw)
    step = max(wait_s / TURNS, 1e-3)
    left = wait_s
    try:
        while not task.done() and left > 0:
            t0 = loop.time()
            await asyncio.wait((task,), timeout=min(step, left))
            left -= min(loop.time() - t0, step)  # a late turn counts as one on time
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(partial(_late, discard))
    if not task.done():
        raise TimeoutError(f"no answer within {wait_s:g} s")
    return task.result()


def _late(discard: Callable[[Any], object] | None, task: asyncio.Future[Any]) -> None:
    """A task given up on: retrieve its outcome (no "never retrieved" warning), and hand
    a result that made it after all to `discard`."""
    if task.cancelled() or task.exception() is not None:
        return
    if discard is not None:
        discard(task.result())


class LoopLag:
    """How late the event loop has been, in total, while this runs (an async context): a
    ticker asks to be woken every `tick_s` and adds up by how much later it was."""

    def __init__(self, tick_s: float = 0.02) -> None:
        self.tick_s = tick_s
        self.late_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick(), name="loop-lag")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.tick_s)
            self.late_s += max(0.0, loop.time() - t0 - self.tick_s)
