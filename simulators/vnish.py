"""Simulated VNish (AnthillOS) firmware on Antminers of the farm model: its web API on port
80 (`/api/v1/...`, the vendor's OpenAPI document "xminer-api", VNish 1.3.4) and its
CGMiner-compatible API on 4028.

Web API, as the document has it (paths, field names, types, enums, status codes):

- `POST /api/v1/unlock {"pw"}` -> `{"token"}`; a wrong password is 403 `{"unlock_timeout":
  null}`. Calls marked secured in the document (`/settings`, `/autotune/presets`, `/mining/*`,
  `/system/*`, `/find-miner`) need the token as `Authorization: Bearer <token>` (or bare,
  as pyasic sends it) or an `x-api-key`; without one they are 401 with an empty body.
- `GET /summary` (no token needed): `miner` with hashrates in GH/s (`hr_realtime`,
  `hr_average`, `hr_nominal`, ...; the deprecated `instant_hashrate` and `average_hashrate`
  in MH/s), `power_consumption` (W; the deprecated `power_usage` is, as documented, the
  efficiency, J/TH), `chains`
  (per board: `hashrate_rt`, `pcb_temp`/`chip_temp` min/max, `chip_statuses`, `status`),
  `cooling` (fans), `pools`, `miner_status` (`miner_state` of "mining", "initializing",
  "starting", "auto-tuning", "restarting", "shutting-down", "stopped", "failure").
- `GET /info`, `/status`, `/perf-summary` (the preset in force), `/autotune/presets`
  (`name`, `pretty` "3010 watt ~ 141 TH", `status` "tuned"/"untuned"), `GET /settings`.
- `POST /settings` with `miner.overclock.preset` selects a preset; the answer is always
  `{"restart_required": false, "reboot_required": false}`, and a preset that is not tuned
  is silently ignored (pyasic PR #245, asic-rs PR #284): only reading `/settings` back tells.
- `POST /mining/stop`, `/mining/pause` (hashboards off) and `/mining/start`,
  `/mining/resume` (on again).

CGMiner API on 4028: the stock bmminer dialect of `simulators.cgminer` (`summary`, `stats`
with the `chain_*` keys, `pools`, `devs`, `version`; other commands "Access denied"), with
VNish's marks: every STATUS's Description is "vnish 1.3.4", and `stats`' first item names the
model as VNish does ("Antminer S19 XP (Vnish 1.3.4)", where pyasic reads it).

Simulator assumptions (not in the document; kept here in one place):

- `version` carries no model (no `Type`): the model is in `stats` and the web API. Its
  `Miner` is "Vnish 1.3.4".
- Pause and stop, resume and start, do the same to the farm model (boards off / on); the
  CGMiner API keeps answering while stopped, with no hashrate.
- Mining-control calls answer 200 with `{}` (the document gives no body).
- Presets: one per 7 % step of power from the model's minimum up to nominal (the default,
  in force at start), all tuned, plus one above nominal that is not tuned. A preset's name is
  its watts, as on VNish.
- The web root `/` serves the AnthillOS page (what pyasic and asic-rs identify VNish by).
- miner_state: "shutting-down" while the power falls after a stop, then "stopped";
  "starting" for the first seconds of a start, "initializing" until the boards hash.
"""

from __future__ import annotations

import json
import secrets
import string
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from simulators.cgminer import MinerServer
from simulators.farm import Farm, RigMode, RigModel, SimPdu
from simulators.fleet import Fleet, outlets_of, subnet_hosts
from simulators.webserver import WebRigServer, json_response

FIRMWARE: Final = "vnish"  # `SimRig.firmware` of a rig on VNish
VNISH_VERSION: Final = "1.3.4"
DESCRIPTION: Final = f"vnish {VNISH_VERSION}"
DEFAULT_PASSWORD: Final = "admin"
WEB_PORT: Final = 80
API_PREFIX: Final = "/api/v1"
PRESET_STEP: Final = 0.07  # of nominal power between presets
ROOT_HTML: Final = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>AnthillOS</title>'
    '</head><body><div id="root"></div></body></html>'
)
_TOKEN_ALPHABET: Final = string.ascii_letters + string.digits
_SECURED: Final = ("/settings", "/autotune/", "/mining/", "/system/", "/find-miner")
_SAVED: Final = {"reboot_required": False, "restart_required": False}


def miner_type(model: RigModel) -> str:
    return f"{model.name} (Vnish {VNISH_VERSION})"


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    watts: int
    ths: float
    tuned: bool

    def as_reply(self) -> dict[str, Any]:
        return {
            "modded_psu_required": False,
            "name": self.name,
            "pretty": f"{self.watts} watt ~ {round(self.ths)} TH",
            "status": "tuned" if self.tuned else "untuned",
        }


def build_presets(model: RigModel) -> tuple[Preset, ...]:
    """Power steps from the model's minimum to nominal (tuned), and one above (untuned)."""
    floor = model.idle_w * 2
    out = []
    watts = model.min_w
    levels = []
    while watts < model.nominal_w - 1:
        levels.append(round(watts))
        watts += model.nominal_w * PRESET_STEP
    levels.append(round(model.nominal_w))
    top = round(min(model.max_w, model.nominal_w * 1.04))
    for w in [*levels, top]:
        ths = model.nominal_ths * ((w - floor) / (model.nominal_w - floor)) ** 0.85
        out.append(Preset(str(w), w, ths, tuned=w <= round(model.nominal_w)))
    return tuple(out)


class VNishRpcServer(MinerServer):
    """The 4028 side: stock bmminer replies with VNish's marks (see the module docstring)."""

    def respond(self, raw: bytes) -> bytes:
        body = super().respond(raw)
        text = body.rstrip(b"\x00").decode()
        try:
            reply = json.loads(text)
        except ValueError:
            return body
        self._mark(reply)
        return json.dumps(reply, separators=(",", ":")).encode() + b"\x00"

    def _mark(self, reply: Any) -> None:
        if not isinstance(reply, dict):
            return
        for key, value in reply.items():
            if key == "STATUS" and isinstance(value, list):
                for entry in value:
                    if isinstance(entry, dict) and "Description" in entry:
                        entry["Description"] = DESCRIPTION
            elif key == "VERSION" and isinstance(value, list) and value:
                value[0].pop("Type", None)
                value[0]["Miner"] = f"Vnish {VNISH_VERSION}"
            elif key == "STATS" and isinstance(value, list) and value:
                if "Type" in value[0]:
                    value[0]["Type"] = miner_type(self.rig.model)
            elif isinstance(value, list):  # a joined reply: each slot is a whole reply
                for slot in value:
                    self._mark(slot)


class VNishWebServer(WebRigServer):
    """The web API of one VNish rig (see the module docstring)."""

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = WEB_PORT,
        password: str = DEFAULT_PASSWORD,
        api_key: str | None = None,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        super().__init__(farm, rig_id, host=host, port=port, outlet=outlet)
        self.password = password
        self.api_key = api_key
        self.tokens: set[str] = set()
        self.presets = build_presets(self.rig.model)
        self.preset = str(round(self.rig.model.nominal_w))
        self.posts: list[tuple[str, Any]] = []  # (path, body) of every authorised POST
        self.failed_unlocks = 0

    def routes(self, router: web.UrlDispatcher) -> None:
        p = API_PREFIX
        router.add_get("/", self._root)
        router.add_post(f"{p}/unlock", self._unlock)
        router.add_get(f"{p}/summary", self._summary)
        router.add_get(f"{p}/info", self._info)
        router.add_get(f"{p}/status", self._status)
        router.add_get(f"{p}/perf-summary", self._perf_summary)
        router.add_get(f"{p}/autotune/presets", self._presets)
        router.add_get(f"{p}/settings", self._get_settings)
        router.add_post(f"{p}/settings", self._post_settings)
        for action in ("stop", "start", "pause", "resume"):
            router.add_post(f"{p}/mining/{action}", self._mining)

    # -- auth ------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        key = request.headers.get("x-api-key")
        if self.api_key is not None and key == self.api_key:
            return True
        token = request.headers.get("Authorization", "").strip()
        token = token.removeprefix("Bearer ").strip()
        return token in self.tokens

    def _secured(self, request: web.Request) -> web.Response | None:
        path = request.path.removeprefix(API_PREFIX)
        if path.startswith(_SECURED) and not self._authorised(request):
            return web.Response(status=401)
        return None

    async def _unlock(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            return json_response({"err": "Failed to parse the request body"}, status=500)
        if not isinstance(body, dict) or body.get("pw") != self.password:
            self.failed_unlocks += 1
            return json_response({"unlock_timeout": None}, status=403)
        token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(32))
        self.tokens.add(token)
        return json_response({"token": token})

    # -- control ---------------------------------------------------------------

    async def _mining(self, request: web.Request) -> web.Response:
        if (refused := self._secured(request)) is not None:
            return refused
        action = request.path.rsplit("/", 1)[-1]
        t = self.farm.now()
        if action in ("stop", "pause"):
            self.rig.sleep(t)
        else:
            self.rig.wake(t)
        self.posts.append((request.path.removeprefix(API_PREFIX), None))
        return json_response({})

    def preset_named(self, name: str) -> Preset | None:
        return next((p for p in self.presets if p.name == name), None)

    async def _post_settings(self, request: web.Request) -> web.Response:
        if (refused := self._secured(request)) is not None:
            return refused
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            return json_response({"err": "Failed to parse settings"}, status=500)
        self.posts.append(("/settings", body))
        miner = body.get("miner") if isinstance(body, dict) else None
        overclock = miner.get("overclock") if isinstance(miner, dict) else None
        name = overclock.get("preset") if isinstance(overclock, dict) else None
        preset = self.preset_named(name) if isinstance(name, str) else None
        if preset is not None and preset.tuned and name != self.preset:
            self.preset = preset.name
            nominal = round(self.rig.model.nominal_w)
            self.rig.set_power_target(
                None if preset.watts == nominal else float(preset.watts), self.farm.now()
            )
        return json_response(_SAVED)  # also when the preset was ignored, as VNish answers

    # -- reads -----------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(status=200, text=ROOT_HTML, content_type="text/html")

    def miner_state(self, t: float) -> str:
        rig = self.rig
        if rig.mode == RigMode.SLEEPING:
            return "shutting-down" if rig.power_w(t) > rig.model.idle_w * 1.5 else "stopped"
        if rig.is_hashing(t):
            return "mining"
        return "starting" if t - rig.mode_t < 5 else "initializing"

    def summary(self, t: float) -> dict[str, Any]:
        rig, m = self.rig, self.rig.model
        hashing = rig.is_hashing(t)
        ghs = rig.hashrate_ths(t) * 1000.0
        boards = rig.board_hashrates_ths(t)
        pcb, chip = rig.board_temps_c(t), rig.chip_temps_c(t)
        fans = rig.fans_rpm(t)
        watts = round(rig.power_w(t)) if rig.powered else 0
        elapsed = rig.uptime_s(t)
        accepted = int(ghs * 1e9 * elapsed / (524_288 * 2**32)) if hashing else 0
        ideal = m.nominal_ths * 1000.0 / m.boards
        state = self.miner_state(t)
        efficiency = round(watts / (ghs / 1000.0), 2) if ghs > 0 else 0.0
        chains = [
            {
                "chip_statuses": {"grey": 0, "orange": 0, "red": 0},
                "chip_temp": {"max": round(chip[i]), "min": round(chip[i]) - 9},
                "frequency": round(525.0 * ths * 1000.0 / ideal, 1) if hashing else 0.0,
                "hashrate_ideal": round(ideal, 2),
                "hashrate_percentage": round(100.0 * ths * 1000.0 / ideal, 2),
                "hashrate_rt": round(ths * 1000.0, 2),
                "hr_error": 0.02 if hashing else 0.0,
                "hw_errors": elapsed // 900,
                "id": i + 1,
                "pcb_temp": {"max": round(pcb[i]), "min": round(pcb[i]) - 7},
                "power_consumption": round(watts / m.boards) if hashing else 0,
                "status": {"state": "mining" if hashing else "stopped"},
                "voltage": 13400 if hashing else 0,
            }
            for i, ths in enumerate(boards)
        ]
        miner: dict[str, Any] = {
            "average_hashrate": round(ghs * 0.99 * 1000.0, 2),  # deprecated: MH/s
            "best_share": accepted * 3_100_000,
            "chains": chains,
            "chip_temp": {"max": round(max(chip)), "min": round(min(chip)) - 9},
            "cooling": {
                "fan_duty": min(100, round(max(fans, default=0) / 60)),
                "fan_num": len(fans),
                "fans": [
                    {"id": i, "max_rpm": 6600, "rpm": rpm, "status": "ok"}
                    for i, rpm in enumerate(fans)
                ],
                "settings": {"mode": {"name": "auto", "param": 75}},
            },
            "devfee": round(ghs * 0.028, 2),
            "devfee_percent": 2.8,
            "found_blocks": 0,
            "hr_average": round(ghs * 0.99, 2),
            "hr_error": 0.02 if hashing else 0.0,
            "hr_nominal": round(m.nominal_ths * 1000.0, 2),
            "hr_realtime": round(ghs, 2),
            "hr_stock": round(m.nominal_ths * 1000.0, 2),
            "hw_errors": elapsed // 300,
            "hw_errors_percent": 0.01 if hashing else 0.0,
            "instant_hashrate": round(ghs * 1000.0, 2),  # deprecated: MH/s
            "miner_status": {
                "miner_state": state,
                "miner_state_time": int(t - rig.mode_t),
                "throttled": 100,
            },
            "miner_type": miner_type(m),
            "pcb_temp": {"max": round(max(pcb)), "min": round(min(pcb)) - 7},
            "pools": [
                {
                    "accepted": accepted,
                    "asic_boost": True,
                    "diff": "524K",
                    "diffa": 524288.0,
                    "id": 0,
                    "ls_diff": 524288.0,
                    "ls_time": "0:00:03",
                    "ping": 42,
                    "pool_type": "UserPool",
                    "rejected": accepted // 400,
                    "stale": 0,
                    "status": "active" if hashing else "working",
                    "url": "btc.global.luxor.tech:700",
                    "user": f"rigd.{self.rig_id}",
                }
            ],
            "power_consumption": watts,
            "power_efficiency": efficiency,
            "power_usage": round(efficiency),  # deprecated: "same as power_efficiency"
            "restart_count": 0,
        }
        return {"miner": miner}

    async def _summary(self, request: web.Request) -> web.Response:
        return json_response(self.summary(self.farm.now()))

    def _network(self) -> dict[str, Any]:
        return {
            "dns": ["8.8.8.8"],
            "gateway": ".".join([*self.host.split(".")[:3], "1"]),
            "hostname": f"vnish-{self.rig_id}",
            "ip": self.host,
            "mac": self.rig.mac.upper(),
            "netmask": "255.255.255.0",
        }

    async def _info(self, request: web.Request) -> web.Response:
        rig = self.rig
        uptime = rig.uptime_s(self.farm.now())
        return json_response(
            {
                "algorithm": "sha256d",
                "build_name": "",
                "build_time": "2025-06-10 14:22:31",
                "build_uuid": f"{zlib.crc32(rig.serial.encode()):08x}",
                "fw_name": "Vnish",
                "fw_version": VNISH_VERSION,
                "hr_measure": "GH/s",
                "install_type": "nand",
                "miner": rig.model.name,
                "model": rig.model.name.lower().replace("antminer ", "").replace(" ", ""),
                "platform": "xil",
                "serial": rig.serial,
                "system": {
                    "file_system_version": "2025.06",
                    "mem_buf": 10240,
                    "mem_buf_percent": 4,
                    "mem_free": 150000,
                    "mem_free_percent": 60,
                    "mem_total": 250000,
                    "miner_name": f"vnish-{self.rig_id}",
                    "network_status": self._network(),
                    "os": "GNU/Linux",
                    "uptime": f"{uptime // 86400} days, {uptime % 86400 // 3600}:"
                    f"{uptime % 3600 // 60:02d}",
                },
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        t = self.farm.now()
        return json_response(
            {
                "find_miner": False,
                "miner_state": self.miner_state(t),
                "miner_state_time": int(t - self.rig.mode_t),
                "reboot_required": False,
                "restart_required": False,
                "throttled": 100,
                "unlocked": self._authorised(request),
                "warranty": "not_provided",
            }
        )

    def _current(self) -> Preset:
        return self.preset_named(self.preset) or self.presets[-1]

    async def _perf_summary(self, request: web.Request) -> web.Response:
        current = self._current().as_reply()
        return json_response(
            {
                "current_preset": current,
                "preset_switcher": {
                    "check_time": 60,
                    "decrease_temp": 75,
                    "min_preset": self.presets[0].name,
                    "rise_temp": 60,
                    "top_preset": self.preset,
                },
            }
        )

    async def _presets(self, request: web.Request) -> web.Response:
        if (refused := self._secured(request)) is not None:
            return refused
        return json_response([p.as_reply() for p in self.presets])

    async def _get_settings(self, request: web.Request) -> web.Response:
        if (refused := self._secured(request)) is not None:
            return refused
        m = self.rig.model
        net = self._network()
        return json_response(
            {
                "miner": {
                    "cooling": {
                        "fan_min_count": m.fans,
                        "fan_min_duty": 10,
                        "mode": {"name": "auto", "param": 75},
                    },
                    "misc": {"restart_temp": 95, "quiet_mode": False},
                    "overclock": {"globals": {"freq": 525, "volt": 1340}, "preset": self.preset},
                    "pools": [
                        {
                            "url": "btc.global.luxor.tech:700",
                            "user": f"rigd.{self.rig_id}",
                            "pass": "x",
                        },
                        {"url": "", "user": "", "pass": ""},
                        {"url": "", "user": "", "pass": ""},
                    ],
                },
                "network": {
                    "dhcp": True,
                    "dnsservers": net["dns"],
                    "gateway": net["gateway"],
                    "hostname": net["hostname"],
                    "ipaddress": net["ip"],
                    "netmask": net["netmask"],
                },
                "regional": {"timezone": {"current": "GMT"}},
                "ui": {"locale": "en", "theme": "auto"},
            }
        )


class VNishFleet(Fleet[Any]):
    """Every VNish rig of a farm: its 4028 API and its web API (4028 and 80 on its own
    address with `subnet`; ephemeral ports otherwise)."""

    def __init__(
        self,
        farm: Farm,
        *,
        host: str = "127.0.0.1",
        subnet: str | None = None,
        rig_ids: Iterable[str] | None = None,
        password: str = DEFAULT_PASSWORD,
    ) -> None:
        outlets = outlets_of(farm)
        hosts = subnet_hosts(farm, subnet) if subnet is not None else {}
        keep = set(farm.rigs if rig_ids is None else rig_ids)
        wanted = [r for r in farm.rigs if r in keep]
        for rid in wanted:
            farm.rigs[rid].firmware = FIRMWARE
        self.rpc: dict[str, VNishRpcServer] = {
            rid: VNishRpcServer(
                farm,
                rid,
                host=hosts.get(rid, host),
                port=4028 if subnet is not None else 0,
                outlet=outlets.get(rid),
            )
            for rid in wanted
        }
        self.web: dict[str, VNishWebServer] = {
            rid: VNishWebServer(
                farm,
                rid,
                host=hosts.get(rid, host),
                port=WEB_PORT if subnet is not None else 0,
                password=password,
                outlet=outlets.get(rid),
            )
            for rid in wanted
        }
        self.servers: dict[str, Any] = {
            **{f"{r}/rpc": s for r, s in self.rpc.items()},
            **{f"{r}/web": s for r, s in self.web.items()},
        }

    def address_of(self, rig_id: str) -> tuple[str, int]:
        server = self.rpc[rig_id]
        return server.host, server.port
