"""One normalised model of what devices report, whatever protocol they speak.

Drivers translate their dialect (GH/s vs MH/s, strings for numbers, missing power
fields) into these types so nothing above the drivers knows about wire formats.
Units are in the field names: a value that a device does not report is None,
never a guessed zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RigState(StrEnum):
    """What a rig is doing, as far as its own telemetry tells."""

    MINING = "mining"  # hashing at (or ramping towards) its power target
    WAKING = "waking"  # told to mine but not yet hashing: booting, ramping up
    SLEEPING = "sleeping"  # curtailed through its API: control board up, hashboards off
    OFF = "off"  # its PDU outlet is switched off
    UNREACHABLE = "unreachable"  # no valid answer from the rig and no outlet saying it is off


@dataclass(frozen=True, slots=True)
class Hashboard:
    index: int
    hashrate_ths: float | None = None
    temp_c: float | None = None  # board (PCB) temperature
    chip_temp_c: float | None = None
    chips: int | None = None
    active: bool = True


@dataclass(frozen=True, slots=True)
class RigIdentity:
    make: str = ""  # "Antminer"
    model: str = ""  # "Antminer S19 Pro"
    firmware: str = ""  # "LuxOS", "bmminer", ...
    firmware_version: str = ""


@dataclass(frozen=True, slots=True)
class RigTelemetry:
    """One poll of one miner, normalised."""

    ts: float  # when it was read (epoch seconds, the daemon's clock)
    state: RigState
    hashrate_ths: float | None = None
    power_w: float | None = None  # measured or firmware-estimated input power
    power_limit_w: float | None = None  # the power target in force, if the firmware has one
    nominal_hashrate_ths: float | None = None
    temp_c: float | None = None  # hottest board temperature
    chip_temp_c: float | None = None  # hottest chip temperature
    fans_rpm: tuple[int, ...] = ()
    hashboards: tuple[Hashboard, ...] = ()
    uptime_s: int | None = None
    identity: RigIdentity = field(default_factory=RigIdentity)

    @property
    def efficiency_j_per_th(self) -> float | None:
        """Joules per terahash; None unless both power and a non-zero hashrate are known.

        Also None when the ratio is not finite (a trickle of hashrate under full power):
        the state document goes out as strict JSON, which has no Infinity.
        """
        if self.power_w is None or not self.hashrate_ths:
            return None
        eff = self.power_w / self.hashrate_ths
        return eff if math.isfinite(eff) else None


_KEEP: Any = object()  # `revised`: the field as it was


def revised(
    tel: RigTelemetry,
    *,
    state: RigState = _KEEP,
    power_limit_w: float | None = _KEEP,
    identity: RigIdentity = _KEEP,
) -> RigTelemetry:
    """`dataclasses.replace(tel, ...)` for what drivers revise on every poll (the state,
    the power limit, the identity): `replace` looks the fields up on each call, which
    costs a stock Antminer or a Braiins rig more than the rest of its reading."""
    return RigTelemetry(
        tel.ts,
        tel.state if state is _KEEP else state,
        tel.hashrate_ths,
        tel.power_w,
        tel.power_limit_w if power_limit_w is _KEEP else power_limit_w,
        tel.nominal_hashrate_ths,
        tel.temp_c,
        tel.chip_temp_c,
        tel.fans_rpm,
        tel.hashboards,
        tel.uptime_s,
        tel.identity if identity is _KEEP else identity,
    )


@dataclass(frozen=True, slots=True)
class OutletReading:
    number: int  # 1-based outlet number as the PDU labels it
    on: bool
    name: str = ""
    power_w: float | None = None  # None on PDUs without per-outlet metering


@dataclass(frozen=True, slots=True)
class PduReading:
    ts: float
    power_w: float | None
    energy_kwh: float | None
    outlets: tuple[OutletReading, ...] = ()


@dataclass(frozen=True, slots=True)
class MeterReading:
    ts: float
    power_w: float  # total active power; positive = import
    import_kwh: float  # the meter's own import energy register
    export_kwh: float | None = None
    voltage_v: tuple[float, ...] = ()
    current_a: tuple[float, ...] = ()
    frequency_hz: float | None = None
