"""SNMP v2c messages by hand: the GET and GETBULK a PDU poll sends, and the reply decoded.

Why not pysnmp for this: decoding one 24-outlet poll through pysnmp/pyasn1 costs about
20 ms of CPU (its BER codec builds an object per tag), which at 417 PDUs is most of a
core. A v2c read is a tiny, fixed subset of BER (INTEGER, OCTET STRING, OID, NULL, the
application integers and the three exception values), so this module encodes the
request and walks the reply directly. Everything else (v3 with its USM security, SETs)
stays on pysnmp in `drivers.apc_snmp`, where its cost is paid rarely.

Decoding is strict about framing (every length must fit its container) and raises
`BerError` for anything outside the subset, which the driver turns into MalformedReply.
"""

from __future__ import annotations

import functools
import re
from typing import Final

Oid = tuple[int, ...]

GET: Final = 0xA0
GETBULK: Final = 0xA5
SET: Final = 0xA3
RESPONSE: Final = 0xA2

# Exception values of a var-bind (RFC 3416): kept as these markers, never confused with data.
NO_SUCH_OBJECT: Final = "noSuchObject"
NO_SUCH_INSTANCE: Final = "noSuchInstance"
END_OF_MIB_VIEW: Final = "endOfMibView"
_EXCEPTIONS: Final = {0x80: NO_SUCH_OBJECT, 0x81: NO_SUCH_INSTANCE, 0x82: END_OF_MIB_VIEW}
# INTEGER, Counter32, Gauge32, TimeTicks, Counter64 (all decoded as Python ints).
_INTEGERS: Final = frozenset({0x02, 0x41, 0x42, 0x43, 0x46})
_UNSIGNED: Final = frozenset({0x41, 0x42, 0x43, 0x46})
_STRINGS: Final = frozenset({0x04, 0x40, 0x44})  # OCTET STRING, IpAddress, Opaque

Value = int | bytes | str | Oid | None


class BerError(ValueError):
    """A reply that is not a well-formed SNMP v2c message of the kind this module reads."""


# -- encoding --------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _length(len(body)) + body


def _integer(n: int) -> bytes:
    return _tlv(0x02, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


@functools.lru_cache(maxsize=4096)  # a farm's PDUs ask for the same few hundred OIDs
def oid_body(oid: Oid) -> bytes:
    """An OBJECT IDENTIFIER's content octets: what `Reply.var_binds` holds for a name."""
    if len(oid) < 2 or oid[0] > 2 or any(s < 0 for s in oid):
        raise ValueError(f"not an OID: {oid!r}")
    out = bytearray((oid[0] * 40 + oid[1],))
    for sub in oid[2:]:
        chunk = [sub & 0x7F]
        sub >>= 7
        while sub:
            chunk.append(0x80 | (sub & 0x7F))
            sub >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def encode_oid(oid: Oid) -> bytes:
    """An OBJECT IDENTIFIER's TLV."""
    return _tlv(0x06, oid_body(oid))


def encode_binds(oids: list[Oid] | tuple[Oid, ...]) -> bytes:
    """The var-bind list of a read (every value NULL), to encode once and send many times."""
    return _tlv(0x30, b"".join(_tlv(0x30, encode_oid(o) + b"\x05\x00") for o in oids))


def encode_set_binds(binds: list[tuple[Oid, int]] | tuple[tuple[Oid, int], ...]) -> bytes:
    """The var-bind list of a SET of INTEGER values (an outlet command)."""
    return _tlv(0x30, b"".join(_tlv(0x30, encode_oid(o) + _integer(v)) for o, v in binds))


def encode_request(
    pdu_type: int,
    request_id: int,
    community: str,
    binds: bytes,
    *,
    non_repeaters: int = 0,
    max_repetitions: int = 0,
) -> bytes:
    """A v2c GET (`GET`), GETBULK (`GETBULK`) or SET (`SET`) message around `binds`
    (`encode_binds`, or `encode_set_binds` for a SET)."""
    second, third = (non_repeaters, max_repetitions) if pdu_type == GETBULK else (0, 0)
    pdu = _tlv(
        pdu_type,
        _integer(request_id) + _integer(second) + _integer(third) + binds,
    )
    return _tlv(0x30, _integer(1) + _tlv(0x04, community.encode()) + pdu)


# Request ids in this range take exactly four octets in BER, so a message can be kept
# encoded with room for its id (`request_template`).
REQUEST_ID_MIN: Final = 0x0080_0000
REQUEST_ID_MAX: Final = 0x7FFF_FFFF


@functools.lru_cache(maxsize=1024)  # keyed by the binds' bytes, whose hash Python caches
def request_template(
    pdu_type: int, community: str, binds: bytes, non_repeaters: int = 0, max_repetitions: int = 0
) -> tuple[bytes, bytes]:
    """(head, tail) of `encode_request`'s message, so that head + the request id's four
    octets + tail is the message for any id in REQUEST_ID_MIN..REQUEST_ID_MAX: a steady
    poll sends the same request every cycle, and encoding it is then one join."""
    message = encode_request(
        pdu_type,
        REQUEST_ID_MIN,
        community,
        binds,
        non_repeaters=non_repeaters,
        max_repetitions=max_repetitions,
    )
    second, third = (non_repeaters, max_repetitions) if pdu_type == GETBULK else (0, 0)
    tail = _integer(second) + _integer(third) + binds  # what follows the id in the PDU
    at = len(message) - len(tail) - 4
    return message[:at], message[at + 4 :]


# -- decoding --------------------------------------------------------------------------


def _head(buf: bytes, i: int, end: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the TLV at `i`, checked to fit `end`."""
    if i + 2 > end:
        raise BerError("truncated TLV")
    tag = buf[i]
    n = buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or i + k > end:
            raise BerError("bad length")
        n = int.from_bytes(buf[i : i + k], "big")
        i += k
    stop = i + n
    if stop > end:
        raise BerError("value overruns its container")
    return tag, i, stop


@functools.lru_cache(maxsize=16384)  # a walk names the same few hundred objects every time
def decode_oid(body: bytes) -> Oid:
    """An OID's content octets as a tuple (cached: decoding it is a Python loop per octet,
    and the full walk of every PDU decodes the same names every `WALK_EVERY_S`)."""
    if not body:
        raise BerError("empty OID")
    first = body[0]
    out = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    sub = 0
    for b in body[1:]:
        sub = (sub << 7) | (b & 0x7F)
        if not b & 0x80:
            out.append(sub)
            sub = 0
    if body[-1] & 0x80:
        raise BerError("OID ends inside a sub-identifier")
    return tuple(out)


def _value(tag: int, body: bytes) -> Value:
    if tag in _INTEGERS:
        if not body:
            raise BerError("empty integer")
        return int.from_bytes(body, "big", signed=tag not in _UNSIGNED)
    if tag in _STRINGS:
        return body
    if tag in _EXCEPTIONS:
        return _EXCEPTIONS[tag]
    if tag == 0x05:
        return None
    if tag == 0x06:
        return decode_oid(body)
    raise BerError(f"unexpected value tag 0x{tag:02x}")


class Reply:
    """A v2c Response-PDU: its header decoded, its var-binds decoded when first asked for
    (a caller with an `IntegerTemplate` may never need them decoded one by one)."""

    __slots__ = ("_binds", "community", "end", "error_index", "error_status", "raw",
                 "request_id", "start")  # fmt: skip

    def __init__(
        self, raw: bytes, start: int, end: int, community: bytes, request_id: int,
        error_status: int, error_index: int,
    ) -> None:  # fmt: skip
        self.raw, self.start, self.end = raw, start, end  # the var-bind list's contents
        self.community = community
        self.request_id = request_id
        self.error_status = error_status
        self.error_index = error_index
        self._binds: list[tuple[bytes, Value]] | None = None

    @property
    def var_binds(self) -> list[tuple[bytes, Value]]:
        """(name as OID content octets, see `oid_body`; value); BerError if malformed."""
        if self._binds is None:
            self._binds = _var_binds(self.raw, self.start, self.end)
        return self._binds

    def decoded(self) -> list[tuple[Oid, Value]]:
        """The var-binds with their names as OID tuples."""
        return [(decode_oid(name), value) for name, value in self.var_binds]


class IntegerTemplate:
    """The var-bind list a GET of `oids` gets back when every value is an INTEGER: one
    regular expression, so the reply is checked and its values found in C, not walked
    TLV by TLV in Python. A reply that does not match (an exception value, a string, a
    long length) is no error: the caller decodes it the general way."""

    def __init__(self, oids: tuple[Oid, ...]) -> None:
        parts = []
        for oid in oids:
            name = encode_oid(oid)
            alts = [
                re.escape(bytes((0x30, len(name) + 2 + n)) + name + bytes((0x02, n)))
                + b"(" + b"." * n + b")"
                for n in range(1, 6)
                if len(name) + 2 + n < 0x80
            ]  # fmt: skip
            parts.append(b"(?:" + b"|".join(alts) + b")" if alts else b"(?!)")
        self._pattern = re.compile(b"".join(parts), re.DOTALL)

    def values(self, reply: Reply) -> list[int] | None:
        m = self._pattern.fullmatch(reply.raw, reply.start, reply.end)
        if m is None:
            return None
        return [int.from_bytes(g, "big", signed=True) for g in m.groups() if g is not None]


@functools.lru_cache(maxsize=256)  # PDUs of one model share their steady GET
def integer_template(oids: tuple[Oid, ...]) -> IntegerTemplate:
    return IntegerTemplate(oids)


def _int_at(buf: bytes, i: int, end: int) -> tuple[int, int]:
    tag, s, e = _head(buf, i, end)
    if tag != 0x02 or s == e:
        raise BerError("expected an INTEGER")
    return int.from_bytes(buf[s:e], "big", signed=True), e


def decode_reply(buf: bytes) -> Reply:
    """A v2c Response-PDU from `buf` (its community for the caller to check); BerError
    when it is not one."""
    tag, i, end = _head(buf, 0, len(buf))
    if tag != 0x30:
        raise BerError("not a SEQUENCE")
    version, i = _int_at(buf, i, end)
    if version != 1:
        raise BerError(f"not SNMP v2c (version field {version})")
    tag, s, i = _head(buf, i, end)
    if tag != 0x04:
        raise BerError("community is not an OCTET STRING")
    community = buf[s:i]
    tag, i, end = _head(buf, i, end)
    if tag != RESPONSE:
        raise BerError(f"not a Response-PDU (tag 0x{tag:02x})")
    request_id, i = _int_at(buf, i, end)
    error_status, i = _int_at(buf, i, end)
    error_index, i = _int_at(buf, i, end)
    tag, i, end = _head(buf, i, end)
    if tag != 0x30:
        raise BerError("var-bind list is not a SEQUENCE")
    return Reply(buf, i, end, community, request_id, error_status, error_index)


def _var_binds(buf: bytes, i: int, end: int) -> list[tuple[bytes, Value]]:
    binds: list[tuple[bytes, Value]] = []
    append = binds.append
    while i < end:
        # The usual var-bind, every length in short form, decoded inline: this loop runs
        # for every value of every PDU poll. Anything else takes the general path below.
        if i + 2 <= end and buf[i] == 0x30 and buf[i + 1] < 0x80:
            stop = i + 2 + buf[i + 1]
            if stop <= end and i + 4 <= stop and buf[i + 2] == 0x06 and buf[i + 3] < 0x80:
                oe = i + 4 + buf[i + 3]
                if oe + 2 <= stop and buf[oe + 1] < 0x80 and oe + 2 + buf[oe + 1] == stop:
                    vtag = buf[oe]
                    if oe == i + 4:
                        raise BerError("empty OID")
                    if vtag == 0x02 and stop > oe + 2:
                        value: Value = int.from_bytes(buf[oe + 2 : stop], "big", signed=True)
                    else:
                        value = _value(vtag, buf[oe + 2 : stop])
                    append((buf[i + 4 : oe], value))
                    i = stop
                    continue
        tag, s, i = _head(buf, i, end)
        if tag != 0x30:
            raise BerError("var-bind is not a SEQUENCE")
        tag, os_, oe = _head(buf, s, i)
        if tag != 0x06:
            raise BerError("var-bind name is not an OID")
        vtag, vs, ve = _head(buf, oe, i)
        if ve != i:
            raise BerError("var-bind has trailing bytes")
        if os_ == oe:
            raise BerError("empty OID")
        append((buf[os_:oe], _value(vtag, buf[vs:ve])))
    return binds
