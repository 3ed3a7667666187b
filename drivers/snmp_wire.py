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

from typing import Final

Oid = tuple[int, ...]

GET: Final = 0xA0
GETBULK: Final = 0xA5
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


def encode_oid(oid: Oid) -> bytes:
    """An OBJECT IDENTIFIER's TLV."""
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
    return _tlv(0x06, bytes(out))


def encode_request(
    pdu_type: int,
    request_id: int,
    community: str,
    oids: list[Oid] | tuple[Oid, ...],
    *,
    non_repeaters: int = 0,
    max_repetitions: int = 0,
) -> bytes:
    """A v2c GET (`GET`) or GETBULK (`GETBULK`) message for `oids` (values NULL)."""
    binds = b"".join(_tlv(0x30, encode_oid(o) + b"\x05\x00") for o in oids)
    second, third = (non_repeaters, max_repetitions) if pdu_type == GETBULK else (0, 0)
    pdu = _tlv(
        pdu_type,
        _integer(request_id) + _integer(second) + _integer(third) + _tlv(0x30, binds),
    )
    return _tlv(0x30, _integer(1) + _tlv(0x04, community.encode()) + pdu)


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


def decode_oid(body: bytes) -> Oid:
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
    """A decoded v2c Response-PDU."""

    __slots__ = ("error_index", "error_status", "request_id", "var_binds")

    def __init__(
        self,
        request_id: int,
        error_status: int,
        error_index: int,
        var_binds: list[tuple[Oid, Value]],
    ) -> None:
        self.request_id = request_id
        self.error_status = error_status
        self.error_index = error_index
        self.var_binds = var_binds


def _int_at(buf: bytes, i: int, end: int) -> tuple[int, int]:
    tag, s, e = _head(buf, i, end)
    if tag != 0x02 or s == e:
        raise BerError("expected an INTEGER")
    return int.from_bytes(buf[s:e], "big", signed=True), e


def decode_reply(buf: bytes, community: str) -> Reply:
    """A v2c Response-PDU from `buf`; BerError when it is not one for `community`."""
    tag, i, end = _head(buf, 0, len(buf))
    if tag != 0x30:
        raise BerError("not a SEQUENCE")
    version, i = _int_at(buf, i, end)
    if version != 1:
        raise BerError(f"not SNMP v2c (version field {version})")
    tag, s, i = _head(buf, i, end)
    if tag != 0x04 or buf[s:i] != community.encode():
        raise BerError("community differs")
    tag, i, end = _head(buf, i, end)
    if tag != RESPONSE:
        raise BerError(f"not a Response-PDU (tag 0x{tag:02x})")
    request_id, i = _int_at(buf, i, end)
    error_status, i = _int_at(buf, i, end)
    error_index, i = _int_at(buf, i, end)
    tag, i, end = _head(buf, i, end)
    if tag != 0x30:
        raise BerError("var-bind list is not a SEQUENCE")
    binds: list[tuple[Oid, Value]] = []
    append = binds.append
    while i < end:
        tag, s, i = _head(buf, i, end)
        if tag != 0x30:
            raise BerError("var-bind is not a SEQUENCE")
        tag, os_, oe = _head(buf, s, i)
        if tag != 0x06:
            raise BerError("var-bind name is not an OID")
        vtag, vs, ve = _head(buf, oe, i)
        if ve != i:
            raise BerError("var-bind has trailing bytes")
        append((decode_oid(buf[os_:oe]), _value(vtag, buf[vs:ve])))
    return Reply(request_id, error_status, error_index, binds)
