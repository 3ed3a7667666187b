"""LuxOS (LUXminer) control over the CGMiner transport: sessions, curtail, profiles, ATM.

Writes on LuxOS need a session, and the firmware allows only one at a time across all
clients (pool dashboards, Luxor's own tools, us). So each control operation logs on, does
its writes, and logs off straight away, leaving the miner free for the next actor. If
someone else holds the session we borrow it (as pyasic does) rather than fail a
curtailment that the electricity budget depends on, and we never log off a session we did
not create.

Power targets go through profiles, the mechanism every LuxOS model has: pick the highest
profile at or below the requested watts, switch ATM (which would otherwise override the
profile) off around `profileset`, restore it, and read back what the firmware reports.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from drivers.cgminer import CGMinerClient, CGMinerRejected, first, section, to_float
from drivers.errors import CommandRejected, DeviceAuthError, DeviceError, MalformedReply

log = structlog.get_logger(__name__)

Json = dict[str, Any]

ANOTHER_SESSION_CODE = 402


@dataclass(frozen=True, slots=True)
class LuxProfile:
    name: str
    watts: float
    hashrate_ths: float | None = None
    step: str = ""


def parse_profiles(reply: Mapping[str, Any], *, device: str = "") -> tuple[LuxProfile, ...]:
    """`profiles` reply -> profiles ordered by power, skipping entries without usable watts."""
    out = []
    for item in section(reply, "PROFILES"):
        name = item.get("Profile Name")
        watts = to_float(item.get("Watts"))
        if not isinstance(name, str) or not name or watts is None or watts <= 0:
            continue
        out.append(
            LuxProfile(name, watts, to_float(item.get("Hashrate")), str(item.get("Step", "")))
        )
    if not out:
        raise MalformedReply(
            "profiles reply lists no usable profile", device=device, operation="profiles"
        )
    return tuple(sorted(out, key=lambda p: p.watts))


def default_profile(profiles: Sequence[LuxProfile]) -> LuxProfile:
    """The firmware's stock profile: named "default", else step 0, else the highest."""
    for p in profiles:
        if p.name.lower() == "default":
            return p
    for p in profiles:
        if p.step in ("0", "+0"):
            return p
    return profiles[-1]


def choose_profile(profiles: Sequence[LuxProfile], watts: float | None) -> LuxProfile:
    """Highest profile drawing at most `watts` (so the budget is never exceeded)."""
    if watts is None:
        return default_profile(profiles)
    fitting = [p for p in profiles if p.watts <= watts]
    if not fitting:
        raise ValueError(f"no profile at or below {watts:.0f} W")
    return fitting[-1]


class LuxOSControl:
    """Session-wrapped LuxOS writes for one miner.

    Operations on one miner are serialised by a lock: our own concurrent writes would
    otherwise fight over the single firmware session.
    """

    def __init__(self, client: CGMinerClient, *, device: str = "") -> None:
        self._client = client
        self.device = device or client.device
        self.profiles: tuple[LuxProfile, ...] = ()
        self._lock = asyncio.Lock()

    def power_range(self) -> tuple[float, float] | None:
        if not self.profiles:
            return None
        return self.profiles[0].watts, self.profiles[-1].watts

    async def load_profiles(self) -> tuple[LuxProfile, ...]:
        self.profiles = parse_profiles(await self._client.command("profiles"), device=self.device)
        return self.profiles

    # -- sessions --------------------------------------------------------------

    async def _logon(self, operation: str) -> tuple[str, bool]:
        """(session id, whether we created it)."""
        try:
            reply = await self._client.command("logon")
        except CGMinerRejected as exc:
            if exc.code != ANOTHER_SESSION_CODE:
                raise
            current = await self._client.command("session")
            sid = first(current, "SESSION").get("SessionID")
            if isinstance(sid, str) and sid:
                log.info("luxos.session_borrowed", device=self.device, operation=operation)
                return sid, False
            raise CommandRejected(
                "another client holds the miner's only session and its id is not visible;"
                " retry after it logs off or expires (60 s idle)",
                device=self.device,
                operation=operation,
            ) from exc
        sid = first(reply, "SESSION").get("SessionID")
        if not isinstance(sid, str) or not sid:
            raise MalformedReply(
                "logon reply has no SessionID", device=self.device, operation=operation
            )
        return sid, True

    @asynccontextmanager
    async def session(self, operation: str) -> AsyncIterator[str]:
        sid, owned = await self._logon(operation)
        try:
            yield sid
        finally:
            if owned:
                try:
                    await self._client.command("logoff", sid)
                except DeviceError as exc:  # it expires by itself within 60 s
                    log.warning("luxos.logoff_failed", device=self.device, error=str(exc))

    async def _write(self, sid: str, cmd: str, *args: str) -> Json:
        try:
            return await self._client.command(cmd, ",".join((sid, *args)))
        except CGMinerRejected as exc:
            if "session" in exc.reply_msg.lower():
                raise DeviceAuthError(
                    f"session refused by the firmware: {exc.reply_msg}",
                    device=self.device,
                    operation=cmd,
                ) from exc
            raise

    # -- operations ------------------------------------------------------------

    async def _curtail(self, action: str, expect: str) -> None:
        async with self._lock, self.session(f"curtail {action}") as sid:
            reply = await self._write(sid, "curtail", action)
        got = str(first(reply, "CURTAIL").get("Action", ""))
        if expect not in got.lower():
            raise MalformedReply(
                f"curtail {action} answered Action={got!r}",
                device=self.device,
                operation=f"curtail {action}",
            )

    async def sleep(self) -> None:
        """Hashboards and PSU off; only `wake` (or a power cycle) brings the rig back."""
        await self._curtail("sleep", "sleep")

    async def wake(self) -> None:
        await self._curtail("wakeup", "wake")

    async def set_power_target(self, watts: float | None) -> LuxProfile:
        """Apply the highest profile at or below `watts` (None: the default profile).

        Raises ValueError, before any write, if `watts` is outside the profiles' range.
        """
        if watts is not None and (not math.isfinite(watts) or watts <= 0):
            raise ValueError(f"power target must be a positive number of watts, got {watts}")
        async with self._lock:
            if not self.profiles:
                await self.load_profiles()
            lo, hi = self.profiles[0].watts, self.profiles[-1].watts
            if watts is not None and not (lo <= watts <= hi):
                raise ValueError(
                    f"power target {watts:.0f} W outside {lo:.0f}-{hi:.0f} W (the miner's profiles)"
                )
            target = choose_profile(self.profiles, watts)
            atm_on = first(await self._client.command("atm"), "ATM").get("Enabled") is True
            async with self.session("set_power_target") as sid:
                if atm_on:
                    await self._write(sid, "atmset", "enabled=false")
                try:
                    reply = await self._write(sid, "profileset", target.name)
                finally:
                    if atm_on:
                        try:
                            await self._write(sid, "atmset", "enabled=true")
                        except DeviceError as exc:
                            log.warning(
                                "luxos.atm_restore_failed", device=self.device, error=str(exc)
                            )
            applied = first(reply, "PROFILE").get("Profile")
            config = first(await self._client.command("config"), "CONFIG")
            for got in (applied, config.get("Profile")):
                if got is not None and got != target.name:
                    raise CommandRejected(
                        f"asked for profile {target.name!r} but the miner reports {got!r}",
                        device=self.device,
                        operation="set_power_target",
                    )
            log.info(
                "luxos.power_target_set",
                device=self.device,
                requested_w=watts,
                profile=target.name,
                profile_w=target.watts,
            )
            return target
