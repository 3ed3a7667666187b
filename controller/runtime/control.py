"""The control loop's stateful shell around the pure planner.

Each cycle: read the frozen snapshot, update the energy counter from the meter's
register, work out the effective cap, build the planner's view of every rig, plan,
and hand new actions to the executor as background tasks. Everything a restart
must not forget (planner memory, energy counter, overrides, maintenance and pins,
what was learned of each rig) is written to the state database as it changes, and
read back at start, before the first cycle.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from controller.adapters.mqtt import MqttLink
from controller.adapters.store import StateStore, StoreError
from controller.config import BudgetConfig, Config, ControlConfig, ModelTiming
from controller.core.budget import EnergyCounter
from controller.core.caps import (
    MAX_IMPORT,
    OVERRIDE,
    BudgetSettings,
    CapSettings,
    Limit,
    Schedule,
    effective_cap,
    pacing_limit,
    period_bounds,
    schedule_limits,
)
from controller.core.curves import FIRMWARE_WEIGHT, Band, CurveData, prior_curve
from controller.core.overhead import ImportModel
from controller.core.planner import (
    IDLE_W,
    Action,
    ActionKind,
    Mode,
    Plan,
    PlanInput,
    PlannerSettings,
    RigInput,
    RigMemory,
    RigTiming,
    failed,
    frozen_memory,
    plan,
    remembered,
)
from controller.core.snapshot import RigInfo, RigView, SiteSnapshot
from controller.core.status import (
    ActionResult,
    ControlStatus,
    Hold,
    Override,
    min_off_wait,
    shed_blockers,
    shortfall_kw,
)
from controller.core.wake_times import GIVE_UP_FACTOR, WakeTimes, kind_key, reached
from controller.errors import ManualRefused
from controller.runtime.devices import Devices
from controller.runtime.executor import Executor
from controller.runtime.timeline import Timeline
from drivers.base import MinerCapabilities
from drivers.telemetry import RigState

log = structlog.get_logger(__name__)

# What rigd learned of each rig (full power, J/TH) changes a little every cycle; it is
# saved at most this often, and when a rig is learned for the first time: a farm's worth
# every cycle is a write of megabytes, and a few minutes lost is relearned by watching.
LEARNED_SAVE_S = 300.0
CLOSE_WAIT_S = 10.0  # how long a stop or reload waits for commands in flight
# A full allocation (re-optimisation inside the dead band, and what the best plan under the
# cap would give) costs a few ms at 40 rigs and a few hundred at 10,000: asked for this
# often, and at once when the cap changes.
REOPT_EVERY_S = 60.0
SLEEP_SMOOTHING = 0.2  # weight of a new reading in a rig's learned sleeping power
FULL_AT_TARGET = 0.03  # a rig within this share of its power target has reached it
FULL_FLOOR = 0.85  # a learned full power under this share of the highest target is not used
# A grid order's first commands, started before the rest are made into tasks (`shed_now`):
# as many as the executor runs at once, so none of them waits for the others' bookkeeping.
FIRST_WAVE = 64
_SHEDDING = frozenset({ActionKind.SLEEP, ActionKind.OUTLET_OFF})
_RUNNING = frozenset({RigState.MINING, RigState.WAKING})


# -- the config, as the pure core's plain values -------------------------------------------------


def planner_settings(c: ControlConfig) -> PlannerSettings:
    return PlannerSettings(
        max_import_kw=c.max_import_kw,
        headroom_kw=c.headroom_kw,
        headroom_pct=c.headroom_pct,
        deadband_kw=c.deadband_kw,
        deadband_pct=c.deadband_pct,
        ramp_kw_per_interval=c.ramp_kw_per_interval,
        min_on_s=c.min_on_s,
        min_off_s=c.min_off_s,
        power_targets=c.power_targets,
        escalate_after_s=c.escalate_after_s,
        allow_outlet_off=c.allow_outlet_off,
        sleeping_w=c.sleeping_w,
        meter_stale_s=c.meter_stale_s,
        estimate_margin_pct=c.estimate_margin_pct,
        safe_state=c.safe_state,
        reopt_gain_pct=c.reopt_gain_pct,
        reopt_hold_s=c.reopt_hold_s,
        above_nominal=c.above_nominal,
        prepare_restore=c.prepare_restore,
    )


def cap_settings(c: ControlConfig, timezone: str) -> CapSettings:
    schedules = tuple(
        Schedule(
            name=s.name,
            start=s.start,
            end=s.end,
            days=tuple(s.days),
            months=tuple(s.months),
            cap_kw=s.cap_kw,
            cap_pct=s.cap_pct,
        )
        for s in c.schedules
    )
    return CapSettings(c.max_import_kw, timezone, schedules)


def budget_settings(b: BudgetConfig, max_import_kw: float, poll_s: float) -> BudgetSettings:
    # What the farm could overdraw while it obeys: its maximum import for two polls and
    # two minutes of powering down.
    lag_kwh = max_import_kw * (2.0 * poll_s + 120.0) / 3600.0
    return BudgetSettings(b.period, b.kwh, b.reserve_pct, lag_kwh)


def rig_timing(t: ModelTiming) -> RigTiming:
    return RigTiming(t.sleep_s, t.wake_s, t.power_change_s)


@dataclass(slots=True)
class Learned:
    """What rigd has learned of a rig by watching it: its full power and J/TH there, its
    hashrate at each power it settled at (its value curve), and its draw asleep."""

    full_w: float | None = None
    efficiency_j_th: float | None = None
    curve: CurveData = field(default_factory=CurveData)
    sleep_w: float | None = None
    profiles: tuple[tuple[float, float | None], ...] = ()  # the firmware's, once seen

    def as_dict(self) -> dict[str, Any]:
        return {
            "full_w": self.full_w,
            "efficiency_j_th": self.efficiency_j_th,
            "bands": [[b.key, b.n, b.watts, b.ths] for b in self.curve.bands],
            "sleep_w": self.sleep_w,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Learned:
        bands = tuple(
            Band(int(k), float(n), float(w), float(t)) for k, n, w, t in d.get("bands", ())
        )
        return cls(d.get("full_w"), d.get("efficiency_j_th"), CurveData(bands), d.get("sleep_w"))


@dataclass(frozen=True, slots=True)
class _Fixed:
    """The part of a rig's planner input that does not change from cycle to cycle."""

    caps: MinerCapabilities  # the capabilities these were made of
    priority: int
    can_power_target: bool
    has_outlet: bool
    steps: tuple[float, ...]


_UNLEARNED = Learned()  # a rig not learned yet (never changed: `_learn` makes its own)
_NO_KIND = kind_key("", "")


class Controller:
    def __init__(
        self,
        cfg: Config,
        control: ControlConfig,
        devices: Devices,
        store: StateStore,
        *,
        link: MqttLink | None,
        now: Any,
        dry_run: bool = False,
    ) -> None:
        self.cfg = cfg
        self.control = control
        self.devices = devices
        self.store = store
        self.now = now
        self.dry_run = dry_run or control.dry_run
        # The config as the pure core reads it: plain frozen values, made once per config.
        self.settings = planner_settings(control)
        self.cap_settings = cap_settings(control, cfg.site.timezone)
        self.budget_settings = (
            None
            if cfg.budget is None
            else budget_settings(cfg.budget, control.max_import_kw, cfg.poll.interval_s)
        )
        self._timings: dict[str, RigTiming] = {}
        self._fixed_by_rig: dict[str, _Fixed] = {}
        # Wake times learned from telemetry (controller.core.wake_times), the wakes being
        # timed (rig -> when commanded, the power it was woken to, its kind), and each rig's
        # kind as last seen (a sleeping rig may not say).
        self.wake_times = WakeTimes()
        self._waking: dict[str, tuple[float, float, str]] = {}
        self._kinds: dict[str, str] = {}
        # As many commands at once as reads: a grid order may put thousands of rigs to sleep.
        self.executor = Executor(
            devices, store=store, link=link, now=now, concurrency=max(64, cfg.poll.concurrency)
        )
        self.memory: dict[str, RigMemory] = {}
        self.learned: dict[str, Learned] = {}
        self.override: Override | None = None
        self.maintenance: dict[str, Hold] = {}
        self.pinned: dict[str, Hold] = {}
        self.external: dict[str, Limit] = {}  # the seam for grid orders: name -> limit
        # An active grid order not yet complied with: shed by the fastest means until then.
        self.comply_by: float | None = None
        self.nonrig_kw: float | None = None
        self.import_model = ImportModel()
        self._reopt_at = -math.inf  # when the next full allocation is due
        self._last_cap_kw: float | None = None
        self.attainment: tuple[float, float] | None = None  # (TH/s planned, attainable)
        self._curves: dict[str, tuple[CurveData, Any]] = {}  # fitted curve per rig, cached
        self._curve_polls: dict[str, int] = {}
        self.energy: EnergyCounter | None = None
        self._inflight: dict[str, asyncio.Task[ActionResult]] = {}
        self._prior: dict[str, RigMemory] = {}  # memory before an in-flight action
        # Commands a previous run sent but never saw the outcome of (it was killed): their
        # memory before the command, until the rig shows whether the command landed.
        self._unconfirmed: dict[str, RigMemory] = {}
        self._last_dry: tuple[tuple[str, str, float | None], ...] = ()
        self.timeline: Timeline | None = None  # a grid order's way to its first command
        self._group_priority = {name: g.priority for name, g in cfg.groups.items()}
        # PDUs rigd may switch outlets on: SNMPv3, or v2c with a write community.
        self._switchable_pdus = frozenset(
            p.id for p in cfg.pdus if p.snmp_version == "3" or p.write_community is not None
        )
        self._learned_saved = (-math.inf, 0)  # when, and how many rigs were known then
        self.last_input: PlanInput | None = None
        self.last_plan: Plan | None = None
        self._short_since: float | None = None  # import stays over the target since then
        try:
            self._load()
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            # State written by another rigd version or edited by hand: refuse to start rather
            # than guess who was put to sleep.
            raise StoreError(
                f"state database {store.path} holds state this rigd cannot read: {e!r}",
                kind="corrupt",
            ) from e

    # -- persistence ---------------------------------------------------------------------

    def _load(self) -> None:
        st = self.store
        self.memory = {k: RigMemory.from_dict(v) for k, v in st.get("planner.memory", {}).items()}
        self.learned = {k: Learned.from_dict(v) for k, v in st.get("rigs.learned", {}).items()}
        ov = st.get("control.override")
        self.override = Override(**ov) if ov else None
        self.maintenance = {k: Hold(**v) for k, v in st.get("control.maintenance", {}).items()}
        self.pinned = {k: Hold(**v) for k, v in st.get("control.pinned", {}).items()}
        self.nonrig_kw = st.get("control.nonrig_kw")
        model = st.get("control.import_model")
        self.import_model = ImportModel.from_dict(model) if model else ImportModel()
        wakes = st.get("rigs.wake_times")
        self.wake_times = WakeTimes.from_dict(wakes) if wakes else WakeTimes()
        self._unconfirmed = {
            k: RigMemory.from_dict(v)
            for k, v in st.get("control.inflight", {}).items()
            if k in self.memory
        }
        if self.cfg.budget is not None:
            saved = st.get("budget.energy")
            if saved and saved.get("period") == self.cfg.budget.period:
                self.energy = EnergyCounter.from_dict(saved)
            else:
                self.energy = EnergyCounter.new(
                    self.cfg.budget.period, self.cfg.site.timezone, self.now()
                )
        asleep = sum(1 for m in self.memory.values() if m.mode in (Mode.SLEEP, Mode.OFF))
        log.info(
            "control_state_loaded",
            rigs_remembered=len(self.memory),
            asleep_or_off=asleep,
            override=self.override is not None,
            energy_used_kwh=None if self.energy is None else round(self.energy.used_kwh, 3),
            unconfirmed=sorted(self._unconfirmed),
        )

    def _save(self, items: dict[str, Any]) -> None:
        try:
            self.store.put_many(items)
        except StoreError as e:
            log.error("state_write_failed", error=str(e))

    def _memory_items(self) -> dict[str, Any]:
        # With the memory, the memory before every command still in flight: a daemon killed
        # before it saw a command land can tell, once restarted, whether it did.
        inflight = {**self._unconfirmed, **self._prior}
        return {
            "planner.memory": {k: v.as_dict() for k, v in self.memory.items()},
            "control.inflight": {k: v.as_dict() for k, v in inflight.items()},
        }

    def _save_memory(self) -> None:
        self._save(self._memory_items())

    def shift_times(self, dt: float) -> dict[str, Any]:
        """The wall clock stepped by `dt` s (see controller.runtime.clock): move every stamp that
        measures a duration with it, so dwell, settle and backoff times, overrides and holds
        set "for" a while, and the energy counter's interval are as long as they were.

        Returns what changed, for the caller to save in one transaction with the clock mark
        that says the step was applied (a restart between the two would apply it again)."""
        self.memory = {k: m.shifted(dt) for k, m in self.memory.items()}
        if self.import_model.last_ts is not None:
            self.import_model = replace(self.import_model, last_ts=self.import_model.last_ts + dt)
        self._prior = {k: m.shifted(dt) for k, m in self._prior.items()}
        self._unconfirmed = {k: m.shifted(dt) for k, m in self._unconfirmed.items()}
        items: dict[str, Any] = {}
        if self.override is not None:
            o = self.override
            self.override = Override(o.kw, o.expires_at + dt, o.reason, o.actor)
            items["control.override"] = self.override.as_dict()
        for holds, key in (
            (self.maintenance, "control.maintenance"),
            (self.pinned, "control.pinned"),
        ):
            for k, h in list(holds.items()):
                if h.expires_at is not None:
                    holds[k] = Hold(h.reason, h.actor, h.expires_at + dt)
            items[key] = {k: v.as_dict() for k, v in holds.items()}
        if self.energy is not None and self.energy.last_ts is not None:
            self.energy.last_ts += dt
            items["budget.energy"] = self.energy.as_dict()
        return {**self._memory_items(), **items}

    # -- what technicians (and, later, the grid) set ----------------------------------------

    def set_override(self, kw: float, expires_at: float, reason: str, actor: str) -> Override:
        if kw < 0:
            raise ValueError("an override cap cannot be negative")
        self.override = Override(kw, expires_at, reason, actor)
        self._save({"control.override": self.override.as_dict()})
        return self.override

    def clear_override(self) -> None:
        self.override = None
        self._save({"control.override": None})

    def set_maintenance(self, rig_id: str, hold: Hold | None) -> None:
        self._set_hold(self.maintenance, "control.maintenance", rig_id, hold)

    def set_pinned(self, rig_id: str, hold: Hold | None) -> None:
        self._set_hold(self.pinned, "control.pinned", rig_id, hold)

    def _set_hold(self, holds: dict[str, Hold], key: str, rig_id: str, hold: Hold | None) -> None:
        if rig_id not in self.devices.miners:
            raise KeyError(f"unknown rig {rig_id!r}")
        if hold is None:
            holds.pop(rig_id, None)
        else:
            holds[rig_id] = hold
        self._save({key: {k: v.as_dict() for k, v in holds.items()}})

    def set_external(self, name: str, limit: Limit | None) -> None:
        """Seam for other cap sources (grid orders): set or clear a named limit."""
        if limit is None:
            self.external.pop(name, None)
        else:
            self.external[name] = limit

    # -- one cycle -----------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        if self.override is not None and now >= self.override.expires_at:
            log.info("override_expired", kw=self.override.kw, reason=self.override.reason)
            self.clear_override()
        for holds, key in (
            (self.maintenance, "control.maintenance"),
            (self.pinned, "control.pinned"),
        ):
            gone = [k for k, h in holds.items() if h.expires_at is not None and now >= h.expires_at]
            for k in gone:
                log.info("hold_expired", rig=k, kind=key.rsplit(".", 1)[-1])
                del holds[k]
            if gone:
                self._save({key: {k: v.as_dict() for k, v in holds.items()}})
        for name, lim in list(self.external.items()):
            if lim.expires_at is not None and now >= lim.expires_at:
                del self.external[name]

    def _update_energy(self, snap: SiteSnapshot) -> dict[str, Any] | None:
        budget = self.cfg.budget
        if budget is None or self.energy is None:
            return None
        reading = snap.import_reading
        if reading is not None:
            self.energy.update(reading.import_kwh, reading.ts, self.cfg.site.timezone)
            self._save({"budget.energy": self.energy.as_dict()})
        e = self.energy
        return {
            "period": budget.period,
            "period_start": e.period_start,
            "period_end": e.period_end,
            "budget_kwh": budget.kwh,
            "used_kwh": round(e.used_kwh, 3),
            "remaining_kwh": round(budget.kwh - e.used_kwh, 3),
        }

    def limits(self, now: float) -> list[Limit]:
        c = self.control
        out = [Limit(MAX_IMPORT, c.max_import_kw, "site maximum import")]
        out += schedule_limits(self.cap_settings, now)
        if self.budget_settings is not None and self.energy is not None:
            used, end = self.energy.used_at(now, self.cfg.site.timezone)
            start, _ = period_bounds(self.budget_settings.period, self.cfg.site.timezone, now)
            out.append(pacing_limit(self.budget_settings, used, end, now, start))
        out += self.external.values()
        if self.override is not None:
            o = self.override
            out.append(Limit(OVERRIDE, o.kw, f"{o.reason} ({o.actor})", o.expires_at))
        return out

    def _learned(self, rid: str) -> Learned:
        learned = self.learned.get(rid)
        if learned is None:
            learned = self.learned[rid] = Learned()
        return learned

    def _learn(self, rig: RigView, now: float) -> None:
        t = rig.telemetry
        if t is None:
            return
        rid = rig.info.id
        mm = self.memory.get(rid)
        if mm is not None and now < mm.settle_until:
            return  # still ramping or going down: not a steady state
        if rig.state is RigState.SLEEPING and t.power_w is not None:
            learned = self._learned(rid)
            w = t.power_w
            learned.sleep_w = (
                w
                if learned.sleep_w is None
                else (learned.sleep_w + SLEEP_SMOOTHING * (w - learned.sleep_w))
            )
            return
        if rig.state is not RigState.MINING:
            return
        learned = self._learned(rid)
        profiles = self.devices.miners[rid].capabilities.profiles
        if profiles and profiles != learned.profiles:
            # The firmware's own table: each profile's hashrate, as many polls' worth.
            learned.profiles = profiles
            for watts, ths in profiles:
                if ths:
                    learned.curve = learned.curve.observe(watts, ths, FIRMWARE_WEIGHT)
        if t.power_w and t.hashrate_ths:
            learned.curve = learned.curve.observe(t.power_w, t.hashrate_ths)
        if mm is not None and mm.mode is not Mode.RUN:
            return  # below (or above) its default: not its full power
        limit = t.power_limit_w
        if t.power_w and (limit is None or abs(t.power_w - limit) <= FULL_AT_TARGET * limit):
            # At its default and at its own target (not still ramping up to it after a boot
            # rigd did not command): its full power.
            learned.full_w = max(learned.full_w or 0.0, t.power_w) if learned.full_w else t.power_w
        if t.efficiency_j_per_th:
            learned.efficiency_j_th = t.efficiency_j_per_th

    def _timing(self, model: str, key: str) -> RigTiming:
        """The model's configured timing, its wake time as learned for its kind `key`."""
        t = self._timings.get(key)
        if t is None:
            cfg = rig_timing(self.control.timing_for(model))
            t = replace(cfg, wake_s=self.wake_times.wake_s(key, cfg.wake_s))
            self._timings[key] = t
        return t

    def _learn_wakes(self, snap: SiteSnapshot, now: float) -> None:
        """Time each wake rigd sent: from its command to the first poll showing the rig's
        power at the target it was woken to (controller.core.wake_times)."""
        for rid, (t0, target, key) in list(self._waking.items()):
            rig = snap.rigs.get(rid)
            mm = self.memory.get(rid)
            if rig is None or mm is None or mm.mode not in (Mode.RUN, Mode.THROTTLE):
                del self._waking[rid]  # failed, or slept again: not a wake to time
                continue
            model = key.split("|", 1)[0]
            if now - t0 > GIVE_UP_FACTOR * self.control.timing_for(model).wake_s:
                del self._waking[rid]
                continue
            if rig.state is RigState.MINING and reached(rig.power_w, target):
                del self._waking[rid]
                self.wake_times = self.wake_times.observe(key, now - t0)
                self._timings.pop(key, None)
                log.info(
                    "wake_timed",
                    rig=rid,
                    kind=key,
                    seconds=round(now - t0, 1),
                    estimate_s=round(self._timing(model, key).wake_s, 1),
                )
                self._save({"rigs.wake_times": self.wake_times.as_dict()})

    def _fixed(self, info: RigInfo, caps: MinerCapabilities) -> _Fixed:
        """What a rig's planner input takes from the config and its firmware's
        capabilities, made again only when a driver refines its capabilities."""
        f = self._fixed_by_rig.get(info.id)
        if f is not None and f.caps is caps:
            return f
        f = _Fixed(
            caps,
            priority=self._group_priority.get(info.group or "", 0),
            can_power_target=caps.can_power_target and caps.power_target_min_w is not None,
            has_outlet=(
                info.outlet is not None
                and self.control.allow_outlet_off
                and info.outlet[0] in self._switchable_pdus
            ),
            steps=tuple(w for w, _ in caps.profiles),
        )
        self._fixed_by_rig[info.id] = f
        return f

    def _rig_input(self, rig: RigView) -> RigInput:
        info = rig.info
        rid = info.id
        caps = self.devices.miners[rid].capabilities
        fixed = self._fixed(info, caps)
        learned = self.learned.get(rid, _UNLEARNED)
        t = rig.telemetry
        model = t.identity.model if t else ""
        if model:
            assert t is not None
            key = self._kinds[rid] = kind_key(model, t.identity.firmware)
        else:
            key = self._kinds.get(rid, _NO_KIND)
            model = key.split("|", 1)[0]
        # Its full power is what it was seen to draw at its default, not its firmware's
        # highest target (an S21 may take 3,650 W and draws 3,500 at default); until seen,
        # the highest target (never under-counted), else the configured default.
        top = caps.power_target_max_w
        seen = learned.full_w
        if seen is not None and top is not None and seen < FULL_FLOOR * top:
            seen = None  # far under its highest target: not trusted as its full power
        full = seen or top or self.control.rig_default_w
        eff = learned.efficiency_j_th
        if eff is None and t is not None and rig.state is RigState.MINING:
            eff = t.efficiency_j_per_th
        timing = self._timing(model, key)
        coming = 0.0
        mm = self.memory.get(rid)
        power_w = rig.power_w
        if (
            t is not None
            and t.uptime_s is not None
            and t.uptime_s < timing.wake_s
            and rig.state in _RUNNING
            and power_w is not None
            and (mm is None or self.now() >= mm.settle_until)
        ):
            # Up for less than a wake takes, and rigd did not wake it: a power-on or a
            # reboot, still ramping to its own target.
            goal = mm.target_w if mm is not None and mm.target_w is not None else full
            coming = max(0.0, goal - power_w)
        return RigInput(
            id=rid,
            state=rig.state,
            power_w=power_w if rig.health.reachable or rig.outlet_power_w is not None else None,
            last_known_w=(t.power_w if t is not None else None) or rig.outlet_power_w,
            full_w=full,
            efficiency_j_th=eff,
            priority=fixed.priority,
            can_sleep=caps.can_sleep,
            can_power_target=fixed.can_power_target,
            min_w=caps.power_target_min_w,
            max_w=top,
            has_outlet=fixed.has_outlet,
            outlet_on=rig.outlet_on,
            timing=timing,
            maintenance=rid in self.maintenance,
            pinned=rid in self.pinned,
            busy=rid in self._inflight,
            curve=self._curve(rid, learned)
            or prior_curve(full, t.nominal_hashrate_ths if t is not None else None, eff),
            idle_w=IDLE_W if learned.sleep_w is None else learned.sleep_w,
            steps=fixed.steps,
            coming_w=coming,
        )

    def _curve(self, rig_id: str, learned: Learned) -> Any:
        """The rig's fitted value curve, refitted only when its observations changed."""
        cached = self._curves.get(rig_id)
        if cached is not None and cached[0] is learned.curve:
            return cached[1]
        # Observations change every poll (running means); a refit per band's worth of
        # change is plenty: refit when a band appeared or every tenth poll.
        if cached is not None and len(cached[0].bands) == len(learned.curve.bands):
            seen = self._curve_polls.get(rig_id, 0) + 1
            self._curve_polls[rig_id] = seen
            if seen < 10:
                return cached[1]
        self._curve_polls[rig_id] = 0
        curve = learned.curve.fit()
        self._curves[rig_id] = (learned.curve, curve)
        return curve

    def _harvest(self) -> None:
        """Fold finished actions back into memory: keep successes, undo failures."""
        changed = False
        for rig_id, task in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[rig_id]
            prior = self._prior.pop(rig_id, RigMemory())
            changed = True  # one command fewer in flight
            res = None if task.cancelled() else task.result()
            if res is not None and res.ok:
                continue
            self.memory[rig_id] = failed(prior, self.now())
        if changed:
            self._save_memory()

    def _reconcile(self, snap: SiteSnapshot, now: float) -> None:
        """Settle the commands a killed predecessor never saw land: once a command has had
        its settle time, a rig whose state contradicts it (told to wake and still asleep or
        off; told to sleep or switched off and still running) never got it, and its memory
        goes back to what it was before, so the planner decides afresh. Without this, a rig
        whose wake was lost would sleep on, as if someone else had put it to sleep."""
        changed = False
        for rig_id, prior in list(self._unconfirmed.items()):
            rig = snap.rigs.get(rig_id)
            mm = self.memory.get(rig_id)
            if rig is None or mm is None:
                del self._unconfirmed[rig_id]
                changed = True
                continue
            if now < mm.settle_until or rig.state is RigState.UNREACHABLE:
                continue  # not shown yet, or cannot be seen
            del self._unconfirmed[rig_id]
            changed = True
            running = rig.state in (RigState.MINING, RigState.WAKING)
            lost = running if mm.mode in (Mode.SLEEP, Mode.OFF) else not running
            if lost:
                log.warning(
                    "command_not_confirmed",
                    rig=rig_id,
                    mode=mm.mode.value,
                    state=rig.state.value,
                    back_to=prior.mode.value,
                )
                self.memory[rig_id] = prior
        if changed:
            self._save_memory()

    async def step(self, snap: SiteSnapshot) -> ControlStatus:
        now = self.now()
        self._expire(now)
        self._harvest()
        if self._unconfirmed:
            self._reconcile(snap, now)
        budget_doc = self._update_energy(snap)
        cap = effective_cap(self.limits(now))
        for rig in snap.rigs.values():
            self._learn(rig, now)
        if self._waking:
            self._learn_wakes(snap, now)
        reading = snap.import_reading
        reopt = now >= self._reopt_at or cap.kw != self._last_cap_kw
        if reopt:
            self._reopt_at = now + REOPT_EVERY_S
        self._last_cap_kw = cap.kw
        inp = PlanInput(
            now=now,
            cap=cap,
            settings=self.settings,
            rigs=tuple(self._rig_input(r) for r in snap.rigs.values()),
            import_kw=None if reading is None else reading.power_w / 1000.0,
            import_age_s=None if reading is None else max(0.0, now - reading.ts),
            memory=frozen_memory(self.memory),
            nonrig_kw=self.nonrig_kw,
            urgent=self.comply_by is not None,
            model=self.import_model,
            reoptimize=reopt,
        )
        timeline, self.timeline = self.timeline, None
        if timeline is not None:
            timeline.mark("plan_input")
        result = plan(inp)
        if timeline is not None:
            timeline.mark("planned")
        self.last_input, self.last_plan = inp, result
        self.nonrig_kw = result.nonrig_kw
        if result.model is not None:
            self.import_model = result.model
        if result.hashrate_ths is not None and result.attainable_ths:
            self.attainment = (result.hashrate_ths, result.attainable_ths)
        if self.dry_run:
            self._report_dry_run(result.actions)
        else:
            self._launch(result.actions, inp)
        if timeline is not None:
            timeline.mark("tasks_made")
        items: dict[str, Any] = {
            "control.nonrig_kw": self.nonrig_kw,
            "control.import_model": self.import_model.as_dict(),
        }
        if len(self.learned) != self._learned_saved[1] or not (
            0.0 <= now - self._learned_saved[0] < LEARNED_SAVE_S
        ):
            items["rigs.learned"] = self._learned_doc()
            self._learned_saved = (now, len(self.learned))
        self._save(items)
        if timeline is not None:
            timeline.mark("launched")
        held = {"maintenance": len(self.maintenance), "pinned": len(self.pinned)}
        return ControlStatus(
            cap,
            result,
            budget_doc,
            self.dry_run,
            len(self._inflight),
            held,
            cannot_shed=self._cannot_shed(inp, result, now),
            min_off_wait=min_off_wait(inp, result),
            override=self.override,
            attainment=self.attainment,
        )

    def shed_now(self, now: float, *, wave: int = FIRST_WAVE) -> int:
        """A grid order changed the limits: shed at once, before a fresh poll and snapshot.

        Planning the whole farm takes a while (about 0.13 s of CPU at 10,000 rigs), so under
        a grid deadline the planner first runs on the few rigs it would shed first (the
        least efficient running rigs free to sleep now, `_first_candidates`, and every rig
        whose command is still settling, so what is in flight is counted) with the farm's
        last metered import, and the first `wave` of its sleeps leave at once; the whole
        farm is planned on the next turn of the loop (`_shed_rest`), counting that wave in
        flight. Both run on the last cycle's input (readings at most one interval old)
        with the limits now in force, and send only shedding commands (a wake waits for
        fresh readings: the next step plans it); the full step with a fresh poll follows.

        What is stored before a command leaves is what a restarted rigd needs: the order
        (by the grid service, before its ack) and the memory of that command (by `_launch`,
        as for every command), so a rigd killed mid-burst knows which rigs it put to
        sleep. Returns the commands of the first wave."""
        last = self.last_input
        if last is None or self.dry_run:
            return 0
        timeline, self.timeline = self.timeline, None
        self._expire(now)
        self._harvest()
        inp = self._input_now(last, now)
        first: tuple[Action, ...] = ()
        if inp.urgent:  # sleeps only, the worst rigs first: a prefix of the full plan's
            sub = replace(inp, rigs=self._first_candidates(inp, 4 * wave), **self._farm_import(inp))
            result = plan(sub)
            if result.basis == "meter":
                first = self._shedding(result.actions)[:wave]
        if timeline is not None:
            timeline.mark("planned")
        self._launch(first, sub)
        if timeline is not None:
            timeline.mark("launched")
        asyncio.get_running_loop().call_soon(self._shed_rest, now)
        return len(first)

    def _input_now(self, last: PlanInput, now: float) -> PlanInput:
        """The last cycle's input at `now`, with the limits and memory now in force."""
        age = last.import_age_s
        return replace(
            last,
            now=now,
            import_age_s=None if age is None else age + max(0.0, now - last.now),
            cap=effective_cap(self.limits(now)),
            memory=frozen_memory(self.memory),
            urgent=self.comply_by is not None,
        )

    def _farm_import(self, inp: PlanInput) -> dict[str, Any]:
        """The import a plan of a few rigs must see: the meter's while fresh, else the whole
        farm's estimate as the planner makes it (rigs' power, the facility's load, the
        margin), given as a reading, since an estimate over a few rigs would be none."""
        s = self.settings
        fresh = inp.import_age_s is not None and inp.import_age_s <= s.meter_stale_s
        if inp.import_kw is not None and fresh:
            return {}
        rigs_w = sum(
            r.power_w
            if r.power_w is not None
            else (r.last_known_w if r.last_known_w is not None else r.full_w)
            for r in inp.rigs
            if r.state is not RigState.OFF
        )
        kw = (rigs_w / 1000.0 + (inp.nonrig_kw or 0.0)) * (1.0 + s.estimate_margin_pct / 100.0)
        return {"import_kw": kw, "import_age_s": 0.0}

    def _shedding(self, actions: tuple[Action, ...]) -> tuple[Action, ...]:
        return tuple(a for a in actions if a.kind in _SHEDDING and a.rig_id not in self._inflight)

    def _first_candidates(self, inp: PlanInput, k: int) -> tuple[RigInput, ...]:
        """The `k` rigs the planner sleeps first under a deadline, by its own order
        (priority, then least efficient: controller.core.planner._shed), among the running
        rigs free to sleep now (settled, past their minimum on-time), and every rig with a
        command still settling."""
        mem, now, min_on = inp.memory, inp.now, self.settings.min_on_s

        def free(r: RigInput) -> bool:
            if r.state not in _RUNNING or not r.can_sleep or r.busy or r.maintenance or r.pinned:
                return False
            mm = mem.get(r.id)
            return mm is None or (
                mm.mode is Mode.RUN
                and now >= mm.settle_until
                and now >= mm.since + min_on
                and now >= mm.retry_at
            )

        def key(r: RigInput) -> tuple[int, float, str]:
            eff = r.efficiency_j_th if r.efficiency_j_th and r.efficiency_j_th > 0 else math.inf
            return (r.priority, -eff, r.id)

        worst = heapq.nsmallest(k, filter(free, inp.rigs), key=key)
        settling = [
            r
            for r in inp.rigs
            if (mm := mem.get(r.id)) is not None and mm.expected_w is not None
            and now < mm.settle_until
        ]  # fmt: skip
        return tuple({r.id: r for r in (*worst, *settling)}.values())

    def _shed_rest(self, now: float) -> None:
        """The whole farm planned, after the first wave has started (see `shed_now`)."""
        if self.last_input is None:
            return
        inp = self._input_now(self.last_input, now)
        actions = self._shedding(plan(inp).actions)
        self._launch(actions, inp)
        log.info("grid_order_shed_now", commands=len(actions), cap_kw=round(inp.cap.kw, 3))

    def _cannot_shed(self, inp: PlanInput, result: Plan, now: float) -> dict[str, Any] | None:
        """Import stays over the target with nothing left to shed: say so once per episode
        in the log (and every cycle in the state document, the metrics and `rigctl status`),
        with what holds the rest."""
        over = shortfall_kw(result)
        if over <= 0.0:
            if self._short_since is not None:
                log.info("cannot_shed_ended", lasted_s=round(now - self._short_since, 1))
                self._short_since = None
            return None
        blockers = shed_blockers(inp)
        doc = {
            "over_kw": round(over, 3),
            "since": self._short_since if self._short_since is not None else now,
            "nonrig_kw": None if result.nonrig_kw is None else round(result.nonrig_kw, 3),
            "held": blockers,
        }
        if self._short_since is None:
            self._short_since = now
            log.warning(
                "cannot_shed_enough",
                over_kw=doc["over_kw"],
                predicted_kw=None if result.predicted_kw is None else round(result.predicted_kw, 3),
                target_kw=round(result.target_kw, 3),
                cap_kw=round(inp.cap.kw, 3),
                cap_source=inp.cap.source,
                cap_detail=inp.cap.detail,
                nonrig_kw=doc["nonrig_kw"],
                held=blockers,
            )
        return doc

    def _learned_doc(self) -> dict[str, Any]:
        return {k: v.as_dict() for k, v in self.learned.items()}

    def _launch(self, actions: tuple[Action, ...], inp: PlanInput) -> None:
        if not actions:
            return
        by_id = {r.id: r for r in inp.rigs}
        memory = dict(self.memory)
        for a in actions:
            r = by_id[a.rig_id]
            if a.kind in (ActionKind.WAKE, ActionKind.OUTLET_ON):
                self._waking[a.rig_id] = (inp.now, a.expected_w, self._kinds.get(a.rig_id, "|"))
            else:  # a new command ends the wake's timing: it changed its course
                self._waking.pop(a.rig_id, None)
            prior = self._prior[a.rig_id] = memory.get(a.rig_id, RigMemory())
            # Optimistic: count the action as in flight now; undone if it fails.
            memory[a.rig_id] = remembered(prior, a, True, inp.now, r.timing, r.full_w)
            self._inflight[a.rig_id] = asyncio.create_task(
                self.executor.execute(a), name=f"action-{a.rig_id}"
            )
        self.memory = memory
        self._save_memory()

    def _report_dry_run(self, actions: tuple[Action, ...]) -> None:
        """Log and publish what would be done, once per change of plan (not every cycle)."""
        key = tuple((a.rig_id, a.kind.value, a.watts) for a in actions)
        if key == self._last_dry:
            return
        self._last_dry = key
        for a in actions:
            self.executor.record(ActionResult(a, True, None, 0, 0.0), actor="planner", dry_run=True)

    # -- a technician's actions (through the same executor, with the same checks) --------

    def audit_change(
        self, action: str, rig_id: str | None, params: dict[str, Any], reason: str, actor: str
    ) -> None:
        """Record a change made by a person (override, maintenance) in the audit log."""
        try:
            self.store.audit(
                ts=self.now(),
                actor=actor,
                action=action,
                rig_id=rig_id,
                params=params,
                reason=reason,
                result="ok",
            )
        except StoreError as e:
            log.error("audit_write_failed", error=str(e))
        log.info("admin_change", action=action, rig=rig_id, actor=actor, reason=reason, **params)

    def check_manual(self, kind: ActionKind, rig_ids: list[str], watts: float | None) -> None:
        """Refuse, with a reason a technician understands, what the control loop would refuse."""
        inp, last = self.last_input, self.last_plan
        if inp is None or last is None:
            raise ManualRefused("not ready: rigd has not completed its first cycle yet")
        rigs = {r.id: r for r in inp.rigs}
        for rid in rig_ids:
            if rid not in rigs:
                raise ManualRefused(f"unknown rig {rid!r}")
            r = rigs[rid]
            if r.state is RigState.UNREACHABLE:
                raise ManualRefused(
                    f"{rid} is unreachable: its last error is in `rigctl rig {rid}`"
                )
            if rid in self._inflight:
                raise ManualRefused(f"{rid} has a command in flight; try again in a moment")
            if kind is ActionKind.SLEEP and not r.can_sleep:
                raise ManualRefused(f"{rid}'s firmware cannot sleep over its API")
            if kind is ActionKind.SET_POWER:
                if not r.can_power_target or r.min_w is None or r.max_w is None:
                    raise ManualRefused(f"{rid}'s firmware takes no power target")
                if watts is None or not (r.min_w <= watts <= r.max_w):
                    raise ManualRefused(
                        f"{watts} W is outside {rid}'s range {r.min_w:.0f}-{r.max_w:.0f} W"
                    )
        if kind in (ActionKind.WAKE, ActionKind.SET_POWER):
            added = 0.0
            for rid in rig_ids:
                r = rigs[rid]
                now_w = r.power_w or 0.0
                want = watts if kind is ActionKind.SET_POWER and watts is not None else r.full_w
                added += max(0.0, want - now_w) / 1000.0
            predicted = last.predicted_kw if last.predicted_kw is not None else last.measured_kw
            if predicted is None:
                raise ManualRefused("no trustworthy import reading: adding load is refused")
            # The cap in force now, not the last cycle's: an override just cleared (or set)
            # counts at once, and the refusal never quotes a limit that is gone.
            cap = effective_cap(self.limits(self.now()))
            target = self.target_kw(cap.kw)
            if added > 0 and predicted + added > target:
                raise ManualRefused(
                    f"refused: this would add {added:.1f} kW and import would reach "
                    f"{predicted + added:.1f} kW, over the {target:.1f} kW target "
                    f"(cap {cap.kw:.1f} kW set by {cap.source}: {cap.detail})"
                )

    def target_kw(self, cap_kw: float) -> float:
        """What control aims under for a cap: the cap less the headroom (as the planner)."""
        c = self.settings
        return max(0.0, cap_kw - max(c.headroom_kw, cap_kw * c.headroom_pct / 100.0))

    async def manual(
        self, kind: ActionKind, rig_ids: list[str], watts: float | None, reason: str, actor: str
    ) -> list[ActionResult]:
        """A technician's sleep, wake or power limit.

        A rig a technician slept or limited is pinned there, so the control loop does not
        undo it; waking it unpins it and hands it back to the control loop.
        """
        if not reason.strip():
            raise ManualRefused("a reason is required (--reason)")
        self.check_manual(kind, rig_ids, watts)
        assert self.last_input is not None
        rigs = {r.id: r for r in self.last_input.rigs}
        actions = []
        for rid in rig_ids:
            r = rigs[rid]
            expected = {ActionKind.SLEEP: r.idle_w, ActionKind.WAKE: r.full_w}.get(
                kind, watts or r.full_w
            )
            actions.append(Action(rid, kind, f"technician: {reason}", watts, expected))
        # In flight like the planner's own commands: the cycles running meanwhile see these
        # rigs as busy, and a daemon killed now settles them at its next start.
        memory = dict(self.memory)
        tasks: dict[str, asyncio.Task[ActionResult]] = {}
        for a in actions:
            r = rigs[a.rig_id]
            prior = self._prior[a.rig_id] = memory.get(a.rig_id, RigMemory())
            memory[a.rig_id] = remembered(prior, a, True, self.now(), r.timing, r.full_w)
            tasks[a.rig_id] = self._inflight[a.rig_id] = asyncio.create_task(
                self.executor.execute(a, actor=actor), name=f"manual-{a.rig_id}"
            )
        self.memory = memory
        self._save_memory()
        results = await asyncio.gather(*tasks.values())
        for a, res in zip(actions, results, strict=True):
            if self._inflight.get(a.rig_id) is tasks[a.rig_id]:  # else a cycle harvested it
                del self._inflight[a.rig_id]
                prior = self._prior.pop(a.rig_id, RigMemory())
                if not res.ok:
                    self.memory[a.rig_id] = failed(prior, self.now())
            if not res.ok:
                continue
            if kind is ActionKind.WAKE:
                self.pinned.pop(a.rig_id, None)
            else:
                self.pinned[a.rig_id] = Hold(f"{kind.value} by technician: {reason}", actor)
        self._save_memory()
        self._save({"control.pinned": {k: v.as_dict() for k, v in self.pinned.items()}})
        return list(results)

    async def close(self) -> None:
        """Let in-flight actions finish (briefly): a cut-off command is worse than a late one.

        A command still unanswered after that may or may not have landed: it is left
        unconfirmed (as if this daemon had been killed), and the next controller settles it
        against what the rig shows (`_reconcile`), rather than booking it as failed."""
        tasks = list(self._inflight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        cut = [rid for rid, t in self._inflight.items() if not t.done()]
        for rid in cut:
            self._inflight.pop(rid).cancel()
            self._unconfirmed[rid] = self._prior.pop(rid, RigMemory())
            log.warning("command_cut_off_at_stop", rig=rid, mode=self.memory[rid].mode.value)
        await self.executor.drain()
        self._harvest()
        if cut:
            self._save_memory()
        self._save({"rigs.learned": self._learned_doc()})
