"""The planner: who runs, who is throttled, who sleeps, who is switched off. Pure.

Inputs are a frozen view of the farm, the cap, the planner's own memory of what it
commanded, and the time; output is a list of actions. No sockets, no clock: every
rule below is tested by feeding it states.

The policy, in order:

1. Never re-command a rig before its model has had time to show the last command
   in its power (the exceptions: a rig still waking, or still showing a throttle, may be
   slept when the cap needs it; a rig going to sleep is never told again); never touch
   rigs in maintenance,
   pinned, unreachable, or held asleep/off by someone else (rigd only wakes what it put
   to sleep). At most one command per rig per plan.
2. A rig told to sleep that still draws power after `escalate_after_s` has its
   PDU outlet switched off (where mapped and allowed).
3. Import is the meter's reading when fresh, filtered through the import model
   (controller/core/overhead.py: the site's load besides the rigs, a fixed part plus losses
   growing with the rigs' power); otherwise an estimate (rig and outlet readings,
   unreachable rigs at their last known power, plus the non-rig load, plus a safety
   margin); with no trustworthy reading at all, the configured safe state. To it are added
   the changes already in flight (rigs still ramping up, still going to sleep, rigs coming
   up after a boot rigd did not command), each times the losses, so a decision never
   double-counts or forgets one. The target is the cap minus the headroom: the configured
   one, or the meter's measured noise margin where that is larger (four standard
   deviations of the estimate: `sigma` below).
4. Every decision is an allocation by marginal value (controller/core/allocation.py): the
   most hashrate, by each rig's learned curve (controller/core/curves.py), for a budget of
   rig power, across run, throttle and sleep, group priority first.
5. Above the target: shed, to a quarter of the dead band under it (or `REST_SIGMA` sigma,
   if less), by the allocation of what
   the rigs free to shed (settled, outside their minimum on-time) may keep, each only going
   down: throttled rigs end at equal marginal hashrate per kW, a rig sleeps when its
   whole-rig hashrate per kW is the lowest on offer. If that is not enough, the cap comes
   first: rigs inside their minimum on-time or still waking are slept, and a throttle still
   showing may become a sleep; then rigs without API sleep are switched off at their outlet.
   Under a grid deadline, sleep only, least hashrate per kW first. Every saving is counted
   from the power the rig is heading for, so nothing in flight is counted twice. No shed
   when the cap ends, to one the import is under, before the quickest shed could show.
6. Below the target by more than the dead band: fill, to the same rest point, by
   the allocation of the room among the rigs rigd lowered (raising throttled rigs, waking
   slept ones at the power given to them), never adding more than `ramp_kw_per_interval`
   counting rigs still ramping, and never beyond the target; the room counts nothing still
   on its way down as gone. A rig slept less than `min_off_s` ago stays asleep. A wake
   counts from what the rig draws now (nothing, if unknown), so it is never under-counted.
   While a rig rigd woke is still coming up (a restore in progress) the fill goes on to the
   rest point, and a throttled rig still showing its last command keeps its share.
7. Inside the band, when asked (`reoptimize`): a steady farm more than `TRIM_SIGMA` sigma
   under the target is trimmed up (rigs not commanded within `reopt_hold_s` raised to
   `TRIM_TO_SIGMA` under it). And move towards a better plan when it gains at
   least `reopt_gain_pct` of the hashrate beyond what raising alone would give: swaps, only
   from a steady state, no bigger than the ramp lets come back at once, on rigs outside
   their dwell and not commanded within `reopt_hold_s`; their increases wait for their
   decreases to show, so a swap is taken in steps whose decreases lose at most
   `SWAP_DIP` of the farm's hashrate meanwhile (`_bounded_swap`).
8. Fewer commands: a rig whose share of a change is small is held where it is while the
   others cover it, if that costs under 0.1 % of the hashrate.
9. A cap that ends at a known time and lifts then: in its last minutes, slow-to-wake rigs
   are kept running and slow sleepers are swapped in for fast-to-wake rigs, under the same
   target, while that costs at most `PREPARE_LOSS` of the hashrate
   (controller/core/restore.py): when the cap lifts, what is asleep wakes fast and the rest
   only raise their power targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from controller.core.allocation import Allocation, Unit, allocate
from controller.core.caps import Cap
from controller.core.curves import Curve
from controller.core.overhead import MARGIN_SIGMA, ImportModel
from controller.core.restore import PREPARE_LOSS, to_prepare
from drivers.telemetry import RigState

IDLE_W = 20.0  # a sleeping rig's control board and fans
NONRIG_SMOOTHING = 0.2  # weight of a new meter sample in the non-rig load estimate
_EPS_KW = 1e-9  # float slack when comparing sums of kW


@dataclass(frozen=True, slots=True)
class RigTiming:
    """How long a rig model takes to show a command in its power (seconds)."""

    sleep_s: float = 15.0
    wake_s: float = 300.0  # boot plus ramp to full power
    power_change_s: float = 60.0


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """The control settings the planner reads: plain values the runtime takes from the
    config (`[control]`), so the planner never sees the config or anything that changes."""

    max_import_kw: float
    headroom_kw: float = 0.0
    headroom_pct: float = 2.0
    deadband_kw: float = 0.0
    deadband_pct: float = 3.0
    ramp_kw_per_interval: float = 0.0  # 0: 10 % of max_import_kw
    min_on_s: float = 300.0
    min_off_s: float = 300.0
    power_targets: bool = True
    escalate_after_s: float = 120.0
    allow_outlet_off: bool = True
    sleeping_w: float = 100.0
    meter_stale_s: float = 30.0
    estimate_margin_pct: float = 10.0
    safe_state: Literal["sleep", "hold"] = "sleep"
    # Re-optimisation in a steady state: move to a better plan when it gains this share
    # of the farm's hashrate, changing a rig for it at most once per `reopt_hold_s`.
    reopt_gain_pct: float = 0.5
    reopt_hold_s: float = 1800.0
    above_nominal: bool = False  # power targets above a rig's default, to its maximum
    # Before a cap's known end, have the slow-to-wake rigs running (rule 9); off only to
    # measure what that preparation gives (bench.control's step).
    prepare_restore: bool = True


class ActionKind(StrEnum):
    SLEEP = "sleep"
    WAKE = "wake"  # with `watts`: wake at that power target
    SET_POWER = "set_power"  # `watts`; None restores the default (full) power
    OUTLET_OFF = "outlet_off"
    OUTLET_ON = "outlet_on"


@dataclass(frozen=True, slots=True)
class Action:
    rig_id: str
    kind: ActionKind
    reason: str
    watts: float | None = None
    expected_w: float = 0.0  # the rig's power once the action has taken effect

    def as_dict(self) -> dict[str, Any]:
        return {
            "rig": self.rig_id,
            "action": self.kind.value,
            "watts": None if self.watts is None else round(self.watts),
            "reason": self.reason,
        }


class Mode(StrEnum):
    """What rigd last made a rig do (successfully)."""

    RUN = "run"  # full (default) power
    THROTTLE = "throttle"  # a power target below full
    SLEEP = "sleep"
    OFF = "off"  # outlet switched off by rigd


@dataclass(frozen=True, slots=True)
class RigMemory:
    """The planner's memory of one rig; persisted so a restart keeps dwell times."""

    mode: Mode = Mode.RUN
    since: float = 0.0  # when `mode` was entered
    settle_until: float = 0.0  # no re-command before this
    expected_w: float | None = None  # power once settled, for in-flight accounting
    target_w: float | None = None  # throttle target
    failures: int = 0
    retry_at: float = 0.0
    commanded_at: float = 0.0  # when rigd last commanded it (0: never)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "since": self.since,
            "settle_until": self.settle_until,
            "expected_w": self.expected_w,
            "target_w": self.target_w,
            "failures": self.failures,
            "retry_at": self.retry_at,
            "commanded_at": self.commanded_at,
        }

    def shifted(self, dt: float) -> RigMemory:
        """The same memory on a wall clock stepped by `dt` s: what remains of every dwell,
        settle and backoff is what remained before the step. 0 means "never": kept."""

        def sh(t: float) -> float:
            return t + dt if t else t

        return replace(
            self,
            since=sh(self.since),
            settle_until=sh(self.settle_until),
            retry_at=sh(self.retry_at),
            commanded_at=sh(self.commanded_at),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RigMemory:
        return cls(
            Mode(d.get("mode", "run")),
            float(d.get("since", 0.0)),
            float(d.get("settle_until", 0.0)),
            d.get("expected_w"),
            d.get("target_w"),
            int(d.get("failures", 0)),
            float(d.get("retry_at", 0.0)),
            float(d.get("commanded_at", 0.0)),
        )


_NO_MEMORY = RigMemory()  # a rig rigd never commanded (frozen: one instance serves all)


def frozen_memory(memory: Mapping[str, RigMemory]) -> Mapping[str, RigMemory]:
    """A read-only snapshot of `memory` for a `PlanInput`: later changes to the caller's
    dict do not show through it (the entries themselves are frozen)."""
    return MappingProxyType(dict(memory))


@dataclass(frozen=True, slots=True)
class RigInput:
    """One rig as the planner sees it this cycle."""

    id: str
    state: RigState
    power_w: float | None  # current best figure; None if unknown now
    last_known_w: float | None  # for rigs gone silent
    full_w: float  # expected power at its default target
    efficiency_j_th: float | None
    priority: int = 0
    can_sleep: bool = True
    can_power_target: bool = False
    min_w: float | None = None
    max_w: float | None = None
    has_outlet: bool = False  # mapped and switching allowed
    outlet_on: bool | None = None
    timing: RigTiming = field(default_factory=RigTiming)
    maintenance: bool = False
    pinned: bool = False
    busy: bool = False  # an action is still being sent to it
    # Its value: hashrate against power, learned (controller.core.curves). None: the
    # prior through `efficiency_j_th` at `full_w`, or, without that, worth nothing.
    curve: Curve | None = None
    idle_w: float = IDLE_W  # what it draws asleep
    steps: tuple[float, ...] = ()  # the power targets its firmware takes (profiles); ()
    # Power still to come from a rig coming up after a boot rigd did not command (a
    # technician's power-on, a reboot): counted like a command in flight.
    coming_w: float = 0.0


@dataclass(frozen=True, slots=True)
class PlanInput:
    now: float
    cap: Cap
    settings: PlannerSettings
    rigs: tuple[RigInput, ...]
    import_kw: float | None  # the meter's reading, if any
    import_age_s: float | None  # how old that reading is
    # What rigd commanded each rig: a frozen view (`frozen_memory`), never the caller's
    # live dict, so a plan kept for later (rigctl's checks) sees the memory it was made on.
    memory: Mapping[str, RigMemory]
    nonrig_kw: float | None = None  # facility load last seen by the meter (not rigs)
    urgent: bool = False  # a grid order awaits compliance: fastest shedding first
    # The site's load besides the rigs and the meter's noise, learned from the meter
    # (controller.core.overhead); None: the non-rig load is taken as fixed (`nonrig_kw`).
    model: ImportModel | None = None
    # Look for a better plan even inside the dead band (the runtime asks every few
    # cycles: it costs a full allocation), and say what the best plan under the cap gives.
    reoptimize: bool = True


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    target_kw: float
    measured_kw: float | None  # import used for the decision (metered or estimated)
    predicted_kw: float | None  # once everything in flight has settled
    basis: str  # "meter", "estimate" or "safe"
    nonrig_kw: float | None
    note: str = ""
    model: ImportModel | None = None  # the import model after this reading
    headroom_kw: float | None = None  # the headroom in force (configured or from noise)
    # Hashrate (TH/s) the farm will give once this plan has settled, and the most it could
    # give under the cap with every rig free to change (no dwell, nothing in flight).
    hashrate_ths: float | None = None
    attainable_ths: float | None = None

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "target_kw": round(self.target_kw, 3),
            "measured_kw": None if self.measured_kw is None else round(self.measured_kw, 3),
            "predicted_kw": None if self.predicted_kw is None else round(self.predicted_kw, 3),
            "basis": self.basis,
            "note": self.note,
        }
        if self.headroom_kw is not None:
            doc["headroom_kw"] = round(self.headroom_kw, 3)
        if self.hashrate_ths is not None and self.attainable_ths:
            doc["hashrate_ths"] = round(self.hashrate_ths, 1)
            doc["attainable_ths"] = round(self.attainable_ths, 1)
            doc["kept_pct"] = round(100.0 * self.hashrate_ths / self.attainable_ths, 1)
        return doc


_Pred = Callable[[RigInput], bool]
_Add = Callable[[RigInput, ActionKind, str, float | None, float], None]


def _consuming(r: RigInput) -> bool:
    return r.state in (RigState.MINING, RigState.WAKING)


def _current_w(r: RigInput) -> float:
    if r.power_w is not None:
        return r.power_w
    if r.last_known_w is not None:
        return r.last_known_w
    return r.full_w


def _final_w(r: RigInput, mm: RigMemory, now: float) -> float:
    """The rig's power once what is in flight has settled, as the prediction counts it."""
    if mm.expected_w is not None and now < mm.settle_until and r.power_w is not None:
        return mm.expected_w
    return _current_w(r) + r.coming_w


def _going_down(r: RigInput, mm: RigMemory, now: float) -> bool:
    """A command that lowers the rig's power has not had time to show yet."""
    if now >= mm.settle_until:
        return False
    if mm.mode in (Mode.SLEEP, Mode.OFF):
        return True
    return mm.expected_w is not None and r.power_w is not None and mm.expected_w < r.power_w


def settle_s(kind: ActionKind, t: RigTiming) -> float:
    if kind is ActionKind.SLEEP:
        return t.sleep_s
    if kind in (ActionKind.WAKE, ActionKind.OUTLET_ON):
        return t.wake_s
    if kind is ActionKind.SET_POWER:
        return t.power_change_s
    return 5.0  # outlet off: immediate, give the PDU a few seconds to report


# Shed to, and fill to, this share of the dead band under the target: the import then
# rests there, a quarter of the band under the target, and moves again only when it
# leaves the band (above the target, or below it by the whole band).
SHED_TO = 0.25
FILL_TO = 0.25
# With the meter's noise measured, sheds and fills rest closer: `REST_SIGMA` standard
# deviations of the planner's estimate (its error and the rigs' wander: the headroom's
# own sigma) under the target, where that is less than the quarter band. Inside the band
# a steady farm more than `TRIM_SIGMA` of them under the target is topped up (a trim: the
# fine throttle steps close the gap) to `TRIM_TO_SIGMA` under it, at most once per
# re-optimisation pass. A trim starts on a reading low in its noise and the rigs' ripple
# (that is what set it off), so it lands higher on the mean, about `REST_SIGMA` under the
# target; closer, the sheds for the noise that follow undo it (measured on the simulated
# farm: a trim to 4 sigma drew a shed within minutes, most times).
REST_SIGMA = 3.0
TRIM_SIGMA = 6.0
TRIM_TO_SIGMA = 5.0
# A re-optimisation swap lowers rigs before the better ones rise (or boot, for minutes):
# it is taken in steps whose loss meanwhile stays under this share of the farm's hashrate.
SWAP_DIP = 0.004
SWAP_SHRINK = 5  # halvings of a swap's increases tried to fit that
SWAP_STEP_GAIN = 0.25  # each step gains at least this share of `reopt_gain_pct`
# ... and one that cannot fit `SWAP_DIP` loses at most this many times its gain meanwhile
# (the gain lasts at least `reopt_hold_s`, the loss about one wake: minutes; 10 refused a
# swap fleet 1 needs at a 10 % cap in bench.control, 40 let fleet 2 sleep a rig in two).
SWAP_PAYBACK = 20.0
MIN_CHANGE_W = 50.0  # a change of power target smaller than this is not worth a command
REOPT_CUT_W = 200.0  # nor, for re-optimisation alone, a cut smaller than this
HOLD_LOSS = 0.001  # share of hashrate worth giving up for fewer commands
PREPARE_TRIES = 12  # allocations tried to fit the slow rigs of a prepared restore
MAX_HOLDS = 64  # rigs held back that way per plan, at most (each is an allocation)


def _whole(watts: float, r: RigInput) -> float:
    """A power target in whole watts (what firmwares take), rounded down (never more than
    was counted), but never below the rig's minimum."""
    w = float(math.floor(watts + 1e-6))
    return max(w, r.min_w) if r.min_w is not None and watts >= r.min_w - 1e-9 else w


def _curve(r: RigInput) -> Curve | None:
    """The rig's value curve: learned, else the prior through its J/TH at full power."""
    if r.curve is not None:
        return r.curve
    eff = r.efficiency_j_th
    if eff and eff > 0 and math.isfinite(eff) and r.full_w > 0:
        return Curve.through(r.full_w, r.full_w / eff)
    return None


def _ths(r: RigInput, watts: float) -> float:
    c = _curve(r)
    return c.ths(watts) if c is not None and watts > r.idle_w else 0.0


def _merit(r: RigInput, watts: float) -> float:
    """Hashrate per W given up by sleeping a rig drawing `watts` (lowest goes first)."""
    extra = watts - min(r.idle_w, watts)
    return _ths(r, watts) / extra if extra > 0 else math.inf


def plan(inp: PlanInput) -> Plan:
    cfg = inp.settings
    now = inp.now
    cap_kw = inp.cap.kw
    deadband = max(cfg.deadband_kw, cap_kw * cfg.deadband_pct / 100.0)
    ramp_limit = cfg.ramp_kw_per_interval or 0.1 * cfg.max_import_kw
    mem = inp.memory
    actions: list[Action] = []
    touched: set[str] = set()

    def m(r: RigInput) -> RigMemory:
        return mem.get(r.id, _NO_MEMORY)

    def free(r: RigInput) -> bool:
        """May rigd command this rig now at all?"""
        if r.maintenance or r.pinned or r.busy or r.id in touched:
            return False
        if r.state is RigState.UNREACHABLE:
            return False
        mm = m(r)
        return now >= mm.retry_at

    def settled(r: RigInput) -> bool:
        return now >= m(r).settle_until

    def add(
        r: RigInput, kind: ActionKind, reason: str, watts: float | None, expected: float
    ) -> None:
        actions.append(Action(r.id, kind, reason, watts, expected))
        touched.add(r.id)

    # -- 1. confirm and escalate what was commanded ------------------------------------
    for r in inp.rigs:
        mm = m(r)
        if not free(r) or not settled(r):
            continue
        if mm.mode is Mode.SLEEP:
            drawing = r.power_w is not None and r.power_w > cfg.sleeping_w
            # Under a grid deadline a sleep that has not shown by its settle time is not
            # waited for: the outlet is the next fastest way down.
            overdue = inp.urgent or now >= mm.since + cfg.escalate_after_s
            if drawing and overdue and r.has_outlet and cfg.allow_outlet_off and r.outlet_on:
                add(
                    r,
                    ActionKind.OUTLET_OFF,
                    f"still drawing {r.power_w:.0f} W {now - mm.since:.0f} s after sleep",
                    None,
                    0.0,
                )
            elif (
                r.state in (RigState.MINING, RigState.WAKING)
                and r.can_sleep
                and now < mm.since + cfg.escalate_after_s
            ):
                add(r, ActionKind.SLEEP, "sleep did not take: sending it again", None, r.idle_w)

    # -- 2. what is the import, and what will it be ------------------------------------
    fresh = (
        inp.import_kw is not None
        and inp.import_age_s is not None
        and inp.import_age_s <= cfg.meter_stale_s
    )
    rig_sum_kw = sum(_current_w(r) for r in inp.rigs if r.state is not RigState.OFF) / 1000.0
    nonrig = inp.nonrig_kw
    model = inp.model
    quiet = all(
        (now >= m(r).settle_until or m(r).expected_w is None or r.power_w is None)
        and not r.coming_w
        for r in inp.rigs
    )
    # For the import model: also nothing commanded since its previous reading.
    steady = quiet and (
        inp.model is None
        or inp.model.last_ts is None
        or all(mm.commanded_at < inp.model.last_ts for mm in mem.values())
    )
    if fresh:
        assert inp.import_kw is not None
        measured: float = inp.import_kw
        basis = "meter"
        known_kw = sum(r.power_w for r in inp.rigs if r.power_w is not None) / 1000.0
        sample = max(0.0, inp.import_kw - known_kw)
        nonrig = sample if nonrig is None else nonrig + NONRIG_SMOOTHING * (sample - nonrig)
        if model is not None:
            # The meter, filtered through what the rigs' own readings explain.
            model = model.update(inp.import_kw, known_kw, steady, now)
            measured = model.estimate_kw(known_kw)
            nonrig = model.nonrig_kw(known_kw)
    else:
        known = [r for r in inp.rigs if r.power_w is not None or r.state is RigState.OFF]
        coverage = len(known) / len(inp.rigs) if inp.rigs else 1.0
        if coverage < 0.5:
            return _safe_plan(inp, max(0.0, cap_kw - _headroom(inp, None)), actions, touched)
        if model is not None and model.base_kw is not None:
            nonrig = model.nonrig_kw(rig_sum_kw)
        measured = (rig_sum_kw + (nonrig or 0.0)) * (1.0 + cfg.estimate_margin_pct / 100.0)
        basis = "estimate"
    factor = model.factor if model is not None else 1.0
    headroom = _headroom(inp, measured if fresh else None)
    target = max(0.0, cap_kw - headroom)
    # The estimate's own standard deviation (None: not measured, or no fresh reading).
    sigma = (
        model.margin_kw(measured) / MARGIN_SIGMA
        if model is not None and fresh and model.noise_known
        else None
    )
    rest = FILL_TO * deadband if sigma is None else min(FILL_TO * deadband, REST_SIGMA * sigma)

    in_flight = 0.0  # kW of rig power still to come (+) or go (-), not yet settled
    ramping_up = 0.0
    waking = False  # a rig rigd woke is still coming up: a restore in progress
    going_down = 0.0  # kW still to go: what the prediction counts as gone already
    for r in inp.rigs:
        mm = m(r)
        if mm.expected_w is None or settled(r) or r.power_w is None:
            in_flight += r.coming_w / 1000.0  # a boot rigd did not command, still rising
            continue
        delta = (mm.expected_w - r.power_w) / 1000.0
        in_flight += delta
        if delta > 0:
            ramping_up += delta
            waking = waking or r.power_w < 0.5 * mm.expected_w
        else:
            going_down -= delta
    if actions:  # confirmations just planned
        by_id = {r.id: r for r in inp.rigs}
        for a in actions:
            in_flight += (a.expected_w - _current_w(by_id[a.rig_id])) / 1000.0
    predicted = measured + factor * in_flight

    upper = target
    lower = target - deadband
    note = ""
    shedding = predicted > upper
    # The slow rigs to have running when the cap lifts, in its last minutes (rule 9).
    keep = {} if inp.urgent or not cfg.prepare_restore else to_prepare(inp.cap, now, inp.rigs)
    if shedding and not inp.urgent and _lifts_first(inp, predicted):
        # No shed shows before the cap lifts, and the import is under the cap after it:
        # a throttle sent now would only land under the higher cap, and linger there.
        shedding = False
        note = "over target in a cap's last seconds: it lifts before any shed shows"
    elif shedding:
        need = predicted - (upper - min(SHED_TO * deadband, rest))
        shed = _shed(inp, need / factor, free, settled, add)
        predicted -= factor * shed
        if predicted > upper + 1e-6:
            note = f"cannot shed enough: {predicted - upper:.1f} kW over target"
    elif not inp.urgent:
        # Room now, counting what is still to go as not gone yet: an increase must never
        # land before the decrease that makes room for it.
        # The ramp limit is on the import: rig power coming back moves it by `factor`.
        room = min(
            ((target - rest) - (predicted + factor * going_down)) / factor,
            ramp_limit / factor - ramping_up,
        )
        steady_now = quiet and not actions and ramping_up <= _EPS_KW
        # Inside the band, a steady farm resting well under the target is topped up (a
        # trim), once per re-optimisation pass: it never sits at the band's bottom.
        trim = (
            sigma is not None
            and inp.reoptimize
            and steady_now
            and going_down <= _EPS_KW
            and not predicted < lower
            and predicted < target - TRIM_SIGMA * sigma
        )
        # While a restore's wakes come up, it goes on filling to the rest point: a rig
        # that was still showing a shed when it began is raised once that has shown
        # (its share kept for it meanwhile: `_improve`'s `fill`).
        restoring = waking and predicted < target - rest - max(sigma or 0.0, _EPS_KW)
        fill = predicted < lower or trim or restoring
        if fill or inp.reoptimize or keep:
            budget = ((target - rest) - predicted) / factor
            if trim:
                # Sized from a reading low in its noise: see `TRIM_TO_SIGMA`.
                assert sigma is not None
                budget = (target - TRIM_TO_SIGMA * sigma - predicted) / factor
                room = min(room, budget)
            # Swaps only from a steady state, and only as big as the ramp lets their other
            # half come back at once: a swap half done is a loss.
            swap_kw = ramp_limit / factor if steady_now else 0.0
            predicted += factor * _improve(
                inp,
                budget,
                room,
                fill,
                swap_kw,
                going_down > _EPS_KW,
                free,
                settled,
                add,
                keep,
                trim=trim,
            )
    hashrate = attainable = None
    # What the plan gives up (a full allocation): not while shedding, when commands wait.
    if model is not None and inp.reoptimize and not inp.urgent and not shedding:
        hashrate, attainable = _attainment(inp, actions, (cap_kw - predicted) / factor)
    return Plan(
        tuple(actions),
        target,
        measured,
        predicted,
        basis,
        nonrig,
        note,
        model,
        headroom if model is not None else None,
        hashrate,
        attainable,
    )


def _lifts_first(inp: PlanInput, predicted_kw: float) -> bool:
    """Does the cap end, to one the predicted import is under (less the configured
    headroom), before the quickest shed could show (a sleep, the fastest way down)? On
    the benchmark's step a shed for the meter's noise 3 s before a 40 % cap lifted left an
    S19 XP at its minimum for the next half hour."""
    cap = inp.cap
    if cap.ends_at is None or cap.after_kw is None or not inp.rigs:
        return False
    cfg = inp.settings
    quickest = min(r.timing.sleep_s for r in inp.rigs)
    after = cap.after_kw - max(cfg.headroom_kw, cap.after_kw * cfg.headroom_pct / 100.0)
    return inp.now + quickest >= cap.ends_at and predicted_kw <= after


def _headroom(inp: PlanInput, import_kw: float | None) -> float:
    """The configured headroom, or the meter's own noise margin where that is larger."""
    cfg = inp.settings
    cap_kw = inp.cap.kw
    h = max(cfg.headroom_kw, cap_kw * cfg.headroom_pct / 100.0)
    if inp.model is not None and import_kw is not None:
        h = max(h, inp.model.margin_kw(import_kw))
    return h


def _top_w(inp: PlanInput, r: RigInput) -> float:
    """The highest power target rigd may give the rig."""
    if inp.settings.above_nominal and r.max_w is not None:
        return r.max_w
    return r.full_w if r.max_w is None else min(r.full_w, r.max_w)


def _can_throttle(inp: PlanInput, r: RigInput) -> bool:
    return inp.settings.power_targets and r.can_power_target and r.min_w is not None


def _levels(r: RigInput, lo: float, hi: float, *extra: float) -> tuple[float, ...]:
    """The rig's firmware steps inside [lo, hi], with `extra` powers; () if continuous."""
    if not r.steps:
        return ()
    return tuple(sorted({s for s in r.steps if lo - 1e-6 <= s <= hi + 1e-6} | set(extra)))


def _shed(inp: PlanInput, need_kw: float, free: _Pred, settled: _Pred, add: _Add) -> float:
    """Plan commands that take `need_kw` of rig power off; return what they will take."""
    cfg = inp.settings
    now = inp.now
    mem = inp.memory

    def order(rs: list[RigInput]) -> list[RigInput]:
        """Least useful first: lowest priority, then the least hashrate per kW."""
        return sorted(rs, key=lambda r: (r.priority, _merit(r, final(r)), r.id))

    def dwell_ok(r: RigInput) -> bool:
        mm = mem.get(r.id)
        return mm is None or mm.mode is not Mode.RUN or now >= mm.since + cfg.min_on_s

    def final(r: RigInput) -> float:
        return _final_w(r, mem.get(r.id, _NO_MEMORY), now)

    def sleep_save(r: RigInput) -> float:
        return max(0.0, final(r) - r.idle_w) / 1000.0

    def throttle_room(r: RigInput) -> float:
        if not _can_throttle(inp, r) or r.min_w is None:
            return 0.0
        room = (final(r) - r.min_w) / 1000.0
        return room if room > _EPS_KW else 0.0  # float dust is no room: no 0 kW commands

    urgent = inp.urgent

    def may_shed(r: RigInput) -> bool:
        """A rig already on its way down is not told again: its fall is counted in flight.
        When the cap needs it, a slow throttle in progress may still become a fast sleep
        (counted from the throttle's target): the throttle would show too late."""
        mm = mem.get(r.id, _NO_MEMORY)
        if not _going_down(r, mm, now):
            return True
        return mm.mode is Mode.THROTTLE and r.can_sleep

    base = [r for r in inp.rigs if _consuming(r) and free(r) and may_shed(r)]
    first = order([r for r in base if settled(r) and dwell_ok(r)])
    # Collected first, sent last: a throttle may still become an outlet switch-off below.
    planned: dict[str, tuple[RigInput, ActionKind, str, float | None, float]] = {}
    shed = 0.0

    def enough() -> bool:
        return shed >= need_kw - _EPS_KW

    def throttle(r: RigInput, reason: str) -> float:
        room = throttle_room(r)
        assert r.min_w is not None  # room > 0
        take = min(room, need_kw - shed)
        # All the room: exactly the minimum, not a float's width off it.
        watts = r.min_w if take >= room else final(r) - take * 1000.0
        if r.steps and take < room:  # the highest firmware step that sheds enough
            fits = [x for x in r.steps if r.min_w <= x <= watts]
            watts = max(fits) if fits else r.min_w
        # Never a target above the rig's range (the firmware refuses it): a rig drawing more
        # than its maximum sheds the excess too.
        watts = min(watts, r.full_w if r.max_w is None else r.max_w)
        take = (final(r) - watts) / 1000.0
        planned[r.id] = (r, ActionKind.SET_POWER, f"{reason} {take:.2f} kW", watts, watts)
        return take

    if urgent:
        # Under a grid deadline, sleep only: a power target takes minutes to show, a sleep
        # seconds. The least hashrate per kW goes first.
        for r in first:
            if enough():
                break
            if r.can_sleep and sleep_save(r) > 0:
                reason = f"over target: shed {need_kw:.1f} kW, least hashrate per kW first"
                planned[r.id] = (r, ActionKind.SLEEP, reason, None, r.idle_w)
                shed += sleep_save(r)
    else:
        shed += _shed_by_value(inp, first, need_kw, final, planned)
    # Still over: the cap comes first. Sleep rigs inside their on-time or still waking
    # (throttle those that cannot sleep).
    for r in order([r for r in base if r.id not in planned]):
        if enough():
            break
        if r.can_sleep and sleep_save(r) > 0:
            planned[r.id] = (r, ActionKind.SLEEP, "over target: cap before dwell", None, r.idle_w)
            shed += sleep_save(r)
        elif not urgent and not r.can_sleep and throttle_room(r) > 0:
            shed += throttle(r, "over target: cap before dwell, throttle to shed")
    if not enough() and cfg.allow_outlet_off:
        # Last: rigs with no sleep through their API, at their outlet (a throttle planned
        # above becomes the switch-off: one command per rig).
        hard = order([r for r in base if not r.can_sleep and r.has_outlet and r.outlet_on])
        for r in hard:
            if enough():
                break
            prior = planned.get(r.id)
            counted = 0.0 if prior is None else (final(r) - prior[4]) / 1000.0
            reason = "over target: no API control, switching outlet off"
            planned[r.id] = (r, ActionKind.OUTLET_OFF, reason, None, 0.0)
            shed += final(r) / 1000.0 - counted
    if urgent:
        # Last resort under a deadline: throttle what can neither sleep nor be switched off.
        for r in order([r for r in base if r.id not in planned]):
            if enough():
                break
            if throttle_room(r) > 0:
                shed += throttle(r, "over target: grid deadline, throttle what is left")
    for r, kind, reason, watts, expected in planned.values():
        add(r, kind, reason, watts, expected)
    return shed


_Planned = dict[str, tuple[RigInput, ActionKind, str, float | None, float]]


def _shed_by_value(
    inp: PlanInput,
    rigs: list[RigInput],
    need_kw: float,
    final: Callable[[RigInput], float],
    planned: _Planned,
) -> float:
    """Take `need_kw` off `rigs` (free, settled, outside their dwell) losing the least
    hashrate: the allocation of what they may keep, where each may only go down. Changes
    smaller than `MIN_CHANGE_W` are not worth a command: those rigs keep their power and
    the others cover it."""
    units: dict[str, Unit] = {}
    rig_of: dict[str, RigInput] = {}
    for r in rigs:
        f = final(r)
        may_stop = r.can_sleep and f > r.idle_w
        throttle = _can_throttle(inp, r) and r.min_w is not None and f > r.min_w
        lo = r.min_w if throttle and r.min_w is not None else f
        units[r.id] = Unit(
            r.id,
            _curve(r),
            f,
            True,
            lo,
            f,
            _levels(r, lo, min(f, _top_w(inp, r)), f),
            min(r.idle_w, f),
            True,
            may_stop,
            r.priority,
        )
        rig_of[r.id] = r
    if not units:
        return 0.0
    total = sum(u.now_w for u in units.values())
    budget = total - need_kw * 1000.0
    alloc = allocate(units.values(), budget)
    units, alloc = _fewer_commands(units, alloc, budget)
    shed_w = 0.0
    for uid, u in units.items():
        r = rig_of[uid]
        goal = alloc.watts[uid]
        if uid not in alloc.running:
            reason = f"over target: shed {need_kw:.1f} kW, least hashrate per kW sleeps"
            planned[uid] = (r, ActionKind.SLEEP, reason, None, u.stop_w)
            shed_w += u.now_w - u.stop_w
        elif goal < u.now_w - 1e-6:
            watts = _whole(goal if r.min_w is None else max(r.min_w, goal), r)
            # Never a target above the rig's range (the firmware refuses it).
            watts = min(watts, r.full_w if r.max_w is None else r.max_w)
            if watts >= u.now_w - 1e-6:
                continue
            take = (u.now_w - watts) / 1000.0
            reason = f"over target: throttle to shed {take:.2f} kW"
            planned[uid] = (r, ActionKind.SET_POWER, reason, watts, watts)
            shed_w += u.now_w - watts
    return shed_w / 1000.0


def _fewer_commands(
    units: dict[str, Unit], alloc: Allocation, budget: float
) -> tuple[dict[str, Unit], Allocation]:
    """Equal marginal values spread a change over every rig that can take it: many small
    commands. Hold the rig with the smallest change where it is and let the others cover
    it, one rig at a time, while that costs next to nothing (`HOLD_LOSS` of the
    hashrate in all): a small shed is then a few throttles, never a sleep, and a change
    under `MIN_CHANGE_W` is not sent at all."""
    floor = alloc.ths * (1.0 - HOLD_LOSS)
    for _ in range(min(len(units), MAX_HOLDS)):
        moved = sorted(
            (abs(alloc.watts[uid] - u.now_w), uid)
            for uid, u in units.items()
            if uid in alloc.running and u.running and abs(alloc.watts[uid] - u.now_w) > 1e-6
        )
        if not moved or not alloc.feasible:
            break
        uid = moved[0][1]
        u = units[uid]
        held = {**units, uid: replace(u, lo=u.now_w, hi=u.now_w, steps=(), may_stop=False)}
        again = allocate(held.values(), budget)
        if not again.feasible or again.ths < floor:
            break  # that change is needed, however small
        units, alloc = held, again
    return units, alloc


def _improve(
    inp: PlanInput,
    budget_kw: float,
    room_kw: float,
    fill: bool,
    swap_kw: float,
    waiting: bool,
    free: _Pred,
    settled: _Pred,
    add: _Add,
    keep: Mapping[str, float] | None = None,
    *,
    trim: bool = False,
) -> float:
    """Under the target: move towards the best plan for the target, and return the rig
    power (kW) the commands add (less what they take off).

    The best plan is the allocation of `budget_kw` more than the rigs will draw (possibly
    negative) among the rigs rigd may change now. Increases (raising a throttled rig,
    waking one it slept) are taken best value per kW first, within `room_kw`, the room
    there is now without counting anything still on its way down. Decreases (a throttle
    or sleep that makes room for a better rig: a swap) are made only when the better plan
    gains at least `reopt_gain_pct` of the hashrate, and only on rigs not commanded within
    `reopt_hold_s`: the freed room is used in later cycles, once the decrease shows.
    `fill` (below the dead band): increases even when the gain is smaller. `swap_kw`: the
    most a swap may bring back (0: no swap now). `waiting`: decreases are still on their
    way down, so room is coming: no partial increase now (it would take what is coming
    piecemeal, and the rest would go to the wrong rigs). `keep`: slow-to-wake rigs (id ->
    wake seconds) to have running when the cap lifts (`_prepared`): the swap that brings
    them in is made even at a loss, within `PREPARE_LOSS`. `trim`: a top-up inside the band
    (`fill` set for it): it raises only rigs not commanded within `reopt_hold_s`, so a rig
    lowered by a shed for the meter's noise is not raised again straight after, and no rig
    is topped up more than twice an hour."""
    cfg = inp.settings
    now = inp.now
    mem = inp.memory
    units: dict[str, Unit] = {}
    rig_of: dict[str, RigInput] = {}
    fixed_ths = 0.0
    reserved: set[str] = set()  # rigs whose share of a fill is kept until they have settled
    for r in inp.rigs:
        mm = mem.get(r.id, _NO_MEMORY)
        f = _final_w(r, mm, now)
        if fill and not trim and _reserve(inp, r, mm, f, free(r) and not settled(r)):
            top = _top_w(inp, r)
            units[r.id] = Unit(
                r.id, _curve(r), f, True, f, top, _levels(r, f, top, f),
                min(r.idle_w, f), True, False, r.priority,
            )  # fmt: skip
            rig_of[r.id] = r
            reserved.add(r.id)
            continue
        u = _unit(inp, r, mm, f, free(r) and settled(r))
        if u is not None and trim and now < mm.commanded_at + cfg.reopt_hold_s:
            u = None if not u.running else replace(u, hi=u.now_w, steps=_below(u.steps, u.now_w))
        if u is None:
            if _consuming(r):
                fixed_ths += _ths(r, f)
            continue
        units[r.id] = u
        rig_of[r.id] = r
    if not units:
        return 0.0
    if not any(u.hi > u.now_w + MIN_CHANGE_W or not u.running for u in units.values()):
        # Nothing can rise: there is nothing to fill with, and a better plan could only
        # trade one rig for another, with nothing that may rise to take the other side.
        # (The cheap exit for a farm under no cap.)
        return 0.0
    now_ths = sum(u.ths(u.now_w) for u in units.values() if u.running)
    total = sum(u.now_w for u in units.values())
    budget = total + budget_kw * 1000.0
    prepare = False
    if keep:
        units, prepare = _prepared(units, keep, budget)
    alloc = allocate(units.values(), budget)
    if not alloc.feasible:
        return 0.0
    # What raising and waking alone would give: a swap (lowering one rig for another) is
    # worth it only for what it adds beyond that. (Room made by a swap still in flight
    # is counted as made: the swap is not made again while its other half waits.)
    rising_units = {
        uid: replace(u, lo=u.now_w, steps=_above(u.steps, u.now_w), may_stop=False)
        if u.running
        else u
        for uid, u in units.items()
    }
    rising = allocate(rising_units.values(), budget)
    rising_ths = rising.ths if rising.feasible else now_ths
    threshold = cfg.reopt_gain_pct / 100.0 * (now_ths + fixed_ths)
    gain = alloc.ths - rising_ths

    def brings_back(a: Allocation) -> float:
        return sum(
            max(0.0, a.watts[uid] - (u.now_w if u.running else 0.0))
            for uid, u in units.items()
            if uid in a.running
        )

    # Preparing a restore, a swap is worth its (bounded) loss when the slow sleepers
    # cannot come in by raising and waking alone.
    wanted = (gain >= threshold and gain > 0) or (prepare and not rising.feasible)
    worth = wanted and brings_back(alloc) <= swap_kw * 1000.0
    for _ in range(4 if worth else 0):
        # A small cut is not worth a command of its own: hold those rigs and plan again,
        # unless the swap needs them.
        small = [
            uid
            for uid, u in units.items()
            if u.running and uid in alloc.running and 0 < u.now_w - alloc.watts[uid] < REOPT_CUT_W
        ]
        if not small:
            break
        held = dict(units)
        for uid in small:
            u = held[uid]
            held[uid] = replace(u, lo=u.now_w, steps=_above(u.steps, u.now_w), may_stop=False)
        again = allocate(held.values(), budget)
        if not (
            again.feasible
            and again.ths - rising_ths >= threshold
            and brings_back(again) <= swap_kw * 1000.0
        ):
            break
        units, alloc, gain = held, again, again.ths - rising_ths
    bounded = worth and not prepare
    if bounded:
        # (`_fewer_commands` applied within: the bound is on the commands sent.)
        units, alloc, worth = _bounded_swap(
            units, alloc, budget, rising_ths, now_ths + fixed_ths, threshold * SWAP_STEP_GAIN
        )
        gain = alloc.ths - rising_ths
    if not worth:
        if not (fill or prepare) or not rising.feasible:
            return 0.0
        # Raising alone, with units that may only rise: `_fewer_commands` re-plans on
        # them, and on the free units it would plan a swap (one never sent).
        units, alloc = rising_units, rising
    if not (bounded and worth):
        units, alloc = _fewer_commands(units, alloc, budget)
    ups: list[tuple[float, Unit, float]] = []
    removed = 0.0  # W the swaps' decreases take off, once they show
    for uid, u in units.items():
        goal = alloc.watts[uid]
        r = rig_of[uid]
        mm = mem.get(uid, _NO_MEMORY)
        if uid in alloc.running and (not u.running or goal > u.now_w + MIN_CHANGE_W):
            base = u.now_w if u.running else 0.0
            per_w = (u.ths(goal) - u.ths(u.now_w) * u.running) / max(goal - base, 1e-9)
            ups.append((per_w, u, goal))
        elif worth and now >= mm.commanded_at + cfg.reopt_hold_s and u.running:
            if uid not in alloc.running:
                reason = (
                    "preparing the restore: sleep to make room for a slow-to-wake rig"
                    if prepare
                    else f"re-optimising: sleep for +{gain:.0f} TH/s elsewhere"
                )
                add(r, ActionKind.SLEEP, reason, None, u.stop_w)
                removed += u.now_w - u.stop_w
            elif goal < u.now_w - MIN_CHANGE_W:
                reason = (
                    "preparing the restore: throttle to make room for a slow-to-wake rig"
                    if prepare
                    else f"re-optimising: throttle for +{gain:.0f} TH/s elsewhere"
                )
                cut = _whole(goal, r)
                add(r, ActionKind.SET_POWER, reason, cut, cut)
                removed += u.now_w - cut
    added = 0.0
    for _, u, goal in sorted(ups, key=lambda x: (-x[1].priority, -x[0], x[1].id)):
        if u.id in reserved:
            continue  # raised once its shed has shown (the room is kept for it)
        left = room_kw * 1000.0 - added
        r = rig_of[u.id]
        mm = mem.get(u.id, _NO_MEMORY)
        if u.running:
            want = min(goal, u.now_w + left)
            if u.steps:
                fits = [s for s in u.steps if s <= want + 1e-6]
                want = max(fits) if fits else u.now_w
            if want < goal - 1e-6 and (
                waiting or want - u.now_w < max(MIN_CHANGE_W, (goal - u.now_w) / 2)
            ):
                continue  # a sliver of the way now, and again and again: wait for room
            if r.min_w is not None and want < r.min_w:  # below its range: to its minimum
                if r.min_w > u.now_w + left + 1e-6:
                    continue
                want = r.min_w
            if want - u.now_w < 1.0:
                continue
            full = abs(want - r.full_w) <= 1.0
            want = r.full_w if full else _whole(want, r)
            expected = want
            add(r, ActionKind.SET_POWER, "under target: raise power target", _cmd(full, want), want)
            added += expected - u.now_w
            continue
        # Waking: counted from what it draws now (nothing, if unknown), never under-counted.
        base_w = r.power_w if r.power_w is not None else 0.0
        want = goal
        if want - base_w > left:
            if not u.lo < u.hi or waiting:
                continue  # all or nothing, and it does not fit (or room is coming)
            want = base_w + left
            if u.steps:
                fits = [s for s in u.steps if s <= want + 1e-6]
                want = max(fits) if fits else 0.0
            if want < u.lo - 1e-6:
                continue
        full = abs(want - r.full_w) <= 1.0
        want = r.full_w if full else _whole(want, r)
        expected = want
        if mm.mode is Mode.OFF:
            if not r.has_outlet or abs(expected - r.full_w) > 1.0:
                continue
            add(r, ActionKind.OUTLET_ON, "under target: power back on", None, r.full_w)
        elif full:
            add(
                r, ActionKind.WAKE, "under target: wake, most hashrate per kW first", None, r.full_w
            )
        else:
            reason = "under target: wake at a power target that fits"
            add(r, ActionKind.WAKE, reason, _cmd(full, want), want)
        added += expected - base_w
    return (added - removed) / 1000.0


def _swap_dip(units: Mapping[str, Unit], alloc: Allocation) -> float:
    """Hashrate (TH/s) a swap's decreases take off before its increases show."""
    dip = 0.0
    for uid, u in units.items():
        if not u.running:
            continue
        if uid not in alloc.running:
            dip += u.ths(u.now_w)
        elif alloc.watts[uid] < u.now_w:
            dip += u.ths(u.now_w) - u.ths(alloc.watts[uid])
    return dip


def _bounded_swap(
    units: dict[str, Unit],
    alloc: Allocation,
    budget: float,
    rising_ths: float,
    farm_ths: float,
    min_gain: float,
) -> tuple[dict[str, Unit], Allocation, bool]:
    """A re-optimisation swap whose decreases lose at most `SWAP_DIP` of the farm's
    hashrate while its increases wait to show (a woken rig boots for minutes): the
    increases are cut to a share of their way (`SWAP_SHRINK` tries, halving it) and the
    allocation planned again, so the swap is taken in steps, one per pass, each of them a
    gain. A sleep cannot be split, so the steps are planned with every running rig kept
    running (throttled, not slept: a sleep gives up the rig's whole hashrate at once); the
    rig a better one replaces is slept in a later pass, once that one shows. Where no step
    fits the bound, the step that loses least meanwhile is taken, if that loss is at most
    `SWAP_PAYBACK` times what it gains (else no swap now: on a small farm a sleep can give
    up a fifth of its hashrate for minutes). A step gains at least `min_gain` (a share of
    the re-optimisation's threshold): smaller ones are churn.
    The last bool: a step was found (else no swap now)."""
    bound = SWAP_DIP * farm_ths
    # Measured on the commands it will send: fewer, larger cuts (`_fewer_commands`).
    best = _fewer_commands(units, alloc, budget)
    least = _swap_dip(*best)
    if least <= bound:
        return best[0], best[1], True
    gain = best[1].ths - rising_ths
    share = 1.0
    for _ in range(SWAP_SHRINK + 1):
        limited = dict(units)
        for uid, u in units.items():
            base = u.now_w if u.running else 0.0
            goal = alloc.watts[uid] if uid in alloc.running else 0.0
            if u.running and u.may_stop:
                u = replace(u, may_stop=False)
            if uid in alloc.running and goal > base + MIN_CHANGE_W and share < 1.0:
                hi = max(base + share * (goal - base), u.lo if not u.running else base)
                u = replace(u, hi=hi, steps=tuple(x for x in u.steps if x <= hi + 1e-6))
            limited[uid] = u
        share /= 2.0
        again = allocate(limited.values(), budget)
        if not again.feasible or again.ths < rising_ths + min_gain:
            continue  # not enough gain in a step this size without a sleep
        step = _fewer_commands(limited, again, budget)
        if step[1].ths < rising_ths + min_gain:
            continue
        dip = _swap_dip(*step)
        if dip <= bound:
            return step[0], step[1], True
        if dip < least:
            least, best, gain = dip, step, step[1].ths - rising_ths
    return best[0], best[1], least <= SWAP_PAYBACK * gain


def _reserve(inp: PlanInput, r: RigInput, mm: RigMemory, f: float, waiting: bool) -> bool:
    """A rig rigd throttled, free but still showing that throttle (`waiting`), that a fill
    would raise: the fill keeps its share for it rather than give it to worse rigs."""
    return (
        waiting
        and mm.mode is Mode.THROTTLE
        and r.id in inp.memory
        and _can_throttle(inp, r)
        and r.min_w is not None
        and _consuming(r)
        and _top_w(inp, r) > f + MIN_CHANGE_W
    )


def _prepared(
    units: dict[str, Unit], keep: Mapping[str, float], budget: float
) -> tuple[dict[str, Unit], bool]:
    """`units` with the slow rigs of `keep` held running and, slowest first, as many of the
    slow sleepers brought to run as the allocation can hold while it keeps 1 -
    `PREPARE_LOSS` of the free allocation's hashrate; and whether any sleeper is among
    them. Nothing is forced if even the running ones cost more than that."""
    free = allocate(units.values(), budget)
    if not free.feasible or not keep:
        return units, False
    floor = free.ths * (1.0 - PREPARE_LOSS) - 1e-9
    ours = [uid for uid in keep if uid in units and units[uid].may_run]
    running = [uid for uid in ours if units[uid].running]
    asleep = sorted(
        (uid for uid in ours if not units[uid].running and keep[uid] > 0),
        key=lambda u: (-keep[u], u),
    )
    n = len(asleep)
    for _ in range(PREPARE_TRIES):  # each try is an allocation: a few, even at 10,000 rigs
        chosen = running + asleep[:n]
        trial = {**units, **{uid: replace(units[uid], may_stop=False) for uid in chosen}}
        a = allocate(trial.values(), budget)
        if a.feasible and a.ths >= floor:
            return trial, n > 0
        if n == 0:
            break
        n = n - 1 if n <= 8 else n // 2
    return units, False


def _cmd(full: bool, watts: float) -> float | None:
    """The power target to send: None (the rig's default) for its full power."""
    return None if full else watts


def _below(steps: tuple[float, ...], w: float) -> tuple[float, ...]:
    """Steps at or below `w`, with `w` itself: a unit that may not rise."""
    return tuple(sorted({x for x in steps if x < w} | {w})) if steps else ()


def _above(steps: tuple[float, ...], w: float) -> tuple[float, ...]:
    """Steps at or above `w`, with `w` itself: a unit that may only rise."""
    return tuple(sorted({x for x in steps if x > w} | {w})) if steps else ()


def _unit(inp: PlanInput, r: RigInput, mm: RigMemory, f: float, changeable: bool) -> Unit | None:
    """The rig as the allocation may change it now; None if it must stay as it is."""
    cfg = inp.settings
    now = inp.now
    if not changeable:
        return None
    if _consuming(r):
        if _going_down(r, mm, now):
            return None
        throttle = _can_throttle(inp, r) and r.min_w is not None
        # Raised only where rigd lowered it (or above its default, where allowed).
        top = _top_w(inp, r)
        if (mm.mode is Mode.THROTTLE and r.id in inp.memory) or (
            cfg.above_nominal and throttle and f >= r.full_w - 1.0
        ):
            hi = max(f, top)
        else:
            hi = f
        # Lowered (a swap) only outside its dwell and the re-optimisation hold.
        optional = now >= mm.commanded_at + cfg.reopt_hold_s and (
            mm.mode is not Mode.RUN or now >= mm.since + cfg.min_on_s
        )
        lo = r.min_w if throttle and optional and r.min_w is not None and r.min_w < f else f
        if not throttle and hi > f:  # no power targets: back to full power, or not at all
            steps: tuple[float, ...] = (f, r.full_w)
            lo = f
        else:
            steps = _levels(r, lo, hi, f) if throttle else ()
        if not throttle:
            steps = steps if hi > f else ()
        return Unit(
            r.id,
            _curve(r),
            f,
            True,
            lo,
            hi,
            steps,
            min(r.idle_w, f),
            True,
            optional and r.can_sleep and f > r.idle_w,
            r.priority,
        )
    # Asleep or off: woken only if rigd put it there, and no sooner than `min_off_s`.
    if r.id not in inp.memory or mm.mode not in (Mode.SLEEP, Mode.OFF):
        return None
    if now < mm.since + cfg.min_off_s:
        return None
    if mm.mode is Mode.OFF and not r.has_outlet:
        return None
    throttle = _can_throttle(inp, r) and r.min_w is not None and mm.mode is Mode.SLEEP
    top = r.full_w
    lo = r.min_w if throttle and r.min_w is not None and r.min_w < top else top
    return Unit(
        r.id,
        _curve(r),
        f,
        False,
        lo,
        top,
        _levels(r, lo, top, top) if throttle else (),
        f,
        True,
        True,
        r.priority,
    )


def _attainment(
    inp: PlanInput, actions: list[Action], room_kw: float
) -> tuple[float | None, float | None]:
    """(TH/s once this plan has settled, the most the rigs could give under the cap with
    no dwell, hold or command in flight in the way), both from the learned curves."""
    by_action = {a.rig_id: a for a in actions}
    after_ths = 0.0
    units: list[Unit] = []
    total = 0.0
    for r in inp.rigs:
        mm = inp.memory.get(r.id, _NO_MEMORY)
        f = _final_w(r, mm, inp.now)
        a = by_action.get(r.id)
        w = f if a is None else a.expected_w
        running = (_consuming(r) and (a is None or a.kind in (ActionKind.SET_POWER,))) or (
            a is not None and a.kind in (ActionKind.WAKE, ActionKind.OUTLET_ON)
        )
        if running:
            after_ths += _ths(r, w)
        total += w
        held = r.maintenance or r.pinned or r.state is RigState.UNREACHABLE
        ours = _consuming(r) or (r.id in inp.memory and mm.mode in (Mode.SLEEP, Mode.OFF))
        if held or not ours:
            units.append(
                Unit(
                    r.id,
                    _curve(r),
                    f,
                    _consuming(r),
                    f,
                    f,
                    (),
                    f,
                    _consuming(r),
                    not _consuming(r),
                    r.priority,
                )
            )
            continue
        throttle = _can_throttle(inp, r) and r.min_w is not None
        top = _top_w(inp, r)
        lo = r.min_w if throttle and r.min_w is not None and r.min_w < top else top
        units.append(
            Unit(
                r.id,
                _curve(r),
                f,
                _consuming(r),
                lo,
                top,
                _levels(r, lo, top, top) if throttle else (),
                min(r.idle_w, f) if _consuming(r) else f,
                True,
                r.can_sleep or not _consuming(r),
                r.priority,
            )
        )
    if room_kw >= 0 and all(
        u.now_w >= u.hi - MIN_CHANGE_W and (u.running or not u.may_run) for u in units
    ):
        return after_ths, after_ths  # every rig at its top, under the cap: nothing to gain
    best = allocate(units, total + room_kw * 1000.0)
    if not best.feasible or best.ths <= 0:
        return after_ths, None
    return after_ths, max(best.ths, after_ths)


def _safe_plan(inp: PlanInput, target: float, actions: list[Action], touched: set[str]) -> Plan:
    """No meter and too few rig readings to estimate import: the configured safe state."""
    cfg = inp.settings
    if cfg.safe_state == "sleep":
        for r in inp.rigs:
            if r.id in touched or r.maintenance or r.pinned or r.busy or not _consuming(r):
                continue
            if _going_down(r, inp.memory.get(r.id, RigMemory()), inp.now):
                continue  # already told, not yet shown
            if r.can_sleep and inp.now >= inp.memory.get(r.id, RigMemory()).retry_at:
                actions.append(
                    Action(
                        r.id, ActionKind.SLEEP, "no trustworthy reading: safe state", None, r.idle_w
                    )
                )
                touched.add(r.id)
    note = f"safe state: {cfg.safe_state}"
    return Plan(tuple(actions), target, None, None, "safe", inp.nonrig_kw, note, inp.model)


def failed(mm: RigMemory, now: float) -> RigMemory:
    """Memory after a failed command: unchanged mode, retried after a growing backoff."""
    backoff = min(300.0, 10.0 * 2**mm.failures)
    return replace(mm, failures=mm.failures + 1, retry_at=now + backoff)


def remember(
    memory: Mapping[str, RigMemory],
    action: Action,
    ok: bool,
    now: float,
    timing: RigTiming,
    full_w: float,
) -> dict[str, RigMemory]:
    """The planner's memory after an action was sent (`ok`) or failed."""
    out = dict(memory)
    out[action.rig_id] = remembered(
        memory.get(action.rig_id, RigMemory()), action, ok, now, timing, full_w
    )
    return out


def remembered(
    mm: RigMemory,
    action: Action,
    ok: bool,
    now: float,
    timing: RigTiming,
    full_w: float,
) -> RigMemory:
    """One rig's memory `mm` after `action` was sent (`ok`) or failed: `remember` for a
    caller that updates many rigs at once (a copy of the whole memory per rig would make
    a curtailment of thousands of rigs quadratic)."""
    if not ok:
        return failed(mm, now)
    kind = action.kind
    settle = now + settle_s(kind, timing)
    if kind is ActionKind.SLEEP:
        mode, target = Mode.SLEEP, None
    elif kind is ActionKind.OUTLET_OFF:
        mode, target = Mode.OFF, None
    elif kind in (ActionKind.WAKE, ActionKind.OUTLET_ON):
        mode = Mode.RUN if action.watts is None else Mode.THROTTLE
        target = action.watts
    else:  # SET_POWER
        # Within a watt of its default is its default; above it (where allowed) is a
        # power target like any other.
        full = action.watts is None or abs(action.watts - full_w) <= 1.0
        mode, target = (Mode.RUN, None) if full else (Mode.THROTTLE, action.watts)
    since = mm.since if mode is mm.mode else now
    return RigMemory(mode, since, settle, action.expected_w, target, 0, 0.0, now)
