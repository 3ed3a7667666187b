"""The daemon's run loop: poll every device each interval, then publish the farm's state.

Data flows one way: devices -> SiteState -> frozen SiteSnapshot -> MQTT (and any
other consumer). A device failing, hanging or answering garbage costs only its
own reading: each read is bounded in time and its error recorded as health, so
the cycle always completes and the daemon keeps its cadence.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from controller.adapters import autodiscover, patience
from controller.adapters.admin import AdminServer
from controller.adapters.discovery import Found
from controller.adapters.mqtt import MqttLink
from controller.adapters.store import StateStore, StoreError
from controller.adapters.zones import ZoneService
from controller.config import Config, ConfigError, ConfigIssue, load_config
from controller.core import rig_updates
from controller.core.snapshot import Health, SiteSnapshot
from controller.core.status import ControlStatus, CycleResult
from controller.runtime import eventloop
from controller.runtime.clock import Clock, StepGuard, Stopwatch, SystemClock
from controller.runtime.control import Controller
from controller.runtime.devices import Devices, build_devices
from controller.runtime.exports import Exports
from controller.runtime.grid_service import GridService
from controller.runtime.state import SiteState
from controller.runtime.watchdog import ReadWatchdog
from drivers.errors import DeviceError, DeviceTimeout

if TYPE_CHECKING:
    from controller.runtime.openadr_service import OpenADRService

log = structlog.get_logger(__name__)

STARVED_SHARE = 0.5  # of the poll timeout: a read timed out this late was the host's fault
STARVED_MISSES = 3  # such timeouts in a row that keep a rig's last reading, at most
STARVED_WHY = "timed out while this host could not run rigd"


SnapshotHook = Callable[[CycleResult], Awaitable[None] | None]


class _Reader(Protocol):
    def read(self, ts: float) -> Awaitable[Any]: ...


_Sink = Callable[..., None]
_HealthOf = Callable[[str], Health]
_Job = tuple[str, str, _Reader, _Sink, _Sink, _HealthOf]  # kind, id, driver, ok, failed, health


def _timed_out(e: DeviceError) -> bool:
    """A timeout of ours, waiting for a reply or for a connection (a refusal is not)."""
    return isinstance(e, DeviceTimeout) or isinstance(e.__cause__, TimeoutError)


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock | None = None,
        devices: Devices | None = None,
        link: MqttLink | None = None,
        on_snapshot: SnapshotHook | None = None,
        dry_run: bool = False,
        config_path: str | None = None,
        settle_gc: bool = False,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # where `reload` reads the config again
        # Freeze start-up objects out of the collector's walks (controller/runtime/eventloop.py):
        # for a process that is only this daemon, not for one shared with tests.
        self._settle_gc = settle_gc
        self.dry_run = dry_run
        self._cycle_lock = asyncio.Lock()
        # Epoch time that cannot step between two cycles: see controller/runtime/clock.py.
        self.clock = StepGuard(clock or SystemClock())
        self.store: StateStore | None = None
        # The config as written; `self.cfg` has its `driver = "auto"` ranges resolved to the
        # miners found in them (controller/adapters/autodiscover.py), remembered ones from cycle 1.
        self.source_cfg = cfg
        self.found = self._remembered_miners(cfg)
        cfg = self.cfg = autodiscover.resolve(cfg, self.found)
        self.devices = devices or build_devices(cfg)
        self.state = SiteState.of(cfg.site.id, self.devices)
        self.link = link if link is not None else MqttLink(cfg.mqtt, cfg.site.id)
        self.link.refill.append(self._refill_rigs)
        self.on_snapshot = on_snapshot
        # What each rig's retained topic shows, and when it was sent (core/rig_updates.py).
        self._published: dict[str, rig_updates.Sent] = {}
        self._polled_all = False  # every device read once: a cycle may then skip the rigs
        self.snapshot: SiteSnapshot | None = None
        self.last: CycleResult | None = None
        # Reads that timed out while the host starved the loop (see `_host_starved`).
        self._lag: patience.LoopLag | None = None
        self._starved: dict[str, int] = {}
        self._starved_reads = 0
        self._poll_task: asyncio.Task[Any] | None = None  # the task running `_read_all`
        self._cut = False  # `_read_all`'s reads cancelled by it (see `_poll_cancelled`)
        # Opened before anything else runs: remembered sleeps and caps apply from cycle 1.
        self.controller = self._make_controller(cfg)
        self.grid: GridService | None = None
        if cfg.grid is not None and cfg.grid.enabled and self.store is not None:
            # Before the first connect: the limits of orders in force apply from cycle 1.
            self.grid = GridService(cfg, self.store, self.link, now=self.clock.now)
            self.grid.on_lowered = self.shed_now  # an order's first commands, as it lands
            if self.controller is not None:
                self.grid.attach(self.controller)
        # An OpenADR VTN's events: orders in the same book (runtime/openadr_service.py).
        self.openadr: OpenADRService | None = None
        if cfg.openadr is not None and cfg.openadr.enabled and self.store is not None:
            # Imported here: its HTTP client (aiohttp) costs ~20 MB a farm without a VTN saves.
            from controller.runtime.openadr_service import (
                OpenADRService,
                grid_config_for_openadr,
            )

            if self.grid is None:  # no signed orders: a book for OpenADR's alone
                self.grid = GridService(
                    grid_config_for_openadr(cfg), self.store, None, now=self.clock.now
                )
                if self.controller is not None:
                    self.grid.attach(self.controller)
            self.openadr = OpenADRService(cfg, self.grid, self.store, clock=self.clock)
        # A zone of a shared site: its share of the site's cap is a limit like an order's.
        self.zones: ZoneService | None = None
        if cfg.zone is not None:
            self.zones = ZoneService(cfg, self.link, now=self.clock.now)
            self.zones.attach(self.controller)
        # Metrics, history and Home Assistant: after the grid service (they share its link).
        self.exports = Exports(self)
        self._apply_poll(cfg)
        self._clock_stepped(self.clock.step_since(self._saved_mark()), startup=True)

    # -- one cycle ------------------------------------------------------------------

    async def _read(
        self, job: _Job, ts: float, task: asyncio.Task[Any], guard: ReadWatchdog
    ) -> None:
        """Read one device into the state. A read is bounded by the driver's own timeouts;
        `guard` (one timer for the whole poll) only ends a driver that hangs."""
        kind, dev_id, driver, ok, failed, health_of = job
        health = health_of(dev_id)
        was = health.reachable
        # No semaphore: the poll's workers are `poll.concurrency` at most (`_read_all`).
        for again in (False, True):
            before = self._lag.late_s if self._lag is not None else 0.0
            guard.begin(task)
            try:
                reading = await driver.read(ts)
            except DeviceError as e:
                if _timed_out(e) and self._starved_since(before):
                    # The host's fault, not the device's (see `_starved_since`).
                    if kind == "meter" and not again:
                        log.info("meter_read_again", device=dev_id, why=STARVED_WHY)
                        continue
                    if kind == "miner" and self._keep_last(dev_id):
                        break
                self._starved.pop(dev_id, None)
                failed(dev_id, ts, e)
            except asyncio.CancelledError as e:
                if guard.fired(task):
                    failed(
                        dev_id,
                        ts,
                        DeviceError(f"no answer within {guard.limit_s:.1f} s", device=dev_id),
                    )
                    log.error("driver_hung", kind=kind, device=dev_id)
                elif task.cancelling() == 0 or not self._poll_cancelled():
                    # Nobody cancelled this poll: a library gave up on a future of
                    # its own (aiohttp may, under load), or cancelled the task it ran
                    # in (grpclib does when a connection it made earlier is lost; seen
                    # on the benchmark farm, where it stopped the daemon). A bug of the
                    # driver's, like any exception: this device's reading fails, its
                    # stray cancellation is taken back, and the poll goes on.
                    while task.cancelling():
                        task.uncancel()
                    failed(dev_id, ts, DeviceError("read cancelled by the driver", device=dev_id))
                    log.error("driver_cancelled", kind=kind, device=dev_id, exc_info=e)
                else:
                    raise
            except Exception as e:  # a driver bug must not stop the farm's control
                failed(dev_id, ts, e)
                log.exception("driver_error", kind=kind, device=dev_id)
            else:
                self._starved.pop(dev_id, None)
                ok(dev_id, reading)
            finally:
                guard.end(task)
            break
        # Log changes only: a farm of thousands of rigs must not log every first contact.
        if health.reachable is False and was is not False:
            # A rig behind an outlet known to be off is silent by design, not a fault.
            expected = kind == "miner" and self.state.outlet_known_off(dev_id)
            (log.info if expected else log.warning)(
                "device_unreachable",
                outlet_off=expected,
                kind=kind,
                device=dev_id,
                error=health.last_error,
                error_kind=health.last_error_kind,
            )
        elif health.reachable and was is False:
            log.info("device_recovered", kind=kind, device=dev_id)

    def _poll_cancelled(self) -> bool:
        """Whether the poll itself is being cancelled (cut by a grid order, or the task
        running it cancelled: a stop), as opposed to a library cancelling one read."""
        poll = self._poll_task
        return self._cut or (poll is not None and poll.cancelling() > 0)

    def _starved_since(self, late_before: float) -> bool:
        """Whether a read that timed out did so because this host could not run us.

        On a host whose cores are busy (an edge host rarely is idle) the event loop comes
        round late, and a reply that arrived in time is read after its timeout has fired
        (the timeout's callback runs in the same turn and cancels the read): the device is
        not silent, the host was. That is a timeout during which the loop ran late by at
        least half the poll timeout. The import meter is then read again at once (control
        needs its import now, never an old one); a rig keeps its last reading instead of
        turning unreachable (`_keep_last`); a PDU fails as usual."""
        lag = self._lag
        return lag is not None and lag.late_s - late_before >= STARVED_SHARE * self._timeout_s

    def _keep_last(self, rig_id: str) -> bool:
        """At most `STARVED_MISSES` starved timeouts in a row keep a rig's last reading (it
        ages as usual): a rig that really went silent on a host that stays starved is
        marked unreachable all the same."""
        misses = self._starved.get(rig_id, 0) + 1
        if misses > STARVED_MISSES:
            return False
        self._starved[rig_id] = misses
        self._starved_reads += 1
        return True

    async def poll_cycle(self, *, rigs: bool = True) -> SiteSnapshot:
        """Read every device (`rigs` False: the meters only, the rigs' last readings kept)."""
        st, devs = self.state, self.devices
        ts = self.clock.now()
        work = Stopwatch()
        jobs: list[_Job] = []
        kinds: tuple[tuple[str, Mapping[str, _Reader], _Sink, _Sink, _HealthOf], ...] = (
            ("miner", devs.miners if rigs else {}, st.rig_ok, st.rig_failed, st.rig_health),
            ("meter", devs.meters, st.meter_ok, st.meter_failed, st.meter_health),
            ("pdu", devs.pdus if rigs else {}, st.pdu_ok, st.pdu_failed, st.pdu_health),
        )
        for kind, drivers, ok, failed, health in kinds:
            for dev_id, driver in drivers.items():
                jobs.append((kind, dev_id, driver, ok, failed, health))
        self._starved_reads = 0
        async with patience.LoopLag() as lag:
            self._lag = lag
            try:
                cut = await self._read_all(jobs, ts, stop_on_kick=rigs and self._polled_all)
                if cut:  # by a grid order: decide on a fresh import reading all the same
                    self._mark("poll_cut")
                    await self._read_all([j for j in jobs if j[0] == "meter"], ts)
                    self._mark("meter_read")
            finally:
                self._lag = None
        if self._starved_reads:
            log.warning(
                "poll_starved",
                devices=self._starved_reads,
                loop_late_s=round(lag.late_s, 2),
                why=STARVED_WHY + "; their last readings kept",
            )
        if rigs and not cut:
            if not self._polled_all and self._settle_gc:
                eventloop.settle_gc()  # drivers, state and a first reading of every rig
            self._polled_all = True
        st.cycle += 1
        snap = st.snapshot(ts, work.elapsed())
        self._mark("snapshot")
        self.snapshot = snap
        return snap

    def shed_now(self) -> None:
        """A grid order changed the limits (called by the grid service once the order is
        stored): its first commands leave now, planned on the last readings
        (controller.runtime.control.Controller.shed_now), without waiting for the poll to be
        cut, the meter read afresh and the whole farm planned again, which follow."""
        grid, ctl = self.grid, self.controller
        if grid is None or ctl is None or grid.timeline is None:
            return
        timeline, grid.timeline = grid.timeline, None
        ctl.timeline = ctl.executor.timeline = timeline
        try:
            grid.before_step(self.clock.now(), ctl)
            ctl.shed_now(self.clock.now())
        except Exception:  # the full step follows: a fault here must not stop it
            log.exception("shed_now_failed")

    def _mark(self, name: str) -> None:
        """A step of a grid order's way to its first command (controller/runtime/timeline.py)."""
        if self.grid is not None and self.grid.timeline is not None:
            self.grid.timeline.mark(name)

    async def _read_all(self, jobs: list[_Job], ts: float, *, stop_on_kick: bool = False) -> bool:
        """Read the devices `poll.concurrency` at a time (as many workers, not a task per
        device: 10,000 waiting tasks cost memory and time). With `stop_on_kick`, a grid order
        that changes the limits stops the reads and this returns True: control then acts at
        once on the readings so far, the rest being the last cycle's, since reading a farm
        of thousands of rigs takes seconds and a grid deadline cannot wait for it."""
        todo = iter(jobs)
        self._poll_task, self._cut = asyncio.current_task(), False
        ctl = self.controller
        executor = ctl.executor if ctl is not None else None
        # Commands go first, but a burst of failing rigs must not stall the poll for good.
        waited, wait_at_most = Stopwatch(), self.cfg.poll.interval_s

        async def worker(guard: ReadWatchdog) -> None:
            task = asyncio.current_task()
            assert task is not None
            for job in todo:  # shared: each job once
                if executor is not None and job[0] != "meter" and executor.queued:
                    left = wait_at_most - waited.elapsed()
                    if left > 0:  # commands first (controller/runtime/executor.py), for a while
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(left):
                                await executor.room_for_reads()
                await self._read(job, ts, task, guard)

        with ReadWatchdog(self._guard_s) as guard:
            n = min(self._concurrency, len(jobs))
            reads = asyncio.gather(*(worker(guard) for _ in range(n)))
            return await self._until_kicked(reads, todo, stop_on_kick)

    async def _until_kicked(
        self, reads: asyncio.Future[list[None]], todo: Iterator[_Job], stop_on_kick: bool
    ) -> bool:
        """Wait for the reads; with `stop_on_kick`, cancel them if a grid order changes the
        limits first (True: the poll was cut, see `_read_all`)."""
        kick = self.grid.kick if self.grid is not None and stop_on_kick else None
        if kick is None:
            await reads
            return False
        kicked = asyncio.ensure_future(kick.wait())
        cut = False
        try:
            await asyncio.wait((reads, kicked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            if not reads.done():  # a grid order, or this cycle itself cancelled
                self._cut = True
                cut = reads.cancel()
                await asyncio.wait((reads,))
        if not cut:
            reads.result()
            return False
        with contextlib.suppress(asyncio.CancelledError):
            reads.exception()  # retrieved: it is the cancellation just made
        left = sum(1 for _ in todo)
        log.info("poll_cut_short", reason="grid limits changed", devices_not_read=left)
        return True

    async def cycle(self, *, rigs: bool = True) -> CycleResult:
        """Poll, decide, publish: one turn of the loop. `rigs` False reads the meters only
        (a grid order between two cycles: decide now rather than after a full poll)."""
        async with self._cycle_lock:
            return await self._cycle(rigs=rigs or not self._polled_all)

    async def reload(self) -> list[str]:
        """Read the config file again and apply it between two cycles, keeping state.

        A config that does not validate raises ConfigError and changes nothing. Control
        state (what rigd commanded, energy counter, overrides, holds) lives in the state
        database and is read back by the new controller; device health and readings are
        carried over for devices that stay. Returns notes on settings that only take
        effect after a restart.
        """
        if self.config_path is None:
            raise ConfigError([ConfigIssue("", "this daemon was not started from a file")])
        new = await asyncio.to_thread(load_config, self.config_path)
        notes = []
        for name, old_v, new_v in (
            ("site.id", self.cfg.site.id, new.site.id),
            ("site.state_dir", self.cfg.site.state_dir, new.site.state_dir),
            ("mqtt", self.cfg.mqtt, new.mqtt),
            ("admin", self.cfg.admin, new.admin),
            ("grid", self.cfg.grid, new.grid),
            ("zone", self.cfg.zone, new.zone),
            ("metrics", self.cfg.metrics, new.metrics),
            ("history", self.cfg.history, new.history),
            ("homeassistant", self.cfg.homeassistant, new.homeassistant),
            ("openadr", self.cfg.openadr, new.openadr),
        ):
            if old_v != new_v:
                notes.append(f"{name} changed: takes effect after a restart")
        source = new.model_copy(
            update={
                "site": self.cfg.site,
                "mqtt": self.cfg.mqtt,
                "admin": self.cfg.admin,
                "grid": self.cfg.grid,
                "zone": self.cfg.zone,
                "metrics": self.cfg.metrics,
                "history": self.cfg.history,
                "homeassistant": self.cfg.homeassistant,
                "openadr": self.cfg.openadr,
            }
        )
        async with self._cycle_lock:
            # Rigs found in a range the new config still has stay; the rest are forgotten.
            hosts = autodiscover.auto_hosts(source)
            self.found = {h: f for h, f in self.found.items() if h in hosts}
            await self._swap(source)
        log.info(
            "config_reloaded", path=self.config_path, rigs=len(self.devices.miners), notes=notes
        )
        return notes

    async def set_poll_timeouts(self, timeout_s: float, retries: int) -> None:
        """Read devices with these timeouts from the next cycle on, keeping all state: the
        demo widens them when it slows its farm clock (controller/demo_pace.py)."""
        poll = self.source_cfg.poll.model_copy(update={"timeout_s": timeout_s, "retries": retries})
        async with self._cycle_lock:
            await self._swap(self.source_cfg.model_copy(update={"poll": poll}))
        log.info("poll_timeouts_changed", timeout_s=timeout_s, retries=retries)

    async def _swap(self, source: Config) -> None:
        """Run on `source` (found miners resolved) from the next cycle, keeping all state.

        Call under the cycle lock, between two cycles."""
        if self.controller is not None:
            await self.controller.close()  # let in-flight actions land first
        old_devices, old_state = self.devices, self.state
        self.source_cfg = source
        cfg = autodiscover.resolve(source, self.found)
        self.devices = build_devices(cfg)
        self.devices.adopt_sessions(old_devices)
        self.state = SiteState.of(cfg.site.id, self.devices)
        self.state.adopt(old_state)
        self.cfg = cfg
        self._apply_poll(cfg)
        self._polled_all = False  # new rigs have no reading yet
        self.controller = self._make_controller(cfg)
        if self.grid is not None and self.controller is not None:
            self.grid.attach(self.controller)
        if self.zones is not None:
            self.zones.attach(self.controller)
        gone = old_devices.miners.keys() - self.devices.miners.keys()
        for rid in gone:  # not a rig any more: its retained state would outlive it
            self._published.pop(rid, None)
            self.link.set_retained_raw(f"{self.link.base}/rigs/{rid}/state", b"")
        await old_devices.close_drivers()

    # -- miners found in `driver = "auto"` ranges -------------------------------------

    def _remembered_miners(self, cfg: Config) -> dict[str, Found]:
        """Miners found in auto ranges before a restart (the state database is opened
        early for them): a rig switched off at its outlet answers no scan."""
        if not autodiscover.auto_entries(cfg):
            return {}
        self.store = StateStore.open(
            cfg.site.state_dir, now=self.clock.now, monotonic=self.clock.monotonic
        )
        try:
            raw = self.store.get(autodiscover.STORE_KEY)
        except StoreError as e:
            log.error("discovery_not_remembered", error=str(e))
            return {}
        return autodiscover.load_found(raw, cfg)

    async def rediscover(self) -> bool:
        """Scan the auto ranges once; rebuild the devices if a miner is new or re-flashed.
        True when something changed."""
        source = self.source_cfg
        if not autodiscover.auto_entries(source):
            return False
        fresh = await autodiscover.discover(
            source, concurrency=source.poll.concurrency, wait_s=source.poll.timeout_s
        )
        merged = autodiscover.merge(self.found, fresh)
        if merged == self.found:
            return False
        added = sorted(set(merged) - set(self.found))
        changed = sorted(h for h in self.found if merged[h] != self.found[h])
        async with self._cycle_lock:
            self.found = merged
            if self.store is not None:
                self.store.put(autodiscover.STORE_KEY, autodiscover.dump_found(merged))
            await self._swap(self.source_cfg)
        log.info(
            "miners_discovered",
            added=added,
            changed=changed,
            rigs=len(self.devices.miners),
        )
        return True

    async def _discover_loop(self, stop: asyncio.Event) -> None:
        """Scan at start, then every `poll.discover_interval_s` (0: at start only)."""
        while not stop.is_set():
            try:
                await self.rediscover()
            except Exception:  # a scan problem must never stop the farm's control
                log.exception("discovery_failed")
            every = self.source_cfg.poll.discover_interval_s
            if every <= 0:
                return
            await _sleep_or_stop(self.clock, every, stop)

    def _make_controller(self, cfg: Config) -> Controller | None:
        """The control loop for `cfg`, its state read back from the database; None if off."""
        if cfg.control is None or not cfg.control.enabled:
            return None
        if self.store is None:
            self.store = StateStore.open(
                cfg.site.state_dir, now=self.clock.now, monotonic=self.clock.monotonic
            )
        return Controller(
            cfg,
            cfg.control,
            self.devices,
            self.store,
            link=self.link,
            now=self.clock.now,
            dry_run=self.dry_run,
        )

    def _apply_poll(self, cfg: Config) -> None:
        self._concurrency = cfg.poll.concurrency
        # A driver has its own timeout and retries; this guard only catches a driver bug.
        self._guard_s = cfg.poll.timeout_s * (cfg.poll.retries + 1) + 2.0
        self._timeout_s = cfg.poll.timeout_s

    def _saved_mark(self) -> object:
        return self.store.get("clock.mark") if self.store is not None else None

    def _clock_stepped(self, step: float, *, startup: bool = False) -> None:
        """Apply a wall-clock step to everything that remembers a stamp (controller.runtime.clock):
        what rigd timed itself keeps its length; grid orders keep the operator's times.

        The shifted state and the new clock mark are saved in one transaction: a restart
        then finds either both (no step left to apply) or neither (the step, once)."""
        shifted: dict[str, Any] = {}
        if step:
            log.warning("clock_stepped", step_s=round(step, 3), while_down=startup)
            if self.controller is not None:
                shifted.update(self.controller.shift_times(step))
            if self.grid is not None:
                # At start the heartbeat was just given a fresh timeout from now.
                self.grid.book.shift_local_times(step, heartbeat=not startup)
                shifted["grid.book"] = self.grid.book.as_dict()
        if self.store is not None:
            self.store.put_many({**shifted, "clock.mark": self.clock.mark()})

    async def _control(self, snap: SiteSnapshot) -> ControlStatus | None:
        """The grid's limits, then one control step on `snap`."""
        grid = self.grid
        ctl = self.controller
        if grid is not None:
            grid.kick.clear()
            if grid.timeline is not None and ctl is not None:  # timed to its first command
                grid.timeline.mark("control")
                ctl.timeline = ctl.executor.timeline = grid.timeline
            grid.timeline = None
            grid.before_step(self.clock.now(), ctl)
        status = await ctl.step(snap) if ctl is not None else None
        if grid is not None:
            grid.after_step(self.clock.now(), snap, status, self.controller)
        if self.openadr is not None:
            self.openadr.after_step(self.clock.now(), snap, status)
        return status

    async def _cycle(self, *, rigs: bool = True) -> CycleResult:
        self._clock_stepped(self.clock.check())
        # Write sessions only where commands may follow: not monitoring, not a dry run.
        ctl = self.controller
        commanding = ctl is not None and not ctl.dry_run  # the flag or the config's
        self.devices.hold_sessions(
            commanding, except_for=ctl.maintenance if ctl is not None else ()
        )
        snap = await self.poll_cycle(rigs=rigs)
        status = await self._control(snap)
        await asyncio.sleep(0)  # commands just launched start before the publishing below
        grid = self.grid
        doc = snap.site_document()
        if status is not None:
            doc.update(status.site_fields())
        else:
            doc.update({"cap_kw": None, "cap_source": None})
        if grid is not None:
            doc["grid"] = grid.summary()
        if self.openadr is not None:
            doc["openadr"] = self.openadr.summary()
        if self.zones is not None:
            load = doc.get("import_kw")
            ctl = self.controller
            self.zones.after_step(
                load if isinstance(load, int | float) else None,
                ctl.last_input if ctl is not None else None,
            )
            doc["zone"] = self.zones.summary()
        if self.store is not None:
            doc["state_db"] = self.store.health()
        result = CycleResult(snap, status, doc)
        self.last = result
        self.publish(result)
        self.exports.on_cycle(result)
        return result

    def publish(self, result: CycleResult) -> None:
        link = self.link
        snap = result.snapshot
        link.set_retained("state", result.document)
        seen = self._published
        refresh = self.cfg.mqtt.rig_refresh_s
        now = snap.ts
        for rig_id, rig in snap.rigs.items():
            sent = seen.get(rig_id)
            if sent is None:
                # A random age, so that rigs first seen together refresh at different polls.
                seen[rig_id] = rig_updates.Sent.of(rig, now - random.random() * refresh)
                link.set_retained_later(f"rigs/{rig_id}/state", rig.as_dict)
            elif rig_updates.update_due(sent, rig, now, refresh):
                seen[rig_id] = rig_updates.Sent.of(rig, now)
                link.set_retained_later(f"rigs/{rig_id}/state", rig.as_dict)
        for kind, views in (("meters", snap.meters), ("pdus", snap.pdus)):
            for dev_id, view in views.items():
                link.set_retained(f"{kind}/{dev_id}/state", view.as_dict())

    def _refill_rigs(self) -> None:
        """On every (re)connect: each rig's retained document again, from the last
        snapshot. The link does not keep them once sent (1 KB a rig; `set_retained_later` in
        `publish`), and a broker restarted without persistence has lost them."""
        snap = self.snapshot
        if snap is None:
            return
        for rig_id, rig in snap.rigs.items():
            self._published[rig_id] = rig_updates.Sent.of(rig, snap.ts)
            self.link.set_retained_later(f"rigs/{rig_id}/state", rig.as_dict)

    # -- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and publish every interval until `stop` is set; then go offline cleanly.

        Stopping sends no control command to any device: rigs stay exactly as they are
        (LuxOS rigs only have rigd's write session logged off, see drivers/luxos.py).
        """
        log.info(
            "rigd_starting",
            site=self.cfg.site.id,
            rigs=len(self.devices.miners),
            pdus=len(self.devices.pdus),
            meters=len(self.devices.meters),
            interval_s=self.cfg.poll.interval_s,
            broker=self.cfg.mqtt.url,
        )
        link_task = asyncio.create_task(self.link.run(), name="mqtt")
        admin = AdminServer(self, self.cfg.admin.socket, self.cfg.admin.group)
        try:
            await admin.start()
        except (OSError, ValueError) as e:
            # Without the admin socket rigctl cannot reach us, but the farm must stay controlled.
            log.error("admin_socket_failed", socket=str(self.cfg.admin.socket), error=str(e))
        await self.exports.start()
        discovering = asyncio.create_task(self._discover_loop(stop), name="discovery")
        # Grid progress reports on their own timer, not once a cycle.
        reporting = (
            asyncio.create_task(self.grid.run_reports(self.clock, stop), name="grid-reports")
            if self.grid is not None
            else None
        )
        if self.openadr is not None:
            self.openadr.start()
        try:
            next_t = self.clock.monotonic()
            kicked = False
            while not stop.is_set():
                result = await self.cycle(rigs=not kicked)
                snap = result.snapshot
                log.debug("poll_cycle", cycle=snap.cycle, duration_s=round(snap.poll_duration_s, 3))
                if self.on_snapshot is not None:
                    res = self.on_snapshot(result)
                    if res is not None:
                        await res
                if not kicked:  # a kicked cycle came early: keep the schedule
                    # Read at each pass: a reload may have changed it, and the watchdog's
                    # promise (controller/adapters/sdnotify.py) is made on the current config.
                    next_t += self.cfg.poll.interval_s
                delay = next_t - self.clock.monotonic()
                if delay < 0:
                    log.warning("poll_overrun", cycle=snap.cycle, behind_s=round(-delay, 3))
                    next_t = self.clock.monotonic()
                    delay = 0.0
                kick = self.grid.kick if self.grid is not None else None
                kicked = await _sleep_or_stop(self.clock, delay, stop, kick)
        finally:
            await self._stop([discovering, reporting], admin, link_task)

    async def _stop(
        self,
        tasks: list[asyncio.Task[None] | None],
        admin: AdminServer,
        link_task: asyncio.Task[None],
    ) -> None:
        """The clean stop: every step is taken even if one before it fails, so a stopped
        rigd always says `offline` (a clean disconnect sends no Last Will), leaves no
        admin socket behind and closes the state database (no -wal file left)."""

        async def close_store() -> None:
            if self.store is not None:
                self.store.close()

        async def close_controller() -> None:
            if self.controller is not None:
                await self.controller.close()

        async def stop_openadr() -> None:
            if self.openadr is not None:
                await self.openadr.stop()

        async def end_tasks() -> None:  # discovery and the grid's report timer
            for task in tasks:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("tasks", end_tasks),
            ("admin", admin.stop),
            ("openadr", stop_openadr),  # its reports wait in the outbox, in the state db
            ("exports", self.exports.stop),
            ("control", close_controller),  # commands in flight land first
            ("mqtt", lambda: self.link.close(link_task)),  # then `offline`, retained
            ("devices", self.devices.close),
            ("state_db", close_store),
        ]
        log.info("rigd_stopping", site=self.cfg.site.id)
        for name, step in steps:
            try:
                await step()
            except Exception:
                log.exception("stop_step_failed", step=name)
        log.info("rigd_stopped", site=self.cfg.site.id)


async def _sleep_or_stop(
    clock: Clock, delay: float, stop: asyncio.Event, kick: asyncio.Event | None = None
) -> bool:
    """Wait out the interval, unless stopped, or kicked (a grid order changed the limits:
    the next cycle runs now rather than up to an interval later)."""
    waits = [asyncio.ensure_future(clock.sleep(delay)), asyncio.ensure_future(stop.wait())]
    if kick is not None:
        waits.append(asyncio.ensure_future(kick.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return kick is not None and kick.is_set() and not stop.is_set()
    finally:
        for f in waits:
            f.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await f
