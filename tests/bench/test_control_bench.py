"""The control benchmark's machinery, at a size CI can afford: the exact optimum against a
brute force, and one tiny fleet through a cap and a step in virtual time.

The targets themselves are `python -m bench.control`'s to check (README, Benchmark)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.control import FLEETS, Plan, build_farm, main, run, trailing_mean
from bench.optimum import ModelGroup, groups_of, optimum, solve
from simulators.clock import ManualClock
from simulators.farm import MODELS, Farm, SimRig

TINY = {"tiny": {"Antminer S19 Pro": 2, "Antminer S21": 2, "Whatsminer M60S_VK40": 1}}


def brute(groups: list[ModelGroup], budget: float, grid: float = 5.0) -> float:
    """Every rig on its own, powers on a grid: a lower bound on the optimum, close to it."""
    rigs = [g for g in groups for _ in range(g.count)]
    cells = int(budget // grid)
    best = [0.0] + [-math.inf] * cells
    for g in rigs:
        opts = [(round(g.model.idle_w / grid), 0.0)]
        w = math.ceil(g.lo / grid) * grid
        while w <= g.hi + 1e-9:
            opts.append((round(w / grid), float(g.ths(np.array([w]))[0])))
            w += grid
        nxt = [-math.inf] * (cells + 1)
        for c, v in enumerate(best):
            if v == -math.inf:
                continue
            for dc, dv in opts:
                if c + dc <= cells and v + dv > nxt[c + dc]:
                    nxt[c + dc] = v + dv
        best = nxt
    return max(best)


@pytest.mark.parametrize("share", [0.15, 0.4, 0.7, 0.95])
def test_the_optimum_is_exact_against_brute_force(share: float) -> None:
    clock = ManualClock(0.0)
    farm = Farm(clock)
    for n, name in enumerate(
        ["Antminer S19 Pro", "Antminer S19 Pro", "Antminer S21", "Antminer S19 XP"]
    ):
        farm.rigs[f"r{n}"] = SimRig(f"r{n}", MODELS[name], 0.0)
    groups = groups_of(farm.rigs.values())
    budget = share * sum(r.model.nominal_w for r in farm.rigs.values())
    exact = solve(groups, budget)
    lower = brute(groups, budget)
    # The grid loses a little; the optimum is never below it, and it is under its dual.
    assert lower <= exact.ths + 1e-6
    assert exact.ths <= lower * 1.003
    assert exact.ths <= exact.dual_bound_ths + 1e-6


def test_a_full_cap_runs_every_rig_at_nominal() -> None:
    clock = ManualClock(0.0)
    farm = build_farm(clock, FLEETS["fleet-1"])
    full = (
        farm.meter.overhead_base_w + sum(r.model.nominal_w for r in farm.rigs.values()) * 1.04
    ) / 1000
    o = optimum(farm, full)
    assert o.ths == pytest.approx(sum(r.model.nominal_ths for r in farm.rigs.values()), rel=1e-6)


async def test_a_tiny_fleet_through_a_cap_and_a_step(tmp_path: Path) -> None:
    plan = Plan(
        fleets=TINY,
        caps=(50,),
        settle_s=900.0,
        steady_s=600.0,
        step_fleet="tiny",
        step_phase_s=900.0,
        verbose=False,
        budget=False,  # a month of farm time: tests/runtime/test_control_sim.py paces one
    )
    result = await run(plan)
    (row,) = result["rows"]
    for key in ("fleet", "cap_pct", "optimum_ths", "rigd_ths", "ratio", "ratio_at_own_import",
                "over_cap_s_after_stop", "commands", "rigs_flapping"):  # fmt: skip
        assert key in row
    assert row["over_cap_s_after_stop"] == 0
    assert 0.9 < row["ratio"] <= 1.0 + 1e-9
    assert row["ratio"] <= row["ratio_at_own_import"] + 1e-9
    step = result["step"]
    assert step["over_cap_s_after_stop"] == 0
    assert step["time_under_cap_s"] is not None and step["time_under_cap_s"] < 120
    # No controller comes back faster than the sleepers' own boot and ramp.
    bound = step["restore_physical_bound_s"]
    assert bound is not None
    took = step["time_to_1pct_of_optimum_at_own_import_after_restore_s"]
    assert took is None or took >= bound - 1
    # The drop side both ways, instantaneous and on the 60-s mean (counted from a whole
    # window after the step).
    for key in ("time_to_1pct_of_optimum_at_low_s", "time_to_1pct_of_optimum_at_low_avg60_s",
                "time_to_1pct_of_optimum_at_own_import_at_low_s",
                "time_to_1pct_of_optimum_at_own_import_at_low_avg60_s",
                "min_ratio_at_low_after_300s", "min_ratio_at_low_after_300s_avg60",
                "import_over_cap_at_low"):  # fmt: skip
        assert key in step
    avg = step["time_to_1pct_of_optimum_at_own_import_at_low_avg60_s"]
    assert avg is None or avg >= 60
    assert "machine" in result


def test_the_command_line_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FLEETS, "tiny", TINY["tiny"])
    out = tmp_path / "bench.json"
    assert main(["--fleet", "tiny", "--cap", "30", "--no-step", "--settle-h", "0.2",
                 "--steady-h", "0.1", "--no-budget", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "rows", "step", "budget"}
    assert doc["step"] is None and doc["budget"] is None
    assert doc["rows"][0]["cap_pct"] == 30


def test_the_trailing_mean_of_hashrate() -> None:
    series = [(float(t), 10.0 if t < 60 else 20.0) for t in range(0, 200, 2)]
    avg = dict(trailing_mean(series, 60.0))
    assert avg[0.0] == 10.0 and avg[58.0] == 10.0
    assert avg[90.0] == pytest.approx((14 * 10 + 16 * 20) / 30)  # 32..90: 30 samples
    assert avg[120.0] == 20.0
