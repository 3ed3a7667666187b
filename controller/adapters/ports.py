"""The narrow views the runtime hands its adapters: what each may read, and call.

An adapter never imports the daemon. It states here, as a Protocol, the few things it
reads (frozen values from the core: the last cycle, overrides, holds, limits) and the few
commands it may give; the runtime's classes satisfy these structurally. So the admin API,
Home Assistant or systemd notification can be read, tested and changed without the
daemon in mind, and the type checker says when the runtime stops offering what they need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from controller.adapters.mqtt import MqttLink
from controller.adapters.store import StateStore
from controller.config import Config
from controller.core.caps import Limit
from controller.core.planner import ActionKind, RigMemory
from controller.core.snapshot import RigInfo
from controller.core.status import ActionResult, CycleResult, Hold, Override
from drivers.base import MinerDriver


class ClockView(Protocol):
    """The daemon's clock: wall time for records, monotonic time for intervals."""

    def now(self) -> float: ...

    def monotonic(self) -> float: ...


class DeviceTable(Protocol):
    """The configured devices, by id: adapters count them and read a miner's capabilities;
    commands go through the controller, never straight to a driver."""

    @property
    def miners(self) -> Mapping[str, MinerDriver]: ...

    @property
    def meters(self) -> Mapping[str, object]: ...

    @property
    def pdus(self) -> Mapping[str, object]: ...


class FarmRecords(Protocol):
    """What is known of each rig beyond the last snapshot: its config facts, its recent states."""

    @property
    def rig_info(self) -> Mapping[str, RigInfo]: ...

    @property
    def history(self) -> Mapping[str, Sequence[tuple[float, str]]]: ...


class ExternalLimits(Protocol):
    """The seam through which a zone link or a grid order caps the site."""

    def set_external(self, name: str, limit: Limit | None) -> None: ...


class ControlPort(ExternalLimits, Protocol):
    """What technicians' tools (the admin API, Home Assistant) may read of control and ask of
    it. Every command goes through the controller's own safety checks."""

    @property
    def override(self) -> Override | None: ...

    @property
    def external(self) -> Mapping[str, Limit]: ...

    @property
    def memory(self) -> Mapping[str, RigMemory]: ...

    @property
    def maintenance(self) -> Mapping[str, Hold]: ...

    @property
    def pinned(self) -> Mapping[str, Hold]: ...

    @property
    def attainment(self) -> tuple[float, float] | None: ...

    def limits(self, now: float) -> list[Limit]: ...

    def set_override(self, kw: float, expires_at: float, reason: str, actor: str) -> Override: ...

    def clear_override(self) -> None: ...

    def set_maintenance(self, rig_id: str, hold: Hold | None) -> None: ...

    def set_pinned(self, rig_id: str, hold: Hold | None) -> None: ...

    def audit_change(
        self, action: str, rig_id: str | None, params: dict[str, Any], reason: str, actor: str
    ) -> None: ...

    def check_manual(self, kind: ActionKind, rig_ids: list[str], watts: float | None) -> None: ...

    async def manual(
        self, kind: ActionKind, rig_ids: list[str], watts: float | None, reason: str, actor: str
    ) -> list[ActionResult]: ...


class GridView(Protocol):
    """The grid orders in force, as `rigctl grid status` and the state document show them."""

    def summary(self) -> dict[str, Any]: ...

    def orders(self) -> list[dict[str, Any]]: ...

    @property
    def rejected(self) -> int:
        """Messages refused since start, for the metrics."""
        ...


class ServiceView(Protocol):
    """What systemd notification reads: the config (poll timing), the devices, the broker."""

    @property
    def cfg(self) -> Config: ...

    @property
    def devices(self) -> DeviceTable: ...

    @property
    def link(self) -> MqttLink: ...


class HassView(ServiceView, Protocol):
    """What Home Assistant discovery and its buttons read and call."""

    @property
    def controller(self) -> ControlPort | None: ...

    @property
    def grid(self) -> GridView | None: ...

    @property
    def clock(self) -> ClockView: ...  # when an override set from Home Assistant ends


class ExportsView(HassView, Protocol):
    """What the exports (metrics, history, Home Assistant) are built from once per cycle."""

    @property
    def store(self) -> StateStore | None: ...


class AdminView(ExportsView, Protocol):
    """What the admin socket (`rigctl`) reads and calls."""

    @property
    def last(self) -> CycleResult | None: ...

    @property
    def state(self) -> FarmRecords: ...

    async def reload(self) -> list[str]: ...
