"""Canaan Avalon (AvalonMiner) firmware: reads, soft-off / soft-on and work modes over 4028.

What it reads and controls, and through which API: everything goes through the miner's
CGMiner 4.11.1 API on port 4028 (no credentials), one connection per request.

- Reads: `summary` (uptime) and `estats` in one joined request, `version` on the first poll
  and after a restart. Canaan's cgminer does not fill the usual cgminer fields: `devs` and
  `summary` carry only pool-side averages, and everything else (make and model aside) is
  packed into one string per controller under the `MM ID0` key of `estats`/`stats`, as
  `Key[value]` pairs: `GHSspd[...]` the current GH/s, `MGHS[a b c]` each board's GH/s,
  `WALLPOWER[W]` (or, on older builds, the last figure of `PS[...]`) the input power,
  `MPO[W]` the power figure of the work mode in force, `Temp`/`TMax`/`MTmax[...]`/
  `MTavg[...]` temperatures, `Fan1..FanN` the fans, `PVT_Tn[...]` one entry per chip of
  board n, `WORKMODE[n]`, `SoftOFF[n]` and `SYSTEMSTATU[Work: In Work|In Idle, ...]`.
  Newer builds (Avalon Q) wrap it as `MM ID0:Summary` = `'STATS':{...}` and put the chip
  arrays under `HBinfo`. Without reading that string an idle Avalon looks like a rig that
  is still booting, with no power, temperature or fan: this module reads it.
- Sleep / wake: `ascset|0,softoff,1:<unix time>` and `ascset|0,softon,1:<unix time>`
  (hashboards off / on at that time; this driver asks for "now"). The firmware answers
  STATUS "I", Code 118, "ASC 0 set info: success softoff:<time>"; anything without
  "success" is a refusal. Soft-off leaves the controller and its API up: only the PDU takes
  the rig to zero.
- Power target: the firmware has no watt target, only work modes (`ascset|0,workmode,set,N`,
  answered "ASC 0 set OK"): 0 low, 1 normal (the default), 2 high. `set_power_target`
  picks the highest of low and normal whose power is at or below the target (high is never
  written). The power of the mode in force is what the firmware reports as `MPO`; the
  normal mode's figure is learned from it, and the low mode's comes from the site's
  `low_power_w` (measured on the rig's outlet) or from an `MPO` seen while the rig ran in
  low mode. Until both are known, no power target is offered.

Assumptions where Canaan's documentation is silent: the numbering of the work modes above
(a normal-running A12 and A15 in the captures report `WORKMODE[1]`); `PS[...]`'s last
figure as the wall power when `WALLPOWER` is absent (on the A15 capture both agree);
`SoftOFF` non-zero or "In Idle" as soft-off (the idle Avalon Q capture shows both).
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import (
    DEFAULT_PORT,
    MAX_FANS,
    CGMinerClient,
    parse_rate_and_uptime,
)
from drivers.errors import CommandRejected, DeviceError, UnsupportedOperation
from drivers.probes import shared_command
from drivers.reboots import RebootWatch
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from drivers.values import (
    MAX_RIG_HASHRATE_THS,
    MAX_RIG_POWER_W,
    first,
    measure,
    positive,
    section,
    to_float,
    to_int,
)

log = structlog.get_logger(__name__)

MAKE: Final = "Avalon"
FIRMWARE: Final = "Avalon cgminer"
LOW: Final = 0
NORMAL: Final = 1
HIGH: Final = 2
MODE_NAMES: Final = {LOW: "low", NORMAL: "normal", HIGH: "high"}
_OPTIONAL: Final = frozenset({"version"})
# `Key[value]`: keys are words; values never hold a ']'.
_FIELD: Final = re.compile(r"(\w+)\[([^\]]*)\]")
_MM_KEY: Final = re.compile(r"MM ID\d+")
_DIGITS_AND_SPACE: Final = b"0123456789 "
_DIGITS_TO_X: Final = bytes.maketrans(b"0123456789", b"x" * 10)
_TOO_LONG: Final = b"x" * 300  # a figure of 300 digits is past any float: not counted


# -- the MM ID string ----------------------------------------------------------------------


def parse_mm(text: str) -> dict[str, str]:
    """`Ver[...] DNA[...] ... WORKMODE[1]` -> {"Ver": "...", ..., "WORKMODE": "1"}.

    Also takes the `'STATS':{...}` wrapping of newer builds. The first occurrence of a key
    wins (a controller repeats none, but a garbled string must not shift values)."""
    body = text.strip()
    if body.startswith("'STATS':"):
        body = body[len("'STATS':") :].strip()
    out: dict[str, str] = {}
    for key, value in _FIELD.findall(body):
        out.setdefault(key, value.strip())
    return out


def numbers(value: str | None) -> list[float]:
    """Space-separated figures ("59459.52 61407.83 63139.66") -> floats; non-numbers dropped."""
    if not value:
        return []
    parts = value.split()
    # The usual figures: ASCII digits with at most a decimal point each, not leading, and
    # too few digits to overflow a float. `float` reads those exactly as `to_float` does
    # (it raises for "1.2.3", which then takes the general path below).
    digits = "".join(parts).replace(".", "")
    plain = digits.isascii() and digits.isdigit() and len(digits) < 300
    if plain and not any(p[0] == "." for p in parts):
        try:
            return [float(p) for p in parts]
        except ValueError:
            pass
    out = []
    for part in value.replace("%", " ").split():
        f = to_float(part)
        if f is not None:
            out.append(f)
    return out


def count_numbers(value: str | None) -> int:
    """`len(numbers(value))` without reading each figure: a board's `PVT_Tn` has one
    temperature per chip (over a hundred), and only their count is read."""
    if not value:
        return 0
    if value.isascii():  # a flag CPython keeps: no scan
        raw = value.encode("ascii")
        # ASCII digits and spaces (nothing left once they are deleted): each word is a
        # figure, unless too long for a float (300 digits or more: `_TOO_LONG`).
        if not raw.translate(None, _DIGITS_AND_SPACE):
            # Words counted without making them: each digit becomes "x", and a word
            # starts at the string's start or after a space.
            marked = raw.translate(_DIGITS_TO_X)
            if _TOO_LONG not in marked:
                return marked.count(b" x") + (marked[:1] == b"x")
    return len(numbers(value))


def one(mm: Mapping[str, str], key: str) -> float | None:
    vals = numbers(mm.get(key))
    return vals[0] if vals else None


def mm_fields(stats: Mapping[str, Any] | None) -> tuple[dict[str, str], dict[str, str]]:
    """(the first controller's fields, its `HBinfo` per-board fields) from `stats`/`estats`.

    A rig with several controllers (`MM Count` > 1) is read through its first: farm
    Avalons have one."""
    for item in section(stats, "STATS"):
        for key in sorted(k for k in item if isinstance(k, str) and _MM_KEY.match(k)):
            value = item[key]
            if isinstance(value, str):
                hb = item.get("HBinfo")
                hbinfo: dict[str, str] = {}
                if isinstance(hb, str):
                    for m in re.finditer(r"'HB\d+':\{([^}]*)\}", hb):
                        hbinfo.update(parse_mm(m.group(1)))
                return parse_mm(value), hbinfo
    return {}, {}


def is_soft_off(mm: Mapping[str, str]) -> bool:
    """Hashboards off on purpose: `SoftOFF` set, or the controller says "In Idle"."""
    soft = one(mm, "SoftOFF")
    status = mm.get("SYSTEMSTATU", "")
    return bool(soft) or "in idle" in status.lower()


def work_mode(mm: Mapping[str, str]) -> int | None:
    return to_int(mm.get("WORKMODE"))


def mode_power_w(mm: Mapping[str, str]) -> float | None:
    """The firmware's power figure of the work mode in force (`MPO`)."""
    return measure(positive(mm.get("MPO")), MAX_RIG_POWER_W)


def wall_power_w(mm: Mapping[str, str]) -> float | None:
    """Input power: `WALLPOWER`, else the last figure of `PS[...]` (older builds)."""
    wall = to_float(mm.get("WALLPOWER"))
    if wall is None:
        ps = numbers(mm.get("PS"))
        wall = ps[6] if len(ps) > 6 else None
    return measure(wall, MAX_RIG_POWER_W)


def _ghs_to_ths(value: float | None) -> float | None:
    return None if value is None else measure(value / 1000.0, MAX_RIG_HASHRATE_THS)


def parse_hashboards(
    mm: Mapping[str, str], hbinfo: Mapping[str, str], hashing: bool
) -> tuple[Hashboard, ...]:
    """Per board: `MGHS` (GH/s, an average: 0 while not hashing), `MTavg`/`MTmax` (board
    and chip °C), chips from `PVT_Tn` (one temperature per chip)."""
    rates = numbers(mm.get("MGHS"))
    tmax = numbers(mm.get("MTmax"))
    tavg = numbers(mm.get("MTavg"))
    count = max(len(rates), len(tmax), len(tavg))
    if count == 0:
        # One-board builds (Avalon Q): inlet/outlet sensors and the whole-rig figures.
        if "HBOTemp" not in mm and "PVT_T0" not in hbinfo:
            return ()
        count = 1
    inlet_outlet = [t for k in ("HBITemp", "HBOTemp") if (t := positive(mm.get(k)))]
    boards = []
    for i in range(count):
        chips_raw = mm.get(f"PVT_T{i}") or hbinfo.get(f"PVT_T{i}")
        chips = count_numbers(chips_raw) or None
        rate = rates[i] if i < len(rates) else None
        # MGHS is an average, still non-zero for a while after the boards stopped.
        ths = None if rate is None else (_ghs_to_ths(rate) if hashing else 0.0)
        temp = positive(tavg[i]) if i < len(tavg) else None
        if temp is None and count == 1 and inlet_outlet:
            temp = max(inlet_outlet)
        chip = positive(tmax[i]) if i < len(tmax) else None
        boards.append(
            Hashboard(
                index=i,
                hashrate_ths=ths,
                temp_c=temp,
                chip_temp_c=chip,
                chips=chips,
                active=bool(ths and ths > 0),
            )
        )
    return tuple(boards)


def parse_fans(mm: Mapping[str, str]) -> tuple[int, ...]:
    fans = []
    for key in _fan_keys(tuple(mm)):
        rpm = to_int(mm.get(key))
        if rpm is not None and rpm >= 0:
            fans.append(rpm)
    return tuple(fans)


@functools.lru_cache(maxsize=64)
def _fan_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The first MAX_FANS `Fan<digits>` keys in fan order (`isdecimal`, as a regex's d).
    Cached by the keys themselves: every rig of a firmware build sends the same sixty,
    poll after poll, and looking them up is cheaper than trying each."""
    nums = sorted(int(k[3:]) for k in keys if k.startswith("Fan") and k[3:].isdecimal())
    return tuple(f"Fan{n}" for n in nums[:MAX_FANS])


def parse_avalon_identity(
    version: Mapping[str, Any] | None, mm: Mapping[str, str] | None = None
) -> RigIdentity:
    """Model from `version`'s PROD ("AvalonMiner 15-194", "Avalon Q"), firmware build from
    its VERSION/CGVERSION, or from the controller's `Ver[...]` when `version` is missing."""
    info = first(version, "VERSION")
    model = str(info.get("PROD") or "").strip()
    build = str(info.get("VERSION") or info.get("CGVERSION") or info.get("LVERSION") or "")
    ver = (mm or {}).get("Ver", "")
    if not build and ver:
        build = ver.split("-")[-1] if "-" in ver else ver
    if not model and ver:
        # "1246-83-21072802_4ec6bb0_211fc46": the model comes first.
        head = ver.split("-")[0]
        model = f"AvalonMiner {head}" if head.isdigit() else ""
    return RigIdentity(make=MAKE, model=model, firmware=FIRMWARE, firmware_version=build)


def parse_avalon_telemetry(
    ts: float,
    *,
    summary: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None,
    version: Mapping[str, Any] | None = None,
    identity: RigIdentity | None = None,
    device: str = "",
) -> RigTelemetry:
    """`summary` + `estats` (or `stats`, or `litestats`) replies -> one reading."""
    mm, hbinfo = mm_fields(stats)
    return _reading(ts, summary, stats, mm, hbinfo, version, identity, device)


def _reading(
    ts: float,
    summary: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None,
    mm: Mapping[str, str],
    hbinfo: Mapping[str, str],
    version: Mapping[str, Any] | None,
    identity: RigIdentity | None,
    device: str,
) -> RigTelemetry:
    """`parse_avalon_telemetry` with the controller's fields already read (`mm_fields`),
    which the driver needs too: the string is read once a poll."""
    base_rate, base_uptime = parse_rate_and_uptime(summary, stats, device=device)
    realtime = _ghs_to_ths(to_float(mm.get("GHSspd")))
    hashrate = realtime if realtime is not None else base_rate
    hashing = bool(hashrate and hashrate > 0)
    boards = parse_hashboards(mm, hbinfo, hashing)
    if is_soft_off(mm):
        state = RigState.SLEEPING
    elif hashing:
        state = RigState.MINING
    else:
        state = RigState.WAKING
    board_temps = [b.temp_c for b in boards if b.temp_c is not None]
    chip_temps = [b.chip_temp_c for b in boards if b.chip_temp_c is not None]
    tmax = positive(mm.get("TMax"))
    if tmax is not None:
        chip_temps.append(tmax)
    if version is not None or identity is None:
        identity = parse_avalon_identity(version, mm)
    uptime = base_uptime if base_uptime is not None else to_int(mm.get("Elapsed"))
    return RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=hashrate,
        power_w=wall_power_w(mm),
        power_limit_w=mode_power_w(mm),
        nominal_hashrate_ths=_ghs_to_ths(positive(mm.get("GHSmm"))),
        temp_c=max(board_temps) if board_temps else None,
        chip_temp_c=max(chip_temps) if chip_temps else None,
        fans_rpm=parse_fans(mm),
        hashboards=boards,
        uptime_s=uptime,
        identity=identity,
    )


def is_avalon(version: Mapping[str, Any] | None, devdetails: Mapping[str, Any] | None) -> bool:
    """Canaan's cgminer: PROD "Avalon..." in `version`, or the "avalon" device driver."""
    prod = str(first(version, "VERSION").get("PROD") or "")
    if prod.lower().startswith("avalon"):
        return True
    dev = first(devdetails, "DEVDETAILS")
    return str(dev.get("Driver", "")).lower() == "avalon"


# -- the driver ----------------------------------------------------------------------------


class AvalonDriver:
    """One Avalon rig over its 4028 API. See the module docstring for what it does."""

    def __init__(
        self,
        device: str,
        client: CGMinerClient,
        *,
        low_power_w: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if low_power_w is not None and not (math.isfinite(low_power_w) and low_power_w > 0):
            raise ValueError(f"low_power_w must be a positive number of watts, got {low_power_w}")
        self.device = device
        self._client = client
        self._clock = clock  # Unix time for soft-off/soft-on: the rig's clock is NTP time
        self._identity: RigIdentity | None = None
        self._reboots = RebootWatch(device)
        self._configured_low = low_power_w
        self.mode_w: dict[int, float] = {}  # work mode -> its MPO, as seen
        self.mode: int | None = None
        self._update_capabilities()

    @property
    def client(self) -> CGMinerClient:
        return self._client

    @property
    def low_w(self) -> float | None:
        return self._configured_low if self._configured_low is not None else self.mode_w.get(LOW)

    @property
    def normal_w(self) -> float | None:
        return self.mode_w.get(NORMAL)

    def _update_capabilities(self) -> None:
        low, normal = self.low_w, self.normal_w
        ok = low is not None and normal is not None and low < normal
        self.capabilities = MinerCapabilities(
            can_sleep=True,
            can_power_target=ok,
            power_target_min_w=low if ok else None,
            power_target_max_w=normal if ok else None,
            needs_pdu_to_power_off=True,  # soft-off leaves the controller and fans drawing
        )

    # -- reads -----------------------------------------------------------------

    async def read(self, ts: float) -> RigTelemetry:
        cmds = ["summary", "estats"] + (["version"] if self._identity is None else [])
        replies = await self._client.multi(*cmds, optional=_OPTIONAL)
        estats = replies["estats"]
        mm, hbinfo = mm_fields(estats)
        tel = _reading(
            ts,
            replies["summary"],
            estats,
            mm,
            hbinfo,
            replies.get("version"),
            self._identity,
            self.device,
        )
        self._identity = None if self._reboots.restarted(tel) else tel.identity
        self.mode = work_mode(mm)
        if self.mode is not None and tel.power_limit_w is not None:
            self.mode_w[self.mode] = tel.power_limit_w
        self._update_capabilities()
        return tel

    # -- control ---------------------------------------------------------------

    async def _ascset(self, option: str, operation: str, *, want: str) -> str:
        reply = await self._client.command("ascset", f"0,{option}")
        msg = str(first(reply, "STATUS").get("Msg", ""))
        if want not in msg:
            raise CommandRejected(
                f"ascset {option.split(',')[0]} not done: {msg!r}",
                device=self.device,
                operation=operation,
            )
        return msg

    async def sleep(self) -> None:
        """Soft-off now: hashboards stop, the controller and its API stay up."""
        await self._ascset(f"softoff,1:{int(self._clock())}", "sleep", want="success")
        log.info("avalon.soft_off", device=self.device)

    async def wake(self) -> None:
        await self._ascset(f"softon,1:{int(self._clock())}", "wake", want="success")
        log.info("avalon.soft_on", device=self.device)

    def mode_for_target(self, watts: float | None) -> int:
        """Normal, or low when the target is below normal (ValueError below low)."""
        if watts is None:
            return NORMAL
        if isinstance(watts, bool) or not isinstance(watts, int | float):
            raise ValueError(f"power target must be a number of watts, got {watts!r}")
        if not (math.isfinite(watts) and watts > 0):
            raise ValueError(f"power target must be a positive number of watts, got {watts}")
        normal, low = self.normal_w, self.low_w
        if normal is not None and watts >= normal:
            return NORMAL
        if low is None:
            raise UnsupportedOperation(
                f"no work mode known at or below {watts:.0f} W: set low_power_w (the rig's"
                " measured draw in its low work mode), or sleep it or switch its PDU outlet",
                device=self.device,
                operation="set_power_target",
            )
        if watts < low:
            top = f"-{normal:.0f}" if normal is not None else "+"
            raise ValueError(
                f"power target {watts:.0f} W outside {low:.0f}{top} W (this rig's low and"
                " normal work modes)"
            )
        return LOW

    async def set_power_target(self, watts: float | None) -> None:
        mode = self.mode_for_target(watts)  # raises before any request
        if mode != self.mode:
            await self._ascset(f"workmode,set,{mode}", "set_power_target", want="set OK")
            self.mode = mode
        log.info(
            "avalon.work_mode",
            device=self.device,
            mode=MODE_NAMES[mode],
            requested_w=watts,
            expected_w=self.mode_w.get(mode) if mode != LOW else self.low_w,
        )

    async def close(self) -> None:
        """Nothing to release: the protocol opens one connection per request."""


def make_avalon_driver(
    device: str,
    host: str,
    port: int = DEFAULT_PORT,
    *,
    timeout: float = 3.0,
    retries: int = 1,
    low_power_w: float | None = None,
) -> AvalonDriver:
    client = CGMinerClient(host, port, timeout=timeout, retries=retries, device=device)
    return AvalonDriver(device, client, low_power_w=low_power_w)


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery contract names it so
    port: int = DEFAULT_PORT,
) -> RigIdentity | None:
    """Discovery probe: an Avalon's identity from its `version` (PROD "Avalon..."), or None
    for anything else. The `version` request is shared with the other probes that need it."""
    try:
        version = await shared_command(host, port, "version", timeout)
    except DeviceError:
        return None
    if not is_avalon(version, None):
        return None
    return parse_avalon_identity(version)
