"""Allocation by marginal value: the most hashrate for a power budget. Pure.

Each unit (a rig, as the planner offers it) may run at a power in its range (continuous,
or on its firmware's steps), or be stopped (asleep or switched off, at what it then
draws), or only some of these, as dwell times, commands in flight and holds allow. Its
value is its hashrate, from its learned curve (`controller.core.curves`), concave in its
power. The budget is the total power the units may draw.

How:

1. Group priority first, lexicographically: higher groups are given what they can use
   before lower ones get any, with the least the lower groups can draw set aside.
2. Within a group, for a set of running units the best split of the budget is the one
   where every unit inside its range has the same marginal value (TH/s per W), the KKT
   conditions of a concave problem: found by bisection on that marginal value (the
   price), with firmware steps taken greedily by their marginal value at the end.
3. Which units run: stopping a unit frees its power above its stopped draw and loses
   its whole hashrate, a step in value, not a slope. A unit is worth running at a price
   when its hashrate per W over its stopped draw, at its lowest power, is at least that
   price (`merit`). Units are ranked by merit, and the candidate sets are the best-ranked
   ones that fit; the Lagrangian price picks the size, its neighbours are tried too, and
   for small fleets a local search swaps units in and out of the running set (a big rig
   out for a smaller one that fits better). Every candidate set is scored by its exact
   KKT split, and the best is kept.

Exact for a fixed running set; for the choice of running set, a heuristic whose gap to
the brute-force optimum the property tests measure (tests/core/test_allocation.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from controller.core.curves import Curve

SOLVE_ITERATIONS = 80  # Newton steps on log(price), safeguarded by bisection
EXHAUSTIVE_UNITS = 6  # every running set is tried in groups with up to this many choices
SEARCH_MAX_UNITS = 80  # local search over running sets only for groups up to this size
SEARCH_WINDOW = 4  # units on either side of the running set's edge that swaps consider
EXCHANGE_MAX_UNITS = 12  # step exchanges only among this few stepped units
SEARCH_ROUNDS = 8
NEIGHBOURS = 3  # running-set sizes tried on either side of the Lagrangian's


@dataclass(frozen=True, slots=True)
class Unit:
    """One rig as allocation sees it. Powers in W."""

    id: str
    curve: Curve | None  # None: its hashrate is unknown, counted as nothing
    now_w: float  # what it draws once what is in flight has settled
    running: bool  # hashing now (or heading there)
    lo: float  # lowest running power it may be given
    hi: float  # highest
    steps: tuple[float, ...] = ()  # running powers its firmware takes, ascending; () any
    stop_w: float = 0.0  # its draw when stopped (a unit that may not run is stopped)
    may_run: bool = True
    may_stop: bool = True
    priority: int = 0

    def ths(self, watts: float) -> float:
        return self.curve.ths(watts) if self.curve is not None else 0.0

    @property
    def levels(self) -> tuple[float, ...]:
        """The running powers it may be given, lowest first (empty: any in [lo, hi])."""
        if not self.steps:
            return ()
        inside = tuple(s for s in self.steps if self.lo - 1e-6 <= s <= self.hi + 1e-6)
        return inside or (self.lo,)

    @property
    def run_lo(self) -> float:
        lv = self.levels
        return lv[0] if lv else self.lo

    @property
    def run_hi(self) -> float:
        lv = self.levels
        return lv[-1] if lv else self.hi

    @property
    def least_w(self) -> float:
        """The least it can be made to draw."""
        return self.stop_w if self.may_stop or not self.may_run else self.run_lo

    @property
    def merit(self) -> float:
        """Hashrate per W above its stopped draw, at its lowest running power: the price
        above which stopping it is worth more than running it."""
        lo = self.run_lo
        extra = lo - self.stop_w
        if extra <= 0:
            return math.inf
        return self.ths(lo) / extra


@dataclass(frozen=True, slots=True)
class Allocation:
    watts: Mapping[str, float]  # what each unit is given (its stopped draw if stopped)
    running: frozenset[str]
    ths: float
    feasible: bool  # the budget could be kept
    price: float  # the marginal value (TH/s per W) the split ended at; 0: budget to spare


class _P:
    """A unit prepared for many splits: its running powers and values in plain floats.

    Running power as a function of t = log(price): a power-law curve gives
    exp(logc - e * t) (clamped to its range), a curve without slope (or none) its top
    below its threshold price and its bottom above, a stepped unit the highest step whose
    step up still pays the price (its steps' slopes fall: the curve is concave)."""

    __slots__ = ("e", "hi", "id", "kind", "levels", "lo", "logc", "slopes", "stop", "u", "vals")

    def __init__(self, u: Unit) -> None:
        self.u = u
        self.id = u.id
        self.stop = u.stop_w
        lv = u.levels
        self.lo, self.hi = (lv[0], lv[-1]) if lv else (u.lo, max(u.lo, u.hi))
        self.levels: tuple[float, ...] = lv
        self.vals = tuple(u.ths(w) for w in lv)
        self.slopes = tuple(
            (self.vals[i + 1] - self.vals[i]) / max(lv[i + 1] - lv[i], 1e-9)
            for i in range(len(lv) - 1)
        )
        c = u.curve
        self.logc = -math.inf
        self.e = 0.0
        if lv:
            self.kind = 2
        elif c is None or c.scale <= 0 or c.alpha >= 1.0 or self.hi <= self.lo:
            self.kind = 1  # threshold: top below it, bottom above
            self.logc = math.log(c.scale) if c is not None and c.scale > 0 else -math.inf
        else:
            self.kind = 0
            self.e = 1.0 / (1.0 - c.alpha)
            self.logc = self.e * math.log(c.alpha * c.scale)

    def power(self, t: float) -> float:
        if self.kind == 0:
            x = self.logc - self.e * t
            w = math.exp(x) if x < 700 else math.inf
            return self.lo if w < self.lo else self.hi if w > self.hi else w
        if self.kind == 1:
            return self.hi if t < self.logc else self.lo
        k = 0
        price = math.exp(t)
        for sl in self.slopes:
            if sl >= price:
                k += 1
            else:
                break
        return self.levels[k]

    def t_range(self) -> tuple[float, float]:
        """(t at which it is at its top, t at which it is at its bottom)."""
        if self.kind == 0:
            return (self.logc - math.log(self.hi)) / self.e, (
                self.logc - math.log(self.lo)
            ) / self.e
        if self.kind == 1:
            return self.logc, self.logc
        if not self.slopes:
            return 0.0, 0.0
        lo_s = math.log(max(self.slopes[-1], 1e-300))
        hi_s = math.log(max(self.slopes[0], 1e-300))
        return lo_s, hi_s

    def ths(self, w: float) -> float:
        if self.kind == 2:
            for lw, v in zip(self.levels, self.vals, strict=True):
                if abs(lw - w) < 1e-9:
                    return v
        return self.u.ths(w)

    def merit(self) -> float:
        return self.u.merit


def _split(on: Sequence[_P], budget: float) -> tuple[dict[str, float], float, float] | None:
    """The best split of `budget` W among units that all run: (watts, TH/s, price), or
    None if even their lowest powers do not fit."""
    low = sum(p.lo for p in on)
    if low > budget + 1e-6:
        return None
    if sum(p.hi for p in on) <= budget + 1e-9:
        return {p.id: p.hi for p in on}, sum(p.ths(p.hi) for p in on), 0.0
    ranges = [p.t_range() for p in on]
    t_lo = min(r[0] for r in ranges) - 1e-6  # the total is above the budget here...
    t_hi = max(r[1] for r in ranges) + 1e-6  # ...and at its lowest here
    t = 0.5 * (t_lo + t_hi)
    for _ in range(SOLVE_ITERATIONS):
        total = 0.0
        slope = 0.0
        for p in on:
            w = p.power(t)
            total += w
            if p.kind == 0 and p.lo < w < p.hi:
                slope -= p.e * w
        tol = 1e-9 * budget + 1e-6
        if total > budget:
            t_lo = t
            if total - budget <= tol and slope < 0:
                # Newton on a convex falling total stays above the budget: step over it.
                over = t + 2.0 * (total - budget) / -slope + 1e-15
                if sum(p.power(over) for p in on) <= budget:
                    t_hi = over
                    break
        else:
            t_hi = t
            if budget - total <= tol:
                break
        if t_hi - t_lo < 1e-12:
            break
        nxt = t - (total - budget) / slope if slope < 0 else math.nan
        t = nxt if t_lo < nxt < t_hi else 0.5 * (t_lo + t_hi)
    watts = {p.id: p.power(t_hi) for p in on}
    left = budget - sum(watts.values())
    if left > 1e-6:
        # Continuous units take what is left in proportion to their room; stepped units
        # then take their next steps, best marginal value first, while they fit.
        cont = [p for p in on if p.kind != 2 and watts[p.id] < p.hi - 1e-9]
        room = sum(p.hi - watts[p.id] for p in cont)
        if room > 0:
            k = min(1.0, left / room)
            for p in cont:
                watts[p.id] += k * (p.hi - watts[p.id])
            left = budget - sum(watts.values())
        stepped = [p for p in on if p.kind == 2]
        ups = []
        for p in stepped:
            cur = watts[p.id]
            i = p.levels.index(cur)
            if i + 1 < len(p.levels):
                ups.append((p.slopes[i], p, p.levels[i + 1]))
        for _, p, nxt in sorted(ups, key=lambda x: (-x[0], x[1].id)):
            step = nxt - watts[p.id]
            if step <= left + 1e-9:
                watts[p.id] = nxt
                left -= step
        if len(stepped) <= EXCHANGE_MAX_UNITS:
            _exchange(stepped, watts, budget)
    ths = sum(p.ths(watts[p.id]) for p in on)
    return watts, ths, math.exp(t_hi)


def _exchange(stepped: Sequence[_P], watts: dict[str, float], budget: float) -> None:
    """Firmware steps are a knapsack: improve the greedy fill by moving one unit to any of
    its steps, or two at once (one up, one down), while that gains and fits."""
    if not stepped:
        return
    for _ in range(SEARCH_ROUNDS * 4):
        left = budget - sum(watts.values())
        best_gain = 1e-9
        best_move: tuple[tuple[_P, float], ...] | None = None
        for p in stepped:
            wp = watts[p.id]
            vp = p.ths(wp)
            for a, va in zip(p.levels, p.vals, strict=True):
                cost_a, gain_a = a - wp, va - vp
                if cost_a <= 0:
                    continue
                if cost_a <= left + 1e-9 and gain_a > best_gain:
                    best_gain, best_move = gain_a, ((p, a),)
                for q in stepped:
                    if q is p:
                        continue
                    wq = watts[q.id]
                    vq = q.ths(wq)
                    for b, vb in zip(q.levels, q.vals, strict=True):
                        if b >= wq or cost_a + (b - wq) > left + 1e-9:
                            continue
                        g = gain_a + vb - vq
                        if g > best_gain:
                            best_gain, best_move = g, ((p, a), (q, b))
        if best_move is None:
            return
        for x, w in best_move:
            watts[x.id] = w


@dataclass(slots=True)
class _Result:
    watts: dict[str, float]
    running: set[str]
    ths: float
    price: float


def _score(
    on: Sequence[_P], off: Sequence[_P], forced: Sequence[_P], budget: float
) -> _Result | None:
    off_w = sum(p.stop for p in off)
    res = _split([*forced, *on], budget - off_w)
    if res is None:
        return None
    watts, ths, price = res
    for p in off:
        watts[p.id] = p.stop
    return _Result(watts, {p.id for p in forced} | {p.id for p in on}, ths, price)


def _group(units: Sequence[Unit], budget: float) -> tuple[_Result, bool]:
    """Allocate `budget` within one priority group; (result, feasible)."""
    prepared = [_P(u) for u in units]
    forced = [p for p in prepared if p.u.may_run and not p.u.may_stop]
    never = [p for p in prepared if not p.u.may_run]
    choice = sorted(
        (p for p in prepared if p.u.may_run and p.u.may_stop), key=lambda p: (-p.merit(), p.id)
    )
    budget_c = budget - sum(p.stop for p in never)
    floor = sum(p.lo for p in forced) + sum(p.stop for p in choice)
    if floor > budget_c + 1e-6:
        # Not even everything stopped (and the forced at their least) fits.
        watts = {p.id: p.lo for p in forced}
        watts.update({p.id: p.stop for p in choice})
        watts.update({p.id: p.stop for p in never})
        ths = sum(p.ths(p.lo) for p in forced)
        return _Result(watts, {p.id for p in forced}, ths, math.inf), False
    # Best merit first, skipping a unit whose lowest power does not fit in what is left
    # (a smaller one further down may): every prefix up to k_max fits.
    fit: list[_P] = []
    used = floor
    for p in choice:
        extra = p.lo - p.stop
        if used + extra <= budget_c + 1e-6:
            used += extra
            fit.append(p)
    k_max = len(fit)
    chosen = {p.id for p in fit}
    choice = fit + [p for p in choice if p.id not in chosen]
    tried: dict[int, _Result | None] = {}

    def at(k: int) -> _Result | None:
        if k not in tried:
            tried[k] = _score(choice[:k], choice[k:], forced, budget_c)
        return tried[k]

    # The running set: the best-ranked units, as many as have merit at least the price
    # their split ends at (the Lagrangian's choice), and sizes around that.
    lo_k, hi_k = 0, k_max
    while lo_k < hi_k:
        mid = (lo_k + hi_k + 1) // 2
        r = at(mid)
        if r is not None and choice[mid - 1].merit() >= r.price:
            lo_k = mid
        else:
            hi_k = mid - 1
    best: _Result | None = None
    for k in range(max(0, lo_k - NEIGHBOURS), min(k_max, lo_k + NEIGHBOURS) + 1):
        r = at(k)  # on a tie, the larger running set (a group's priority holds for all)
        if r is not None and (best is None or r.ths >= best.ths - 1e-12):
            best = r
    if best is None:  # k = 0 always fits once the floor does
        best = at(0)
        assert best is not None
    if len(choice) <= EXHAUSTIVE_UNITS:
        best = _exhaustive(choice, forced, budget_c, best)
    elif len(choice) <= SEARCH_MAX_UNITS:
        best = _search(choice, forced, budget_c, best)
    for p in never:
        best.watts[p.id] = p.stop
    return best, True


def _exhaustive(choice: list[_P], forced: list[_P], budget: float, best: _Result) -> _Result:
    """Every running set, for groups small enough (at most 2^EXHAUSTIVE_UNITS splits)."""
    room = budget - sum(p.stop for p in choice) - sum(p.lo for p in forced) + 1e-6
    top = [p.ths(p.hi) for p in choice]
    forced_top = sum(p.ths(p.hi) for p in forced)
    for mask in range(1 << len(choice)):
        idx = [i for i in range(len(choice)) if mask >> i & 1]
        # Even every running unit at its top could not beat the best: skip the split.
        if forced_top + sum(top[i] for i in idx) <= best.ths * (1 + 1e-9) + 1e-9:
            continue
        on = [choice[i] for i in idx]
        if sum(p.lo - p.stop for p in on) > room:
            continue
        off = [p for i, p in enumerate(choice) if not mask >> i & 1]
        r = _score(on, off, forced, budget)
        if r is not None and r.ths > best.ths * (1 + 1e-9) + 1e-9:
            best = r
    return best


def _search(choice: list[_P], forced: list[_P], budget: float, best: _Result) -> _Result:
    """Local search over the running set: add, drop or swap one unit near the edge."""
    for _ in range(SEARCH_ROUNDS):
        on = [p for p in choice if p.id in best.running]
        off = [p for p in choice if p.id not in best.running]
        edge_on = sorted(on, key=lambda p: p.merit())[:SEARCH_WINDOW]
        edge_off = sorted(off, key=lambda p: -p.merit())[:SEARCH_WINDOW]
        small = sorted(off, key=lambda p: (p.lo - p.stop, p.id))[:SEARCH_WINDOW]
        edge_off += [p for p in small if p not in edge_off]  # a knapsack: the small fit
        moves: list[tuple[set[str], set[str]]] = []
        moves += [({p.id}, set()) for p in edge_on]  # drop one
        moves += [(set(), {p.id}) for p in edge_off]  # add one
        moves += [({a.id}, {b.id}) for a in edge_on for b in edge_off]  # swap
        improved = False
        for drop, add in moves:
            run_ids = (best.running - drop) | add
            new_on = [p for p in choice if p.id in run_ids]
            new_off = [p for p in choice if p.id not in run_ids]
            r = _score(new_on, new_off, forced, budget)
            if r is not None and r.ths > best.ths * (1 + 1e-9) + 1e-9:
                best, improved = r, True
        if not improved:
            break
    return best


def allocate(units: Iterable[Unit], budget_w: float) -> Allocation:
    """The most hashrate for `budget_w` W in all (see the module's docstring).

    Infeasible (the least every unit can draw exceeds the budget): every group from the
    first that does not fit is given its least, and `feasible` is False."""
    all_units = list(units)
    groups: dict[int, list[Unit]] = {}
    for u in all_units:
        groups.setdefault(u.priority, []).append(u)
    order = sorted(groups, reverse=True)
    least = {p: sum(u.least_w for u in groups[p]) for p in order}
    watts: dict[str, float] = {}
    running: set[str] = set()
    ths = 0.0
    price = 0.0
    left = budget_w
    feasible = True
    for i, p in enumerate(order):
        reserve = sum(least[q] for q in order[i + 1 :])
        res, ok = _group(groups[p], left - reserve)
        feasible = feasible and ok
        watts.update(res.watts)
        running |= res.running
        ths += res.ths
        if ok and res.price > price:
            price = res.price
        left -= sum(res.watts[u.id] for u in groups[p])
    return Allocation(MappingProxyType(watts), frozenset(running), ths, feasible, price)


def value_of(units: Iterable[Unit], watts: Mapping[str, float], running: Iterable[str]) -> float:
    """TH/s of a given allocation."""
    on = set(running)
    return sum(u.ths(watts[u.id]) for u in units if u.id in on)
