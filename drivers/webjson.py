"""JSON over HTTP, as the web-API drivers (ePIC, VNish) talk to their firmware.

One aiohttp session per rig, every exchange under a single deadline, bodies bounded, and
every failure one of the typed `DeviceError`s: a refused or timed-out connect is
`DeviceUnreachable`, a stalled reply `DeviceTimeout`, a body that is not JSON or is cut
short `MalformedReply`. What an HTTP status means differs per firmware, so `request`
returns the status with the decoded body and leaves the verdict to the driver (`expect`
raises the usual ones). Retries, with backoff, cover only timeouts and unreachable
hosts, and only when the caller says the request is safe to repeat.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, Final

import aiohttp

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
_SNIPPET: Final = 120


class HttpRejected(CommandRejected):
    """An HTTP error answer; keeps the status and body for callers."""

    def __init__(
        self, message: str, *, device: str = "", operation: str = "", status: int, body: str
    ) -> None:
        super().__init__(message, device=device, operation=operation)
        self.status = status
        self.body = body


class JsonHttpClient:
    """One rig's web API at http://host:port."""

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
    ) -> None:
        check_timing(timeout, retries)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.device = device or f"{host}:{port}"
        self.backoff_s = backoff_s
        self.max_body_bytes = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

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
            status, data = await self._send(method, path, body, headers, operation, wait_s)
            return status, self._decode(status, data, method, path, operation)

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

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(_mark_connected)
            trace.on_connection_reuseconn.append(_mark_connected)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                trace_configs=[trace],
                raise_for_status=False,
            )
        return self._session

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None,
        operation: str,
        wait_s: float | None,
    ) -> tuple[int, bytes]:
        where = {"device": self.device, "operation": operation}
        wait = self.timeout if wait_s is None else wait_s
        ctx = SimpleNamespace(connected=False)
        try:
            async with asyncio.timeout(wait):
                async with self._session_for().request(
                    method,
                    self.base_url + path,
                    json=body,
                    headers=headers or {},
                    allow_redirects=False,
                    trace_request_ctx=ctx,
                ) as resp:
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(65_536):
                        buf += chunk
                        if len(buf) > self.max_body_bytes:
                            raise MalformedReply(
                                f"reply exceeds {self.max_body_bytes} bytes", **where
                            )
                    return resp.status, bytes(buf)
        except TimeoutError as exc:
            if not ctx.connected:
                raise DeviceUnreachable(
                    f"connect to {self.base_url} timed out after {wait:g}s", **where
                ) from exc
            raise DeviceTimeout(f"no reply within {wait:g}s ({method} {path})", **where) from exc
        except aiohttp.ClientPayloadError as exc:
            raise MalformedReply(f"reply cut short ({method} {path}): {exc}", **where) from exc
        except aiohttp.ClientResponseError as exc:  # not an HTTP status line or headers
            raise MalformedReply(f"not an HTTP reply ({method} {path}): {exc}", **where) from exc
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected
            raise DeviceUnreachable(
                f"{self.base_url}: {str(exc) or type(exc).__name__}", **where
            ) from exc

    def _decode(self, status: int, data: bytes, method: str, path: str, operation: str) -> Any:
        text = data.decode("utf-8", "replace")
        if not text.strip():
            return None
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


async def _mark_connected(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object
) -> None:
    """Trace hook: the TCP connection exists, so a timeout from now on is a stalled reply."""
    request_ctx = getattr(ctx, "trace_request_ctx", None)
    if request_ctx is not None:
        request_ctx.connected = True
