"""Simulated Braiins OS public REST API (HTTP/JSON on port 80) for a `SimRig` on BOS.

Braiins OS splits its surface: telemetry over the cgminer-compatible 4028 API (the
"bosminer" dialect of `simulators.cgminer`), control through this REST API with a
token from `POST /api/v1/auth/login`. The driver must be exercised against both over real
sockets, so this module serves the REST side of the same rig: a pause here shows on the
4028 side as MH/s decaying to zero, as on the firmware.

Served, with paths, field names, units and types as in the vendor's OpenAPI document
("Braiins OS Public REST API", 26.04) and as captured from a BOS 25.07 S19 XP:

- `POST /api/v1/auth/login` `{"username","password"}` -> `{"token","timeout_s"}`;
- `GET /api/v1/version/` (also without the slash; no token needed);
- `PUT /api/v1/actions/pause`, `PUT /api/v1/actions/resume` -> JSON boolean: whether the
  miner already was paused / mining; `GET /api/v1/actions/locate` -> boolean;
- `PUT /api/v1/performance/power-target` `{"watt": N}` -> `{"watt": N}`;
  `PUT /api/v1/performance/power-target/default` -> `{"watt": default}`;
- `GET /api/v1/performance/tuner-state`, `/configuration/constraints`,
  `/configuration/miner`, `/miner/details`, `/miner/stats`, `/miner/hw/hashboards`,
  `/cooling/state`.

Every other path is aiohttp's plain 404, a wrong method its 405.

Simulator assumptions (the OpenAPI document lists only 200 answers for these endpoints;
what follows is not documented and was chosen to be plausible and is kept in one place):

- The token is sent raw in `Authorization: <token>` (no "Bearer", as asic-rs sends it);
  a missing, unknown or expired token is 401 with a plain-text body "Unauthorized". The
  token is 16 letters and digits (the shape of the firmware's `uid`); any number of
  tokens may be live at once; each is valid `timeout_s` (3600, the gRPC API's documented
  sliding window) farm seconds after its last use.
- Login with a wrong username or password is 401 with the plain-text body
  "Invalid username or password". The default credentials are root/root (pyasic's and
  asic-rs's BOS default).
- The schemas (utoipa style, Rust names such as `powertargetmodestate`) suggest an axum
  server, so its JSON-extractor rejections are assumed for bodies: a body that is not
  JSON is 400, valid JSON of the wrong shape or type (a login without `password`, a
  fractional or negative `watt`: the field is an integer) is 422, a body without
  `Content-Type: application/json` is 415; bodies are plain text.
- A power target outside the `tuner_constraints.power_target` range is 400
  ("power target N W is out of range MIN-MAX W"), as the gRPC API's INVALID_ARGUMENT
  would map. A target set while paused is stored and used on resume.
- `miner/details.status` is 2 (normal) while mining and 3 (paused) after a pause, the
  `MinerStatus` enum of the gRPC API; `overall_tuner_state` is 3 (tuning) while the rig
  ramps to a new target and 2 (stable) otherwise. `serial_number` is null, as captured.
- The API version is 1.0.0, as the 25.07 capture answers (the 26.04 document says 1.3.0).
- Constraints carry tuner limits only (`cooling`, `dps` and `hashboards` constraints are
  null, which the schema allows): power target `model.min_w..model.max_w`, default
  `model.nominal_w`.
- A rig that is not `api_up` (outlet off, booting) drops every connection without an
  answer, as a dead host would once connected.

Delays (`BraiinsRestServer.delays`, wall seconds before answering, by kind: "login",
"read" for GETs, "action" for PUTs) are zero by default; the firmware's own timing is not
published. Fault injection (`set_fault`): "silent" holds requests without answering,
"garbage" answers 200 with non-JSON bytes, "truncated" announces a full body and sends half
of it, "error500" answers 500, "refuse" closes the listener (re-opened on the same port
when cleared).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from simulators.farm import Farm, RigMode, SimPdu, SimRig, above_room
from simulators.fleet import Fleet
from simulators.server import SILENT_HOLD_S
from simulators.webserver import WebRigServer

log = structlog.get_logger(__name__)

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_PORT: Final = 80
TOKEN_TIMEOUT_S: Final = 3600
FAULTS: Final = frozenset({"silent", "garbage", "truncated", "error500", "refuse"})
BOS_VERSION: Final = "2025-08-06-0-3881c51d-25.07-plus"
BOS_MAJOR: Final = "2022-09-13-0-11012d53-22.08-plus"
API_VERSION: Final = (1, 0, 0)
TUNER_STABLE: Final = 2
TUNER_TUNING: Final = 3
STATUS_NORMAL: Final = 2
STATUS_PAUSED: Final = 3
_TOKEN_ALPHABET: Final = string.ascii_letters + string.digits
_GARBAGE: Final = b"<html><body><h1>502 Bad Gateway</h1></body></html>\xff\xfe{"
_UNAUTHENTICATED: Final = frozenset({"/api/v1/auth/login", "/api/v1/version", "/api/v1/version/"})
# The deprecated `MinerModel` enum of the gRPC API, for `miner_identity.model`.
_MODEL_ENUM: Final = {
    "Antminer S19 Pro": 12,
    "Antminer S19j Pro": 15,
    "Antminer S19 XP": 18,
}
_HB_CHIP: Final = {"Antminer S19 XP": "BM1366", "Antminer S21": "BM1368"}
_HASHRATE_WINDOWS: Final = (
    ("last_15m", 900.0),
    ("last_15s", 15.0),
    ("last_1h", 3600.0),
    ("last_1m", 60.0),
    ("last_24h", 86_400.0),
    ("last_30m", 1800.0),
    ("last_30s", 30.0),
    ("last_5m", 300.0),
    ("last_5s", 5.0),
)


def _ghs(value: float) -> Json:
    return {"gigahash_per_second": value}


def _watt(value: float) -> Json:
    return {"watt": round(value)}


def _json(obj: Any, status: int = 200) -> web.Response:
    """Compact JSON, as serde writes it."""
    return web.json_response(obj, status=status, dumps=_compact)


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


class BosViews:
    """What Braiins OS reports of one rig, in the public API's terms (the REST API's JSON,
    which has the gRPC messages' field names): shared by the REST and the gRPC servers, so
    both transports see the same rig alike."""

    farm: Farm
    rig: SimRig
    rig_id: str
    bos_version: str = BOS_VERSION  # `bos_version.current` of miner details

    def tuner_state_view(self) -> Json:
        t = self.farm.now()
        rig = self.rig
        target = _watt(rig.target_w)
        ths = rig.model.nominal_ths * (rig.target_w / rig.model.nominal_w) ** 0.85
        profile = {
            "created": {"nanos": 0, "seconds": int(rig.boot_t)},
            "estimated_power_consumption": target,
            "measured_hashrate": _ghs(ths * 1000.0),
            "target": target,
        }
        return {
            "mode_state": {"powertargetmodestate": {"current_target": target, "profile": profile}},
            "overall_tuner_state": TUNER_TUNING if rig.ramping(t) else TUNER_STABLE,
        }

    def constraints_view(self) -> Json:
        m = self.rig.model
        tuner = {
            "default_mode": 1,  # TUNER_MODE_POWER_TARGET
            "enabled": {"default": True},
            "hashrate_target": {
                "default": {"terahash_per_second": m.nominal_ths},
                "max": {"terahash_per_second": round(m.nominal_ths * 1.1, 1)},
                "min": {"terahash_per_second": round(m.nominal_ths * 0.5, 1)},
            },
            "power_target": {
                "default": _watt(m.nominal_w),
                "max": _watt(m.max_w),
                "min": _watt(m.min_w),
            },
        }
        return {
            "cooling_constraints": None,
            "dps_constraints": None,
            "hashboards_constraints": None,
            "tuner_constraints": tuner,
        }

    def configuration_view(self) -> Json:
        return {
            "pool_groups": [],  # as captured: the firmware leaves this empty here
            "tuner": {
                "enabled": True,
                "hashrate_target": None,
                "power_target": _watt(self.rig.target_w),
                "tuner_mode": 1,
            },
        }

    def _real_hashrate(self, t: float, share: float = 1.0) -> Json:
        rig = self.rig
        out: Json = {}
        for name, window in _HASHRATE_WINDOWS:
            start = max(rig.boot_t, t - window)
            pts = [start + (t - start) * i / 5 for i in range(6)] if t > start else [t]
            ths = sum(rig.hashrate_ths(p) for p in pts) / len(pts)
            out[name] = _ghs(ths * 1000.0 * share)
        since = max(1.0, t - rig.boot_t)
        pts = [rig.boot_t + since * i / 5 for i in range(6)]
        out["since_restart"] = _ghs(sum(rig.hashrate_ths(p) for p in pts) / 6 * 1000.0 * share)
        return out

    def _solver_stats(self, t: float, share: float = 1.0) -> Json:
        nominal = self.rig.model.nominal_ths * 1000.0 * share
        best = 776_342_690 if share == 1.0 else round(776_342_690 * share)
        return {
            "best_share": best,
            "best_share_str": str(best),
            "error_hashrate": {"megahash_per_second": 0.0},
            "found_blocks": 0,
            "nominal_hashrate": _ghs(nominal),
            "real_hashrate": self._real_hashrate(t, share),
        }

    def details_view(self) -> Json:
        t = self.farm.now()
        rig, m = self.rig, self.rig.model
        uptime = rig.uptime_s(t)
        status = STATUS_PAUSED if rig.mode == RigMode.SLEEPING else STATUS_NORMAL
        return {
            "bos_mode": 4,
            "bos_version": {"bos_plus": True, "current": self.bos_version, "major": BOS_MAJOR},
            "bosminer_uptime_s": uptime,
            "control_board_soc_family": 3,
            "hostname": f"bos-{self.rig_id}",
            "kernel_version": "4.9.113",
            "mac_address": rig.mac.lower(),
            "miner_identity": {
                "brand": 1,
                "miner_model": m.name,
                "model": _MODEL_ENUM.get(m.name, 0),
                "name": m.name,
            },
            "platform": 4,
            "psu_info": {
                "fw_version": None,
                "max_voltage": {"volt": 15.2},
                "min_voltage": {"volt": 11.96},
                "model_name": "APW121215d/e",
                "serial_number": None,
                "version": 117,
            },
            "serial_number": None,
            "status": status,
            "sticker_hashrate": _ghs(m.nominal_ths * 1000.0),
            "system_uptime": uptime + 40,
            "system_uptime_s": uptime + 40,
            "uid": f"u{rig.serial[-15:]:0>15}",
        }

    def stats_view(self) -> Json:
        t = self.farm.now()
        rig = self.rig
        watts = round(rig.power_w(t)) if rig.powered else 0
        ths = rig.hashrate_ths(t)
        accepted = int(rig.uptime_s(t) * 0.15)
        return {
            "miner_stats": self._solver_stats(t),
            "pool_stats": {
                "accepted_shares": accepted,
                "best_share": 776_342_690,
                "best_share_str": "776342690",
                "generated_work": int(rig.uptime_s(t) * 255_000 * ths / 100),
                "last_difficulty": 262_144,
                "last_share_time": {"nanos": 734_529_336, "seconds": int(t) - 3},
                "rejected_shares": accepted // 580,
                "stale_shares": 0,
            },
            "power_stats": {
                "approximated_consumption": {"watt": watts},
                "efficiency": {"joule_per_terahash": watts / ths if ths > 0 else 0.0},
            },
        }

    def hashboards_view(self) -> Json:
        t = self.farm.now()
        rig, m = self.rig, self.rig.model
        boards = rig.board_hashrates_ths(t)
        total = sum(boards)
        pcb, chip = rig.board_temps_c(t), rig.chip_temps_c(t)
        hashing = rig.is_hashing(t) and rig.mode == RigMode.MINING
        freq = 486_704_545.0 * min(1.5, total / m.nominal_ths) if hashing else 50_000_000.0
        out = []
        for i in range(m.boards):
            share = boards[i] / total if total > 0 else 1.0 / m.boards
            out.append(
                {
                    "board_name": "BHB56801",
                    "board_temp": {"degree_c": round(pcb[i], 1)},
                    "chip_type": _HB_CHIP.get(m.name, "BM1398"),
                    "chips_count": m.chips_per_board,
                    "current_frequency": {"hertz": freq},
                    "current_voltage": {"volt": 12.93826530612245},
                    "enabled": True,
                    "highest_chip_temp": {
                        "id": i + 1,
                        "location": 1,
                        "temperature": {"degree_c": round(chip[i], 1)},
                    },
                    "highest_outlet_temp": {"degree_c": round(pcb[i], 1)},
                    "id": str(i + 1),  # a string, unlike the 4028 API's chain IDs
                    "lowest_inlet_temp": {"degree_c": round(above_room(pcb[i], 0.64), 1)},
                    "model": "BHB56801",
                    "serial_number": f"NGSB{rig.serial[-9:]}{i}",
                    "stats": self._solver_stats(t, share),
                }
            )
        return {"hashboards": out}

    def cooling_view(self) -> Json:
        t = self.farm.now()
        rig = self.rig
        fans = [
            {"position": i, "rpm": rpm, "target_speed_ratio": round(min(1.0, rpm / 6000), 2)}
            for i, rpm in enumerate(rig.fans_rpm(t))
        ]
        chips = rig.chip_temps_c(t)
        hottest = max(range(len(chips)), key=lambda i: chips[i]) if chips else 0
        highest = {
            "id": None,
            "location": 1,  # SensorLocation CHIP (the captured reply says so too)
            "temperature": {"degree_c": round(chips[hottest], 1) if chips else 0.0},
        }
        return {"fans": fans, "highest_temperature": highest}


class BraiinsRestServer(BosViews, WebRigServer):
    """The REST API of one simulated BOS rig. See the module docstring for its behaviour."""

    faults = FAULTS
    max_body = 64 * 1024

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        username: str = "root",
        password: str = "root",
        token_timeout_s: int = TOKEN_TIMEOUT_S,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        super().__init__(farm, rig_id, host=host, port=port, outlet=outlet)
        self.username = username
        self.password = password
        self.token_timeout_s = token_timeout_s
        self.api_version = API_VERSION
        self.delays: dict[str, float] = {"login": 0.0, "read": 0.0, "action": 0.0}
        self.logins = 0  # successful logins
        self.failed_logins = 0
        self.tokens: dict[str, float] = {}  # token -> farm time of its last use

    # -- lifecycle (simulators/webserver.py) -------------------------------------

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_post("/api/v1/auth/login", self._login)
        r.add_get("/api/v1/version", self._version)
        r.add_get("/api/v1/version/", self._version)
        r.add_put("/api/v1/actions/pause", self._pause)
        r.add_put("/api/v1/actions/resume", self._resume)
        r.add_get("/api/v1/actions/locate", self._locate)
        r.add_put("/api/v1/performance/power-target", self._set_power_target)
        r.add_put("/api/v1/performance/power-target/default", self._default_power_target)
        r.add_get("/api/v1/performance/tuner-state", self._tuner_state)
        r.add_get("/api/v1/configuration/constraints", self._constraints)
        r.add_get("/api/v1/configuration/miner", self._configuration)
        r.add_get("/api/v1/miner/details", self._details)
        r.add_get("/api/v1/miner/stats", self._stats)
        r.add_get("/api/v1/miner/hw/hashboards", self._hashboards)
        r.add_get("/api/v1/cooling/state", self._cooling)

    async def start(self) -> None:
        await super().start()
        log.debug("braiins_simulator.started", rig=self.rig_id, host=self.host, port=self.port)

    # -- plumbing --------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        # "refuse" also drops requests on connections kept alive from before.
        if not self._api_up() or self.fault == "refuse":
            if request.transport is not None:
                request.transport.abort()  # a dead host: no answer at all
            raise web.HTTPServiceUnavailable()  # never reaches the (gone) client
        if request.path == "/api/v1/auth/login":
            kind = "login"
        else:
            kind = "read" if request.method == "GET" else "action"
        delay = self.delays.get(kind, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        fault = self.fault
        if fault == "silent":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SILENT_HOLD_S):
                    await self._closing.wait()
            raise web.HTTPServiceUnavailable()
        if fault == "error500":
            return _text(500, "Internal Server Error")
        if fault == "garbage":
            return web.Response(status=200, body=_GARBAGE, content_type="application/json")
        if request.path not in _UNAUTHENTICATED and not self._authorised(request):
            return _text(401, "Unauthorized")
        response = await handler(request)
        if fault == "truncated" and isinstance(response, web.Response) and response.body:
            return await self._truncate(request, response)
        return response

    async def _truncate(self, request: web.Request, full: web.Response) -> web.StreamResponse:
        body = bytes(full.body) if isinstance(full.body, bytes | bytearray) else b"{}"
        out = web.StreamResponse(status=full.status)
        out.content_type = "application/json"
        out.content_length = len(body)
        await out.prepare(request)
        await out.write(body[: max(1, len(body) // 2)])
        if request.transport is not None:
            request.transport.close()
        return out

    def _authorised(self, request: web.Request) -> bool:
        token = request.headers.get("Authorization", "").strip()
        t = self.farm.now()
        last = self.tokens.get(token)
        if last is None:
            return False
        if t - last > self.token_timeout_s:
            del self.tokens[token]
            return False
        self.tokens[token] = t  # validity is refreshed by every request
        return True

    async def _json_body(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """The request's JSON, or the rejection an axum `Json` extractor would send."""
        if request.content_type != "application/json":
            return None, _text(415, "Expected request with `Content-Type: application/json`")
        raw = await request.read()
        try:
            return json.loads(raw), None
        except (ValueError, RecursionError) as exc:
            return None, _text(400, f"Failed to parse the request body as JSON: {exc}")

    @staticmethod
    def _shape_error(detail: str) -> web.Response:
        return _text(422, f"Failed to deserialize the JSON body into the target type: {detail}")

    # -- auth and version ------------------------------------------------------

    async def _login(self, request: web.Request) -> web.Response:
        body, error = await self._json_body(request)
        if error is not None:
            return error
        user = body.get("username") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(user, str) or not isinstance(password, str):
            return self._shape_error("missing or invalid field `username` or `password`")
        if user != self.username or password != self.password:
            self.failed_logins += 1
            return _text(401, "Invalid username or password")
        token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(16))
        self.tokens[token] = self.farm.now()
        self.logins += 1
        return _json({"token": token, "timeout_s": self.token_timeout_s})

    async def _version(self, request: web.Request) -> web.Response:
        major, minor, patch = self.api_version
        return _json({"major": major, "minor": minor, "patch": patch})

    # -- actions ---------------------------------------------------------------

    async def _pause(self, request: web.Request) -> web.Response:
        already = self.rig.mode == RigMode.SLEEPING
        self.rig.sleep(self.farm.now())
        return _json(already)

    async def _resume(self, request: web.Request) -> web.Response:
        already = self.rig.mode == RigMode.MINING
        self.rig.wake(self.farm.now())
        return _json(already)

    async def _locate(self, request: web.Request) -> web.Response:
        return _json(False)

    # -- performance -----------------------------------------------------------

    async def _set_power_target(self, request: web.Request) -> web.Response:
        body, error = await self._json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict) or "watt" not in body:
            return self._shape_error("missing field `watt`")
        watt = body["watt"]
        if isinstance(watt, bool) or not isinstance(watt, int):
            return self._shape_error(f"watt: invalid type: {json.dumps(watt)}, expected u64")
        if watt < 0:
            return self._shape_error(f"watt: invalid value: integer `{watt}`, expected u64")
        m = self.rig.model
        if not m.min_w <= watt <= m.max_w:
            return _text(
                400, f"power target {watt} W is out of range {m.min_w:.0f}-{m.max_w:.0f} W"
            )
        self.rig.set_power_target(float(watt), self.farm.now())
        return _json({"watt": watt})

    async def _default_power_target(self, request: web.Request) -> web.Response:
        self.rig.set_power_target(None, self.farm.now())
        return _json(_watt(self.rig.model.nominal_w))

    # -- the rig's views, as JSON -----------------------------------------------

    async def _tuner_state(self, request: web.Request) -> web.Response:
        return _json(self.tuner_state_view())

    async def _constraints(self, request: web.Request) -> web.Response:
        return _json(self.constraints_view())

    async def _configuration(self, request: web.Request) -> web.Response:
        return _json(self.configuration_view())

    async def _details(self, request: web.Request) -> web.Response:
        return _json(self.details_view())

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(self.stats_view())

    async def _hashboards(self, request: web.Request) -> web.Response:
        return _json(self.hashboards_view())

    async def _cooling(self, request: web.Request) -> web.Response:
        return _json(self.cooling_view())


class BraiinsRestFleet(Fleet[BraiinsRestServer]):
    """The REST side of every "bosminer" rig of a farm, one server per rig address.

    `hosts` maps rig id to the loopback address its 4028 simulator listens on (for a
    `MinerFleet`, `fleet.address_of(rig)[0]`); rigs on other firmware are skipped. With
    `port` 0 each server takes an ephemeral port (rigs sharing one address).
    """

    def __init__(
        self,
        farm: Farm,
        hosts: Mapping[str, str],
        *,
        port: int = DEFAULT_PORT,
        username: str = "root",
        password: str = "root",
    ) -> None:
        self.servers: dict[str, BraiinsRestServer] = {
            rid: BraiinsRestServer(
                farm, rid, host=host, port=port, username=username, password=password
            )
            for rid, host in hosts.items()
            if farm.rigs[rid].firmware == "bosminer"
        }
