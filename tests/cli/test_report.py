"""The site history and its report: a simulated day (virtual time) with a real grid order,
kept in the state database as bounded, downsampled rows; drawn as PNG and HTML and checked
for its series; `rigctl report` with the daemon stopped; and `rigd demo --report`."""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle, StepPatch

from bench.sim_harness import START, SimHarness
from controller.adapters.history import (
    Bucket,
    HistoryError,
    Point,
    Recorder,
    ensure_schema,
    read,
    read_last,
    read_orders,
    register_before,
    write_bucket,
)
from controller.adapters.store import StateStore
from controller.cli.report import (
    build_figure,
    cap_runs,
    energy_imported,
    history_gaps,
    meter_gaps,
    order_spans,
    orders_info,
    over_runs,
    render_html,
    render_png,
    summarize,
)
from controller.cli.rigctl import main as rigctl
from controller.config import ConfigError, GridConfig, HistoryConfig, parse_config
from tests.grid_helpers import order, plain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DAY = 86_400.0
ORDER_AT, ORDER_S = START + 8 * 3600, 4 * 3600  # 08:00-12:00 farm time


# -- a simulated day ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A farm day in virtual time: a day budget, and a grid order at half the load from
    08:00 to 12:00, sent to the daemon's grid service as an operator's message. History keeps
    fine rows for half a day only, so the report stitches rollups and fine rows."""
    import asyncio

    async def run() -> tuple[Path, float]:
        tmp = tmp_path_factory.mktemp("day")
        h = SimHarness.create(
            tmp,
            rigs=20,
            pdus=2,
            interval_s=60,
            control={"min_on_s": 60, "min_off_s": 60},
            budget={"period": "day", "kwh": 1500},
        )
        h.cfg = h.cfg.model_copy(
            update={
                "grid": GridConfig(allow_unsigned=True),
                "history": HistoryConfig(keep_days=0.5),
            }
        )
        await h.close_daemon()
        h.daemon = h._new_daemon()
        assert h.daemon.grid is not None
        target: list[float] = []

        def send_order() -> None:
            kw = round(h.true_import_kw() * 0.5, 1)
            target.append(kw)
            msg = order(
                site="simsite",
                now=h.now,
                order_id="day-1",
                target={"max_import_kw": kw},
                duration_s=ORDER_S,
                respond_within_s=300,
            )
            assert h.daemon.grid is not None
            assert h.daemon.grid.handle_order(plain(msg))["status"] == "accepted"

        h.at(ORDER_AT, send_order)
        await h.run_for(DAY)
        await h.daemon.exports.stop()  # the step in progress, as on a clean stop
        path = h.store.path
        await h.close()
        return path, target[0]

    return asyncio.run(run())


def test_history_of_a_day_is_bounded_downsampled_and_stitched(day: tuple[Path, float]) -> None:
    db_path, target = day
    with sqlite3.connect(db_path) as db:
        counts = dict(db.execute("SELECT step_s, COUNT(*) FROM history GROUP BY step_s"))
    assert counts[900] == 96  # every 15 minutes of the day (and one more for the last step)
    assert counts[60] <= 0.5 * DAY / 60 + 2  # fine rows: only the last half day kept
    rows = read(db_path, START)
    assert rows[0].step_s == 900 and rows[-1].step_s == 60
    assert rows[0].ts == START and rows[-1].end == pytest.approx(START + DAY, abs=60)
    for a, b in itertools.pairwise(rows):
        assert b.ts >= a.end - 1e-6, "rows overlap"
        assert b.ts - a.end <= 900, "a gap longer than one rollup step"
    # the order's window: in history as a grid cap, shaded as one span
    (span,) = order_spans(rows)
    assert span.order_id == "day-1"
    assert span.start == pytest.approx(ORDER_AT, abs=900)
    assert span.end == pytest.approx(ORDER_AT + ORDER_S, abs=900)
    during = [b for b in rows if span.start + 900 <= b.ts and b.end <= span.end - 900]
    assert during and all(b.cap_source == "grid" for b in during)
    assert all(b.cap_kw == pytest.approx(target) for b in during)
    assert all(b.import_kw is not None and b.import_kw <= b.cap_kw for b in during)  # type: ignore[operator]
    assert all(b.rigs["sleeping"] > 0 for b in during)
    # the budget: counted over the day, read back in every row
    assert rows[-1].budget_kwh == 1500 and rows[-1].budget_used_kwh is not None
    assert rows[-1].budget_used_kwh > rows[0].budget_used_kwh  # type: ignore[operator]
    # read_last: the last hours, up to the newest row
    last = read_last(db_path, 3600)
    assert last and all(b.step_s == 60 for b in last) and len(last) in (60, 61)


def test_report_picture_shows_cap_import_under_it_and_the_grid_order(
    day: tuple[Path, float],
) -> None:
    db_path, target = day
    rows = read(db_path, START)
    fig = build_figure(rows, "a simulated day")
    ax_imp, ax_bud, ax_rigs, ax_hash = fig.axes
    assert ax_imp.get_title() == "Import vs cap"
    lines = {ln.get_label(): ln for ln in ax_imp.get_lines() if isinstance(ln, Line2D)}
    imp = lines["import (mean)"]
    assert len(imp.get_xdata()) == len(rows)  # type: ignore[arg-type]
    caps = [p for p in ax_imp.patches if isinstance(p, StepPatch) and p.get_label() == "cap"]
    (cap,) = caps
    values = cap.get_data().values
    assert min(values) == pytest.approx(target)
    shaded = [p for p in ax_imp.patches if p.get_label() == "grid order day-1"]
    assert len(shaded) == 1 and isinstance(shaded[0], Rectangle)
    legend = [t.get_text() for t in ax_imp.get_legend().get_texts()]
    assert {"import (mean)", "cap", "control target", "grid order day-1"} <= set(legend)
    # the import is under the cap wherever it was plotted during the order
    ys = imp.get_ydata()
    during = [
        (y, b.cap_kw)
        for y, b in zip(ys, rows, strict=True)  # type: ignore[call-overload]
        if b.grid_orders and not math.isnan(y)
    ]
    assert during and sum(1 for y, c in during if y <= c) >= 0.9 * len(during)
    assert ax_bud.get_title() == "Energy budget burn-down"
    assert {ln.get_label() for ln in ax_bud.get_lines()} >= {"budget left"}
    assert ax_rigs.get_title() == "Rigs by state"
    stacks = [c for c in ax_rigs.collections if isinstance(c, PolyCollection)]
    assert [c.get_label() for c in stacks] == ["mining", "waking", "sleeping", "off", "unreachable"]
    assert ax_hash.get_title() == "Hashrate"

    png = render_png(rows, "a simulated day")
    assert png.startswith(PNG_MAGIC)
    pixels = imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 1000


def test_report_html_carries_the_picture_the_orders_and_the_series(
    day: tuple[Path, float],
) -> None:
    db_path, _ = day
    rows = read(db_path, START)
    page = render_html(rows, "a <simulated> day").decode()
    assert "<title>a &lt;simulated&gt; day</title>" in page
    img = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert img and base64.b64decode(img.group(1)).startswith(PNG_MAGIC)
    data = re.search(r'<script type="application/json" id="rigd-history">(.*?)</script>', page)
    assert data
    doc = json.loads(data.group(1))
    assert len(doc["rows"]) == len(rows)
    assert doc["orders"][0]["order_id"] == "day-1"
    row = doc["rows"][len(rows) // 2]
    for key in ("import_kw", "cap_kw", "cap_source", "budget_used_kwh", "rigs", "hashrate_ths"):
        assert key in row
    assert "day-1" in page.split('<table class="orders">')[1].split("</table>")[0]
    s = summarize(rows)
    assert s.lowest_cap_kw is not None and s.peak_import_kw is not None
    assert f"{s.lowest_cap_kw:,.1f} kW" in page


def test_rigctl_report_reads_the_database_with_the_daemon_stopped(
    day: tuple[Path, float], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, _ = day
    cfg = tmp_path / "rigd.toml"
    cfg.write_text(f'[site]\nid = "simsite"\nstate_dir = {json.dumps(str(db_path.parent))}\n')
    out = tmp_path / "report.png"
    assert rigctl(["-c", str(cfg), "report", "--since", "6h", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    said = capsys.readouterr().out
    assert re.search(r"report.png: 36[01] steps", said), said
    html_out = tmp_path / "report.html"
    assert rigctl(["report", "--db", str(db_path), "--since", "1d", "--out", str(html_out)]) == 0
    assert "day-1" in html_out.read_text()
    # wrong suffix, no database, empty database
    assert rigctl(["report", "--db", str(db_path), "--out", str(tmp_path / "r.pdf")]) == 2
    assert rigctl(["report", "--db", str(tmp_path / "none"), "--out", str(out)]) == 2
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    assert rigctl(["report", "--db", str(empty), "--out", str(out)]) == 1
    assert "no history" in capsys.readouterr().err


# -- bounds and rollups (pure database) ---------------------------------------------------------


def _point(
    ts: float,
    import_kw: float,
    cap_kw: float,
    orders: tuple[str, ...] = (),
    import_kwh: float | None = None,
) -> Point:
    return Point(
        ts=ts,
        import_kw=import_kw,
        cap_kw=cap_kw,
        cap_source="grid" if orders else "max_import",
        target_kw=cap_kw * 0.98,
        import_kwh=1000 + ts / 3600 if import_kwh is None else import_kwh,
        budget_kwh=None,
        budget_used_kwh=None,
        budget_start=None,
        budget_end=None,
        hashrate_ths=100.0,
        rigs={"mining": 10, "waking": 0, "sleeping": 0, "off": 0, "unreachable": 0},
        grid_orders=orders,
    )


def test_rows_stay_within_their_retention_and_rollups_fold_the_fine_rows(tmp_path: Path) -> None:
    cfg = HistoryConfig(step_s=60, keep_days=0.1, rollup_step_s=900, rollup_keep_days=1)
    db = sqlite3.connect(tmp_path / "h.sqlite", isolation_level=None)
    ensure_schema(db)
    t0 = 1_700_000_100.0 - 1_700_000_100.0 % 900
    for i in range(3 * 24 * 60):  # three days of minutes
        b = Bucket(60, t0 + 60 * i)
        orders = ("o-1",) if 30 <= i % 900 < 45 else ()
        b.add(_point(b.ts + 10, 50.0 + i % 15, 80.0 - (i % 15 == 7) * 20, orders))
        b.add(_point(b.ts + 40, 52.0 + i % 15, 80.0, orders))
        db.execute("BEGIN")
        write_bucket(db, b, cfg)
        db.execute("COMMIT")
    counts = dict(db.execute("SELECT step_s, COUNT(*) FROM history GROUP BY step_s"))
    assert counts[60] <= 0.1 * DAY / 60 + 1
    assert counts[900] <= 1 * DAY / 900 + 1
    rows = [
        Bucket.from_row(r)
        for r in db.execute(
            f"SELECT {Bucket._COLS} FROM history WHERE step_s = 900 ORDER BY ts DESC LIMIT 1"
        )
    ]
    (roll,) = rows
    fine = [
        Bucket.from_row(r)
        for r in db.execute(
            f"SELECT {Bucket._COLS} FROM history WHERE step_s = 60 AND ts >= ? AND ts < ?",
            (roll.ts, roll.end),
        )
    ]
    assert roll.samples == sum(b.samples for b in fine) == 2 * len(fine)
    assert roll.import_kw == pytest.approx(sum(b.import_kw for b in fine) / len(fine))  # type: ignore[misc]
    assert roll.import_max_kw == max(b.import_max_kw for b in fine)  # type: ignore[type-var]
    assert roll.cap_kw == min(b.cap_kw for b in fine) == 60.0  # type: ignore[type-var]
    assert roll.import_kwh == fine[-1].import_kwh
    db.close()


T0 = 1_700_000_100.0 - 1_700_000_100.0 % 900  # on a rollup boundary


def _minutes(db: sqlite3.Connection, cfg: HistoryConfig, n: int, t0: float = T0) -> None:
    """n minute rows from t0, written as the recorder does (each rollup passed back)."""
    roll = None
    for i in range(n):
        b = Bucket(60, t0 + 60 * i)
        b.add(_point(b.ts + 10, 50.0 + i % 7, 80.0))
        b.add(_point(b.ts + 40, 60.0 + i % 7, 80.0))
        db.execute("BEGIN")
        roll = write_bucket(db, b, cfg, roll)
        db.execute("COMMIT")


def test_the_last_hour_is_an_hour_when_history_ends_inside_a_rollup_step(
    tmp_path: Path,
) -> None:
    """The newest 15-minute row ends up to 14 minutes after the newest minute row: the
    window must end at the minute rows, or `--since 1h` shows 52 minutes."""
    path = tmp_path / "h.sqlite"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        ensure_schema(db)
        _minutes(db, HistoryConfig(), 3 * 60 + 7)  # 3 h 7 min: 8 min short of a rollup
    newest = T0 + (3 * 60 + 7) * 60
    last = read_last(path, 3600)
    assert len(last) == 60 and all(b.step_s == 60 for b in last)
    assert last[0].ts == newest - 3600 and last[-1].end == newest


def test_rollups_are_folded_step_by_step_without_reading_rows_back(tmp_path: Path) -> None:
    cfg = HistoryConfig(step_s=60, keep_days=1, rollup_step_s=900, rollup_keep_days=2)
    db = sqlite3.connect(tmp_path / "h.sqlite", isolation_level=None)
    ensure_schema(db)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    _minutes(db, cfg, 6 * 60 + 7)
    db.set_trace_callback(None)
    assert len([q for q in statements if q.startswith("INSERT")]) == 2 * (6 * 60 + 7)
    assert not [q for q in statements if "ORDER BY ts" in q]  # no rollup recomputed
    rolls = [
        Bucket.from_row(r)
        for r in db.execute(f"SELECT {Bucket._COLS} FROM history WHERE step_s = 900 ORDER BY ts")
    ]
    assert len(rolls) == 25  # 6 h 7 min: 24 whole rollups and one begun
    for roll in rolls:  # each the fold of its minutes
        fine = [
            Bucket.from_row(r)
            for r in db.execute(
                f"SELECT {Bucket._COLS} FROM history WHERE step_s = 60 AND ts >= ? AND ts < ? "
                "ORDER BY ts",
                (roll.ts, roll.end),
            )
        ]
        folded = Bucket(900, roll.ts)
        for b in fine:
            folded.merge(b)
        assert roll.samples == folded.samples == 2 * len(fine)
        assert roll.import_kw == pytest.approx(folded.import_kw)
        assert roll.import_max_kw == folded.import_max_kw
        assert roll.import_kwh == folded.import_kwh == fine[-1].import_kwh
        assert roll.hashrate_ths == pytest.approx(folded.hashrate_ths)
    db.close()


def test_fine_rows_must_outlive_a_rollup_step() -> None:
    base = '[site]\nid = "x"\n[history]\n'
    with pytest.raises(ConfigError, match=r"keep_days .* rollup step"):
        parse_config(base + "keep_days = 0.005\nrollup_step_s = 900\n", environ={})
    ok = parse_config(base + "keep_days = 0.25\nrollup_step_s = 3600\n", environ={})
    assert ok.history.keep_days * 86_400 >= ok.history.rollup_step_s


def test_a_restart_inside_a_step_adds_to_its_row(tmp_path: Path) -> None:
    """rigd stops (writing the step in progress) and starts again inside the same minute:
    the row keeps the samples from before the stop, their lowest cap and their grid order."""
    cfg = HistoryConfig()
    path = tmp_path / "rigd.sqlite"
    store = StateStore(path)
    rec = Recorder(store, cfg)
    rec.add(_point(T0 + 5, 40.0, 50.0, ("o-1",)))
    rec.add(_point(T0 + 15, 42.0, 50.0, ("o-1",)))
    rec.flush()  # a clean stop
    store.close()

    store = StateStore(path)
    rec = Recorder(store, cfg)
    rec.add(_point(T0 + 35, 60.0, 80.0))
    rec.add(_point(T0 + 45, 62.0, 80.0))
    rec.add(_point(T0 + 65, 70.0, 80.0))  # the next step: the first one is written
    rec.flush()  # stop again inside the second step, and go on without restarting
    rec.add(_point(T0 + 85, 72.0, 80.0))
    rec.add(_point(T0 + 125, 75.0, 80.0))  # the second step written a second time
    store.close()

    def rows(step: int) -> list[Bucket]:
        with closing(sqlite3.connect(path)) as db:
            return [
                Bucket.from_row(r)
                for r in db.execute(
                    f"SELECT {Bucket._COLS} FROM history WHERE step_s = ? ORDER BY ts", (step,)
                )
            ]

    first, second = rows(60)
    assert first.samples == 4
    assert first.import_kw == pytest.approx((40 + 42 + 60 + 62) / 4)
    assert first.import_max_kw == 62.0
    assert first.cap_kw == 50.0 and first.cap_source == "grid"  # the lowest, before the stop
    assert first.grid_orders == ["o-1"]
    assert first.import_kwh == pytest.approx(1000 + (T0 + 45) / 3600)  # the last reading
    assert second.samples == 2  # written twice, counted once
    (roll,) = rows(900)
    assert roll.samples == 6 and roll.cap_kw == 50.0 and roll.grid_orders == ["o-1"]


@pytest.fixture
def readonly_db() -> Iterator[Path]:
    """A state database as a cleanly stopped rigd leaves it (WAL mode, no -wal or -shm
    file), in a directory its reader may not write (mode 555)."""
    top = Path(tempfile.mkdtemp(prefix="rigd-ro-"))  # not under pytest's private 0700 tree
    state = top / "state"
    try:
        store = StateStore(state / "rigd.sqlite")
        rec = Recorder(store, HistoryConfig())
        for i in range(90):
            rec.add(_point(T0 + 30 * i, 50.0, 80.0))
        rec.flush()
        store.close()
        assert sorted(p.name for p in state.iterdir()) == ["rigd.sqlite"]
        with closing(sqlite3.connect(state / "rigd.sqlite")) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert sorted(p.name for p in state.iterdir()) == ["rigd.sqlite"]
        os.chmod(top, 0o755)
        os.chmod(state / "rigd.sqlite", 0o644)
        os.chmod(state, 0o555)
        yield state / "rigd.sqlite"
    finally:
        os.chmod(state, 0o755)
        shutil.rmtree(top)


def as_reader(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` in a child process as a user who may only read the directory: this user,
    or `nobody` when the tests run as root, whom a directory's mode does not stop."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                out = {"ok": fn()}
            except Exception as e:
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_report_reads_a_stopped_daemons_database_from_a_read_only_directory(
    readonly_db: Path,
) -> None:
    def report() -> list[Any]:
        rows = read_last(readonly_db, 3600)
        return [len(rows), rows[-1].end, register_before(readonly_db, rows[0].ts)]

    got = as_reader(report)
    assert "error" not in got, got["error"]
    n, end, before = got["ok"]
    assert n == 45 and end == T0 + 45 * 60
    assert before is None  # the window starts at the first row: nothing before it
    assert sorted(p.name for p in readonly_db.parent.iterdir()) == ["rigd.sqlite"]
    # with a -wal file (a daemon running, or one that crashed) the file alone is not the
    # database: it is not read as one
    os.chmod(readonly_db.parent, 0o755)
    (readonly_db.parent / "rigd.sqlite-wal").write_bytes(b"")
    os.chmod(readonly_db.parent, 0o555)
    got = as_reader(lambda: len(read_last(readonly_db, 3600)))
    assert "HistoryError: cannot open" in got.get("error", ""), got
    with pytest.raises(HistoryError, match="no state database"):
        read_last(readonly_db.parent / "none.sqlite", 60)


def test_summary_peak_is_the_highest_reading_and_energy_counts_every_step() -> None:
    steps = []
    for i, (kwh, peak) in enumerate([(110.0, 90.0), (120.0, 140.0), (130.0, 95.0)]):
        b = Bucket(60, T0 + 60 * i)
        b.add(_point(b.ts + 10, 80.0, 200.0, import_kwh=kwh - 5))
        b.add(_point(b.ts + 40, peak, 200.0, import_kwh=kwh))
        steps.append(b)
    s = summarize(steps, register_before=100.0)
    assert s.peak_import_kw == 140.0  # a reading, not the highest step mean (110)
    assert dict(s.rows())["peak import"] == "140.0 kW"
    assert s.energy_kwh == pytest.approx(30.0)  # 100 -> 130: the first step counts
    assert summarize(steps).energy_kwh == pytest.approx(20.0)  # nothing known before it
    # a meter reset (the register goes back): that step is not counted, and it is said
    steps[2].import_kwh = 4.0
    tail = Bucket(60, T0 + 180)
    tail.add(_point(tail.ts + 10, 80.0, 200.0, import_kwh=9.0))
    s = summarize([*steps, tail], register_before=100.0)
    assert s.energy_kwh == pytest.approx(20.0 + 5.0) and s.meter_resets == 1
    assert "register went back" in dict(s.rows())["energy imported"]
    series, resets = energy_imported([*steps, tail], 100.0)
    assert series == pytest.approx([10.0, 20.0, 20.0, 25.0]) and resets == 1
    assert min(series) >= 0


def test_rigctl_report_counts_energy_from_the_reading_before_the_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h.sqlite"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        ensure_schema(db)
        _minutes(db, HistoryConfig(), 120)
    rows = read_last(path, 1800)
    assert len(rows) == 30
    before = register_before(path, rows[0].ts)
    assert before == pytest.approx(1000 + (rows[0].ts - 20) / 3600)  # the minute before's last
    out = tmp_path / "r.html"
    assert rigctl(["report", "--db", str(path), "--since", "30m", "--out", str(out)]) == 0
    summary = out.read_text().split('<table class="summary">')[1].split("</table>")[0]
    kwh = (rows[-1].import_kwh or 0) - before
    assert f"<th>energy imported</th><td>{kwh:,.1f} kWh</td>" in summary
    assert kwh == pytest.approx(0.5, abs=0.01)  # half an hour at 1 kWh an hour, every step


@pytest.mark.timeout(300)
def test_demo_writes_the_report_of_its_run(tmp_path: Path) -> None:
    """The demo's scripted grid order, in the report it writes when it ends."""
    out = tmp_path / "demo.html"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli.rigd",
            "demo",
            "--headless",
            "--duration",
            "15",
            "--rigs",
            "20",
            "--pdus",
            "2",
            "--speed",
            "40",
            "--report",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,  # on a busy machine the demo slows its farm clock (and says so)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    written = [e for e in events if e["event"] == "demo_report_written"]
    assert written and written[0]["path"] == str(out)
    page = out.read_text()
    doc = json.loads(
        re.search(r'id="rigd-history">(.*?)</script>', page).group(1)  # type: ignore[union-attr]
    )
    rows = doc["rows"]
    (o,) = doc["orders"]
    assert o["order_id"].startswith("demo-")
    in_order = [r for r in rows if o["order_id"] in r["grid_orders"]]
    assert in_order and all(r["cap_source"] == "grid" for r in in_order[1:])
    # sleeping takes seconds; a step whose meter reads all timed out has no import
    settled = [r for r in in_order if r["ts"] >= o["start"] + 60 and r["import_kw"] is not None]
    assert len(settled) >= 5 and all(r["import_kw"] <= r["cap_kw"] for r in settled)
    assert any(r["cap_source"] == "max_import" for r in rows)  # before and after the order
    img = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert img and base64.b64decode(img.group(1)).startswith(PNG_MAGIC)
    # a report path the demo cannot write is refused before the farm starts
    bad = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "demo", "--report", str(tmp_path / "x.pdf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and ".png or" in bad.stderr


# -- what each step means: cap sources, deadlines, over the cap, gaps ----------------------------


def _steps(
    spec: list[tuple[float | None, float, str, tuple[str, ...]]], t0: float = 0.0
) -> list[Bucket]:
    """Minute steps from (import kW or None, cap kW, cap source, grid orders); a None cap
    source leaves a gap (no step at all) there."""
    out = []
    for i, (imp, cap, source, orders) in enumerate(spec):
        if source == "gap":
            continue
        b = Bucket(60, t0 + 60 * i)
        b.add(
            Point(
                ts=t0 + 60 * i + 1,
                import_kw=imp,
                cap_kw=cap,
                cap_source=source,
                target_kw=cap * 0.98,
                import_kwh=None,
                budget_kwh=None,
                budget_used_kwh=None,
                budget_start=None,
                budget_end=None,
                hashrate_ths=100.0,
                rigs={"mining": 3},
                grid_orders=orders,
            )
        )
        out.append(b)
    return out


T_STEPS = 1_796_000_000.0
SPEC: list[tuple[float | None, float, str, tuple[str, ...]]] = [
    (90.0, 100.0, "max_import", ()),
    (90.0, 100.0, "max_import", ()),
    (70.0, 60.0, "grid", ("evt-7",)),  # over the cap: the order just began
    (59.0, 60.0, "grid", ("evt-7",)),
    (None, 60.0, "grid", ("evt-7",)),  # the meter did not answer
    (50.0, 55.0, "override", ("evt-7",)),
    (0.0, 0.0, "gap", ()),  # rigd not running
    (0.0, 0.0, "gap", ()),
    (40.0, 45.0, "schedule", ()),
    (80.0, 45.0, "schedule", ()),  # over again
]


def test_cap_steps_over_cap_and_gaps_are_found() -> None:
    rows = _steps(SPEC, T_STEPS)
    assert [(r.label, (r.start - T_STEPS) / 60, r.value) for r in cap_runs(rows)] == [
        ("site maximum", 0, 100.0),
        ("grid order evt-7", 2, 60.0),
        ("override", 5, 55.0),
        ("schedule", 8, 45.0),
    ]
    assert [((r.start - T_STEPS) / 60, (r.end - T_STEPS) / 60) for r in over_runs(rows)] == [
        (2, 3),
        (9, 10),
    ]
    assert [((r.start - T_STEPS) / 60, (r.end - T_STEPS) / 60) for r in meter_gaps(rows)] == [
        (4, 5)
    ]
    assert [((r.start - T_STEPS) / 60, (r.end - T_STEPS) / 60) for r in history_gaps(rows)] == [
        (6, 8)
    ]
    said = dict(summarize(rows).rows())
    assert said["steps with mean import over the cap"] == "2 of 8"
    assert said["steps without a meter reading"].startswith("1: the import meter did not answer")
    assert said["time with no history"].startswith("1 gap(s), 2 min in all: rigd was not running")
    assert said["cap set by"].startswith("grid order 38 %")


def test_the_picture_labels_cap_steps_marks_deadlines_and_shades_over_cap_and_gaps() -> None:
    rows = _steps(SPEC, T_STEPS)
    book = [
        {
            "order_id": "evt-7",
            "start": T_STEPS + 120,
            "deadline": T_STEPS + 180,
            "cap_kw": 60.0,
            "compliant": False,
            "first_compliant_at": T_STEPS + 200,
            "max_overshoot_kw": 10.0,
        }
    ]
    info = orders_info(rows, book)
    assert info[0].deadline == T_STEPS + 180 and info[0].time_to_comply_s == 80
    fig = build_figure(rows, "t", None, info)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    for label in ("site maximum", "grid order evt-7", "override", "schedule", "evt-7 deadline"):
        assert label in texts, texts
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for label in ("over the cap", "no meter reading", "no history", "response deadline"):
        assert label in legend, legend
    page = render_html(rows, "t", None, book).decode()
    table = page.split('<table class="orders">')[1].split("</table>")[0]
    for col in ("cap kW", "response deadline", "compliant", "time to comply"):
        assert col in table
    assert "60.0" in table and "NO" in table and "80 s" in table and 'class="over"' in table
    series = page.split('<table class="series">')[1]
    assert series.count('<tr class="over">') == 2 and "no meter reading" in series


def test_the_order_book_gives_the_day_orders_cap_deadline_and_compliance(
    day: tuple[Path, float],
) -> None:
    db_path, target = day
    (o,) = [x for x in read_orders(db_path) if x["order_id"] == "day-1"]
    assert o["deadline"] == pytest.approx(o["start"] + 300)
    assert o["cap_kw"] == pytest.approx(target) and o["compliant"] is True
    rows = read(db_path, START)
    page = render_html(rows, "day", None, read_orders(db_path)).decode()
    table = page.split('<table class="orders">')[1].split("</table>")[0]
    assert f"{target:,.1f}" in table and "yes" in table
    doc = json.loads(
        re.search(r'id="rigd-history">(.*?)</script>', page).group(1)  # type: ignore[union-attr]
    )
    assert doc["orders"][0]["deadline"] == pytest.approx(o["deadline"])
