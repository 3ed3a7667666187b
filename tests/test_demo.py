"""`rigd demo`, the main job, run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from tests.conftest import Mosquitto, watch


def demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_headless_prints_one_state_document_per_interval() -> None:
    r = demo("--headless", "--duration", "3", "--rigs", "12", "--pdus", "2", "--speed", "20")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) >= 3  # speed 20, interval 10 farm-s: a cycle every 0.5 s
    cycles = [d["cycle"] for d in docs]
    assert cycles == sorted(cycles) and len(set(cycles)) == len(cycles)
    last = docs[-1]
    assert {"ts", "import_kw", "rigs", "hashrate_ths", "rig_power_kw"} <= set(last)
    assert last["rigs_total"] == 12 and last["meter_ok"] is True
    # The staged farm: one spare switched off at its outlet, one control board silent.
    assert last["rigs"]["off"] == 1 and last["rigs"]["unreachable"] == 1
    assert last["rigs"]["mining"] == 10
    assert 10 * 2.9 < last["import_kw"] < 10 * 4.0 + 30
    # Logs are JSON lines on stderr, apart from the state on stdout.
    events = [json.loads(line)["event"] for line in r.stderr.splitlines() if line.strip()]
    assert "rigd_starting" in events and "rigd_stopped" in events


def test_live_view_runs_and_stops() -> None:
    r = demo("--duration", "2", "--rigs", "6", "--pdus", "1", "--speed", "20")
    assert r.returncode == 0, r.stderr
    assert "rigd demo" in r.stdout and "rig-001" in r.stdout
    assert "demo stopped; daemon log:" in r.stdout


async def test_demo_publishes_to_a_given_broker(mosquitto: Mosquitto) -> None:
    async with watch(mosquitto.host, mosquitto.port) as w:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "--headless",
            "--duration",
            "4",
            "--rigs",
            "5",
            "--pdus",
            "1",
            "--speed",
            "20",
            "--broker",
            mosquitto.url,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        state = await w.wait_json("rigd/demo/state", lambda d: d["rigs_total"] == 5, within=30)
        assert state["meter_ok"] is True
        await w.wait_json("rigd/demo/rigs/rig-001/state", lambda d: d["state"] == "mining")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await w.wait_for("rigd/demo/status", lambda p: p == b"offline")


def test_bad_arguments_are_refused() -> None:
    r = demo("--speed", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr
