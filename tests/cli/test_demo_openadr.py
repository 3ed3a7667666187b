"""`rigd demo --grid openadr`: the scripted order as an OpenADR 3.1 event on a simulated
VTN, obeyed, reported, and lifted at its end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from controller.config import parse_config
from tests.cli.test_demo import demo


def test_demo_plays_the_order_as_an_openadr_event() -> None:
    r = demo(
        "--headless",
        "--grid",
        "openadr",
        "--duration",
        "12",
        "--rigs",
        "30",
        "--pdus",
        "2",
        "--speed",
        "20",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(d["openadr"]["status"] in ("ok", "starting") for d in docs)
    under = [d for d in docs if d["cap_source"] == "grid"]
    assert under, "the event never capped the site"
    assert under[0]["cap_detail"].startswith("order oadr.")
    # compliant before the event's end: import under the cap in the later cycles
    assert any(d["import_kw"] is not None and d["import_kw"] <= d["cap_kw"] for d in under[1:])
    assert docs[-1]["cap_source"] != "grid"  # the event ended: the cap is lifted
    events = [json.loads(line)["event"] for line in r.stderr.splitlines() if line.startswith("{")]
    for e in (
        "openadr_ven_registered",
        "openadr_mqtt_connected",
        "demo_event_created",
        "openadr_event_received",
        "openadr_order_applied",
        "grid_order_completed",
    ):
        assert e in events, e


def test_rigd_sim_vtn_writes_an_openadr_section(tmp_path: Path) -> None:
    cfg_path = tmp_path / "sim.toml"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli.rigd",
            "sim",
            "--rigs",
            "2",
            "--pdus",
            "1",
            "--vtn",
            "--vtn-port",
            "0",
            "--max-import-kw",
            "10",
            "--write-config",
            str(cfg_path),
            "--state-dir",
            str(tmp_path / "state"),
            "--duration",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OpenADR 3.1 VTN at http://127.0.0.1:" in r.stdout
    cfg = parse_config(cfg_path.read_text(), environ={})
    assert cfg.openadr is not None and cfg.openadr.ven_name == "rigd-sim"
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "sim", "--vtn", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--vtn needs --max-import-kw" in r.stderr
