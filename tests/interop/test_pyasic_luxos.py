"""pyasic takes the LuxOS simulator for a LuxOS Antminer, reads it and controls it."""

from __future__ import annotations

import pyasic
from pyasic.miners.backends.luxminer import LUXMiner

from tests.interop.conftest import ROOT_ONLY, RigFactory, ths

pytestmark = ROOT_ONLY


async def test_pyasic_identifies_and_reads_luxos(rig_of: RigFactory) -> None:
    rig = await rig_of("luxos")
    miner = await pyasic.get_miner(rig.host)
    assert isinstance(miner, LUXMiner)
    data = await miner.get_data()
    m = rig.sim.model
    assert (data.make, data.model, data.firmware) == ("AntMiner", "S19 Pro", "LuxOS")
    assert data.fw_ver == "2025.4.8.220305" and data.api_ver == "3.7"
    assert abs(ths(data.hashrate) - rig.sim.hashrate_ths(rig.clock.now())) < 0.02 * m.nominal_ths
    assert abs(ths(data.expected_hashrate) - m.nominal_ths) < 0.1
    assert data.wattage is not None and abs(data.wattage - m.nominal_w) < 0.01 * m.nominal_w
    assert data.wattage_limit == round(m.nominal_w)  # the "default" profile
    assert len(data.hashboards) == m.boards
    for board in data.hashboards:
        assert not board.missing and board.chips == m.chips_per_board
        assert 30 < ths(board.hashrate) < 40
        assert board.temp is not None and board.chip_temp is not None
        assert 25 <= board.temp < board.chip_temp < 100
    assert [f.speed for f in data.fans] == rig.sim.fans_rpm(rig.clock.now())
    assert data.uptime == 86_400
    assert data.errors == []
    assert data.is_mining
    assert [p.url is not None and p.user for p in data.pools] == [f"rigd.{rig.rig_id}"] * 3
    # The config pyasic builds (what set_power_limit starts from): presets and pool groups.
    config = await miner.get_config()
    presets = config.mining_mode.available_presets  # type: ignore[union-attr]
    profiles = rig.site.fleet.servers[rig.rig_id].profiles
    assert [p.power for p in presets] == [p.watts for p in profiles]
    assert config.temperature.target == 55


async def test_pyasic_stops_resumes_and_limits_luxos(rig_of: RigFactory) -> None:
    rig = await rig_of("luxos")
    miner = await pyasic.get_miner(rig.host)
    assert await miner.stop_mining()
    rig.advance(30)
    data = await miner.get_data()
    assert ths(data.hashrate) == 0.0
    assert data.wattage is not None and data.wattage < 100
    assert all(b.chips == 0 for b in data.hashboards)

    assert await miner.resume_mining()
    rig.advance(600)
    data = await miner.get_data()
    assert ths(data.hashrate) > 100

    # The session pyasic holds lapsed with those ten farm minutes, as on a real LuxOS
    # (60 s unused): a new client object logs on again.
    miner = await pyasic.get_miner(rig.host)
    assert await miner.set_power_limit(2500)
    rig.advance(120)
    data = await miner.get_data()
    profiles = rig.site.fleet.servers[rig.rig_id].profiles
    chosen = max(p.watts for p in profiles if p.watts <= 2500)
    assert data.wattage_limit == chosen
    assert data.wattage is not None and abs(data.wattage - chosen) < 0.01 * chosen
    assert (await miner.atm_enabled()) is True  # pyasic turned ATM back on


async def test_pyasic_fault_light_on_luxos(rig_of: RigFactory) -> None:
    rig = await rig_of("luxos")
    miner = await pyasic.get_miner(rig.host)
    assert await miner.fault_light_off()
    assert (await miner.get_data()).fault_light is False
    assert await miner.fault_light_on()
    assert (await miner.get_data()).fault_light is True
