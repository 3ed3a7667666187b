"""Simulated Canaan Avalon miners: Canaan's cgminer 4.11.1 API on 4028, as `drivers.avalon`
and third-party tools (pyasic, asic-rs) talk to it.

Framing, faults and listening are those of every CGMiner-speaking simulator
(`simulators.cgminer.MinerServer`): one request per connection, JSON or `cmd|param`, a NUL
after the reply, `a+b+c` joins of report commands. What differs is the dialect, written
from real replies (an Avalon A1246, an A15-194 and an Avalon Q; see
tests/fixtures/avalon-cgminer/):

- `version`: `PROD` ("AvalonMiner 15-194"), `MODEL`, `VERSION` (the firmware build), `MAC`
  without colons, `CGMiner` "4.11.1"; every STATUS names "cgminer 4.11.1".
- `stats`/`estats`: one item for the controller whose `MM ID0` string packs everything in
  `Key[value]` pairs (hashrate `GHSspd`, per-board `MGHS`, `WALLPOWER` and `PS[...]`, `MPO`,
  temperatures, fans, per-chip `PVT_Tn`/`PVT_Vn`, `WORKMODE`, `SoftOFF`, `SYSTEMSTATU`);
  `stats` adds cgminer's per-pool items. `summary` (MH/s, like the Avalon Q capture) and
  `devs` (one "AVA10" device, MH/s, `Temperature` -273.0, like the A15 capture) carry
  averages only. The A1246 (an older build) has no `WALLPOWER`, only `PS[...]`.
- `ascset|0,softoff,1:<time>` / `softon`: hashboards off / on, answered STATUS I, Code 118,
  "ASC 0 set info: success softoff:<time>" (as captured); `workmode,set,N` and
  `worklevel,set,N`: "ASC 0 set OK" (Code 119, S); `led,1-1`/`1-0`; `help` lists the
  options (the captured list).

Simulator assumptions (not in the captures, kept here in one place):

- Work modes 0 low, 1 normal (the default), 2 high, with power figures (`MPO`) of the
  model's `WORK_MODE_W`; the rig's power follows the mode's figure. `worklevel` is taken as
  another name for the same setting (pyasic writes `worklevel`, Canaan's own tools
  `workmode`; both keys are reported and always agree).
- The time in `softoff`/`softon` is not waited for: the command acts at once (clients send
  "now" or "now + 5 s"); it is echoed in the answer as the firmware does.
- While soft-off: `SYSTEMSTATU[Work: In Idle, ...]` and `SoftOFF[4]`, as in the idle
  Avalon Q capture; 0 and "In Work" otherwise.
- A malformed or unknown `ascset` option is STATUS E, Code 120, "ASC 0 set failed: ...".
- `PS[...]` is [0, 1209, board volts x100, amps, DC watts, 1188, wall watts] with the DC
  figure 94.5 % of the wall figure (the A15 capture's ratio); `WALLPOWER` is the wall figure.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from simulators.cgminer import MinerServer, section_reply, status_reply
from simulators.farm import Farm, RigMode, RigModel, SimPdu, SimRig
from simulators.fleet import Fleet, outlets_of, subnet_hosts

log = structlog.get_logger(__name__)

Json = dict[str, Any]

FIRMWARE: Final = "avalon"  # `SimRig.firmware` of a simulated Avalon
DESCRIPTION: Final = "cgminer 4.11.1"
CGMINER_VERSION: Final = "4.11.1"
LOW, NORMAL, HIGH = 0, 1, 2
SOFT_OFF_FLAG: Final = 4  # the idle Avalon Q capture's SoftOFF value
POOL_URL: Final = "stratum+tcp://btc.global.luxor.tech:700"
SHARE_DIFFICULTY: Final = 524_288
ASCSET_HELP: Final = (
    "help|voltage|fan-spd|lcd|hash-sn-read|hash-sn-write|volt-tuning|workmode|worklevel|"
    "work_mode_lvl|reboot|softon|softoff|filter-clean|facopts|faclock|activate|"
    "solo-allowed|frequency|loop|password|qr_auth|time|"
)
READS: Final = frozenset(
    {
        "summary", "stats", "estats", "devs", "edevs", "pools", "version", "devdetails",
        "config", "coin", "asccount", "litestats",
    }
)  # fmt: skip
COMMANDS: Final = READS | frozenset({"ascset", "check"})


@dataclass(frozen=True, slots=True)
class AvalonModel:
    """What the firmware reports of a model besides the farm's physics."""

    physics: RigModel
    prod: str  # version PROD
    model: str  # version MODEL
    version: str  # firmware build
    hwtype: str
    wallpower: bool  # newer builds report WALLPOWER besides PS[...]
    work_mode_w: tuple[float, float, float]  # low, normal, high

    @property
    def ver(self) -> str:
        """The controller's `Ver[...]`: model, then build."""
        return f"{self.model}-{self.version}"


def _model(
    name: str,
    ths: float,
    watts: float,
    *,
    chips: int,
    fans: int,
    prod: str,
    model: str,
    version: str,
    hwtype: str,
    wallpower: bool,
) -> AvalonModel:
    low, high = round(watts * 0.8), round(watts * 1.08)
    physics = RigModel(
        name, ths, watts, low, high, idle_w=18.0, chips_per_board=chips, fans=fans, boot_s=30.0
    )
    return AvalonModel(physics, prod, model, version, hwtype, wallpower, (low, watts, high))


AVALON_MODELS: Final = {
    m.physics.name: m
    for m in (
        _model(
            "AvalonMiner 15-194", 194.0, 3660.0, chips=160, fans=2, prod="AvalonMiner 15-194",
            model="15-194", version="24102401_25462b2_9ddf522", hwtype="MM4v2_X3",
            wallpower=True,
        ),
        _model(
            "AvalonMiner 1246", 90.0, 3420.0, chips=120, fans=4, prod="AvalonMiner 1246-83",
            model="1246-83", version="21072802_4ec6bb0_211fc46", hwtype="MM3v2_X3",
            wallpower=False,
        ),
    )
}  # fmt: skip


def avalon_rig(rig_id: str, model: str, t: float, *, seed: int = 0) -> SimRig:
    """A simulated Avalon of one of `AVALON_MODELS`."""
    return SimRig(rig_id, AVALON_MODELS[model].physics, t, firmware=FIRMWARE, seed=seed)


def _ints(values: Iterable[float]) -> str:
    return " ".join(str(round(v)) for v in values)


def _fixed(values: Iterable[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


class AvalonServer(MinerServer):
    """One Avalon's 4028 listener (see the module docstring)."""

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        super().__init__(farm, rig_id, host=host, port=port, outlet=outlet)
        name = self.rig.model.name
        if name not in AVALON_MODELS:
            raise ValueError(f"{rig_id} is a {name}, not an Avalon ({', '.join(AVALON_MODELS)})")
        self.avalon = AVALON_MODELS[name]
        self.work_mode = NORMAL
        self.led = 0
        self.commands_seen: list[str] = []  # ascset options received, for tests

    @property
    def description(self) -> str:
        return DESCRIPTION

    # -- framing ---------------------------------------------------------------

    def respond(self, raw: bytes) -> bytes:
        """The reply bytes (JSON + NUL) for one raw request; never raises on any input."""
        t = self.farm.now()
        try:
            reply = self._dispatch(raw, t)
        except Exception:
            log.exception("avalon_simulator.handler_failed", rig=self.rig_id)
            reply = self._only(t, "F", 999, "Internal error")
        return json.dumps(reply, separators=(",", ":")).encode() + b"\x00"

    def _dispatch(self, raw: bytes, t: float) -> Json:
        text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                return self._only(t, "E", 23, "Invalid JSON")
            if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
                return self._only(t, "E", 24, "Missing JSON 'command'")
            command: str = obj["command"].strip()
            value = obj.get("parameter")
            if isinstance(value, list):  # asic-rs sends ["0", "softoff,1:..."]
                value = ",".join(str(v) for v in value)
            param = None if value is None or isinstance(value, bool | dict) else str(value)
        else:
            command, sep, rest = text.partition("|")
            command, param = command.strip(), (rest if sep else None)
        if "+" in command:
            out: Json = {}
            for name in dict.fromkeys(n.strip() for n in command.split("+") if n.strip()):
                if name not in COMMANDS:
                    slot = self._only(t, "E", 14, "Invalid command")
                elif name not in READS:
                    slot = self._only(t, "E", 45, f"Access denied to '{name}' command")
                else:
                    slot = self._command(name, None, t)
                out[name] = [slot]
            out["id"] = 1
            return out
        return self._command(command, param, t)

    def _command(self, name: str, param: str | None, t: float) -> Json:
        if name not in COMMANDS:
            return self._only(t, "E", 14, "Invalid command")
        if name == "ascset":
            return self._ascset(param or "", t)
        if name == "check":
            yes = "Y" if (param or "").strip() in COMMANDS else "N"
            return self._section(t, 72, "Check command", "CHECK", [{"Exists": yes, "Access": yes}])
        handler = getattr(self, f"_avalon_{name}")
        result: Json = handler(t)
        return result

    def _only(self, t: float, letter: str, code: int, msg: str) -> Json:
        return status_reply(letter, code, msg, when=int(t), description=DESCRIPTION)

    def _section(self, t: float, code: int, msg: str, section: str, items: list[Json]) -> Json:
        return section_reply(section, items, code, msg, when=int(t), description=DESCRIPTION)

    # -- control ---------------------------------------------------------------

    def _ascset(self, param: str, t: float) -> Json:
        parts = [p.strip() for p in param.split(",")]
        if len(parts) < 2 or parts[0] != "0":
            return self._only(t, "E", 120, f"ASC {parts[0] or '?'} set failed: invalid device")
        option, args = parts[1].lower(), parts[2:]
        self.commands_seen.append(option)
        rig = self.rig
        if option == "help":
            return self._only(t, "I", 118, f"ASC 0 set info: {ASCSET_HELP}")
        if option in ("softoff", "softon"):
            when = args[0] if args else ""
            flag, _, stamp = when.partition(":")
            if flag != "1" or not stamp.isdigit():
                return self._only(t, "E", 120, f"ASC 0 set failed: bad {option} time {when!r}")
            if option == "softoff":
                rig.sleep(t)
            else:
                rig.wake(t)
            return self._only(t, "I", 118, f"ASC 0 set info: success {option}:{stamp}")
        if option in ("workmode", "worklevel"):
            if len(args) < 2 or args[0].lower() != "set" or args[1] not in ("0", "1", "2"):
                return self._only(t, "E", 120, f"ASC 0 set failed: bad {option} {args!r}")
            self._set_mode(int(args[1]), t)
            return self._only(t, "S", 119, "ASC 0 set OK")
        if option == "led" and args and args[0] in ("1-0", "1-1"):
            self.led = int(args[0][-1])
            return self._only(t, "S", 119, "ASC 0 set OK")
        return self._only(t, "E", 120, f"ASC 0 set failed: {option} not supported")

    def _set_mode(self, mode: int, t: float) -> None:
        self.work_mode = mode
        watts = self.avalon.work_mode_w[mode]
        self.rig.set_power_target(None if mode == NORMAL else watts, t)

    # -- reads -----------------------------------------------------------------

    def _avg_ghs(self, t: float, window: float, samples: int = 6) -> float:
        rig = self.rig
        start = max(rig.boot_t, t - window)
        if t <= start:
            return rig.hashrate_ths(t) * 1000.0
        pts = [start + (t - start) * i / (samples - 1) for i in range(samples)]
        return sum(rig.hashrate_ths(p) for p in pts) / samples * 1000.0

    def _shares(self, t: float) -> int:
        elapsed = self.rig.uptime_s(t)
        return int(self._avg_ghs(t, elapsed) * 1e9 * elapsed / (SHARE_DIFFICULTY * 2**32))

    def _avalon_version(self, t: float) -> Json:
        a, rig = self.avalon, self.rig
        entry: Json = {
            "CGMiner": CGMINER_VERSION,
            "API": "3.7",
            "STM8": "20.08.01",
            "PROD": a.prod,
            "MODEL": a.model,
            "HWTYPE": a.hwtype,
            "SWTYPE": "MM319",
            "VERSION": a.version,
            "LOADER": "d0d779de.00",
            "DNA": f"020100{zlib.crc32(rig.serial.encode()):08x}",
            "MAC": rig.mac.replace(":", ""),
            "UPAPI": "2",
        }
        return self._section(t, 22, "CGMiner versions", "VERSION", [entry])

    def _avalon_summary(self, t: float) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        accepted = self._shares(t)
        av = self._avg_ghs(t, elapsed) * 1000.0
        entry: Json = {
            "Elapsed": elapsed,
            "MHS av": round(av, 2),
            "MHS 5s": round(rig.hashrate_ths(t) * 1e6, 2),
            "MHS 1m": round(self._avg_ghs(t, 60.0) * 1000.0, 2),
            "MHS 5m": round(self._avg_ghs(t, 300.0) * 1000.0, 2),
            "MHS 15m": round(self._avg_ghs(t, 900.0) * 1000.0, 2),
            "Found Blocks": 0,
            "Getworks": elapsed // 56,
            "Accepted": accepted,
            "Rejected": accepted // 400,
            "Hardware Errors": 0,
            "Utility": round(accepted / max(1, elapsed) * 60.0, 2),
            "Discarded": 0,
            "Stale": 0,
            "Get Failures": 0,
            "Local Work": elapsed * 5,
            "Remote Failures": 0,
            "Network Blocks": elapsed // 600,
            "Total MH": round(av * elapsed, 1),
            "Work Utility": round(av / 1e6 * 13.9, 2),
            "Difficulty Accepted": float(accepted * SHARE_DIFFICULTY),
            "Difficulty Rejected": float(accepted // 400 * SHARE_DIFFICULTY),
            "Difficulty Stale": 0.0,
            "Best Share": accepted * 398_000,
            "Device Hardware%": 0.0,
            "Device Rejected%": 0.25 if accepted else 0.0,
            "Pool Rejected%": 0.25 if accepted else 0.0,
            "Pool Stale%": 0.0,
            "Last getwork": 0,
        }
        return self._section(t, 11, "Summary", "SUMMARY", [entry])

    def _device(self, t: float) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        accepted = self._shares(t)
        av = self._avg_ghs(t, elapsed) * 1000.0
        return {
            "ASC": 0,
            "Name": "AVA10",
            "ID": 0,
            "Enabled": "Y",
            "Status": "Alive",
            "Temperature": -273.0,
            "MHS av": round(av, 2),
            "MHS 30s": round(self._avg_ghs(t, 30.0) * 1000.0, 2),
            "MHS 1m": round(self._avg_ghs(t, 60.0) * 1000.0, 2),
            "MHS 5m": round(self._avg_ghs(t, 300.0) * 1000.0, 2),
            "MHS 15m": round(self._avg_ghs(t, 900.0) * 1000.0, 2),
            "Accepted": accepted,
            "Rejected": accepted // 400,
            "Hardware Errors": 0,
            "Utility": round(accepted / max(1, elapsed) * 60.0, 2),
            "Last Share Pool": 0,
            "Last Share Time": max(0, elapsed - 3),
            "Total MH": round(av * elapsed, 1),
            "Diff1 Work": accepted * 2_000,
            "Difficulty Accepted": float(accepted * SHARE_DIFFICULTY),
            "Difficulty Rejected": float(accepted // 400 * SHARE_DIFFICULTY),
            "Last Share Difficulty": float(SHARE_DIFFICULTY),
            "Last Valid Work": int(t),
            "Device Hardware%": 0.0,
            "Device Rejected%": 0.25 if accepted else 0.0,
            "Device Elapsed": elapsed,
        }

    def _avalon_devs(self, t: float) -> Json:
        return self._section(t, 9, "1 ASC(s)", "DEVS", [self._device(t)])

    def _avalon_edevs(self, t: float) -> Json:
        return self._avalon_devs(t)

    def _avalon_devdetails(self, t: float) -> Json:
        entry: Json = {
            "DEVDETAILS": 0,
            "Name": "AVALON",
            "ID": 0,
            "Driver": "avalon",
            "Kernel": "",
            "Model": "",
            "Device Path": "",
        }
        return self._section(t, 69, "Device Details", "DEVDETAILS", [entry])

    def _avalon_config(self, t: float) -> Json:
        entry: Json = {
            "ASC Count": 1,
            "PGA Count": 0,
            "Pool Count": 1,
            "Strategy": "Failover",
            "Log Interval": 5,
            "Device Code": "AVALON",
            "OS": "Linux",
            "Hotplug": "None",
        }
        return self._section(t, 33, "CGMiner config", "CONFIG", [entry])

    def _avalon_asccount(self, t: float) -> Json:
        return self._section(t, 104, "ASC count", "ASCS", [{"Count": 1}])

    def _avalon_coin(self, t: float) -> Json:
        entry: Json = {
            "Hash Method": "sha256",
            "Current Block Time": float(int(t) // 600 * 600),
            "Current Block Hash": f"{zlib.crc32(str(int(t) // 600).encode()):064x}",
            "LP": True,
            "Network Difficulty": 126271255279306.98,
        }
        return self._section(t, 78, "CGMiner coin", "COIN", [entry])

    def _avalon_pools(self, t: float) -> Json:
        accepted = self._shares(t)
        pool: Json = {
            "POOL": 0,
            "URL": POOL_URL,
            "Status": "Alive",
            "Priority": 0,
            "Quota": 1,
            "Long Poll": "N",
            "Getworks": self.rig.uptime_s(t) // 56,
            "Accepted": accepted,
            "Rejected": accepted // 400,
            "Works": self.rig.uptime_s(t) * 10,
            "Discarded": 0,
            "Stale": 0,
            "Get Failures": 0,
            "Remote Failures": 0,
            "User": f"rigd.{self.rig_id}",
            "Password": "x",
            "Last Share Time": max(0, self.rig.uptime_s(t) - 3),
            "Diff1 Shares": accepted * 2_000,
            "Proxy Type": "",
            "Proxy": "",
            "Difficulty Accepted": float(accepted * SHARE_DIFFICULTY),
            "Difficulty Rejected": float(accepted // 400 * SHARE_DIFFICULTY),
            "Difficulty Stale": 0.0,
            "Last Share Difficulty": float(SHARE_DIFFICULTY),
            "Work Difficulty": float(SHARE_DIFFICULTY),
            "Has Stratum": True,
            "Stratum Active": True,
            "Stratum URL": POOL_URL,
            "Stratum Difficulty": float(SHARE_DIFFICULTY),
            "Has Vmask": True,
            "Has GBT": False,
            "Best Share": accepted * 398_000,
            "Pool Rejected%": 0.25 if accepted else 0.0,
            "Pool Stale%": 0.0,
            "Bad Work": 0,
            "Current Block Height": 907_089 + int(t) // 600 % 1000,
            "Current Block Version": 536870912,
        }
        return self._section(t, 7, "1 Pool(s)", "POOLS", [pool])

    def mm_string(self, t: float) -> str:
        """The controller's `MM ID0` string, in the firmware's key order."""
        rig, a, m = self.rig, self.avalon, self.rig.model
        soft_off = rig.mode == RigMode.SLEEPING
        elapsed = rig.uptime_s(t)
        wall = round(rig.power_w(t)) if rig.powered else 0
        dc = round(wall * 0.945)
        hashing = rig.is_hashing(t)
        volts = 1187 if hashing else 0
        ghs = rig.hashrate_ths(t) * 1000.0
        boards_ghs = [b * 1000.0 for b in rig.board_hashrates_ths(t)]
        pcb, chip = rig.board_temps_c(t), rig.chip_temps_c(t)
        fans = rig.fans_rpm(t)
        rng = random.Random(zlib.crc32(f"{rig.id}:{int(t) // 10}".encode()))
        ambient = 25.0 + 4.0 * math.sin(t / 3600.0)
        tmax = max(chip) if hashing else 0.0
        tavg = sum(chip) / len(chip) if hashing else 0.0
        fan_pct = min(100, round(max(fans, default=0) / 70))
        status = "In Idle" if soft_off else "In Work"
        fields: list[tuple[str, str]] = [
            ("Ver", a.ver),
            ("DNA", f"020100{zlib.crc32(rig.serial.encode()):08x}"),
            ("MEMFREE", "1392832.1381104"),
            ("NETFAIL", "0 0 0 0 0 0 0 0"),
            ("SYSTEMSTATU", f"Work: {status}, Hash Board: {m.boards} "),
            ("Elapsed", str(elapsed)),
            ("BOOTBY", "0x04.00000000"),
            ("LW", str(elapsed * 732)),
            ("MH", _ints([0] * m.boards)),
            ("DHW", "0"),
            ("HW", "0"),
            ("DH", "1.299%" if hashing else "0.000%"),
            ("Temp", str(round(ambient))),
            ("TMax", str(round(tmax))),
            ("TAvg", str(round(tavg))),
            *[(f"Fan{i + 1}", str(rpm)) for i, rpm in enumerate(fans)],
            ("FanR", f"{fan_pct}%"),
            ("Vo", "296" if hashing else "0"),
            ("PS", _ints([0, 1209, volts, dc / 11.87 if volts else 0, dc, 1188, wall])),
        ]
        if a.wallpower:
            fields.append(("WALLPOWER", str(wall)))
        fields += [
            *[(f"PLL{i}", "3346 2549 4722 13703") for i in range(m.boards)],
            ("GHSspd", f"{ghs:.2f}"),
            ("DHspd", "1.299%" if hashing else "0.000%"),
            ("GHSmm", f"{m.nominal_ths * 1040.0:.2f}"),
            ("GHSavg", f"{self._avg_ghs(t, elapsed):.2f}"),
            ("WU", f"{self._avg_ghs(t, elapsed) * 13.9:.2f}"),
            ("Freq", f"{345.94 * ghs / (m.nominal_ths * 1000.0):.2f}"),
            ("Led", str(self.led)),
            ("MGHS", _fixed(boards_ghs)),
            ("MTmax", _ints(chip if hashing else [0] * m.boards)),
            ("MTavg", _ints(pcb if hashing else [0] * m.boards)),
            ("MVavg", _fixed([285.7 if hashing else 0.0] * m.boards, 1)),
            ("TA", str(m.boards * m.chips_per_board)),
            ("Core", "A3197S"),
            ("PING", "131"),
            ("POWS", "0"),
            ("EEPROM", _ints([m.chips_per_board] * m.boards)),
            ("HASHS", _ints([0] * m.boards)),
            ("POOLS", "0"),
            ("SoftOFF", str(SOFT_OFF_FLAG if soft_off else 0)),
            ("ECHU", _ints([0] * m.boards)),
            ("ECMM", "0"),
            *[(f"SF{i}", "300 318 339 360") for i in range(m.boards)],
        ]
        for b in range(m.boards):
            base = chip[b] if hashing else ambient
            temps = [base - 12 + rng.uniform(-3, 3) for _ in range(m.chips_per_board)]
            fields.append((f"PVT_T{b}", " ".join(f"{round(v):3d}" for v in temps)))
        for b in range(m.boards):
            vs = [(285 if hashing else 0) + rng.randint(-6, 6) for _ in range(m.chips_per_board)]
            fields.append((f"PVT_V{b}", _ints(vs)))
        fields += [
            ("CRC", _ints([0] * m.boards)),
            ("COMCRC", _ints([0] * m.boards)),
            ("ADJ", "1"),
            ("COP", _ints([0] * m.boards)),
            ("MPO", str(round(a.work_mode_w[self.work_mode]))),
            ("MVL", "87"),
            *[(f"ATABD{i}", "300 318 339 360") for i in range(m.boards)],
            ("WORKMODE", str(self.work_mode)),
            ("WORKLEVEL", str(self.work_mode)),
        ]
        return " ".join(f"{k}[{v}]" for k, v in fields)

    def _controller(self, t: float) -> Json:
        return {
            "STATS": 0,
            "ID": "AVA100",
            "Elapsed": self.rig.uptime_s(t),
            "Calls": 0,
            "Wait": 0.0,
            "Max": 0.0,
            "Min": 99999999.0,
            "MM ID0": self.mm_string(t),
            "MM Count": 1,
            "Smart Speed": 1,
            "Voltage Level Offset": 0,
            "Nonce Mask": 25,
        }

    def _pool_stats(self, t: float) -> Json:
        return {
            "STATS": 1,
            "ID": "POOL0",
            "Elapsed": self.rig.uptime_s(t),
            "Calls": 0,
            "Wait": 0.0,
            "Max": 0.0,
            "Min": 99999999.0,
            "Pool Calls": 0,
            "Pool Attempts": 0,
            "Pool Wait": 0.0,
            "Pool Max": 0.0,
            "Pool Min": 99999999.0,
            "Pool Av": 0.0,
            "Work Had Roll Time": False,
            "Work Can Roll": False,
            "Work Had Expire": False,
            "Work Roll Time": 0,
            "Work Diff": float(SHARE_DIFFICULTY),
            "Min Diff": float(SHARE_DIFFICULTY),
            "Max Diff": float(SHARE_DIFFICULTY),
            "Min Diff Count": 2,
            "Max Diff Count": self._shares(t),
            "Times Sent": self._shares(t) + 4,
            "Bytes Sent": self._shares(t) * 176,
            "Times Recv": self._shares(t) + 30,
            "Bytes Recv": self._shares(t) * 410,
            "Net Bytes Sent": self._shares(t) * 176,
            "Net Bytes Recv": self._shares(t) * 410,
        }

    def _avalon_stats(self, t: float) -> Json:
        items = [self._controller(t), self._pool_stats(t)]
        return self._section(t, 70, "CGMiner stats", "STATS", items)

    def _avalon_estats(self, t: float) -> Json:
        return self._section(t, 70, "CGMiner stats", "STATS", [self._controller(t)])

    def _avalon_litestats(self, t: float) -> Json:
        entry = {"MM ID0:Summary": f"'STATS':{{{self.mm_string(t)}}}"}
        return self._section(t, 70, "CGMiner stats", "STATS", [entry])


class AvalonFleet(Fleet[AvalonServer]):
    """Every Avalon of a farm behind its own 4028 listener (see `MinerFleet`)."""

    def __init__(
        self,
        farm: Farm,
        *,
        host: str = "127.0.0.1",
        subnet: str | None = None,
        port: int = 4028,
        rig_ids: Iterable[str] | None = None,
    ) -> None:
        self.farm = farm
        outlets = outlets_of(farm)
        hosts = subnet_hosts(farm, subnet) if subnet is not None else {}
        wanted = [r for r in farm.rigs if farm.rigs[r].firmware == FIRMWARE]
        if rig_ids is not None:
            keep = set(rig_ids)
            wanted = [r for r in wanted if r in keep]
        self.servers: dict[str, AvalonServer] = {
            rid: AvalonServer(
                farm,
                rid,
                host=hosts.get(rid, host),
                port=port if subnet is not None else 0,
                outlet=outlets.get(rid),
            )
            for rid in wanted
        }
