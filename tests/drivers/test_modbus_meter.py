"""The Modbus meter driver against the meter simulator, over real TCP on loopback.

The farm runs on a ManualClock, so "now" only moves when a test says so and the meter's
readings can be compared with the farm model at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient

from drivers.errors import (
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
)
from drivers.modbus_meter import (
    ModbusExceptionReply,
    ModbusMeter,
    acc32,
    decode_sdm630,
    decode_sunspec_meter,
    int16,
    looks_like_garbage,
    scaled,
    sunssf,
)
from drivers.telemetry import MeterReading
from simulators.clock import ManualClock
from simulators.farm import Farm
from simulators.modbus_meter import (
    GARBAGE,
    MeterModel,
    MeterServer,
    f32_regs,
    i16_reg,
    u32_regs,
)

MODELS: tuple[MeterModel, ...] = ("sdm630", "sunspec")
FLOAT32_KWH_ULP = 0.125  # float32 spacing around 1.2 GWh: the SDM630's own resolution


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def farm(clock: ManualClock) -> Farm:
    return Farm.build(clock, rigs=10, pdus=1)


@pytest.fixture(params=MODELS)
async def server(request: pytest.FixtureRequest, farm: Farm) -> AsyncIterator[MeterServer]:
    async with MeterServer(farm, model=request.param) as srv:
        yield srv


def meter_for(srv: MeterServer, *, timeout: float = 2.0, retries: int = 1) -> ModbusMeter:
    return ModbusMeter(
        "meter-main", srv.host, srv.port, model=srv.model, timeout=timeout, retries=retries
    )


def power_resolution(srv: MeterServer) -> float:
    """What the register encoding can resolve: float32 for Eastron, 10**W_SF for SunSpec."""
    return 10.0**srv.scale.w_sf if srv.model == "sunspec" else 0.01


def energy_resolution(srv: MeterServer) -> float:
    return 10.0**srv.scale.wh_sf / 1000.0 if srv.model == "sunspec" else FLOAT32_KWH_ULP


# -- readings match the farm -------------------------------------------------------------------


async def test_reading_matches_farm_exactly_without_noise(
    server: MeterServer, farm: Farm, clock: ManualClock
) -> None:
    farm.meter.noise_frac = 0.0
    meter = meter_for(server)
    try:
        r = await meter.read(clock.now())
    finally:
        await meter.close()
    t = clock.now()
    assert r.ts == t
    assert r.power_w == pytest.approx(farm.meter.true_power_w(t), abs=power_resolution(server))
    assert r.import_kwh == pytest.approx(farm.meter.import_kwh(t), abs=energy_resolution(server))
    assert len(r.voltage_v) == 3 and len(r.current_a) == 3
    assert all(225.0 < v < 235.0 for v in r.voltage_v)
    # Each phase carries about a third of the load at ~230 V and PF ~0.97.
    for amps in r.current_a:
        assert amps == pytest.approx(r.power_w / 3 / 230 / 0.97, rel=0.05)
    assert r.frequency_hz == pytest.approx(50.0, abs=0.1)
    # The Eastron has a real export register (0); SunSpec's acc32 0 means "not accumulated".
    assert r.export_kwh == (0.0 if server.model == "sdm630" else None)


async def test_noisy_reading_within_meter_noise(
    server: MeterServer, farm: Farm, clock: ManualClock
) -> None:
    meter = meter_for(server)
    true_w = farm.meter.true_power_w(clock.now())
    try:
        readings = [await meter.read(clock.now()) for _ in range(5)]
    finally:
        await meter.close()
    # Gaussian noise of 0.3 %: five sigma plus the encoding's rounding never fails by chance.
    for r in readings:
        assert abs(r.power_w - true_w) <= 5 * farm.meter.noise_frac * true_w + power_resolution(
            server
        )
    assert len({r.power_w for r in readings}) > 1, "each poll must see a fresh measurement"


async def test_values_track_the_farm(server: MeterServer, farm: Farm, clock: ManualClock) -> None:
    farm.meter.noise_frac = 0.0
    meter = meter_for(server)
    try:
        before = await meter.read(clock.now())
        sleepers = list(farm.rigs.values())[:4]
        shed_w = sum(r.power_w(clock.now()) for r in sleepers) * (1 + farm.meter.overhead_frac)
        for rig in sleepers:
            rig.sleep(clock.now())
        energies = [before.import_kwh]
        for _ in range(4):
            clock.advance(60.0)
            energies.append((await meter.read(clock.now())).import_kwh)
        after = await meter.read(clock.now())
    finally:
        await meter.close()
    # Sleeping rigs still draw idle power, so the drop is a little less than what they drew.
    assert before.power_w - after.power_w == pytest.approx(shed_w, rel=0.05)
    assert after.power_w == pytest.approx(farm.meter.true_power_w(clock.now()), abs=10.0)
    # A minute at ~35-50 kW is ~0.6-0.8 kWh: far above either encoding's resolution.
    assert all(b - a > 0.4 for a, b in itertools.pairwise(energies))
    assert energies[-1] == pytest.approx(
        farm.meter.import_kwh(clock.now()), abs=energy_resolution(server)
    )


async def test_sdm630_poll_is_one_request(farm: Farm, clock: ManualClock) -> None:
    async with MeterServer(farm, model="sdm630") as srv:
        meter = meter_for(srv)
        try:
            await meter.read(clock.now())
            await meter.read(clock.now())
        finally:
            await meter.close()
    assert srv.requests == 2


# -- SunSpec discovery -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "common_len", "vendor"),
    [
        (40_000, 66, False),
        (40_000, 65, False),
        (40_000, 65, True),
        (0, 66, True),
        (50_000, 65, False),
    ],
)
async def test_sunspec_walks_the_model_chain(
    farm: Farm, clock: ManualClock, base: int, common_len: int, vendor: bool
) -> None:
    farm.meter.noise_frac = 0.0
    async with MeterServer(
        farm,
        model="sunspec",
        sunspec_base=base,
        sunspec_common_len=common_len,
        sunspec_vendor_model=vendor,
    ) as srv:
        meter = meter_for(srv)
        try:
            r = await meter.read(clock.now())
            discovery = srv.requests
            await meter.read(clock.now())
            polled = srv.requests - discovery
        finally:
            await meter.close()
    # Model 1 header + L registers, then (optionally) the vendor model's header + 8.
    expected_at = base + 2 + 2 + common_len + (10 if vendor else 0)
    assert meter.sunspec is not None
    assert (meter.sunspec.base, meter.sunspec.address) == (base, expected_at)
    assert meter.sunspec.model == 203
    assert r.power_w == pytest.approx(
        farm.meter.true_power_w(clock.now()), abs=10.0**srv.scale.w_sf
    )
    assert polled == 1, "the model address is cached after discovery"


async def test_sunspec_driver_on_a_non_sunspec_device(farm: Farm, clock: ManualClock) -> None:
    async with MeterServer(farm, model="sdm630") as srv:
        meter = ModbusMeter("meter-main", srv.host, srv.port, model="sunspec")
        try:
            with pytest.raises(UnsupportedOperation, match="SunSpec marker"):
                await meter.read(clock.now())
        finally:
            await meter.close()


async def test_scale_factors_fit_a_megawatt_farm() -> None:
    clock = ManualClock()
    big = Farm.build(clock, rigs=1000, pdus=20)
    big.meter.noise_frac = 0.0
    async with MeterServer(big, model="sunspec") as srv:
        meter = meter_for(srv)
        try:
            r = await meter.read(clock.now())
        finally:
            await meter.close()
    assert srv.scale.w_sf >= 2
    assert r.power_w == pytest.approx(big.meter.true_power_w(clock.now()), abs=10.0**srv.scale.w_sf)
    assert r.current_a[0] == pytest.approx(r.power_w / 3 / 230 / 0.97, rel=0.05)


# -- faults ------------------------------------------------------------------------------------


async def test_silent_meter_times_out_quickly(server: MeterServer, clock: ManualClock) -> None:
    meter = meter_for(server, timeout=0.3, retries=0)
    try:
        await meter.read(clock.now())  # connected and (for SunSpec) discovered
        server.fault = "silent"
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout) as err:
            await meter.read(clock.now())
        assert time.monotonic() - t0 < 1.0
        assert err.value.device == "meter-main" and err.value.operation
        server.fault = None
        await meter.read(clock.now())  # recovers on the next poll
    finally:
        await meter.close()


async def test_refused_connection_is_unreachable(clock: ManualClock) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # closed again when the block ends: nothing listens
    meter = ModbusMeter("meter-main", "127.0.0.1", port, timeout=0.3, retries=0)
    try:
        with pytest.raises(DeviceUnreachable, match="cannot connect"):
            await meter.read(clock.now())
    finally:
        await meter.close()


async def test_stopped_server_is_unreachable(farm: Farm, clock: ManualClock) -> None:
    srv = MeterServer(farm)
    await srv.start()
    meter = meter_for(srv, timeout=0.3, retries=0)
    try:
        await meter.read(clock.now())
        await srv.stop()
        with pytest.raises(DeviceUnreachable):
            await meter.read(clock.now())
    finally:
        await meter.close()
        await srv.stop()


async def test_connection_dropped_mid_request_is_unreachable(
    farm: Farm, clock: ManualClock
) -> None:
    srv = MeterServer(farm)
    await srv.start()
    meter = meter_for(srv, timeout=0.3, retries=0)
    try:
        await meter.read(clock.now())
        srv.fault = "silent"
        pending = asyncio.create_task(meter.read(clock.now()))
        await asyncio.sleep(0.05)  # the request is on the wire, unanswered
        await srv.stop()
        with pytest.raises(DeviceUnreachable, match="closed by the device"):
            await pending
    finally:
        await meter.close()
        await srv.stop()


async def test_exception_reply_is_rejected_with_code(
    server: MeterServer, clock: ManualClock
) -> None:
    server.fault = "exception"
    meter = meter_for(server, timeout=0.3, retries=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(CommandRejected) as err:
            await meter.read(clock.now())
        assert time.monotonic() - t0 < 0.25, "an exception reply is an answer, not a timeout"
        assert isinstance(err.value, ModbusExceptionReply)
        assert err.value.exception_code == 4
        assert "exception 4" in str(err.value)
    finally:
        await meter.close()


async def test_garbage_is_malformed_and_recovers(server: MeterServer, clock: ManualClock) -> None:
    meter = meter_for(server, timeout=0.3, retries=0)
    try:
        await meter.read(clock.now())
        server.fault = "garbage"
        with pytest.raises(MalformedReply, match="not a Modbus/TCP frame"):
            await meter.read(clock.now())
        server.fault = None
        r = await meter.read(clock.now())
        assert r.power_w > 0
    finally:
        await meter.close()


async def test_writes_to_the_sunspec_map_are_refused(farm: Farm, clock: ManualClock) -> None:
    """A stray write (or a fuzzer's) must not be able to break discovery for everyone else."""
    async with MeterServer(farm, model="sunspec") as srv:
        client = AsyncModbusTcpClient(srv.host, port=srv.port, timeout=0.5, retries=0)
        await client.connect()
        try:
            for addr in (40_000, srv.sunspec_meter_at, srv.sunspec_meter_at + 22):
                rr = await client.write_register(addr, 0x1234, device_id=1)
                assert rr.isError() and rr.exception_code == 2
        finally:
            client.close()
        meter = meter_for(srv)
        try:
            assert (await meter.read(clock.now())).power_w > 0
        finally:
            await meter.close()


async def test_garbage_bytes_actually_reach_the_client(farm: Farm) -> None:
    """The fault must be line noise on the wire, not just silence."""
    async with MeterServer(farm) as srv:
        srv.fault = "garbage"
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(bytes.fromhex("000100000006010400000002"))
        got = await asyncio.wait_for(reader.read(100), 1.0)
        writer.close()
    assert got == GARBAGE


# Raw frames a confused or hostile peer might send: pure noise, and MBAP-framed junk PDUs that
# get past the framer into pymodbus' decoder (including write requests).
_noise = st.binary(min_size=1, max_size=300)
_mbap_junk = st.builds(
    lambda tid, uid, pdu: struct.pack(">HHHB", tid, 0, len(pdu) + 1, uid) + pdu,
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, 2, 255]),
    st.binary(min_size=1, max_size=250),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(chunks=st.lists(st.one_of(_noise, _mbap_junk), min_size=1, max_size=4))
async def test_server_survives_random_bytes(
    server: MeterServer, clock: ManualClock, chunks: list[bytes]
) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        # Whatever comes back (an exception reply, nothing, a closed socket) is fine.
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(reader.read(1024), 0.02)
    finally:
        writer.close()
    meter = meter_for(server, timeout=1.0, retries=0)
    try:
        r = await meter.read(clock.now())
    finally:
        await meter.close()
    assert r.power_w > 0 and r.import_kwh > 0


# -- decoding ----------------------------------------------------------------------------------


def test_sunspec_primitives_and_sentinels() -> None:
    assert int16(0x8000) is None
    assert int16(0xFFFF) == -1 and int16(0x7FFF) == 32767
    assert sunssf(0x8000) is None
    assert sunssf(0xFFFE) == -2
    with pytest.raises(ValueError, match="outside"):
        sunssf(11)
    assert acc32([0, 0], 0) is None
    assert acc32([0x0001, 0x0002], 0) == 65538
    assert scaled(2292, -1) == 229.2
    assert scaled(-1234, -1) == -123.4
    assert scaled(5290, 1) == 52900.0
    assert scaled(None, 1) is None and scaled(5, None) is None
    assert i16_reg(1e9) == 0x7FFF and i16_reg(-1e9) == 0x8001  # never the 0x8000 sentinel


def _model_203(**overrides: int) -> list[int]:
    """A plausible model-203 block, with single points overridable by offset name."""
    b = [0x8000] * 107
    b[0:2] = [203, 105]
    b[2:7] = [2400, 800, 790, 810, 0xFFFF]  # A, AphA..C, A_SF=-1
    b[7:11] = [2300, 2298, 2301, 2302]  # PhV, PhVphA..C
    b[15] = 0xFFFF  # V_SF=-1
    b[16:18] = [5001, 0xFFFE]  # Hz, Hz_SF=-2
    b[18:23] = [5300, 1780, 1760, 1760, 1]  # W, WphA..C, W_SF=1
    b[38:54] = [0] * 16
    b[46:48] = u32_regs(123_456_780)  # TotWhImp (x10 Wh)
    b[54] = 1  # TotWh_SF
    for key, value in overrides.items():
        b[int(key.lstrip("o"))] = value
    return b


def test_decode_sunspec_int_model() -> None:
    r = decode_sunspec_meter(_model_203(), 5.0)
    assert r == MeterReading(
        ts=5.0,
        power_w=53000.0,
        import_kwh=1_234_567.8,
        export_kwh=None,
        voltage_v=(229.8, 230.1, 230.2),
        current_a=(80.0, 79.0, 81.0),
        frequency_hz=50.01,
    )
    # Single-phase meter: B and C not implemented, and a missing A SF hides all currents.
    single = decode_sunspec_meter(_model_203(o9=0x8000, o10=0x8000, o6=0x8000), 0.0)
    assert single.voltage_v == (229.8,) and single.current_a == ()
    assert decode_sunspec_meter(_model_203(o16=0x8000), 0.0).frequency_hz is None


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"o22": 0x8000}, UnsupportedOperation),  # W_SF not implemented
        ({"o18": 0x8000}, UnsupportedOperation),  # W not implemented
        ({"o46": 0, "o47": 0}, UnsupportedOperation),  # TotWhImp acc32 sentinel
        ({"o22": 12}, MalformedReply),  # SF outside -10..10
        ({"o15": 5}, MalformedReply),  # voltage of 2.3 GV
        ({"o0": 1}, UnsupportedOperation),  # not a meter model
    ],
)
def test_decode_sunspec_rejects(overrides: dict[str, int], error: type[DeviceError]) -> None:
    with pytest.raises(error) as err:
        decode_sunspec_meter(_model_203(**overrides), 0.0, device="m1")
    assert err.value.device == "m1"


def _model_213(**points: float) -> list[int]:
    b = [0] * 124 + [0xFFFF, 0]
    b[0:2] = [213, 124]
    values = {"A": 240.0, "AphA": 80.0, "AphB": 79.0, "AphC": 81.0, "PhVphA": 230.0,
              "PhVphB": 231.0, "PhVphC": 229.0, "Hz": 50.0, "W": 53000.0,
              "TotWhExp": math.nan, "TotWhImp": 1_234_567_800.0}  # fmt: skip
    values.update(points)
    offsets = {"A": 2, "AphA": 4, "AphB": 6, "AphC": 8, "PhVphA": 12, "PhVphB": 14,
               "PhVphC": 16, "Hz": 26, "W": 28, "TotWhExp": 60, "TotWhImp": 68}  # fmt: skip
    for name, off in offsets.items():
        b[off : off + 2] = f32_regs(values[name])
    return b


def test_decode_sunspec_float_model() -> None:
    r = decode_sunspec_meter(_model_213(), 1.0)
    assert r.power_w == 53000.0 and r.export_kwh is None
    assert r.import_kwh == pytest.approx(1_234_567.8, abs=0.2)  # float32 Wh
    assert r.voltage_v == (230.0, 231.0, 229.0) and r.frequency_hz == 50.0
    with pytest.raises(UnsupportedOperation, match="W"):
        decode_sunspec_meter(_model_213(W=math.nan), 1.0)  # NaN is the float sentinel
    with pytest.raises(MalformedReply, match="inf"):
        decode_sunspec_meter(_model_213(W=math.inf), 1.0)
    with pytest.raises(MalformedReply, match="import_kwh"):
        decode_sunspec_meter(_model_213(TotWhImp=-5.0), 1.0)


def _sdm_regs(**values: float) -> list[int]:
    regs = [0] * 76
    base = {0: 230.0, 2: 231.0, 4: 229.0, 6: 80.0, 8: 79.0, 10: 81.0, 52: 53000.0,
            70: 50.0, 72: 1234.5, 74: 0.0}  # fmt: skip
    base.update({int(k.lstrip("r")): v for k, v in values.items()})
    for addr, v in base.items():
        regs[addr : addr + 2] = f32_regs(v)
    return regs


def test_decode_sdm630() -> None:
    r = decode_sdm630(_sdm_regs(), 2.0)
    assert (r.power_w, r.import_kwh, r.export_kwh) == (53000.0, 1234.5, 0.0)
    assert r.voltage_v == (230.0, 231.0, 229.0) and r.current_a == (80.0, 79.0, 81.0)
    assert r.frequency_hz == 50.0
    assert decode_sdm630(_sdm_regs(r52=-1500.0), 0.0).power_w == -1500.0  # exporting is valid


@pytest.mark.parametrize(
    "bad",
    [
        {"r52": math.nan},  # no sentinels on Eastron: NaN is nonsense
        {"r72": math.nan},
        {"r72": -1.0},  # negative import energy
        {"r0": 1e9},  # implausible voltage (wrong map or word order)
        {"r52": 1e12},  # a terawatt
        {"r70": -50.0},
        {"r6": math.inf},
    ],
)
def test_decode_sdm630_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(MalformedReply):
        decode_sdm630(_sdm_regs(**bad), 0.0, device="m1")


def test_decode_sdm630_short_block() -> None:
    with pytest.raises(MalformedReply, match="expected 76"):
        decode_sdm630([0] * 10, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    regs=st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=130),
    model=st.sampled_from([201, 203, 204, 211, 213, 214, 1, 0xFFFF]),
)
def test_decoders_only_raise_typed_errors(regs: list[int], model: int) -> None:
    """Whatever registers arrive, the result is a reading or a DeviceError, never a crash."""
    for decode, block in ((decode_sdm630, regs), (decode_sunspec_meter, [model, *regs[1:]])):
        try:
            r = decode(block, 0.0)
        except DeviceError:
            continue
        assert math.isfinite(r.power_w) and r.import_kwh >= 0


def test_garbage_detection() -> None:
    good = bytes.fromhex("0001 0000 0007 01 04 04 4366 0000".replace(" ", ""))
    assert not looks_like_garbage(good, 4)
    assert not looks_like_garbage(bytes.fromhex("000100000003018402"), 4)  # exception reply
    assert not looks_like_garbage(good[:5], 4)  # a partial frame, more to come
    assert looks_like_garbage(GARBAGE, 4)
    assert looks_like_garbage(bytes.fromhex("0001 0000 0fff 01".replace(" ", "")), 4)
    assert looks_like_garbage(good, 3)  # a reply to some other request


def test_a_transport_closed_behind_pymodbus_is_reconnected(farm: Farm, clock: ManualClock) -> None:
    """Under uvloop, a connection reset while the loop is starved can leave pymodbus on a
    transport uvloop has closed, still "connected": every write then raises RuntimeError.
    Found in the 10,000-rig benchmark, where the meter was lost for good. The read fails as
    unreachable and the next poll reconnects."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        srv = MeterServer(farm)
        await srv.start()
        meter = meter_for(srv, timeout=0.5, retries=0)
        try:
            await meter.read(clock.now())
            client = meter._client
            assert client is not None
            proto = client.ctx
            transport = proto.transport
            assert transport is not None
            proto.connection_lost = lambda exc: None  # type: ignore[method-assign]
            transport.close()  # closed by the loop; pymodbus never told
            await asyncio.sleep(0.05)
            with pytest.raises(DeviceUnreachable, match="connection lost"):
                await meter.read(clock.now())
            assert (await meter.read(clock.now())).power_w > 0
        finally:
            await meter.close()
            await srv.stop()

    uvloop.run(scenario())
