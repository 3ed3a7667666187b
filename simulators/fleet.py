"""What every simulated fleet shares: many servers, one per rig, started and stopped as one.

Each firmware's fleet (`MinerFleet`, `WhatsminerFleet`, `AntminerWebFleet`,
`BraiinsRestFleet`) only decides which rigs it serves and where; starting them together,
and stopping the ones that did start when one cannot bind, is the same for all.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, Protocol, TypeVar


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


async def cancel_connections(conns: set[asyncio.Task[Any]]) -> None:
    """Cancel a server's open connection handlers and wait for them: a stopped simulator
    must not answer one more request."""
    tasks = list(conns)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    conns.clear()
