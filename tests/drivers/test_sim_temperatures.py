"""No simulated sensor reads below the room: not while a rig boots, not while it sleeps.

Every dialect's temperatures come from the farm model; this reads them the way each
firmware prints them (sensor strings, lists, per-board entries) right after a power
cycle, during the boot, and at full load, and checks each against the room's
temperature. A sensor a firmware prints as 0 is an absent one (an empty slot), not a
reading.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from simulators.braiins import BraiinsRestServer
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import AMBIENT_C, Farm
from simulators.whatsminer import WhatsminerServer, whatsminer_rig

_THRESHOLDS = {"Target", "Hot", "Dangerous", "ChipHot", "ChipDangerous", "WaterInletDangerous"}
_INDEXES = {"TEMP", "temp_num"}


def _readings(obj: Any, key: str = "") -> list[tuple[str, float]]:
    """(key, value) of every temperature in a reply, sensor strings split."""
    out: list[tuple[str, float]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _readings(v, str(k))
        return out
    if isinstance(obj, list):
        for v in obj:
            out += _readings(v, key)
        return out
    is_temp = any(w in key.lower() for w in ("temp", "degree_c")) or key in (
        "TopLeft", "TopRight", "BottomLeft", "BottomRight", "Board", "Chip",
    )  # fmt: skip
    if not is_temp or key in _THRESHOLDS | _INDEXES or isinstance(obj, bool):
        return out
    if isinstance(obj, str) and "-" in obj:
        return [(key, float(p)) for p in obj.split("-") if p and float(p) != 0.0]
    if isinstance(obj, int | float) and obj != 0:
        return [(key, float(obj))]
    return out


def _cg(server: MinerServer, cmd: str) -> Any:
    return json.loads(server.respond(cmd.encode()).rstrip(b"\x00"))


async def _all_readings(firmware: str, clock: ManualClock) -> list[tuple[str, float]]:
    farm = Farm.build(clock, rigs=1, pdus=1)
    rid = next(iter(farm.rigs))
    if firmware == "btminer":
        farm.rigs[rid] = whatsminer_rig(rid, "Whatsminer M50S_VH50", clock.now())
    rig = farm.rigs[rid]
    rig.firmware = firmware
    rig.set_powered(False, clock.now())
    rig.set_powered(True, clock.now())  # a power cycle: boots, then ramps
    out: list[tuple[str, float]] = []
    for step in (0.0, 5.0, 30.0, 120.0, 600.0):
        clock.advance(step)
        if firmware in ("luxos", "bmminer", "bosminer"):
            server = MinerServer(farm, rid)
            cmds = {
                "luxos": ["stats", "temps", "devs", "summary"],
                "bmminer": ["stats"],
                "bosminer": ["temps", "lcd"],
            }[firmware]
            for cmd in cmds:
                out += _readings(_cg(server, cmd))
            if firmware == "bosminer":
                rest = BraiinsRestServer(farm, rid)
                for handler in (rest._hashboards, rest._cooling):
                    out += _readings(json.loads((await handler(None)).text))  # type: ignore[arg-type]
        else:
            wm = WhatsminerServer(farm, rid, api="both")
            for cmd in ("summary", "devs"):
                raw = wm.respond_v2(json.dumps({"command": cmd}).encode())
                assert raw
                out += _readings(json.loads(raw.rstrip(b"\x00")))
            for section in ("summary", "edevs"):
                body = json.dumps({"cmd": "get.miner.status", "param": section}).encode()
                out += _readings(wm.respond_v3(body))
    return out


@pytest.mark.parametrize("firmware", ["luxos", "bmminer", "bosminer", "btminer"])
async def test_no_sensor_reads_below_the_room(firmware: str) -> None:
    readings = await _all_readings(firmware, ManualClock(1_764_547_200.0))
    assert readings, "no temperature read at all"
    cold = sorted({(k, v) for k, v in readings if v < AMBIENT_C})
    assert not cold, f"below the room's {AMBIENT_C} °C: {cold[:10]}"
    assert max(v for _k, v in readings) > AMBIENT_C + 20  # and they do warm up with load


def test_a_booting_rigs_chips_sit_at_the_room() -> None:
    clock = ManualClock(1_764_547_200.0)
    farm = Farm.build(clock, rigs=3, pdus=1)
    for rig in farm.rigs.values():
        rig.set_powered(False, clock.now())
        rig.set_powered(True, clock.now())
        clock.advance(1.0)
        t = clock.now()
        assert min(rig.chip_temps_c(t)) >= AMBIENT_C
        assert min(rig.board_temps_c(t)) >= AMBIENT_C
        assert max(rig.chip_temps_c(t)) < AMBIENT_C + 3  # idle: barely above the room
