"""The config's schema: every section of the file as a validated, frozen model.

`Config` is the root. Each model checks what it can see alone (ranges, formats, one field
against another); checks that span sections are in `checks.py`, and the `[[miners]]`
rows, whose settings depend on their driver, in `miners.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator

from controller.config.fields import (
    FsPath,
    Ident,
    OptionalFile,
    OptionalSecret,
    Port,
    Secret,
    Strict,
)
from controller.config.miners import MinerConfig
from controller.config.openadr import OpenADRConfig


class SiteConfig(Strict):
    id: Ident
    name: str = ""
    timezone: str = "UTC"
    state_dir: FsPath = Path("/var/lib/rigd")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError) as e:  # OSError: name too long
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like Asia/Bishkek)") from e
        return v


class MqttConfig(Strict):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: OptionalSecret = None
    client_id: str | None = None  # default: rigd-<site id>
    keepalive_s: int = Field(30, ge=5, le=3600)
    ca_file: OptionalFile = None  # mqtts: CA bundle; system CAs when unset
    cert_file: OptionalFile = None  # mqtts: client certificate (mutual TLS)
    key_file: OptionalFile = None
    tls_insecure: bool = False  # skip hostname verification: test brokers only
    # MQTT 5 gives grid orders a response topic and correlation data; "3.1.1" is for brokers
    # that lack 5 (the demo's embedded one). Both keep a persistent session.
    protocol: Literal["5", "3.1.1"] = "5"
    # How long the broker keeps our session (and queues QoS 1 grid orders) while we are away.
    session_expiry_s: int = Field(7 * 86_400, ge=0, le=4_294_967_295)
    # A rig's retained state goes out when something changes (controller/core/rig_updates.py)
    # and at least this often; 0: every poll that brings a new reading.
    rig_refresh_s: float = Field(60.0, ge=0, le=86_400)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {v!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL has no host: {v!r}")
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"broker URL has a bad port: {v!r}") from e
        if parts.path not in ("", "/"):
            raise ValueError(f"broker URL must not have a path: {v!r}")
        return v

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class PollConfig(Strict):
    interval_s: float = Field(10.0, ge=0.2, le=3600)
    concurrency: int = Field(256, ge=1, le=20_000)  # devices polled at once
    timeout_s: float = Field(3.0, gt=0, le=60)  # per device call
    retries: int = Field(1, ge=0, le=5)
    # How often `driver = "auto"` ranges are scanned again for new miners (0: at start only).
    discover_interval_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _silence_fits_interval(self) -> PollConfig:
        worst = self.timeout_s * (self.retries + 1)
        if worst >= self.interval_s:
            raise ValueError(
                f"a device that never answers holds each cycle for timeout_s x (retries + 1) = "
                f"{worst:g} s, not shorter than interval_s = {self.interval_s:g} s"
            )
        return self


class MeterConfig(Strict):
    id: Ident
    host: str
    port: Port = 502
    protocol: Literal["sdm630", "sunspec"] = "sdm630"
    unit_id: int = Field(1, ge=0, le=255)
    role: Literal["import"] = "import"  # the grid-connection meter the cap applies to


class PduConfig(Strict):
    id: Ident
    host: str
    port: Port = 161
    protocol: Literal["apc-rpdu2"] = "apc-rpdu2"
    snmp_version: Literal["2c", "3"] = "2c"
    community: Secret = SecretStr("public")
    write_community: OptionalSecret = None  # outlet switching disabled when unset (v2c)
    user: str = ""  # SNMPv3
    auth_key: OptionalSecret = None
    priv_key: OptionalSecret = None
    auth_protocol: Literal["SHA", "SHA256", "MD5"] = "SHA"
    priv_protocol: Literal["AES", "AES256", "DES"] = "AES"
    # TOML table keys are strings: the outlet number is the one key read as an integer.
    outlets: dict[Annotated[int, Field(strict=False)], Ident] = Field(default_factory=dict)

    @field_validator("outlets")
    @classmethod
    def _outlet_numbers(cls, v: dict[int, str]) -> dict[int, str]:
        bad = [n for n in v if n < 1]
        if bad:
            raise ValueError(f"outlet numbers start at 1, got {bad}")
        return v

    @model_validator(mode="after")
    def _v3_complete(self) -> PduConfig:
        if self.snmp_version == "3" and not (self.user and self.auth_key and self.priv_key):
            raise ValueError("snmp_version 3 needs user, auth_key and priv_key")
        return self


class GroupConfig(Strict):
    priority: int = 0  # higher: shed later, restored sooner
    description: str = ""


Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


class ScheduleConfig(Strict):
    """A recurring cap in the site's local time, e.g. the winter evening peak."""

    name: str
    days: list[Day] = Field(default_factory=lambda: list(_DAYS))
    months: list[Annotated[int, Field(ge=1, le=12)]] = Field(
        default_factory=lambda: list(range(1, 13))
    )
    start: str  # "17:00", local time
    end: str  # "21:00"; an end before the start runs past midnight
    cap_kw: float | None = Field(None, ge=0)
    cap_pct: float | None = Field(None, ge=0, le=100)  # of control.max_import_kw

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"time must be HH:MM (24 h), got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_cap(self) -> ScheduleConfig:
        if (self.cap_kw is None) == (self.cap_pct is None):
            raise ValueError("give exactly one of cap_kw and cap_pct")
        if self.start == self.end:
            raise ValueError("start and end are the same time: the window would be empty")
        return self


class BudgetConfig(Strict):
    """An energy budget that must last its period (a contracted import volume)."""

    period: Literal["day", "month"]
    kwh: float = Field(gt=0)
    # Kept back from pacing so control lag at the period's end never overdraws the budget.
    reserve_pct: float = Field(0.5, ge=0, le=50)


class ModelTiming(Strict):
    """How long a rig model takes to show a command in its power (seconds)."""

    sleep_s: float = Field(ge=0)
    wake_s: float = Field(ge=0)  # boot plus ramp to full power
    power_change_s: float = Field(ge=0)


class ControlConfig(Strict):
    enabled: bool = True  # false: monitor only, never command
    dry_run: bool = False  # plan, log and publish, send nothing (also `rigd run --dry-run`)
    max_import_kw: float = Field(gt=0)  # contracted maximum at the grid connection
    headroom_kw: float = Field(0.0, ge=0)  # keep measured import this far below the cap
    # ... or this share of the cap, whichever is more; a floor under the meter's noise margin
    headroom_pct: float = Field(0.5, ge=0, le=50)
    deadband_kw: float = Field(0.0, ge=0)  # no restoring unless this far below target
    deadband_pct: float = Field(1.0, ge=0, le=50)
    ramp_kw_per_interval: float = Field(0.0, ge=0)  # max kW being added at once; 0: 10 % of cap
    min_on_s: float = Field(300, ge=0)  # a woken rig runs at least this long (unless over cap)
    min_off_s: float = Field(300, ge=0)  # a slept rig sleeps at least this long
    power_targets: bool = True  # throttle where firmware allows, before sleeping rigs
    escalate_after_s: float = Field(120, gt=0)  # sleep not effective by then: outlet off
    allow_outlet_off: bool = True
    sleeping_w: float = Field(100, ge=0)  # a rig drawing more than this is not asleep
    meter_stale_s: float = Field(30, gt=0)  # older import readings are not trusted
    estimate_margin_pct: float = Field(10, ge=0, le=100)  # added to estimates without a meter
    safe_state: Literal["sleep", "hold"] = "sleep"  # with no trustworthy reading at all
    rig_default_w: float = Field(3500, gt=0)  # a rig's full power until it is measured
    timing_default: ModelTiming = ModelTiming(sleep_s=15, wake_s=300, power_change_s=60)
    timing: dict[str, ModelTiming] = Field(default_factory=dict)  # by model, e.g. "Antminer S21"
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    reopt_gain_pct: float = Field(0.5, ge=0, le=100)  # re-plan when it gains this much hashrate
    reopt_hold_s: float = Field(1800, ge=0)  # ... changing a rig for it at most this often
    above_nominal: bool = False  # power targets above a rig's default, up to its maximum
    # before a cap's known end, swap slow-to-wake rigs in (back at full sooner, a little less now)
    prepare_restore: bool = True

    def timing_for(self, model: str) -> ModelTiming:
        return self.timing.get(model, self.timing_default)


class GridKeyConfig(Strict):
    """One of the grid operator's public keys; orders name it in their JWS `kid` header."""

    kid: str = Field(min_length=1, max_length=200)
    alg: Literal["EdDSA", "ES256"]
    public_key: str | None = None  # PEM text
    public_key_file: OptionalFile = None  # or a PEM file

    @model_validator(mode="after")
    def _one_source(self) -> GridKeyConfig:
        if (self.public_key is None) == (self.public_key_file is None):
            raise ValueError("give exactly one of public_key (PEM) or public_key_file")
        return self


class HeartbeatConfig(Strict):
    """The operator's liveness signal and what rigd does without it (the EEBus LPC pattern)."""

    topic: str = Field(min_length=1)  # published by the operator; any payload format below
    timeout_s: float = Field(120, gt=0)  # silence longer than this is a lost heartbeat
    failsafe_kw: float = Field(ge=0)  # the cap while the heartbeat is lost
    min_failsafe_s: float = Field(7200, ge=0)  # failsafe held at least this long
    recovery_s: float = Field(120, ge=0)  # heartbeat back this long releases the failsafe
    always: bool = False  # the contract wants a heartbeat even with no open-ended order

    @field_validator("topic")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if "+" in v or "#" in v:
            raise ValueError("the heartbeat topic must not contain MQTT wildcards")
        return v


class GridConfig(Strict):
    """Curtailment orders from the grid operator (docs/grid-protocol.md)."""

    enabled: bool = True
    allow_unsigned: bool = False  # plain JSON orders: demos and tests only
    keys: list[GridKeyConfig] = Field(default_factory=list)
    max_message_bytes: int = Field(16_384, ge=512, le=1_048_576)
    clock_skew_s: float = Field(30, ge=0, le=3600)  # tolerated difference between clocks
    max_age_s: float = Field(900, gt=0)  # a message issued longer ago is refused as expired
    respond_within_s: float = Field(60, gt=0)  # default when an order does not say
    report_interval_s: float = Field(5, ge=1)  # compliance reports while an order is active
    # Caps for `level` orders 0-3: kW each, or else percent of control.max_import_kw.
    levels_kw: list[Annotated[float, Field(ge=0)]] | None = Field(None, min_length=4, max_length=4)
    levels_pct: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: [100.0, 66.0, 33.0, 0.0], min_length=4, max_length=4
    )
    heartbeat: HeartbeatConfig | None = None


class AdminConfig(Strict):
    """The local admin API that `rigctl` talks to."""

    socket: FsPath = Path("/run/rigd/rigd.sock")  # systemd RuntimeDirectory=rigd
    group: str | None = None  # technicians' group: may use the socket (mode 0660)


def split_listen(v: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, sep, port_s = v.strip().rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, e.g. 127.0.0.1:9108, got {v!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"listen has a bad host: {v!r}")
    return host, int(port_s)


class MetricsConfig(Strict):
    """The Prometheus metrics endpoint (controller/adapters/metrics.py)."""

    enabled: bool = False
    listen: str = "127.0.0.1:9108"  # HOST:PORT; bind a farm-LAN address to let Prometheus in
    per_rig: bool = True  # per-rig series (a few per rig); false for very large farms

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        split_listen(v)
        return v

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class HistoryConfig(Strict):
    """The bounded, downsampled site history in the state database (adapters/history.py)."""

    enabled: bool = True
    step_s: int = Field(60, ge=1, le=3600)  # one row per step
    keep_days: float = Field(2, gt=0, le=366)
    rollup_step_s: int = Field(900, ge=60, le=86_400)  # coarser rows, kept longer
    rollup_keep_days: float = Field(90, gt=0, le=3660)

    @model_validator(mode="after")
    def _rollup_coarser(self) -> HistoryConfig:
        if self.rollup_step_s <= self.step_s or self.rollup_step_s % self.step_s:
            raise ValueError("rollup_step_s must be a multiple of step_s, and larger")
        if self.rollup_keep_days < self.keep_days:
            raise ValueError("rollup_keep_days must not be shorter than keep_days")
        if self.keep_days * 86_400 < self.rollup_step_s:
            # A rollup row is made of its fine rows: they must outlive its step.
            raise ValueError(
                f"keep_days ({self.keep_days:g} days = {self.keep_days * 86_400:g} s) must be "
                f"at least one rollup step (rollup_step_s = {self.rollup_step_s} s)"
            )
        return self


class HomeAssistantConfig(Strict):
    """Home Assistant MQTT discovery (controller/adapters/hass.py)."""

    enabled: bool = False
    discovery_prefix: str = Field("homeassistant", min_length=1, max_length=200)
    per_rig: bool = True  # a device per rig with its sensors
    switches: bool = True  # a sleep/wake switch per rig (needs per_rig and [control])

    @field_validator("discovery_prefix")
    @classmethod
    def _plain_prefix(cls, v: str) -> str:
        if any(c in v for c in "+#\x00") or v.startswith("/") or v.endswith("/"):
            raise ValueError(f"discovery_prefix must be a plain topic prefix, got {v!r}")
        return v


class ZoneConfig(Strict):
    """This daemon owns one zone of a site shared by several (controller/adapters/zones.py)."""

    group: Ident  # the shared site: zones meet on rigd/<group>/zones/<zone>
    id: Ident | None = None  # this zone; default the site id
    site_max_import_kw: float = Field(gt=0, allow_inf_nan=False)  # the whole site's cap
    # What this zone may import before it has heard the others (the fallbacks of all
    # zones must fit in the site cap together).
    fallback_kw: float = Field(ge=0, allow_inf_nan=False)
    stale_s: float = Field(60.0, gt=0)  # a zone unheard this long is counted at its last load

    @model_validator(mode="after")
    def _fallback_fits(self) -> ZoneConfig:
        if self.fallback_kw > self.site_max_import_kw:
            raise ValueError(
                f"fallback_kw ({self.fallback_kw:g}) is more than the whole site may import "
                f"({self.site_max_import_kw:g})"
            )
        return self


class Config(Strict):
    site: SiteConfig
    mqtt: MqttConfig = MqttConfig()
    poll: PollConfig = PollConfig()
    meters: list[MeterConfig] = Field(default_factory=list)
    pdus: list[PduConfig] = Field(default_factory=list)
    miners: list[MinerConfig] = Field(default_factory=list)
    groups: dict[Ident, GroupConfig] = Field(default_factory=dict)
    admin: AdminConfig = AdminConfig()
    control: ControlConfig | None = None  # absent: monitor only
    budget: BudgetConfig | None = None
    grid: GridConfig | None = None  # absent: no grid orders
    zone: ZoneConfig | None = None  # absent: this daemon has the site to itself
    metrics: MetricsConfig = MetricsConfig()
    history: HistoryConfig = HistoryConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    openadr: OpenADRConfig | None = None  # absent: no OpenADR VTN (config/openadr.py)

    def rigs(self) -> list[RigEntry]:
        """Every miner, ranges expanded, with its outlet if a PDU maps it."""
        outlet_of = {rig: (p.id, n) for p in self.pdus for n, rig in p.outlets.items()}
        out: list[RigEntry] = []
        for m in self.miners:
            for rid, host in m.expand():
                out.append(RigEntry(rid, host, m, outlet_of.get(rid)))
        return out


@dataclass(frozen=True, slots=True)
class RigEntry:
    id: str
    host: str
    miner: MinerConfig
    outlet: tuple[str, int] | None  # (pdu id, outlet number)
