"""A harness for control-loop scenarios over hours of farm time in seconds of wall time.

The daemon runs its real cycle (poll, plan, execute, publish) against the farm model
through in-process adapters (`controller.cli.direct_farm`), on a `ManualClock` that only the
harness advances. Between polls it samples the farm's *true* import (not the noisy
meter the daemon sees) against the cap in force, at finer steps than the poll
interval, because an overshoot between two polls is still an overshoot on the bill.

Typical use::

    h = SimHarness.create(tmp_path, rigs=40, control={"headroom_pct": 2})
    h.at(h.now + 603, lambda: h.set_override(40, 3600))  # between two polls
    await h.run_for(3 * 3600)
    print(h.recorder.report().line("cap drop"))
    await h.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.adapters.mqtt import MqttLink
from controller.adapters.store import AuditEntry, StateStore
from controller.cli.direct_farm import DirectAdapters, build_direct_devices
from controller.config import Config, MqttConfig, parse_config
from controller.core.caps import Cap, Limit, effective_cap
from controller.core.status import CycleResult, Override
from controller.runtime.control import Controller
from controller.runtime.daemon import Daemon
from simulators.clock import ManualClock
from simulators.farm import Farm, SimRig

START = 1_764_547_200.0  # 2025-12-01 00:00 UTC: a Monday, the first of a 31-day month


# -- the MQTT link that never connects ---------------------------------------------------------


class OfflineLink(MqttLink):
    """Records what would be published, and never opens a socket."""

    def __init__(self, site: str) -> None:
        super().__init__(MqttConfig(), site)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self, task: asyncio.Task[None] | None) -> None:
        self._stopping = True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def events(self) -> list[dict[str, Any]]:
        """Every queued event document (action records), oldest first."""
        return [json.loads(p) for topic, p in self._events if topic.endswith("/events")]

    def retained(self, subtopic: str) -> Any:
        return json.loads(self._retained[f"{self.base}/{subtopic}"])


# -- config for a farm ------------------------------------------------------------------------


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def farm_config(
    farm: Farm,
    state_dir: Path,
    *,
    interval_s: float = 10.0,
    control: Mapping[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
    groups: Mapping[str, int] | None = None,
    rig_groups: Mapping[str, str] | None = None,
    physical_timing: bool = True,
) -> Config:
    """A validated daemon config for `farm`, as a technician would write it.

    Every outlet is mapped and switchable (a write community is set). With
    `physical_timing` the [control.timing] table states each model's real response
    times (boot plus ramp for a wake), as a site tuned for its hardware would.
    """
    timeout = round(min(2.0, interval_s / 4), 3)
    out = [
        "[site]",
        'id = "simsite"',
        'timezone = "UTC"',
        f"state_dir = {json.dumps(str(state_dir))}",
        "",
        "[poll]",
        f"interval_s = {interval_s!r}",
        f"timeout_s = {timeout!r}",
        "retries = 0",
        "",
        "[[meters]]",
        f"id = {json.dumps(farm.meter.id)}",
        'host = "127.0.0.1"',
        "port = 502",
    ]
    for pid, pdu in farm.pdus.items():
        outlets = {str(n): o.rig.id for n, o in pdu.outlets.items() if o.rig is not None}
        out += [
            "",
            "[[pdus]]",
            f"id = {json.dumps(pid)}",
            'host = "127.0.0.1"',
            'write_community = "private"',
            f"outlets = {_toml(outlets)}",
        ]
    for name, prio in (groups or {}).items():
        out += ["", f"[groups.{json.dumps(name)}]", f"priority = {prio}"]
    for n, rig in enumerate(farm.rigs.values()):
        out += [
            "",
            "[[miners]]",
            f"id = {json.dumps(rig.id)}",
            'host = "127.0.0.1"',
            f"port = {10_000 + n}",
            f'driver = "{"luxos" if rig.firmware == "luxos" else "cgminer"}"',
        ]
        group = (rig_groups or {}).get(rig.id)
        if group is not None:
            out.append(f"group = {json.dumps(group)}")
    if control is not None:
        out += ["", "[control]"] + [f"{k} = {_toml(v)}" for k, v in control.items()]
        if physical_timing and "timing" not in control:
            models = {r.model.name: r.model for r in farm.rigs.values()}
            for name, m in sorted(models.items()):
                out += [
                    "",
                    f"[control.timing.{json.dumps(name)}]",
                    f"sleep_s = {m.sleep_s!r}",
                    f"wake_s = {m.boot_s + m.wake_ramp_s!r}",
                    f"power_change_s = {m.target_change_s!r}",
                ]
    if budget is not None:
        out += ["", "[budget]"] + [f"{k} = {_toml(v)}" for k, v in budget.items()]
    return parse_config("\n".join(out) + "\n", source="<sim>", environ={})


# -- measuring import against the cap -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """Time over cap and worst overshoot, overall and outside the settling windows."""

    seconds: float
    over_frac: float
    worst_kw: float  # the largest (true import - cap); negative if never over
    settled_seconds: float
    over_frac_settled: float
    worst_kw_settled: float

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.seconds / 3600:.2f} h, over cap {100 * self.over_frac:.2f} % of time "
            f"(worst {max(0.0, self.worst_kw):.2f} kW); after settling "
            f"{100 * self.over_frac_settled:.2f} % (worst {max(0.0, self.worst_kw_settled):.2f} kW)"
        )


@dataclass(slots=True)
class Sample:
    t: float
    dt: float  # farm seconds this sample stands for
    import_kw: float  # true import, no meter noise
    cap_kw: float
    settling: bool  # inside a settling window after a cap drop or a load step


@dataclass(slots=True)
class Recorder:
    """Samples of true import against the cap, and the settling windows.

    A window opens whenever the cap falls (automatically) or a test marks a
    disturbance (a load step, a fault), and lasts `settle_s`: the physical time the
    farm needs to obey, which a control loop cannot beat.
    """

    settle_s: float
    samples: list[Sample] = field(default_factory=list)
    _last_cap: float | None = None
    _settle_until: float = -math.inf

    def mark(self, t: float, settle_s: float | None = None) -> None:
        window = self.settle_s if settle_s is None else settle_s
        self._settle_until = max(self._settle_until, t + window)

    def add(self, t: float, dt: float, import_kw: float, cap_kw: float) -> None:
        if self._last_cap is not None and cap_kw < self._last_cap - 1e-6:
            self.mark(t - dt)  # the cap fell somewhere in the last dt
        self._last_cap = cap_kw
        self.samples.append(Sample(t, dt, import_kw, cap_kw, t <= self._settle_until))

    def report(self, since: float = -math.inf, until: float = math.inf) -> Report:
        window = [s for s in self.samples if since <= s.t <= until]
        settled = [s for s in window if not s.settling]

        def frac(ss: list[Sample]) -> tuple[float, float, float]:
            total = sum(s.dt for s in ss)
            over = sum(s.dt for s in ss if s.import_kw > s.cap_kw)
            worst = max((s.import_kw - s.cap_kw for s in ss), default=-math.inf)
            return total, (over / total if total else 0.0), worst

        total, f_all, w_all = frac(window)
        total_s, f_set, w_set = frac(settled)
        return Report(total, f_all, w_all, total_s, f_set, w_set)

    def over_times(self, since: float = -math.inf) -> list[float]:
        return [s.t for s in self.samples if s.t >= since and s.import_kw > s.cap_kw]


# -- the harness -------------------------------------------------------------------------------


Callback = Callable[[], object]


def stop_time_s(farm: Farm, interval_s: float) -> float:
    """The farm's physical stop time: its slowest power-down response (a power-target change
    or a sleep) plus two poll intervals; "over the cap" is counted only after it."""
    slowest = max(max(r.model.target_change_s, r.model.sleep_s) for r in farm.rigs.values())
    return slowest + 2 * interval_s


class SimHarness:
    """A farm on a manual clock, the daemon driving it through direct adapters, and a recorder."""

    def __init__(
        self,
        tmp_path: Path,
        farm: Farm,
        clock: ManualClock,
        cfg: Config,
        *,
        substep_s: float,
        settle_s: float,
        dry_run: bool = False,
    ) -> None:
        self.tmp_path = tmp_path
        self.farm = farm
        self.clock = clock
        self.cfg = cfg
        self.substep_s = substep_s
        self.dry_run = dry_run
        self.recorder = Recorder(settle_s)
        self.recorder.mark(clock.now())  # the farm starts at full power, whatever the cap
        self._timeline: list[tuple[float, int, Callback]] = []
        self._seq = 0
        self._closed = False
        self.daemon = self._new_daemon()

    @classmethod
    def create(
        cls,
        tmp_path: Path,
        *,
        rigs: int = 40,
        pdus: int = 4,
        models: dict[str, float] | None = None,
        seed: int = 7,
        start: float = START,
        overhead_base_w: float = 4_000.0,
        stock: tuple[str, ...] = (),
        interval_s: float = 10.0,
        substep_s: float | None = None,
        settle_s: float | None = None,
        control: Mapping[str, Any] | None = None,
        budget: Mapping[str, Any] | None = None,
        groups: Mapping[str, int] | None = None,
        rig_groups: Mapping[str, str] | None = None,
        dry_run: bool = False,
        max_import_pct: float = 105.0,
        physical_timing: bool = True,
    ) -> SimHarness:
        """Build farm, config and daemon.

        `control` defaults `max_import_kw` to `max_import_pct` % of the farm's flat-out
        import; `stock` lists rigs on stock firmware (no API control). The settling
        window defaults to the slowest power-down response (power-target change or sleep)
        plus two poll intervals. `physical_timing=False` leaves the models' response times
        out of the config: rigd then starts from its default prior and learns them.
        """
        clock = ManualClock(start)
        farm = Farm.build(clock, rigs=rigs, pdus=pdus, models=models, seed=seed)
        farm.meter.overhead_base_w = overhead_base_w  # a small farm's own small overhead
        for rid in stock:
            farm.rigs[rid].firmware = "bmminer"
        ctl: dict[str, Any] = {}
        if control is not None:
            ctl = {"max_import_kw": round(flat_out_kw(farm) * max_import_pct / 100, 1)}
            ctl.update(control)
        cfg = farm_config(
            farm,
            tmp_path / "state",
            interval_s=interval_s,
            control=ctl if control is not None else None,
            budget=budget,
            groups=groups,
            rig_groups=rig_groups,
            physical_timing=physical_timing,
        )
        return cls(
            tmp_path,
            farm,
            clock,
            cfg,
            substep_s=substep_s or min(interval_s, 2.0),
            settle_s=settle_s if settle_s is not None else stop_time_s(farm, interval_s),
            dry_run=dry_run,
        )

    def _new_daemon(self) -> Daemon:
        self.devices = build_direct_devices(self.farm, self.cfg)
        self.link = OfflineLink(self.cfg.site.id)
        return Daemon(
            self.cfg, clock=self.clock, devices=self.devices, link=self.link, dry_run=self.dry_run
        )

    # -- accessors ------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now()

    @property
    def controller(self) -> Controller:
        c = self.daemon.controller
        assert c is not None, "the config has no [control]"
        return c

    @property
    def store(self) -> StateStore:
        s = self.daemon.store
        assert s is not None
        return s

    @property
    def direct(self) -> DirectAdapters:
        return self.devices.direct

    @property
    def interval_s(self) -> float:
        return self.cfg.poll.interval_s

    def rig(self, rig_id: str) -> SimRig:
        return self.farm.rigs[rig_id]

    def true_import_kw(self, t: float | None = None) -> float:
        return self.farm.meter.true_power_w(self.now if t is None else t) / 1000.0

    def hashrate_ths(self) -> float:
        t = self.now
        return sum(r.hashrate_ths(t) for r in self.farm.rigs.values() if r.powered)

    def cap(self, t: float | None = None) -> Cap:
        """The effective cap at `t` from the limits in force, without side effects.

        Limits past their expiry are dropped here (the daemon drops them at its next
        cycle); the energy counter is copied so that computing the pacing limit
        cannot roll its period early.
        """
        t = self.now if t is None else t
        c = self.controller
        saved = c.energy
        if saved is not None:
            c.energy = dataclasses.replace(saved)
        try:
            limits = [x for x in c.limits(t) if x.expires_at is None or t < x.expires_at]
        finally:
            c.energy = saved
        return effective_cap(limits)

    def events(self) -> list[dict[str, Any]]:
        return self.link.events()

    def audit(self, since: float = -math.inf) -> list[AuditEntry]:
        return self.store.audit_since(since if math.isfinite(since) else 0.0)

    def command_counts(self) -> dict[str, int]:
        return {rid: r.command_count for rid, r in self.farm.rigs.items()}

    def outlet_commands(self) -> int:
        return sum(len(p.commands) for p in self.direct.pdus.values())

    # -- what tests do to the farm ------------------------------------------------------

    def set_override(self, kw: float, duration_s: float, reason: str = "test") -> Override:
        return self.controller.set_override(kw, self.now + duration_s, reason, "sim")

    def set_external(self, source: str, kw: float | None, detail: str = "grid order") -> None:
        lim = None if kw is None else Limit(source, kw, detail)
        self.controller.set_external(source, lim)

    def at(self, t: float, fn: Callback) -> None:
        """Run `fn` when the clock reaches farm time `t` (between polls, to the substep)."""
        self._seq += 1
        self._timeline.append((t, self._seq, fn))
        self._timeline.sort(key=lambda x: (x[0], x[1]))

    # -- running ------------------------------------------------------------------------

    def _sample(self, dt: float) -> None:
        t = self.now
        self.recorder.add(t, dt, self.true_import_kw(t), self.cap(t).kw)

    def _advance(self, seconds: float) -> None:
        """Move the clock, firing due callbacks at their exact times, sampling as it goes."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            nxt = min(end, self.now + self.substep_s)
            if self._timeline and self._timeline[0][0] < nxt:
                nxt = max(self.now, self._timeline[0][0])
            dt = nxt - self.now
            self.clock.advance(dt)
            while self._timeline and self._timeline[0][0] <= self.now + 1e-9:
                _, _, fn = self._timeline.pop(0)
                fn()
            if dt > 0:
                self._sample(dt)

    async def settle_tasks(self) -> None:
        """Let the executor's tasks run: the adapters finish them without real waiting."""
        for _ in range(50):
            await asyncio.sleep(0)
            pending = [
                t
                for t in asyncio.all_tasks()
                if t.get_name().startswith("action-") and not t.done()
            ]
            if not pending:
                return

    async def step(self) -> CycleResult:
        """One poll interval: the daemon's cycle now, then the farm runs to the next poll."""
        result = await self.daemon.cycle()
        await self.settle_tasks()
        self._advance(self.interval_s)
        return result

    async def run_for(
        self, seconds: float, each: Callable[[CycleResult], object] | None = None
    ) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            r = await self.step()
            if each is not None:
                each(r)

    async def run_until(
        self, t: float, each: Callable[[CycleResult], object] | None = None
    ) -> None:
        await self.run_for(t - self.now, each)

    # -- lifecycle ------------------------------------------------------------------------

    async def close_daemon(self) -> None:
        """What `Daemon.run` does on stop: finish actions, close link, devices and store."""
        d = self.daemon
        if d.controller is not None:
            await d.controller.close()
        await d.link.close(None)
        await d.devices.close()
        if d.store is not None:
            d.store.close()

    async def restart(self, downtime_s: float = 0.0) -> None:
        """Stop the daemon, let the farm run on without it, start a new one on the same state."""
        await self.close_daemon()
        self._advance(downtime_s)
        self.daemon = self._new_daemon()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.close_daemon()


# -- farm arithmetic ---------------------------------------------------------------------------


def flat_out_kw(farm: Farm) -> float:
    """True import with every rig at its nominal power (no ripple)."""
    m = farm.meter
    rigs_w = sum(r.model.nominal_w for r in farm.rigs.values())
    return (m.overhead_base_w + rigs_w * (1.0 + m.overhead_frac)) / 1000.0


def sleep_only_hashrate_ths(farm: Farm, cap_kw: float) -> float:
    """Hashrate if `cap_kw` were met by sleeping whole rigs only, best J/TH kept running.

    The comparison for throttling: every rig either at nominal or asleep at idle, and
    the most efficient set that fits (greedy by efficiency, which is optimal enough
    for near-identical rig sizes).
    """
    m = farm.meter
    rigs = sorted(farm.rigs.values(), key=lambda r: r.model.nominal_w / r.model.nominal_ths)
    budget_w = cap_kw * 1000.0 - m.overhead_base_w
    used = sum(r.model.idle_w for r in rigs) * (1.0 + m.overhead_frac)
    ths = 0.0
    for r in rigs:
        extra = (r.model.nominal_w - r.model.idle_w) * (1.0 + m.overhead_frac)
        if used + extra <= budget_w:
            used += extra
            ths += r.model.nominal_ths
    return ths
