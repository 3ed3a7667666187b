"""The floor's exchanges: the least a client can do to get each dialect's bytes.

Bare asyncio protocols on the loop rigd runs on (uvloop where installed), with no parsing
beyond what framing forces: read to EOF (or NUL) on 4028, a length prefix on Whatsminer
API v3, headers and Content-Length on HTTP/1.1 keep-alive, one datagram per SNMP request.
Each exchange returns the bytes received, so a caller can count them and a test can see
that a real answer came back.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast


class FloorError(RuntimeError):
    """An exchange of the floor client failed (closed early, timed out, refused)."""


class _ToEof(asyncio.Protocol):
    """Send once, collect to EOF or a NUL: the 4028 framing (cgminer, LuxOS, btminer v2)."""

    def __init__(self, data: bytes, done: asyncio.Future[int], keep: bool = False) -> None:
        self.data = data
        self.done = done
        self.got = 0
        self.chunks: list[bytes] | None = [] if keep else None  # the reply, when asked for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.data)

    def data_received(self, chunk: bytes) -> None:
        self.got += len(chunk)
        if self.chunks is not None:
            self.chunks.append(chunk)
        if chunk.endswith(b"\x00") and not self.done.done():
            self.done.set_result(self.got)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.got)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.got)


class _Framed(asyncio.Protocol):
    """Send one length-prefixed frame, read one back (Whatsminer API v3 on 4433)."""

    def __init__(self, data: bytes, done: asyncio.Future[int]) -> None:
        self.data = data
        self.done = done
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.data)

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        while len(self.buf) >= 4:
            (length,) = struct.unpack_from("<I", self.buf)
            if length == 0:  # heartbeat
                self.buf = self.buf[4:]
                continue
            if len(self.buf) >= 4 + length and not self.done.done():
                self.done.set_result(len(self.buf))
            return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(FloorError("closed before a whole frame"))


async def _one_connection(host: str, port: int, proto: asyncio.Protocol,
                          done: asyncio.Future[int], wait_s: float) -> int:  # fmt: skip
    loop = asyncio.get_running_loop()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(wait_s):
            transport, _ = await loop.create_connection(lambda: proto, host, port)
            return await done
    finally:
        if transport is not None:
            transport.close()


async def to_eof(host: str, port: int, data: bytes, wait_s: float = 5.0) -> int:
    """Connect, send `data`, read to EOF: bytes received."""
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    return await _one_connection(host, port, _ToEof(data, done), done, wait_s)


async def to_eof_reply(host: str, port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """`to_eof`, keeping the reply: for the exchanges whose answer the next request needs
    (a LuxOS session id, a Whatsminer token's salts)."""
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proto = _ToEof(data, done, keep=True)
    await _one_connection(host, port, proto, done, wait_s)
    return b"".join(proto.chunks or ()).rstrip(b"\x00")


async def framed_reply(host: str, port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """`framed`, keeping the reply's body (a Whatsminer API v3 salt)."""
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proto = _Framed(data, done)
    await _one_connection(host, port, proto, done, wait_s)
    (length,) = struct.unpack_from("<I", proto.buf)
    return proto.buf[4 : 4 + length]


async def framed(host: str, port: int, data: bytes, wait_s: float = 5.0) -> int:
    """Connect, send one length-prefixed frame (`data` already carries the prefix), read one."""
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    return await _one_connection(host, port, _Framed(data, done), done, wait_s)


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


class HttpConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: a request, then its headers and Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buf = b""
        self.need = -1
        self.done: asyncio.Future[int] | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    async def request(self, data: bytes, wait_s: float = 5.0) -> int:
        if self.transport is None or self.transport.is_closing():
            raise FloorError("connection closed")
        self.buf, self.need = b"", -1
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        async with asyncio.timeout(wait_s):
            return await self.done

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            if at < 0:
                raise FloorError("reply without Content-Length")
            stop = head.find(b"\r\n", at)
            self.need = end + 4 + int(head[at + 15 : stop if stop >= 0 else None])
        if len(self.buf) >= self.need and self.done is not None and not self.done.done():
            self.done.set_result(len(self.buf))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(FloorError("connection lost"))

    def body(self) -> bytes:
        """The last reply's body (after `request` returned)."""
        return self.buf[self.buf.find(b"\r\n\r\n") + 4 :]

    def header(self, name: bytes) -> bytes:
        """One header of the last reply ("" when absent), for a digest challenge."""
        head = self.buf[: self.buf.find(b"\r\n\r\n")]
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return b""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Datagrams(asyncio.DatagramProtocol):
    """One UDP socket for every SNMP agent, as rigd's one engine: replies matched by the
    address they come from, which is all the framing a datagram needs."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[tuple[str, int], asyncio.Future[int]] = {}

    @classmethod
    async def open(cls) -> Datagrams:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        fut = self.waiting.pop(addr, None)
        if fut is not None and not fut.done():
            fut.set_result(len(data))

    async def exchange(self, addr: tuple[str, int], data: bytes, wait_s: float = 5.0) -> int:
        assert self.transport is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[addr] = fut
        self.transport.sendto(data, addr)
        async with asyncio.timeout(wait_s):
            return await fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
