"""Is this grid message genuine, fresh and well formed? Everything before the order book.

A message is refused with one machine-readable reason (see `orders.REJECT_REASONS`) and
never half-applied. Signatures are checked by PyJWT (compact JWS, EdDSA or ES256) against
the operator's configured public keys only: the algorithm is taken from *our* key, never
trusted from the header, so `alg: none` or an HMAC forged with a public key cannot pass.
Claim checks (exp, iat, nbf, site) are ours, so plain JSON orders (demo, tests) are
held to exactly the same rules as signed ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.utils import base64url_decode
from pydantic import ValidationError

from controller.config import ConfigError, ConfigIssue, GridConfig
from controller.core.grid.orders import (
    REJECT_REASONS,
    Cancel,
    Curtail,
    GridMessage,
    Heartbeat,
    Modify,
    Ping,
    RejectReason,
)
from controller.errors import RigdError

ALGORITHMS = ("EdDSA", "ES256")

AnyMessage = Curtail | Modify | Cancel | Ping


class Rejected(RigdError):
    """A message refused, with what could be read of it for the acknowledgement."""

    def __init__(
        self,
        reason: RejectReason,
        detail: str = "",
        *,
        hint: dict[str, Any] | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail or REJECT_REASONS[reason]
        self.hint = hint or {}  # jti, kind, order_id as read (unverified) from the payload
        super().__init__(f"{reason}: {self.detail}")


@dataclass(frozen=True, slots=True)
class Verified:
    message: AnyMessage
    signed: bool
    kid: str | None
    digest: str  # sha256 of the raw message: tells a redelivery from a replay


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    alg: str
    key: Any  # a cryptography public key object


def _load_one(text: str, alg: str, where: str) -> Any:
    text = text.strip()
    try:
        if text.startswith("{"):
            key = jwt.PyJWK(json.loads(text)).key
        else:
            key = load_pem_public_key(text.encode())
    except (ValueError, TypeError, jwt.PyJWKError) as e:
        raise ValueError(f"{where}: not a PEM public key or JWK: {e}") from e
    if alg == "EdDSA" and not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{where}: EdDSA needs an Ed25519 public key, got {type(key).__name__}")
    if alg == "ES256" and not (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        raise ValueError(f"{where}: ES256 needs a P-256 public key, got {type(key).__name__}")
    return key


def load_keys(grid: GridConfig) -> dict[str, PublicKey]:
    """The operator's keys by kid; a ConfigError naming each unreadable or mismatched one."""
    keys: dict[str, PublicKey] = {}
    issues: list[ConfigIssue] = []
    for i, k in enumerate(grid.keys):
        where = f"grid.keys[{i}]"
        try:
            if k.public_key_file is not None:
                try:
                    text = Path(k.public_key_file).read_text()
                except OSError as e:
                    raise ValueError(f"cannot read {k.public_key_file}: {e.strerror}") from e
            else:
                text = k.public_key or ""
            keys[k.kid] = PublicKey(k.kid, k.alg, _load_one(text, k.alg, where))
        except ValueError as e:
            issues.append(ConfigIssue(where, str(e).removeprefix(f"{where}: ")))
    if issues:
        raise ConfigError(issues)
    return keys


def _hint(data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    out = {}
    for k in ("jti", "kind", "order_id"):
        v = data.get(k)
        if isinstance(v, str) and len(v) <= 128:
            out[k] = v
    if isinstance(data.get("modification"), int) and not isinstance(data["modification"], bool):
        out["modification"] = data["modification"]
    return out


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class _RepeatedKey(ValueError):
    """A JSON object names one key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members, refusing a repeated key: JSON parsers disagree on which of two
    `kind`s wins (Python's keeps the last), so a signed `{"kind": "ping", ..., "kind":
    "curtail"}` could mean a ping to the operator's tools and a curtail to rigd."""
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise _RepeatedKey(f"the key {k!r} appears more than once in one JSON object")
        obj[k] = v
    return obj


def strict_json(raw: bytes | str) -> Any:
    """JSON as the protocol allows it: no NaN or Infinity, no object with a repeated key.
    Raises ValueError (a `_RepeatedKey` for the latter) or RecursionError."""
    return json.loads(raw, parse_constant=_no_constants, object_pairs_hook=_unique_keys)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = strict_json(raw)
    except _RepeatedKey as e:
        raise Rejected("malformed", str(e)) from e
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise Rejected("malformed", f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise Rejected("malformed", "the order must be a JSON object")
    try:  # "\ud800" is valid JSON but no text: it could not be logged, stored or echoed
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise Rejected(
            "malformed", "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
        ) from e
    return data


def not_heartbeat(data: dict[str, Any], *, kind_required: bool = True) -> None:
    """Refuse a message of another kind on the heartbeat topic (`kind_required` False: only
    one that names another kind)."""
    kind = data.get("kind")
    if kind != "heartbeat" and (kind_required or kind is not None):
        shown = repr(kind)[:40] if kind is not None else "no kind"
        raise Rejected(
            "invalid",
            f'not a heartbeat ({shown}): a heartbeat says "kind": "heartbeat"',
            hint=_hint(data),
        )


def peek_jws_payload(token: str) -> dict[str, Any]:
    """The unverified payload, only to name the message in a rejection."""
    try:
        data = json.loads(base64url_decode(token.split(".")[1]))
    except (IndexError, ValueError, TypeError, RecursionError):  # binascii, JSON, nesting
        return {}
    return _hint(data)


class Verifier:
    def __init__(self, grid: GridConfig, site: str, keys: dict[str, PublicKey]) -> None:
        self.grid = grid
        self.site = site
        self.keys = keys
        self._jws = jwt.PyJWS()

    def verify(self, raw: bytes, now: float) -> Verified:
        g = self.grid
        if len(raw) > g.max_message_bytes:
            raise Rejected("too_large", f"{len(raw)} bytes, the limit is {g.max_message_bytes}")
        digest = hashlib.sha256(raw).hexdigest()
        text = raw.strip()
        if text.startswith(b"{"):
            data = _json_object(text)
            if not g.allow_unsigned:
                raise Rejected(
                    "unsigned_not_allowed",
                    "this site accepts only orders signed by the operator (compact JWS)",
                    hint=_hint(data),
                )
            signed, kid = False, None
        else:
            data, kid = self._verify_jws(text)
            signed = True
        msg = self._validate(data)
        self._check_claims(msg, now)
        return Verified(msg, signed, kid, digest)

    def heartbeat(self, raw: bytes, now: float) -> float:
        """A signed heartbeat (a JWS whose payload says `"kind": "heartbeat"`, has `iat`,
        and `site` if any matches): its iat. Where the site accepts only signed orders a
        forged heartbeat must not hold off the failsafe, and neither may a genuine order or
        ping replayed on the heartbeat topic: the operator signed those too."""
        if len(raw) > self.grid.max_message_bytes:
            raise Rejected("too_large", f"{len(raw)} bytes")
        data, _ = self._verify_jws(raw.strip())
        not_heartbeat(data)
        try:
            iat = Heartbeat.model_validate(data).iat
        except ValidationError as e:
            raise Rejected(
                "invalid", "a heartbeat needs a numeric iat (epoch seconds) and a string site"
            ) from e
        skew = self.grid.clock_skew_s
        hb = self.grid.heartbeat
        if iat > now + skew:
            raise Rejected("not_yet_valid", f"iat is {iat - now:.0f} s in the future")
        if hb is not None and now - iat > hb.timeout_s + skew:
            raise Rejected("expired", f"issued {now - iat:.0f} s ago")
        site = data.get("site")
        if site is not None and site != self.site:
            raise Rejected("wrong_site", f"addressed to site {site!r}")
        return float(iat)

    def unsigned_heartbeat(self, raw: bytes) -> None:
        """Where unsigned orders are allowed any payload is a heartbeat, except one that
        reads as another kind of message (an order, plain or signed, is no heartbeat)."""
        if len(raw) > self.grid.max_message_bytes:
            raise Rejected("too_large", f"{len(raw)} bytes")
        text = raw.strip()
        try:
            if text.startswith(b"{"):
                data = strict_json(text)
            else:
                data = strict_json(base64url_decode(text.split(b".")[1]))
        except (ValueError, RecursionError, IndexError):
            return  # "alive", a counter, ...: anything goes here
        if isinstance(data, dict):
            not_heartbeat(data, kind_required=False)

    def _verify_jws(self, text: bytes) -> tuple[dict[str, Any], str | None]:
        try:
            token = text.decode("ascii")
            header = jwt.get_unverified_header(token)
        except (UnicodeDecodeError, jwt.InvalidTokenError) as e:  # e.g. a kid that is no string
            raise Rejected("malformed", f"not a compact JWS: {e}") from e
        hint = peek_jws_payload(token)
        try:  # the header too: two `alg`s or `kid`s are as ambiguous as two `kind`s
            strict_json(base64url_decode(token.split(".", 1)[0]))
        except _RepeatedKey as e:
            raise Rejected("malformed", f"JWS header: {e}", hint=hint) from e
        except (ValueError, RecursionError):
            pass  # PyJWT has read it: what it could not parse is refused below
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Rejected(
                "unsupported_algorithm", f"alg {alg!r}; accepted: EdDSA, ES256", hint=hint
            )
        kid = header.get("kid")
        if kid is not None:
            known = self.keys.get(kid) if isinstance(kid, str) else None
            if known is None:
                raise Rejected("unknown_key", f"no operator key with kid {kid!r}", hint=hint)
            if known.alg != alg:
                raise Rejected(
                    "unknown_key",
                    f"key {kid!r} is an {known.alg} key, the JWS says {alg}",
                    hint=hint,
                )
            candidates = [known]
        else:
            candidates = [k for k in self.keys.values() if k.alg == alg]
            if not candidates:
                raise Rejected("unknown_key", f"no {alg} operator key configured", hint=hint)
        for k in candidates:
            try:
                payload = self._jws.decode(token, key=k.key, algorithms=[k.alg])
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError as e:
                raise Rejected("malformed", f"not a valid compact JWS: {e}", hint=hint) from e
            return _json_object(payload), k.kid
        raise Rejected(
            "bad_signature",
            "the signature does not verify against "
            + (f"key {kid!r}" if kid else f"any {alg} operator key"),
            hint=hint,
        )

    def _validate(self, data: dict[str, Any]) -> AnyMessage:
        try:
            return GridMessage.model_validate({"message": data}).message
        except ValidationError as e:
            problems = []
            for err in e.errors()[:5]:
                loc = ".".join(
                    str(p)
                    for p in err["loc"][1:]
                    if p not in ("curtail", "modify", "cancel", "ping")
                )
                problems.append(f"{loc or 'order'}: {err['msg']}")
            raise Rejected("invalid", "; ".join(problems), hint=_hint(data)) from e

    def _check_claims(self, msg: AnyMessage, now: float) -> None:
        g = self.grid
        hint = _hint(msg.model_dump())
        skew = g.clock_skew_s
        if msg.site != self.site:
            raise Rejected(
                "wrong_site", f"addressed to site {msg.site!r}, this is {self.site!r}", hint=hint
            )
        if now > msg.exp + skew:
            raise Rejected("expired", f"exp passed {now - msg.exp:.0f} s ago", hint=hint)
        if msg.iat > now + skew:
            raise Rejected(
                "not_yet_valid", f"iat is {msg.iat - now:.0f} s in the future", hint=hint
            )
        if msg.nbf is not None and msg.nbf > now + skew:
            raise Rejected(
                "not_yet_valid", f"nbf is {msg.nbf - now:.0f} s in the future", hint=hint
            )
        if now - msg.iat > g.max_age_s + skew:
            raise Rejected(
                "expired",
                f"issued {now - msg.iat:.0f} s ago; messages older than {g.max_age_s:g} s "
                "are refused",
                hint=hint,
            )
