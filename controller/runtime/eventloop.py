"""Which asyncio event loop the daemon and the simulators run on: uvloop when it is there.

A farm of 10,000 rigs is 1,000 TCP connections a second just to poll, and five times that
for a moment when a grid order puts every rig to sleep; uvloop's connection handling
(libuv, in C) costs a fraction of the pure-Python selector loop's (`python -m bench`
measures both). Everything rigd does is plain asyncio, so the standard loop remains a
complete fallback: where uvloop is not installed, or with RIGD_EVENT_LOOP=asyncio.

The garbage collector is tuned here too (`tune_gc`, `settle_gc`), for the same processes.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "RIGD_EVENT_LOOP"
GC_THRESHOLD_0 = 20_000  # allocations between young collections (Python: 700)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's own loop."""
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(f"{ENV}=uvloop but uvloop is not installed") from None
        return None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def name() -> str:
    """The loop `run` would use, for logs."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop where available, with the collector tuned for a
    long-running process holding a farm's state (`tune_gc`)."""
    tune_gc()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def tune_gc() -> None:
    """Collect garbage less often: a farm's worth of readings lives about one poll
    interval, long enough to reach the oldest generation, and with the default thresholds
    the collector then walked the whole heap (0.2 s at 10,000 rigs) dozens of times a
    minute, in the middle of curtailments too. Cycles are rare in rigd's data, so a
    larger young generation frees nearly everything by reference counting anyway."""
    gc.set_threshold(GC_THRESHOLD_0, 50, 100)


def settle_gc() -> None:
    """After start-up (config, drivers, first readings): move what lives for the whole
    run out of the collector's sight, so that later full collections skip it."""
    gc.collect()
    gc.freeze()
