"""A simulated Whatsminer states one power limit on every surface (v2 `summary` and
`status`, v3 `get.miner.status`, `get.miner.setting` and `get.device.info`), as real units
do out of the box (the rated power), and low mode caps it as a captured unit shows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from simulators.clock import ManualClock
from simulators.whatsminer import WHATSMINER_MODELS, WhatsminerServer, build_whatsminer_farm


def _server(model: str) -> WhatsminerServer:
    farm = build_whatsminer_farm(ManualClock(), rigs=1, models={model: 1.0})
    return WhatsminerServer(farm, next(iter(farm.rigs)), api="both")


def _v2(server: WhatsminerServer, cmd: str) -> dict[str, Any]:
    raw = server.respond_v2(json.dumps({"command": cmd}).encode())
    assert raw
    data: dict[str, Any] = json.loads(raw.rstrip(b"\x00"))
    return data


def _v3(server: WhatsminerServer, cmd: str, param: str | None = None) -> dict[str, Any]:
    reply = server.respond_v3(json.dumps({"cmd": cmd, "param": param}).encode())
    assert reply is not None and reply["code"] == 0
    msg: dict[str, Any] = reply["msg"]
    return msg


def _limits(server: WhatsminerServer) -> dict[str, int]:
    return {
        "v2 summary Power Limit": int(_v2(server, "summary")["SUMMARY"][0]["Power Limit"]),
        "v2 status power_limit_set": int(_v2(server, "status")["Msg"]["power_limit_set"]),
        "v3 summary power-limit": int(
            _v3(server, "get.miner.status", "summary")["summary"]["power-limit"]
        ),
        "v3 setting power-limit": int(_v3(server, "get.miner.setting")["power-limit"]),
        "v3 device power-limit-set": int(
            _v3(server, "get.device.info")["miner"]["power-limit-set"]
        ),
    }


@pytest.mark.parametrize("model", sorted(WHATSMINER_MODELS))
def test_one_limit_on_every_surface(model: str) -> None:
    server = _server(model)
    rated = round(WHATSMINER_MODELS[model].max_w)
    assert set(_limits(server).values()) == {rated}
    assert _v3(server, "get.miner.setting")["power"] == rated
    # The rig draws its nominal power under that limit, not the limit itself.
    t = server.farm.now()
    assert server.rig.power_w(t) == pytest.approx(WHATSMINER_MODELS[model].nominal_w, rel=0.01)


def test_a_set_limit_reads_alike_and_low_mode_caps_what_is_in_force() -> None:
    server = _server("Whatsminer M50S_VH50")
    server._set_limit(3000, server.farm.now())
    assert set(_limits(server).values()) == {3000}
    server._set_mode("low", server.farm.now())
    limits = _limits(server)
    low = round(WHATSMINER_MODELS["Whatsminer M50S_VH50"].nominal_w * 0.85)
    assert limits["v2 summary Power Limit"] == limits["v3 summary power-limit"] == low
    assert limits["v2 status power_limit_set"] == limits["v3 setting power-limit"] == 3000
