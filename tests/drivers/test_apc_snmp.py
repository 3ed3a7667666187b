"""The APC rPDU2 SNMP driver against the simulated PDU agent, over real UDP on 127.0.0.1.

Values are checked against the farm model rather than against constants, so unit
conversions (hundredths of kW, tenths of kWh) and outlet mapping errors show up.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.ber import encoder
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    Integer,
    NoSuchInstance,
    ObjectIdentity,
    ObjectType,
    OctetString,
    SnmpEngine,
    UdpTransportTarget,
    get_cmd,
    set_cmd,
    walk_cmd,
)
from pysnmp.proto.api import v2c

from drivers import apc_snmp_v3, snmp_v2c, snmp_wire
from drivers.apc_snmp import (
    DEVICE_ENERGY,
    DEVICE_POWER,
    OUTLET_MODULE,
    OUTLET_NAME,
    OUTLET_NUMBER,
    OUTLET_POWER,
    OUTLET_STATE,
    ApcPdu,
    close_engines,
    decode_poll,
    snmp_int,
)
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
)
from drivers.telemetry import PduReading
from simulators.apc_snmp import OUTLET_CONFIG_NAME, OUTLET_CONTROL_COMMAND, PduAgent
from simulators.clock import ManualClock
from simulators.farm import Farm, SimPdu

HOST = "127.0.0.1"
V3 = {"user": "rigd", "auth_key": "authpass123", "priv_key": "privpass123"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def farm(clock: ManualClock) -> Farm:
    return Farm.build(clock, rigs=8, pdus=1)


@pytest.fixture
def pdu(farm: Farm) -> SimPdu:
    return farm.pdus["pdu-01"]


@pytest.fixture
async def agent(farm: Farm) -> AsyncIterator[PduAgent]:
    async with PduAgent(farm, "pdu-01") as running:
        yield running


@pytest.fixture(autouse=True)
async def _shared_engines() -> AsyncIterator[None]:
    yield
    await close_engines()


def driver(agent: PduAgent, **kw: Any) -> ApcPdu:
    kw.setdefault("timeout", 1.0)
    kw.setdefault("retries", 0)
    return ApcPdu("pdu-01", agent.host, agent.port, **kw)


def assert_matches_farm(reading: PduReading, pdu: SimPdu, t: float) -> None:
    assert reading.power_w == pytest.approx(pdu.power_w(t), abs=10.0)  # hundredths of kW
    assert reading.energy_kwh == pytest.approx(pdu.energy_kwh(t), abs=0.1)  # tenths of kWh
    assert [o.number for o in reading.outlets] == sorted(pdu.outlets)
    for o in reading.outlets:
        assert o.on is pdu.outlet_on(o.number, t)
        assert o.name == pdu.outlets[o.number].name
        assert o.power_w == pytest.approx(pdu.outlet_power_w(o.number, t), abs=0.5)


# -- reads --------------------------------------------------------------------------------


async def test_v2c_read_matches_farm(
    agent: PduAgent, pdu: SimPdu, clock: ManualClock, farm: Farm
) -> None:
    clock.advance(3_600.0)  # an hour of load, so energy is well away from zero
    reading = await driver(agent).read(ts=farm.now())
    assert reading.ts == farm.now()
    assert reading.power_w is not None and reading.power_w > 20_000  # 8 rigs at full power
    assert reading.energy_kwh is not None and reading.energy_kwh > 20
    assert all(o.on for o in reading.outlets)
    assert_matches_farm(reading, pdu, farm.now())


async def test_v3_authpriv_read_matches_farm(
    agent: PduAgent, pdu: SimPdu, clock: ManualClock, farm: Farm
) -> None:
    clock.advance(600.0)
    reading = await driver(agent, version="3", **V3).read(ts=farm.now())
    assert_matches_farm(reading, pdu, farm.now())


async def test_read_pages_through_a_large_pdu(clock: ManualClock) -> None:
    """30 outlets x 5 columns exceeds one GETBULK response (the agent caps at 64 var-binds)."""
    farm = Farm.build(clock, rigs=30, pdus=1)
    async with PduAgent(farm, "pdu-01") as agent:
        reading = await driver(agent).read(ts=farm.now())
    assert len(reading.outlets) == 30
    assert_matches_farm(reading, farm.pdus["pdu-01"], farm.now())


async def test_several_agents_share_one_engine_in_a_loop(clock: ManualClock) -> None:
    farm = Farm.build(clock, rigs=16, pdus=4)
    clock.advance(120.0)
    agents = [PduAgent(farm, pid) for pid in farm.pdus]
    await asyncio.gather(*(a.start() for a in agents))
    try:
        assert len({a.port for a in agents}) == 4
        drivers = [ApcPdu(a.pdu.id, a.host, a.port, timeout=1.0, retries=0) for a in agents]
        readings = await asyncio.gather(*(d.read(ts=farm.now()) for d in drivers))
        for a, reading in zip(agents, readings, strict=True):
            assert_matches_farm(reading, a.pdu, farm.now())
        loop = asyncio.get_running_loop()
        assert loop in snmp_v2c._SOCKETS  # one v2c socket for every PDU of the loop
        assert loop not in apc_snmp_v3._REGISTRY  # and no pysnmp engine for v2c reads
        v3 = [driver(a, version="3", **V3) for a in agents]
        await asyncio.gather(*(d.read(ts=farm.now()) for d in v3))
        assert len(apc_snmp_v3._REGISTRY[loop].slots) == 1
    finally:
        await asyncio.gather(*(a.stop() for a in agents))


async def test_requests_per_pdu_are_capped_at_max_in_flight(
    agent: PduAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight = peak = 0

    exchange = snmp_v2c.exchange

    async def counting(*args: Any, **kw: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.02)  # hold the slot long enough for the others to queue
            return await exchange(*args, **kw)
        finally:
            in_flight -= 1

    monkeypatch.setattr(snmp_v2c, "exchange", counting)
    d = driver(agent, max_in_flight=2)
    readings = await asyncio.gather(*(d.read(ts=0.0) for _ in range(6)))
    assert all(len(r.outlets) == 8 for r in readings)
    assert peak == 2


# -- steady polls between walks ------------------------------------------------------------


def _count_pdu_types(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    exchange = snmp_v2c.exchange

    async def counting(addr: Any, pdu_type: int, *args: Any, **kw: Any) -> Any:
        sent.append(pdu_type)
        return await exchange(addr, pdu_type, *args, **kw)

    monkeypatch.setattr(snmp_v2c, "exchange", counting)
    return sent


async def test_between_walks_a_read_is_one_get(
    agent: PduAgent, pdu: SimPdu, clock: ManualClock, farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _count_pdu_types(monkeypatch)
    d = driver(agent, walk_every_s=300.0)
    first = await d.read(ts=1_000.0)
    assert sent == [snmp_wire.GETBULK]  # 8 outlets: one packet walks the table
    sent.clear()
    clock.advance(60.0)
    await d.set_outlet(2, "off")  # what changes every cycle is in the GET
    sent.clear()
    steady = await d.read(ts=1_010.0)
    assert sent == [snmp_wire.GET]
    assert_matches_farm(steady, pdu, farm.now())  # names from the walk, values fresh
    assert [o.name for o in steady.outlets] == [o.name for o in first.outlets]
    assert next(o for o in steady.outlets if o.number == 2).on is False
    sent.clear()
    await d.read(ts=1_300.0)  # the walk is due again
    assert sent == [snmp_wire.GETBULK]


async def test_steady_reads_page_large_pdus(clock: ManualClock) -> None:
    farm = Farm.build(clock, rigs=30, pdus=1)
    async with PduAgent(farm, "pdu-01") as agent:
        d = driver(agent)
        await d.read(ts=0.0)
        reading = await d.read(ts=10.0)  # 2 + 60 OIDs: two GETs
    assert len(reading.outlets) == 30
    assert_matches_farm(reading, farm.pdus["pdu-01"], farm.now())


async def test_v3_authpriv_steady_read_matches_farm(
    agent: PduAgent, pdu: SimPdu, clock: ManualClock, farm: Farm
) -> None:
    d = driver(agent, version="3", **V3)
    await d.read(ts=0.0)
    clock.advance(600.0)
    await d.set_outlet(4, "off")
    reading = await d.read(ts=10.0)
    assert_matches_farm(reading, pdu, farm.now())
    assert next(o for o in reading.outlets if o.number == 4).on is False


# -- switching ----------------------------------------------------------------------------


async def test_switch_off_then_on(agent: PduAgent, pdu: SimPdu, farm: Farm) -> None:
    d = driver(agent)
    rig = pdu.outlets[3].rig
    assert rig is not None and rig.powered
    before = await d.read(ts=farm.now())

    await d.set_outlet(3, "off")
    assert rig.powered is False
    after = await d.read(ts=farm.now())
    off = next(o for o in after.outlets if o.number == 3)
    assert off.on is False and off.power_w == 0.0
    assert before.power_w is not None and after.power_w is not None
    assert after.power_w == pytest.approx(before.power_w - rig.model.nominal_w, rel=0.02)
    assert all(o.on for o in after.outlets if o.number != 3)

    await d.set_outlet(3, "on")
    assert rig.powered is True
    on = next(o for o in (await d.read(ts=farm.now())).outlets if o.number == 3)
    assert on.on is True


async def test_reboot_turns_off_then_back_on(
    agent: PduAgent, pdu: SimPdu, clock: ManualClock, farm: Farm
) -> None:
    d = driver(agent, version="3", **V3)  # v3 writes go through the same user
    rig = pdu.outlets[5].rig
    assert rig is not None
    await d.set_outlet(5, "reboot")
    assert rig.powered is False
    clock.advance(SimPdu.REBOOT_S + 1.0)
    outlet = next(o for o in (await d.read(ts=farm.now())).outlets if o.number == 5)
    assert outlet.on is True and rig.powered is True


async def test_set_with_read_only_community_is_an_auth_error(agent: PduAgent, pdu: SimPdu) -> None:
    d = driver(agent, write_community="public")
    with pytest.raises(DeviceAuthError, match="write community lacks write access") as err:
        await d.set_outlet(2, "off")
    assert err.value.device == "pdu-01" and "set_outlet 2 off" in err.value.operation
    assert all(o.on for o in pdu.outlets.values())


async def test_set_on_missing_outlet_is_rejected(agent: PduAgent, pdu: SimPdu) -> None:
    with pytest.raises(CommandRejected, match="no outlet 99"):
        await driver(agent).set_outlet(99, "off")
    assert all(o.on for o in pdu.outlets.values())


async def test_bad_action_is_a_caller_error(agent: PduAgent) -> None:
    with pytest.raises(ValueError, match="on, off or reboot"):
        await driver(agent).set_outlet(1, "cycle")  # type: ignore[arg-type]


async def test_a_v2c_set_is_one_snmp_wire_set_with_the_write_community(
    agent: PduAgent, pdu: SimPdu, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2c SETs are encoded by `snmp_wire` too (no pysnmp engine), and carry the write
    community: the agent's read community may not write."""
    sent = _count_pdu_types(monkeypatch)
    d = driver(agent)
    await d.read(ts=0.0)
    sent.clear()
    await d.set_outlet(5, "off")
    assert sent[0] == snmp_wire.SET and set(sent[1:]) <= {snmp_wire.GET}  # then read back
    assert pdu.outlets[5].on is False
    assert asyncio.get_running_loop() not in apc_snmp_v3._REGISTRY


_V2C_IMPORTS_SCRIPT = """
import asyncio, sys
from drivers.apc_snmp import ApcPdu, close_engines

async def main():
    host, port = sys.argv[1], int(sys.argv[2])
    d = ApcPdu("pdu-01", host, port, timeout=1.0, retries=1)
    await d.read(ts=0.0)
    await d.read(ts=10.0)
    await d.set_outlet(2, "off")
    await d.set_outlet(2, "on")
    await close_engines()
    print("result:", "pysnmp" in sys.modules, "pyasn1" in sys.modules)

asyncio.run(main())
"""


async def test_v2c_reads_and_sets_never_import_pysnmp(agent: PduAgent, pdu: SimPdu) -> None:
    """A farm of v2c PDUs never loads pysnmp and pyasn1 (about 24 MB of a daemon)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _V2C_IMPORTS_SCRIPT, agent.host, str(agent.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert [ln for ln in out.decode().splitlines() if ln.startswith("result:")] == [
        "result: False False"
    ]
    assert pdu.outlets[2].on is True


# -- failures -----------------------------------------------------------------------------


async def test_wrong_community_times_out_quickly(agent: PduAgent) -> None:
    d = driver(agent, community="not-the-community", timeout=0.3, retries=0)
    start = time.monotonic()
    with pytest.raises(DeviceTimeout, match="wrong community") as err:
        await d.read(ts=0.0)
    # One timeout, not a walk of timeouts (a busy host may stretch that one): well under
    # the many seconds a request per OID would wait.
    assert time.monotonic() - start < 3.0
    assert err.value.operation == "read"


async def test_wrong_v3_key_is_an_auth_error_and_spares_the_right_one(agent: PduAgent) -> None:
    good = driver(agent, version="3", **V3)
    bad = driver(agent, version="3", **{**V3, "auth_key": "wrongpass123"})
    assert (await good.read(ts=0.0)).outlets
    with pytest.raises(DeviceAuthError):
        await bad.read(ts=0.0)
    # The same user name with two different keys must not corrupt each other.
    results = await asyncio.gather(good.read(ts=0.0), bad.read(ts=0.0), return_exceptions=True)
    assert isinstance(results[0], PduReading)
    assert isinstance(results[1], DeviceAuthError)


async def test_silent_agent_times_out_then_recovers(agent: PduAgent) -> None:
    d = driver(agent, timeout=0.3, retries=0)
    agent.silent = True
    with pytest.raises(DeviceTimeout):
        await d.read(ts=0.0)
    agent.silent = False
    assert (await d.read(ts=0.0)).outlets


async def test_closed_port_is_timeout_or_unreachable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    d = ApcPdu("gone", HOST, port, timeout=0.3, retries=0)
    with pytest.raises((DeviceTimeout, DeviceUnreachable)):
        await d.read(ts=0.0)


async def test_closed_driver_refuses(agent: PduAgent) -> None:
    d = driver(agent)
    await d.close()
    with pytest.raises(DeviceUnreachable, match="closed"):
        await d.read(ts=0.0)


# -- the agent itself, through a plain pysnmp manager -------------------------------------


async def _manager(agent: PduAgent) -> tuple[Any, Any]:
    engine = SnmpEngine()
    target = await UdpTransportTarget.create((agent.host, agent.port), timeout=1, retries=0)
    return engine, target


async def test_agent_rejects_bad_values_and_renames(agent: PduAgent, pdu: SimPdu) -> None:
    engine, target = await _manager(agent)
    rw = CommunityData("private")
    try:
        ind, status, _, _ = await set_cmd(
            engine, rw, target, ContextData(),
            ObjectType(ObjectIdentity((*OUTLET_CONTROL_COMMAND, 1)), Integer(7)),
            lookupMib=False,
        )  # fmt: skip
        assert ind is None and status.prettyPrint() == "wrongValue"
        ind, status, _, _ = await set_cmd(
            engine, rw, target, ContextData(),
            ObjectType(ObjectIdentity((*DEVICE_POWER, 1)), Integer(1)),
            lookupMib=False,
        )  # fmt: skip
        assert status.prettyPrint() == "notWritable"
        ind, status, _, _ = await set_cmd(
            engine, rw, target, ContextData(),
            ObjectType(ObjectIdentity((*OUTLET_CONFIG_NAME, 4)), OctetString("spare-04")),
            lookupMib=False,
        )  # fmt: skip
        assert ind is None and int(status) == 0
        assert pdu.outlets[4].name == "spare-04"
        ind, status, _, vbs = await get_cmd(
            engine, CommunityData("public"), target, ContextData(),
            ObjectType(ObjectIdentity((*OUTLET_NAME, 4))),
            ObjectType(ObjectIdentity((*OUTLET_STATE, 77))),
            lookupMib=False,
        )  # fmt: skip
        assert str(vbs[0][1]) == "spare-04"
        assert isinstance(vbs[1][1], NoSuchInstance)
        assert all(o.on for o in pdu.outlets.values())
    finally:
        engine.close_dispatcher()


async def test_agent_walk_is_ordered_and_complete(agent: PduAgent, pdu: SimPdu) -> None:
    engine, target = await _manager(agent)
    try:
        names: list[tuple[int, ...]] = []
        async for ind, status, _, vbs in walk_cmd(
            engine, CommunityData("public"), target, ContextData(),
            ObjectType(ObjectIdentity((1, 3, 6, 1, 4, 1, 318))),
            lookupMib=False, lexicographicMode=False,
        ):  # fmt: skip
            assert ind is None and not status
            names.extend(tuple(vb[0]) for vb in vbs)
        assert names == sorted(names) and len(names) == len(set(names))
        assert sum(1 for n in names if n[:-1] == OUTLET_STATE) == len(pdu.outlets)
    finally:
        engine.close_dispatcher()


# -- decoding odd values ------------------------------------------------------------------


def _values(**over: Any) -> dict[tuple[int, ...], Any]:
    base: dict[tuple[int, ...], Any] = {
        (*DEVICE_POWER, 1): v2c.Integer(1234),
        (*DEVICE_ENERGY, 1): v2c.Integer(56789),
        (*OUTLET_MODULE, 1): v2c.Integer(1),
        (*OUTLET_NAME, 1): v2c.OctetString("rig-a"),
        (*OUTLET_NUMBER, 1): v2c.Integer(1),
        (*OUTLET_STATE, 1): v2c.Integer(2),
        (*OUTLET_POWER, 1): v2c.Integer(3100),
        (*OUTLET_MODULE, 2): v2c.Integer(1),
        (*OUTLET_NAME, 2): v2c.OctetString("rig-b"),
        (*OUTLET_NUMBER, 2): v2c.Integer(2),
        (*OUTLET_STATE, 2): v2c.Integer(1),
        (*OUTLET_POWER, 2): v2c.Integer(0),
    }
    for key, value in over.items():
        column, row = key.rsplit("_", 1)
        oid = {
            "power": DEVICE_POWER,
            "energy": DEVICE_ENERGY,
            "module": OUTLET_MODULE,
            "name": OUTLET_NAME,
            "number": OUTLET_NUMBER,
            "state": OUTLET_STATE,
            "opower": OUTLET_POWER,
        }[column]
        base[(*oid, int(row))] = value
    return base


def test_decode_units() -> None:
    decoded = decode_poll("p", 5.0, _values())
    r = decoded.reading
    assert r.power_w == 12_340.0 and r.energy_kwh == pytest.approx(5_678.9)
    assert [(o.number, o.on, o.name, o.power_w) for o in r.outlets] == [
        (1, True, "rig-a", 3100.0),
        (2, False, "rig-b", 0.0),
    ]
    assert dict(decoded.rows) == {1: 1, 2: 2}


def test_decode_unsupported_and_missing_values_become_none() -> None:
    r = decode_poll(
        "p",
        0.0,
        _values(
            power_1=v2c.Integer(-1),
            energy_1=v2c.NoSuchInstance(),
            opower_1=v2c.Integer(-1),
            opower_2=v2c.NoSuchObject(),
            name_2=v2c.EndOfMibView(),
        ),
    ).reading
    assert r.power_w is None and r.energy_kwh is None
    assert [o.power_w for o in r.outlets] == [None, None]
    assert r.outlets[1].name == ""
    assert snmp_int(v2c.Integer(-1)) is None and snmp_int(None) is None


@pytest.mark.parametrize(
    "override",
    [
        {"power_1": v2c.OctetString("12.3")},  # a string where a number belongs
        {"power_1": v2c.Integer(5_000_000)},  # 50 MW through one PDU
        {"energy_1": v2c.Integer(-7)},
        {"opower_1": v2c.Integer(99_999)},
        {"state_1": v2c.Integer(3)},
        {"number_2": v2c.Integer(1)},  # two outlets claiming number 1
        {"number_1": v2c.Integer(0)},
        {"name_1": v2c.Integer(5)},
    ],
)
def test_decode_implausible_values_are_malformed(override: dict[str, Any]) -> None:
    with pytest.raises(MalformedReply) as err:
        decode_poll("pdu-x", 0.0, _values(**override))
    assert err.value.device == "pdu-x"


def test_decode_skips_nps_guest_rows_and_maps_numbers_to_rows() -> None:
    values = _values(module_2=v2c.Integer(2))
    values[(*OUTLET_MODULE, 3)] = v2c.Integer(1)
    values[(*OUTLET_NUMBER, 3)] = v2c.Integer(2)
    values[(*OUTLET_STATE, 3)] = v2c.Integer(2)
    decoded = decode_poll("p", 0.0, values)
    assert [o.number for o in decoded.reading.outlets] == [1, 2]
    assert dict(decoded.rows) == {1: 1, 2: 3}


# -- garbage on the wire ------------------------------------------------------------------


def _request_bytes(community: str, pdu: Any, var_binds: list[tuple[Any, Any]]) -> bytes:
    v2c.apiPDU.set_defaults(pdu)
    v2c.apiPDU.set_varbinds(pdu, var_binds)
    msg = v2c.Message()
    v2c.apiMessage.set_defaults(msg)
    v2c.apiMessage.set_community(msg, community)
    v2c.apiMessage.set_pdu(msg, pdu)
    return bytes(encoder.encode(msg))


SEEDS = [
    _request_bytes("public", v2c.GetRequestPDU(), [((*DEVICE_POWER, 1), v2c.null)]),
    _request_bytes("public", v2c.GetNextRequestPDU(), [(OUTLET_STATE, v2c.null)]),
    _request_bytes("private", v2c.SetRequestPDU(), [((*OUTLET_NAME, 1), v2c.OctetString("x"))]),
    _request_bytes(
        "private", v2c.SetRequestPDU(), [((*OUTLET_CONFIG_NAME, 1), v2c.OctetString("ok"))]
    ),
]


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid request with a few bytes changed or cut short: the
    latter get past the BER version check and reach the PDU handling."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=0, max_size=300))
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(1, len(raw)))])


@contextlib.contextmanager
def agent_in_thread() -> Iterator[tuple[asyncio.AbstractEventLoop, PduAgent, list[Any]]]:
    """An agent in its own loop, so a synchronous hypothesis test can drive it."""
    farm = Farm.build(ManualClock(), rigs=4, pdus=1)
    loop = asyncio.new_event_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    agent = PduAgent(farm, "pdu-01")
    asyncio.run_coroutine_threadsafe(agent.start(), loop).result(5)
    try:
        yield loop, agent, errors
    finally:

        async def shutdown() -> None:
            await agent.stop()
            await close_engines()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_agent_survives_garbage_datagrams() -> None:
    with (
        agent_in_thread() as (loop, agent, errors),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        sender.setblocking(False)
        probe = ApcPdu("pdu-01", agent.host, agent.port, timeout=1.0, retries=1)

        @settings(
            max_examples=120,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        )
        @given(st.lists(datagrams(), min_size=1, max_size=4))
        def check(batch: list[bytes]) -> None:
            for datagram in batch:
                with contextlib.suppress(BlockingIOError):  # our receive buffer is full
                    sender.sendto(datagram, (agent.host, agent.port))
            reading = asyncio.run_coroutine_threadsafe(probe.read(ts=0.0), loop).result(5)
            assert len(reading.outlets) == 4

        check()
        assert errors == []
