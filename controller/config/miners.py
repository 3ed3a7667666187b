"""`[[miners]]` rows: one miner or an address range, and the settings of its driver.

A row is flat in the file (`driver = "antminer"` next to `low_power_w = 2300`), but what a
row may set depends on its driver, so the settings of each driver are their own model and
a row holds the one its `driver` names (`MinerConfig.settings`, a union discriminated on
`driver`). The list of drivers is the registry's (`drivers.registry.KINDS`) plus "auto", a
range the daemon scans; each model converts to the frozen settings its driver takes, and
the import-time check below refuses a registry kind that has no model here.

A setting the row's driver does not use is most likely a mistake (a row copied from
another kind), so it is an error that names the drivers it belongs to, as an unknown key
is: it never silently does nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ModelWrapValidatorHandler, field_validator, model_validator

from controller.config.fields import IDENT_RE, Ident, OptionalSecret, Port, Strict
from drivers import antminer_web, braiins, registry, vnish
from drivers.cgminer import DEFAULT_PORT as CGMINER_PORT
from drivers.luxos import renew_after_s

AUTO = "auto"  # a range the daemon scans; each miner found gets the driver it needs
DEFAULT_DRIVER = "luxos"
DRIVERS = (*registry.MINER_KINDS, AUTO)  # the registry's kinds, and "auto"

MAX_RANGE = 65_536


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


def _check_range_size(spec: str, count: int) -> None:
    if count > MAX_RANGE:
        raise ValueError(f"range {spec!r} has {count} addresses (max {MAX_RANGE})")


# -- each driver's settings ------------------------------------------------------------------


class _LuxOSFields(Strict):
    # "hold" keeps the miner's single write session open between commands (one connection
    # per command; Luxor's own tools are refused meanwhile), "per-write" logs on and off
    # around each command. See drivers/luxos.py.
    session: Literal["hold", "per-write"] = "hold"


class _AntminerFields(Strict):
    web_port: Port = antminer_web.WEB_PORT  # the web UI, stock firmware's only control
    low_power_w: float | None = Field(None, gt=0)  # measured draw in low-power mode


class _BraiinsFields(Strict):
    web_port: Port = braiins.DEFAULT_REST_PORT  # the REST API
    # The public gRPC API: the only control of releases before 25.07 (no REST API), and
    # what the driver asks the API version of to choose between the two.
    grpc_port: Port = braiins.DEFAULT_GRPC_PORT


class _AvalonFields(Strict):
    low_power_w: float | None = Field(None, gt=0)  # measured draw in the low work mode


class _VNishFields(Strict):
    web_port: Port = vnish.WEB_PORT  # the web API: reads, stop/start, presets


class _WhatsminerFields(Strict):
    power_min_w: float | None = Field(None, gt=0)  # lowest power limit to set
    power_max_w: float | None = Field(None, gt=0)  # highest power limit to set

    @model_validator(mode="after")
    def _range_ordered(self) -> _WhatsminerFields:
        lo, hi = self.power_min_w, self.power_max_w
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"power_min_w ({lo:g}) must be below power_max_w ({hi:g})")
        return self


class _Driver(Strict):
    """What every driver's settings model offers: the settings its driver is built with."""

    # The registry settings type this model converts to (checked against the registry).
    converts_to: ClassVar[type[Any] | None]

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        raise NotImplementedError


class LuxOSConfig(_LuxOSFields, _Driver):
    converts_to = registry.LuxOSSettings
    driver: Literal["luxos"] = "luxos"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        hold = renew_after_s(poll_interval_s) if self.session == "hold" else None
        return registry.LuxOSSettings(renew_session_after=hold)


class CGMinerConfig(_Driver):
    converts_to = registry.NoSettings
    driver: Literal["cgminer"] = "cgminer"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.NoSettings()


class AntminerConfig(_AntminerFields, _Driver):
    converts_to = registry.AntminerSettings
    driver: Literal["antminer"] = "antminer"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.AntminerSettings(web_port=self.web_port, low_power_w=self.low_power_w)


class BraiinsConfig(_BraiinsFields, _Driver):
    converts_to = registry.BraiinsSettings
    driver: Literal["braiins"] = "braiins"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.BraiinsSettings(web_port=self.web_port, grpc_port=self.grpc_port)


class AvalonConfig(_AvalonFields, _Driver):
    converts_to = registry.AvalonSettings
    driver: Literal["avalon"] = "avalon"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.AvalonSettings(low_power_w=self.low_power_w)


class EpicConfig(_Driver):
    converts_to = registry.NoSettings
    driver: Literal["epic"] = "epic"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.NoSettings()


class VNishConfig(_VNishFields, _Driver):
    converts_to = registry.VNishSettings
    driver: Literal["vnish"] = "vnish"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.VNishSettings(web_port=self.web_port)


class WhatsminerConfig(_WhatsminerFields, _Driver):
    converts_to = registry.WhatsminerSettings
    driver: Literal["whatsminer", "whatsminer-v3"] = "whatsminer"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        return registry.WhatsminerSettings(
            power_min_w=self.power_min_w, power_max_w=self.power_max_w
        )


class AutoConfig(_LuxOSFields, _AntminerFields, _BraiinsFields, _WhatsminerFields, _Driver):
    """A range to scan takes every driver's settings: each miner found keeps its kind's."""

    converts_to = None
    driver: Literal["auto"] = "auto"

    def for_driver(self, poll_interval_s: float) -> registry.MinerSettings:
        raise ValueError("an auto range has no driver until it is scanned (autodiscover)")


DriverConfig = Annotated[
    LuxOSConfig
    | CGMinerConfig
    | AntminerConfig
    | BraiinsConfig
    | AvalonConfig
    | EpicConfig
    | VNishConfig
    | WhatsminerConfig
    | AutoConfig,
    Field(discriminator="driver"),
]
_MODELS: tuple[type[_Driver], ...] = (
    LuxOSConfig,
    CGMinerConfig,
    AntminerConfig,
    BraiinsConfig,
    AvalonConfig,
    EpicConfig,
    VNishConfig,
    WhatsminerConfig,
    AutoConfig,
)


def _by_driver() -> dict[str, type[_Driver]]:
    """Driver name -> its settings model, checked against the registry: every kind has a
    model converting to the settings its driver takes, and no model names another kind."""
    out: dict[str, type[_Driver]] = {}
    for model in _MODELS:
        for name in getattr(model.model_fields["driver"].annotation, "__args__", ()):
            out[name] = model
    if set(out) != set(DRIVERS):
        raise TypeError(
            f"miner drivers and config models differ: {sorted(set(DRIVERS) ^ set(out))}"
        )
    for name, model in out.items():
        wanted = None if name == AUTO else registry.KINDS[name].settings
        if model.converts_to is not wanted:
            raise TypeError(f"config model {model.__name__} does not fit miner kind {name!r}")
    return out


BY_DRIVER = _by_driver()
# Every key that is some driver's setting: a row's key among these belongs to `settings`.
SETTING_KEYS = frozenset(k for m in BY_DRIVER.values() for k in m.model_fields) - {"driver"}


def _drivers_with(key: str) -> list[str]:
    return sorted(d for d, m in BY_DRIVER.items() if d != AUTO and key in m.model_fields)


def default_port(driver: str) -> int:
    """The API port a row of this driver talks to unless it says otherwise (an auto range
    is scanned on the CGMiner API's)."""
    kind = registry.KINDS.get(driver)
    return CGMINER_PORT if kind is None else kind.default_port


# -- the row ---------------------------------------------------------------------------------

# Parts equal across a farm's rows, kept once: most of a 10,000-row config is the same
# driver settings and the same set of keys given, and each row's own copies of them were
# about half of its 2 KB. Both are never changed once made (the models are frozen;
# pydantic copies a fields set before it adds to it, in `model_copy`). Settings are shared
# only with the same keys given: a check may ask whether a row set a key (`session`).
_SHARED: dict[tuple[Any, frozenset[str]], Any] = {}
_SETS: dict[frozenset[str], set[str]] = {}
_SHARED_MAX = 4096  # distinct parts kept at most (a config has a few)


def _shared_set(fields: frozenset[str]) -> set[str]:
    got = _SETS.get(fields)
    if got is None:
        if len(_SETS) >= _SHARED_MAX:
            _SETS.clear()
        got = _SETS[fields] = set(fields)
    return got


def _shared_parts(miner: MinerConfig) -> MinerConfig:
    """`miner` with its settings and its fields set replaced by equal shared ones."""
    d = miner.__dict__
    settings = d["settings"]
    key = (settings, frozenset(settings.model_fields_set))
    try:
        shared = _SHARED.get(key)
    except TypeError:  # a setting that cannot be hashed: this row keeps its own
        shared = settings
    if shared is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        object.__setattr__(settings, "__pydantic_fields_set__", _shared_set(key[1]))
        shared = _SHARED[key] = settings
    d["settings"] = shared
    fields = frozenset(miner.__pydantic_fields_set__)
    object.__setattr__(miner, "__pydantic_fields_set__", _shared_set(fields))
    return miner


class MinerConfig(Strict):
    """One miner (`id` + `host`) or a range of them (`range`, ids made by `id_format`)."""

    id: Ident | None = None
    host: str | None = None
    range: str | None = None
    id_format: str = "{prefix}-{c}-{d}"  # fields: prefix, a, b, c, d (octets), n (1-based)
    id_prefix: str = "rig"
    port: Port = CGMINER_PORT  # default: the driver's own (4433 for whatsminer-v3)
    driver: str = DEFAULT_DRIVER  # a kind of drivers.registry, or "auto" (ranges only)
    username: str = ""
    password: OptionalSecret = None
    group: str | None = None
    settings: DriverConfig = Field(default_factory=LuxOSConfig)

    @model_validator(mode="wrap")
    @classmethod
    def _settings_of_the_driver(
        cls, data: Any, handler: ModelWrapValidatorHandler[MinerConfig]
    ) -> MinerConfig:
        """Gather the flat row's driver settings into `settings`; refuse those of others."""
        if not isinstance(data, Mapping) or "settings" in data:
            return handler(data)  # built in code (or a dump): already in shape
        driver = data.get("driver", DEFAULT_DRIVER)
        row = {k: v for k, v in data.items() if k not in SETTING_KEYS}
        model = BY_DRIVER.get(driver) if isinstance(driver, str) else None
        misplaced: list[str] = []
        if model is not None:  # else the driver itself is the error
            own = {k: v for k, v in data.items() if k in SETTING_KEYS and k in model.model_fields}
            misplaced = sorted(k for k in data if k in SETTING_KEYS and k not in own)
            row["settings"] = {"driver": driver, **own}
            if "port" not in data:
                row["port"] = default_port(driver)
        miner = handler(row)
        if misplaced:
            key = misplaced[0]
            raise ValueError(
                f"`{key}` does not apply to driver {driver!r}; "
                f"it is a setting of driver {' and '.join(_drivers_with(key))}"
            )
        return _shared_parts(miner)

    @field_validator("driver", mode="before")
    @classmethod
    def _known_driver(cls, v: Any) -> Any:
        if v not in DRIVERS:
            names = [repr(d) for d in DRIVERS]
            raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]}")
        return v

    @model_validator(mode="after")
    def _auto_is_for_ranges(self) -> MinerConfig:
        if self.driver == AUTO and self.range is None:
            raise ValueError(
                'driver "auto" is for a `range`, which the daemon scans; give a single '
                "miner its driver (rigctl scan names it)"
            )
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
            if not IDENT_RE.fullmatch(rid):
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

    def driver_settings(self, poll_interval_s: float) -> registry.MinerSettings:
        """What this row tells its driver besides access (`drivers.registry`'s settings)."""
        return self.settings.for_driver(poll_interval_s)

    def found_as(self, rig_id: str, host: str, driver: str, port: int) -> MinerConfig:
        """This auto range's entry for one miner a scan found: the range's ids, group,
        credentials and those of its settings that the found driver takes."""
        model = BY_DRIVER[driver]
        given = {k: getattr(self.settings, k) for k in self.settings.model_fields_set}
        carried = {k: v for k, v in given.items() if k in model.model_fields and k != "driver"}
        settings = model.model_validate({"driver": driver, **carried})
        update = {
            "id": rig_id,
            "host": host,
            "range": None,
            "driver": driver,
            "port": port,
            "settings": settings,
        }
        return self.model_copy(update=update)
