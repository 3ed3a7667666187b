"""What every simulated rig's server shares, whatever firmware it imitates.

A simulated miner answers only while its rig could: the outlet it sits on is on and the
rig has booted. It can be told to misbehave (`set_fault`), and "refuse" must look like a
host whose port is closed, cleared again on the same port. A connection to a rig that is
down is reset, the nearest thing to a dead host that a listener shared with other state
allows. These are the same for the CGMiner/LuxOS/BOSminer 4028 server, the Whatsminer
server and the web servers of stock Antminers and Braiins OS, so they are written here
once; each server supplies only how it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final

import structlog

from simulators.farm import Farm, SimPdu, SimRig

log = structlog.get_logger(__name__)

SILENT_HOLD_S: Final = 600.0  # the "silent" fault holds a connection this long at most
# What a rig in the "garbage" fault answers: a proxy's error page, binary on both ends.
GARBAGE: Final = b"\x1f\x8b\x08\x00<html><body>502 Bad Gateway</body></html>\xff\xfe{]"

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RigServer:
    """The part of one rig's server that is not its protocol.

    Subclasses name their `faults` and say how they listen (`_listening`, `_listen`,
    `_stop_listening`, and `_can_listen` when listening needs a started server first).
    """

    faults: ClassVar[frozenset[str]]

    def __init__(
        self, farm: Farm, rig_id: str, *, host: str, outlet: tuple[SimPdu, int] | None
    ) -> None:
        if rig_id not in farm.rigs:
            raise ValueError(f"no rig {rig_id!r} in the farm")
        self.farm = farm
        self.rig_id = rig_id
        self.rig: SimRig = farm.rigs[rig_id]
        self.host = host
        self.fault: str | None = None
        if outlet is None:
            where = farm.outlet_of(rig_id)
            outlet = (farm.pdus[where[0]], where[1]) if where else None
        self._outlet = outlet
        self._conns: set[asyncio.Task[Any]] = set()

    def _api_up(self) -> bool:
        """Whether the rig's API answers now: its outlet is on and it has booted."""
        t = self.farm.now()
        if self._outlet is not None:
            pdu, number = self._outlet
            pdu.outlet_on(number, t)  # applies due reboots before asking the rig
        return self.rig.api_up(t)

    # -- listening, as each server does it -------------------------------------

    def _listening(self) -> bool:
        raise NotImplementedError

    def _can_listen(self) -> bool:
        return True

    async def _listen(self) -> None:
        raise NotImplementedError

    async def _stop_listening(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop listening and drop the open connections (servers with more to stop say so)."""
        await self._stop_listening()
        await self._cancel_connections()

    # -- faults ----------------------------------------------------------------

    async def set_fault(self, fault: str | None) -> None:
        """Switch fault mode; "refuse" closes the listener, clearing it listens again."""
        if fault is not None and fault not in self.faults:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(self.faults))}")
        listening = self._listening()
        self.fault = fault
        if fault == "refuse":
            if listening:
                await self._stop_listening()
        elif not listening and self._can_listen():
            await self._listen()

    # -- stream connections ----------------------------------------------------

    async def _guard(
        self, serve: StreamHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection: reset it if the rig is down or refusing, never let it take
        the listener down, and close it in any case."""
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            if not self._api_up() or self.fault == "refuse":
                reset_connection(writer)
                return
            await serve(reader, writer)
        except asyncio.CancelledError:
            pass  # server stopping: drop the connection quietly
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # clients hang up or stall all the time; that is not a server problem
        except Exception:  # never let one connection take the listener down
            log.exception(
                "simulator.connection_failed", rig=self.rig_id, server=type(self).__name__
            )
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _cancel_connections(self) -> None:
        """Cancel the open connection handlers and wait for them: a stopped simulator must
        not answer one more request."""
        tasks = list(self._conns)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._conns.clear()


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with RST so the client sees a reset, the nearest thing to a dead host."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def hold_silent(reader: asyncio.StreamReader, seconds: float) -> None:
    """Keep a connection open without answering, until the client gives up."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
