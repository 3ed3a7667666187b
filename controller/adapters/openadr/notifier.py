"""The VTN's MQTT notifier binding (OpenADR 3.1): connect to the broker the VTN names in
`GET /notifiers`, with the authentication it asks for, and hear the VEN's event topics.

- `ANONYMOUS`: no credentials.
- `OAUTH2_BEARER_TOKEN`: the REST access token as the password, and as the username the
  binding's `username`, or the OAuth2 client id where it says `{clientID}`. A fresh token
  is taken at every connect.
- `CERTIFICATE`: mutual TLS with the CA, certificate and key the VTN hands out; they are
  written (0600) under the state directory for the TLS library to read.

A notification is only a hint: the service confirms every event it names over REST
before acting (runtime/openadr_service.py). After every (re)connect the service reads the
events in force over REST, as the binding's section 16.2 advises, so nothing published
while the link was down is missed.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import structlog

from controller.adapters.openadr.client import VtnError

log = structlog.get_logger(__name__)

AUTH_METHODS = ("ANONYMOUS", "OAUTH2_BEARER_TOKEN", "CERTIFICATE")


@dataclass(frozen=True, slots=True)
class MqttBinding:
    """The `MQTT` entry of `GET /notifiers`, checked."""

    uris: tuple[str, ...]
    method: str
    username: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


def parse_binding(notifiers: dict[str, Any]) -> MqttBinding | None:
    """The VTN's MQTT binding, None when it offers none; VtnError when it is malformed."""
    m = notifiers.get("MQTT")
    if m is None:
        return None
    if not isinstance(m, dict):
        raise VtnError("bad_answer", "the MQTT notifier binding is not an object")
    uris = m.get("URIS")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
        raise VtnError("bad_answer", "the MQTT notifier binding has no URIS")
    for u in uris:
        p = urlsplit(u)
        if p.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not p.hostname:
            raise VtnError("bad_answer", f"MQTT broker URI {u!r} is not mqtt:// or mqtts://")
    if m.get("serialization", "JSON") != "JSON":
        raise VtnError("bad_answer", f"MQTT serialization {m.get('serialization')!r} is not JSON")
    auth = m.get("authentication") or {"method": "ANONYMOUS"}
    method = auth.get("method") if isinstance(auth, dict) else None
    if method not in AUTH_METHODS:
        raise VtnError("bad_answer", f"MQTT authentication method {method!r} is not supported")
    assert isinstance(auth, dict)
    if method == "OAUTH2_BEARER_TOKEN" and not isinstance(auth.get("username"), str):
        raise VtnError("bad_answer", "OAUTH2_BEARER_TOKEN without a username")
    if method == "CERTIFICATE" and not all(
        isinstance(auth.get(k), str) for k in ("caCert", "clientCert", "clientKey")
    ):
        raise VtnError("bad_answer", "CERTIFICATE without caCert, clientCert and clientKey")
    return MqttBinding(
        tuple(uris),
        str(method),
        auth.get("username"),
        auth.get("caCert"),
        auth.get("clientCert"),
        auth.get("clientKey"),
    )


@dataclass(frozen=True, slots=True)
class ConnectArgs:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: ssl.SSLContext | None


async def connect_args(
    binding: MqttBinding,
    uri: str,
    *,
    client_id: str,
    token: Callable[[], Awaitable[str]],
    ca_file: Path | None,
    cert_dir: Path,
) -> ConnectArgs:
    """How to connect to one of the binding's brokers."""
    p = urlsplit(uri)
    tls_wanted = p.scheme in ("mqtts", "ssl") or binding.method == "CERTIFICATE"
    port = p.port or (8883 if tls_wanted else 1883)
    ctx: ssl.SSLContext | None = None
    if tls_wanted:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    username = password = None
    if binding.method == "OAUTH2_BEARER_TOKEN":
        username = client_id if binding.username == "{clientID}" else binding.username
        password = await token()
    elif binding.method == "CERTIFICATE":
        assert binding.ca_cert
        crt, key = await asyncio.to_thread(_write_client_cert, binding, cert_dir)
        ctx = ssl.create_default_context(cadata=binding.ca_cert)
        ctx.load_cert_chain(crt, key)
    return ConnectArgs(p.hostname or "", port, username, password, ctx)


def _write_client_cert(binding: MqttBinding, cert_dir: Path) -> tuple[Path, Path]:
    """The VTN's client certificate and key as files (0600) for the TLS library."""
    assert binding.client_cert and binding.client_key
    cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = []
    for name, text in (("client.crt", binding.client_cert), ("client.key", binding.client_key)):
        f = cert_dir / name
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as w:
            w.write(text)
        out.append(f)
    return out[0], out[1]


class Notifier:
    """Keeps a subscription to the VEN's topics on the VTN's broker, reconnecting with
    backoff; calls `on_connect` after each (re)subscribe and `on_message` per message."""

    def __init__(
        self,
        binding: MqttBinding,
        topics: list[str],
        *,
        identifier: str,
        client_id: str,
        token: Callable[[], Awaitable[str]],
        on_message: Callable[[str, bytes], Awaitable[None]],
        on_connect: Callable[[], Awaitable[None]],
        keepalive_s: int = 30,
        ca_file: Path | None = None,
        cert_dir: Path = Path("."),
    ) -> None:
        self.binding = binding
        self.topics = topics
        self.identifier = identifier
        self.client_id = client_id
        self.token = token
        self.on_message = on_message
        self.on_connect = on_connect
        self.keepalive_s = keepalive_s
        self.ca_file = ca_file
        self.cert_dir = cert_dir
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        """Until cancelled."""
        backoff = 1.0
        n = 0
        while True:
            uri = self.binding.uris[n % len(self.binding.uris)]
            n += 1
            try:
                args = await connect_args(
                    self.binding,
                    uri,
                    client_id=self.client_id,
                    token=self.token,
                    ca_file=self.ca_file,
                    cert_dir=self.cert_dir,
                )
                async with aiomqtt.Client(
                    args.host,
                    args.port,
                    identifier=self.identifier,
                    username=args.username,
                    password=args.password,
                    tls_context=args.tls,
                    keepalive=self.keepalive_s,
                    timeout=10,
                ) as client:
                    for t in self.topics:
                        await client.subscribe(t, qos=1)
                    self.connected = True
                    self.connects += 1
                    self.last_error = None
                    backoff = 1.0
                    log.info("openadr_mqtt_connected", broker=uri, topics=self.topics)
                    await self.on_connect()
                    async for msg in client.messages:
                        payload = msg.payload if isinstance(msg.payload, bytes) else b""
                        await self.on_message(str(msg.topic), payload)
            except (aiomqtt.MqttError, OSError, ssl.SSLError, VtnError) as e:
                was = self.connected
                self.connected = False
                self.last_error = f"{type(e).__name__}: {e}"
                (log.warning if was else log.info)(
                    "openadr_mqtt_disconnected",
                    broker=uri,
                    error=self.last_error,
                    retry_in_s=round(backoff, 1),
                )
            finally:
                self.connected = False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 30.0)
