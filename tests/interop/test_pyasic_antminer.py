"""pyasic takes the stock Antminer simulator (bmminer on 4028, the CGI web UI on 80) for a
stock S19 Pro, reads it (boards and temperatures from stats.cgi, errors from summary.cgi,
the locate LED) and controls it through the web UI as it does real ones."""

from __future__ import annotations

import pyasic
from pyasic.miners.backends.antminer import AntminerModern

from tests.interop.conftest import ROOT_ONLY, RigFactory, ths

pytestmark = ROOT_ONLY


async def test_pyasic_identifies_and_reads_stock_antminer(rig_of: RigFactory) -> None:
    rig = await rig_of("antminer")
    miner = await pyasic.get_miner(rig.host)
    assert isinstance(miner, AntminerModern)
    data = await miner.get_data()
    m, t = rig.sim.model, rig.clock.now()
    web = rig.site.antminer_web.servers[rig.rig_id]
    assert (data.make, data.model, data.firmware) == ("AntMiner", "S19 Pro", "Stock")
    assert abs(ths(data.hashrate) - rig.sim.hashrate_ths(t)) < 0.02 * m.nominal_ths
    assert abs(ths(data.expected_hashrate) - m.nominal_ths) < 0.1
    assert data.wattage is None  # stock S19 firmware reports no power, nor does the sim
    assert len(data.hashboards) == m.boards
    for i, board in enumerate(data.hashboards):
        assert not board.missing and board.chips == m.chips_per_board
        assert abs(ths(board.hashrate) - rig.sim.board_hashrates_ths(t)[i]) < 0.01
        assert board.serial_number == web.board_sn(i)
        assert board.temp is not None and board.chip_temp is not None
        assert 25 < board.temp < board.chip_temp < 100
    assert [f.speed for f in data.fans] == rig.sim.fans_rpm(t)
    assert data.mac == rig.sim.mac.upper() and data.serial_number == rig.sim.serial
    assert data.uptime == 86_400
    assert data.errors == [] and data.fault_light is False and data.is_mining
    assert len(data.pools) == 3

    web.alarms["fans"] = "Fan 2 lost"
    data = await miner.get_data()
    assert [e.error_message for e in data.errors] == ["Fan 2 lost"]


async def test_pyasic_sleeps_and_wakes_stock_antminer(rig_of: RigFactory) -> None:
    rig = await rig_of("antminer")
    miner = await pyasic.get_miner(rig.host)
    assert await miner.stop_mining()
    web = rig.site.antminer_web.servers[rig.rig_id]
    assert web.work_mode == "1"
    rig.advance(60)
    data = await miner.get_data()
    assert data.is_mining is False
    assert ths(data.hashrate) == 0.0
    assert all(b.chips == 0 for b in data.hashboards)

    assert await miner.resume_mining()
    assert web.work_mode == "0"
    rig.advance(600)
    data = await miner.get_data()
    assert data.is_mining is True and ths(data.hashrate) > 100


async def test_pyasic_blinks_stock_antminer(rig_of: RigFactory) -> None:
    rig = await rig_of("antminer")
    miner = await pyasic.get_miner(rig.host)
    web = rig.site.antminer_web.servers[rig.rig_id]
    assert await miner.fault_light_on() is True
    assert web.blinking
    fresh = await pyasic.get_miner(rig.host)  # no cached light: read from the miner
    assert (await fresh.get_data()).fault_light is True
    assert await miner.fault_light_off() is False
    assert not web.blinking
