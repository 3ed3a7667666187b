"""The site's history: a bounded, downsampled record of import, cap and rigs over time.

Grid contracts are argued over charts, so rigd keeps what it saw, in its state
database, for `rigctl report`: one row per `step_s` (a minute by default), rolled up
into rows of `rollup_step_s` (15 minutes) that are kept longer. Rows past their
retention are pruned as new ones are written, so the table never grows beyond about
keep_days/step + rollup_keep_days/rollup_step rows (2 880 + 8 640 by default).

A row is written once per step, when the step is over, not once per cycle: the
cycles inside a step are folded into a `Bucket` in memory. A crash loses at most the
step in progress; `Recorder.flush()` writes it on a clean stop, and a restart inside
that step adds to the row rather than replacing it. The rollup row the step belongs to
is kept in memory too and each new step folded into it, so a write does not read the
rollup's rows back (it is recomputed from its fine rows only after a start or a failed
write, or when a step is written again).

How cycles fold into a bucket is chosen for the argument a chart has to win: import is
the mean (what the meter billed) and its maximum; the cap is the *lowest* in force
during the step, with its source; rigs by state are means (fractions are fine at 15
minutes); grid orders are every order active at any time in the step.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from controller.adapters.store import StateStore, StoreError
from controller.config import HistoryConfig
from controller.errors import RigdError

if TYPE_CHECKING:
    from controller.core.status import CycleResult

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    step_s          INTEGER NOT NULL,
    ts              REAL NOT NULL,
    samples         INTEGER NOT NULL,
    import_kw       REAL,
    import_max_kw   REAL,
    cap_kw          REAL,
    cap_source      TEXT,
    target_kw       REAL,
    import_kwh      REAL,
    budget_kwh      REAL,
    budget_used_kwh REAL,
    budget_start    REAL,
    budget_end      REAL,
    hashrate_ths    REAL NOT NULL,
    rigs            TEXT NOT NULL,
    grid_orders     TEXT NOT NULL,
    PRIMARY KEY (step_s, ts)
);
"""

RIG_STATES = ("mining", "waking", "sleeping", "off", "unreachable")


@dataclass(frozen=True, slots=True)
class Point:
    """One cycle, as history keeps it."""

    ts: float
    import_kw: float | None
    cap_kw: float | None
    cap_source: str | None
    target_kw: float | None
    import_kwh: float | None
    budget_kwh: float | None
    budget_used_kwh: float | None
    budget_start: float | None
    budget_end: float | None
    hashrate_ths: float
    rigs: dict[str, int]
    grid_orders: tuple[str, ...]


def point(result: CycleResult) -> Point:
    """What history keeps of one cycle (pure)."""
    doc = result.document
    status = result.control
    budget = status.budget if status is not None else None
    target = None
    if status is not None and status.plan is not None:
        target = status.plan.target_kw
    grid = doc.get("grid") or {}
    orders = tuple(str(o["order_id"]) for o in grid.get("active") or [] if o.get("order_id"))
    return Point(
        ts=result.snapshot.ts,
        import_kw=doc.get("import_kw"),
        cap_kw=None if status is None else status.cap.kw,
        cap_source=None if status is None else status.cap.source,
        target_kw=target,
        import_kwh=doc.get("import_kwh"),
        budget_kwh=None if budget is None else float(budget["budget_kwh"]),
        budget_used_kwh=None if budget is None else float(budget["used_kwh"]),
        budget_start=None if budget is None else float(budget["period_start"]),
        budget_end=None if budget is None else float(budget["period_end"]),
        hashrate_ths=float(doc.get("hashrate_ths") or 0.0),
        rigs={s: int((doc.get("rigs") or {}).get(s, 0)) for s in RIG_STATES},
        grid_orders=orders,
    )


def _wmean(a: float | None, na: int, b: float | None, nb: int) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return (a * na + b * nb) / (na + nb)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(slots=True)
class Bucket:
    """One step of history: the cycles inside it folded together. Also a stored row."""

    step_s: int
    ts: float  # the step's start
    samples: int = 0
    import_kw: float | None = None  # mean of the readings
    import_max_kw: float | None = None
    cap_kw: float | None = None  # the lowest in force
    cap_source: str | None = None  # the source of that lowest cap
    target_kw: float | None = None  # the lowest
    import_kwh: float | None = None  # the register, last reading
    budget_kwh: float | None = None  # last
    budget_used_kwh: float | None = None
    budget_start: float | None = None
    budget_end: float | None = None
    hashrate_ths: float = 0.0  # mean
    rigs: dict[str, float] = field(default_factory=dict)  # means
    grid_orders: list[str] = field(default_factory=list)  # every order active in the step
    _import_n: int = 0
    _stored: bool = False  # holds what the database had for its step (see write_bucket)

    def add(self, p: Point) -> None:
        self.merge(
            Bucket(
                self.step_s,
                self.ts,
                1,
                p.import_kw,
                p.import_kw,
                p.cap_kw,
                p.cap_source,
                p.target_kw,
                p.import_kwh,
                p.budget_kwh,
                p.budget_used_kwh,
                p.budget_start,
                p.budget_end,
                p.hashrate_ths,
                {k: float(v) for k, v in p.rigs.items()},
                list(p.grid_orders),
                1 if p.import_kw is not None else 0,
            )
        )

    def merge(self, o: Bucket) -> None:
        """Fold a later bucket (or cycle) of the same or a finer step into this one."""
        n, m = self.samples, o.samples
        if m == 0:
            return
        self.import_kw = _wmean(self.import_kw, self._import_n, o.import_kw, o._import_n)
        self._import_n += o._import_n
        self.import_max_kw = _max(self.import_max_kw, o.import_max_kw)
        if o.cap_kw is not None and (self.cap_kw is None or o.cap_kw < self.cap_kw):
            self.cap_kw, self.cap_source = o.cap_kw, o.cap_source
        if o.target_kw is not None:
            self.target_kw = (
                o.target_kw if self.target_kw is None else min(self.target_kw, o.target_kw)
            )
        for name in ("import_kwh", "budget_kwh", "budget_used_kwh", "budget_start", "budget_end"):
            v = getattr(o, name)
            if v is not None:
                setattr(self, name, v)
        self.hashrate_ths = (self.hashrate_ths * n + o.hashrate_ths * m) / (n + m)
        for s in set(self.rigs) | set(o.rigs):
            self.rigs[s] = (self.rigs.get(s, 0.0) * n + o.rigs.get(s, 0.0) * m) / (n + m)
        self.grid_orders += [x for x in o.grid_orders if x not in self.grid_orders]
        self.samples = n + m

    def copy(self) -> Bucket:
        return replace(self, rigs=dict(self.rigs), grid_orders=list(self.grid_orders))

    def after(self, earlier: Bucket) -> None:
        """Make this bucket `earlier` followed by what it holds: the row a stopped rigd
        wrote for this step, then what the restarted one saw."""
        merged = earlier.copy()
        merged.merge(self)
        for f in fields(self):
            setattr(self, f.name, getattr(merged, f.name))

    @property
    def end(self) -> float:
        return self.ts + self.step_s

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    # -- rows --------------------------------------------------------------------------

    _COLS = (
        "step_s, ts, samples, import_kw, import_max_kw, cap_kw, cap_source, target_kw, "
        "import_kwh, budget_kwh, budget_used_kwh, budget_start, budget_end, hashrate_ths, "
        "rigs, grid_orders"
    )

    def row(self) -> tuple[Any, ...]:
        return (
            self.step_s,
            self.ts,
            self.samples,
            self.import_kw,
            self.import_max_kw,
            self.cap_kw,
            self.cap_source,
            self.target_kw,
            self.import_kwh,
            self.budget_kwh,
            self.budget_used_kwh,
            self.budget_start,
            self.budget_end,
            self.hashrate_ths,
            json.dumps(self.rigs, separators=(",", ":")),
            json.dumps(self.grid_orders, separators=(",", ":")),
        )

    @classmethod
    def from_row(cls, r: tuple[Any, ...]) -> Bucket:
        b = cls(
            int(r[0]),
            float(r[1]),
            int(r[2]),
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            r[10],
            r[11],
            r[12],
            float(r[13]),
            {str(k): float(v) for k, v in json.loads(r[14]).items()},
            [str(x) for x in json.loads(r[15])],
        )
        b._import_n = b.samples if b.import_kw is not None else 0
        return b


def ensure_schema(db: sqlite3.Connection) -> None:
    db.execute(SCHEMA)  # one statement: executescript would commit the caller's transaction


def write_bucket(
    db: sqlite3.Connection, b: Bucket, cfg: HistoryConfig, roll: Bucket | None = None
) -> Bucket:
    """Store a finished step, fold it into the rollup row it belongs to, prune what is too
    old; returns that rollup row, for the caller to pass back with the next step.

    One transaction (the caller's). The first write of a step adds to a row already stored
    for it (rigd stopped and restarted inside the step): the samples from before the stop,
    their lowest cap and their grid orders are kept, and `b` then holds them too.

    A new step after every other of its rollup is folded into `roll` (the row this returned
    last time, left unchanged) or, first of its rollup, starts a new one: the rollup's
    rows are not read back (two index lookups say whether that holds). Otherwise (a step
    written again, one out of order, a rollup begun before a start) the rollup is
    recomputed from its fine rows, so nothing is counted twice.
    """
    cols, marks = Bucket._COLS, ",".join("?" * 16)
    stored = db.execute(
        f"SELECT {cols} FROM history WHERE step_s = ? AND ts = ?", (b.step_s, b.ts)
    ).fetchone()
    if stored is not None and not b._stored:
        b.after(Bucket.from_row(stored))
    b._stored = True
    coarse = cfg.rollup_step_s
    start = math.floor(b.ts / coarse) * coarse
    first, last = db.execute(
        "SELECT MIN(ts), MAX(ts) FROM history WHERE step_s = ? AND ts >= ? AND ts < ?",
        (b.step_s, start, start + coarse),
    ).fetchone()
    db.execute(f"INSERT OR REPLACE INTO history ({cols}) VALUES ({marks})", b.row())
    if stored is None and first is None:
        roll = Bucket(coarse, start)
        roll.merge(b)
    elif (
        stored is None
        and roll is not None
        and (roll.step_s, roll.ts) == (coarse, start)
        and last < b.ts
    ):
        roll = roll.copy()
        roll.merge(b)
    else:
        rows = db.execute(
            f"SELECT {cols} FROM history WHERE step_s = ? AND ts >= ? AND ts < ? ORDER BY ts",
            (b.step_s, start, start + coarse),
        ).fetchall()
        roll = Bucket(coarse, start)
        for r in rows:
            roll.merge(Bucket.from_row(r))
    db.execute(f"INSERT OR REPLACE INTO history ({cols}) VALUES ({marks})", roll.row())
    db.execute(
        "DELETE FROM history WHERE step_s = ? AND ts < ?",
        (cfg.step_s, b.ts - cfg.keep_days * 86_400),
    )
    db.execute(
        "DELETE FROM history WHERE step_s = ? AND ts < ?",
        (coarse, b.ts - cfg.rollup_keep_days * 86_400),
    )
    return roll


class Recorder:
    """Folds each cycle into the current step and stores each step as it ends."""

    def __init__(self, store: StateStore, cfg: HistoryConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.current: Bucket | None = None
        self._roll: Bucket | None = None  # the rollup row last written, as stored
        self._failed = False
        store.transact(ensure_schema)

    def record(self, result: CycleResult) -> None:
        self.add(point(result))

    def add(self, p: Point) -> None:
        step = self.cfg.step_s
        start = math.floor(p.ts / step) * step
        cur = self.current
        if cur is not None and cur.ts != start:
            self._write(cur)
            cur = None
        if cur is None:
            cur = self.current = Bucket(step, start)
        cur.add(p)

    def flush(self) -> None:
        """Store the step in progress (a clean stop; the next start may add to it)."""
        if self.current is not None and self.current.samples:
            self._write(self.current)

    def _write(self, b: Bucket) -> None:
        try:
            self._roll = self.store.transact(lambda db: write_bucket(db, b, self.cfg, self._roll))
        except StoreError as e:
            self._roll = None  # whatever was written of it was rolled back: recompute
            if not self._failed:  # once per outage, not once a minute
                log.error("history_write_failed", error=str(e))
            self._failed = True
        else:
            if self._failed:
                log.info("history_write_recovered")
            self._failed = False


# -- reading (rigctl report, the demo's report): the file, read-only --------------------------


class HistoryError(RigdError):
    """The history cannot be read: no database, no table, or a file that is not one."""


def read(db_path: Path, since: float, until: float = math.inf) -> list[Bucket]:
    """Rows between `since` and `until`, oldest first: fine rows where they are kept, rollup
    rows before that. Opens the database read-only, so it works with rigd stopped and
    never gets in the daemon's way."""
    return _read(db_path, lambda db: (since, until))


def read_last(db_path: Path, seconds: float) -> list[Bucket]:
    """The last `seconds` of history, up to its newest row (now, while rigd runs)."""

    def window(db: sqlite3.Connection) -> tuple[float, float]:
        # The finest rows' end: a rollup row ends up to one rollup step after the newest
        # of them, and would cut that much off the window.
        row = db.execute(
            "SELECT MAX(ts + step_s) FROM history WHERE step_s = (SELECT MIN(step_s) FROM history)"
        ).fetchone()
        end = float(row[0]) if row and row[0] is not None else 0.0
        return end - seconds, math.inf

    return _read(db_path, window)


def register_before(db_path: Path, ts: float) -> float | None:
    """The meter's register at `ts`: the last reading of the step that ends there, the
    start of a report's window. None if no step ends there (a gap: rigd was stopped)."""
    db = _open(db_path)
    try:
        row = db.execute(
            "SELECT import_kwh FROM history WHERE ts + step_s <= ? AND ts + step_s > ? "
            "AND import_kwh IS NOT NULL ORDER BY ts + step_s DESC, step_s LIMIT 1",
            (ts + 1e-6, ts - 1e-6),
        ).fetchone()
    except sqlite3.DatabaseError as e:
        if "no such table" in str(e):
            return None
        raise HistoryError(f"cannot read history from {db_path}: {e}") from e
    finally:
        db.close()
    return None if row is None else float(row[0])


def read_orders(db_path: Path) -> list[dict[str, Any]]:
    """The grid orders the daemon's order book still holds (open ones, and the most recent
    closed ones), as stored: their caps, start, end, response deadline and compliance, for
    a report's orders table and deadline marks. Empty without a grid book."""
    db = _open(db_path)
    try:
        row = db.execute("SELECT value FROM kv WHERE key = 'grid.book'").fetchone()
    except sqlite3.DatabaseError as e:
        if "no such table" in str(e):
            return []
        raise HistoryError(f"cannot read grid orders from {db_path}: {e}") from e
    finally:
        db.close()
    if row is None:
        return []
    try:
        orders = json.loads(row[0]).get("orders") or []
    except (ValueError, AttributeError):
        return []  # a book this rigd cannot read: the report goes without
    out = []
    for o in orders:
        if not isinstance(o, dict) or not isinstance(o.get("order_id"), str):
            continue
        start, within = o.get("start"), o.get("respond_within_s")
        deadline = (
            float(start) + float(within)
            if isinstance(start, int | float) and isinstance(within, int | float)
            else None
        )
        out.append({**o, "deadline": deadline})
    return out


def _readonly_refused(e: sqlite3.Error) -> bool:
    name = getattr(e, "sqlite_errorname", "")
    return name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) or "readonly" in str(e)


def _open(db_path: Path) -> sqlite3.Connection:
    """The database, read-only. A WAL database (the daemon's) needs its shared-memory
    index (`-shm`), which SQLite creates on first read after a clean stop removed it; a
    user who may only read the directory cannot. With no `-wal` file either, the main
    file holds everything, so it is opened immutable (no index, no locks) instead."""
    if not db_path.is_file():
        raise HistoryError(f"no state database at {db_path}")
    uri = db_path.resolve().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise HistoryError(f"cannot open {db_path}: {e}") from e
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens the WAL index
        return db
    except sqlite3.Error as e:
        db.close()
        wal = db_path.resolve().with_name(db_path.resolve().name + "-wal")
        if not _readonly_refused(e) or wal.exists():
            raise HistoryError(f"cannot open {db_path}: {e}") from e
    try:
        db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as e:
        db.close()
        raise HistoryError(f"cannot open {db_path}: {e}") from e
    log.debug("history_opened_immutable", path=str(db_path))
    return db


def _read(
    db_path: Path, window: Callable[[sqlite3.Connection], tuple[float, float]]
) -> list[Bucket]:
    db = _open(db_path)
    try:
        since, until = window(db)
        hi = until if math.isfinite(until) else 1e18
        steps = [
            int(r[0]) for r in db.execute("SELECT DISTINCT step_s FROM history ORDER BY step_s")
        ]
        out: list[Bucket] = []
        upto = hi
        for step in steps:  # finest first; each coarser step fills in before it
            rows = db.execute(
                f"SELECT {Bucket._COLS} FROM history WHERE step_s = ? AND ts >= ? AND ts < ? "
                "ORDER BY ts",
                (step, since, upto),
            ).fetchall()
            got = [Bucket.from_row(r) for r in rows]
            if got and out and got[-1].end > out[0].ts:
                # The coarse row the finer rows start in: if they hold all of it, it goes;
                # if some were pruned, it stays whole (no gap) and they go.
                inside = [b for b in out if b.ts < got[-1].end]
                if sum(b.samples for b in inside) >= got[-1].samples:
                    got.pop()
                else:
                    out = [b for b in out if b.ts >= got[-1].end]
            if got:
                out = got + out
                upto = out[0].ts
        return out
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise HistoryError(f"cannot read history from {db_path}: {e}") from e
    except sqlite3.DatabaseError as e:
        raise HistoryError(f"cannot read history from {db_path}: {e}") from e
    finally:
        db.close()
