"""`python -m tests.docs.history_fixture DB`: a state database with six hours of a site's
history, for the doc blocks that draw reports (tests/docs/test_shell_blocks.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from controller.adapters.history import Point, Recorder
from controller.adapters.store import StateStore
from controller.config import HistoryConfig


def write(db: Path, hours: float = 6.0) -> None:
    store = StateStore(db)
    rec = Recorder(store, HistoryConfig())
    end = time.time()
    start = end - hours * 3600
    kwh = 1000.0
    ts = start
    while ts < end:
        order = start + 2 * 3600 <= ts < start + 3 * 3600
        cap = 60.0 if order else 100.0
        load = 55.0 if order else 90.0
        kwh += load / 60.0
        rec.add(
            Point(
                ts=ts,
                import_kw=load,
                cap_kw=cap,
                cap_source="grid" if order else "max_import",
                target_kw=cap * 0.98,
                import_kwh=kwh,
                budget_kwh=None,
                budget_used_kwh=None,
                budget_start=None,
                budget_end=None,
                hashrate_ths=3000.0 if not order else 1800.0,
                rigs={"mining": 30 if not order else 18, "sleeping": 0 if not order else 12},
                grid_orders=("evt-1",) if order else (),
            )
        )
        ts += 60.0
    rec.flush()
    store.close()


if __name__ == "__main__":
    write(Path(sys.argv[1]))
