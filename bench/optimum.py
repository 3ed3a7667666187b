"""The most hashrate a simulated farm can give under a cap: exact, on its true physics.

This is the benchmark's yardstick, so it reads the simulator's own model
(`simulators.farm`), which rigd never sees: a rig running at power target p draws p and
hashes H x ((p - 2 idle) / (P - 2 idle)) ^ 0.85 (H, P its nominal hashrate and power); a
rig asleep draws its idle power and hashes nothing; the meter reads a fixed overhead plus
(1 + losses) x the rigs' power. The small sinusoidal ripples of power (0.4 %) and
hashrate (1 %) average out over the steady hour and are left out.

Why it is exact. Rigs of one model are interchangeable. For a fixed count of running rigs
per model the problem is concave (each rig's hashrate is strictly concave in its power,
alpha < 1), so its optimum is the KKT point: every running rig of a model at the same
power, and every model inside its range at the same marginal hashrate per watt (the price
lambda), each clamped to its range; the total power then falls continuously as lambda
rises, and the lambda that spends the budget is found by bisection to machine precision.
Every vector of counts is enumerated (numpy, all at once: about 600,000 for seven models
of about six rigs each), so the best of them is the optimum. A Lagrangian dual bound
(the minimum over lambda of the relaxation where every rig chooses alone) is computed as
well: it is an upper bound on any plan, and the optimum can only be below it by the
integrality gap of about one rig.

Options are the ones rigd is allowed here: power targets from the model's minimum to its
nominal power (to its maximum with `above_nominal`), or asleep at idle. Switching outlets
off to save a sleeper's idle power is not among them (rigd switches outlets off only to
force a sleep that did not take).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from simulators.farm import _HASH_EXPONENT, Farm, RigModel, SimRig

ALPHA = _HASH_EXPONENT


@dataclass(frozen=True)
class ModelGroup:
    model: RigModel
    count: int
    lo: float
    hi: float

    @property
    def floor(self) -> float:
        return 2.0 * self.model.idle_w

    def ths(self, watts: np.ndarray) -> np.ndarray:
        m = self.model
        frac = np.clip((watts - self.floor) / (m.nominal_w - self.floor), 0.0, 1.5)
        return np.asarray(m.nominal_ths * frac**ALPHA)

    def power_at(self, price: np.ndarray) -> np.ndarray:
        """Running power where the marginal hashrate per W is `price`, clamped."""
        m = self.model
        k = ALPHA * m.nominal_ths / (m.nominal_w - self.floor) ** ALPHA
        w = self.floor + (k / price) ** (1.0 / (1.0 - ALPHA))
        return np.asarray(np.clip(w, self.lo, self.hi))


@dataclass(frozen=True)
class Optimum:
    ths: float  # the most hashrate under the cap
    running: dict[str, int]  # running rigs per model
    watts: dict[str, float]  # each running rig's power, per model
    dual_bound_ths: float  # the Lagrangian upper bound (>= ths)
    rig_budget_w: float


def groups_of(rigs: Iterable[SimRig], above_nominal: bool = False) -> list[ModelGroup]:
    counts = Counter(r.model.name for r in rigs)
    models = {r.model.name: r.model for r in rigs}
    return [
        ModelGroup(
            models[name],
            n,
            models[name].min_w,
            models[name].max_w if above_nominal else models[name].nominal_w,
        )
        for name, n in sorted(counts.items())
    ]


def rig_budget_w(farm: Farm, cap_kw: float) -> float:
    m = farm.meter
    return (cap_kw * 1000.0 - m.overhead_base_w) / (1.0 + m.overhead_frac)


def optimum(farm: Farm, cap_kw: float, *, above_nominal: bool = False) -> Optimum:
    """The exact optimum for `farm` under `cap_kw` of true import (see the module)."""
    groups = groups_of(farm.rigs.values(), above_nominal)
    budget = rig_budget_w(farm, cap_kw)
    return solve(groups, budget)


def solve(groups: list[ModelGroup], budget: float) -> Optimum:
    counts = np.array(
        list(itertools.product(*(range(g.count + 1) for g in groups))), dtype=float
    )  # every count vector: (K, M)
    idle = np.array([g.model.idle_w for g in groups])
    total = np.array([g.count for g in groups], dtype=float)
    lo = np.array([g.lo for g in groups])
    run_budget = budget - ((total - counts) * idle).sum(axis=1)
    feasible = (counts * lo).sum(axis=1) <= run_budget + 1e-9
    counts, run_budget = counts[feasible], run_budget[feasible]
    if len(counts) == 0:
        return Optimum(0.0, {}, {}, 0.0, budget)
    # Bisection on log(price), for all count vectors at once.
    lo_p = np.full(len(counts), 1e-9)
    hi_p = np.full(len(counts), 10.0)
    for _ in range(64):  # the price's range is 1e-9..10: 64 halvings of its log are exact
        mid = np.sqrt(lo_p * hi_p)
        watts = np.stack([g.power_at(mid) for g in groups], axis=1)
        over = (counts * watts).sum(axis=1) > run_budget
        lo_p = np.where(over, mid, lo_p)
        hi_p = np.where(over, hi_p, mid)
    watts = np.stack([g.power_at(hi_p) for g in groups], axis=1)
    # Whatever is left (the budget exceeds every rig at its top, or bisection's last
    # sliver) cannot be used: all running rigs are then at their top.
    value = (counts * np.stack([g.ths(watts[:, j]) for j, g in enumerate(groups)], axis=1)).sum(
        axis=1
    )
    best = int(np.argmax(value))
    running = {g.model.name: int(counts[best, j]) for j, g in enumerate(groups)}
    per_rig = {
        g.model.name: float(watts[best, j]) for j, g in enumerate(groups) if counts[best, j] > 0
    }
    return Optimum(float(value[best]), running, per_rig, dual_bound(groups, budget), budget)


def dual_bound(groups: list[ModelGroup], budget: float) -> float:
    """min over lambda of lambda x budget + sum over rigs of their best choice alone."""

    def relaxed(price: float) -> float:
        p = np.array([price])
        out = price * budget
        for g in groups:
            w = g.power_at(p)
            run = float(g.ths(w)[0] - price * w[0])
            out += g.count * max(run, -price * g.model.idle_w)
        return out

    lo, hi = math.log(1e-9), math.log(10.0)
    for _ in range(200):  # golden-section search: the dual is convex in lambda
        a = lo + (hi - lo) * 0.382
        b = lo + (hi - lo) * 0.618
        if relaxed(math.exp(a)) < relaxed(math.exp(b)):
            hi = b
        else:
            lo = a
    return relaxed(math.exp(0.5 * (lo + hi)))


def true_ths(rigs: Iterable[SimRig], t: float) -> float:
    """The farm's hashrate on the mean physics (no ripple), for comparing with `optimum`."""
    out = 0.0
    for r in rigs:
        if not r.powered:
            continue
        p = r._eval(t)
        m = r.model
        above = p - 2 * m.idle_w
        if above > 0:
            out += m.nominal_ths * min(1.5, above / (m.nominal_w - 2 * m.idle_w)) ** ALPHA
    return out
