"""The daemon's configuration: one TOML file, validated, overridable from the environment.

A broken config must never reach a running daemon, so loading either returns a
fully checked `Config` or raises `ConfigError` listing *every* problem with its
dotted path and, where the file has it, its line: a technician fixes the file
in one pass instead of one error per restart.

Any setting can be overridden by an environment variable RIGD_<SECTION>__<KEY>
(double underscore between levels), e.g. RIGD_MQTT__URL or RIGD_POLL__INTERVAL_S,
so one file serves several environments and systemd can inject the broker.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from controller.config.credentials import (
    CONTEXT_KEY,
    Credentials,
    file_or_credential,
    secret_or_credential,
)

ENV_PREFIX = "RIGD_"
DEFAULT_CONFIG_PATH = Path("/etc/rigd/rigd.toml")

# Ids end up in MQTT topics and file names: no '/', '+', '#', spaces.
_IDENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_IDENT_RE = re.compile(_IDENT)
Ident = Annotated[str, Field(pattern=_IDENT)]
Port = Annotated[int, Field(ge=1, le=65535)]
# A secret or file setting may instead name a systemd credential: { credential = "NAME" }.
Secret = Annotated[SecretStr, BeforeValidator(secret_or_credential)]
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(secret_or_credential)]
OptionalFile = Annotated[Path | None, BeforeValidator(file_or_credential)]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Strict):
    id: Ident
    name: str = ""
    timezone: str = "UTC"
    state_dir: Path = Path("/var/lib/rigd")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError) as e:  # OSError: name too long
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like Asia/Bishkek)") from e
        return v


class MqttConfig(_Strict):
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


class PollConfig(_Strict):
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


class MeterConfig(_Strict):
    id: Ident
    host: str
    port: Port = 502
    protocol: Literal["sdm630", "sunspec"] = "sdm630"
    unit_id: int = Field(1, ge=0, le=255)
    role: Literal["import"] = "import"  # the grid-connection meter the cap applies to


class PduConfig(_Strict):
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
    outlets: dict[int, Ident] = Field(default_factory=dict)  # outlet number -> rig id

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


def expand_range(spec: str) -> list[ipaddress.IPv4Address]:
    """Addresses of "10.0.2.10-10.0.2.200", "10.0.2.10-200" or a CIDR (hosts only)."""
    spec = spec.strip()
    if "/" in spec:
        net = ipaddress.IPv4Network(spec, strict=False)
        _check_range_size(spec, net.num_addresses - 2)  # before listing a /8's 16 M hosts
        return list(net.hosts()) if net.num_addresses > 2 else list(net)
    if "-" in spec:
        lo_s, hi_s = (s.strip() for s in spec.split("-", 1))
        lo = ipaddress.IPv4Address(lo_s)
        hi = (
            ipaddress.IPv4Address(hi_s)
            if "." in hi_s
            else ipaddress.IPv4Address(int(lo) - (int(lo) & 0xFF) + int(hi_s))
        )
        if hi < lo:
            raise ValueError(f"range {spec!r} ends before it starts")
        _check_range_size(spec, int(hi) - int(lo) + 1)
        return [ipaddress.IPv4Address(i) for i in range(int(lo), int(hi) + 1)]
    return [ipaddress.IPv4Address(spec)]


MAX_RANGE = 65_536


def _check_range_size(spec: str, count: int) -> None:
    if count > MAX_RANGE:
        raise ValueError(f"range {spec!r} has {count} addresses (max {MAX_RANGE})")


class MinerConfig(_Strict):
    """One miner (`id` + `host`) or a range of them (`range`, ids made by `id_format`)."""

    WHATSMINER_V3_PORT: ClassVar[int] = 4433
    # Driver-specific settings, by the drivers that use them.
    DRIVER_SETTINGS: ClassVar[dict[str, frozenset[str]]] = {
        "luxos": frozenset({"session"}),
        "antminer": frozenset({"web_port", "low_power_w"}),
        "braiins": frozenset({"web_port"}),
        "whatsminer": frozenset({"power_min_w", "power_max_w"}),
        "whatsminer-v3": frozenset({"power_min_w", "power_max_w"}),
    }

    id: Ident | None = None
    host: str | None = None
    range: str | None = None
    id_format: str = "{prefix}-{c}-{d}"  # fields: prefix, a, b, c, d (octets), n (1-based)
    id_prefix: str = "rig"
    port: Port = 4028  # whatsminer-v3: 4433 unless given (see `_v3_port`)
    # "auto" (ranges only): the daemon scans the range and picks each rig's driver and port.
    driver: Literal[
        "luxos", "cgminer", "antminer", "whatsminer", "whatsminer-v3", "braiins", "auto"
    ] = "luxos"
    username: str = ""
    password: OptionalSecret = None
    group: str | None = None
    web_port: Port = 80  # antminer: the web UI; braiins: the REST API
    power_min_w: float | None = Field(None, gt=0)  # whatsminer: lowest power limit to set
    power_max_w: float | None = Field(None, gt=0)  # whatsminer: highest power limit to set
    low_power_w: float | None = Field(None, gt=0)  # antminer: measured draw in low-power mode
    # luxos: "hold" keeps the miner's single write session open between commands (one
    # connection per command; Luxor's own tools are refused meanwhile), "per-write" logs
    # on and off around each command. See drivers/luxos.py.
    session: Literal["hold", "per-write"] = "hold"

    @model_validator(mode="before")
    @classmethod
    def _v3_port(cls, data: Any) -> Any:
        """API v3 Whatsminers listen on 4433, so a row that names only the driver works."""
        if (
            isinstance(data, Mapping)
            and data.get("driver") == "whatsminer-v3"
            and "port" not in data
        ):
            return {**data, "port": cls.WHATSMINER_V3_PORT}
        return data

    @model_validator(mode="after")
    def _settings_fit_driver(self) -> MinerConfig:
        """A setting the driver ignores is most likely a mistake: say so, as for unknown keys."""
        if self.driver == "auto" and self.range is None:
            raise ValueError(
                'driver "auto" is for a `range`, which the daemon scans; give a single '
                "miner its driver (rigctl scan names it)"
            )
        for key in sorted(set().union(*self.DRIVER_SETTINGS.values()) & self.model_fields_set):
            if self.driver == "auto":
                break  # found rigs of each kind take the settings of their kind
            if key not in self.DRIVER_SETTINGS.get(self.driver, frozenset()):
                kinds = sorted(d for d, keys in self.DRIVER_SETTINGS.items() if key in keys)
                raise ValueError(
                    f"`{key}` does not apply to driver {self.driver!r}; "
                    f"it is a setting of driver {' and '.join(kinds)}"
                )
        lo, hi = self.power_min_w, self.power_max_w
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"power_min_w ({lo:g}) must be below power_max_w ({hi:g})")
        return self

    @model_validator(mode="after")
    def _one_or_range(self) -> MinerConfig:
        if self.range is None:
            if not self.id or not self.host:
                raise ValueError("a miner needs `id` and `host`, or a `range`")
            return self
        if self.host is not None or self.id is not None:
            raise ValueError("give either `range` or `id` + `host`, not both")
        try:
            addrs = expand_range(self.range)
        except ValueError as e:
            raise ValueError(f"bad address range {self.range!r}: {e}") from e
        if len(addrs) > MAX_RANGE:
            raise ValueError(f"range {self.range!r} has {len(addrs)} addresses (max {MAX_RANGE})")
        try:
            ids = [self._format_id(addrs[0], 1), self._format_id(addrs[-1], len(addrs))]
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:  # "{a.x}"
            raise ValueError(f"bad id_format {self.id_format!r}: {e}") from e
        for rid in ids:  # rig ids go into MQTT topics and file names: same rule as `id`
            if not _IDENT_RE.fullmatch(rid):
                raise ValueError(
                    f"id_format {self.id_format!r} (id_prefix {self.id_prefix!r}) makes rig id "
                    f"{rid!r}: use letters, digits, '-', '_' and '.', starting with a letter "
                    "or digit, at most 64 characters"
                )
        return self

    def _format_id(self, addr: ipaddress.IPv4Address, n: int) -> str:
        a, b, c, d = addr.packed
        return self.id_format.format(prefix=self.id_prefix, a=a, b=b, c=c, d=d, n=n)

    def expand(self) -> list[tuple[str, str]]:
        """(rig id, host) for each miner this entry describes."""
        if self.range is None:
            assert self.id is not None and self.host is not None
            return [(self.id, self.host)]
        return [(self._format_id(a, n), str(a)) for n, a in enumerate(expand_range(self.range), 1)]


class GroupConfig(_Strict):
    priority: int = 0  # higher: shed later, restored sooner
    description: str = ""


Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


class ScheduleConfig(_Strict):
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


class BudgetConfig(_Strict):
    """An energy budget that must last its period (a contracted import volume)."""

    period: Literal["day", "month"]
    kwh: float = Field(gt=0)
    # Kept back from pacing so control lag at the period's end never overdraws the budget.
    reserve_pct: float = Field(0.5, ge=0, le=50)


class ModelTiming(_Strict):
    """How long a rig model takes to show a command in its power (seconds)."""

    sleep_s: float = Field(ge=0)
    wake_s: float = Field(ge=0)  # boot plus ramp to full power
    power_change_s: float = Field(ge=0)


class ControlConfig(_Strict):
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

    def timing_for(self, model: str) -> ModelTiming:
        return self.timing.get(model, self.timing_default)


class GridKeyConfig(_Strict):
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


class HeartbeatConfig(_Strict):
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


class GridConfig(_Strict):
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


class AdminConfig(_Strict):
    """The local admin API that `rigctl` talks to."""

    socket: Path = Path("/run/rigd/rigd.sock")  # systemd RuntimeDirectory=rigd
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


class MetricsConfig(_Strict):
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


class HistoryConfig(_Strict):
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


class HomeAssistantConfig(_Strict):
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


class ZoneConfig(_Strict):
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


class Config(_Strict):
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

    @model_validator(mode="after")
    def _held_sessions_fit_poll(self) -> Config:
        """A LuxOS session lapses after 60 s unused, so holding one needs a poll at least
        every ~50 s. The default then quietly logs on per write; asking for it explicitly
        is an error worth seeing."""
        from drivers.luxos import renew_after_s  # drivers do not import the config

        if renew_after_s(self.poll.interval_s) is not None:
            return self
        for i, m in enumerate(self.miners):
            if "session" in m.model_fields_set and m.session == "hold":
                raise ValueError(
                    f'miners[{i}]: session = "hold" needs poll.interval_s under '
                    f"{60 - 5:g} s (a LuxOS session lapses after 60 s unused); "
                    f'poll.interval_s is {self.poll.interval_s:g}: use session = "per-write"'
                )
        return self

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


# -- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str  # dotted, e.g. "pdus[1].outlets.3"
    message: str
    line: int | None = None  # 1-based line in the file, when known
    source: str = ""  # the file, or the environment variable that set it

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        head = f"{where}: " if where else ""
        return f"{head}{self.path or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """A config that must not be used, with every problem found in it."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = issues
        self.source = source
        super().__init__("\n".join(str(i) for i in issues))


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="
)


def _split_key(key: str) -> list[str]:
    parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+)", key)
    return [a or b or c for a, b, c in parts]


def locate_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table and key path in a TOML text to its line, for error messages.

    tomllib gives values but no positions; this scan covers what configs use
    (tables, arrays of tables, dotted and quoted keys). Array-of-table entries
    are keyed by their index, as pydantic reports them.
    """
    lines: dict[tuple[str, ...], int] = {}
    counts: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline = False
    for no, raw in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = False
            continue
        m = _HEADER.match(raw)
        if m and not _KEY.match(raw):
            names = _split_key(m.group(2))
            if m.group(1) == "[[":
                # An array-of-tables entry: index it under its parent path.
                parent = _resolve(names[:-1], counts)
                base = (*parent, names[-1])
                idx = counts.get(base, -1) + 1
                counts[base] = idx
                table = (*base, str(idx))
            else:
                table = (*_resolve(names[:-1], counts), names[-1])
            lines.setdefault(table, no)
            continue
        k = _KEY.match(raw)
        if k:
            path = (*table, *_split_key(k.group(1)))
            lines.setdefault(path, no)
            rest = raw[k.end() :]
            if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                in_multiline = True
    return lines


def _resolve(names: list[str], counts: dict[tuple[str, ...], int]) -> tuple[str, ...]:
    """A dotted header prefix, with the current index of any array of tables on the way."""
    out: tuple[str, ...] = ()
    for name in names:
        out = (*out, name)
        if out in counts:
            out = (*out, str(counts[out]))
    return out


def _line_for(loc: tuple[Any, ...], lines: Mapping[tuple[str, ...], int]) -> int | None:
    key = tuple(str(p) for p in loc)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return None


# -- loading ----------------------------------------------------------------------------------


def env_overrides(environ: Mapping[str, str]) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(variable, path, value) for every RIGD_A__B[__C] variable."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            continue
        parsed: Any = value
        if value[:1] in ("[", "{"):
            # Lists and tables are given in TOML syntax: RIGD_X__Y='["a", "b"]'.
            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except (ValueError, RecursionError):  # not TOML, too deep, too many digits
                parsed = value
        yield name, path, parsed


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    applied: dict[tuple[str, ...], str] = {}
    for name, path, value in env_overrides(environ):
        node = raw
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
        applied[path] = name
    return applied


def _cross_check(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Checks that span sections: unique ids, outlets naming real rigs, known groups."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    seen: dict[str, tuple[Any, ...]] = {}
    hosts: dict[tuple[str, int], str] = {}
    for i, m in enumerate(cfg.miners):
        if m.group is not None and m.group not in cfg.groups:
            known = ", ".join(sorted(cfg.groups)) or "none defined"
            problems.append(
                (("miners", i, "group"), f"unknown group {m.group!r} (groups: {known})")
            )
        for rid, host in m.expand():
            if rid in seen:
                problems.append(
                    (("miners", i), f"duplicate rig id {rid!r} (also {_dotted(seen[rid])})")
                )
            else:
                seen[rid] = ("miners", i)
            where = (host, m.port)
            if where in hosts and hosts[where] != rid:
                problems.append((("miners", i), f"{host}:{m.port} is also rig {hosts[where]!r}"))
            hosts.setdefault(where, rid)
    outlet_owner: dict[str, str] = {}
    for section, dev_ids in (
        ("meters", [m.id for m in cfg.meters]),
        ("pdus", [p.id for p in cfg.pdus]),
    ):
        ids: set[str] = set()
        for i, dev_id in enumerate(dev_ids):
            if dev_id in ids:
                problems.append(((section, i, "id"), f"duplicate {section[:-1]} id {dev_id!r}"))
            ids.add(dev_id)
    for i, pdu in enumerate(cfg.pdus):
        for n, rid in pdu.outlets.items():
            loc = ("pdus", i, "outlets", str(n))  # a table key, not a list index
            if rid not in seen:
                problems.append((loc, f"rig {rid!r} is not a configured miner"))
            elif rid in outlet_owner:
                problems.append((loc, f"rig {rid!r} is already on {outlet_owner[rid]}"))
            else:
                outlet_owner[rid] = f"{pdu.id} outlet {n}"
    if cfg.budget is not None:
        if cfg.control is None:
            problems.append((("budget",), "an energy budget needs a [control] section to act on"))
        if not any(m.role == "import" for m in cfg.meters):
            problems.append(
                (("budget",), "an energy budget is counted from an import meter: add one")
            )
    if cfg.grid is not None and cfg.grid.enabled:
        if cfg.control is None or not cfg.control.enabled:
            problems.append((("grid",), "grid orders need an enabled [control] section to obey"))
        if not cfg.grid.allow_unsigned and not cfg.grid.keys:
            problems.append(
                (("grid", "keys"), "no operator keys and unsigned orders refused: add a key")
            )
        kids = [k.kid for k in cfg.grid.keys]
        for i, kid in enumerate(kids):
            if kid in kids[:i]:
                problems.append((("grid", "keys", i, "kid"), f"duplicate key id {kid!r}"))
    if cfg.zone is not None:
        if cfg.control is None or not cfg.control.enabled:
            problems.append((("zone",), "a zone's share of the site needs an enabled [control]"))
        if not any(m.role == "import" for m in cfg.meters):
            problems.append((("zone",), "a zone reports its load from its sub-meter: add one"))
    if len([m for m in cfg.meters if m.role == "import"]) > 1:
        problems.append(
            (("meters",), "more than one import meter: which one does the cap apply to?")
        )
    return problems


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
) -> Config:
    """Validate TOML text (plus environment overrides); raise ConfigError listing every issue.

    `{ credential = "NAME" }` settings are read from `credentials`, by default the directory
    systemd names in $CREDENTIALS_DIRECTORY (of `environ`).
    """
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, or an int of 5000 digits
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        msg = "nested too deeply" if isinstance(e, RecursionError) else msg
        raise ConfigError([ConfigIssue("", f"not valid TOML: {msg}", line, source)], source) from e
    env = os.environ if environ is None else environ
    applied = _apply_env(raw, env)
    lines = locate_lines(text)
    creds = credentials if credentials is not None else Credentials.from_environ(env)

    def issue(loc: tuple[Any, ...], msg: str) -> ConfigIssue:
        key = tuple(str(p) for p in loc)
        for path, var in applied.items():
            if key[: len(path)] == path:
                return ConfigIssue(_dotted(loc), msg, None, f"environment {var}")
        return ConfigIssue(_dotted(loc), msg, _line_for(loc, lines), source)

    try:
        cfg = Config.model_validate(raw, context={CONTEXT_KEY: creds})
    except ValidationError as e:
        issues = []
        for err in e.errors():
            loc = tuple(
                p for p in err["loc"] if p not in ("[key]",) and not str(p).startswith("function-")
            )
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling; see config/example.toml)"
            elif err["type"] == "string_pattern_mismatch":
                msg = (
                    f"{err['input']!r} is not a valid id: use letters, digits, '-', '_' and '.', "
                    "starting with a letter or digit, at most 64 characters"
                )
            elif err["type"] == "missing":
                msg = "required setting is missing"
            issues.append(issue(loc, msg))
        raise ConfigError(issues, source) from e
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError([issue(loc, msg) for loc, msg in problems], source)
    return cfg


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            [ConfigIssue("", f"cannot read config: {e.strerror}", None, str(p))], str(p)
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            [ConfigIssue("", "config is not UTF-8 text", None, str(p))], str(p)
        ) from e
    return parse_config(text, source=str(p), environ=environ, credentials=credentials)


def summarize(cfg: Config) -> str:
    """What a technician wants confirmed after `check-config`: counts, not a dump."""
    everything = cfg.rigs()
    rigs = [r for r in everything if r.miner.driver != "auto"]
    to_scan = len(everything) - len(rigs)
    mapped = sum(len(p.outlets) for p in cfg.pdus)
    ranges = sum(1 for m in cfg.miners if m.range is not None and m.driver != "auto")
    drivers: dict[str, int] = {}
    for r in rigs:
        drivers[r.miner.driver] = drivers.get(r.miner.driver, 0) + 1
    by_driver = ", ".join(f"{n} {d}" for d, n in sorted(drivers.items())) or "none"
    lines = [
        f"site {cfg.site.id} ({cfg.site.timezone}), state in {cfg.site.state_dir}",
        f"broker {cfg.mqtt.url}, poll every {cfg.poll.interval_s:g} s "
        f"({cfg.poll.concurrency} at once, timeout {cfg.poll.timeout_s:g} s)",
        f"{len(cfg.meters)} meter(s): "
        + (", ".join(f"{m.id} ({m.protocol})" for m in cfg.meters) or "none"),
        f"{len(cfg.pdus)} PDU(s), {mapped} outlet(s) mapped to rigs",
        f"{len(rigs)} miner(s) ({by_driver})"
        + (f", {ranges} address range(s) expanded" if ranges else "")
        + f", {len(rigs) - mapped} without an outlet"
        + (f"; {to_scan} address(es) to scan (driver auto)" if to_scan else ""),
        f"{len(cfg.groups)} group(s)"
        + (": " + ", ".join(sorted(cfg.groups)) if cfg.groups else ""),
    ]
    c = cfg.control
    if c is None or not c.enabled:
        lines.append("control: off (monitoring only)")
    else:
        lines.append(
            f"control: max import {c.max_import_kw:,.0f} kW, {len(c.schedules)} schedule(s)"
            + (", DRY RUN" if c.dry_run else "")
        )
    if cfg.budget is not None:
        lines.append(f"budget: {cfg.budget.kwh:,.0f} kWh per {cfg.budget.period}")
    g = cfg.grid
    if g is not None and g.enabled:
        hb = g.heartbeat
        lines.append(
            f"grid orders: {len(g.keys)} operator key(s)"
            + (", UNSIGNED ORDERS ACCEPTED" if g.allow_unsigned else ", signed only")
            + (
                f", heartbeat on {hb.topic} (failsafe {hb.failsafe_kw:,.0f} kW after "
                f"{hb.timeout_s:g} s)"
                if hb
                else ", no heartbeat"
            )
        )
    if not cfg.meters:
        lines.append("warning: no import meter; the farm's import will not be measured")
    return "\n".join(lines)
