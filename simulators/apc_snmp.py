"""A simulated APC switched, outlet-metered rack PDU (PowerNet rPDU2) speaking real SNMP.

The daemon's SNMP driver has to be exercised through everything a mock would skip:
BER encoding, community and USM checks, GETBULK paging, error statuses and silent drops.
So this is a genuine pysnmp command responder on a UDP socket, whose values are not
stored but computed from the farm model at the instant each request arrives; a SET on an
outlet's control command switches the farm's outlet, so the rig really loses power.

Objects follow the PowerNet-MIB rPDU2 tables for device index 1 (a single, non-NPS PDU),
with APC's units: device power in hundredths of kW, energy in tenths of kWh, outlet
state off(1)/on(2), metered outlet power in W.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import structlog
from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.proto import rfc1902
from pysnmp.proto.api import v2c
from pysnmp.smi import error as smi_error
from pysnmp.smi import instrum

from simulators.farm import Farm, Outlet, SimPdu

log = structlog.get_logger(__name__)

Oid = tuple[int, ...]
# A value getter takes the farm time of the request, so one request sees one instant.
Getter = Callable[[float], Any]

SYSTEM = (1, 3, 6, 1, 2, 1, 1)
APC_RPDU2_SYSOBJECTID: Oid = (1, 3, 6, 1, 4, 1, 318, 1, 3, 4, 5)
R2: Oid = (1, 3, 6, 1, 4, 1, 318, 1, 1, 26)

IDENT = (*R2, 2, 1)  # rPDU2IdentEntry
DEVICE_PROPERTIES = (*R2, 4, 2, 1)  # rPDU2DevicePropertiesEntry
DEVICE_STATUS = (*R2, 4, 3, 1)  # rPDU2DeviceStatusEntry
PHASE_STATUS = (*R2, 6, 3, 1)  # rPDU2PhaseStatusEntry
OUTLET_CONFIG = (*R2, 9, 2, 1, 1)  # rPDU2OutletSwitchedConfigEntry
OUTLET_STATUS = (*R2, 9, 2, 3, 1)  # rPDU2OutletSwitchedStatusEntry
OUTLET_CONTROL = (*R2, 9, 2, 4, 1)  # rPDU2OutletSwitchedControlEntry
OUTLET_METERED = (*R2, 9, 4, 3, 1)  # rPDU2OutletMeteredStatusEntry

OUTLET_CONFIG_NAME = (*OUTLET_CONFIG, 3)  # writable: where APC lets you rename outlets
OUTLET_CONTROL_COMMAND = (*OUTLET_CONTROL, 5)  # writable: 1 immediateOn, 2 immediateOff, 3 reboot

_COMMANDS = {1: "on", 2: "off", 3: "reboot"}
_RO_AREA = "ro-area"  # security names the two communities map to
_RW_AREA = "rw-area"
_MAX_NAME_LEN = 20  # APC's outlet-name limit in the web UI and MIB text
_VOLTAGE_V = 230.0
_POWER_FACTOR = 0.98  # PSUs of mining rigs run at about this at full load
_PHASE_RATED_A = 63.0  # for the load-state column only


PduFault = Literal["silent", "garbage", "slow"]
PDU_FAULTS: Final = frozenset({"silent", "garbage", "slow"})
GARBAGE: Final = b"\x13\x37 not BER at all \xde\xad\xbe\xef"


class PduAgent:
    """One simulated PDU on its own UDP port, answering SNMP v1/v2c and v3 (authPriv SHA/AES).

    `fault` can be changed at any time and applies to the next datagram: "silent" drops
    every datagram unanswered, the way a PDU whose network card has hung looks from the
    network (`silent = True` is the same); "garbage" answers each with bytes that are no
    SNMP message; "slow" answers each `slow_s` seconds late (wall seconds: a management
    card's latency does not scale with the farm's clock).
    """

    MODEL = "AP8959"
    FIRMWARE = "v6.9.6"

    def __init__(
        self,
        farm: Farm,
        pdu_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        community: str = "public",
        write_community: str = "private",
        v3_user: str = "rigd",
        v3_auth_key: str = "authpass123",
        v3_priv_key: str = "privpass123",
    ) -> None:
        if pdu_id not in farm.pdus:
            raise KeyError(f"farm has no PDU {pdu_id!r}; known: {', '.join(farm.pdus)}")
        if community == write_community:
            raise ValueError("read and write communities must differ, or every reader may write")
        if len(v3_auth_key) < 8 or len(v3_priv_key) < 8:
            raise ValueError("SNMPv3 keys must be at least 8 characters (RFC 3414)")
        self.farm = farm
        self.pdu: SimPdu = farm.pdus[pdu_id]
        self.host = host
        self.port = port
        self.fault: PduFault | None = None
        self.slow_s = 1.0
        self._community = community
        self._write_community = write_community
        self._v3_user = v3_user
        self._v3_auth_key = v3_auth_key
        self._v3_priv_key = v3_priv_key
        self._writers = {_RW_AREA, v3_user}
        self._serial = f"5A{zlib.crc32(pdu_id.encode()) % 10**10:010d}"
        self._started_mono = time.monotonic()
        self._peak_w = 0.0
        self._engine: Any = None
        self._log = log.bind(pdu=pdu_id)
        self._objects: dict[Oid, Getter] = self._build_objects()
        self._keys: list[Oid] = sorted(self._objects)
        # Object OIDs (a column or a scalar): an absent instance under one is
        # noSuchInstance, anything else noSuchObject, as RFC 3416 asks.
        self._object_prefixes: set[Oid] = {k[:-1] for k in self._keys}

    @property
    def silent(self) -> bool:
        return self.fault == "silent"

    @silent.setter
    def silent(self, value: bool) -> None:
        self.fault = "silent" if value else None

    def set_fault(self, fault: PduFault | None, *, slow_s: float | None = None) -> None:
        if fault is not None and fault not in PDU_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(PDU_FAULTS))}")
        self.fault = fault
        if slow_s is not None:
            self.slow_s = slow_s

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, then serve from the running loop.

        The socket is bound before pysnmp sees it so the ephemeral port is known on return.
        The engine is built in a thread: it loads MIB modules for ~80 ms, which would stall
        every other agent and client in this loop.
        """
        if self._engine is not None:
            raise RuntimeError("agent already started")
        snmp_engine = await asyncio.to_thread(engine.SnmpEngine)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
            transport = _AgentTransport(self).open_server_mode(sock=sock)
            config.add_transport(snmp_engine, udp.DOMAIN_NAME, transport)
        except BaseException:
            sock.close()
            raise
        config.add_v1_system(snmp_engine, _RO_AREA, self._community)
        config.add_v1_system(snmp_engine, _RW_AREA, self._write_community)
        config.add_v3_user(
            snmp_engine,
            self._v3_user,
            config.USM_AUTH_HMAC96_SHA,
            self._v3_auth_key,
            config.USM_PRIV_CFB128_AES,
            self._v3_priv_key,
        )
        snmp_context = context.SnmpContext(snmp_engine)
        snmp_context.unregister_context_name(b"")
        snmp_context.register_context_name(b"", _MibController(self))
        for responder in (
            cmdrsp.GetCommandResponder,
            cmdrsp.NextCommandResponder,
            cmdrsp.BulkCommandResponder,
            cmdrsp.SetCommandResponder,
        ):
            responder(snmp_engine, snmp_context)
        self._engine = snmp_engine
        endpoint = getattr(transport, "_lport", None)
        if isinstance(endpoint, asyncio.Future):
            await endpoint  # the datagram endpoint exists: requests from now on are served
        self._log.info("snmp agent started", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._engine is None:
            return
        snmp_engine, self._engine = self._engine, None
        snmp_engine.close_dispatcher()
        await asyncio.sleep(0)  # let the transport's close callbacks run
        self._log.info("snmp agent stopped", port=self.port)

    async def __aenter__(self) -> PduAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the MIB ------------------------------------------------------------------------

    def _build_objects(self) -> dict[Oid, Getter]:
        pdu = self.pdu
        outlets = sorted(pdu.outlets.values(), key=lambda o: o.number)
        n_out = len(outlets)
        objs: dict[Oid, Getter] = {}

        def const(value: Any) -> Getter:
            return lambda _t: value

        def integer(value: int) -> Getter:
            return const(v2c.Integer(value))

        def text(value: str) -> Getter:
            return const(v2c.OctetString(value))

        objs[(*SYSTEM, 1, 0)] = text(
            f"APC Web/SNMP Management Card (MB:v4.1.0 PF:{self.FIRMWARE} PN:apc_hw05_aos "
            f"AF1:{self.FIRMWARE} AN1:apc_hw05_rpdu2g MN:{self.MODEL} HR:02 SN: {self._serial})"
        )
        objs[(*SYSTEM, 2, 0)] = const(v2c.ObjectIdentifier(APC_RPDU2_SYSOBJECTID))
        objs[(*SYSTEM, 3, 0)] = lambda _t: v2c.TimeTicks(
            int((time.monotonic() - self._started_mono) * 100) % 2**32
        )
        objs[(*SYSTEM, 4, 0)] = text("farm operations")
        objs[(*SYSTEM, 5, 0)] = lambda _t: v2c.OctetString(pdu.name)
        objs[(*SYSTEM, 6, 0)] = text("simulated farm")

        # Ident and properties (device index 1).
        objs[(*IDENT, 1, 1)] = integer(1)
        objs[(*IDENT, 3, 1)] = lambda _t: v2c.OctetString(pdu.name)
        objs[(*IDENT, 4, 1)] = text("simulated farm")
        objs[(*IDENT, 6, 1)] = text(self.FIRMWARE)
        objs[(*IDENT, 8, 1)] = text(self.MODEL)
        objs[(*IDENT, 9, 1)] = text(self._serial)
        objs[(*DEVICE_PROPERTIES, 1, 1)] = integer(1)
        objs[(*DEVICE_PROPERTIES, 4, 1)] = integer(n_out)
        objs[(*DEVICE_PROPERTIES, 5, 1)] = integer(n_out)
        objs[(*DEVICE_PROPERTIES, 6, 1)] = integer(n_out)
        objs[(*DEVICE_PROPERTIES, 7, 1)] = integer(3)

        # Device status.
        objs[(*DEVICE_STATUS, 1, 1)] = integer(1)
        objs[(*DEVICE_STATUS, 2, 1)] = integer(1)
        objs[(*DEVICE_STATUS, 3, 1)] = lambda _t: v2c.OctetString(pdu.name)
        objs[(*DEVICE_STATUS, 4, 1)] = lambda t: v2c.Integer(
            _load_state(max(self._phase_current_a(p, t) for p in (1, 2, 3)))
        )
        objs[(*DEVICE_STATUS, 5, 1)] = lambda t: v2c.Integer(round(self._device_power_w(t) / 10))
        objs[(*DEVICE_STATUS, 6, 1)] = lambda t: v2c.Integer(round(self._peak_power_w(t) / 10))
        objs[(*DEVICE_STATUS, 9, 1)] = lambda t: v2c.Integer(int(pdu.energy_kwh(t) * 10))
        objs[(*DEVICE_STATUS, 10, 1)] = text("11/24/2025 00:00:00")
        objs[(*DEVICE_STATUS, 11, 1)] = lambda t: v2c.Integer(
            1 if any(self._pending(o, t) for o in outlets) else 2
        )
        objs[(*DEVICE_STATUS, 16, 1)] = lambda t: v2c.Integer(
            round(self._device_power_w(t) / _POWER_FACTOR / 10)
        )
        objs[(*DEVICE_STATUS, 17, 1)] = integer(round(_POWER_FACTOR * 100))
        objs[(*DEVICE_STATUS, 18, 1)] = integer(1)  # notNPS

        # Phase status: outlets are wired round-robin over three phases.
        for ph in (1, 2, 3):
            objs[(*PHASE_STATUS, 1, ph)] = integer(ph)
            objs[(*PHASE_STATUS, 2, ph)] = integer(1)
            objs[(*PHASE_STATUS, 3, ph)] = integer(ph)
            objs[(*PHASE_STATUS, 4, ph)] = self._phase_getter(
                ph, lambda p, t: _load_state(self._phase_current_a(p, t))
            )
            objs[(*PHASE_STATUS, 5, ph)] = self._phase_getter(
                ph, lambda p, t: round(self._phase_current_a(p, t) * 10)
            )
            objs[(*PHASE_STATUS, 6, ph)] = integer(round(_VOLTAGE_V))
            objs[(*PHASE_STATUS, 7, ph)] = self._phase_getter(
                ph, lambda p, t: round(self._phase_power_w(p, t) / 10)
            )
            objs[(*PHASE_STATUS, 8, ph)] = self._phase_getter(
                ph, lambda p, t: round(self._phase_power_w(p, t) / _POWER_FACTOR / 10)
            )
            objs[(*PHASE_STATUS, 9, ph)] = integer(round(_POWER_FACTOR * 100))

        for o in outlets:
            self._add_outlet(objs, o)
        return objs

    def _add_outlet(self, objs: dict[Oid, Getter], o: Outlet) -> None:
        pdu = self.pdu
        n = o.number

        def name(_t: float) -> Any:
            return v2c.OctetString(o.name)

        def state(t: float) -> Any:
            return v2c.Integer(2 if pdu.outlet_on(n, t) else 1)

        def power(t: float) -> Any:
            return v2c.Integer(round(pdu.outlet_power_w(n, t)))

        objs[(*OUTLET_CONFIG, 1, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_CONFIG, 2, n)] = lambda _t: v2c.Integer(1)
        objs[(*OUTLET_CONFIG_NAME, n)] = name
        objs[(*OUTLET_CONFIG, 4, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_CONFIG, 5, n)] = lambda _t: v2c.Integer(0)
        objs[(*OUTLET_CONFIG, 6, n)] = lambda _t: v2c.Integer(0)
        objs[(*OUTLET_CONFIG, 7, n)] = lambda _t: v2c.Integer(round(SimPdu.REBOOT_S))

        objs[(*OUTLET_STATUS, 1, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_STATUS, 2, n)] = lambda _t: v2c.Integer(1)
        objs[(*OUTLET_STATUS, 3, n)] = name
        objs[(*OUTLET_STATUS, 4, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_STATUS, 5, n)] = state
        objs[(*OUTLET_STATUS, 6, n)] = lambda t: v2c.Integer(1 if self._pending(o, t) else 2)

        objs[(*OUTLET_CONTROL, 1, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_CONTROL, 2, n)] = lambda _t: v2c.Integer(1)
        objs[(*OUTLET_CONTROL, 3, n)] = name
        objs[(*OUTLET_CONTROL, 4, n)] = lambda _t: v2c.Integer(n)
        # A GET of the command column reports the state the APC way round: 1 on, 2 off.
        objs[(*OUTLET_CONTROL_COMMAND, n)] = lambda t: v2c.Integer(1 if pdu.outlet_on(n, t) else 2)

        objs[(*OUTLET_METERED, 1, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_METERED, 2, n)] = lambda _t: v2c.Integer(1)
        objs[(*OUTLET_METERED, 3, n)] = name
        objs[(*OUTLET_METERED, 4, n)] = lambda _t: v2c.Integer(n)
        objs[(*OUTLET_METERED, 5, n)] = lambda t: v2c.Integer(
            2 if pdu.outlet_power_w(n, t) > 0 else 1  # normal / lowLoad
        )
        objs[(*OUTLET_METERED, 6, n)] = lambda t: v2c.Integer(
            round(pdu.outlet_power_w(n, t) / _VOLTAGE_V / _POWER_FACTOR * 10)
        )
        objs[(*OUTLET_METERED, 7, n)] = power
        objs[(*OUTLET_METERED, 8, n)] = lambda t: v2c.Integer(
            round(o.rig.model.nominal_w if o.rig else 0.0)
        )
        objs[(*OUTLET_METERED, 11, n)] = lambda t: v2c.Integer(
            int(o.rig.energy_j(t) / 3.6e5) if o.rig else 0  # tenths of kWh
        )

    def _phase_getter(self, phase: int, fn: Callable[[int, float], int]) -> Getter:
        return lambda t: v2c.Integer(fn(phase, t))

    def _device_power_w(self, t: float) -> float:
        return self.pdu.power_w(t)

    def _peak_power_w(self, t: float) -> float:
        self._peak_w = max(self._peak_w, self._device_power_w(t))
        return self._peak_w

    def _phase_power_w(self, phase: int, t: float) -> float:
        return sum(
            self.pdu.outlet_power_w(n, t) for n in self.pdu.outlets if (n - 1) % 3 + 1 == phase
        )

    def _phase_current_a(self, phase: int, t: float) -> float:
        return self._phase_power_w(phase, t) / _VOLTAGE_V / _POWER_FACTOR

    def _pending(self, o: Outlet, t: float) -> bool:
        self.pdu.outlet_on(o.number, t)  # settles a reboot that is due
        return o.command_pending

    # -- request handling (called by the controller, synchronously) ---------------------

    def read(self, var_binds: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        t = self.farm.now()
        out: list[tuple[Any, Any]] = []
        for oid, _ in var_binds:
            key = tuple(oid)
            getter = self._objects.get(key)
            if getter is not None:
                out.append((oid, getter(t)))
            elif key[:-1] in self._object_prefixes:
                out.append((oid, v2c.NoSuchInstance()))
            else:
                out.append((oid, v2c.NoSuchObject()))
        return out

    def read_next(self, var_binds: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        t = self.farm.now()
        out: list[tuple[Any, Any]] = []
        for oid, _ in var_binds:
            i = bisect.bisect_right(self._keys, tuple(oid))
            if i >= len(self._keys):
                out.append((oid, v2c.EndOfMibView()))
            else:
                key = self._keys[i]
                out.append((rfc1902.ObjectName(key), self._objects[key](t)))
        return out

    def write(
        self, var_binds: Sequence[tuple[Any, Any]], security_name: str
    ) -> list[tuple[Any, Any]]:
        """All-or-nothing, as RFC 3416 asks: every var-bind is checked before any is applied."""
        if security_name not in self._writers:
            self._log.info("snmp set refused: read-only credentials", security=security_name)
            raise smi_error.NoAccessError(name=var_binds[0][0] if var_binds else None, idx=0)
        plan: list[Callable[[float], None]] = []
        for i, (oid, value) in enumerate(var_binds):
            plan.append(self._plan_write(i, tuple(oid), oid, value))
        t = self.farm.now()
        for apply in plan:
            apply(t)
        return list(var_binds)

    def _plan_write(self, i: int, key: Oid, oid: Any, value: Any) -> Callable[[float], None]:
        index = key[-1] if key else 0
        column = key[:-1]
        if column == OUTLET_CONTROL_COMMAND and index in self.pdu.outlets:
            if value.tagSet != v2c.Integer.tagSet:
                raise smi_error.WrongTypeError(name=oid, idx=i)
            action = _COMMANDS.get(int(value))
            if action is None:  # outletUnknown, the delayed variants and cancel: not simulated
                raise smi_error.WrongValueError(name=oid, idx=i)

            def switch(t: float) -> None:
                self.pdu.switch(index, action, t)
                self._log.info("outlet switched", outlet=index, action=action)

            return switch
        if column == OUTLET_CONFIG_NAME and index in self.pdu.outlets:
            if value.tagSet != v2c.OctetString.tagSet:
                raise smi_error.WrongTypeError(name=oid, idx=i)
            raw = bytes(value)
            if not 1 <= len(raw) <= _MAX_NAME_LEN:
                raise smi_error.WrongLengthError(name=oid, idx=i)
            try:
                new_name = raw.decode("ascii")
            except UnicodeDecodeError:
                raise smi_error.WrongValueError(name=oid, idx=i) from None
            if not new_name.isprintable():
                raise smi_error.WrongValueError(name=oid, idx=i)

            def rename(_t: float) -> None:
                self.pdu.outlets[index].name = new_name

            return rename
        if key in self._objects:
            raise smi_error.NotWritableError(name=oid, idx=i)
        raise smi_error.NoCreationError(name=oid, idx=i)


def _load_state(current_a: float) -> int:
    """rPDU2 load states: lowLoad 1, normal 2, nearOverload 3, overload 4."""
    frac = current_a / _PHASE_RATED_A
    if frac < 0.05:
        return 1
    if frac < 0.8:
        return 2
    if frac < 1.0:
        return 3
    return 4


class _MibController(instrum.AbstractMibInstrumController):  # type: ignore[misc]
    """pysnmp 7.1 calls these synchronously and sends whatever they return.

    Anything but an SMI error escaping here would be swallowed far up the stack and leave
    the manager waiting for a timeout, so other failures become genErr.
    """

    def __init__(self, agent: PduAgent) -> None:
        self._agent = agent

    def read_variables(self, *var_binds: Any, **ctx: Any) -> list[tuple[Any, Any]]:
        return self._guard("get", lambda: self._agent.read(var_binds))

    def read_next_variables(self, *var_binds: Any, **ctx: Any) -> list[tuple[Any, Any]]:
        return self._guard("getnext", lambda: self._agent.read_next(var_binds))

    def write_variables(self, *var_binds: Any, **ctx: Any) -> list[tuple[Any, Any]]:
        def write() -> list[tuple[Any, Any]]:
            exec_ctx = ctx["snmpEngine"].observer.get_execution_context(
                "rfc3412.receiveMessage:request"
            )
            return self._agent.write(var_binds, str(exec_ctx["securityName"]))

        return self._guard("set", write)

    def _guard(self, op: str, fn: Callable[[], list[tuple[Any, Any]]]) -> list[tuple[Any, Any]]:
        try:
            return fn()
        except smi_error.SmiError:
            raise
        except Exception:
            log.exception("snmp agent failed to handle a request", pdu=self._agent.pdu.id, op=op)
            raise smi_error.GenError(idx=0) from None


class _AgentTransport(udp.UdpAsyncioTransport):  # type: ignore[misc]
    """UDP transport that can play dead, and that never lets a bad datagram escape.

    pysnmp hands each datagram to its dispatcher in a loop callback; an exception there
    would only be logged by asyncio, but catching it here keeps the log readable and the
    agent's behaviour explicit: a datagram it cannot process is dropped, like on a device.
    """

    def __init__(self, agent: PduAgent) -> None:
        super().__init__()
        self._agent = agent

    def datagram_received(self, datagram: bytes, transportAddress: Any) -> None:
        fault = self._agent.fault
        if fault == "silent" or self._callback_function is None:
            return
        if fault == "garbage":
            if self.transport is not None:
                self.transport.sendto(GARBAGE, transportAddress)
            return
        if fault == "slow":
            self.loop.call_later(self._agent.slow_s, self._deliver, transportAddress, datagram)
            return
        self.loop.call_soon(self._deliver, transportAddress, datagram)

    def _deliver(self, address: Any, datagram: bytes) -> None:
        callback = self._callback_function
        if callback is None:  # closed in the meantime
            return
        try:
            callback(self, address, datagram)
        except Exception as exc:
            log.warning(
                "snmp agent dropped a datagram it could not process",
                pdu=self._agent.pdu.id,
                size=len(datagram),
                error=repr(exc),
            )
