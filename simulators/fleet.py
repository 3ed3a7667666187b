"""What every simulated fleet shares: many servers, one per rig, started and stopped as one.

Each firmware's fleet (`MinerFleet`, `WhatsminerFleet`, `AntminerWebFleet`,
`BraiinsRestFleet`) only decides which rigs it serves and where; starting them together,
and stopping the ones that did start when one cannot bind, is the same for all. What one
rig's server shares with the others is in `simulators.server`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from typing import Generic, Protocol, TypeVar

from simulators.farm import Farm, SimPdu


class Server(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


class Fleet(Generic[S]):
    servers: dict[str, S]

    async def start(self) -> None:
        try:
            await asyncio.gather(*(s.start() for s in self.servers.values()))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers.values()), return_exceptions=True)

    def address_of(self, rig_id: str) -> tuple[str, int]:
        server = self.servers[rig_id]
        return server.host, server.port


def subnet_hosts(farm: Farm, subnet: str) -> dict[str, str]:
    """The n-th rig of the farm on the n-th host address of `subnet`, loopback only.

    Every dialect's fleet numbers rigs the same way, so fleets of several firmwares share
    one subnet without colliding, and a rig keeps its address whatever its firmware."""
    net = ipaddress.ip_network(subnet, strict=False)
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(loopback):
        raise ValueError(f"subnet {subnet} must be inside 127.0.0.0/8 (loopback only)")
    hosts = list(itertools.islice(net.hosts(), len(farm.rigs)))
    if len(hosts) < len(farm.rigs):
        raise ValueError(
            f"subnet {subnet} has {len(hosts)} host addresses for {len(farm.rigs)} rigs"
        )
    return {rid: str(h) for rid, h in zip(farm.rigs, hosts, strict=False)}


def outlets_of(farm: Farm) -> dict[str, tuple[SimPdu, int]]:
    """Rig id -> (its PDU, outlet number), for servers that go dark with their outlet."""
    out: dict[str, tuple[SimPdu, int]] = {}
    for pdu in farm.pdus.values():
        for number, outlet in pdu.outlets.items():
            if outlet.rig is not None:
                out[outlet.rig.id] = (pdu, number)
    return out
