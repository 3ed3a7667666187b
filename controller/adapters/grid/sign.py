"""The operator's side of grid orders: key pairs, building and signing messages, sending them.

This is what `rigctl grid keygen|send` runs, for operators testing their integration and
for the demo. Nothing here is needed to *receive* orders; it exists so an operator can
produce, with one command, exactly what docs/grid-protocol.md describes, and see rigd's
answer. Signing is PyJWT's (compact JWS; any standard JOSE library produces the same).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.adapters.grid.verify import peek_jws_payload
from controller.config import MqttConfig
from controller.core.grid.orders import GridMessage


@dataclass(frozen=True, slots=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    alg: str


def generate(alg: str = "EdDSA") -> KeyPair:
    priv: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if alg == "EdDSA":
        priv = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        priv = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unsupported algorithm {alg!r}: EdDSA or ES256")
    private_pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(private_pem, public_pem, alg)


def write_keypair(kp: KeyPair, prefix: Path) -> tuple[Path, Path]:
    """PREFIX.key (mode 0600, the operator keeps it) and PREFIX.pub (goes to rigd's config)."""
    key_path = prefix.with_name(prefix.name + ".key")
    pub_path = prefix.with_name(prefix.name + ".pub")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(kp.private_pem)
    pub_path.write_bytes(kp.public_pem)
    return key_path, pub_path


def load_private_key(path: Path) -> tuple[Any, str]:
    """The key and its JWS algorithm, told from the key type."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError(f"{path}: not an Ed25519 or P-256 private key")


def build(
    kind: str,
    site: str,
    *,
    ttl_s: float = 300.0,
    now: float | None = None,
    iss: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A message dict with fresh claims; validated against the contract before it leaves."""
    t = time.time() if now is None else now
    msg: dict[str, Any] = {
        "jti": f"msg-{uuid.uuid4().hex}",
        "iat": int(t),
        "exp": int(t + ttl_s),
        "site": site,
        "kind": kind,
    }
    if iss:
        msg["iss"] = iss
    msg.update({k: v for k, v in fields.items() if v is not None})
    GridMessage.model_validate({"message": msg})  # raises on what rigd would refuse as invalid
    return msg


def sign(msg: dict[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(msg, key, algorithm=alg, headers=headers)


async def send(
    mqtt: MqttConfig,
    site: str,
    payload: bytes,
    *,
    wait_s: float = 10.0,
) -> dict[str, Any] | None:
    """Publish one order (QoS 1) and wait for rigd's acknowledgement; None on timeout.

    With MQTT 5 the ack comes on a response topic of our own, matched by correlation
    data; with 3.1.1 on rigd/<site>/grid/acks, matched by the message's jti."""
    v5 = mqtt.protocol == "5"
    orders = f"rigd/{site}/grid/orders"
    corr = secrets.token_bytes(12)
    reply = f"rigd/{site}/grid/acks/rigctl-{corr.hex()}" if v5 else f"rigd/{site}/grid/acks"
    jti = _jti_of(payload)
    async with aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        username=mqtt.username,
        password=mqtt.password.get_secret_value() if mqtt.password else None,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        tls_context=_tls(mqtt),
        timeout=10.0,
    ) as client:
        if wait_s > 0:
            await client.subscribe(reply, qos=1)
        props = None
        if v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply
            props.CorrelationData = corr
        await client.publish(orders, payload, qos=1, properties=props)
        if wait_s <= 0:
            return None
        try:
            async with asyncio.timeout(wait_s):
                async for m in client.messages:
                    try:
                        ack = json.loads(m.payload if isinstance(m.payload, bytes) else b"")
                    except ValueError:
                        continue
                    mine = (
                        getattr(m.properties, "CorrelationData", None) == corr
                        if v5
                        else (jti is not None and ack.get("jti") == jti)
                    )
                    if mine and isinstance(ack, dict):
                        return ack
        except TimeoutError:
            return None
    return None


def _tls(mqtt: MqttConfig) -> Any:
    if not mqtt.tls:
        return None
    import ssl

    ctx = ssl.create_default_context(cafile=str(mqtt.ca_file) if mqtt.ca_file else None)
    if mqtt.tls_insecure:
        ctx.check_hostname = False
    return ctx


def _jti_of(payload: bytes) -> str | None:
    text = payload.strip()
    if text.startswith(b"{"):
        try:
            jti = json.loads(text).get("jti")
        except (ValueError, AttributeError):
            return None
        return jti if isinstance(jti, str) else None
    return peek_jws_payload(text.decode("ascii", "replace")).get("jti")
