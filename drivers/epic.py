"""ePIC PowerPlay firmware (ePIC UMC control boards, on Antminers and ePIC's BlockMiners):
reads, stop / start and power targets over its HTTP API.

What it reads and controls, and through which API: everything goes through PowerPlay's
HTTP JSON API, which listens on port 4028 where other firmware has the CGMiner API (so a
CGMiner client gets an HTTP error page, "not JSON", from it). Reads need no credentials;
every write carries the password in its body (`{"param": ..., "password": ...}`, factory
default "letmein") and is answered `{"result": bool, "error": null | "<ApiError>"}`, HTTP 200
either way, as in the vendor's OpenAPI document (ePIC UMC API 1.22.5 and 1.30.0).

- Reads: `GET /summary` every poll (one request: per-board MH/s and temperatures, the PSU's
  input power, fans, uptime, the operating state and the perpetual-tune target in force);
  `GET /capabilities` on the first poll and after a restart (model, chips per board, and the
  range of the "Power" tuning algorithm).
- Sleep / wake: `POST /miner` with "Stop" / "Autostart". The control board, fans and API
  stay up while the miner is stopped ("Idling"): only the PDU takes the rig to zero.
- Power target: `POST /perpetualtune/algo` (turning perpetual tune on first if it is off).
  Firmware that offers the "Power" algorithm in `/capabilities` (listed in the 1.22.5 and
  1.30.0 documents) takes the target in watts, within that algorithm's range. Firmware
  without it (the captured 1.5.13 offers only hashrate algorithms) takes a hashrate: the
  driver aims at the hashrate of the highest `Tune Presets` entry whose power is at or
  below the target, so the rig stays under it, and offers the presets' power span as its
  range. `None` restores the firmware's default: the voltage optimiser at the model's
  default hashrate. Without either, no power target is claimed.

Operating states (the firmware's `MinerState`): "Mining" with hashrate is mining; "Idling"
and "Stopping" are asleep (stopped on purpose, or idle on a lost pool connection: either way
not hashing); every other state (booting, loading, testing, adjusting clocks) is waking.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from drivers.base import MinerCapabilities
from drivers.cgminer import MAX_FANS, CGMinerClient
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceError,
    MalformedReply,
    UnsupportedOperation,
    snippet,
)
from drivers.reboots import RebootWatch
from drivers.telemetry import Hashboard, RigIdentity, RigState, RigTelemetry
from drivers.values import (
    MAX_RIG_HASHRATE_THS,
    MAX_RIG_POWER_W,
    mapping,
    measure,
    positive,
    to_float,
    to_int,
)
from drivers.webjson import JsonHttpClient

log = structlog.get_logger(__name__)

DEFAULT_PORT: Final = 4028
DEFAULT_PASSWORD: Final = "letmein"
FIRMWARE: Final = "ePIC PowerPlay"
POWER_ALGO: Final = "Power"
DEFAULT_ALGO: Final = "VoltageOptimizer"
HASHRATE_ALGOS: Final = frozenset({"VoltageOptimizer", "BoardTune", "ChipTune"})
SLEEP_STATES: Final = frozenset({"Idling", "Stopping"})
_FAN_KEY: Final = re.compile(r"Fans Speed (\d+)")
_LIST_OR_NONE: Final = (list, type(None))  # a tuple: `list | None` is a new union each call


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def parse_model(capabilities: Mapping[str, Any] | None) -> tuple[str, str]:
    """(make, model) from `/capabilities` `Model`: "AntMiner S19 XP" -> ("Antminer",
    "Antminer S19 XP"); ePIC's own BlockMiners are make "ePIC"."""
    raw = str(mapping(capabilities).get("Model") or "").strip()
    if not raw:
        return "", ""
    first_word, _, rest = raw.partition(" ")
    if first_word.lower() == "antminer":
        return "Antminer", f"Antminer {rest}".strip()
    if first_word.lower() == "blockminer":
        return "ePIC", raw
    return first_word, raw


def parse_software(summary: Mapping[str, Any] | None) -> str:
    """ "PowerPlay-BMS v1.5.13" -> "1.5.13" (the whole string if it has no version)."""
    software = str(mapping(summary).get("Software") or "").strip()
    last = software.rsplit(" ", 1)[-1]
    return last[1:] if last[:1] in ("v", "V") and last[1:2].isdigit() else software


def is_epic(summary: Any) -> bool:
    """PowerPlay's `/summary`: its `Software` names it."""
    return isinstance(summary, Mapping) and "powerplay" in str(summary.get("Software", "")).lower()


def parse_epic_identity(
    summary: Mapping[str, Any] | None, capabilities: Mapping[str, Any] | None
) -> RigIdentity:
    make, model = parse_model(capabilities)
    return RigIdentity(
        make=make, model=model, firmware=FIRMWARE, firmware_version=parse_software(summary)
    )


def power_algorithm_range(capabilities: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """The "Power" tuning algorithm's (min, max) watts, if the firmware offers it."""
    for option in _list(mapping(capabilities).get("PerpetualTune")):
        opt = mapping(option)
        if opt.get("algorithm") == POWER_ALGO:
            lo, hi = positive(opt.get("min")), positive(opt.get("max"))
            if lo is not None and hi is not None and lo < hi:
                return lo, hi
    return None


def presets(capabilities: Mapping[str, Any] | None) -> list[tuple[float, float]]:
    """`Tune Presets` as (watts, TH/s), lowest power first; presets without power skipped."""
    out = []
    for preset in _list(mapping(capabilities).get("Tune Presets")):
        item = mapping(preset)
        watts = measure(positive(item.get("power")), MAX_RIG_POWER_W)
        ths = measure(positive(item.get("hashrate")), MAX_RIG_HASHRATE_THS)
        if watts is not None and ths is not None:
            out.append((watts, ths))
    return sorted(out)


def target_range(capabilities: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """The power targets this firmware can take: the "Power" algorithm's range, else from
    the lowest to the highest preset power (at least two presets)."""
    exact = power_algorithm_range(capabilities)
    if exact is not None:
        return exact
    table = presets(capabilities)
    return (table[0][0], table[-1][0]) if len(table) >= 2 else None


def preset_for(capabilities: Mapping[str, Any] | None, watts: float) -> tuple[float, float]:
    """The highest-power preset at or below `watts` (ValueError below the lowest)."""
    fit = [p for p in presets(capabilities) if p[0] <= watts]
    if not fit:
        rng = target_range(capabilities)
        low = f"{rng[0]:.0f}" if rng else "?"
        raise ValueError(f"power target {watts:.0f} W below the lowest preset ({low} W)")
    return fit[-1]


def tune_target(summary: Mapping[str, Any] | None) -> tuple[str, float, str] | None:
    """(algorithm, target, unit) of the perpetual tune in force, or None when it is off."""
    tune = mapping(mapping(summary).get("PerpetualTune"))
    if tune.get("Running") is not True:
        return None
    for algo, stats in mapping(tune.get("Algorithm")).items():
        target = to_float(mapping(stats).get("Target"))
        if target is not None:
            return str(algo), target, str(mapping(stats).get("Unit") or "")
    return None


@dataclass(frozen=True, slots=True)
class CapsView:
    """What a reading needs from `/capabilities`, worked out once per capabilities reply
    rather than on every poll (they change only with the firmware)."""

    chips: int | None  # per hashboard
    default_ths: float | None
    presets: list[tuple[float, float]]  # `presets(capabilities)`
    make: str
    model: str

    @classmethod
    def of(cls, capabilities: Mapping[str, Any] | None) -> CapsView:
        caps = mapping(capabilities)
        chips = to_int(mapping(caps.get("Performance Estimator")).get("Chip Count"))
        default_ths = positive(caps.get("Default Hashrate"))
        make, model = parse_model(capabilities)
        return cls(
            chips=chips if chips and chips > 0 else None,
            default_ths=measure(default_ths, MAX_RIG_HASHRATE_THS) if default_ths else None,
            presets=presets(capabilities),
            make=make,
            model=model,
        )


def power_limit(
    summary: Mapping[str, Any] | None,
    caps: Mapping[str, Any],
    table: list[tuple[float, float]] | None = None,
) -> float | None:
    """The power target in force: the "Power" algorithm's target, or the power of the
    preset whose hashrate a hashrate algorithm aims at (as this driver sets it).
    `table` is `presets(caps)` when the caller keeps it."""
    return _limit_of(tune_target(summary), caps, table)


def _limit_of(
    tuned: tuple[str, float, str] | None,
    caps: Mapping[str, Any],
    table: list[tuple[float, float]] | None,
) -> float | None:
    """`power_limit` of a `tune_target` already read."""
    if tuned is None:
        return None
    algo, target, unit = tuned
    if algo == POWER_ALGO or unit.strip().upper() == "W":
        return measure(positive(target), MAX_RIG_POWER_W)
    if table is None:
        table = presets(caps)
    match = [w for w, ths in table if math.floor(ths) == math.floor(target)]
    return match[-1] if match else None


def operating_state(summary: Mapping[str, Any] | None) -> str:
    return str(mapping(mapping(summary).get("Status")).get("Operating State") or "")


def parse_epic_telemetry(
    ts: float,
    summary: Any,
    *,
    capabilities: Mapping[str, Any] | None = None,
    identity: RigIdentity | None = None,
    device: str = "",
    view: CapsView | None = None,
) -> RigTelemetry:
    """`/summary` (and, when known, `/capabilities`) -> one reading.

    A poller passes `view` (`CapsView.of(capabilities)`, kept until the capabilities
    change) so that it is not worked out on every poll."""
    return _telemetry(ts, summary, capabilities, identity, device, view)[0]


@functools.lru_cache(maxsize=64)
def _fan_slots(keys: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """(fan number, key) of the `Fans Rpm` keys, in fan order. Cached by the keys: every
    rig of a firmware build sends the same ones, poll after poll."""
    return tuple(sorted((int(m.group(1)), k) for k in keys if (m := _FAN_KEY.match(k))))


def _telemetry(
    ts: float,
    summary: Any,
    capabilities: Mapping[str, Any] | None,
    identity: RigIdentity | None,
    device: str,
    view: CapsView | None,
) -> tuple[RigTelemetry, tuple[str, float, str] | None]:
    """`parse_epic_telemetry`, and the perpetual tune in force (`tune_target`), which the
    driver keeps: read once a poll."""
    if (type(summary) is not dict and not isinstance(summary, Mapping)) or not isinstance(
        summary.get("HBs"), _LIST_OR_NONE
    ):
        raise MalformedReply(
            f"summary is not PowerPlay's: {snippet(repr(summary))}",
            device=device,
            operation="read",
        )
    if view is None:
        view = CapsView.of(capabilities)
    chips = view.chips
    boards = []
    for hb in _list(summary.get("HBs")):
        item = mapping(hb)
        index = to_int(item.get("Index"))
        if index is None:
            continue
        rate = _list(item.get("Hashrate"))
        mhs = to_float(rate[0]) if rate else None
        ths = None if mhs is None else measure(mhs * 1e-6, MAX_RIG_HASHRATE_THS)
        boards.append(
            Hashboard(
                index=index,
                hashrate_ths=ths,
                temp_c=positive(item.get("Temperature")),
                chips=chips,
                active=bool(ths and ths > 0),
            )
        )
    rates = [b.hashrate_ths for b in boards if b.hashrate_ths is not None]
    hashrate = measure(sum(rates), MAX_RIG_HASHRATE_THS) if rates else None
    state_name = operating_state(summary)
    if state_name in SLEEP_STATES:
        state = RigState.SLEEPING
    elif state_name == "Mining" and hashrate:
        state = RigState.MINING
    else:
        state = RigState.WAKING
    fans_rpm = mapping(summary.get("Fans Rpm"))
    try:
        slots = _fan_slots(tuple(fans_rpm))
    except TypeError:  # a key that is not text (never so in JSON)
        slots = tuple(sorted((int(m.group(1)), k) for k in fans_rpm
                             if isinstance(k, str) and (m := _FAN_KEY.match(k))))  # fmt: skip
    present = [v for _n, k in slots if (v := fans_rpm[k]) is not None]  # null: no fan there
    fans = tuple(rpm for v in present[:MAX_FANS] if (rpm := to_int(v)) is not None)
    psu = mapping(summary.get("Power Supply Stats"))
    tuned = tune_target(summary)
    limit = _limit_of(tuned, {}, view.presets)
    temps = [b.temp_c for b in boards if b.temp_c is not None]
    if identity is None or capabilities is not None:  # else the caller's, as it is
        software = parse_software(summary)
        if identity is None or (
            (identity.make, identity.model, identity.firmware, identity.firmware_version)
            != (view.make, view.model, FIRMWARE, software)
        ):  # a new one only when it differs: this runs on every poll
            identity = RigIdentity(
                make=view.make, model=view.model, firmware=FIRMWARE, firmware_version=software
            )
    tel = RigTelemetry(
        ts=ts,
        state=state,
        hashrate_ths=hashrate,
        power_w=measure(to_float(psu.get("Input Power")), MAX_RIG_POWER_W),
        power_limit_w=limit,
        nominal_hashrate_ths=view.default_ths,
        temp_c=max(temps) if temps else None,
        fans_rpm=fans,
        hashboards=tuple(boards),
        uptime_s=to_int(mapping(summary.get("Session")).get("Uptime")),
        identity=identity,
    )
    return tel, tuned


# -- the driver ----------------------------------------------------------------------------


class EpicDriver:
    """One rig on ePIC PowerPlay (see the module docstring)."""

    def __init__(self, device: str, client: JsonHttpClient, *, password: str = "") -> None:
        self.device = device
        self.client = client
        self.password = password or DEFAULT_PASSWORD
        self.capabilities = MinerCapabilities(can_sleep=True, can_power_target=False)
        self._reboots = RebootWatch(device)
        self._caps: Mapping[str, Any] | None = None
        self._caps_view: tuple[Any, CapsView | None] = (None, None)  # (caps, its view)
        self._identity: RigIdentity | None = None
        self._tune: tuple[str, float, str] | None = None  # the tune in force, as last read

    # -- reads -----------------------------------------------------------------

    async def _get(self, path: str, operation: str) -> Any:
        status, reply = await self.client.request("GET", path, operation=operation)
        return self.client.expect(status, reply, "GET", path, operation)

    async def read(self, ts: float) -> RigTelemetry:
        summary = await self._get("/summary", "read")
        caps = None
        if self._caps is None:
            caps = await self._capabilities()
        tel, tune = _telemetry(
            ts,
            summary,
            caps if caps is not None else self._caps,
            self._identity if caps is None else None,
            self.device,
            self._view() if caps is None else None,
        )
        if caps is not None:
            self._caps = caps
            self._update_capabilities()
        if self._reboots.restarted(tel):
            self._caps = None  # new firmware or a new range, maybe: ask again next poll
        if self._identity is None or caps is not None:
            self._identity = tel.identity
        self._tune = tune
        return tel

    def _view(self) -> CapsView:
        """`CapsView.of(self._caps)`, worked out again only when the capabilities change."""
        caps, view = self._caps_view
        if view is None or caps is not self._caps:
            view = CapsView.of(self._caps)
            self._caps_view = (self._caps, view)
        return view

    async def _capabilities(self) -> Mapping[str, Any] | None:
        """`/capabilities`, or None when it fails: the summary alone still makes a reading
        (no model, chips or range until a later poll gets it)."""
        try:
            caps = await self._get("/capabilities", "read")
        except DeviceError as exc:
            log.warning("epic.capabilities_unavailable", device=self.device, error=str(exc))
            return None
        if not isinstance(caps, Mapping):
            log.warning(
                "epic.capabilities_malformed", device=self.device, reply=snippet(repr(caps))
            )
            return None
        return caps

    def _update_capabilities(self) -> None:
        rng = target_range(self._caps)
        self.capabilities = MinerCapabilities(
            can_sleep=True,
            can_power_target=rng is not None,
            power_target_min_w=rng[0] if rng else None,
            power_target_max_w=rng[1] if rng else None,
            needs_pdu_to_power_off=True,
        )

    # -- control ---------------------------------------------------------------

    async def _post(self, path: str, param: Any, operation: str) -> None:
        body = {"param": param, "password": self.password}
        # Every write here sets a state, so repeating one after a timeout is harmless.
        status, reply = await self.client.request("POST", path, body=body, operation=operation)
        reply = self.client.expect(status, reply, "POST", path, operation)
        result = mapping(reply).get("result")
        if result is True:
            return
        error = mapping(reply).get("error")
        if error == "BadPassword":
            raise DeviceAuthError(
                "the firmware refused the password (BadPassword)",
                device=self.device,
                operation=operation,
            )
        if result is False:
            raise CommandRejected(
                f"POST {path} refused: {error!r}", device=self.device, operation=operation
            )
        raise MalformedReply(
            f"POST {path} answered {snippet(repr(reply))}, not {{'result': bool}}",
            device=self.device,
            operation=operation,
        )

    async def sleep(self) -> None:
        await self._post("/miner", "Stop", "sleep")
        log.info("epic.stopped", device=self.device)

    async def wake(self) -> None:
        await self._post("/miner", "Autostart", "wake")
        log.info("epic.started", device=self.device)

    async def set_power_target(self, watts: float | None) -> None:
        """Never above `watts`: the "Power" algorithm at `watts` (whole watts, rounded
        down) where the firmware offers it, else a hashrate algorithm at the hashrate of the
        highest preset at or below `watts`. None: the voltage optimiser at the model's
        default hashrate, the firmware's default."""
        op = "set_power_target"
        if watts is not None:
            if isinstance(watts, bool) or not isinstance(watts, int | float):
                raise ValueError(f"power target must be a number of watts, got {watts!r}")
            if not (math.isfinite(watts) and watts > 0):
                raise ValueError(f"power target must be a positive number of watts, got {watts}")
        if self._caps is None:
            caps = await self._get("/capabilities", op)
            self._caps = caps if isinstance(caps, Mapping) else {}
            self._update_capabilities()
        param = self._tune_for(watts)
        if self._tune is None:  # perpetual tune is off: the target would not apply
            await self._post("/perpetualtune", True, op)
        await self._post("/perpetualtune/algo", param, op)
        self._tune = (str(param["algo"]), float(param["target"]), "")
        log.info("epic.tune_target", device=self.device, requested_w=watts, **param)

    def _tune_for(self, watts: float | None) -> dict[str, Any]:
        op = "set_power_target"
        if watts is None:
            default = to_int(mapping(self._caps).get("Default Hashrate"))
            if default is None:
                raise MalformedReply(
                    "capabilities carry no Default Hashrate", device=self.device, operation=op
                )
            return {"algo": DEFAULT_ALGO, "target": default}
        rng = target_range(self._caps)
        if rng is None:
            raise UnsupportedOperation(
                "this firmware offers neither a Power tuning algorithm nor presets with power",
                device=self.device,
                operation=op,
            )
        if not rng[0] <= watts:
            raise ValueError(f"power target {watts:.0f} W outside {rng[0]:.0f}-{rng[1]:.0f} W")
        if power_algorithm_range(self._caps) is not None:
            return {"algo": POWER_ALGO, "target": math.floor(min(watts, rng[1]))}
        _preset_w, ths = preset_for(self._caps, watts)
        running = self._tune[0] if self._tune is not None else DEFAULT_ALGO
        algo = running if running in HASHRATE_ALGOS else DEFAULT_ALGO
        return {"algo": algo, "target": math.floor(ths)}

    async def close(self) -> None:
        await self.client.close()


def make_epic_driver(
    device: str,
    host: str,
    port: int = DEFAULT_PORT,
    *,
    password: str = "",
    timeout: float = 3.0,
    retries: int = 1,
) -> EpicDriver:
    client = JsonHttpClient(host, port, timeout=timeout, retries=retries, device=device)
    return EpicDriver(device, client, password=password)


async def _probe_get(client: CGMinerClient, path: str) -> Any:
    """One HTTP/1.0 GET over the CGMiner transport (a connection, the request, the reply up
    to EOF), decoded as JSON; None unless the answer is HTTP 200 with a JSON body. A scan
    probes every host that answers on 4028, so this stays as cheap as a CGMiner command."""
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {client.host}\r\nAccept: application/json\r\n"
        "Connection: close\r\n\r\n"
    )
    raw = await client.exchange(request.encode(), "identify")
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        return None  # a CGMiner API answers a GET with its own JSON: not PowerPlay
    if status_line[1] != b"200":
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


async def identify(
    host: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the discovery contract names it so
    port: int = DEFAULT_PORT,
) -> RigIdentity | None:
    """Discovery probe: PowerPlay's `/summary` on the API port, then its `/capabilities`
    for the model; None for anything else (a CGMiner API is no HTTP server)."""
    client = CGMinerClient(host, port, timeout=timeout, retries=0, device=host)
    try:
        summary = await _probe_get(client, "/summary")
        if not is_epic(summary):
            return None
        caps = await _probe_get(client, "/capabilities")
    except DeviceError:  # refused, silent, cut short: not this firmware
        return None
    return parse_epic_identity(summary, caps if isinstance(caps, Mapping) else None)
