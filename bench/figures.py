"""Figures derived from a benchmark's runs: the cost curves and every ratio to a floor.

Why curves: one run's CPU per cycle is rigs, PDUs, the meter, control and MQTT together.
rigd's cost per PDU-poll is the slope of CPU per cycle over PDUs at a fixed number of rigs,
and its cost per rig-poll the run's CPU per cycle, less what its PDUs cost, over its rigs
(so the meter, control and publishing are charged to the rigs, as a farm pays them).
"""

from __future__ import annotations

import math
from typing import Any

from bench.ratios import weighted


def line(pts: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """Least-squares y = a + b x over `pts`: (a, b, R^2), None under two distinct x."""
    if len({x for x, _ in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    b = sxy / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in pts)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def fit(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """`key` = a + b * rigs and its R^2 (as the benchmark always reported it)."""
    pts = [(float(r["rigs"]), float(r[key])) for r in runs if isinstance(r.get(key), int | float)]
    got = line(pts)
    if got is None:
        return None
    a, b, r2 = got
    return {"intercept": round(a, 4), "per_rig": round(b, 7), "r2": round(r2, 4)}


def fit_curves(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """CPU per cycle over rigs (runs without PDUs) and over PDUs (at the most rigs)."""
    key = "daemon_cpu_s_per_cycle"
    most = max((r["rigs"] for r in runs), default=0)
    curves: dict[str, dict[str, Any] | None] = {}
    for name, x, fixed, at in (
        ("cpu_vs_rigs", "rigs", "pdus", 0),
        ("cpu_vs_pdus", "pdus", "rigs", most),
    ):
        pts = [(float(r[x]), float(r[key])) for r in runs if r[fixed] == at]
        got = line(pts)
        if got is None:
            curves[name] = None
            continue
        a, b, r2 = got
        curves[name] = {
            "x": x,
            "points": pts,
            "intercept_s": round(a, 4),
            "slope_ms": round(b * 1000.0, 4),
            "r2": round(r2, 4),
            "text": f"daemon CPU per cycle = {a:.3f} s + {b * 1000:.3f} ms x {x}",
        }
    return curves


def _ms(result: Any) -> float | None:
    """A floor's CPU ms per poll, if it measured one (and most polls answered)."""
    if not isinstance(result, dict) or "error" in result:
        return None
    v = result.get("cpu_ms_per_poll")
    devices, rounds = result.get("devices") or 0, result.get("rounds") or 1
    if not isinstance(v, int | float) or (result.get("errors") or 0) > devices * rounds // 10:
        return None
    return float(v)


def _div(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return None if a is None or not b or math.isnan(a) else round(a / b, digits)


def derive(runs: list[dict[str, Any]], fits: dict[str, dict[str, Any] | None]) -> None:
    """Add each run's floor figures and ratios to it (in place)."""
    pdu_curve = fits.get("cpu_vs_pdus")
    pdu_ms = pdu_curve["slope_ms"] if pdu_curve is not None else None
    # The PDUs' cost is the difference between runs with and without them. Once a PDU poll
    # costs a fraction of a millisecond, 417 of them are less than the runs' own scatter of
    # CPU per cycle, and the difference can come out negative: not a cost, so not a ratio
    # (nor a pass). Then the rig-poll figure keeps the PDUs in (`rig_poll_includes_pdus`),
    # and bench.floors' PDU ratio is the one to read.
    below_noise = pdu_ms is not None and pdu_ms <= 0.0
    if below_noise:
        pdu_ms = None
    for r in runs:
        counts: dict[str, int] = r.get("rigs_by_driver") or {}
        floors = r.get("floors") or {}
        rig_floors = {d: _ms(v) for d, v in (floors.get("rigs") or {}).items()}
        floor_rig = weighted(rig_floors, counts)
        floor_pdu = _ms(floors.get("pdu"))
        cycle_ms = 1000.0 * r["daemon_cpu_s_per_cycle"]
        r["floor_cpu_ms_per_rig_by_driver"] = rig_floors
        r["floor_cpu_ms_per_rig"] = None if floor_rig is None else round(floor_rig, 4)
        r["floor_cpu_ms_per_pdu"] = None if floor_pdu is None else round(floor_pdu, 4)
        pdus_ms = r["pdus"] * pdu_ms if r["pdus"] and pdu_ms is not None else 0.0
        r["rig_poll_includes_pdus"] = bool(r["pdus"]) and pdu_ms is None
        r["pdu_cost_below_noise"] = bool(r["pdus"]) and below_noise
        rig_ms = (cycle_ms - pdus_ms) / r["rigs"]
        r["daemon_cpu_ms_per_rig_poll"] = round(rig_ms, 4)
        r["daemon_cpu_ms_per_pdu_poll"] = (
            round(pdu_ms, 3) if r["pdus"] and pdu_ms is not None else None
        )
        r["rig_poll_cpu_ratio"] = _div(rig_ms, floor_rig)
        r["pdu_poll_cpu_ratio"] = _div(r["daemon_cpu_ms_per_pdu_poll"], floor_pdu)
        r["curtail_p99_ratio"] = _div(r["curtail_commanded_p99_s"], r.get("floor_curtail_p99_s"))
        py = (r.get("pyasic") or {}).get("rigs") or {}
        read = {d: v["cpu_ms_per_poll"] for d, v in py.items() if v.get("ok")}
        both = {d: n for d, n in counts.items() if d in read and rig_floors.get(d) is not None}
        py_ms = weighted(dict(read), both)
        r["pyasic_dialects"] = sorted(both)
        r["pyasic_cpu_ms_per_rig"] = None if py_ms is None else round(py_ms, 3)
        r["pyasic_cpu_ratio"] = _div(py_ms, weighted(rig_floors, both), 1)


def markdown_table(
    columns: tuple[tuple[str, str, str], ...],
    rows: list[dict[str, Any]],
    *,
    text: frozenset[str] = frozenset(),
) -> str:
    """A Markdown table of `rows` (`columns`: key, heading, format): readable in a terminal
    and pasteable into the README. Numbers align right; a number not measured (missing,
    None or NaN) reads "n/a"; the `text` columns align left and print as they are."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if k in text else "---:" for k, _, _ in columns) + "|"
    out = [head, rule]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if key in text:
                ok = v is not None
            else:
                ok = isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))
            cells.append(fmt.format(v) if ok else "n/a")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
