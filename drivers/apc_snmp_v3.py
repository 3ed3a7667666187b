"""SNMP v3 (USM authentication and privacy) for `drivers.apc_snmp`, on pysnmp.

Imported only by a PDU configured for v3: v2c reads and SETs go through
`drivers.snmp_wire`, so a farm of v2c PDUs never loads pysnmp and pyasn1 (about 24 MB of
a daemon's memory, and 80 ms of MIB loading per engine).

pysnmp engines are expensive and bound to the event loop that first used them, so every
v3 PDU in a loop shares one engine from a module-level registry (`close_engines()` closes
them at shutdown). pysnmp reports timeouts and SNMP errors as return values; `V3Session`
turns them into the typed errors of `drivers.errors` (through the driver's own error
builders, so both versions word them alike) and hands back var-binds as plain Python
values (ints, bytes, and `snmp_wire`'s exception markers), as the v2c path does.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pyasn1.type import univ
from pysnmp.carrier.error import CarrierError
from pysnmp.entity import config
from pysnmp.error import PySnmpError
from pysnmp.hlapi.v3arch.asyncio import (
    ContextData,
    EndOfMibView,
    Integer,
    NoSuchInstance,
    NoSuchObject,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    UsmUserData,
    bulk_cmd,
    get_cmd,
    set_cmd,
)
from pysnmp.proto import errind

from drivers import snmp_wire
from drivers.errors import DeviceAuthError, DeviceError, DeviceUnreachable, MalformedReply

log = structlog.get_logger(__name__)

Oid = tuple[int, ...]
VarBind = tuple[Oid, Any]

AUTH_PROTOCOLS = {
    "SHA": config.USM_AUTH_HMAC96_SHA,
    "SHA256": config.USM_AUTH_HMAC192_SHA256,
    "MD5": config.USM_AUTH_HMAC96_MD5,
}
PRIV_PROTOCOLS = {
    "AES": config.USM_PRIV_CFB128_AES,
    "AES256": config.USM_PRIV_CFB256_AES,
    "DES": config.USM_PRIV_CBC56_DES,
}
_AUTH_INDICATIONS = (
    errind.WrongDigest,
    errind.UnknownUserName,
    errind.UnknownSecurityName,
    errind.DecryptionError,
    errind.AuthenticationError,
    errind.AuthenticationFailure,
    errind.UnsupportedSecurityLevel,
    errind.UnknownCommunityName,
)
_MALFORMED_INDICATIONS = (
    errind.DeserializationError,
    errind.InvalidMsg,
    errind.OidNotIncreasing,
    errind.EmptyResponse,
    errind.TooBig,
)


# -- the shared engines ----------------------------------------------------------------


@dataclass(eq=False)
class _EngineSlot:
    """One engine and the v3 users configured in it.

    pysnmp keys USM users by name only, so two PDUs with the same v3 user name but
    different keys would keep overwriting each other's user in one engine and fail
    each other's replies; such a clash gets a second engine.
    """

    engine: Any
    users: dict[str, str] = field(default_factory=dict)  # user name -> credential hash
    closed: bool = False


@dataclass(eq=False)
class _LoopEngines:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slots: list[_EngineSlot] = field(default_factory=list)


_REGISTRY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopEngines] = (
    weakref.WeakKeyDictionary()
)


async def _engine_slot(user: str, credential: str) -> _EngineSlot:
    """The running loop's engine for these credentials, built on first use.

    Built in a thread: its ~80 ms of MIB loading would otherwise stall every poll in
    the loop. It touches no event loop until its first request.
    """
    loop = asyncio.get_running_loop()
    engines = _REGISTRY.get(loop)
    if engines is None:
        engines = _REGISTRY[loop] = _LoopEngines()
    async with engines.lock:
        for slot in engines.slots:
            known = slot.users.get(user)
            if known is None or known == credential:
                slot.users[user] = credential
                return slot
        slot = _EngineSlot(await asyncio.to_thread(SnmpEngine))
        slot.users[user] = credential
        engines.slots.append(slot)
        log.debug("snmp engine built", engines=len(engines.slots))
        return slot


def close_engines() -> None:
    """Close the running loop's shared engines (their sockets and timers); requests still in
    flight then end in DeviceTimeout, and a later request builds a new engine."""
    engines = _REGISTRY.pop(asyncio.get_running_loop(), None)
    for slot in engines.slots if engines is not None else ():
        slot.closed = True
        try:
            slot.engine.close_dispatcher()
        except Exception as exc:  # closing must not mask the shutdown that called it
            log.warning("closing snmp engine failed", error=repr(exc))


# -- values ------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A pysnmp value as the v2c path gives it: int, bytes, an exception marker, or None."""
    if isinstance(value, NoSuchObject):
        return snmp_wire.NO_SUCH_OBJECT
    if isinstance(value, NoSuchInstance):
        return snmp_wire.NO_SUCH_INSTANCE
    if isinstance(value, EndOfMibView):
        return snmp_wire.END_OF_MIB_VIEW
    if isinstance(value, univ.Integer):
        return int(value)
    if isinstance(value, univ.OctetString):
        return bytes(value)
    if isinstance(value, univ.Null):
        return None
    return value


# -- one PDU's v3 session ------------------------------------------------------------------


@dataclass(eq=False)
class _LoopState:
    """The pysnmp objects one session needs per event loop: they must not cross loops (a
    reused engine hangs)."""

    slot: _EngineSlot
    target: Any


StatusError = Callable[[str, int, Sequence[VarBind], str, bool], DeviceError]


class V3Session:
    """One PDU's v3 user and its requests. `timeout_error(operation)` and
    `status_error(name, index, var_binds, operation, writing)` are the driver's error
    builders."""

    def __init__(
        self,
        device: str,
        host: str,
        port: int,
        *,
        user: str,
        auth_key: str,
        priv_key: str,
        auth_protocol: str,
        priv_protocol: str,
        credential: str,
        timeout: float,
        retries: int,
        timeout_error: Callable[[str], DeviceError],
        status_error: StatusError,
    ) -> None:
        self.device, self.host, self.port = device, host, port
        self.user = user
        self._credential = credential
        self._timeout, self._retries = timeout, retries
        self._timeout_error = timeout_error
        self._status_error = status_error
        self._auth = UsmUserData(
            user,
            auth_key or None,
            priv_key or None,
            authProtocol=AUTH_PROTOCOLS[auth_protocol] if auth_key else config.USM_AUTH_NONE,
            privProtocol=PRIV_PROTOCOLS[priv_protocol] if priv_key else config.USM_PRIV_NONE,
        )
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    def close(self) -> None:
        self._states = weakref.WeakKeyDictionary()

    async def get(self, operation: str, oids: Sequence[Oid]) -> list[VarBind]:
        return await self._request(operation, get_cmd, *_objects(oids))

    async def bulk(
        self, operation: str, oids: Sequence[Oid], non_repeaters: int, repetitions: int
    ) -> list[VarBind]:
        return await self._request(
            operation, bulk_cmd, *_objects(oids), bulk=(non_repeaters, repetitions)
        )

    async def set_int(self, operation: str, oid: Oid, value: int) -> list[VarBind]:
        obj = ObjectType(ObjectIdentity(oid), Integer(value))
        return await self._request(operation, set_cmd, obj, writing=True)

    async def _state(self, operation: str) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is not None and not state.slot.closed:
            return state
        slot = await _engine_slot(self.user, self._credential)
        try:
            target = await UdpTransportTarget.create(
                (self.host, self.port), timeout=self._timeout, retries=self._retries
            )
        except PySnmpError as exc:
            raise DeviceUnreachable(
                f"cannot resolve {self.host}:{self.port}: {exc}",
                device=self.device,
                operation=operation,
            ) from exc
        current = self._states.get(loop)
        if current is not None and not current.slot.closed:
            return current  # a concurrent first request got there while this one awaited
        state = _LoopState(slot, target)
        self._states[loop] = state
        return state

    async def _request(
        self,
        operation: str,
        command: Any,
        *var_binds: Any,
        writing: bool = False,
        bulk: tuple[int, int] | None = None,
    ) -> list[VarBind]:
        """One SNMP exchange, with every failure mode turned into a typed error."""
        state = await self._state(operation)
        # pysnmp enforces timeout x retries itself; this outer bound only catches an
        # engine that never calls back (closed under us, or reused from another loop).
        # v3 can spend a second exchange on engine discovery.
        bound = 2 * self._timeout * (self._retries + 1) + 1.0
        try:
            async with asyncio.timeout(bound):
                err_ind, err_status, err_index, reply = await command(
                    state.slot.engine,
                    self._auth,
                    state.target,
                    ContextData(),
                    *(bulk or ()),
                    *var_binds,
                    lookupMib=False,
                )
        except TimeoutError:
            raise self._timeout_error(operation) from None
        except CarrierError as exc:
            raise DeviceUnreachable(
                f"cannot send to {self.host}:{self.port}: {exc}",
                device=self.device,
                operation=operation,
            ) from exc
        except PySnmpError as exc:
            raise MalformedReply(
                f"SNMP exchange failed: {exc}", device=self.device, operation=operation
            ) from exc
        if err_ind:
            raise self._indication_error(err_ind, operation)
        try:
            binds = [(tuple(vb[0]), plain(vb[1])) for vb in reply]
        except (TypeError, IndexError) as exc:
            raise MalformedReply(
                f"unexpected var-binds: {exc}", device=self.device, operation=operation
            ) from exc
        if err_status and int(err_status):
            try:
                index = int(err_index)
            except (TypeError, ValueError):
                index = 0
            name = (
                err_status.prettyPrint() if hasattr(err_status, "prettyPrint") else str(err_status)
            )
            raise self._status_error(name, index, binds, operation, writing)
        return binds

    def _indication_error(self, indication: Any, operation: str) -> DeviceError:
        if isinstance(indication, errind.RequestTimedOut):
            return self._timeout_error(operation)
        text = str(indication)
        where = {"device": self.device, "operation": operation}
        if isinstance(indication, _AUTH_INDICATIONS):
            log.warning("snmp authentication failed", error=text, **where)
            return DeviceAuthError(
                f"SNMPv3 authentication failed ({text}): check the user, keys and protocols",
                **where,
            )
        if isinstance(indication, _MALFORMED_INDICATIONS):
            return MalformedReply(text, **where)
        return DeviceUnreachable(f"SNMP exchange failed: {text}", **where)


def _objects(oids: Sequence[Oid]) -> list[Any]:
    return [ObjectType(ObjectIdentity(o)) for o in oids]
