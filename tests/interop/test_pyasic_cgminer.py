"""Plain CGMiner: a stock Antminer whose web UI rigd does not use (driver `cgminer`, read
only), simulated as bmminer on 4028 with nothing on 80.

pyasic has no "plain CGMiner" class: it asks 4028 `version`, sees BMMiner and takes the rig
for a stock Antminer, as it would take real hardware whose web UI is firewalled. It reads
what the 4028 API carries (hashrate, expected hashrate, fans, uptime, pools, mining or not)
and nothing of what it reads from the web UI (boards, MAC, serial). Its controls go
through that web UI, so they cannot reach the rig; pyasic 0.79 still answers True to
`stop_mining` (it does not check the reply), and the rig keeps mining: which is why rigd
treats this dialect as read only. rigd's scan names it `cgminer` on the same address.
"""

from __future__ import annotations

import pyasic
from pyasic.miners.backends.antminer import AntminerModern

from controller.adapters.discovery import scan
from simulators.farm import RigMode
from tests.interop.conftest import ROOT_ONLY, RigFactory, ths

pytestmark = ROOT_ONLY


async def test_pyasic_identifies_and_reads_plain_cgminer(rig_of: RigFactory) -> None:
    rig = await rig_of("luxos")
    rig.sim.firmware = "bmminer"  # the 4028 side of stock firmware; no web UI on 80
    miner = await pyasic.get_miner(rig.host)
    assert isinstance(miner, AntminerModern), type(miner)
    data = await miner.get_data()
    m, t = rig.sim.model, rig.clock.now()
    assert (data.make, data.model, data.firmware) == ("AntMiner", "S19 Pro", "Stock")
    assert abs(ths(data.hashrate) - rig.sim.hashrate_ths(t)) < 0.02 * m.nominal_ths
    assert abs(ths(data.expected_hashrate) - m.nominal_ths) < 0.1
    assert [f.speed for f in data.fans] == rig.sim.fans_rpm(t)
    assert data.is_mining and data.uptime == 86_400 and len(data.pools) == 3
    # What pyasic reads from the web UI only is missing, as on hardware without it.
    assert data.mac is None and data.serial_number is None
    assert len(data.hashboards) == m.boards and all(b.missing for b in data.hashboards)

    found = await scan([rig.host], wait_s=1.0)
    assert [(f.driver, f.make, f.firmware) for f in found] == [("cgminer", "Antminer", "bmminer")]


async def test_pyasic_cannot_control_plain_cgminer(rig_of: RigFactory) -> None:
    rig = await rig_of("luxos")
    rig.sim.firmware = "bmminer"
    miner = await pyasic.get_miner(rig.host)
    assert isinstance(miner, AntminerModern)
    await miner.stop_mining()  # through the web UI, which is not there
    rig.advance(120)
    assert rig.sim.mode is RigMode.MINING
    data = await miner.get_data()
    assert data.is_mining is True and ths(data.hashrate) > 100
