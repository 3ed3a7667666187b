"""rigctl's printers on documents as the daemon sends them: words and times for people,
never a raw Python dict, a `None` or a list literal."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from controller.cli.grid import print_grid
from controller.cli.rigctl import print_rig, print_status

T = 1_796_000_000.0


def _text(printer: Any, doc: Any) -> str:
    buf = Console(file=io.StringIO(), width=220, highlight=False)
    printer(doc, buf)
    out: str = buf.file.getvalue()  # type: ignore[attr-defined]
    return out


ORDER = {
    "order_id": "evt-1",
    "modification": 0,
    "status": "active",
    "target": {"max_import_kw": 30},
    "cap_kw": 30.0,
    "start": T,
    "end": T + 3600,
    "deadline": T + 60,
    "compliant": None,
}


def _status_doc() -> dict[str, Any]:
    return {
        "ts": T + 30,
        "site": "sim",
        "cycle": 7,
        "import_kw": 42.0,
        "meter_ok": True,
        "cap_kw": 30.0,
        "cap_source": "grid",
        "cap_detail": "order evt-1",
        "rigs": {"mining": 3, "sleeping": 1},
        "rigs_total": 4,
        "hashrate_ths": 300.0,
        "rig_power_kw": 10.0,
        "unreachable": {"miners": 0, "pdus": 0, "meters": 0},
        "control": {"mode": "active", "target_kw": 29.4, "basis": "meter", "note": ""},
        "grid": {"active": [ORDER], "pending": [], "failsafe": False},
        "grid_orders": [{"name": "grid:evt-1", "kw": 30.0, "detail": "order evt-1"}],
        "mqtt_connected": True,
    }


def test_status_lists_grid_orders_in_words() -> None:
    out = _text(print_status, _status_doc())
    assert "{" not in out and "'" not in out
    assert "grid orders: 1 active, 0 pending" in out
    assert "evt-1 (active, mod 0): cap 30.0 kW" in out
    assert "until 2026-11-30" in out and "respond by" in out and "compliance not yet known" in out


def test_grid_status_has_start_end_and_deadline() -> None:
    doc = {
        "summary": {"failsafe": False, "failsafe_since": None, "heartbeat_age_s": None},
        "orders": [
            {**ORDER, "revisions": [0], "ended_at": None},
            {**ORDER, "order_id": "evt-0", "end": None, "compliant": True, "ended_at": None},
        ],
    }
    out = _text(print_grid, doc)
    for col in ("start (UTC)", "end", "respond by", "compliant"):
        assert col in out
    start = "2026-11-30"  # the order's times, printed as dates
    assert out.count(start) >= 5 and "open-ended" in out and "not yet known" in out


def test_rig_without_chip_counts_or_model_says_dash_not_none() -> None:
    rig = {
        "id": "rig-001",
        "state": "mining",
        "host": "127.0.0.1",
        "port": 4028,
        "driver": "antminer",
        "hashrate_ths": 100.0,
        "power_w": None,
        "telemetry": {
            "model": None,
            "fans_rpm": [6000, 6060],
            "hashboards": [
                {"index": 0, "hashrate_ths": 33.3, "temp_c": 60.0, "chips": None, "active": True}
            ],
        },
        "health": {"reachable": True, "last_seen": T, "last_error": None},
    }
    out = _text(print_rig, rig)
    assert "None" not in out and "[" not in out
    assert "chips -" in out and "fans 6000, 6060 rpm" in out


def test_markup_in_device_and_grid_strings_is_printed_as_written() -> None:
    """An error from a VTN or a reason from a grid operator may hold `[/x]` or `[bold]`:
    printed through `inert`, it reads as written and never stops the printer."""
    from controller.cli.rigctl import inert

    doc = _status_doc()
    doc["cap_detail"] = "order [/red] evt-1 [bold]now"
    doc["openadr"] = {
        "vtn": "https://vtn.example/[/x]",
        "status": "failing",
        "mqtt": "down",
        "events": [],
        "error": "HTTP 500: [/bold] oops",
    }
    out = _text(print_status, inert(doc))
    assert "order [/red] evt-1 [bold]now" in out
    assert "HTTP 500: [/bold] oops" in out
