"""What the daemon sees of a device, whatever it speaks: the three driver interfaces.

The control loop knows miners, PDUs and meters only through these protocols, so a rig on
stock firmware and one on LuxOS, or an APC PDU and the in-process farm adapter the tests
use, are called the same way. Miners differ in what they can do, and say so up front in
their `MinerCapabilities` (and in the `UnsupportedOperation` they raise), not in how they
are called. Reads are one request per poll, because a farm polls thousands of rigs and
each connection costs the miner's single-threaded API server too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from drivers.telemetry import MeterReading, PduReading, RigTelemetry

# What a switched PDU can be told to do with one outlet.
OutletAction = Literal["on", "off", "reboot"]


@dataclass(frozen=True)
class MinerCapabilities:
    can_sleep: bool
    can_power_target: bool
    power_target_min_w: float | None = None
    power_target_max_w: float | None = None
    # API sleep leaves the control board (and on stock, everything) drawing: only the PDU
    # takes a rig to zero.
    needs_pdu_to_power_off: bool = True
    # The power targets the firmware takes, as (watts, its published hashrate or None),
    # lowest first: LuxOS profiles. Empty: any target in the range.
    profiles: tuple[tuple[float, float | None], ...] = ()


@runtime_checkable
class MinerDriver(Protocol):
    device: str  # the rig id
    capabilities: MinerCapabilities  # may be refined after the first read (profile range)

    async def read(self, ts: float) -> RigTelemetry: ...  # ts: daemon clock time of the poll
    async def sleep(self) -> None: ...
    async def wake(self) -> None: ...
    async def set_power_target(self, watts: float | None) -> None: ...
    async def close(self) -> None: ...


class MeterDriver(Protocol):
    async def read(self, ts: float) -> MeterReading: ...
    async def close(self) -> None: ...


class PduDriver(Protocol):
    """A switched PDU: its readings, and one outlet switched at a time (1-based numbers)."""

    async def read(self, ts: float) -> PduReading: ...
    async def set_outlet(self, outlet: int, action: OutletAction) -> None: ...
    async def close(self) -> None: ...
