"""VNish (AnthillOS) on Antminers: reads, stop / start and power presets over its web API,
with its CGMiner-compatible 4028 API as the fallback for reads.

What it reads and controls, and through which API (the vendor's OpenAPI document
"xminer-api", VNish 1.3.4, under `/api/v1` on port 80):

- Reads: `GET /summary` every poll (no login needed): hashrate (GH/s), `power_consumption`
  (W; the deprecated `power_usage` is, per the document, the efficiency, so it is not read),
  per-board hashrate and temperatures, fans, the state (`miner_status.miner_state`) and the
  model and version (`miner_type`, "Antminer S19 XP (Vnish 1.3.4)"); it has no uptime.
  `GET /perf-summary` (the preset in force) and `GET /autotune/presets` (needs a login;
  the power range) on the first poll and every few minutes.
  When the web API does not answer, the poll reads `summary` and `stats` on 4028 instead
  (hashrate, boards, fans; no power and no stopped/booting distinction there).
- Sleep / wake: `POST /mining/stop` and `/mining/start`. The control board, fans and web
  API stay up while stopped: only the PDU takes the rig to zero.
- Power target: VNish runs presets ("3010 watt ~ 141 TH"), and only tuned ones apply. A
  target picks the highest tuned preset whose power is at or below it; `POST /settings`
  with `miner.overclock.preset`. The firmware answers `{"restart_required": false, ...}`
  even when it ignores the preset, so the setting is read back (`GET /settings`) and an
  ignored one is a `CommandRejected`. `None` restores the preset in force when the driver
  first saw the rig.
- Login: `POST /unlock {"pw"}` (factory password "admin") gives a token, sent as
  `Authorization: Bearer <token>`; a 401 logs in again once, a 403 is a wrong password
  (`DeviceAuthError`), a 429 (too many attempts) is a `CommandRejected`.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Final

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import DEFAULT_PORT, MAX_FANS, CGMinerClient, parse_telemetry
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    MalformedReply,
    UnsupportedOperation,
    snippet,
)
from drivers.probes import shared_command
from drivers.reboots import RebootWatch
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from drivers.values import (
    MAX_RIG_HASHRATE_THS,
    MAX_RIG_POWER_W,
    first,
    mapping,
    measure,
    positive,
    to_float,
    to_int,
)
from drivers.webjson import JsonHttpClient

log = structlog.get_logger(__name__)

WEB_PORT: Final = 80
DEFAULT_PASSWORD: Final = "admin"
FIRMWARE: Final = "VNish"
API: Final = "/api/v1"
PRESET_REFRESH_S: Final = 300.0
MINING_STATES: Final = frozenset({"mining", "auto-tuning"})
SLEEP_STATES: Final = frozenset({"stopped", "shutting-down"})
_TYPE: Final = re.compile(r"^(.*?)\s*\(\s*vnish\s+([^)]*)\)\s*$", re.IGNORECASE)
_PRETTY: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*watt", re.IGNORECASE)


def parse_miner_type(value: Any) -> tuple[str, str]:
    """ "Antminer S19 XP (Vnish 1.3.4)" -> ("Antminer S19 XP", "1.3.4")."""
    text = str(value or "").strip()
    m = _TYPE.match(text)
    return (m.group(1).strip(), m.group(2).strip()) if m else (text, "")


def vnish_identity(miner_type: Any) -> RigIdentity:
    model, version = parse_miner_type(miner_type)
    make = "Antminer" if model.lower().startswith("antminer") else (model.split() or [""])[0]
    return RigIdentity(make=make, model=model, firmware=FIRMWARE, firmware_version=version)


def preset_watts(preset: Any) -> float | None:
    """A preset's power: its `pretty` "3010 watt ~ 141 TH", else its name ("3010")."""
    item = mapping(preset)
    m = _PRETTY.match(str(item.get("pretty") or ""))
    watts = to_float(m.group(1)) if m else to_float(item.get("name"))
    return measure(positive(watts), MAX_RIG_POWER_W)


def tuned_presets(presets: Any) -> list[tuple[float, str]]:
    """(watts, name) of the tuned presets, lowest power first."""
    out = []
    for p in presets if isinstance(presets, list) else []:
        item = mapping(p)
        watts = preset_watts(item)
        name = item.get("name")
        if item.get("status") == "tuned" and watts is not None and isinstance(name, str):
            out.append((watts, name))
    return sorted(out)


def parse_vnish_summary(
    ts: float, summary: Any, *, power_limit_w: float | None = None, device: str = ""
) -> RigTelemetry:
    """`GET /summary` -> one reading."""
    miner = mapping(mapping(summary).get("miner"))
    if not miner:
        raise MalformedReply(
            f"summary has no miner: {snippet(repr(summary))}", device=device, operation="read"
        )
    ghs = to_float(miner.get("hr_realtime"))
    hashrate = None if ghs is None else measure(ghs / 1000.0, MAX_RIG_HASHRATE_THS)
    boards = []
    chains = miner.get("chains")
    for n, chain in enumerate(chains if isinstance(chains, list) else []):
        item = mapping(chain)
        rate = to_float(item.get("hashrate_rt"))
        ths = None if rate is None else measure(rate / 1000.0, MAX_RIG_HASHRATE_THS)
        boards.append(
            Hashboard(
                index=n,
                hashrate_ths=ths,
                temp_c=positive(mapping(item.get("pcb_temp")).get("max")),
                chip_temp_c=positive(mapping(item.get("chip_temp")).get("max")),
                active=bool(ths and ths > 0),
            )
        )
    state_name = str(mapping(miner.get("miner_status")).get("miner_state") or "")
    if state_name in SLEEP_STATES:
        state = RigState.SLEEPING
    elif state_name in MINING_STATES and hashrate:
        state = RigState.MINING
    else:
        state = RigState.WAKING
    cooling = mapping(miner.get("cooling"))
    fans_raw = cooling.get("fans")
    fans = tuple(
        rpm
        for fan in (fans_raw if isinstance(fans_raw, list) else [])[:MAX_FANS]
        if (rpm := to_int(mapping(fan).get("rpm"))) is not None and rpm >= 0
    )
    board_temps = [b.temp_c for b in boards if b.temp_c is not None]
    chip_temps = [b.chip_temp_c for b in boards if b.chip_temp_c is not None]
    nominal = to_float(miner.get("hr_nominal"))
    return RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=hashrate,
        power_w=measure(to_float(miner.get("power_consumption")), MAX_RIG_POWER_W),
        power_limit_w=power_limit_w,
        nominal_hashrate_ths=measure(nominal / 1000.0, MAX_RIG_HASHRATE_THS) if nominal else None,
        temp_c=max(board_temps) if board_temps else None,
        chip_temp_c=max(chip_temps) if chip_temps else None,
        fans_rpm=fans,
        hashboards=tuple(boards),
        uptime_s=None,
        identity=vnish_identity(miner.get("miner_type")),
    )


def is_vnish(version: Mapping[str, Any] | None) -> bool:
    """VNish's 4028 API names itself in `version` (Description or Miner)."""
    status = first(version, "STATUS")
    info = first(version, "VERSION")
    text = f"{status.get('Description', '')} {info.get('Miner', '')}".lower()
    return "vnish" in text


# -- the web API, logged in -----------------------------------------------------------------


class VNishWebApi:
    """The `/api/v1` calls of one rig, with the unlock token kept and renewed on a 401."""

    def __init__(self, client: JsonHttpClient, *, password: str = "") -> None:
        self.client = client
        self.password = password or DEFAULT_PASSWORD
        self.device = client.device
        self._token: str | None = None
        self._lock = asyncio.Lock()
        self.unlocks = 0

    async def _unlock(self, operation: str) -> str:
        path = f"{API}/unlock"
        status, reply = await self.client.request(
            "POST", path, body={"pw": self.password}, operation=operation
        )
        where = {"device": self.device, "operation": operation}
        if status == 403:
            raise DeviceAuthError("the web API refused the password (HTTP 403)", **where)
        if status == 429:
            raise CommandRejected("too many login attempts (HTTP 429); try later", **where)
        reply = self.client.expect(status, reply, "POST", path, operation)
        token = mapping(reply).get("token")
        if not isinstance(token, str) or not token.strip() or not token.isascii():
            raise MalformedReply(f"unlock answered {snippet(repr(reply))}", **where)
        self._token = token.strip()
        self.unlocks += 1
        return self._token

    async def call(self, method: str, path: str, *, body: Any = None, operation: str) -> Any:
        """A call that needs the login; its JSON (None for an empty body)."""
        async with self._lock:
            token = self._token or await self._unlock(operation)
        full = API + path
        headers = {"Authorization": f"Bearer {token}"}
        status, reply = await self.client.request(
            method, full, body=body, headers=headers, operation=operation
        )
        if status == 401:  # expired or forgotten (a restart drops tokens): one fresh login
            async with self._lock:
                if self._token == token:
                    self._token = None
                token = self._token or await self._unlock(operation)
            headers = {"Authorization": f"Bearer {token}"}
            status, reply = await self.client.request(
                method, full, body=body, headers=headers, operation=operation
            )
        return self.client.expect(status, reply, method, full, operation)

    async def get_open(self, path: str, *, operation: str) -> Any:
        """A read the document allows without a login."""
        status, reply = await self.client.request("GET", API + path, operation=operation)
        return self.client.expect(status, reply, "GET", API + path, operation)


# -- the driver ------------------------------------------------------------------------------


class VNishDriver:
    """One Antminer on VNish (see the module docstring)."""

    def __init__(
        self,
        device: str,
        web: VNishWebApi,
        rpc: CGMinerClient,
        *,
        preset_refresh_s: float = PRESET_REFRESH_S,
    ) -> None:
        self.device = device
        self.web = web
        self.rpc = rpc
        self.preset_refresh_s = preset_refresh_s
        self.capabilities = MinerCapabilities(can_sleep=True, can_power_target=False)
        self._reboots = RebootWatch(device)
        self._presets: list[tuple[float, str]] | None = None
        self._current: tuple[float | None, str] | None = None  # (watts, name) in force
        self._restore: str | None = None  # the preset found in force at the first read
        self._preset_ts: float | None = None  # monotonic time of the last preset read
        self._identity: RigIdentity | None = None
        self._web_down = False

    # -- reads -----------------------------------------------------------------

    async def read(self, ts: float) -> RigTelemetry:
        try:
            summary = await self.web.get_open("/summary", operation="read")
        except (DeviceAuthError, UnsupportedOperation):
            raise
        except DeviceError as exc:
            if not self._web_down:  # once per outage: a rig switched off fails every poll
                log.warning("vnish.web_read_failed", device=self.device, error=str(exc))
            self._web_down = True
            return await self._read_rpc(ts)
        if self._web_down:
            log.info("vnish.web_read_recovered", device=self.device)
        self._web_down = False
        await self._refresh_presets()
        watts = self._current[0] if self._current else None
        tel = parse_vnish_summary(ts, summary, power_limit_w=watts, device=self.device)
        self._identity = tel.identity
        return tel

    async def _read_rpc(self, ts: float) -> RigTelemetry:
        """The 4028 fallback: hashrate, boards, fans and uptime; no power, no stop state."""
        replies = await self.rpc.multi("summary", "stats")
        tel = parse_telemetry(
            ts,
            summary=replies["summary"],
            stats=replies["stats"],
            identity=self._identity or RigIdentity(firmware=FIRMWARE),
            device=self.device,
        )
        if self._reboots.restarted(tel):
            self._preset_ts = None
        return tel

    async def _refresh_presets(self) -> None:
        now = time.monotonic()
        if self._preset_ts is not None and now - self._preset_ts < self.preset_refresh_s:
            return
        try:
            perf = await self.web.get_open("/perf-summary", operation="read")
            current = mapping(mapping(perf).get("current_preset"))
            name = current.get("name")
            if isinstance(name, str):
                self._current = (preset_watts(current), name)
                if self._restore is None:
                    self._restore = name
            presets = await self.web.call("GET", "/autotune/presets", operation="read")
            self._presets = tuned_presets(presets)
        except DeviceError as exc:  # the read itself went through: stay monitored
            log.warning("vnish.presets_unavailable", device=self.device, error=str(exc))
        self._preset_ts = now
        self._update_capabilities()

    def _update_capabilities(self) -> None:
        table = self._presets or []
        ok = len(table) >= 2
        self.capabilities = MinerCapabilities(
            can_sleep=True,
            can_power_target=ok,
            power_target_min_w=table[0][0] if ok else None,
            power_target_max_w=table[-1][0] if ok else None,
            needs_pdu_to_power_off=True,
        )

    # -- control ---------------------------------------------------------------

    async def sleep(self) -> None:
        await self.web.call("POST", "/mining/stop", operation="sleep")
        log.info("vnish.stopped", device=self.device)

    async def wake(self) -> None:
        await self.web.call("POST", "/mining/start", operation="wake")
        log.info("vnish.started", device=self.device)

    def preset_for(self, watts: float | None) -> tuple[float | None, str]:
        """(watts, name) of the preset for a target (None: the one to restore)."""
        table = self._presets or []
        if watts is None:
            if self._restore is not None:
                found = [p for p in table if p[1] == self._restore]
                return (found[0][0] if found else None), self._restore
            if not table:
                raise UnsupportedOperation(
                    "no tuned preset known to restore", device=self.device, operation="wake"
                )
            return table[-1]
        if isinstance(watts, bool) or not isinstance(watts, int | float):
            raise ValueError(f"power target must be a number of watts, got {watts!r}")
        if not (math.isfinite(watts) and watts > 0):
            raise ValueError(f"power target must be a positive number of watts, got {watts}")
        if len(table) < 2:
            raise UnsupportedOperation(
                "this rig has fewer than two tuned presets: no power target",
                device=self.device,
                operation="set_power_target",
            )
        fit = [p for p in table if p[0] <= watts]
        if not fit:
            raise ValueError(
                f"power target {watts:.0f} W outside {table[0][0]:.0f}-{table[-1][0]:.0f} W"
                " (this rig's tuned presets)"
            )
        return fit[-1]

    async def set_power_target(self, watts: float | None) -> None:
        op = "set_power_target"
        if self._presets is None:
            self._preset_ts = None
            await self._refresh_presets()
        preset_w, name = self.preset_for(watts)
        body = {"miner": {"overclock": {"preset": name}}}
        await self.web.call("POST", "/settings", body=body, operation=op)
        settings = await self.web.call("GET", "/settings", operation=op)
        got = mapping(mapping(mapping(settings).get("miner")).get("overclock")).get("preset")
        if got != name:
            raise CommandRejected(
                f"the firmware kept preset {got!r} instead of {name!r} (not tuned?)",
                device=self.device,
                operation=op,
            )
        self._current = (preset_w, name)
        log.info("vnish.preset", device=self.device, preset=name, requested_w=watts)

    async def close(self) -> None:
        await self.web.client.close()


def make_vnish_driver(
    device: str,
    host: str,
    port: int = DEFAULT_PORT,
    *,
    web_port: int = WEB_PORT,
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
) -> VNishDriver:
    """`port` is the CGMiner API's (4028), `web_port` the web API's (80)."""
    client = JsonHttpClient(host, web_port, timeout=timeout, retries=retries, device=device)
    rpc = CGMinerClient(host, port, timeout=timeout, retries=retries, device=device)
    return VNishDriver(device, VNishWebApi(client, password=password), rpc)


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery contract names it so
    port: int = DEFAULT_PORT,
) -> RigIdentity | None:
    """Discovery probe: VNish's 4028 `version` names it; the model is in `stats`."""
    try:
        version = await shared_command(host, port, "version", timeout)
        if not is_vnish(version):
            return None
        client = CGMinerClient(host, port, timeout=timeout, retries=0, device=host)
        stats = await client.command("stats")
    except DeviceError:
        return None
    head = first(stats, "STATS")
    return vnish_identity(head.get("Type"))
