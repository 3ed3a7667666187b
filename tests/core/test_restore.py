"""The end-aware restore (controller/core/restore.py and rule 9 of the planner): a cap with
a known end that lifts then has its slow-to-wake rigs running when it ends; a cap with no
known end has nothing prepared; a cap whose end is moved or cancelled is never crossed.

The farm: a 9.05 kW cap with no headroom or dead band, three fast-to-wake 3 kW rigs
running flat out (wake 200 s) and one slow-to-wake rig asleep (wake 600 s), all of the same
the slow one the least efficient (45 J/TH against 25): without the end in view it stays
asleep, as it should.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from controller.core.caps import MAX_IMPORT, OVERRIDE, Limit, effective_cap
from controller.core.planner import ActionKind, Mode, PlanInput, RigMemory, RigTiming, plan
from controller.core.restore import PREPARE_MARGIN_S, lead_s, slow_ids, to_prepare
from tests.core.test_planner import LONG_AGO, NOW, asleep, control, kinds, rig, slept_memory

FAST = RigTiming(sleep_s=15, wake_s=200, power_change_s=60)
SLOW = RigTiming(sleep_s=15, wake_s=600, power_change_s=60)
CAP_KW = 9.05  # the fast rigs' 9 kW and the sleeper's idle draw, just
RANGE: dict[str, Any] = {"can_power_target": True, "min_w": 1500.0, "max_w": 3000.0}


def rigs() -> list[Any]:
    fast = [rig(f"f{i}", timing=FAST, **RANGE) for i in range(3)]
    return [*fast, asleep("s", 45.0, timing=SLOW, **RANGE)]


def inp(rs: list[Any], *, ends_in: float | None, memory: dict[str, RigMemory] | None = None,
        cap_kw: float = CAP_KW) -> PlanInput:  # fmt: skip
    limits = [Limit(MAX_IMPORT, 100.0, "site")]
    end = None if ends_in is None else NOW + ends_in
    limits.append(Limit(OVERRIDE, cap_kw, "curtailment", end))
    mem = {r.id: LONG_AGO for r in rs}
    mem["s"] = slept_memory()
    mem.update(memory or {})
    return PlanInput(
        now=NOW,
        cap=effective_cap(limits),
        settings=control(ramp_kw_per_interval=100.0),
        rigs=tuple(rs),
        import_kw=sum(r.power_w or 0.0 for r in rs) / 1000.0,
        import_age_s=1.0,
        memory=mem,
    )


def test_the_cap_knows_its_end_and_what_follows() -> None:
    cap = inp(rigs(), ends_in=500).cap
    assert cap.kw == CAP_KW and cap.ends_at == NOW + 500 and cap.after_kw == 100.0
    assert inp(rigs(), ends_in=None).cap.ends_at is None
    # Two limits at the same level: the cap lifts when the later one ends.
    two = effective_cap([Limit(OVERRIDE, 10.0, "a", NOW + 100), Limit("grid", 10.0, "b", NOW + 500),
                         Limit(MAX_IMPORT, 100.0, "site")])  # fmt: skip
    assert (two.ends_at, two.after_kw) == (NOW + 500, 100.0)


def test_slow_rigs_and_the_lead_come_from_their_wake_times() -> None:
    rs = rigs()
    assert slow_ids(rs) == {"s": 600.0}
    assert lead_s({"s": 600.0}, rs) == 600 + 60 + PREPARE_MARGIN_S
    cap = inp(rs, ends_in=500).cap
    assert to_prepare(cap, NOW, rs) == {"s": 600.0}
    # Too far from the end: nothing yet. Woken now, it would be up after a fast rig woken
    # at the end: kept running if it runs, not woken (-1).
    assert to_prepare(replace(cap, ends_at=NOW + 2000), NOW, rs) == {}
    assert to_prepare(replace(cap, ends_at=NOW + 100), NOW, rs) == {"s": -1.0}
    # All alike: nothing is slow.
    assert slow_ids([replace(r, timing=FAST) for r in rs]) == {}


def test_unknown_end_prepares_nothing() -> None:
    for ends_in in (None, 5000.0):  # no end, or an end beyond the lead
        p = plan(inp(rigs(), ends_in=ends_in))
        assert p.actions == ()


def test_known_end_makes_room_for_the_slow_sleeper_then_wakes_it() -> None:
    rs = rigs()
    p = plan(inp(rs, ends_in=500))
    # First the room: the fast rigs are throttled (or slept), nothing is woken yet.
    cuts = {a.rig_id: a for a in p.actions}
    assert cuts and set(cuts) <= {"f0", "f1", "f2"}
    assert all(a.kind in (ActionKind.SET_POWER, ActionKind.SLEEP) for a in cuts.values())
    assert all(a.reason.startswith("preparing the restore") for a in cuts.values())
    assert p.predicted_kw is not None and p.predicted_kw <= CAP_KW + 1e-9
    # Once the cuts have shown, the slow rig wakes at a power that fits under the target.
    after = [replace(r, power_w=cuts[r.id].expected_w) if r.id in cuts else r for r in rs]
    mem = {
        rid: RigMemory(
            Mode.THROTTLE if a.kind is ActionKind.SET_POWER else Mode.SLEEP,
            since=NOW - 100, expected_w=a.expected_w, target_w=a.watts, commanded_at=NOW - 100,
        )
        for rid, a in cuts.items()
    }  # fmt: skip
    p2 = plan(inp(after, ends_in=400, memory=mem))
    assert kinds(p2).get("s") is ActionKind.WAKE
    assert p2.predicted_kw is not None and p2.predicted_kw <= CAP_KW + 1e-9


def test_the_end_cancelled_never_crosses_the_cap() -> None:
    """The slow rig woken for the end, the fast ones cut for it: the end is called off
    (the order extended with no end). Whatever the plan does, it stays under the cap."""
    rs = rigs()
    p = plan(inp(rs, ends_in=500))
    cuts = {a.rig_id: a for a in p.actions}
    after = [replace(r, power_w=cuts[r.id].expected_w) if r.id in cuts else r for r in rs]
    mem = {
        rid: RigMemory(Mode.THROTTLE if a.kind is ActionKind.SET_POWER else Mode.SLEEP,
                       since=NOW - 100, expected_w=a.expected_w, target_w=a.watts,
                       commanded_at=NOW - 100)
        for rid, a in cuts.items()
    }  # fmt: skip
    woke = plan(inp(after, ends_in=400, memory=mem))
    wake = {a.rig_id: a for a in woke.actions}["s"]
    # The wake in flight (the rig still booting), and the end gone.
    mem2 = {**mem, "s": RigMemory(Mode.THROTTLE, since=NOW - 10, settle_until=NOW + 590,
                                  expected_w=wake.expected_w, target_w=wake.watts,
                                  commanded_at=NOW - 10)}  # fmt: skip
    booting = [replace(r, state=r.state, power_w=60.0) if r.id == "s" else r for r in after]
    for ends_in in (None, 5000.0):
        p3 = plan(inp(booting, ends_in=ends_in, memory=mem2))
        assert p3.predicted_kw is not None and p3.predicted_kw <= CAP_KW + 1e-9
        assert not any(a.kind is ActionKind.WAKE for a in p3.actions)


@pytest.mark.parametrize("urgent", [True])
def test_a_grid_deadline_prepares_nothing(urgent: bool) -> None:
    p = plan(replace(inp(rigs(), ends_in=500), urgent=urgent))
    assert "s" not in kinds(p)


def test_prepare_restore_off_prepares_nothing() -> None:
    i = inp(rigs(), ends_in=500)
    assert plan(replace(i, settings=replace(i.settings, prepare_restore=False))).actions == ()


def test_a_schedule_window_carries_its_end() -> None:
    import datetime as dt
    from zoneinfo import ZoneInfo

    from controller.core.caps import CapSettings, Schedule, schedule_limits

    tz = "Asia/Bishkek"
    evening = Schedule("evening", "17:00", "21:00", cap_pct=50)
    night = Schedule("night", "22:00", "06:00", cap_pct=30)
    caps = CapSettings(100.0, tz, (evening, night))

    def at(day: int, h: int, m: int = 0) -> float:
        return dt.datetime(2026, 1, day, h, m, tzinfo=ZoneInfo(tz)).timestamp()

    (lim,) = schedule_limits(caps, at(5, 18, 30))
    assert lim.expires_at == at(5, 21)
    (lim,) = schedule_limits(caps, at(5, 23))  # past midnight: ends tomorrow morning
    assert lim.expires_at == at(6, 6)
    (lim,) = schedule_limits(caps, at(6, 3))
    assert lim.expires_at == at(6, 6)


def test_wake_times_learn_from_the_prior_and_err_long() -> None:
    from controller.core.wake_times import WakeTimes, kind_key, reached

    key = kind_key("Whatsminer M30S+_VE40", "btminer")
    w = WakeTimes()
    assert w.wake_s(key, 300.0) == 300.0  # the prior until seen
    w = w.observe(key, 350.0)
    assert w.wake_s(key, 300.0) == 350.0  # slower than the prior: what was seen, at once
    fast = WakeTimes().observe("a|b", 170.0)
    assert 170.0 < fast.wake_s("a|b", 300.0) < 300.0  # faster: down from the prior
    for _ in range(30):
        fast = fast.observe("a|b", 170.0)
    assert fast.wake_s("a|b", 300.0) == pytest.approx(170.0, abs=5.0)
    assert WakeTimes.from_dict(w.as_dict()).wake_s(key, 300.0) == 350.0
    assert reached(1660.0, 1700.0) and not reached(1600.0, 1700.0) and not reached(None, 1.0)


def test_prepare_restore_is_a_config_key() -> None:
    """`[control] prepare_restore` reaches the planner (default on; off declines the trade)."""
    from controller.config.schema import ControlConfig
    from controller.runtime.control import planner_settings

    assert planner_settings(ControlConfig(max_import_kw=100)).prepare_restore is True
    off = ControlConfig(max_import_kw=100, prepare_restore=False)
    assert planner_settings(off).prepare_restore is False
