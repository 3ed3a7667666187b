"""Noticing that a miner restarted, from its uptime going backwards.

A restart may come with new firmware (flashed by a technician), a new model name or a new
power range, so what a driver cached about the rig on its first poll is stale after one.
Every miner driver asks a `RebootWatch` with each reading and forgets its cache when it
says so; the log line is the same for every firmware.
"""

from __future__ import annotations

import structlog

from drivers.telemetry import RigTelemetry

log = structlog.get_logger(__name__)


class RebootWatch:
    """One rig's uptime across polls."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._last_uptime: int | None = None

    def restarted(self, tel: RigTelemetry) -> bool:
        """Whether the rig restarted since the previous reading (never on the first one)."""
        uptime = tel.uptime_s
        restarted = (
            self._last_uptime is not None and uptime is not None and uptime < self._last_uptime
        )
        self._last_uptime = uptime
        if restarted:
            log.info("miner.rebooted", device=self.device, uptime_s=uptime)
        return restarted
