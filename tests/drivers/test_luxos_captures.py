"""LuxOS against replies captured from a real LUXminer 2025.4.8 (an S19k Pro, 3 of 4 chain
slots fitted): rigd's parsing of them, and the simulator's replies key for key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from drivers.cgminer import parse_hashboards, parse_telemetry
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm

CAPTURES = Path(__file__).parent.parent / "fixtures" / "luxos" / "captured-2025.4.8"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "luxos"


def _load(name: str, folder: Path = CAPTURES) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / f"{name}.json").read_text())
    return data


def test_an_empty_fourth_slot_is_no_board() -> None:
    """`chain_acn4: 0`, `chain_rate4: "0"`, sensors "0-0-0-0": a slot, not a board at 0 TH/s."""
    stats = _load("stats")
    assert stats["STATS"][1]["chain_acn4"] == 0 and stats["STATS"][1]["chain_rate4"] == "0"
    boards = parse_hashboards(stats)
    assert [b.index for b in boards] == [0, 1, 2]
    assert [b.chips for b in boards] == [77, 77, 77]
    assert [round(b.hashrate_ths or 0, 2) for b in boards] == [18.91, 18.94, 19.07]
    assert all(b.active and b.temp_c == 47.0 for b in boards)


def test_the_captured_replies_read_whole() -> None:
    tel = parse_telemetry(
        0.0,
        summary=_load("summary"),
        stats=_load("stats"),
        power=_load("power"),
        config=_load("config"),
        version=_load("version"),
        profile_watts={p["Profile Name"]: p["Watts"] for p in _load("profiles")["PROFILES"]},
    )
    assert len(tel.hashboards) == 3
    assert tel.hashrate_ths == pytest.approx(59.756, abs=1e-3)
    assert tel.power_w == 1051
    assert tel.power_limit_w is not None  # the active 290MHz profile's watts
    assert tel.nominal_hashrate_ths == pytest.approx(121.8)
    assert tel.fans_rpm == (1920, 1920, 2340, 2340)
    assert tel.identity.firmware == "LuxOS" and tel.identity.model == "Antminer S19k Pro"


def test_a_sleeping_board_keeps_its_slot() -> None:
    """Asleep, a board enumerates no chips and hashes nothing, but its sensors still read."""
    stats = _load("stats")
    dev = stats["STATS"][1]
    dev.update({"chain_acn2": 0, "chain_rate2": "0.00", "chain_acs2": ""})
    boards = parse_hashboards(stats)
    assert [b.index for b in boards] == [0, 1, 2]
    assert boards[1].hashrate_ths == 0.0 and not boards[1].active


# -- the simulator's replies against the captures -----------------------------------------

# command (and parameter) -> capture file
_COMMANDS = {
    "summary": "summary",
    "stats": "stats",
    "devs": "devs",
    "config": "config",
    "pools": "pools",
    "fans": "fans",
    "temps": "temps",
    "power": "power",
    "version": "version",
    "profiles": "profiles",
    "voltageget|0": "voltageget_0",
    "healthchipget|0": "healthchipget_0",
}


def _kind(value: Any) -> str:
    """JSON type as a client sees it (an int where a float was captured is still a number,
    but a string where a number was captured, or the reverse, is not)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


@pytest.fixture
def lux() -> MinerServer:
    clock = ManualClock(1_764_547_200.0)
    farm = Farm.build(clock, rigs=1, pdus=1)
    return MinerServer(farm, next(iter(farm.rigs)), host="127.0.0.1", port=0)


def _reply(server: MinerServer, command: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(server.respond(command.encode()).rstrip(b"\x00"))
    return data


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_simulated_luxos_replies_carry_the_captured_keys_and_types(
    lux: MinerServer, command: str
) -> None:
    captured = _load(_COMMANDS[command])
    simulated = _reply(lux, command)
    assert set(simulated) == set(captured)
    cap_status, sim_status = captured["STATUS"][0], simulated["STATUS"][0]
    assert (sim_status["STATUS"], sim_status["Code"]) == ("S", cap_status["Code"])
    assert sim_status["Description"].startswith("LUXminer ")
    for section, items in captured.items():
        if section in ("STATUS", "id"):
            continue
        for i, want in enumerate(items[: len(simulated[section])]):
            got = simulated[section][i]
            missing = set(want) - set(got)
            assert not missing, f"{section}[{i}] lacks {sorted(missing)}"
            wrong = {k for k in want if _kind(got[k]) != _kind(want[k])}
            assert not wrong, f"{section}[{i}] types differ: {sorted(wrong)}"


def test_simulated_luxos_groups_as_documented(lux: MinerServer) -> None:
    """pyasic reads the pool groups (`GROUPS`) to build a LuxOS config, and each pool's
    `GROUP`; without them its `get_config`, and so `set_power_limit`, fails."""
    documented = _load("groups", FIXTURES)
    groups = _reply(lux, "groups")
    assert groups["STATUS"][0]["Code"] == documented["STATUS"][0]["Code"]
    assert set(groups["GROUPS"][0]) == set(documented["GROUPS"][0])
    pool_groups = {p["GROUP"] for p in _reply(lux, "pools")["POOLS"]}
    assert pool_groups <= {g["GROUP"] for g in groups["GROUPS"]}


def test_simulated_luxos_names_its_own_os(lux: MinerServer) -> None:
    assert _reply(lux, "config")["CONFIG"][0]["OS"] == "LuxOS"
    assert "Getworks" in _reply(lux, "summary")["SUMMARY"][0]
    joined = _reply(lux, "tempctrl+fans+pools+groups+config+profiles+events")
    assert all(joined[k][0]["STATUS"][0]["STATUS"] == "S" for k in joined if k != "id")
