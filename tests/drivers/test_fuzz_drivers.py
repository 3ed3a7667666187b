"""Fuzzing every device-reply parser: bad replies get a typed DeviceError, never a crash.

The contract checked for each parser: whatever a device sends, the parser either returns a
well-typed, sane result (no NaN or infinite figure, no negative power or hashrate: the
planner sums them into the farm's import) or raises a `drivers.errors.DeviceError` naming
what was wrong. Any other exception would escape the driver and fail the poll of the whole
site. Seeds are the recorded replies of each dialect in tests/fixtures, mutated (see
tests/fuzz_support.py); the transports are also driven over real loopback sockets by
servers that answer with fuzzed bytes.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from aiohttp import web
from hypothesis import example, given
from hypothesis import strategies as st
from pyasn1.type import univ
from pysnmp.proto import rfc1902

from drivers import apc_snmp, braiins, cgminer, luxos, modbus_meter, whatsminer
from drivers.antminer_web import (
    AntminerWebControl,
    SystemInfo,
    _realm,
    check_set_reply,
    conf_write_body,
    parse_system_info,
    parse_work_mode,
)
from drivers.errors import DeviceError, MalformedReply
from drivers.telemetry import (
    Hashboard,
    MeterReading,
    PduReading,
    RigIdentity,
    RigState,
    RigTelemetry,
)
from drivers.whatsminer.crypto import V2Token, aes_ecb_encrypt_b64
from simulators.modbus_meter import f32_regs
from tests.fuzz_support import (
    NASTY,
    dumps,
    fixture,
    fuzz_settings,
    json_objects,
    json_values,
    mutated,
    optional,
    replies,
    wire,
)

FUZZ = fuzz_settings()
FUZZ_NET = fuzz_settings(max(20, FUZZ.max_examples // 4))  # a loopback exchange per example

# -- the contract ------------------------------------------------------------------------------


def _measure(name: str, value: float | None) -> None:
    assert value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0), (
        f"{name} = {value!r}"
    )


def check_telemetry(tel: RigTelemetry) -> None:
    """What the planner may rely on in any reading, however odd the device's reply."""
    assert isinstance(tel, RigTelemetry)
    assert isinstance(tel.state, RigState)
    for name in ("hashrate_ths", "power_w", "power_limit_w", "nominal_hashrate_ths"):
        _measure(name, getattr(tel, name))
    for name in ("temp_c", "chip_temp_c"):
        t = getattr(tel, name)
        assert t is None or (isinstance(t, float) and math.isfinite(t)), f"{name} = {t!r}"
    assert all(isinstance(f, int) for f in tel.fans_rpm)
    assert tel.uptime_s is None or isinstance(tel.uptime_s, int)
    assert isinstance(tel.identity, RigIdentity)
    assert all(isinstance(s, str) for s in (tel.identity.make, tel.identity.model))
    assert all(isinstance(s, str) for s in (tel.identity.firmware, tel.identity.firmware_version))
    for b in tel.hashboards:
        assert isinstance(b, Hashboard) and isinstance(b.index, int)
        _measure("board hashrate_ths", b.hashrate_ths)
        assert b.chips is None or isinstance(b.chips, int)
    if tel.efficiency_j_per_th is not None:
        assert math.isfinite(tel.efficiency_j_per_th)


def typed(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or None when it raised a DeviceError; anything else fails the test."""
    try:
        return fn()
    except DeviceError as e:
        assert str(e)  # a message a technician can read
        return None


# -- CGMiner / LuxOS / bmminer (port 4028) ---------------------------------------------------

STOCK = {n: fixture(f"antminer-stock-2020/{n}.json") for n in ("summary", "stats", "version")}
LUX = {n: fixture(f"luxos/{n}.json") for n in ("power", "config", "atm", "version", "profiles")}
CG_SEEDS = (*STOCK.values(), *LUX.values(), fixture("luxos/logon_conflict.json"))


@given(wire(replies(*CG_SEEDS)) | st.binary(max_size=200))
@FUZZ
@example(b'{"STATUS":[{"STATUS":"S"}],"SUMMARY":[{"GHS 5s":' + b"9" * 5000 + b"}]}")
def test_cgminer_decode_reply(raw: bytes) -> None:
    reply = typed(lambda: cgminer.decode_reply(raw, device="r1", operation="summary"))
    assert reply is None or isinstance(reply, dict)


@given(replies(*CG_SEEDS))
@FUZZ
@example({"STATUS": [{"STATUS": [1]}]})  # was TypeError: unhashable type: 'list'
@example({"STATUS": {"STATUS": {}, "Code": 10**400}})
def test_cgminer_check_status(reply: dict[str, Any]) -> None:
    typed(lambda: cgminer.check_status(reply, device="r1", operation="summary"))


@given(
    summary=optional(replies(STOCK["summary"])),
    stats=optional(replies(STOCK["stats"])),
    power=optional(replies(LUX["power"])),
    config=optional(replies(LUX["config"])),
    version=optional(replies(STOCK["version"], LUX["version"])),
    atm=optional(replies(LUX["atm"])),
    profile_watts=optional(st.dictionaries(st.text(max_size=8), st.floats(0.1, 1e5), max_size=3)),
)
@FUZZ
@example(  # was OverflowError: int too large to convert to float
    summary={"SUMMARY": [{"GHS 5s": 10**400}]},
    stats=None,
    power=None,
    config=None,
    version=None,
    atm=None,
    profile_watts=None,
)
@example(  # was inf TH/s: 1e307 PH/s scaled to TH/s
    summary=None,
    stats={"STATS": [{"chain_rate1": "1e307", "rate_unit": "PH"}]},
    power={"POWER": [{"Watts": -3250}]},
    config=None,
    version=None,
    atm=None,
    profile_watts=None,
)
def test_cgminer_parse_telemetry(**replies_: Any) -> None:
    tel = typed(lambda: cgminer.parse_telemetry(1.0, device="r1", **replies_))
    if tel is not None:
        check_telemetry(tel)


@given(replies(LUX["profiles"]), optional(st.floats(allow_nan=False)))
@FUZZ
def test_luxos_parse_profiles(reply: dict[str, Any], watts: float | None) -> None:
    profiles = typed(lambda: luxos.parse_profiles(reply, device="r1"))
    if profiles is None:
        return
    assert profiles and all(math.isfinite(p.watts) and p.watts > 0 for p in profiles)
    assert [p.watts for p in profiles] == sorted(p.watts for p in profiles)
    assert luxos.default_profile(profiles) in profiles
    try:
        chosen = luxos.choose_profile(profiles, watts)
    except ValueError:  # a caller error (no profile that low), raised before any write
        assert watts is not None
    else:
        assert watts is None or chosen.watts <= watts


class ReplyServer:
    """A 4028-style server on loopback answering every request with the next scripted reply."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65_536)
            writer.write(self.replies.pop(0) if self.replies else b"")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ReplyServer]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self.server.close()
            await self.server.wait_closed()


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coro_fn())


@given(st.lists(wire(replies(*CG_SEEDS)) | st.binary(max_size=64), min_size=1, max_size=4))
@FUZZ_NET
def test_cgminer_client_over_a_socket(answers: list[bytes]) -> None:
    async def scenario() -> None:
        srv = ReplyServer()
        async with srv.running():
            client = cgminer.CGMinerClient(
                "127.0.0.1", srv.port, timeout=2.0, retries=0, device="r1"
            )
            srv.replies = list(answers)
            try:
                got = await client.multi("summary", "stats", optional={"stats"})
            except DeviceError:
                return
            assert isinstance(got, dict) and all(isinstance(v, dict) for v in got.values())

    run(scenario)


# -- Whatsminer (btminer API v2 and v3) --------------------------------------------------------

WM2 = {
    n: fixture(f"whatsminer-api-v2/{n}.json")
    for n in ("summary", "devs", "status", "get_version", "get_error_code", "get_psu")
}
WM2_ERRORS = fixture("whatsminer-api-v2/get_error_code_with_errors.json")
WM3 = {
    n: fixture(f"whatsminer-api-v3/{n}.json")
    for n in (
        "get_miner_status_summary",
        "get_miner_status_edevs",
        "get_device_info",
        "get_miner_setting",
        "set_ok",
    )
}


@given(replies(*WM2.values(), WM2_ERRORS))
@FUZZ
def test_whatsminer_v2_status_and_error_codes(reply: dict[str, Any]) -> None:
    typed(lambda: whatsminer.check_v2_status(reply, device="w1", operation="status"))
    codes = whatsminer.parse_error_codes(reply)
    assert all(isinstance(k, int) and isinstance(v, str) for k, v in codes.items())


@given(
    summary=optional(replies(WM2["summary"])),
    devs=optional(replies(WM2["devs"])),
    status=optional(replies(WM2["status"])),
    version=optional(replies(WM2["get_version"])),
)
@FUZZ
def test_whatsminer_v2_parse_telemetry(**replies_: Any) -> None:
    tel = typed(lambda: whatsminer.parse_v2_telemetry(2.0, device="w1", **replies_))
    if tel is not None:
        check_telemetry(tel)


@given(st.text() | st.sampled_from(["'20241201.11.REL'", "1" * 5000, "v2.0.5" + "9" * 4400]))
@FUZZ
@example("9" * 5000)  # was ValueError: int() of more than 4300 digits (api_ver from the miner)
def test_whatsminer_version_strings(text: str) -> None:
    date = whatsminer.fw_date(text)
    assert date is None or 0 <= date <= 99_999_999
    api = whatsminer.api_version_tuple(text)
    assert api is None or all(isinstance(n, int) for n in api)
    assert isinstance(whatsminer.model_name(text), str)
    ident = RigIdentity(firmware_version=text)
    assert whatsminer.driver_kind_for(ident) in ("whatsminer", "whatsminer-v3")


@given(
    summary=optional(replies(WM3["get_miner_status_summary"])),
    edevs=optional(replies(WM3["get_miner_status_edevs"])),
    device_info=optional(replies(WM3["get_device_info"])),
)
@FUZZ
def test_whatsminer_v3_parse_telemetry(**replies_: Any) -> None:
    tel = typed(lambda: whatsminer.parse_v3_telemetry(3.0, device="w3", **replies_))
    if tel is not None:
        check_telemetry(tel)
    ident = whatsminer.parse_v3_identity(replies_["device_info"])
    assert isinstance(ident.model, str) and isinstance(ident.firmware_version, str)


TOKEN = V2Token.derive("admin", "BQ5hoXV9", "5X8g1ZtB", "1234")


@st.composite
def _encrypted_replies(draw: st.DrawFn) -> bytes:
    """A write's reply: garbage, a plain error, or `{"enc": ...}` with fuzzed plaintext."""
    choice = draw(st.sampled_from(("plain", "enc", "enc-text")))
    if choice == "plain":
        return draw(wire(replies(*WM2.values())))
    if choice == "enc-text":
        enc: Any = draw(st.text(max_size=40) | st.sampled_from(NASTY))
    else:
        inner = draw(wire(replies({"STATUS": "S", "Msg": "OK", "Code": 131}, *WM2.values())))
        key = TOKEN.aes_key if draw(st.booleans()) else bytes(32)
        enc = aes_ecb_encrypt_b64(key, inner)
    return dumps({"enc": enc})


@given(_encrypted_replies())
@FUZZ
@example(b'{"enc": "\\ud800"}')
def test_whatsminer_v2_encrypted_reply(raw: bytes) -> None:
    client = whatsminer.BTMinerV2Client("127.0.0.1", device="w1")
    reply = typed(lambda: client._open(raw, TOKEN, "adjust_power_limit"))
    assert reply is None or isinstance(reply, dict)


GET_TOKEN = {
    "STATUS": "S",
    "When": 1,
    "Code": 134,
    "Msg": {"time": "1234", "salt": "BQ5hoXV9", "newsalt": "5X8g1ZtB"},
    "Description": "",
}


@given(wire(replies(GET_TOKEN)))
@FUZZ_NET
@example(dumps({**GET_TOKEN, "Msg": {"time": "1", "salt": "\ud800", "newsalt": "x"}}))
def test_whatsminer_v2_token_over_a_socket(answer: bytes) -> None:
    async def scenario() -> None:
        srv = ReplyServer()
        async with srv.running():
            srv.replies = [answer]
            client = whatsminer.BTMinerV2Client("127.0.0.1", srv.port, retries=0, device="w1")
            try:
                token = await client.token()
            except DeviceError:
                return
            assert isinstance(token, V2Token) and len(token.aes_key) == 32

    run(scenario)


class FrameServer:
    """An API v3 server on loopback: length-prefixed frames, each answer scripted."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (n,) = struct.unpack("<I", await reader.readexactly(4))
            await reader.readexactly(n)
            if self.replies:
                writer.write(self.replies.pop(0))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FrameServer]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    body = draw(wire(replies(*WM3.values(), {"code": 0, "when": 1_700_000_000, "msg": {}})))
    kind = draw(st.sampled_from(("ok", "ok", "ok", "short", "long", "huge", "heartbeat")))
    if kind == "short":
        return struct.pack("<I", len(body) + 10) + body
    if kind == "long":
        return struct.pack("<I", max(0, len(body) - 3)) + body
    if kind == "huge":
        return struct.pack("<I", 0xFFFF_FFFF) + body
    if kind == "heartbeat":
        return b"\x00\x00\x00\x00" + struct.pack("<I", len(body)) + body
    return struct.pack("<I", len(body)) + body


def _frame(doc: Any) -> bytes:
    body = dumps(doc)
    return struct.pack("<I", len(body)) + body


def _salt_reply(salt: Any) -> bytes:
    return _frame({"code": 0, "when": 1_700_000_000, "msg": {"salt": salt}})


@given(st.lists(_frames(), min_size=1, max_size=3), st.sampled_from(NASTY) | st.text(max_size=8))
@FUZZ_NET
@example([_frame({"code": 0, "when": 10**400})], "s")  # was OverflowError (when - clock)
@example([_frame({"code": 0})], "\ud800")  # was UnicodeEncodeError: the salt signs the token
def test_whatsminer_v3_client_over_a_socket(frames: list[bytes], salt: Any) -> None:

    async def scenario() -> None:
        srv = FrameServer()
        async with srv.running():
            client = whatsminer.BTMinerV3Client("127.0.0.1", srv.port, retries=0, device="w3")
            for frame in frames:
                srv.replies = [frame]
                try:
                    got = await client.get("get.miner.status", "summary")
                except DeviceError:
                    continue
                assert isinstance(got, dict) and got.get("code") == 0
                assert isinstance(client.miner_time(), int)
            srv.replies = [_salt_reply(salt), *frames]
            with suppress(DeviceError):
                await client.set("set.miner.power_limit", 3000)

    run(scenario)


# -- Antminer stock web UI (CGI JSON behind digest auth) ---------------------------------------

WEB = {
    n: fixture(f"antminer-stock-web/{n}.json")
    for n in ("get_system_info", "get_miner_conf", "set_miner_conf")
}


@given(replies(*WEB.values()), st.sampled_from([0, 1, 3]))
@FUZZ
@example({"bitmain-work-mode": "²"}, 1)  # was ValueError: isdigit() but not int()
@example({"bitmain-work-mode": "9" * 5000}, 1)
def test_antminer_web_replies(reply: dict[str, Any], mode: int) -> None:
    info = typed(lambda: parse_system_info(reply, device="a1"))
    if info is not None:
        assert isinstance(info, SystemInfo) and info.model
        assert isinstance(info.identity(), RigIdentity)
    got = typed(lambda: parse_work_mode(reply, device="a1"))
    assert got is None or isinstance(got, int)
    body = typed(lambda: conf_write_body(reply, mode, device="a1", operation="sleep"))
    if body is not None:
        assert body["miner-mode"] == mode and body["pools"]
        json.dumps(body)  # what is posted must be plain JSON
    typed(lambda: check_set_reply(reply, device="a1", operation="sleep"))


@given(
    st.integers(100, 599) | st.sampled_from([200, 401, 404]),
    st.text(max_size=80) | st.sampled_from(['Digest realm="antMiner Configuration"', "Digest"]),
    wire(replies(*WEB.values())) | st.binary(max_size=100),
)
@FUZZ
def test_antminer_web_decode(status: int, challenge: str, raw: bytes) -> None:
    web_ = AntminerWebControl("127.0.0.1", device="a1")
    where = {"device": "a1", "operation": "get_miner_conf"}
    got = typed(lambda: web_._decode("get_miner_conf.cgi", status, challenge, raw, where))
    assert got is None or isinstance(got, dict)


_CHALLENGES = st.one_of(
    st.just('Digest realm="antMiner Configuration", nonce="abc", qop="auth", algorithm=MD5'),
    st.builds(
        lambda realm, nonce, qop, alg, extra: (
            f'Digest realm="{realm}", nonce="{nonce}", qop="{qop}", algorithm={alg}{extra}'
        ),
        st.text('antMiner Configuratio"\\ ,=', max_size=30),
        st.text('abcdef0123456789"\\,', max_size=20),
        st.sampled_from(["auth", "auth-int", "auth,auth-int", "", "bogus", '"']),
        st.sampled_from(["MD5", "MD5-sess", "SHA-256", "SHA-512", "", "rot13", "md5"]),
        st.sampled_from(["", ", opaque=1", ', stale="true"', ", nonce=", ",,,", ", x"]),
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100),
)


@given(_CHALLENGES, st.sampled_from([401, 401, 200]), wire(replies(WEB["get_miner_conf"])))
@FUZZ_NET
def test_antminer_web_digest_challenges_over_http(challenge: str, status: int, body: bytes) -> None:
    """Whatever WWW-Authenticate the rig sends, the driver answers with a typed error."""

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") is None or status == 401:
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        return web.Response(status=status, body=body)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        web_ = AntminerWebControl("127.0.0.1", port, device="a1", read_timeout=3.0)
        try:
            try:
                got = await web_.get_miner_conf()
            except DeviceError:
                pass
            else:
                assert isinstance(got, dict)
            realm = await _realm("127.0.0.1", port, 3.0)
            assert realm is None or isinstance(realm, str)
        finally:
            await web_.close()
            await runner.cleanup()

    run(scenario)


# -- Braiins OS (4028 BOSminer/BOSer replies, REST JSON) ---------------------------------------

BOS_RPC = {
    n: fixture(f"braiins-os-25.07/rpc-4028/bosminer-plus-0.2.0-s9-{n}.json")
    for n in ("summary", "fans", "temps", "tunerstatus", "version", "devdetails")
}
BOS_RPC["devs"] = fixture("braiins-os-25.07/rpc-4028/bosminer-plus-0.4.0-s9-devs.json")
BOSER_VERSION = fixture("braiins-os-25.07/rpc-4028/boser-25.05-version.json")
BOS_REST = {
    n: fixture(f"braiins-os-25.07/{n}.json")
    for n in ("miner_details", "performance_tuner_state", "configuration_miner")
}
CONSTRAINTS = {
    "tuner_constraints": {
        "power_target": {"min": {"watt": 1000}, "max": {"watt": 3800}, "default": {"watt": 3250}}
    }
}


@given(
    summary=optional(replies(BOS_RPC["summary"])),
    devs=optional(replies(BOS_RPC["devs"])),
    temps=optional(replies(BOS_RPC["temps"])),
    fans=optional(replies(BOS_RPC["fans"])),
    tunerstatus=optional(replies(BOS_RPC["tunerstatus"])),
    version=optional(replies(BOS_RPC["version"], BOSER_VERSION)),
    devdetails=optional(replies(BOS_RPC["devdetails"])),
)
@FUZZ
def test_braiins_parse_bosminer_telemetry(**replies_: Any) -> None:
    tel = typed(lambda: braiins.parse_bosminer_telemetry(4.0, device="b1", **replies_))
    if tel is not None:
        check_telemetry(tel)
    assert isinstance(braiins.is_braiins(replies_["version"]), bool)
    chips = braiins.parse_chips(replies_["devdetails"])
    assert all(isinstance(k, int) and isinstance(v, int) and v >= 0 for k, v in chips.items())


@given(replies(*BOS_REST.values(), CONSTRAINTS, {"watt": 3000}, {"status": 3}))
@FUZZ
def test_braiins_rest_replies(reply: dict[str, Any]) -> None:
    ident = braiins.parse_bos_identity(None, None, reply)
    assert isinstance(ident.model, str) and isinstance(ident.firmware_version, str)
    status = braiins.parse_miner_status(reply)
    assert status is None or (isinstance(status, int) and not isinstance(status, bool))
    span = braiins.parse_power_range(reply)
    if span is not None:
        assert all(math.isfinite(w) and w > 0 for w in span) and span[0] <= span[1]
    _measure("tuner target", braiins.parse_tuner_target(reply))
    watt = typed(lambda: braiins.parse_watt(reply, device="b1", operation="set_power_target"))
    _measure("watt", watt)


@given(st.integers(100, 599), wire(replies(*BOS_REST.values())) | st.binary(max_size=100))
@FUZZ
def test_braiins_rest_decode(status: int, data: bytes) -> None:
    rest = braiins.BraiinsRestClient("127.0.0.1", device="b1")
    typed(lambda: rest._decode(status, data, "GET", braiins.DETAILS_PATH, "read"))


@given(
    login=st.one_of(
        wire(replies({"token": "abc", "timeout_s": 3600})),
        st.builds(lambda t: dumps({"token": t, "timeout_s": 3600}), st.sampled_from(NASTY)),
        st.builds(lambda t: dumps({"token": t}), st.text(max_size=12)),
    ),
    login_status=st.sampled_from([200, 200, 200, 401, 403, 500]),
    answer=wire(replies(BOS_REST["miner_details"])),
    answer_status=st.sampled_from([200, 200, 401, 404, 500]),
)
@FUZZ_NET
@example(  # was UnicodeEncodeError: a token that cannot be an HTTP header
    login=dumps({"token": "\ud800"}), login_status=200, answer=b"{}", answer_status=200
)
@example(
    login=dumps({"token": "a\r\nX-Evil: 1"}), login_status=200, answer=b"{}", answer_status=200
)
def test_braiins_rest_over_http(
    login: bytes, login_status: int, answer: bytes, answer_status: int
) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == braiins.LOGIN_PATH:
            return web.Response(status=login_status, body=login)
        return web.Response(status=answer_status, body=answer)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        rest = braiins.BraiinsRestClient(
            "127.0.0.1", port, password="x", timeout=3.0, retries=0, device="b1"
        )
        try:
            with suppress(DeviceError):
                await rest.get(braiins.DETAILS_PATH, operation="read")
        finally:
            await rest.close()
            await runner.cleanup()

    run(scenario)


# -- APC PDU over SNMP (var-bind values -> outlets) -------------------------------------------


def _snmp_values() -> st.SearchStrategy[Any]:
    ints = st.integers(-(2**40), 2**40) | st.sampled_from([-1, 0, 1, 2, 3, 10**400, -(10**400)])
    return st.one_of(
        ints.map(univ.Integer),
        st.integers(-(2**31), 2**31 - 1).map(rfc1902.Integer32),
        st.integers(0, 2**32 - 1).map(rfc1902.Gauge32),
        st.integers(0, 2**64 - 1).map(rfc1902.Counter64),
        st.binary(max_size=20).map(rfc1902.OctetString),
        st.sampled_from(  # built per draw: pyasn1 schema objects cannot be hashed
            [
                lambda: univ.Null(""),
                lambda: rfc1902.IpAddress("10.0.0.1"),
                lambda: univ.ObjectIdentifier("1.3.6.1"),
                lambda: apc_snmp.NoSuchInstance(""),
                lambda: apc_snmp.NoSuchObject(""),
                lambda: apc_snmp.EndOfMibView(""),
            ]
        ).map(lambda make: make()),
        st.sampled_from(NASTY),
        ints,
    )


def _healthy_poll(outlets: int) -> dict[tuple[int, ...], Any]:
    values: dict[tuple[int, ...], Any] = {
        (*apc_snmp.DEVICE_POWER, 1): univ.Integer(123),
        (*apc_snmp.DEVICE_ENERGY, 1): univ.Integer(45678),
    }
    for row in range(1, outlets + 1):
        values[(*apc_snmp.OUTLET_MODULE, row)] = univ.Integer(1)
        values[(*apc_snmp.OUTLET_NAME, row)] = rfc1902.OctetString(f"rig-{row:03d}".encode())
        values[(*apc_snmp.OUTLET_NUMBER, row)] = univ.Integer(row)
        values[(*apc_snmp.OUTLET_STATE, row)] = univ.Integer(2)
        values[(*apc_snmp.OUTLET_POWER, row)] = univ.Integer(3100)
    return values


@st.composite
def _polls(draw: st.DrawFn) -> dict[tuple[int, ...], Any]:
    values = _healthy_poll(draw(st.integers(0, 6)))
    for _ in range(draw(st.integers(0, 6))):
        keys = sorted(values)
        op = draw(st.sampled_from(("set", "drop", "add")))
        if op == "drop" and keys:
            del values[draw(st.sampled_from(keys))]
        elif op == "set" and keys:
            values[draw(st.sampled_from(keys))] = draw(_snmp_values())
        else:
            column = draw(st.sampled_from(apc_snmp.OUTLET_COLUMNS))
            values[(*column, draw(st.integers(0, 2**32)))] = draw(_snmp_values())
    return values


@given(_polls())
@FUZZ
@example({(*apc_snmp.DEVICE_POWER, 1): univ.Integer(10**400)})  # was OverflowError (x 10.0)
def test_apc_decode_poll(values: dict[tuple[int, ...], Any]) -> None:
    decoded = typed(lambda: apc_snmp.decode_poll("pdu1", 5.0, values))
    if decoded is None:
        return
    reading = decoded.reading
    assert isinstance(reading, PduReading)
    assert reading.power_w is None or 0 <= reading.power_w <= apc_snmp.MAX_DEVICE_POWER_W
    assert reading.energy_kwh is None or 0 <= reading.energy_kwh <= apc_snmp.MAX_ENERGY_KWH
    numbers = [o.number for o in reading.outlets]
    assert numbers == sorted(set(numbers)) and set(decoded.rows) == set(numbers)
    for o in reading.outlets:
        assert 1 <= o.number <= apc_snmp.MAX_OUTLET_NUMBER and isinstance(o.on, bool)
        assert o.power_w is None or 0 <= o.power_w <= apc_snmp.MAX_OUTLET_POWER_W


@given(_snmp_values())
@FUZZ
@example("\ud800")  # was UnicodeEncodeError in snmp_text
def test_apc_scalar_values(value: Any) -> None:
    n = typed(lambda: apc_snmp.snmp_int(value, device="pdu1", what="outlet state"))
    assert n is None or isinstance(n, int)
    s = typed(lambda: apc_snmp.snmp_text(value, device="pdu1", what="outlet name"))
    assert s is None or isinstance(s, str)


# -- Modbus grid meter (registers -> power and energy) -----------------------------------------

REG = st.integers(0, 0xFFFF)
SENTINELS = st.sampled_from([0x8000, 0x7FFF, 0xFFFF, 0x7FC0, 0x7F80, 0xFF80, 0, 1])


def _sdm_seed() -> list[int]:
    regs = [0] * 76
    for addr, v in {
        0: 230.0,
        2: 231.0,
        4: 229.0,
        6: 80.0,
        8: 79.0,
        10: 81.0,
        52: 53000.0,
        70: 50.0,
        72: 1234.5,
        74: 0.0,
    }.items():
        regs[addr : addr + 2] = f32_regs(v)
    return regs


def _sunspec_seed(model: int) -> list[int]:
    if model in modbus_meter.SUNSPEC_FLOAT_MODELS:
        b = [0] * 126
        b[0:2] = [model, 124]
        for off, v in {
            4: 80.0,
            6: 79.0,
            8: 81.0,
            12: 230.0,
            14: 231.0,
            16: 229.0,
            26: 50.0,
            28: 53000.0,
            60: math.nan,
            68: 1.2e9,
        }.items():
            b[off : off + 2] = f32_regs(v)
        return b
    b = [0x8000] * 107
    b[0:2] = [model, 105]
    b[2:7] = [2400, 800, 790, 810, 0xFFFF]
    b[7:11] = [2300, 2298, 2301, 2302]
    b[15:23] = [0xFFFF, 5001, 0xFFFE, 5300, 1780, 1760, 1760, 1]
    b[38:54] = [0] * 16
    b[46:48] = [0x075B, 0xCD14]
    b[54] = 1
    return b


@st.composite
def _registers(draw: st.DrawFn, seed: list[int]) -> list[int]:
    regs = list(seed)
    for _ in range(draw(st.integers(0, 8))):
        if not regs:
            break
        regs[draw(st.integers(0, len(regs) - 1))] = draw(REG | SENTINELS)
    if draw(st.integers(0, 9)) == 0:
        regs = regs[: draw(st.integers(0, len(regs)))]
    return regs


def _check_meter(reading: MeterReading | None) -> None:
    if reading is None:
        return
    assert isinstance(reading, MeterReading)
    values = [reading.power_w, reading.import_kwh, reading.export_kwh, reading.frequency_hz]
    values += [*reading.voltage_v, *reading.current_a]
    assert all(v is None or math.isfinite(v) for v in values)
    assert reading.import_kwh >= 0 and (reading.export_kwh is None or reading.export_kwh >= 0)
    assert abs(reading.power_w) <= modbus_meter.MAX_ABS_POWER_W


@given(_registers(_sdm_seed()) | st.lists(REG, max_size=90))
@FUZZ
def test_modbus_sdm630_registers(regs: list[int]) -> None:
    _check_meter(typed(lambda: modbus_meter.decode_sdm630(regs, 6.0, device="m1")))


MODELS = sorted(modbus_meter.SUNSPEC_INT_MODELS | modbus_meter.SUNSPEC_FLOAT_MODELS)


@given(st.sampled_from(MODELS).flatmap(lambda m: _registers(_sunspec_seed(m))) | st.lists(REG))
@FUZZ
def test_modbus_sunspec_registers(block: list[int]) -> None:
    _check_meter(typed(lambda: modbus_meter.decode_sunspec_meter(block, 7.0, device="m1")))


@given(st.binary(max_size=16), st.sampled_from([0, 3, 4]))
@FUZZ
def test_modbus_frame_sniffing(buf: bytes, fc: int) -> None:
    assert isinstance(modbus_meter.looks_like_garbage(buf, fc), bool)


# -- a sanity check of the fuzzing itself ------------------------------------------------------


def test_mutations_reach_the_fields_parsers_read() -> None:
    """The seeds are real replies: unmutated they parse, so mutations start from valid input.

    Run last in this file, it also shows that no example changed a seed in place.
    """
    assert fixture("luxos/config.json") == LUX["config"]
    assert fixture("antminer-stock-2020/stats.json") == STOCK["stats"]
    assert fixture("whatsminer-api-v2/summary.json") == WM2["summary"]
    tel = cgminer.parse_telemetry(1.0, summary=STOCK["summary"], stats=STOCK["stats"])
    assert tel.hashrate_ths and tel.hashrate_ths > 0
    tel = whatsminer.parse_v2_telemetry(
        1.0, summary=WM2["summary"], devs=WM2["devs"], status=WM2["status"]
    )
    assert tel.power_w and tel.power_w > 0
    tel = whatsminer.parse_v3_telemetry(
        1.0,
        summary=WM3["get_miner_status_summary"],
        edevs=WM3["get_miner_status_edevs"],
        device_info=WM3["get_device_info"],
    )
    assert tel.hashrate_ths and tel.hashrate_ths > 0
    tel = braiins.parse_bosminer_telemetry(
        1.0, summary=BOS_RPC["summary"], devs=BOS_RPC["devs"], tunerstatus=BOS_RPC["tunerstatus"]
    )
    assert tel.power_w and tel.power_w > 0
    assert apc_snmp.decode_poll("p", 0.0, _healthy_poll(3)).reading.outlets
    assert modbus_meter.decode_sdm630(_sdm_seed(), 0.0).power_w == 53000.0
    for m in MODELS:
        assert modbus_meter.decode_sunspec_meter(_sunspec_seed(m), 0.0).power_w == 53000.0
    assert luxos.parse_profiles(LUX["profiles"])
    assert parse_work_mode(WEB["get_miner_conf"]) is not None
    assert braiins.parse_power_range(CONSTRAINTS) == (1000.0, 3800.0)
    with pytest.raises(MalformedReply):
        cgminer.decode_reply(b"[" * 5000)
    assert isinstance(json_values, st.SearchStrategy) and isinstance(
        json_objects, st.SearchStrategy
    )
    assert mutated({"a": 1}) is not None
