"""pyasic against the Whatsminer simulators: btminer API v2 on 4028, and API v3 on 4433 with
the `get_version` side real v3 units keep on 4028 (how pyasic tells v3 from v2)."""

from __future__ import annotations

import pyasic
import pytest
from pyasic.miners.backends.btminer import BTMinerV2, BTMinerV3

from simulators.whatsminer import V2_FIRMWARE_VERSION, V3_FIRMWARE_VERSION, firmware_type
from tests.interop.conftest import ROOT_ONLY, Rig, RigFactory, ths

pytestmark = ROOT_ONLY


def _check_reading(rig: Rig, data: object) -> None:
    m, t = rig.sim.model, rig.clock.now()
    d = data  # a pyasic MinerData
    assert d.make == "WhatsMiner"  # type: ignore[attr-defined]
    assert d.model == firmware_type(m).replace("_", " ")  # type: ignore[attr-defined]
    assert abs(ths(d.hashrate) - rig.sim.hashrate_ths(t)) < 0.02 * m.nominal_ths  # type: ignore[attr-defined]
    assert d.wattage is not None and abs(d.wattage - rig.sim.power_w(t)) < 0.01 * m.nominal_w  # type: ignore[attr-defined]
    assert d.wattage_limit == round(m.max_w)  # type: ignore[attr-defined]  # rated, none set
    boards = d.hashboards  # type: ignore[attr-defined]
    assert len(boards) == m.boards
    for i, board in enumerate(boards):
        assert not board.missing and board.chips == m.chips_per_board
        assert abs(ths(board.hashrate) - rig.sim.board_hashrates_ths(t)[i]) < 0.02 * ths(
            board.hashrate
        )
        assert board.temp is not None and board.temp >= 25
    assert [f.speed for f in d.fans] == rig.sim.fans_rpm(t)  # type: ignore[attr-defined]
    assert d.mac == rig.sim.mac.upper() and d.hostname == "WhatsMiner"  # type: ignore[attr-defined]
    assert d.errors == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("dialect", "cls", "fw"),
    [
        ("whatsminer", BTMinerV2, V2_FIRMWARE_VERSION),
        ("whatsminer-v3", BTMinerV3, V3_FIRMWARE_VERSION),
    ],
)
async def test_pyasic_identifies_and_reads_whatsminer(
    rig_of: RigFactory, dialect: str, cls: type, fw: str
) -> None:
    rig = await rig_of(dialect)
    miner = await pyasic.get_miner(rig.host)
    assert isinstance(miner, cls)
    data = await miner.get_data()
    _check_reading(rig, data)
    assert data.fw_ver == fw
    assert data.uptime == 86_400


async def test_pyasic_finds_v3_through_its_4028_get_version(rig_of: RigFactory) -> None:
    """Without the 4028 side pyasic has no firmware date, takes the unit for API v2 and
    reads nothing; with it, API v3."""
    rig = await rig_of("whatsminer-v3")
    server = rig.site.whatsminers["v3"].servers[rig.rig_id]
    assert server.listens_4028 and not server.serves_v2
    await pyasic.get_miner(rig.host)
    assert "get_version" in server.commands("v2")
    assert {"version", "devdetails"} <= set(server.commands("v2"))  # closed unanswered


@pytest.mark.parametrize("dialect", ["whatsminer", "whatsminer-v3"])
async def test_pyasic_stops_resumes_and_limits_whatsminer(rig_of: RigFactory, dialect: str) -> None:
    rig = await rig_of(dialect)
    if dialect == "whatsminer-v3":
        # pyasic stamps v3 writes with the wall clock, which the farm clock leaves behind
        # as the test moves it on by minutes; the miner checks `ts` against its own.
        rig.site.whatsminers["v3"].servers[rig.rig_id].ts_window_s = 86_400.0
    miner = await pyasic.get_miner(rig.host)
    assert await miner.stop_mining()
    rig.advance(30)
    data = await miner.get_data()
    assert ths(data.hashrate) == 0.0 and data.wattage is not None and data.wattage < 100
    if dialect == "whatsminer":
        assert data.is_mining is False  # v2: `status` mineroff; v3 pyasic does not say

    assert await miner.resume_mining()
    rig.advance(900)
    data = await miner.get_data()
    assert ths(data.hashrate) > 0.9 * rig.sim.model.nominal_ths and data.is_mining

    assert await miner.set_power_limit(3000)
    rig.advance(120)
    data = await miner.get_data()
    assert data.wattage_limit == 3000
    assert data.wattage is not None and abs(data.wattage - 3000) < 30


async def test_pyasic_fault_light_on_whatsminer_v3(rig_of: RigFactory) -> None:
    rig = await rig_of("whatsminer-v3")
    miner = await pyasic.get_miner(rig.host)
    assert (await miner.get_data()).fault_light is False
    assert await miner.fault_light_on()
    fresh = await pyasic.get_miner(rig.host)
    assert (await fresh.get_data()).fault_light is True
    assert await fresh.fault_light_off()
    assert (await (await pyasic.get_miner(rig.host)).get_data()).fault_light is False


async def test_pyasic_reads_whatsminer_v3_errors(rig_of: RigFactory) -> None:
    rig = await rig_of("whatsminer-v3")
    server = rig.site.whatsminers["v3"].servers[rig.rig_id]
    server.error_codes = [{"218": "2025-12-01 10:30:00"}]
    data = await (await pyasic.get_miner(rig.host)).get_data()
    assert [e.error_code for e in data.errors] == [218]  # type: ignore[attr-defined]
