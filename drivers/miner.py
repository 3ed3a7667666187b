"""What the daemon sees of a miner, whatever its firmware: read, sleep, wake, power target.

The control loop only knows `MinerDriver` and `MinerCapabilities`; a rig on stock firmware
and one on LuxOS differ in what they can do (the capabilities say so up front) and in
which `UnsupportedOperation` they raise, not in how they are called. Reads are one request
per poll, because a farm polls thousands of rigs and each connection costs the miner's
single-threaded API server too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog

from drivers.cgminer import DEFAULT_PORT, CGMinerClient, parse_telemetry
from drivers.errors import UnsupportedOperation
from drivers.luxos import LuxOSControl, parse_profiles
from drivers.telemetry import RigIdentity, RigTelemetry

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MinerCapabilities:
    can_sleep: bool
    can_power_target: bool
    power_target_min_w: float | None = None
    power_target_max_w: float | None = None
    # API sleep leaves the control board (and on stock, everything) drawing: only the PDU
    # takes a rig to zero.
    needs_pdu_to_power_off: bool = True
    # The power targets the firmware takes, as (watts, its published hashrate or None),
    # lowest first: LuxOS profiles. Empty: any target in the range.
    profiles: tuple[tuple[float, float | None], ...] = ()


@runtime_checkable
class MinerDriver(Protocol):
    device: str  # the rig id
    capabilities: MinerCapabilities  # may be refined after the first read (profile range)

    async def read(self, ts: float) -> RigTelemetry: ...  # ts: daemon clock time of the poll
    async def sleep(self) -> None: ...
    async def wake(self) -> None: ...
    async def set_power_target(self, watts: float | None) -> None: ...
    async def close(self) -> None: ...


class CGMinerDriver:
    """Any CGMiner-compatible firmware, stock Antminer included: telemetry only.

    Stock firmware denies control over RPC (Code 45) and its web-UI sleep is unreliable
    (ignored writes, 20 s answers, reboots needed), so this driver does not pretend:
    control raises `UnsupportedOperation` and the daemon uses the PDU instead.
    """

    def __init__(self, device: str, client: CGMinerClient) -> None:
        self.device = device
        self.capabilities = MinerCapabilities(can_sleep=False, can_power_target=False)
        self._client = client
        self._identity: RigIdentity | None = None
        self._last_uptime: int | None = None

    def _note_reading(self, tel: RigTelemetry) -> None:
        """Cache identity; a reboot (uptime went backwards) may mean new firmware, so re-ask."""
        rebooted = (
            self._last_uptime is not None
            and tel.uptime_s is not None
            and tel.uptime_s < self._last_uptime
        )
        self._last_uptime = tel.uptime_s
        self._identity = None if rebooted else tel.identity
        if rebooted:
            log.info("miner.rebooted", device=self.device, uptime_s=tel.uptime_s)

    async def read(self, ts: float) -> RigTelemetry:
        cmds = ["summary", "stats"] + (["version"] if self._identity is None else [])
        replies = await self._client.multi(*cmds)
        tel = parse_telemetry(
            ts,
            summary=replies["summary"],
            stats=replies["stats"],
            version=replies.get("version"),
            identity=self._identity,
            device=self.device,
        )
        self._note_reading(tel)
        return tel

    def _unsupported(self, operation: str) -> UnsupportedOperation:
        return UnsupportedOperation(
            "this firmware offers no control over its API; switch the rig's PDU outlet",
            device=self.device,
            operation=operation,
        )

    async def sleep(self) -> None:
        raise self._unsupported("sleep")

    async def wake(self) -> None:
        raise self._unsupported("wake")

    async def set_power_target(self, watts: float | None) -> None:
        raise self._unsupported("set_power_target")

    async def close(self) -> None:
        """Nothing to release: the protocol opens one connection per request."""


_LUXOS_OPTIONAL = frozenset({"power", "config", "atm", "version", "profiles"})


class LuxOSDriver(CGMinerDriver):
    """LuxOS: full telemetry (including its power estimate) plus sleep/wake/power target."""

    def __init__(
        self, device: str, client: CGMinerClient, *, renew_session_after: float | None = None
    ) -> None:
        super().__init__(device, client)
        self.control = LuxOSControl(client, device=device, renew_after=renew_session_after)
        self.capabilities = MinerCapabilities(can_sleep=True, can_power_target=True)

    @property
    def hold_session(self) -> bool:
        """Whether the poll keeps a write session open (see drivers/luxos.py). The daemon
        turns it off for a rig in maintenance, so a technician's tools can log on."""
        return self.control.hold

    @hold_session.setter
    def hold_session(self, on: bool) -> None:
        self.control.hold = on and self.control.renew_after is not None

    def adopt_session(self, old: LuxOSDriver) -> None:
        """Take over the session `old` (this rig's driver before a reload) holds."""
        self.control.adopt(old.control)

    def _refine_capabilities(self) -> None:
        span = self.control.power_range()
        if span is not None:
            self.capabilities = MinerCapabilities(
                can_sleep=True,
                can_power_target=True,
                power_target_min_w=span[0],
                power_target_max_w=span[1],
                profiles=tuple((p.watts, p.hashrate_ths) for p in self.control.profiles),
            )

    async def read(self, ts: float) -> RigTelemetry:
        cmds = ["summary", "stats", "power", "config", "atm"]
        if self._identity is None:
            cmds += ["version", "profiles"]  # rarely change: first poll and after a reboot
        # Only summary and stats are needed to monitor a rig; the rest enrich the reading.
        replies = await self._client.multi(*cmds, optional=_LUXOS_OPTIONAL)
        if "profiles" in replies:
            self.control.profiles = parse_profiles(replies["profiles"], device=self.device)
            self._refine_capabilities()
        tel = parse_telemetry(
            ts,
            summary=replies["summary"],
            stats=replies["stats"],
            power=replies.get("power"),
            config=replies.get("config"),
            atm=replies.get("atm"),
            version=replies.get("version"),
            profile_watts={p.name: p.watts for p in self.control.profiles},
            identity=self._identity,
            device=self.device,
        )
        self._note_reading(tel)
        await self.control.keep_session(ts)
        return tel

    async def close(self) -> None:
        """Let go of the write session, so Luxor's tools need not wait for it to lapse."""
        await self.control.release()

    async def sleep(self) -> None:
        await self.control.sleep()

    async def wake(self) -> None:
        await self.control.wake()

    async def set_power_target(self, watts: float | None) -> None:
        try:
            await self.control.set_power_target(watts)
        finally:
            self._refine_capabilities()  # profiles may have been loaded just now


_KINDS: dict[str, Callable[[str, CGMinerClient], MinerDriver]] = {
    "luxos": LuxOSDriver,
    "cgminer": CGMinerDriver,
}
# Kinds whose drivers live in their own modules, which import this one: built lazily.
WHATSMINER_KINDS = ("whatsminer", "whatsminer-v3")
MINER_KINDS = (*_KINDS, "antminer", *WHATSMINER_KINDS, "braiins")


def make_miner_driver(
    kind: str,
    device: str,
    host: str,
    port: int | None = None,
    *,
    username: str = "",
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
    web_port: int | None = None,
    power_min_w: float | None = None,
    power_max_w: float | None = None,
    low_power_w: float | None = None,
    renew_session_after: float | None = None,
) -> MinerDriver:
    """A driver for one rig, whatever its firmware; every kind is configured the same way.

    "luxos" (full control over 4028) and "cgminer" (reads only) need no credentials (LuxOS
    sessions are coordination, not authentication). "antminer" is stock firmware controlled
    through its web UI on `web_port`; "braiins" reads 4028 and controls over REST on
    `web_port`; "whatsminer"/"whatsminer-v3" are btminer's API v2 (4028) and v3 (4433).
    `port` None means the kind's usual API port, so a v3 Whatsminer need not say 4433.
    Settings a kind has no use for are ignored, so one config row shape fits all kinds.
    `renew_session_after` (luxos): hold a write session between commands, renewed at the
    poll once this old (`drivers.luxos.renew_after_s`); None: log on and off per command.
    """
    k = kind.strip().lower()
    if k in WHATSMINER_KINDS:
        import drivers.whatsminer as whatsminer  # imports this module: not at the top

        return whatsminer.make_whatsminer_driver(
            k,
            device,
            host,
            port,
            username=username,
            password=password,
            timeout=timeout,
            retries=retries,
            power_min_w=power_min_w,
            power_max_w=power_max_w,
        )
    api_port = DEFAULT_PORT if port is None else port
    if k == "antminer":
        import drivers.antminer_web as antminer_web  # imports this module: not at the top

        return antminer_web.make_antminer_driver(
            device,
            host,
            api_port,
            username=username,
            password=password,
            timeout=timeout,
            retries=retries,
            web_port=antminer_web.WEB_PORT if web_port is None else web_port,
            low_power_w=low_power_w,
        )
    if k == "braiins":
        import drivers.braiins as braiins  # imports this module: not at the top

        return braiins.make_braiins_driver(
            device,
            host,
            api_port,
            username=username,
            password=password,
            timeout=timeout,
            retries=retries,
            rest_port=braiins.DEFAULT_REST_PORT if web_port is None else web_port,
        )
    builder = _KINDS.get(k)
    if builder is None:
        raise ValueError(f"unknown miner kind {kind!r}; known kinds: {', '.join(MINER_KINDS)}")
    client = CGMinerClient(host, api_port, timeout=timeout, retries=retries, device=device)
    if k == "luxos":
        return LuxOSDriver(device, client, renew_session_after=renew_session_after)
    return builder(device, client)
