"""What scan probes share: one CGMiner `version` request per host, however many ask.

`rigctl scan` runs every firmware's probe of a host at once, and several of them only need
the host's `version` reply (Avalon's and VNish's look for their names in it). Concurrent
asks for the same host, port and command share one request and its answer, so a wide scan
opens one connection for them instead of one each: on a loaded 2-core host, every
connection a probe saves keeps the others inside their timeouts.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from drivers.cgminer import CGMinerClient

Json = dict[str, Any]

# (event loop, host, port, command) -> the request in flight; entries leave when it ends.
_IN_FLIGHT: Final[dict[tuple[int, str, int, str], asyncio.Task[Json]]] = {}


async def shared_command(host: str, port: int, command: str, timeout: float) -> Json:  # noqa: ASYNC109
    """`command` at host:port, or the answer of the identical request already in flight;
    raises what `CGMinerClient.command` raises."""
    key = (id(asyncio.get_running_loop()), host, port, command)
    task = _IN_FLIGHT.get(key)
    if task is None:
        client = CGMinerClient(host, port, timeout=timeout, retries=0, device=host)
        task = asyncio.ensure_future(client.command(command))
        _IN_FLIGHT[key] = task
        task.add_done_callback(lambda _t: _IN_FLIGHT.pop(key, None))
    return await asyncio.shield(task)
