"""What every simulated rig's server shares (simulators/server.py), checked on each server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from simulators.antminer_web import AntminerWebServer
from simulators.braiins import BraiinsRestServer
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm
from simulators.server import RigServer
from simulators.whatsminer import WhatsminerServer

RIG = "rig-001"


def _farm(firmware: str) -> Farm:
    farm = Farm.build(ManualClock(), rigs=1, pdus=1)
    farm.rigs[RIG].firmware = firmware
    return farm


MAKERS: dict[str, Callable[[], RigServer]] = {
    "cgminer": lambda: MinerServer(_farm("luxos"), RIG),
    "whatsminer": lambda: WhatsminerServer(_farm("btminer"), RIG),
    "braiins": lambda: BraiinsRestServer(_farm("bosminer"), RIG, port=0),
    "antminer_web": lambda: AntminerWebServer(_farm("bmminer"), RIG, port=0),
}


def _port(server: RigServer) -> int:
    port = getattr(server, "port", None)
    assert isinstance(port, int)
    return port


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return False
    writer.close()
    return True


@pytest.mark.parametrize("kind", sorted(MAKERS))
async def test_refuse_closes_the_port_and_clearing_it_listens_there_again(kind: str) -> None:
    server = MAKERS[kind]()
    await server.start()  # type: ignore[attr-defined]
    try:
        port = _port(server)
        assert await _accepts(port)
        await server.set_fault("refuse")
        assert server.fault == "refuse" and not await _accepts(port)
        await server.set_fault(None)
        assert server.fault is None and _port(server) == port and await _accepts(port)
        with pytest.raises(ValueError, match="unknown fault 'melt'"):
            await server.set_fault("melt")
    finally:
        await server.stop()


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_the_api_is_down_while_the_outlet_is_off(kind: str) -> None:
    server = MAKERS[kind]()
    farm = server.farm
    where = farm.outlet_of(RIG)
    assert where is not None and server._api_up()
    farm.pdus[where[0]].switch(where[1], "off", farm.now())
    assert not server._api_up()


def test_a_server_needs_its_rig_in_the_farm() -> None:
    with pytest.raises(ValueError, match="no rig 'rig-404'"):
        MinerServer(_farm("luxos"), "rig-404")
