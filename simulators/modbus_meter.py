"""A grid meter on Modbus TCP: the farm's import meter as an Eastron SDM630 or a SunSpec meter.

The daemon's meter driver must be tested against real Modbus framing on a real socket, not a
mock of the client, so this serves the vendor register maps with pymodbus' own server. Values
are computed from the farm model at the moment a request arrives (pymodbus' `action=` hook runs
before every read), so a test that advances the clock and reads again sees the new state
without any background updater racing it.

Faults that the pymodbus server cannot produce (a device that accepts TCP but never answers, or
one that answers line noise) are applied by a small TCP front that the clients connect to and
that relays bytes to the internal pymodbus server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
from dataclasses import dataclass
from typing import Literal, cast

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simdevice import SimAction

from simulators.farm import Farm

log = structlog.get_logger(__name__)

MeterModel = Literal["sdm630", "sunspec"]
Fault = Literal["silent", "exception", "garbage", "slow"]

# Not a Modbus/TCP frame: the protocol-id field (bytes 2-3) is non-zero and the rest is text,
# the kind of thing a misconfigured serial gateway or a web server on port 502 sends back.
GARBAGE = b"\x13\x37\xde\xad\xbe\xef<html>not modbus</html>\r\n"

# Three phases are never perfectly balanced; a fixed split keeps the sum exact.
_PHASE_SHARE = (0.336, 0.331, 0.333)

# SunSpec model 203 (wye meter) offsets from the model's ID register, per the SunSpec models.
SUNSPEC_METER_ID = 203
SUNSPEC_METER_LEN = 105
_SUNSPEC_MARKER = (0x5375, 0x6E53)  # "SunS"
_SUNSPEC_END = (0xFFFF, 0x0000)
_VENDOR_MODEL_ID = 64_001  # a manufacturer-specific model, to make clients walk the chain
_VENDOR_MODEL_LEN = 8
_NOT_IMPLEMENTED_I16 = 0x8000


def quiet_pymodbus_logging() -> None:
    """Keep pymodbus' error-path hex dumps out of the daemon's and the tests' output.

    Only touches the logger if nobody configured it, so `logging.getLogger("pymodbus")
    .setLevel(logging.DEBUG)` still works when debugging a real device.
    """
    lg = logging.getLogger("pymodbus")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)


# -- register encoding ---------------------------------------------------------------------


def f32_regs(value: float) -> list[int]:
    """IEEE-754 float32, high word first (Eastron, SunSpec float models)."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def u32_regs(value: int) -> list[int]:
    """Unsigned 32-bit, high word first; wraps like a real accumulator register."""
    value %= 1 << 32
    return [value >> 16, value & 0xFFFF]


def i16_reg(value: float) -> int:
    """A signed 16-bit point, rounded and saturated.

    Saturation stops at -32767 because -32768 (0x8000) is SunSpec's "not implemented".
    """
    n = max(-32767, min(32767, round(value)))
    return n & 0xFFFF


def str_regs(text: str, n_regs: int) -> list[int]:
    """An ASCII string padded with NULs to a fixed register width (SunSpec strings)."""
    raw = text.encode("ascii")[: 2 * n_regs].ljust(2 * n_regs, b"\x00")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def fit_scale_factor(max_abs: float, *, minimum: int) -> int:
    """Smallest power-of-ten exponent >= minimum at which max_abs still fits an int16.

    Fixed at start-up from the farm's worst case, like a real meter's CT-ratio-dependent SF.
    """
    sf = minimum
    while max_abs / 10.0**sf > 32_000:
        sf += 1
    return sf


# -- what the meter measures at one instant -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent set of readings, so totals and per-phase values agree within a reply."""

    power_w: float
    import_kwh: float
    export_kwh: float
    voltage_v: tuple[float, float, float]
    current_a: tuple[float, float, float]
    phase_power_w: tuple[float, float, float]
    power_factor: float
    frequency_hz: float

    @property
    def apparent_va(self) -> float:
        return self.power_w / self.power_factor

    @property
    def reactive_var(self) -> float:
        return self.power_w * math.tan(math.acos(self.power_factor))


def take_snapshot(farm: Farm) -> Snapshot:
    """Read the farm meter now, dressing the power figure with plausible grid quantities."""
    t = farm.now()
    p = farm.meter.power_w(t)
    pf = 0.97 + 0.01 * math.sin(t / 53.0)
    volts = tuple(230.0 + 1.2 * math.sin(t / 97.0 + 2.1 * k) for k in range(3))
    phase_p = tuple(p * share for share in _PHASE_SHARE)
    amps = tuple(pp / (v * pf) for pp, v in zip(phase_p, volts, strict=True))
    return Snapshot(
        power_w=p,
        import_kwh=farm.meter.import_kwh(t),
        export_kwh=0.0,  # a mining farm does not feed the grid
        voltage_v=(volts[0], volts[1], volts[2]),
        current_a=(amps[0], amps[1], amps[2]),
        phase_power_w=(phase_p[0], phase_p[1], phase_p[2]),
        power_factor=pf,
        frequency_hz=50.0 + 0.03 * math.sin(t / 17.0),
    )


# -- Eastron SDM630 -----------------------------------------------------------------------------

# Input-register spans served (start, count). Unused addresses inside a span read as 0, as on
# the real meter; addresses outside answer exception 2.
SDM_INPUT_SPANS = ((0, 90), (200, 6), (342, 16))


def sdm630_input_image(s: Snapshot, max_demand_w: float) -> dict[int, int]:
    """Every live SDM630 input register (FC04), float32 big-endian, keyed by wire address."""
    vals: dict[int, float] = {}
    for k in range(3):
        vals[0 + 2 * k] = s.voltage_v[k]
        vals[6 + 2 * k] = s.current_a[k]
        vals[12 + 2 * k] = s.phase_power_w[k]
        vals[18 + 2 * k] = s.phase_power_w[k] / s.power_factor
        vals[24 + 2 * k] = s.phase_power_w[k] * math.tan(math.acos(s.power_factor))
        vals[30 + 2 * k] = s.power_factor
        vals[200 + 2 * k] = s.voltage_v[k] * math.sqrt(3.0)  # L1-L2, L2-L3, L3-L1
        vals[346 + 2 * k] = s.import_kwh * _PHASE_SHARE[k]
        vals[352 + 2 * k] = 0.0
    vals[42] = sum(s.voltage_v) / 3.0
    vals[46] = sum(s.current_a) / 3.0
    vals[48] = sum(s.current_a)
    vals[52] = s.power_w
    vals[56] = s.apparent_va
    vals[60] = s.reactive_var
    vals[62] = s.power_factor
    vals[70] = s.frequency_hz
    vals[72] = s.import_kwh
    vals[74] = s.export_kwh
    vals[76] = s.import_kwh * math.tan(math.acos(s.power_factor))  # kVArh, roughly
    vals[78] = 0.0
    vals[84] = s.power_w  # demand: the meter's averaging window is not modelled
    vals[86] = max_demand_w
    vals[342] = s.import_kwh + s.export_kwh
    image: dict[int, int] = {}
    for addr, v in vals.items():
        image[addr], image[addr + 1] = f32_regs(v)
    return image


def _sdm630_device(unit_id: int, action: SimAction) -> SimDevice:
    """SDM630 with separate banks: FC04 measurements, FC03 configuration."""
    inputs = [
        SimData(start, count=count, values=0, datatype=DataType.REGISTERS, readonly=True)
        for start, count in SDM_INPUT_SPANS
    ]
    holding = [0] * 30
    holding[18:20] = f32_regs(0.0)  # parity/stop: one stop bit, no parity
    holding[20:22] = f32_regs(float(unit_id))  # Modbus node address
    holding[28:30] = f32_regs(2.0)  # baud code 2 = 9600
    holding_data = [
        SimData(0, values=holding, datatype=DataType.REGISTERS),
        SimData(0xFC00, values=20_240_001, datatype=DataType.UINT32),  # serial number
    ]
    bits = [SimData(0, values=False, datatype=DataType.BITS)]
    return SimDevice(id=unit_id, simdata=(bits, bits, holding_data, inputs), action=action)


# -- SunSpec -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SunSpecScale:
    """Scale factors of the int+SF meter model; fixed for the life of the server."""

    a_sf: int
    v_sf: int = -1
    hz_sf: int = -2
    w_sf: int = 1
    pf_sf: int = -1
    wh_sf: int = 1


def sunspec_static_map(
    *, base: int, common_len: int, serial: str, unit_id: int, scale: SunSpecScale, vendor: bool
) -> tuple[list[int], int]:
    """The whole SunSpec register space from `base`, with measurements zeroed.

    Returns the registers and the address of the meter model's ID register. The common model's
    length is a parameter because old devices report L=65 (no Pad) and clients must cope.
    """
    if common_len not in (65, 66):
        raise ValueError(f"common model length must be 65 or 66, got {common_len}")
    regs: list[int] = [*_SUNSPEC_MARKER, 1, common_len]
    regs += str_regs("rigd-sim", 16)  # Mn
    regs += str_regs("SunSpec 203 meter", 16)  # Md
    regs += str_regs("", 8)  # Opt
    regs += str_regs("1.0.0", 8)  # Vr
    regs += str_regs(serial, 16)  # SN
    regs.append(unit_id)  # DA
    if common_len == 66:
        regs.append(_NOT_IMPLEMENTED_I16)  # Pad
    if vendor:
        regs += [_VENDOR_MODEL_ID, _VENDOR_MODEL_LEN] + [0] * _VENDOR_MODEL_LEN
    meter_at = base + len(regs)
    model = [_NOT_IMPLEMENTED_I16] * (SUNSPEC_METER_LEN + 2)
    model[0:2] = [SUNSPEC_METER_ID, SUNSPEC_METER_LEN]
    for off, sf in (
        (6, scale.a_sf),
        (15, scale.v_sf),
        (17, scale.hz_sf),
        (22, scale.w_sf),
        (27, scale.w_sf),  # VA_SF
        (32, scale.w_sf),  # VAR_SF
        (37, scale.pf_sf),
        (54, scale.wh_sf),
    ):
        model[off] = sf & 0xFFFF
    model[38:54] = [0] * 16  # acc32 energies: 0 = not accumulated, filled live below
    model[55:71] = [0] * 16  # VAh: not implemented (acc32 sentinel)
    model[72:104] = [0] * 32  # VArh quadrants: not implemented
    model[105:107] = [0, 0]  # Evt: no events
    regs += model + list(_SUNSPEC_END)
    return regs, meter_at


def sunspec_meter_image(s: Snapshot, meter_at: int, scale: SunSpecScale) -> dict[int, int]:
    """The live points of model 203 (integer + scale factor), keyed by wire address."""

    def q(value: float, sf: int) -> int:
        return i16_reg(value / 10.0**sf)

    wh = 10.0**scale.wh_sf
    pts: dict[int, int] = {
        2: q(sum(s.current_a), scale.a_sf),
        7: q(sum(s.voltage_v) / 3.0, scale.v_sf),
        11: q(sum(s.voltage_v) / 3.0 * math.sqrt(3.0), scale.v_sf),
        16: q(s.frequency_hz, scale.hz_sf),
        18: q(s.power_w, scale.w_sf),
        23: q(s.apparent_va, scale.w_sf),
        28: q(s.reactive_var, scale.w_sf),
        33: q(s.power_factor * 100.0, scale.pf_sf),
    }
    for k in range(3):
        pts[3 + k] = q(s.current_a[k], scale.a_sf)
        pts[8 + k] = q(s.voltage_v[k], scale.v_sf)
        pts[12 + k] = q(s.voltage_v[k] * math.sqrt(3.0), scale.v_sf)
        pts[19 + k] = q(s.phase_power_w[k], scale.w_sf)
        pts[24 + k] = q(s.phase_power_w[k] / s.power_factor, scale.w_sf)
        pts[29 + k] = q(s.phase_power_w[k] * math.tan(math.acos(s.power_factor)), scale.w_sf)
        pts[34 + k] = q(s.power_factor * 100.0, scale.pf_sf)
    image = {meter_at + off: reg for off, reg in pts.items()}
    # Energies are acc32 (export stays 0: "not accumulated", which is also the truth here).
    energies = [(46, s.import_kwh * 1000.0)]
    energies += [(48 + 2 * k, s.import_kwh * 1000.0 * _PHASE_SHARE[k]) for k in range(3)]
    for off, value_wh in energies:
        hi, lo = u32_regs(int(value_wh / wh))
        image[meter_at + off], image[meter_at + off + 1] = hi, lo
    return image


# -- the server ---------------------------------------------------------------------------------


class MeterServer:
    """The farm's grid meter as a Modbus TCP device on loopback.

    `fault` can be changed at any time and applies to the next request:
    "silent" accepts connections and swallows requests, "exception" answers every read with
    Modbus exception 4 (device failure), "garbage" answers with bytes that are no Modbus frame,
    "slow" answers each request `slow_s` wall seconds late (a meter behind a busy gateway).
    """

    def __init__(
        self,
        farm: Farm,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: MeterModel = "sdm630",
        unit_id: int = 1,
        sunspec_base: int = 40_000,
        sunspec_common_len: int = 66,
        sunspec_vendor_model: bool = False,
        w_sf: int | None = None,
    ) -> None:
        if model not in ("sdm630", "sunspec"):
            raise ValueError(f"unknown meter model {model!r}")
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit id must be 1-247, got {unit_id}")
        if sunspec_base not in (0, 40_000, 50_000):
            raise ValueError(f"SunSpec base must be 0, 40000 or 50000, got {sunspec_base}")
        quiet_pymodbus_logging()
        self.farm = farm
        self.model: MeterModel = model
        self.unit_id = unit_id
        self.fault: Fault | None = None
        self.slow_s = 1.0
        self.requests = 0  # reads answered from the register map (not counting faults)
        self._bind = (host, port)
        self.host = host
        self.port = port
        self._max_demand_w = 0.0
        # The worst case the meter could see: every rig at its highest power target.
        meter = farm.meter
        max_w = meter.overhead_base_w + sum(r.model.max_w for r in farm.rigs.values()) * (
            1.0 + meter.overhead_frac
        )
        headroom_w = max_w * 1.5
        self.scale = SunSpecScale(
            a_sf=fit_scale_factor(headroom_w / 230.0 / 0.9, minimum=-1),
            w_sf=fit_scale_factor(headroom_w, minimum=0) if w_sf is None else w_sf,
        )
        self._sunspec_regs: list[int] = []
        self.sunspec_meter_at = -1
        if model == "sunspec":
            self._sunspec_regs, self.sunspec_meter_at = sunspec_static_map(
                base=sunspec_base,
                common_len=sunspec_common_len,
                serial=f"SIM-{meter.id}",
                unit_id=unit_id,
                scale=self.scale,
                vendor=sunspec_vendor_model,
            )
        self._sunspec_base = sunspec_base
        self._modbus: ModbusTcpServer | None = None
        self._front: asyncio.Server | None = None
        self._upstream: tuple[str, int] = ("127.0.0.1", 0)
        self._conns: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._front is not None:
            return
        if self.model == "sdm630":
            device = _sdm630_device(self.unit_id, self._action)
        else:
            # Shared bank: SunSpec devices answer FC03 (and often FC04) from one register space.
            device = SimDevice(
                id=self.unit_id,
                simdata=[
                    SimData(
                        self._sunspec_base,
                        values=self._sunspec_regs,
                        datatype=DataType.REGISTERS,
                        readonly=True,  # a stray write must not corrupt the model chain
                    )
                ],
                action=self._action,
            )
        self._modbus = ModbusTcpServer(device, address=("127.0.0.1", 0))
        await self._modbus.serve_forever(background=True)
        listener = cast(asyncio.Server, self._modbus.transport)  # a TCP server's transport
        sock = listener.sockets[0]
        self._upstream = ("127.0.0.1", int(sock.getsockname()[1]))
        self._front = await asyncio.start_server(self._relay, *self._bind)
        bound = self._front.sockets[0].getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        log.debug("meter simulator listening", model=self.model, host=self.host, port=self.port)

    async def stop(self) -> None:
        front, self._front = self._front, None
        if front is not None:
            front.close()
        # Closing the sockets (rather than cancelling the handlers, which asyncio's stream server
        # reports as an error on 3.11) lets every relay finish on its own.
        for writers in self._conns.values():
            for w in writers:
                w.transport.abort()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=1.0)
        if front is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(front.wait_closed(), 1.0)
        modbus, self._modbus = self._modbus, None
        if modbus is not None:
            await modbus.shutdown()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> MeterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- live values ----------------------------------------------------------------------------

    def live_image(self, func_code: int) -> dict[int, int]:
        """Current values of the registers that change, for one function code's bank."""
        if self.model == "sdm630":
            if func_code != 4:
                return {}  # holding registers are configuration, not measurements
            snap = take_snapshot(self.farm)
            self._max_demand_w = max(self._max_demand_w, snap.power_w)
            return sdm630_input_image(snap, self._max_demand_w)
        if func_code not in (3, 4):
            return {}
        return sunspec_meter_image(take_snapshot(self.farm), self.sunspec_meter_at, self.scale)

    async def _action(
        self,
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Runs inside pymodbus before each access: refresh the requested window from the farm."""
        if self.fault == "exception":
            return ExcCodes.DEVICE_FAILURE
        if set_values is not None:
            return None  # writes (SDM configuration) are accepted as-is
        self.requests += 1
        image = self.live_image(func_code)
        for addr in range(address, address + count):
            if addr in image:
                registers[addr - start_address] = image[addr]
        return None

    # -- the TCP front ----------------------------------------------------------------------

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writers = [writer]
        self._conns[task] = writers
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            writers.append(up_writer)
            back = asyncio.create_task(self._pump(up_reader, writer))
            try:
                await self._forward(reader, writer, up_writer)
            finally:
                up_writer.close()
                await asyncio.wait([back], timeout=1.0)
        except OSError:
            pass  # the client or the internal server went away; the sockets are closed below
        finally:
            for w in writers:
                w.close()
            del self._conns[task]

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Client to meter, applying the fault in force when each chunk arrives."""
        while data := await reader.read(4096):
            fault = self.fault
            if fault == "silent":
                continue
            if fault == "garbage":
                writer.write(GARBAGE)
                await writer.drain()
                continue
            if fault == "slow":
                await asyncio.sleep(self.slow_s)
            up_writer.write(data)
            await up_writer.drain()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        writer.close()
