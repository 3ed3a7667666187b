"""One grid order's way from its arrival to its first command, timed.

The grid's promise is a deadline on commands, so how long an order waits before the first
one leaves is a figure to watch (the benchmark reads it from the log): marks are taken as
the order is verified, stored, planned for and launched, and the executor logs them all
(`grid_order_first_command`) when the first command starts. Nothing here decides anything.
"""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger(__name__)


class Timeline:
    """Named instants, in ms since the order arrived (perf_counter: real host time)."""

    __slots__ = ("_cpu0", "_t0", "arrived_at", "cpu", "marks", "order_id")

    def __init__(self, order_id: str | None = None) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self.arrived_at = time.time()  # the wall clock, for a benchmark to line up
        self.order_id = order_id
        self.marks: dict[str, float] = {}
        # This process's CPU at each mark: on a busy host the wall time is mostly waiting
        # for a core, and this says how much of it was rigd's own work.
        self.cpu: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """The first time `name` is reached (a later pass does not move it)."""
        if name not in self.marks:
            self.marks[name] = round((time.perf_counter() - self._t0) * 1000.0, 2)
            self.cpu[name] = round((time.process_time() - self._cpu0) * 1000.0, 2)

    def log_first_command(self) -> None:
        self.mark("first_send")
        log.info(
            "grid_order_first_command",
            order_id=self.order_id,
            arrived_at=round(self.arrived_at, 4),
            cpu_ms=self.cpu,
            **self.marks,
        )
