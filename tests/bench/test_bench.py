"""The farm benchmark's machinery, at a size CI can afford: every process starts, every figure
is measured, and a signed grid order puts every rig to sleep.

The targets themselves (10,000 rigs on 2 cores) are the benchmark's to check, by
`python -m bench`; a unit test that timed them would fail on any busy machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.__main__ import main, table
from bench.farm import Settings, idle_floor_kw, percentile, run


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_idle_floor_follows_the_farm_model() -> None:
    # 20 kW of facility load, plus 15 W per sleeping rig and 4 % losses.
    assert idle_floor_kw(0) == 20.0
    assert math.isclose(idle_floor_kw(1000), 20.0 + 15.6)


def test_a_small_farm_is_polled_and_curtailed(tmp_path: Path) -> None:
    rigs = 20
    r = run(
        Settings(
            rigs=rigs,
            interval_s=1.0,
            warmup_cycles=1,
            cycles=3,
            subnet="127.65.0.0/24",
            order_phase_s=0.2,
            workdir=tmp_path,
            verbose=False,
        )
    )
    assert r["rigs"] == rigs
    assert r["cycles_measured"] >= 3
    assert r["cycles_fully_polled"] == r["cycles_measured"]
    assert 0 < r["poll_cycle_p50_s"] <= r["poll_cycle_p99_s"] < 1.0
    assert r["daemon_cpu_s_per_cycle"] > 0
    assert 20 < r["daemon_peak_rss_mb"] < 1000
    # The site and the meter every cycle; rigs when they change, or every rig_refresh_s.
    assert 2 <= r["mqtt_msgs_per_cycle"] <= rigs + 2
    assert r["mqtt_bytes_per_cycle"] > 300
    # A full curtailment: every rig slept, each acknowledged after the order, and the
    # meter (read by the benchmark, not the daemon) under the order's cap.
    assert r["curtail_rigs_acknowledged"] == rigs
    assert r["curtail_failed"] == 0
    assert 0 < r["curtail_commanded_p50_s"] <= r["curtail_commanded_p99_s"]
    assert r["curtail_commanded_p99_s"] <= r["curtail_commanded_max_s"]
    assert r["curtail_metered_s"] >= r["curtail_commanded_p50_s"]
    assert r["order_cap_kw"] < r["import_before_order_kw"] / 3
    assert (tmp_path / "daemon.log").exists()
    row = table([r]).splitlines()[-1]
    assert row.startswith(f"| {rigs} |") and "n/a" not in row


def test_cli_writes_the_json_the_issue_names(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    rc = main(
        ["--rigs", "10", "--interval", "1", "--warmup", "1", "--cycles", "2",
         "--subnet", "127.65.1.0/24", "--order-phase", "0.2", "--json", str(out), "-q"]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    for key in (
        "rigs",
        "poll_cycle_p50_s",
        "poll_cycle_p99_s",
        "curtail_commanded_p99_s",
        "curtail_metered_s",
        "daemon_cpu_s_per_cycle",
        "daemon_peak_rss_mb",
    ):
        assert isinstance(doc[key], int | float), key
    assert doc["rigs"] == 10
    assert doc["machine"]["cores"] >= 1
