"""Braiins OS over its public gRPC API: the simulator's server, rigd's client, and the
driver's choice of transport by firmware version (gRPC before the REST API, BOS 25.07).

A rig on BOS 24.09 has no REST API: the driver reads it over 4028 as always and pauses,
resumes and sets power targets over gRPC; a 25.07 rig keeps REST (the REST API is asked
first, so the gRPC stack is not even imported for it); one that answers neither is taken
to be on REST, as before the choice existed.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from drivers.braiins import BraiinsDriver, VersionedControl, make_braiins_driver
from drivers.braiins_grpc.client import BraiinsGrpcClient
from drivers.braiins_grpc.proto.bos import v1
from drivers.errors import CommandRejected, DeviceAuthError, DeviceError, DeviceUnreachable
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
        assert b.rest is not None and drv.rest.api_version == b.rest.api_version  # its /version
        assert _methods(b) == []  # REST answered: the gRPC API is never asked
        assert b.rest is not None and ("PUT", "/api/v1/actions/pause") in b.rest.requests
    finally:
        await b.close()


async def test_a_closed_grpc_port_means_rest() -> None:
    b = await _bos("25.07", grpc_listening=False)
    try:
        drv = b.driver()
        await drv.sleep()
        assert isinstance(drv.rest, VersionedControl) and drv.rest.transport == "rest"
        assert b.rest is not None and drv.rest.api_version == b.rest.api_version
    finally:
        await b.close()


async def test_a_rig_answering_neither_api_is_taken_to_be_on_rest() -> None:
    b = await _bos("24.09", grpc_listening=False)  # no REST server, gRPC refused
    try:
        drv = b.driver(rest_port=_free_port(b.rpc.host))
        with pytest.raises(DeviceError):
            await drv.sleep()  # the REST API is not there either: its error says so
        assert isinstance(drv.rest, VersionedControl) and drv.rest.transport == "rest"
        assert drv.rest.api_version is None
    finally:
        await b.close()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


_IMPORTS_SCRIPT = """
import asyncio, sys
from drivers.braiins import make_braiins_driver

async def main():
    host, port, rest_port, grpc_port, password = sys.argv[1:6]
    drv = make_braiins_driver("rig-001", host, int(port), password=password, timeout=2.0,
                              rest_port=int(rest_port), grpc_port=int(grpc_port))
    await drv.read(1000.0)
    await drv.sleep()
    await drv.wake()
    await drv.close()
    print("result:", drv.rest.transport, "grpclib" in sys.modules, "betterproto" in sys.modules)

asyncio.run(main())
"""


@pytest.mark.parametrize(("release", "transport", "grpc_loaded"),
                         [("25.07", "rest", False), ("24.09", "grpc", True)])  # fmt: skip
async def test_the_grpc_stack_is_imported_only_for_a_rig_that_speaks_grpc(
    release: str, transport: str, grpc_loaded: bool
) -> None:
    """A daemon whose Braiins rigs all have the REST API never loads grpclib and
    betterproto (about 25 MB); one before 25.07 still falls back to gRPC and works."""
    b = await _bos(release)
    try:
        rest_port = b.rest.port if b.rest is not None else _free_port(b.rpc.host)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _IMPORTS_SCRIPT, b.rpc.host, str(b.rpc.port), str(rest_port),
            str(b.grpc.port), PASSWORD, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        loaded = str(grpc_loaded)
        result = [ln for ln in out.decode().splitlines() if ln.startswith("result:")]
        assert result == [f"result: {transport} {loaded} {loaded}"]
    finally:
        await b.close()
