"""pyasic takes the simulated ePIC PowerPlay rig for a real one.

pyasic finds ePIC by the dashboard's front page on port 80 ("Miner Web Dashboard"), then
asks the API on 4028 for `/capabilities` to pick its model class, reads `/summary` (and
`/network`), stops and starts mining with `POST /miner`, and sets a hashrate target with
a config (`POST /perpetualtune/algo`); each change shows in the next read. The rig sits on
its own 127.x.y.z address with the real ports, as on a farm LAN (port 80 needs root).
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from simulators.clock import ManualClock
from simulators.epic import EpicDashboard, EpicServer
from simulators.farm import Farm, RigMode

pyasic = pytest.importorskip("pyasic")
from pyasic.config.mining import MiningModeConfig  # noqa: E402
from pyasic.config.mining.algo import TunerAlgo  # noqa: E402
from pyasic.miners.backends.epic import ePIC  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the dashboard pyasic probes listens on port 80: needs root"
)


@dataclass
class Sim:
    clock: ManualClock
    api: EpicServer
    dashboard: EpicDashboard


@pytest.fixture(params=["Antminer S19 XP", "Antminer S21"])
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[Sim]:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1, models={request.param: 1.0})
        farm.rigs["rig-001"].firmware = "epic"
        host = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"
        api = EpicServer(farm, "rig-001", host=host, port=4028)
        dashboard = EpicDashboard(farm, "rig-001", host=host, port=80)
        try:
            await api.start()
            await dashboard.start()
        except OSError:  # taken by a concurrent test
            await api.stop()
            await dashboard.stop()
            continue
        break
    else:
        raise RuntimeError("no free loopback address")
    try:
        yield Sim(clock, api, dashboard)
    finally:
        await dashboard.stop()
        await api.stop()


async def test_pyasic_identifies_reads_and_controls_epic(sim: Sim) -> None:
    rig, model = sim.api.rig, sim.api.rig.model
    miner = await pyasic.get_miner(sim.api.host)
    assert isinstance(miner, ePIC), type(miner)
    want = "ePIC" + model.name.removeprefix("Antminer ").replace(" ", "")  # ePICS19XP
    assert type(miner).__name__ == want

    data = await miner.get_data()
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(model.nominal_ths, rel=0.03)
    assert data.expected_hashrate is not None
    assert float(data.expected_hashrate) == pytest.approx(model.nominal_ths, rel=0.03)
    assert data.wattage == pytest.approx(model.nominal_w, rel=0.02)
    assert data.is_mining and data.errors == []
    assert data.fw_ver == "1.5.13" and data.hostname == "epic-rig-001"
    assert data.mac == rig.mac.upper()
    assert data.uptime == rig.uptime_s(sim.clock.now())
    boards = [b for b in data.hashboards if not b.missing]
    assert len(boards) == model.boards
    for b in boards:
        assert b.chips == model.chips_per_board and b.temp and b.active
        assert b.hashrate is not None and float(b.hashrate) > 0
    # pyasic lists the fans in the reply's key order, which PowerPlay sorts as text
    # ("Fans Speed 1", "Fans Speed 10", ..., "Fans Speed 2"), as in the capture.
    speeds = sorted(f.speed for f in data.fans if f.speed is not None)
    assert speeds == sorted(rig.fans_rpm(sim.clock.now()))

    # Stop and start. pyasic reports False: it looks for a "success" key, while PowerPlay
    # answers {"result": true, "error": null} (the vendor's JsonResponse). The miner stops
    # and starts all the same, and the next read shows it.
    await miner.stop_mining()
    assert rig.mode is RigMode.SLEEPING
    sim.clock.advance(60)
    data = await miner.get_data()
    assert data.is_mining is False
    assert data.hashrate is not None and float(data.hashrate) == 0.0
    assert data.wattage is not None and data.wattage < 50
    await miner.resume_mining()
    assert rig.mode is RigMode.MINING
    sim.clock.advance(600)
    data = await miner.get_data()
    assert data.is_mining and data.hashrate is not None and float(data.hashrate) > 0

    # A hashrate target through pyasic's config: the voltage optimiser at 70 % of nominal.
    target = round(model.nominal_ths * 0.7)
    config = await miner.get_config()
    config.mining_mode = MiningModeConfig.hashrate_tuning(
        hashrate=target, algo=TunerAlgo.voltage_optimizer()
    )
    await miner.send_config(config)
    assert ("/perpetualtune/algo", {"algo": "VoltageOptimizer", "target": target}) in (
        sim.api.posts
    )
    sim.clock.advance(120)
    data = await miner.get_data()
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(target, rel=0.03)
    assert data.wattage is not None and data.wattage < model.nominal_w * 0.8
    assert (await miner.get_config()).mining_mode.hashrate == target
