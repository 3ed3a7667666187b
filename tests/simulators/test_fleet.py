"""Simulated fleets: many rigs' servers started as one, on ephemeral ports or a subnet."""

from __future__ import annotations

import pytest

from drivers.cgminer import CGMinerClient
from drivers.registry import MinerAccess, make_miner_driver
from simulators.cgminer import MinerFleet
from simulators.clock import ManualClock
from simulators.farm import Farm


async def test_fleet_on_ephemeral_ports() -> None:
    farm = Farm.build(ManualClock(), rigs=4, pdus=2)
    fleet = MinerFleet(farm)
    await fleet.start()
    try:
        addresses = {fleet.address_of(rid) for rid in farm.rigs}
        assert len(addresses) == 4
        for rid in farm.rigs:
            host, port = fleet.address_of(rid)
            tel = await make_miner_driver("luxos", rid, MinerAccess(host, port)).read(farm.now())
            assert tel.hashrate_ths == pytest.approx(farm.rigs[rid].hashrate_ths(farm.now()), 1e-3)
    finally:
        await fleet.stop()


def test_fleet_subnet_validation() -> None:
    farm = Farm.build(ManualClock(), rigs=6, pdus=1)
    with pytest.raises(ValueError, match="loopback"):
        MinerFleet(farm, subnet="10.0.0.0/24")
    with pytest.raises(ValueError, match="host addresses"):
        MinerFleet(farm, subnet="127.0.9.0/30")


async def test_fleet_on_a_loopback_subnet_at_port_4028() -> None:
    farm = Farm.build(ManualClock(), rigs=6, pdus=1)
    fleet = MinerFleet(farm, subnet="127.0.9.0/29")
    try:
        await fleet.start()
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.9.x:4028 here: {exc}")
    try:
        for n, rid in enumerate(farm.rigs, start=1):
            assert fleet.address_of(rid) == (f"127.0.9.{n}", 4028)
            reply = await CGMinerClient(f"127.0.9.{n}", 4028, device=rid).command("config")
            assert reply["CONFIG"][0]["Hostname"] == f"luxos-{rid}"
    finally:
        await fleet.stop()
