"""The hand-written v2c codec, checked against pysnmp/pyasn1 as the reference BER codec."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyasn1.codec.ber import decoder, encoder
from pysnmp.proto.api import v2c

from drivers import snmp_wire
from drivers.apc_snmp import steady_oids

OIDS = steady_oids(range(1, 25))


def _response(var_binds: list[tuple[Any, Any]], *, request_id: int = 77,
              community: str = "public", error_status: int = 0) -> bytes:  # fmt: skip
    pdu = v2c.ResponsePDU()
    v2c.apiPDU.set_defaults(pdu)
    v2c.apiPDU.set_request_id(pdu, request_id)
    v2c.apiPDU.set_error_status(pdu, error_status)
    v2c.apiPDU.set_varbinds(pdu, var_binds)
    msg = v2c.Message()
    v2c.apiMessage.set_defaults(msg)
    v2c.apiMessage.set_community(msg, community)
    v2c.apiMessage.set_pdu(msg, pdu)
    return bytes(encoder.encode(msg))


def test_requests_decode_with_pysnmp() -> None:
    raw = snmp_wire.encode_request(
        snmp_wire.GETBULK, 4242, "public", snmp_wire.encode_binds(OIDS[:3]),
        non_repeaters=2, max_repetitions=25,
    )  # fmt: skip
    msg, rest = decoder.decode(raw, asn1Spec=v2c.Message())
    assert rest == b""
    assert str(v2c.apiMessage.get_community(msg)) == "public"
    pdu = v2c.apiMessage.get_pdu(msg)
    assert isinstance(pdu, v2c.GetBulkRequestPDU)
    assert int(v2c.apiPDU.get_request_id(pdu)) == 4242
    assert int(v2c.apiBulkPDU.get_non_repeaters(pdu)) == 2
    assert int(v2c.apiBulkPDU.get_max_repetitions(pdu)) == 25
    assert [tuple(o) for o, _ in v2c.apiPDU.get_varbinds(pdu)] == OIDS[:3]


@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=12),
            st.one_of(
                st.integers(-(2**31), 2**31 - 1).map(v2c.Integer),
                st.integers(0, 2**32 - 1).map(v2c.Gauge32),
                st.binary(max_size=200).map(v2c.OctetString),
                st.just("nsi").map(lambda _: v2c.NoSuchInstance("")),
                st.just("eom").map(lambda _: v2c.EndOfMibView("")),
            ),
        ),
        max_size=40,
    )
)
def test_replies_decode_as_pysnmp_encodes_them(binds: list[tuple[list[int], Any]]) -> None:
    var_binds = [((1, 3, *sub), value) for sub, value in binds]
    reply = snmp_wire.decode_reply(_response(var_binds))
    assert reply.request_id == 77 and reply.community == b"public"
    got = reply.decoded()
    assert [o for o, _ in got] == [o for o, _ in var_binds]
    for (_, mine), (_, theirs) in zip(got, var_binds, strict=True):
        if isinstance(theirs, v2c.NoSuchInstance):
            assert mine == snmp_wire.NO_SUCH_INSTANCE
        elif isinstance(theirs, v2c.EndOfMibView):
            assert mine == snmp_wire.END_OF_MIB_VIEW
        elif isinstance(theirs, v2c.OctetString):
            assert mine == bytes(theirs)
        else:
            assert mine == int(theirs)


def test_template_reads_integers_and_declines_anything_else() -> None:
    template = snmp_wire.integer_template(tuple(OIDS))
    values = [v2c.Integer(v) for v in [1234, -1, *([2] * 24), *range(0, 24 * 500, 500)]]
    reply = snmp_wire.decode_reply(_response(list(zip(OIDS, values, strict=True))))
    assert template.values(reply) == [int(v) for v in values]
    values[5] = v2c.NoSuchInstance("")  # a row gone: the general decoder says so
    reply = snmp_wire.decode_reply(_response(list(zip(OIDS, values, strict=True))))
    assert template.values(reply) is None
    assert reply.var_binds[5][1] == snmp_wire.NO_SUCH_INSTANCE
    other = [((*o[:-1], o[-1] + 1), v2c.Integer(1)) for o in OIDS]  # other objects
    assert template.values(snmp_wire.decode_reply(_response(other))) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x30",
        b"\x30\x03\x02\x01\x00",  # SNMPv1
        b"\x30\x84\xff\xff\xff\xff",  # a length past the datagram
        _response([((1, 3, 6), v2c.Integer(1))])[:-2],  # cut short
        b"\x13\x37 not BER at all \xde\xad\xbe\xef",
    ],
)
def test_malformed_replies_are_ber_errors(raw: bytes) -> None:
    with pytest.raises(snmp_wire.BerError):
        snmp_wire.decode_reply(raw).var_binds  # noqa: B018


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_ber_errors(raw: bytes) -> None:
    try:
        reply = snmp_wire.decode_reply(raw)
        reply.decoded()
    except snmp_wire.BerError:
        pass


def test_a_request_template_makes_the_message_for_any_id_in_its_range() -> None:
    binds = snmp_wire.encode_binds([(1, 3, 6, 1, 2, 1, 1, 1, 0)] * 60)  # long-form lengths
    for rid in (snmp_wire.REQUEST_ID_MIN, 0x1234_5678, snmp_wire.REQUEST_ID_MAX):
        for community in ("public", "c" * 200):
            head, tail = snmp_wire.request_template(snmp_wire.GET, community, binds)
            want = snmp_wire.encode_request(snmp_wire.GET, rid, community, binds)
            assert head + rid.to_bytes(4, "big") + tail == want
            head, tail = snmp_wire.request_template(snmp_wire.GETBULK, community, binds, 2, 24)
            want = snmp_wire.encode_request(
                snmp_wire.GETBULK, rid, community, binds, non_repeaters=2, max_repetitions=24
            )
            assert head + rid.to_bytes(4, "big") + tail == want


def test_a_set_of_an_integer_is_encoded() -> None:
    binds = snmp_wire.encode_set_binds([((1, 3, 6, 1, 4, 1, 318, 1, 1, 26, 9, 2, 4, 1, 5, 3), 2)])
    msg = snmp_wire.encode_request(snmp_wire.SET, 7, "private", binds)
    assert msg.startswith(b"\x30") and b"\xa3" in msg
    assert msg.endswith(snmp_wire.encode_oid((1, 3, 6, 1, 4, 1, 318, 1, 1, 26, 9, 2, 4, 1, 5, 3))
                        + b"\x02\x01\x02")  # fmt: skip
