"""pyasic takes the simulated VNish rig for a real one.

pyasic finds VNish by its web page ("AnthillOS") on port 80 and by "vnish" in the 4028
`version` reply, takes the model from `stats`, reads the web API (`/summary`, `/settings`,
`/info`) and the CGMiner API (`summary`, `stats`, `pools`, `version`), stops and resumes
mining, and selects a tuned preset (a power limit) with a config; each change shows in the
next read. The rig sits on its own 127.x.y.z address with the real ports (80 needs root).
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode
from simulators.vnish import VNishRpcServer, VNishWebServer

pyasic = pytest.importorskip("pyasic")
from pyasic.config.mining import MiningModePreset  # noqa: E402
from pyasic.config.mining.presets import MiningPreset  # noqa: E402
from pyasic.miners.backends.vnish import VNish  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the web API pyasic probes listens on port 80: needs root"
)


@dataclass
class Sim:
    clock: ManualClock
    rpc: VNishRpcServer
    web: VNishWebServer


@pytest.fixture(params=["Antminer S19 XP", "Antminer S19j Pro"])
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[Sim]:
    for _ in range(20):
        clock = ManualClock()
        farm = Farm.build(clock, rigs=1, pdus=1, models={request.param: 1.0})
        farm.rigs["rig-001"].firmware = "vnish"
        host = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"
        rpc = VNishRpcServer(farm, "rig-001", host=host, port=4028)
        web = VNishWebServer(farm, "rig-001", host=host, port=80)
        try:
            await rpc.start()
            await web.start()
        except OSError:  # taken by a concurrent test
            await rpc.stop()
            await web.stop()
            continue
        break
    else:
        raise RuntimeError("no free loopback address")
    try:
        yield Sim(clock, rpc, web)
    finally:
        await web.stop()
        await rpc.stop()


async def test_pyasic_identifies_reads_and_controls_vnish(sim: Sim) -> None:
    rig, model = sim.rpc.rig, sim.rpc.rig.model
    miner = await pyasic.get_miner(sim.rpc.host)
    assert isinstance(miner, VNish), type(miner)
    assert type(miner).__name__ == "VNish" + model.name.removeprefix("Antminer ").replace(" ", "")

    data = await miner.get_data()
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(model.nominal_ths, rel=0.03)
    assert data.expected_hashrate is not None
    assert float(data.expected_hashrate) == pytest.approx(model.nominal_ths, rel=0.01)
    # pyasic reads `power_usage`, which VNish 1.3.4 documents as deprecated and equal to
    # the efficiency (J/TH); the watts are in `power_consumption` (what rigd reads).
    summary = sim.web.summary(sim.clock.now())["miner"]
    assert data.wattage == summary["power_usage"]
    assert data.wattage_limit == round(model.nominal_w)  # the preset in force
    assert data.fw_ver == "1.3.4" and data.is_mining and data.errors == []
    assert data.mac == rig.mac.upper()
    assert data.uptime == rig.uptime_s(sim.clock.now())
    assert len(data.hashboards) == model.boards
    for b in data.hashboards:
        assert b.chips == model.chips_per_board and b.temp and b.chip_temp
        assert b.hashrate is not None and float(b.hashrate) > 0
    assert [f.speed for f in data.fans] == rig.fans_rpm(sim.clock.now())

    # Stop and resume (pyasic's pair: /mining/stop, /mining/resume).
    assert await miner.stop_mining()
    assert rig.mode is RigMode.SLEEPING
    sim.clock.advance(60)
    data = await miner.get_data()
    assert data.is_mining is False
    assert data.hashrate is not None and float(data.hashrate) == 0.0
    assert await miner.resume_mining()
    assert rig.mode is RigMode.MINING
    sim.clock.advance(600)
    data = await miner.get_data()
    assert data.is_mining and data.hashrate is not None and float(data.hashrate) > 0

    # A power limit. pyasic 0.79.0's `set_power_limit` cannot work on VNish: it parses the
    # presets with `MiningModeConfig.preset.from_vnish`, which on its Enum resolves to the
    # Enum's own `from_vnish` and so always yields the "normal" mode, and it then refuses.
    # Nothing is written.
    limit = round(model.nominal_w * 0.85)
    chosen = max(p.watts for p in sim.web.presets if p.tuned and p.watts <= limit)
    assert await miner.set_power_limit(limit) is False
    assert sim.web.preset == str(round(model.nominal_w))
    # pyasic's other way in, a config with a preset mode, selects the preset.
    config = await miner.get_config()
    config.mining_mode = MiningModePreset(active_preset=MiningPreset(name=str(chosen)))
    await miner.send_config(config)
    assert sim.web.preset == str(chosen)
    sim.clock.advance(120)
    data = await miner.get_data()
    assert data.wattage_limit == chosen
    assert data.hashrate is not None and float(data.hashrate) < model.nominal_ths * 0.95
    assert rig.power_target_w == chosen
