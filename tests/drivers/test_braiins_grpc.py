"""Braiins OS over its public gRPC API: the simulator's server, rigd's client, and the
driver's choice of transport by firmware version (gRPC before the REST API, BOS 25.07).

A rig on BOS 24.09 has no REST API: the driver reads it over 4028 as always and pauses,
resumes and sets power targets over gRPC; a 25.07 rig keeps REST; one whose gRPC port is
closed is taken to be on REST, as before the choice existed.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from drivers.braiins import BraiinsDriver, VersionedControl, make_braiins_driver
from drivers.braiins_grpc.client import BraiinsGrpcClient
from drivers.braiins_grpc.proto.bos import v1
from drivers.errors import CommandRejected, DeviceAuthError, DeviceUnreachable
from drivers.telemetry import RigState
from simulators.braiins import BraiinsRestServer
from simulators.braiins_grpc import BraiinsGrpcServer, has_rest
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode

PASSWORD = "grpc-secret"


@dataclass
class Bos:
    clock: ManualClock
    farm: Farm
    rpc: MinerServer
    grpc: BraiinsGrpcServer
    rest: BraiinsRestServer | None
    drivers: list[BraiinsDriver] = field(default_factory=list)

    def driver(self, **kw: Any) -> BraiinsDriver:
        kw.setdefault("password", PASSWORD)
        kw.setdefault("timeout", 1.0)
        kw.setdefault("grpc_port", self.grpc.port)
        if self.rest is not None:
            kw.setdefault("rest_port", self.rest.port)
        drv = make_braiins_driver("rig-001", self.rpc.host, self.rpc.port, **kw)
        self.drivers.append(drv)
        return drv

    async def close(self) -> None:
        for d in self.drivers:
            await d.close()
        for s in (self.grpc, self.rest, self.rpc):
            if s is not None:
                await s.stop()


async def _bos(release: str, *, grpc_listening: bool = True) -> Bos:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1, models={"Antminer S19 Pro": 1.0})
        farm.rigs["rig-001"].firmware = "bosminer"
        host = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"
        rpc = MinerServer(farm, "rig-001", host=host, port=4028)
        grpc = BraiinsGrpcServer(
            farm, "rig-001", host=host, port=50051, password=PASSWORD, release=release
        )
        rest = (
            BraiinsRestServer(farm, "rig-001", host=host, port=0, password=PASSWORD)
            if has_rest(release)
            else None
        )
        try:
            await rpc.start()
            await grpc.start()
            if rest is not None:
                await rest.start()
        except OSError:
            for s in (rpc, grpc, rest):
                if s is not None:
                    await s.stop()
            continue
        if not grpc_listening:
            await grpc.set_fault("refuse")
        return Bos(clock, farm, rpc, grpc, rest)
    raise RuntimeError("no free loopback address")


@pytest.fixture
async def bos_2409() -> AsyncIterator[Bos]:
    b = await _bos("24.09")
    try:
        yield b
    finally:
        await b.close()


def _methods(bos: Bos) -> list[str]:
    return [c.rsplit("/", 1)[-1] for c in bos.grpc.calls]


async def test_a_release_without_rest_is_controlled_over_grpc(bos_2409: Bos) -> None:
    b = bos_2409
    drv = b.driver()
    rig, m = b.farm.rigs["rig-001"], b.farm.rigs["rig-001"].model
    tel = await drv.read(b.clock.now())
    assert isinstance(drv.rest, VersionedControl)
    assert drv.rest.transport == "grpc" and drv.rest.api_version == (1, 3, 0)
    assert tel.state is RigState.MINING
    assert tel.identity.firmware_version == b.grpc.bos_version  # "...-24.09-plus", over gRPC
    assert drv.capabilities.power_target_min_w == m.min_w
    assert drv.capabilities.power_target_max_w == m.max_w

    await drv.sleep()
    assert rig.mode is RigMode.SLEEPING
    b.clock.advance(30)
    assert (await drv.read(b.clock.now())).state is RigState.SLEEPING

    await drv.wake()
    b.clock.advance(600)
    tel = await drv.read(b.clock.now())
    assert tel.state is RigState.MINING and rig.mode is RigMode.MINING

    await drv.set_power_target(2500.7)
    assert rig.power_target_w == 2500  # whole watts, never above what was asked
    await drv.set_power_target(None)
    assert rig.power_target_w is None
    with pytest.raises(ValueError):
        await drv.set_power_target(100)  # outside the tuner's range: refused before sending

    calls = _methods(b)
    assert calls[0] == "GetApiVersion" and "Login" in calls
    for method in ("GetMinerDetails", "GetConstraints", "PauseMining", "ResumeMining",
                   "SetPowerTarget", "SetDefaultPowerTarget"):  # fmt: skip
        assert method in calls, method
    assert calls.count("Login") == 1  # one token for the whole session


async def test_a_release_with_rest_keeps_rest() -> None:
    b = await _bos("25.07")
    try:
        drv = b.driver()
        await drv.read(b.clock.now())
        await drv.sleep()
        assert isinstance(drv.rest, VersionedControl) and drv.rest.transport == "rest"
        assert _methods(b) == ["GetApiVersion"]  # asked the version, nothing else
        assert b.rest is not None and ("PUT", "/api/v1/actions/pause") in b.rest.requests
    finally:
        await b.close()


async def test_a_closed_grpc_port_means_rest() -> None:
    b = await _bos("25.07", grpc_listening=False)
    try:
        drv = b.driver()
        await drv.sleep()
        assert isinstance(drv.rest, VersionedControl) and drv.rest.transport == "rest"
        assert drv.rest.api_version is None
    finally:
        await b.close()


async def test_a_reboot_asks_the_version_again(bos_2409: Bos) -> None:
    b = bos_2409
    drv = b.driver()
    await drv.read(b.clock.now())
    assert isinstance(drv.rest, VersionedControl) and drv.rest.transport == "grpc"
    rig = b.farm.rigs["rig-001"]
    rig.set_powered(False, b.clock.now())
    rig.set_powered(True, b.clock.now())
    b.clock.advance(60)
    await drv.read(b.clock.now())
    await drv.sleep()
    assert _methods(b).count("GetApiVersion") == 2


async def test_grpc_client_errors_are_typed(bos_2409: Bos) -> None:
    b = bos_2409
    wrong = BraiinsGrpcClient(b.rpc.host, b.grpc.port, password="nope", timeout=1.0, retries=0)
    try:
        with pytest.raises(DeviceAuthError, match="refused the login"):
            await wrong.call("pause_mining", v1.PauseMiningRequest(), operation="sleep")
    finally:
        await wrong.close()
    good = BraiinsGrpcClient(b.rpc.host, b.grpc.port, password=PASSWORD, timeout=1.0, retries=0)
    try:
        request = v1.SetPowerTargetRequest(power_target=v1.Power(watt=10))
        with pytest.raises(CommandRejected, match="INVALID_ARGUMENT"):
            await good.call("set_power_target", request, operation="set_power_target")
        # The firmware forgot our token (a restart): one fresh login, then the call.
        b.grpc.tokens.clear()
        reply = await good.call("get_miner_details", v1.GetMinerDetailsRequest(), operation="r")
        assert reply.hostname == "bos-rig-001" and good.logins == 2
        await b.grpc.set_fault("refuse")
        with pytest.raises(DeviceUnreachable):
            await good.call("get_miner_details", v1.GetMinerDetailsRequest(), operation="r")
    finally:
        await good.close()


async def test_a_rig_that_is_down_answers_unavailable(bos_2409: Bos) -> None:
    b = bos_2409
    client = BraiinsGrpcClient(b.rpc.host, b.grpc.port, password=PASSWORD, timeout=1.0, retries=0)
    try:
        b.farm.rigs["rig-001"].set_powered(False, b.clock.now())
        with pytest.raises(DeviceUnreachable, match="UNAVAILABLE"):
            await client.api_version()
    finally:
        await client.close()
