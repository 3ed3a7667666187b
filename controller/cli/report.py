"""`rigctl report` and `rigd demo --report`: the pictures grid contracts are argued over.

From the site history (controller/adapters/history.py), one figure of four panels sharing
the time axis:

1. import against the cap over time (the mean import of each step and its peak; the
   lowest cap in force, labelled with what set it at each change, and the control
   target), with every grid order shaded and named and its response deadline marked,
   the steps over the cap in red, and the gaps explained: steps without a meter reading,
   and time with no history (rigd not running);
2. the energy budget's burn-down: what is left against an even pace over the period
   (without a [budget], the energy imported since the start of the window);
3. rigs by state, stacked;
4. hashrate.

PNG is drawn by matplotlib on its Agg backend (no display needed). HTML is one
self-contained file: the same picture embedded, a summary table, the grid orders, and
the series themselves as JSON (`<script id="rigd-history">`) for anyone who wants the
numbers behind the picture.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.adapters.history import RIG_STATES, Bucket
from controller.errors import RigdError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = (".png", ".html")
STATE_COLORS = {
    "mining": "#2e7d32",
    "waking": "#9ccc65",
    "sleeping": "#1565c0",
    "off": "#616161",
    "unreachable": "#c62828",
}


class ReportError(RigdError):
    """A report that cannot be made: an unknown format, or nothing to draw."""


@dataclass(frozen=True, slots=True)
class OrderSpan:
    order_id: str
    start: float
    end: float


def order_spans(rows: Sequence[Bucket]) -> list[OrderSpan]:
    """Each grid order's time in force: from the first step it was active to the end of the
    last one. A step that shows the order gone ends its span; a gap in the history (rigd
    stopped, cycles overran) does not, since missing data is not the order ending."""
    spans: list[OrderSpan] = []
    open_: dict[str, tuple[float, float]] = {}
    for b in rows:
        for oid in [o for o in open_ if o not in b.grid_orders]:
            start, end = open_.pop(oid)
            spans.append(OrderSpan(oid, start, end))
        for oid in b.grid_orders:
            start, _ = open_.get(oid, (b.ts, b.end))
            open_[oid] = (start, b.end)
    spans += [OrderSpan(oid, s, e) for oid, (s, e) in open_.items()]
    return sorted(spans, key=lambda s: s.start)


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive steps that share something: a cap source, import over the cap, a gap."""

    label: str
    start: float
    end: float
    value: float | None = None  # the cap where the run starts, for cap labels


CAP_LABELS = {
    "max_import": "site maximum",
    "schedule": "schedule",
    "budget": "budget",
    "grid": "grid order",
    "override": "override",
    "zone": "zone share",
}


def _runs(rows: Sequence[Bucket], key: Any) -> list[Run]:
    """Runs of consecutive steps (no gap between them) with the same non-None key."""
    out: list[Run] = []
    cur: tuple[str, float, float, float | None] | None = None
    prev_end: float | None = None
    for b in rows:
        k = key(b)
        contiguous = prev_end is not None and abs(b.ts - prev_end) < 1e-6
        if cur is not None and (k != cur[0] or not contiguous):
            out.append(Run(*cur))
            cur = None
        if k is not None:
            cur = (k, cur[1] if cur is not None else b.ts, b.end, cur[3] if cur else b.cap_kw)
        prev_end = b.end
    if cur is not None:
        out.append(Run(*cur))
    return out


def cap_runs(rows: Sequence[Bucket]) -> list[Run]:
    """What set the cap, run by run: `override`, `schedule`, `grid order evt-1`, ..."""

    def label(b: Bucket) -> str | None:
        if b.cap_source is None:
            return None
        name = CAP_LABELS.get(b.cap_source, b.cap_source)
        if b.cap_source == "grid" and b.grid_orders:
            name += " " + ", ".join(b.grid_orders)
        return name

    return _runs(rows, label)


def over_runs(rows: Sequence[Bucket]) -> list[Run]:
    """Steps whose mean import was over the cap."""
    return _runs(
        rows,
        lambda b: (
            "over the cap"
            if b.import_kw is not None and b.cap_kw is not None and b.import_kw > b.cap_kw
            else None
        ),
    )


def meter_gaps(rows: Sequence[Bucket]) -> list[Run]:
    """Steps rigd recorded without any meter reading (the meter did not answer)."""
    return _runs(rows, lambda b: "no meter reading" if b.import_kw is None else None)


def history_gaps(rows: Sequence[Bucket]) -> list[Run]:
    """Time between two steps with no step at all: rigd was not running (or not recording)."""
    return [
        Run("no history", a.end, b.ts) for a, b in itertools.pairwise(rows) if b.ts - a.end > 1e-6
    ]


@dataclass(frozen=True, slots=True)
class OrderInfo:
    """A grid order as the report shows it: its span in the history, and what the daemon's
    order book says of it (cap, deadline, compliance) where it still holds it."""

    order_id: str
    start: float
    end: float
    cap_kw: float | None = None
    deadline: float | None = None
    compliant: bool | None = None
    status: str | None = None
    time_to_comply_s: float | None = None
    max_overshoot_kw: float | None = None


def orders_info(rows: Sequence[Bucket], book: Sequence[dict[str, Any]] = ()) -> list[OrderInfo]:
    known = {o["order_id"]: o for o in book}
    out = []
    for s in order_spans(rows):
        o = known.get(s.order_id, {})
        first = o.get("first_compliant_at")
        start = o.get("start")
        out.append(
            OrderInfo(
                s.order_id,
                s.start,
                s.end,
                cap_kw=o.get("cap_kw"),
                deadline=o.get("deadline"),
                compliant=o.get("compliant"),
                status=o.get("status"),
                time_to_comply_s=None
                if not isinstance(first, int | float) or not isinstance(start, int | float)
                else max(0.0, first - start),
                max_overshoot_kw=o.get("max_overshoot_kw"),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class Summary:
    start: float
    end: float
    peak_import_kw: float | None
    mean_import_kw: float | None
    lowest_cap_kw: float | None
    steps_over_cap: int
    steps: int
    energy_kwh: float | None  # imported in the window, from the meter's register
    budget_used_kwh: float | None
    budget_kwh: float | None
    orders: list[OrderSpan]
    meter_resets: int = 0  # times the register went back (not counted in energy_kwh)
    cap_sources: dict[str, float] | None = None  # seconds the cap was set by each source
    meter_gap_steps: int = 0
    history_gaps: list[Run] | None = None

    def rows(self) -> list[tuple[str, str]]:
        def kw(v: float | None, unit: str = "kW") -> str:
            return "-" if v is None else f"{v:,.1f} {unit}"

        out = [
            ("from", _utc(self.start)),
            ("to", _utc(self.end)),
            ("mean import", kw(self.mean_import_kw)),
            ("peak import", kw(self.peak_import_kw)),
            ("lowest cap", kw(self.lowest_cap_kw)),
            ("steps with mean import over the cap", f"{self.steps_over_cap} of {self.steps}"),
            ("energy imported", kw(self.energy_kwh, "kWh")),
        ]
        if self.meter_resets:
            out[-1] = (
                "energy imported",
                f"{kw(self.energy_kwh, 'kWh')}, not counting {self.meter_resets} step(s) where "
                "the meter's register went back (a meter reset or replacement)",
            )
        if self.budget_kwh is not None:
            used = kw(self.budget_used_kwh, "kWh")
            out.append(("energy budget used", f"{used} of {self.budget_kwh:,.0f} kWh"))
        if self.cap_sources:
            total = sum(self.cap_sources.values()) or 1.0
            out.append(
                (
                    "cap set by",
                    ", ".join(
                        f"{CAP_LABELS.get(k, k)} {100 * v / total:.0f} %"
                        for k, v in sorted(self.cap_sources.items(), key=lambda kv: -kv[1])
                    ),
                )
            )
        if self.meter_gap_steps:
            out.append(
                (
                    "steps without a meter reading",
                    f"{self.meter_gap_steps}: the import meter did not answer; control ran on "
                    "an estimate (rig and outlet readings, plus a margin), and those steps "
                    "show no import",
                )
            )
        if self.history_gaps:
            mins = sum(g.end - g.start for g in self.history_gaps) / 60
            out.append(
                (
                    "time with no history",
                    f"{len(self.history_gaps)} gap(s), {mins:,.0f} min in all: rigd was not "
                    "running (stopped, or the host down), so nothing was recorded",
                )
            )
        return out


def energy_imported(
    rows: Sequence[Bucket], register_before: float | None = None
) -> tuple[list[float], int]:
    """Energy imported from the window's start to the end of each step (NaN before the
    first reading), and how many times the register went back.

    Counted from `register_before`, the meter's register when the window starts (the last
    reading before it, history.register_before), so the first step counts too; without
    it, from the first step's reading. A register that goes back (a meter reset or
    replacement) adds nothing for its step, so the total is never negative."""
    out: list[float] = []
    last, total, resets = register_before, 0.0, 0
    for b in rows:
        reg = b.import_kwh
        if reg is not None:
            if last is not None and reg < last:
                resets += 1
            elif last is not None:
                total += reg - last
            last = reg
        out.append(math.nan if last is None else total)
    return out, resets


def summarize(rows: Sequence[Bucket], register_before: float | None = None) -> Summary:
    imports = [b.import_kw for b in rows if b.import_kw is not None]
    # each step's highest reading (its mean where an old row has no maximum)
    peaks = [p for b in rows if (p := _max_or_mean(b)) is not None]
    caps = [b.cap_kw for b in rows if b.cap_kw is not None]
    readings = sum(1 for b in rows if b.import_kwh is not None) + (register_before is not None)
    energy, resets = energy_imported(rows, register_before)
    over = sum(
        1
        for b in rows
        if b.import_kw is not None and b.cap_kw is not None and b.import_kw > b.cap_kw
    )
    last_budget = next((b for b in reversed(rows) if b.budget_kwh is not None), None)
    sources: dict[str, float] = {}
    for b in rows:
        if b.cap_source is not None:
            sources[b.cap_source] = sources.get(b.cap_source, 0.0) + b.step_s
    weights = [b.samples for b in rows if b.import_kw is not None]
    mean = (
        sum(v * w for v, w in zip(imports, weights, strict=True)) / sum(weights)
        if imports and sum(weights)
        else None
    )
    return Summary(
        start=rows[0].ts if rows else math.nan,
        end=rows[-1].end if rows else math.nan,
        peak_import_kw=max(peaks) if peaks else None,
        mean_import_kw=mean,
        lowest_cap_kw=min(caps) if caps else None,
        steps_over_cap=over,
        steps=len(rows),
        energy_kwh=energy[-1] if readings >= 2 else None,
        budget_used_kwh=None if last_budget is None else last_budget.budget_used_kwh,
        budget_kwh=None if last_budget is None else last_budget.budget_kwh,
        orders=order_spans(rows),
        meter_resets=resets,
        cap_sources=sources,
        meter_gap_steps=sum(1 for b in rows if b.import_kw is None),
        history_gaps=history_gaps(rows),
    )


def _max_or_mean(b: Bucket) -> float | None:
    return b.import_max_kw if b.import_max_kw is not None else b.import_kw


def _utc(ts: float) -> str:
    if not math.isfinite(ts):
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _times(rows: Sequence[Bucket]) -> list[dt.datetime]:
    """Each step at its middle: a step's mean belongs to the whole step."""
    return [dt.datetime.fromtimestamp(b.ts + b.step_s / 2, dt.UTC) for b in rows]


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _series(rows: Sequence[Bucket], name: str) -> list[float]:
    return [math.nan if (v := getattr(b, name)) is None else float(v) for b in rows]


def build_figure(
    rows: Sequence[Bucket],
    title: str,
    register_before: float | None = None,
    orders: Sequence[OrderInfo] = (),
) -> Figure:
    """The report's figure (no pyplot state: safe in a daemon or a test). `register_before`:
    the meter's register when the window starts (see energy_imported); `orders`: what the
    order book says of the grid orders (their response deadlines are marked)."""
    if not rows:
        raise ReportError("no history in the window: nothing to draw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 11), dpi=100, layout="constrained")
    ax_imp, ax_bud, ax_rigs, ax_hash = fig.subplots(
        4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 1.3]}
    )
    fig.suptitle(title)
    t = _times(rows)
    spans = order_spans(rows)

    # 1. import vs cap
    ax_imp.set_title("Import vs cap")
    ax_imp.plot(t, _series(rows, "import_kw"), color="#1f77b4", lw=1.4, label="import (mean)")
    peak = _series(rows, "import_max_kw")
    if any(not math.isnan(v) for v in peak):
        ax_imp.plot(t, peak, color="#1f77b4", lw=0.6, alpha=0.45, label="import (peak)")
    caps = _series(rows, "cap_kw")
    if any(not math.isnan(v) for v in caps):
        edges = [_when(b.ts) for b in rows] + [_when(rows[-1].end)]
        ax_imp.stairs(caps, edges, color="#d62728", lw=2.0, label="cap", baseline=None)
        target = _series(rows, "target_kw")
        ax_imp.stairs(
            target, edges, color="#d62728", lw=0.9, ls="--", label="control target", baseline=None
        )
    named: set[str] = set()
    for i, s in enumerate(spans):
        ax_imp.axvspan(
            _when(s.start),
            _when(s.end),
            color="#ff9800",
            alpha=0.18,
            label=f"grid order {s.order_id}" if s.order_id not in named else "_nolegend_",
        )
        named.add(s.order_id)
        for ax in (ax_bud, ax_rigs, ax_hash):
            ax.axvspan(_when(s.start), _when(s.end), color="#ff9800", alpha=0.12)
        ax_imp.annotate(
            s.order_id,
            xy=(_when(s.start), 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12 - 10 * (i % 3)),
            textcoords="offset points",
            fontsize=8,
            color="#e65100",
        )
    _mark_import_panel(ax_imp, rows, orders)
    ax_imp.set_ylabel("kW")
    ax_imp.set_ylim(bottom=0)
    ax_imp.legend(loc="lower left", fontsize=8, ncols=3)
    ax_imp.grid(alpha=0.3)

    # 2. budget burn-down
    has_budget = any(b.budget_kwh is not None for b in rows)
    if has_budget:
        ax_bud.set_title("Energy budget burn-down")
        left = [
            math.nan
            if b.budget_kwh is None or b.budget_used_kwh is None
            else b.budget_kwh - b.budget_used_kwh
            for b in rows
        ]
        ax_bud.plot(t, left, color="#6a1b9a", lw=1.6, label="budget left")
        pace = []
        for b in rows:
            if None in (b.budget_kwh, b.budget_start, b.budget_end):
                pace.append(math.nan)
                continue
            assert b.budget_kwh is not None and b.budget_start is not None
            assert b.budget_end is not None
            span = max(1.0, b.budget_end - b.budget_start)
            frac = min(1.0, max(0.0, (b.budget_end - b.end) / span))
            pace.append(b.budget_kwh * frac)
        ax_bud.plot(t, pace, color="#6a1b9a", lw=0.9, ls=":", label="even pace over the period")
        ax_bud.set_ylabel("kWh left")
    else:
        ax_bud.set_title("Energy imported (no energy budget configured)")
        used, _ = energy_imported(rows, register_before)
        ax_bud.plot(t, used, color="#6a1b9a", lw=1.6, label="energy imported")
        ax_bud.set_ylabel("kWh")
    ax_bud.legend(loc="best", fontsize=8)
    ax_bud.grid(alpha=0.3)

    # 3. rigs by state
    ax_rigs.set_title("Rigs by state")
    ax_rigs.stackplot(
        t,
        *[[b.rigs.get(s, 0.0) for b in rows] for s in RIG_STATES],
        labels=list(RIG_STATES),
        colors=[STATE_COLORS[s] for s in RIG_STATES],
        alpha=0.85,
        step="mid",
    )
    ax_rigs.set_ylabel("rigs")
    ax_rigs.legend(loc="lower left", fontsize=8, ncols=5)
    ax_rigs.grid(alpha=0.3)

    # 4. hashrate
    ax_hash.set_title("Hashrate")
    ax_hash.plot(t, [b.hashrate_ths / 1000 for b in rows], color="#2e7d32", label="hashrate")
    ax_hash.set_ylabel("PH/s")
    ax_hash.set_ylim(bottom=0)
    ax_hash.grid(alpha=0.3)
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax_hash.xaxis.set_major_locator(locator)
    ax_hash.xaxis.set_major_formatter(
        mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
    )
    ax_hash.set_xlabel("UTC")
    return fig


MAX_CAP_LABELS = 40


def _mark_import_panel(ax: Any, rows: Sequence[Bucket], orders: Sequence[OrderInfo]) -> None:
    """What set each cap step, each order's response deadline, the steps over the cap, and
    the gaps (no meter reading; no history at all), on the import panel."""
    runs = cap_runs(rows)
    if len(runs) > MAX_CAP_LABELS:  # a busy window: label the longer runs only
        span = (rows[-1].end - rows[0].ts) / MAX_CAP_LABELS
        runs = [r for r in runs if r.end - r.start >= span]
    for r in runs:
        if r.value is None:
            continue
        ax.annotate(
            r.label,
            xy=(_when(r.start), r.value),
            xytext=(2, 3),
            textcoords="offset points",
            fontsize=7,
            color="#b71c1c",
        )
    labelled = False
    for o in orders:
        if o.deadline is None or not rows[0].ts <= o.deadline <= rows[-1].end:
            continue
        ax.axvline(
            _when(o.deadline),
            color="#e65100",
            ls=":",
            lw=1.3,
            label="response deadline" if not labelled else "_nolegend_",
        )
        labelled = True
        ax.annotate(
            f"{o.order_id} deadline",
            xy=(_when(o.deadline), 0.45),
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            fontsize=7,
            color="#e65100",
            rotation=90,
        )
    for runs_of, color, alpha, hatch in (
        (over_runs(rows), "#e53935", 0.3, None),
        (meter_gaps(rows), "#9e9e9e", 0.35, "//"),
        (history_gaps(rows), "#bdbdbd", 0.25, "xx"),
    ):
        for i, r in enumerate(runs_of):
            ax.axvspan(
                _when(r.start),
                _when(r.end),
                facecolor=color,
                alpha=alpha,
                hatch=hatch,
                edgecolor="#757575" if hatch else None,
                lw=0,
                label=r.label if i == 0 else "_nolegend_",
            )


def render_png(
    rows: Sequence[Bucket],
    title: str,
    register_before: float | None = None,
    orders: Sequence[OrderInfo] = (),
) -> bytes:
    fig = build_figure(rows, title, register_before, orders)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series_json(rows: Sequence[Bucket], orders: Sequence[OrderInfo]) -> str:
    doc: dict[str, Any] = {
        "rows": [b.as_dict() for b in rows],
        "orders": [
            {
                "order_id": o.order_id,
                "start": o.start,
                "end": o.end,
                "cap_kw": o.cap_kw,
                "deadline": o.deadline,
                "compliant": o.compliant,
            }
            for o in orders
        ],
    }
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/")  # never closes the script element


def render_html(
    rows: Sequence[Bucket],
    title: str,
    register_before: float | None = None,
    book: Sequence[dict[str, Any]] = (),
) -> bytes:
    info = orders_info(rows, book)
    png = base64.b64encode(render_png(rows, title, register_before, info)).decode()
    s = summarize(rows, register_before)
    esc = html.escape
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in s.rows())
    compliance = {True: "yes", False: "NO", None: "-"}
    orders = (
        "".join(
            f'<tr class="{"over" if o.compliant is False else ""}">'
            + "".join(
                f"<td>{esc(v)}</td>"
                for v in (
                    o.order_id,
                    _utc(o.start),
                    _utc(o.end),
                    _num(o.cap_kw),
                    "-" if o.deadline is None else _utc(o.deadline),
                    compliance[o.compliant],
                    "-" if o.time_to_comply_s is None else f"{o.time_to_comply_s:,.0f} s",
                    _num(o.max_overshoot_kw),
                )
            )
            + "</tr>"
            for o in info
        )
        or '<tr><td colspan="8">none</td></tr>'
    )
    data_rows = "".join(
        (
            '<tr class="over">'
            if b.import_kw is not None and b.cap_kw is not None and b.import_kw > b.cap_kw
            else "<tr>"
        )
        + "".join(
            f"<td>{esc(v)}</td>"
            for v in (
                _utc(b.ts),
                "no meter reading" if b.import_kw is None else _num(b.import_kw),
                _num(b.import_max_kw),
                _num(b.cap_kw),
                b.cap_source or "-",
                _num(b.budget_used_kwh),
                " ".join(f"{k} {v:.1f}" for k, v in b.rigs.items() if v),
                f"{b.hashrate_ths:,.1f}",
                ", ".join(b.grid_orders) or "-",
            )
        )
        + "</tr>"
        for b in rows
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
img {{ max-width: 100%; }}
tr.over td {{ background: #ffcdd2; }}
</style></head><body>
<h1>{esc(title)}</h1>
<table class="summary">{summary}</table>
<h2>Grid orders</h2>
<table class="orders"><tr><th>order</th><th>from</th><th>to</th><th>cap kW</th>
<th>response deadline</th><th>compliant</th><th>time to comply</th><th>worst overshoot kW</th>
</tr>{orders}</table>
<p>In the picture: each cap step is labelled with what set it; dotted lines mark the orders'
response deadlines; red bands are steps whose mean import was over the cap (red rows in the
series below); grey hatched bands are steps without a meter reading (the meter did not
answer, and control estimated import) and times with no history (rigd was not running).</p>
<img alt="import vs cap, energy budget, rigs by state, hashrate" src="data:image/png;base64,{png}">
<details><summary>The series ({len(rows)} steps)</summary>
<table class="series"><tr><th>step</th><th>import kW</th><th>peak kW</th><th>cap kW</th>
<th>cap source</th><th>budget used kWh</th><th>rigs</th><th>TH/s</th><th>grid orders</th></tr>
{data_rows}</table></details>
<script type="application/json" id="rigd-history">{_series_json(rows, info)}</script>
</body></html>
"""
    return page.encode()


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def write_report(
    rows: Sequence[Bucket],
    out: Path,
    title: str,
    register_before: float | None = None,
    book: Sequence[dict[str, Any]] = (),
) -> None:
    """Write the report to `out`, as PNG or HTML by its suffix. `register_before`: the
    meter's register when the window starts (history.register_before), if known; `book`:
    the grid orders the daemon's order book holds (history.read_orders)."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ReportError(f"the report is written as .png or .html, not {out.name!r}")
    if suffix == ".png":
        data = render_png(rows, title, register_before, orders_info(rows, book))
    else:
        data = render_html(rows, title, register_before, book)
    out.write_bytes(data)
