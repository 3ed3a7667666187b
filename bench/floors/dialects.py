"""One floor client per dialect: the exchanges rigd's driver makes in one steady poll.

What a steady poll is comes from reading each driver's `read` (the first poll, which
learns identity, profiles and the PDU's outlet names, is not steady):

- 4028, read to EOF: LuxOS `summary+stats+power+config+atm`, stock Antminer
  `summary+stats`, Braiins `summary+devs+temps+fans+tunerstatus`, Avalon
  `summary+estats`, Whatsminer v2 `summary+devs` and btminer's plain `status` (API v2
  reads need no token: only writes are encrypted);
- Whatsminer v3 on 4433: three length-prefixed frames, summary, edevs and the miner part
  of get.device.info, one connection each;
- HTTP/1.1 on a kept-alive connection: ePIC `GET /summary` on 4028, VNish
  `GET /api/v1/summary` on 80;
- SNMP v2c to a PDU: the GET of device power, energy and every outlet's state and power
  (`drivers.apc_snmp.steady_oids`), pre-encoded, one datagram each way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

from bench.floors import wire
from drivers import snmp_wire
from drivers.apc_snmp import steady_oids

Target = tuple[str, int]

PDU_OUTLETS: Final = 24  # the benchmark's PDUs: 24-outlet switched units


def _cg(*cmds: str) -> bytes:
    return json.dumps({"command": "+".join(cmds)}, separators=(",", ":")).encode()


def _v3(cmd: str, param: str) -> bytes:
    return wire.frame(json.dumps({"cmd": cmd, "param": param}, separators=(",", ":")).encode())


class FloorClient:
    """Counts what it sends and receives; `poll(i)` is one steady poll of target i."""

    def __init__(self) -> None:
        self.targets: list[Target] = []
        self.requests = 0
        self.received = 0

    async def open(self, targets: list[Target]) -> None:
        self.targets = list(targets)

    async def poll(self, i: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class Port4028(FloorClient):
    """One connection per request, read to EOF (the CGMiner API framing)."""

    def __init__(self, *requests: bytes) -> None:
        super().__init__()
        self.payloads = requests

    async def poll(self, i: int) -> None:
        host, port = self.targets[i]
        for data in self.payloads:
            got = await wire.to_eof(host, port, data)
            self.received += got
            self.requests += 1


class WhatsminerV3(FloorClient):
    PAYLOADS: Final = (
        _v3("get.miner.status", "summary"),
        _v3("get.miner.status", "edevs"),
        _v3("get.device.info", "miner"),
    )

    async def poll(self, i: int) -> None:
        host, port = self.targets[i]
        for data in self.PAYLOADS:  # concurrently in rigd: the CPU is the same
            got = await wire.framed(host, port, data)
            self.received += got
            self.requests += 1


class KeptAliveGet(FloorClient):
    """GET `path` on a connection opened once per target, as aiohttp's pool keeps it."""

    def __init__(self, path: str, port: int | None) -> None:
        super().__init__()
        self.path = path
        self.port = port  # None: the target's own port
        self.conns: dict[int, wire.HttpConnection] = {}
        self.requests_bytes: list[bytes] = []

    async def open(self, targets: list[Target]) -> None:
        await super().open(targets)
        for host, port in targets:
            p = port if self.port is None else self.port
            self.requests_bytes.append(
                f"GET {self.path} HTTP/1.1\r\nHost: {host}:{p}\r\n\r\n".encode()
            )

    async def poll(self, i: int) -> None:
        conn = self.conns.get(i)
        if conn is None or conn.transport is None or conn.transport.is_closing():
            host, port = self.targets[i]
            conn = self.conns[i] = await wire.HttpConnection.open(
                host, port if self.port is None else self.port
            )
        got = await conn.request(self.requests_bytes[i])
        self.received += got
        self.requests += 1

    async def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


class Snmp(FloorClient):
    """The steady PDU poll: one pre-encoded v2c GET per PDU, over one shared socket."""

    def __init__(self, community: str = "public", outlets: int = PDU_OUTLETS) -> None:
        super().__init__()
        oids = steady_oids(range(1, outlets + 1))
        self.payload = snmp_wire.encode_request(snmp_wire.GET, 1, community, oids)
        self.sock: wire.Datagrams | None = None

    async def open(self, targets: list[Target]) -> None:
        await super().open(targets)
        self.sock = await wire.Datagrams.open()

    async def poll(self, i: int) -> None:
        assert self.sock is not None
        got = await self.sock.exchange(self.targets[i], self.payload)
        self.received += got
        self.requests += 1

    async def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


DIALECTS: Final[dict[str, Callable[[], FloorClient]]] = {
    "luxos": lambda: Port4028(_cg("summary", "stats", "power", "config", "atm")),
    "antminer": lambda: Port4028(_cg("summary", "stats")),
    "braiins": lambda: Port4028(_cg("summary", "devs", "temps", "fans", "tunerstatus")),
    "avalon": lambda: Port4028(_cg("summary", "estats")),
    "whatsminer": lambda: Port4028(_cg("summary", "devs"), _cg("status")),
    "whatsminer-v3": WhatsminerV3,
    "epic": lambda: KeptAliveGet("/summary", None),
    "vnish": lambda: KeptAliveGet("/api/v1/summary", 80),
    "pdu": Snmp,
}


def floor_client(dialect: str) -> FloorClient:
    try:
        return DIALECTS[dialect]()
    except KeyError:
        raise ValueError(f"no floor for {dialect!r}; known: {', '.join(DIALECTS)}") from None
