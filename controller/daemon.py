"""The daemon's run loop: poll every device each interval, then publish the farm's state.

Data flows one way: devices -> SiteState -> frozen SiteSnapshot -> MQTT (and any
other consumer). A device failing, hanging or answering garbage costs only its
own reading: each read is bounded in time and its error recorded as health, so
the cycle always completes and the daemon keeps its cadence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import structlog

from controller.admin import AdminServer
from controller.clock import Clock, SystemClock
from controller.config import Config, ConfigError, ConfigIssue, load_config
from controller.control import Controller, ControlStatus
from controller.devices import Devices, build_devices
from controller.grid.service import GridService
from controller.mqtt import MqttLink
from controller.state import Health, SiteSnapshot, SiteState
from controller.store import StateStore
from drivers.errors import DeviceError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CycleResult:
    """One cycle's outcome: the farm, what control decided, and the published document."""

    snapshot: SiteSnapshot
    control: ControlStatus | None
    document: dict[str, Any]


SnapshotHook = Callable[[CycleResult], Awaitable[None] | None]


class _Reader(Protocol):
    def read(self, ts: float) -> Awaitable[Any]: ...


_Sink = Callable[..., None]
_HealthOf = Callable[[str], Health]


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
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # where `reload` reads the config again
        self.dry_run = dry_run
        self._cycle_lock = asyncio.Lock()
        self.clock: Clock = clock or SystemClock()
        self.devices = devices or build_devices(cfg)
        self.state = SiteState(
            cfg.site.id,
            self.devices.rigs,
            list(self.devices.meters),
            list(self.devices.pdus),
            self.devices.import_meter,
        )
        self.link = link if link is not None else MqttLink(cfg.mqtt, cfg.site.id)
        self.on_snapshot = on_snapshot
        self.snapshot: SiteSnapshot | None = None
        self.last: CycleResult | None = None
        self.store: StateStore | None = None
        # Opened before anything else runs: remembered sleeps and caps apply from cycle 1.
        self.controller = self._make_controller(cfg)
        self.grid: GridService | None = None
        if cfg.grid is not None and cfg.grid.enabled and self.store is not None:
            # Before the first connect: the limits of orders in force apply from cycle 1.
            self.grid = GridService(cfg, self.store, self.link, now=self.clock.now)
            if self.controller is not None:
                self.grid.attach(self.controller)
        self._apply_poll(cfg)

    # -- one cycle ------------------------------------------------------------------

    async def _read(
        self,
        kind: str,
        dev_id: str,
        call: Callable[[], Awaitable[Any]],
        ok: Callable[[Any], None],
        failed: Callable[[BaseException], None],
        health: Health,
    ) -> None:
        was = health.reachable
        async with self._sem:
            try:
                reading = await asyncio.wait_for(call(), self._guard_s)
            except DeviceError as e:
                failed(e)
            except TimeoutError as e:
                failed(DeviceError(f"no answer within {self._guard_s:.1f} s", device=dev_id))
                log.error("driver_hung", kind=kind, device=dev_id, error=str(e))
            except Exception as e:  # a driver bug must not stop the farm's control
                failed(e)
                log.exception("driver_error", kind=kind, device=dev_id)
            else:
                ok(reading)
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

    async def poll_cycle(self) -> SiteSnapshot:
        st, devs = self.state, self.devices
        ts = self.clock.now()
        t0 = time.monotonic()
        jobs: list[Awaitable[None]] = []
        kinds: tuple[tuple[str, Mapping[str, _Reader], _Sink, _Sink, _HealthOf], ...] = (
            ("miner", devs.miners, st.rig_ok, st.rig_failed, st.rig_health),
            ("meter", devs.meters, st.meter_ok, st.meter_failed, st.meter_health),
            ("pdu", devs.pdus, st.pdu_ok, st.pdu_failed, st.pdu_health),
        )
        for kind, drivers, ok, failed, health in kinds:
            for dev_id, driver in drivers.items():
                jobs.append(
                    self._read(
                        kind,
                        dev_id,
                        partial(driver.read, ts),
                        partial(ok, dev_id),
                        partial(failed, dev_id, ts),
                        health(dev_id),
                    )
                )
        await asyncio.gather(*jobs)
        st.cycle += 1
        snap = st.snapshot(ts, time.monotonic() - t0)
        self.snapshot = snap
        return snap

    async def cycle(self) -> CycleResult:
        """Poll, decide, publish: one turn of the loop."""
        async with self._cycle_lock:
            return await self._cycle()

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
        ):
            if old_v != new_v:
                notes.append(f"{name} changed: takes effect after a restart")
        async with self._cycle_lock:
            if self.controller is not None:
                await self.controller.close()  # let in-flight actions land first
            old_devices, old_state = self.devices, self.state
            cfg = new.model_copy(
                update={
                    "site": self.cfg.site,
                    "mqtt": self.cfg.mqtt,
                    "admin": self.cfg.admin,
                    "grid": self.cfg.grid,
                }
            )
            self.devices = build_devices(cfg)
            self.state = SiteState(
                cfg.site.id,
                self.devices.rigs,
                list(self.devices.meters),
                list(self.devices.pdus),
                self.devices.import_meter,
            )
            self.state.adopt(old_state)
            self.cfg = cfg
            self._apply_poll(cfg)
            self.controller = self._make_controller(cfg)
            if self.grid is not None and self.controller is not None:
                self.grid.attach(self.controller)
            await old_devices.close_drivers()
        log.info(
            "config_reloaded", path=self.config_path, rigs=len(self.devices.miners), notes=notes
        )
        return notes

    def _make_controller(self, cfg: Config) -> Controller | None:
        """The control loop for `cfg`, its state read back from the database; None if off."""
        if cfg.control is None or not cfg.control.enabled:
            return None
        if self.store is None:
            self.store = StateStore.open(cfg.site.state_dir)
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
        self._sem = asyncio.Semaphore(cfg.poll.concurrency)
        # A driver has its own timeout and retries; this guard only catches a driver bug.
        self._guard_s = cfg.poll.timeout_s * (cfg.poll.retries + 1) + 2.0

    async def _cycle(self) -> CycleResult:
        snap = await self.poll_cycle()
        grid = self.grid
        if grid is not None:
            grid.kick.clear()
            grid.before_step(self.clock.now(), self.controller)
        status = await self.controller.step(snap) if self.controller is not None else None
        if grid is not None:
            grid.after_step(self.clock.now(), snap, status, self.controller)
        doc = snap.site_document()
        if status is not None:
            doc.update(status.site_fields())
        else:
            doc.update({"cap_kw": None, "cap_source": None})
        if grid is not None:
            doc["grid"] = grid.summary()
        result = CycleResult(snap, status, doc)
        self.last = result
        self.publish(result)
        return result

    def publish(self, result: CycleResult) -> None:
        link = self.link
        snap = result.snapshot
        link.set_retained("state", result.document)
        for rig_id, rig in snap.rigs.items():
            link.set_retained(f"rigs/{rig_id}/state", rig.as_dict())
        for kind, views in (("meters", snap.meters), ("pdus", snap.pdus)):
            for dev_id, view in views.items():
                link.set_retained(f"{kind}/{dev_id}/state", view.as_dict())

    # -- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and publish every interval until `stop` is set; then go offline cleanly.

        Stopping sends no command to any device: rigs stay exactly as they are.
        """
        interval = self.cfg.poll.interval_s
        log.info(
            "rigd_starting",
            site=self.cfg.site.id,
            rigs=len(self.devices.miners),
            pdus=len(self.devices.pdus),
            meters=len(self.devices.meters),
            interval_s=interval,
            broker=self.cfg.mqtt.url,
        )
        link_task = asyncio.create_task(self.link.run(), name="mqtt")
        admin = AdminServer(self, self.cfg.admin.socket, self.cfg.admin.group)
        try:
            await admin.start()
        except (OSError, ValueError) as e:
            # Without the admin socket rigctl cannot reach us, but the farm must stay controlled.
            log.error("admin_socket_failed", socket=str(self.cfg.admin.socket), error=str(e))
        try:
            next_t = self.clock.monotonic()
            kicked = False
            while not stop.is_set():
                result = await self.cycle()
                snap = result.snapshot
                log.debug("poll_cycle", cycle=snap.cycle, duration_s=round(snap.poll_duration_s, 3))
                if self.on_snapshot is not None:
                    res = self.on_snapshot(result)
                    if res is not None:
                        await res
                if not kicked:  # a kicked cycle came early: keep the schedule
                    next_t += interval
                delay = next_t - self.clock.monotonic()
                if delay < 0:
                    log.warning("poll_overrun", cycle=snap.cycle, behind_s=round(-delay, 3))
                    next_t = self.clock.monotonic()
                    delay = 0.0
                kick = self.grid.kick if self.grid is not None else None
                kicked = await _sleep_or_stop(self.clock, delay, stop, kick)
        finally:
            log.info("rigd_stopping", site=self.cfg.site.id)
            await admin.stop()
            if self.controller is not None:
                await self.controller.close()
            await self.link.close(link_task)
            await self.devices.close()
            if self.store is not None:
                self.store.close()
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
