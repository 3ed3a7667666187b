"""MicroBT Whatsminer (btminer firmware): telemetry, sleep, wake and power limit over its API.

Two generations of the API are in the field and a farm has both:

- **API v2** (port 4028, firmware up to ~2024-11): the CGMiner protocol for reads
  (`summary`, `devs`, `devdetails`, joinable with `+`) plus btminer's own commands
  (`status`, `get_version`, `get_token`, ...) whose replies are *flat* (`STATUS` is a
  letter, not a list). Writes need a token (md5-crypt of the admin password with the
  miner's salt, then of that with a time and a one-off salt) and travel AES-256-ECB
  encrypted; the token lives 30 minutes and a client IP may hold at most 32, so the
  driver caches it and fetches a new one only when it expires or the firmware says
  "check token error" (Code 135). A second 135 in a row means the password is wrong.
- **API v3** (port 4433, newer firmware, where v2 control no longer works): JSON frames
  with a 4-byte little-endian length; writes carry a short SHA-256 token over the
  command, password, the miner's salt and a timestamp. The salt is cached; the timestamp
  follows the miner's own clock (every reply says what time the miner thinks it is), so
  a miner with a skewed clock still accepts our writes.

Control maps onto what the firmware offers: `sleep()` cuts hashboard power (v2
`power_off`, v3 `set.miner.service stop`), the control board stays up, so only the PDU
takes the rig to zero; `wake()` powers the hashboards again, after which the rig boots
and ramps for minutes; `set_power_target()` sets the firmware power limit, which
*restarts mining* to apply, so it is skipped when the limit is already what was asked.
Power percentage is offered as `set_power_percent()`.

Known firmware behaviour this driver absorbs: `power_off` and mode writes are often
applied without any reply (the client times out although it worked), so a write that
times out is verified by reading the miner's state, and only reported as a timeout if
the state did not change. Numbers may arrive as strings; a reply the driver cannot use
is a `MalformedReply`, never a crash.

Which API a miner speaks: `identify()` probes both ports; `driver_kind_for()` picks v3
for firmware dated after 2024-11 (the date pyasic uses to switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import (
    MAX_REPLY_BYTES,
    CGMinerClient,
    CGMinerRejected,
    check_status,
    decode_reply,
)
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
    snippet,
)
from drivers.reboots import RebootWatch
from drivers.retry import check_timing, with_retries
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from drivers.values import (
    MAX_RIG_HASHRATE_THS,
    MAX_RIG_POWER_W,
    first,
    mapping,
    measure,
    positive,
    section,
    to_float,
    to_int,
)
from drivers.whatsminer_crypto import (
    V2Token,
    aes_ecb_decrypt_b64,
    aes_ecb_encrypt_b64,
    v3_token,
)

log = structlog.get_logger(__name__)

Json = dict[str, Any]
T = TypeVar("T")

V2_PORT: Final = 4028
V3_PORT: Final = 4433
MAKE: Final = "Whatsminer"
FIRMWARE: Final = "btminer"
DEFAULT_V2_PASSWORD: Final = "admin"  # the v2 write account is always "admin"
DEFAULT_V3_ACCOUNT: Final = "super"
DEFAULT_V3_PASSWORD: Final = "super"
TOKEN_TTL_S: Final = 30 * 60.0  # WM API 2.0.5: "a token keepalive time is 30 minutes"
TOKEN_MARGIN_S: Final = 60.0  # renew a little early rather than race the miner's expiry
# Firmware dated after this speaks API v3 on 4433 (and no longer obeys v2 writes).
V3_FIRMWARE_SINCE: Final = 20241100
# Neither API reports how low a power limit may go; without configuration the driver
# assumes half of the highest limit it has seen (an assumption, see the report).
DEFAULT_MIN_FRACTION: Final = 0.5
V3_MAX_FRAME: Final = 1 << 20

# API v2 message codes (WM API 2.0.5).
CODE_INVALID: Final = 14
CODE_INVALID_JSON: Final = 23
CODE_DENIED: Final = 45
CODE_OK: Final = 131
CODE_COMMAND_ERROR: Final = 132
CODE_TOKEN_OK: Final = 134
CODE_TOKEN_ERROR: Final = 135
CODE_TOKEN_LIMIT: Final = 136
CODE_BASE64: Final = 137
WRITE_DISABLED_MSG: Final = "can't access write cmd"
# API v3 codes (pyasic's BTMinerAPICode): 0 ok, -1 command error, -2 invalid command,
# -3 invalid JSON, -4 access denied, -5 out of memory.
V3_OK: Final = 0
V3_DENIED: Final = -4

_SUCCESS: Final = frozenset({"S", "I", "W"})
_SNIPPET: Final = 80


class WhatsminerRejected(CGMinerRejected):
    """An error status from btminer; keeps its code so callers can react to specific ones."""


# -- small parsing helpers ----------------------------------------------------------------


def _bool(value: Any) -> bool | None:
    """btminer's booleans: "true"/"false" strings (status, device info) or real bools."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().strip("'\"").lower()
        if v in ("true", "1", "yes"):
            return True
        if v in ("false", "0", "no"):
            return False
    return None


def _text(value: Any) -> str:
    """A display string, with the single quotes some builds wrap versions in removed."""
    return value.strip().strip("'\"").strip() if isinstance(value, str) else ""


def _ths(value: float | None) -> float | None:
    return measure(value, MAX_RIG_HASHRATE_THS)


def _watts(value: float | None) -> float | None:
    return measure(value, MAX_RIG_POWER_W)


def _encodable(text: str) -> bool:
    """Whether text can go into a hash or onto the wire (JSON may carry lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _first_number(entry: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        v = to_float(entry.get(key))
        if v is not None:
            return v
    return None


def fw_date(version: str) -> int | None:
    """`20230803.11.REL` -> 20230803 (firmware versions start with their build date)."""
    m = re.match(r"\s*'?(\d{8})", version)
    return int(m.group(1)) if m else None


def api_version_tuple(text: str) -> tuple[int, ...] | None:
    parts = re.findall(r"\d+", text)
    try:
        return tuple(int(p) for p in parts[:3]) if parts else None
    except ValueError:  # more digits than int() converts: not a version
        return None


def model_name(miner_type: str) -> str:
    """Firmware type ("M50S_VH50") -> the model as rigd names it ("Whatsminer M50S_VH50")."""
    t = miner_type.strip()
    if not t:
        return ""
    return t if t.lower().startswith(MAKE.lower()) else f"{MAKE} {t}"


def driver_kind_for(identity: RigIdentity) -> str:
    """Which driver kind suits an identified Whatsminer: v3 for firmware after 2024-11."""
    date = fw_date(identity.firmware_version)
    return "whatsminer-v3" if date is not None and date > V3_FIRMWARE_SINCE else "whatsminer"


# -- API v2 replies -------------------------------------------------------------------------


def check_v2_status(reply: Mapping[str, Any], *, device: str = "", operation: str = "") -> None:
    """Raise unless a v2 reply (flat btminer style or CGMiner list style) says success."""
    status = reply.get("STATUS")
    if isinstance(status, list):
        check_status(reply, device=device, operation=operation)
        return
    if not isinstance(status, str):
        raise MalformedReply("reply has no STATUS", device=device, operation=operation)
    letter = status.strip().upper()
    if letter in _SUCCESS:
        return
    code = to_int(reply.get("Code"))
    msg = reply.get("Msg")
    text = msg if isinstance(msg, str) else json.dumps(msg)[:_SNIPPET]
    if letter not in ("E", "F"):
        raise MalformedReply(f"unknown STATUS {status!r}", device=device, operation=operation)
    if code == CODE_DENIED or WRITE_DISABLED_MSG in text.lower():
        raise DeviceAuthError(
            f"the miner refuses API writes ({text}): enable the write API and change the"
            " default admin password with WhatsMinerTool",
            device=device,
            operation=operation,
        )
    raise WhatsminerRejected(
        f"command refused (Code {code}: {text})",
        device=device,
        operation=operation,
        code=code,
        reply_msg=text,
    )


def v2_msg(reply: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The object a flat btminer reply carries in `Msg` ({} when absent or a string)."""
    return mapping(reply.get("Msg")) if reply is not None else {}


def parse_error_codes(reply: Mapping[str, Any] | None) -> dict[int, str]:
    """`get_error_code` -> {code: when}; tolerates API 2.0.4's dict-instead-of-list quirk."""
    raw = v2_msg(reply).get("error_code")
    items: list[Any] = raw if isinstance(raw, list) else [raw] if isinstance(raw, Mapping) else []
    out: dict[int, str] = {}
    for item in items:
        if isinstance(item, Mapping):
            for code, when in item.items():
                n = to_int(code)
                if n is not None:
                    out[n] = str(when)
        else:
            n = to_int(item)
            if n is not None:
                out[n] = ""
    return out


def parse_v2_boards(devs: Mapping[str, Any] | None) -> tuple[Hashboard, ...]:
    """`devs`/`edevs` items -> hashboards (rates in MH/s, one item per slot)."""
    boards = []
    for n, item in enumerate(section(devs, "DEVS")):
        index = to_int(item.get("Slot"))
        if index is None:
            index = to_int(item.get("ASC"))
        mhs = _first_number(item, ("MHS 5s", "MHS 1m", "MHS av"))
        ths = None if mhs is None else _ths(mhs * 1e-6)
        chips = to_int(item.get("Effective Chips"))
        boards.append(
            Hashboard(
                index=n if index is None else index,
                hashrate_ths=ths,
                temp_c=positive(to_float(item.get("Temperature"))),
                chip_temp_c=positive(to_float(item.get("Chip Temp Max"))),
                chips=chips if chips else None,
                active=bool(ths and ths > 0),
            )
        )
    return tuple(boards)


def parse_v2_identity(
    devdetails: Mapping[str, Any] | None,
    version: Mapping[str, Any] | None = None,
    status: Mapping[str, Any] | None = None,
    summary: Mapping[str, Any] | None = None,
) -> RigIdentity:
    model = ""
    for item in section(devdetails, "DEVDETAILS"):
        model = _text(item.get("Model"))
        if model:
            break
    fw = (
        _text(v2_msg(version).get("fw_ver"))
        or _text(v2_msg(status).get("FirmwareVersion"))
        or _text(first(summary, "SUMMARY").get("Firmware Version"))
    )
    return RigIdentity(make=MAKE, model=model_name(model), firmware=FIRMWARE, firmware_version=fw)


def parse_v2_telemetry(
    ts: float,
    *,
    summary: Mapping[str, Any] | None,
    devs: Mapping[str, Any] | None = None,
    status: Mapping[str, Any] | None = None,
    devdetails: Mapping[str, Any] | None = None,
    version: Mapping[str, Any] | None = None,
    identity: RigIdentity | None = None,
    device: str = "",
) -> RigTelemetry:
    """Whole v2 replies -> `RigTelemetry`. Only `summary` is required.

    Hashrates are MH/s on this firmware (125000000.0 is 125 TH/s); the realtime `HS RT`
    is preferred over averages so a rig that was just told to sleep reads as such.
    """
    summ = first(summary, "SUMMARY")
    if not summ:
        raise MalformedReply("no SUMMARY in the summary reply", device=device, operation="read")
    boards = parse_v2_boards(devs)
    mhs = _first_number(summ, ("HS RT", "MHS 5s", "MHS 1m", "MHS av"))
    hashrate = None if mhs is None else _ths(mhs * 1e-6)
    if hashrate is None and boards:
        rates = [b.hashrate_ths for b in boards if b.hashrate_ths is not None]
        hashrate = _ths(sum(rates)) if rates else None
    st = v2_msg(status)
    limit = positive(_watts(to_float(summ.get("Power Limit"))))
    if limit is None:
        limit = positive(_watts(to_float(st.get("power_limit_set"))))
    factory_ghs = to_float(summ.get("Factory GHS"))
    fans = tuple(
        v
        for v in (to_int(summ.get("Fan Speed In")), to_int(summ.get("Fan Speed Out")))
        if v is not None
    )
    board_temps = [b.temp_c for b in boards if b.temp_c is not None]
    chip_temps = [b.chip_temp_c for b in boards if b.chip_temp_c is not None]
    off = _bool(st.get("mineroff", st.get("btmineroff")))
    if off:
        state = RigState.SLEEPING
    elif hashrate is not None and hashrate > 0:
        state = RigState.MINING
    else:
        state = RigState.WAKING
    if devdetails is not None or version is not None or identity is None:
        identity = parse_v2_identity(devdetails, version, status, summary)
    return RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=hashrate,
        power_w=_watts(_first_number(summ, ("Power", "Power_RT"))),
        power_limit_w=limit,
        nominal_hashrate_ths=None if factory_ghs is None else _ths(factory_ghs * 1e-3),
        temp_c=max(board_temps) if board_temps else positive(to_float(summ.get("Temperature"))),
        chip_temp_c=max(chip_temps)
        if chip_temps
        else positive(to_float(summ.get("Chip Temp Max"))),
        fans_rpm=fans,
        hashboards=boards,
        uptime_s=to_int(summ.get("Elapsed")),
        identity=identity,
    )


# -- API v3 replies -------------------------------------------------------------------------


def v3_msg(reply: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return mapping(reply.get("msg")) if reply is not None else {}


def parse_v3_identity(device_info: Mapping[str, Any] | None) -> RigIdentity:
    msg = v3_msg(device_info)
    miner, system = mapping(msg.get("miner")), mapping(msg.get("system"))
    return RigIdentity(
        make=MAKE,
        model=model_name(_text(miner.get("type"))),
        firmware=FIRMWARE,
        firmware_version=_text(system.get("fwversion")),
    )


def parse_v3_telemetry(
    ts: float,
    *,
    summary: Mapping[str, Any] | None,
    edevs: Mapping[str, Any] | None = None,
    device_info: Mapping[str, Any] | None = None,
    identity: RigIdentity | None = None,
    device: str = "",
) -> RigTelemetry:
    """Whole v3 replies (`get.miner.status` summary/edevs, `get.device.info`) -> telemetry.

    Hashrates are TH/s here; whether the rig is asleep comes from `msg.miner.working`.
    """
    summ = mapping(v3_msg(summary).get("summary"))
    if not summ:
        raise MalformedReply("no msg.summary in the status reply", device=device, operation="read")
    board_temps_raw = summ.get("board-temperature")
    board_temps = board_temps_raw if isinstance(board_temps_raw, list) else []
    items = v3_msg(edevs).get("edevs")
    boards = []
    for n, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, Mapping):
            continue
        index = to_int(item.get("slot"))
        if index is None:
            index = to_int(item.get("id"))
        index = n if index is None else index
        ths = _ths(_first_number(item, ("hash-realtime", "hash-average")))
        chips = to_int(item.get("effective-chips"))
        temp = to_float(board_temps[index]) if 0 <= index < len(board_temps) else None
        boards.append(
            Hashboard(
                index=index,
                hashrate_ths=ths,
                temp_c=positive(temp),
                chip_temp_c=positive(to_float(item.get("chip-temp-max"))),
                chips=chips if chips else None,
                active=bool(ths and ths > 0),
            )
        )
    hashrate = _ths(_first_number(summ, ("hash-realtime", "hash-1min", "hash-average")))
    working = _bool(mapping(v3_msg(device_info).get("miner")).get("working"))
    if working is False:
        state = RigState.SLEEPING
    elif hashrate is not None and hashrate > 0:
        state = RigState.MINING
    else:
        state = RigState.WAKING
    temps = [b.temp_c for b in boards if b.temp_c is not None] or [
        t for t in (to_float(v) for v in board_temps) if t is not None and t > 0
    ]
    fans = tuple(
        v
        for v in (to_int(summ.get("fan-speed-in")), to_int(summ.get("fan-speed-out")))
        if v is not None
    )
    if identity is None or mapping(v3_msg(device_info).get("system")):
        identity = parse_v3_identity(device_info)
    return RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=hashrate,
        power_w=_watts(_first_number(summ, ("power-realtime", "power-5min"))),
        power_limit_w=positive(_watts(to_float(summ.get("power-limit")))),
        nominal_hashrate_ths=_ths(to_float(summ.get("factory-hash"))),
        temp_c=max(temps) if temps else None,
        chip_temp_c=positive(to_float(summ.get("chip-temp-max"))),
        fans_rpm=fans,
        hashboards=tuple(boards),
        uptime_s=to_int(summ.get("elapsed")),
        identity=identity,
    )


# -- transports -----------------------------------------------------------------------------


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class BTMinerV2Client:
    """btminer's own v2 commands and the encrypted write envelope, one connection each.

    The CGMiner-style reads (`summary`, `devs`, joins) go through `cg`, the project's
    CGMiner client, which already handles joins and their quirks.
    """

    def __init__(
        self,
        host: str,
        port: int = V2_PORT,
        *,
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        device: str = "",
        backoff_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        check_timing(timeout, retries)
        self.host, self.port = host, port
        self.device = device or f"{host}:{port}"
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.password_configured = bool(password)
        self.password = password or DEFAULT_V2_PASSWORD
        self.clock = clock
        self.max_reply_bytes = max_reply_bytes
        self.cg = CGMinerClient(
            host,
            port,
            timeout=timeout,
            retries=retries,
            device=self.device,
            backoff_s=backoff_s,
            max_reply_bytes=max_reply_bytes,
        )
        self._token: V2Token | None = None
        self._token_t = 0.0
        self.token_fetches = 0

    async def native(self, cmd: str, **params: str) -> Json:
        """A plaintext btminer command (`status`, `get_version`, ...), status checked."""
        data = json.dumps({"command": cmd, **params}, separators=(",", ":")).encode()

        async def once() -> bytes:
            return await self.cg.exchange(data, cmd)

        raw = await with_retries(
            once, retries=self.retries, backoff_s=self.backoff_s, device=self.device, operation=cmd
        )
        reply = decode_reply(raw, device=self.device, operation=cmd)
        check_v2_status(reply, device=self.device, operation=cmd)
        return reply

    def invalidate_token(self) -> None:
        self._token = None

    async def token(self, *, fresh: bool = False) -> V2Token:
        """The cached write token, or a new one if it is (nearly) 30 minutes old."""
        now = self.clock()
        if (
            not fresh
            and self._token is not None
            and now - self._token_t < TOKEN_TTL_S - TOKEN_MARGIN_S
        ):
            return self._token
        reply = await self.native("get_token")
        msg = v2_msg(reply)
        fields = [msg.get(k) for k in ("time", "salt", "newsalt")]
        if not all(isinstance(f, str | int) and str(f) and _encodable(str(f)) for f in fields):
            raise MalformedReply(
                "get_token reply lacks a usable time/salt/newsalt:"
                f" {snippet(json.dumps(reply).encode())}",
                device=self.device,
                operation="get_token",
            )
        t, salt, newsalt = (str(f) for f in fields)
        self._token = V2Token.derive(self.password, salt, newsalt, t)
        self._token_t = now
        self.token_fetches += 1
        log.debug("whatsminer.token_fetched", device=self.device)
        return self._token

    def _open(self, raw: bytes, token: V2Token, operation: str) -> Json:
        """The reply of a write: `{"enc": ...}` decrypted, or a plain (error) reply as is."""
        reply = decode_reply(raw, device=self.device, operation=operation)
        enc = reply.get("enc")
        if not isinstance(enc, str):
            return reply
        try:
            inner = json.loads(aes_ecb_decrypt_b64(token.aes_key, enc).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise MalformedReply(
                f"encrypted reply does not decrypt to JSON with our key ({exc})",
                device=self.device,
                operation=operation,
            ) from exc
        if not isinstance(inner, dict):
            raise MalformedReply(
                "encrypted reply is not a JSON object", device=self.device, operation=operation
            )
        return inner

    async def privileged(self, cmd: str, **params: str) -> Json:
        """An encrypted write. Never retried blindly (a repeated limit change restarts
        mining twice); a rejected token is renewed once, then it is the password."""
        for attempt in range(2):
            token = await self.token(fresh=attempt > 0)
            plain = json.dumps({"cmd": cmd, **params, "token": token.sign}, separators=(",", ":"))
            envelope = {"enc": 1, "data": aes_ecb_encrypt_b64(token.aes_key, plain.encode())}
            raw = await self.cg.exchange(json.dumps(envelope).encode(), cmd)
            reply = self._open(raw, token, cmd)
            try:
                check_v2_status(reply, device=self.device, operation=cmd)
            except WhatsminerRejected as exc:
                if exc.code != CODE_TOKEN_ERROR:
                    if exc.code == CODE_TOKEN_LIMIT:
                        raise WhatsminerRejected(
                            "the miner has handed out its 32 tokens for this address"
                            f" ({exc.reply_msg}); they expire within 30 minutes",
                            device=self.device,
                            operation=cmd,
                            code=exc.code,
                            reply_msg=exc.reply_msg,
                        ) from exc
                    raise
                self.invalidate_token()
                if attempt == 0:
                    log.info(
                        "whatsminer.token_rejected_renewing", device=self.device, operation=cmd
                    )
                    continue
                hint = (
                    ""
                    if self.password_configured
                    else f" (none configured: tried the default {DEFAULT_V2_PASSWORD!r})"
                )
                raise DeviceAuthError(
                    f"the miner rejected a fresh write token (Code {exc.code}: {exc.reply_msg}):"
                    f" the admin password is wrong{hint}",
                    device=self.device,
                    operation=cmd,
                ) from exc
            return reply
        raise AssertionError("unreachable")  # pragma: no cover


class BTMinerV3Client:
    """API v3 on 4433: length-prefixed JSON, one connection per command as pyasic/asic-rs do."""

    def __init__(
        self,
        host: str,
        port: int = V3_PORT,
        *,
        account: str = "",
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        device: str = "",
        backoff_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_timing(timeout, retries)
        self.host, self.port = host, port
        self.device = device or f"{host}:{port}"
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.account = account or DEFAULT_V3_ACCOUNT
        self.password_configured = bool(password)
        self.password = password or DEFAULT_V3_PASSWORD
        self.clock = clock
        self._salt: str | None = None
        self._offset: float | None = None  # the miner's clock minus ours
        self.salt_fetches = 0

    async def _exchange(self, request: Json, operation: str) -> Json:
        body = json.dumps(request, separators=(",", ":")).encode()
        connected = False
        writer: asyncio.StreamWriter | None = None
        where = {"device": self.device, "operation": operation}
        got = 0
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                connected = True
                writer.write(struct.pack("<I", len(body)) + body)
                await writer.drain()
                while True:
                    header = await reader.readexactly(4)
                    got += 4
                    (length,) = struct.unpack("<I", header)
                    if length == 0:
                        continue  # heartbeat frame
                    if length > V3_MAX_FRAME:
                        raise MalformedReply(
                            f"reply frame of {length} bytes is implausible", **where
                        )
                    payload = await reader.readexactly(length)
                    break
        except asyncio.IncompleteReadError as exc:
            if got == 0 and not exc.partial:
                raise DeviceUnreachable("connection closed without a reply", **where) from exc
            raise MalformedReply(
                f"reply truncated after {got + len(exc.partial)} bytes: {snippet(exc.partial)}",
                **where,
            ) from exc
        except TimeoutError as exc:
            if not connected:
                raise DeviceUnreachable(
                    f"connect to {self.host}:{self.port} timed out after {self.timeout:g}s", **where
                ) from exc
            raise DeviceTimeout(f"no reply within {self.timeout:g}s", **where) from exc
        except DeviceError:
            raise
        except OSError as exc:
            raise DeviceUnreachable(
                f"{self.host}:{self.port}: {exc.strerror or type(exc).__name__}", **where
            ) from exc
        finally:
            await _close(writer)
        try:
            reply = json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise MalformedReply(f"reply is not JSON: {snippet(payload)}", **where) from exc
        if not isinstance(reply, dict):
            raise MalformedReply("reply is not a JSON object", **where)
        when = reply.get("when")
        # Epoch seconds; a value past any plausible clock is ignored, not subtracted.
        if isinstance(when, int) and not isinstance(when, bool) and 0 < when < 10**12:
            self._offset = when - self.clock()
        return reply

    def _check(self, reply: Json, operation: str) -> Json:
        code = reply.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            raise MalformedReply(
                f"reply has no integer code: {snippet(json.dumps(reply).encode())}",
                device=self.device,
                operation=operation,
            )
        if code != V3_OK:
            msg = reply.get("msg")
            text = msg if isinstance(msg, str) else json.dumps(msg)[:_SNIPPET]
            raise WhatsminerRejected(
                f"command refused (code {code}: {text})",
                device=self.device,
                operation=operation,
                code=code,
                reply_msg=text,
            )
        return reply

    async def get(self, cmd: str, param: Any = None) -> Json:
        request: Json = {"cmd": cmd} if param is None else {"cmd": cmd, "param": param}

        async def once() -> Json:
            return await self._exchange(request, cmd)

        reply = await with_retries(
            once, retries=self.retries, backoff_s=self.backoff_s, device=self.device, operation=cmd
        )
        return self._check(reply, cmd)

    async def salt(self, *, fresh: bool = False) -> str:
        if self._salt is not None and not fresh:
            return self._salt
        salt = v3_msg(await self.get("get.device.info", "salt")).get("salt")
        if not isinstance(salt, str) or not salt or not _encodable(salt):
            raise MalformedReply(
                "get.device.info salt reply has no salt", device=self.device, operation="salt"
            )
        self._salt = salt
        self.salt_fetches += 1
        return salt

    def miner_time(self) -> int:
        """The miner's idea of now, which is what its token check compares against."""
        return int(self.clock() + self._offset) if self._offset is not None else int(time.time())

    async def set(self, cmd: str, param: Any = None) -> Json:
        """A write: signed with the cached salt; a refusal renews the salt once."""
        for attempt in range(2):
            salt = await self.salt(fresh=attempt > 0)
            ts = self.miner_time()
            request: Json = {"cmd": cmd}
            if param is not None:
                request["param"] = param
            request.update(
                ts=ts, account=self.account, token=v3_token(cmd, self.password, salt, ts)
            )
            reply = await self._exchange(request, cmd)
            try:
                return self._check(reply, cmd)
            except WhatsminerRejected as exc:
                if exc.code != V3_DENIED:
                    raise
                if attempt == 0:
                    log.info(
                        "whatsminer.v3_write_denied_renewing_salt",
                        device=self.device,
                        operation=cmd,
                    )
                    continue
                hint = (
                    ""
                    if self.password_configured
                    else f" (none configured: tried the default {DEFAULT_V3_PASSWORD!r})"
                )
                raise DeviceAuthError(
                    f"the miner refused the write for account {self.account!r} ({exc.reply_msg}):"
                    f" wrong password{hint}, or API write access is not enabled in WhatsMinerTool",
                    device=self.device,
                    operation=cmd,
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


# -- drivers --------------------------------------------------------------------------------


class _WhatsminerBase:
    """What both API generations share: capabilities, the power range and control locking."""

    def __init__(
        self, device: str, *, power_min_w: float | None, power_max_w: float | None
    ) -> None:
        for name, v in (("power_min_w", power_min_w), ("power_max_w", power_max_w)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of watts, got {v}")
        if power_min_w is not None and power_max_w is not None and power_min_w > power_max_w:
            raise ValueError(f"power_min_w {power_min_w} exceeds power_max_w {power_max_w}")
        self.device = device
        self._cfg_min, self._cfg_max = power_min_w, power_max_w
        self._learned_max: float | None = None
        self._limit_supported = True
        self._limit_set: int | None = None  # the user power limit the firmware holds
        self._identity: RigIdentity | None = None
        self._reboots = RebootWatch(device)
        self._lock = asyncio.Lock()
        self.capabilities = self._capabilities()

    def _learn_max(self, *values: float | None) -> None:
        for v in values:
            if v is not None and 0 < v <= MAX_RIG_POWER_W:  # a misread figure is no maximum
                self._learned_max = max(self._learned_max or 0.0, v)
        self.capabilities = self._capabilities()

    def power_range(self) -> tuple[float, float] | None:
        hi = self._cfg_max or self._learned_max
        if hi is None:
            return None
        lo = self._cfg_min or round(hi * DEFAULT_MIN_FRACTION)
        return min(lo, hi), hi

    def _capabilities(self) -> MinerCapabilities:
        span = self.power_range() if self._limit_supported else None
        return MinerCapabilities(
            can_sleep=True,
            can_power_target=self._limit_supported,
            power_target_min_w=span[0] if span else None,
            power_target_max_w=span[1] if span else None,
            needs_pdu_to_power_off=True,  # power off leaves the control board and fans up
        )

    def _note_reading(self, tel: RigTelemetry) -> None:
        """Cache identity; after a restart it may be new firmware, so the next poll re-asks."""
        self._identity = None if self._reboots.restarted(tel) else tel.identity

    @staticmethod
    def _check_watts(watts: float | None) -> None:
        if watts is not None and (not math.isfinite(watts) or watts <= 0):
            raise ValueError(f"power target must be a positive number of watts, got {watts}")

    def _target(self, watts: float | None) -> int:
        """Validate before sending anything: the firmware restarts mining on every change."""
        self._check_watts(watts)
        if not self._limit_supported:
            raise UnsupportedOperation(
                "this firmware has no power limit (API < 2.0.5, or Power Limit reads 0)",
                device=self.device,
                operation="set_power_target",
            )
        span = self.power_range()
        if span is None:
            raise UnsupportedOperation(
                "the rig's maximum power is unknown: configure power_max_w",
                device=self.device,
                operation="set_power_target",
            )
        lo, hi = span
        if watts is None:
            return round(hi)
        if not (lo <= watts <= hi):
            raise ValueError(f"power target {watts:.0f} W outside {lo:.0f}-{hi:.0f} W")
        return round(watts)

    @staticmethod
    def _percent(percent: int | None, *, none_means: int) -> int:
        if percent is None:
            return none_means
        if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
            raise ValueError(f"power percentage must be an integer 1-100, got {percent!r}")
        return percent


class WhatsminerDriver(_WhatsminerBase):
    """A Whatsminer on API v2 (port 4028).

    A read is one joined `summary+devs` request plus `status` (which says whether the
    hashboards are powered off; btminer will not join it), run concurrently; the first
    poll also asks `devdetails` and `get_version` for the model and firmware.
    """

    api = "v2"

    def __init__(
        self,
        device: str,
        host: str,
        port: int = V2_PORT,
        *,
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        power_min_w: float | None = None,
        power_max_w: float | None = None,
        backoff_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device, power_min_w=power_min_w, power_max_w=power_max_w)
        self.client = BTMinerV2Client(
            host,
            port,
            password=password,
            timeout=timeout,
            retries=retries,
            device=device,
            backoff_s=backoff_s,
            clock=clock,
        )
        self.api_version: tuple[int, ...] | None = None

    def _learn_status(self, status: Mapping[str, Any] | None) -> None:
        limit = to_int(v2_msg(status).get("power_limit_set"))
        if limit is not None and limit > 0:
            self._limit_set = limit
            self._learn_max(float(limit))

    def _learn_version(self, version: Mapping[str, Any] | None) -> None:
        api = api_version_tuple(_text(v2_msg(version).get("api_ver")))
        if api is not None:
            self.api_version = api
            if api < (2, 0, 5):  # adjust_power_limit arrived in API 2.0.5
                self._limit_supported = False
            self.capabilities = self._capabilities()

    async def read(self, ts: float) -> RigTelemetry:
        first_poll = self._identity is None
        cmds = ["summary", "devs"] + (["devdetails"] if first_poll else [])
        c = self.client
        results = await asyncio.gather(
            c.cg.multi(*cmds, optional={"devdetails"}),
            c.native("status"),
            c.native("get_version") if first_poll else _none(),
            return_exceptions=True,
        )
        joined = _required(results[0])
        status = _optional(results[1])
        version = _optional(results[2])
        tel = parse_v2_telemetry(
            ts,
            summary=joined["summary"],
            devs=joined.get("devs"),
            status=status,
            devdetails=joined.get("devdetails"),
            version=version,
            identity=self._identity,
            device=self.device,
        )
        self._learn_version(version)
        self._learn_status(status)
        # Units without limit support read "Power Limit" 0 and hold no power_limit_set
        # (asic-rs #199); re-judged every poll so a transient 0 does not stick.
        reads_zero = to_float(first(joined["summary"], "SUMMARY").get("Power Limit")) == 0
        too_old = self.api_version is not None and self.api_version < (2, 0, 5)
        self._limit_supported = not too_old and not (reads_zero and self._limit_set is None)
        self._learn_max(tel.power_limit_w)
        self._note_reading(tel)
        return tel

    async def status(self) -> Mapping[str, Any]:
        """btminer's `status` message (mineroff, power_limit_set, power_mode, ...)."""
        reply = await self.client.native("status")
        self._learn_status(reply)
        return v2_msg(reply)

    async def _write(
        self, cmd: str, verify: Callable[[Mapping[str, Any]], bool] | None, **params: str
    ) -> None:
        """Send a write; if it times out, ask the miner whether it happened anyway."""
        try:
            await self.client.privileged(cmd, **params)
        except (DeviceTimeout, DeviceUnreachable) as exc:
            if verify is None:
                raise
            try:
                st = await self.status()
            except DeviceError:
                raise exc from None
            if not verify(st):
                raise
            log.info("whatsminer.applied_without_reply", device=self.device, operation=cmd)

    async def sleep(self) -> None:
        async with self._lock:
            await self._write(
                "power_off", lambda st: _bool(st.get("mineroff")) is True, respbefore="true"
            )

    async def wake(self) -> None:
        async with self._lock:
            await self._write("power_on", lambda st: _bool(st.get("mineroff")) is False)

    async def set_power_target(self, watts: float | None) -> None:
        """Set the firmware power limit (None: the highest known, i.e. the rig's default).

        Reads `status` first: a limit that is already in force is not sent again,
        because every change restarts mining (minutes of lost hashing).
        """
        self._check_watts(watts)
        async with self._lock:
            if self.api_version is None:
                self._learn_version(await self.client.native("get_version"))
            await self.status()
            want = self._target(watts)
            if self._limit_set == want:
                log.debug("whatsminer.power_limit_unchanged", device=self.device, watts=want)
                return
            await self._write(
                "adjust_power_limit",
                lambda st: to_int(st.get("power_limit_set")) == want,
                power_limit=str(want),
            )
            self._limit_set = want
            log.info(
                "whatsminer.power_limit_set", device=self.device, requested_w=watts, watts=want
            )

    async def set_power_percent(self, percent: int | None) -> None:
        """Temporary power percentage (not persisted, no restart); None: back to 100 %."""
        pct = self._percent(percent, none_means=100)
        async with self._lock:
            if self.api_version is None:
                self._learn_version(await self.client.native("get_version"))
            v2 = self.api_version is not None and self.api_version >= (2, 0, 5)
            await self._write("set_power_pct_v2" if v2 else "set_power_pct", None, percent=str(pct))

    async def close(self) -> None:
        """Nothing to release: one connection per request."""


class WhatsminerV3Driver(_WhatsminerBase):
    """A Whatsminer on API v3 (port 4433).

    A read is `get.miner.status` summary and edevs plus `get.device.info` miner (whether
    it is working), concurrently; the first poll asks the whole `get.device.info` and
    `get.miner.setting` (whose `power` is the rated power, the top of the range).
    """

    api = "v3"

    def __init__(
        self,
        device: str,
        host: str,
        port: int = V3_PORT,
        *,
        username: str = "",
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        power_min_w: float | None = None,
        power_max_w: float | None = None,
        backoff_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device, power_min_w=power_min_w, power_max_w=power_max_w)
        self.client = BTMinerV3Client(
            host,
            port,
            account=username,
            password=password,
            timeout=timeout,
            retries=retries,
            device=device,
            backoff_s=backoff_s,
            clock=clock,
        )

    def _learn_setting(self, setting: Mapping[str, Any] | None) -> Mapping[str, Any]:
        msg = v3_msg(setting)
        limit = to_int(msg.get("power-limit"))
        if limit is not None and limit > 0:
            self._limit_set = limit
        self._learn_max(to_float(msg.get("power")), None if limit is None else float(limit))
        return msg

    async def read(self, ts: float) -> RigTelemetry:
        first_poll = self._identity is None
        c = self.client
        results = await asyncio.gather(
            c.get("get.miner.status", "summary"),
            c.get("get.miner.status", "edevs"),
            c.get("get.device.info") if first_poll else c.get("get.device.info", "miner"),
            c.get("get.miner.setting") if first_poll else _none(),
            return_exceptions=True,
        )
        summary = _required(results[0])
        edevs = _optional(results[1])
        info = _optional(results[2])
        setting = _optional(results[3])
        tel = parse_v3_telemetry(
            ts,
            summary=summary,
            edevs=edevs,
            device_info=info,
            identity=self._identity,
            device=self.device,
        )
        if setting is not None:
            self._learn_setting(setting)
        self._learn_max(tel.power_limit_w)
        self._note_reading(tel)
        return tel

    async def setting(self) -> Mapping[str, Any]:
        return self._learn_setting(await self.client.get("get.miner.setting"))

    async def _working(self) -> bool | None:
        info = await self.client.get("get.device.info", "miner")
        return _bool(mapping(v3_msg(info).get("miner")).get("working"))

    async def _write(
        self, cmd: str, param: Any, verify: Callable[[], Awaitable[bool]] | None
    ) -> None:
        try:
            await self.client.set(cmd, param)
        except (DeviceTimeout, DeviceUnreachable) as exc:
            if verify is None:
                raise
            try:
                done = await verify()
            except DeviceError:
                raise exc from None
            if not done:
                raise
            log.info("whatsminer.applied_without_reply", device=self.device, operation=cmd)

    async def sleep(self) -> None:
        async def stopped() -> bool:
            return await self._working() is False

        async with self._lock:
            await self._write("set.miner.service", "stop", stopped)

    async def wake(self) -> None:
        async def started() -> bool:
            return await self._working() is True

        async with self._lock:
            await self._write("set.miner.service", "start", started)

    async def set_power_target(self, watts: float | None) -> None:
        """Set the power limit (None: the rated power). Skipped when already in force."""
        self._check_watts(watts)
        async with self._lock:
            await self.setting()
            want = self._target(watts)
            if self._limit_set == want:
                log.debug("whatsminer.power_limit_unchanged", device=self.device, watts=want)
                return

            async def applied() -> bool:
                return to_int((await self.setting()).get("power-limit")) == want

            await self._write("set.miner.power_limit", want, applied)
            self._limit_set = want
            log.info(
                "whatsminer.power_limit_set", device=self.device, requested_w=watts, watts=want
            )

    async def set_power_percent(self, percent: int | None) -> None:
        """Temporary power percentage; None (sent as 0, the firmware's "unset") clears it."""
        pct = self._percent(percent, none_means=0)

        async def applied() -> bool:
            return to_int((await self.setting()).get("power-percent")) == pct

        async with self._lock:
            await self._write("set.miner.power_percent", {"percent": pct}, applied)

    async def close(self) -> None:
        """Nothing to release: one connection per request."""


async def _none() -> None:
    return None


def _required(result: T | BaseException) -> T:
    if isinstance(result, BaseException):
        raise result
    return result


def _optional(result: T | BaseException) -> T | None:
    """A reply that enriches the reading: a refusal leaves it out, a dead rig still raises."""
    if isinstance(result, CommandRejected):
        return None
    if isinstance(result, BaseException):
        raise result
    return result


# -- discovery ------------------------------------------------------------------------------


async def _identify_v2(host: str, port: int, wait_s: float) -> RigIdentity | None:
    client = BTMinerV2Client(host, port, timeout=wait_s, retries=0, device=host)
    try:
        details = await client.cg.command("devdetails")
    except DeviceError:
        return None
    items = section(details, "DEVDETAILS")
    if not any(_text(i.get("Driver")).lower() == "bitmicro" for i in items):
        return None
    try:
        version: Json | None = await client.native("get_version")
    except DeviceError:
        version = None
    return parse_v2_identity(details, version)


async def _identify_v3(host: str, port: int, wait_s: float) -> RigIdentity | None:
    client = BTMinerV3Client(host, port, timeout=wait_s, retries=0, device=host)
    try:
        info = await client.get("get.device.info")
    except DeviceError:
        return None
    if not isinstance(v3_msg(info).get("miner"), Mapping):
        return None
    return parse_v3_identity(info)


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery interface passes a per-probe timeout
    v2_port: int = V2_PORT,
    v3_port: int = V3_PORT,
) -> RigIdentity | None:
    """A Whatsminer's identity, or None for anything else, within about `timeout` seconds.

    Probes API v3 (`get.device.info` on 4433) and API v2 (`devdetails` on 4028, whose
    `Driver` is "bitmicro" on btminer) concurrently and prefers v3. A host that refuses
    both ports answers None at once; use `driver_kind_for()` on the result.
    """
    try:
        async with asyncio.timeout(timeout * 2 + 0.5):  # v2 may need devdetails then get_version
            v3, v2 = await asyncio.gather(
                _identify_v3(host, v3_port, timeout), _identify_v2(host, v2_port, timeout)
            )
    except TimeoutError:
        return None
    return v3 or v2


def make_whatsminer_driver(
    kind: str,
    device: str,
    host: str,
    port: int | None = None,
    *,
    username: str = "",
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
    power_min_w: float | None = None,
    power_max_w: float | None = None,
) -> WhatsminerDriver | WhatsminerV3Driver:
    """`kind` "whatsminer" (API v2, port 4028) or "whatsminer-v3" (API v3, port 4433).

    `password` is the admin password (v2) or that of `username` (v3, default account
    "super"); empty means the firmware default, which only allows reads on real miners.
    """
    k = kind.strip().lower()
    if k == "whatsminer":
        return WhatsminerDriver(
            device,
            host,
            V2_PORT if port is None else port,
            password=password,
            timeout=timeout,
            retries=retries,
            power_min_w=power_min_w,
            power_max_w=power_max_w,
        )
    if k in ("whatsminer-v3", "whatsminer_v3"):
        return WhatsminerV3Driver(
            device,
            host,
            V3_PORT if port is None else port,
            username=username,
            password=password,
            timeout=timeout,
            retries=retries,
            power_min_w=power_min_w,
            power_max_w=power_max_w,
        )
    raise ValueError(f"unknown Whatsminer kind {kind!r}; known: whatsminer, whatsminer-v3")
