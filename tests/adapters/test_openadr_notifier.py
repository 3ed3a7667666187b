"""The MQTT notifier binding against brokers that check who connects: a bearer token as
the password (the broker's password file holds the token), and mutual TLS with the client
certificate a VTN hands out in `GET /notifiers`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.adapters.openadr.notifier import Notifier, parse_binding
from tests.adapters.test_mqtt_tls import _write_pki
from tests.conftest import Mosquitto

TOPIC = "openadr3/events/vens/ven-1/+"


async def _hear(
    notifier: Notifier, publish: contextlib.AbstractAsyncContextManager[aiomqtt.Client]
) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    connected = asyncio.Event()

    async def on_message(topic: str, payload: bytes) -> None:
        got.append((topic, payload))

    async def on_connect() -> None:
        connected.set()

    notifier.on_message, notifier.on_connect = on_message, on_connect
    task = asyncio.create_task(notifier.run())
    try:
        await asyncio.wait_for(connected.wait(), 10)
        async with publish as pub:
            await pub.publish(
                "openadr3/events/vens/ven-1/create",
                json.dumps({"objectType": "EVENT"}).encode(),
                qos=1,
            )
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return got


async def _nothing(topic: str, payload: bytes) -> None:
    return None


async def _nothing_else() -> None:
    return None


@pytest.fixture
def token_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker whose password file holds the VEN's access token as its password."""
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "ven-1", "tok-abc"], check=True)
    subprocess.run([passwd, "-b", str(tmp_path / "passwd"), "vtn", "vtn-pw"], check=True)
    m = Mosquitto(tmp_path, listener=f"password_file {tmp_path / 'passwd'}")
    m.start()
    yield m
    m.stop()


async def test_bearer_token_is_the_password(token_broker: Mosquitto, tmp_path: Path) -> None:
    m = token_broker
    b = parse_binding(
        {
            "MQTT": {
                "URIS": [m.url],
                "serialization": "JSON",
                "authentication": {"method": "OAUTH2_BEARER_TOKEN", "username": "{clientID}"},
            }
        }
    )
    assert b is not None
    tokens = ["tok-abc"]

    async def token() -> str:
        return tokens[0]

    n = Notifier(
        b,
        [TOPIC],
        identifier="rigd-t1",
        client_id="ven-1",
        token=token,
        on_message=_nothing,
        on_connect=_nothing_else,
        cert_dir=tmp_path,
    )
    got = await _hear(n, aiomqtt.Client(m.host, m.port, username="vtn", password="vtn-pw"))
    assert [t for t, _ in got] == ["openadr3/events/vens/ven-1/create"]
    # a wrong token is refused by the broker: the notifier says so and keeps trying
    tokens[0] = "stale"
    n2 = Notifier(
        b,
        [TOPIC],
        identifier="rigd-t2",
        client_id="ven-1",
        token=token,
        on_message=_nothing,
        on_connect=_nothing_else,
        cert_dir=tmp_path,
    )
    task = asyncio.create_task(n2.run())
    await asyncio.sleep(1.0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert n2.connects == 0 and n2.last_error is not None


def _client_cert(d: Path) -> tuple[str, str, str]:
    """A client certificate signed by the CA `_write_pki` made (its key is re-made here)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtn CA")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtn CA")]))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ven-1")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (d / "client-ca.pem").write_bytes(ca.public_bytes(pem))
    return (
        (d / "ca.pem").read_text(),  # the broker's CA, which the VEN must trust
        cert.public_bytes(pem).decode(),
        key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )


async def test_client_certificate_from_the_binding(tmp_path: Path) -> None:
    _write_pki(tmp_path)
    ca_cert, client_cert, client_key = _client_cert(tmp_path)
    # the broker trusts client certificates of the VTN's CA (and its own, for the publisher)
    (tmp_path / "both-ca.pem").write_text(
        (tmp_path / "client-ca.pem").read_text() + (tmp_path / "ca.pem").read_text()
    )
    m = Mosquitto(
        tmp_path,
        scheme="mqtts",
        listener=(
            f"cafile {tmp_path / 'both-ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
            f"keyfile {tmp_path / 'server.key'}\nrequire_certificate true\n"
            "use_identity_as_username true"
        ),
    )
    m.start()
    try:
        b = parse_binding(
            {
                "MQTT": {
                    "URIS": [m.url],
                    "serialization": "JSON",
                    "authentication": {
                        "method": "CERTIFICATE",
                        "caCert": ca_cert,
                        "clientCert": client_cert,
                        "clientKey": client_key,
                    },
                }
            }
        )
        assert b is not None

        async def token() -> str:
            raise AssertionError("no token for a certificate")

        n = Notifier(
            b,
            [TOPIC],
            identifier="rigd-c1",
            client_id="ven-1",
            token=token,
            on_message=_nothing,
            on_connect=_nothing_else,
            cert_dir=tmp_path / "state" / "openadr",
        )
        got: list[tuple[str, bytes]] = []
        connected = asyncio.Event()

        async def on_message(topic: str, payload: bytes) -> None:
            got.append((topic, payload))

        async def on_connect() -> None:
            connected.set()

        n.on_message, n.on_connect = on_message, on_connect
        task = asyncio.create_task(n.run())
        try:
            await asyncio.wait_for(connected.wait(), 10)
            certs = tmp_path / "state" / "openadr"
            assert (certs / "client.key").stat().st_mode & 0o777 == 0o600
            # the publisher (playing the VTN) uses the same client certificate
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            ctx.load_cert_chain(certs / "client.crt", certs / "client.key")
            async with aiomqtt.Client(m.host, m.port, tls_context=ctx) as pub:
                await pub.publish("openadr3/events/vens/ven-1/update", b"{}", qos=1)
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert [t for t, _ in got] == ["openadr3/events/vens/ven-1/update"]
    finally:
        m.stop()
