"""Allocation by marginal value against brute force on small random fleets.

The brute force here is independent of `controller.core.allocation`: a dynamic programme
over units and a grid of power, exact when every power a unit may draw lies on the grid
(stepped units), and a lower bound on the continuous optimum otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.core.allocation import Unit, allocate, value_of
from controller.core.curves import Curve

PROFILE = settings(
    max_examples=int(os.environ.get("ALLOC_EXAMPLES", "60")),
    derandomize=not os.environ.get("ALLOC_RANDOM"),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
GRID = 50.0


def brute_force(units: Sequence[Unit], budget: float, grid: float) -> float:
    """Best TH/s with every unit's power on multiples of `grid` (its options snapped)."""
    cells = math.floor(budget / grid + 1e-9)
    NEG = -math.inf
    best = [0.0] + [NEG] * cells  # best[c]: most TH/s using exactly c cells so far
    for u in units:
        options: list[tuple[int, float]] = []
        if u.may_stop or not u.may_run:
            options.append((round(u.stop_w / grid), 0.0))
        if u.may_run:
            if u.levels:
                powers: list[float] = list(u.levels)
            else:
                first = math.ceil(u.lo / grid - 1e-9)
                last = math.floor(u.hi / grid + 1e-9)
                powers = [c * grid for c in range(first, last + 1)]
            options += [(round(p / grid), u.ths(p)) for p in powers]
        nxt = [NEG] * (cells + 1)
        for c, v in enumerate(best):
            if v == NEG:
                continue
            for dc, dv in options:
                if c + dc <= cells and v + dv > nxt[c + dc]:
                    nxt[c + dc] = v + dv
        best = nxt
    return max(best)


@st.composite
def fleets(draw: st.DrawFn, stepped: bool, max_units: int) -> tuple[list[Unit], float]:
    n = draw(st.integers(1, max_units))
    units = []
    for i in range(n):
        full = draw(st.integers(30, 72)) * GRID  # 1.5-3.6 kW
        lo = draw(st.integers(15, int(full / GRID))) * GRID
        eff = draw(st.integers(15, 40))  # J/TH at full power
        alpha = draw(st.integers(70, 98)) / 100
        curve = Curve.through(full, full / eff, alpha)
        steps: tuple[float, ...] = ()
        if stepped:
            grid_pts = [c * GRID for c in range(int(lo / GRID), int(full / GRID) + 1)]
            picks = draw(st.lists(st.sampled_from(grid_pts), min_size=1, max_size=6))
            steps = tuple(sorted({lo, full, *picks}))
        running = draw(st.booleans())
        may_run = draw(st.integers(0, 9)) > 0
        may_stop = draw(st.integers(0, 9)) > 1
        if not may_run and not may_stop:
            may_stop = True
        units.append(
            Unit(
                id=f"u{i}",
                curve=curve,
                now_w=full if running else GRID,
                running=running,
                lo=lo,
                hi=full,
                steps=steps,
                stop_w=draw(st.sampled_from([0.0, GRID])),
                may_run=may_run,
                may_stop=may_stop,
                priority=0,
            )
        )
    total = sum(u.hi for u in units)
    budget = draw(st.integers(5, 105)) / 100 * total
    return units, budget


def _check_allocation(units: list[Unit], budget: float) -> float:
    a = allocate(units, budget)
    for u in units:
        w = a.watts[u.id]
        if u.id in a.running:
            assert u.may_run
            assert u.run_lo - 1e-6 <= w <= u.run_hi + 1e-6, (u, w)
            if u.levels:
                assert any(abs(w - s) < 1e-6 for s in u.levels), (u, w)
        else:
            assert u.may_stop or not u.may_run
            assert w == u.stop_w
    if a.feasible:
        assert sum(a.watts.values()) <= budget + 1e-6
    assert math.isclose(a.ths, value_of(units, a.watts, a.running), rel_tol=1e-9, abs_tol=1e-9)
    return a.ths if a.feasible else -math.inf


GAPS: list[float] = []


@PROFILE
@given(fleets(stepped=True, max_units=7))
def test_stepped_fleets_match_the_exact_optimum(fleet: tuple[list[Unit], float]) -> None:
    units, budget = fleet
    exact = brute_force(units, budget, GRID)
    got = _check_allocation(units, budget)
    if exact == -math.inf:
        assert got == -math.inf
        return
    assert got <= exact + 1e-6
    gap = 1 - got / exact if exact > 0 else 0.0
    GAPS.append(gap)
    # Firmware steps make a knapsack that the split fills greedily with exchanges, and
    # running sets of more than 6 choices are searched locally: on random fleets of up to
    # 7 rigs with coarse random steps, 94 % of allocations are exact, the 99th percentile
    # gap is 1.5 % and the worst seen 5.4 % (1,000 fleets). Profile tables are evenly
    # spaced, and fleets bigger: there the gap is a fraction of one rig's step.
    assert gap <= 0.06, (gap, units, budget)


@PROFILE
@given(fleets(stepped=False, max_units=4))
def test_continuous_fleets_beat_the_grid_optimum(fleet: tuple[list[Unit], float]) -> None:
    units, budget = fleet
    grid_best = brute_force(units, budget, 10.0)  # powers on a 10 W grid: a lower bound
    got = _check_allocation(units, budget)
    if grid_best == -math.inf:
        return
    assert got >= grid_best * (1 - 0.02) - 1e-6, (got, grid_best, units, budget)


def test_equal_marginal_values_across_throttled_rigs() -> None:
    a = Unit("a", Curve.through(3000, 100, 0.8), 3000, True, 1500, 3000)
    b = Unit("b", Curve.through(3000, 110, 0.8), 3000, True, 1500, 3000)
    res = allocate([a, b], 4000)
    wa, wb = res.watts["a"], res.watts["b"]
    assert 1500 < wa < wb < 3000  # both inside their ranges
    assert math.isclose(wa + wb, 4000, rel_tol=1e-6)
    assert a.curve is not None and b.curve is not None
    assert math.isclose(a.curve.slope(wa), b.curve.slope(wb), rel_tol=1e-4)


def test_the_rig_with_the_least_hashrate_per_kw_sleeps() -> None:
    # Two rigs of 3 kW; only one fits at its minimum: the better one runs.
    good = Unit("good", Curve.through(3000, 150, 0.85), 3000, True, 2000, 3000, stop_w=20)
    poor = Unit("poor", Curve.through(3000, 100, 0.85), 3000, True, 2000, 3000, stop_w=20)
    res = allocate([poor, good], 3500)
    assert res.running == {"good"}
    assert res.watts["poor"] == 20 and math.isclose(res.watts["good"], 3000)


def test_priority_groups_are_served_first() -> None:
    low = Unit("low", Curve.through(3000, 200, 0.85), 3000, True, 2000, 3000, priority=0)
    high = Unit("high", Curve.through(3000, 100, 0.85), 3000, True, 2000, 3000, priority=1)
    res = allocate([low, high], 4000)
    assert res.running == {"high"} and math.isclose(res.watts["high"], 3000)
