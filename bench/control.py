"""`python -m bench.control`: under any cap, how close does rigd get to the most hashrate
the farm can give?

For two mixed fleets of 40 rigs (seven models, 17.5 to 34 J/TH) and caps of 10 to 100 % of
full load, the daemon's real cycle runs against the simulated farm in virtual time (the
harness of bench/sim_harness.py: in-process adapters on a manual clock, the farm's true
import sampled every 2 s), and each run is set against the exact optimum of
`bench.optimum` on the farm's true physics. Then one fleet takes a step 100 -> 40 -> 100 %.

Per fleet and cap, one row:

- `optimum_ths`: the most hashrate under the cap (exact; `dual_bound_ths` its upper bound);
- `rigd_ths`: rigd's mean hashrate over the steady hour (after two hours to settle), on the
  farm's mean physics (its ripple left out, as in the optimum);
- `ratio`: rigd / optimum; `ratio_at_own_import`: rigd / the optimum at rigd's own mean
  steady import (how well it allocates what it imports, margins aside);
- `import_over_cap`: rigd's mean steady import / the cap;
- `over_cap_s_after_stop`, `worst_over_kw_after_stop`: seconds of true import over the cap,
  and the worst excess, outside the physical stop time after each cap drop (the slowest
  power-down response plus two polls), over the whole run;
- `commands`: commands sent in the whole run (rig commands and outlet switches);
  `steady_commands`: in the steady hour; `rigs_flapping`: rigs commanded more than twice
  in the steady hour.

The step (`step`): time to get under the cap after the drop to 40 %, time to within 1 % of
the optimum at 40 % and after the return to 100 % (also of the optimum at rigd's own
settled import, its margins aside), the least time any controller could take to come back
(`restore_physical_bound_s`: the sleepers' own boot and ramp in the simulator, for the rigs
asleep at the end), and the worst overshoot of the cap during the restore. The 40 % cap is
an override of known duration, so rigd prepares the restore in its last minutes
(controller/core/restore.py): the 40 % phase is judged up to `PREPARE_WINDOW_S` before its
end, and the preparation is costed on its own (`prepare_cost_*`: hashrate x time given up
in those last minutes against the level settled before). `step.unprepared` is the same step
with the preparation off: what it gives after the end (`after_end_ths_s`) and costs before.
The step's config states no response times: rigd starts from the default prior and learns
the wake times (`learned_wake_s`) in a first 20-minute curtailment early in the first hour.

The month's energy budget (`budget`): a calendar month with a budget of 70 % of running
flat out, on a smaller farm of the same models polled every 5 minutes (`run_budget`): the
share of the budget used at the month's end, and whether it was ever overdrawn.

Config: the defaults, except `ramp_kw_per_interval` = the site's maximum import (no ramp
limit: with the default 10 %, counting rigs still ramping, coming back from 40 % takes six
waves of wakes of up to 340 s each, and the step target is five minutes). The cap is a
technician's override below `max_import_kw` = the farm's full load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import proc
from bench.figures import markdown_table
from bench.optimum import optimum, true_ths
from bench.sim_harness import SimHarness, farm_config, flat_out_kw, stop_time_s
from controller.core.caps import period_bounds
from simulators.clock import ManualClock
from simulators.farm import MODELS, Farm, RigModel, SimMeter, SimPdu, SimRig
from simulators.whatsminer import WHATSMINER_MODELS

ALL_MODELS: dict[str, RigModel] = {**MODELS, **WHATSMINER_MODELS}
START = 1_764_547_200.0  # 2025-12-01 00:00 UTC

# Two mixed fleets of 40: every model of the issue, in different shares.
FLEETS: dict[str, dict[str, int]] = {
    "fleet-1": {
        "Antminer S19 Pro": 8,
        "Antminer S19j Pro": 6,
        "Antminer S19 XP": 6,
        "Antminer S21": 5,
        "Whatsminer M30S+_VE40": 5,
        "Whatsminer M50S_VH50": 6,
        "Whatsminer M60S_VK40": 4,
    },
    "fleet-2": {
        "Antminer S19 Pro": 10,
        "Antminer S19j Pro": 8,
        "Antminer S19 XP": 3,
        "Antminer S21": 3,
        "Whatsminer M30S+_VE40": 8,
        "Whatsminer M50S_VH50": 6,
        "Whatsminer M60S_VK40": 2,
    },
}
CAPS = (10, 30, 50, 75, 90, 100)
# The month's energy budget runs on a smaller farm of the same models (see `run_budget`).
BUDGET_FLEET = {model: 2 for model in FLEETS["fleet-1"]}
OVERHEAD_BASE_W = 4000.0  # a small farm's lighting, network and offices
BUDGET_POLL_S = 300.0  # the month's budget run polls every 5 minutes
PREPARE_WINDOW_S = 600.0  # the step's span costed before the cap's end, and after it
AVG_S = 60.0  # the trailing mean of hashrate for the step's `*_avg60_s` figures
WARM_UP_S = 1200.0  # the step's first curtailment, where rigd first sees its rigs wake


@dataclass
class Plan:
    fleets: dict[str, dict[str, int]] = field(default_factory=lambda: dict(FLEETS))
    caps: tuple[int, ...] = CAPS
    settle_s: float = 2 * 3600.0  # before the steady hour
    steady_s: float = 3600.0
    step_fleet: str | None = "fleet-1"
    step_phase_s: float = 3600.0
    step_low_pct: float = 40.0
    interval_s: float = 10.0
    control: dict[str, Any] = field(default_factory=dict)
    seed: int = 7  # the rigs' ripple phases and the meter's noise
    real_caps: tuple[int, ...] = ()  # caps for the run through the real drivers
    budget: bool = True  # the month's energy budget run (on `BUDGET_FLEET`)
    budget_share: float = 0.7  # of the energy of running flat out all month
    verbose: bool = True


def build_farm(clock: ManualClock, mix: Mapping[str, int], *, pdus: int = 4, seed: int = 7) -> Farm:
    """The fleet's rigs, interleaved by model, on `pdus` PDUs; every rig takes power targets
    and sleeps (the in-process adapters drive them as LuxOS rigs)."""
    farm = Farm(clock)
    farm.meter.overhead_base_w = OVERHEAD_BASE_W
    if seed != 7:
        farm.meter = SimMeter(farm.meter.id, farm, overhead_base_w=OVERHEAD_BASE_W, seed=seed)
    queue = [name for name, n in mix.items() for _ in range(n)]
    # Interleave so that every PDU carries every model.
    order = sorted(range(len(queue)), key=lambda i: (i % 7, i))
    t = clock.now()
    for n, i in enumerate(order, start=1):
        rid = f"rig-{n:03d}"
        farm.rigs[rid] = SimRig(rid, ALL_MODELS[queue[i]], t, seed=seed * 100_003 + n)
    per = math.ceil(len(farm.rigs) / pdus)
    rigs = list(farm.rigs.values())
    for p in range(pdus):
        pid = f"pdu-{p + 1:02d}"
        farm.pdus[pid] = SimPdu(pid, rigs[p * per : (p + 1) * per])
    return farm


def harness(
    tmp: Path, farm: Farm, clock: ManualClock, plan: Plan, *, physical_timing: bool = True
) -> SimHarness:
    full = flat_out_kw(farm)
    control = {"max_import_kw": round(full, 1), "ramp_kw_per_interval": round(full, 1)}
    control.update(plan.control)
    cfg = farm_config(
        farm,
        tmp / "state",
        interval_s=plan.interval_s,
        control=control,
        physical_timing=physical_timing,
    )
    return SimHarness(
        tmp,
        farm,
        clock,
        cfg,
        substep_s=2.0,
        settle_s=stop_time_s(farm, plan.interval_s),
    )


def commands(h: SimHarness) -> dict[str, int]:
    counts = h.command_counts()
    for pdu in h.direct.pdus.values():
        for c in pdu.commands:
            o = pdu.pdu.outlets[c.outlet]
            if o.rig is not None:
                counts[o.rig.id] = counts.get(o.rig.id, 0) + 1
    return counts


async def run_cap(fleet: str, mix: Mapping[str, int], cap_pct: float, plan: Plan) -> dict[str, Any]:
    clock = ManualClock(START)
    farm = build_farm(clock, mix, seed=plan.seed)
    with tempfile.TemporaryDirectory(prefix="rigd-bench-") as tmp:
        h = harness(Path(tmp), farm, clock, plan)
        full = flat_out_kw(farm)
        cap_kw = full * cap_pct / 100.0
        t0 = h.now
        if cap_pct < 100:
            h.at(t0 + 33, lambda: h.set_override(cap_kw, 10 * 24 * 3600.0, "bench"))
        steady_from = t0 + plan.settle_s
        samples: list[tuple[float, float]] = []
        before: dict[str, int] = {}

        def each(_: object) -> None:
            nonlocal before
            if not before and h.now >= steady_from:
                before = commands(h)
            if h.now >= steady_from:
                samples.append((h.now, true_ths(farm.rigs.values(), h.now)))

        await h.run_until(steady_from + plan.steady_s, each)
        after = commands(h)
        rep = h.recorder.report(since=t0)
        steady = [s for s in h.recorder.samples if s.t >= steady_from]
        import_kw = sum(s.import_kw * s.dt for s in steady) / sum(s.dt for s in steady)
        over_s = sum(s.dt for s in h.recorder.samples if not s.settling and s.import_kw > s.cap_kw)
        rigd_ths = sum(v for _, v in samples) / len(samples)
        best = optimum(farm, cap_kw)
        own = optimum(farm, min(cap_kw, import_kw))
        steady_cmds = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        kept = h.controller.attainment
        await h.close()
    return {
        "fleet": fleet,
        "cap_pct": cap_pct,
        "cap_kw": round(cap_kw, 3),
        "optimum_ths": round(best.ths, 2),
        "dual_bound_ths": round(best.dual_bound_ths, 2),
        "rigd_ths": round(rigd_ths, 2),
        "ratio": round(rigd_ths / best.ths, 4) if best.ths else None,
        "optimum_at_own_import_ths": round(own.ths, 2),
        "ratio_at_own_import": round(rigd_ths / own.ths, 4) if own.ths else None,
        "import_over_cap": round(import_kw / cap_kw, 4),
        "over_cap_s_after_stop": round(over_s, 1),
        "worst_over_kw_after_stop": round(max(0.0, rep.worst_kw_settled), 3),
        "commands": sum(after.values()),
        "steady_commands": sum(steady_cmds.values()),
        "rigs_flapping": sum(1 for v in steady_cmds.values() if v > 2),
        "rigd_kept_pct": round(100 * kept[0] / kept[1], 2) if kept else None,
        "optimum_running": best.running,
    }


async def run_step(
    fleet: str, mix: Mapping[str, int], plan: Plan, *, prepare: bool = True
) -> dict[str, Any]:
    """100 % -> `step_low_pct` -> 100 %, each for `step_phase_s`. The cap is an override
    of known duration, so rigd prepares the restore before its end (controller/core/
    restore.py); `prepare=False` turns that off, to measure what it gives and costs."""
    clock = ManualClock(START)
    farm = build_farm(clock, mix, seed=plan.seed)
    with tempfile.TemporaryDirectory(prefix="rigd-bench-") as tmp:
        # No wake times in the config: rigd starts from the default prior (300 s for
        # every model) and learns them from a first curtailment, early in the first hour.
        h = harness(Path(tmp), farm, clock, plan, physical_timing=False)
        if not prepare:
            ctl = h.controller
            ctl.settings = replace(ctl.settings, prepare_restore=False)
        full = flat_out_kw(farm)
        low_kw = full * plan.step_low_pct / 100.0
        t0 = h.now
        t_drop = t0 + plan.step_phase_s + 3
        t_back = t_drop + plan.step_phase_s
        warm = min(WARM_UP_S, plan.step_phase_s / 3)
        h.at(t0 + 33, lambda: h.set_override(low_kw, warm, "bench warm-up"))
        h.at(t_drop, lambda: h.set_override(low_kw, t_back - t_drop, "bench step"))
        series: list[tuple[float, float]] = []

        def each(_: object) -> None:
            series.append((h.now, true_ths(farm.rigs.values(), h.now)))

        t_end = t_back + plan.step_phase_s
        asleep: list[RigModel] = []
        h.at(t_back, lambda: asleep.extend(sleepers(farm, t_back)))
        await h.run_until(t_end, each)
        samples = list(h.recorder.samples)
        timing = (
            {r.id: r.timing for r in h.controller.last_input.rigs}
            if h.controller.last_input
            else {}
        )
        learned = {farm.rigs[rid].model.name: round(t.wake_s) for rid, t in sorted(timing.items())}
        await h.close()
    opt_low = optimum(farm, low_kw).ths
    opt_full = optimum(farm, full).ths

    def under_at(since: float, until: float) -> float | None:
        """Time from `since` until import is under the cap for good (before `until`)."""
        last_over = since
        for s in samples:
            if since <= s.t < until and s.import_kw > s.cap_kw:
                last_over = s.t
        return last_over - since

    def within(since: float, until: float, opt: float) -> float | None:
        """Time from `since` until hashrate stays within 1 % of `opt` (before `until`)."""
        hit: float | None = None
        for t, v in series:
            if not since <= t < until:
                continue
            close = abs(v - opt) <= 0.01 * opt
            hit = (t if hit is None else hit) if close else None
        return None if hit is None else hit - since

    # Hashrate is a rate: the farm's hashrate over the last `AVG_S` (a trailing mean of
    # the 2-s samples), as a pool would see it; a swap's minute-long dip then counts by
    # its share of that minute. The instantaneous figures are kept beside it.
    averaged = trailing_mean(series, AVG_S)

    def within_avg(since: float, until: float, opt: float) -> float | None:
        """`within` on the `AVG_S` trailing mean, counted from `since` + `AVG_S` (the
        first window wholly after the step)."""
        hit: float | None = None
        for t, v in averaged:
            if not since + AVG_S <= t < until:
                continue
            close = abs(v - opt) <= 0.01 * opt
            hit = (t if hit is None else hit) if close else None
        return None if hit is None else hit - since

    def held(since: float, until: float, opt: float, hold_s: float) -> float | None:
        """Time from `since` until hashrate is within 1 % of `opt` and stays there for
        `hold_s` at least (before `until`): `within` without a later dip counted against
        the restore (a re-optimisation's swap, half an hour on, dips for a minute)."""
        start: float | None = None
        for t, v in series:
            if not since <= t < until:
                continue
            if abs(v - opt) <= 0.01 * opt:
                start = t if start is None else start
                if t - start >= hold_s:
                    return start - since
            else:
                start = None
        return None

    def level(since: float, until: float, last: float = 1.0) -> float:
        """rigd's mean hashrate over the quarter of a phase that ends at `last` of it:
        where it settled."""
        span = until - since
        tail = [v for t, v in series if since + (last - 0.25) * span <= t < since + last * span]
        return sum(tail) / len(tail)

    # At 40 % the level is taken over the third quarter: the last minutes are the
    # preparation of the restore, costed on their own below.
    low_level = level(t_drop, t_back, 0.75)
    low_end = t_back - PREPARE_WINDOW_S  # the low phase's times are measured up to here
    window = [(t, v) for t, v in series if t_back - PREPARE_WINDOW_S <= t < t_back]
    dt = window[1][0] - window[0][0] if len(window) > 1 else 0.0
    # Hashrate given up in the last minutes before the end (TH/s x s), against the level
    # settled before them, and as a share of the whole low phase's hashrate.
    prepare_cost = sum(low_level - v for _, v in window) * dt
    after = [(t, v) for t, v in series if t_back <= t < t_back + PREPARE_WINDOW_S]
    after_ths_s = sum(v for _, v in after) * dt

    low_import = mean_import(
        samples, t_drop + 0.5 * plan.step_phase_s, t_drop + 0.75 * plan.step_phase_s
    )
    full_import = mean_import(samples, t_back + 0.75 * plan.step_phase_s, t_end)
    own_low = optimum(farm, min(low_kw, low_import)).ths
    own_full = optimum(farm, min(full, full_import)).ths
    restore_over = max(
        (s.import_kw - s.cap_kw for s in samples if s.t >= t_back), default=-math.inf
    )
    drop_over_after_stop = sum(
        s.dt
        for s in samples
        if t_drop <= s.t < t_back and not s.settling and s.import_kw > s.cap_kw
    )
    return {
        "fleet": fleet,
        "low_pct": plan.step_low_pct,
        "time_under_cap_s": under_at(t_drop, t_back),
        "over_cap_s_after_stop": drop_over_after_stop,
        "time_to_1pct_of_optimum_at_low_s": within(t_drop, low_end, opt_low),
        "time_to_1pct_of_optimum_after_restore_s": within(t_back, math.inf, opt_full),
        # The drop side both ways, and on the hashrate's `AVG_S` trailing mean as well as
        # instantaneously: within 1 % and staying there (to `PREPARE_WINDOW_S` before the
        # low phase's end) of the optimum at the cap and at rigd's own settled import.
        "time_to_1pct_of_optimum_at_low_avg60_s": within_avg(t_drop, low_end, opt_low),
        "time_to_1pct_of_optimum_at_own_import_at_low_avg60_s": within_avg(
            t_drop, low_end, own_low
        ),
        "time_to_1pct_of_optimum_after_restore_avg60_s": within_avg(t_back, math.inf, opt_full),
        "min_ratio_at_low_after_300s": least(series, t_drop + 300, low_end, opt_low),
        "min_ratio_at_low_after_300s_avg60": least(averaged, t_drop + 300, low_end, opt_low),
        "min_ratio_after_restore_after_300s": least(series, t_back + 300, math.inf, opt_full),
        "min_ratio_after_restore_after_300s_avg60": least(
            averaged, t_back + 300, math.inf, opt_full
        ),
        "import_over_cap_at_low": round(low_import / low_kw, 4),
        "time_to_1pct_of_optimum_after_restore_held_10min_s": held(
            t_back, math.inf, opt_full, 600.0
        ),
        # Where rigd settles in each phase, against the optimum at the cap (its margins
        # included), and how long it takes to get within 1 % of that level.
        "settled_ratio_at_low": round(low_level / opt_low, 4),
        "settled_ratio_after_restore": round(level(t_back, t_end) / opt_full, 4),
        "time_to_1pct_of_settled_at_low_s": within(t_drop, low_end, low_level),
        "time_to_1pct_of_settled_after_restore_s": within(t_back, math.inf, level(t_back, t_end)),
        # Against the optimum at rigd's own settled import (its margins aside, as the
        # 99 % target): how long the move itself takes.
        "time_to_1pct_of_optimum_at_own_import_at_low_s": within(t_drop, low_end, own_low),
        "time_to_1pct_of_optimum_at_own_import_after_restore_s": within(t_back, math.inf, own_full),
        # No controller does better than waking every sleeper the instant the cap lifts,
        # with every other rig at its optimum power at once: the farm's own wake time.
        "restore_physical_bound_s": wake_bound_s(asleep, farm, opt_full),
        "restore_overshoot_kw": round(max(0.0, restore_over), 3),
        "prepared": prepare,
        # The wake times rigd learned (model -> s; its prior: 300 s for every model).
        "learned_wake_s": learned,
        # What the preparation cost under the cap: hashrate x time given up in the last
        # `PREPARE_WINDOW_S` before the end (against the level settled before), in TH/s x s
        # and as a share of the low phase's hashrate x time; and the farm's hashrate x time
        # over the same span after the end, for the prepared and unprepared runs to compare.
        "prepare_cost_ths_s": round(prepare_cost),
        "prepare_cost_pct_of_low_phase": round(
            100 * prepare_cost / (low_level * plan.step_phase_s), 3
        ),
        "after_end_ths_s": round(after_ths_s),
        "min_import_margin_kw_at_low": round(
            min(s.cap_kw - s.import_kw for s in samples if t_drop + 60 <= s.t < t_back), 3
        ),
        "optimum_low_ths": round(opt_low, 2),
        "optimum_full_ths": round(opt_full, 2),
    }


async def run_budget(plan: Plan, mix: Mapping[str, int] = BUDGET_FLEET) -> dict[str, Any]:
    """A calendar month's energy budget of 70 % of running flat out, paced by rigd: the
    share used at the month's end (read off the meter's register), and whether it ever
    overdrew. A smaller farm (two rigs of each model) polled every 5 minutes keeps the 31
    days to a minute or two: pacing spreads what remains of the budget over what remains
    of the month, so neither the farm's size nor the poll rate changes what it does,
    only the lag its reserve covers."""
    clock = ManualClock(START)
    farm = build_farm(clock, mix, pdus=1, seed=plan.seed)
    start, end = period_bounds("month", "UTC", START)
    month_s = end - start
    with tempfile.TemporaryDirectory(prefix="rigd-bench-") as tmp:
        full = flat_out_kw(farm)
        kwh = round(plan.budget_share * full * month_s / 3600.0)
        control = {"max_import_kw": round(full, 1), "ramp_kw_per_interval": round(full, 1)}
        control.update(plan.control)
        cfg = farm_config(
            farm,
            Path(tmp) / "state",
            interval_s=BUDGET_POLL_S,
            control=control,
            budget={"period": "month", "kwh": kwh},
        )
        h = SimHarness(Path(tmp), farm, clock, cfg, substep_s=BUDGET_POLL_S, settle_s=0.0)
        assert h.now == start
        register0 = farm.meter.import_kwh(start)
        await h.run_until(end)
        used = farm.meter.import_kwh(end) - register0
        await h.close()
    return {
        "rigs": sum(mix.values()),
        "period": "month",
        "budget_kwh": kwh,
        "used_kwh": round(used, 1),
        "used_pct": round(100.0 * used / kwh, 3),
        "over_budget": used > kwh,  # the register only rises: over at the end or never
        "poll_s": BUDGET_POLL_S,
    }


def least(
    series: list[tuple[float, float]], since: float, until: float, opt: float
) -> float | None:
    """The least of `series` over [since, until) as a share of `opt` (None: no sample)."""
    chosen = [v for t, v in series if since <= t < until]
    return round(min(chosen) / opt, 4) if chosen and opt else None


def trailing_mean(series: list[tuple[float, float]], window_s: float) -> list[tuple[float, float]]:
    """Each sample's mean over the `window_s` up to it (equal steps: a plain mean)."""
    out: list[tuple[float, float]] = []
    total = 0.0
    start = 0
    for i, (t, v) in enumerate(series):
        total += v
        while series[start][0] <= t - window_s:
            total -= series[start][1]
            start += 1
        out.append((t, total / (i - start + 1)))
    return out


def mean_import(samples: list[Any], since: float, until: float) -> float:
    """Mean true import (kW) over [since, until) of the harness's samples."""
    chosen = [x for x in samples if since <= x.t < until]
    return float(sum(x.import_kw * x.dt for x in chosen) / sum(x.dt for x in chosen))


def sleepers(farm: Farm, t: float) -> list[RigModel]:
    """The models of the rigs not hashing at `t`."""
    return [r.model for r in farm.rigs.values() if true_ths([r], t) <= 0.0]


def wake_bound_s(asleep: list[RigModel], farm: Farm, opt_ths: float) -> float | None:
    """Seconds from waking `asleep` at once (the rest of the farm at the optimum from the
    start) until the farm's hashrate is within 1 % of `opt_ths`, on the simulator's own
    boot and ramp: the least time any controller can take to come back."""
    t0 = START
    rigs = []
    for n, model in enumerate(asleep):
        r = SimRig(f"bound-{n}", model, t0 - 7200.0)
        r.sleep(t0 - 3600.0)
        r.wake(t0)
        rigs.append(r)
    full = sum(true_ths([SimRig("x", m, t0)], t0) for m in asleep)
    for dt in range(0, 3601):
        if opt_ths - full + true_ths(rigs, t0 + dt) >= 0.99 * opt_ths:
            return float(dt)
    return None


# -- through the real drivers over loopback ---------------------------------------------------

REAL_MIX = ("luxos", "whatsminer", "braiins")  # every firmware that throttles and sleeps
REAL_MODELS = {"Antminer S19 Pro": 0.4, "Antminer S19j Pro": 0.2, "Antminer S19 XP": 0.2,
               "Antminer S21": 0.2}  # fmt: skip


async def run_real(
    cap_pct: float, plan: Plan, *, rigs: int = 21, speed: float = 30.0
) -> dict[str, Any]:
    """One cap on a farm served by the firmware simulators on their real ports over
    loopback (LuxOS with its profiles, Whatsminer API v2, Braiins OS REST), the daemon's
    real drivers polling them, on a clock `speed` times faster than the wall clock."""
    import random

    from controller.config import load_config
    from controller.runtime.daemon import Daemon
    from simulators.clock import ScaledClock
    from simulators.site import SimSite

    site: SimSite | None = None
    for _ in range(10):
        block = f"127.{random.randint(100, 250)}.{random.randint(1, 254)}"
        candidate = SimSite(
            rigs=rigs, pdus=3, subnet=f"{block}.0/24", clock=ScaledClock(speed),
            mix=REAL_MIX, models=REAL_MODELS, seed=plan.seed,
        )  # fmt: skip
        try:
            await candidate.start()
        except OSError:  # an address of this block is taken
            continue
        site = candidate
        break
    if site is None:
        raise RuntimeError("no free loopback block for the real-driver run")
    farm = site.farm
    farm.meter.overhead_base_w = OVERHEAD_BASE_W * rigs / 40
    full = flat_out_kw(farm)
    cap_kw = full * cap_pct / 100.0
    tmp = Path(tempfile.mkdtemp(prefix="rigd-bench-real-", dir="/tmp"))
    samples: list[tuple[float, float, float, float]] = []  # t, true import, cap, TH/s
    try:
        control = (
            f"[control]\nmax_import_kw = {full:.3f}\nramp_kw_per_interval = {full:.3f}\n"
            + "".join(f"{k} = {v!r}\n" for k, v in plan.control.items())
        )
        cfg_path = tmp / "rigd.toml"
        cfg_path.write_text(
            site.config_toml(
                broker_url="mqtt://127.0.0.1:9",  # no broker: control needs none
                state_dir=tmp,
                interval_s=plan.interval_s,
                extra=control,
            )
        )
        cfg = load_config(cfg_path, environ={})
        daemon = Daemon(cfg, clock=site.clock, config_path=str(cfg_path))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        clock = site.clock
        for _ in range(600):
            if daemon.controller is not None and daemon.last is not None:
                break
            await asyncio.sleep(0.05)
        ctl = daemon.controller
        assert ctl is not None, "the daemon never completed a cycle"
        t0 = clock.now()
        ctl.set_override(cap_kw, t0 + 10 * 3600, "bench", "bench")
        end = t0 + plan.settle_s + plan.steady_s
        while clock.now() < end:
            t = clock.now()
            samples.append(
                (t, farm.meter.true_power_w(t) / 1000, cap_kw, true_ths(farm.rigs.values(), t))
            )
            await asyncio.sleep(2.0 / speed)
        last = ctl.last_plan
        stop.set()
        await asyncio.wait_for(task, 60)
    finally:
        await site.stop()
    slowest = max(max(r.model.target_change_s, r.model.sleep_s) for r in farm.rigs.values())
    stop_s = slowest + 2 * plan.interval_s + 10.0  # and the real drivers' own round trips
    steady_from = t0 + plan.settle_s
    steady = [x for x in samples if x[0] >= steady_from]
    over = [x for x in samples if x[0] > t0 + stop_s and x[1] > x[2]]
    import_kw = sum(x[1] for x in steady) / len(steady)
    rigd_ths = sum(x[3] for x in steady) / len(steady)
    best = optimum(farm, cap_kw)
    own = optimum(farm, min(cap_kw, import_kw))
    return {
        "fleet": f"real-{rigs}",
        "cap_pct": cap_pct,
        "cap_kw": round(cap_kw, 3),
        "optimum_ths": round(best.ths, 2),
        "rigd_ths": round(rigd_ths, 2),
        "ratio": round(rigd_ths / best.ths, 4),
        "ratio_at_own_import": round(rigd_ths / own.ths, 4),
        "import_over_cap": round(import_kw / cap_kw, 4),
        "over_cap_s_after_stop": round(2.0 * len(over), 1),
        "worst_over_kw_after_stop": round(max((x[1] - x[2] for x in over), default=0.0), 3),
        "commands": sum(r.command_count for r in farm.rigs.values()),
        "steady_commands": None,
        "rigs_flapping": None,
        "dialects": sorted(set(site.dialects.values())),
        "last_plan": None if last is None else last.as_dict(),
    }


COLUMNS = (
    ("fleet", "fleet", "{}"),
    ("cap_pct", "cap %", "{:.0f}"),
    ("optimum_ths", "optimum TH/s", "{:.1f}"),
    ("rigd_ths", "rigd TH/s", "{:.1f}"),
    ("ratio", "ratio", "{:.4f}"),
    ("ratio_at_own_import", "ratio at own import", "{:.4f}"),
    ("import_over_cap", "import / cap", "{:.4f}"),
    ("over_cap_s_after_stop", "s over cap after stop", "{:.0f}"),
    ("worst_over_kw_after_stop", "worst over kW", "{:.2f}"),
    ("commands", "commands", "{:d}"),
    ("steady_commands", "steady-hour commands", "{:d}"),
    ("rigs_flapping", "rigs > 2 in steady hour", "{:d}"),
)


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(COLUMNS, rows, text=frozenset({"fleet"}))


def _secs(v: Any) -> str:
    """A time to a state, or "never" where the run did not reach it."""
    return "never" if v is None else f"{v:.0f} s"


def step_lines(step: Mapping[str, Any]) -> str:
    s = _secs
    return (
        f"step {step['fleet']} 100 -> {step['low_pct']:.0f} -> 100 %: under the cap "
        f"{s(step['time_under_cap_s'])} after the drop ({step['over_cap_s_after_stop']:.0f} s "
        f"over after the stop time); within 1 % of the optimum "
        f"{s(step['time_to_1pct_of_optimum_at_low_s'])} after the drop and "
        f"{s(step['time_to_1pct_of_optimum_after_restore_s'])} after the restore (and "
        f"held for 10 minutes from "
        f"{s(step['time_to_1pct_of_optimum_after_restore_held_10min_s'])}); "
        f"settled at {step['settled_ratio_at_low']:.4f} and "
        f"{step['settled_ratio_after_restore']:.4f} of the optimum, within 1 % of that "
        f"{s(step['time_to_1pct_of_settled_at_low_s'])} and "
        f"{s(step['time_to_1pct_of_settled_after_restore_s'])} after each step; within 1 % "
        f"of the optimum at its own import "
        f"{s(step['time_to_1pct_of_optimum_at_own_import_at_low_s'])} and "
        f"{s(step['time_to_1pct_of_optimum_at_own_import_after_restore_s'])}; the sleepers' "
        f"own wake bounds the restore at {s(step['restore_physical_bound_s'])}; worst "
        f"overshoot during the restore {step['restore_overshoot_kw']:.2f} kW"
        + prepare_line(step)
        + drop_line(step)
    )


def drop_line(step: Mapping[str, Any]) -> str:
    """The drop side both ways, instantaneous and on the 60-s mean of hashrate."""
    if "time_to_1pct_of_optimum_at_low_avg60_s" not in step:
        return ""
    s = _secs

    def r(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (
        f"; after the drop (import {step['import_over_cap_at_low']:.4f} of the cap), within "
        f"1 % of the optimum at the cap and staying there: "
        f"{s(step['time_to_1pct_of_optimum_at_low_s'])} instantaneous, "
        f"{s(step['time_to_1pct_of_optimum_at_low_avg60_s'])} on the 60-s mean; of the "
        f"optimum at its own import {s(step['time_to_1pct_of_optimum_at_own_import_at_low_s'])}"
        f" and {s(step['time_to_1pct_of_optimum_at_own_import_at_low_avg60_s'])}; least "
        f"ratio from 300 s on {r(step['min_ratio_at_low_after_300s'])} "
        f"({r(step['min_ratio_at_low_after_300s_avg60'])} on the 60-s mean); after the "
        f"restore, on the 60-s mean, within 1 % to the end "
        f"{s(step['time_to_1pct_of_optimum_after_restore_avg60_s'])}, least ratio from 300 s "
        f"on {r(step['min_ratio_after_restore_after_300s'])} "
        f"({r(step['min_ratio_after_restore_after_300s_avg60'])})"
    )


def prepare_line(step: Mapping[str, Any]) -> str:
    """What preparing the restore cost before the end and gave after it."""
    if not step.get("prepared"):
        return ""
    line = (
        f"; preparing the restore cost {step['prepare_cost_pct_of_low_phase']:.2f} % of the "
        f"low phase's hashrate x time ({step['prepare_cost_ths_s']:,} TH/s x s)"
    )
    un = step.get("unprepared")
    if un:
        w = un["time_to_1pct_of_optimum_after_restore_held_10min_s"]
        gain = step["after_end_ths_s"] - un["after_end_ths_s"]
        cost = step["prepare_cost_ths_s"] - un["prepare_cost_ths_s"]
        line += (
            f"; unprepared, within 1 % (held 10 minutes) "
            f"{'never' if w is None else f'{w:.0f} s'} after the restore; over "
            f"{PREPARE_WINDOW_S:.0f} s either side of the end, prepared gives "
            f"{gain:+,} TH/s x s after and {-cost:+,} before"
        )
    return line


async def run(plan: Plan) -> dict[str, Any]:
    machine = proc.machine()  # its load as the run starts, not as it ends
    rows = []
    for fleet, mix in plan.fleets.items():
        for cap in plan.caps:
            t = time.monotonic()
            row = await run_cap(fleet, mix, cap, plan)
            rows.append(row)
            if plan.verbose:
                print(
                    f"{fleet} {cap:>3}%: optimum {row['optimum_ths']:.1f} TH/s, rigd "
                    f"{row['rigd_ths']:.1f} ({row['ratio']:.4f}; {row['ratio_at_own_import']:.4f} "
                    f"at its own import {row['import_over_cap']:.4f} of the cap), "
                    f"{row['over_cap_s_after_stop']:.0f} s over, {row['commands']} commands, "
                    f"{row['rigs_flapping']} flapping  [{time.monotonic() - t:.0f} s]",
                    file=sys.stderr,
                )
    for cap in plan.real_caps:
        t = time.monotonic()
        row = await run_real(cap, plan)
        rows.append(row)
        if plan.verbose:
            print(
                f"{row['fleet']} {cap:>3}%: optimum {row['optimum_ths']:.1f} TH/s, rigd "
                f"{row['rigd_ths']:.1f} ({row['ratio']:.4f}; {row['ratio_at_own_import']:.4f} "
                f"at its own import {row['import_over_cap']:.4f} of the cap), "
                f"{row['over_cap_s_after_stop']:.0f} s over, {row['commands']} commands  "
                f"[{time.monotonic() - t:.0f} s]",
                file=sys.stderr,
            )
    step = None
    if plan.step_fleet is not None:
        mix = plan.fleets[plan.step_fleet]
        step = await run_step(plan.step_fleet, mix, plan)
        # The same step with no preparation of the restore: what it gives and costs.
        step["unprepared"] = await run_step(plan.step_fleet, mix, plan, prepare=False)
        if plan.verbose:
            print(step_lines(step), file=sys.stderr)
    budget = None
    if plan.budget:
        t = time.monotonic()
        budget = await run_budget(plan)
        if plan.verbose:
            print(f"{budget_line(budget)}  [{time.monotonic() - t:.0f} s]", file=sys.stderr)
    return {"machine": machine, "rows": rows, "step": step, "budget": budget}


def budget_line(b: Mapping[str, Any]) -> str:
    return (
        f"energy budget, a month on {b['rigs']} rigs: {b['used_pct']:.3f} % used "
        f"({b['used_kwh']:,.0f} of {b['budget_kwh']:,} kWh), "
        + ("OVER the budget" if b["over_budget"] else "never over")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write {machine, rows, step, budget} here")
    ap.add_argument("--fleet", action="append", choices=sorted(FLEETS), help="only this fleet")
    ap.add_argument("--cap", action="append", type=int, help="only this cap, %% of full load")
    ap.add_argument("--no-step", action="store_true", help="skip the 100 -> 40 -> 100 %% step")
    ap.add_argument("--no-budget", action="store_true", help="skip the month's energy budget")
    ap.add_argument("--settle-h", type=float, default=2.0, help="hours before the steady hour")
    ap.add_argument("--steady-h", type=float, default=1.0, help="hours measured (default 1)")
    ap.add_argument("--seed", type=int, default=7, help="rig ripple phases and meter noise")
    ap.add_argument(
        "--real",
        action="append",
        type=int,
        metavar="CAP",
        help="also run this cap through the real drivers over loopback (30x farm time)",
    )
    args = ap.parse_args(argv)
    plan = Plan(settle_s=args.settle_h * 3600.0, steady_s=args.steady_h * 3600.0, seed=args.seed)
    if args.fleet:
        plan.fleets = {f: FLEETS[f] for f in args.fleet}
        if plan.step_fleet not in plan.fleets:
            plan.step_fleet = args.fleet[0]
    if args.cap:
        plan.caps = tuple(args.cap)
    if args.no_step:
        plan.step_fleet = None
    if args.no_budget:
        plan.budget = False
    if args.real:
        plan.real_caps = tuple(args.real)
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    result = asyncio.run(run(plan))
    print(table(result["rows"]))
    if result["step"] is not None:
        print()
        print(step_lines(result["step"]))
    if result["budget"] is not None:
        print()
        print(budget_line(result["budget"]))
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
