"""LuxOS (LUXminer): control over the CGMiner transport (sessions, curtail, profiles, ATM),
and the driver of kind "luxos", which reads like any CGMiner rig and adds that control.

Writes on LuxOS need a session, and the firmware allows only one at a time across all
clients (pool dashboards, Luxor's own tools, us); it ends a session after 60 s unused.

Two ways to hold it:
- "per-write": each control operation logs on, writes, and logs off at once, leaving the
  miner free for the next actor, at three connections per command.
- "hold" (the daemon's default): the poll keeps one session open between writes, renewed
  before it lapses, so a command is a single connection. That is what lets a grid order
  reach 10,000 rigs within seconds; the cost is that Luxor's own tools, which log on for
  each write, are refused ("Another session is active") while we hold it, so a rig in
  maintenance is let go. A held session that the firmware no longer accepts (expired,
  ended by someone else) is replaced by a fresh logon and the write tried again: a refused
  session id means the write did nothing.

If someone else holds the session we borrow it (as pyasic does) rather than fail a
curtailment that the electricity budget depends on, and we never log off a session we did
not create.

Power targets go through profiles, the mechanism every LuxOS model has: pick the highest
profile at or below the requested watts, switch ATM (which would otherwise override the
profile) off around `profileset`, restore it, and read back what the firmware reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import CGMinerClient, CGMinerDriver, CGMinerRejected, parse_telemetry
from drivers.errors import CommandRejected, DeviceAuthError, DeviceError, MalformedReply
from drivers.telemetry import RigTelemetry
from drivers.values import first, section, to_float

log = structlog.get_logger(__name__)

Json = dict[str, Any]

T = TypeVar("T")

ANOTHER_SESSION_CODE = 402
SESSION_TTL_S = 60.0  # the firmware ends a session after this long unused
# A held session is renewed at the first poll after it is this much short of lapsing
# less a poll interval: the poll's own timing varies by a few seconds.
RENEW_MARGIN_S = 5.0


def renew_after_s(poll_interval_s: float) -> float | None:
    """Age at which a poll renews a held session, or None if polls come too seldom to
    keep one alive (a session would lapse between two of them)."""
    age = SESSION_TTL_S - poll_interval_s - RENEW_MARGIN_S
    return age if age > 0 else None


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
    profiles = tuple(sorted(out, key=lambda p: p.watts))
    if len(_SHARED_PROFILES) < MAX_SHARED_PROFILES:  # bounded: replies come from devices
        return _SHARED_PROFILES.setdefault(profiles, profiles)
    return _SHARED_PROFILES.get(profiles, profiles)


# One copy of each distinct profile table, shared by every miner that reports it: a farm
# has a few models, and 10,000 private copies of eight profiles are 6 MB.
_SHARED_PROFILES: dict[tuple[LuxProfile, ...], tuple[LuxProfile, ...]] = {}
MAX_SHARED_PROFILES = 256


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

    def __init__(
        self, client: CGMinerClient, *, device: str = "", renew_after: float | None = None
    ) -> None:
        """`renew_after` (see `renew_after_s`): hold a session between writes, renewed by
        `keep_session` once this old (by the poll's clock); None logs off after each write."""
        self._client = client
        self.device = device or client.device
        self.profiles: tuple[LuxProfile, ...] = ()
        self._lock = asyncio.Lock()
        self.renew_after = renew_after
        self.hold = renew_after is not None  # False while a technician needs the miner
        self._held: str | None = None  # a session we created and keep between writes
        # When to renew it is reckoned from this poll time; see `_phase`.
        self._held_ts = -math.inf
        self._last_ts = -math.inf  # the latest poll's time
        self._arm_after = -math.inf  # someone else held the session: leave it until then

    @property
    def holding(self) -> bool:
        return self._held is not None

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

    async def _logoff(self, sid: str) -> None:
        try:
            await self._client.command("logoff", sid)
        except DeviceError as exc:  # it expires by itself within 60 s
            log.warning("luxos.logoff_failed", device=self.device, error=str(exc))

    async def _with_session(self, operation: str, body: Callable[[str], Awaitable[T]]) -> T:
        """Run `body(session id)`: on the held session if there is one, else after a logon.

        Call under `self._lock`."""
        if self._held is not None:
            try:
                result = await body(self._held)
            except DeviceAuthError as exc:  # lapsed or ended elsewhere: the write did nothing
                log.info("luxos.session_lapsed", device=self.device, error=str(exc))
                self._held = None
            else:
                return result
        sid, owned = await self._logon(operation)
        keep = owned and self.hold
        try:
            result = await body(sid)
        except BaseException:
            if owned:
                await self._logoff(sid)
            raise
        if keep:
            self._held, self._held_ts = sid, self._phase(self._last_ts)
        elif owned:
            await self._logoff(sid)
        return result

    async def keep_session(self, ts: float) -> None:
        """At a poll (`ts`: its time): hold a live session for the next write, or let it go.

        Holding means logging on before any command is due, and renewing (logoff, logon)
        before the firmware's 60 s idle timeout: two connections a minute per rig, so that
        a curtailment is one. Never raises for device errors: the reading matters more."""
        self._last_ts = ts
        if self._lock.locked():
            return  # a write is in progress, and uses (so refreshes) the session
        if not self.hold:
            if self._held is not None:
                await self._let_go()
                log.info("luxos.session_released", device=self.device)
            return
        assert self.renew_after is not None
        if self._held is not None and ts - self._held_ts < self.renew_after:
            return
        if self._held is None and ts < self._arm_after:
            return
        async with self._lock:
            renewing = self._held is not None
            if self._held is not None:
                sid, self._held = self._held, None
                with contextlib.suppress(DeviceError):  # already lapsed: log on all the same
                    await self._client.command("logoff", sid)
            try:
                reply = await self._client.command("logon")
            except CGMinerRejected as exc:
                if exc.code == ANOTHER_SESSION_CODE:  # not ours: a write will borrow it
                    self._arm_after = ts + SESSION_TTL_S
                else:
                    log.info("luxos.session_not_held", device=self.device, error=str(exc))
                return
            except DeviceError as exc:
                log.info("luxos.session_not_held", device=self.device, error=str(exc))
                return
            new = first(reply, "SESSION").get("SessionID")
            if isinstance(new, str) and new:
                self._held, self._held_ts = new, (ts if renewing else self._phase(ts))

    def adopt(self, old: LuxOSControl) -> None:
        """Take over `old`'s held session (the same miner's control before a reload)."""
        same = (old._client.host, old._client.port) == (self._client.host, self._client.port)
        if old._held is not None and self.hold and same:
            self._held, self._held_ts, self._last_ts = old._held, old._held_ts, old._last_ts
            old._held = None  # else `old` logs it off when closed

    def _phase(self, ts: float) -> float:
        """A new session's renewal clock, set back by a random part of a period: rigs
        armed together (the first poll, a farm-wide curtailment) then renew a few at each
        poll rather than all in one. Renewals keep the phase; a write's use of the session
        does not move it (renewing early is harmless, a burst of renewals is not)."""
        assert self.renew_after is not None
        return ts - random.random() * self.renew_after

    async def release(self) -> None:
        """Log off a held session (the driver closed: a stop, a reload, a rig removed)."""
        self.hold = False
        await self._let_go()

    async def _let_go(self) -> None:
        async with self._lock:
            sid, self._held = self._held, None
            if sid is not None:
                await self._logoff(sid)

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
        async def body(sid: str) -> Json:
            return await self._write(sid, "curtail", action)

        async with self._lock:
            reply = await self._with_session(f"curtail {action}", body)
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

            async def body(sid: str) -> Json:
                if atm_on:
                    await self._write(sid, "atmset", "enabled=false")
                try:
                    return await self._write(sid, "profileset", target.name)
                finally:
                    if atm_on:
                        try:
                            await self._write(sid, "atmset", "enabled=true")
                        except DeviceError as exc:
                            log.warning(
                                "luxos.atm_restore_failed", device=self.device, error=str(exc)
                            )

            reply = await self._with_session("set_power_target", body)
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


# -- the driver ---------------------------------------------------------------------------


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
