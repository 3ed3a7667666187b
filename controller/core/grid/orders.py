"""The grid-order contract: what the operator may send and what rigd answers.

These models *are* the protocol: docs/grid-protocol.schema.json is generated from them
(`rigd grid-schema`) and a test fails if the two drift apart. Validation is strict
(no "5" for 5, no unknown keys) because an order that is half understood is worse than
one refused: a misspelt `max_import_kW` silently ignored would leave the farm uncurtailed.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Ids travel in topics, logs and the state database: printable, bounded.
OrderId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
NumericDate = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]
Kw = Annotated[float, Field(ge=0, le=1e7, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, le=366 * 86_400, allow_inf_nan=False)]

REJECT_REASONS: dict[str, str] = {
    "too_large": "the message is larger than the configured limit",
    "malformed": "not a compact JWS, not JSON, not a JSON object, or a key repeated in an object",
    "unsigned_not_allowed": "a plain JSON order where only signed orders are accepted",
    "unsupported_algorithm": "the JWS algorithm is not EdDSA or ES256",
    "unknown_key": "the JWS names a key (kid) that is not configured, or no key matches",
    "bad_signature": "the signature does not verify against the operator's key",
    "invalid": "a field is missing, has the wrong type, is out of range, or is unknown",
    "wrong_site": "the order is addressed to another site",
    "expired": "the message's exp has passed, or it was issued too long ago",
    "not_yet_valid": "the message's iat or nbf lies in the future",
    "replayed": "a message with this jti was already received",
    "stale_modification": "the modification number is not above the order's current one",
    "unknown_order": "modify or cancel for an order rigd does not know",
    "order_closed": "modify for an order that has already ended",
    "duplicate_order": "curtail with an order_id in use and no higher modification",
    "not_applicable": "the order cannot apply (e.g. its end is already past)",
}
RejectReason = Literal[
    "too_large",
    "malformed",
    "unsigned_not_allowed",
    "unsupported_algorithm",
    "unknown_key",
    "bad_signature",
    "invalid",
    "wrong_site",
    "expired",
    "not_yet_valid",
    "replayed",
    "stale_modification",
    "unknown_order",
    "order_closed",
    "duplicate_order",
    "not_applicable",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def parse_time(v: object) -> float:
    """A point in time as epoch seconds: a JSON number, or RFC 3339 text with its offset."""
    if isinstance(v, bool):
        raise ValueError("a time is a number of epoch seconds or RFC 3339 text, not a boolean")
    if isinstance(v, int | float):
        # Compared, not converted: a JSON integer may be too large for a float (and NaN fails).
        if not 0 <= v <= 1e11:
            raise ValueError("epoch seconds out of range")
        return float(v)
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as e:
            raise ValueError(f"not an RFC 3339 time: {v!r}") from e
        if t.tzinfo is None:
            raise ValueError(f"an RFC 3339 time needs its offset (Z or +hh:mm): {v!r}")
        return t.timestamp()
    raise ValueError("a time is a number of epoch seconds or RFC 3339 text")


Time = Annotated[
    float | str,
    Field(
        description="epoch seconds (JSON number) or RFC 3339 text with an offset",
        json_schema_extra={
            "anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]
        },
    ),
]


class Target(_Wire):
    """Exactly one way of saying how far down: an absolute cap, a shed, or a level."""

    max_import_kw: Kw | None = Field(None, description="cap on import at the grid connection")
    shed_kw: Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)] | None = Field(
        None, description="import just before the start, minus this"
    )
    level: Annotated[int, Field(ge=0, le=3)] | None = Field(
        None, description="0-3, mapped to caps in the site's config"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [k for k in ("max_import_kw", "shed_kw", "level") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("target needs exactly one of max_import_kw, shed_kw, level")
        return self

    def describe(self) -> str:
        if self.max_import_kw is not None:
            return f"max import {self.max_import_kw:g} kW"
        if self.shed_kw is not None:
            return f"shed {self.shed_kw:g} kW"
        return f"level {self.level}"


class _Claims(_Wire):
    jti: OrderId = Field(description="unique message id (replay protection)")
    iat: NumericDate = Field(description="issued at, epoch seconds")
    exp: NumericDate = Field(description="the message is void after this, epoch seconds")
    nbf: NumericDate | None = Field(None, description="not valid before, epoch seconds")
    iss: str | None = Field(None, max_length=200, description="the issuer, for the audit log")
    site: str = Field(max_length=64, description="the site id this order is for")

    @model_validator(mode="after")
    def _exp_after_iat(self) -> _Claims:
        if self.exp <= self.iat:
            raise ValueError("exp must be after iat")
        return self


def _check_time(v: object) -> object:
    if v is None or v == "now":
        return v
    parse_time(v)
    return v


class Curtail(_Claims):
    kind: Literal["curtail"]
    order_id: OrderId
    modification: Annotated[int, Field(ge=0, le=2**31)] = 0
    target: Target
    start: Literal["now"] | Time = "now"
    end: Time | None = Field(None, description="absent with duration_s: open-ended")
    duration_s: Seconds | None = None
    respond_within_s: Seconds | None = Field(None, description="default: the site's config")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _times(cls, v: object) -> object:
        return _check_time(v)

    @model_validator(mode="after")
    def _one_end(self) -> Curtail:
        if self.end is not None and self.duration_s is not None:
            raise ValueError("give end or duration_s, not both")
        if (
            self.end is not None
            and self.start != "now"
            and parse_time(self.end) <= parse_time(self.start)
        ):
            raise ValueError("end must be after start")
        return self


class Modify(_Claims):
    kind: Literal["modify"]
    order_id: OrderId
    modification: Annotated[int, Field(ge=1, le=2**31)]
    target: Target | None = None
    start: Literal["now"] | Time | None = Field(None, description="only while still pending")
    end: Time | None = None
    duration_s: Seconds | None = Field(None, description="counted from the order's start")
    respond_within_s: Seconds | None = None

    @field_validator("start", "end", mode="before")
    @classmethod
    def _times(cls, v: object) -> object:
        return _check_time(v)

    @model_validator(mode="after")
    def _something(self) -> Modify:
        if self.end is not None and self.duration_s is not None:
            raise ValueError("give end or duration_s, not both")
        if all(
            getattr(self, k) is None
            for k in ("target", "start", "end", "duration_s", "respond_within_s")
        ):
            raise ValueError(
                "a modify must change at least one of target, start, end, "
                "duration_s, respond_within_s"
            )
        return self


class Cancel(_Claims):
    kind: Literal["cancel"]
    order_id: OrderId
    modification: Annotated[int, Field(ge=1, le=2**31)] | None = None


class Ping(_Claims):
    kind: Literal["ping"]


Message = Annotated[Curtail | Modify | Cancel | Ping, Field(discriminator="kind")]


class Heartbeat(BaseModel):
    """The operator's heartbeat, on `[grid.heartbeat] topic` (signed like an order where the
    site accepts only signed orders). Its `kind` is what makes it one: an order or a ping
    replayed on the heartbeat topic is signed too, and must not hold off the failsafe."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    kind: Literal["heartbeat"]
    iat: NumericDate = Field(description="issued at, epoch seconds; newer than the last one")
    site: str | None = Field(None, max_length=64, description="if given, this site's id")


class GridMessage(_Wire):
    """Wrapper so one model validates (and documents) every kind."""

    message: Message


# -- what rigd sends back ----------------------------------------------------------------


class Ack(BaseModel):
    """Answer to every message, on the MQTT 5 response topic or rigd/<site>/grid/acks."""

    site: str
    jti: str | None = Field(description="the message's jti, when it could be read")
    kind: str | None
    order_id: str | None = None
    modification: int | None = None
    status: Literal["accepted", "rejected"]
    reason: RejectReason | None = Field(None, description="machine-readable, when rejected")
    detail: str = Field("", description="human-readable explanation")
    received_at: float
    duplicate: bool = Field(False, description="a redelivery of a message already answered")
    order_status: str | None = Field(None, description="the order's state after this message")
    cap_kw: float | None = Field(None, description="the order's cap, when it is known")
    active_orders: list[str] | None = Field(None, description="ping only")
    failsafe: bool | None = Field(None, description="ping only: the heartbeat failsafe is on")


class Report(BaseModel):
    """Compliance of one order, every few seconds while active and once at its end."""

    site: str
    order_id: str
    modification: int
    type: Literal["progress", "final"]
    status: Literal["pending", "active", "completed", "cancelled", "superseded"]
    ts: float
    start: float
    end: float | None
    deadline: float = Field(description="start + respond_within_s")
    target_kw: float | None
    measured_kw: float | None = Field(
        description="import at the grid meter at the last observation; null if none stands"
    )
    basis: str | None = Field(description="meter, estimate or safe: how measured_kw was known")
    baseline_kw: float | None = Field(description="import just before the start")
    compliant: bool | None = Field(
        description="at the last observation; null when not known (an end nobody saw)"
    )
    time_to_comply_s: float | None = Field(
        description="from the start (or a modify's new target) to first under target"
    )
    seconds_out_of_compliance: float = Field(description="time over target after the deadline")
    seconds_over_target: float = Field(description="time over target since the start")
    max_overshoot_kw: float
    energy_shed_kwh: float = Field(description="baseline minus import, integrated")
    rigs: dict[str, int] = Field(
        description="sleeping, off, throttled, unreachable, mining at the last observation; "
        "empty when there was none"
    )
    data_gap_s: float = Field(
        0.0,
        description="time nobody watched: from the last observation before an outage to the "
        "first after it, a silence over 60 s, time without an import figure",
    )
    missed_reports: int = Field(0, description="progress reports summarised while disconnected")


def json_schema() -> dict[str, Any]:
    """One schema document with the message, ack and report definitions."""
    msg = GridMessage.model_json_schema(ref_template="#/$defs/{model}")
    defs = dict(msg.pop("$defs", {}))
    for model in (Ack, Report, Heartbeat):
        s = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(s.pop("$defs", {}))
        defs[model.__name__] = s
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://rigd.example/schemas/grid-protocol.json",
        "title": "rigd grid orders",
        "description": "Payload of an order (plain JSON or the payload of a compact JWS), and "
        "the acknowledgement and report documents rigd publishes. See docs/grid-protocol.md.",
        "oneOf": [{"$ref": f"#/$defs/{n}"} for n in ("Curtail", "Modify", "Cancel", "Ping")],
        "$defs": defs,
    }
