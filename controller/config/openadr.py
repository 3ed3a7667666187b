"""The `[openadr]` section: rigd as an OpenADR 3.1 VEN of the grid operator's VTN.

Kept in its own module (docs/openadr.md): the VTN's address and OAuth2 client
credentials, the VEN and resource names rigd registers, how SIMPLE levels and grid
alerts map to caps, and the reporting and polling cadence. The client secret, like every
secret, may name a systemd credential: `client_secret = { credential = "vtn-secret" }`.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from controller.config.fields import OptionalFile, Secret, Strict

# OpenADR's own limits: names and targets are 1-128 characters.
_Name = Annotated[str, Field(min_length=1, max_length=128)]

REPORT_TYPES = ("USAGE", "DEMAND", "OPERATING_STATE", "BASELINE", "LOAD_SHED_DELTA_AVAILABLE")


def _http_url(v: str, what: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL, got {v!r}")
    try:
        _ = parts.port
    except ValueError as e:
        raise ValueError(f"{what} has a bad port: {v!r}") from e
    return v


class OpenADRConfig(Strict):
    """An OpenADR 3.1 VTN whose events cap the site (docs/openadr.md). Strict like every
    section (`fields.Strict`); that it needs an enabled `[control]` is checked with the
    other checks that span sections (`checks.py`)."""

    enabled: bool = True
    vtn_url: str  # the VTN's REST base URL, e.g. https://vtn.example-grid.com/openadr3/3.1.0
    client_id: _Name  # OAuth2 client credentials, provisioned by the utility at enrolment
    client_secret: Secret
    token_url: str | None = None  # default: the VTN's GET /auth/server
    scope: str | None = None  # OAuth2 scope to ask for, if the utility's server wants one
    ca_file: OptionalFile = None  # https: the VTN's CA bundle; system CAs when unset
    ven_name: _Name  # found (GET /vens?venName=) or registered (POST /vens)
    resource_name: _Name | None = None  # the site's resource; default the site id
    targets: list[_Name] = Field(default_factory=list)  # more targets this VEN answers to
    programs: list[_Name] = Field(default_factory=list)  # program ids or names; empty: all
    respond_within_s: float = Field(60, gt=0)  # under the cap by an interval's start + this
    # SIMPLE levels 0-3: kW each, or else percent of control.max_import_kw (as [grid]).
    levels_kw: list[Annotated[float, Field(ge=0)]] | None = Field(None, min_length=4, max_length=4)
    levels_pct: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: [100.0, 66.0, 33.0, 0.0], min_length=4, max_length=4
    )
    alert_level: int | None = Field(2, ge=0, le=3)  # ALERT_GRID_EMERGENCY: this SIMPLE level
    report_interval_s: float = Field(60, ge=1)  # when an event's report descriptors don't say
    default_reports: list[str] = Field(default_factory=lambda: ["USAGE", "OPERATING_STATE"])
    shed_available_lead_s: float = Field(3600, ge=0)  # LOAD_SHED_DELTA_AVAILABLE this early
    poll_interval_s: float = Field(60, ge=1)  # no MQTT binding: read the events this often
    resync_interval_s: float = Field(600, ge=10)  # with MQTT: read them over REST anyway
    timeout_s: float = Field(10, gt=0, le=120)  # one REST request
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600)
    mqtt_ca_file: OptionalFile = None  # mqtts to the VTN's broker: its CA; system CAs unset

    @field_validator("vtn_url")
    @classmethod
    def _vtn_url(cls, v: str) -> str:
        return _http_url(v, "vtn_url").rstrip("/")

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v, "token_url")

    @field_validator("default_reports")
    @classmethod
    def _known_reports(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in REPORT_TYPES]
        if bad:
            raise ValueError(f"unknown report types {bad}: rigd reports {', '.join(REPORT_TYPES)}")
        return v

    def describe(self) -> str:
        """One line for `rigd check-config`."""
        levels = (
            f"levels {', '.join(f'{k:g}' for k in self.levels_kw)} kW"
            if self.levels_kw is not None
            else f"levels {', '.join(f'{p:g}' for p in self.levels_pct)} %"
        )
        return (
            f"OpenADR 3.1 VEN {self.ven_name!r} of VTN {self.vtn_url} (client {self.client_id}), "
            f"{'programs ' + ', '.join(self.programs) if self.programs else 'all programs'}, "
            f"SIMPLE {levels}, respond within {self.respond_within_s:g} s"
        )

    @model_validator(mode="after")
    def _poll_fits(self) -> OpenADRConfig:
        if self.timeout_s >= self.poll_interval_s:
            raise ValueError("timeout_s must be shorter than poll_interval_s")
        return self
