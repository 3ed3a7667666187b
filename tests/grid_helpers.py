"""Building grid orders in tests: keys, claims, signing with PyJWT as any operator would."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from controller.adapters.grid.sign import KeyPair, generate


@dataclass
class Operator:
    kid: str
    pair: KeyPair

    @classmethod
    def new(cls, kid: str = "op-1", alg: str = "EdDSA") -> Operator:
        return cls(kid, generate(alg))

    @property
    def alg(self) -> str:
        return self.pair.alg

    def key_toml(self) -> str:
        pem = self.pair.public_pem.decode().strip()
        return (
            f'[[grid.keys]]\nkid = "{self.kid}"\nalg = "{self.alg}"\npublic_key = """\n{pem}\n"""\n'
        )

    def sign(self, msg: dict[str, Any], *, kid: str | None = "", alg: str | None = None) -> bytes:
        key = serialization.load_pem_private_key(self.pair.private_pem, password=None)
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else None
        return jwt.encode(msg, key, algorithm=alg or self.alg, headers=headers).encode()

    def sign_raw(self, payload: bytes, header: bytes | None = None) -> bytes:
        """A compact JWS over exactly these payload (and header) bytes, as a client that
        writes its JSON by hand would make it: PyJWT's encode would re-serialise a dict."""
        from jwt.utils import base64url_encode

        key = serialization.load_pem_private_key(self.pair.private_pem, password=None)
        if header is None:
            header = json.dumps({"alg": self.alg, "kid": self.kid}).encode()
        signing_input = base64url_encode(header) + b"." + base64url_encode(payload)
        algo = jwt.get_algorithm_by_name(self.alg)
        signature = algo.sign(signing_input, key)  # type: ignore[arg-type]
        return signing_input + b"." + base64url_encode(signature)


def order(
    kind: str = "curtail", *, site: str = "sim", now: float | None = None, **fields: Any
) -> dict[str, Any]:
    t = time.time() if now is None else now
    msg: dict[str, Any] = {
        "jti": f"t-{uuid.uuid4().hex[:12]}",
        "iat": t,
        "exp": t + 300,
        "site": site,
        "kind": kind,
    }
    if kind in ("curtail", "modify", "cancel"):
        msg["order_id"] = "ord-1"
    if kind == "curtail":
        msg["target"] = {"max_import_kw": 100.0}
    msg.update(fields)
    return {k: v for k, v in msg.items() if v is not None}


def plain(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


def grid_toml(*ops: Operator, allow_unsigned: bool = False, extra: str = "") -> str:
    out = f"\n[grid]\nallow_unsigned = {'true' if allow_unsigned else 'false'}\n{extra}\n"
    for op in ops:
        out += op.key_toml()
    return out
