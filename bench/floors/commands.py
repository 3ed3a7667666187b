"""The floor of a curtailment: the least a client can do to sleep every rig of a farm.

For each dialect, the exchanges rigd's driver makes to sleep (or wake) one rig, read from
its `sleep`/`wake` and its transport, with nothing rigd does beyond them (no retries, no
audit, no events, no parsing of a reply that the next request does not need):

- LuxOS: `curtail <session>,sleep` on 4028, on a session logged on beforehand (rigd's
  poll holds one between writes: `prepare` logs on, untimed);
- Avalon: `ascset 0,softoff,1:<now>` on 4028;
- Whatsminer API v2: `get_token` in plain text, then the AES envelope of
  `power_off` signed with it (rigd holds no token before its first write);
- Whatsminer API v3 on 4433: `get.device.info salt`, then `set.miner.service stop`
  with its SHA-256 token;
- Braiins OS REST on 80: `POST /api/v1/auth/login`, then `PUT /api/v1/actions/pause`
  with the token, on one kept-alive connection;
- ePIC on its API port: `POST /miner {"param": "Stop", "password"}`;
- VNish on 80: `POST /api/v1/unlock`, then `POST /api/v1/mining/stop` with the bearer
  token, on one kept-alive connection;
- stock Antminer web UI on 80 under HTTP digest (the challenge learnt beforehand, as
  rigd's session has it from its polls, then sent pre-emptively as aiohttp does):
  `GET get_miner_conf.cgi`, `POST set_miner_conf.cgi` with the mode changed (answered
  only once bmminer restarted, ~21 s on the simulator as on real units: the floor waits
  the same) and `GET get_miner_conf.cgi` again, as rigd reads the mode back; one
  connection per request, as rigd's connector forces;
- a PDU outlet: the v2c SET of its `rPDU2OutletSwitchedControlCommand` with the write
  community, then the GET of its state, as rigd reads it back.

`curtail(commands, action)` sends every command at once (no bound on concurrency: the
floor is what the farm and this host allow) and reports when each was acknowledged,
from the moment the first left, and this process's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from bench.floors import wire
from drivers import snmp_wire
from drivers.antminer_web import conf_write_body
from drivers.apc_snmp import OUTLET_COMMAND, OUTLET_STATE
from drivers.whatsminer.crypto import V2Token, aes_ecb_encrypt_b64, v3_token

__all__ = ["ACTIONS", "KINDS", "Command", "CommandFloor", "curtail"]

ACTIONS: Final = ("sleep", "wake")
WEB_PORT: Final = 80
# The factory credentials every simulated firmware keeps, which rigd's drivers default to.
LUXOS_USER = "admin"
ANTMINER_USER, ANTMINER_PASSWORD = "root", "root"
BRAIINS_USER, BRAIINS_PASSWORD = "root", "root"
WHATSMINER_V2_PASSWORD = "admin"
WHATSMINER_V3_ACCOUNT, WHATSMINER_V3_PASSWORD = "super", "super"
EPIC_PASSWORD = "letmein"
VNISH_PASSWORD = "admin"
ANTMINER_SLEEP, ANTMINER_NORMAL = 1, 0  # bitmain-work-mode
ANTMINER_WRITE_WAIT_S = 60.0  # set_miner_conf answers after ~21 s
WAIT_S = 30.0  # any other reply: a burst of 10,000 keeps this client's own loop busy
OUTLET_OFF, OUTLET_ON = 2, 1  # immediateOff, immediateOn
ATTEMPTS, BACKOFF_S = 3, 0.5  # as rigd's executor retries a transport failure


@dataclass(frozen=True)
class Command:
    """One rig's command, where the floor sends it.

    `kind` is rigd's driver kind, or "pdu" for the rig's outlet (then `host`/`port` are
    the PDU's agent and `outlet` the outlet's row); `web_port` is the web UI or REST port
    of the dialects that are controlled there."""

    rig: str
    kind: str
    host: str
    port: int
    web_port: int = WEB_PORT
    outlet: int = 0


def _cg(cmd: str, parameter: str | None = None) -> bytes:
    payload = {"command": cmd} if parameter is None else {"command": cmd, "parameter": parameter}
    return json.dumps(payload, separators=(",", ":")).encode()


def _json(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw.decode("utf-8", "replace"), strict=False)
    if not isinstance(doc, dict):
        raise wire.FloorError(f"expected a JSON object, got {raw[:80]!r}")
    return doc


def _refused(reply: bytes) -> bool:
    """A CGMiner-style error status (the one look at a reply the floor takes: a refused
    LuxOS session must be logged on again, as rigd does)."""
    return b'"STATUS":"E"' in reply or b'"STATUS": "E"' in reply


def _first(doc: dict[str, Any], key: str) -> dict[str, Any]:
    part = doc.get(key)
    if isinstance(part, list) and part and isinstance(part[0], dict):
        return cast(dict[str, Any], part[0])
    return part if isinstance(part, dict) else {}


def _http(method: str, host: str, port: int, path: str, body: bytes = b"",
          headers: Sequence[tuple[str, str]] = ()) -> bytes:  # fmt: skip
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
             *(f"{k}: {v}" for k, v in headers)]  # fmt: skip
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _digest_fields(challenge: bytes) -> dict[str, str]:
    text = challenge.decode("latin-1")
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "digest":
        raise wire.FloorError(f"not a digest challenge: {text!r}")
    out = {}
    for part in rest.split(","):
        k, _, v = part.strip().partition("=")
        out[k.strip().lower()] = v.strip().strip('"')
    return out


def _md5(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


class _Digest:
    """Pre-emptive digest authorisation on one origin, as aiohttp's middleware sends it
    once it has a challenge: a fresh cnonce and the next nc for every request."""

    def __init__(self, challenge: bytes, user: str, password: str) -> None:
        f = _digest_fields(challenge)
        self.realm, self.nonce = f["realm"], f["nonce"]
        self.ha1 = _md5(f"{user}:{self.realm}:{password}")
        self.user = user
        self.nc = itertools.count(1)

    def header(self, method: str, uri: str) -> str:
        nc = f"{next(self.nc):08x}"
        cnonce = os.urandom(8).hex()
        ha2 = _md5(f"{method}:{uri}")
        response = _md5(f"{self.ha1}:{self.nonce}:{nc}:{cnonce}:auth:{ha2}")
        return (
            f'Digest username="{self.user}", realm="{self.realm}", nonce="{self.nonce}", '
            f'uri="{uri}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}", '
            f'response="{response}"'
        )


class _Snmp(asyncio.DatagramProtocol):
    """One UDP socket for every PDU, replies matched by request id (many outlets of one
    PDU are in flight at once)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[int, asyncio.Future[int]] = {}
        self.ids = itertools.count(1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request_id = snmp_wire.decode_reply(data).request_id
        except snmp_wire.BerError:
            return
        fut = self.waiting.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(len(data))

    async def exchange(self, addr: tuple[str, int], pdu_type: int, community: str,
                       binds: bytes, wait_s: float = 5.0) -> int:  # fmt: skip
        assert self.transport is not None
        request_id = next(self.ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = fut
        self.transport.sendto(snmp_wire.encode_request(pdu_type, request_id, community, binds),
                              addr)  # fmt: skip
        try:
            async with asyncio.timeout(wait_s):
                return await fut
        finally:
            self.waiting.pop(request_id, None)


class CommandFloor:
    """Sends one command per rig the bare way (see the module docstring), counting the
    requests it sends and the bytes it receives."""

    def __init__(self) -> None:
        self.requests = 0
        self.received = 0
        self.sessions: dict[str, str] = {}  # LuxOS: rig -> held session id
        self.where: dict[str, tuple[str, int]] = {}  # LuxOS: rig -> its API address
        self.digests: dict[str, _Digest] = {}  # Antminer web UI: rig -> its challenge
        self.snmp: _Snmp | None = None

    # -- what rigd holds before an order arrives -----------------------------------------

    async def prepare(self, commands: Sequence[Command]) -> list[str]:
        """Log on to every LuxOS rig and learn every Antminer's digest challenge, as
        rigd's polls have by the time an order comes; open the SNMP socket. Untimed.
        Returns the rigs that could not be prepared."""
        loop = asyncio.get_running_loop()
        if self.snmp is None and any(c.kind == "pdu" for c in commands):
            _, proto = await loop.create_datagram_endpoint(_Snmp, local_addr=("127.0.0.1", 0))
            self.snmp = proto
        sem = asyncio.Semaphore(256)
        failed: list[str] = []

        async def one(c: Command) -> None:
            async with sem:
                try:
                    if c.kind == "luxos" and c.rig not in self.sessions:
                        reply = _json(await wire.to_eof_reply(c.host, c.port, _cg("logon")))
                        sid = _first(reply, "SESSION").get("SessionID")
                        if not sid:  # another client holds it: borrow it, as rigd does
                            reply = _json(await wire.to_eof_reply(c.host, c.port, _cg("session")))
                            sid = _first(reply, "SESSION").get("SessionID")
                        if not isinstance(sid, str) or not sid:
                            raise wire.FloorError(f"logon: no SessionID in {reply}")
                        self.sessions[c.rig] = sid
                        self.where[c.rig] = (c.host, c.port)
                    elif c.kind == "antminer" and c.rig not in self.digests:
                        conn = await wire.HttpConnection.open(c.host, c.web_port)
                        try:
                            path = "/cgi-bin/get_miner_conf.cgi"
                            await conn.request(_http("GET", c.host, c.web_port, path))
                            challenge = conn.header(b"www-authenticate")
                        finally:
                            conn.close()
                        self.digests[c.rig] = _Digest(challenge, ANTMINER_USER, ANTMINER_PASSWORD)
                except Exception:  # counted: the caller says how many could not be readied
                    failed.append(c.rig)

        await asyncio.gather(*(one(c) for c in commands))
        return failed

    async def release(self) -> None:
        """Log off the LuxOS sessions (the firmware allows one at a time: the next
        client's logon would be refused for a minute) and close the SNMP socket."""
        sem = asyncio.Semaphore(256)

        async def logoff(host: str, port: int, sid: str) -> None:
            async with sem:
                with contextlib.suppress(Exception):
                    await wire.to_eof(host, port, _cg("logoff", sid))

        await asyncio.gather(*(logoff(h, p, sid) for h, p, sid in self.luxos_hosts()))
        self.sessions.clear()
        if self.snmp is not None and self.snmp.transport is not None:
            self.snmp.transport.close()
        self.snmp = None

    def luxos_hosts(self) -> list[tuple[str, int, str]]:
        return [(*self.where[r], sid) for r, sid in self.sessions.items()]

    # -- one command ---------------------------------------------------------------------

    async def send(self, c: Command, action: str) -> None:
        """Sleep (or wake) one rig; returns once the firmware acknowledged it. A failed
        exchange (a reset, a short reply, a timeout: a busy farm) is tried again after
        the backoff rigd's executor uses, as many times."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await _KINDS[c.kind](self, c, action == "sleep")
                return
            except (OSError, TimeoutError, ValueError, KeyError, wire.FloorError):
                if attempt == ATTEMPTS:
                    raise
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))

    async def _eof(self, c: Command, data: bytes) -> bytes:
        reply = await wire.to_eof_reply(c.host, c.port, data, WAIT_S)
        self.requests += 1
        self.received += len(reply)
        return reply

    async def _luxos(self, c: Command, sleep: bool) -> None:
        sid = self.sessions.get(c.rig)
        if sid is None:  # not logged on beforehand (a busy farm): as rigd would, now
            logon = _json(await self._eof(c, _cg("logon")))
            sid = _first(logon, "SESSION").get("SessionID")
            if not isinstance(sid, str) or not sid:
                raise wire.FloorError("logon: no SessionID")
            self.sessions[c.rig], self.where[c.rig] = sid, (c.host, c.port)
        reply = await self._eof(c, _cg("curtail", f"{sid},{'sleep' if sleep else 'wakeup'}"))
        if _refused(reply):  # the session lapsed: log on again at the next attempt
            self.sessions.pop(c.rig, None)
            raise wire.FloorError("curtail refused")

    async def _avalon(self, c: Command, sleep: bool) -> None:
        word = "softoff" if sleep else "softon"
        await self._eof(c, _cg("ascset", f"0,{word},1:{int(time.time())}"))

    async def _whatsminer(self, c: Command, sleep: bool) -> None:
        msg = _json(await self._eof(c, _cg("get_token"))).get("Msg")
        if not isinstance(msg, dict):
            raise wire.FloorError(f"get_token: no Msg in the reply ({msg!r})")
        token = V2Token.derive(WHATSMINER_V2_PASSWORD, str(msg["salt"]), str(msg["newsalt"]),
                               str(msg["time"]))  # fmt: skip
        params = {"respbefore": "true"} if sleep else {}
        plain = json.dumps({"cmd": "power_off" if sleep else "power_on", **params,
                            "token": token.sign}, separators=(",", ":"))  # fmt: skip
        envelope = {"enc": 1, "data": aes_ecb_encrypt_b64(token.aes_key, plain.encode())}
        await self._eof(c, json.dumps(envelope).encode())

    async def _v3(self, c: Command, request: dict[str, Any]) -> bytes:
        body = json.dumps(request, separators=(",", ":")).encode()
        reply = await wire.framed_reply(c.host, c.port, wire.frame(body), WAIT_S)
        self.requests += 1
        self.received += len(reply) + 4
        return reply

    async def _whatsminer_v3(self, c: Command, sleep: bool) -> None:
        got = _json(await self._v3(c, {"cmd": "get.device.info", "param": "salt"})).get("msg")
        salt = got.get("salt") if isinstance(got, dict) else None
        if not isinstance(salt, str):
            raise wire.FloorError("get.device.info salt: no salt")
        cmd, ts = "set.miner.service", int(time.time())
        await self._v3(c, {"cmd": cmd, "param": "stop" if sleep else "start", "ts": ts,
                           "account": WHATSMINER_V3_ACCOUNT,
                           "token": v3_token(cmd, WHATSMINER_V3_PASSWORD, salt, ts)})  # fmt: skip

    async def _http_on(self, conn: wire.HttpConnection, request: bytes,
                       wait_s: float = WAIT_S) -> bytes:  # fmt: skip
        await conn.request(request, wait_s)
        self.requests += 1
        self.received += len(conn.buf)
        return conn.body()

    async def _braiins(self, c: Command, sleep: bool) -> None:
        conn = await wire.HttpConnection.open(c.host, c.web_port)
        try:
            creds = json.dumps({"username": BRAIINS_USER, "password": BRAIINS_PASSWORD},
                               separators=(",", ":")).encode()  # fmt: skip
            json_type = (("Content-Type", "application/json"),)
            login = _json(await self._http_on(conn, _http(
                "POST", c.host, c.web_port, "/api/v1/auth/login", creds, json_type)))  # fmt: skip
            path = "/api/v1/actions/pause" if sleep else "/api/v1/actions/resume"
            auth = (("Authorization", str(login["token"])),)
            await self._http_on(conn, _http("PUT", c.host, c.web_port, path, b"", auth))
        finally:
            conn.close()

    async def _epic(self, c: Command, sleep: bool) -> None:
        conn = await wire.HttpConnection.open(c.host, c.port)
        try:
            param = {"param": "Stop" if sleep else "Autostart", "password": EPIC_PASSWORD}
            body = json.dumps(param, separators=(",", ":")).encode()
            await self._http_on(conn, _http("POST", c.host, c.port, "/miner", body,
                                            (("Content-Type", "application/json"),)))  # fmt: skip
        finally:
            conn.close()

    async def _vnish(self, c: Command, sleep: bool) -> None:
        conn = await wire.HttpConnection.open(c.host, c.web_port)
        try:
            json_type = ("Content-Type", "application/json")
            pw = json.dumps({"pw": VNISH_PASSWORD}, separators=(",", ":")).encode()
            got = _json(await self._http_on(conn, _http(
                "POST", c.host, c.web_port, "/api/v1/unlock", pw, (json_type,))))  # fmt: skip
            path = f"/api/v1/mining/{'stop' if sleep else 'start'}"
            auth = ("Authorization", f"Bearer {got['token']}")
            await self._http_on(conn, _http("POST", c.host, c.web_port, path, b"", (auth,)))
        finally:
            conn.close()

    async def _cgi(self, c: Command, method: str, cgi: str, body: bytes = b"",
                   wait_s: float = WAIT_S) -> bytes:  # fmt: skip
        uri = f"/cgi-bin/{cgi}"
        headers = [("Authorization", self.digests[c.rig].header(method, uri))]
        if body:
            headers += [("Content-Type", "text/plain;charset=UTF-8"),
                        ("X-Requested-With", "XMLHttpRequest")]  # fmt: skip
        conn = await wire.HttpConnection.open(c.host, c.web_port)
        try:
            return await self._http_on(
                conn, _http(method, c.host, c.web_port, uri, body, headers), wait_s
            )
        finally:
            conn.close()

    async def _antminer(self, c: Command, sleep: bool) -> None:
        conf = _json(await self._cgi(c, "GET", "get_miner_conf.cgi"))
        mode = ANTMINER_SLEEP if sleep else ANTMINER_NORMAL
        body = json.dumps(conf_write_body(conf, mode), separators=(",", ":")).encode()
        await self._cgi(c, "POST", "set_miner_conf.cgi", body, ANTMINER_WRITE_WAIT_S)
        await self._cgi(c, "GET", "get_miner_conf.cgi")

    async def _outlet(self, c: Command, sleep: bool) -> None:
        assert self.snmp is not None, "prepare() opens the SNMP socket"
        addr = (c.host, c.port)
        value = OUTLET_OFF if sleep else OUTLET_ON
        binds = snmp_wire.encode_set_binds([((*OUTLET_COMMAND, c.outlet), value)])
        self.received += await self.snmp.exchange(addr, snmp_wire.SET, "private", binds, WAIT_S)
        state = snmp_wire.encode_binds([(*OUTLET_STATE, c.outlet)])
        self.received += await self.snmp.exchange(addr, snmp_wire.GET, "public", state, WAIT_S)
        self.requests += 2


_KINDS: Final = {
    "luxos": CommandFloor._luxos,
    "avalon": CommandFloor._avalon,
    "whatsminer": CommandFloor._whatsminer,
    "whatsminer-v3": CommandFloor._whatsminer_v3,
    "braiins": CommandFloor._braiins,
    "epic": CommandFloor._epic,
    "vnish": CommandFloor._vnish,
    "antminer": CommandFloor._antminer,
    "pdu": CommandFloor._outlet,
}
KINDS: Final = tuple(_KINDS)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


async def curtail(
    commands: Sequence[Command], action: str = "sleep", floor: CommandFloor | None = None
) -> dict[str, Any]:
    """Send every command at once; when each was acknowledged (s from the first send),
    and this process's CPU over the burst. `floor` must have been `prepare`d."""
    floor = floor or CommandFloor()
    floor.requests = floor.received = 0  # this burst's
    gc.collect()
    acked: list[float] = []
    errors: dict[str, int] = {}
    cpu0, t0 = time.process_time(), time.perf_counter()

    async def one(c: Command) -> None:
        try:
            await floor.send(c, action)
            acked.append(time.perf_counter() - t0)
        except Exception as e:  # counted by kind: the figure says what failed
            key = f"{c.kind}: {type(e).__name__}"
            errors[key] = errors.get(key, 0) + 1

    await asyncio.gather(*(one(c) for c in commands))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {
        "action": action,
        "commands": len(commands),
        "acknowledged": len(acked),
        "errors": errors,
        "p50_s": round(_percentile(acked, 50), 4),
        "p99_s": round(_percentile(acked, 99), 4),
        "max_s": round(max(acked), 4) if acked else float("nan"),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_command": round(1000.0 * cpu / max(1, len(commands)), 4),
        "requests": floor.requests,
        "bytes_received": floor.received,
    }
