"""The planner: who runs, who is throttled, who sleeps, who is switched off. Pure.

Inputs are a frozen view of the farm, the cap, the planner's own memory of what it
commanded, and the time; output is a list of actions. No sockets, no clock: every
rule below is tested by feeding it states.

The policy, in order:

1. Never re-command a rig before its model has had time to show the last command
   in its power (the one exception: a rig still waking may be slept when the cap needs
   it; a rig still going down is never told again); never touch rigs in maintenance,
   pinned, unreachable, or held asleep/off by someone else (rigd only wakes what it put
   to sleep). At most one command per rig per plan.
2. A rig told to sleep that still draws power after `escalate_after_s` has its
   PDU outlet switched off (where mapped and allowed).
3. Import is the meter's reading when fresh; otherwise an estimate (rig and outlet
   readings, unreachable rigs at their last known power, plus the non-rig load last
   seen by the meter, plus a safety margin); with no trustworthy reading at all, the
   configured safe state. To it are added the changes already in flight (rigs still
   ramping up, still going to sleep), so a decision never double-counts or forgets one.
4. Above the target (cap minus headroom): shed. Least useful rigs go first (lowest
   group priority, then worst J/TH). Throttling keeps more hashrate per kW shed than
   sleeping (hashrate falls slower than power), so: sleep the worst rigs only until
   throttling the rest can cover what remains, then throttle, worst first. If that is
   not enough, rigs inside their minimum on-time or still waking are slept too, or
   throttled where they cannot sleep (the cap comes first), then rigs without API sleep
   are switched off at their outlet. Every saving is counted from the power the rig is
   heading for (what the prediction counts), so nothing in flight is counted twice.
5. Below the target by more than the deadband: restore, best rigs first (highest
   priority, then best J/TH), raising throttled rigs and waking slept ones, never
   adding more than `ramp_kw_per_interval` counting rigs still ramping, and never
   beyond the target. A rig slept less than `min_off_s` ago stays asleep. A wake counts
   from what the rig draws now (nothing, if unknown), so it is never under-counted.
   Power targets stay inside the rig's range; without power targets (in config or
   firmware), a throttled rig goes straight back to full power once that fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from controller.core.caps import Cap
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "since": self.since,
            "settle_until": self.settle_until,
            "expected_w": self.expected_w,
            "target_w": self.target_w,
            "failures": self.failures,
            "retry_at": self.retry_at,
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


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    target_kw: float
    measured_kw: float | None  # import used for the decision (metered or estimated)
    predicted_kw: float | None  # once everything in flight has settled
    basis: str  # "meter", "estimate" or "safe"
    nonrig_kw: float | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_kw": round(self.target_kw, 3),
            "measured_kw": None if self.measured_kw is None else round(self.measured_kw, 3),
            "predicted_kw": None if self.predicted_kw is None else round(self.predicted_kw, 3),
            "basis": self.basis,
            "note": self.note,
        }


_Pred = Callable[[RigInput], bool]
_Add = Callable[[RigInput, ActionKind, str, float | None, float], None]


def _efficiency(r: RigInput) -> float:
    """J/TH, with unknown treated as the worst: we would rather shed what we cannot judge."""
    return r.efficiency_j_th if r.efficiency_j_th and r.efficiency_j_th > 0 else math.inf


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
    return _current_w(r)


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


def plan(inp: PlanInput) -> Plan:
    cfg = inp.settings
    now = inp.now
    cap_kw = inp.cap.kw
    headroom = max(cfg.headroom_kw, cap_kw * cfg.headroom_pct / 100.0)
    deadband = max(cfg.deadband_kw, cap_kw * cfg.deadband_pct / 100.0)
    target = max(0.0, cap_kw - headroom)
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
                add(r, ActionKind.SLEEP, "sleep did not take: sending it again", None, IDLE_W)

    # -- 2. what is the import, and what will it be ------------------------------------
    fresh = (
        inp.import_kw is not None
        and inp.import_age_s is not None
        and inp.import_age_s <= cfg.meter_stale_s
    )
    rig_sum_kw = sum(_current_w(r) for r in inp.rigs if r.state is not RigState.OFF) / 1000.0
    nonrig = inp.nonrig_kw
    if fresh:
        assert inp.import_kw is not None
        measured: float = inp.import_kw
        basis = "meter"
        known_kw = sum(r.power_w for r in inp.rigs if r.power_w is not None) / 1000.0
        sample = max(0.0, inp.import_kw - known_kw)
        nonrig = sample if nonrig is None else nonrig + NONRIG_SMOOTHING * (sample - nonrig)
    else:
        known = [r for r in inp.rigs if r.power_w is not None or r.state is RigState.OFF]
        coverage = len(known) / len(inp.rigs) if inp.rigs else 1.0
        if coverage < 0.5:
            return _safe_plan(inp, target, actions, touched, nonrig)
        measured = (rig_sum_kw + (nonrig or 0.0)) * (1.0 + cfg.estimate_margin_pct / 100.0)
        basis = "estimate"

    in_flight = 0.0  # kW still to come (+) or go (-) from commands not yet settled
    ramping_up = 0.0
    for r in inp.rigs:
        mm = m(r)
        if mm.expected_w is None or settled(r) or r.power_w is None:
            continue
        delta = (mm.expected_w - r.power_w) / 1000.0
        in_flight += delta
        if delta > 0:
            ramping_up += delta
    if actions:  # confirmations just planned
        by_id = {r.id: r for r in inp.rigs}
        for a in actions:
            in_flight += (a.expected_w - _current_w(by_id[a.rig_id])) / 1000.0
    predicted = measured + in_flight

    upper = target
    lower = target - deadband
    note = ""
    if predicted > upper:
        need = predicted - (upper - 0.25 * deadband)
        shed = _shed(inp, need, free, settled, add)
        predicted -= shed
        if predicted > upper + 1e-6:
            note = f"cannot shed enough: {predicted - upper:.1f} kW over target"
    elif predicted < lower:
        room = min((target - 0.5 * deadband) - predicted, ramp_limit - ramping_up)
        if room > 0:
            predicted += _restore(inp, room, free, settled, add)
    return Plan(tuple(actions), target, measured, predicted, basis, nonrig, note)


def _shed(inp: PlanInput, need_kw: float, free: _Pred, settled: _Pred, add: _Add) -> float:
    """Plan commands that take `need_kw` off the import; return what they will take."""
    cfg = inp.settings
    now = inp.now
    mem = inp.memory

    def order(rs: list[RigInput]) -> list[RigInput]:
        return sorted(rs, key=lambda r: (r.priority, -_efficiency(r), r.id))

    def dwell_ok(r: RigInput) -> bool:
        mm = mem.get(r.id)
        return mm is None or mm.mode is not Mode.RUN or now >= mm.since + cfg.min_on_s

    def final(r: RigInput) -> float:
        return _final_w(r, mem.get(r.id, _NO_MEMORY), now)

    def sleep_save(r: RigInput) -> float:
        return max(0.0, final(r) - IDLE_W) / 1000.0

    def throttle_room(r: RigInput) -> float:
        if not (cfg.power_targets and r.can_power_target and r.min_w is not None):
            return 0.0
        room = (final(r) - r.min_w) / 1000.0
        return room if room > _EPS_KW else 0.0  # float dust is no room: no 0 kW commands

    urgent = inp.urgent

    def may_shed(r: RigInput) -> bool:
        """A rig already on its way down is not told again: its fall is counted in flight.
        Under a grid deadline a slow throttle in progress may still become a fast sleep."""
        mm = mem.get(r.id, _NO_MEMORY)
        if not _going_down(r, mm, now):
            return True
        return urgent and mm.mode is Mode.THROTTLE and r.can_sleep

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
        # Never a target above the rig's range (the firmware refuses it): a rig drawing more
        # than its maximum sheds the excess too.
        watts = min(watts, r.full_w if r.max_w is None else r.max_w)
        take = (final(r) - watts) / 1000.0
        planned[r.id] = (r, ActionKind.SET_POWER, f"{reason} {take:.2f} kW", watts, watts)
        return take

    # Sleep the worst rigs until throttling the rest can cover what remains. Under a grid
    # deadline, sleep only: a power target takes minutes to show, a sleep seconds.
    sleepers = [r for r in first if r.can_sleep and sleep_save(r) > 0]
    throttle_total = 0.0 if urgent else sum(throttle_room(r) for r in first)
    for r in sleepers:
        if enough() or need_kw - shed <= throttle_total:
            break
        reason = f"over target: shed {need_kw:.1f} kW, least efficient first"
        planned[r.id] = (r, ActionKind.SLEEP, reason, None, IDLE_W)
        shed += sleep_save(r)
        throttle_total -= throttle_room(r)
    for r in [] if urgent else first:
        if enough():
            break
        if r.id not in planned and throttle_room(r) > 0:
            shed += throttle(r, "over target: throttle to shed")
    # Still over: the cap comes first. Sleep rigs inside their on-time or still waking
    # (throttle those that cannot sleep).
    for r in order([r for r in base if r.id not in planned]):
        if enough():
            break
        if r.can_sleep and sleep_save(r) > 0:
            planned[r.id] = (r, ActionKind.SLEEP, "over target: cap before dwell", None, IDLE_W)
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


def _restore(inp: PlanInput, room_kw: float, free: _Pred, settled: _Pred, add: _Add) -> float:
    """Plan commands that add at most `room_kw`; return what they will add."""
    cfg = inp.settings
    now = inp.now
    mem = inp.memory
    added = 0.0

    def order(rs: list[RigInput]) -> list[RigInput]:
        return sorted(rs, key=lambda r: (-r.priority, _efficiency(r), r.id))

    candidates = []
    for r in inp.rigs:
        mm = mem.get(r.id)
        if mm is None or not free(r) or not settled(r):
            continue
        if (mm.mode is Mode.THROTTLE and _consuming(r)) or (
            mm.mode in (Mode.SLEEP, Mode.OFF) and now >= mm.since + cfg.min_off_s
        ):
            candidates.append(r)
    for r in order(candidates):
        left = room_kw - added
        if left <= 0.05:
            break
        mm = mem[r.id]
        if mm.mode is Mode.THROTTLE:
            current = _current_w(r)
            want = min(r.full_w, current + left * 1000.0)
            if want < r.full_w and not (
                cfg.power_targets and r.can_power_target and r.min_w is not None
            ):
                continue  # no power targets (any more): back to full power only when it fits
            if want - current < 1.0 or (want < r.full_w and r.min_w is not None and want < r.min_w):
                continue
            watts = None if want >= r.full_w else want
            add(r, ActionKind.SET_POWER, "under target: raise power target", watts, want)
            added += (want - current) / 1000.0
            continue
        # What the import counts it at now; unknown counts as nothing, so never under-counted.
        base_w = r.power_w if r.power_w is not None else 0.0
        full_add = max(0.0, r.full_w - base_w) / 1000.0
        if mm.mode is Mode.OFF:
            if not r.has_outlet or full_add > left:
                continue
            add(r, ActionKind.OUTLET_ON, "under target: power back on", None, r.full_w)
            added += full_add
        elif full_add <= left:
            add(r, ActionKind.WAKE, "under target: wake, most efficient first", None, r.full_w)
            added += full_add
        elif (
            cfg.power_targets
            and r.can_power_target
            and r.min_w is not None
            and (r.min_w - base_w) / 1000.0 <= left
        ):
            watts = base_w + left * 1000.0
            add(r, ActionKind.WAKE, "under target: wake at a power target that fits", watts, watts)
            added += left
    return added


def _safe_plan(
    inp: PlanInput, target: float, actions: list[Action], touched: set[str], nonrig: float | None
) -> Plan:
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
                        r.id, ActionKind.SLEEP, "no trustworthy reading: safe state", None, IDLE_W
                    )
                )
                touched.add(r.id)
    return Plan(tuple(actions), target, None, None, "safe", nonrig, f"safe state: {cfg.safe_state}")


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
        full = action.watts is None or action.watts >= full_w - 1.0
        mode, target = (Mode.RUN, None) if full else (Mode.THROTTLE, action.watts)
    since = mm.since if mode is mm.mode else now
    return RigMemory(mode, since, settle, action.expected_w, target, 0, 0.0)
