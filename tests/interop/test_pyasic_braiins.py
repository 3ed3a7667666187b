"""pyasic takes the Braiins OS simulator for a BOS+ S19 Pro ("BOSer"): it reads the rig over
4028 and the public gRPC API on 50051, and pauses, resumes, sets the power target and the
locate LED over gRPC, as it does real BOS+ rigs; on a release without the REST API too."""

from __future__ import annotations

import pyasic
import pytest
from pyasic.miners.backends.braiins_os import BOSer

from tests.interop.conftest import ROOT_ONLY, RigFactory, ths

pytestmark = ROOT_ONLY


@pytest.mark.parametrize("release", ["25.07", "24.09"])
async def test_pyasic_identifies_and_reads_braiins(rig_of: RigFactory, release: str) -> None:
    rig = await rig_of("braiins", braiins_release=release)
    assert (rig.rig_id in rig.site.braiins_rest.servers) is (release == "25.07")
    miner = await pyasic.get_miner(rig.host)
    assert isinstance(miner, BOSer)
    data = await miner.get_data()
    m, t = rig.sim.model, rig.clock.now()
    assert (data.make, data.model, data.firmware) == ("AntMiner", "S19 Pro", "BOS+")
    assert data.fw_ver == release
    assert abs(ths(data.hashrate) - rig.sim.hashrate_ths(t)) < 0.02 * m.nominal_ths
    assert abs(ths(data.expected_hashrate) - m.nominal_ths) < 0.1
    assert data.wattage is not None and abs(data.wattage - rig.sim.power_w(t)) < 0.01 * m.nominal_w
    assert data.wattage_limit == round(m.nominal_w)
    assert len(data.hashboards) == m.boards
    for i, board in enumerate(data.hashboards):
        assert not board.missing and board.chips == m.chips_per_board
        assert abs(ths(board.hashrate) - rig.sim.board_hashrates_ths(t)[i]) < 0.02 * m.nominal_ths
        assert board.temp is not None and board.chip_temp is not None
        assert 25 < board.temp < board.chip_temp < 100
    assert [f.speed for f in data.fans] == rig.sim.fans_rpm(t)
    assert data.mac == rig.sim.mac.upper() and data.serial_number == rig.sim.serial
    assert data.hostname == f"bos-{rig.rig_id}"
    assert data.uptime == 86_400 and data.is_mining and data.errors == []
    assert data.fault_light is False
    assert [p.user for p in data.pools] == [f"rigd.{rig.rig_id}"]
    grpc = rig.site.braiins_grpc.servers[rig.rig_id]
    assert grpc.logins >= 1  # read over gRPC, with a token


@pytest.mark.parametrize("release", ["25.07", "24.09"])
async def test_pyasic_pauses_resumes_and_limits_braiins(rig_of: RigFactory, release: str) -> None:
    rig = await rig_of("braiins", braiins_release=release)
    miner = await pyasic.get_miner(rig.host)
    assert await miner.stop_mining()
    rig.advance(90)  # pyasic reads the 1-minute average
    data = await miner.get_data()
    assert ths(data.hashrate) == 0.0 and data.is_mining is False
    assert data.wattage is not None and data.wattage < 100

    assert await miner.resume_mining()
    rig.advance(600)
    data = await miner.get_data()
    assert data.is_mining and ths(data.hashrate) > 0.9 * rig.sim.model.nominal_ths

    assert await miner.set_power_limit(2500)
    rig.advance(60)
    data = await miner.get_data()
    assert data.wattage_limit == 2500
    assert data.wattage is not None and abs(data.wattage - 2500) < 25
    assert not await miner.set_power_limit(100)  # below the tuner's range: refused


async def test_pyasic_locates_braiins(rig_of: RigFactory) -> None:
    rig = await rig_of("braiins")
    miner = await pyasic.get_miner(rig.host)
    assert await miner.fault_light_on()
    assert (await miner.get_data()).fault_light is True
    await miner.fault_light_off()
    assert (await miner.get_data()).fault_light is False
