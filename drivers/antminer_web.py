"""Stock Antminer (bmminer) firmware: reads over 4028, sleep / wake / low power over its web UI.

Stock firmware denies every control command on its CGMiner API (Code 45), so the only
control surface is the CGI web UI on port 80 behind HTTP digest auth (lighttpd, realm
"antMiner Configuration", MD5, qop=auth, default root/root). The mode is one field of the
miner's config; the values are 0 normal, 1 sleep, 3 low power (2 "high" on a few models).

That UI is known to be awkward, and this module is written around its quirks rather than
hoping they do not happen:

- `get_miner_conf.cgi` reports the mode as the string `"bitmain-work-mode"`, but only a
  POST carrying the integer `"miner-mode"` changes it; a POST of `bitmain-work-mode` (or,
  on some builds, a string `miner-mode`) is answered `{"stats":"success","code":"M000"}`
  and silently ignored. So we post what the stock browser UI posts (the whole visible
  config with an integer `miner-mode`) and always read the config back: an "OK" that did
  not change the mode becomes a clear `CommandRejected`, not a false success.
- `set_miner_conf.cgi` answers only after the mining process has restarted, ~21 s on an
  S19j Pro, so a 5 s client timeout (pyasic's) reports a failure that did not happen.
  Writes get their own long timeout, and a write that times out is checked by reading the
  config back before it is called a failure: the executor retries timeouts, and a retry
  of a write that in fact landed would restart the mining process again for nothing.
- The config is the whole miner config (pools included) and the browser posts all of it,
  so we never post a config we could not read: a write that dropped the pools could stop
  the rig mining on the right account.
- Every mode change restarts bmminer, so nothing is written when the rig is already in the
  wanted mode.

Power targets: stock firmware has no watt target, only modes. `set_power_target` picks
the mode whose expected power is at or below the target: normal (the model's nameplate
power) or low power. The firmware publishes no per-mode power figure and low-power mode
exists only on some models and builds, so the low-power watts must come from the site's
configuration (measure it on the rig's metered PDU outlet); without it the driver does
not claim a power-target capability at all. Sleep and the power level are the same field,
so a power target set while the rig sleeps is remembered and applied by `wake` (one slow
write instead of waking the rig against the planner's will).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import DEFAULT_PORT, CGMinerClient, CGMinerDriver, parse_identity
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    DeviceTimeout,
    MalformedReply,
    UnsupportedOperation,
    snippet,
)
from drivers.telemetry import RigIdentity, RigState, RigTelemetry, revised
from drivers.webjson import DigestAuth, JsonHttpClient, parse_challenge

log = structlog.get_logger(__name__)

Json = dict[str, Any]

WEB_PORT: Final = 80
DEFAULT_USERNAME: Final = "root"
DEFAULT_PASSWORD: Final = "root"
REALM_PREFIX: Final = "antMiner"  # realm="antMiner Configuration"; pyasic identifies on this

# bitmain-work-mode / miner-mode values (pyasic MiningModeConfig.from_am_modern, asic-rs).
NORMAL: Final = 0
SLEEP: Final = 1
HIGH: Final = 2  # "HEM" on a few models (S19K Pro); never written by this driver
LOW_POWER: Final = 3
MODE_NAMES: Final = {NORMAL: "normal", SLEEP: "sleep", HIGH: "high", LOW_POWER: "low-power"}

# Reads are quick CGI scripts; set_miner_conf answers after bmminer restarts (~21 s seen,
# asic-rs now waits >= 30 s). Connecting is separate so a dead host fails fast.
READ_TIMEOUT_S: Final = 10.0
WRITE_TIMEOUT_S: Final = 45.0
CONNECT_TIMEOUT_S: Final = 3.0
VERIFY_ATTEMPTS: Final = 3
VERIFY_INTERVAL_S: Final = 2.0
MAX_BODY_BYTES: Final = 256 * 1024  # a config is ~1 KiB
CONF_REFRESH_S: Final = 300.0  # re-read the mode this often even while the rig hashes
WEB_RETRY_S: Final = 60.0  # after a failed web read, leave the web UI alone this long

# Manufacturer nameplate power in normal mode (Bitmain spec sheets: hashrate x J/TH).
NAMEPLATE_W: Final[Mapping[str, float]] = {
    "Antminer S19 Pro": 3250.0,
    "Antminer S19j Pro": 3068.0,
    "Antminer S19 XP": 3010.0,
    "Antminer S21": 3500.0,
}

# What the stock browser UI sends with a config write.
_POST_TYPE: Final = "text/plain;charset=UTF-8"
_POST_HEADERS: Final = {"X-Requested-With": "XMLHttpRequest"}
_REALM_RE: Final = re.compile(r'realm\s*=\s*"([^"]*)"', re.IGNORECASE)


def mode_name(mode: int | None) -> str:
    if mode is None:
        return "unknown"
    return MODE_NAMES.get(mode, f"mode {mode}")


# -- reply parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """What `get_system_info.cgi` tells: the model is the part the driver needs."""

    model: str
    serial: str = ""
    mac: str = ""
    hostname: str = ""
    firmware_version: str = ""  # "FR-1.12(251009-S21)" on newer builds, a date on older

    def identity(self) -> RigIdentity:
        return RigIdentity(
            make="Antminer" if self.model.lower().startswith("antminer") else "",
            model=self.model,
            firmware="bmminer",
            firmware_version=self.firmware_version,
        )


def parse_system_info(reply: Mapping[str, Any], *, device: str = "") -> SystemInfo:
    """`get_system_info.cgi` -> `SystemInfo`; older firmware may omit the serial."""
    model = reply.get("minertype")
    if not isinstance(model, str) or not model.strip():
        raise MalformedReply(
            "get_system_info.cgi has no minertype", device=device, operation="get_system_info"
        )

    def text(key: str) -> str:
        value = reply.get(key)
        return value.strip() if isinstance(value, str) else ""

    return SystemInfo(
        model=model.strip(),
        serial=text("serinum"),
        mac=text("macaddr"),
        hostname=text("hostname"),
        firmware_version=text("system_filesystem_version"),
    )


def parse_work_mode(conf: Mapping[str, Any], *, device: str = "") -> int | None:
    """The mode in `get_miner_conf.cgi`, or None when this firmware has no work modes.

    The firmware sends a digit string; an empty string is what pyasic reads as normal, and
    we agree (the UI shows "Normal" for it). Anything else is a reply we do not understand.
    """
    if "bitmain-work-mode" not in conf:
        return None  # S9/S17-era configs: no modes, so no sleep through the web UI
    value = conf["bitmain-work-mode"]
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped == "":
            return NORMAL
        if re.fullmatch(r"[0-9]{1,9}", stripped):  # not isdigit(): "²" is a digit to it
            return int(stripped)
    raise MalformedReply(
        f"bitmain-work-mode is {value!r}, not a mode number",
        device=device,
        operation="get_miner_conf",
    )


def _pools(conf: Mapping[str, Any], *, device: str, operation: str) -> list[Json]:
    pools = conf.get("pools")
    bad = MalformedReply(
        "get_miner_conf.cgi has no usable pools list; refusing to post a config that would"
        " rewrite the rig's pools",
        device=device,
        operation=operation,
    )
    if not isinstance(pools, list) or not pools:
        raise bad
    out: list[Json] = []
    for pool in pools:
        if not isinstance(pool, Mapping):
            raise bad
        entry: Json = {}
        for key in ("url", "user", "pass"):
            value = pool.get(key, "")
            if not isinstance(value, str):
                raise bad
            entry[key] = value
        out.append(entry)
    return out


def conf_write_body(
    conf: Mapping[str, Any], mode: int, *, device: str = "", operation: str = ""
) -> Json:
    """The body the stock browser UI posts to change the mode, built from the config read.

    Fan settings and pools are copied from what the miner reported so the write changes
    nothing but the mode; `freq-level` defaults to "100" (what the UI sends) because newer
    Release builds do not report `bitmain-freq-level` at all.
    """
    fan_ctrl = conf.get("bitmain-fan-ctrl", False)
    fan_pwm = conf.get("bitmain-fan-pwm", "100")
    freq_level = conf.get("bitmain-freq-level")
    return {
        "bitmain-fan-ctrl": fan_ctrl if isinstance(fan_ctrl, bool) else False,
        "bitmain-fan-pwm": str(fan_pwm) if isinstance(fan_pwm, str | int) else "100",
        "miner-mode": int(mode),  # an int: some builds ignore the string form (pyasic #49)
        "freq-level": str(freq_level) if isinstance(freq_level, str | int) else "100",
        "pools": _pools(conf, device=device, operation=operation),
    }


def check_set_reply(reply: Mapping[str, Any], *, device: str = "", operation: str = "") -> None:
    """`{"stats":"success","code":"M000","msg":"OK!"}` or a typed error.

    Success here only means the CGI ran; whether the mode changed is checked separately.
    """
    stats = reply.get("stats")
    if not isinstance(stats, str):
        raise MalformedReply(
            f"set_miner_conf.cgi reply has no stats: {snippet(json.dumps(reply))}",
            device=device,
            operation=operation,
        )
    if stats.strip().lower() != "success":
        raise CommandRejected(
            f"set_miner_conf.cgi refused the config (stats={stats!r},"
            f" code={reply.get('code')!r}, msg={reply.get('msg')!r})",
            device=device,
            operation=operation,
        )


# -- the web client ---------------------------------------------------------------------


class AntminerWebControl:
    """The stock web UI of one miner: JSON CGI calls under digest auth, with typed errors.

    The HTTP client is the web-API drivers' one (`drivers.webjson`): its `DigestAuth`
    keeps this miner's nonce and counts, so a read is one request once the first challenge
    is answered; a kept-alive connection the miner closed (a power cycle, lighttpd's idle
    timeout) is replaced before use or, for a read, resent once, and a config write always
    goes on a fresh connection. Mode changes on one miner are serialised, because each one
    restarts bmminer and two at once would race.
    """

    def __init__(
        self,
        host: str,
        port: int = WEB_PORT,
        *,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        device: str = "",
        read_timeout: float = READ_TIMEOUT_S,
        write_timeout: float = WRITE_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        verify_attempts: int = VERIFY_ATTEMPTS,
        verify_interval_s: float = VERIFY_INTERVAL_S,
    ) -> None:
        for name, value in (
            ("read_timeout", read_timeout),
            ("write_timeout", write_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if verify_attempts < 1:
            raise ValueError(f"verify_attempts must be >= 1, got {verify_attempts}")
        if ":" in username:
            raise ValueError("a digest username cannot contain ':'")
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.device = device or f"{host}:{port}"
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.connect_timeout = connect_timeout
        self.verify_attempts = verify_attempts
        self.verify_interval_s = verify_interval_s
        self.lock = asyncio.Lock()
        self.auth = DigestAuth(username, password)
        self.http = JsonHttpClient(
            host,
            port,
            timeout=read_timeout,
            retries=0,
            device=self.device,
            max_body_bytes=MAX_BODY_BYTES,
            connect_timeout=connect_timeout,
            auth=self.auth,
        )

    async def close(self) -> None:
        await self.http.close()

    # -- transport -------------------------------------------------------------

    async def request(
        self,
        method: str,
        cgi: str,
        *,
        body: Json | None = None,
        wait_s: float | None = None,
        operation: str = "",
    ) -> Json:
        """One CGI call -> its JSON object; every failure is a typed `DeviceError`."""
        timeout = self.read_timeout if wait_s is None else wait_s
        operation = operation or cgi.removesuffix(".cgi")
        where = {"device": self.device, "operation": operation}
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            reply = await self.http.exchange(
                method,
                f"/cgi-bin/{cgi}",
                data=data,
                content_type=_POST_TYPE,
                headers=_POST_HEADERS if data is not None else None,
                operation=operation,
                wait_s=timeout,
            )
        except DeviceTimeout as exc:
            raise DeviceTimeout(f"{cgi} gave no answer within {timeout:g}s", **where) from exc
        status, challenge, raw = reply.status, reply.header("www-authenticate"), reply.body
        return self._decode(cgi, status, challenge, raw, where)

    def _decode(
        self, cgi: str, status: int, challenge: str, raw: bytes, where: Mapping[str, str]
    ) -> Json:
        if status == 401:
            realm = _REALM_RE.search(challenge)
            realm_note = f' for realm "{realm.group(1)}"' if realm else ""
            raise DeviceAuthError(
                f"the web UI rejected user {self.username!r}{realm_note} (HTTP 401): wrong"
                " username or password for this rig; fix its credentials in the config"
                " (stock default is root/root); retrying will not help",
                **where,
            )
        if status == 404:
            raise UnsupportedOperation(f"this firmware's web UI has no {cgi}", **where)
        if status != 200:
            raise CommandRejected(f"{cgi} answered HTTP {status}: {snippet(raw)}", **where)
        if len(raw) > MAX_BODY_BYTES:
            raise MalformedReply(f"{cgi} reply exceeds {MAX_BODY_BYTES} bytes", **where)
        try:
            obj = json.loads(raw.decode("utf-8"), strict=False)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MalformedReply(f"{cgi} reply is not JSON: {snippet(raw)}", **where) from exc
        if not isinstance(obj, dict):
            raise MalformedReply(
                f"{cgi} reply is JSON {type(obj).__name__}, not an object", **where
            )
        return obj

    # -- CGI calls -------------------------------------------------------------

    async def get_miner_conf(self, *, operation: str = "get_miner_conf") -> Json:
        return await self.request("GET", "get_miner_conf.cgi", operation=operation)

    async def get_system_info(self) -> SystemInfo:
        reply = await self.request("GET", "get_system_info.cgi")
        return parse_system_info(reply, device=self.device)

    async def read_mode(self, *, wait_s: float | None = None) -> int | None:
        conf = await self.request("GET", "get_miner_conf.cgi", wait_s=wait_s)
        return parse_work_mode(conf, device=self.device)

    async def write_mode(self, mode: int, conf: Mapping[str, Any], *, operation: str) -> None:
        """Post `mode` (keeping the rest of `conf`) and confirm it by reading the config back.

        Call with `lock` held. Raises `CommandRejected` when the firmware said OK but the
        mode did not change, `DeviceTimeout` when it did not answer and has not changed.
        """
        where = {"device": self.device, "operation": operation}
        body = conf_write_body(conf, mode, device=self.device, operation=operation)
        log.info(
            "antminer.mode_write",
            device=self.device,
            mode=mode_name(mode),
            timeout_s=self.write_timeout,
        )
        try:
            reply = await self.request(
                "POST",
                "set_miner_conf.cgi",
                body=body,
                wait_s=self.write_timeout,
                operation=operation,
            )
        except DeviceTimeout as exc:
            # The firmware answers after restarting bmminer and may apply the config
            # after we stopped waiting: look before calling it a failure.
            try:
                await self._verify(mode, operation)
            except CommandRejected:
                raise DeviceTimeout(
                    f"set_miner_conf.cgi gave no answer within {self.write_timeout:g}s and the"
                    f" miner still does not report {mode_name(mode)} mode",
                    **where,
                ) from exc
            except DeviceError:
                raise exc  # noqa: B904 - the write's own timeout is the error to report
            log.warning(
                "antminer.mode_write_late",
                device=self.device,
                mode=mode_name(mode),
                note="no answer in time, but the read-back shows the mode applied",
            )
            return
        check_set_reply(reply, device=self.device, operation=operation)
        await self._verify(mode, operation)

    async def _verify(self, mode: int, operation: str) -> None:
        got: int | None = None
        for attempt in range(self.verify_attempts):
            if attempt:
                await asyncio.sleep(self.verify_interval_s)
            got = parse_work_mode(
                await self.get_miner_conf(operation=operation), device=self.device
            )
            if got == mode:
                return
        waited = self.verify_interval_s * (self.verify_attempts - 1)
        raise CommandRejected(
            f"the miner answered OK to {mode_name(mode)} mode but its config still reads"
            f" {mode_name(got)} after {self.verify_attempts} checks over {waited:g}s: the"
            " firmware ignored the write (a known stock-firmware quirk; some builds need a"
            " reboot); switch the rig's PDU outlet instead",
            device=self.device,
            operation=operation,
        )


# -- the driver -------------------------------------------------------------------------


class AntminerDriver(CGMinerDriver):
    """Stock Antminer: telemetry over the 4028 API, sleep / wake / low power over the web UI.

    Reads stay one 4028 request per poll. The web config is read on the first poll, after
    a reboot, every `conf_refresh_s`, and when the 4028 data and the last known mode
    disagree (no hashrate: asleep or booting? hashing while "asleep"), so a farm of stock
    rigs does not hammer their slow CGI.
    A web UI that fails (wrong password included) never fails the read: the rig is still
    monitored, the error is logged once and kept in `web_error`, and control will raise it.

    `normal_w` defaults to the model's nameplate once the first read names the model;
    `low_power_w` is only what the site configures (see the module docstring).
    """

    def __init__(
        self,
        device: str,
        client: CGMinerClient,
        web: AntminerWebControl,
        *,
        normal_w: float | None = None,
        low_power_w: float | None = None,
        conf_refresh_s: float = CONF_REFRESH_S,
        web_retry_s: float = WEB_RETRY_S,
        poll_web_timeout: float | None = None,
    ) -> None:
        super().__init__(device, client)
        for name, value in (("normal_w", normal_w), ("low_power_w", low_power_w)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of watts, got {value}")
        if normal_w is not None and low_power_w is not None and low_power_w >= normal_w:
            raise ValueError(
                f"low_power_w ({low_power_w:g} W) must be below normal_w ({normal_w:g} W)"
            )
        self.web = web
        self._configured_normal_w = normal_w
        self.normal_w = normal_w
        self.low_power_w = low_power_w
        self.conf_refresh_s = conf_refresh_s
        self.web_retry_s = web_retry_s
        self.poll_web_timeout = poll_web_timeout or min(web.read_timeout, client.timeout)
        self.mode: int | None = None  # last mode the web UI reported (or we verified)
        self.web_error: DeviceError | None = None
        self._mode_ts: float | None = None
        self._web_retry_ts: float | None = None
        self._awake_mode = NORMAL  # what wake restores: the mode in force before sleep
        self._update_capabilities()

    # -- capabilities ----------------------------------------------------------

    def _update_capabilities(self, model: str = "") -> None:
        if self._configured_normal_w is None and model in NAMEPLATE_W:
            self.normal_w = NAMEPLATE_W[model]
        lpm = self.low_power_w
        if self.normal_w is not None and lpm is not None and lpm >= self.normal_w:
            log.warning(
                "antminer.low_power_not_below_normal",
                device=self.device,
                low_power_w=lpm,
                normal_w=self.normal_w,
            )
            lpm = None
        self.capabilities = MinerCapabilities(
            can_sleep=True,
            can_power_target=lpm is not None,
            power_target_min_w=lpm,
            power_target_max_w=self.normal_w if lpm is not None else None,
            needs_pdu_to_power_off=True,  # sleep leaves the control board and fans drawing
        )

    def expected_w(self, mode: int | None) -> float | None:
        if mode == NORMAL:
            return self.normal_w
        if mode == LOW_POWER:
            return self.low_power_w
        return None

    def mode_for_target(self, watts: float | None) -> int:
        """The mode whose expected power is at or below `watts` (None: normal).

        Raises ValueError below the low-power figure (the planner's range says so) and
        `UnsupportedOperation` when only normal is known and the target is below it.
        """
        if watts is None:
            return NORMAL
        if not (math.isfinite(watts) and watts > 0):
            raise ValueError(f"power target must be a positive number of watts, got {watts}")
        if self.normal_w is not None and watts >= self.normal_w:
            return NORMAL
        if self.low_power_w is None:
            raise UnsupportedOperation(
                f"no power level at or below {watts:.0f} W: stock firmware has only modes, and"
                " no low-power figure is configured for this rig (set low_power_w if its"
                " model has a low-power mode); sleep it or switch its PDU outlet",
                device=self.device,
                operation="set_power_target",
            )
        if watts < self.low_power_w:
            top = f"-{self.normal_w:.0f}" if self.normal_w is not None else "+"
            raise ValueError(
                f"power target {watts:.0f} W outside {self.low_power_w:.0f}{top} W"
                " (this rig's low-power and normal modes)"
            )
        return LOW_POWER

    # -- reads -----------------------------------------------------------------

    async def read(self, ts: float) -> RigTelemetry:
        tel = await super().read(ts)
        rebooted = self._identity is None  # the parent drops it when uptime went backwards
        self._update_capabilities(tel.identity.model)
        hashing = tel.hashrate_ths is not None and tel.hashrate_ths > 0
        stale = rebooted or self._mode_ts is None or ts - self._mode_ts >= self.conf_refresh_s
        # Ambiguous: no hashrate and not known asleep (booting? slept by someone else?), or
        # hashing although the config said sleep (woken elsewhere, or the sleep not taken).
        ambiguous = hashing == (self.mode == SLEEP)
        may_retry = self._web_retry_ts is None or ts >= self._web_retry_ts
        if (stale or ambiguous) and may_retry:
            await self._refresh_mode(ts)
        return self._annotate(tel, hashing)

    async def _refresh_mode(self, ts: float) -> None:
        try:
            self.mode = await self.web.read_mode(wait_s=self.poll_web_timeout)
        except DeviceError as exc:
            if self.web_error is None or type(exc) is not type(self.web_error):
                log.warning("antminer.web_read_failed", device=self.device, error=str(exc))
            # Kept without its traceback: the frames (and their locals) would hold ~35 KB
            # per failing rig for as long as the web UI stays down.
            exc.__cause__ = exc.__context__ = None
            self.web_error = exc.with_traceback(None)
            self._web_retry_ts = ts + self.web_retry_s
            return
        if self.web_error is not None:
            log.info("antminer.web_read_recovered", device=self.device)
        self.web_error = None
        self._web_retry_ts = None
        self._mode_ts = ts
        if self.mode in (NORMAL, LOW_POWER, HIGH):
            self._awake_mode = self.mode

    def _annotate(self, tel: RigTelemetry, hashing: bool) -> RigTelemetry:
        """The mode says what the 4028 data cannot: asleep (vs booting), and the power level."""
        if self.mode == SLEEP:
            # Asleep per its config; if it still hashes the sleep did not take (a known
            # quirk), and the reading says so rather than trusting the config.
            return tel if hashing else revised(tel, state=RigState.SLEEPING, power_limit_w=None)
        if tel.power_limit_w is None and self.expected_w(self.mode) is not None:
            return revised(tel, power_limit_w=self.expected_w(self.mode))
        return tel

    # -- control ---------------------------------------------------------------

    async def _current(self, operation: str) -> tuple[Json, int]:
        conf = await self.web.get_miner_conf(operation=operation)
        mode = parse_work_mode(conf, device=self.device)
        if mode is None:
            raise UnsupportedOperation(
                "this firmware's config has no work mode (bitmain-work-mode), so it cannot"
                " sleep through its web UI; switch the rig's PDU outlet",
                device=self.device,
                operation=operation,
            )
        return conf, mode

    async def _switch(self, mode: int, conf: Json, operation: str) -> None:
        await self.web.write_mode(mode, conf, operation=operation)
        self.mode = mode

    async def sleep(self) -> None:
        """Mode 1: hashboards stop, the control board, fans and web UI stay up."""
        async with self.web.lock:
            conf, current = await self._current("sleep")
            if current == SLEEP:
                self.mode = SLEEP
                return
            self._awake_mode = current if current in (NORMAL, LOW_POWER, HIGH) else NORMAL
            await self._switch(SLEEP, conf, "sleep")

    async def wake(self) -> None:
        """Back to the mode in force before sleep (or the one a power target chose)."""
        async with self.web.lock:
            conf, current = await self._current("wake")
            if current != SLEEP:
                self.mode = current
                return
            await self._switch(self._awake_mode, conf, "wake")

    async def set_power_target(self, watts: float | None) -> None:
        """Normal or low-power mode, whichever is the highest at or below `watts`.

        While the rig sleeps this only records the mode for `wake`: writing it now would
        wake the rig, because sleep and power level are one config field.
        """
        mode = self.mode_for_target(watts)  # raises before any request
        async with self.web.lock:
            conf, current = await self._current("set_power_target")
            if current == SLEEP:
                self._awake_mode = mode
                self.mode = SLEEP
                log.info(
                    "antminer.power_level_deferred",
                    device=self.device,
                    mode=mode_name(mode),
                    requested_w=watts,
                )
                return
            if current != mode:
                await self._switch(mode, conf, "set_power_target")
            self._awake_mode = mode
            self.mode = mode
            log.info(
                "antminer.power_level_set",
                device=self.device,
                mode=mode_name(mode),
                requested_w=watts,
                expected_w=self.expected_w(mode),
            )

    async def close(self) -> None:
        await self.web.close()


def make_antminer_driver(
    device: str,
    host: str,
    port: int = DEFAULT_PORT,
    *,
    username: str = "",
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
    web_port: int = WEB_PORT,
    normal_w: float | None = None,
    low_power_w: float | None = None,
    write_timeout: float = WRITE_TIMEOUT_S,
) -> AntminerDriver:
    """A stock-Antminer driver configured like every other kind.

    `port`/`timeout`/`retries` are the 4028 API's; empty credentials mean the firmware's
    defaults (root/root). The web read timeout is at least 5 s: the CGI is slower than 4028.
    """
    client = CGMinerClient(host, port, timeout=timeout, retries=retries, device=device)
    web = AntminerWebControl(
        host,
        web_port,
        username=username or DEFAULT_USERNAME,
        password=password or DEFAULT_PASSWORD,
        device=device,
        read_timeout=max(timeout, 5.0),
        write_timeout=write_timeout,
        connect_timeout=min(timeout, CONNECT_TIMEOUT_S),
    )
    return AntminerDriver(device, client, web, normal_w=normal_w, low_power_w=low_power_w)


# -- discovery --------------------------------------------------------------------------


async def _realm(host: str, port: int, wait_s: float) -> str | None:
    """The digest realm an unauthenticated GET / is challenged with, if any."""
    client = JsonHttpClient(host, port, timeout=wait_s, retries=0, device=host)
    try:
        reply = await client.exchange("GET", "/", operation="identify")
    except DeviceError:
        return None
    finally:
        await client.close()
    if reply.status != 401:
        return None
    scheme, params = parse_challenge(reply.header("www-authenticate"))
    if scheme != "digest" or "realm" not in params:
        return None
    return params["realm"]


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery contract names it so
    port: int = WEB_PORT,
    rpc_port: int = DEFAULT_PORT,
) -> RigIdentity | None:
    """A stock Antminer at `host`, or None (in about `timeout` at most, at once if refused).

    Stock firmware is recognised as pyasic does it: an unauthenticated GET / challenged
    with digest realm "antMiner...". The model then comes from the 4028 `version`, which
    needs no credentials; a 4028 API naming another firmware (LuxOS, BOSminer) means a
    different firmware behind an Antminer-like UI, which is not ours. When 4028 says
    nothing, the web UI's `get_system_info.cgi` is asked with the default root/root.
    """
    realm = await _realm(host, port, timeout)
    if realm is None or not realm.startswith(REALM_PREFIX):
        return None
    version: Json | None = None
    with contextlib.suppress(DeviceError):
        client = CGMinerClient(host, rpc_port, timeout=timeout, retries=0, device=host)
        version = await client.command("version")
    if version is not None:
        ident = parse_identity(version)
        if ident.firmware not in ("bmminer", "cgminer", ""):
            return None
        if ident.model:
            return replace(ident, make=ident.make or "Antminer", firmware="bmminer")
    web = AntminerWebControl(
        host, port, device=host, read_timeout=timeout, connect_timeout=min(timeout, 3.0)
    )
    try:
        return (await web.get_system_info()).identity()
    except DeviceError:
        return RigIdentity(make="Antminer", firmware="bmminer")
    finally:
        await web.close()
