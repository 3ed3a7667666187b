"""The CGMiner-compatible RPC ("port 4028"): its transport, its replies parsed into telemetry,
and the driver of a rig that offers nothing more (kind "cgminer": reads only).

Stock Antminer (bmminer), LuxOS, BOSminer and others all speak this protocol, each with
quirks: numbers sent as strings, joined replies missing commas, replies that end at a NUL or
only at EOF. This module absorbs those so the drivers above see plain dicts and
`RigTelemetry`, and every failure surfaces as one of the typed `DeviceError`s: a farm
daemon must tell "rig is off" (unreachable) from "rig is sick" (malformed) from "rig said
no" (rejected) without reading wire bytes.

One TCP connection per request is the protocol (the server closes after replying), so
there is no connection to pool or keep alive; the cost of a poll is one connect.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final, cast

import structlog

from drivers import jsonwire
from drivers.base import MinerCapabilities
from drivers.errors import (
    CommandRejected,
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
    measure,
    section,
    to_float,
    to_int,
)

log = structlog.get_logger(__name__)

Json = dict[str, Any]

DEFAULT_PORT: Final = 4028
MAX_REPLY_BYTES: Final = 1 << 20  # a stats reply is a few KiB; 1 MiB means something is wrong
READ_CHUNK: Final = 65_536
MAX_FANS: Final = 32
_SUCCESS_LETTERS: Final = frozenset({"S", "I", "W"})
_ERROR_LETTERS: Final = frozenset({"E", "F"})
_SPECIAL_STATUS: Final = frozenset({"BYE", "RESTART"})
# Compiled once: a farm parses thousands of replies a second.
_CHAIN_KEY: Final = re.compile(r"chain_(?:acn|rate)(\d+)")
_CHAIN_PREFIXES: Final = ("chain_acn", "chain_rate")
_FAN_KEY: Final = re.compile(r"fan(\d+)")


class CGMinerRejected(CommandRejected):
    """A STATUS E/F reply; keeps the firmware's code so callers can react to specific ones."""

    def __init__(
        self,
        message: str,
        *,
        device: str = "",
        operation: str = "",
        code: int | None = None,
        reply_msg: str = "",
    ) -> None:
        super().__init__(message, device=device, operation=operation)
        self.code = code
        self.reply_msg = reply_msg


def decode_reply(raw: bytes, *, device: str = "", operation: str = "") -> Json:
    """Bytes off the wire -> the reply object, tolerating the NUL and missing-comma quirks.

    Decoded once, straight from the bytes (drivers/jsonwire.py); only a reply that is not
    plain JSON takes the slower way through text (`_repaired`)."""
    data = raw.split(b"\x00", 1)[0]
    try:
        obj = jsonwire.loads(data, strict=False)
    except UnicodeDecodeError as exc:
        raise MalformedReply(
            f"reply is not UTF-8 text: {snippet(data)}", device=device, operation=operation
        ) from exc
    except (ValueError, RecursionError):
        obj = _repaired(data.decode("utf-8").strip(), device=device, operation=operation)
    if not isinstance(obj, dict):
        raise MalformedReply(
            f"reply is JSON {type(obj).__name__}, not an object", device=device, operation=operation
        )
    return obj


def _repaired(text: str, *, device: str, operation: str) -> Any:
    """A reply JSON alone cannot read: surrounded by whitespace JSON does not skip, or
    joined parts without a comma ("}{", as some bmminer builds send; pyasic repairs it the
    same way)."""
    if not text:
        raise MalformedReply("empty reply", device=device, operation=operation)
    try:
        return jsonwire.loads(text, strict=False)
    except (ValueError, RecursionError) as exc:
        if "}{" not in text:
            raise MalformedReply(
                f"reply is not JSON ({exc}): {snippet(text)}", device=device, operation=operation
            ) from exc
        try:
            return jsonwire.loads(text.replace("}{", "},{"), strict=False)
        except (ValueError, RecursionError) as exc2:
            raise MalformedReply(
                f"reply is not JSON ({exc2}): {snippet(text)}",
                device=device,
                operation=operation,
            ) from exc2


def check_status(reply: Mapping[str, Any], *, device: str = "", operation: str = "") -> None:
    """Raise unless the reply's STATUS says success; E/F become `CGMinerRejected`."""
    status = reply.get("STATUS")
    if isinstance(status, str) and status in _SPECIAL_STATUS:
        return  # quit/restart answer with a bare string
    if isinstance(status, list) and status and isinstance(status[0], Mapping):
        entry: Mapping[str, Any] = status[0]
    elif isinstance(status, Mapping):
        entry = status  # btminer-native replies use a flat STATUS object
    else:
        raise MalformedReply("reply has no STATUS", device=device, operation=operation)
    letter = entry.get("STATUS")
    if not isinstance(letter, str):
        raise MalformedReply(
            f"STATUS is {snippet(repr(letter))}, not a status letter",
            device=device,
            operation=operation,
        )
    if letter in _SUCCESS_LETTERS:
        return
    code = to_int(entry.get("Code"))
    msg = str(entry.get("Msg", ""))
    if letter in _ERROR_LETTERS:
        if code == 45:
            text = f"access denied to {operation or 'command'} (Code 45: {msg})"
        else:
            text = f"command refused (STATUS {letter}, Code {code}: {msg})"
        raise CGMinerRejected(text, device=device, operation=operation, code=code, reply_msg=msg)
    raise MalformedReply(f"unknown STATUS letter {letter!r}", device=device, operation=operation)


@functools.lru_cache(maxsize=256)
def _encoded(cmd: str) -> bytes:
    """A parameterless request's bytes: the same few go to every rig at every poll."""
    return json.dumps({"command": cmd}, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=256)
def _joinable(cmds: tuple[str, ...]) -> tuple[str, ...]:
    """`multi`'s commands, stripped and without repeats; checked once per list (drivers ask
    for a few fixed lists, never for names that come from a device)."""
    names = tuple(dict.fromkeys(c.strip() for c in cmds if c.strip()))
    if not names:
        raise ValueError("multi() needs at least one command")
    for name in names:
        if any(ch in name for ch in "+|,"):
            raise ValueError(f"{name!r} cannot be joined: only plain command names")
    return names


class CGMinerClient:
    """Talks the 4028 protocol to one miner: one connection per request, bounded everything.

    Retries (with a short backoff) only cover failures that can be transient on a farm LAN,
    timeouts and unreachable hosts; a rejection or a malformed reply would be the same the
    second time, so those raise at once.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        timeout: float = 3.0,
        retries: int = 1,
        device: str = "",
        backoff_s: float = 0.1,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        check_timing(timeout, retries)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.device = device or f"{host}:{port}"
        self.backoff_s = backoff_s
        self.max_reply_bytes = max_reply_bytes
        self._join_ok = True  # cleared once a joined request failed but single ones worked

    async def command(self, cmd: str, parameter: str | None = None) -> Json:
        """Run one command; returns the whole reply (STATUS, section, id) after checking it."""
        if parameter is None:
            data = _encoded(cmd)
        else:
            payload = {"command": cmd, "parameter": parameter}
            data = json.dumps(payload, separators=(",", ":")).encode()
        raw = await self._request(data, cmd)
        reply = decode_reply(raw, device=self.device, operation=cmd)
        check_status(reply, device=self.device, operation=cmd)
        return reply

    async def multi(self, *cmds: str, optional: Collection[str] = ()) -> dict[str, Json]:
        """Run parameterless report commands in one `a+b+c` request; {cmd: its full reply}.

        Falls back to one connection per command if the joined reply is unusable (some
        firmware mangles or refuses joins), and remembers that for the next call.
        Commands in `optional` that the firmware rejects are left out of the result
        instead of failing the whole read: a firmware build without `atm` or `profiles`
        must still be monitored.
        """
        names = _joinable(cmds)
        if len(names) == 1:
            return {names[0]: await self.command(names[0])}
        joined_error: MalformedReply | None = None
        if self._join_ok:
            try:
                return await self._joined(names, optional)
            except MalformedReply as exc:
                joined_error = exc
                log.info("cgminer.join_failed_fallback", device=self.device, error=str(exc))
        out: dict[str, Json] = {}
        for name in names:
            try:
                out[name] = await self.command(name)
            except CommandRejected:
                if name not in optional:
                    raise
        if joined_error is not None:
            self._join_ok = False
        return out

    async def _joined(
        self, names: Sequence[str], optional: Collection[str] = ()
    ) -> dict[str, Json]:
        op = "+".join(names)
        raw = await self._request(_encoded(op), op)
        reply = decode_reply(raw, device=self.device, operation=op)
        if "STATUS" in reply:
            # A firmware without join support answers the whole thing as one (bad) command.
            raise MalformedReply(
                f"joined request answered as a single reply: {snippet(json.dumps(reply))}",
                device=self.device,
                operation=op,
            )
        out: dict[str, Json] = {}
        for name in names:
            slot = reply[name] if name in reply else reply.get(name.lower())
            if not (isinstance(slot, list) and slot and isinstance(slot[0], dict)):
                raise MalformedReply(
                    f"joined reply has no {name!r} slot", device=self.device, operation=op
                )
            try:
                check_status(slot[0], device=self.device, operation=name)
            except CommandRejected:
                if name not in optional:
                    raise
                continue
            out[name] = slot[0]
        return out

    async def _request(self, data: bytes, operation: str) -> bytes:
        return await with_retries(
            lambda: self.exchange(data, operation),
            retries=self.retries,
            backoff_s=self.backoff_s,
            device=self.device,
            operation=operation,
        )

    async def exchange(self, data: bytes, operation: str) -> bytes:
        """One connect/send/read-to-NUL-or-EOF under a single deadline, no retries: the
        raw framing of 4028, which btminer's native commands share (drivers/whatsminer/v2.py).

        A bare protocol rather than streams: a farm makes thousands of these a second, and a
        StreamReader/StreamWriter pair per request costs a third more CPU than the exchange."""
        loop = asyncio.get_running_loop()
        where = {"device": self.device, "operation": operation}
        done: asyncio.Future[bytes] = loop.create_future()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, _ = await loop.create_connection(
                    lambda: _OneReply(data, self.max_reply_bytes, done, where),
                    self.host,
                    self.port,
                )
                buf = await done
        except TimeoutError as exc:
            if transport is None:
                raise DeviceUnreachable(
                    f"connect to {self.host}:{self.port} timed out after {self.timeout:g}s",
                    **where,
                ) from exc
            raise DeviceTimeout(f"no reply within {self.timeout:g}s", **where) from exc
        except DeviceError:
            raise
        except OSError as exc:  # refused, reset, unreachable network, ...
            raise DeviceUnreachable(
                f"{self.host}:{self.port}: {exc.strerror or type(exc).__name__}", **where
            ) from exc
        finally:
            if transport is not None:
                transport.close()
            if not done.done():
                done.cancel()
        if not buf:
            raise DeviceUnreachable("connection closed without a reply", **where)
        return buf


class _OneReply(asyncio.Protocol):
    """Sends one request and collects the reply: up to a NUL (which is dropped) or EOF."""

    def __init__(
        self, data: bytes, limit: int, done: asyncio.Future[bytes], where: dict[str, str]
    ) -> None:
        self.data = data
        self.limit = limit
        self.done = done
        self.where = where
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.data)  # uvloop's is not a subclass

    def data_received(self, chunk: bytes) -> None:
        if self.done.done():
            return
        nul = chunk.find(b"\x00")
        self.buf += chunk if nul < 0 else chunk[:nul]
        if len(self.buf) > self.limit:
            self.done.set_exception(
                MalformedReply(f"reply exceeds {self.limit} bytes", **self.where)
            )
        elif nul >= 0:
            self.done.set_result(bytes(self.buf))

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(bytes(self.buf))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(bytes(self.buf))
            else:
                self.done.set_exception(exc)


# -- reply parsing ----------------------------------------------------------------------


_UNIT_TO_THS: Final = {"H": 1e-12, "KH": 1e-9, "MH": 1e-6, "GH": 1e-3, "TH": 1.0, "PH": 1e3}


def _rate_ths(entry: Mapping[str, Any], suffix: str) -> float | None:
    """`GHS 5s`/`MHS 5s`/`THS 5s` -> TH/s."""
    for prefix in ("GHS", "THS", "MHS", "KHS"):
        value = to_float(entry.get(f"{prefix} {suffix}"))
        if value is not None:
            return measure(value * _UNIT_TO_THS[prefix[:-1]], MAX_RIG_HASHRATE_THS)
    return None


def _temps(value: Any) -> list[float]:
    """Sensor strings like "73-45-64-65" (or a plain number) -> non-zero readings."""
    if isinstance(value, str):
        parts_s = value.split("-")
        # The usual all-digit string, short enough that no part overflows a float: read
        # at C speed (a rig sends eight of these a poll).
        if len(value) < 300 and "" not in parts_s and value.replace("-", "").isdecimal():
            return [f for f in map(float, parts_s) if f > 0]
        parts = [to_float(p) for p in parts_s]
        return [p for p in parts if p is not None and p > 0]
    f = to_float(value)
    return [f] if f is not None and f > 0 else []


def _device_stats(stats: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The STATS item that carries the chains (STATS[1] on Antminer; STATS[0] is the version)."""
    items = section(stats, "STATS")
    for item in items:
        try:
            chains = _has_chain_keys(tuple(item))
        except TypeError:  # a key that is not hashable (never so in JSON)
            chains = any(str(k).startswith(_CHAIN_PREFIXES) for k in item)
        if chains:
            return item
    return items[-1] if items else {}


@functools.lru_cache(maxsize=128)
def _has_chain_keys(keys: tuple[Any, ...]) -> bool:
    """Whether a STATS item's keys name chains: cached by the keys, as `_chain_numbers_of`
    is (every rig of a firmware build sends the same ones, poll after poll)."""
    return any(str(k).startswith(_CHAIN_PREFIXES) for k in keys)


def _chain_numbers(dev: Mapping[str, Any]) -> list[int]:
    try:
        return list(_chain_numbers_of(tuple(dev)))
    except TypeError:  # a key that is not text (never so in JSON), or not hashable
        return sorted(
            {int(m.group(1)) for k in dev if isinstance(k, str) and (m := _CHAIN_KEY.fullmatch(k))}
        )


@functools.lru_cache(maxsize=128)
def _chain_numbers_of(keys: tuple[str, ...]) -> tuple[int, ...]:
    """The chain numbers in a stats item's keys. Cached by the keys themselves: every rig
    of one firmware build sends the same seventy, poll after poll, and a tuple of them is
    cheaper to look up than the pattern is to try on each."""
    return tuple(sorted({int(m.group(1)) for m in map(_CHAIN_KEY.fullmatch, keys) if m}))


def parse_hashboards(stats: Mapping[str, Any] | None) -> tuple[Hashboard, ...]:
    """Per-board rates, chips and temps from Antminer-style `chain_*`/`temp_*` keys.

    Chain numbering starts at 1 on S19, 6 on S9, 11 elsewhere. A slot with no chips and no
    rate (empty, or zero as LuxOS prints an empty fourth slot: `chain_acn4: 0`,
    `chain_rate4: "0"`) is an empty slot, not a dead board, when no sensor reads on it or
    it lies past the `miner_count` chains the firmware drives; a board that is asleep
    keeps its slot (its sensors still read).
    """
    return _hashboards(_device_stats(stats))


@functools.lru_cache(maxsize=64)
def _chain_keys(n: int) -> tuple[str, str, str, str, str, str]:
    """Chain n's keys: chips, rate, board temp (two spellings), chip temp (two)."""
    return (
        f"chain_acn{n}",
        f"chain_rate{n}",
        f"temp_pcb{n}",
        f"temp{n}",
        f"temp_chip{n}",
        f"temp2_{n}",
    )


def _hottest(value: Any) -> float | None:
    """The highest non-zero reading of a sensor string (`max(_temps(value))`), or None."""
    if isinstance(value, str) and len(value) < 300:
        parts = value.split("-")
        if "" not in parts and value.replace("-", "").isdecimal():
            top = max(map(float, parts))
            return top if top > 0 else None
    temps = _temps(value)
    return max(temps) if temps else None


def _hashboards(dev: Mapping[str, Any]) -> tuple[Hashboard, ...]:
    nums = _chain_numbers(dev)
    if not nums:
        return ()
    unit = str(dev.get("rate_unit", "GH")).upper().removesuffix("/S")
    scale = _UNIT_TO_THS.get(unit, 1e-3)
    chains = to_int(dev.get("miner_count"))
    boards = []
    get = dev.get
    for n in nums:
        acn_k, rate_k, pcb_k, temp_k, chip_k, temp2_k = _chain_keys(n)
        acn = to_int(get(acn_k))
        rate_raw = get(rate_k)
        rate = to_float(rate_raw)
        pcb = _hottest(get(pcb_k))
        if pcb is None:
            pcb = _hottest(get(temp_k))
        chip = _hottest(get(chip_k))
        if chip is None:
            chip = _hottest(get(temp2_k))
        if not acn and not rate:
            beyond = chains is not None and n - nums[0] >= chains
            if rate_raw in (None, "") or rate is None or beyond or (pcb is None and chip is None):
                continue
        ths = None if rate is None else measure(rate * scale, MAX_RIG_HASHRATE_THS)
        boards.append(
            Hashboard(
                index=n - nums[0],
                hashrate_ths=ths,
                temp_c=pcb,
                chip_temp_c=chip,
                chips=acn if acn else None,
                active=bool(ths and ths > 0),
            )
        )
    return tuple(boards)


def parse_fans(stats: Mapping[str, Any] | None) -> tuple[int, ...]:
    return _fans(_device_stats(stats))


def _fans(dev: Mapping[str, Any]) -> tuple[int, ...]:
    count = to_int(dev.get("fan_num"))
    if count is None:
        keys = [int(m.group(1)) for k in dev if (m := _FAN_KEY.fullmatch(str(k)))]
        count = max(keys, default=0)
    fans = []
    for i in range(1, min(count, MAX_FANS) + 1):  # fan_num is firmware-supplied: bound it
        rpm = to_int(dev.get(f"fan{i}"))
        if rpm is not None:
            fans.append(rpm)
    return tuple(fans)


def parse_identity(
    version: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> RigIdentity:
    """Make/model/firmware from `version` (or the version block heading `stats`)."""
    info = first(version, "VERSION") or (section(stats, "STATS") or [{}])[0]
    model = str(info.get("Type") or first(config, "CONFIG").get("Model") or "")
    model = re.sub(r"\s*\(.*\)\s*$", "", model).strip()  # "Antminer S17 Pro (A.P. 2.0.3)"
    make = "Antminer" if model.lower().startswith("antminer") else (model.split() or [""])[0]
    firmware, fw_version = "", ""
    if "LUXminer" in info:
        firmware, fw_version = "LuxOS", str(info["LUXminer"])
    elif "BMMiner" in info:
        firmware, fw_version = "bmminer", str(info.get("Miner") or info["BMMiner"])
    elif "CGMiner" in info:
        firmware, fw_version = "cgminer", str(info.get("Miner") or info["CGMiner"])
    else:
        desc = str(first(version, "STATUS").get("Description", ""))
        if desc.lower().startswith("luxminer"):
            firmware, fw_version = "LuxOS", desc.partition(" ")[2]
        elif desc:
            firmware, _, fw_version = desc.partition(" ")
    return RigIdentity(make=make, model=model, firmware=firmware, firmware_version=fw_version)


def parse_power_limit(
    atm: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
    profile_watts: Mapping[str, float] | None = None,
) -> float | None:
    """The power target in force: ATM's PowerTarget when ATM drives it, else the profile's."""
    atm_entry = first(atm, "ATM")
    if atm_entry.get("Enabled") is True:
        target = measure(to_float(atm_entry.get("PowerTarget")), MAX_RIG_POWER_W)
        if target:
            return target
    name = first(config, "CONFIG").get("Profile")
    if not isinstance(name, str) or not profile_watts:
        return None
    return measure(profile_watts.get(name), MAX_RIG_POWER_W)


def _summary_and_device(
    summary: Mapping[str, Any] | None, stats: Mapping[str, Any] | None, device: str
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    summ = first(summary, "SUMMARY")
    dev = _device_stats(stats)
    if not summ and not dev:
        raise MalformedReply(
            "neither SUMMARY nor device STATS in the replies", device=device, operation="read"
        )
    return summ, dev


def _hashrate(
    summ: Mapping[str, Any], dev: Mapping[str, Any], boards: Sequence[Hashboard]
) -> float | None:
    hashrate = _rate_ths(summ, "5s")
    if hashrate is None:
        hashrate = _rate_ths(dev, "5s")
    if hashrate is None and boards:
        rates = [b.hashrate_ths for b in boards if b.hashrate_ths is not None]
        hashrate = measure(sum(rates), MAX_RIG_HASHRATE_THS) if rates else None
    return hashrate


def _uptime(summ: Mapping[str, Any], dev: Mapping[str, Any]) -> int | None:
    uptime = to_int(summ.get("Elapsed"))
    return to_int(dev.get("Elapsed")) if uptime is None else uptime


def parse_rate_and_uptime(
    summary: Mapping[str, Any] | None, stats: Mapping[str, Any] | None, *, device: str = ""
) -> tuple[float | None, int | None]:
    """(hashrate TH/s, uptime s) as `parse_telemetry` reads them, for a firmware whose
    other figures are elsewhere (drivers/avalon.py): the rest is not worth reading."""
    summ, dev = _summary_and_device(summary, stats, device)
    return _hashrate(summ, dev, _hashboards(dev)), _uptime(summ, dev)


def parse_telemetry(
    ts: float,
    *,
    summary: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None = None,
    power: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    version: Mapping[str, Any] | None = None,
    atm: Mapping[str, Any] | None = None,
    profile_watts: Mapping[str, float] | None = None,
    identity: RigIdentity | None = None,
    device: str = "",
) -> RigTelemetry:
    """Whole command replies (as `CGMinerClient` returns them) -> one `RigTelemetry`.

    Only `summary` or `stats` is required; anything else missing becomes None, never a
    guess (stock firmware has no power reading, and inventing one would corrupt budgets).
    `profile_watts` maps LuxOS profile names to watts (from `profiles`, which rarely
    changes and so is not fetched every poll); `identity` is reused when `version` was not
    fetched this time.
    """
    summ, dev = _summary_and_device(summary, stats, device)
    boards = _hashboards(dev)
    hashrate = _hashrate(summ, dev, boards)

    power_w = measure(to_float(first(power, "POWER").get("Watts")), MAX_RIG_POWER_W)
    if power_w is None:  # some stock builds: "3250 W"
        power_w = measure(to_float(dev.get("chain_power")), MAX_RIG_POWER_W)

    conf = first(config, "CONFIG")
    nominal = measure(to_float(conf.get("NameplateTHS")), MAX_RIG_HASHRATE_THS)
    if nominal is None:
        ideal = to_float(dev.get("total_rateideal"))
        unit = str(dev.get("rate_unit", "GH")).upper().removesuffix("/S")
        scale = _UNIT_TO_THS.get(unit, 1e-3)
        nominal = None if ideal is None else measure(ideal * scale, MAX_RIG_HASHRATE_THS)

    curtail = str(conf.get("CurtailMode", "")).strip().lower()
    if curtail in ("sleep", "sleeping", "idle"):
        state = RigState.SLEEPING
    elif hashrate is not None and hashrate > 0:
        state = RigState.MINING
    else:
        state = RigState.WAKING

    board_temps = [b.temp_c for b in boards if b.temp_c is not None]
    chip_temps = [b.chip_temp_c for b in boards if b.chip_temp_c is not None]
    uptime = _uptime(summ, dev)
    if version is not None or identity is None:
        identity = parse_identity(version, stats, config)
    return RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=hashrate,
        power_w=power_w,
        power_limit_w=parse_power_limit(atm, config, profile_watts),
        nominal_hashrate_ths=nominal,
        temp_c=max(board_temps) if board_temps else None,
        chip_temp_c=max(chip_temps) if chip_temps else None,
        fans_rpm=_fans(dev),
        hashboards=boards,
        uptime_s=uptime,
        identity=identity,
    )


# -- the driver ---------------------------------------------------------------------------


class CGMinerDriver:
    """Any CGMiner-compatible firmware, stock Antminer included: telemetry only.

    Stock firmware denies control over RPC (Code 45) and its web-UI sleep is unreliable
    (ignored writes, 20 s answers, reboots needed), so this driver does not pretend:
    control raises `UnsupportedOperation` and the daemon uses the PDU instead.
    """

    def __init__(self, device: str, client: CGMinerClient) -> None:
        self.device = device
        self.capabilities = MinerCapabilities(can_sleep=False, can_power_target=False)
        self._client = client
        self._identity: RigIdentity | None = None
        self._reboots = RebootWatch(device)

    def _note_reading(self, tel: RigTelemetry) -> None:
        """Cache identity; after a reboot it may be new firmware, so the next poll re-asks."""
        self._identity = None if self._reboots.restarted(tel) else tel.identity

    async def read(self, ts: float) -> RigTelemetry:
        cmds = ["summary", "stats"] + (["version"] if self._identity is None else [])
        replies = await self._client.multi(*cmds)
        tel = parse_telemetry(
            ts,
            summary=replies["summary"],
            stats=replies["stats"],
            version=replies.get("version"),
            identity=self._identity,
            device=self.device,
        )
        self._note_reading(tel)
        return tel

    def _unsupported(self, operation: str) -> UnsupportedOperation:
        return UnsupportedOperation(
            "this firmware offers no control over its API; switch the rig's PDU outlet",
            device=self.device,
            operation=operation,
        )

    async def sleep(self) -> None:
        raise self._unsupported("sleep")

    async def wake(self) -> None:
        raise self._unsupported("wake")

    async def set_power_target(self, watts: float | None) -> None:
        raise self._unsupported("set_power_target")

    async def close(self) -> None:
        """Nothing to release: the protocol opens one connection per request."""
