"""Simulated ePIC PowerPlay firmware: its HTTP JSON API on port 4028 and the web dashboard's
front page on port 80, for Antminers of the farm model flashed with ePIC's control board.

Served, with field names, types and order as in the captured replies of a PowerPlay-BMS
1.5.13 S19 XP (tests/fixtures/epic-powerplay-v1/) and the vendor's OpenAPI document
(ePIC UMC API 1.22.5 / 1.30.0): `GET /summary`, `/capabilities`, `/temps`, `/network`,
`/perpetualtune`; `POST /miner` ("Stop" / "Autostart"), `/perpetualtune` (on / off),
`/perpetualtune/algo` (algorithm and target), and the settings pyasic writes with a config
(`/fanspeed`, `/shutdowntemp`, `/criticaltemp`, `/coin`). A POST carries the password in its
body and is answered `{"result": true, "error": null}`, or `{"result": false, "error":
"BadPassword"}` (HTTP 200 both: the document lists no other status). Every other path is
aiohttp's plain 404. The API is an HTTP server, so a CGMiner request on 4028 (`{"command":
...}`) gets an HTTP 400 page.

Simulator assumptions (the captures and the document are silent; kept in one place):

- "Stop" takes the rig to sleep ("Stopping", then "Idling" once its power is down);
  "Autostart" wakes it ("Initializing" until the boards hash, then "Mining").
- A hashrate algorithm (VoltageOptimizer, BoardTune, ChipTune) at T TH/s runs the rig at the
  power the farm model needs for T; at the model's default hashrate it runs at nominal.
  The "Power" algorithm (offered in `/capabilities` only with `power_algorithm=True`, as
  newer firmware lists it in its enum) runs the rig at the target watts. Targets are
  clamped to the model's power range. Turning perpetual tune off returns to nominal.
- `Tune Presets` are five points of the model's power law, from about 55 % to 104 % of its
  nominal hashrate (the captured S19 XP lists six, from 80 to 169 TH/s).
- `PresetInfo.Target Power` is the power the rig is set to; "Last Command" and "Last
  Command Result" stay null (their format is unknown).
- The dashboard on port 80 answers `GET /` with a page titled "Miner Web Dashboard" (what
  pyasic looks for); nothing else.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web

from simulators.farm import Farm, RigMode, RigModel, SimPdu
from simulators.fleet import Fleet, outlets_of, subnet_hosts
from simulators.webserver import WebRigServer, json_response, text_response

FIRMWARE: Final = "epic"  # `SimRig.firmware` of a rig on ePIC PowerPlay
SOFTWARE: Final = "PowerPlay-BMS v1.5.13"
DEFAULT_PASSWORD: Final = "letmein"
API_PORT: Final = 4028
DASHBOARD_PORT: Final = 80
HASHRATE_ALGOS: Final = ("VoltageOptimizer", "ChipTune", "BoardTune")
ALGOS: Final = frozenset({*HASHRATE_ALGOS, "Power"})
PRESET_FRACTIONS: Final = (0.55, 0.7, 0.85, 1.0, 1.04)
DASHBOARD_HTML: Final = (
    '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Miner Web Dashboard</title>'
    '</head><body><div id="app"></div></body></html>'
)
_CHIP_TYPE: Final = {"Antminer S19 XP": "BM1366", "Antminer S21": "BM1368"}
_DEFAULT_CLOCK: Final = {"Antminer S19 XP": 485, "Antminer S21": 490}
_ALGO_NAMES: Final = {
    "VoltageOptimizer": "Voltage Optimizer",
    "ChipTune": "Chip Tune",
    "BoardTune": "Board Tune",
    "Power": "Power Tune",
}


def epic_model_name(model: RigModel) -> str:
    """ePIC spells Bitmain's brand "AntMiner"."""
    return model.name.replace("Antminer", "AntMiner", 1)


def power_for_ths(model: RigModel, ths: float) -> float:
    """The farm model's power for `ths` (its hashrate ~ power^0.85 above idle)."""
    floor = model.idle_w * 2
    frac = max(0.0, ths / model.nominal_ths)
    return float(floor + (model.nominal_w - floor) * frac ** (1 / 0.85))


def _sorted(obj: dict[str, Any]) -> dict[str, Any]:
    """PowerPlay serialises maps with sorted keys (as captured)."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return {k: walk(obj[k]) for k in sorted(obj)}


class EpicServer(WebRigServer):
    """One rig's PowerPlay API (see the module docstring)."""

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = API_PORT,
        password: str = DEFAULT_PASSWORD,
        power_algorithm: bool = False,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        super().__init__(farm, rig_id, host=host, port=port, outlet=outlet)
        self.password = password
        self.power_algorithm = power_algorithm
        m = self.rig.model
        self.default_ths = round(m.nominal_ths)
        self.tune_running = True
        self.algo = "VoltageOptimizer"
        self.targets: dict[str, float] = {a: float(self.default_ths) for a in HASHRATE_ALGOS}
        self.targets["Power"] = m.nominal_w
        self.posts: list[tuple[str, Any]] = []  # (path, param) of every accepted POST
        self.settings: dict[str, Any] = {}  # fans, temperatures, pools as last written

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/summary", self._summary)
        router.add_get("/capabilities", self._capabilities)
        router.add_get("/temps", self._temps)
        router.add_get("/network", self._network)
        router.add_get("/perpetualtune", self._get_tune)
        for path in (
            "/miner", "/perpetualtune", "/perpetualtune/algo", "/fanspeed", "/shutdowntemp",
            "/criticaltemp", "/coin",
        ):  # fmt: skip
            router.add_post(path, self._post)

    # -- writes ----------------------------------------------------------------

    @staticmethod
    def _result(ok: bool, error: str | None = None) -> web.Response:
        return json_response({"error": error, "result": ok})

    async def _post(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError) as exc:
            return text_response(400, f"Failed to parse the request body as JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("password"), str):
            return text_response(422, "Failed to deserialize the JSON body: missing `password`")
        if body["password"] != self.password:
            return self._result(False, "BadPassword")
        if "param" not in body:
            return self._result(False, "MissingParam")
        path, param, t = request.path, body["param"], self.farm.now()
        if path == "/miner":
            if param not in ("Stop", "Autostart"):
                return text_response(422, f"unknown variant {json.dumps(param)} of OpState")
            if param == "Stop":
                self.rig.sleep(t)
            else:
                self.rig.wake(t)
        elif path == "/perpetualtune":
            if not isinstance(param, bool):
                return text_response(422, "invalid type for `param`, expected a boolean")
            self.tune_running = param
            self._apply(t)
        elif path == "/perpetualtune/algo":
            error = self._set_algo(param, t)
            if error is not None:
                return error
        else:
            self.settings[path.strip("/")] = param
        self.posts.append((path, param))
        return self._result(True)

    def _set_algo(self, param: Any, t: float) -> web.Response | None:
        algo = param.get("algo") if isinstance(param, dict) else None
        target = param.get("target") if isinstance(param, dict) else None
        if algo not in ALGOS:
            return text_response(422, f"unknown variant {json.dumps(algo)} of the algorithm")
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            return text_response(422, "invalid type for `target`, expected u32")
        if algo == "Power" and not self.power_algorithm:
            return self._result(False, "UnknownError")
        self.algo = str(algo)
        self.targets[self.algo] = float(target)
        self.tune_running = True
        self._apply(t)
        return None

    def _apply(self, t: float) -> None:
        """The rig's power for the tune in force."""
        m = self.rig.model
        if not self.tune_running:
            watts: float | None = None
        elif self.algo == "Power":
            watts = self.targets["Power"]
        elif round(self.targets[self.algo]) == self.default_ths:
            watts = None
        else:
            watts = power_for_ths(m, self.targets[self.algo])
        if watts is not None:
            watts = min(m.max_w, max(m.min_w, watts))
            if abs(watts - m.nominal_w) < 0.5:
                watts = None
        self.rig.set_power_target(watts, t)

    # -- reads -----------------------------------------------------------------

    def operating_state(self, t: float) -> str:
        rig = self.rig
        if rig.mode == RigMode.SLEEPING:
            return "Stopping" if rig.power_w(t) > rig.model.idle_w * 1.5 else "Idling"
        return "Mining" if rig.is_hashing(t) else "Initializing"

    def _algo_stats(self, algo: str, t: float) -> dict[str, Any]:
        power = algo == "Power"
        return {
            "Min Throttle Target": round(self.rig.model.min_w) if power else 50,
            "Optimized": not self.rig.ramping(t),
            "Target": round(self.targets[algo]),
            "Throttle Step": 100 if power else 5,
            "Throttle Target": None,
            "Unit": "W" if power else "TH/s",
        }

    def summary(self, t: float) -> dict[str, Any]:
        rig, m = self.rig, self.rig.model
        state = self.operating_state(t)
        hashing = rig.is_hashing(t)
        boards = rig.board_hashrates_ths(t)
        temps = rig.board_temps_c(t)
        clock = _DEFAULT_CLOCK.get(m.name, 500)
        ideal = m.nominal_ths / m.boards
        elapsed = rig.uptime_s(t)
        avg_mhs = rig.hashrate_ths(t) * 1e6 * 0.97
        accepted = int(avg_mhs * 1e6 * elapsed / (262144 * 2**32))
        fans = rig.fans_rpm(t)
        hbs = [
            {
                "Core Clock": [],
                "Core Clock Avg": round(clock * ths / ideal, 1) if hashing else 0.0,
                "Hashrate": [
                    round(ths * 1e6, 1),
                    round(100 * ths / ideal, 1) if hashing else 0.0,
                    0.8 if hashing else 0.0,
                ],
                "Index": i,
                "Input Current": 0.0,
                "Input Power": 0.0,
                "Input Voltage": 12.6,
                "Output Current": 0.0,
                "Output Power": 0.0,
                "Output Voltage": 0.0,
                "Temperature": round(temps[i], 3),
            }
            for i, ths in enumerate(boards)
        ]
        return _sorted(
            {
                "Disable Board On Failure": True,
                "Enable Boards On Idle": False,
                "Fans": {
                    "Fan Mode": {"Auto": {"Idle Speed": 20, "Target Temperature": 60}},
                    "Fans Speed": min(100, round(max(fans, default=0) / 60)),
                    "Minimum Working Fans": 0,
                },
                "Fans Rpm": {
                    f"Fans Speed {n}": fans[n - 1] if n <= len(fans) else None for n in range(1, 13)
                },
                "HBStatus": [
                    {"Detected": True, "Enabled": True, "Index": i} for i in range(m.boards)
                ],
                "HBs": hbs,
                "Hostname": f"epic-{self.rig_id}",
                "HwConfig": {
                    "Boards Target Clock": [
                        {"Data": float(clock), "Index": i} for i in range(m.boards)
                    ]
                },
                "IdleOnConnectionLost": True,
                "Last License Error": None,
                "Mining": {"Algorithm": "SHA-256", "Coin": "BTC"},
                "Misc": {
                    "Critical Temp": 100.0,
                    "Locate Miner State": False,
                    "Shutdown Temp": 85.0,
                },
                "OS Type": "umcOS",
                "Overdrive": False,
                "PerpetualTune": {
                    "Algorithm": {self.algo: self._algo_stats(self.algo, t)},
                    "Running": self.tune_running,
                },
                "Power Supply Stats": {
                    "Input Current": 0.0,
                    "Input Power": round(rig.power_w(t), 4) if rig.powered else 0.0,
                    "Input Voltage": 0.0,
                    "Output Current": 0.0,
                    "Output Power": 0.0,
                    "Output Voltage": 12.595 if hashing else 0.0,
                    "Target Voltage": 12600,
                },
                "PresetInfo": {"Target Power": round(rig.target_w)},
                "Session": {
                    "Accepted": accepted,
                    "Active HBs": m.boards if hashing else 0,
                    "Average MHs": round(avg_mhs, 1),
                    "Difficulty": 262144.0,
                    "Last Accepted Share Timer": 25 if hashing else None,
                    "Last Accepted Share Timestamp": int(t) - 25 if hashing else None,
                    "Last Work Timer": 34,
                    "Last Work Timestamp": int(t) - 34,
                    "LastAverageMHs": {
                        "Hashrate": round(avg_mhs, 1),
                        "Timestamp": int(t) // 3600 * 3600,
                    },
                    "Rejected": accepted // 900,
                    "Startup String": "Wed, 13 Aug 2025 18:59:49 +0000",
                    "Startup Timestamp": int(rig.boot_t),
                    "Submitted": accepted + accepted // 900,
                    "Uptime": elapsed,
                    "WorkReceived": elapsed // 36,
                },
                "Software": SOFTWARE,
                "Status": {
                    "Last Command": None,
                    "Last Command Result": None,
                    "Last Error": None,
                    "Operating State": state,
                },
                "Stratum": {
                    "Average Latency": 0.038288616,
                    "Config Id": 0,
                    "Current Pool": "btc.global.luxor.tech:700",
                    "Current User": f"rigd.{self.rig_id}",
                    "IsPoolConnected": True,
                    "Worker Unique Id": True,
                    "Worker Unique Id Variant": "IpAddress",
                },
                "StratumConfigs": [
                    {
                        "login": f"rigd.{self.rig_id}",
                        "password": "x",
                        "pool": "stratum+tcp://btc.global.luxor.tech:700",
                    }
                ],
            }
        )

    def capabilities(self) -> dict[str, Any]:
        m = self.rig.model
        clock = _DEFAULT_CLOCK.get(m.name, 500)
        options = [
            {
                "algorithm": a,
                "description": f"Maintain the target by perpetually tuning ({_ALGO_NAMES[a]}).",
                "max": 300,
                "min": 60,
                "name": _ALGO_NAMES[a],
            }
            for a in HASHRATE_ALGOS
        ]
        if self.power_algorithm:
            options.append(
                {
                    "algorithm": "Power",
                    "description": "Maintain the target power by perpetually tuning clocks.",
                    "max": round(m.max_w),
                    "min": round(m.min_w),
                    "name": _ALGO_NAMES["Power"],
                }
            )
        crc = zlib.crc32(self.rig.serial.encode())
        presets = []
        for frac in PRESET_FRACTIONS:
            ths = m.nominal_ths * frac
            presets.append(
                {
                    "clk": round(clock * frac),
                    "hashrate": round(ths, 1),
                    "power": round(power_for_ths(m, ths)),
                    "voltage": round(12300 + 1200 * frac / PRESET_FRACTIONS[-1], -2),
                }
            )
        return _sorted(
            {
                "Board Serial Numbers": [f"YNAH{crc % 10**8:08d}C{i}S" for i in range(m.boards)],
                "Chip Type": _CHIP_TYPE.get(m.name, "BM1362"),
                "Chips Per Bank": 10,
                "Coins": ["BTC"],
                "Control Board Version": {
                    "carrierBoardVersion": "4.1.0",
                    "cpuHardware": "STM32 (Device Tree Support)",
                    "cpuSerial": f"{crc:024d}"[-24:],
                    "somBoardVersion": "7.1.0",
                },
                "Default Clock": clock,
                "Default Hashrate": self.default_ths,
                "Default Voltage": 12900,
                "Display": ["ClksAndVoltage", "ShutdownTemp", "PerpetualTune"],
                "Max Clock Configs": 1,
                "Max HBs": m.boards,
                "Model": epic_model_name(m),
                "Model Subtype": "BHB56801",
                "Performance Estimator": {
                    "Chip Count": m.chips_per_board,
                    "Hashes Per Second Per Chip": round(
                        m.nominal_ths * 1e6 / (m.boards * m.chips_per_board * clock), 1
                    ),
                },
                "PerpetualTune": options,
                "Psu Info": {"FW": 25, "Max Vout": 15182, "Min Vout": 11877, "PSU Type": 118},
                "Temp Sensor Info": {"Count": 2, "Type": "Board"},
                "Tune Presets": presets,
                "Voltage Estimator": {"Slope": 0.0041, "Y Intercept": 11.0},
            }
        )

    async def _summary(self, request: web.Request) -> web.Response:
        return json_response(self.summary(self.farm.now()))

    async def _capabilities(self, request: web.Request) -> web.Response:
        return json_response(self.capabilities())

    async def _temps(self, request: web.Request) -> web.Response:
        temps = self.rig.board_temps_c(self.farm.now())
        return json_response(
            [
                {"Data": [round(b - 12.0, 3), round(b, 3)], "Index": i, "Total": 0.0}
                for i, b in enumerate(temps)
            ]
        )

    async def _network(self, request: web.Request) -> web.Response:
        gateway = ".".join([*self.host.split(".")[:3], "1"])
        dhcp = {
            "address": self.host,
            "dns": "8.8.8.8",
            "gateway": gateway,
            "mac_address": self.rig.mac.upper(),
            "netmask": "255.255.255.0",
        }
        return json_response({"dhcp": dhcp})

    async def _get_tune(self, request: web.Request) -> web.Response:
        t = self.farm.now()
        stats = {a: self._algo_stats(a, t) for a in (*HASHRATE_ALGOS, "Power")}
        if not self.power_algorithm:
            del stats["Power"]
        return json_response(
            _sorted(
                {
                    "Algorithms": stats,
                    "Current Algorithm": self.algo,
                    "Enable": self.tune_running,
                    "Running": self.tune_running,
                }
            )
        )


class EpicDashboard(WebRigServer):
    """The front page of the rig's web dashboard (port 80): what identifies it to tools."""

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self._index)

    async def _index(self, request: web.Request) -> web.Response:
        return text_response(200, DASHBOARD_HTML, content_type="text/html")


class EpicFleet(Fleet[WebRigServer]):
    """Every ePIC rig of a farm: its API (4028 on its own address with `subnet`, else an
    ephemeral port) and, with `subnet`, its dashboard on port 80."""

    def __init__(
        self,
        farm: Farm,
        *,
        host: str = "127.0.0.1",
        subnet: str | None = None,
        rig_ids: Iterable[str] | None = None,
        power_algorithm: bool = False,
    ) -> None:
        outlets = outlets_of(farm)
        hosts = subnet_hosts(farm, subnet) if subnet is not None else {}
        keep = set(farm.rigs if rig_ids is None else rig_ids)
        wanted = [r for r in farm.rigs if r in keep]
        for rid in wanted:
            farm.rigs[rid].firmware = FIRMWARE
        self.api: dict[str, EpicServer] = {
            rid: EpicServer(
                farm,
                rid,
                host=hosts.get(rid, host),
                port=API_PORT if subnet is not None else 0,
                power_algorithm=power_algorithm,
                outlet=outlets.get(rid),
            )
            for rid in wanted
        }
        dashboards: dict[str, WebRigServer] = {}
        if subnet is not None:
            dashboards = {
                f"{rid}/dashboard": EpicDashboard(
                    farm, rid, host=hosts[rid], port=DASHBOARD_PORT, outlet=outlets.get(rid)
                )
                for rid in wanted
            }
        self.servers: dict[str, WebRigServer] = {**self.api, **dashboards}

    def address_of(self, rig_id: str) -> tuple[str, int]:
        server = self.api[rig_id]
        return server.host, server.port
