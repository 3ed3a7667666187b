"""Simulated Whatsminers (MicroBT btminer firmware): API v2 on port 4028 and API v3 on 4433.

Like `simulators.cgminer`, each `SimRig` of a `Farm` gets its own loopback listener(s) and
every reply is computed from the rig at `farm.now()`; the server keeps only what the firmware
keeps (the power limit and mode, the temporary power percentage, issued tokens, the time
btminer last (re)started).

API v2 (4028), as in "Whatsminer API V2.0.5" and the captures of `tests/fixtures/
whatsminer-api-v2/`: one request per connection, JSON (`"cmd"` or `"command"`, parameters
as extra top-level keys) or text; CGMiner-style reads (`summary`, `devs`, `edevs`, `pools`,
`devdetails`, `version`, joinable with `+`) answer with a `STATUS` list and Description
"cgminer 4.9.2"; btminer's own commands answer flat (`STATUS` is the letter). Writes only
in the encrypted envelope `{"enc":1,"data":base64(AES-256-ECB(json))}` with a token from
`get_token`; tokens live 30 minutes, 32 per client IP and 16 client IPs at most (Code 136
past that); the reply is `{"enc": ...}` under the same key. Codes: 14 invalid command or
data, 23 invalid JSON, 45 permission denied, 131 OK, 132 command error, 134 token OK,
135 check token error, 136 token over max times, 137 base64 decode error.

API v3 (4433), as pyasic, asic-rs and the matroskin crate (API 3.0.3 docs) describe it:
4-byte little-endian length + JSON both ways, several requests per connection allowed,
4 zero bytes are a heartbeat. `{"cmd":..,"param":..}` -> `{"code":0,"when":..,"msg":..,
"desc":cmd}`; `set.*` need `account`, `ts` and `token` = base64(SHA-256(cmd + password +
salt + ts))[:8], the salt from `get.device.info` param `salt`. Codes 0 ok, -1 command
error, -2 invalid command, -3 invalid JSON, -4 access denied.

Physics, through the farm model: `power_off` / `set.miner.service stop` power the
hashboards off (the rig falls to idle power within seconds, control board and API stay
up); `power_on` / `start` boot the hashboards and ramp over minutes ("Upfreq Complete"
and "up-freq-finish" stay 0 until the ramp ends). The power the rig aims for is
min(power limit, power-mode power) times the power percentage, kept within the model's
range.

Simulator assumptions (where the reference material is silent or unverified):

- Whether btminer NUL-terminates replies is unverified: replies end with a NUL by default
  (`nul_terminated`), as cgminer's do.
- `version` answers as cgminer 4.9.2's does (`VERSION:[{"CGMiner":"4.9.2","API":"3.7"}]`);
  the btminer-specific `get_version` carries the firmware version.
- A write whose envelope does not decrypt to a JSON object with the password's key (a
  wrong password) or whose token is unknown or expired answers, unencrypted, STATUS E
  Code 135 "check token error"; a write with the write API disabled answers STATUS E
  Code 45 "can't access write cmd" (the message pyasic checks for); a plaintext write
  answers Code 45 "permission denied". Error messages elsewhere are the code table's.
- Tokens are bound to the client IP that asked for them and forgotten on a reboot.
- `adjust_power_limit` (API >= 2.0.5) and `set.miner.power_limit` accept whole watts in the
  model's `min_w..max_w` (else Code 132 / code -1). They "restart mining": btminer's
  `Elapsed` starts again from 0, but the power dip of that restart is not modelled (the
  farm model has no restart transition; the power moves to the new limit over
  `target_change_s`). A limit sent while the hashboards are off is stored, not applied.
- The rated power (`get.miner.setting` `power`, the v2 default `power_limit_set`) is the
  model's `max_w`; summary `Power Limit`/`power-limit` is the limit in force,
  min(user limit, the mode's ceiling): low mode caps it at its own power (as a captured
  low-mode unit reports 3300 W in force with 3600 W set), normal and high leave the rated
  power, so out of the box every surface says the same limit (the rated power, as the
  captures and MicroBT's example do) while the rig draws the mode's power: low = 85 % of
  nominal, normal = nominal, high = `max_w`, never above the user limit.
- The power percentage (`set_power_pct[_v2]`, `set.miner.power_percent`) is a percentage
  of the power the rig runs at (the mode's power within the user limit); 0 and 100 clear
  it; it is not persisted (a reboot clears it) and does not restart mining.
- v3 `ts` must be within `ts_window_s` (300 s) of the miner's clock; the v3 salt is fixed
  per rig unless a test changes `v3_salt`. Write access failures are code -4 with msg
  "no permission" (write API disabled) or "invalid token".
- `get.miner.status` accepts several sections joined by commas ("summary,edevs").
- `set.system.led` with "auto" hands the LED back to the firmware; with a list of blink
  steps (`{"color","period","duration","start"}`, as pyasic sends) `get.device.info`'s
  `system.ledstatus` reads "manual" (the value real units report then is not known).
- API v3 firmware (`api="v3"`) serves its API on 4433 and, on 4028, only `get_version`
  (flat, as v2 answers it, with the v3 firmware's `fw_ver` and API version): real units
  answer it there, and clients (pyasic, asic-rs) choose v2 or v3 by that firmware date.
  Every other request on that side (reads, joins, encrypted writes) is closed at once
  without an answer: that is what pyasic's probe order needs to find a v3 unit (it tries
  4433 only when `version` and `devdetails` on 4028 return nothing); reports of older
  pyasic reading pools and uptime from v3 firmware suggest some units answer more, which
  is not modelled. `v3_version_on_4028 = False` (before `start`) closes that side too,
  as on units whose 4028 does not answer at all. `api="both"` serves both APIs over one
  firmware state (a transitional build).
- A rig that is not `api_up` (outlet off, still booting) resets connections, as
  `simulators.cgminer` does.

Fault injection (`set_fault`), on both ports: "silent" reads the request and never answers,
"garbage" answers bytes that are not JSON (v3: inside a valid frame), "truncated" answers
half the reply and closes, "refuse" closes the listeners. Firmware quirks: writes named in
`silent_writes` are applied but never answered (as `power_off` and mode writes are on
tested units); `write_enabled`, `reply_delay_s` (wall seconds before each reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import string
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from drivers.whatsminer.crypto import (
    V2Token,
    aes_ecb_decrypt_b64,
    aes_ecb_encrypt_b64,
    md5_crypt_hash,
    v2_aes_key,
    v3_token,
)
from simulators.cgminer import read_request, section_reply, status_reply
from simulators.farm import (
    AMBIENT_C,
    Farm,
    FarmClock,
    RigMode,
    RigModel,
    SimPdu,
    SimRig,
    above_room,
)
from simulators.fleet import Fleet, outlets_of, subnet_hosts
from simulators.server import (
    GARBAGE,
    SILENT_HOLD_S,
    RigServer,
    hold_silent,
    reset_connection,
)

log = structlog.get_logger(__name__)

Json = dict[str, Any]
Api = Literal["v2", "v3", "both"]

FIRMWARE: Final = "btminer"
V2_PORT: Final = 4028
V3_PORT: Final = 4433
V2_FIRMWARE_VERSION: Final = "20230803.11.REL"
V3_FIRMWARE_VERSION: Final = "20251209.16.Rel2"
V2_API_VERSION: Final = "2.0.5"
V3_API_VERSION: Final = "3.0.2"
CGMINER_DESCRIPTION: Final = "cgminer 4.9.2"
PLATFORM: Final = "H616"
DEFAULT_ADMIN_PASSWORD: Final = "admin"
DEFAULT_SUPER_PASSWORD: Final = "super"
V3_ACCOUNT: Final = "super"

DEFAULT_READ_TIMEOUT_S: Final = 10.0  # "no data within 10 seconds after connect: closed"
TOKEN_TTL_S: Final = 30 * 60.0
MAX_TOKENS_PER_IP: Final = 32
MAX_TOKEN_IPS: Final = 16
TS_WINDOW_S: Final = 300.0
MAX_V2_REQUEST: Final = 8191
MAX_V3_FRAME: Final = 1 << 16
FAULTS: Final = frozenset({"silent", "garbage", "truncated", "refuse"})
LOW_MODE_FRACTION: Final = 0.85
POOL_URL: Final = "stratum+tcp://btc.example.pool:3333"

CG_READS: Final = frozenset({"summary", "pools", "devs", "edevs", "devdetails", "version"})
NATIVE_READS: Final = frozenset(
    {"get_token", "get_version", "get_psu", "status", "get_miner_info", "get_error_code"}
)
# Writes the firmware accepts whose effect the model does not need (answered OK).
NOOP_WRITES: Final = frozenset(
    {
        "set_led", "update_pools", "set_temp_offset", "adjust_upfreq_speed",
        "set_poweroff_cool", "set_fan_zero_speed", "enable_btminer_fast_boot",
        "disable_btminer_fast_boot", "enable_web_pools", "disable_web_pools",
        "set_hostname", "set_zone", "set_target_freq", "pre_power_on", "net_config",
        "update_pwd", "factory_reset",
    }
)  # fmt: skip
V2_WRITES: Final = NOOP_WRITES | frozenset(
    {
        "power_off", "power_on", "adjust_power_limit", "set_power_pct", "set_power_pct_v2",
        "set_low_power", "set_normal_power", "set_high_power", "restart_btminer", "reboot",
    }
)  # fmt: skip
V2_SINCE_205: Final = frozenset({"adjust_power_limit", "set_power_pct_v2"})
V3_READS: Final = frozenset(
    {"get.device.info", "get.miner.status", "get.miner.setting", "get.system.setting"}
)
V3_NOOP_WRITES: Final = frozenset(
    {
        "set.miner.pools", "set.miner.fastboot", "set.miner.report",
        "set.system.hostname", "set.system.timezone", "set.miner.target_freq",
        "set.fan.poweroff_cool", "set.miner.upfreq_speed",
    }
)  # fmt: skip
V3_WRITES: Final = V3_NOOP_WRITES | frozenset(
    {
        "set.miner.service", "set.miner.power_limit", "set.miner.power_percent",
        "set.miner.power_mode", "set.miner.mode", "set.system.reboot", "set.system.led",
    }
)  # fmt: skip
V3_DEVICE_SECTIONS: Final = ("network", "miner", "system", "power", "salt", "error-code")
_SALT_ALPHABET: Final = string.ascii_letters + string.digits
_MODE_NAMES: Final = {"low": "Low", "normal": "Normal", "high": "High"}

# Illustrative models (nameplate-like figures; ranges are assumptions, see the report).
WHATSMINER_MODELS: dict[str, RigModel] = {
    m.name: m
    for m in (
        RigModel(
            "Whatsminer M30S+_VE40", 100.0, 3400.0, 1700.0, 3500.0, idle_w=30.0,
            chips_per_board=111, fans=2, sleep_s=5.0, boot_s=40.0, wake_ramp_s=300.0,
            target_change_s=60.0,
        ),
        RigModel(
            "Whatsminer M50S_VH50", 126.0, 3276.0, 1800.0, 3600.0, idle_w=30.0,
            chips_per_board=135, fans=2, sleep_s=5.0, boot_s=40.0, wake_ramp_s=300.0,
            target_change_s=60.0,
        ),
        RigModel(
            "Whatsminer M60S_VK40", 180.0, 3350.0, 1800.0, 3600.0, idle_w=30.0,
            chips_per_board=162, fans=2, sleep_s=5.0, boot_s=40.0, wake_ramp_s=300.0,
            target_change_s=60.0,
        ),
    )
}  # fmt: skip


def firmware_type(model: RigModel) -> str:
    """What the firmware calls the model ("M50S_VH50"), without the make."""
    return model.name.removeprefix("Whatsminer ").strip()


def whatsminer_rig(rig_id: str, model: str, t: float, *, seed: int = 0) -> SimRig:
    if model not in WHATSMINER_MODELS:
        raise ValueError(
            f"unknown Whatsminer model {model!r}; known: {', '.join(WHATSMINER_MODELS)}"
        )
    return SimRig(rig_id, WHATSMINER_MODELS[model], t, firmware=FIRMWARE, seed=seed)


def build_whatsminer_farm(
    clock: FarmClock,
    *,
    rigs: int,
    pdus: int = 1,
    models: dict[str, float] | None = None,
    seed: int = 7,
    id_format: str = "wm-{n:03d}",
) -> Farm:
    """A farm of Whatsminers spread evenly over `pdus` PDUs (as `Farm.build` does)."""
    if rigs < 1 or pdus < 1:
        raise ValueError("a farm needs at least one rig and one PDU")
    weights = models or {"Whatsminer M50S_VH50": 0.5, "Whatsminer M30S+_VE40": 0.3,
                         "Whatsminer M60S_VK40": 0.2}  # fmt: skip
    for name in weights:
        if name not in WHATSMINER_MODELS:
            raise ValueError(f"unknown Whatsminer model {name!r}")
    farm = Farm(clock)
    rng = random.Random(seed)
    names, w = list(weights), list(weights.values())
    t = clock.now()
    for n in range(1, rigs + 1):
        rid = id_format.format(n=n)
        farm.rigs[rid] = whatsminer_rig(rid, rng.choices(names, w)[0], t, seed=seed * 100_003 + n)
    per = math.ceil(rigs / pdus)
    rig_list = list(farm.rigs.values())
    for p in range(pdus):
        pid = f"pdu-{p + 1:02d}"
        farm.pdus[pid] = SimPdu(pid, rig_list[p * per : (p + 1) * per])
    return farm


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the firmware saw it (writes after decryption), for tests to check."""

    api: str  # "v2" or "v3"
    command: str
    code: int | None  # the status code answered (None: not answered)
    peer: str
    encrypted: bool = False


def _salt(seed: str) -> str:
    rng = random.Random(zlib.crc32(seed.encode()))
    return "".join(rng.choice(_SALT_ALPHABET) for _ in range(8))


def _frame(obj: Json) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("<I", len(body)) + body


def _chip_spread(hottest_c: float) -> tuple[float, float, float]:
    """(min, max, avg) chip temperature of a board whose hottest chip reads `hottest_c`:
    the coolest and the average lie between it and the room (about 19 and 8.5 °C below
    it at full load)."""
    return (
        round(above_room(hottest_c, 0.6), 1),
        round(hottest_c, 1),
        round(above_room(hottest_c, 0.82), 1),
    )


def _v2_command(raw: bytes) -> str:
    """The command a v2 request names (JSON `cmd`/`command`, or text before `|`), or ""."""
    text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    if not text.startswith("{"):
        return text.partition("|")[0].strip()
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return ""
    cmd = obj.get("cmd", obj.get("command")) if isinstance(obj, dict) else None
    return cmd.strip() if isinstance(cmd, str) else ""


def _int_param(value: Any) -> int | None:
    """Whole numbers as clients send them: 3000, "3000", 3000.0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


class WhatsminerServer(RigServer):
    """One simulated Whatsminer. See the module docstring for the protocol and assumptions."""

    faults = FAULTS

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        api: Api = "v2",
        port_v2: int = 0,
        port_v3: int = 0,
        admin_password: str = DEFAULT_ADMIN_PASSWORD,
        super_password: str = DEFAULT_SUPER_PASSWORD,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        outlet: tuple[SimPdu, int] | None = None,
        firmware_version: str | None = None,
        api_version: str | None = None,
    ) -> None:
        if api not in ("v2", "v3", "both"):
            raise ValueError(f"api must be v2, v3 or both, not {api!r}")
        super().__init__(farm, rig_id, host=host, outlet=outlet)
        self.api: Api = api
        self.port_v2 = port_v2
        self.port_v3 = port_v3
        self.read_timeout = read_timeout
        self.firmware_version = firmware_version or (
            V2_FIRMWARE_VERSION if api == "v2" else V3_FIRMWARE_VERSION
        )
        self.api_version = api_version or V2_API_VERSION
        # API v3 firmware still answers `get_version` on 4028 (how clients tell it from v2).
        self.v3_version_on_4028 = api == "v3"
        self.v3_api_version = V3_API_VERSION
        # Firmware state.
        m = self.rig.model
        self.rated_w = round(m.max_w)
        self.limit_set_w = self.rated_w
        self.power_mode = "normal"
        self.power_pct = 0
        self.service_enabled = True
        self.btminer_start_t = self.rig.boot_t
        self._boot_seen = self.rig.boot_t
        self.mineroff_t: float | None = None
        self.error_codes: list[dict[str, str]] = []
        # Credentials and tokens.
        self.v2_salt = _salt(f"{rig_id}/v2")
        self.v3_salt = _salt(f"{rig_id}/v3")
        self._admin_password = ""
        self._aes_key = b""
        self.admin_password = admin_password
        self.super_password = super_password
        self.tokens: dict[str, list[tuple[str, float]]] = {}
        # Knobs.
        self.write_enabled = True
        self.led_status = "auto"  # v3 `set.system.led`: "auto", or "manual" once set by hand
        self.silent_writes: set[str] = set()
        self.nul_terminated = True
        self.reply_delay_s = 0.0
        self.token_ttl_s = TOKEN_TTL_S
        self.ts_window_s = TS_WINDOW_S
        # What was seen.
        self.received: list[Received] = []
        self.requests = 0  # requests read on either port (attempted answers included)
        self._servers: dict[str, asyncio.Server] = {}

    # -- credentials -----------------------------------------------------------

    @property
    def admin_password(self) -> str:
        return self._admin_password

    @admin_password.setter
    def admin_password(self, password: str) -> None:
        """Changing the password invalidates every token (their key derives from it)."""
        self._admin_password = password
        self._key = md5_crypt_hash(password, self.v2_salt)
        self._aes_key = v2_aes_key(self._key)
        self.tokens = {}

    def live_tokens(self, peer: str | None = None) -> int:
        t = self.farm.now()
        lists = [self.tokens.get(peer, [])] if peer is not None else list(self.tokens.values())
        return sum(1 for lst in lists for _, exp in lst if exp > t)

    def commands(self, api: str | None = None) -> list[str]:
        return [r.command for r in self.received if api is None or r.api == api]

    # -- lifecycle -------------------------------------------------------------

    @property
    def serves_v2(self) -> bool:
        return self.api in ("v2", "both")

    @property
    def serves_v3(self) -> bool:
        return self.api in ("v3", "both")

    @property
    def listens_4028(self) -> bool:
        """Whether anything listens on the v2 port: the v2 API, or an API v3 firmware's
        4028 side (`get_version` only, unless `v3_version_on_4028` is off)."""
        return self.serves_v2 or self.v3_version_on_4028

    @property
    def port(self) -> int:
        """The API port a client is configured with: v2's, or v3's when only v3 is served."""
        return self.port_v2 if self.serves_v2 else self.port_v3

    async def start(self) -> None:
        if self._servers:
            return
        await self._listen()
        log.debug(
            "whatsminer_simulator.started",
            rig=self.rig_id,
            host=self.host,
            port_v2=self.port_v2 if self.serves_v2 else None,
            port_v3=self.port_v3 if self.serves_v3 else None,
        )

    def _listening(self) -> bool:
        return bool(self._servers)

    async def _listen(self) -> None:
        try:
            if self.listens_4028:
                s = await asyncio.start_server(
                    self._handle_v2, self.host, self.port_v2, reuse_address=True
                )
                self.port_v2 = s.sockets[0].getsockname()[1]
                self._servers["v2"] = s
            if self.serves_v3:
                s = await asyncio.start_server(
                    self._handle_v3, self.host, self.port_v3, reuse_address=True
                )
                self.port_v3 = s.sockets[0].getsockname()[1]
                self._servers["v3"] = s
        except BaseException:
            await self._stop_listening()
            raise

    async def _stop_listening(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        for s in servers:
            s.close()
        for s in servers:
            await s.wait_closed()

    # -- connections -------------------------------------------------------------

    async def _handle_v2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._guard(self._serve_v2, reader, writer)

    async def _handle_v3(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._guard(self._serve_v3, reader, writer)

    async def _serve_v2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = await read_request(reader, limit=MAX_V2_REQUEST, wait_s=self.read_timeout)
        if not buf.strip(b"\x00 \r\n\t"):
            return  # idle or empty connection: closed after the 10 s
        self.requests += 1
        if self.fault == "silent":
            await hold_silent(reader, SILENT_HOLD_S)
            return
        if self.fault == "garbage":
            writer.write(GARBAGE + b"\x00")
            await writer.drain()
            return
        if self.reply_delay_s > 0:
            await asyncio.sleep(self.reply_delay_s)
        peer = str((writer.get_extra_info("peername") or ("?",))[0])
        body = self.respond_v2(buf, peer)
        if body is None:
            await hold_silent(reader, self.read_timeout)  # applied, never answered
            return
        if not body:
            return  # API v3 firmware's 4028 side: closed without an answer
        if self.fault == "truncated":
            body = body[: max(1, (len(body) - 1) // 2)]
        writer.write(body)
        await writer.drain()

    async def _serve_v3(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str((writer.get_extra_info("peername") or ("?",))[0])
        while True:
            try:
                async with asyncio.timeout(self.read_timeout):
                    (length,) = struct.unpack("<I", await reader.readexactly(4))
                    if length == 0:
                        continue  # heartbeat
                    if length > MAX_V3_FRAME:
                        return
                    body = await reader.readexactly(length)
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            self.requests += 1
            if self.fault == "silent":
                await hold_silent(reader, SILENT_HOLD_S)
                return
            if self.fault == "garbage":
                writer.write(struct.pack("<I", len(GARBAGE)) + GARBAGE)
                await writer.drain()
                return
            if self.reply_delay_s > 0:
                await asyncio.sleep(self.reply_delay_s)
            if not self._api_up():
                reset_connection(writer)  # switched off (or rebooted) while connected
                return
            reply = self.respond_v3(body, peer)
            if reply is None:
                await hold_silent(reader, self.read_timeout)
                return
            data = _frame(reply)
            if self.fault == "truncated":
                writer.write(data[: max(1, len(data) // 2)])
                await writer.drain()
                return
            writer.write(data)
            await writer.drain()

    # -- firmware state ----------------------------------------------------------

    def _sync(self, t: float) -> None:
        """Forget what a reboot clears (tokens, the temporary percentage)."""
        if self.rig.boot_t == self._boot_seen:
            return
        self._boot_seen = self.rig.boot_t
        self.btminer_start_t = self.rig.boot_t
        self.tokens = {}
        self.mineroff_t = None
        had_pct, self.power_pct = self.power_pct, 0
        if had_pct and self.rig.powered:
            self._apply_target(t)

    def mode_power_w(self) -> float:
        """What the power mode runs the hashboards at (before any limit)."""
        m = self.rig.model
        return {
            "low": m.nominal_w * LOW_MODE_FRACTION,
            "normal": m.nominal_w,
            "high": m.max_w,
        }[self.power_mode]

    def mode_limit_w(self) -> float:
        """The ceiling a power mode puts on the limit: low mode's own power; normal and
        high leave the rated power (so by default the limit reads the rated power on every
        surface, as real units report it, while the rig draws its nominal power)."""
        return self.mode_power_w() if self.power_mode == "low" else float(self.rated_w)

    def limit_in_force_w(self) -> int:
        return round(min(float(self.limit_set_w), self.mode_limit_w()))

    def _apply_target(self, t: float) -> None:
        m = self.rig.model
        w = min(float(self.limit_set_w), self.mode_power_w())
        if self.power_pct:
            w = w * self.power_pct / 100.0
        w = min(max(w, m.min_w), m.max_w)
        target = None if math.isclose(w, m.nominal_w) else w
        if target != self.rig.power_target_w:
            self.rig.set_power_target(target, t)

    def _restart_mining(self, t: float) -> None:
        """btminer restarts to apply a limit: its uptime starts again (see the docstring)."""
        if self.rig.mode == RigMode.MINING and self.rig.powered:
            self.btminer_start_t = t

    def _set_limit(self, watts: int, t: float) -> None:
        self.limit_set_w = watts
        self._restart_mining(t)
        self._apply_target(t)

    def _set_pct(self, pct: int, t: float) -> None:
        self.power_pct = 0 if pct in (0, 100) else pct
        self._apply_target(t)

    def _set_mode(self, mode: str, t: float) -> None:
        self.power_mode = mode
        self._apply_target(t)

    def _power_off(self, t: float) -> None:
        if self.rig.mode != RigMode.SLEEPING:
            self.mineroff_t = t
        self.rig.sleep(t)

    def _power_on(self, t: float) -> None:
        """Hashboards on; btminer itself kept running (it answered the API meanwhile)."""
        self.mineroff_t = None
        self.rig.wake(t)

    def _reboot(self, t: float) -> None:
        """The control board reboots: hashboards and API down, then boot and mine."""
        self.rig.set_powered(False, t)
        self.rig.set_powered(True, t)
        self._sync(t)

    def _within_range(self, watts: int | None) -> bool:
        m = self.rig.model
        return watts is not None and m.min_w <= watts <= m.max_w

    # -- shared readings -------------------------------------------------------------

    def _elapsed(self, t: float) -> int:
        return max(0, int(t - self.btminer_start_t)) if self.rig.powered else 0

    def _avg_ths(self, t: float, window: float, samples: int = 6) -> float:
        start = max(self.btminer_start_t, t - window)
        if t <= start:
            return self.rig.hashrate_ths(t)
        pts = [start + (t - start) * i / (samples - 1) for i in range(samples)]
        return sum(self.rig.hashrate_ths(p) for p in pts) / samples

    def _accepted(self, t: float) -> int:
        elapsed = self._elapsed(t)
        return int(self._avg_ths(t, elapsed) * 1e12 * elapsed / (65_536 * 2**32))

    def _upfreq_complete(self, t: float) -> bool:
        return self.rig.is_hashing(t) and not self.rig.ramping(t)

    def _freq_mhz(self, t: float) -> int:
        m = self.rig.model
        return (
            round(600 * min(1.5, self.rig.hashrate_ths(t) / m.nominal_ths))
            if self.rig.is_hashing(t)
            else 0
        )

    def _env_temp(self) -> float:
        return AMBIENT_C  # the intake air: the room

    def _board_sn(self, b: int) -> str:
        return f"BHM{zlib.crc32(self.rig.serial.encode()) % 10**9:09d}K3{b + 1:04d}"

    def _chip_temps(self, t: float) -> tuple[float, float, float]:
        chips = self.rig.chip_temps_c(t)
        hi = max(chips)
        return _chip_spread(hi)

    def _when(self, t: float) -> int:
        return int(t)

    # -- API v2 ------------------------------------------------------------------

    def respond_v2(self, raw: bytes, peer: str = "127.0.0.1") -> bytes | None:
        """The reply bytes for one raw v2 request (None: applied but not answered; b"":
        closed at once without an answer, as API v3 firmware does on 4028 but for
        `get_version`)."""
        t = self.farm.now()
        self._sync(t)
        if not self.serves_v2 and _v2_command(raw) != "get_version":
            self.received.append(Received("v2", _v2_command(raw) or "?", None, peer))
            return b""
        try:
            reply = self._dispatch_v2(raw, peer, t)
        except Exception:
            log.exception("whatsminer_simulator.v2_handler_failed", rig=self.rig_id)
            reply = self._flat(t, "E", 132, "command error")
        if reply is None:
            return None
        text = json.dumps(reply, separators=(",", ":")).encode()
        return text + (b"\x00" if self.nul_terminated else b"")

    def _flat(self, t: float, letter: str, code: int, msg: Any) -> Json:
        return {
            "STATUS": letter,
            "When": self._when(t),
            "Code": code,
            "Msg": msg,
            "Description": "",
        }

    def _cg(self, t: float, code: int, msg: str, section: str, items: list[Json]) -> Json:
        when = self._when(t)
        return section_reply(section, items, code, msg, when=when, description=CGMINER_DESCRIPTION)

    def _cg_error(self, t: float, code: int, msg: str) -> Json:
        when = self._when(t)
        return status_reply("E", code, msg, when=when, description=CGMINER_DESCRIPTION)

    def _note(
        self, api: str, command: str, reply: Json | None, peer: str, *, enc: bool = False
    ) -> None:
        code = None
        if reply is not None:
            c = reply.get("Code", reply.get("code"))
            if isinstance(c, int):
                code = c
            elif isinstance(reply.get("STATUS"), list):
                code = reply["STATUS"][0].get("Code")
        self.received.append(Received(api, command, code, peer, enc))

    def _dispatch_v2(self, raw: bytes, peer: str, t: float) -> Json | None:
        text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
        params: Json = {}
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                reply = self._flat(t, "E", 23, "invalid JSON message")
                self._note("v2", "?", reply, peer)
                return reply
            if not isinstance(obj, dict):
                reply = self._flat(t, "E", 23, "invalid JSON message")
                self._note("v2", "?", reply, peer)
                return reply
            if "enc" in obj:
                return self._privileged(obj, peer, t)
            cmd = obj.get("cmd", obj.get("command"))
            if not isinstance(cmd, str):
                reply = self._flat(t, "E", 14, "invalid API command or data")
                self._note("v2", "?", reply, peer)
                return reply
            params = {k: v for k, v in obj.items() if k not in ("cmd", "command")}
        else:
            cmd, sep, rest = text.partition("|")
            if sep:
                params = {"parameter": rest}
        cmd = cmd.strip()
        reply = self._joined(cmd, t) if "+" in cmd else self._v2_read(cmd, params, t, peer)
        self._note("v2", cmd, reply, peer)
        return reply

    def _joined(self, command: str, t: float) -> Json:
        out: Json = {}
        for name in dict.fromkeys(n.strip() for n in command.split("+") if n.strip()):
            if name in CG_READS:
                out[name.lower()] = [self._cg_read(name, t)]
            else:
                out[name.lower()] = [self._cg_error(t, 14, "Invalid command")]
        out["id"] = 1
        return out

    def _v2_read(self, cmd: str, params: Json, t: float, peer: str) -> Json:
        if cmd in CG_READS:
            return self._cg_read(cmd, t)
        if cmd in NATIVE_READS:
            return self._native_read(cmd, params, t, peer)
        if cmd in V2_WRITES:
            return self._flat(t, "E", 45, "permission denied")  # writes only encrypted
        return self._cg_error(t, 14, "Invalid command")

    def _cg_read(self, cmd: str, t: float) -> Json:
        if cmd == "summary":
            return self._cg(t, 11, "Summary", "SUMMARY", [self._summary(t)])
        if cmd in ("devs", "edevs"):
            devs = self._devs(t)
            return self._cg(t, 9, f"{len(devs)} ASC(s)", "DEVS", devs)
        if cmd == "pools":
            return self._cg(t, 7, "3 Pool(s)", "POOLS", self._pools(t))
        if cmd == "devdetails":
            m = self.rig.model
            items = [
                {"DEVDETAILS": b, "Name": "SM", "ID": b, "Driver": "bitmicro", "Kernel": "",
                 "Model": firmware_type(m)}
                for b in range(m.boards)
            ]  # fmt: skip
            return self._cg(t, 69, "Device Details", "DEVDETAILS", items)
        return self._cg(t, 22, "CGMiner versions", "VERSION", [{"CGMiner": "4.9.2", "API": "3.7"}])

    def _summary(self, t: float) -> Json:
        rig, m = self.rig, self.rig.model
        rt = rig.hashrate_ths(t)
        elapsed = self._elapsed(t)
        accepted = self._accepted(t)
        fans = rig.fans_rpm(t)
        power = round(rig.power_w(t)) if rig.powered else 0
        lo, hi, avg = self._chip_temps(t)
        mhs = {
            w: round(self._avg_ths(t, s) * 1e6, 2)
            for w, s in (("5s", 5), ("1m", 60), ("5m", 300), ("15m", 900))
        }
        return {
            "Elapsed": elapsed,
            "MHS av": round(self._avg_ths(t, elapsed) * 1e6, 2),
            "MHS 5s": mhs["5s"],
            "MHS 1m": mhs["1m"],
            "MHS 5m": mhs["5m"],
            "MHS 15m": mhs["15m"],
            "HS RT": round(rt * 1e6, 2),
            "Accepted": accepted,
            "Rejected": accepted // 500,
            "Total MH": round(self._avg_ths(t, elapsed) * 1e6 * elapsed, 1),
            "Temperature": round(max(rig.board_temps_c(t)), 1),
            "freq_avg": self._freq_mhz(t),
            "Fan Speed In": fans[0] if fans else 0,
            "Fan Speed Out": fans[1] if len(fans) > 1 else 0,
            "Power": power,
            "Power_RT": power,
            "Power Rate": round(power / rt, 2) if rt > 0 else 0.0,
            "Best Share": accepted * 15_000,
            "Pool Rejected%": 0.0,
            "Pool Stale%": 0.0,
            "Uptime": rig.uptime_s(t),
            "Hash Stable": self._upfreq_complete(t),
            "Target Freq": self._freq_mhz(t),
            "Target MHS": round(
                m.nominal_ths * 1e6 * min(1.0, self.limit_in_force_w() / m.nominal_w)
            ),
            "Env Temp": self._env_temp(),
            "Power Mode": _MODE_NAMES[self.power_mode],
            "Factory GHS": round(m.nominal_ths * 1000),
            "Power Limit": self.limit_in_force_w(),
            "Chip Temp Min": lo,
            "Chip Temp Max": hi,
            "Chip Temp Avg": avg,
            "MAC": rig.mac.upper(),
            "Firmware Version": f"'{self.firmware_version}'",
            "Upfreq Complete": int(self._upfreq_complete(t)),
            "Btminer Fast Boot": "disable",
            "Liquid Cooling": False,
            "Security Mode": 0,
        }

    def _devs(self, t: float) -> list[Json]:
        rig, m = self.rig, self.rig.model
        hashing = rig.is_hashing(t)
        temps = rig.board_temps_c(t)
        chips = rig.chip_temps_c(t)
        fans = rig.fans_rpm(t)
        freq = self._freq_mhz(t)
        elapsed = self._elapsed(t)
        accepted = self._accepted(t) // max(1, m.boards)
        share = [r / max(rig.hashrate_ths(t), 1e-9) for r in rig.board_hashrates_ths(t)]
        out = []
        for b in range(m.boards):
            frac = share[b] if hashing else 0.0
            rate = {
                w: round(self._avg_ths(t, s) * frac * 1e6, 2)
                for w, s in (("5s", 5), ("1m", 60), ("5m", 300), ("15m", 900))
            }
            out.append(
                {
                    "ASC": b,
                    "Name": "SM",
                    "ID": b,
                    "Slot": b,
                    "Enabled": "Y",
                    "Status": "Alive",
                    "Temperature": round(temps[b], 1),
                    "Chip Frequency": freq,
                    "Frequency": float(freq),
                    "Fan Speed In": fans[0] if fans else 0,
                    "Fan Speed Out": fans[1] if len(fans) > 1 else 0,
                    "MHS av": round(self._avg_ths(t, elapsed) * frac * 1e6, 2),
                    "MHS 5s": rate["5s"],
                    "MHS 1m": rate["1m"],
                    "MHS 5m": rate["5m"],
                    "MHS 15m": rate["15m"],
                    "Accepted": accepted,
                    "Rejected": 0,
                    "Factory GHS": round(m.nominal_ths * 1000 / m.boards),
                    "Upfreq Complete": int(self._upfreq_complete(t)),
                    "Effective Chips": m.chips_per_board if hashing else 0,
                    "PCB SN": self._board_sn(b),
                    "Chip Temp Min": _chip_spread(chips[b])[0],
                    "Chip Temp Max": round(chips[b], 1),
                    "Chip Temp Avg": _chip_spread(chips[b])[2],
                    "Device Elapsed": elapsed,
                }
            )
        return out

    def _pools(self, t: float) -> list[Json]:
        accepted = self._accepted(t)
        return [
            {
                "POOL": i + 1,
                "URL": POOL_URL.replace("btc.", f"btc{i + 1}.") if i else POOL_URL,
                "Status": "Alive",
                "Priority": i,
                "Quota": 1,
                "Getworks": self._elapsed(t) // 30 if i == 0 else 0,
                "Accepted": accepted if i == 0 else 0,
                "Rejected": accepted // 500 if i == 0 else 0,
                "Stale": 0,
                "User": f"rigd.{self.rig_id}",
                "Stratum Active": i == 0 and self.rig.is_hashing(t),
                "Stratum URL": "btc.example.pool" if i == 0 else "",
            }
            for i in range(3)
        ]

    def _native_read(self, cmd: str, params: Json, t: float, peer: str) -> Json:
        if cmd == "get_token":
            return self._get_token(peer, t)
        if cmd == "get_version":
            return self._flat(
                t,
                "S",
                131,
                {
                    "api_ver": self.api_version if self.serves_v2 else self.v3_api_version,
                    "fw_ver": self.firmware_version,
                    "platform": PLATFORM,
                },
            )
        if cmd == "status":
            return self._flat(t, "S", 131, self._status_msg(t))
        if cmd == "get_psu":
            return self._flat(t, "S", 131, self._psu_msg(t))
        if cmd == "get_miner_info":
            return self._flat(t, "S", 131, self._miner_info(params))
        return self._flat(t, "S", 131, {"error_code": list(self.error_codes)})

    def _status_msg(self, t: float) -> Json:
        off = self.rig.mode == RigMode.SLEEPING
        when = (
            ""
            if self.mineroff_t is None or not off
            else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.mineroff_t))
        )
        return {
            "mineroff": "true" if off else "false",
            "mineroff_reason": "api power off" if off else "",
            "mineroff_time": when,
            "FirmwareVersion": self.firmware_version,
            "power_mode": self.power_mode,
            "hash_percent": str(self.power_pct),
            "power_limit_set": str(self.limit_set_w),
        }

    def _psu_msg(self, t: float) -> Json:
        load = min(1.0, self.rig.power_w(t) / self.rig.model.nominal_w) if self.rig.powered else 0.0
        return {
            "name": "P222B",
            "model": "P222B",
            "hw_version": "",
            "sw_version": "230208.220429",
            "fan_speed": str(int(2000 + 4000 * load)),
            "inn": f"{self.rig.power_w(t) / 230.0:.2f}" if self.rig.powered else "0",
            "vin": "230.00",
            "serial_no": f"PSU{zlib.crc32(self.rig.serial.encode()) % 10**8:08d}",
            "vendor": "1",
        }

    def _miner_info(self, params: Json) -> Json:
        every = {
            "ip": self.host,
            "proto": "dhcp",
            "netmask": "255.255.255.0",
            "gateway": ".".join([*self.host.split(".")[:3], "1"]),
            "dns": "8.8.8.8",
            "hostname": "WhatsMiner",
            "mac": self.rig.mac.upper(),
            "ledstat": "auto",
            "minersn": self.rig.serial,
        }
        wanted = params.get("info")
        if not isinstance(wanted, str) or not wanted.strip():
            return every
        return {k: every[k] for k in (w.strip() for w in wanted.split(",")) if k in every}

    def _get_token(self, peer: str, t: float) -> Json:
        live = {ip: [(s, e) for s, e in lst if e > t] for ip, lst in self.tokens.items()}
        self.tokens = {ip: lst for ip, lst in live.items() if lst}
        mine = self.tokens.get(peer, [])
        if len(mine) >= MAX_TOKENS_PER_IP or (not mine and len(self.tokens) >= MAX_TOKEN_IPS):
            return self._flat(t, "E", 136, "over max connect")
        stamp = str(int(t))
        newsalt = "".join(random.choice(_SALT_ALPHABET) for _ in range(8))
        token = V2Token.derive(self.admin_password, self.v2_salt, newsalt, stamp)
        self.tokens[peer] = [*mine, (token.sign, t + self.token_ttl_s)]
        return self._flat(t, "S", 134, {"time": stamp, "salt": self.v2_salt, "newsalt": newsalt})

    def _token_ok(self, sign: Any, peer: str, t: float) -> bool:
        return isinstance(sign, str) and any(
            s == sign and e > t for s, e in self.tokens.get(peer, [])
        )

    def _privileged(self, obj: Json, peer: str, t: float) -> Json | None:
        if not self.write_enabled:
            reply = self._flat(t, "E", 45, "can't access write cmd")
            self._note("v2", "?", reply, peer, enc=True)
            return reply
        data = obj.get("data")
        try:
            if not isinstance(data, str):
                raise ValueError("no data")
            plain = aes_ecb_decrypt_b64(self._aes_key, data)
        except ValueError:
            reply = self._flat(t, "E", 137, "base64 decode error")
            self._note("v2", "?", reply, peer, enc=True)
            return reply
        inner: Any = None
        with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
            inner = json.loads(plain.decode("utf-8"))
        if not isinstance(inner, dict):  # noise: encrypted with another password's key
            reply = self._flat(t, "E", 135, "check token error")
            self._note("v2", "?", reply, peer, enc=True)
            return reply
        cmd = inner.get("cmd", inner.get("command"))
        cmd = cmd if isinstance(cmd, str) else "?"
        if not self._token_ok(inner.get("token"), peer, t):
            reply = self._flat(t, "E", 135, "check token error")
            self._note("v2", cmd, reply, peer, enc=True)
            return reply
        result = self._v2_write(cmd, inner, t)
        self._note("v2", cmd, result, peer, enc=True)
        if cmd in self.silent_writes and result.get("STATUS") == "S":
            return None
        body = json.dumps(result, separators=(",", ":")).encode()
        return {"enc": aes_ecb_encrypt_b64(self._aes_key, body)}

    def _v2_write(self, cmd: str, p: Json, t: float) -> Json:
        ok = self._flat(t, "S", 131, "API command OK")
        invalid = self._flat(t, "E", 14, "invalid API command or data")
        if cmd not in V2_WRITES:
            return invalid
        if cmd in V2_SINCE_205 and tuple(int(x) for x in self.api_version.split(".")[:3]) < (
            2,
            0,
            5,
        ):
            return invalid
        if cmd == "power_off":
            self._power_off(t)
        elif cmd == "power_on":
            self._power_on(t)
        elif cmd == "adjust_power_limit":
            watts = _int_param(p.get("power_limit"))
            if not self._within_range(watts):
                return self._flat(t, "E", 132, "command error")
            assert watts is not None
            self._set_limit(watts, t)
        elif cmd in ("set_power_pct", "set_power_pct_v2"):
            pct = _int_param(p.get("percent"))
            if pct is None or not 0 <= pct <= 100:
                return invalid
            self._set_pct(pct, t)
        elif cmd in ("set_low_power", "set_normal_power", "set_high_power"):
            self._set_mode(cmd.split("_")[1], t)
        elif cmd == "restart_btminer":
            self._restart_mining(t)
        elif cmd == "reboot":
            self._reboot(t)
        return ok

    # -- API v3 ------------------------------------------------------------------

    def respond_v3(self, body: bytes, peer: str = "127.0.0.1") -> Json | None:
        """The reply object for one v3 request frame (None: applied but not answered)."""
        t = self.farm.now()
        self._sync(t)
        cmd = "?"
        try:
            try:
                obj = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                obj = None
            if not isinstance(obj, dict):
                reply: Json | None = self._v3_error(t, -3, "invalid json", "")
            elif not isinstance(obj.get("cmd"), str):
                reply = self._v3_error(t, -2, "invalid command", "")
            else:
                cmd = obj["cmd"]
                reply = (
                    self._v3_write(cmd, obj, t)
                    if cmd.startswith("set.")
                    else self._v3_read(cmd, obj.get("param"), t)
                )
        except Exception:
            log.exception("whatsminer_simulator.v3_handler_failed", rig=self.rig_id)
            reply = self._v3_error(t, -1, "command error", cmd)
        self._note("v3", cmd, reply, peer)
        if reply is not None and cmd in self.silent_writes and reply.get("code") == 0:
            return None
        return reply

    def _v3_ok(self, t: float, msg: Any, cmd: str) -> Json:
        return {"code": 0, "when": self._when(t), "msg": msg, "desc": cmd}

    def _v3_error(self, t: float, code: int, msg: str, cmd: str) -> Json:
        return {"code": code, "when": self._when(t), "msg": msg, "desc": cmd}

    def _v3_read(self, cmd: str, param: Any, t: float) -> Json:
        if cmd not in V3_READS:
            return self._v3_error(t, -2, "invalid command", cmd)
        if cmd == "get.device.info":
            sections = self._device_info(t)
            if param is None or param == "":
                return self._v3_ok(t, sections, cmd)
            if not isinstance(param, str) or param not in sections:
                return self._v3_error(t, -1, "invalid param", cmd)
            return self._v3_ok(t, {param: sections[param]}, cmd)
        if cmd == "get.miner.status":
            wanted = [s.strip() for s in param.split(",")] if isinstance(param, str) else []
            msg: Json = {}
            for name in wanted:
                if name == "summary":
                    msg["summary"] = self._v3_summary(t)
                elif name == "edevs":
                    msg["edevs"] = self._v3_edevs(t)
                elif name == "pools":
                    msg["pools"] = self._v3_pools(t)
            return self._v3_ok(t, msg, cmd)
        if cmd == "get.miner.setting":
            return self._v3_ok(t, self._v3_setting(), cmd)
        return self._v3_ok(
            t,
            {"web-pool": 1, "timezone": "UTC", "zonename": "UTC", "hostname": "WhatsMiner",
             "time-randomized": {"start": 0, "stop": 0}, "ntp-server": ["0.pool.ntp.org"]},
            cmd,
        )  # fmt: skip

    def _device_info(self, t: float) -> Json:
        rig, m = self.rig, self.rig.model
        miner: Json = {
            "working": "false" if rig.mode == RigMode.SLEEPING else "true",
            "type": firmware_type(m),
            "hash-board": firmware_type(m).rsplit("_", 1)[-1][:3],
            "detect-hash-rate": ":".join(
                str(round(m.nominal_ths * 1000 / m.boards)) for _ in range(m.boards)
            )
            + ":0",
            "cointype": "BTC/BCH/BSV",
            "pool-strategy": "FAILOVER",
            "heatmode": "",
            "hash-percent": str(self.power_pct) if self.power_pct else "",
            "miner-sn": rig.serial,
            "board-num": str(m.boards),
            "power-limit-set": str(self.limit_set_w),
            "fast-boot": "disable",
        }
        for b in range(m.boards):
            miner[f"pcbsn{b}"] = self._board_sn(b)
        return {
            "network": {
                "ip": self.host, "proto": "dhcp", "netmask": "255.255.255.0",
                "dns": "8.8.8.8", "mac": rig.mac.upper(),
                "gateway": ".".join([*self.host.split(".")[:3], "1"]), "hostname": "WhatsMiner",
            },
            "miner": miner,
            "system": {
                "api": self.v3_api_version, "fwversion": self.firmware_version,
                "ledstatus": self.led_status, "platform": PLATFORM, "control-board-version": "H616",
                "apiswitch": "enable" if self.write_enabled else "disable",
            },
            "power": {
                "fanspeed": int(self._psu_msg(t)["fan_speed"]), "model": "P222B",
                "sn": self._psu_msg(t)["serial_no"], "mode": "1",
                "vin": 230.0, "pin": round(rig.power_w(t)) if rig.powered else 0,
            },
            "salt": self.v3_salt,
            "error-code": list(self.error_codes),
        }  # fmt: skip

    def _v3_summary(self, t: float) -> Json:
        rig, m = self.rig, self.rig.model
        rt = rig.hashrate_ths(t)
        power = float(round(rig.power_w(t))) if rig.powered else 0.0
        fans = rig.fans_rpm(t)
        lo, hi, avg = self._chip_temps(t)
        return {
            "elapsed": self._elapsed(t),
            "bootup-time": rig.uptime_s(t),
            "freq-avg": float(self._freq_mhz(t)),
            "target-freq": self._freq_mhz(t),
            "factory-hash": round(m.nominal_ths, 3),
            "hash-average": round(self._avg_ths(t, self._elapsed(t)), 3),
            "hash-1min": round(self._avg_ths(t, 60), 3),
            "hash-15min": round(self._avg_ths(t, 900), 3),
            "hash-realtime": round(rt, 3),
            "power-rate": round(power / rt, 2) if rt > 0 else 0.0,
            "power-5min": power,
            "power-realtime": power,
            "environment-temperature": self._env_temp(),
            "board-temperature": [round(x, 1) for x in rig.board_temps_c(t)],
            "chip-temp-min": lo,
            "chip-temp-avg": avg,
            "chip-temp-max": hi,
            "power-limit": self.limit_in_force_w(),
            "up-freq-finish": int(self._upfreq_complete(t)),
            "fan-speed-in": fans[0] if fans else 0,
            "fan-speed-out": fans[1] if len(fans) > 1 else 0,
        }

    def _v3_edevs(self, t: float) -> list[Json]:
        rig, m = self.rig, self.rig.model
        hashing = rig.is_hashing(t)
        chips = rig.chip_temps_c(t)
        rates = rig.board_hashrates_ths(t)
        total = max(rig.hashrate_ths(t), 1e-9)
        avg = self._avg_ths(t, self._elapsed(t))
        return [
            {
                "id": b, "slot": b, "status": "alive" if hashing else "dead",
                "hash-realtime": round(rates[b], 3) if hashing else 0.0,
                "hash-average": round(avg * rates[b] / total, 3) if hashing else 0.0,
                "factory-hash": round(m.nominal_ths / m.boards, 3),
                "effective-chips": m.chips_per_board if hashing else 0,
                "freq": self._freq_mhz(t),
                "chip-temp-min": _chip_spread(chips[b])[0],
                "chip-temp-avg": _chip_spread(chips[b])[2],
                "chip-temp-max": round(chips[b], 1),
            }
            for b in range(m.boards)
        ]  # fmt: skip

    def _v3_pools(self, t: float) -> list[Json]:
        return [
            {"id": p["POOL"], "url": p["URL"], "status": "alive", "account": p["User"],
             "stratum-active": p["Stratum Active"], "reject-rate": 0.0,
             "last-share-time": float(int(t) - 3) if p["Stratum Active"] else 0.0}
            for p in self._pools(t)
        ]  # fmt: skip

    def _v3_setting(self) -> Json:
        return {
            "power-limit": self.limit_set_w,
            "upfreq-speed": 0,
            "power-mode": self.power_mode,
            "fast-boot": "disable",
            "target-freq": 0,
            "fast-mining": "disable",
            "power": self.rated_w,
            "power-percent": self.power_pct,
        }

    def _v3_auth(self, cmd: str, obj: Json, t: float) -> str | None:
        """Why a v3 write is refused, or None."""
        if not self.write_enabled:
            return "no permission"
        ts, token = obj.get("ts"), obj.get("token")
        if obj.get("account") != V3_ACCOUNT or not isinstance(token, str):
            return "invalid token"
        if not isinstance(ts, int) or isinstance(ts, bool) or abs(ts - t) > self.ts_window_s:
            return "invalid token"
        if token != v3_token(cmd, self.super_password, self.v3_salt, ts):
            return "invalid token"
        return None

    def _v3_write(self, cmd: str, obj: Json, t: float) -> Json:
        if cmd not in V3_WRITES:
            return self._v3_error(t, -2, "invalid command", cmd)
        refused = self._v3_auth(cmd, obj, t)
        if refused is not None:
            return self._v3_error(t, -4, refused, cmd)
        param = obj.get("param")
        ok = self._v3_ok(t, "ok", cmd)
        if cmd == "set.miner.service":
            if param == "stop":
                self._power_off(t)
            elif param == "start":
                self._power_on(t)
            elif param == "restart":
                self._restart_mining(t)
            elif param in ("enable", "disable"):
                self.service_enabled = param == "enable"
                if param == "disable":
                    self._power_off(t)
            else:
                return self._v3_error(t, -1, "invalid param", cmd)
        elif cmd == "set.miner.power_limit":
            watts = _int_param(param)
            if not self._within_range(watts):
                return self._v3_error(t, -1, "power limit out of range", cmd)
            assert watts is not None
            self._set_limit(watts, t)
        elif cmd == "set.miner.power_percent":
            raw = param.get("percent") if isinstance(param, dict) else param
            pct = _int_param(raw)
            if pct is None or not 0 <= pct <= 100:
                return self._v3_error(t, -1, "invalid param", cmd)
            self._set_pct(pct, t)
        elif cmd in ("set.miner.power_mode", "set.miner.mode"):
            if param not in _MODE_NAMES:
                return self._v3_error(t, -1, "invalid param", cmd)
            self._set_mode(str(param), t)
        elif cmd == "set.system.led":
            if param == "auto":
                self.led_status = "auto"
            elif isinstance(param, list) and all(isinstance(p, dict) for p in param):
                self.led_status = "manual"
            else:
                return self._v3_error(t, -1, "invalid param", cmd)
        elif cmd == "set.system.reboot":
            self._reboot(t)
        return ok


class WhatsminerFleet(Fleet[WhatsminerServer]):
    """Every Whatsminer of a farm (rigs whose firmware is "btminer") behind its own server.

    With `subnet` each miner gets its own loopback address on the real ports (4028 and/or
    4433), as on a farm LAN; otherwise each listens on ephemeral ports of `host`.
    """

    def __init__(
        self,
        farm: Farm,
        *,
        host: str = "127.0.0.1",
        subnet: str | None = None,
        api: Api = "v2",
        rig_ids: Iterable[str] | None = None,
        admin_password: str = DEFAULT_ADMIN_PASSWORD,
        super_password: str = DEFAULT_SUPER_PASSWORD,
    ) -> None:
        self.farm = farm
        ids = (
            list(rig_ids)
            if rig_ids is not None
            else [rid for rid, r in farm.rigs.items() if r.firmware == FIRMWARE]
        )
        outlets = outlets_of(farm)
        addresses: list[tuple[str, int, int]]
        if subnet is None:
            addresses = [(host, 0, 0)] * len(ids)
        else:
            hosts = subnet_hosts(farm, subnet)
            addresses = [(hosts[rid], V2_PORT, V3_PORT) for rid in ids]
        self.servers: dict[str, WhatsminerServer] = {
            rid: WhatsminerServer(
                farm, rid, host=h, api=api, port_v2=p2, port_v3=p3, outlet=outlets.get(rid),
                admin_password=admin_password, super_password=super_password,
            )
            for rid, (h, p2, p3) in zip(ids, addresses, strict=True)
        }  # fmt: skip

    def ports_of(self, rig_id: str) -> tuple[str, int, int]:
        """(host, v2 port, v3 port) of a rig's server (a port is 0 if that API is off)."""
        s = self.servers[rig_id]
        return s.host, s.port_v2 if s.serves_v2 else 0, s.port_v3 if s.serves_v3 else 0
