"""Braiins OS (BOS+, "BOSer"): telemetry over its cgminer-compatible 4028 API, control over
REST or, on releases without the REST API (before 25.07), over the public gRPC API.

Braiins OS offers two surfaces and neither is enough alone. Its 4028 API imitates cgminer
for monitoring tools (no credentials, one cheap connection per poll) but has no power
target and, in recent versions, no reliable way to tell "paused" from "booting": after a
pause the MH/s simply decay to zero and `devdetails` keeps answering. Its public REST API
(`/api/v1/...`, a token from `auth/login`) pauses, resumes and sets power targets, reports
the tuner's power-target range, and says in `miner/details.status` whether mining is
paused. So reads stay on 4028, one request per poll as for every other firmware, and the
REST API is asked only what 4028 cannot say: the status when the rig is not hashing (or
was paused by us) and, after a (re)boot, the model, version and power-target range.

The BOSer 4028 dialect differs from cgminer's where it matters: hashrates are MH/s, `stats`
carries nothing, per-chain data is split over `devs` (MH/s), `temps` (board and chip °C),
`devdetails` (chips, model) and `fans`, and power is the tuner's estimate in `tunerstatus`.
`parse_telemetry` still reads `summary` (MH/s and uptime); the rest is parsed here.

Releases before 25.07 have no REST API, only the public gRPC API (50051, since 23.03),
which offers the same calls. `VersionedControl` asks the gRPC API its version
(`GetApiVersion`, no login) at first use and after each reboot, and speaks gRPC below API
1.7.0 (BOS 25.07), REST from then on; `BraiinsGrpcControl` answers the driver's calls in the
REST API's JSON, so everything else here is the same for both.

REST errors map to the typed `DeviceError`s: a refused login is `DeviceAuthError` (retrying
with the same password cannot help), a 401 on a call re-logs in once (tokens expire after
`timeout_s` of idleness), 404 is `UnsupportedOperation` (a BOS without this API), other
4xx/5xx `CommandRejected`, non-JSON or truncated bodies `MalformedReply`, timeouts and
refused connections `DeviceTimeout`/`DeviceUnreachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import (
    DEFAULT_PORT,
    MAX_FANS,
    MAX_REPLY_BYTES,
    CGMinerClient,
    parse_telemetry,
)
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
    snippet,
)
from drivers.reboots import RebootWatch
from drivers.retry import check_timing, with_retries
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry, revised
from drivers.values import (
    MAX_RIG_HASHRATE_THS,
    MAX_RIG_POWER_W,
    first,
    mapping,
    measure,
    positive,
    section,
    to_float,
    to_int,
)
from drivers.webjson import HttpRejected, JsonHttpClient

if TYPE_CHECKING:  # imported when a rig speaks gRPC (VersionedControl), not before
    from drivers.braiins_grpc.client import BraiinsGrpcClient
    from drivers.braiins_grpc.control import BraiinsGrpcControl

log = structlog.get_logger(__name__)

Json = dict[str, Any]

DEFAULT_REST_PORT: Final = 80
# The public gRPC API (releases before REST use it); drivers.braiins_grpc.client's
# DEFAULT_PORT, not imported from there so that the gRPC stack loads only when needed.
DEFAULT_GRPC_PORT: Final = 50051
DEFAULT_USERNAME: Final = "root"
DEFAULT_PASSWORD: Final = "root"  # the factory login (pyasic's default too)
FIRMWARE: Final = "Braiins OS"
LOGIN_PATH: Final = "/api/v1/auth/login"
PAUSE_PATH: Final = "/api/v1/actions/pause"
RESUME_PATH: Final = "/api/v1/actions/resume"
POWER_TARGET_PATH: Final = "/api/v1/performance/power-target"
DEFAULT_POWER_TARGET_PATH: Final = "/api/v1/performance/power-target/default"
TUNER_STATE_PATH: Final = "/api/v1/performance/tuner-state"
CONSTRAINTS_PATH: Final = "/api/v1/configuration/constraints"
DETAILS_PATH: Final = "/api/v1/miner/details"
VERSION_PATH: Final = "/api/v1/version"  # no token needed
# The first public API version whose Braiins OS release (25.07) also serves the REST API.
REST_SINCE_API: Final = (1, 7, 0)
# `MinerStatus` of the BOS API: 1 not started, 2 normal, 3 paused, 4 suspended, 5 restricted.
STATUS_NOT_STARTED: Final = 1
STATUS_PAUSED: Final = 3
STATUS_SUSPENDED: Final = 4
TOKEN_MARGIN_S: Final = 5.0  # re-login this long before the firmware would expire the token
REST_RETRY_S: Final = 60.0  # after a failed REST call during a read, reads skip REST this long
_SNIPPET: Final = 120
# Everything but `summary` only enriches a reading: a build without `tunerstatus` (BOS
# without the tuner) or `temps` must still be monitored.
_OPTIONAL: Final = frozenset({"devs", "temps", "fans", "tunerstatus", "version", "devdetails"})
_BOS_MARKERS: Final = ("BOSMINER", "BOSER")
_VERSION_KEYS: Final = ("BOSer", "BOSminer+", "BOSminer")


class BraiinsRejected(HttpRejected):
    """An HTTP error answer from the REST API; keeps the status and body for callers."""


# -- REST transport -----------------------------------------------------------------------


class BraiinsRestClient:
    """The BOS public REST API of one miner: token login, bounded requests, typed errors.

    The token is cached for the session and dropped when the firmware says 401 or when it
    has been idle longer than the `timeout_s` the login reported; every call that finds it
    gone logs in again (under a lock, so concurrent calls share one login). Retries (with
    backoff) cover only timeouts and unreachable hosts; every call this driver makes is
    idempotent (pausing twice is "already paused"), so a retry cannot do harm.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_REST_PORT,
        *,
        username: str = DEFAULT_USERNAME,
        password: str = "",
        timeout: float = 3.0,
        retries: int = 1,
        device: str = "",
        backoff_s: float = 0.1,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        check_timing(timeout, retries)
        self.host = host
        self.port = port
        self.username = username or DEFAULT_USERNAME
        self.password = password
        self.timeout = timeout
        self.retries = retries
        self.device = device or f"{host}:{port}"
        self.backoff_s = backoff_s
        self.max_reply_bytes = max_reply_bytes
        self.logins = 0  # successful logins, for tests and diagnostics
        # The HTTP exchange is the web-API drivers' (drivers.webjson); this class adds the
        # token login and what the BOS API's statuses mean.
        self.http = JsonHttpClient(
            host, port, timeout=timeout, retries=retries, device=self.device,
            backoff_s=backoff_s, max_body_bytes=max_reply_bytes,
        )  # fmt: skip
        self._token: str | None = None
        self._token_timeout_s: float | None = None
        self._token_used = 0.0  # monotonic time of the token's last use
        self._login_lock = asyncio.Lock()

    @property
    def base_url(self) -> str:
        return self.http.base_url

    async def close(self) -> None:
        self._token = None
        await self.http.close()

    async def get(self, path: str, *, operation: str) -> Any:
        return await self.request("GET", path, operation=operation)

    async def put(self, path: str, body: Any = None, *, operation: str) -> Any:
        return await self.request("PUT", path, body=body, operation=operation)

    async def request(
        self, method: str, path: str, *, body: Any = None, operation: str, auth: bool = True
    ) -> Any:
        """One API call; returns the decoded JSON (None for an empty body)."""

        async def once() -> Any:
            if auth:
                return await self._authed(method, path, body, operation)
            status, data = await self._send(method, path, body, None, operation)
            return self._decode(status, data, method, path, operation)

        return await with_retries(
            once,
            retries=self.retries,
            backoff_s=self.backoff_s,
            device=self.device,
            operation=operation,
        )

    async def _authed(self, method: str, path: str, body: Any, operation: str) -> Any:
        token = await self._ensure_token(operation)
        status, data = await self._send(method, path, body, token, operation)
        if status == 401:
            # Expired or revoked (a firmware restart forgets tokens): one fresh login.
            if self._token == token:
                self._token = None
            token = await self._ensure_token(operation)
            status, data = await self._send(method, path, body, token, operation)
            if status == 401:
                self._token = None
                raise DeviceAuthError(
                    f"the REST API refused a token it had just issued (HTTP 401 on {path})",
                    device=self.device,
                    operation=operation,
                )
        self._token_used = time.monotonic()
        return self._decode(status, data, method, path, operation)

    async def _ensure_token(self, operation: str) -> str:
        async with self._login_lock:
            token = self._token
            idle = time.monotonic() - self._token_used
            if (
                token is not None
                and self._token_timeout_s is not None
                and idle > self._token_timeout_s - TOKEN_MARGIN_S
            ):
                token = self._token = None  # the firmware has expired it by now
            if token is None:
                token = await self._login(operation)
            return token

    async def _login(self, operation: str) -> str:
        credentials = {"username": self.username, "password": self.password}
        status, data = await self._send("POST", LOGIN_PATH, credentials, None, operation)
        if status in (401, 403):
            raise DeviceAuthError(
                f"login as {self.username!r} refused (HTTP {status}): wrong username or "
                "password for the Braiins OS REST API",
                device=self.device,
                operation=operation,
            )
        reply = self._decode(status, data, "POST", LOGIN_PATH, operation)
        token = reply.get("token") if isinstance(reply, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise MalformedReply(
                f"login reply has no token: {snippet(data.decode('utf-8', 'replace'), _SNIPPET)}",
                device=self.device,
                operation=operation,
            )
        if not (token.isascii() and token.strip().isprintable()):
            # It goes back in an HTTP header, where control characters could inject others.
            raise MalformedReply(
                f"login reply has a token that cannot be an HTTP header: {snippet(repr(token))}",
                device=self.device,
                operation=operation,
            )
        timeout_s = to_float(reply.get("timeout_s"))
        self._token = token.strip()
        self._token_timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self._token_used = time.monotonic()
        self.logins += 1
        log.debug("braiins.login", device=self.device, timeout_s=timeout_s)
        return self._token

    async def _send(
        self, method: str, path: str, body: Any, token: str | None, operation: str
    ) -> tuple[int, bytes]:
        """One HTTP exchange under a single deadline -> (status, body bytes)."""
        headers = {"Authorization": token} if token else None
        return await self.http.send(method, path, body=body, headers=headers, operation=operation)

    async def api_version(self, operation: str) -> tuple[int, int, int] | None:
        """The public API version from `GET /api/v1/version` (no login, one attempt), or
        None when this port serves no REST API (refused, silent, 404, not JSON). A REST API
        that answers but will not say (401, odd JSON) counts as the first with REST."""
        try:
            status, data = await self._send("GET", VERSION_PATH, None, None, operation)
            if status in (401, 403):
                return REST_SINCE_API
            reply = self._decode(status, data, "GET", VERSION_PATH, operation)
        except DeviceError:
            return None
        parts = [to_int(mapping(reply).get(k)) for k in ("major", "minor", "patch")]
        if any(p is None or p < 0 for p in parts):
            return REST_SINCE_API
        major, minor, patch = (int(p or 0) for p in parts)
        return major, minor, patch

    def _decode(self, status: int, data: bytes, method: str, path: str, operation: str) -> Any:
        where = {"device": self.device, "operation": operation}
        text = data.decode("utf-8", "replace")
        if status == 404:
            raise UnsupportedOperation(
                f"{method} {path} is not offered by this firmware (HTTP 404)", **where
            )
        if status == 401:
            raise DeviceAuthError(f"{method} {path} needs a login (HTTP 401)", **where)
        if not 200 <= status < 300:
            kind = "firmware error" if status >= 500 else "refused"
            raise BraiinsRejected(
                f"{method} {path} {kind} (HTTP {status}: {snippet(text, _SNIPPET)})",
                status=status,
                body=text,
                **where,
            )
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise MalformedReply(
                f"{method} {path} answered non-JSON: {snippet(text, _SNIPPET)}", **where
            ) from exc


# -- gRPC transport, and choosing one ------------------------------------------------------


class BraiinsControl(Protocol):
    """What the driver asks of a control transport: the REST API's paths and JSON."""

    async def get(self, path: str, *, operation: str) -> Any: ...
    async def put(self, path: str, body: Any = None, *, operation: str) -> Any: ...
    async def close(self) -> None: ...


class VersionedControl:
    """Control over the transport the firmware calls for, chosen at first use: the REST API
    where the rig serves it (Braiins OS 25.07 on, public API 1.7.0: `GET /api/v1/version`,
    no login), else the public gRPC API on releases before it (`GetApiVersion`, no login).
    The REST API is asked first so that the gRPC stack (grpclib, betterproto and the
    generated messages, about 25 MB) is imported only for a rig that really speaks gRPC. A
    rig that answers neither is taken to be on REST (its errors then say why). `forget()`
    (after a reboot: maybe an upgrade) makes the next call ask again."""

    def __init__(self, rest: BraiinsRestClient, grpc: Callable[[], BraiinsGrpcClient]) -> None:
        """`grpc` makes the gRPC client when it is first needed (`make_braiins_driver`)."""
        self.rest = rest
        self._make_grpc = grpc
        self._grpc: BraiinsGrpcControl | None = None
        self.chosen: BraiinsControl | None = None
        self.api_version: tuple[int, int, int] | None = None  # as the chosen API says it
        self._lock = asyncio.Lock()

    @property
    def grpc(self) -> BraiinsGrpcControl:
        """The gRPC transport, built (and the gRPC stack imported) on first use."""
        if self._grpc is None:
            from drivers.braiins_grpc.control import BraiinsGrpcControl

            self._grpc = BraiinsGrpcControl(self._make_grpc())
        return self._grpc

    @property
    def transport(self) -> str:
        """ "grpc", "rest", or "" before the first call."""
        if self.chosen is None:
            return ""
        return "rest" if self.chosen is self.rest else "grpc"

    def forget(self) -> None:
        self.chosen = None

    async def _choose(self, operation: str) -> BraiinsControl:
        async with self._lock:
            if self.chosen is not None:
                return self.chosen
            device = self.rest.device
            self.api_version = await self.rest.api_version(operation)
            if self.api_version is not None:
                self.chosen = self.rest
            else:
                try:
                    self.api_version = await self.grpc.client.api_version(operation=operation)
                except (DeviceTimeout, DeviceUnreachable, UnsupportedOperation) as exc:
                    log.info("braiins.grpc_unavailable", device=device, error=str(exc))
                    self.api_version = None
                    self.chosen = self.rest
                    return self.chosen
                self.chosen = self.grpc if self.api_version < REST_SINCE_API else self.rest
            log.info(
                "braiins.transport",
                device=device,
                api_version=".".join(map(str, self.api_version)),
                transport=self.transport,
            )
            return self.chosen

    async def get(self, path: str, *, operation: str) -> Any:
        return await (await self._choose(operation)).get(path, operation=operation)

    async def put(self, path: str, body: Any = None, *, operation: str) -> Any:
        return await (await self._choose(operation)).put(path, body, operation=operation)

    async def close(self) -> None:
        await self.rest.close()
        if self._grpc is not None:
            await self._grpc.close()


# -- parsing ---------------------------------------------------------------------------------


def _mhs_to_ths(value: Any) -> float | None:
    f = to_float(value)
    return None if f is None else measure(f * 1e-6, MAX_RIG_HASHRATE_THS)


def is_braiins(version: Mapping[str, Any] | None) -> bool:
    """Whether a 4028 `version` reply comes from BOSminer/BOSer (pyasic's test, by text)."""
    if version is None:
        return False
    desc = str(first(version, "STATUS").get("Description", ""))
    keys = " ".join(str(k) for k in first(version, "VERSION"))
    return any(m in f"{desc} {keys}".upper() for m in _BOS_MARKERS)


def parse_chips(devdetails: Mapping[str, Any] | None) -> dict[int, int]:
    """Chain ID -> chip count, from `devdetails`."""
    out: dict[int, int] = {}
    for item in section(devdetails, "DEVDETAILS"):
        chain, chips = to_int(item.get("ID")), to_int(item.get("Chips"))
        if chain is not None and chips is not None and chips >= 0:
            out[chain] = chips
    return out


def _model_name(model: str) -> str:
    model = model.strip()
    return model.removeprefix("Bitmain ").strip()  # "Bitmain Antminer S9" -> "Antminer S9"


def parse_bos_identity(
    version: Mapping[str, Any] | None,
    devdetails: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
) -> RigIdentity:
    """Model and firmware from 4028 `version`/`devdetails` or REST `miner/details`.

    BOSer's `version` names no model, only its own build; `devdetails` names the model
    ("Bitmain Antminer S19 Pro"); the REST details name both, the BOS release included
    ("2025-08-06-0-3881c51d-25.07-plus"), and are preferred when given.
    """
    rest = mapping(details)
    identity = mapping(rest.get("miner_identity"))
    model = identity.get("miner_model") or identity.get("name")
    if not isinstance(model, str) or not model.strip():
        model = str(first(devdetails, "DEVDETAILS").get("Model") or "")
    model = _model_name(model)
    fw_version = mapping(rest.get("bos_version")).get("current")
    if not isinstance(fw_version, str) or not fw_version:
        entry = first(version, "VERSION")
        found = next((entry[k] for k in _VERSION_KEYS if k in entry), None)
        if found is not None:
            fw_version = str(found)
        else:
            desc = str(first(version, "STATUS").get("Description", ""))
            fw_version = desc.partition(" ")[2]
    make = "Antminer" if model.lower().startswith("antminer") else (model.split() or [""])[0]
    return RigIdentity(make=make, model=model, firmware=FIRMWARE, firmware_version=fw_version)


def parse_miner_status(details: Mapping[str, Any] | None) -> int | None:
    """`miner/details.status` (the `MinerStatus` enum), or None when absent or not a number."""
    status = mapping(details).get("status")
    if isinstance(status, bool) or not isinstance(status, int):
        return None
    return status


def parse_power_range(constraints: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """(min, max) W of the tuner's power target from `configuration/constraints`."""
    power = mapping(mapping(mapping(constraints).get("tuner_constraints")).get("power_target"))
    lo = positive(mapping(power.get("min")).get("watt"))
    hi = positive(mapping(power.get("max")).get("watt"))
    if lo is None or hi is None or hi < lo:
        return None
    return lo, hi


def parse_tuner_target(tuner_state: Mapping[str, Any] | None) -> float | None:
    """The power target in force from `performance/tuner-state` (None in hashrate mode)."""
    mode = mapping(mapping(tuner_state).get("mode_state"))
    state = mapping(mode.get("powertargetmodestate"))
    return positive(mapping(state.get("current_target")).get("watt"))


def parse_watt(reply: Any, *, device: str = "", operation: str = "") -> float:
    """The `{"watt": N}` answer of the power-target calls."""
    watt = mapping(reply).get("watt")
    value = None if isinstance(watt, bool) else to_float(watt)
    if value is None or value < 0 or isinstance(watt, str):
        raise MalformedReply(
            f"expected {{'watt': N}}, got {snippet(json.dumps(reply), _SNIPPET)}",
            device=device,
            operation=operation,
        )
    return value


def parse_bosminer_telemetry(
    ts: float,
    *,
    summary: Mapping[str, Any] | None,
    devs: Mapping[str, Any] | None = None,
    temps: Mapping[str, Any] | None = None,
    fans: Mapping[str, Any] | None = None,
    tunerstatus: Mapping[str, Any] | None = None,
    version: Mapping[str, Any] | None = None,
    devdetails: Mapping[str, Any] | None = None,
    chips: Mapping[int, int] | None = None,
    identity: RigIdentity | None = None,
    device: str = "",
) -> RigTelemetry:
    """BOSminer/BOSer 4028 replies -> `RigTelemetry`; state from hashrate alone.

    The driver refines the state (paused or not) from the REST API; this function only
    knows what 4028 says. `chips` maps chain IDs to chip counts when `devdetails` was read
    on an earlier poll. Chain IDs start at 6 on S9 and 1 on X19; board indexes start at 0.
    """
    base = parse_telemetry(ts, summary=summary, identity=RigIdentity(), device=device)
    chip_map = dict(chips or {})
    chip_map.update(parse_chips(devdetails))
    dev_by_id = {
        cid: item for item in section(devs, "DEVS") if (cid := to_int(item.get("ID"))) is not None
    }
    temp_by_id = {
        cid: item for item in section(temps, "TEMPS") if (cid := to_int(item.get("ID"))) is not None
    }
    ids = sorted(set(dev_by_id) | set(temp_by_id))
    boards = []
    for cid in ids:
        dev, tmp = dev_by_id.get(cid, {}), temp_by_id.get(cid, {})
        ths = _mhs_to_ths(dev.get("MHS 5s")) if dev else None
        boards.append(
            Hashboard(
                index=cid - ids[0],
                hashrate_ths=ths,
                temp_c=positive(tmp.get("Board")),
                chip_temp_c=positive(tmp.get("Chip")),  # 0.0: no chip sensor reading
                chips=chip_map.get(cid),
                active=bool(ths and ths > 0),
            )
        )
    hashrate = base.hashrate_ths
    if hashrate is None:
        rates = [b.hashrate_ths for b in boards if b.hashrate_ths is not None]
        hashrate = measure(sum(rates), MAX_RIG_HASHRATE_THS) if rates else None
    nominals = [n for d in dev_by_id.values() if (n := positive(d.get("Nominal MHS")))]
    fan_rpms = [
        rpm
        for item in section(fans, "FANS")[:MAX_FANS]
        if (rpm := to_int(item.get("RPM"))) is not None
    ]
    tuner = first(tunerstatus, "TUNERSTATUS")
    board_temps = [b.temp_c for b in boards if b.temp_c is not None]
    chip_temps = [b.chip_temp_c for b in boards if b.chip_temp_c is not None]
    if version is not None or devdetails is not None or identity is None:
        identity = parse_bos_identity(version, devdetails)
    nominal = measure(sum(nominals) * 1e-6, MAX_RIG_HASHRATE_THS) if nominals else None
    return RigTelemetry(  # every field but the time and uptime anew (not `replace`: per poll)
        ts=base.ts,
        state=RigState.MINING if hashrate and hashrate > 0 else RigState.WAKING,
        hashrate_ths=hashrate,
        power_w=measure(to_float(tuner.get("ApproximateMinerPowerConsumption")), MAX_RIG_POWER_W),
        power_limit_w=measure(positive(tuner.get("PowerLimit")), MAX_RIG_POWER_W),
        nominal_hashrate_ths=nominal,
        temp_c=max(board_temps) if board_temps else None,
        chip_temp_c=max(chip_temps) if chip_temps else None,
        fans_rpm=tuple(fan_rpms),
        hashboards=tuple(boards),
        uptime_s=base.uptime_s,
        identity=identity,
    )


# -- the driver ------------------------------------------------------------------------------


class BraiinsDriver:
    """A rig on Braiins OS: reads over 4028, pause/resume/power target over REST.

    Pause leaves the control board and fans running, so only the PDU takes the rig to
    zero (`needs_pdu_to_power_off`). The power-target range is the tuner's, read from the
    firmware after the first read (until then the capabilities carry no range).
    """

    def __init__(
        self,
        device: str,
        client: CGMinerClient,
        rest: BraiinsControl,
        *,
        rest_retry_s: float = REST_RETRY_S,
    ) -> None:
        self.device = device
        self.capabilities = MinerCapabilities(can_sleep=True, can_power_target=True)
        self._client = client
        self.rest = rest
        self.rest_retry_s = rest_retry_s
        self._identity: RigIdentity | None = None
        self._reboots = RebootWatch(device)
        self._chips: dict[int, int] = {}
        self._power_range: tuple[float, float] | None = None
        self._target_w: float | None = None  # last power target the REST API reported
        self._paused: bool = False  # what we last knew: told to pause, or the API said so
        self._rest_info_due = True  # model/version/range to (re)learn over REST
        self._rest_skip_until = 0.0  # monotonic; reads leave REST alone until then

    # -- reads -----------------------------------------------------------------

    async def read(self, ts: float) -> RigTelemetry:
        cmds = ["summary", "devs", "temps", "fans", "tunerstatus"]
        if self._identity is None:
            cmds += ["version", "devdetails"]  # rarely change: first poll and after a reboot
        replies = await self._client.multi(*cmds, optional=_OPTIONAL)
        if "devdetails" in replies:
            self._chips = parse_chips(replies["devdetails"])
        tel = parse_bosminer_telemetry(
            ts,
            summary=replies["summary"],
            devs=replies.get("devs"),
            temps=replies.get("temps"),
            fans=replies.get("fans"),
            tunerstatus=replies.get("tunerstatus"),
            version=replies.get("version"),
            devdetails=replies.get("devdetails"),
            chips=self._chips,
            identity=self._identity,
            device=self.device,
        )
        self._note_reading(tel)
        hashing = bool(tel.hashrate_ths and tel.hashrate_ths > 0)
        status = await self._rest_status(need=self._paused or not hashing)
        if status is not None:
            self._paused = status in (STATUS_PAUSED, STATUS_SUSPENDED)
        if self._paused:
            state = RigState.SLEEPING
        else:
            state = RigState.MINING if hashing else RigState.WAKING
        limit = tel.power_limit_w if tel.power_limit_w is not None else self._target_w
        return revised(
            tel, state=state, power_limit_w=limit, identity=self._identity or tel.identity
        )

    def _note_reading(self, tel: RigTelemetry) -> None:
        """Cache identity; after a restart it may be new firmware or a new range: re-learn."""
        if self._reboots.restarted(tel):
            self._identity = None
            self._rest_info_due = True
            if isinstance(self.rest, VersionedControl):
                self.rest.forget()  # a reboot may have been an upgrade: ask the version again
        elif self._identity is None:
            self._identity = tel.identity

    async def _rest_status(self, *, need: bool) -> int | None:
        """`miner/details.status` when needed or due, learning identity and range on the way.

        A REST failure never fails the read (4028 answered; the rig is monitored): it is
        logged, and reads leave the REST API alone for `rest_retry_s`. Control calls still
        try, and raise.
        """
        if not (need or self._rest_info_due) or time.monotonic() < self._rest_skip_until:
            return None
        try:
            details = await self.rest.get(DETAILS_PATH, operation="read")
            if self._rest_info_due:
                await self._learn_rest_info(details)
        except DeviceError as exc:
            self._rest_skip_until = time.monotonic() + self.rest_retry_s
            log.warning(
                "braiins.rest_unavailable",
                device=self.device,
                error=str(exc),
                kind=exc.kind,
                retry_in_s=self.rest_retry_s,
            )
            return None
        return parse_miner_status(details)

    async def _learn_rest_info(self, details: Any) -> None:
        identity = parse_bos_identity(None, None, details if isinstance(details, dict) else None)
        base = self._identity or RigIdentity()
        self._identity = RigIdentity(
            make=identity.make or base.make,
            model=identity.model or base.model,
            firmware=FIRMWARE,
            firmware_version=identity.firmware_version or base.firmware_version,
        )
        await self._load_power_range()
        with contextlib.suppress(MalformedReply):
            tuner = await self.rest.get(TUNER_STATE_PATH, operation="read")
            self._target_w = parse_tuner_target(tuner if isinstance(tuner, dict) else None)
        self._rest_info_due = False

    async def _load_power_range(self) -> None:
        reply = await self.rest.get(CONSTRAINTS_PATH, operation="capabilities")
        self._power_range = parse_power_range(reply if isinstance(reply, dict) else None)
        if self._power_range is None:
            log.warning("braiins.no_power_target_range", device=self.device)
            self.capabilities = MinerCapabilities(can_sleep=True, can_power_target=False)
        else:
            lo, hi = self._power_range
            self.capabilities = MinerCapabilities(
                can_sleep=True,
                can_power_target=True,
                power_target_min_w=lo,
                power_target_max_w=hi,
            )

    # -- control ---------------------------------------------------------------

    async def sleep(self) -> None:
        already = await self._action(PAUSE_PATH, "sleep")
        self._paused = True
        log.info("braiins.paused", device=self.device, already_paused=already)

    async def wake(self) -> None:
        already = await self._action(RESUME_PATH, "wake")
        self._paused = False
        log.info("braiins.resumed", device=self.device, already_mining=already)

    async def _action(self, path: str, operation: str) -> bool:
        reply = await self.rest.put(path, operation=operation)
        if not isinstance(reply, bool):
            raise MalformedReply(
                f"expected a JSON boolean from PUT {path}, "
                f"got {snippet(json.dumps(reply), _SNIPPET)}",
                device=self.device,
                operation=operation,
            )
        return reply

    async def set_power_target(self, watts: float | None) -> None:
        """Set the tuner's target; None restores the firmware default. Never above `watts`.

        The firmware takes whole watts, so the request is rounded down; a value outside
        the tuner's range is a caller error (ValueError), found before anything is sent
        but for fetching the range itself when it is not known yet.
        """
        op = "set_power_target"
        if watts is None:
            reply = await self.rest.put(DEFAULT_POWER_TARGET_PATH, operation=op)
            self._target_w = parse_watt(reply, device=self.device, operation=op)
            log.info("braiins.power_target_default", device=self.device, watts=self._target_w)
            return
        if isinstance(watts, bool) or not isinstance(watts, int | float):
            raise ValueError(f"power target must be a number of watts, got {watts!r}")
        if not math.isfinite(watts) or watts <= 0:
            raise ValueError(f"power target must be a positive finite wattage, got {watts}")
        if self._power_range is None:
            await self._load_power_range()
        if self._power_range is None:
            raise UnsupportedOperation(
                "the firmware reports no power-target range (tuner disabled or absent)",
                device=self.device,
                operation=op,
            )
        lo, hi = self._power_range
        want = math.floor(watts)
        if not lo <= want <= hi:
            raise ValueError(f"power target {watts:.0f} W outside {lo:.0f}-{hi:.0f} W")
        reply = await self.rest.put(POWER_TARGET_PATH, {"watt": want}, operation=op)
        got = parse_watt(reply, device=self.device, operation=op)
        self._target_w = got
        if got > want:
            raise CommandRejected(
                f"firmware set the power target to {got:.0f} W, above the {want} W asked",
                device=self.device,
                operation=op,
            )
        log.info("braiins.power_target", device=self.device, watts=got)

    async def close(self) -> None:
        await self.rest.close()


def make_braiins_driver(
    device: str,
    host: str,
    port: int = DEFAULT_PORT,
    *,
    username: str = "",
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
    rest_port: int = DEFAULT_REST_PORT,
    grpc_port: int = DEFAULT_GRPC_PORT,
) -> BraiinsDriver:
    """A driver for one BOS rig, configured like `make_miner_driver`'s kinds.

    `port` is the 4028 API's; `username` and `password` are the BOS web credentials, used
    by the control transport the firmware's version calls for (`VersionedControl`: gRPC on
    `grpc_port` before BOS 25.07, the REST API on `rest_port` from then on); empty means
    the factory root/root, as for every kind, so a scanned rig left on its defaults is
    controlled without editing the config.
    """
    client = CGMinerClient(host, port, timeout=timeout, retries=retries, device=device)
    user, pw = username or DEFAULT_USERNAME, password or DEFAULT_PASSWORD
    rest = BraiinsRestClient(
        host, rest_port, username=user, password=pw, timeout=timeout, retries=retries,
        device=device,
    )  # fmt: skip

    def grpc() -> BraiinsGrpcClient:
        from drivers.braiins_grpc.client import BraiinsGrpcClient

        return BraiinsGrpcClient(
            host, grpc_port, username=user, password=pw, timeout=timeout, retries=retries,
            device=device,
        )  # fmt: skip

    return BraiinsDriver(device, client, VersionedControl(rest, grpc))


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery contract names it so
    port: int = DEFAULT_PORT,
) -> RigIdentity | None:
    """Discovery probe: a BOS rig's identity over 4028, or None for anything else.

    Asks `version` and `devdetails` at once (as pyasic does), within `timeout` in all;
    a refused port, silence, garbage or another firmware's `version` is None.
    """
    client = CGMinerClient(host, port, timeout=timeout, retries=0, device=host)
    try:
        async with asyncio.timeout(timeout):
            version, devdetails = await asyncio.gather(
                client.command("version"), client.command("devdetails"), return_exceptions=True
            )
    except TimeoutError:
        return None
    if isinstance(version, BaseException) or not is_braiins(version):
        return None
    details = None if isinstance(devdetails, BaseException) else devdetails
    return parse_bos_identity(version, details)
