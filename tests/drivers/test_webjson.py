"""The web-API drivers' HTTP/1.1 client (drivers/webjson.py) against hand-written servers
on loopback: every byte the server sends is chosen by the test, so keep-alive, framing,
stale connections, limits, timeouts and digest auth are each seen exactly as a device
would present them.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drivers import webjson
from drivers.errors import DeviceAuthError, DeviceTimeout, DeviceUnreachable, MalformedReply
from drivers.webjson import DigestAuth, JsonHttpClient, parse_challenge

Reply = Callable[["Request"], Awaitable[bytes | None]]  # None: close without answering
Serve = Callable[..., Awaitable["Server"]]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which connection (0, 1, ...) it came on
    index: int  # its position on that connection


@dataclass
class Server:
    """A raw HTTP/1.1 server: `reply(request)` decides the exact bytes of every answer."""

    reply: Reply
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    tls: ssl.SSLContext | None = None
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn, self.connections = self.connections, self.connections + 1
        self._writers.append(writer)
        try:
            for index in range(1000):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req = Request(method, path, headers, body, conn, index)
                self.requests.append(req)
                out = await self.reply(req)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if b"connection: close" in out.lower().split(b"\r\n\r\n", 1)[0]:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok":true}', *, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def chunked(*parts: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        out += b"%x\r\n%s\r\n" % (len(p), p)
    return out + b"0\r\n\r\n"


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[Server] = []

    async def start(reply: Reply, **kw: object) -> Server:
        s = Server(reply, **kw)  # type: ignore[arg-type]
        await s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.stop()


def client(server: Server, **kw: object) -> JsonHttpClient:
    opts: dict[str, object] = {"timeout": 2.0, "retries": 0, "device": "rig-1"}
    opts.update(kw)
    return JsonHttpClient(server.host, server.port, **opts)  # type: ignore[arg-type]


async def answer(req: Request) -> bytes:
    return ok(b'{"path":"%s","n":%d}' % (req.path.encode(), req.index))


# -- keep-alive ----------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_a_while(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rig called every few minutes (a stock Antminer's mode) holds no socket in between:
    a 10,000-rig farm's simulator ran out of descriptors with one idle per rig."""
    monkeypatch.setattr(webjson, "IDLE_CLOSE_S", 0.2)
    s = await serve(answer)
    c = client(s)
    try:
        await c.request("GET", "/summary", operation="read")
        await c.request("GET", "/summary", operation="read")  # within the idle time: reused
        assert c.connections == 1
        await asyncio.sleep(0.5)
        assert not c._idle  # closed, not kept
        await c.request("GET", "/summary", operation="read")
        assert c.connections == 2
    finally:
        await c.close()


async def test_reads_reuse_one_kept_alive_connection(serve: Serve) -> None:
    s = await serve(answer)
    c = client(s)
    try:
        for n in range(5):
            status, reply = await c.request("GET", "/summary", operation="read")
            assert status == 200 and reply == {"path": "/summary", "n": n}
    finally:
        await c.close()
    assert s.connections == 1 and c.connections == 1
    req = s.requests[0]
    assert req.headers["host"] == f"127.0.0.1:{s.port}" and req.method == "GET"


async def test_overlapping_calls_get_their_own_connections(serve: Serve) -> None:
    async def slow(req: Request) -> bytes:
        await asyncio.sleep(0.05)
        return await answer(req)

    s = await serve(slow)
    c = client(s)
    try:
        got = await asyncio.gather(
            *(c.request("GET", f"/p{i}", operation="read") for i in range(4))
        )
        assert [r[1]["path"] for r in got] == [f"/p{i}" for i in range(4)]
        assert s.connections == 4
        await c.request("GET", "/again", operation="read")  # one of the kept ones
        assert s.connections == 4
    finally:
        await c.close()


async def test_connection_close_reply_then_a_fresh_connection(serve: Serve) -> None:
    async def closing(req: Request) -> bytes:
        return ok(extra="Connection: close\r\n")

    s = await serve(closing)
    c = client(s)
    try:
        for _ in range(3):
            assert (await c.request("GET", "/x", operation="read"))[0] == 200
    finally:
        await c.close()
    assert s.connections == 3


async def test_device_closing_idle_connections_between_polls(serve: Serve) -> None:
    """Real firmware drops a kept-alive connection after a few idle seconds, silently."""
    s = await serve(answer)
    c = client(s)
    try:
        for _ in range(3):
            assert (await c.request("GET", "/x", operation="read"))[0] == 200
            for w in s._writers:
                w.close()  # the device's idle timeout
            await asyncio.sleep(0.05)
    finally:
        await c.close()
    assert s.connections == 3 and len(s.requests) == 3


async def test_stale_connection_resends_a_read_once(serve: Serve) -> None:
    """The device closes the kept connection just as the next request arrives: the read is
    sent once more on a fresh connection, and the caller never sees the race."""

    async def drop_second(req: Request) -> bytes | None:
        return None if req.index == 1 else await answer(req)

    s = await serve(drop_second)
    c = client(s)
    try:
        await c.request("GET", "/a", operation="read")
        status, reply = await c.request("GET", "/b", operation="read")
        assert status == 200 and reply["path"] == "/b"
    finally:
        await c.close()
    assert [(r.connection, r.path) for r in s.requests] == [(0, "/a"), (0, "/b"), (1, "/b")]


async def test_commands_are_never_resent_and_go_on_fresh_connections(serve: Serve) -> None:
    async def drop_posts(req: Request) -> bytes | None:
        return None if req.method == "POST" else await answer(req)

    s = await serve(drop_posts)
    c = client(s)
    try:
        await c.request("GET", "/a", operation="read")
        with pytest.raises(DeviceUnreachable, match="closed without a reply") as err:
            await c.request("POST", "/stop", body={"x": 1}, operation="sleep", repeatable=False)
        assert err.value.device == "rig-1" and err.value.operation == "sleep"
    finally:
        await c.close()
    posts = [r for r in s.requests if r.method == "POST"]
    assert len(posts) == 1 and posts[0].connection == 1  # not on the kept-alive one
    assert posts[0].body == b'{"x":1}' and posts[0].headers["content-type"] == "application/json"


async def test_a_read_whose_fresh_connection_drops_is_unreachable(serve: Serve) -> None:
    async def drop(req: Request) -> bytes | None:
        return None

    s = await serve(drop)
    c = client(s)
    try:
        with pytest.raises(DeviceUnreachable):
            await c.request("GET", "/a", operation="read")
    finally:
        await c.close()
    assert len(s.requests) == 1  # a fresh connection is not stale: no resend


# -- framing and limits --------------------------------------------------------------------


async def test_chunked_and_content_length_and_read_to_close(serve: Serve) -> None:
    bodies = {
        "/chunked": chunked(b'{"a":', b"[1,2", b",3]}"),
        "/length": ok(b'{"a":[1,2,3]}'),
        "/eof": b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":[1,2,3]}',
        "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    }

    async def reply(req: Request) -> bytes:
        out = bodies[req.path]
        if req.path == "/eof":
            asyncio.get_running_loop().call_soon(lambda: [w.close() for w in s._writers])
        return out

    s = await serve(reply)
    c = client(s)
    try:
        for path in ("/chunked", "/length", "/eof", "/chunked"):
            assert await c.request("GET", path, operation="read") == (200, {"a": [1, 2, 3]})
        assert await c.request("GET", "/empty", operation="read") == (204, None)
    finally:
        await c.close()


async def test_informational_reply_then_the_answer(serve: Serve) -> None:
    async def reply(req: Request) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\n" + await answer(req)

    s = await serve(reply)
    c = client(s)
    try:
        for n in range(2):
            assert await c.request("GET", "/x", operation="read") == (200, {"path": "/x", "n": n})
    finally:
        await c.close()


async def test_oversized_bodies_are_refused(serve: Serve) -> None:
    big = b'{"x":"' + b"a" * 5000 + b'"}'

    async def reply(req: Request) -> bytes:
        return chunked(big[:3000], big[3000:]) if req.path == "/chunked" else ok(big)

    s = await serve(reply)
    c = client(s, max_body_bytes=4096)
    try:
        for path in ("/length", "/chunked"):
            with pytest.raises(MalformedReply, match="exceeds 4096 bytes") as err:
                await c.request("GET", path, operation="read")
            assert err.value.device == "rig-1"
        assert s.connections == 2  # a refused reply's connection is not reused
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_8.9\r\n\r\n", "not an HTTP reply"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"cut', "cut short"),
        (ok(b"<html>oops</html>"), "non-JSON"),
    ],
)
async def test_broken_replies_are_malformed(serve: Serve, raw: bytes, message: str) -> None:
    async def reply(req: Request) -> bytes:
        asyncio.get_running_loop().call_later(0.05, lambda: [w.close() for w in s._writers])
        return raw

    s = await serve(reply)
    c = client(s)
    try:
        with pytest.raises(MalformedReply, match=message):
            await c.request("GET", "/x", operation="read")
    finally:
        await c.close()


async def test_error_pages_come_back_as_text(serve: Serve) -> None:
    async def reply(req: Request) -> bytes:
        return b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nbroke"

    s = await serve(reply)
    c = client(s)
    try:
        assert await c.request("GET", "/x", operation="read") == (500, "broke")
    finally:
        await c.close()


def test_headers_cannot_inject_others() -> None:
    c = JsonHttpClient("127.0.0.1", 1)
    with pytest.raises(ValueError, match="invalid HTTP header"):
        c._head("GET", "/", None, "application/json", {"Authorization": "x\r\nEvil: 1"})


# -- timeouts and unreachable hosts --------------------------------------------------------


async def test_a_silent_device_times_out_on_time(serve: Serve) -> None:
    async def silent(req: Request) -> bytes:
        await asyncio.sleep(30)
        return b""

    s = await serve(silent)
    c = client(s, timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"no reply within 0\.3s") as err:
            await c.request("GET", "/x", operation="read")
        assert time.monotonic() - t0 < 2.0 and err.value.operation == "read"
        with pytest.raises(DeviceTimeout, match=r"within 0\.1s"):
            await c.request("GET", "/x", operation="read", wait_s=0.1)
    finally:
        await c.close()


async def test_refused_connection_is_unreachable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    c = JsonHttpClient("127.0.0.1", port, timeout=1.0, retries=1, backoff_s=0.01, device="r")
    with pytest.raises(DeviceUnreachable) as err:
        await c.request("GET", "/x", operation="read")
    assert err.value.device == "r"


async def test_close_ends_calls_in_flight_and_the_client_reconnects(serve: Serve) -> None:
    gate = asyncio.Event()

    async def held(req: Request) -> bytes:
        if req.path == "/held":
            await gate.wait()
        return await answer(req)

    s = await serve(held)
    c = client(s)
    call = asyncio.ensure_future(c.request("GET", "/held", operation="read"))
    await asyncio.sleep(0.1)
    await c.close()
    with pytest.raises(DeviceUnreachable):
        await call
    gate.set()
    assert (await c.request("GET", "/after", operation="read"))[0] == 200
    # On a kept-alive connection too: a call that close() ended is not sent again.
    gate.clear()
    call = asyncio.ensure_future(c.request("GET", "/held", operation="read"))
    await asyncio.sleep(0.1)
    await c.close()
    with pytest.raises(DeviceUnreachable, match="client was closed"):
        await call
    assert [r.path for r in s.requests] == ["/held", "/after", "/held"]
    gate.set()
    await c.close()


# -- digest auth ---------------------------------------------------------------------------

REALM = "antMiner Configuration"


class DigestServer:
    """RFC 7616 digest (MD5, qop=auth) as lighttpd answers it; `expire()` makes the current
    nonce stale. Checks the response and that nc counts up per nonce."""

    def __init__(self, user: str = "root", password: str = "root") -> None:
        self.user, self.password = user, password
        self.nonce_n = 0
        self.stale: set[str] = set()
        self.seen_nc: dict[str, int] = {}

    def nonce(self) -> str:
        return f"nonce{self.nonce_n:04d}"

    def expire(self) -> None:
        self.stale.add(self.nonce())
        self.nonce_n += 1

    def challenge(self, stale: bool = False) -> bytes:
        extra = ", stale=true" if stale else ""
        head = f'Digest realm="{REALM}", nonce="{self.nonce()}", qop="auth"{extra}'
        return (
            f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {head}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    async def reply(self, req: Request) -> bytes:
        scheme, p = parse_challenge(req.headers.get("authorization", ""))
        if scheme != "digest":
            return self.challenge()
        if p["nonce"] in self.stale:
            return self.challenge(stale=True)

        def md5(s: str) -> str:
            return hashlib.md5(s.encode()).hexdigest()

        ha1 = md5(f"{self.user}:{REALM}:{self.password}")
        ha2 = md5(f"{req.method}:{p['uri']}")
        want = md5(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}")
        nc = int(p["nc"], 16)
        if p["response"] != want or p["uri"] != req.path or p.get("username") != self.user:
            return self.challenge()
        assert nc > self.seen_nc.get(p["nonce"], 0), "nc must count up"
        self.seen_nc[p["nonce"]] = nc
        return await answer(req)


async def test_digest_one_request_per_call_once_challenged(serve: Serve) -> None:
    d = DigestServer()
    s = await serve(d.reply)
    c = client(s, auth=DigestAuth("root", "root"))
    try:
        for _ in range(4):
            assert (await c.request("GET", "/cgi-bin/get_miner_conf.cgi", operation="r"))[0] == 200
        reply = await c.exchange("POST", "/cgi-bin/set.cgi", data=b"{}", operation="w")
        assert reply.status == 200
    finally:
        await c.close()
    # One challenge, then every call answered at once; nc counted 1..5 on the one nonce.
    assert [bool(r.headers.get("authorization")) for r in s.requests] == [False] + [True] * 5
    assert d.seen_nc == {"nonce0000": 5}
    assert c.auth is not None and c.auth.realm == REALM


async def test_digest_stale_nonce_is_renewed_within_the_call(serve: Serve) -> None:
    d = DigestServer()
    s = await serve(d.reply)
    c = client(s, auth=DigestAuth("root", "root"))
    try:
        await c.request("GET", "/a", operation="r")
        d.expire()
        n = len(s.requests)
        assert await c.request("GET", "/b", operation="r") == (200, {"path": "/b", "n": 3})
        assert len(s.requests) - n == 2  # the stale answer, then the renewed one
        assert d.seen_nc["nonce0001"] == 1
        await c.request("GET", "/c", operation="r")
        assert d.seen_nc["nonce0001"] == 2
    finally:
        await c.close()


async def test_digest_wrong_password_returns_the_401(serve: Serve) -> None:
    d = DigestServer(password="secret")
    s = await serve(d.reply)
    c = client(s, auth=DigestAuth("root", "root"))
    try:
        reply = await c.exchange("GET", "/a", operation="r")
        assert reply.status == 401 and REALM in reply.header("WWW-Authenticate")
        assert len(s.requests) == 2  # challenge, one answer: no loop
    finally:
        await c.close()


async def test_digest_is_chosen_among_several_schemes(serve: Serve) -> None:
    d = DigestServer()

    async def reply(req: Request) -> bytes:
        out = await d.reply(req)
        return out.replace(
            b"WWW-Authenticate:", b'WWW-Authenticate: Basic realm="x"\r\n' + b"WWW-Authenticate:"
        )

    s = await serve(reply)
    c = client(s, auth=DigestAuth("root", "root"))
    try:
        assert (await c.request("GET", "/a", operation="r"))[0] == 200
    finally:
        await c.close()


@pytest.mark.parametrize(
    "challenge",
    [
        'Basic realm="x"',
        'Digest realm="x", nonce="n", qop="auth-int"',
        'Digest realm="x", nonce="n", algorithm=SHA-512',
        'Digest realm="x\\"y", nonce="n"',
    ],
)
async def test_digest_challenges_it_cannot_answer_are_auth_errors(
    serve: Serve, challenge: str
) -> None:
    async def reply(req: Request) -> bytes:
        return (
            f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    s = await serve(reply)
    c = client(s, auth=DigestAuth("root", "root"))
    try:
        with pytest.raises(DeviceAuthError, match="cannot answer"):
            await c.exchange("GET", "/a", operation="r")
    finally:
        await c.close()


def test_digest_sha256_sess_and_rfc2069() -> None:
    auth = DigestAuth("Mufasa", "Circle of Life")
    # RFC 7616 section 3.9.1's example, SHA-256 with qop=auth: the response for its cnonce.
    assert (
        auth.accept(
            'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
            'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
            'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
        )
        is None
    )
    header = auth.header("GET", "/dir/index.html")
    _, p = parse_challenge(header)
    assert p["algorithm"] == "SHA-256" and p["qop"] == "auth" and p["nc"] == "00000001"

    def h(s: str) -> str:
        return hashlib.sha256(s.encode()).hexdigest()

    ha1 = h("Mufasa:http-auth@example.org:Circle of Life")
    ha2 = h("GET:/dir/index.html")
    want = h(f"{ha1}:{p['nonce']}:00000001:{p['cnonce']}:auth:{ha2}")
    assert p["response"] == want and p["opaque"].startswith("FQhe")
    # RFC 2069 (no qop): no nc or cnonce.
    assert auth.accept('Digest realm="r", nonce="abc"') is None
    _, p = parse_challenge(auth.header("GET", "/"))
    assert "nc" not in p and "qop" not in p


# -- TLS -----------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_keep_alive(serve: Serve, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    s = await serve(answer, tls=server_ctx)
    c = client(s, tls=ssl.create_default_context(cafile=str(cert)))
    try:
        assert c.base_url.startswith("https://")
        for _ in range(3):
            assert (await c.request("GET", "/s", operation="read"))[0] == 200
        assert s.connections == 1
    finally:
        await c.close()
    untrusted = client(s, tls=ssl.create_default_context())
    with pytest.raises(DeviceUnreachable):
        await untrusted.request("GET", "/s", operation="read")
