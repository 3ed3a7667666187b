"""`rigd demo`, the main job, run as a user runs it."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Mosquitto, watch


def demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`rigd demo`; a machine that cannot keep up makes it slow down, so allow for that."""
    return subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "demo", *args],
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
    keys = {"ts", "import_kw", "rigs", "hashrate_ths", "rig_power_kw", "cap_kw", "cap_source"}
    assert all(keys <= set(d) and d["rigs_total"] == 12 for d in docs)
    # The staged farm: one spare switched off at its outlet, one control board silent. On a
    # machine that cannot keep up, reads time out until the demo has slowed down (it says
    # so): some cycle shows the farm as it is.
    staged = [
        d for d in docs if d["meter_ok"] and d["rigs"] == {**d["rigs"], "off": 1, "unreachable": 1}
    ]
    assert staged, [(d["rigs"], d["meter_ok"]) for d in docs]
    full = [d for d in staged if d["rigs"]["mining"] == 10]  # before the script's order
    assert all(10 * 2.9 < d["import_kw"] < 10 * 4.0 + 30 for d in full)
    assert docs[0]["cap_source"] == "max_import"  # until the script's order
    # Logs are JSON lines on stderr, apart from the state on stdout.
    events = [json.loads(line)["event"] for line in r.stderr.splitlines() if line.strip()]
    assert "rigd_starting" in events and "rigd_stopped" in events


@pytest.mark.timeout(300)  # a machine that cannot keep up runs the same farm time slower
def test_demo_script_holds_the_cap_and_restores_without_overshoot() -> None:
    """Done-when of the control loop: a grid order drops the cap to about half the load a
    third of the way in, import settles under it within the rigs' stop time, and comes back
    gradually after it ends."""
    r = demo("--headless", "--duration", "15", "--rigs", "30", "--pdus", "2", "--speed", "20")
    assert r.returncode == 0, r.stderr
    everything = [json.loads(line) for line in r.stdout.splitlines()]
    # On a machine that cannot keep up (a loaded CI host) reads of the in-process devices time
    # out; the demo then says so and slows its farm clock. Judge the cap on the cycles that
    # measured import, and require that nearly all did once the demo had settled its pace.
    slowed = [e for e in _logs(r.stderr) if e["event"] == "demo_cannot_keep_up"]
    settled_at = max((e["farm_ts"] for e in slowed), default=0.0)
    settled = [d for d in everything if d["ts"] > settled_at]
    docs = [d for d in everything if d["import_kw"] is not None]
    measured = [d for d in settled if d["import_kw"] is not None]
    assert len(measured) >= 0.8 * len(settled), (len(settled) - len(measured), slowed)
    dropped = [i for i, d in enumerate(docs) if d["cap_source"] == "grid"]
    assert dropped, "the script never dropped the cap"
    i0, i1 = dropped[0], dropped[-1]
    before, low_cap = docs[i0 - 1], docs[i0]["cap_kw"]
    assert low_cap == pytest.approx(before["import_kw"] * 0.5, rel=0.05)
    # Throttling takes 30 farm-s, sleeping 6: allow that plus two 10 s polls.
    settle = 30 + 2 * 10
    t_drop = docs[i0]["ts"]
    after = [d for d in docs[i0 : i1 + 1] if d["ts"] >= t_drop + settle]
    assert after, "the low cap did not last long enough to judge"
    assert all(d["import_kw"] <= low_cap for d in after), [d["import_kw"] for d in after]
    assert docs[i1]["rigs"]["sleeping"] > 0
    assert docs[i1]["hashrate_ths"] > 0.3 * before["hashrate_ths"]  # throttled, not all asleep
    # Restored: the cap is back, import climbs gradually and never over the cap.
    restored = docs[i1 + 1 :]
    assert restored and all(d["cap_source"] == "max_import" for d in restored)
    assert all(d["import_kw"] <= d["cap_kw"] for d in restored)
    steps = [b["import_kw"] - a["import_kw"] for a, b in itertools.pairwise(restored)]
    ramp = docs[0]["cap_kw"] / 1.1 * 0.2  # the demo's ramp_kw_per_interval
    assert max(steps, default=0) <= ramp * 1.2
    assert restored[-1]["import_kw"] > docs[i1]["import_kw"]


def _logs(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


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
            "controller.cli.rigd",
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
        # The first cycles of a machine that cannot keep up may miss a read: wait for one.
        state = await w.wait_json(
            "rigd/demo/state", lambda d: d["rigs_total"] == 5 and d["meter_ok"], within=60
        )
        await w.wait_json("rigd/demo/rigs/rig-001/state", lambda d: d["state"] == "mining")
        # The script's cap drop makes the control loop act; each action is an event.
        event = await w.wait_json("rigd/demo/events", within=30)
        assert event["type"] == "action" and event["result"] == "ok"
        assert event["action"] in ("sleep", "set_power") and event["reason"]
        assert w.retained["rigd/demo/events"] is False
        state = await w.wait_json("rigd/demo/state", lambda d: d["cap_source"] == "grid")
        assert state["cap_detail"].startswith("order demo-")
        assert state["grid"]["active"][0]["order_id"].startswith("demo-")
        report = await w.wait_json("rigd/demo/grid/reports", within=30)
        assert report["order_id"] == state["grid"]["active"][0]["order_id"]
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await w.wait_for("rigd/demo/status", lambda p: p == b"offline")


def test_bad_arguments_are_refused() -> None:
    r = demo("--speed", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr
