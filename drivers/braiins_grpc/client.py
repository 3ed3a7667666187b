"""A client of Braiins OS's public gRPC API (port 50051): login, bounded calls, typed errors.

One HTTP/2 connection (a grpclib `Channel`) per miner, opened on first use and kept; a
call that fails on the connection closes it so the next one dials again. The token comes
from `AuthenticationService/Login` in the response's initial metadata `authorization`
(and in `LoginResponse.token`); every other call carries it in its own metadata. A call
refused with UNAUTHENTICATED (the token expired after an hour idle, or the firmware
restarted) logs in once more and is tried again.

Errors map to the typed `DeviceError`s, as the REST client's do: a refused login is
`DeviceAuthError`; UNIMPLEMENTED is `UnsupportedOperation` (a release without the method);
INVALID_ARGUMENT and other statuses `CommandRejected`; UNAVAILABLE, a refused or reset
connection `DeviceUnreachable`; a call over `timeout` `DeviceTimeout`. Retries (with
backoff) cover only the last two; every call rigd makes is idempotent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import betterproto
import grpclib
import grpclib.client
import grpclib.const
import grpclib.exceptions
import h2.exceptions

from drivers.braiins_grpc.proto import bos
from drivers.braiins_grpc.proto.bos import v1
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    UnsupportedOperation,
)
from drivers.retry import check_timing, with_retries

DEFAULT_PORT: Final = 50051
LOGIN_METHOD: Final = "/braiins.bos.v1.AuthenticationService/Login"
TOKEN_IDLE_S: Final = 3540.0  # the firmware's token lives an hour after its last use

T = TypeVar("T")
Call = Callable[[Any], Awaitable[T]]


class BraiinsGrpcClient:
    """The gRPC API of one BOS miner. Use `call(stub_method_name, request)`."""

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        username: str = "root",
        password: str = "root",
        timeout: float = 3.0,
        retries: int = 1,
        device: str = "",
        backoff_s: float = 0.1,
    ) -> None:
        check_timing(timeout, retries)
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.timeout = timeout
        self.retries = retries
        self.device = device or f"{host}:{port}"
        self.backoff_s = backoff_s
        self.logins = 0  # successful logins, for tests and diagnostics
        self._channel: grpclib.client.Channel | None = None
        self._token: str | None = None
        self._token_used = 0.0
        self._login_lock = asyncio.Lock()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._token = None
        if channel is not None:
            channel.close()

    def _open(self) -> grpclib.client.Channel:
        if self._channel is None:
            self._channel = grpclib.client.Channel(self.host, self.port)
        return self._channel

    # -- calls -----------------------------------------------------------------

    async def api_version(self, *, operation: str = "api_version") -> tuple[int, int, int]:
        """The public API version (no login needed): 1.7.0 on BOS 25.07, 1.3.0 on 24.09."""

        async def once() -> bos.ApiVersion:
            stub = bos.ApiVersionServiceStub(self._open())
            return await self._guarded(
                stub.get_api_version(bos.ApiVersionRequest(), timeout=self.timeout), operation
            )

        reply = await self._retrying(once, operation)
        return int(reply.major), int(reply.minor), int(reply.patch)

    async def call(self, method: str, request: betterproto.Message, *, operation: str) -> Any:
        """`method` of the v1 stubs (e.g. "pause_mining") with `request`, logged in."""

        async def once() -> Any:
            token = await self._ensure_token(operation)
            try:
                return await self._invoke(method, request, token, operation)
            except DeviceAuthError:
                if self._token == token:
                    self._token = None  # expired or forgotten by a restart: once more
                token = await self._ensure_token(operation)
                return await self._invoke(method, request, token, operation)

        result = await self._retrying(once, operation)
        self._token_used = time.monotonic()
        return result

    async def _invoke(
        self, method: str, request: betterproto.Message, token: str, operation: str
    ) -> Any:
        stub = _stub_for(method, self._open())
        fn = getattr(stub, method)
        meta = {"authorization": token}
        return await self._guarded(fn(request, timeout=self.timeout, metadata=meta), operation)

    async def _retrying(self, once: Callable[[], Awaitable[T]], operation: str) -> T:
        return await with_retries(
            once,
            retries=self.retries,
            backoff_s=self.backoff_s,
            device=self.device,
            operation=operation,
        )

    async def _guarded(self, aw: Awaitable[T], operation: str) -> T:
        """Await one RPC, translating what can go wrong into `DeviceError`s."""
        try:
            async with asyncio.timeout(self.timeout * 2):  # a stalled connect as well
                return await aw
        except grpclib.GRPCError as exc:
            raise self._status_error(exc, operation) from exc
        except TimeoutError as exc:
            await self._drop()
            raise DeviceTimeout(
                f"no gRPC answer within {self.timeout:g} s", device=self.device, operation=operation
            ) from exc
        except (
            OSError,
            grpclib.exceptions.StreamTerminatedError,
            grpclib.exceptions.ProtocolError,
            h2.exceptions.ProtocolError,
        ) as exc:
            await self._drop()
            raise DeviceUnreachable(
                f"gRPC API unreachable: {exc}", device=self.device, operation=operation
            ) from exc

    def _status_error(self, exc: grpclib.GRPCError, operation: str) -> DeviceError:
        msg = f"gRPC {exc.status.name}: {exc.message or ''}".rstrip(": ")
        status = exc.status
        if status is grpclib.const.Status.UNAUTHENTICATED:
            return DeviceAuthError(msg, device=self.device, operation=operation)
        if status is grpclib.const.Status.UNIMPLEMENTED:
            return UnsupportedOperation(msg, device=self.device, operation=operation)
        if status is grpclib.const.Status.UNAVAILABLE:
            return DeviceUnreachable(msg, device=self.device, operation=operation)
        if status is grpclib.const.Status.DEADLINE_EXCEEDED:
            return DeviceTimeout(msg, device=self.device, operation=operation)
        return CommandRejected(msg, device=self.device, operation=operation)

    async def _drop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    # -- login -----------------------------------------------------------------

    async def _ensure_token(self, operation: str) -> str:
        async with self._login_lock:
            idle = time.monotonic() - self._token_used
            if self._token is None or idle > TOKEN_IDLE_S:
                self._token = await self._login(operation)
                self._token_used = time.monotonic()
            return self._token

    async def _login(self, operation: str) -> str:
        request = v1.LoginRequest(username=self.username, password=self.password)

        async def login() -> str:
            channel = self._open()
            async with channel.request(
                LOGIN_METHOD,
                grpclib.const.Cardinality.UNARY_UNARY,
                v1.LoginRequest,
                v1.LoginResponse,
                timeout=self.timeout,
            ) as stream:
                await stream.send_message(request, end=True)
                await stream.recv_initial_metadata()
                reply = await stream.recv_message()
                meta: Any = stream.initial_metadata or {}
                token = meta.get("authorization") or (reply.token if reply else "")
                return str(token or "")

        try:
            token = await self._guarded(login(), operation)
        except DeviceAuthError as exc:
            raise DeviceAuthError(
                f"Braiins OS refused the login of {self.username!r} (wrong password?): {exc}",
                device=self.device,
                operation=operation,
            ) from exc
        if not token:
            raise DeviceAuthError(
                "Braiins OS answered the login without a token",
                device=self.device,
                operation=operation,
            )
        self.logins += 1
        return token


_STUBS: Final = (
    v1.ActionsServiceStub,
    v1.PerformanceServiceStub,
    v1.MinerServiceStub,
    v1.ConfigurationServiceStub,
    v1.CoolingServiceStub,
    v1.PoolServiceStub,
)


def _stub_for(method: str, channel: grpclib.client.Channel) -> betterproto.ServiceStub:
    for cls in _STUBS:
        if hasattr(cls, method):
            return cls(channel)
    raise ValueError(f"no Braiins OS service has a method {method!r}")
