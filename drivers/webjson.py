"""JSON over HTTP/1.1, as the web-API drivers (Antminer web UI, Braiins REST, ePIC, VNish)
talk to their firmware: one small keep-alive client, written once for all four.

Why not aiohttp: a steady poll is one GET of a few KiB, and aiohttp's per-request layers
(URL objects, request/response objects, signals, stream readers) cost several times the
exchange itself (bench.floors: ePIC 4.3x, VNish 3.9-5.9x the floor). Here a request is
pre-formatted bytes written to a kept-alive asyncio connection, and the reply is parsed by
`httptools` (llhttp, the C parser under uvicorn): status, headers, Content-Length or
chunked bodies, keep-alive, all in C.

What it keeps of the old client: every exchange under one deadline, bodies bounded
(a Content-Length over the limit is refused before its body is read), and every failure
one of the typed `DeviceError`s: a refused or timed-out connect is `DeviceUnreachable`, a
stalled reply `DeviceTimeout`, a reply that is not HTTP, is cut short or is not JSON
`MalformedReply`. What an HTTP status means differs per firmware, so `request` returns the
status with the decoded body and leaves the verdict to the driver (`expect` raises the
usual ones). Retries, with backoff, cover only timeouts and unreachable hosts, and only
when the caller says the request is safe to repeat.

Connections: kept alive per rig (a small pool, so concurrent calls on one rig do not wait
for each other). Real firmware closes idle keep-alive connections; a connection found
closed is dropped before use, and a GET whose reused connection turns out to be closed
before any byte of the reply came is sent once more on a fresh one (a read is safe to
repeat; a command never is, so a POST or PUT fails instead). Digest auth (`DigestAuth`,
RFC 7616, qop=auth) reuses the server's nonce with a counted `nc`, so a steady call is one
request, not a challenge and a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import ssl
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import httptools

from drivers import jsonwire
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
    snippet,
)
from drivers.retry import check_timing, with_retries

MAX_BODY_BYTES: Final = 1 << 20  # a summary is a few KiB
MAX_IDLE: Final = 2  # kept-alive connections per rig; more only while calls overlap
# An idle connection is closed after this (aiohttp's keepalive_timeout): longer than a
# poll interval, so a rig polled every 10 s keeps its connection, while one called every few
# minutes (a stock Antminer's mode) holds no socket, here or in the device, in between.
IDLE_CLOSE_S: Final = 15.0
_SNIPPET: Final = 120
_JSON_HEADERS: Final = b"Content-Type: application/json\r\n"
_SAFE_TO_RESEND: Final = frozenset({"GET"})  # reads only: never repeat a command
_MAX_HEADS: Final = 32  # request heads kept encoded per client (a driver uses a handful)


class HttpRejected(CommandRejected):
    """An HTTP error answer; keeps the status and body for callers."""

    def __init__(
        self, message: str, *, device: str = "", operation: str = "", status: int, body: str
    ) -> None:
        super().__init__(message, device=device, operation=operation)
        self.status = status
        self.body = body


class Reply(NamedTuple):
    """One HTTP reply: status, raw body, and its headers (names lower-case, last wins)."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


# -- one connection -----------------------------------------------------------------------


class _Closed(Exception):
    """The connection ended before the reply was whole; `started`: some of it had come;
    `by_us`: `close()` ended it (never a reason to send again)."""

    def __init__(self, started: bool, why: str, *, by_us: bool = False) -> None:
        super().__init__(why)
        self.started = started
        self.by_us = by_us


class _TooBig(Exception):
    pass


class _BadHttp(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: one request at a time, its reply parsed in C.

    httptools calls the `on_*` methods from `feed_data`; they only collect, and the
    verdict (a body too large) is raised after `feed_data` returns."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.framed = False  # Content-Length or chunked: the reply ends without EOF
        self.headers_done = False
        self.started = False
        self.complete = False
        self.too_big = False
        self.keep_alive = False
        self.closed = False
        self.requests = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # loop time it last went idle

    # -- asyncio ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.abort()  # bytes nobody asked for: the connection is out of step
            return
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(_TooBig() if self.too_big else _BadHttp(str(exc) or type(exc).__name__))
            return
        if self.too_big:
            self._fail(_TooBig())
        elif self.complete:
            self.waiter = None
            waiter.set_result(
                Reply(self.parser.get_status_code(), b"".join(self.body), self.headers)
            )

    def eof_received(self) -> bool:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.headers_done and not self.framed:  # HTTP/1.0 style: the body ends at EOF
                self.waiter = None
                status = self.parser.get_status_code()
                waiter.set_result(Reply(status, b"".join(self.body), self.headers))
                self.closed = True
            else:
                self._fail(_Closed(self.started, "the device closed the connection"))
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = str(exc) if exc else "the device closed the connection"
        self._fail(_Closed(self.started, why or type(exc).__name__))

    # -- httptools callbacks ---------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key == "www-authenticate" and self.headers.get(key, "")[:6].lower() == "digest":
            return  # several schemes offered: keep the one we answer
        self.headers[key] = value.decode("latin-1")
        if key == "content-length":
            self.framed = True
            if value.strip().isdigit() and int(value) > self.max_body:
                self.too_big = True
        elif key == "transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self.too_big = True
        elif not self.too_big:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:  # "100 Continue": the reply follows
            self.headers, self.body, self.size = {}, [], 0
            self.framed = self.headers_done = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # reset once feed_data returns

    # -- the client's side -----------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.headers, self.body, self.size = {}, [], 0
        self.framed = self.started = self.complete = self.too_big = False
        self.headers_done = self.keep_alive = False
        self.requests += 1
        self.transport.write(data)
        return self.waiter

    def expire(self) -> None:
        """The deadline passed: the reply, if it ever comes, cannot be matched any more."""
        self._fail(TimeoutError())

    def reusable(self) -> bool:
        return self.usable and self.keep_alive

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


# -- digest auth ----------------------------------------------------------------------------

_PARAM_RE: Final = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_UNQUOTABLE: Final = re.compile(r'["\\\x00-\x1f\x7f]')
_HASHES: Final = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Digest realm="x", nonce=y` -> ("digest", {"realm": "x", "nonce": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM_RE.finditer(rest)
    }
    return scheme.lower(), params


class DigestAuth:
    """HTTP digest credentials for one server (RFC 7616: MD5 or SHA-256, -sess, qop=auth).

    The server's nonce is kept and reused with a counted `nc`, so after the first
    challenge every request carries its answer and is one round trip; a 401 with a new
    (or stale) nonce is answered once more with it."""

    def __init__(self, username: str, password: str) -> None:
        if ":" in username:
            raise ValueError("a digest username cannot contain ':'")
        self.username = username
        self._password = password
        self.realm = ""
        self._nonce = ""
        self._opaque: str | None = None
        self._qop = ""
        self._algorithm = "MD5"
        self._ha1 = ""
        self._nc = 0

    @property
    def ready(self) -> bool:
        return bool(self._nonce)

    def accept(self, challenge: str) -> str | None:
        """Take a `WWW-Authenticate` challenge: None when it can be answered, else why not."""
        scheme, params = parse_challenge(challenge)
        if scheme != "digest":
            return f"the device asks for {scheme or 'no'} auth, not digest"
        nonce = params.get("nonce", "")
        algorithm = params.get("algorithm", "MD5").upper()
        base = algorithm.removesuffix("-SESS")
        qops = [q.strip() for q in params.get("qop", "").split(",") if q.strip()]
        if not nonce or base not in _HASHES:
            return f"unsupported digest challenge (algorithm {algorithm}, nonce {bool(nonce)})"
        if qops and "auth" not in qops:
            return f"unsupported digest qop {params['qop']!r} (only auth is)"
        for key in ("realm", "nonce", "opaque"):
            if _UNQUOTABLE.search(params.get(key, "")):
                return f"the challenge's {key} cannot be quoted back"
        self.realm = params.get("realm", "")
        self._nonce = nonce
        self._opaque = params.get("opaque")
        self._qop = "auth" if qops else ""
        self._algorithm = algorithm
        self._nc = 0
        self._ha1 = self._hash(f"{self.username}:{self.realm}:{self._password}")
        return None

    def forget(self) -> None:
        self._nonce = ""

    def _hash(self, text: str) -> str:
        return _HASHES[self._algorithm.removesuffix("-SESS")](text.encode("utf-8")).hexdigest()

    def header(self, method: str, uri: str) -> str:
        """The `Authorization` value for one request (call only when `ready`)."""
        self._nc += 1
        nc = f"{self._nc:08x}"
        cnonce = os.urandom(8).hex()
        ha1 = self._ha1
        if self._algorithm.endswith("-SESS"):
            ha1 = self._hash(f"{ha1}:{self._nonce}:{cnonce}")
        ha2 = self._hash(f"{method}:{uri}")
        if self._qop:
            response = self._hash(f"{ha1}:{self._nonce}:{nc}:{cnonce}:{self._qop}:{ha2}")
        else:  # RFC 2069: no qop, no counts
            response = self._hash(f"{ha1}:{self._nonce}:{ha2}")
        parts = [
            f'username="{self.username}"',
            f'realm="{self.realm}"',
            f'nonce="{self._nonce}"',
            f'uri="{uri}"',
            f"algorithm={self._algorithm}",
            f'response="{response}"',
        ]
        if self._opaque is not None:
            parts.append(f'opaque="{self._opaque}"')
        if self._qop:
            parts += [f"qop={self._qop}", f"nc={nc}", f'cnonce="{cnonce}"']
        return "Digest " + ", ".join(parts)


# -- the client -------------------------------------------------------------------------------


class JsonHttpClient:
    """One rig's web API at http(s)://host:port."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 3.0,
        retries: int = 1,
        device: str = "",
        backoff_s: float = 0.1,
        max_body_bytes: int = MAX_BODY_BYTES,
        connect_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
        auth: DigestAuth | None = None,
    ) -> None:
        check_timing(timeout, retries)
        if connect_timeout is not None and not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.device = device or f"{host}:{port}"
        self.backoff_s = backoff_s
        self.max_body_bytes = max_body_bytes
        self.tls = tls
        self.auth = auth
        self.connections = 0  # connections opened, for tests and diagnostics
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._heads: dict[tuple[str, str], bytes] = {}  # (method, path) -> head, no body
        hostport = f"[{host}]" if ":" in host else host
        _check_header("Host", hostport)
        self._host_line = f"Host: {hostport}:{port}\r\n".encode("latin-1")

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _close_idle(self, conn: _Connection) -> None:
        """`IDLE_CLOSE_S` passed since the timer was set: close `conn` if it has stayed idle
        that long. The timer is armed once and re-armed from here, not on every request
        (a steady poll reuses its connection every cycle, and a timer set and cancelled
        per request costs more than the check)."""
        conn.idle_timer = None
        if conn not in self._idle:
            return  # in use: armed again when it goes back idle
        loop = asyncio.get_running_loop()
        due = conn.idle_since + IDLE_CLOSE_S
        if loop.time() < due:  # used since: wait out its own idle time
            conn.idle_timer = loop.call_at(due, self._close_idle, conn)
            return
        if conn in self._idle:
            self._idle.remove(conn)
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()

    async def close(self) -> None:
        """Close every connection (in use ones too: their callers get `DeviceUnreachable`)."""
        conns = [*self._idle, *self._busy]
        self._idle.clear()
        for conn in conns:
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.transport is not None:
                conn.transport.close()
            conn.closed = True
            conn._fail(_Closed(False, "the client was closed", by_us=True))

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        operation: str,
        repeatable: bool = True,
        wait_s: float | None = None,
    ) -> tuple[int, Any]:
        """(HTTP status, the decoded JSON body or None when empty) of one request.

        A body that is not JSON is a `MalformedReply` when the status is 2xx, and is
        returned as text otherwise (error pages are often plain text)."""

        async def once() -> tuple[int, Any]:
            status, data = await self.send(
                method, path, body=body, headers=headers, operation=operation, wait_s=wait_s
            )
            return status, self.decode(status, data, method, path, operation)

        if not repeatable:
            return await once()
        return await with_retries(
            once,
            retries=self.retries,
            backoff_s=self.backoff_s,
            device=self.device,
            operation=operation,
        )

    def expect(self, status: int, reply: Any, method: str, path: str, operation: str) -> Any:
        """`reply` if the status is 2xx; else the typed error the status stands for."""
        where = {"device": self.device, "operation": operation}
        if 200 <= status < 300:
            return reply
        text = reply if isinstance(reply, str) else json.dumps(reply)
        if status == 404:
            raise UnsupportedOperation(
                f"{method} {path} is not offered by this firmware (HTTP 404)", **where
            )
        if status in (401, 403):
            raise DeviceAuthError(
                f"{method} {path} refused the credentials (HTTP {status}): "
                f"{snippet(text, _SNIPPET)}",
                **where,
            )
        kind = "firmware error" if status >= 500 else "refused"
        raise HttpRejected(
            f"{method} {path} {kind} (HTTP {status}: {snippet(text, _SNIPPET)})",
            status=status,
            body=text,
            **where,
        )

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        operation: str,
        wait_s: float | None = None,
    ) -> tuple[int, bytes]:
        """One exchange, no retries: (HTTP status, the raw body). For clients that judge
        statuses and bodies their own way (the Braiins REST login)."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        reply = await self.exchange(
            method, path, data=data, headers=headers, operation=operation, wait_s=wait_s
        )
        return reply.status, reply.body

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        operation: str,
        wait_s: float | None = None,
    ) -> Reply:
        """One request with a raw body, no retries (beyond a digest challenge answered and
        a GET resent once when its kept-alive connection was found closed)."""
        loop = asyncio.get_running_loop()
        wait = self.timeout if wait_s is None else wait_s
        deadline = loop.time() + wait
        if data is None and not headers:  # a plain GET, as every poll sends: kept encoded
            head = self._heads.get((method, path))
            if head is None:
                head = self._heads[(method, path)] = self._head(method, path, None, "", None)
                if len(self._heads) > _MAX_HEADS:
                    self._heads.clear()
        else:
            head = self._head(method, path, data, content_type, headers)
        auth = self.auth
        authorization = auth.header(method, path) if auth is not None and auth.ready else None
        reply = await self._one(method, path, head, data, authorization, wait, deadline, operation)
        if reply.status == 401 and auth is not None:
            challenge = reply.header("www-authenticate")
            if not challenge:
                return reply
            why = auth.accept(challenge)
            if why is not None:
                raise DeviceAuthError(
                    f"cannot answer the auth challenge of {method} {path}: {why}",
                    device=self.device,
                    operation=operation,
                )
            authorization = auth.header(method, path)
            reply = await self._one(
                method, path, head, data, authorization, wait, deadline, operation
            )
        return reply

    def _head(
        self,
        method: str,
        path: str,
        data: bytes | None,
        content_type: str,
        headers: Mapping[str, str] | None,
    ) -> bytes:
        parts = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), self._host_line]
        if headers:
            for name, value in headers.items():
                _check_header(name, value)
                parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if data is not None:
            if content_type == "application/json":
                parts.append(_JSON_HEADERS)
            else:
                _check_header("Content-Type", content_type)
                parts.append(f"Content-Type: {content_type}\r\n".encode("latin-1"))
            parts.append(b"Content-Length: %d\r\n" % len(data))
        elif method in ("POST", "PUT", "PATCH"):
            parts.append(b"Content-Length: 0\r\n")
        return b"".join(parts)

    async def _one(
        self,
        method: str,
        path: str,
        head: bytes,
        data: bytes | None,
        authorization: str | None,
        wait: float,
        deadline: float,
        operation: str,
    ) -> Reply:
        """One request on a kept-alive connection (resent once, GETs only, when that
        connection turns out to have been closed by the device)."""
        payload = head
        if authorization is not None:
            payload += f"Authorization: {authorization}\r\n".encode("latin-1")
        payload += b"\r\n" if data is None else b"\r\n" + data
        where = {"device": self.device, "operation": operation}
        loop = asyncio.get_running_loop()
        safe = method in _SAFE_TO_RESEND
        for attempt in (0, 1):
            # A command goes on a fresh connection: on a kept-alive one the device may have
            # closed, it could fail for nothing, and it must not be sent twice.
            conn = await self._acquire(deadline, where, reuse=safe and attempt == 0)
            reused = conn.requests > 0
            waiter = conn.send(payload)
            timer = loop.call_at(deadline, conn.expire)
            self._busy.add(conn)
            try:
                reply = await waiter
            except TimeoutError as exc:
                raise DeviceTimeout(
                    f"no reply within {wait:g}s ({method} {path})", **where
                ) from exc
            except _Closed as exc:
                if not (exc.started or exc.by_us) and reused and attempt == 0 and safe:
                    continue  # the device had closed the idle connection: once more, fresh
                if exc.started:
                    raise MalformedReply(
                        f"reply cut short ({method} {path}): {exc}", **where
                    ) from exc
                raise DeviceUnreachable(
                    f"{self.base_url}: connection closed without a reply ({method} {path}): {exc}",
                    **where,
                ) from exc
            except _TooBig as exc:
                raise MalformedReply(f"reply exceeds {self.max_body_bytes} bytes", **where) from exc
            except _BadHttp as exc:
                raise MalformedReply(
                    f"not an HTTP reply ({method} {path}): {exc}", **where
                ) from exc
            finally:
                timer.cancel()
                self._busy.discard(conn)
                if conn.waiter is not None:  # cancelled while waiting: out of step for good
                    conn.waiter = None
                    conn.abort()
            if conn.reusable() and len(self._idle) < MAX_IDLE:
                conn.idle_since = loop.time()
                if conn.idle_timer is None:
                    conn.idle_timer = loop.call_at(
                        conn.idle_since + IDLE_CLOSE_S, self._close_idle, conn
                    )
                self._idle.append(conn)
            else:
                if conn.idle_timer is not None:
                    conn.idle_timer.cancel()
                    conn.idle_timer = None
                if conn.transport is not None:
                    conn.closed = True
                    conn.transport.close()
            return reply
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _acquire(self, deadline: float, where: dict[str, str], *, reuse: bool) -> _Connection:
        while reuse and self._idle:
            conn = self._idle.pop()  # its idle timer stays: `_close_idle` skips it in use
            if conn.usable:
                return conn
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
        loop = asyncio.get_running_loop()
        limit = deadline - loop.time()
        if self.connect_timeout is not None:
            limit = min(limit, self.connect_timeout)
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_body_bytes),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except TimeoutError as exc:
            raise DeviceUnreachable(
                f"connect to {self.base_url} timed out after {limit:g}s", **where
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise DeviceUnreachable(f"{self.base_url}: {reason}", **where) from exc
        self.connections += 1
        return conn

    def _decode(self, status: int, data: bytes, method: str, path: str, operation: str) -> Any:
        """The name callers knew before `decode` was public."""
        return self.decode(status, data, method, path, operation)

    def decode(self, status: int, data: bytes, method: str, path: str, operation: str) -> Any:
        """The JSON of a body (None when empty); a 2xx that is not JSON is malformed, an
        error page that is not JSON is returned as text."""
        if not data.strip():
            return None
        try:
            return jsonwire.loads(data)
        except (ValueError, RecursionError):
            pass  # not UTF-8, or not JSON: an error page may still be text, bad bytes replaced
        text = data.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            if not 200 <= status < 300:
                return text
            raise MalformedReply(
                f"{method} {path} answered non-JSON: {snippet(text, _SNIPPET)}",
                device=self.device,
                operation=operation,
            ) from exc


def _check_header(name: str, value: str) -> None:
    """No CR or LF in a header: a token or password there must not inject others."""
    if any(c in name or c in value for c in "\r\n\0") or ":" in name:
        raise ValueError(f"invalid HTTP header {name!r}")


__all__ = [
    "MAX_BODY_BYTES",
    "DigestAuth",
    "HttpRejected",
    "JsonHttpClient",
    "Reply",
    "parse_challenge",
]
