"""pyasic, a third-party miner client, takes the simulated Avalon for a real one.

pyasic finds the firmware by its own probes (web on 80/443, `version`/`devdetails` on
4028), picks its Avalon class from `version`'s PROD, reads every field it knows for the
make, and controls it: soft-off, soft-on and the work level. Each change shows in the
next read. Each simulated miner is on its own 127.x.y.z address on port 4028, as on a
farm LAN.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from simulators.avalon import AVALON_MODELS, HIGH, NORMAL, AvalonServer, avalon_rig
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode

pyasic = pytest.importorskip("pyasic")
from pyasic.miners.backends.avalonminer import AvalonMiner  # noqa: E402

# pyasic's class for each simulated model (its MINER_CLASSES names).
PYASIC_CLASSES = {
    "AvalonMiner 15-194": "CGMinerAvalon1566",
    "AvalonMiner 1246": "CGMinerAvalon1246",
}


class Sim:
    def __init__(self, clock: ManualClock, server: AvalonServer) -> None:
        self.clock = clock
        self.server = server


async def _start(model: str) -> Sim:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1)
        rig = avalon_rig("rig-001", model, clock.now(), seed=5)
        farm.rigs["rig-001"] = rig
        farm.pdus["pdu-01"].outlets[1].rig = rig
        host = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"
        server = AvalonServer(farm, "rig-001", host=host, port=4028)
        try:
            await server.start()
        except OSError:  # taken by a concurrent test
            continue
        return Sim(clock, server)
    raise RuntimeError("no free loopback address")


@pytest.fixture(params=sorted(AVALON_MODELS))
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[Sim]:
    s = await _start(request.param)
    try:
        yield s
    finally:
        await s.server.stop()


async def test_pyasic_identifies_reads_and_controls_an_avalon(sim: Sim) -> None:
    rig, server = sim.server.rig, sim.server
    model = rig.model
    miner = await pyasic.get_miner(server.host)
    assert isinstance(miner, AvalonMiner), type(miner)
    assert type(miner).__name__ == PYASIC_CLASSES[model.name]

    data = await miner.get_data()
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(model.nominal_ths, rel=0.05)
    # pyasic reads WALLPOWER, which older builds (the A1246's) do not report.
    wallpower = AVALON_MODELS[model.name].wallpower
    if wallpower:
        assert data.wattage == pytest.approx(model.nominal_w, rel=0.02)
    else:
        assert data.wattage is None
    assert data.wattage_limit == round(model.nominal_w)  # the normal mode's MPO
    assert len(data.hashboards) == model.boards
    for board in data.hashboards:
        assert board.chips == model.chips_per_board and not board.missing
        assert board.hashrate is not None and float(board.hashrate) > 0
        assert board.temp and board.chip_temp and board.temp >= 40
    assert [f.speed for f in data.fans] == rig.fans_rpm(sim.clock.now())
    assert data.env_temp is not None and 15 < data.env_temp < 40
    assert data.mac == ":".join(
        rig.mac.replace(":", "")[i : i + 2].upper() for i in range(0, 12, 2)
    )
    assert data.uptime == rig.uptime_s(sim.clock.now())
    assert data.is_mining and data.errors == []

    # Stop: pyasic's soft-off, five seconds ahead; the boards stop.
    assert await miner.stop_mining()
    assert rig.mode is RigMode.SLEEPING
    sim.clock.advance(60)
    data = await miner.get_data()
    assert data.hashrate is not None and float(data.hashrate) == 0.0
    assert data.wattage is None if not wallpower else data.wattage < 50
    assert all(float(b.hashrate or 0) == 0.0 for b in data.hashboards)

    # Resume: soft-on; the boards boot and ramp back.
    assert await miner.resume_mining()
    assert rig.mode is RigMode.MINING
    sim.clock.advance(600)
    data = await miner.get_data()
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(model.nominal_ths, rel=0.05)

    # Power limit: pyasic writes the work level (2: high), read back as MPO.
    assert await miner.set_power_limit(HIGH)
    assert server.work_mode == HIGH
    sim.clock.advance(60)
    data = await miner.get_data()
    high_w = AVALON_MODELS[model.name].work_mode_w[HIGH]
    assert data.wattage_limit == round(high_w)
    if wallpower:
        assert data.wattage == pytest.approx(high_w, rel=0.02)
    assert await miner.set_power_limit(NORMAL)
    data = await miner.get_data()
    assert data.wattage_limit == round(model.nominal_w)
