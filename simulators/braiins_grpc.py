"""Simulated Braiins OS public gRPC API (port 50051) for a `SimRig` on BOS.

Braiins OS has served this API since 23.03, and before its REST API (25.07) it is the only
way to pause, resume and set power targets; pyasic reads and controls every BOS+ rig
through it (`BOSer`). It is the same firmware as `simulators.braiins` (REST) and the
"bosminer" dialect of `simulators.cgminer` (4028): all three act on one `SimRig`, and the
rig's views (details, stats, hashboards, cooling, tuner state, constraints) are built once
(`simulators.braiins.BosViews`) and only put into messages here.

Messages and services are Braiins' published definitions (`drivers.braiins_grpc.proto`,
generated from github.com/braiins/bos-plus-api 1.7.0), served by grpclib over HTTP/2
without TLS, as the firmware serves them:

- `braiins.bos.ApiVersionService/GetApiVersion` (no login): the API version of the BOS
  release imitated (`BOS_RELEASES`: 1.7.0 for 25.07, 1.3.0 for 24.09, ...);
- `braiins.bos.v1.AuthenticationService/Login`: the token comes back in the response's
  initial metadata `authorization` (and in `LoginResponse.token`); every other call needs
  it in its own `authorization` metadata, else UNAUTHENTICATED. Tokens live
  `token_timeout_s` (3600 s) after their last use, as the API documents;
- `ActionsService`: `Start`, `Stop`, `PauseMining`, `ResumeMining`, `Restart`,
  `SetLocateDeviceStatus`, `GetLocateDeviceStatus` (`already_*` flags as documented);
- `PerformanceService`: `GetTunerState`, `GetActivePerformanceMode`, `SetPowerTarget`,
  `SetDefaultPowerTarget` (any `save_action` applies at once; a target outside the tuner's
  range is INVALID_ARGUMENT);
- `MinerService`: `GetMinerDetails`, `GetMinerStats`, `GetHashboards`, `GetErrors` (none);
- `CoolingService/GetCoolingState`, `PoolService/GetPoolGroups`,
  `ConfigurationService/GetConstraints` and `GetMinerConfiguration` (one pool group,
  automatic cooling at 75/85/95 °C, the power-target tuner).

Other methods answer UNIMPLEMENTED (the generated bases' default).

Simulator assumptions (not documented, chosen to be plausible):

- A wrong username or password is UNAUTHENTICATED with the message "invalid credentials".
- `Stop` pauses the rig as `PauseMining` does (the farm model has one idle state), and
  `Start`/`Restart` resume it; `Restart` does not model bosminer's restart time.
- SAVE_AND_FORCE_APPLY (which restarts bosminer on real units) is not distinguished from
  SAVE_AND_APPLY.
- The pool group is one group "default" holding the rig's pool with share counters from
  the farm model.
- A rig that is not `api_up` (outlet off, booting) answers UNAVAILABLE; "refuse" closes the
  listener as the other simulators do.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import string
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import betterproto
import grpclib
import grpclib.events
import grpclib.server
import structlog
from grpclib.const import Status

from drivers.braiins_grpc.proto import bos
from drivers.braiins_grpc.proto.bos import v1
from simulators.braiins import BOS_VERSION, BosViews
from simulators.cgminer import POOL_URL
from simulators.farm import Farm, RigMode, SimPdu
from simulators.fleet import Fleet
from simulators.server import RigServer

log = structlog.get_logger(__name__)

Json = dict[str, Any]

DEFAULT_PORT: Final = 50051
TOKEN_TIMEOUT_S: Final = 3600
FAULTS: Final = frozenset({"refuse"})
_TOKEN_ALPHABET: Final = string.ascii_letters + string.digits
_UNAUTHENTICATED_METHODS: Final = frozenset(
    {
        "/braiins.bos.ApiVersionService/GetApiVersion",
        "/braiins.bos.v1.AuthenticationService/Login",
    }
)
LOGIN_METHOD: Final = "/braiins.bos.v1.AuthenticationService/Login"

# BOS release -> (public API version, `bos_version.current`); from Braiins' version table.
BOS_RELEASES: Final[Mapping[str, tuple[tuple[int, int, int], str]]] = {
    "25.07": ((1, 7, 0), BOS_VERSION),
    "25.05": ((1, 6, 0), "2025-06-10-0-83b8729a-25.05-plus"),
    "25.03": ((1, 5, 0), "2025-04-09-0-7ff1b7f2-25.03-plus"),
    "25.01": ((1, 4, 0), "2025-02-26-0-d4c3903b-25.01-plus"),
    "24.09": ((1, 3, 0), "2024-10-08-0-60441aa5-24.09-plus"),
    "24.03": ((1, 0, 0), "2024-03-28-0-5c6ba12e-24.03-plus"),
}
# The first release with the public REST API (the earliest whose REST replies we hold).
REST_SINCE: Final = "25.07"
_DIGITS_UNIT = re.compile(r"^(.*_\d+)([smh])$")  # REST "last_5s" is gRPC "last_5_s"


def has_rest(release: str) -> bool:
    """Whether a BOS release (e.g. "24.09") serves the public REST API."""
    return _release_key(release) >= _release_key(REST_SINCE)


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


# -- JSON views into messages ------------------------------------------------------------


def to_message(cls: type[betterproto.Message], data: Mapping[str, Any]) -> Any:
    """A betterproto message from the REST view's JSON (the same field names, but for
    digit-unit suffixes like "last_5s"; timestamps as {"seconds", "nanos"})."""
    msg = cls()
    meta: Any = msg._betterproto  # type: ignore[arg-type]  # betterproto's own metadata
    for key, value in data.items():
        name = key if key in meta.meta_by_field_name else _DIGITS_UNIT.sub(r"\1_\2", key)
        if name not in meta.meta_by_field_name or value is None:
            continue
        field = meta.meta_by_field_name[name]
        if field.proto_type == betterproto.TYPE_MESSAGE and not field.wraps:
            sub = meta.cls_by_field[name]
            if sub is dt.datetime:
                value = dt.datetime.fromtimestamp(value.get("seconds", 0), tz=dt.UTC)
            elif isinstance(value, list):
                value = [to_message(sub, v) for v in value]
            else:
                value = to_message(sub, value)
        elif field.proto_type == betterproto.TYPE_ENUM:
            value = meta.cls_by_field[name](value)
        setattr(msg, name, value)
    return msg


class BraiinsGrpcServer(BosViews, RigServer):
    """The gRPC API of one simulated BOS rig. See the module docstring for its behaviour."""

    faults: ClassVar[frozenset[str]] = FAULTS

    def __init__(
        self,
        farm: Farm,
        rig_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        username: str = "root",
        password: str = "root",
        release: str = "25.07",
        token_timeout_s: int = TOKEN_TIMEOUT_S,
        outlet: tuple[SimPdu, int] | None = None,
    ) -> None:
        if release not in BOS_RELEASES:
            raise ValueError(f"unknown BOS release {release!r}; known: {', '.join(BOS_RELEASES)}")
        super().__init__(farm, rig_id, host=host, outlet=outlet)
        self.port = port
        self.username = username
        self.password = password
        self.release = release
        self.api_version, self.bos_version = BOS_RELEASES[release]
        self.token_timeout_s = token_timeout_s
        self.tokens: dict[str, float] = {}  # token -> farm time of its last use
        self.locate = False
        self.calls: list[str] = []  # every method called, in order, for tests
        self.logins = 0
        self._server: grpclib.server.Server | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._server is None:
            await self._listen()
            log.debug("braiins_grpc.started", rig=self.rig_id, host=self.host, port=self.port)

    def _listening(self) -> bool:
        return self._server is not None

    async def _listen(self) -> None:
        server = grpclib.server.Server(_services(self))
        grpclib.events.listen(server, grpclib.events.RecvRequest, self._on_request)
        await server.start(self.host, self.port, reuse_address=True)
        listener: Any = server._server  # grpclib keeps the asyncio.Server it started
        sockets = listener.sockets if listener is not None else ()
        if sockets:
            self.port = sockets[0].getsockname()[1]  # port 0: the ephemeral one taken
        self._server = server

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    # -- every request ---------------------------------------------------------

    async def _on_request(self, event: grpclib.events.RecvRequest) -> None:
        """The gate before each call: a dead rig, and the token (Login sends one back)."""
        self.calls.append(event.method_name)
        if not self._api_up() or self.fault == "refuse":  # a connection kept from before
            raise grpclib.GRPCError(Status.UNAVAILABLE, "miner is not running")
        if event.method_name == LOGIN_METHOD:
            event.method_func = self._login
            return
        if event.method_name in _UNAUTHENTICATED_METHODS:
            return
        token = event.metadata.get("authorization")
        t = self.farm.now()
        last = self.tokens.get(token) if isinstance(token, str) else None
        if last is None or t - last > self.token_timeout_s:
            raise grpclib.GRPCError(Status.UNAUTHENTICATED, "missing or invalid token")
        self.tokens[str(token)] = t

    async def _login(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if not isinstance(request, v1.LoginRequest) or (request.username, request.password) != (
            self.username,
            self.password,
        ):
            raise grpclib.GRPCError(Status.UNAUTHENTICATED, "invalid credentials")
        token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(16))
        self.tokens[token] = self.farm.now()
        self.logins += 1
        await stream.send_initial_metadata(metadata={"authorization": token})
        await stream.send_message(v1.LoginResponse(token=token, timeout_s=self.token_timeout_s))

    # -- what the services answer ----------------------------------------------

    def check_power_target(self, watt: int) -> None:
        m = self.rig.model
        if not m.min_w <= watt <= m.max_w:
            raise grpclib.GRPCError(
                Status.INVALID_ARGUMENT,
                f"power target {watt} W is out of range {m.min_w:.0f}-{m.max_w:.0f} W",
            )

    def configuration(self) -> v1.GetMinerConfigurationResponse:
        """The miner's configuration: one pool group, automatic cooling, the power tuner."""
        pool = v1.PoolConfiguration(
            uid="1", url=POOL_URL, user=f"rigd.{self.rig_id}", password="", enabled=True
        )
        group = v1.PoolGroupConfiguration(
            uid="1", name="default", quota=v1.Quota(value=1), pools=[pool]
        )
        temperature = v1.CoolingConfiguration(
            auto=v1.CoolingAutoMode(
                minimum_required_fans=1,
                target_temperature=v1.Temperature(degree_c=75.0),
                hot_temperature=v1.Temperature(degree_c=85.0),
                dangerous_temperature=v1.Temperature(degree_c=95.0),
            ),
        )
        tuner = v1.TunerConfiguration(
            enabled=True,
            tuner_mode=v1.TunerMode(v1.TunerMode.POWER_TARGET),
            power_target=v1.Power(watt=round(self.rig.target_w)),
        )
        return v1.GetMinerConfigurationResponse(
            pool_groups=[group], temperature=temperature, tuner=tuner
        )

    def pool_groups(self) -> v1.GetPoolGroupsResponse:
        stats = self.stats_view()["pool_stats"]
        pool = v1.Pool(
            uid="1",
            url=POOL_URL,
            user=f"rigd.{self.rig_id}",
            enabled=True,
            alive=True,
            active=self.rig.is_hashing(self.farm.now()),
            stats=to_message(v1.PoolStats, stats),
        )
        group = v1.PoolGroup(name="default", quota=v1.Quota(value=1), pools=[pool])
        return v1.GetPoolGroupsResponse(pool_groups=[group])


def _services(sim: BraiinsGrpcServer) -> list[Any]:
    """The service implementations, each a thin layer over the simulator."""

    class ApiVersion(bos.ApiVersionServiceBase):
        async def get_api_version(self, request: bos.ApiVersionRequest) -> bos.ApiVersion:
            major, minor, patch = sim.api_version
            return bos.ApiVersion(major=major, minor=minor, patch=patch)

    class Authentication(v1.AuthenticationServiceBase):
        pass  # Login is answered by the request gate (it must set response metadata)

    class Actions(v1.ActionsServiceBase):
        async def start(self, request: v1.StartRequest) -> v1.StartResponse:
            already = sim.rig.mode == RigMode.MINING
            sim.rig.wake(sim.farm.now())
            return v1.StartResponse(already_running=already)

        async def stop(self, request: v1.StopRequest) -> v1.StopResponse:
            already = sim.rig.mode == RigMode.SLEEPING
            sim.rig.sleep(sim.farm.now())
            return v1.StopResponse(already_stopped=already)

        async def restart(self, request: v1.RestartRequest) -> v1.RestartResponse:
            already = sim.rig.mode == RigMode.MINING
            sim.rig.wake(sim.farm.now())
            return v1.RestartResponse(already_running=already)

        async def pause_mining(self, request: v1.PauseMiningRequest) -> v1.PauseMiningResponse:
            already = sim.rig.mode == RigMode.SLEEPING
            sim.rig.sleep(sim.farm.now())
            return v1.PauseMiningResponse(already_paused=already)

        async def resume_mining(self, request: v1.ResumeMiningRequest) -> v1.ResumeMiningResponse:
            already = sim.rig.mode == RigMode.MINING
            sim.rig.wake(sim.farm.now())
            return v1.ResumeMiningResponse(already_mining=already)

        async def set_locate_device_status(
            self, request: v1.SetLocateDeviceStatusRequest
        ) -> v1.LocateDeviceStatusResponse:
            sim.locate = request.enable
            return v1.LocateDeviceStatusResponse(enabled=sim.locate)

        async def get_locate_device_status(
            self, request: v1.GetLocateDeviceStatusRequest
        ) -> v1.LocateDeviceStatusResponse:
            return v1.LocateDeviceStatusResponse(enabled=sim.locate)

    class Performance(v1.PerformanceServiceBase):
        async def get_tuner_state(self, request: v1.GetTunerStateRequest) -> Any:
            view = sim.tuner_state_view()
            state = view["mode_state"]["powertargetmodestate"]
            return v1.GetTunerStateResponse(
                overall_tuner_state=v1.TunerState(view["overall_tuner_state"]),
                power_target_mode_state=to_message(v1.PowerTargetModeState, state),
            )

        async def get_active_performance_mode(
            self, request: v1.GetPerformanceModeRequest
        ) -> v1.PerformanceMode:
            target = v1.Power(watt=round(sim.rig.target_w))
            mode = v1.TunerPerformanceMode(power_target=v1.PowerTargetMode(power_target=target))
            return v1.PerformanceMode(tuner_mode=mode)

        async def set_power_target(
            self, request: v1.SetPowerTargetRequest
        ) -> v1.SetPowerTargetResponse:
            watt = request.power_target.watt
            sim.check_power_target(watt)
            sim.rig.set_power_target(float(watt), sim.farm.now())
            return v1.SetPowerTargetResponse(power_target=v1.Power(watt=watt))

        async def set_default_power_target(
            self, request: v1.SetDefaultPowerTargetRequest
        ) -> v1.SetPowerTargetResponse:
            sim.rig.set_power_target(None, sim.farm.now())
            watt = round(sim.rig.model.nominal_w)
            return v1.SetPowerTargetResponse(power_target=v1.Power(watt=watt))

    class Miner(v1.MinerServiceBase):
        async def get_miner_details(
            self, request: v1.GetMinerDetailsRequest
        ) -> v1.GetMinerDetailsResponse:
            details = dict(sim.details_view())
            details.pop("serial_number", None)  # null in the REST capture: unset here
            msg: v1.GetMinerDetailsResponse = to_message(v1.GetMinerDetailsResponse, details)
            msg.serial_number = sim.rig.serial
            return msg

        async def get_miner_stats(
            self, request: v1.GetMinerStatsRequest
        ) -> v1.GetMinerStatsResponse:
            stats = dict(sim.stats_view())
            last = stats["pool_stats"].get("last_share_time") or {}
            stats["pool_stats"] = {**stats["pool_stats"], "last_share_time": last}
            result: v1.GetMinerStatsResponse = to_message(v1.GetMinerStatsResponse, stats)
            return result

        async def get_hashboards(
            self, request: v1.GetHashboardsRequest
        ) -> v1.GetHashboardsResponse:
            result: v1.GetHashboardsResponse = to_message(
                v1.GetHashboardsResponse, sim.hashboards_view()
            )
            return result

        async def get_errors(self, request: v1.GetErrorsRequest) -> v1.GetErrorsResponse:
            return v1.GetErrorsResponse()

    class Cooling(v1.CoolingServiceBase):
        async def get_cooling_state(
            self, request: v1.GetCoolingStateRequest
        ) -> v1.GetCoolingStateResponse:
            result: v1.GetCoolingStateResponse = to_message(
                v1.GetCoolingStateResponse, sim.cooling_view()
            )
            return result

    class Pools(v1.PoolServiceBase):
        async def get_pool_groups(
            self, request: v1.GetPoolGroupsRequest
        ) -> v1.GetPoolGroupsResponse:
            return sim.pool_groups()

    class Configuration(v1.ConfigurationServiceBase):
        async def get_miner_configuration(
            self, request: v1.GetMinerConfigurationRequest
        ) -> v1.GetMinerConfigurationResponse:
            return sim.configuration()

        async def get_constraints(
            self, request: v1.GetConstraintsRequest
        ) -> v1.GetConstraintsResponse:
            result: v1.GetConstraintsResponse = to_message(
                v1.GetConstraintsResponse, sim.constraints_view()
            )
            return result

    return [
        ApiVersion(),
        Authentication(),
        Actions(),
        Performance(),
        Miner(),
        Cooling(),
        Pools(),
        Configuration(),
    ]


class BraiinsGrpcFleet(Fleet[BraiinsGrpcServer]):
    """The gRPC side of every "bosminer" rig of a farm, one server per rig address (as
    `simulators.braiins.BraiinsRestFleet`: `hosts` from the rigs' 4028 servers; `port` 0
    for ephemeral ports when rigs share an address)."""

    def __init__(
        self,
        farm: Farm,
        hosts: Mapping[str, str],
        *,
        port: int = DEFAULT_PORT,
        username: str = "root",
        password: str = "root",
        release: str = "25.07",
    ) -> None:
        self.servers: dict[str, BraiinsGrpcServer] = {
            rid: BraiinsGrpcServer(
                farm,
                rid,
                host=host,
                port=port,
                username=username,
                password=password,
                release=release,
            )
            for rid, host in hosts.items()
            if farm.rigs[rid].firmware == "bosminer"
        }


__all__ = ["BOS_RELEASES", "BraiinsGrpcFleet", "BraiinsGrpcServer", "has_rest", "to_message"]
