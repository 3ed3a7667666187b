"""The site history and its report: a simulated day (virtual time) with a real grid order,
kept in the state database as bounded, downsampled rows; drawn as PNG and HTML and checked
for its series; `rigctl report` with the daemon stopped; and `rigd demo --report`."""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle, StepPatch

from controller.config import GridConfig, HistoryConfig
from controller.history import Bucket, Point, ensure_schema, read, read_last, write_bucket
from controller.report import build_figure, order_spans, render_html, render_png, summarize
from controller.rigctl import main as rigctl
from tests.grid_helpers import order, plain
from tests.sim_harness import START, SimHarness

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


def _point(ts: float, import_kw: float, cap_kw: float, orders: tuple[str, ...] = ()) -> Point:
    return Point(
        ts=ts,
        import_kw=import_kw,
        cap_kw=cap_kw,
        cap_source="grid" if orders else "max_import",
        target_kw=cap_kw * 0.98,
        import_kwh=1000 + ts / 3600,
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


def test_demo_writes_the_report_of_its_run(tmp_path: Path) -> None:
    """The demo's scripted grid order, in the report it writes when it ends."""
    out = tmp_path / "demo.html"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
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
        timeout=90,
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
        [sys.executable, "-m", "controller.cli", "demo", "--report", str(tmp_path / "x.pdf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and ".png or" in bad.stderr
