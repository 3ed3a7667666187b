"""Driver for APC switched, outlet-metered rack PDUs (PowerNet-MIB rPDU2) over SNMP v2c or v3.

Two kinds of poll. The full walk (the first read, then every `walk_every_s` of poll time,
and whenever a row went missing) GETBULKs every outlet column, names and numbers included:
the device power and energy ride along as non-repeaters (a GETNEXT of each column lands on
device row 1), the columns are the repeaters, and larger PDUs page on from the last row.
Between walks a poll is one GET of what changes and what control needs: device power and
energy, and each known row's state and power (`steady_oids`); names and numbers come from
the last walk. Packets, not OIDs, are what to save, and so is decoding.

Decoding is the cost: pysnmp/pyasn1 spend about 20 ms of CPU on one 24-outlet poll. So
v2c reads and SETs are encoded and decoded by `drivers.snmp_wire` (the small BER subset
they need) over one UDP socket per event loop, and pysnmp is kept for SNMP v3 (USM
authentication and privacy) in `drivers.apc_snmp_v3`, imported only by a v3 PDU: a farm
of v2c PDUs never loads pysnmp (about 24 MB of memory). `close_engines()` closes the v2c
socket and any v3 engines at shutdown. Everything is translated into the typed errors of
`drivers.errors` with the device and operation attached, and odd values ("-1 =
unsupported", missing instances) become None rather than exceptions.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import operator
import socket
import sys
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from drivers import snmp_v2c, snmp_wire
from drivers.base import OutletAction
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
)
from drivers.telemetry import OutletReading, PduReading

if TYPE_CHECKING:  # imported by a v3 PDU only (see the module docstring)
    from drivers.apc_snmp_v3 import V3Session

log = structlog.get_logger(__name__)

Oid = tuple[int, ...]
VarBind = tuple[Oid, Any]

R2: Oid = (1, 3, 6, 1, 4, 1, 318, 1, 1, 26)
DEVICE_POWER: Oid = (*R2, 4, 3, 1, 5)  # rPDU2DeviceStatusPower, hundredths of kW
DEVICE_ENERGY: Oid = (*R2, 4, 3, 1, 9)  # rPDU2DeviceStatusEnergy, tenths of kWh
OUTLET_MODULE: Oid = (*R2, 9, 2, 3, 1, 2)  # rPDU2OutletSwitchedStatusModule (NPS unit)
OUTLET_NAME: Oid = (*R2, 9, 2, 3, 1, 3)
OUTLET_NUMBER: Oid = (*R2, 9, 2, 3, 1, 4)
OUTLET_STATE: Oid = (*R2, 9, 2, 3, 1, 5)  # off(1), on(2)
OUTLET_COMMAND: Oid = (*R2, 9, 2, 4, 1, 5)  # rPDU2OutletSwitchedControlCommand
OUTLET_POWER: Oid = (*R2, 9, 4, 3, 1, 7)  # rPDU2OutletMeteredStatusPower, W

HOST_DEVICE = 1  # rPDU2 device/module index of the PDU we talk to (not an NPS guest)
OUTLET_COLUMNS: tuple[Oid, ...] = (
    OUTLET_MODULE,
    OUTLET_NAME,
    OUTLET_NUMBER,
    OUTLET_STATE,
    OUTLET_POWER,
)


def steady_oids(rows: Iterable[int]) -> list[Oid]:
    """What a steady poll GETs: device power and energy, and each known row's state and
    power. Names, outlet numbers and modules are configuration, read by the full walk."""
    rows = list(rows)
    return [
        (*DEVICE_POWER, HOST_DEVICE),
        (*DEVICE_ENERGY, HOST_DEVICE),
        *((*OUTLET_STATE, r) for r in rows),
        *((*OUTLET_POWER, r) for r in rows),
    ]


# Plausibility limits: a value beyond these is a misread unit or a broken card, not a load.
MAX_DEVICE_POWER_W = 100_000.0  # a 3-phase 63 A rack PDU tops out near 44 kW
MAX_OUTLET_POWER_W = 20_000.0
MAX_OUTLET_NUMBER = 1024
MAX_ENERGY_KWH = 2**31 / 10  # the MIB's INTEGER in tenths of kWh
UNSUPPORTED = -1  # what APC returns for a measurement the model does not have

_COMMANDS = {"on": 1, "off": 2, "reboot": 3}  # immediateOn, immediateOff, immediateReboot
_STATE_ON = {1: False, 2: True}
# Error statuses a PDU answers when the credentials may read but not write.
_ACCESS_STATUSES = {"noAccess", "notWritable", "authorizationError", "readOnly"}
_AUTH_PROTOCOLS = ("SHA", "SHA256", "MD5")  # drivers.apc_snmp_v3 maps them to pysnmp's
_PRIV_PROTOCOLS = ("AES", "AES256", "DES")
_MAX_GET_OIDS = 60  # var-binds per steady GET: 29 outlets a packet, well inside 1,472 bytes
WALK_EVERY_S = 300.0  # poll time between full walks (names, numbers, rows)
_CONFIG_COLUMNS = (OUTLET_MODULE, OUTLET_NAME, OUTLET_NUMBER)
# RFC 3416 error-status names, as pysnmp prints them (for the same messages on both paths).
_STATUS_NAMES = {
    1: "tooBig", 2: "noSuchName", 3: "badValue", 4: "readOnly", 5: "genErr", 6: "noAccess",
    7: "wrongType", 8: "wrongLength", 9: "wrongEncoding", 10: "wrongValue", 11: "noCreation",
    12: "inconsistentValue", 13: "resourceUnavailable", 14: "commitFailed", 15: "undoFailed",
    16: "authorizationError", 17: "notWritable", 18: "inconsistentName",
}  # fmt: skip
_ABSENT_MARKERS = (snmp_wire.NO_SUCH_OBJECT, snmp_wire.NO_SUCH_INSTANCE, snmp_wire.END_OF_MIB_VIEW)
_MAX_BULK_PACKETS = 32  # a table needing more is an agent looping, not a big PDU
_DEFAULT_REPETITIONS = 24
_VERIFY_ATTEMPTS = 3
_VERIFY_INTERVAL_S = 0.2


# -- shutdown ---------------------------------------------------------------------------


async def close_engines() -> None:
    """Close the running loop's v2c socket and shared SNMP v3 engines (if any v3 PDU built
    one). Requests still in flight then fail; a later request opens anew."""
    snmp_v2c.close_socket()
    v3 = sys.modules.get("drivers.apc_snmp_v3")
    if v3 is not None:
        v3.close_engines()
    await asyncio.sleep(0)


# -- pysnmp's values, without importing pysnmp ------------------------------------------


def _pysnmp_absent(value: Any) -> bool:
    """A pysnmp noSuchObject / noSuchInstance / endOfMibView. Only a v3 poll (or a test)
    makes one, and it has imported pysnmp then: so this imports nothing."""
    rfc1905 = sys.modules.get("pysnmp.proto.rfc1905")
    return rfc1905 is not None and isinstance(
        value, rfc1905.NoSuchObject | rfc1905.NoSuchInstance | rfc1905.EndOfMibView
    )


def _pyasn1(kind: str) -> Any:
    """pyasn1's `univ.<kind>` class if pyasn1 is loaded (else no value can be one)."""
    univ = sys.modules.get("pyasn1.type.univ")
    return getattr(univ, kind, None) if univ is not None else None


def __getattr__(name: str) -> Any:
    """pysnmp's exception-value classes, as this module exported them before pysnmp was
    made lazy (`apc_snmp.NoSuchInstance`): importing them loads pysnmp."""
    if name in ("NoSuchObject", "NoSuchInstance", "EndOfMibView"):
        from pysnmp.proto import rfc1905

        return getattr(rfc1905, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- decoding (pure, so it can be tested without a network) ----------------------------


def is_absent(value: Any) -> bool:
    """noSuchObject / noSuchInstance / endOfMibView (pysnmp's or `snmp_wire`'s), or nothing."""
    if value is None or (isinstance(value, str) and value in _ABSENT_MARKERS):
        return True
    return _pysnmp_absent(value)


def _end_of_view(value: Any) -> bool:
    if isinstance(value, str):
        return value == snmp_wire.END_OF_MIB_VIEW
    rfc1905 = sys.modules.get("pysnmp.proto.rfc1905")
    return rfc1905 is not None and isinstance(value, rfc1905.EndOfMibView)


def snmp_int(value: Any, *, device: str = "", what: str = "") -> int | None:
    """An SNMP integer as int; None when absent or APC's -1 "unsupported".

    Raises MalformedReply for a value of the wrong type (a string where a number belongs).
    """
    if is_absent(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (integer := _pyasn1("Integer")) is not None and isinstance(value, integer):
        number = int(value)
    else:
        raise MalformedReply(
            f"{what or 'value'} is {type(value).__name__}, expected an integer",
            device=device,
            operation="read",
        )
    return None if number == UNSUPPORTED else number


def snmp_text(value: Any, *, device: str = "", what: str = "") -> str | None:
    if is_absent(value):
        return None
    if isinstance(value, bytes | str):
        raw = value.encode(errors="replace") if isinstance(value, str) else value
    elif (octets := _pyasn1("OctetString")) is not None and isinstance(value, octets):
        raw = bytes(value)
    else:
        raise MalformedReply(
            f"{what or 'value'} is {type(value).__name__}, expected a string",
            device=device,
            operation="read",
        )
    return raw.decode("utf-8", errors="replace").rstrip("\x00").strip()


def _scaled(raw: int | None, scale: float, limit: float, *, device: str, what: str) -> float | None:
    if raw is None:
        return None
    try:
        value = raw * scale
    except OverflowError:  # BER integers have no size limit; no float holds this one
        value = math.inf
    if not 0.0 <= value <= limit:
        raise MalformedReply(
            f"{what} {value:g} outside the plausible 0..{limit:g}", device=device, operation="read"
        )
    return value


@dataclass(frozen=True, slots=True)
class DecodedPoll:
    reading: PduReading
    rows: Mapping[int, int]  # outlet number -> table row, for SETs


def decode_poll(device: str, ts: float, values: Mapping[Oid, Any]) -> DecodedPoll:
    """Turn the var-binds of one poll (OID -> value) into a PduReading.

    Rows of NPS guest units (module column other than 1) are left out: this driver
    speaks for one PDU, and a guest's outlet 3 must not be mistaken for ours.
    """
    power_w = _scaled(
        snmp_int(values.get((*DEVICE_POWER, HOST_DEVICE)), device=device, what="device power"),
        10.0,
        MAX_DEVICE_POWER_W,
        device=device,
        what="device power W",
    )
    energy_kwh = _scaled(
        snmp_int(values.get((*DEVICE_ENERGY, HOST_DEVICE)), device=device, what="device energy"),
        0.1,
        MAX_ENERGY_KWH,
        device=device,
        what="device energy kWh",
    )
    state_prefix = len(OUTLET_STATE)
    row_ids = sorted(
        oid[state_prefix]
        for oid in values
        if len(oid) == state_prefix + 1 and oid[:state_prefix] == OUTLET_STATE
    )
    outlets: dict[int, OutletReading] = {}
    rows: dict[int, int] = {}
    for row in row_ids:
        module = snmp_int(values.get((*OUTLET_MODULE, row)), device=device, what="outlet module")
        if module is not None and module != HOST_DEVICE:
            continue
        state = snmp_int(values[(*OUTLET_STATE, row)], device=device, what="outlet state")
        if state not in _STATE_ON:
            raise MalformedReply(
                f"outlet row {row} state {state!r}, expected off(1) or on(2)",
                device=device,
                operation="read",
            )
        number = snmp_int(values.get((*OUTLET_NUMBER, row)), device=device, what="outlet number")
        number = row if number is None else number
        if not 1 <= number <= MAX_OUTLET_NUMBER:
            raise MalformedReply(
                f"outlet row {row} has number {number}", device=device, operation="read"
            )
        if number in outlets:
            raise MalformedReply(
                f"outlet number {number} appears twice", device=device, operation="read"
            )
        outlet_power = _scaled(
            snmp_int(values.get((*OUTLET_POWER, row)), device=device, what="outlet power"),
            1.0,
            MAX_OUTLET_POWER_W,
            device=device,
            what=f"outlet {number} power W",
        )
        name = snmp_text(values.get((*OUTLET_NAME, row)), device=device, what="outlet name")
        outlets[number] = OutletReading(
            number=number, on=_STATE_ON[state], name=name or "", power_w=outlet_power
        )
        rows[number] = row
    reading = PduReading(
        ts=ts,
        power_w=power_w,
        energy_kwh=energy_kwh,
        outlets=tuple(outlets[n] for n in sorted(outlets)),
    )
    return DecodedPoll(reading, rows)


@dataclass(frozen=True, slots=True)
class _SteadyPlan:
    """The steady GET learnt from a walk: its OIDs (`steady_oids` of the host rows), cut
    into packets and pre-encoded, and each outlet's number and name in row order."""

    walk_ts: float
    outlets: tuple[tuple[int, str], ...]  # (number, name), in the order of the rows
    ordered: bool  # the rows run in outlet-number order
    # Each packet's var-binds, names (OID contents and tuples) and reply template.
    chunks: tuple[tuple[bytes, tuple[bytes, ...], tuple[Oid, ...], snmp_wire.IntegerTemplate], ...]

    @classmethod
    def after_walk(cls, ts: float, decoded: DecodedPoll) -> _SteadyPlan:
        by_row = sorted((row, number) for number, row in decoded.rows.items())
        names = {o.number: o.name for o in decoded.reading.outlets}
        oids = steady_oids(row for row, _ in by_row)
        chunks = tuple(
            (
                snmp_wire.encode_binds(part),
                tuple(snmp_wire.oid_body(o) for o in part),
                tuple(part),
                snmp_wire.integer_template(tuple(part)),
            )
            for part in (oids[i : i + _MAX_GET_OIDS] for i in range(0, len(oids), _MAX_GET_OIDS))
        )
        numbers = [n for _, n in by_row]
        ordered = all(a < b for a, b in itertools.pairwise(numbers))
        return cls(ts, tuple((n, names[n]) for n in numbers), ordered, chunks)


_BY_NUMBER = operator.attrgetter("number")


def _plain_int(value: Any, device: str, what: str) -> int | None:
    """`snmp_int`, with the v2c path's plain ints let through first (the steady poll's
    hot path)."""
    if type(value) is int:
        return None if value == UNSUPPORTED else value
    return snmp_int(value, device=device, what=what)


def steady_reading(
    device: str,
    ts: float,
    outlets: Sequence[tuple[int, str]],
    values: Sequence[Any],
    *,
    ordered: bool = False,
) -> PduReading:
    """A PduReading from the steady GET's values (`steady_oids` order: device power and
    energy, the rows' states, the rows' powers) and the walk's (number, name) per row;
    `ordered`: the rows are known to run in outlet-number order (no sort needed). This
    runs for every PDU every cycle: one pass, plain ints taken as they come."""
    n = len(outlets)
    if len(values) != 2 + 2 * n:
        raise MalformedReply(
            f"{len(values)} values for {n} outlets", device=device, operation="read"
        )
    power_w = _scaled(_plain_int(values[0], device, "device power"), 10.0,
                      MAX_DEVICE_POWER_W, device=device, what="device power W")  # fmt: skip
    energy = _scaled(_plain_int(values[1], device, "device energy"), 0.1, MAX_ENERGY_KWH,
                     device=device, what="device energy kWh")  # fmt: skip
    readings: list[OutletReading] = []
    append = readings.append
    states, powers = values[2 : 2 + n], values[2 + n :]
    for (number, name), state, watts in zip(outlets, states, powers, strict=True):
        if type(state) is not int:
            state = snmp_int(state, device=device, what="outlet state")
        if state == 2:
            on = True
        elif state == 1:
            on = False
        else:
            raise MalformedReply(
                f"outlet {number} state {state!r}, expected off(1) or on(2)",
                device=device,
                operation="read",
            )
        if type(watts) is not int or watts == UNSUPPORTED:
            watts = snmp_int(watts, device=device, what="outlet power")
            if watts is None:
                append(OutletReading(number, on, name, None))
                continue
        if not 0 <= watts <= MAX_OUTLET_POWER_W:
            raise MalformedReply(
                f"outlet {number} power W {watts:g} outside the plausible "
                f"0..{MAX_OUTLET_POWER_W:g}",
                device=device,
                operation="read",
            )
        append(OutletReading(number, on, name, float(watts)))
    if not ordered:
        readings.sort(key=_BY_NUMBER)  # rows may run out of number order (NPS chains)
    return PduReading(ts=ts, power_w=power_w, energy_kwh=energy, outlets=tuple(readings))


def _under(oid: Oid, column: Oid) -> bool:
    return len(oid) > len(column) and oid[: len(column)] == column


# -- the driver ------------------------------------------------------------------------


class ApcPdu:
    """One APC rPDU2 PDU: poll power, energy and outlets; switch outlets."""

    def __init__(
        self,
        device: str,
        host: str,
        port: int = 161,
        *,
        version: Literal["2c", "3"] = "2c",
        community: str = "public",
        write_community: str = "private",
        user: str = "",
        auth_key: str = "",
        priv_key: str = "",
        auth_protocol: Literal["SHA", "SHA256", "MD5"] = "SHA",
        priv_protocol: Literal["AES", "AES256", "DES"] = "AES",
        timeout: float = 2.0,
        retries: int = 1,
        max_in_flight: int = 2,
        walk_every_s: float = WALK_EVERY_S,
    ) -> None:
        if version not in ("2c", "3"):
            raise ValueError(f"SNMP version must be '2c' or '3', got {version!r}")
        if timeout <= 0 or retries < 0 or max_in_flight < 1:
            raise ValueError("timeout must be > 0, retries >= 0 and max_in_flight >= 1")
        self.device = device
        self.host = host
        self.port = port
        self.version = version
        self._timeout = float(timeout)
        self._retries = int(retries)
        self._max_in_flight = max_in_flight
        self._log = log.bind(device=device, host=host, port=port)
        # asyncio primitives must not cross loops either (a semaphore raises).
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._community = community
        self._write_community = write_community
        self._addr: tuple[str, int] | None = None  # resolved once, for the v2c socket
        self._walk_every_s = walk_every_s
        self._plan: _SteadyPlan | None = None  # the steady GET, learnt from the last walk
        self._rows: dict[int, int] = {}
        self._repetitions = _DEFAULT_REPETITIONS
        self._closed = False
        self._v3_user: str | None = None
        self._v3: V3Session | None = None
        if version == "3":
            if not user:
                raise ValueError("SNMPv3 needs a user name")
            if auth_protocol not in _AUTH_PROTOCOLS or priv_protocol not in _PRIV_PROTOCOLS:
                raise ValueError(f"unsupported v3 protocols {auth_protocol}/{priv_protocol}")
            for key_name, key in (("auth_key", auth_key), ("priv_key", priv_key)):
                if key and len(key) < 8:
                    raise ValueError(f"SNMPv3 {key_name} must be at least 8 characters")
            if priv_key and not auth_key:
                raise ValueError("SNMPv3 privacy needs an auth_key too")
            from drivers.apc_snmp_v3 import V3Session

            self._v3_user = user
            self._v3 = V3Session(
                device, host, port, user=user, auth_key=auth_key, priv_key=priv_key,
                auth_protocol=auth_protocol, priv_protocol=priv_protocol,
                credential=hashlib.sha256(
                    "\0".join((auth_protocol, auth_key, priv_protocol, priv_key)).encode()
                ).hexdigest(),
                timeout=self._timeout, retries=self._retries,
                timeout_error=self._timeout_error, status_error=self._status_error,
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"ApcPdu({self.device!r}, {self.host}:{self.port}, v{self.version})"

    # -- public API ----------------------------------------------------------------------

    async def read(self, ts: float) -> PduReading:
        """Device power (W), energy (kWh) and every outlet, in as few packets as possible:
        one GET between full walks (see the module docstring)."""
        async with self._gate("read"):
            plan = self._plan
            if plan is not None and 0.0 <= ts - plan.walk_ts < self._walk_every_s:
                values = await self._steady(plan)
                if values is not None:
                    return steady_reading(
                        self.device, ts, plan.outlets, values, ordered=plan.ordered
                    )
            walked = await self._poll()
        decoded = decode_poll(self.device, ts, walked)
        self._rows = dict(decoded.rows)
        self._repetitions = max(1, len(decoded.rows) + 1)
        self._plan = _SteadyPlan.after_walk(ts, decoded) if decoded.rows else None
        return decoded.reading

    async def set_outlet(self, outlet: int, action: OutletAction) -> None:
        """Switch one outlet, then read its state back for on/off.

        A reboot is not read back: the outlet is legitimately off for the PDU's reboot
        duration, and on again after it, so either state proves nothing.
        """
        if action not in _COMMANDS:
            raise ValueError(f"outlet action must be on, off or reboot, got {action!r}")
        if not isinstance(outlet, int) or outlet < 1:
            raise ValueError(f"outlet numbers start at 1, got {outlet!r}")
        operation = f"set_outlet {outlet} {action}"
        row = await self._row_of(outlet, operation)
        oid = (*OUTLET_COMMAND, row)
        async with self._gate(operation):
            reply = await self._set_int(operation, oid, _COMMANDS[action])
        if not reply or is_absent(reply[0][1]):
            # Some agents answer a SET on a missing object with noError and a
            # noSuchInstance var-bind; that is not success.
            raise CommandRejected(
                f"PDU did not accept the command for outlet {outlet} (row {row})",
                device=self.device,
                operation=operation,
            )
        self._log.info("outlet command sent", outlet=outlet, action=action)
        if action != "reboot":
            await self._verify(outlet, row, action == "on", operation)

    async def close(self) -> None:
        """Forget this PDU. The shared engine stays up for the others: see close_engines()."""
        self._closed = True
        if self._v3 is not None:
            self._v3.close()
        self._gates = weakref.WeakKeyDictionary()

    # -- internals -----------------------------------------------------------------------

    def _gate(self, operation: str) -> asyncio.Semaphore:
        """This PDU's in-flight slots, to hold around a request: PDU network cards are slow
        and drop bursts, so a PDU never sees more than max_in_flight requests at once."""
        if self._closed:
            raise DeviceUnreachable("driver is closed", device=self.device, operation=operation)
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self._max_in_flight)
        return gate

    async def _steady(self, plan: _SteadyPlan) -> list[Any] | None:
        """The steady GET's values in `plan.oids` order, or None when a row has gone or an
        answer names other objects (time for a walk)."""
        values: list[Any] = []
        for binds, bodies, oids, template in plan.chunks:
            if self._v3 is not None:
                reply: Sequence[tuple[Any, Any]] = await self._read_request("read", oids)
                names: Sequence[Any] = oids
            else:
                answer = await self._v2c("read", snmp_wire.GET, binds)
                ints = template.values(answer)
                if ints is not None:  # the usual reply: checked and decoded in one go
                    values += ints
                    continue
                reply = self._var_binds(answer, "read")
                names = bodies
            if len(reply) != len(names):
                return None
            for want, (name, value) in zip(names, reply, strict=True):
                # v2c values are plain ints; anything else goes through is_absent
                if name != want or (type(value) is not int and is_absent(value)):
                    return None
                values.append(value)
        return values

    async def _read_request(
        self, operation: str, oids: Sequence[Oid], *, non_repeaters: int | None = None,
        repetitions: int = 0,
    ) -> list[VarBind]:  # fmt: skip
        """A GET (or GETBULK, given `non_repeaters`): `snmp_wire` on v2c, pysnmp on v3."""
        if self._v3 is not None:
            self._check_open(operation)
            if non_repeaters is None:
                return await self._v3.get(operation, oids)
            return await self._v3.bulk(operation, oids, non_repeaters, repetitions)
        binds = snmp_wire.encode_binds(list(oids))
        reply = await self._v2c(
            operation,
            snmp_wire.GET if non_repeaters is None else snmp_wire.GETBULK,
            binds,
            non_repeaters=non_repeaters or 0,
            repetitions=repetitions,
        )
        return self._decoded(reply, operation)

    def _var_binds(self, reply: snmp_wire.Reply, operation: str) -> list[tuple[bytes, Any]]:
        """The reply's var-binds, raw; a reply that does not parse is a MalformedReply."""
        try:
            return reply.var_binds
        except snmp_wire.BerError as exc:
            raise self._malformed(exc, operation) from exc

    def _decoded(self, reply: snmp_wire.Reply, operation: str) -> list[VarBind]:
        """The reply's var-binds decoded to plain values, or a MalformedReply."""
        try:
            return reply.decoded()  # type: ignore[return-value]
        except snmp_wire.BerError as exc:
            raise self._malformed(exc, operation) from exc

    def _malformed(self, exc: snmp_wire.BerError, operation: str) -> MalformedReply:
        return MalformedReply(
            f"malformed var-binds: {exc}", device=self.device, operation=operation
        )

    async def _set_int(self, operation: str, oid: Oid, value: int) -> list[VarBind]:
        """A SET of one INTEGER (an outlet command) with the write community, or the v3
        user; its error status raised, the var-binds the agent answered returned."""
        if self._v3 is not None:
            self._check_open(operation)
            return await self._v3.set_int(operation, oid, value)
        binds = snmp_wire.encode_set_binds([(oid, value)])
        reply = await self._v2c(operation, snmp_wire.SET, binds, writing=True)
        return self._decoded(reply, operation)

    async def _v2c(
        self, operation: str, pdu_type: int, binds: bytes, *, non_repeaters: int = 0,
        repetitions: int = 0, writing: bool = False,
    ) -> snmp_wire.Reply:  # fmt: skip
        """One v2c request over the loop's shared socket (a SET with the write community),
        its error status raised."""
        community = self._write_community if writing else self._community
        try:
            reply = await snmp_v2c.exchange(
                self._addr or await self._address(operation), pdu_type, community,
                binds, wait_s=self._timeout, retries=self._retries, device=self.device,
                operation=operation, non_repeaters=non_repeaters, max_repetitions=repetitions,
            )  # fmt: skip
        except DeviceTimeout:
            raise self._timeout_error(operation) from None
        if reply.error_status:
            name = _STATUS_NAMES.get(reply.error_status, f"error {reply.error_status}")
            try:
                found: list[Any] = reply.decoded()
            except snmp_wire.BerError:
                found = []
            raise self._status_error(name, reply.error_index, found, operation, writing)
        return reply

    async def _address(self, operation: str) -> tuple[str, int]:
        if self._addr is None:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    self.host, self.port, family=socket.AF_INET, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                raise DeviceUnreachable(
                    f"cannot resolve {self.host}:{self.port}: {exc}",
                    device=self.device,
                    operation=operation,
                ) from exc
            host, port = infos[0][4][:2]
            self._addr = (str(host), int(port))
        return self._addr

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise DeviceUnreachable("driver is closed", device=self.device, operation=operation)

    async def _poll(self) -> dict[Oid, Any]:
        """GETBULK the outlet columns, with the two device scalars as non-repeaters."""
        operation = "read"
        values: dict[Oid, Any] = {}
        scalars = (DEVICE_POWER, DEVICE_ENERGY)
        last: dict[Oid, Oid] = {c: c for c in OUTLET_COLUMNS}
        active = list(OUTLET_COLUMNS)
        non_repeaters: tuple[Oid, ...] = scalars
        for _ in range(_MAX_BULK_PACKETS):
            requested = [*non_repeaters, *(last[c] for c in active)]
            reply = await self._read_request(
                operation,
                requested,
                non_repeaters=len(non_repeaters),
                repetitions=min(self._repetitions, 64),
            )
            for column, (oid, value) in zip(non_repeaters, reply, strict=False):
                if _under(oid, column) and not is_absent(value):
                    values[oid] = value
            groups = reply[len(non_repeaters) :]
            non_repeaters = ()
            done: set[Oid] = set()
            width = len(active)
            for start in range(0, len(groups) - width + 1, width):
                for column, (oid, value) in zip(active, groups[start : start + width], strict=True):
                    if column in done:
                        continue
                    if _end_of_view(value) or not _under(oid, column):
                        done.add(column)
                        continue
                    if oid <= last[column]:
                        raise MalformedReply(
                            f"agent returned a non-increasing OID {_dotted(oid)}",
                            device=self.device,
                            operation=operation,
                        )
                    values[oid] = value
                    last[column] = oid
            if not groups:
                done.update(active)  # nothing came back for the repeaters: nothing more to walk
            active = [c for c in active if c not in done]
            if not active:
                return values
        raise MalformedReply(
            f"outlet table did not end after {_MAX_BULK_PACKETS} GETBULK requests",
            device=self.device,
            operation=operation,
        )

    async def _row_of(self, outlet: int, operation: str) -> int:
        """The control-table row of an outlet number, learnt from polls (rows and outlet
        numbers differ on NPS chains); polls once if this driver has not yet."""
        if outlet not in self._rows:
            await self.read(ts=0.0)
        row = self._rows.get(outlet)
        if row is None:
            raise CommandRejected(
                f"PDU has no outlet {outlet} (outlets: {sorted(self._rows)})",
                device=self.device,
                operation=operation,
            )
        return row

    async def _verify(self, outlet: int, row: int, want_on: bool, operation: str) -> None:
        seen: bool | None = None
        for attempt in range(_VERIFY_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_VERIFY_INTERVAL_S)
            async with self._gate(operation):
                reply = await self._read_request(operation, [(*OUTLET_STATE, row)])
            raw = snmp_int(reply[0][1] if reply else None, device=self.device, what="outlet state")
            seen = _STATE_ON.get(raw) if raw is not None else None
            if seen is want_on:
                return
        command = "immediateOn" if want_on else "immediateOff"
        raise CommandRejected(
            f"outlet {outlet} still reads {_on_off(seen)} after {command}",
            device=self.device,
            operation=operation,
        )

    def _timeout_error(self, operation: str) -> DeviceError:
        tries = self._retries + 1
        hint = (
            "a wrong community also looks like this: agents drop it without answering"
            if self.version == "2c"
            else "check the v3 user and that SNMPv3 is enabled"
        )
        self._log.warning("pdu did not answer", operation=operation, tries=tries)
        return DeviceTimeout(
            f"no SNMP answer from {self.host}:{self.port} within {self._timeout:g} s "
            f"x {tries} tries ({hint})",
            device=self.device,
            operation=operation,
        )

    def _status_error(
        self, name: str, index: int, reply: Sequence[Any], operation: str, writing: bool
    ) -> DeviceError:
        """The error an SNMP error-status (by its RFC 3416 name) stands for."""
        try:
            oid = _dotted(tuple(reply[index - 1][0])) if 0 < index <= len(reply) else "?"
        except (TypeError, ValueError, IndexError):
            oid = "?"
        if name in _ACCESS_STATUSES:
            if self.version == "3":
                who = f"v3 user {self._v3_user!r}"
            else:
                who = "write community" if writing else "read community"
            what = "write" if writing else "read"
            self._log.warning("snmp access denied", operation=operation, status=name, oid=oid)
            return DeviceAuthError(
                f"{who} lacks {what} access ({name} on {oid})",
                device=self.device,
                operation=operation,
            )
        return CommandRejected(
            f"PDU answered {name} for {oid}", device=self.device, operation=operation
        )


def _dotted(oid: Oid) -> str:
    return ".".join(map(str, oid))


def _on_off(on: bool | None) -> str:
    return "unknown" if on is None else ("on" if on else "off")
