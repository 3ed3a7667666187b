"""The Whatsminer drivers, one per API generation, and the scan probe that tells them apart.

Control maps onto what the firmware offers: `sleep()` cuts hashboard power (v2
`power_off`, v3 `set.miner.service stop`), the control board stays up, so only the PDU
takes the rig to zero; `wake()` powers the hashboards again, after which the rig boots
and ramps for minutes; `set_power_target()` sets the firmware power limit, which
*restarts mining* to apply, so it is skipped when the limit is already what was asked.
Power percentage is offered as `set_power_percent()`.

Known firmware behaviour these drivers absorb: `power_off` and mode writes are often
applied without any reply (the client times out although it worked), so a write that
times out is verified by reading the miner's state, and only reported as a timeout if
the state did not change.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import structlog

from drivers.base import MinerCapabilities
from drivers.errors import (
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    UnsupportedOperation,
)
from drivers.reboots import RebootWatch
from drivers.telemetry import RigIdentity, RigTelemetry
from drivers.values import MAX_RIG_POWER_W, first, mapping, section, to_float, to_int
from drivers.whatsminer.parse import api_version_tuple, clean_text, flag
from drivers.whatsminer.v2 import (
    V2_PORT,
    BTMinerV2Client,
    parse_v2_identity,
    parse_v2_telemetry,
    v2_msg,
)
from drivers.whatsminer.v3 import (
    V3_PORT,
    BTMinerV3Client,
    parse_v3_identity,
    parse_v3_telemetry,
    v3_msg,
)

log = structlog.get_logger(__name__)

Json = dict[str, Any]
T = TypeVar("T")

# Neither API reports how low a power limit may go; without configuration the driver
# assumes half of the highest limit it has seen (an assumption, see the report).
DEFAULT_MIN_FRACTION: Final = 0.5


class _WhatsminerBase:
    """What both API generations share: capabilities, the power range and control locking."""

    def __init__(
        self, device: str, *, power_min_w: float | None, power_max_w: float | None
    ) -> None:
        for name, v in (("power_min_w", power_min_w), ("power_max_w", power_max_w)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of watts, got {v}")
        if power_min_w is not None and power_max_w is not None and power_min_w > power_max_w:
            raise ValueError(f"power_min_w {power_min_w} exceeds power_max_w {power_max_w}")
        self.device = device
        self._cfg_min, self._cfg_max = power_min_w, power_max_w
        self._learned_max: float | None = None
        self._limit_supported = True
        self._limit_set: int | None = None  # the user power limit the firmware holds
        self._identity: RigIdentity | None = None
        self._reboots = RebootWatch(device)
        self._lock = asyncio.Lock()
        self.capabilities = self._capabilities()

    def _learn_max(self, *values: float | None) -> None:
        for v in values:
            if v is not None and 0 < v <= MAX_RIG_POWER_W:  # a misread figure is no maximum
                self._learned_max = max(self._learned_max or 0.0, v)
        self.capabilities = self._capabilities()

    def power_range(self) -> tuple[float, float] | None:
        hi = self._cfg_max or self._learned_max
        if hi is None:
            return None
        lo = self._cfg_min or round(hi * DEFAULT_MIN_FRACTION)
        return min(lo, hi), hi

    def _capabilities(self) -> MinerCapabilities:
        span = self.power_range() if self._limit_supported else None
        return MinerCapabilities(
            can_sleep=True,
            can_power_target=self._limit_supported,
            power_target_min_w=span[0] if span else None,
            power_target_max_w=span[1] if span else None,
            needs_pdu_to_power_off=True,  # power off leaves the control board and fans up
        )

    def _note_reading(self, tel: RigTelemetry) -> None:
        """Cache identity; after a restart it may be new firmware, so the next poll re-asks."""
        self._identity = None if self._reboots.restarted(tel) else tel.identity

    @staticmethod
    def _check_watts(watts: float | None) -> None:
        if watts is not None and (not math.isfinite(watts) or watts <= 0):
            raise ValueError(f"power target must be a positive number of watts, got {watts}")

    def _target(self, watts: float | None) -> int:
        """Validate before sending anything: the firmware restarts mining on every change."""
        self._check_watts(watts)
        if not self._limit_supported:
            raise UnsupportedOperation(
                "this firmware has no power limit (API < 2.0.5, or Power Limit reads 0)",
                device=self.device,
                operation="set_power_target",
            )
        span = self.power_range()
        if span is None:
            raise UnsupportedOperation(
                "the rig's maximum power is unknown: configure power_max_w",
                device=self.device,
                operation="set_power_target",
            )
        lo, hi = span
        if watts is None:
            return round(hi)
        if not (lo <= watts <= hi):
            raise ValueError(f"power target {watts:.0f} W outside {lo:.0f}-{hi:.0f} W")
        return round(watts)

    @staticmethod
    def _percent(percent: int | None, *, none_means: int) -> int:
        if percent is None:
            return none_means
        if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
            raise ValueError(f"power percentage must be an integer 1-100, got {percent!r}")
        return percent


class WhatsminerDriver(_WhatsminerBase):
    """A Whatsminer on API v2 (port 4028).

    A read is one joined `summary+devs` request plus `status` (which says whether the
    hashboards are powered off; btminer will not join it), run concurrently; the first
    poll also asks `devdetails` and `get_version` for the model and firmware.
    """

    api = "v2"

    def __init__(
        self,
        device: str,
        host: str,
        port: int = V2_PORT,
        *,
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        power_min_w: float | None = None,
        power_max_w: float | None = None,
        backoff_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device, power_min_w=power_min_w, power_max_w=power_max_w)
        self.client = BTMinerV2Client(
            host,
            port,
            password=password,
            timeout=timeout,
            retries=retries,
            device=device,
            backoff_s=backoff_s,
            clock=clock,
        )
        self.api_version: tuple[int, ...] | None = None

    def _learn_status(self, status: Mapping[str, Any] | None) -> None:
        limit = to_int(v2_msg(status).get("power_limit_set"))
        if limit is not None and limit > 0:
            self._limit_set = limit
            self._learn_max(float(limit))

    def _learn_version(self, version: Mapping[str, Any] | None) -> None:
        api = api_version_tuple(clean_text(v2_msg(version).get("api_ver")))
        if api is not None:
            self.api_version = api
            if api < (2, 0, 5):  # adjust_power_limit arrived in API 2.0.5
                self._limit_supported = False
            self.capabilities = self._capabilities()

    async def read(self, ts: float) -> RigTelemetry:
        first_poll = self._identity is None
        cmds = ["summary", "devs"] + (["devdetails"] if first_poll else [])
        c = self.client
        results = await asyncio.gather(
            c.cg.multi(*cmds, optional={"devdetails"}),
            c.native("status"),
            c.native("get_version") if first_poll else _none(),
            return_exceptions=True,
        )
        joined = _required(results[0])
        status = _optional(results[1])
        version = _optional(results[2])
        tel = parse_v2_telemetry(
            ts,
            summary=joined["summary"],
            devs=joined.get("devs"),
            status=status,
            devdetails=joined.get("devdetails"),
            version=version,
            identity=self._identity,
            device=self.device,
        )
        self._learn_version(version)
        self._learn_status(status)
        # Units without limit support read "Power Limit" 0 and hold no power_limit_set
        # (asic-rs #199); re-judged every poll so a transient 0 does not stick.
        reads_zero = to_float(first(joined["summary"], "SUMMARY").get("Power Limit")) == 0
        too_old = self.api_version is not None and self.api_version < (2, 0, 5)
        self._limit_supported = not too_old and not (reads_zero and self._limit_set is None)
        self._learn_max(tel.power_limit_w)
        self._note_reading(tel)
        return tel

    async def status(self) -> Mapping[str, Any]:
        """btminer's `status` message (mineroff, power_limit_set, power_mode, ...)."""
        reply = await self.client.native("status")
        self._learn_status(reply)
        return v2_msg(reply)

    async def _write(
        self, cmd: str, verify: Callable[[Mapping[str, Any]], bool] | None, **params: str
    ) -> None:
        """Send a write; if it times out, ask the miner whether it happened anyway."""
        try:
            await self.client.privileged(cmd, **params)
        except (DeviceTimeout, DeviceUnreachable) as exc:
            if verify is None:
                raise
            try:
                st = await self.status()
            except DeviceError:
                raise exc from None
            if not verify(st):
                raise
            log.info("whatsminer.applied_without_reply", device=self.device, operation=cmd)

    async def sleep(self) -> None:
        async with self._lock:
            await self._write(
                "power_off", lambda st: flag(st.get("mineroff")) is True, respbefore="true"
            )

    async def wake(self) -> None:
        async with self._lock:
            await self._write("power_on", lambda st: flag(st.get("mineroff")) is False)

    async def set_power_target(self, watts: float | None) -> None:
        """Set the firmware power limit (None: the highest known, i.e. the rig's default).

        Reads `status` first: a limit that is already in force is not sent again,
        because every change restarts mining (minutes of lost hashing).
        """
        self._check_watts(watts)
        async with self._lock:
            if self.api_version is None:
                self._learn_version(await self.client.native("get_version"))
            await self.status()
            want = self._target(watts)
            if self._limit_set == want:
                log.debug("whatsminer.power_limit_unchanged", device=self.device, watts=want)
                return
            await self._write(
                "adjust_power_limit",
                lambda st: to_int(st.get("power_limit_set")) == want,
                power_limit=str(want),
            )
            self._limit_set = want
            log.info(
                "whatsminer.power_limit_set", device=self.device, requested_w=watts, watts=want
            )

    async def set_power_percent(self, percent: int | None) -> None:
        """Temporary power percentage (not persisted, no restart); None: back to 100 %."""
        pct = self._percent(percent, none_means=100)
        async with self._lock:
            if self.api_version is None:
                self._learn_version(await self.client.native("get_version"))
            v2 = self.api_version is not None and self.api_version >= (2, 0, 5)
            await self._write("set_power_pct_v2" if v2 else "set_power_pct", None, percent=str(pct))

    async def close(self) -> None:
        """Nothing to release: one connection per request."""


class WhatsminerV3Driver(_WhatsminerBase):
    """A Whatsminer on API v3 (port 4433).

    A read is `get.miner.status` summary and edevs plus `get.device.info` miner (whether
    it is working), concurrently; the first poll asks the whole `get.device.info` and
    `get.miner.setting` (whose `power` is the rated power, the top of the range).
    """

    api = "v3"

    def __init__(
        self,
        device: str,
        host: str,
        port: int = V3_PORT,
        *,
        username: str = "",
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        power_min_w: float | None = None,
        power_max_w: float | None = None,
        backoff_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device, power_min_w=power_min_w, power_max_w=power_max_w)
        self.client = BTMinerV3Client(
            host,
            port,
            account=username,
            password=password,
            timeout=timeout,
            retries=retries,
            device=device,
            backoff_s=backoff_s,
            clock=clock,
        )

    def _learn_setting(self, setting: Mapping[str, Any] | None) -> Mapping[str, Any]:
        msg = v3_msg(setting)
        limit = to_int(msg.get("power-limit"))
        if limit is not None and limit > 0:
            self._limit_set = limit
        self._learn_max(to_float(msg.get("power")), None if limit is None else float(limit))
        return msg

    async def read(self, ts: float) -> RigTelemetry:
        first_poll = self._identity is None
        c = self.client
        results = await asyncio.gather(
            c.get("get.miner.status", "summary"),
            c.get("get.miner.status", "edevs"),
            c.get("get.device.info") if first_poll else c.get("get.device.info", "miner"),
            c.get("get.miner.setting") if first_poll else _none(),
            return_exceptions=True,
        )
        summary = _required(results[0])
        edevs = _optional(results[1])
        info = _optional(results[2])
        setting = _optional(results[3])
        tel = parse_v3_telemetry(
            ts,
            summary=summary,
            edevs=edevs,
            device_info=info,
            identity=self._identity,
            device=self.device,
        )
        if setting is not None:
            self._learn_setting(setting)
        self._learn_max(tel.power_limit_w)
        self._note_reading(tel)
        return tel

    async def setting(self) -> Mapping[str, Any]:
        return self._learn_setting(await self.client.get("get.miner.setting"))

    async def _working(self) -> bool | None:
        info = await self.client.get("get.device.info", "miner")
        return flag(mapping(v3_msg(info).get("miner")).get("working"))

    async def _write(
        self, cmd: str, param: Any, verify: Callable[[], Awaitable[bool]] | None
    ) -> None:
        try:
            await self.client.set(cmd, param)
        except (DeviceTimeout, DeviceUnreachable) as exc:
            if verify is None:
                raise
            try:
                done = await verify()
            except DeviceError:
                raise exc from None
            if not done:
                raise
            log.info("whatsminer.applied_without_reply", device=self.device, operation=cmd)

    async def sleep(self) -> None:
        async def stopped() -> bool:
            return await self._working() is False

        async with self._lock:
            await self._write("set.miner.service", "stop", stopped)

    async def wake(self) -> None:
        async def started() -> bool:
            return await self._working() is True

        async with self._lock:
            await self._write("set.miner.service", "start", started)

    async def set_power_target(self, watts: float | None) -> None:
        """Set the power limit (None: the rated power). Skipped when already in force."""
        self._check_watts(watts)
        async with self._lock:
            await self.setting()
            want = self._target(watts)
            if self._limit_set == want:
                log.debug("whatsminer.power_limit_unchanged", device=self.device, watts=want)
                return

            async def applied() -> bool:
                return to_int((await self.setting()).get("power-limit")) == want

            await self._write("set.miner.power_limit", want, applied)
            self._limit_set = want
            log.info(
                "whatsminer.power_limit_set", device=self.device, requested_w=watts, watts=want
            )

    async def set_power_percent(self, percent: int | None) -> None:
        """Temporary power percentage; None (sent as 0, the firmware's "unset") clears it."""
        pct = self._percent(percent, none_means=0)

        async def applied() -> bool:
            return to_int((await self.setting()).get("power-percent")) == pct

        async with self._lock:
            await self._write("set.miner.power_percent", {"percent": pct}, applied)

    async def close(self) -> None:
        """Nothing to release: one connection per request."""


async def _none() -> None:
    return None


def _required(result: T | BaseException) -> T:
    if isinstance(result, BaseException):
        raise result
    return result


def _optional(result: T | BaseException) -> T | None:
    """A reply that enriches the reading: a refusal leaves it out, a dead rig still raises."""
    if isinstance(result, CommandRejected):
        return None
    if isinstance(result, BaseException):
        raise result
    return result


# -- discovery ------------------------------------------------------------------------------


async def _identify_v2(host: str, port: int, wait_s: float) -> RigIdentity | None:
    client = BTMinerV2Client(host, port, timeout=wait_s, retries=0, device=host)
    try:
        details = await client.cg.command("devdetails")
    except DeviceError:
        return None
    items = section(details, "DEVDETAILS")
    if not any(clean_text(i.get("Driver")).lower() == "bitmicro" for i in items):
        return None
    try:
        version: Json | None = await client.native("get_version")
    except DeviceError:
        version = None
    return parse_v2_identity(details, version)


async def _identify_v3(host: str, port: int, wait_s: float) -> RigIdentity | None:
    client = BTMinerV3Client(host, port, timeout=wait_s, retries=0, device=host)
    try:
        info = await client.get("get.device.info")
    except DeviceError:
        return None
    if not isinstance(v3_msg(info).get("miner"), Mapping):
        return None
    return parse_v3_identity(info)


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery interface passes a per-probe timeout
    v2_port: int = V2_PORT,
    v3_port: int = V3_PORT,
) -> RigIdentity | None:
    """A Whatsminer's identity, or None for anything else, within about `timeout` seconds.

    Probes API v3 (`get.device.info` on 4433) and API v2 (`devdetails` on 4028, whose
    `Driver` is "bitmicro" on btminer) concurrently and prefers v3. A host that refuses
    both ports answers None at once; use `driver_kind_for()` on the result.
    """
    try:
        async with asyncio.timeout(timeout * 2 + 0.5):  # v2 may need devdetails then get_version
            v3, v2 = await asyncio.gather(
                _identify_v3(host, v3_port, timeout), _identify_v2(host, v2_port, timeout)
            )
    except TimeoutError:
        return None
    return v3 or v2


def make_whatsminer_driver(
    kind: str,
    device: str,
    host: str,
    port: int | None = None,
    *,
    username: str = "",
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
    power_min_w: float | None = None,
    power_max_w: float | None = None,
) -> WhatsminerDriver | WhatsminerV3Driver:
    """`kind` "whatsminer" (API v2, port 4028) or "whatsminer-v3" (API v3, port 4433).

    `password` is the admin password (v2) or that of `username` (v3, default account
    "super"); empty means the firmware default, which only allows reads on real miners.
    """
    k = kind.strip().lower()
    if k == "whatsminer":
        return WhatsminerDriver(
            device,
            host,
            V2_PORT if port is None else port,
            password=password,
            timeout=timeout,
            retries=retries,
            power_min_w=power_min_w,
            power_max_w=power_max_w,
        )
    if k in ("whatsminer-v3", "whatsminer_v3"):
        return WhatsminerV3Driver(
            device,
            host,
            V3_PORT if port is None else port,
            username=username,
            password=password,
            timeout=timeout,
            retries=retries,
            power_min_w=power_min_w,
            power_max_w=power_max_w,
        )
    raise ValueError(f"unknown Whatsminer kind {kind!r}; known: whatsminer, whatsminer-v3")
