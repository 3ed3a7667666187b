"""The farm benchmark's machinery, at a size CI can afford: every process starts, every figure
is measured, and a signed grid order puts every rig to sleep.

The targets themselves (10,000 rigs on 2 cores) are the benchmark's to check, by
`python -m bench`; a unit test that timed them would fail on any busy machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.__main__ import DEFAULT_MIX, main, plan_runs, table
from bench.farm import FIRST_COMMAND_MARKS, Settings, idle_floor_kw, percentile, run
from bench.figures import derive, fit_curves
from simulators.site import mix_weights


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
    # A Whatsminer or an Avalon is a rig of its own models, and sleeps at its own draw.
    mixed = idle_floor_kw(1000, {"antminer": 500, "whatsminer": 400, "avalon": 100})
    assert math.isclose(mixed, 20.0 + (500 * 15.0 + 400 * 30.0 + 100 * 18.0) * 1.04 / 1000)


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
    # The order's way to its first command, as the daemon marked it, in order.
    marks = r["curtail_first_breakdown_ms"]
    assert {"verified", "stored", "planned", "launched", "first_send"} <= set(marks)
    steps = [marks[k] for k in FIRST_COMMAND_MARKS if k in marks]
    assert steps == sorted(steps)
    assert 0 < r["curtail_first_send_s"] <= r["curtail_commanded_first_s"]
    # The floors of the same farm (bench/floors), measured before the daemon started.
    assert r["floors"]["rigs"]["luxos"]["cpu_ms_per_poll"] > 0
    # The command floor (bench/floors/commands.py), after the daemon: it woke every rig
    # and slept it again with the commands the daemon's audit shows.
    assert r["floor_curtail_commands"] == rigs and r["floor_curtail_skipped"] == 0
    assert r["floor_curtail_acknowledged"] == rigs and not r["floor_curtail_errors"]
    assert r["floor_curtail"]["wake"]["acknowledged"] == rigs
    derive([r], fit_curves([r]))
    assert r["floor_cpu_ms_per_rig"] > 0 and r["rig_poll_cpu_ratio"] > 0
    assert r["curtail_p99_ratio"] > 0
    row = table([r]).splitlines()[-1]
    assert row.startswith(f"| {rigs} | 0 |")


def test_cli_writes_the_json_the_issue_names(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    # Two counts of PDUs at one size: both runs, and rigd's cost per PDU-poll from them.
    rc = main(
        ["--rigs", "10", "--pdus", "0", "--pdus", "1", "--mix", "luxos=3,whatsminer=1",
         "--interval", "1", "--warmup", "1", "--cycles", "2", "--no-pyasic",
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
    assert doc["pdus"] == 1 and doc["mix"] == "luxos=3,whatsminer=1"
    assert doc["rigs_by_driver"] == {"luxos": 8, "whatsminer": 2}  # 10 rigs at 3:1
    assert [(r["rigs"], r["pdus"]) for r in doc["runs"]] == [(10, 0), (10, 1)]
    for key in ("floor_cpu_ms_per_rig", "rig_poll_cpu_ratio", "floor_cpu_ms_per_pdu"):
        assert isinstance(doc[key], float) and doc[key] > 0, key
    # One PDU's cost is the difference of two noisy runs: a positive ratio, or n/a with the
    # reason said (never a negative ratio).
    if doc["pdu_cost_below_noise"]:
        assert doc["pdu_poll_cpu_ratio"] is None and doc["rig_poll_includes_pdus"]
    else:
        assert isinstance(doc["pdu_poll_cpu_ratio"], float) and doc["pdu_poll_cpu_ratio"] > 0
    assert doc["fit"]["cpu_vs_pdus"]["x"] == "pdus"
    for key in ("curtail_p99_ratio", "pyasic_cpu_ratio", "curtail_commanded_first_s"):
        assert key in doc, key  # null where not measured (no command floor; --no-pyasic)
    assert doc["pyasic_cpu_ratio"] is None


def test_runs_cover_both_curves_by_default() -> None:
    default = plan_runs(None, None)
    assert (10_000, 417) in default  # the default farm: one 24-outlet PDU per 24 rigs
    assert {(n, 0) for n in (2_500, 5_000, 10_000)} <= set(default)
    assert plan_runs([1000], None) == [(1000, 42)]
    assert plan_runs(None, [0, 5]) == [(10_000, 0), (10_000, 5)]
    assert set(mix_weights(DEFAULT_MIX)) == {
        "luxos", "antminer", "whatsminer", "whatsminer-v3", "braiins", "avalon", "epic", "vnish",
    }  # fmt: skip


def test_ratios_weigh_each_dialect_by_its_rigs() -> None:
    def run_(pdus: int, cpu: float) -> dict[str, object]:
        return {
            "rigs": 100, "pdus": pdus, "daemon_cpu_s_per_cycle": cpu,
            "curtail_commanded_p99_s": 1.0, "rigs_by_driver": {"luxos": 75, "whatsminer": 25},
            "floors": {
                "rigs": {"luxos": {"cpu_ms_per_poll": 0.2, "devices": 75, "rounds": 2,
                                   "errors": 0},
                         "whatsminer": {"cpu_ms_per_poll": 0.6, "devices": 25, "rounds": 2,
                                        "errors": 0}},
                "pdu": {"cpu_ms_per_poll": 1.0, "devices": max(pdus, 1), "rounds": 2,
                        "errors": 0},
            },
            "pyasic": {"rigs": {"whatsminer": {"cpu_ms_per_poll": 6.0, "ok": True}}},
        }  # fmt: skip

    runs = [run_(0, 0.06), run_(4, 0.068)]
    fits = fit_curves(runs)
    derive(runs, fits)
    a, b = runs
    assert math.isclose(fits["cpu_vs_pdus"]["slope_ms"], 2.0)
    assert math.isclose(a["floor_cpu_ms_per_rig"], 0.3)  # 0.75 x 0.2 + 0.25 x 0.6
    assert math.isclose(a["rig_poll_cpu_ratio"], 2.0)  # 0.6 ms per rig-poll
    assert math.isclose(b["daemon_cpu_ms_per_rig_poll"], 0.6)  # the PDUs' 8 ms taken off
    assert math.isclose(b["pdu_poll_cpu_ratio"], 2.0)
    assert a["pdu_poll_cpu_ratio"] is None  # no PDUs in that run
    assert a["curtail_p99_ratio"] is None  # no command floor
    assert math.isclose(a["pyasic_cpu_ratio"], 10.0) and a["pyasic_dialects"] == ["whatsminer"]

    # With the PDUs' run cheaper than the one without (their cost under the runs' scatter),
    # there is no PDU cost to set against its floor: n/a, never a pass.
    runs = [run_(0, 0.06), run_(4, 0.059)]
    derive(runs, fit_curves(runs))
    b = runs[1]
    assert b["pdu_poll_cpu_ratio"] is None and b["daemon_cpu_ms_per_pdu_poll"] is None
    assert b["pdu_cost_below_noise"] and b["rig_poll_includes_pdus"]
    assert math.isclose(b["daemon_cpu_ms_per_rig_poll"], 0.59)  # the PDUs left in
