"""In-process adapters that drive the farm model directly: no sockets, no protocols.

These implement the same interfaces the daemon uses for real hardware (`MinerDriver`,
`PduDriver`, `MeterDriver`), but read and command `simulators.farm` objects in the
calling coroutine. Every call completes without yielding to the event loop, so a
test or benchmark on a `ManualClock` can run hours or a month of farm time in
seconds of wall time, with each command landing at exactly the farm time it was sent.

What they deliberately do not test: wire formats, timeouts, retries, SNMP and
Modbus encodings, LuxOS sessions and profile rounding. The real drivers are tested
against the socket simulators (`simulators.cgminer`, `apc_snmp`, `modbus_meter`, ...)
instead; use these adapters only where the subject is the control loop, not the drivers.

Faults a test can inject here: `DirectMiner.unreachable` (the rig's API stops
answering), `DirectPdu.silent` and `DirectMeter.silent` (reads time out). Rigs that
accept sleep but keep drawing power are a property of the model (`SimRig.ignore_sleep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controller.config import Config
from controller.core.snapshot import RigInfo
from controller.runtime.devices import Devices
from drivers.base import MeterDriver, MinerCapabilities, MinerDriver, OutletAction, PduDriver
from drivers.errors import DeviceTimeout, DeviceUnreachable, UnsupportedOperation
from drivers.telemetry import (
    Hashboard,
    MeterReading,
    OutletReading,
    PduReading,
    RigIdentity,
    RigState,
    RigTelemetry,
)
from simulators.farm import Farm, RigMode, SimMeter, SimPdu, SimRig


class DirectMiner:
    """One rig, as a `MinerDriver`.

    LuxOS rigs can sleep and take a power target anywhere from the model's minimum to
    its nominal power (the real driver learns that span from the rig's profiles; the
    model's nominal is its default profile). Any other firmware is stock: telemetry
    only, with no power reading (stock Antminers report none) and every command
    refused, so control has to use the PDU, as on a real farm.
    """

    def __init__(self, farm: Farm, rig: SimRig) -> None:
        self.device = rig.id
        self.farm = farm
        self.rig = rig
        self.luxos = rig.firmware == "luxos"
        m = rig.model
        self.capabilities = MinerCapabilities(
            can_sleep=self.luxos,
            can_power_target=self.luxos,
            power_target_min_w=m.min_w if self.luxos else None,
            power_target_max_w=m.nominal_w if self.luxos else None,
        )
        self.unreachable = False  # fault injection: the API stops answering
        self._identity = RigIdentity(
            make="Antminer",
            model=m.name,
            firmware="LuxOS" if self.luxos else "bmminer",
            firmware_version="sim",
        )

    def _now(self, operation: str) -> float:
        """Farm time, after due outlet actions; raises while the API would not answer."""
        self.farm.settle()
        t = self.farm.now()
        if self.unreachable or not self.rig.api_up(t):
            raise DeviceUnreachable("connection refused", device=self.device, operation=operation)
        return t

    async def read(self, ts: float) -> RigTelemetry:
        t = self._now("read")
        rig = self.rig
        if rig.mode is RigMode.SLEEPING:
            state = RigState.SLEEPING
        elif rig.is_hashing(t):
            state = RigState.MINING
        else:
            state = RigState.WAKING
        temps = rig.board_temps_c(t)
        chips = rig.chip_temps_c(t)
        boards = tuple(
            Hashboard(i, hr, temps[i], chips[i], rig.model.chips_per_board, hr > 0)
            for i, hr in enumerate(rig.board_hashrates_ths(t))
        )
        return RigTelemetry(
            ts=ts,
            state=state,
            hashrate_ths=rig.hashrate_ths(t),
            power_w=rig.power_w(t) if self.luxos else None,
            power_limit_w=rig.target_w if self.luxos else None,
            nominal_hashrate_ths=rig.model.nominal_ths,
            temp_c=max(temps),
            chip_temp_c=max(chips),
            fans_rpm=tuple(rig.fans_rpm(t)),
            hashboards=boards,
            uptime_s=rig.uptime_s(t),
            identity=self._identity,
        )

    def _control(self, operation: str) -> float:
        if not self.luxos:
            raise UnsupportedOperation(
                "stock firmware offers no control over its API",
                device=self.device,
                operation=operation,
            )
        return self._now(operation)

    async def sleep(self) -> None:
        self.rig.sleep(self._control("sleep"))

    async def wake(self) -> None:
        self.rig.wake(self._control("wake"))

    async def set_power_target(self, watts: float | None) -> None:
        """Outside the rig's range raises ValueError, before any change, as the real driver."""
        self.rig.set_power_target(watts, self._control("set_power_target"))

    async def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class OutletCommand:
    ts: float
    outlet: int
    action: str


class DirectPdu:
    """One switched, outlet-metered PDU, as a `PduDriver` with outlet switching."""

    def __init__(self, farm: Farm, pdu: SimPdu, device: str | None = None) -> None:
        self.device = device or pdu.id
        self.farm = farm
        self.pdu = pdu
        self.silent = False  # fault injection: reads and writes time out
        self.commands: list[OutletCommand] = []  # every switch that reached the PDU

    def _now(self, operation: str) -> float:
        if self.silent:
            raise DeviceTimeout("no answer", device=self.device, operation=operation)
        return self.farm.now()

    async def read(self, ts: float) -> PduReading:
        t = self._now("read")
        pdu = self.pdu
        outlets = tuple(
            OutletReading(n, pdu.outlet_on(n, t), o.name, pdu.outlet_power_w(n, t))
            for n, o in pdu.outlets.items()
        )
        return PduReading(
            ts=ts,
            power_w=sum(o.power_w or 0.0 for o in outlets),
            energy_kwh=pdu.energy_kwh(t),
            outlets=outlets,
        )

    async def set_outlet(self, outlet: int, action: OutletAction) -> None:
        t = self._now(f"set_outlet {outlet} {action}")
        if outlet not in self.pdu.outlets:
            raise ValueError(f"{self.device} has no outlet {outlet}")
        self.pdu.switch(outlet, action, t)
        self.commands.append(OutletCommand(t, outlet, action))

    async def close(self) -> None:
        """Nothing to release."""


class DirectMeter:
    """The farm's import meter, as a `MeterDriver`: noisy power, exact energy register."""

    def __init__(self, farm: Farm, meter: SimMeter, device: str | None = None) -> None:
        self.device = device or meter.id
        self.farm = farm
        self.meter = meter
        self.silent = False  # fault injection: reads time out

    async def read(self, ts: float) -> MeterReading:
        if self.silent:
            raise DeviceTimeout("no answer", device=self.device, operation="read")
        self.farm.settle()
        t = self.farm.now()
        return MeterReading(
            ts=ts,
            power_w=self.meter.power_w(t),
            import_kwh=self.meter.import_kwh(t),
            export_kwh=0.0,
            frequency_hz=50.0,
        )

    async def close(self) -> None:
        """Nothing to release."""


@dataclass
class DirectAdapters:
    """The typed adapters, for tests that inject faults or count commands."""

    miners: dict[str, DirectMiner] = field(default_factory=dict)
    pdus: dict[str, DirectPdu] = field(default_factory=dict)
    meters: dict[str, DirectMeter] = field(default_factory=dict)


@dataclass
class DirectDevices(Devices):
    """A `Devices` whose drivers are the adapters above; `direct` has them typed."""

    direct: DirectAdapters = field(default_factory=DirectAdapters)


def build_direct_devices(farm: Farm, cfg: Config) -> DirectDevices:
    """The `Devices` a config describes, wired to the farm model instead of the network.

    Rig and PDU ids in the config must name the farm's; every configured meter reads the
    farm's one import meter.
    """
    rigs: list[RigInfo] = []
    devs = DirectDevices(rigs)
    direct = devs.direct
    missing = [r.id for r in cfg.rigs() if r.id not in farm.rigs]
    missing += [p.id for p in cfg.pdus if p.id not in farm.pdus]
    if missing:
        raise ValueError(f"the config names devices the farm does not have: {missing}")
    for r in cfg.rigs():
        m = r.miner
        rigs.append(RigInfo(r.id, r.host, m.port, m.driver, m.group, r.outlet))
        miner = DirectMiner(farm, farm.rigs[r.id])
        direct.miners[r.id] = miner
        devs.miners[r.id] = miner
    for mc in cfg.meters:
        meter = DirectMeter(farm, farm.meter, mc.id)
        direct.meters[mc.id] = meter
        devs.meters[mc.id] = meter
        if mc.role == "import":
            devs.import_meter = mc.id
    for p in cfg.pdus:
        pdu = DirectPdu(farm, farm.pdus[p.id])
        direct.pdus[p.id] = pdu
        devs.pdus[p.id] = pdu
    return devs


if TYPE_CHECKING:  # the adapters satisfy the daemon's protocols

    def _conforms(m: DirectMiner, p: DirectPdu, e: DirectMeter) -> None:
        _m: MinerDriver = m
        _p: PduDriver = p
        _e: MeterDriver = e
