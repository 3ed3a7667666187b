"""SNMP v2c reads over one UDP socket per event loop: the transport of `drivers.snmp_wire`.

Every PDU a daemon polls shares the socket, as pysnmp's engine shares its own; replies are
matched to their request by request-id and by the address they came from. A request is
sent again after each `timeout` until `retries` are spent (an agent that dropped it, or a
wrong community: agents drop those silently), then it is a DeviceTimeout.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import cast

from drivers import snmp_wire
from drivers.errors import DeviceTimeout, DeviceUnreachable, MalformedReply

Addr = tuple[str, int]


class _Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[int, tuple[Addr, asyncio.Future[snmp_wire.Reply | None]]] = {}
        self.ids = itertools.count()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            reply = snmp_wire.decode_reply(data)
        except snmp_wire.BerError:
            return  # not an answer to anyone: garbage is dropped, as an engine drops it
        entry = self.waiting.get(reply.request_id)
        if entry is None or entry[0] != (addr[0], addr[1]) or entry[1].done():
            return
        entry[1].set_result(reply)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error (port unreachable) names no request: the request times out."""

    def connection_lost(self, exc: Exception | None) -> None:
        for _, fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("SNMP socket closed"))
        self.waiting.clear()


_SOCKETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Socket] = (
    weakref.WeakKeyDictionary()
)
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def _socket() -> _Socket:
    loop = asyncio.get_running_loop()
    sock = _SOCKETS.get(loop)
    if sock is not None and sock.transport is not None and not sock.transport.is_closing():
        return sock
    lock = _LOCKS.setdefault(loop, asyncio.Lock())
    async with lock:
        sock = _SOCKETS.get(loop)
        if sock is None or sock.transport is None or sock.transport.is_closing():
            _, sock = await loop.create_datagram_endpoint(_Socket, family=2)  # AF_INET
            _SOCKETS[loop] = sock
        return sock


def close_socket() -> None:
    """Close the running loop's socket; requests in flight fail, a later one opens anew."""
    sock = _SOCKETS.pop(asyncio.get_running_loop(), None)
    if sock is not None and sock.transport is not None:
        sock.transport.close()


def _expire(fut: asyncio.Future[snmp_wire.Reply | None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def exchange(
    addr: Addr,
    pdu_type: int,
    community: str,
    binds: bytes,
    *,
    wait_s: float,
    retries: int,
    device: str,
    operation: str,
    non_repeaters: int = 0,
    max_repetitions: int = 0,
) -> snmp_wire.Reply:
    """One GET or GETBULK of `binds` (`snmp_wire.encode_binds`) and its Response-PDU
    (error status left to the caller). A timer per attempt rather than wait_for: this runs
    for every PDU every cycle, and a timer handle is the cheapest timeout asyncio has."""
    loop = asyncio.get_running_loop()
    sock = _SOCKETS.get(loop)  # the usual case, without a coroutine to find it
    if sock is None or sock.transport is None or sock.transport.is_closing():
        sock = await _socket()
    span = snmp_wire.REQUEST_ID_MAX - snmp_wire.REQUEST_ID_MIN + 1
    request_id = snmp_wire.REQUEST_ID_MIN + next(sock.ids) % span
    head, tail = snmp_wire.request_template(
        pdu_type, community, binds, non_repeaters, max_repetitions
    )
    message = head + request_id.to_bytes(4, "big") + tail
    where = {"device": device, "operation": operation}
    try:
        for _ in range(retries + 1):
            if sock.transport is None or sock.transport.is_closing():
                raise DeviceUnreachable("SNMP socket closed", **where)
            fut: asyncio.Future[snmp_wire.Reply | None] = loop.create_future()
            sock.waiting[request_id] = (addr, fut)
            try:
                sock.transport.sendto(message, addr)
            except OSError as exc:
                raise DeviceUnreachable(
                    f"cannot send to {addr[0]}:{addr[1]}: {exc}", **where
                ) from exc
            timer = loop.call_later(wait_s, _expire, fut)
            try:
                reply = await fut
            except ConnectionError as exc:
                raise DeviceUnreachable(str(exc), **where) from exc
            finally:
                timer.cancel()
            if reply is None:
                continue
            if reply.community != community.encode():
                raise MalformedReply("reply for another community", **where)
            return reply
    finally:
        sock.waiting.pop(request_id, None)
    raise DeviceTimeout(
        f"no SNMP answer from {addr[0]}:{addr[1]} within {wait_s:g} s x {retries + 1} tries",
        **where,
    )
