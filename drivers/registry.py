"""The one table of miner kinds: what each is called, how it is built, what it needs.

A "kind" is the `driver = ...` of a config row and what `rigctl scan` writes for a rig it
found. The config takes its list of kinds (and each kind's default port) from `KINDS`, the
daemon builds every rig's driver through `make_miner_driver`, and the scan asks `PROBES`
in their order, so adding a firmware is one row here plus its driver module.

Every kind is reached the same way (`MinerAccess`: host, port, credentials, timeout,
retries); what differs is a small frozen settings object per kind, which the config's
per-driver model converts to. Drivers never see the config: these dataclasses are the
whole of what a driver is told.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypedDict

from drivers import antminer_web, avalon, braiins, epic, vnish, whatsminer
from drivers.base import MinerDriver
from drivers.cgminer import DEFAULT_PORT as CGMINER_PORT
from drivers.cgminer import CGMinerClient, CGMinerDriver
from drivers.luxos import LuxOSDriver
from drivers.telemetry import RigIdentity


@dataclass(frozen=True, slots=True)
class MinerAccess:
    """How to reach one miner and log on to it: the same for every kind."""

    host: str
    port: int | None = None  # None: the kind's usual API port
    # Empty: the firmware's factory login (LuxOS and plain CGMiner need none: a LuxOS
    # session is coordination between clients, not authentication).
    username: str = ""
    password: str = ""
    timeout: float = 3.0  # per request
    retries: int = 1  # of a request that timed out or found the host unreachable


# -- what each kind accepts besides its access ----------------------------------------------


@dataclass(frozen=True, slots=True)
class NoSettings:
    """A kind with nothing to set but its access (plain CGMiner: reads only)."""


@dataclass(frozen=True, slots=True)
class LuxOSSettings:
    # Hold a write session between commands, renewed at the poll once this old
    # (`drivers.luxos.renew_after_s`); None: log on and off around each command.
    renew_session_after: float | None = None


@dataclass(frozen=True, slots=True)
class AntminerSettings:
    web_port: int = antminer_web.WEB_PORT  # the web UI, the only control surface of stock
    # The rig's measured draw in low-power mode; without it no power target is offered.
    low_power_w: float | None = None


@dataclass(frozen=True, slots=True)
class BraiinsSettings:
    web_port: int = braiins.DEFAULT_REST_PORT  # the REST API that pauses and sets targets
    grpc_port: int = braiins.DEFAULT_GRPC_PORT  # the gRPC API, for releases before REST


@dataclass(frozen=True, slots=True)
class WhatsminerSettings:
    # The power-limit range to use; neither API reports it (see drivers/whatsminer).
    power_min_w: float | None = None
    power_max_w: float | None = None


@dataclass(frozen=True, slots=True)
class AvalonSettings:
    # The rig's measured draw in its low work mode; without it (or the firmware having
    # reported that mode's figure) no power target is offered.
    low_power_w: float | None = None


@dataclass(frozen=True, slots=True)
class VNishSettings:
    web_port: int = vnish.WEB_PORT  # the web API: reads, stop/start and presets


MinerSettings = (
    NoSettings
    | LuxOSSettings
    | AntminerSettings
    | BraiinsSettings
    | WhatsminerSettings
    | AvalonSettings
    | VNishSettings
)


# -- the builders, one per kind -------------------------------------------------------------


def _port(access: MinerAccess, default: int) -> int:
    return default if access.port is None else access.port


class _Login(TypedDict):
    username: str
    password: str
    timeout: float
    retries: int


def _login(access: MinerAccess) -> _Login:
    """The keyword arguments every kind's factory takes alike."""
    return _Login(
        username=access.username,
        password=access.password,
        timeout=access.timeout,
        retries=access.retries,
    )


def _client(device: str, access: MinerAccess) -> CGMinerClient:
    return CGMinerClient(
        access.host,
        _port(access, CGMINER_PORT),
        timeout=access.timeout,
        retries=access.retries,
        device=device,
    )


def _cgminer(device: str, access: MinerAccess, _settings: NoSettings) -> MinerDriver:
    return CGMinerDriver(device, _client(device, access))


def _luxos(device: str, access: MinerAccess, settings: LuxOSSettings) -> MinerDriver:
    renew = settings.renew_session_after
    return LuxOSDriver(device, _client(device, access), renew_session_after=renew)


def _antminer(device: str, access: MinerAccess, settings: AntminerSettings) -> MinerDriver:
    return antminer_web.make_antminer_driver(
        device,
        access.host,
        _port(access, CGMINER_PORT),
        web_port=settings.web_port,
        low_power_w=settings.low_power_w,
        **_login(access),
    )


def _braiins(device: str, access: MinerAccess, settings: BraiinsSettings) -> MinerDriver:
    return braiins.make_braiins_driver(
        device,
        access.host,
        _port(access, CGMINER_PORT),
        rest_port=settings.web_port,
        grpc_port=settings.grpc_port,
        **_login(access),
    )


def _avalon(device: str, access: MinerAccess, settings: AvalonSettings) -> MinerDriver:
    return avalon.make_avalon_driver(
        device,
        access.host,
        _port(access, CGMINER_PORT),
        timeout=access.timeout,
        retries=access.retries,
        low_power_w=settings.low_power_w,
    )


def _epic(device: str, access: MinerAccess, _settings: NoSettings) -> MinerDriver:
    return epic.make_epic_driver(
        device, access.host, _port(access, epic.DEFAULT_PORT), password=access.password,
        timeout=access.timeout, retries=access.retries,
    )  # fmt: skip


def _vnish(device: str, access: MinerAccess, settings: VNishSettings) -> MinerDriver:
    return vnish.make_vnish_driver(
        device,
        access.host,
        _port(access, CGMINER_PORT),
        web_port=settings.web_port,
        password=access.password,
        timeout=access.timeout,
        retries=access.retries,
    )


def _whatsminer(kind: str) -> Callable[[str, MinerAccess, WhatsminerSettings], MinerDriver]:
    def build(device: str, access: MinerAccess, settings: WhatsminerSettings) -> MinerDriver:
        return whatsminer.make_whatsminer_driver(
            kind,
            device,
            access.host,
            access.port,
            power_min_w=settings.power_min_w,
            power_max_w=settings.power_max_w,
            **_login(access),
        )

    return build


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MinerKind:
    name: str
    about: str  # one line, for help texts
    default_port: int  # the API port the driver talks to
    settings: type[Any]  # the frozen dataclass `build` takes (one of `MinerSettings`)
    build: Callable[[str, MinerAccess, Any], MinerDriver]
    # Whether the kind can run a rig below full power (antminer: only once a low-power
    # figure is configured; the driver's capabilities say so rig by rig).
    can_throttle: bool

    def port_found_on(self, scanned_port: int) -> int:
        """The API port to configure for a rig of this kind found by scanning `scanned_port`
        (the CGMiner API's): that port, unless the kind speaks on its own."""
        return scanned_port if self.default_port == CGMINER_PORT else self.default_port


KINDS: Final[Mapping[str, MinerKind]] = MappingProxyType(
    {
        k.name: k
        for k in (
            MinerKind(
                "luxos",
                "LuxOS: reads, sleep, wake and power targets over 4028",
                CGMINER_PORT,
                LuxOSSettings,
                _luxos,
                can_throttle=True,
            ),
            MinerKind(
                "cgminer",
                "any CGMiner-compatible firmware: reads only (control through the PDU)",
                CGMINER_PORT,
                NoSettings,
                _cgminer,
                can_throttle=False,
            ),
            MinerKind(
                "antminer",
                "stock Antminer (bmminer): reads over 4028, sleep and low power over its web UI",
                CGMINER_PORT,
                AntminerSettings,
                _antminer,
                can_throttle=True,
            ),
            MinerKind(
                "whatsminer",
                "Whatsminer, btminer API v2 on 4028",
                whatsminer.V2_PORT,
                WhatsminerSettings,
                _whatsminer("whatsminer"),
                can_throttle=True,
            ),
            MinerKind(
                "whatsminer-v3",
                "Whatsminer, btminer API v3 on 4433",
                whatsminer.V3_PORT,
                WhatsminerSettings,
                _whatsminer("whatsminer-v3"),
                can_throttle=True,
            ),
            MinerKind(
                "braiins",
                "Braiins OS: reads over 4028; pause, resume, power targets over REST or gRPC",
                CGMINER_PORT,
                BraiinsSettings,
                _braiins,
                can_throttle=True,
            ),
            MinerKind(
                "avalon",
                "Canaan Avalon: reads, soft-off/soft-on and work modes over 4028",
                CGMINER_PORT,
                AvalonSettings,
                _avalon,
                can_throttle=True,
            ),
            MinerKind(
                "epic",
                "ePIC PowerPlay: reads, stop/start and power targets over its HTTP API on 4028",
                epic.DEFAULT_PORT,
                NoSettings,
                _epic,
                can_throttle=True,
            ),
            MinerKind(
                "vnish",
                "VNish (AnthillOS) on Antminers: web API reads, stop/start and power presets",
                CGMINER_PORT,
                VNishSettings,
                _vnish,
                can_throttle=True,
            ),
        )
    }
)
MINER_KINDS: Final = tuple(KINDS)


def kind_named(kind: str) -> MinerKind:
    """The kind of that name (any case, spaces around ignored); ValueError naming the known."""
    found = KINDS.get(kind.strip().lower())
    if found is None:
        raise ValueError(f"unknown miner kind {kind!r}; known kinds: {', '.join(MINER_KINDS)}")
    return found


def make_miner_driver(
    kind: str, device: str, access: MinerAccess, settings: MinerSettings | None = None
) -> MinerDriver:
    """A driver for one rig (`device`, its id) of any kind.

    `settings` must be the kind's own settings type; None means its defaults.
    """
    k = kind_named(kind)
    if settings is None:
        settings = k.settings()
    elif not isinstance(settings, k.settings):
        raise TypeError(
            f"miner kind {k.name!r} takes {k.settings.__name__}, not {type(settings).__name__}"
        )
    return k.build(device, access, settings)


# -- scanning -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """One firmware's scan probe: who answers at a host, and which kind drives it."""

    # (host, the CGMiner API port being scanned, seconds per request) -> identity or None
    identify: Callable[[str, int, float], Awaitable[RigIdentity | None]]
    kind_for: Callable[[RigIdentity], str]


def _is(kind: str) -> Callable[[RigIdentity], str]:
    return lambda _identity: kind


# Most specific first: Whatsminer and Braiins answer CGMiner's `version` too, and a stock
# Antminer is plain CGMiner to anyone who does not look at its web UI. A rig none of these
# claims is told apart by its `version` alone (LuxOS or CGMiner).
PROBES: Final = (
    Probe(
        lambda host, port, wait: whatsminer.identify(host, timeout=wait, v2_port=port),
        whatsminer.driver_kind_for,
    ),
    Probe(lambda host, port, wait: braiins.identify(host, timeout=wait, port=port), _is("braiins")),
    Probe(
        lambda host, port, wait: antminer_web.identify(host, timeout=wait, rpc_port=port),
        _is("antminer"),
    ),
    Probe(lambda host, port, wait: avalon.identify(host, timeout=wait, port=port), _is("avalon")),
    Probe(lambda host, port, wait: epic.identify(host, timeout=wait, port=port), _is("epic")),
    Probe(lambda host, port, wait: vnish.identify(host, timeout=wait, port=port), _is("vnish")),
)
