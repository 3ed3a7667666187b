"""Fuzzing the daemon's other inputs: grid orders, the config file, admin API requests.

Each has its own typed refusal, and the contract checked is that nothing else ever comes
out, whatever the input:

- a grid message is accepted, or `Rejected` with one of `orders.REJECT_REASONS` (and the
  acknowledgement still goes out as strict JSON);
- a config text gives a `Config` that the daemon can use (its rigs expand, its summary
  prints), or a `ConfigError` listing issues;
- an admin request gets `{"ok": true, ...}` or an error reply with a code other than
  "internal" (which means a handler crashed), and the server keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import example, given
from hypothesis import strategies as st

from controller.adapters.admin import AdminServer
from controller.adapters.grid.verify import Rejected, Verified, Verifier, load_keys
from controller.adapters.store import StateStore
from controller.config import Config, ConfigError, parse_config, summarize
from controller.core.grid.orders import REJECT_REASONS
from controller.runtime.daemon import Daemon
from controller.runtime.grid_service import GridService
from simulators.clock import ScaledClock
from simulators.site import SimSite
from tests.fuzz_support import (
    NASTY,
    dumps,
    fuzz_settings,
    json_objects,
    json_values,
    mutated,
    wire,
)
from tests.grid_helpers import Operator, grid_toml, order

FUZZ = fuzz_settings()
FUZZ_SLOW = fuzz_settings(max(20, FUZZ.max_examples // 4))

# -- grid orders ---------------------------------------------------------------------------------

NOW = 1_790_000_000.0
OP = Operator.new("op-1")
OP_ES = Operator.new("op-es", "ES256")
BASE = """
[site]
id = "sim"
state_dir = "{state}"
[control]
max_import_kw = 1000
"""


def _config(state: Path, *, allow_unsigned: bool, extra: str = "") -> Config:
    text = BASE.format(state=state) + grid_toml(
        OP, OP_ES, allow_unsigned=allow_unsigned, extra=extra
    )
    return parse_config(text, environ={})


def _verifier(*, allow_unsigned: bool, extra: str = "") -> Verifier:
    cfg = _config(Path("/nonexistent"), allow_unsigned=allow_unsigned, extra=extra)
    assert cfg.grid is not None
    return Verifier(cfg.grid, cfg.site.id, load_keys(cfg.grid))


SIGNED_ONLY = _verifier(allow_unsigned=False)
UNSIGNED_OK = _verifier(allow_unsigned=True)
HEARTBEAT = _verifier(
    allow_unsigned=False, extra='[grid.heartbeat]\ntopic = "op/hb"\nfailsafe_kw = 100\n'
)

ORDER_SEEDS = (
    order("curtail", now=NOW, jti="j-1"),
    order("curtail", now=NOW, jti="j-2", target={"level": 2}, duration_s=600.0),
    order(
        "curtail",
        now=NOW,
        jti="j-3",
        target={"shed_kw": 50.0},
        start="2026-09-21T12:00:00Z",
        end="2026-09-21T13:00:00+02:00",
        respond_within_s=30.0,
    ),
    order("modify", now=NOW, jti="j-4", modification=1, target={"max_import_kw": 80.0}),
    order("cancel", now=NOW, jti="j-5", modification=2),
    order("ping", now=NOW, jti="j-6", nbf=NOW - 10),
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(op: Operator, payload: bytes, header: dict[str, Any] | None = None) -> bytes:
    """A compact JWS over exactly these payload bytes (PyJWT's encode would re-serialise)."""
    key = serialization.load_pem_private_key(op.pair.private_pem, password=None)
    headers = {"kid": op.kid} if header is None else header
    token = jwt.PyJWS().encode(payload, key, algorithm=op.alg, headers=headers)  # type: ignore[arg-type]
    return token.encode()


def check_verdict(v: Verifier, raw: bytes, now: float = NOW) -> Verified | None:
    """The verifier's contract: a Verified message or a Rejected with a known reason."""
    try:
        got = v.verify(raw, now)
    except Rejected as r:
        assert r.reason in REJECT_REASONS, r.reason
        assert isinstance(r.detail, str) and r.detail
        json.dumps(r.hint, allow_nan=False)  # goes into the ack as it is
        return None
    assert isinstance(got, Verified)
    assert got.message.site == "sim" and got.message.exp > got.message.iat
    for t in (got.message.iat, got.message.exp):
        assert math.isfinite(t)
    return got


@given(st.binary(max_size=400) | wire(json_values))
@FUZZ
@example(b"\xff\xfe{")
@example(b"[" * 100_000)
def test_grid_random_bytes_and_json(raw: bytes) -> None:
    check_verdict(SIGNED_ONLY, raw)
    check_verdict(UNSIGNED_OK, raw)


@given(st.sampled_from(ORDER_SEEDS).flatmap(lambda s: mutated(s, max_mutations=3)))
@FUZZ
@example({**ORDER_SEEDS[0], "iat": 10**400})
@example({**ORDER_SEEDS[1], "start": "0001-01-01T00:00:00+01:00"})
@example({**ORDER_SEEDS[1], "end": "9999-12-31T23:59:59-23:59"})
@example({**ORDER_SEEDS[2], "end": 10**400})  # was OverflowError: math.isfinite(10**400)
def test_grid_mutated_orders_plain_and_signed(msg: dict[str, Any]) -> None:
    raw = dumps(msg)
    check_verdict(UNSIGNED_OK, raw)
    check_verdict(SIGNED_ONLY, _sign(OP, raw))
    check_verdict(SIGNED_ONLY, _sign(OP_ES, raw))


_HEADER_SEEDS = (
    {"alg": "EdDSA", "kid": "op-1", "typ": "JWT"},
    {"alg": "ES256", "kid": "op-es"},
    {"alg": "EdDSA"},
    {"alg": "none"},
    {"alg": "HS256", "kid": "op-1"},
)
_B64_TEXT = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.", max_size=60
)


@st.composite
def _jws_shaped(draw: st.DrawFn) -> bytes:
    header = draw(st.sampled_from(_HEADER_SEEDS).flatmap(lambda h: mutated(h, 2)) | json_values)
    payload = draw(wire(st.sampled_from(ORDER_SEEDS).flatmap(lambda s: mutated(s, 2))))
    head = _b64(dumps(header)) if draw(st.booleans()) else draw(_B64_TEXT)
    sig = draw(st.sampled_from(["", "AAAA", _b64(bytes(64)), "!!", "a.b"]) | _B64_TEXT)
    parts = [head, _b64(payload), sig]
    if draw(st.integers(0, 4)) == 0:
        parts = parts[: draw(st.integers(0, 3))] + draw(st.lists(_B64_TEXT, max_size=3))
    return ".".join(parts).encode("ascii")


@given(_jws_shaped() | _B64_TEXT.map(str.encode))
@FUZZ
@example(f"{_b64(b'[' * 5000)}.{_b64(b'{}')}.AAAA".encode())
@example(f"{_b64(dumps({'alg': 'EdDSA', 'kid': ['op-1']}))}.e30.AAAA".encode())
def test_grid_jws_shaped_strings(raw: bytes) -> None:
    check_verdict(SIGNED_ONLY, raw)
    check_verdict(UNSIGNED_OK, raw)


@given(mutated({"kind": "heartbeat", "iat": NOW, "site": "sim"}, max_mutations=3) | json_objects)
@FUZZ
@example({"kind": "heartbeat", "iat": 10**400})  # was OverflowError formatting the iat
@example({"kind": "heartbeat", "iat": -(10**400)})
def test_grid_signed_heartbeats(payload: dict[str, Any]) -> None:
    raw = _sign(OP, dumps(payload))
    try:
        iat = HEARTBEAT.heartbeat(raw, NOW)
    except Rejected as r:
        assert r.reason in REJECT_REASONS
    else:
        assert isinstance(iat, float) and math.isfinite(iat)


@pytest.fixture
def grid_service() -> Iterator[tuple[GridService, list[float]]]:
    state = Path(tempfile.mkdtemp(prefix="fuzz-grid-"))
    cfg = _config(state, allow_unsigned=True)
    clock = [NOW]
    store = StateStore.open(cfg.site.state_dir)
    try:
        yield GridService(cfg, store, None, now=lambda: clock[0]), clock
    finally:
        store.close()
        shutil.rmtree(state, ignore_errors=True)


@given(st.lists(st.sampled_from(ORDER_SEEDS).flatmap(lambda s: mutated(s, 3)), max_size=4))
@FUZZ_SLOW
@example([{**ORDER_SEEDS[0], "kind": "\ud800"}])  # was UnicodeEncodeError auditing the refusal
@example([{**ORDER_SEEDS[0], "iss": "\ud800"}])  # a field: refused as invalid by pydantic
def test_grid_service_acks_every_message(
    grid_service: tuple[GridService, list[float]], msgs: list[dict[str, Any]]
) -> None:
    """Through the order book too: each message gets an ack that goes out as strict JSON."""
    svc, clock = grid_service
    for msg in msgs:
        clock[0] += 1.0
        ack = svc.handle_order(dumps(msg))
        json.dumps(ack, allow_nan=False)
        assert ack["status"] in ("accepted", "rejected")
        if ack["status"] == "rejected":
            assert ack["reason"] in REJECT_REASONS
    json.dumps(svc.summary(), allow_nan=False)
    json.dumps(svc.orders(), allow_nan=False)


# -- the config file -----------------------------------------------------------------------------

EXAMPLE = (Path(__file__).parent.parent.parent / "config" / "example.toml").read_text()


def check_config(text: str, environ: dict[str, str] | None = None) -> Config | None:
    try:
        cfg = parse_config(text, source="fuzz.toml", environ=environ or {})
    except ConfigError as e:
        assert e.issues and all(str(i) for i in e.issues)
        return None
    assert isinstance(cfg, Config)
    for rig in cfg.rigs():  # what the daemon does with it next
        assert rig.id and rig.host
    assert summarize(cfg)
    return cfg


_TOML_SCALARS = st.one_of(
    st.integers().map(str),
    st.sampled_from(
        [
            "1" * 400,
            "9" * 5000,
            "0x7fffffff",
            "-0",
            "nan",
            "inf",
            "-inf",
            "1e999",
            "1_000",
            "true",
            "false",
            '""',
            "''",
            '"\\ud800"',
            '"\\u0000"',
            '"a\\tb"',
            "1979-05-27T07:32:00Z",
            "07:32:00",
            '"0.0.0.0/0"',
            '"10.0.0.0/8"',
            '"1.0.0.0-255.255.255.255"',
            '"{a.real}"',
            '"{a[0]}"',
            '"{prefix.x}"',
            '"{0}"',
            '"{"',
            '"America"',
            '"../etc"',
            "[" * 2000 + "]" * 2000,
            "{a = " * 2000 + "1" + "}" * 2000,
            "[1, 'a', 2.5]",
            "{}",
        ]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=20).map(json.dumps),
)


@st.composite
def _mutated_toml(draw: st.DrawFn) -> str:
    lines = EXAMPLE.splitlines()
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(("value", "value", "value", "delete", "dup", "insert", "trunc")))
        line = lines[i]
        if op == "value" and "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=", 1)[0]
            lines[i] = f"{key}= {draw(_TOML_SCALARS)}"
        elif op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "insert":
            key = draw(
                st.sampled_from(
                    [
                        "id",
                        "host",
                        "range",
                        "id_format",
                        "port",
                        "driver",
                        "timezone",
                        "url",
                        "x",
                        "outlets.1",
                        "kw",
                    ]
                )
            )
            lines.insert(i, f"{key} = {draw(_TOML_SCALARS)}")
        elif op == "trunc":
            lines[i] = line[: draw(st.integers(0, len(line)))]
        if not lines:
            break
    return "\n".join(lines)


@given(st.text(max_size=200) | _mutated_toml())
@FUZZ
@example("a = " + "[" * 5000)  # was RecursionError out of tomllib
@example("a = " + "9" * 5000)  # was ValueError: int() of more than 4300 digits
@example('[site]\nid = "s"\n[[miners]]\nrange = "10.0.0.0/8"\n')  # 16 M addresses listed
@example('[site]\nid = "s"\n[[miners]]\nrange = "10.0.0.1-3"\nid_format = "{a.real}"\n')
@example('[site]\nid = "s"\n[[miners]]\nrange = "10.0.0.1-3"\nid_format = "{a[0]}"\n')
@example('[site]\nid = "s"\n[[miners]]\nrange = "10.0.0.1-3"\nid_format = "{prefix.x}"\n')
def test_config_text(text: str) -> None:
    check_config(text)


_ENV_KEYS = st.sampled_from(
    [
        "RIGD_SITE__ID",
        "RIGD_MQTT__URL",
        "RIGD_POLL__INTERVAL_S",
        "RIGD_MINERS",
        "RIGD_X__Y",
        "RIGD_SITE__TIMEZONE",
        "RIGD_CONTROL__MAX_IMPORT_KW",
        "RIGD___",
        "RIGD_A____B",
    ]
)


@given(st.dictionaries(_ENV_KEYS, _TOML_SCALARS | st.text(max_size=20), max_size=3))
@FUZZ
@example({"RIGD_MINERS": "[" * 5000})  # was RecursionError out of tomllib
@example({"RIGD_SITE__TIMEZONE": "1" * 400})  # was OSError: file name too long
def test_config_environment(environ: dict[str, str]) -> None:
    check_config(EXAMPLE, environ)


def test_config_example_parses() -> None:
    """The seed of the mutations is a valid config: they start from something that works."""
    assert check_config(EXAMPLE) is not None


# -- the admin API -------------------------------------------------------------------------------


@dataclass
class Admin:
    daemon: Daemon
    loop: asyncio.AbstractEventLoop
    socket: Path  # the daemon's own admin socket
    server: AdminServer  # another server on the same daemon, for calling `dispatch` directly


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    state = Path(tempfile.mkdtemp(prefix="fuzz-admin-", dir="/tmp"))  # socket paths are short
    try:
        async with SimSite(rigs=4, pdus=1, clock=ScaledClock(20.0)) as site:
            full = site.nominal_import_kw()
            text = site.config_toml(
                broker_url="mqtt://127.0.0.1:9",  # no broker: the admin API must not need one
                state_dir=state,
                interval_s=10,
                extra=f"[control]\nmax_import_kw = {full * 1.1:.0f}\nmin_off_s = 0\nmin_on_s = 0\n",
            )
            cfg_path = state / "rigd.toml"
            cfg_path.write_text(text)
            cfg = parse_config(text, environ={})
            daemon = Daemon(cfg, clock=site.clock, config_path=str(cfg_path))
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop))
            for _ in range(200):
                if daemon.last is not None and cfg.admin.socket.exists():
                    break
                await asyncio.sleep(0.05)
            try:
                server = AdminServer(daemon, state / "fuzz.sock")
                yield Admin(daemon, asyncio.get_running_loop(), cfg.admin.socket, server)
            finally:
                assert not task.done(), "the daemon stopped during the fuzzing"
                stop.set()
                await asyncio.wait_for(task, 20)
    finally:
        shutil.rmtree(state, ignore_errors=True)


REQUEST_SEEDS = (
    {"cmd": "status"},
    {"cmd": "rigs"},
    {"cmd": "rig", "id": "rig-001"},
    {"cmd": "sleep", "ids": ["rig-001"], "reason": "fuzz"},
    {"cmd": "wake", "ids": ["rig-001"], "reason": "fuzz"},
    {"cmd": "limit", "ids": ["rig-002"], "watts": 2500.0, "reason": "fuzz"},
    {"cmd": "maintenance", "on": True, "ids": ["rig-003"], "reason": "fuzz", "for_s": 60.0},
    {"cmd": "maintenance", "on": False, "group": "row-a", "reason": "fuzz"},
    {"cmd": "budget"},
    {"cmd": "budget_override", "kw": 100.0, "for_s": 60.0, "reason": "fuzz"},
    {"cmd": "budget_clear", "reason": "fuzz"},
    {"cmd": "events", "since": 0},
    {"cmd": "audit", "since": NOW},
    {"cmd": "grid"},
)

_requests = st.one_of(
    st.sampled_from(REQUEST_SEEDS).flatmap(lambda s: mutated(s, 3)).map(dumps),
    wire(json_values),
    st.binary(max_size=100),
    st.builds(
        lambda seed, key, value: dumps({**seed, key: value}),
        st.sampled_from(REQUEST_SEEDS),
        st.sampled_from(["watts", "kw", "for_s", "since", "ids", "id", "on", "reason", "group"]),
        st.sampled_from(NASTY),
    ),
)


def check_reply(doc: Any) -> None:
    assert isinstance(doc, dict) and isinstance(doc.get("ok"), bool)
    if doc["ok"]:
        assert "result" in doc
    else:
        err = doc["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str)
        assert err["code"] != "internal", err["message"]  # a handler crashed on this input


async def test_admin_requests(admin: Admin) -> None:
    """The request parser and every handler, on a running daemon over a simulated farm.

    The search runs in a worker thread (Hypothesis drives plain functions) and hands each
    request to the daemon's event loop, which keeps polling and controlling meanwhile.
    """
    server = admin.server
    # Unmutated, the seeds reach their handlers and work (this farm has no groups, no grid).
    for seed in REQUEST_SEEDS:
        doc = await server.dispatch(dumps(seed), "fuzz")
        check_reply(doc)
        refused = "group" in seed or seed["cmd"] == "grid"
        assert doc["ok"] is not refused, (seed, doc)

    @given(_requests)
    @FUZZ_SLOW
    @example(b"\xff\xfe\n")  # was "internal": UnicodeDecodeError is no JSONDecodeError
    @example(b"[" * 100_000)
    @example(b'{"cmd": "status", "x": ' + b"9" * 5000 + b"}")
    @example(dumps({"cmd": "budget_override", "kw": math.nan, "for_s": 60, "reason": "r"}))
    @example(
        dumps(
            {"cmd": "maintenance", "on": True, "ids": ["rig-001"], "reason": "r", "for_s": 10**400}
        )
    )
    def one(line: bytes) -> None:
        fut = asyncio.run_coroutine_threadsafe(server.dispatch(line, "fuzz"), admin.loop)
        check_reply(fut.result(timeout=30))

    await asyncio.to_thread(one)
    ctl = admin.daemon.controller
    assert ctl is not None
    assert ctl.override is None or math.isfinite(ctl.override.kw)
    reply = await server.dispatch(b'{"cmd":"status"}', "fuzz")
    assert reply["ok"], reply


async def _exchange(path: Path, data: bytes) -> list[Any]:
    """Send raw bytes on one connection; every reply line the server sent before closing."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


async def test_admin_socket_survives_bad_input(admin: Admin) -> None:
    """A handful through the real socket: each gets an error reply and the server stays up."""
    cases: list[tuple[bytes, int]] = [  # bytes sent, replies expected
        (b"\xff\xfe\x00garbage\n", 1),
        (b"not json\n{}\n[]\n", 3),
        (b"[" * 50_000 + b"\n", 1),
        (b'{"cmd": "status", "x": ' + b"9" * 5000 + b"}\n", 1),
        (b'{"cmd": "nope"}\n' * 20, 20),  # pipelined on one connection
        (b'{"cmd": "sleep", "ids": "rig-001", "reason": 5}\n', 1),
        (b'{"cmd": "budget_override", "kw": NaN, "for_s": 60, "reason": "r"}\n', 1),
        (b"x" * (70 * 1024) + b"\n", 1),  # over the 64 KiB request limit: one reply, closed
        (b'{"cmd": "status"', 1),  # no newline, then EOF: the client went away mid-request
    ]
    for data, expected in cases:
        replies_ = await _exchange(admin.socket, data)
        assert len(replies_) == expected, (data[:40], replies_)
        for doc in replies_:
            check_reply(doc)
            assert doc["ok"] is False, (data[:40], doc)
    # still serving, on a fresh connection
    (status,) = await _exchange(admin.socket, b'{"cmd": "status"}\n')
    assert status["ok"] is True


def test_fixtures_of_this_file_are_valid() -> None:
    """The seeds are accepted as they are, so the mutations start from valid messages."""
    assert check_verdict(UNSIGNED_OK, dumps(ORDER_SEEDS[0])) is not None
    assert check_verdict(SIGNED_ONLY, _sign(OP, dumps(ORDER_SEEDS[3]))) is not None
