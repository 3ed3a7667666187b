"""Value curves: what the planner learns of each rig's hashrate against power.

The simulated farm's physics (simulators/farm.py) is not in the planner: here the planner's
learner is given what a rig on that farm shows, and has to find its curve."""

from __future__ import annotations

import math

import pytest

from controller.core.curves import ALPHA_PRIOR, Curve, CurveData, prior_curve
from simulators.cgminer import build_profiles
from simulators.farm import MODELS, RigModel, SimRig
from simulators.whatsminer import WHATSMINER_MODELS

ALL = {**MODELS, **WHATSMINER_MODELS}


def true_ths(m: RigModel, watts: float) -> float:
    """The simulator's mean hashrate at `watts` (its ripple averages out)."""
    return m.nominal_ths * ((watts - 2 * m.idle_w) / (m.nominal_w - 2 * m.idle_w)) ** 0.85


def observed(m: RigModel, powers: list[float], polls: int = 40) -> CurveData:
    """What a rig of model `m` shows, settled at each of `powers`, polled every 10 s."""
    rig = SimRig("r", m, 0.0, seed=3)
    data = CurveData()
    t = 0.0
    for p in powers:
        rig.set_power_target(p, t)
        t += m.target_change_s + 1
        for _ in range(polls):
            data = data.observe(rig.power_w(t), rig.hashrate_ths(t))
            t += 10.0
    return data


def test_a_curve_and_its_marginal_value() -> None:
    c = Curve.through(3000.0, 100.0, 0.8)
    assert c.ths(3000.0) == pytest.approx(100.0)
    assert c.ths(1500.0) == pytest.approx(100.0 * 0.5**0.8)
    # The marginal value falls with power (concave), and watts_at_slope inverts it.
    assert c.slope(1500.0) > c.slope(3000.0)
    for w in (1200.0, 2500.0, 3600.0):
        assert c.watts_at_slope(c.slope(w)) == pytest.approx(w)


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_curve_learned_from_a_throttled_rig_matches_the_simulated_farm(name: str) -> None:
    m = ALL[name]
    data = observed(m, [m.nominal_w, m.min_w, (m.min_w + m.nominal_w) / 2])
    curve = data.fit()
    assert curve is not None and curve.alpha != ALPHA_PRIOR
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        w = m.min_w + frac * (m.nominal_w - m.min_w)
        assert curve.ths(w) == pytest.approx(true_ths(m, w), rel=0.01), w


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_rig_seen_at_one_power_gets_the_prior(name: str) -> None:
    m = ALL[name]
    curve = observed(m, [m.nominal_w]).fit()
    assert curve is not None and curve.alpha == ALPHA_PRIOR
    assert curve.ths(m.nominal_w) == pytest.approx(m.nominal_ths, rel=0.01)
    # The prior's error at the bottom of the range stays small (the farm's own exponent is
    # not the prior's): a few percent.
    assert curve.ths(m.min_w) == pytest.approx(true_ths(m, m.min_w), rel=0.04)


def test_luxos_profiles_are_observations_with_weight() -> None:
    m = MODELS["Antminer S19 Pro"]
    data = CurveData()
    for p in build_profiles(SimRig("r", m, 0.0)):
        data = data.observe(p.watts, p.hashrate_ths, 30.0)
    curve = data.fit()
    assert curve is not None
    for w in (m.min_w, 2400.0, m.nominal_w):
        assert curve.ths(w) == pytest.approx(true_ths(m, w), rel=0.01)


def test_bands_are_bounded_and_readings_ignored_when_not_usable() -> None:
    data = CurveData()
    for i in range(40):
        data = data.observe(1000.0 * 1.05**i, 30.0 * 1.04**i)
    assert len(data.bands) <= 16
    same = data.observe(0.0, 10.0).observe(1000.0, math.nan).observe(-5.0, -1.0)
    assert same == data
    assert CurveData().fit() is None


def test_priors_without_observations() -> None:
    assert prior_curve(3000.0, 100.0, None) == Curve.through(3000.0, 100.0)
    by_eff = prior_curve(3000.0, None, 30.0)
    assert by_eff is not None and by_eff.ths(3000.0) == pytest.approx(100.0)
    assert prior_curve(3000.0, None, None) is None
