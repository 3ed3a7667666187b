"""The demo's live terminal view of the farm, drawn from each cycle's snapshot."""

from __future__ import annotations

import datetime as dt

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from controller.core.status import CycleResult
from drivers.telemetry import RigState

_STATE_STYLE = {
    RigState.MINING: "green",
    RigState.WAKING: "cyan",
    RigState.SLEEPING: "yellow",
    RigState.OFF: "magenta",
    RigState.UNREACHABLE: "red",
}


def _fmt(v: float | None, nd: int = 1, unit: str = "") -> str:
    return "-" if v is None else f"{v:,.{nd}f}{unit}"


def render(
    result: CycleResult, *, broker: str, speed: float, rows: int = 12, note: str | None = None
) -> RenderableType:
    """`note`: a warning above the farm (the machine cannot keep up: controller/demo_pace.py)."""
    snap, doc = result.snapshot, result.document
    when = dt.datetime.fromtimestamp(snap.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = Text.assemble(
        ("rigd demo", "bold"),
        f"  site {snap.site}  ·  farm time {when}  ·  x{speed:g}  ·  broker {broker}  ·  "
        f"cycle {snap.cycle} ({snap.poll_duration_s * 1000:.0f} ms)",
    )
    summary = Table.grid(padding=(0, 3))
    for _ in range(4):
        summary.add_column(justify="right")
    summary.add_row(
        "import",
        Text(_fmt(doc["import_kw"], 1, " kW"), style="bold"),
        "rig power",
        _fmt(doc["rig_power_kw"], 1, " kW"),
    )
    summary.add_row(
        "hashrate",
        Text(_fmt(doc["hashrate_ths"] / 1000.0, 2, " PH/s"), style="bold"),
        "meter energy",
        _fmt(doc["import_kwh"], 1, " kWh"),
    )
    cap = Text()
    if doc.get("cap_kw") is not None:
        cap.append("cap ", style="bold")
        cap.append(f"{doc['cap_kw']:,.1f} kW", style="bold yellow")
        cap.append(f"  set by {doc['cap_source']}: {doc.get('cap_detail', '')}")
        ctl = doc.get("control", {})
        if ctl.get("target_kw") is not None:
            cap.append(f"   target {ctl['target_kw']:,.1f} kW ({ctl.get('basis', '')})")
        if ctl.get("mode") == "dry_run":
            cap.append("   DRY RUN: no commands sent", style="bold red")
        budget = doc.get("budget")
        if budget:
            cap.append(
                f"\nbudget {budget['used_kwh']:,.0f} of {budget['budget_kwh']:,.0f} kWh used "
                f"this {budget['period']}"
            )
        grid = doc.get("grid")
        if grid:
            for o in grid["active"]:
                ok = {True: "compliant", False: "NOT YET COMPLIANT", None: "measuring"}
                cap.append(
                    f"\ngrid order {o['order_id']} active: cap {_fmt(o['cap_kw'], 1, ' kW')}, "
                    f"{ok[o['compliant']]}",
                    style="bold magenta",
                )
            if grid["failsafe"]:
                cap.append("\ngrid FAILSAFE: operator heartbeat lost", style="bold red")
    else:
        cap.append("monitoring only (no [control] in config)", style="dim")
    counts = Text()
    for state in RigState:
        counts.append(f"{state.value} {doc['rigs'][state.value]}   ", style=_STATE_STYLE[state])
    unreach = doc["unreachable"]
    health = Text(
        f"unreachable: miners {unreach['miners']}, PDUs {unreach['pdus']}, "
        f"meters {unreach['meters']}",
        style="red" if any(unreach.values()) else "dim",
    )

    table = Table(
        expand=True,
        box=box.SIMPLE_HEAD,
        title="rigs (first by state, then by power)",
        title_justify="left",
    )
    for col, just, width in (
        ("rig", "left", 7),
        ("model", "left", 8),
        ("state", "left", 11),
        ("TH/s", "right", 5),
        ("W", "right", 5),
        ("J/TH", "right", 4),
        ("°C", "right", 3),
        ("outlet", "left", 10),
    ):
        table.add_column(col, justify=just, no_wrap=True, min_width=width)  # type: ignore[arg-type]
    table.add_column("last error", ratio=1, no_wrap=True, overflow="ellipsis", max_width=60)
    order = {s: i for i, s in enumerate(RigState)}
    rigs = sorted(
        snap.rigs.values(),
        key=lambda r: (-order[r.state], -(r.power_w or 0.0)),
    )
    for r in rigs[:rows]:
        t = r.telemetry
        outlet = "-"
        if r.info.outlet:
            on = {True: "on", False: "off", None: "?"}[r.outlet_on]
            outlet = f"{r.info.outlet[0]}/{r.info.outlet[1]} {on}"
        table.add_row(
            r.info.id,
            (t.identity.model.removeprefix("Antminer ") if t else "-"),
            Text(r.state.value, style=_STATE_STYLE[r.state]),
            _fmt(r.hashrate_ths, 1),
            _fmt(r.power_w, 0),
            _fmt(t.efficiency_j_per_th if t else None, 1),
            _fmt(t.temp_c if t else None, 0),
            outlet,
            Text((r.health.last_error or "")[:40], style="red"),
        )
    if len(rigs) > rows:
        table.caption = (
            f"... and {len(rigs) - rows} more; all on MQTT rigd/{snap.site}/rigs/+/state"
        )
    warning = Text(note or "", style="bold red")
    return Panel(Group(head, warning, summary, cap, counts, health, table), border_style="blue")
