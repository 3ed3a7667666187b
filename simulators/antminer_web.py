"""The stock Antminer web UI (lighttpd + CGI, HTTP digest auth) for simulated bmminer rigs.

Stock firmware can only be controlled through this UI, and it is the awkward part of the
firmware, so the simulator reproduces what drivers must cope with, each from the
reference material (miner-apis.md §1.2-1.3, §6-8):

- digest auth as lighttpd does it: realm "antMiner Configuration", MD5, qop="auth",
  configurable user/password (default root/root); every page, `/` included, needs it;
- `get_miner_conf.cgi` reports the mode as the *string* `"bitmain-work-mode"`;
- `set_miner_conf.cgi` changes the mode only for an *integer* `"miner-mode"`; posting
  `bitmain-work-mode` is answered `{"stats":"success","code":"M000","msg":"OK!"}` and
  ignored (asic-rs #245/#249), and so is a string `miner-mode` (pyasic #49: some builds
  "not liking a string formatted miner mode value");
- `set_miner_conf.cgi` answers only after ~21 s (`set_delay_s`; asic-rs #245);
- `get_system_info.cgi` in the captured S21 reply's shape;
- the status pages pyasic and the UI read: `summary.cgi` (rates and the health checks
  "rate", "network", "fans", "temp", each "s" unless a fault is raised through `alarms`),
  `stats.cgi` (per-chain rate, chips, serial and four-sensor `temp_pic`/`temp_pcb`/
  `temp_chip` lists, the same readings 4028's `stats` prints as "a-b-c-d" strings) and
  `pools.cgi`, each headed by a STATUS *object* (`when`, `Msg`, `api_version`) and an
  INFO object, in the shape of bmminer's `api_new.c` writers and of published replies of
  newer stock builds; `get_blink_status.cgi` `{"blink": bool}` and `blink.cgi`, which
  takes `{"blink": "true"|"false"}` (JSON or form) and answers `{"code": "B000"}` when
  the LED starts blinking, `"B100"` when it stops (the codes pyasic checks).

It drives the same `SimRig` as the 4028 `MinerServer` ("bmminer" dialect), so 4028 reads
show what the web UI set: sleep is `rig.sleep`, low power is `rig.set_power_target`.

Simulator assumptions (where the reference material is silent or unverified):

- A mode change is applied (config written, rig commanded) when the POST arrives; only
  the reply waits `set_delay_s`. A client that gives up early therefore finds the mode
  applied when it reads the config back, as asic-rs reports for the slow replies.
- A mode change restarts bmminer: with `rpc` (the rig's `MinerServer`) given, its 4028
  listener refuses connections for `rpc_restart_s` (reference: "briefly unreachable").
  The hashrate dip and ramp come from the farm model (sleep, boot and ramp times; a
  power-target change settles over `target_change_s`).
- Low-power mode (3) exists when `low_power_w` is set; by default at 70 % of the model's
  nominal power. The reference has no per-model figure. High mode (2) is not offered. A
  `miner-mode` the model lacks, or out of range, is answered M000 and ignored, like the
  other ignored writes.
- Fields a POST leaves out keep their value (the stock UI always posts pools and fans).
  A body that is not a JSON object is answered `{"stats":"error","code":"M001",
  "msg":"Illegal parameters!"}`; the real error reply is unknown.
- `get_miner_conf.cgi` comes in two shapes: the full `cgminer.conf` (S19 era, as quoted
  in §1.2) and, for the S21/T21/S21 Pro/S21 XP/S19 XP+/E9 Pro+ Release builds, the
  trimmed jq view `{pools, bitmain-fan-ctrl, bitmain-fan-pwm, bitmain-work-mode,
  bitmain-hashrate-percent, bitmain-user-ip-cat}` (seen in a public copy of the firmware's
  CGI script; `bitmain-user-ip-cat` reads null).
- The status pages' `api_version` is "1.0.0" and a failed health check's `code` is a
  small number per check: the real values on S19-era builds are not published. A
  malformed `blink.cgi` body answers `{"code": "B001"}`.
- CGI replies are `text/plain` JSON (the real content type is unverified; clients should
  not rely on it); reads take `get_delay_s` (0.2 s, unmeasured).
- Nonces are an HMAC'd timestamp valid for `nonce_ttl_s` (600 s); an expired one gets a
  fresh 401 with `stale=true`. Nonce counts are not checked for replays.
- The mode lives in the config file, so on real firmware it would survive a power cycle;
  the farm model instead boots a rig into mining. The config is not rewritten on reboot:
  after an outlet cycle a slept rig hashes while its config still says sleep, the
  inconsistency a driver must then resolve by writing the mode again.
- The web server is the control board's: while the rig is not `api_up` (outlet off,
  booting) connections are reset, as the 4028 simulator does.

Fault injection (`set_fault`): ``"silent"`` accepts connections and requests and never
answers; ``"garbage"`` answers every authorised CGI with HTTP 200 and a non-JSON body;
``"garbage-http"`` answers non-HTTP bytes and closes; ``"refuse"`` closes the listener
(re-opened on the same address when cleared); ``"ignore-writes"`` answers
`set_miner_conf.cgi` with M000 after the usual delay and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web

from simulators.cgminer import (
    BMMINER_COMPILE_TIME,
    BMMINER_MINER_VERSION,
    POOL_URL,
    SHARE_DIFFICULTY,
    MinerFleet,
    MinerServer,
    average_ths,
    bmminer_sensors,
)
from simulators.farm import Farm, RigMode, SimPdu
from simulators.fleet import Fleet, subnet_hosts
from simulators.server import SILENT_HOLD_S, RigServer

log = structlog.get_logger(__name__)

Json = dict[str, Any]

REALM: Final = "antMiner Configuration"
DEFAULT_USERNAME: Final = "root"
DEFAULT_PASSWORD: Final = "root"
SET_DELAY_S: Final = 21.0
GET_DELAY_S: Final = 0.2
RPC_RESTART_S: Final = 10.0
NONCE_TTL_S: Final = 600.0
MAX_BODY_BYTES: Final = 64 * 1024
LOW_POWER_FRACTION: Final = 0.7
WEB_API_VERSION: Final = "1.0.0"  # the status pages' `api_version`
_WEB_FREQ_MHZ: Final = 525
# summary.cgi check codes when a check fails (the firmware's numbers are not published).
_ALARM_CODES: Final = {"rate": 1, "network": 2, "fans": 3, "temp": 4}
FAULTS: Final = frozenset({"silent", "garbage", "garbage-http", "refuse", "ignore-writes"})

NORMAL: Final = 0
SLEEP: Final = 1
LOW_POWER: Final = 3

# Release builds of these models serve a trimmed get_miner_conf (module docstring).
TRIMMED_CONF_MODELS: Final = frozenset(
    {
        "Antminer S21",
        "Antminer T21",
        "Antminer S21 Pro",
        "Antminer S21 XP",
        "Antminer S19 XP+",
        "Antminer E9 Pro+",
    }
)

# The trimmed view's keys, and the keys only newer Release builds have in their config.
_TRIMMED_KEYS: Final = (
    "pools",
    "bitmain-fan-ctrl",
    "bitmain-fan-pwm",
    "bitmain-work-mode",
    "bitmain-hashrate-percent",
    "bitmain-user-ip-cat",
)
_RELEASE_ONLY_KEYS: Final = frozenset({"bitmain-hashrate-percent", "bitmain-user-ip-cat"})

SET_OK: Final = {"stats": "success", "code": "M000", "msg": "OK!"}
SET_BAD: Final = {"stats": "error", "code": "M001", "msg": "Illegal parameters!"}
_GARBAGE_BODY: Final = b'<html><body>\xff\xfe{"pools": [Internal Server Error</body></html>'
_GARBAGE_HTTP: Final = b"\x00\x17\x03\x03 not http at all \xff\xfe\r\n\r\n"
_HTML_401: Final = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html>\n<html><head>'
    "<title>401 Unauthorized</title></head><body><h1>401 Unauthorized</h1></body></html>\n"
)
_HTML_404: Final = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html>\n<html><head>'
    "<title>404 Not Found</title></head><body><h1>404 Not Found</h1></body></html>\n"
)
_AUTH_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_DEFAULT: Final[Any] = object()


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def parse_digest_header(header: str) -> dict[str, str] | None:
    """`Digest k="v", k2=v2` -> {k: v}; None when not a digest header."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    out: dict[str, str] = {}
    for m in _AUTH_PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        out[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return out


@dataclass(frozen=True, slots=True)
class Hit:
    """One request as the server saw it, for tests to assert on."""

    method: str
    path: str
    status: int
    user: str = ""  # the digest username offered, "" when none
    content_type: str = ""
    requested_with: str = ""  # X-Requested-With, as the stock browser UI sends it


class _Sink(asyncio.Protocol):
    """A connection that never reaches HTTP: reset at once, answered with junk, or held."""

    def __init__(self, kind: str, open_sinks: set[_Sink]) -> None:
        self.kind = kind
        self._open = open_sinks
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._open.add(self)
        if self.kind == "reset":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.kind == "garbage-http" and self.transport is not None:
            self.transport.write(_GARBAGE_HTTP)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class AntminerWebServer(RigServer):
    """One simulated stock Antminer's web UI. See the module docstring for its behaviour."""

    faults = FAULTS

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 80,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        set_delay_s: float = SET_DELAY_S,
        get_delay_s: float = GET_DELAY_S,
        low_power_w: float | None = _DEFAULT,
        trimmed_conf: bool | None = None,
        rpc: MinerServer | None = None,
        rpc_restart_s: float = RPC_RESTART_S,
        nonce_ttl_s: float = NONCE_TTL_S,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        super().__init__(farm, rig_id, host=host, outlet=outlet)
        rig = self.rig
        if rig.firmware != "bmminer":
            raise ValueError(
                f"rig {rig_id!r} runs {rig.firmware!r}; the stock web UI is for bmminer rigs"
            )
        m = rig.model
        if low_power_w is _DEFAULT:
            low_power_w = max(m.min_w, round(m.nominal_w * LOW_POWER_FRACTION))
        if low_power_w is not None and not (m.min_w <= low_power_w < m.nominal_w):
            raise ValueError(
                f"low_power_w {low_power_w} outside {m.min_w:.0f}-{m.nominal_w:.0f} W for {m.name}"
            )
        self.port = port
        self.username = username
        self.password = password
        self.set_delay_s = set_delay_s
        self.get_delay_s = get_delay_s
        self.low_power_w: float | None = low_power_w
        self.trimmed_conf = m.name in TRIMMED_CONF_MODELS if trimmed_conf is None else trimmed_conf
        self.rpc = rpc
        self.rpc_restart_s = rpc_restart_s
        self.nonce_ttl_s = nonce_ttl_s
        self.hits: list[Hit] = []  # every HTTP request, in order
        self.posts: list[Any] = []  # set_miner_conf bodies (parsed JSON, or the raw bytes)
        self.auth_failures = 0
        self.mode_changes = 0
        self.conf: Json = self._initial_conf()
        self.blinking = False  # the locate LED (blink.cgi)
        # summary.cgi faults by check ("rate", "network", "fans", "temp") -> message
        self.alarms: dict[str, str] = {}
        self._secret = secrets.token_bytes(16)
        self._http: web.Server | None = None
        self._listener: asyncio.Server | None = None
        self._sinks: set[_Sink] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rpc_refusing = False

    # -- state -----------------------------------------------------------------

    def _initial_conf(self) -> Json:
        rig = self.rig
        if rig.mode == RigMode.SLEEPING:
            mode = SLEEP
        elif self.low_power_w is not None and rig.power_target_w == self.low_power_w:
            mode = LOW_POWER
        else:
            mode = NORMAL
        pools = [{"url": POOL_URL, "user": f"rigd.{self.rig_id}", "pass": "x"} for _ in range(3)]
        return {
            "pools": pools,
            "api-listen": True,
            "api-network": True,
            "api-groups": "A:stats:pools:devs:summary:version",
            "api-allow": "A:0/0,W:*",
            "bitmain-fan-ctrl": False,
            "bitmain-fan-pwm": "100",
            "bitmain-use-vil": True,
            "bitmain-freq": "675",
            "bitmain-voltage": "1400",
            "bitmain-ccdelay": "0",
            "bitmain-pwth": "0",
            "bitmain-work-mode": str(mode),
            "bitmain-freq-level": "100",
            "bitmain-hashrate-percent": "100",
            "bitmain-user-ip-cat": None,
        }

    @property
    def work_mode(self) -> str:
        """The mode as the config file holds it ("0", "1", "3")."""
        return str(self.conf.get("bitmain-work-mode", ""))

    def supported_modes(self) -> frozenset[int]:
        return frozenset({NORMAL, SLEEP} | ({LOW_POWER} if self.low_power_w is not None else set()))

    def conf_view(self) -> Json:
        """What get_miner_conf.cgi prints for this build (jq prints null for a missing key)."""
        if self.trimmed_conf:
            return {k: self.conf.get(k) for k in _TRIMMED_KEYS}
        return {k: v for k, v in self.conf.items() if k not in _RELEASE_ONLY_KEYS}

    def system_info(self) -> Json:
        rig = self.rig
        s21 = rig.model.name in TRIMMED_CONF_MODELS
        return {
            "minertype": rig.model.name,
            "nettype": "DHCP",
            "netdevice": "eth0",
            "macaddr": rig.mac.upper(),
            "hostname": "Antminer",
            "ipaddress": self.host,
            "netmask": "255.255.255.0",
            "gateway": "",
            "dnsservers": "",
            "system_mode": "GNU/Linux",
            "system_kernel_version": "Linux 4.9.113 #1 SMP PREEMPT Thu Oct 9 18:55:45 CST 2025",
            "system_filesystem_version": "FR-1.12(251009-S21)" if s21 else BMMINER_COMPILE_TIME,
            "firmware_type": "Release",
            "serinum": rig.serial,
        }

    # -- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._http is None:
            self._http = web.Server(self._handle, access_log=None)
        if self._listener is None:
            await self._listen()
            log.debug("antminer_web.started", rig=self.rig_id, host=self.host, port=self.port)

    def _listening(self) -> bool:
        return self._listener is not None

    def _can_listen(self) -> bool:
        return self._http is not None  # started

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True)
        self.port = server.sockets[0].getsockname()[1]
        self._listener = server

    def _protocol(self) -> asyncio.BaseProtocol:
        if not self._api_up():
            return _Sink("reset", self._sinks)
        if self.fault in ("silent", "garbage-http"):
            return _Sink(self.fault, self._sinks)
        assert self._http is not None
        return self._http()

    async def _stop_listening(self) -> None:
        server, self._listener = self._listener, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def stop(self) -> None:
        await self._stop_listening()
        for sink in list(self._sinks):
            sink.abort()
        if self._http is not None:
            await self._http.shutdown(0.1)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._rpc_refusing and self.rpc is not None:
            self._rpc_refusing = False
            if self.rpc.fault == "refuse":
                await self.rpc.set_fault(None)

    # -- digest auth -----------------------------------------------------------

    def _nonce(self) -> str:
        stamp = f"{int(time.time()):08x}"
        mac = hmac.new(self._secret, stamp.encode(), hashlib.md5).hexdigest()
        return stamp + mac

    def _nonce_state(self, nonce: str) -> str:
        """ "ok", "stale" or "bad"."""
        stamp, mac = nonce[:8], nonce[8:]
        good = hmac.new(self._secret, stamp.encode(), hashlib.md5).hexdigest()
        if not hmac.compare_digest(mac, good):
            return "bad"
        try:
            issued = int(stamp, 16)
        except ValueError:
            return "bad"
        return "ok" if time.time() - issued <= self.nonce_ttl_s else "stale"

    def _challenge(self, *, stale: bool = False) -> web.Response:
        header = f'Digest realm="{REALM}", nonce="{self._nonce()}", qop="auth"'
        if stale:
            header += ", stale=true"
        return web.Response(
            status=401,
            text=_HTML_401,
            content_type="text/html",
            headers={"WWW-Authenticate": header},
        )

    def _check_auth(self, request: web.BaseRequest) -> tuple[web.Response | None, str]:
        """(None, user) when authorised, else (the 401 to send, the user offered)."""
        params = parse_digest_header(request.headers.get("Authorization", ""))
        if params is None:
            return self._challenge(), ""
        user = params.get("username", "")
        nonce = params.get("nonce", "")
        needed = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
        algorithm = params.get("algorithm", "MD5").upper()
        if any(k not in params for k in needed) or algorithm != "MD5" or params["qop"] != "auth":
            return self._challenge(), user
        state = self._nonce_state(nonce)
        if state != "ok":
            return self._challenge(stale=state == "stale"), user
        if params["realm"] != REALM or params["uri"] != request.raw_path:
            return self._challenge(), user
        ha1 = _md5(f"{self.username}:{REALM}:{self.password}")
        ha2 = _md5(f"{request.method}:{params['uri']}")
        expected = _md5(f"{ha1}:{nonce}:{params['nc']}:{params['cnonce']}:auth:{ha2}")
        if user != self.username or not hmac.compare_digest(expected, params["response"]):
            return self._challenge(), user
        return None, user

    # -- HTTP ------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        denied, user = self._check_auth(request)
        if denied is not None:
            if user:
                self.auth_failures += 1
            self.hits.append(self._hit(request, 401, user))
            return denied
        response = await self._route(request)
        self.hits.append(self._hit(request, response.status, user))
        return response

    @staticmethod
    def _hit(request: web.BaseRequest, status: int, user: str) -> Hit:
        return Hit(
            request.method,
            request.path,
            status,
            user,
            request.headers.get("Content-Type", ""),
            request.headers.get("X-Requested-With", ""),
        )

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path in ("/", "/index.html"):
            return web.Response(
                text="<html><head><title>Antminer</title></head><body></body></html>",
                content_type="text/html",
            )
        cgi = path.removeprefix("/cgi-bin/")
        handlers = {
            "get_miner_conf.cgi": self._get_miner_conf,
            "get_system_info.cgi": self._get_system_info,
            "set_miner_conf.cgi": self._set_miner_conf,
            "summary.cgi": self._summary,
            "stats.cgi": self._stats,
            "pools.cgi": self._pools,
            "get_blink_status.cgi": self._get_blink_status,
            "blink.cgi": self._blink,
        }
        handler = handlers.get(cgi) if path.startswith("/cgi-bin/") else None
        if handler is None:
            return web.Response(status=404, text=_HTML_404, content_type="text/html")
        if self.fault == "silent":  # switched on while this connection was open
            await asyncio.sleep(SILENT_HOLD_S)
        if self.fault == "garbage":
            await asyncio.sleep(self.get_delay_s)
            return web.Response(body=_GARBAGE_BODY, content_type="text/plain")
        return await handler(request)

    def _json(self, obj: Any) -> web.Response:
        return web.Response(text=json.dumps(obj, indent=1), content_type="text/plain")

    async def _get_miner_conf(self, request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(self.get_delay_s)
        return self._json(self.conf_view())

    async def _get_system_info(self, request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(self.get_delay_s)
        return self._json(self.system_info())

    # -- the status pages (the UI's own view of bmminer, JSON by CGI) ------------

    def _envelope(self, msg: str) -> Json:
        """The STATUS (an object here, not cgminer's list) and INFO heading every page."""
        return {
            "STATUS": {
                "STATUS": "S",
                "when": int(self.farm.now()),
                "Msg": msg,
                "api_version": WEB_API_VERSION,
            },
            "INFO": {
                "miner_version": BMMINER_MINER_VERSION,
                "CompileTime": BMMINER_COMPILE_TIME,
                "type": self.rig.model.name,
            },
        }

    def _rates(self, t: float) -> Json:
        rig = self.rig
        elapsed = rig.uptime_s(t)
        return {
            "elapsed": elapsed,
            "rate_5s": round(rig.hashrate_ths(t) * 1000.0, 2),
            "rate_avg": round(average_ths(rig, t, float(elapsed)) * 1000.0, 2),
            "rate_30m": round(average_ths(rig, t, 1800.0) * 1000.0, 2),
            "rate_ideal": round(rig.model.nominal_ths * 1000.0, 2),
            "rate_unit": "GH/s",
        }

    def status_checks(self, t: float) -> list[Json]:
        """summary.cgi's health checks: "s" unless a fault was raised (`alarms`)."""
        out = []
        for kind in ("rate", "network", "fans", "temp"):
            msg = self.alarms.get(kind)
            out.append(
                {
                    "type": kind,
                    "status": "s" if msg is None else "e",
                    "code": 0 if msg is None else _ALARM_CODES[kind],
                    "msg": msg or "",
                }
            )
        return out

    async def _summary(self, request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(self.get_delay_s)
        t = self.farm.now()
        entry: Json = {
            **self._rates(t),
            "hw_all": self.rig.uptime_s(t) // 90,
            "bestshare": SHARE_DIFFICULTY * 6,
            "status": self.status_checks(t),
        }
        return self._json({**self._envelope("summary"), "SUMMARY": [entry]})

    def board_sn(self, board: int) -> str:
        return f"JYZZ{self.rig.serial[-9:]}{board:02d}B"

    async def _stats(self, request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(self.get_delay_s)
        t = self.farm.now()
        rig, m = self.rig, self.rig.model
        hashing = rig.is_hashing(t)
        rates = rig.board_hashrates_ths(t)
        pcb, chip = rig.board_temps_c(t), rig.chip_temps_c(t)
        freq = round(_WEB_FREQ_MHZ * min(1.5, rig.hashrate_ths(t) / m.nominal_ths))
        chains = []
        for b in range(m.boards):
            acn = m.chips_per_board if hashing else 0
            chains.append(
                {
                    "index": b,
                    "freq_avg": freq if hashing else 0,
                    "rate_ideal": round(m.nominal_ths * 1000.0 / m.boards, 2),
                    "rate_real": round(rates[b] * 1000.0, 2),
                    "asic_num": acn,
                    "asic": " ".join("ooo" for _ in range(acn // 3)),
                    **bmminer_sensors(pcb[b], chip[b]),
                    "hw": rig.uptime_s(t) // 270 + 7 * b,
                    "eeprom_loaded": True,
                    "sn": self.board_sn(b),
                }
            )
        fans = rig.fans_rpm(t)
        entry: Json = {
            **self._rates(t),
            "chain_num": m.boards,
            "fan_num": len(fans),
            "fan": fans,
            "hwp_total": 0.0016 if hashing else 0.0,
            "miner-mode": int(self.work_mode) if self.work_mode.isdigit() else 0,
            "freq-level": int(self.conf.get("bitmain-freq-level", "100")),
            "chain": chains,
        }
        return self._json({**self._envelope("stats"), "STATS": [entry]})

    async def _pools(self, request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(self.get_delay_s)
        t = self.farm.now()
        elapsed = self.rig.uptime_s(t)
        accepted = int(average_ths(self.rig, t, float(elapsed)) * 1e12 * elapsed / 2**51)
        pools = []
        for i, p in enumerate(self.conf.get("pools", [])):
            got = accepted if i == 0 else 0
            pools.append(
                {
                    "index": i,
                    "url": p.get("url", ""),
                    "user": p.get("user", ""),
                    "status": "Alive" if p.get("url") else "Dead",
                    "priority": i,
                    "getworks": elapsed // 13 if i == 0 else 0,
                    "accepted": got,
                    "rejected": got // 400,
                    "discarded": 0,
                    "stale": 0,
                    "diff": f"{SHARE_DIFFICULTY:.4f}" if got else "0",
                    "diff1": got * 2,
                    "diffa": float(got * SHARE_DIFFICULTY),
                    "diffr": got // 400 * SHARE_DIFFICULTY,
                    "diffs": 0,
                    "lsdiff": SHARE_DIFFICULTY if got else 0,
                    "lstime": "0:00:03" if got else "0",
                }
            )
        return self._json({**self._envelope("pools"), "POOLS": pools})

    async def _get_blink_status(self, request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(self.get_delay_s)
        return self._json({"blink": self.blinking})

    async def _blink(self, request: web.BaseRequest) -> web.Response:
        """POST `{"blink": "true"|"false"}` (JSON, as pyasic sends it, or the UI's form):
        the locate LED; `{"code": "B000"}` when it starts, `"B100"` when it stops."""
        raw = await request.content.read(MAX_BODY_BYTES)
        text = raw.decode("utf-8", "replace")
        value: Any = None
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(text)
            value = body.get("blink") if isinstance(body, dict) else None
        if value is None and "blink=" in text:
            value = text.partition("blink=")[2].partition("&")[0]
        on = str(value).strip().lower() if value is not None else ""
        await asyncio.sleep(self.get_delay_s)
        if on not in ("true", "false"):
            return self._json({"code": "B001"})
        self.blinking = on == "true"
        return self._json({"code": "B000" if self.blinking else "B100"})

    async def _set_miner_conf(self, request: web.BaseRequest) -> web.Response:
        raw = await request.content.read(MAX_BODY_BYTES)
        try:
            body: Any = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            body = None
        self.posts.append(body if body is not None else raw)
        if not isinstance(body, dict):
            await asyncio.sleep(self.get_delay_s)
            return self._json(SET_BAD)
        if self.fault != "ignore-writes":
            await self._apply(body)
        await asyncio.sleep(self.set_delay_s)
        return self._json(SET_OK)

    # -- the firmware's config writer -------------------------------------------

    async def _apply(self, body: Json) -> None:
        pools = body.get("pools")
        if isinstance(pools, list):
            clean = [
                {k: str(p.get(k, "")) for k in ("url", "user", "pass")}
                for p in pools[:3]
                if isinstance(p, dict)
            ]
            clean += [{"url": "", "user": "", "pass": ""}] * (3 - len(clean))
            self.conf["pools"] = clean
        if isinstance(body.get("bitmain-fan-ctrl"), bool):
            self.conf["bitmain-fan-ctrl"] = body["bitmain-fan-ctrl"]
        pwm = body.get("bitmain-fan-pwm")
        if isinstance(pwm, str | int) and not isinstance(pwm, bool) and str(pwm).isdigit():
            self.conf["bitmain-fan-pwm"] = str(pwm)
        level = body.get("freq-level")
        if isinstance(level, str | int) and not isinstance(level, bool) and str(level).isdigit():
            self.conf["bitmain-freq-level"] = str(level)
        mode = body.get("miner-mode")
        # Only an integer miner-mode the model has is honoured; the rest is "OK" and ignored.
        if (
            isinstance(mode, bool)
            or not isinstance(mode, int)
            or mode not in self.supported_modes()
        ):
            return
        await self._set_mode(mode)

    async def _set_mode(self, mode: int) -> None:
        old = int(self.work_mode) if self.work_mode.isdigit() else NORMAL
        self.conf["bitmain-work-mode"] = str(mode)
        if mode == old:
            return
        self.mode_changes += 1
        t, rig = self.farm.now(), self.rig
        if mode == SLEEP:
            rig.sleep(t)
        else:
            rig.set_power_target(self.low_power_w if mode == LOW_POWER else None, t)
            if rig.mode == RigMode.SLEEPING:
                rig.wake(t)
        log.debug("antminer_web.mode", rig=self.rig_id, old=old, new=mode)
        if self.rpc is not None and self.rpc_restart_s > 0:
            await self._restart_rpc()

    async def _restart_rpc(self) -> None:
        """bmminer restarts with the new config: its 4028 API is gone for a moment."""
        rpc = self.rpc
        if rpc is None or rpc.fault is not None:
            return  # a test's own fault on the 4028 server wins
        await rpc.set_fault("refuse")
        self._rpc_refusing = True

        async def back() -> None:
            await asyncio.sleep(self.rpc_restart_s)
            if self._rpc_refusing and rpc.fault == "refuse":
                await rpc.set_fault(None)
            self._rpc_refusing = False

        task = asyncio.create_task(back())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class AntminerWebFleet(Fleet[AntminerWebServer]):
    """The web UI of every stock (bmminer) rig of a farm.

    Given the farm's `MinerFleet`, each UI sits on its rig's 4028 address (on `port`, 80 by
    default, when the fleet uses a loopback subnet; an ephemeral port otherwise) and takes
    that rig's `MinerServer` as `rpc`, so mode changes restart its 4028 API.
    """

    def __init__(
        self,
        farm: Farm,
        *,
        rpc: MinerFleet | None = None,
        host: str = "127.0.0.1",
        subnet: str | None = None,
        port: int = 80,
        **server_kw: Any,
    ) -> None:
        stock = [rid for rid, rig in farm.rigs.items() if rig.firmware == "bmminer"]
        addresses: dict[str, tuple[str, int]] = {}
        if rpc is not None:  # a UI for each stock rig the fleet serves (a farm's slice)
            for rid in (r for r in stock if r in rpc.servers):
                h, p = rpc.address_of(rid)
                addresses[rid] = (h, port if p == 4028 else 0)
        elif subnet is not None:
            hosts = subnet_hosts(farm, subnet)
            addresses = {rid: (hosts[rid], port) for rid in stock}
        else:
            addresses = {rid: (host, 0) for rid in stock}
        self.servers: dict[str, AntminerWebServer] = {
            rid: AntminerWebServer(
                farm,
                rid,
                host=h,
                port=p,
                rpc=rpc.servers[rid] if rpc is not None else None,
                **server_kw,
            )
            for rid, (h, p) in addresses.items()
        }
