"""The farm's grid meter over Modbus TCP: Eastron SDM630 or any SunSpec meter.

The meter is the controller's ground truth for the budget, so a reading is either trusted
numbers or a typed error; never a guess. Wire faults map onto drivers.errors like this:

* connect refused, connection not possible      -> DeviceUnreachable
* peer closed the connection during a request   -> DeviceUnreachable
* no reply within `timeout` (per attempt)       -> DeviceTimeout
* reply that is no Modbus/TCP frame (garbage)   -> MalformedReply, raised once the request has
  timed out (pymodbus discards such bytes silently; the driver notices them on the wire), so
  garbage costs as long as silence does
* Modbus exception response                     -> ModbusExceptionReply (a CommandRejected)
  carrying the exception code
* registers that decode to nonsense (NaN or infinite floats, negative energy, values no meter
  could show, out-of-range SunSpec scale factors) -> MalformedReply
* SunSpec meter whose total power or import energy is declared "not implemented", or a device
  without a SunSpec meter model                 -> UnsupportedOperation

An energy register that goes backwards is passed through: judging a meter replacement or a
rollover is the caller's business, not the wire driver's.

`timeout` is per attempt, as in pymodbus: one request can take timeout * (retries + 1).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.errors import (
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
)
from drivers.telemetry import MeterReading

log = structlog.get_logger(__name__)

MeterModel = Literal["sdm630", "sunspec"]

MAX_REGS_PER_REQUEST = 80  # Eastron answers larger reads with exceptions; SunSpec blocks fit too

# Eastron SDM630: FC04, float32 big-endian. Everything a reading needs lies in 0..75.
SDM_SPAN = (0, 76)
SDM_VOLTAGE = (0, 2, 4)
SDM_CURRENT = (6, 8, 10)
SDM_TOTAL_POWER = 52
SDM_FREQUENCY = 70
SDM_IMPORT_KWH = 72
SDM_EXPORT_KWH = 74

# SunSpec.
SUNSPEC_BASES = (40_000, 0, 50_000)  # the spec's order of preference
SUNSPEC_MARKER = (0x5375, 0x6E53)  # "SunS"
SUNSPEC_END_ID = 0xFFFF
SUNSPEC_INT_MODELS = frozenset({201, 202, 203, 204})
SUNSPEC_FLOAT_MODELS = frozenset({211, 212, 213, 214})
# Registers read from the model's ID register: up to TotWh_SF (offset 54) / TotWhImp (68-69).
SUNSPEC_INT_SPAN = 55
SUNSPEC_FLOAT_SPAN = 70
_MAX_CHAIN = 64  # real devices carry a handful of models; more means a corrupt chain
NOT_IMPLEMENTED_I16 = 0x8000  # int16 and sunssf sentinel
SF_RANGE = range(-10, 11)  # sunssf values the spec allows

# Bounds no grid meter of a mining farm can legitimately exceed; beyond them the registers are
# being misread (wrong map, word order, unit id) rather than describing the site.
MAX_ABS_POWER_W = 2e9
MAX_ENERGY_KWH = 1e12
MAX_VOLTAGE_V = 1e6
MAX_ABS_CURRENT_A = 1e6
MAX_FREQUENCY_HZ = 1000.0

# Modbus exception codes meaning "nothing at this address", which during discovery means "try
# the next candidate base" rather than "the meter is failing".
_NOT_HERE_CODES = frozenset({1, 2})


def quiet_pymodbus_logging() -> None:
    """pymodbus logs every timeout at ERROR with a hex dump of recent frames; the driver already
    turns those into typed errors with context, so keep them out of the daemon's log unless
    someone set the pymodbus logger's level on purpose."""
    lg = logging.getLogger("pymodbus")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)


class ModbusExceptionReply(CommandRejected):
    """The meter answered with a Modbus exception; the code says why (2 = bad address, 4 = device
    failure, 6 = busy), which is what anyone debugging a register map needs first."""

    def __init__(self, exception_code: int, *, device: str = "", operation: str = "") -> None:
        self.exception_code = exception_code
        super().__init__(f"Modbus exception {exception_code}", device=device, operation=operation)


# -- pure decoding ----------------------------------------------------------------------------


def f32(regs: Sequence[int], offset: int) -> float:
    """float32 from two registers, high word first (Eastron, SunSpec float models)."""
    return float(struct.unpack(">f", struct.pack(">HH", regs[offset], regs[offset + 1]))[0])


def int16(reg: int) -> int | None:
    """A SunSpec int16 point; None for 0x8000, the spec's "not implemented"."""
    if reg == NOT_IMPLEMENTED_I16:
        return None
    return reg - 0x10000 if reg & 0x8000 else reg


def sunssf(reg: int) -> int | None:
    """A SunSpec scale factor; None if not implemented, ValueError outside -10..10."""
    sf = int16(reg)
    if sf is not None and sf not in SF_RANGE:
        raise ValueError(f"scale factor {sf} outside -10..10")
    return sf


def acc32(regs: Sequence[int], offset: int) -> int | None:
    """A SunSpec acc32 accumulator (high word first); None for 0, the spec's "not accumulated"."""
    value = (regs[offset] << 16) | regs[offset + 1]
    return value or None


def scaled(raw: int | None, sf: int | None) -> float | None:
    """raw * 10**sf; missing if either part is missing, since a value without its scale is
    off by an unknown power of ten."""
    if raw is None or sf is None:
        return None
    # Dividing for negative SFs keeps 2292 * 10**-1 at 229.2 rather than 229.20000000000002.
    return raw * 10.0**sf if sf >= 0 else raw / 10.0**-sf


def float_point(value: float) -> float | None:
    """A SunSpec float32 point: NaN is "not implemented"."""
    return None if math.isnan(value) else value


def _phases(values: Sequence[float | None]) -> tuple[float, ...]:
    """Leading phases that are present: single- and split-phase meters leave B/C unimplemented,
    and a gap must not shift phase C into B's place."""
    out: list[float] = []
    for v in values:
        if v is None:
            break
        out.append(v)
    return tuple(out)


def validate(reading: MeterReading, *, device: str = "", operation: str = "decode") -> MeterReading:
    """Reject readings that no real meter produces; shared by every register map."""

    def check(name: str, value: float | None, low: float, high: float) -> None:
        if value is None:
            return
        if not math.isfinite(value):
            raise MalformedReply(f"{name} is {value}", device=device, operation=operation)
        if not low <= value <= high:
            raise MalformedReply(
                f"{name} = {value:g} outside plausible {low:g}..{high:g}",
                device=device,
                operation=operation,
            )

    check("power_w", reading.power_w, -MAX_ABS_POWER_W, MAX_ABS_POWER_W)
    check("import_kwh", reading.import_kwh, 0.0, MAX_ENERGY_KWH)
    check("export_kwh", reading.export_kwh, 0.0, MAX_ENERGY_KWH)
    for i, v in enumerate(reading.voltage_v, start=1):
        check(f"voltage L{i}", v, 0.0, MAX_VOLTAGE_V)
    for i, a in enumerate(reading.current_a, start=1):
        check(f"current L{i}", a, -MAX_ABS_CURRENT_A, MAX_ABS_CURRENT_A)
    check("frequency_hz", reading.frequency_hz, 0.0, MAX_FREQUENCY_HZ)
    return reading


def decode_sdm630(regs: Sequence[int], ts: float, *, device: str = "") -> MeterReading:
    """SDM630 input registers 0..75 (as read from address 0) into a reading.

    The Eastron map has no "not implemented" marker, so any NaN is a malformed reply.
    """
    if len(regs) < SDM_SPAN[1]:
        raise MalformedReply(
            f"expected {SDM_SPAN[1]} registers, got {len(regs)}", device=device, operation="decode"
        )
    return validate(
        MeterReading(
            ts=ts,
            power_w=f32(regs, SDM_TOTAL_POWER),
            import_kwh=f32(regs, SDM_IMPORT_KWH),
            export_kwh=f32(regs, SDM_EXPORT_KWH),
            voltage_v=tuple(f32(regs, a) for a in SDM_VOLTAGE),
            current_a=tuple(f32(regs, a) for a in SDM_CURRENT),
            frequency_hz=f32(regs, SDM_FREQUENCY),
        ),
        device=device,
    )


def _mandatory(name: str, value: float | None, model: int, *, device: str) -> float:
    if value is None:
        raise UnsupportedOperation(
            f"SunSpec model {model} marks {name} as not implemented",
            device=device,
            operation="decode",
        )
    return value


def decode_sunspec_meter(block: Sequence[int], ts: float, *, device: str = "") -> MeterReading:
    """A SunSpec meter model block (from its ID register) into a reading.

    Handles 201-204 (int16 + scale factors, acc32 Wh) and 211-214 (float32). Sentinels become
    missing values; missing total power or import energy cannot make a reading.
    """
    if len(block) < 2:
        raise MalformedReply("empty SunSpec model block", device=device, operation="decode")
    model = block[0]
    if model not in SUNSPEC_INT_MODELS | SUNSPEC_FLOAT_MODELS:
        raise UnsupportedOperation(
            f"SunSpec model {model} is not a meter model", device=device, operation="decode"
        )
    need = SUNSPEC_INT_SPAN if model in SUNSPEC_INT_MODELS else SUNSPEC_FLOAT_SPAN
    if len(block) < need:
        raise MalformedReply(
            f"SunSpec model {model}: expected {need} registers, got {len(block)}",
            device=device,
            operation="decode",
        )
    try:
        if model in SUNSPEC_INT_MODELS:
            a_sf, v_sf, hz_sf = sunssf(block[6]), sunssf(block[15]), sunssf(block[17])
            w_sf, wh_sf = sunssf(block[22]), sunssf(block[54])
            power = scaled(int16(block[18]), w_sf)
            imp_wh = scaled(acc32(block, 46), wh_sf)
            exp_wh = scaled(acc32(block, 38), wh_sf)
            volts = [scaled(int16(block[o]), v_sf) for o in (8, 9, 10)]
            amps = [scaled(int16(block[o]), a_sf) for o in (3, 4, 5)]
            hz = scaled(int16(block[16]), hz_sf)
        else:
            power = float_point(f32(block, 28))
            imp_wh = float_point(f32(block, 68))
            exp_wh = float_point(f32(block, 60))
            volts = [float_point(f32(block, o)) for o in (12, 14, 16)]
            amps = [float_point(f32(block, o)) for o in (4, 6, 8)]
            hz = float_point(f32(block, 26))
    except ValueError as exc:
        raise MalformedReply(str(exc), device=device, operation="decode") from exc
    return validate(
        MeterReading(
            ts=ts,
            power_w=_mandatory("W", power, model, device=device),
            import_kwh=_mandatory("TotWhImp", imp_wh, model, device=device) / 1000.0,
            export_kwh=None if exp_wh is None else exp_wh / 1000.0,
            voltage_v=_phases(volts),
            current_a=_phases(amps),
            frequency_hz=hz,
        ),
        device=device,
    )


# -- the driver -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SunSpecLocation:
    """Where the meter model sits; found once per connection target, since walking the chain
    costs several round trips on a slow serial gateway."""

    base: int
    address: int  # of the model's ID register
    model: int
    length: int


class ModbusMeter:
    """One grid meter reached over Modbus TCP, polled by `read()`.

    Keeps a single pymodbus client (pymodbus serialises requests per client, which is what a
    serial gateway behind the TCP address needs) and reconnects on demand at the next read,
    not in the background, so a dead meter costs nothing between polls.
    """

    def __init__(
        self,
        device: str,
        host: str,
        port: int = 502,
        *,
        model: MeterModel = "sdm630",
        unit_id: int = 1,
        timeout: float = 2.0,
        retries: int = 1,
    ) -> None:
        if model not in ("sdm630", "sunspec"):
            raise ValueError(f"unknown meter model {model!r}")
        if not 0 <= unit_id <= 255:
            raise ValueError(f"unit id must be 0-255, got {unit_id}")
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be positive and retries non-negative")
        quiet_pymodbus_logging()
        self.device = device
        self.host = host
        self.port = port
        self.model: MeterModel = model
        self.unit_id = unit_id
        self.timeout = timeout
        self.retries = retries
        self.sunspec: SunSpecLocation | None = None
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()
        # What the wire did during the request in flight (set from pymodbus' trace hooks).
        self._expected_fc = 0
        self._saw_garbage = False
        self._dropped = False

    async def read(self, ts: float) -> MeterReading:
        """One poll: total power, energy registers, per-phase voltage/current, frequency."""
        async with self._lock:
            if self.model == "sdm630":
                regs = await self._read(4, SDM_SPAN[0], SDM_SPAN[1], "read sdm630")
                return decode_sdm630(regs, ts, device=self.device)
            return await self._read_sunspec(ts)

    async def close(self) -> None:
        async with self._lock:
            self._drop_client()

    # -- SunSpec --------------------------------------------------------------------------------

    async def _read_sunspec(self, ts: float) -> MeterReading:
        for attempt in range(2):
            loc = self.sunspec or await self._discover()
            span = SUNSPEC_INT_SPAN if loc.model in SUNSPEC_INT_MODELS else SUNSPEC_FLOAT_SPAN
            block = await self._read(3, loc.address, span, "read sunspec meter")
            if block[0] == loc.model and block[1] == loc.length:
                return decode_sunspec_meter(block, ts, device=self.device)
            # The device behind the address changed (replaced, reconfigured): look again, once.
            log.info(
                "sunspec meter model moved, rediscovering",
                device=self.device,
                expected=loc.model,
                found=block[0],
            )
            self.sunspec = None
            if attempt:
                break
        raise MalformedReply(
            "SunSpec model chain changed between discovery and read",
            device=self.device,
            operation="read sunspec meter",
        )

    async def _discover(self) -> SunSpecLocation:
        base = await self._find_base()
        addr, seen = base + 2, []
        for _ in range(_MAX_CHAIN):
            if addr + 2 > 0x10000:
                break
            try:
                model, length = await self._read(3, addr, 2, "walk sunspec models")
            except ModbusExceptionReply as exc:
                if exc.exception_code not in _NOT_HERE_CODES:
                    raise
                raise MalformedReply(
                    f"SunSpec model chain points past the register map at {addr}",
                    device=self.device,
                    operation="walk sunspec models",
                ) from exc
            if model == SUNSPEC_END_ID:
                break
            seen.append(model)
            meter_len = SUNSPEC_INT_SPAN if model in SUNSPEC_INT_MODELS else SUNSPEC_FLOAT_SPAN
            if model in SUNSPEC_INT_MODELS | SUNSPEC_FLOAT_MODELS:
                if length + 2 < meter_len:
                    raise MalformedReply(
                        f"SunSpec model {model} at {addr} has length {length}, too short",
                        device=self.device,
                        operation="walk sunspec models",
                    )
                self.sunspec = SunSpecLocation(base, addr, model, length)
                log.info(
                    "sunspec meter found", device=self.device, base=base, model=model, address=addr
                )
                return self.sunspec
            addr += 2 + length
        raise UnsupportedOperation(
            f"no SunSpec meter model (201-204, 211-214) in chain {seen}",
            device=self.device,
            operation="walk sunspec models",
        )

    async def _find_base(self) -> int:
        for base in SUNSPEC_BASES:
            try:
                marker = await self._read(3, base, 2, "find sunspec base")
            except ModbusExceptionReply as exc:
                if exc.exception_code in _NOT_HERE_CODES:
                    continue
                raise
            if tuple(marker) == SUNSPEC_MARKER:
                return base
        raise UnsupportedOperation(
            f"no SunSpec marker at {', '.join(map(str, SUNSPEC_BASES))}",
            device=self.device,
            operation="find sunspec base",
        )

    # -- the wire ---------------------------------------------------------------------------

    async def _connected(self, operation: str) -> AsyncModbusTcpClient:
        if self._client is None:
            self._client = AsyncModbusTcpClient(
                self.host,
                port=self.port,
                timeout=self.timeout,
                retries=self.retries,
                reconnect_delay=0,  # reconnect at the next poll, not in a background task
                name=self.device,
                trace_packet=self._trace_packet,
                trace_connect=self._trace_connect,
            )
        client = self._client
        if not client.connected:
            log.debug("connecting", device=self.device, host=self.host, port=self.port)
            if not await client.connect():
                self._drop_client()
                raise DeviceUnreachable(
                    f"cannot connect to {self.host}:{self.port}",
                    device=self.device,
                    operation=operation,
                )
        return client

    async def _read(self, fc: Literal[3, 4], address: int, count: int, operation: str) -> list[int]:
        """Registers [address, address+count) in requests of at most 80 registers."""
        out: list[int] = []
        while count > 0:
            n = min(count, MAX_REGS_PER_REQUEST)
            out += await self._request(fc, address, n, operation)
            address, count = address + n, count - n
        return out

    async def _request(
        self, fc: Literal[3, 4], address: int, count: int, operation: str
    ) -> list[int]:
        where = f"{operation} fc{fc} @{address}+{count}"
        client = await self._connected(where)
        self._expected_fc, self._saw_garbage, self._dropped = fc, False, False
        # pymodbus bounds each attempt itself; this outer bound only guards against it hanging.
        deadline = self.timeout * (self.retries + 1) + 1.0
        try:
            async with asyncio.timeout(deadline):
                if fc == 3:
                    rr = await client.read_holding_registers(
                        address, count=count, device_id=self.unit_id
                    )
                else:
                    rr = await client.read_input_registers(
                        address, count=count, device_id=self.unit_id
                    )
        except ConnectionException as exc:
            self._drop_client()
            raise DeviceUnreachable(str(exc), device=self.device, operation=where) from exc
        except (ModbusIOException, TimeoutError) as exc:
            # The stream may hold a late or partial reply; start the next poll on a clean one.
            self._drop_client()
            raise self._no_reply_error(exc, where) from exc
        except ModbusException as exc:
            self._drop_client()
            raise MalformedReply(str(exc), device=self.device, operation=where) from exc
        except OSError as exc:
            self._drop_client()
            raise DeviceUnreachable(str(exc), device=self.device, operation=where) from exc
        except RuntimeError as exc:
            # uvloop refuses to write on a transport it closed (a reset seen while the loop
            # was starved) before pymodbus heard of it; pymodbus then still says connected
            # and every later poll would fail the same way: a new connection instead.
            self._drop_client()
            raise DeviceUnreachable(
                f"connection lost: {exc}", device=self.device, operation=where
            ) from exc
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            if not isinstance(code, int):
                raise MalformedReply(
                    f"error reply without exception code: {rr!r}",
                    device=self.device,
                    operation=where,
                )
            raise ModbusExceptionReply(code, device=self.device, operation=where)
        regs = getattr(rr, "registers", None)
        if not isinstance(regs, list) or len(regs) != count:
            got = len(regs) if isinstance(regs, list) else regs
            raise MalformedReply(
                f"asked for {count} registers, got {got}", device=self.device, operation=where
            )
        return [int(r) for r in regs]

    def _no_reply_error(self, exc: BaseException, where: str) -> DeviceError:
        """Silence, line noise and a dropped connection all end in a pymodbus timeout; tell them
        apart by what the trace hooks saw on the wire meanwhile."""
        if self._saw_garbage:
            return MalformedReply(
                "reply is not a Modbus/TCP frame", device=self.device, operation=where
            )
        if isinstance(exc, ModbusIOException) and "No response" not in str(exc):
            # A reply came but for another unit id or transaction: a confused gateway.
            return MalformedReply(str(exc), device=self.device, operation=where)
        if self._dropped:
            return DeviceUnreachable(
                "connection closed by the device during the request",
                device=self.device,
                operation=where,
            )
        return DeviceTimeout(
            f"no reply after {self.retries + 1} x {self.timeout:g} s",
            device=self.device,
            operation=where,
        )

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Flags bytes pymodbus will silently discard: a frame whose protocol id is not 0, whose
        length field is impossible, or whose function code is not the one asked for."""
        if not sending and looks_like_garbage(data, self._expected_fc):
            self._saw_garbage = True
        return data

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self._dropped = True

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def looks_like_garbage(buf: bytes, expected_fc: int) -> bool:
    """Whether received bytes cannot be the start of a Modbus/TCP reply to function expected_fc."""
    if len(buf) >= 4 and buf[2:4] != b"\x00\x00":
        return True
    if len(buf) >= 6 and not 2 <= int.from_bytes(buf[4:6], "big") <= 254:
        return True
    return bool(len(buf) >= 8 and expected_fc and buf[7] not in (expected_fc, expected_fc | 0x80))
