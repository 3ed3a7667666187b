"""Simulated miners speaking the CGMiner-compatible JSON API (the "4028" protocol) over TCP.

The daemon's miner drivers must be exercised against real sockets, real framing and the
firmware quirks seen in captures, not against mocks; this module puts each `SimRig` of a
`Farm` behind its own loopback listener. Every reply is computed from the rig at
`farm.now()`, so the network side has no state of its own beyond what firmware keeps
(a LuxOS session, the ATM switch, the active profile).

Framing, as cgminer/LuxOS do it: one request per connection (JSON `{"command":..,
"parameter":..}` or text `cmd|param`), one JSON reply followed by a single NUL byte, then
the server closes the connection. `a+b+c` joins parameterless report commands.

Three dialects, chosen by `rig.firmware`:

- ``"luxos"``: LUXminer 2025.4.8; adds `power`, `config`, `profiles`, `atm`, `fans`, `temps`,
  `tempctrl`, `groups`, `events`, `healthchipget|<board>`, `voltageget|<board>` and the
  session write commands (`logon`, `session`, `logoff`, `curtail`, `profileset`, `atmset`,
  `powertargetset`, `ledset`). Reply keys, types, codes and messages follow the replies
  captured from a LUXminer 2025.4.8 S19k Pro (`tests/fixtures/luxos/captured-2025.4.8/`):
  `summary` has `Getworks` and GH/s windows up to 24 h, `stats` names the build in
  STATS[0] without a `LUXminer` key and prints an empty fourth chain slot as
  `chain_acn4: 0`, `chain_rate4: "0"`, sensors "0-0-0-0"; `devs` has LuxOS's 38 keys per
  board; `config` says OS "LuxOS"; pools carry their `GROUP`; keys come sorted.
- ``"bmminer"`` (and any other value): stock Antminer; only the default api-groups
  commands (`stats`, `pools`, `devs`, `summary`, `version`) are allowed, other cgminer
  commands get Code 45 "Access denied".
- ``"bosminer"``: Braiins OS 25.07 ("BOSer"), the Rust rewrite that only imitates cgminer:
  MH/s everywhere (`MHS 5s`, `MHS 1m`, ... and `Nominal MHS` per chain), alphabetically
  ordered keys (serde), a `stats` reply with no `chain_*` data at all (only cgminer's
  empty per-device/per-pool headers), `devs` with `Temperature` 0.0, so temperatures come
  from `temps`, fans from `fans`, power and power limit from `tunerstatus`, chip counts and
  the model ("Bitmain Antminer S19 Pro") from `devdetails`; `version` carries no model.
  Adds `fans`, `temps`, `tempctrl`, `tunerstatus`, `pause`, `resume`; implements only
  cgminer's `asccount`, `asc`, `config`, `devdetails`, `devs`, `edevs`, `pools`,
  `summary`, `stats`, `estats`, `version`, `check`, `coin`, `lcd`, everything else is
  Code 14 "Invalid command". Field names, codes and types follow replies of real BOSminer
  and BOSer builds (BOSminer+ 0.2.0 replies in foreman-apps' tests, BOSer 24.09/25.05
  `version` captures in asic-rs, BOSer `summary`/`devdetails` quoted in user reports) and
  Braiins's BOSminer API document; bosminer's open-source `api/cgminer` code for `stats`.

Simulator assumptions (where the reference material is silent or unverified):

- Text-mode requests are answered in JSON (real cgminer answers text mode with its
  pipe-separated format, which no client of this project uses).
- A request ends at a NUL, a newline, a complete JSON object, EOF, 4095 bytes or the
  read timeout, whichever comes first; a text request is whatever the first read returned
  (cgminer does a single `recv`).
- Status codes not documented publicly: `logoff` answers Code 317 "Session terminated";
  a missing, wrong or expired session id is STATUS E Code 401 "Invalid session";
  `profileset` while ATM is enabled is E Code 326; an unknown profile selector is E 322;
  a bad `curtail` action E 336; a bad `atmset` E 341; `powertargetset` answers Code 350
  "Power target set" and is refused (E 351) outside `PowerMin..PowerLimit` or while ATM is
  disabled (it is an ATM feature). Its parameter format `<sid>,<watts>` is assumed too.
- LuxOS reads with no capture: `tempctrl` answers Code 200 "Temperature control" with the
  keys `tempctrlset` echoes (board thresholds 55/65/70 °C as LuxOS documents for S19;
  chip values assumed); `events` lists none (an empty `EVENTS`); `healthchipget` rows are
  shaped as captured, values from the model; a bad board id is E Code 308; `ledset
  <sid>,red|green,on|off|blink|auto` answers Code 342 "LED set" (E 343 when malformed)
  and sets `config`'s `RedLed`/`GreenLed` (only red is kept).
- Profiles: eight, from `model.min_w` up to `model.nominal_w` ("default"), named by their
  frequency ("NNNMHz") with `Step` -7..0; hashrate follows the farm model's power law.
- On bmminer, LuxOS-only commands (`curtail`, `logon`, `power`, ...) are unknown to the
  firmware and so answer Code 14 "Invalid command"; only commands cgminer itself knows are
  "Access denied" (Code 45). That mirrors cgminer's order: command lookup, then access check.
- A joined member that is not a parameterless report command gets Code 45 in its slot.
- A rig that is not `api_up` (outlet off, still booting) behaves like a dead host as far as a
  listener shared with other state allows: the connection is accepted and immediately reset
  (RST, no bytes), which clients see as "connection reset". A real powered-off host would
  not answer the SYN at all; faking that would need a listener per rig toggled by a timer.
- `chain_acn` is 0 while a board is not hashing (sleeping, booting): LuxOS sleep powers the
  hashboards off, so no chips enumerate.
- bosminer: the 25.07 4028 `Description` is assumed to be "BOSer boser-buildroot 0.1.0-"
  plus the build hash of the 25.07 REST capture (24.09 and 25.05 captures have this
  shape). Chain IDs are 1-based (X19 and newer; S9 used 6-8). Nothing on 4028 says
  "paused": after `pause` (here or over REST) the MHS values decay to 0 with the power,
  `devdetails` keeps answering with `Frequency` 50 (MHz; users report ~50 MHz for a long
  time after a pause) and `tunerstatus` keeps reporting, with each chain's `Status`
  "Paused" (the exact text is unverified; the log line is "Tune/all: Status: paused").
  `pause`/`resume` answer `PAUSE`/`RESUME` `[true]` (Codes 204/205, documented) also when
  already paused/mining. `ApproximateChainPowerConsumption` is the miner figure less twice
  the model's idle power (fans and control board); `PowerLimit` is the power target in
  force (the model's nominal power by default). `devdetails` `Cores` is chips x 1276 and
  `fans` `Speed` (%) is RPM/100, the ratios seen in BOSer reports. Pool-management writes
  (`addpool`, `switchpool`, ...) exist on the firmware but are not simulated (Code 14).

Fault injection (`MinerServer.fault`, set with `set_fault`): ``"silent"`` reads the request
and never answers, holding the socket; ``"garbage"`` answers non-JSON bytes plus NUL;
``"truncated"`` answers the first half of the JSON and closes; ``"refuse"`` closes the
listener so connections are refused (re-opened on the same port when cleared); ``"slow"``
answers `slow_s` wall seconds late (an overloaded controller board).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import string
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from simulators.farm import AMBIENT_C, Farm, RigMode, SimPdu, SimRig
from simulators.fleet import Fleet, outlets_of, subnet_hosts
from simulators.server import GARBAGE, SILENT_HOLD_S, RigServer, hold_silent

log = structlog.get_logger(__name__)

Json = dict[str, Any]

MAX_REQUEST_BYTES: Final = 4095  # cgminer: a single recv of TMPBUFSIZ/2 - 1 bytes
DEFAULT_READ_TIMEOUT_S: Final = 10.0
SESSION_TTL_S: Final = 60.0
FAULTS: Final = frozenset({"silent", "garbage", "truncated", "refuse", "slow"})

LUXOS_VERSION: Final = "2025.4.8.220305-57b389c7"
LUXOS_DESCRIPTION: Final = f"LUXminer {LUXOS_VERSION}"
BMMINER_DESCRIPTION: Final = "cgminer 1.0.0"
BOSER_BUILD: Final = "boser-buildroot 0.1.0-3881c51d"
BOSER_DESCRIPTION: Final = f"BOSer {BOSER_BUILD}"
BMMINER_COMPILE_TIME: Final = "Tue Dec  6 16:12:30 CST 2022"
BMMINER_MINER_VERSION: Final = "49.0.1.3"
LUXOS_COMPILE_TIME: Final = "Tue Apr  8 22:03:05 UTC 2025"

POOL_URL: Final = "stratum+tcp://btc.global.luxor.tech:700"
SHARE_DIFFICULTY: Final = 524_288

# Stock cgminer's default api-groups let network clients run only these.
BMMINER_ALLOWED: Final = frozenset({"stats", "pools", "devs", "summary", "version"})
# Commands cgminer itself knows: on stock firmware these are "access denied", not "invalid".
CGMINER_KNOWN: Final = BMMINER_ALLOWED | frozenset(
    {
        "config", "devdetails", "estats", "coin", "notify", "privileged", "check", "lcd",
        "usbstats", "asc", "asccount", "ascenable", "ascdisable", "ascidentify", "ascset",
        "pga", "pgacount", "pgaenable", "pgadisable", "pgaidentify", "pgaset",
        "addpool", "removepool", "switchpool", "enablepool", "disablepool", "poolpriority",
        "poolquota", "save", "quit", "restart", "zero", "hotplug", "failover-only",
        "setconfig", "debug",
    }
)  # fmt: skip
LUXOS_READS: Final = frozenset(
    {
        "summary", "stats", "pools", "devs", "version", "devdetails", "config", "power",
        "profiles", "atm", "session", "fans", "temps", "tempctrl", "groups", "events",
    }
)  # fmt: skip
# LuxOS reads that take a parameter (a board id), so cannot be joined with `+`.
LUXOS_BOARD_READS: Final = frozenset({"healthchipget", "voltageget"})
LUXOS_WRITES: Final = frozenset(
    {"logon", "logoff", "curtail", "profileset", "atmset", "powertargetset", "ledset"}
)
# BOSminer/BOSer: parameterless reports (joinable), then commands taking a parameter or
# changing state.
BOSMINER_READS: Final = frozenset(
    {
        "summary", "stats", "estats", "devs", "edevs", "devdetails", "pools", "version",
        "config", "fans", "temps", "tempctrl", "tunerstatus", "asccount", "coin", "lcd",
    }
)  # fmt: skip
BOSMINER_COMMANDS: Final = BOSMINER_READS | frozenset({"asc", "check", "pause", "resume"})
BOSMINER_PAUSED_FREQ_MHZ: Final = 50

# Nominal chip frequency per model, so profile names look like the firmware's.
_DEFAULT_FREQ_MHZ: Final = {"Antminer S19 Pro": 525, "Antminer S21": 490}
# atmset keys the firmware accepts besides "enabled" (stored nowhere: no effect in the model).
_ATM_KEYS: Final = frozenset(
    {
        "startup_minutes",
        "post_ramp_minutes",
        "temp_window",
        "min_profile",
        "max_profile",
        "prevent_oc",
    }
)
# profileset selectors by unit suffix: (suffix, multiplier, Profile attribute compared).
_SELECTOR_UNITS: Final = (
    ("kw", 1000.0, "watts"),
    ("w", 1.0, "watts"),
    ("ths", 1.0, "hashrate_ths"),
)
_SESSION_ALPHABET: Final = string.ascii_letters + string.digits
# bosminer's per-pool `stats` item (cgminer's fields, never filled in: all zero).
_BOS_POOL_STATS: Final[dict[str, Any]] = {
    "Pool Calls": 0, "Pool Attempts": 0, "Pool Wait": 0.0, "Pool Max": 0.0, "Pool Min": 0.0,
    "Pool Av": 0.0, "Work Had Roll Time": False, "Work Can Roll": False,
    "Work Had Expire": False, "Work Roll Time": 0, "Work Diff": 0.0, "Min Diff": 0.0,
    "Max Diff": 0.0, "Min Diff Count": 0, "Max Diff Count": 0, "Times Sent": 0,
    "Bytes Sent": 0, "Times Recv": 0, "Bytes Recv": 0, "Net Bytes Sent": 0,
    "Net Bytes Recv": 0,
}  # fmt: skip


# -- the CGMiner reply envelope ------------------------------------------------------------


def status_entry(letter: str, code: int, msg: str, *, when: int, description: str) -> list[Json]:
    """CGMiner's STATUS: a one-item list with the letter (S, I, W, E, F), the firmware's
    code and message, its clock and its name. Every CGMiner-speaking firmware (LuxOS,
    bmminer, BOSer, btminer's v2 reads) answers in it."""
    return [{"STATUS": letter, "When": when, "Code": code, "Msg": msg, "Description": description}]


def status_reply(letter: str, code: int, msg: str, *, when: int, description: str) -> Json:
    """A reply that is only a STATUS: errors, and writes that return nothing else."""
    return {"STATUS": status_entry(letter, code, msg, when=when, description=description), "id": 1}


def section_reply(
    section: str, items: list[Json], code: int, msg: str, *, when: int, description: str
) -> Json:
    """A successful report: STATUS S plus its section (SUMMARY, DEVS, ...)."""
    status = status_entry("S", code, msg, when=when, description=description)
    return {"STATUS": status, section: items, "id": 1}


def request_complete(buf: bytes) -> bool:
    """Whether a request read so far can be answered without waiting for more bytes: the
    framing of 4028, which btminer's v2 API shares."""
    if b"\x00" in buf or buf.endswith(b"\n"):
        return True
    stripped = buf.strip()
    if not stripped.startswith(b"{"):
        return bool(stripped)  # text mode: whatever one recv returned
    try:
        json.loads(stripped)
    except (ValueError, RecursionError):
        return False
    return True


async def read_request(reader: asyncio.StreamReader, *, limit: int, wait_s: float) -> bytes:
    """One request as the firmware reads it: until `request_complete`, `limit` bytes, EOF
    or `wait_s` seconds, whichever comes first (b"" from an idle connection)."""
    buf = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while len(buf) < limit:
                chunk = await reader.read(limit - len(buf))
                if not chunk:
                    break
                buf += chunk
                if request_complete(buf):
                    break
    return buf


@dataclass(frozen=True, slots=True)
class Profile:
    """One LuxOS clock/voltage profile as the `profiles` command lists it."""

    name: str
    step: int
    frequency_mhz: int
    voltage: float
    watts: int
    hashrate_ths: float

    def as_reply(self) -> Json:
        return {
            "Profile Name": self.name,
            "Frequency": self.frequency_mhz,
            "Voltage": self.voltage,
            "Hashrate": self.hashrate_ths,
            "Watts": self.watts,
            "Step": str(self.step),
            "IsTuned": True,
            "IsDynamic": True,
            "CanRestore": True,
            "HasOverrides": False,
        }


def build_profiles(rig: SimRig, count: int = 8) -> tuple[Profile, ...]:
    """Profiles low -> high from the model's minimum power to its nominal ("default")."""
    m = rig.model
    base_freq = _DEFAULT_FREQ_MHZ.get(m.name, 500)
    floor = m.idle_w * 2
    out: list[Profile] = []
    for i in range(count):
        step = i - (count - 1)
        watts = round(m.min_w + (m.nominal_w - m.min_w) * i / (count - 1))
        ths = m.nominal_ths * ((watts - floor) / (m.nominal_w - floor)) ** 0.85
        freq = round(base_freq * ths / m.nominal_ths / 5) * 5
        name = "default" if step == 0 else f"{freq}MHz"
        volt = round(11.0 + 2.0 * i / (count - 1), 2)
        out.append(Profile(name, step, freq, volt, watts, round(ths, 1)))
    return tuple(out)


def _sensors(t_max: float, fractions: tuple[float, ...], ambient: float = AMBIENT_C) -> list[int]:
    """Four sensor readings: the hottest first, the others cooler, none below the room."""
    rise = max(0.0, t_max - ambient)
    return [round(ambient + rise * f) for f in fractions]


def _sensor_string(t_max: float, fractions: tuple[float, ...], ambient: float = AMBIENT_C) -> str:
    """Four-sensor strings like "73-45-64-65", as `stats` prints them on 4028."""
    return "-".join(str(v) for v in _sensors(t_max, fractions, ambient))


def average_ths(rig: SimRig, t: float, window: float, samples: int = 6) -> float:
    """The rig's mean hashrate over the last `window` seconds since it booted, as firmware
    averages it (a few samples of the farm model)."""
    start = max(rig.boot_t, t - window)
    if t <= start:
        return rig.hashrate_ths(t)
    pts = [start + (t - start) * i / (samples - 1) for i in range(samples)]
    return sum(rig.hashrate_ths(p) for p in pts) / samples


def bmminer_sensors(pcb_c: float, chip_c: float) -> dict[str, list[int]]:
    """A stock board's `temp_pcb`, `temp_chip` and `temp_pic` readings, the same on 4028
    (as "a-b-c-d" strings) and in the web UI's `stats.cgi` (as lists)."""
    return {
        "temp_pic": _sensors(pcb_c, _PIC_FRACTIONS),
        "temp_pcb": _sensors(pcb_c, _PCB_FRACTIONS),
        "temp_chip": _sensors(chip_c, _CHIP_FRACTIONS),
    }


_PCB_FRACTIONS: Final = (1.0, 0.42, 0.81, 0.83)
_CHIP_FRACTIONS: Final = (1.0, 0.5, 0.83, 0.85)
_PIC_FRACTIONS: Final = (0.78, 0.2, 0.6, 0.62)
# LuxOS's four sensors per board: exhaust, intake, intake, exhaust (as captured: "47-34-34-47").
_LUX_FRACTIONS: Final = (1.0, 0.41, 0.41, 1.0)
_LUX_BOARD_NAMES: Final = {"Antminer S19 Pro": "BHB42601", "Antminer S21": "BHB68601"}
# LuxOS's S19 temperature thresholds (board °C as its config file documents; chip values
# and the key set as `tempctrlset` echoes them).
_LUX_TEMPCTRL: Final[dict[str, Any]] = {
    "ChipDangerous": 95, "ChipHot": 90, "Dangerous": 70, "Hot": 65, "Target": 55,
    "WaterInletDangerous": 55,
}  # fmt: skip


def _acs(chips: int, group: int = 3) -> str:
    """Chip-status string: groups of 'o' separated by spaces, as the firmware prints them
    (three to a group on stock firmware, four on LuxOS)."""
    groups = [group] * (chips // group) + ([chips % group] if chips % group else [])
    return "".join(" " + "o" * g for g in groups)


class MinerServer(RigServer):
    """One simulated miner's 4028 listener. See the module docstring for the dialects."""

    faults = FAULTS

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        super().__init__(farm, rig_id, host=host, outlet=outlet)
        self.port = port
        self.read_timeout = read_timeout
        self.slow_s = 1.0
        # Test knobs for firmware variants seen in the field.
        self.hide_session_id = False  # `session` answers "" even while one is live
        self.offer_powertargetset = True
        # Commands this firmware build lacks (answered "Invalid command"), e.g. an older
        # LuxOS without `atm` or `profiles`.
        self.missing_commands: set[str] = set()
        self.joined_without_commas = False  # bmminer bug: "}{" between joined objects
        self.requests = 0  # requests answered or attempted, for tests counting retries
        self.profiles = build_profiles(self.rig)
        self.profile = self.profiles[-1].name
        self.atm_enabled = True
        self.red_led = "auto"  # `ledset`: "auto", "on", "off" or "blink"
        self.session_id = ""
        self.session_expires = 0.0
        self._server: asyncio.Server | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            return
        await self._listen()
        log.debug("cgminer_simulator.started", rig=self.rig_id, host=self.host, port=self.port)

    def _listening(self) -> bool:
        return self._server is not None

    async def _listen(self) -> None:
        server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True, limit=MAX_REQUEST_BYTES + 1
        )
        # Port 0 asks for an ephemeral port; keep the real one so "refuse" can re-open it.
        self.port = server.sockets[0].getsockname()[1]
        self._server = server

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    # -- connection handling ---------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._guard(self._serve, reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader, limit=MAX_REQUEST_BYTES, wait_s=self.read_timeout)
        if not request:
            return  # idle or empty connection: cgminer just closes
        self.requests += 1
        fault = self.fault
        if fault == "silent":
            await hold_silent(reader, SILENT_HOLD_S)
            return
        if fault == "garbage":
            writer.write(GARBAGE + b"\x00")
            await writer.drain()
            return
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        body = self.respond(request)
        if fault == "truncated":
            writer.write(body[: max(1, (len(body) - 1) // 2)])
        else:
            writer.write(body)
        await writer.drain()

    # -- protocol --------------------------------------------------------------

    @property
    def luxos(self) -> bool:
        return self.rig.firmware == "luxos"

    @property
    def bosminer(self) -> bool:
        return self.rig.firmware == "bosminer"

    @property
    def description(self) -> str:
        if self.bosminer:
            return BOSER_DESCRIPTION
        return LUXOS_DESCRIPTION if self.luxos else BMMINER_DESCRIPTION

    def respond(self, raw: bytes) -> bytes:
        """The reply bytes (JSON + NUL) for one raw request; never raises on any input."""
        t = self.farm.now()
        try:
            reply = self._dispatch_raw(raw, t)
        except Exception:
            log.exception("cgminer_simulator.handler_failed", rig=self.rig_id)
            reply = self._status_only(t, "F", 999, "Internal error")
        text = json.dumps(reply, separators=(",", ":"))
        if self.joined_without_commas and not (self.luxos or self.bosminer):
            text = text.replace("},{", "}{")
        return text.encode() + b"\x00"

    def _dispatch_raw(self, raw: bytes, t: float) -> Json:
        text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                return self._status_only(t, "E", 23, "Invalid JSON")
            if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
                return self._status_only(t, "E", 24, "Missing JSON 'command'")
            command: str = obj["command"]
            param = obj.get("parameter")
            if isinstance(param, bool) or not isinstance(param, str | int | float):
                param = None
            parameter = None if param is None else str(param)
        else:
            command, sep, rest = text.partition("|")
            parameter = rest if sep else None
        command = command.strip()
        if "+" in command:
            return self._joined(command, t)
        return self._command(command, parameter, t)

    def _joined(self, command: str, t: float) -> Json:
        names = list(dict.fromkeys(n.strip() for n in command.split("+") if n.strip()))
        out: Json = {}
        for name in names:
            if not self._known(name):
                slot = self._status_only(t, "E", 14, "Invalid command")
            elif name not in self._joinable():
                slot = self._status_only(t, "E", 45, f"Access denied to '{name}' command")
            else:
                slot = self._command(name, None, t)
            out[name.lower()] = [slot]
        out["id"] = 1
        return out

    def _known(self, name: str) -> bool:
        if name in self.missing_commands:
            return False
        if self.bosminer:
            return name in BOSMINER_COMMANDS
        if self.luxos:
            return name in LUXOS_READS | LUXOS_BOARD_READS | LUXOS_WRITES
        return name in CGMINER_KNOWN

    def _joinable(self) -> frozenset[str]:
        if self.bosminer:
            return BOSMINER_READS
        return LUXOS_READS if self.luxos else BMMINER_ALLOWED

    def _command(self, name: str, param: str | None, t: float) -> Json:
        if not self._known(name):
            return self._status_only(t, "E", 14, "Invalid command")
        if self.bosminer:
            return self._bos_command(name, param, t)
        if not self.luxos and name not in BMMINER_ALLOWED:
            return self._status_only(t, "E", 45, f"Access denied to '{name}' command")
        if name in LUXOS_WRITES:
            return self._write(name, param or "", t)
        if name in LUXOS_BOARD_READS:
            return self._lux_board_read(name, param, t)
        handler = getattr(self, f"_cmd_{name}")
        result: Json = handler(t)
        return result

    # -- reply builders --------------------------------------------------------

    def _status(self, t: float, letter: str, code: int, msg: str) -> list[Json]:
        return status_entry(letter, code, msg, when=int(t), description=self.description)

    def _status_only(self, t: float, letter: str, code: int, msg: str) -> Json:
        return status_reply(letter, code, msg, when=int(t), description=self.description)

    def _ok(self, t: float, code: int, msg: str, section: str, items: list[Json]) -> Json:
        return section_reply(section, items, code, msg, when=int(t), description=self.description)

    def _avg_ghs(self, t: float, window: float) -> float:
        return average_ths(self.rig, t, window) * 1000.0

    def _accepted(self, t: float) -> int:
        elapsed = self.rig.uptime_s(t)
        return int(self._avg_ghs(t, elapsed) * 1e9 * elapsed / (SHARE_DIFFICULTY * 2**32))

    def _cmd_summary(self, t: float) -> Json:
        if self.luxos:
            return self._lux_summary(t)
        rig = self.rig
        elapsed = rig.uptime_s(t)
        ghs = rig.hashrate_ths(t) * 1000.0
        avg = self._avg_ghs(t, elapsed)
        accepted = self._accepted(t)
        entry: Json = {
            "Elapsed": elapsed,
            "GHS 5s": round(ghs, 2),
            "GHS av": round(avg, 2),
            "GHS 30m": round(self._avg_ghs(t, 1800.0), 2),
            "Found Blocks": 0,
            "Getwork": elapsed // 13,
            "Accepted": accepted,
            "Rejected": accepted // 400,
            "Hardware Errors": elapsed // 90,
            "Utility": round(accepted / max(1, elapsed) * 60.0, 2),
            "Discarded": elapsed * 90,
            "Stale": 1 if elapsed > 600 else 0,
            "Get Failures": 1 if elapsed > 600 else 0,
            "Local Work": elapsed * 90,
            "Remote Failures": 0,
            "Network Blocks": elapsed // 600,
            "Total MH": round(avg * 1000.0 * elapsed, 1),
            "Work Utility": round(avg * 13.9, 2),
            "Difficulty Accepted": float(accepted * SHARE_DIFFICULTY),
            "Difficulty Rejected": float(accepted // 400 * SHARE_DIFFICULTY),
            "Difficulty Stale": 0.0,
            "Best Share": accepted * 3_180_000,
            "Device Hardware%": 0.0,
            "Device Rejected%": 0.0,
            "Pool Rejected%": 0.0,
            "Pool Stale%": 0.0,
            "Last getwork": int(t),
        }
        return self._ok(t, 11, "Summary", "SUMMARY", [entry])

    def _version_entry(self) -> Json:
        if self.luxos:
            return {
                "API": "3.7",
                "LUXminer": LUXOS_VERSION,
                "Miner": LUXOS_VERSION.split("-", 1)[0],
                "CompileTime": LUXOS_COMPILE_TIME,
                "Type": self.rig.model.name,
            }
        return {
            "API": "3.1",
            "BMMiner": "1.0.0",
            "CompileTime": BMMINER_COMPILE_TIME,
            "Miner": BMMINER_MINER_VERSION,
            "Type": self.rig.model.name,
        }

    def _cmd_version(self, t: float) -> Json:
        msg = "LUXminer versions" if self.luxos else "CGMiner versions"
        return self._ok(t, 22, msg, "VERSION", [self._version_entry()])

    def _cmd_stats(self, t: float) -> Json:
        if self.luxos:
            return self._lux_stats(t)
        rig, m = self.rig, self.rig.model
        head = self._version_entry()
        head.pop("API")
        elapsed = rig.uptime_s(t)
        hashing = rig.is_hashing(t)
        ghs = rig.hashrate_ths(t) * 1000.0
        base_freq = _DEFAULT_FREQ_MHZ.get(m.name, 500)
        freq = round(base_freq * min(1.5, ghs / 1000.0 / m.nominal_ths)) if hashing else 0
        boards = rig.board_hashrates_ths(t)
        pcb, chip = rig.board_temps_c(t), rig.chip_temps_c(t)
        fans = rig.fans_rpm(t)
        miner_id = f"{zlib.crc32(rig.serial.encode()):08x}{zlib.crc32(rig.mac.encode()):08x}"
        dev: Json = {
            "Calls": 0,
            "Elapsed": elapsed,
            "GHS 5s": round(ghs, 2),
            "GHS av": round(self._avg_ghs(t, elapsed), 2),
            "ID": "BTM_SOC0",
            "Max": 0,
            "Min": 99_999_999,
            "Mode": 2,
            "STATS": 0,
            "Wait": 0,
            "fan_num": m.fans,
            "frequency": base_freq,
            "miner_count": m.boards,
            "miner_id": miner_id,
            "miner_version": BMMINER_MINER_VERSION,
            "no_matching_work": elapsed // 90,
            "rate_30m": round(self._avg_ghs(t, 1800.0), 2),
            "rate_unit": "GH",
            "temp_max": round(max(pcb)) if pcb else 0,
            "temp_num": m.boards,
            "total rate": round(ghs, 2),
            "total_acn": m.boards * m.chips_per_board if hashing else 0,
            "total_freqavg": freq,
            "total_rateideal": round(m.nominal_ths * 1000.0, 1),
        }
        for i in range(max(4, m.fans)):
            dev[f"fan{i + 1}"] = fans[i] if i < len(fans) else 0
        for b in range(max(4, m.boards)):
            n = b + 1
            present = b < m.boards
            acn = m.chips_per_board if present and hashing else 0
            dev[f"chain_acn{n}"] = acn
            dev[f"chain_acs{n}"] = _acs(acn)
            dev[f"chain_hw{n}"] = (elapsed // 270 + 7 * b) if present else 0
            dev[f"chain_rate{n}"] = f"{boards[b] * 1000.0:.2f}" if present else ""
            dev[f"freq{n}"] = freq if present else 0
            zero = "0-0-0-0"
            dev[f"temp_pcb{n}"] = _sensor_string(pcb[b], _PCB_FRACTIONS) if present else zero
            dev[f"temp_chip{n}"] = _sensor_string(chip[b], _CHIP_FRACTIONS) if present else zero
            dev[f"temp_pic{n}"] = _sensor_string(pcb[b], _PIC_FRACTIONS) if present else zero
            if present:
                dev[f"temp{n}"] = round(pcb[b])
                dev[f"temp2_{n}"] = round(chip[b])
        return self._ok(t, 70, "CGMiner stats", "STATS", [head, dev])

    def _cmd_pools(self, t: float) -> Json:
        if self.luxos:
            return self._lux_pools(t)
        accepted = self._accepted(t)
        pools = []
        for i in range(3):
            active = i == 0
            pools.append(
                {
                    "POOL": i,
                    "URL": POOL_URL,
                    "Status": "Alive",
                    "Priority": i,
                    "Quota": 1,
                    "Long Poll": "N",
                    "Getworks": self.rig.uptime_s(t) // 13 if active else 3,
                    "Accepted": accepted if active else 0,
                    "Rejected": accepted // 400 if active else 0,
                    "Discarded": 0,
                    "Stale": 0,
                    "Get Failures": 0,
                    "Remote Failures": 0,
                    "User": f"rigd.{self.rig_id}",
                    "Last Share Time": "0:00:03" if active else "0",
                    "Diff": "524K" if active else "",
                    "Diff1 Shares": 0,
                    "Proxy Type": "",
                    "Proxy": "",
                    "Difficulty Accepted": float(accepted * SHARE_DIFFICULTY) if active else 0.0,
                    "Difficulty Rejected": 0.0,
                    "Difficulty Stale": 0.0,
                    "Last Share Difficulty": float(SHARE_DIFFICULTY) if active else 0.0,
                    "Has Stratum": True,
                    "Stratum Active": active,
                    "Stratum URL": "btc.global.luxor.tech" if active else "",
                    "Has GBT": False,
                    "Best Share": float(accepted * 3_180_000) if active else 0.0,
                    "Pool Rejected%": 0.0,
                    "Pool Stale%%": 0.0,
                }
            )
        return self._ok(t, 7, "3 Pool(s)", "POOLS", pools)

    def _cmd_devs(self, t: float) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        if not self.luxos:
            # Stock firmware's one pseudo-device: zero hashrates, share counters only.
            accepted = self._accepted(t)
            last_share = int(t) - 3
            dev: Json = {
                "ASC": 0,
                "Name": "BTM_SOC",
                "ID": 0,
                "Enabled": "Y",
                "Status": "Alive",
                "Tenperature": 0.0,
                "MHS av": 0.0,
                "MHS 5s": 0.0,
                "Accepted": accepted,
                "Rejected": accepted // 400,
                "Hardware Errors": 0,
                "Utility": 0.0,
                "Last Share Pool": 0,
                "Last Share Time": last_share,
                "Total MH": 0.0,
                "Diff1 Work": 0,
                "Difficulty Accepted": accepted * SHARE_DIFFICULTY,
                "Difficulty Rejected": accepted // 400 * SHARE_DIFFICULTY,
                "Last Share Difficulty": last_share,
                "Last Valid Work": last_share,
                "Device Hardware%": 0.0,
                "Device Rejected%": 0.0,
                "Device Elapsed": elapsed,
            }
            return self._ok(t, 9, "1 ASC(s)", "DEVS", [dev])
        return self._lux_devs(t)

    def _cmd_devdetails(self, t: float) -> Json:
        m = self.rig.model
        items = [
            {
                "DEVDETAILS": b,
                "Name": "BTM_SOC",
                "ID": b,
                "Driver": "bitmain",
                "Kernel": "",
                "Model": m.name,
                "Device Path": "",
                "Chips": m.chips_per_board,
            }
            for b in range(m.boards)
        ]
        return self._ok(t, 69, "Device Details", "DEVDETAILS", items)

    def _active_profile(self) -> Profile:
        for p in self.profiles:
            if p.name == self.profile:
                return p
        return self.profiles[-1]

    def _cmd_config(self, t: float) -> Json:
        return self._lux_config(t)

    def _cmd_power(self, t: float) -> Json:
        watts = round(self.rig.power_w(t)) if self.rig.powered else 0
        return self._ok(t, 311, "Power usage", "POWER", [{"Watts": watts, "PSU": False}])

    def _cmd_profiles(self, t: float) -> Json:
        items = [p.as_reply() for p in self.profiles]
        return self._lux_ok(t, 323, "List profiles", "PROFILES", items)

    def _atm_entry(self) -> Json:
        m = self.rig.model
        return {
            "Enabled": self.atm_enabled,
            "MaxProfile": "default",
            "MinProfile": "",
            "PostRampMinutes": 15,
            "StartupMinutes": 15,
            "TempWindow": 5.0,
            "ChipTempWindow": 8.0,
            "WaterInletTempWindow": 7.0,
            "PowerLimit": round(m.max_w),
            "PowerMin": round(m.min_w),
            "PowerTarget": round(self.rig.target_w),
        }

    def _cmd_atm(self, t: float) -> Json:
        return self._ok(t, 339, "ATM configuration values", "ATM", [self._atm_entry()])

    def _live_session(self, t: float) -> str:
        if self.session_id and t >= self.session_expires:
            self.session_id = ""
        return self.session_id

    def _cmd_session(self, t: float) -> Json:
        sid = "" if self.hide_session_id else self._live_session(t)
        return self._ok(t, 319, "Session", "SESSION", [{"SessionID": sid}])

    # -- LuxOS reads (shapes and keys as captured from LUXminer 2025.4.8) --------

    def _lux_ok(self, t: float, code: int, msg: str, section: str, items: list[Json]) -> Json:
        """LUXminer prints every item's keys in alphabetical order."""
        return self._ok(t, code, msg, section, [dict(sorted(i.items())) for i in items])

    def _lux_summary(self, t: float) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        avg = self._avg_ghs(t, elapsed)
        accepted = self._accepted(t)
        rejected = accepted // 400
        entry: Json = {
            "Accepted": accepted,
            "Best Share": SHARE_DIFFICULTY,
            "Device Hardware%": 0.0,
            "Device Rejected%": 0.0,
            "Difficulty Accepted": accepted * SHARE_DIFFICULTY,
            "Difficulty Rejected": rejected * SHARE_DIFFICULTY,
            "Difficulty Stale": 0,
            "Discarded": 0,
            "Elapsed": elapsed,
            "Found Blocks": 0,
            "GHS 15m": round(self._avg_ghs(t, 900.0), 2),
            "GHS 1m": round(self._avg_ghs(t, 60.0), 2),
            "GHS 24h": round(self._avg_ghs(t, 86_400.0), 2),
            "GHS 30m": round(self._avg_ghs(t, 1800.0), 2),
            "GHS 5m": round(self._avg_ghs(t, 300.0), 2),
            "GHS 5s": round(rig.hashrate_ths(t) * 1000.0, 2),
            "GHS av": round(avg, 2),
            "Get Failures": 0,
            "Getworks": elapsed // 5,
            "Hardware Errors": 0,
            "Last getwork": int(t) - 4 if rig.is_hashing(t) else int(rig.mode_t),
            "Local Work": 0,
            "Network Blocks": 0,
            "Pool Rejected%": round(rejected / accepted * 100.0, 4) if accepted else 0.0,
            "Pool Stale%": 0.0,
            "Rejected": rejected,
            "Remote Failures": 0,
            "Stale": 0,
            "Total MH": avg * 1000.0 * elapsed,
            "Utility": round(accepted / max(1, elapsed) * 60.0, 2),
            "Work Utility": round(avg * 13.97, 2),
        }
        return self._lux_ok(t, 11, "Summary", "SUMMARY", [entry])

    def _lux_stats(self, t: float) -> Json:
        """`stats` as LUXminer answers it: STATS[0] names the build (no `LUXminer` key),
        STATS[1] the chains, four slots, an empty one as `chain_acn` 0, `chain_rate` "0"."""
        rig, m = self.rig, self.rig.model
        elapsed = rig.uptime_s(t)
        hashing = rig.is_hashing(t)
        ghs = rig.hashrate_ths(t) * 1000.0
        base_freq = _DEFAULT_FREQ_MHZ.get(m.name, 500)
        freq = float(round(base_freq * min(1.5, ghs / 1000.0 / m.nominal_ths))) if hashing else 0.0
        boards = rig.board_hashrates_ths(t)
        pcb, chip = rig.board_temps_c(t), rig.chip_temps_c(t)
        fans = rig.fans_rpm(t)
        head: Json = {
            "CompileTime": LUXOS_COMPILE_TIME,
            "Miner": LUXOS_VERSION.split("-", 1)[0],
            "Type": m.name,
        }
        dev: Json = {
            "Calls": 0,
            "Elapsed": elapsed,
            "GHS 5s": round(ghs, 2),
            "GHS av": round(self._avg_ghs(t, elapsed), 2),
            "ID": "BTM_SOC0",
            "Max": 0,
            "Min": 99_999_999,
            "Mode": 2,
            "STATS": 0,
            "Wait": 0,
            "fan_num": m.fans,
            "frequency": round(freq),
            "miner_count": m.boards,
            "miner_id": rig.mac.replace(":", "").lower(),
            "miner_version": LUXOS_VERSION.split("-", 1)[0],
            "no_matching_work": 0,
            "rate_30m": round(self._avg_ghs(t, 1800.0), 2),
            "rate_unit": "GH",
            "temp_max": float(round(max(pcb))) if pcb else 0.0,
            "temp_num": m.boards,
            "total rate": round(ghs / max(1, m.boards), 2),
            "total_acn": m.boards * m.chips_per_board if hashing else 0,
            "total_freqavg": freq,
            "total_rateideal": round(m.nominal_ths * 1000.0, 1),
        }
        for i in range(max(4, m.fans)):
            dev[f"fan{i + 1}"] = fans[i] if i < len(fans) else 0
        for b in range(max(4, m.boards)):
            n = b + 1
            present = b < m.boards
            acn = m.chips_per_board if present and hashing else 0
            dev[f"chain_acn{n}"] = acn
            dev[f"chain_acs{n}"] = _acs(acn, 4)
            dev[f"chain_hw{n}"] = 0
            dev[f"chain_rate{n}"] = f"{boards[b] * 1000.0:.2f}" if present else "0"
            dev[f"freq{n}"] = freq if present else 0.0
            zero = "0-0-0-0"
            dev[f"temp_pcb{n}"] = _sensor_string(pcb[b], _LUX_FRACTIONS) if present else zero
            dev[f"temp_chip{n}"] = _sensor_string(chip[b], _LUX_FRACTIONS) if present else zero
            dev[f"temp_pic{n}"] = _sensor_string(pcb[b], _LUX_FRACTIONS) if present else zero
            if present:
                dev[f"temp{n}"] = float(round(pcb[b]))
                dev[f"temp2_{n}"] = float(round(chip[b]))
        return self._lux_ok(t, 70, "LUXminer stats", "STATS", [head, dev])

    def _lux_devs(self, t: float) -> Json:
        rig, m = self.rig, self.rig.model
        elapsed = rig.uptime_s(t)
        hashing = rig.is_hashing(t)
        temps = rig.board_temps_c(t)
        rates = rig.board_hashrates_ths(t)
        total = sum(rates)
        shares = [r / total if total > 0 else 1.0 / m.boards for r in rates]
        accepted = self._accepted(t)
        last = int(t) - 1 if hashing else int(rig.mode_t)
        windows = (("15m", 900.0), ("1m", 60.0), ("30m", 1800.0), ("5m", 300.0), ("60m", 3600.0))
        devs = []
        for b in range(m.boards):
            got = accepted * shares[b]
            entry: Json = {
                "ASC": b,
                "Accepted": round(got),
                "Board": _LUX_BOARD_NAMES.get(m.name, "BHB42601"),
                "Connector": f"J{7 + b}",
                "ControllerIPVersionHex": "0x18351835",
                "ControllerIPVersionStr": "N/A",
                "Device Elapsed": elapsed,
                "Device Hardware%": 0,
                "Device Rejected%": 0,
                "Diff1 Work": round(got) * SHARE_DIFFICULTY,
                "Difficulty Accepted": round(got) * SHARE_DIFFICULTY,
                "Difficulty Rejected": 0,
                "Enabled": "Y",
                "Hardware Error MHS 15m": 0,
                "Hardware Errors": 0,
                "ID": b,
                "IsRamping": rig.ramping(t) and rig.mode == RigMode.MINING,
                "IsUserShutdown": False,
                "Last Share Difficulty": SHARE_DIFFICULTY,
                "Last Share Pool": 0,
                "Last Share Time": last,
                "Last Valid Work": last,
                "MHS 5s": rates[b] * 1e6,
                "MHS av": self._avg_ghs(t, elapsed) * 1000.0 * shares[b],
                "Name": "",
                "Nominal MHS": m.nominal_ths * 1e6 / m.boards,
                "Profile": self.profile,
                "Rejected": 0,
                "SerialNumber": f"{rig.serial[-9:]}{b:02d}ZZ",
                "Status": "Alive" if hashing else "Dead",
                "Temperature": float(round(temps[b])),
                "Total MH": self._avg_ghs(t, elapsed) * 1000.0 * shares[b] * elapsed,
                "Utility": 0,
            }
            for name, window in windows:
                entry[f"MHS {name}"] = self._avg_ghs(t, window) * 1000.0 * shares[b]
            devs.append(entry)
        return self._lux_ok(t, 9, f"{len(devs)} ASC(s)", "DEVS", devs)

    def _lux_pools(self, t: float) -> Json:
        accepted = self._accepted(t)
        hashing = self.rig.is_hashing(t)
        pools = []
        for i in range(3):
            active = i == 0 and hashing
            got = accepted if i == 0 else 0
            since = 1 if active else self.rig.uptime_s(t) % 3600
            pools.append(
                {
                    "Accepted": got,
                    "AsicBoost": True,
                    "Bad Work": 0,
                    "Best Share": SHARE_DIFFICULTY if got else 0,
                    "Current Block Height": 0,
                    "Current Block Version": 536_870_912 if got else 0,
                    "Diff": "524K" if got else "0",
                    "Diff1 Shares": got * SHARE_DIFFICULTY,
                    "Difficulty Accepted": got * SHARE_DIFFICULTY,
                    "Difficulty Rejected": got // 400 * SHARE_DIFFICULTY,
                    "Difficulty Stale": 0,
                    "Discarded": 0,
                    "GROUP": 0,
                    "Get Failures": 0,
                    "Getworks": self.rig.uptime_s(t) // 10 if i == 0 else 0,
                    "Has GBT": False,
                    "Has Stratum": True,
                    "Has Vmask": True,
                    "Last Share Difficulty": SHARE_DIFFICULTY if got else 0,
                    "Last Share Time": time.strftime("%H:%M:%S", time.gmtime(since)),
                    "Long Pool": "N",  # sic
                    "POOL": i,
                    "Pool Rejected%": 0.25 if got else 0.0,
                    "Pool Stale%": 0.0,
                    "Priority": i,
                    "Proxy": "",
                    "Proxy Type": "",
                    "Quota": 1.0,
                    "Rejected": got // 400,
                    "Remote Failures": 0,
                    "Stale": 0,
                    "Status": "Alive",
                    "Stratum Active": active,
                    "Stratum Difficulty": SHARE_DIFFICULTY if active else 0,
                    "Stratum URL": POOL_URL.removeprefix("stratum+tcp://"),
                    "URL": POOL_URL,
                    "User": f"rigd.{self.rig_id}",
                    "Work Difficulty": SHARE_DIFFICULTY if active else 0,
                    "Works": 0,
                }
            )
        return self._lux_ok(t, 7, f"{len(pools)} Pool(s)", "POOLS", pools)

    def _cmd_groups(self, t: float) -> Json:
        group: Json = {"GROUP": 0, "Name": "default", "Quota": 1.0}
        return self._lux_ok(t, 324, "List groups", "GROUPS", [group])

    def _lux_config(self, t: float) -> Json:
        rig = self.rig
        sleeping = rig.mode == RigMode.SLEEPING
        octets = self.host.split(".")
        entry: Json = {
            "ASC Count": rig.model.boards,
            "BcastAddr": ".".join([*octets[:3], "255"]),
            "ControlBoardType": "cvitek",
            "Cooling": "Air",
            "CurtailMode": "Sleep" if sleeping else "None",
            "DHCP": True,
            "DNS Servers": "",
            "Device Code": "",
            "FPGABuildIdHex": "0x18351835",
            "FPGABuildIdStr": "2018-35-18 35:00",
            "FeeStatus": "Ok",
            "Gateway": ".".join([*octets[:3], "1"]),
            "GreenLed": "auto",
            "Hostname": f"luxos-{self.rig_id}",
            "Hotplug": "None",
            "IPAddr": self.host,
            "ImmersionMode": False,
            "IsAtmEnabled": self.atm_enabled,
            "IsPowerSupplyOn": not sleeping,
            "IsSingleVoltage": True,
            "IsTuning": False,
            "Log Interval": 0,
            "LogFileLevel": "info",
            "MACAddr": rig.mac.lower(),
            "Model": rig.model.name,
            "NameplateTHS": rig.model.nominal_ths,
            "Netmask": "255.255.255.0",
            "OS": "LuxOS",
            "PGA Count": 0,
            "PSUHwVersion": "75",
            "PSULabel": "APW121215e",
            "Pool Count": 3,
            "Profile": self.profile,
            "ProfileStep": str(self._active_profile().step),
            "RedLed": self.red_led,
            "SerialNumber": rig.serial,
            "Strategy": "Failover",
            "SystemStatus": "Normal",
            "UpdateOnStartup": "off",
            "UpdateOnTimeout": "off",
            "UpdateOnUser": "full",
            "UpdateSource": "https://storage.googleapis.com/luxor-firmware/stable",
            "UpdateTimeout": 60,
        }
        return self._lux_ok(t, 33, "LUXminer config", "CONFIG", [entry])

    def _cmd_fans(self, t: float) -> Json:
        fans = [
            {"FAN": f"FAN{i + 1}", "ID": i, "RPM": rpm, "Speed": min(100, round(rpm / 60))}
            for i, rpm in enumerate(self.rig.fans_rpm(t))
        ]
        reply = self._lux_ok(t, 202, f"{len(fans)} Fan(s)", "FANS", fans)
        reply["FANCTRL"] = [{"MinFans": self.rig.model.fans - 1, "PowerOffSpeed": 20}]
        return reply

    def _cmd_temps(self, t: float) -> Json:
        """Four sensors per S19-class board: exhaust (board and chip side hot) and intake."""
        pcb, chip = self.rig.board_temps_c(t), self.rig.chip_temps_c(t)
        items = []
        for b in range(self.rig.model.boards):
            intake = round(AMBIENT_C + (pcb[b] - AMBIENT_C) * _LUX_FRACTIONS[1])
            items.append(
                {
                    "BottomLeft": float(round(chip[b])),
                    "BottomRight": float(intake),
                    "ID": b,
                    "TEMP": b,
                    "TopLeft": float(round(pcb[b])),
                    "TopRight": float(intake),
                }
            )
        reply = self._lux_ok(t, 201, f"{len(items)} Temp(s)", "TEMPS", items)
        reply["METADATA"] = [
            {
                "BottomLeft": {"Label": "Board Exhaust (bottom)", "Position": [1, 0]},
                "BottomRight": {"Label": "Board Intake (bottom)", "Position": [1, 1]},
                "TopLeft": {"Label": "Board Exhaust (top)", "Position": [0, 0]},
                "TopRight": {"Label": "Board Intake (top)", "Position": [0, 1]},
            }
        ]
        return reply

    def _cmd_tempctrl(self, t: float) -> Json:
        return self._lux_ok(t, 200, "Temperature control", "TEMPCTRL", [dict(_LUX_TEMPCTRL)])

    def _cmd_events(self, t: float) -> Json:
        return self._lux_ok(t, 357, "Miner Events", "EVENTS", [])

    def _lux_board_read(self, name: str, param: str | None, t: float) -> Json:
        """`healthchipget` and `voltageget`: one board's chips or voltage."""
        m = self.rig.model
        try:
            board = int((param or "").split(",")[0].strip())
        except ValueError:
            board = -1
        if not 0 <= board < m.boards:
            return self._status_only(t, "E", 308, f"Invalid board '{param or ''}'")
        profile = self._active_profile()
        if name == "voltageget":
            entry: Json = {"Board": board, "Voltage": profile.voltage}
            return self._lux_ok(t, 307, "Get Voltage", "VOLTAGE", [entry])
        hashing = self.rig.is_hashing(t)
        per_chip = self.rig.board_hashrates_ths(t)[board] * 1000.0 / m.chips_per_board
        when_ms = int(t * 1000)
        chips = []
        for c in range(m.chips_per_board):
            wobble = 1.0 + 0.04 * math.sin(c * 1.7 + board)
            ghs = per_chip * wobble if hashing else 0.0
            expected = round(per_chip / 0.59) if hashing else 0
            chips.append(
                {
                    "Board": board,
                    "Chip": c,
                    "Column": c % 7,
                    "Domain": c // 7,
                    "Frequency": profile.frequency_mhz if hashing else 0,
                    "GHS 15m": round(ghs, 2),
                    "GHS 1m": round(ghs * 0.98, 2),
                    "GHS 5m": round(ghs, 2),
                    "HashCount": round(expected * wobble),
                    "HashExpected": expected,
                    "HashMin": expected // 5,
                    "Healthy": "Y",
                    "IsChecking": False,
                    "Row": c // 7,
                    "Score": round(wobble * 100.0, 2) if hashing else 0.0,
                    "When": when_ms,
                }
            )
        return self._lux_ok(t, 314, "Health Chip Get", "CHIPS", chips)

    # -- LuxOS writes ----------------------------------------------------------

    def _write(self, name: str, param: str, t: float) -> Json:
        if name == "logon":
            if self._live_session(t):
                return self._status_only(t, "E", 402, "Another session is active")
            self.session_id = "".join(secrets.choice(_SESSION_ALPHABET) for _ in range(8))
            self.session_expires = t + SESSION_TTL_S
            return self._ok(t, 316, "Session created", "SESSION", [{"SessionID": self.session_id}])
        sid, _, rest = param.partition(",")
        live = self._live_session(t)
        if not live or sid.strip() != live:
            return self._status_only(t, "E", 401, "Invalid session")
        self.session_expires = t + SESSION_TTL_S  # any use refreshes the session
        args = [a.strip() for a in rest.split(",")] if rest else []
        if name == "logoff":
            self.session_id = ""
            return self._status_only(t, "S", 317, "Session terminated")
        if name == "curtail":
            return self._curtail(args, t)
        if name == "atmset":
            return self._atmset(args, t)
        if name == "ledset":
            return self._ledset(args, t)
        if name == "profileset":
            return self._profileset(args, t)
        return self._powertargetset(args, t)

    def _curtail(self, args: list[str], t: float) -> Json:
        action = args[0].lower() if args else ""
        if action == "sleep":
            self.rig.sleep(t)
            label = "sleep mode"
        elif action == "wakeup":
            self.rig.wake(t)
            label = "wake up"
        else:
            return self._status_only(t, "E", 336, f"Invalid curtail action '{action}'")
        return self._ok(t, 335, "Curtailment command sent", "CURTAIL", [{"Action": label}])

    def _atmset(self, args: list[str], t: float) -> Json:
        updates: dict[str, bool] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            key, value = key.strip().lower(), value.strip().lower()
            if not sep or not key:
                return self._status_only(t, "E", 341, f"Invalid ATM setting '{arg}'")
            if key == "enabled":
                if value not in ("true", "false"):
                    return self._status_only(t, "E", 341, f"Invalid value for enabled: '{value}'")
                updates[key] = value == "true"
            elif key not in _ATM_KEYS:
                return self._status_only(t, "E", 341, f"Unknown ATM setting '{key}'")
        if not args:
            return self._status_only(t, "E", 341, "Missing ATM settings")
        if "enabled" in updates:
            self.atm_enabled = updates["enabled"]
        return self._ok(
            t, 340, "Advanced Thermal Management configuration updated", "ATM", [self._atm_entry()]
        )

    def _ledset(self, args: list[str], t: float) -> Json:
        """`ledset <sid>,<red|green>,<on|off|blink|auto>`; only the red LED is kept."""
        color = args[0].lower() if args else ""
        state = args[1].lower() if len(args) > 1 else ""
        if color not in ("red", "green") or state not in ("on", "off", "blink", "auto"):
            return self._status_only(t, "E", 343, f"Invalid LED setting '{','.join(args)}'")
        if color == "red":
            self.red_led = state
        entry: Json = {"Color": color, "State": state}
        return self._ok(t, 342, "LED set", "LED", [entry])

    def _select_profile(self, selector: str) -> Profile | None:
        sel = selector.strip()
        low = sel.lower()
        for p in self.profiles:
            if p.name.lower() == low:
                return p
        idx = self.profiles.index(self._active_profile())
        if sel[:1] in "+-" and sel[1:].isdigit():
            j = idx + int(sel)
            return self.profiles[j] if 0 <= j < len(self.profiles) else None
        for suffix, scale, attr in _SELECTOR_UNITS:
            if low.endswith(suffix):
                try:
                    want = float(low[: -len(suffix)]) * scale
                except ValueError:
                    return None
                fitting = [p for p in self.profiles if getattr(p, attr) <= want]
                return fitting[-1] if fitting else None
        return None

    def _profileset(self, args: list[str], t: float) -> Json:
        if self.atm_enabled:
            return self._status_only(
                t, "E", 326, "Cannot change profile while ATM is enabled; disable ATM first"
            )
        if not args or not args[0]:
            return self._status_only(t, "E", 322, "Missing profile")
        profile = self._select_profile(args[0])
        if profile is None:
            return self._status_only(t, "E", 322, f"Invalid profile '{args[0]}'")
        self.profile = profile.name
        target = None if profile is self.profiles[-1] else float(profile.watts)
        self.rig.set_power_target(target, t)
        items = [
            {"Board": b, "Profile": profile.name, "FrequencyStep": 5, "VoltageStep": 0.05}
            for b in range(self.rig.model.boards)
        ]
        return self._ok(t, 321, "Profile Set", "PROFILE", items)

    def _powertargetset(self, args: list[str], t: float) -> Json:
        if not self.offer_powertargetset:
            return self._status_only(t, "E", 14, "Invalid command")
        m = self.rig.model
        try:
            watts = float(args[0]) if args else math.nan
        except ValueError:
            watts = math.nan
        if not self.atm_enabled:
            return self._status_only(t, "E", 351, "Power target needs ATM enabled")
        if not (m.min_w <= watts <= m.max_w):
            return self._status_only(
                t, "E", 351, f"Power target must be {m.min_w:.0f}-{m.max_w:.0f} W"
            )
        self.rig.set_power_target(watts, t)
        return self._ok(t, 350, "Power target set", "ATM", [self._atm_entry()])

    # -- BOSminer / BOSer (rig.firmware == "bosminer") -------------------------

    def _bos_command(self, name: str, param: str | None, t: float) -> Json:
        if name in ("pause", "resume"):
            if name == "pause":
                self.rig.sleep(t)
            else:
                self.rig.wake(t)
            code, msg = (204, "Pause") if name == "pause" else (205, "Resume")
            return {"STATUS": self._status(t, "S", code, msg), name.upper(): [True], "id": 1}
        if name == "asc":
            return self._bos_asc(param, t)
        if name == "check":
            return self._bos_check(param, t)
        handlers = {
            "summary": self._bos_summary,
            "stats": self._bos_stats,
            "estats": self._bos_stats,
            "devs": self._bos_devs,
            "edevs": self._bos_devs,
            "devdetails": self._bos_devdetails,
            "pools": self._bos_pools,
            "version": self._bos_version,
            "config": self._bos_config,
            "fans": self._bos_fans,
            "temps": self._bos_temps,
            "tempctrl": self._bos_tempctrl,
            "tunerstatus": self._bos_tunerstatus,
            "asccount": self._bos_asccount,
            "coin": self._bos_coin,
            "lcd": self._bos_lcd,
        }
        return handlers[name](t)

    def _bos_ok(self, t: float, code: int, msg: str, section: str, items: list[Json]) -> Json:
        """BOSer serialises through serde_json maps: every item's keys come sorted."""
        return self._ok(t, code, msg, section, [dict(sorted(i.items())) for i in items])

    def _bos_chain_ids(self) -> list[int]:
        return list(range(1, self.rig.model.boards + 1))

    def _bos_board_mhs(self, t: float, window: float | None) -> list[float]:
        """Per-chain MH/s over a window (None: now), split as the model splits boards."""
        rig = self.rig
        ghs = rig.hashrate_ths(t) * 1000.0 if window is None else self._avg_ghs(t, window)
        boards = rig.board_hashrates_ths(t)
        total = sum(boards)
        n = len(boards)
        fracs = [b / total for b in boards] if total > 0 else [1.0 / n] * n
        return [ghs * 1000.0 * f for f in fracs]

    def _bos_freq_mhz(self, t: float) -> int:
        rig, m = self.rig, self.rig.model
        if not rig.is_hashing(t) or rig.mode == RigMode.SLEEPING:
            return BOSMINER_PAUSED_FREQ_MHZ
        base = _DEFAULT_FREQ_MHZ.get(m.name, 500)
        return round(base * min(1.5, rig.hashrate_ths(t) / m.nominal_ths))

    def _bos_summary(self, t: float) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        accepted = self._accepted(t)
        rejected = accepted // 400
        av_mhs = self._avg_ghs(t, elapsed) * 1000.0
        entry: Json = {
            "Accepted": accepted,
            "Best Share": SHARE_DIFFICULTY,
            "Device Hardware%": 0.0016 if elapsed else 0.0,
            "Device Rejected%": 0.0,
            "Difficulty Accepted": float(accepted * SHARE_DIFFICULTY),
            "Difficulty Rejected": float(rejected * SHARE_DIFFICULTY),
            "Difficulty Stale": 0.0,
            "Discarded": 0,
            "Elapsed": elapsed,
            "Found Blocks": 0,
            "Get Failures": 0,
            "Getworks": elapsed // 36,
            "Hardware Errors": elapsed // 600,
            "Last getwork": int(t),
            "Local Work": elapsed * 4650,
            "MHS 15m": self._avg_ghs(t, 900.0) * 1000.0,
            "MHS 1m": self._avg_ghs(t, 60.0) * 1000.0,
            "MHS 24h": self._avg_ghs(t, 86_400.0) * 1000.0,
            "MHS 5m": self._avg_ghs(t, 300.0) * 1000.0,
            "MHS 5s": rig.hashrate_ths(t) * 1e6,
            "MHS av": av_mhs,
            "Network Blocks": 0,
            "Pool Rejected%": rejected / accepted * 100.0 if accepted else 0.0,
            "Pool Stale%": 0.0,
            "Rejected": rejected,
            "Remote Failures": 0,
            "Stale": 0,
            "Total MH": av_mhs * elapsed,
            "Utility": accepted / max(1, elapsed) * 60.0,
            "Work Utility": av_mhs / 1e6 * 13.9,
        }
        return self._bos_ok(t, 11, "Summary", "SUMMARY", [entry])

    def _bos_asc_entry(self, t: float, idx: int) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        now_mhs = self._bos_board_mhs(t, None)[idx]
        av = self._bos_board_mhs(t, float(elapsed))[idx]
        last = int(t) - 2 if rig.is_hashing(t) else int(rig.mode_t)
        return {
            "ASC": idx,
            "Accepted": 0,  # bosminer accounts shares per pool, not per chain
            "Device Elapsed": elapsed,
            "Device Hardware%": 0.0,
            "Device Rejected%": 0.0,
            "Diff1 Work": int(av * elapsed / 4295.0),
            "Difficulty Accepted": 0.0,
            "Difficulty Rejected": 0.0,
            "Enabled": "Y",
            "Hardware Error MHS 15m": 0.0,
            "Hardware Errors": elapsed // 1800,
            "ID": self._bos_chain_ids()[idx],
            "Last Share Difficulty": float(SHARE_DIFFICULTY),
            "Last Share Pool": -1,
            "Last Share Time": last,
            "Last Valid Work": last,
            "MHS 15m": self._bos_board_mhs(t, 900.0)[idx],
            "MHS 1m": self._bos_board_mhs(t, 60.0)[idx],
            "MHS 5m": self._bos_board_mhs(t, 300.0)[idx],
            "MHS 5s": now_mhs,
            "MHS av": av,
            "Name": "",
            "Nominal MHS": rig.model.nominal_ths * 1e6 / rig.model.boards,
            "Rejected": 0,
            "Status": "Alive",
            "Temperature": 0.0,  # never filled in by bosminer; see `temps`
            "Total MH": av * elapsed,
            "Utility": 0.0,
        }

    def _bos_devs(self, t: float) -> Json:
        n = self.rig.model.boards
        devs = [self._bos_asc_entry(t, i) for i in range(n)]
        return self._bos_ok(t, 9, f"{n} ASC(s)", "DEVS", devs)

    def _bos_asc(self, param: str | None, t: float) -> Json:
        if param is None or not param.strip():
            return self._status_only(t, "E", 15, "Missing device id parameter")
        last = self.rig.model.boards - 1
        try:
            idx = int(param.strip())
        except ValueError:
            idx = -1
        if not 0 <= idx <= last:
            return self._status_only(t, "E", 107, f"Invalid ASC id {idx} - range is 0 - {last}")
        return self._bos_ok(t, 106, f"ASC{idx}", "ASC", [self._bos_asc_entry(t, idx)])

    def _bos_check(self, param: str | None, t: float) -> Json:
        if param is None or not param.strip():
            return self._status_only(t, "E", 71, "Missing check cmd")
        yes = "Y" if param.strip() in BOSMINER_COMMANDS else "N"
        return self._bos_ok(t, 72, "Check command", "CHECK", [{"Exists": yes, "Access": yes}])

    def _bos_stats(self, t: float) -> Json:
        """Only cgminer's empty headers: bosminer never filled its `stats` with chain data."""
        boards = self.rig.model.boards
        header: Json = {"Calls": 0, "Elapsed": 0, "ID": "", "Max": 0.0, "Min": 0.0, "Wait": 0.0}
        items = [{**header, "STATS": i} for i in range(boards)]
        items += [{**header, **_BOS_POOL_STATS, "STATS": boards + j} for j in range(3)]
        return self._bos_ok(t, 70, "BOSer stats", "STATS", items)

    def _bos_devdetails(self, t: float) -> Json:
        m = self.rig.model
        freq = self._bos_freq_mhz(t)
        load = min(1.2, self.rig.power_w(t) / m.nominal_w)
        items = [
            {
                "Chips": m.chips_per_board,
                "Cores": m.chips_per_board * 1276,
                "DEVDETAILS": i,
                "Device Path": "",
                "Driver": "",
                "Frequency": freq,
                "ID": chain,
                "Kernel": "",
                "Model": f"Bitmain {m.name}",
                "Name": f"Hash Chain {chain}",
                "Voltage": round(12.0 + 1.0 * load + 0.01 * i, 4),
            }
            for i, chain in enumerate(self._bos_chain_ids())
        ]
        return self._bos_ok(t, 69, "Device Details", "DEVDETAILS", items)

    def _bos_pools(self, t: float) -> Json:
        accepted = self._accepted(t)
        pools = []
        for i in range(3):
            active = i == 0
            got = accepted if active else 0
            pools.append(
                {
                    "Accepted": got,
                    "AsicBoost": True,
                    "Bad Work": 0,
                    "Best Share": SHARE_DIFFICULTY if active else 0,
                    "Current Block Height": 0,
                    "Current Block Version": 536_870_912 if active else 0,
                    "Diff1 Shares": got * 2,
                    "Difficulty Accepted": float(got * SHARE_DIFFICULTY),
                    "Difficulty Rejected": float(got // 400 * SHARE_DIFFICULTY),
                    "Difficulty Stale": 0.0,
                    "Discarded": 0,
                    "Get Failures": 0,
                    "Getworks": self.rig.uptime_s(t) // 36 if active else 3,
                    "Has GBT": False,
                    "Has Stratum": True,
                    "Has Vmask": True,
                    "Last Share Difficulty": float(SHARE_DIFFICULTY) if active else 0.0,
                    "Last Share Time": int(t) - 3 if active else 0,
                    "Long Poll": "N",
                    "POOL": i,
                    "Pool Rejected%": 0.25 if got else 0.0,
                    "Pool Stale%": 0.0,
                    "Priority": i,
                    "Proxy": "",
                    "Proxy Type": "",
                    "Quota": 1,
                    "Rejected": got // 400,
                    "Remote Failures": 0,
                    "Stale": 0,
                    "Status": "Alive",
                    "Stratum Active": active,
                    "Stratum Difficulty": float(SHARE_DIFFICULTY),
                    "Stratum URL": "btc.global.luxor.tech:700",
                    "URL": POOL_URL,
                    "User": f"rigd.{self.rig_id}",
                    "Work Difficulty": float(SHARE_DIFFICULTY),
                    "Works": self.rig.uptime_s(t) * 4650 if active else 0,
                }
            )
        return self._bos_ok(t, 7, "3 Pool(s)", "POOLS", pools)

    def _bos_version(self, t: float) -> Json:
        return self._bos_ok(
            t, 22, "BOSer versions", "VERSION", [{"API": "3.7", "BOSer": BOSER_BUILD}]
        )

    def _bos_config(self, t: float) -> Json:
        entry: Json = {
            "ASC Count": self.rig.model.boards,
            "Device Code": "",
            "Hotplug": "None",
            "Log Interval": 5,
            "OS": "Braiins OS",
            "PGA Count": 0,
            "Pool Count": 3,
            "Strategy": "Failover",
        }
        return self._bos_ok(t, 33, "BOSer config", "CONFIG", [entry])

    def _bos_fans(self, t: float) -> Json:
        fans = [
            {"FAN": i, "ID": i, "RPM": rpm, "Speed": min(100, round(rpm / 100))}
            for i, rpm in enumerate(self.rig.fans_rpm(t))
        ]
        return self._bos_ok(t, 202, f"{len(fans)} Fan(s)", "FANS", fans)

    def _bos_temps(self, t: float) -> Json:
        pcb, chip = self.rig.board_temps_c(t), self.rig.chip_temps_c(t)
        temps = [
            {"Board": round(pcb[i], 3), "Chip": round(chip[i], 3), "ID": chain, "TEMP": i}
            for i, chain in enumerate(self._bos_chain_ids())
        ]
        return self._bos_ok(t, 201, f"{len(temps)} Temp(s)", "TEMPS", temps)

    def _bos_tempctrl(self, t: float) -> Json:
        entry: Json = {"Dangerous": 110, "Hot": 100, "Mode": "Automatic", "Target": 89}
        return self._bos_ok(t, 200, "Temperature control", "TEMPCTRL", [entry])

    def _bos_tunerstatus(self, t: float) -> Json:
        rig, m = self.rig, self.rig.model
        miner_w = round(rig.power_w(t)) if rig.powered else 0
        chain_w = max(0, round(miner_w - 2 * m.idle_w))
        limit = round(rig.target_w)
        chain_limit = max(0, round((limit - 2 * m.idle_w) / m.boards))
        paused = rig.mode == RigMode.SLEEPING
        ramping = rig.ramping(t)
        status = "Paused" if paused else ("Testing performance profile" if ramping else "Stable")
        since = int(t - rig.mode_t)
        chains = [
            {
                "ApproximatePowerConsumptionWatt": round(chain_w / m.boards),
                "HashchainIndex": chain,
                "Iteration": 0,
                "LoadedProfileCreatedOn": int(rig.boot_t),
                "PowerLimitWatt": chain_limit,
                "StageElapsed": since,
                "Status": status,
                "TunerRunning": ramping and not paused,
                "TuningElapsed": since,
            }
            for chain in self._bos_chain_ids()
        ]
        entry: Json = {
            "ApproximateChainPowerConsumption": chain_w,
            "ApproximateMinerPowerConsumption": miner_w,
            "DynamicPowerScaling": "Disabled",
            "PowerLimit": limit,
            "TunerChainStatus": chains,
        }
        return self._bos_ok(t, 203, "Tuner Status", "TUNERSTATUS", [entry])

    def _bos_asccount(self, t: float) -> Json:
        return self._bos_ok(t, 104, "ASC count", "ASCS", [{"Count": self.rig.model.boards}])

    def _bos_coin(self, t: float) -> Json:
        entry: Json = {
            "Current Block Hash": f"{zlib.crc32(str(int(t) // 600).encode()):064x}",
            "Current Block Time": float(int(t) // 600 * 600),
            "Hash Method": "sha256",
            "LP": True,
            "Network Difficulty": 1.26e14,
        }
        return self._bos_ok(t, 78, "BOSer coin", "COIN", [entry])

    def _bos_lcd(self, t: float) -> Json:
        rig = self.rig
        temps = rig.board_temps_c(t)
        entry: Json = {
            "Best Share": SHARE_DIFFICULTY,
            "Current Pool": POOL_URL,
            "Elapsed": rig.uptime_s(t),
            "Found Blocks": 0,
            "GHS 5m": self._avg_ghs(t, 300.0),
            "GHS 5s": rig.hashrate_ths(t) * 1000.0,
            "GHS av": self._avg_ghs(t, float(rig.uptime_s(t))),
            "Last Share Difficulty": float(SHARE_DIFFICULTY),
            "Last Share Time": int(t) - 3,
            "Last Valid Work": int(t) - 1,
            "Temperature": round(max(temps), 3) if temps else 0.0,
            "User": f"rigd.{self.rig_id}",
        }
        return self._bos_ok(t, 125, "LCD", "LCD", [entry])


class MinerFleet(Fleet[MinerServer]):
    """Every rig of a farm behind its own 4028 listener.

    With `subnet` each miner gets its own loopback address on the real port, so a daemon
    can be configured exactly as on a farm LAN (one IP per rig, port 4028).
    """

    def __init__(
        self,
        farm: Farm,
        *,
        host: str = "127.0.0.1",
        subnet: str | None = None,
        port: int = 4028,
        rig_ids: Iterable[str] | None = None,
    ) -> None:
        """`rig_ids` serves only those rigs (the rest speak another dialect); addresses still
        follow the farm's order, so the n-th rig of the farm is always the n-th address."""
        self.farm = farm
        outlets = outlets_of(farm)
        addresses: list[tuple[str, int]]
        if subnet is None:
            addresses = [(host, 0)] * len(farm.rigs)
        else:
            addresses = [(h, port) for h in subnet_hosts(farm, subnet).values()]
        wanted = set(farm.rigs if rig_ids is None else rig_ids)
        self.servers: dict[str, MinerServer] = {
            rid: MinerServer(farm, rid, host=h, port=p, outlet=outlets.get(rid))
            for rid, (h, p) in zip(farm.rigs, addresses, strict=True)
            if rid in wanted
        }
