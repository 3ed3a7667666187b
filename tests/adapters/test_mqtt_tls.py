"""`mqtts://` with a private CA and broker credentials, as a production site runs it."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.config import parse_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite
from tests.conftest import Mosquitto


def _write_pki(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, written as PEM files."""
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("rigd test CA"))
        .issuer_name(name("rigd test CA"))
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
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    _write_pki(tmp_path)
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "rigd", "s3cret"], check=True)
    m = Mosquitto(
        tmp_path,
        scheme="mqtts",
        listener=(
            f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
            f"keyfile {tmp_path / 'server.key'}\npassword_file {tmp_path / 'passwd'}"
        ),
    )
    m.start()
    yield m
    m.stop()


async def _read_retained(broker: Mosquitto, ca: Path, topic: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    async with aiomqtt.Client(
        broker.host, broker.port, username="rigd", password="s3cret", tls_context=ctx
    ) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for msg in c.messages:
                return msg.payload if isinstance(msg.payload, bytes) else b""
    raise AssertionError("no message")


async def test_daemon_publishes_over_tls_with_credentials(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    async with SimSite(rigs=2, pdus=1, clock=ScaledClock(20)) as site:
        text = site.config_toml(broker_url=tls_broker.url, state_dir=tmp_path, interval_s=10)
        text = text.replace(
            "[mqtt]\n", f'[mqtt]\nusername = "rigd"\nca_file = "{tmp_path / "ca.pem"}"\n'
        )
        # The password comes from the environment, as the README recommends.
        cfg = parse_config(text, environ={"RIGD_MQTT__PASSWORD": "s3cret"})
        assert cfg.mqtt.tls
        daemon = Daemon(cfg, clock=site.clock)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            assert await asyncio.wait_for(daemon.link.connected.wait(), 10)
            status = await _read_retained(tls_broker, tmp_path / "ca.pem", "rigd/sim/status")
            assert status == b"online"
            state = await _read_retained(tls_broker, tmp_path / "ca.pem", "rigd/sim/state")
            assert b'"rigs_total":2' in state
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def _polled_twice(daemon: Daemon, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while daemon.snapshot is None or daemon.snapshot.cycle < 2:
        assert time.monotonic() < deadline, "the daemon stopped polling"
        await asyncio.sleep(0.05)


async def test_wrong_password_keeps_retrying_without_crashing(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    async with SimSite(rigs=1, pdus=1, clock=ScaledClock(20)) as site:
        text = site.config_toml(broker_url=tls_broker.url, state_dir=tmp_path, interval_s=10)
        text = text.replace(
            "[mqtt]\n",
            f'[mqtt]\nusername = "rigd"\npassword = "wrong"\nca_file = "{tmp_path / "ca.pem"}"\n',
        )
        cfg = parse_config(text, environ={})
        daemon = Daemon(cfg, clock=site.clock)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            await _polled_twice(daemon)  # polling goes on (a busy host may be slow to it)
            assert not daemon.link.connected.is_set()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_unreadable_ca_file_is_retried_until_it_appears(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    """Bad TLS material must not silently kill publishing: the link keeps retrying, so
    once the CA file is in place (a config-management run, a mount) it connects."""
    late_ca = tmp_path / "late" / "ca.pem"
    async with SimSite(rigs=1, pdus=1, clock=ScaledClock(20)) as site:
        text = site.config_toml(broker_url=tls_broker.url, state_dir=tmp_path, interval_s=10)
        text = text.replace(
            "[mqtt]\n", f'[mqtt]\nusername = "rigd"\npassword = "s3cret"\nca_file = "{late_ca}"\n'
        )
        daemon = Daemon(parse_config(text, environ={}), clock=site.clock)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            await _polled_twice(daemon)  # polling goes on (a busy host may be slow to it)
            assert not daemon.link.connected.is_set()
            late_ca.parent.mkdir()
            shutil.copy(tmp_path / "ca.pem", late_ca)
            await asyncio.wait_for(daemon.link.connected.wait(), 10)
            status = await _read_retained(tls_broker, tmp_path / "ca.pem", "rigd/sim/status")
            assert status == b"online"
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
