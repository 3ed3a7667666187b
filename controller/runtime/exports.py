"""What the daemon hands to the tools operators already use, once per cycle.

Prometheus metrics (controller/adapters/metrics.py), the site history kept for reports
(controller/adapters/history.py) and Home Assistant discovery (controller/adapters/hass.py) all read
the same cycle result the MQTT publisher does. The daemon calls `on_cycle` once per
cycle and `start`/`stop` around its loop; each consumer is independent, and a failure
in one is logged and never stops the control loop or the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from controller.adapters.hass import HomeAssistantBridge
from controller.adapters.history import Recorder
from controller.adapters.metrics import Metrics, MetricsServer
from controller.adapters.store import StoreError

if TYPE_CHECKING:
    from controller.adapters.ports import ExportsView
    from controller.core.status import CycleResult

log = structlog.get_logger(__name__)


def _isolated(event: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """One export's work for this cycle. Its failure is a bug in that export: logged as
    `event` with the traceback, and kept from the control loop and the other exports."""
    try:
        fn(*args, **kwargs)
    except Exception:  # the one place an export's bug is contained
        log.exception(event)


class Exports:
    def __init__(self, daemon: ExportsView) -> None:
        cfg = daemon.cfg
        self.daemon = daemon
        self.metrics: Metrics | None = None
        self.server: MetricsServer | None = None
        if cfg.metrics.enabled:
            self.metrics = Metrics(
                cfg.site.id,
                per_rig=cfg.metrics.per_rig,
                interval_s=cfg.poll.interval_s,
                monotonic=daemon.clock.monotonic,
            )
        # History lives in the state database, which rigd keeps when it controls the farm.
        self.history: Recorder | None = None
        if cfg.history.enabled and daemon.store is not None:
            try:
                self.history = Recorder(daemon.store, cfg.history)
            except StoreError as e:
                log.error("history_unavailable", error=str(e))
        self.hass: HomeAssistantBridge | None = None
        if cfg.homeassistant.enabled:
            self.hass = HomeAssistantBridge(daemon, cfg.homeassistant)

    def on_cycle(self, result: CycleResult) -> None:
        d = self.daemon
        if self.metrics is not None:
            _isolated(
                "metrics_update_failed",
                self.metrics.observe,
                result,
                mqtt_connected=d.link.connected.is_set(),
                mqtt_connects=d.link.connects,
                grid_rejected=None if d.grid is None else d.grid.rejected,
            )
        if self.history is not None:
            _isolated("history_record_failed", self.history.record, result)
        if self.hass is not None:
            _isolated("hass_discovery_failed", self.hass.on_cycle, result)

    async def start(self) -> None:
        cfg = self.daemon.cfg.metrics
        if self.metrics is None:
            return
        server = MetricsServer(self.metrics, cfg.host, cfg.port)
        try:
            await server.start()
        except OSError as e:
            # Without metrics the farm must still be controlled: log, and go on.
            log.error("metrics_listen_failed", listen=cfg.listen, error=str(e))
            return
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.hass is not None:
            await self.hass.stop()
        if self.history is not None:
            _isolated("history_flush_failed", self.history.flush)
