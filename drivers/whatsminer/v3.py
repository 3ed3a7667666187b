"""btminer API v3 (port 4433): its replies, and its client.

Newer firmware, where v2 control no longer works, speaks JSON frames with a 4-byte
little-endian length; writes carry a short SHA-256 token over the command, password, the
miner's salt and a timestamp. The salt is cached; the timestamp follows the miner's own
clock (every reply says what time the miner thinks it is), so a miner with a skewed clock
still accepts our writes. Hashrates are TH/s here, not v2's MH/s.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import structlog

from drivers import jsonwire
from drivers.errors import (
    DeviceAuthError,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    snippet,
)
from drivers.retry import check_timing, with_retries
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from drivers.values import mapping, positive, to_float, to_int
from drivers.whatsminer.crypto import v3_token
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

V3_PORT: Final = 4433
DEFAULT_V3_ACCOUNT: Final = "super"
DEFAULT_V3_PASSWORD: Final = "super"
V3_MAX_FRAME: Final = 1 << 20
# API v3 codes (pyasic's BTMinerAPICode): 0 ok, -1 command error, -2 invalid command,
# -3 invalid JSON, -4 access denied, -5 out of memory.
V3_OK: Final = 0
V3_DENIED: Final = -4


# -- replies --------------------------------------------------------------------------------


def v3_msg(reply: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return mapping(reply.get("msg")) if reply is not None else {}


def parse_v3_identity(device_info: Mapping[str, Any] | None) -> RigIdentity:
    msg = v3_msg(device_info)
    miner, system = mapping(msg.get("miner")), mapping(msg.get("system"))
    return RigIdentity(
        make=MAKE,
        model=model_name(clean_text(miner.get("type"))),
        firmware=FIRMWARE,
        firmware_version=clean_text(system.get("fwversion")),
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
        ths = as_ths(first_number(item, ("hash-realtime", "hash-average")))
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
    hashrate = as_ths(first_number(summ, ("hash-realtime", "hash-1min", "hash-average")))
    working = flag(mapping(v3_msg(device_info).get("miner")).get("working"))
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
        power_w=as_watts(first_number(summ, ("power-realtime", "power-5min"))),
        power_limit_w=positive(as_watts(to_float(summ.get("power-limit")))),
        nominal_hashrate_ths=as_ths(to_float(summ.get("factory-hash"))),
        temp_c=max(temps) if temps else None,
        chip_temp_c=positive(to_float(summ.get("chip-temp-max"))),
        fans_rpm=fans,
        hashboards=tuple(boards),
        uptime_s=to_int(summ.get("elapsed")),
        identity=identity,
    )


# -- the client -----------------------------------------------------------------------------


class _OneFrame(asyncio.Protocol):
    """Sends one frame and reads one back: a 4-byte little-endian length, then the JSON;
    zero-length heartbeat frames are skipped."""

    def __init__(self, data: bytes, done: asyncio.Future[bytes], where: dict[str, str]) -> None:
        self.data = data
        self.done = done
        self.where = where
        self.buf = b""
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.data)  # uvloop's is not a subclass

    def data_received(self, chunk: bytes) -> None:
        if self.done.done():
            return
        self.got += len(chunk)
        self.buf += chunk
        while len(self.buf) >= 4:
            (length,) = struct.unpack_from("<I", self.buf)
            if length == 0:
                self.buf = self.buf[4:]  # heartbeat frame
                continue
            if length > V3_MAX_FRAME:
                self.done.set_exception(
                    MalformedReply(f"reply frame of {length} bytes is implausible", **self.where)
                )
            elif len(self.buf) >= 4 + length:
                self.done.set_result(self.buf[4 : 4 + length])
            return

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        if self.done.done():
            return
        if self.got == 0:
            self.done.set_exception(
                DeviceUnreachable("connection closed without a reply", **self.where)
            )
        else:
            self.done.set_exception(
                MalformedReply(
                    f"reply truncated after {self.got} bytes: {snippet(self.buf)}", **self.where
                )
            )


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
        """One connect, one length-prefixed frame each way, under a single deadline. A bare
        protocol rather than streams, as on 4028 (drivers/cgminer.py): three of these per
        rig per poll."""
        body = json.dumps(request, separators=(",", ":")).encode()
        where = {"device": self.device, "operation": operation}
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, _ = await loop.create_connection(
                    lambda: _OneFrame(struct.pack("<I", len(body)) + body, done, where),
                    self.host,
                    self.port,
                )
                payload = await done
        except TimeoutError as exc:
            if transport is None:
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
            if transport is not None:
                transport.close()
            if not done.done():
                done.cancel()
        try:
            reply = jsonwire.loads(payload)
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
            text = msg if isinstance(msg, str) else json.dumps(msg)[:SNIPPET]
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
        if not isinstance(salt, str) or not salt or not encodable(salt):
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
