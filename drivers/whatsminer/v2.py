"""btminer API v2 (port 4028): its replies, and its client with the encrypted write envelope.

API v2 is the CGMiner protocol for reads (`summary`, `devs`, `devdetails`, joinable with
`+`) plus btminer's own commands (`status`, `get_version`, `get_token`, ...) whose replies
are *flat* (`STATUS` is a letter, not a list). Writes need a token (md5-crypt of the admin
password with the miner's salt, then of that with a time and a one-off salt) and travel
AES-256-ECB encrypted; the token lives 30 minutes and a client IP may hold at most 32, so
the client caches it and fetches a new one only when it expires or the firmware says
"check token error" (Code 135). A second 135 in a row means the password is wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog

from drivers.cgminer import MAX_REPLY_BYTES, CGMinerClient, check_status, decode_reply
from drivers.errors import DeviceAuthError, MalformedReply, snippet
from drivers.retry import check_timing, with_retries
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from drivers.values import first, mapping, positive, section, to_float, to_int
from drivers.whatsminer.crypto import V2Token, aes_ecb_decrypt_b64, aes_ecb_encrypt_b64
from drivers.whatsminer.parse import (
    FIRMWARE,
    MAKE,
    SNIPPET,
    WhatsminerRejected,
    as_ths,
    as_watts,
    clean_text,
    encodable,
    first_number,
    flag,
    model_name,
)

log = structlog.get_logger(__name__)

Json = dict[str, Any]

V2_PORT: Final = 4028
DEFAULT_V2_PASSWORD: Final = "admin"  # the v2 write account is always "admin"
TOKEN_TTL_S: Final = 30 * 60.0  # WM API 2.0.5: "a token keepalive time is 30 minutes"
TOKEN_MARGIN_S: Final = 60.0  # renew a little early rather than race the miner's expiry

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

_SUCCESS: Final = frozenset({"S", "I", "W"})


# -- replies --------------------------------------------------------------------------------


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
    text = msg if isinstance(msg, str) else json.dumps(msg)[:SNIPPET]
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
        mhs = first_number(item, ("MHS 5s", "MHS 1m", "MHS av"))
        ths = None if mhs is None else as_ths(mhs * 1e-6)
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
        model = clean_text(item.get("Model"))
        if model:
            break
    fw = (
        clean_text(v2_msg(version).get("fw_ver"))
        or clean_text(v2_msg(status).get("FirmwareVersion"))
        or clean_text(first(summary, "SUMMARY").get("Firmware Version"))
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
    mhs = first_number(summ, ("HS RT", "MHS 5s", "MHS 1m", "MHS av"))
    hashrate = None if mhs is None else as_ths(mhs * 1e-6)
    if hashrate is None and boards:
        rates = [b.hashrate_ths for b in boards if b.hashrate_ths is not None]
        hashrate = as_ths(sum(rates)) if rates else None
    st = v2_msg(status)
    limit = positive(as_watts(to_float(summ.get("Power Limit"))))
    if limit is None:
        limit = positive(as_watts(to_float(st.get("power_limit_set"))))
    factory_ghs = to_float(summ.get("Factory GHS"))
    fans = tuple(
        v
        for v in (to_int(summ.get("Fan Speed In")), to_int(summ.get("Fan Speed Out")))
        if v is not None
    )
    board_temps = [b.temp_c for b in boards if b.temp_c is not None]
    chip_temps = [b.chip_temp_c for b in boards if b.chip_temp_c is not None]
    off = flag(st.get("mineroff", st.get("btmineroff")))
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
        power_w=as_watts(first_number(summ, ("Power", "Power_RT"))),
        power_limit_w=limit,
        nominal_hashrate_ths=None if factory_ghs is None else as_ths(factory_ghs * 1e-3),
        temp_c=max(board_temps) if board_temps else positive(to_float(summ.get("Temperature"))),
        chip_temp_c=max(chip_temps)
        if chip_temps
        else positive(to_float(summ.get("Chip Temp Max"))),
        fans_rpm=fans,
        hashboards=boards,
        uptime_s=to_int(summ.get("Elapsed")),
        identity=identity,
    )


# -- the client -----------------------------------------------------------------------------


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
        if not all(isinstance(f, str | int) and str(f) and encodable(str(f)) for f in fields):
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
