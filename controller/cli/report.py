"""`rigctl report` and `rigd demo --report`: the pictures grid contracts are argued over.

From the site history (controller/adapters/history.py), one figure of four panels sharing
the time axis:

1. import against the cap over time (the mean import of each step and its peak; the
   lowest cap in force, and the control target), with every grid order shaded and named;
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
    rows: Sequence[Bucket], title: str, register_before: float | None = None
) -> Figure:
    """The report's figure (no pyplot state: safe in a daemon or a test). `register_before`:
    the meter's register when the window starts (see energy_imported)."""
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


def render_png(rows: Sequence[Bucket], title: str, register_before: float | None = None) -> bytes:
    fig = build_figure(rows, title, register_before)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series_json(rows: Sequence[Bucket]) -> str:
    doc: dict[str, Any] = {
        "rows": [b.as_dict() for b in rows],
        "orders": [
            {"order_id": s.order_id, "start": s.start, "end": s.end} for s in order_spans(rows)
        ],
    }
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/")  # never closes the script element


def render_html(rows: Sequence[Bucket], title: str, register_before: float | None = None) -> bytes:
    png = base64.b64encode(render_png(rows, title, register_before)).decode()
    s = summarize(rows, register_before)
    esc = html.escape
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in s.rows())
    orders = (
        "".join(
            f"<tr><td>{esc(o.order_id)}</td><td>{esc(_utc(o.start))}</td>"
            f"<td>{esc(_utc(o.end))}</td></tr>"
            for o in s.orders
        )
        or '<tr><td colspan="3">none</td></tr>'
    )
    data_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(v)}</td>"
            for v in (
                _utc(b.ts),
                _num(b.import_kw),
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
</style></head><body>
<h1>{esc(title)}</h1>
<table class="summary">{summary}</table>
<h2>Grid orders</h2>
<table class="orders"><tr><th>order</th><th>from</th><th>to</th></tr>{orders}</table>
<img alt="import vs cap, energy budget, rigs by state, hashrate" src="data:image/png;base64,{png}">
<details><summary>The series ({len(rows)} steps)</summary>
<table class="series"><tr><th>step</th><th>import kW</th><th>peak kW</th><th>cap kW</th>
<th>cap source</th><th>budget used kWh</th><th>rigs</th><th>TH/s</th><th>grid orders</th></tr>
{data_rows}</table></details>
<script type="application/json" id="rigd-history">{_series_json(rows)}</script>
</body></html>
"""
    return page.encode()


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def write_report(
    rows: Sequence[Bucket], out: Path, title: str, register_before: float | None = None
) -> None:
    """Write the report to `out`, as PNG or HTML by its suffix. `register_before`: the
    meter's register when the window starts (history.register_before), if known."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ReportError(f"the report is written as .png or .html, not {out.name!r}")
    if suffix == ".png":
        data = render_png(rows, title, register_before)
    else:
        data = render_html(rows, title, register_before)
    out.write_bytes(data)
