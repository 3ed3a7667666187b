"""What every simulated rig's HTTP server shares (ePIC's API, VNish's web API): an aiohttp
application on its own socket, a dead host while the rig is down, and the faults.

The firmware-specific server adds its routes in `routes`; the rest is here once.
Faults (`set_fault`): "silent" holds requests without answering, "garbage" answers 200
with bytes that are not JSON, "error500" answers 500, "refuse" closes the listener (and
re-opens it on the same port when cleared).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final

import structlog
from aiohttp import web

from simulators.farm import Farm, SimPdu
from simulators.server import SILENT_HOLD_S, RigServer

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAULTS: Final = frozenset({"silent", "garbage", "error500", "refuse"})
_GARBAGE: Final = b"<html><body><h1>502 Bad Gateway</h1></body></html>\xff\xfe{"


def json_response(obj: Any, status: int = 200) -> web.Response:
    """Compact JSON, as the firmware's servers write it."""
    return web.json_response(obj, status=status, dumps=_compact)


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def text_response(status: int, text: str, content_type: str = "text/plain") -> web.Response:
    return web.Response(status=status, text=text, content_type=content_type)


class WebRigServer(RigServer):
    """One rig's HTTP server on `host:port` (0: an ephemeral port)."""

    faults: ClassVar[frozenset[str]] = FAULTS
    max_body: ClassVar[int] = 256 * 1024  # the largest request body accepted

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str,
        port: int,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host} is not a loopback address")
        super().__init__(farm, rig_id, host=host, outlet=outlet)
        self.port = port
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._closing = asyncio.Event()

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body)
        self.routes(app.router)
        self._closing = asyncio.Event()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        self._runner = runner
        try:
            await self._listen()
        except BaseException:
            await self.stop()
            raise

    def _listening(self) -> bool:
        return self._site is not None

    def _can_listen(self) -> bool:
        return self._runner is not None

    async def _listen(self) -> None:
        assert self._runner is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]  # keep an ephemeral port for "refuse" to re-open
        site = web.SockSite(self._runner, sock)
        await site.start()
        self._site = site

    async def _stop_listening(self) -> None:
        site, self._site = self._site, None
        if site is not None:
            await site.stop()

    async def stop(self) -> None:
        self._closing.set()
        runner, self._runner = self._runner, None
        self._site = None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if not self._api_up() or self.fault == "refuse":
            if request.transport is not None:
                request.transport.abort()  # a dead host: no answer at all
            raise web.HTTPServiceUnavailable()  # never reaches the (gone) client
        fault = self.fault
        if fault == "silent":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SILENT_HOLD_S):
                    await self._closing.wait()
            raise web.HTTPServiceUnavailable()
        if fault == "error500":
            return text_response(500, "Internal Server Error")
        if fault == "garbage":
            return web.Response(status=200, body=_GARBAGE, content_type="application/json")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:  # a bug in a handler must not look like a dead rig
            log.exception("web_simulator.handler_failed", rig=self.rig_id, path=request.path)
            return text_response(500, "Internal Server Error")
