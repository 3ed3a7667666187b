"""The farm model: rigs on PDU outlets, and a meter that sees them all.

Each rig's input power is a piecewise-linear trajectory in farm time, rebuilt
whenever it is commanded (sleep, wake, power target, outlet off/on). That makes
power at any instant cheap to evaluate and energy exactly integrable, with no
background task ticking: the network simulators just ask the model "what now?".

Physical behaviour follows the reference material: sleep takes seconds, a wake
boots and then ramps for minutes, a power-target change takes tens of seconds,
an outlet switched back on reboots the miner, which then mines (sleep is not
persistent across a power cycle).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class FarmClock(Protocol):
    """The farm's time: all its physics reads is `now()` (see `simulators.clock`)."""

    def now(self) -> float: ...


class RigPower(Protocol):
    """The draw of rigs this process does not hold (a farm served by several processes)."""

    def power_w(self, t: float) -> float: ...

    def energy_j(self, t: float) -> float: ...


@dataclass(frozen=True, slots=True)
class RigModel:
    """A miner model's physics. Times are farm seconds, power in watts."""

    name: str  # as its firmware reports it: "Antminer S19 Pro"
    nominal_ths: float
    nominal_w: float
    min_w: float  # lowest power target the firmware accepts
    max_w: float  # highest power target the firmware accepts
    idle_w: float = 15.0  # control board and slow fans, while sleeping
    boards: int = 3
    chips_per_board: int = 114
    fans: int = 4
    sleep_s: float = 6.0  # from the sleep command to idle power
    boot_s: float = 20.0  # from wake (or power-on) until the hashboards start
    wake_ramp_s: float = 150.0  # from hashboards starting to full power
    target_change_s: float = 30.0  # to settle on a new power target


MODELS: dict[str, RigModel] = {
    m.name: m
    for m in (
        RigModel("Antminer S19 Pro", 110.0, 3250.0, 1600.0, 3400.0, chips_per_board=114),
        RigModel("Antminer S19j Pro", 104.0, 3068.0, 1500.0, 3200.0, chips_per_board=126),
        RigModel("Antminer S19 XP", 141.0, 3010.0, 1500.0, 3150.0, chips_per_board=110),
        RigModel(
            "Antminer S21", 200.0, 3500.0, 1800.0, 3650.0, chips_per_board=108, wake_ramp_s=180.0
        ),
    )
}

# Efficiency improves when underclocked: hashrate ~ power^0.85 above idle.
_HASH_EXPONENT = 0.85
AMBIENT_C = 25.0  # the room the rigs draw their air from; no sensor on a rig reads below it


def above_room(hottest_c: float, fraction: float) -> float:
    """A reading `fraction` of the way from the room's temperature up to `hottest_c`: a
    cooler sensor (an intake, a chip average) on the same board, never below the room."""
    return AMBIENT_C + max(0.0, hottest_c - AMBIENT_C) * fraction


# How far back a rig's power trajectory is kept: the longest window firmware averages
# over is a day.
HISTORY_S = 2 * 86_400.0


class RigMode(StrEnum):
    """What the simulated rig's firmware was last told to do (the planner's `Mode` is what
    rigd last made a rig do: another thing)."""

    MINING = "mining"
    SLEEPING = "sleeping"


@dataclass(slots=True)
class _Segment:
    t0: float
    p0: float
    t1: float
    p1: float

    def at(self, t: float) -> float:
        if t <= self.t0:
            return self.p0
        if t >= self.t1 or self.t1 <= self.t0:
            return self.p1
        return self.p0 + (self.p1 - self.p0) * (t - self.t0) / (self.t1 - self.t0)

    def integral(self, a: float, b: float) -> float:
        """Joules between a and b (clipped to this segment's span), exact."""
        a, b = max(a, self.t0), min(b, self.t1)
        if b <= a:
            return 0.0
        return (self.at(a) + self.at(b)) / 2.0 * (b - a)


class SimRig:
    """One simulated miner. All methods take the farm time `t` explicitly."""

    def __init__(
        self,
        rig_id: str,
        model: RigModel,
        t: float,
        *,
        firmware: str = "luxos",
        serial: str = "",
        mac: str = "",
        seed: int = 0,
    ) -> None:
        self.id = rig_id
        self.model = model
        self.firmware = firmware
        crc = zlib.crc32(rig_id.encode())
        self.serial = serial or f"SIM{crc % 10**10:010d}"
        self.mac = mac or "02:00:" + ":".join(f"{(crc >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))
        self.mode = RigMode.MINING
        self.power_target_w: float | None = None  # None: the model's nominal power
        self.powered = True
        self.ignore_sleep = False  # fault injection: accepts sleep, keeps drawing power
        self.boot_t = t - 86_400.0  # has been up a day when the farm starts
        self.mode_t = t - 86_400.0  # when the mode last changed
        self.command_count = 0
        self._rng = random.Random(seed)
        self._phase = self._rng.uniform(0, 2 * math.pi)
        # Trajectory: steady at full power since the start.
        self._segments: list[_Segment] = [_Segment(t, self.target_w, t, self.target_w)]
        self._energy_j = 0.0
        self._energy_t = t

    # -- physics --------------------------------------------------------------

    @property
    def target_w(self) -> float:
        return self.power_target_w if self.power_target_w is not None else self.model.nominal_w

    def _eval(self, t: float) -> float:
        """Power on the trajectory at t, past included (firmware averages look back)."""
        segs = self._segments
        if t >= segs[-1].t1:
            return segs[-1].p1
        for seg in reversed(segs):
            if t >= seg.t0:
                return seg.at(t)  # past its end: flat at its last power until the next
        return segs[0].p0  # before the kept history: as it then started

    def power_w(self, t: float) -> float:
        """Input power at t, with a little deterministic ripple while hashing."""
        p = self._eval(t)
        if p > self.model.idle_w * 2:
            p *= 1.0 + 0.004 * math.sin(t / 7.0 + self._phase)
        return p

    def hashrate_ths(self, t: float) -> float:
        p = self._eval(t)
        m = self.model
        above = p - m.idle_w * 2  # fans and control board before any hashing
        if above <= 0 or not self.powered:
            return 0.0
        frac = min(1.5, above / (m.nominal_w - m.idle_w * 2))
        h = m.nominal_ths * math.pow(frac, _HASH_EXPONENT)
        return h * (1.0 + 0.01 * math.sin(t / 11.0 + self._phase))

    def board_hashrates_ths(self, t: float) -> list[float]:
        total = self.hashrate_ths(t)
        n = self.model.boards
        # Boards are not identical: fixed small skew per board, summing to total.
        skew = [1.0 + 0.02 * math.sin(self._phase + i) for i in range(n)]
        s = sum(skew)
        return [total * k / s for k in skew]

    def board_temps_c(self, t: float) -> list[float]:
        """PCB temperature per board: the room plus a rise with load. Boards differ a
        little when loaded (a few percent of the rise); an idle or booting board sits at
        the room's temperature, never below it."""
        load = min(1.2, self._eval(t) / self.model.nominal_w)
        rise = 40.0 * load
        return [
            AMBIENT_C + rise * (1.0 + 0.0375 * math.sin(self._phase + i))
            for i in range(self.model.boards)
        ]

    def chip_temps_c(self, t: float) -> list[float]:
        """The hottest chip per board: its PCB's temperature plus a rise with load."""
        load = min(1.2, self._eval(t) / self.model.nominal_w)
        return [b + 8.0 * load for b in self.board_temps_c(t)]

    def fans_rpm(self, t: float) -> list[int]:
        if not self.powered:
            return [0] * self.model.fans
        load = min(1.0, self._eval(t) / self.model.nominal_w)
        return [int(1200 + 4800 * load + 60 * i) for i in range(self.model.fans)]

    def energy_j(self, t: float) -> float:
        """Energy drawn since the farm started, exact for the trajectory (ripple averages out)."""
        acc = self._energy_j
        for seg in self._segments:
            acc += seg.integral(self._energy_t, t)
        last = self._segments[-1]
        if t > last.t1:
            acc += last.p1 * (t - max(last.t1, self._energy_t))
        return acc

    def _retarget(self, t: float, segments: list[_Segment]) -> None:
        """Replace the trajectory from t on, keeping energy already drawn and the past
        (cut at t) for `HISTORY_S`, so averages over a window that spans a command (a
        firmware's "since boot" or 24 h hashrate) see what the rig really did."""
        self._energy_j = self.energy_j(t)
        self._energy_t = t
        past = [
            _Segment(s.t0, s.p0, min(s.t1, t), s.at(min(s.t1, t)))
            for s in self._segments
            if s.t0 < t and s.t1 >= t - HISTORY_S
        ]
        self._segments = past + (segments or [_Segment(t, self._eval(t), t, self._eval(t))])

    # -- state, as the firmware would report it --------------------------------

    def api_up(self, t: float) -> bool:
        """Whether the control board answers: powered and past its boot."""
        return self.powered and t >= self.boot_t + min(self.model.boot_s, 15.0)

    def uptime_s(self, t: float) -> int:
        return max(0, int(t - self.boot_t)) if self.powered else 0

    def is_hashing(self, t: float) -> bool:
        return self.hashrate_ths(t) > 0.0

    def ramping(self, t: float) -> bool:
        """Still moving towards where it was told to be."""
        return t < self._segments[-1].t1

    # -- commands --------------------------------------------------------------

    def sleep(self, t: float) -> None:
        self.command_count += 1
        if self.mode == RigMode.SLEEPING:
            return
        self.mode, self.mode_t = RigMode.SLEEPING, t
        if self.ignore_sleep:
            return
        p = self._eval(t)
        self._retarget(t, [_Segment(t, p, t + self.model.sleep_s, self.model.idle_w)])

    def wake(self, t: float) -> None:
        self.command_count += 1
        if self.mode == RigMode.MINING:
            return
        self.mode, self.mode_t = RigMode.MINING, t
        self._ramp_up(t)

    def set_power_target(self, watts: float | None, t: float) -> None:
        """None restores the model's default (nominal) power."""
        self.command_count += 1
        if watts is not None and not (self.model.min_w <= watts <= self.model.max_w):
            m = self.model
            raise ValueError(f"power target {watts:.0f} W outside {m.min_w:.0f}-{m.max_w:.0f} W")
        self.power_target_w = watts
        if self.mode == RigMode.MINING and self.powered:
            p = self._eval(t)
            if self.ramping(t) and p < self.target_w:
                self._ramp_up(t)  # still waking: keep ramping, to the new target
            else:
                self._retarget(t, [_Segment(t, p, t + self.model.target_change_s, self.target_w)])

    def _ramp_up(self, t: float) -> None:
        if not self.powered:
            return
        m = self.model
        p = self._eval(t)
        start = t + m.boot_s
        hash_floor = m.idle_w * 2
        frac = max(0.0, (p - hash_floor) / max(1.0, self.target_w - hash_floor))
        ramp = m.wake_ramp_s * (1.0 - min(1.0, frac))
        self._retarget(
            t,
            [
                _Segment(t, p, start, max(p, hash_floor)),
                _Segment(start, max(p, hash_floor), start + ramp, self.target_w),
            ],
        )

    def set_powered(self, on: bool, t: float) -> None:
        """The PDU outlet feeding this rig switched. Power-on reboots into mining."""
        if on == self.powered:
            return
        self.powered = on
        if not on:
            self._retarget(t, [_Segment(t, 0.0, t, 0.0)])
            return
        self.boot_t = t
        self.mode, self.mode_t = RigMode.MINING, t  # sleep does not survive a power cycle
        self._retarget(t, [_Segment(t, 0.0, t, self.model.idle_w * 2)])
        self._ramp_up(t)


class Outlet:
    def __init__(self, number: int, rig: SimRig | None, name: str = "") -> None:
        self.number = number
        self.rig = rig
        self.name = name or (rig.id if rig else f"outlet-{number}")
        self.on = True
        self._pending: tuple[float, bool] | None = None  # (when, state) for reboot

    @property
    def command_pending(self) -> bool:
        """A delayed action (the "on" half of a reboot) is still to happen."""
        return self._pending is not None


class SimPdu:
    """A switched, outlet-metered PDU. Outlet numbers are 1-based."""

    REBOOT_S = 5.0

    def __init__(self, pdu_id: str, outlets: Iterable[SimRig | None], *, name: str = "") -> None:
        self.id = pdu_id
        self.name = name or pdu_id
        self.outlets: dict[int, Outlet] = {
            i: Outlet(i, rig) for i, rig in enumerate(outlets, start=1)
        }

    def _settle(self, t: float) -> None:
        for o in self.outlets.values():
            if o._pending and t >= o._pending[0]:
                when, state = o._pending
                o._pending = None
                o.on = state
                if o.rig:
                    o.rig.set_powered(state, when)

    def outlet_on(self, number: int, t: float) -> bool:
        self._settle(t)
        return self.outlets[number].on

    def outlet_power_w(self, number: int, t: float) -> float:
        self._settle(t)
        o = self.outlets[number]
        return o.rig.power_w(t) if (o.on and o.rig) else 0.0

    def power_w(self, t: float) -> float:
        return sum(self.outlet_power_w(n, t) for n in self.outlets)

    def energy_kwh(self, t: float) -> float:
        self._settle(t)
        return sum(o.rig.energy_j(t) for o in self.outlets.values() if o.rig) / 3.6e6

    def switch(self, number: int, action: str, t: float) -> None:
        """action: "on", "off" or "reboot" (off now, on after REBOOT_S)."""
        self._settle(t)
        o = self.outlets[number]
        if action not in ("on", "off", "reboot"):
            raise ValueError(f"unknown outlet action {action!r}")
        o._pending = None
        on = action == "on"
        o.on = on
        if o.rig:
            o.rig.set_powered(on, t)
        if action == "reboot":
            o._pending = (t + self.REBOOT_S, True)


@dataclass(slots=True)
class SimMeter:
    """The import meter at the grid connection: every rig plus facility overhead."""

    id: str
    farm: Farm
    overhead_base_w: float = 20_000.0  # lighting, network, offices
    overhead_frac: float = 0.04  # cooling and transformer losses, proportional to rig load
    noise_frac: float = 0.003
    seed: int = 1

    # Where the rigs' draw comes from when other processes serve them (simulators.shards):
    # None, the farm's own rigs.
    rigs_from: RigPower | None = None
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def rigs_power_w(self, t: float) -> float:
        if self.rigs_from is not None:
            return self.rigs_from.power_w(t)
        return sum(r.power_w(t) for r in self.farm.rigs.values() if r.powered)

    def rigs_energy_j(self, t: float) -> float:
        if self.rigs_from is not None:
            return self.rigs_from.energy_j(t)
        return sum(r.energy_j(t) for r in self.farm.rigs.values())

    def true_power_w(self, t: float) -> float:
        return self.overhead_base_w + self.rigs_power_w(t) * (1.0 + self.overhead_frac)

    def power_w(self, t: float) -> float:
        p = self.true_power_w(t)
        return p * (1.0 + self._rng.gauss(0.0, self.noise_frac))

    def import_kwh(self, t: float) -> float:
        rigs_j = self.rigs_energy_j(t)
        base_j = self.overhead_base_w * (t - self.farm.start_t)
        return self.farm.meter_start_kwh + (base_j + rigs_j * (1.0 + self.overhead_frac)) / 3.6e6


class Farm:
    """Rigs, the PDUs feeding them, and the meter; all on one clock."""

    def __init__(self, clock: FarmClock, *, meter_start_kwh: float = 1_234_567.8) -> None:
        self.clock = clock
        self.start_t = clock.now()
        self.meter_start_kwh = meter_start_kwh
        self.rigs: dict[str, SimRig] = {}
        self.pdus: dict[str, SimPdu] = {}
        self.meter = SimMeter("meter-main", self)

    def now(self) -> float:
        return self.clock.now()

    def settle(self) -> None:
        """Apply due delayed outlet actions (reboots) before reading rigs directly."""
        t = self.now()
        for pdu in self.pdus.values():
            pdu._settle(t)

    def outlet_of(self, rig_id: str) -> tuple[str, int] | None:
        for pdu in self.pdus.values():
            for n, o in pdu.outlets.items():
                if o.rig is not None and o.rig.id == rig_id:
                    return pdu.id, n
        return None

    @classmethod
    def build(
        cls,
        clock: FarmClock,
        *,
        rigs: int,
        pdus: int,
        models: dict[str, float] | None = None,
        seed: int = 7,
        id_format: str = "rig-{n:03d}",
    ) -> Farm:
        """A farm of `rigs` miners spread evenly over `pdus` PDUs, models mixed by weight.

        `pdus` 0 is a farm without switched PDUs, whose rigs only their firmware controls."""
        if rigs < 1 or pdus < 0:
            raise ValueError("a farm needs at least one rig (and no negative count of PDUs)")
        farm = cls(clock)
        weights = models or {
            "Antminer S19 Pro": 0.4,
            "Antminer S19j Pro": 0.3,
            "Antminer S19 XP": 0.2,
            "Antminer S21": 0.1,
        }
        for name in weights:
            if name not in MODELS:
                raise ValueError(f"unknown rig model {name!r}; known: {', '.join(MODELS)}")
        rng = random.Random(seed)
        names, w = list(weights), list(weights.values())
        t = clock.now()
        for n in range(1, rigs + 1):
            rid = id_format.format(n=n)
            farm.rigs[rid] = SimRig(
                rid, MODELS[rng.choices(names, w)[0]], t, seed=seed * 100_003 + n
            )
        per = math.ceil(rigs / pdus) if pdus else 0
        rig_list = list(farm.rigs.values())
        for p in range(pdus):
            chunk = rig_list[p * per : (p + 1) * per]
            pid = f"pdu-{p + 1:02d}"
            farm.pdus[pid] = SimPdu(pid, chunk)
        return farm
