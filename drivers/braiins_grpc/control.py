"""The Braiins driver's control calls over the public gRPC API, answered in the REST API's
terms: imported only when a rig really speaks gRPC (a Braiins OS release before the REST
API, 25.07), so that a farm without such rigs never loads grpclib, betterproto and the
generated messages (about 25 MB of a daemon's memory).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import betterproto

from drivers.braiins import (
    CONSTRAINTS_PATH,
    DEFAULT_POWER_TARGET_PATH,
    DETAILS_PATH,
    PAUSE_PATH,
    POWER_TARGET_PATH,
    RESUME_PATH,
    TUNER_STATE_PATH,
    Json,
)
from drivers.braiins_grpc.client import BraiinsGrpcClient
from drivers.braiins_grpc.proto.bos import v1
from drivers.errors import UnsupportedOperation
from drivers.values import mapping


def _plain(value: Any) -> Any:
    """A message field's value as the REST API's JSON carries it: messages as objects with
    their proto field names, enums as numbers, timestamps as {"seconds": N}."""
    if isinstance(value, betterproto.Message):
        return _snake(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, betterproto.Enum):
        return int(value)
    if isinstance(value, datetime):
        return {"seconds": int(value.timestamp()), "nanos": 0}
    return value


def _snake(message: betterproto.Message) -> Json:
    """A message as JSON with proto (snake_case) field names; of a oneof, only the member
    set (betterproto 2.0.0b7's own `to_pydict` trips over oneofs)."""
    meta: Any = message._betterproto  # type: ignore[arg-type]  # betterproto's metadata
    out: Json = {}
    for name, field in meta.meta_by_field_name.items():
        if field.group and betterproto.which_one_of(message, field.group)[0] != name:
            continue
        value = getattr(message, name)
        if value is not None:
            out[name] = _plain(value)
    return out


class BraiinsGrpcControl:
    """The driver's control calls over the public gRPC API, answered in the REST API's
    terms (`miner/details`, `performance/tuner-state`, ...), so one driver serves both.

    Power targets are set with SAVE_AND_APPLY: applied without restarting bosminer (pyasic
    uses SAVE_AND_FORCE_APPLY, which restarts it; pyasic PR #421)."""

    def __init__(self, client: BraiinsGrpcClient) -> None:
        self.client = client

    async def close(self) -> None:
        await self.client.close()

    async def get(self, path: str, *, operation: str) -> Any:
        c = self.client
        if path == DETAILS_PATH:
            return _snake(
                await c.call("get_miner_details", v1.GetMinerDetailsRequest(), operation=operation)
            )
        if path == CONSTRAINTS_PATH:
            return _snake(
                await c.call("get_constraints", v1.GetConstraintsRequest(), operation=operation)
            )
        if path == TUNER_STATE_PATH:
            reply = await c.call("get_tuner_state", v1.GetTunerStateRequest(), operation=operation)
            state = _snake(reply)
            mode = state.get("power_target_mode_state")
            return {
                "overall_tuner_state": state.get("overall_tuner_state"),
                "mode_state": {"powertargetmodestate": mode} if mode else {},
            }
        raise UnsupportedOperation(
            f"no gRPC call for GET {path}", device=c.device, operation=operation
        )

    async def put(self, path: str, body: Any = None, *, operation: str) -> Any:
        c = self.client
        apply = v1.SaveAction(v1.SaveAction.SAVE_AND_APPLY)
        if path == PAUSE_PATH:
            reply = await c.call("pause_mining", v1.PauseMiningRequest(), operation=operation)
            return bool(reply.already_paused)
        if path == RESUME_PATH:
            reply = await c.call("resume_mining", v1.ResumeMiningRequest(), operation=operation)
            return bool(reply.already_mining)
        if path == DEFAULT_POWER_TARGET_PATH:
            default = v1.SetDefaultPowerTargetRequest(save_action=apply)
            reply = await c.call("set_default_power_target", default, operation=operation)
            return {"watt": reply.power_target.watt}
        if path == POWER_TARGET_PATH:
            watt = mapping(body).get("watt")
            if isinstance(watt, bool) or not isinstance(watt, int):
                raise ValueError(f"a power target is whole watts, got {watt!r}")
            request = v1.SetPowerTargetRequest(save_action=apply, power_target=v1.Power(watt=watt))
            reply = await c.call("set_power_target", request, operation=operation)
            return {"watt": reply.power_target.watt}
        raise UnsupportedOperation(
            f"no gRPC call for PUT {path}", device=c.device, operation=operation
        )


__all__ = ["BraiinsGrpcControl"]
