"""Wall-clock steps (an NTP correction, a mis-set clock put right) must not end or stretch
anything rigd times itself: dwell and settle times, escalation, retry backoff, overrides
and holds set "for" a while, the energy counter's periods, the grid heartbeat and report
pacing. Grid orders' own start and end are the operator's wall-clock times and follow it.

The daemon runs on a `SteppedWall` over the harness's manual clock: a step moves only the
wall time the daemon reads, never its monotonic clock or the farm's physics, as
`settimeofday` does on a real host. Every check is made in farm (physical) time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bench.sim_harness import START, OfflineLink, SimHarness
from controller.adapters.store import RETRY_S
from controller.cli.direct_farm import build_direct_devices
from controller.config import GridConfig, HeartbeatConfig
from controller.core.budget import EnergyCounter
from controller.core.caps import Cap, period_bounds
from controller.core.grid.book import OrderBook
from controller.core.grid.orders import GridMessage
from controller.core.planner import ActionKind, Mode, RigMemory
from controller.core.status import CycleResult, Hold
from controller.runtime.clock import StepGuard
from controller.runtime.daemon import Daemon
from controller.runtime.grid_service import grid_rules
from simulators.clock import SteppedWall
from simulators.farm import RigMode
from tests.adapters.test_store_faults import fill_disk, free_disk, on_disk
from tests.grid_helpers import order, plain

HOUR = 3600.0
STEPS = [pytest.param(2 * HOUR, id="forward-2h"), pytest.param(-2 * HOUR, id="back-2h")]


class SteppedHarness(SimHarness):
    """The harness, with the daemon on a wall clock the test can step."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.wall = SteppedWall(args[2])  # (tmp_path, farm, clock, cfg)
        super().__init__(*args, **kw)

    def _new_daemon(self) -> Daemon:
        self.devices = build_direct_devices(self.farm, self.cfg)
        self.link = OfflineLink(self.cfg.site.id)
        return Daemon(
            self.cfg, clock=self.wall, devices=self.devices, link=self.link, dry_run=self.dry_run
        )

    def cap(self, t: float | None = None) -> Cap:
        # The limits are in the daemon's wall time.
        return super().cap((self.now if t is None else t) + self.wall.offset_s)


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[Callable[..., SteppedHarness]]:
    hs: list[SteppedHarness] = []

    def make(**kw: Any) -> SteppedHarness:
        h = SteppedHarness.create(tmp_path / f"h{len(hs)}", **kw)
        assert isinstance(h, SteppedHarness)
        hs.append(h)
        return h

    yield make
    for h in hs:
        await h.close()


class Actions:
    """Every planned action with the farm time of its cycle."""

    def __init__(self, h: SimHarness) -> None:
        self.h = h
        self.seen: list[tuple[float, str, ActionKind]] = []

    def __call__(self, r: CycleResult) -> None:
        if r.control is not None and r.control.plan is not None:
            for a in r.control.plan.actions:
                self.seen.append((self.h.now, a.rig_id, a.kind))

    def times(self, kind: ActionKind, rig: str | None = None) -> list[float]:
        return [t for t, r, k in self.seen if k is kind and (rig is None or r == rig)]


# -- the pieces -------------------------------------------------------------------------------


class _Host:
    """A host clock: wall and monotonic that a test moves separately."""

    def __init__(self) -> None:
        self.wall, self.mono, self.boot_id = 1_764_000_000.0, 5_000.0, "boot-a"

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - not used
        self.mono += seconds


def test_step_guard_finds_steps_and_keeps_time_steady_between_checks() -> None:
    host = _Host()
    g = StepGuard(host)
    host.wall += 10.0
    host.mono += 10.0
    assert g.check() == 0.0 and g.now() == host.wall
    host.mono += 5.0
    host.wall += 5.0 + 7200.0  # stepped forward between two checks
    assert g.now() == host.wall - 7200.0, "no step is seen before the check"
    assert g.check() == pytest.approx(7200.0)
    assert g.now() == host.wall
    host.mono += 3.0
    host.wall += 3.0 - 3600.0
    assert g.check() == pytest.approx(-3600.0)
    host.mono += 10.0
    host.wall += 10.0004  # slewing: not a step
    assert g.check() == 0.0
    # Across a restart: a mark from the same boot tells the step made while down.
    mark = g.mark()
    host.mono += 60.0
    host.wall += 60.0 + 900.0
    again = StepGuard(host)
    assert again.step_since(mark) == pytest.approx(900.0)
    assert again.step_since({**mark, "boot": "boot-b"}) == 0.0  # rebooted: unknowable
    assert again.step_since(None) == 0.0 and again.step_since({"wall": "x"}) == 0.0


def test_memory_shifts_by_a_step_and_never_stamps_stay_never() -> None:
    m = RigMemory(Mode.SLEEP, since=1000.0, settle_until=1015.0, retry_at=0.0)
    s = m.shifted(-600.0)
    assert (s.since, s.settle_until, s.retry_at) == (400.0, 415.0, 0.0)
    assert s.mode is Mode.SLEEP


def test_energy_counter_stepped_back_across_midnight_gets_its_count_back() -> None:
    tz = "UTC"
    day0, day1 = period_bounds("day", tz, START)
    c = EnergyCounter.new("day", tz, day0 + 22 * HOUR)
    c.update(1000.0, day0 + 22 * HOUR, tz)
    c.update(1100.0, day0 + 23.5 * HOUR, tz)  # 100 kWh on day 0
    # The clock is stepped 2 h forward: readings now look like day 1 ...
    c.update(1110.0, day1 + 1.5 * HOUR + 600, tz)
    assert c.period_start == day1
    assert c.used_at(day1 + 1.6 * HOUR, tz)[0] == pytest.approx(c.used_kwh)
    # ... and back again: day 0 has everything since 22:00, and none of it is lost.
    assert c.used_at(day0 + 23.8 * HOUR, tz)[0] == pytest.approx(110.0)
    c.update(1115.0, day0 + 23.8 * HOUR, tz)
    assert c.period_start == day0 and c.used_kwh == pytest.approx(115.0)
    # Real midnight: day 0 closes, day 1 starts from what it really used.
    c.update(1125.0, day1 + 0.1 * HOUR, tz)
    assert c.period_start == day1
    assert c.prev_used_kwh == pytest.approx(115.0 + 10.0 * (0.2 / 0.3), rel=1e-3)
    assert c.used_kwh == pytest.approx(10.0 * (0.1 / 0.3), rel=1e-3)


def test_order_book_moves_what_rigd_timed_not_the_operators_times(tmp_path: Path) -> None:
    g = GridConfig(
        allow_unsigned=True,
        heartbeat=HeartbeatConfig(topic="op/hb", failsafe_kw=10.0, always=True),
    )
    book = OrderBook(grid_rules(g), 100.0)
    book.load(None, 1000.0)
    msg = GridMessage.model_validate(
        {"message": order(now=1000.0, duration_s=600, start="now")}
    ).message
    book.apply(msg, 1000.0, signed=False, kid=None)
    book.tick(1000.0)
    book.observe(1005.0, 50.0, "meter")
    book.reports_due(1005.0)
    o = book.orders["ord-1"]
    start, end = o.start, o.end
    book.shift_local_times(7200.0)
    assert (o.start, o.end) == (start, end), "the operator's times follow the wall clock"
    assert o.last_obs_ts == 8205.0 and o.last_report_ts == 8205.0
    assert book.failsafe.last_heartbeat == 8200.0
    book.shift_local_times(-7200.0, heartbeat=False)
    assert book.failsafe.last_heartbeat == 8200.0 and o.last_obs_ts == 1005.0


# -- the daemon on a stepped clock -------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
async def test_a_step_neither_cuts_nor_stretches_min_off(
    made: Callable[..., SteppedHarness], step: float
) -> None:
    """Rigs slept for a cap drop wake when `min_off_s` has really passed: a step forward
    must not wake them early (that is how a clock flaps rigs), nor a step back late."""
    min_off = 1800.0
    h = made(rigs=16, pdus=2, control={"power_targets": False, "min_off_s": min_off})
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    h.at(t0 + 603, lambda: h.set_override(0.6 * ctl.max_import_kw, 600, "feeder work"))
    h.at(t0 + 900, lambda: h.wall.step(step))  # asleep ~5 min: 25 min of min_off to go
    acts = Actions(h)
    await h.run_for(1.5 * HOUR, acts)

    sleeps = acts.times(ActionKind.SLEEP)
    wakes = acts.times(ActionKind.WAKE)
    assert sleeps and max(sleeps) < t0 + 900, "shed before the step"
    assert wakes, "rigs must be woken once min_off has passed"
    for _, rig, kind in acts.seen:
        if kind is ActionKind.WAKE:
            slept = max(t for t in acts.times(ActionKind.SLEEP, rig))
            woke = min(t for t in acts.times(ActionKind.WAKE, rig) if t > slept)
            assert woke - slept >= min_off, f"{rig} woken {woke - slept:.0f} s after its sleep"
    # ... and not later than that, plus a poll.
    assert min(wakes) <= min(sleeps) + min_off + 2 * h.interval_s
    assert all(r.mode is RigMode.MINING for r in h.farm.rigs.values())


async def test_a_step_forward_does_not_escalate_a_sleep_early(
    made: Callable[..., SteppedHarness],
) -> None:
    """A rig that ignores its sleep is switched off at its outlet `escalate_after_s` after
    the sleep in real time, not at the next poll after a step forward."""
    h = made(rigs=12, pdus=2, control={"power_targets": False, "escalate_after_s": 300})
    ctl = h.cfg.control
    assert ctl is not None
    for r in h.farm.rigs.values():
        r.ignore_sleep = True
    t0 = h.now
    h.at(t0 + 603, lambda: h.set_override(0.7 * ctl.max_import_kw, HOUR, "substation"))
    h.at(t0 + 640, lambda: h.wall.step(HOUR))
    acts = Actions(h)
    await h.run_for(1800, acts)
    first_sleep = min(acts.times(ActionKind.SLEEP))
    offs = acts.times(ActionKind.OUTLET_OFF)
    assert first_sleep < t0 + 640 and offs
    assert min(offs) >= first_sleep + 300, min(offs) - first_sleep
    assert min(offs) <= first_sleep + 300 + 2 * h.interval_s


@pytest.mark.parametrize("step", STEPS)
async def test_overrides_and_holds_last_as_long_as_they_were_set_for(
    made: Callable[..., SteppedHarness], step: float
) -> None:
    h = made(rigs=8, pdus=1, control={})
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    await h.step()
    h.set_override(0.8 * ctl.max_import_kw, HOUR, "for an hour")
    rig = next(iter(h.farm.rigs))
    h.controller.set_maintenance(rig, Hold("fan swap", "tech", h.wall.now() + HOUR))
    h.at(t0 + 600, lambda: h.wall.step(step))
    in_force: list[tuple[float, bool, bool]] = []

    def each(r: CycleResult) -> None:
        c = h.controller
        in_force.append((h.now, c.override is not None, rig in c.maintenance))

    await h.run_for(1.5 * HOUR, each)
    set_at = t0 + h.interval_s
    assert all(o and m for t, o, m in in_force if t < set_at + HOUR - 1)
    assert not any(o or m for t, o, m in in_force if t > set_at + HOUR + h.interval_s)


async def test_energy_budget_counts_every_kwh_once_across_steps_over_midnight(
    made: Callable[..., SteppedHarness],
) -> None:
    """The clock jumps 2 h ahead at 23:30 (into tomorrow) and is put right at 23:50: the
    day's budget still has every kWh of the day, and tomorrow starts from zero."""
    day0 = START  # 00:00 UTC
    h = made(
        rigs=8,
        pdus=1,
        start=day0 + 22 * HOUR,
        control={},
        budget={"period": "day", "kwh": 1e6},
    )
    h.at(day0 + 23.5 * HOUR, lambda: h.wall.step(2 * HOUR))
    h.at(day0 + 23.5 * HOUR + 1200, lambda: h.wall.step(-2 * HOUR))
    register0 = h.farm.meter.import_kwh(h.now)
    caps: list[float] = []

    def each(r: CycleResult) -> None:
        assert r.control is not None
        caps.append(r.control.cap.kw)

    await h.run_until(day0 + 23.95 * HOUR, each)
    e = h.controller.energy
    assert e is not None and e.last_ts is not None
    assert e.period_start == day0
    assert e.used_kwh == pytest.approx(h.farm.meter.import_kwh(e.last_ts) - register0, rel=1e-6)
    await h.run_until(day0 + 24.5 * HOUR, each)
    assert e.period_start == day0 + 24 * HOUR
    assert 0 < e.used_kwh < h.farm.meter.import_kwh(e.last_ts) - register0
    assert all(math.isfinite(c) and c > 0 for c in caps)


async def test_a_step_while_down_is_found_from_the_saved_mark(
    made: Callable[..., SteppedHarness],
) -> None:
    """The host's clock is put 2 h forward while rigd is stopped: on restart the saved
    memory is moved by the step, so slept rigs keep their real min_off."""
    min_off = 1800.0
    h = made(rigs=12, pdus=2, control={"power_targets": False, "min_off_s": min_off})
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    h.at(t0 + 603, lambda: h.set_override(0.6 * ctl.max_import_kw, 300, "short"))
    acts = Actions(h)
    await h.run_until(t0 + 700, acts)
    asleep = {rid for rid, r in h.farm.rigs.items() if r.mode is RigMode.SLEEPING}
    assert asleep
    before = dict(h.controller.memory)
    h.wall.step(2 * HOUR)
    await h.restart(downtime_s=120)
    after = h.controller.memory
    for rid in asleep:
        assert after[rid].since == pytest.approx(before[rid].since + 2 * HOUR)
    await h.run_for(HOUR, acts)
    slept = min(acts.times(ActionKind.SLEEP))
    wakes = acts.times(ActionKind.WAKE)
    assert wakes and min(wakes) >= slept + min_off
    assert min(wakes) <= slept + min_off + 2 * h.interval_s


async def test_a_step_back_while_the_disk_is_full_does_not_hold_the_retries_back(
    made: Callable[..., SteppedHarness],
) -> None:
    """The state database's retries are paced on the daemon's monotonic clock: the wall
    clock put back an hour while the disk is full must not keep what waits in memory off
    the disk for that hour once the disk has room again."""
    h = made(rigs=8, pdus=1, control={"power_targets": False})
    ctl = h.cfg.control
    assert ctl is not None
    await h.run_for(60)
    fill_disk(h.store)
    h.set_override(0.6 * ctl.max_import_kw, HOUR, "feeder work")  # rigs slept, audited
    await h.run_for(60)
    assert h.store.health()["ok"] is False
    h.wall.step(-HOUR)
    await h.step()  # the step is found and applied, in memory: the disk is still full
    free_disk(h.store)
    docs: list[dict[str, Any]] = []
    await h.run_for(RETRY_S + 2 * h.interval_s, lambda r: docs.append(r.document["state_db"]))
    assert docs[-1]["ok"] is True and docs[-1]["unsaved"] == 0, docs
    assert on_disk(h.store.path, "clock.mark")["wall"] == pytest.approx(h.wall.now(), abs=60)


class Killed(Exception):
    """rigd killed (SIGKILL, power cut) at a write: that write and every later one are lost."""


@pytest.mark.parametrize("kill_at", [0, 1, 2])
async def test_a_kill_while_a_step_is_saved_never_applies_it_twice(
    made: Callable[..., SteppedHarness], kill_at: int
) -> None:
    """rigd is killed at its `kill_at`-th state write after a step is found: whatever had
    landed, the restarted rigd moves each stamp by the step exactly once (the shifted state
    and the clock mark saying it was applied land together, or neither does)."""
    h = made(rigs=12, pdus=2, control={"power_targets": False, "min_off_s": 1800.0})
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    h.at(t0 + 603, lambda: h.set_override(0.6 * ctl.max_import_kw, HOUR, "feeder work"))
    await h.run_until(t0 + 700)
    asleep = {rid for rid, r in h.farm.rigs.items() if r.mode is RigMode.SLEEPING}
    assert asleep
    before = {rid: h.controller.memory[rid].since for rid in asleep}
    expires = h.controller.override.expires_at if h.controller.override else None
    assert expires is not None

    store = h.store
    put_many = store.put_many
    writes: list[list[str]] = []
    dead = False

    def dying(items: dict[str, Any]) -> None:
        nonlocal dead
        if dead:
            return  # the process is gone: nothing more reaches the disk
        writes.append(sorted(items))
        if len(writes) > kill_at:
            dead = True
            raise Killed
        put_many(items)

    store.put_many = dying  # type: ignore[method-assign]
    h.wall.step(2 * HOUR)
    with contextlib.suppress(Killed):
        await h.step()
    dead = True  # killed after that cycle at the latest
    # The cycle's first write is the step's: the shifted state with the mark.
    assert {"clock.mark", "planner.memory", "control.override"} <= set(writes[0]), writes
    await h.restart()
    c = h.controller
    for rid in asleep:
        assert c.memory[rid].since == pytest.approx(before[rid] + 2 * HOUR), (rid, writes)
    assert c.override is not None
    assert c.override.expires_at == pytest.approx(expires + 2 * HOUR), writes


async def test_heartbeat_and_report_pacing_survive_steps(
    made: Callable[..., SteppedHarness],
) -> None:
    """A step forward must not look like a lost heartbeat (the failsafe would cut the farm);
    after a step back, a heartbeat that stops is still noticed on time, and progress
    reports keep their pace."""
    h = made(rigs=8, pdus=1, control={})
    ctl = h.cfg.control
    assert ctl is not None
    hb = HeartbeatConfig(topic="op/hb", timeout_s=120, failsafe_kw=0.5 * ctl.max_import_kw)
    grid = GridConfig(allow_unsigned=True, report_interval_s=30, heartbeat=hb)
    h.cfg = h.cfg.model_copy(update={"grid": grid})
    await h.close_daemon()
    h.daemon = h._new_daemon()
    g = h.daemon.grid
    assert g is not None
    t0 = h.now
    beating = True
    reports: list[float] = []
    link_set_latest = h.link.set_latest

    def spy(key: str, subtopic: str, doc: dict[str, Any]) -> None:
        reports.append(h.now)
        link_set_latest(key, subtopic, doc)

    h.link.set_latest = spy  # type: ignore[method-assign]

    beats: list[float] = []

    def beat() -> None:
        if beating:
            assert g.handle_heartbeat(b"alive")
            beats.append(h.now)
            h.at(h.now + 30, beat)

    def stop() -> None:
        nonlocal beating
        beating = False

    h.at(t0 + 1, beat)
    # An open-ended order arms the failsafe.
    h.at(
        t0 + 5, lambda: g.handle_order(plain(order(site="simsite", now=h.wall.now(), start="now")))
    )
    h.at(t0 + 600, lambda: h.wall.step(2 * HOUR))
    h.at(t0 + 1200, lambda: h.wall.step(-3 * HOUR))
    h.at(t0 + 1800, stop)
    failsafe: list[tuple[float, bool]] = []

    def each(r: CycleResult) -> None:
        failsafe.append((h.now, g.book.failsafe.since is not None))

    await h.run_until(t0 + 2400, each)
    lost = beats[-1] + hb.timeout_s  # the heartbeat is lost after its timeout, in real time
    assert not any(on for t, on in failsafe if t <= lost)
    assert all(on for t, on in failsafe if t > lost + h.interval_s)
    # Reports every 30 s, through both steps, with no stall of hours after the step back.
    gaps = [b - a for a, b in itertools.pairwise(reports)]
    assert reports[0] < t0 + 60 and max(gaps) <= 30 + h.interval_s, max(gaps)
    assert reports[-1] > t0 + 2400 - 60
    doc = json.loads(json.dumps(g.summary()))
    assert doc["failsafe"] is True
