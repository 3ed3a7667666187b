"""A farm LAN with one rig of every firmware rigd drives, each on its own loopback address.

Farms are mixed (LuxOS next to stock Antminers, Whatsminers on two API generations,
Braiins OS), and every firmware also answers cgminer's `version` on 4028. This checks the
path a technician takes, on the real ports: `rigctl scan` must tell them apart and write
the right driver, and the config it writes must build drivers that really control each
rig; a wrong kind would read fine and then fail the first curtailment.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from controller.adapters.discovery import add_to_config, addresses, scan
from controller.config import load_config
from controller.runtime.daemon import Daemon
from drivers.antminer_web import AntminerDriver
from drivers.base import MinerDriver
from drivers.braiins import BraiinsDriver
from drivers.errors import DeviceError
from drivers.registry import (
    AntminerSettings,
    BraiinsSettings,
    MinerAccess,
    WhatsminerSettings,
    make_miner_driver,
)
from drivers.telemetry import RigState
from drivers.whatsminer import WhatsminerDriver, WhatsminerV3Driver
from simulators.antminer_web import AntminerWebServer
from simulators.avalon import AvalonServer, avalon_rig
from simulators.braiins import BraiinsRestServer
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock, ScaledClock
from simulators.epic import EpicDashboard, EpicServer
from simulators.farm import Farm, RigMode, SimRig
from simulators.site import SimSite
from simulators.vnish import VNishRpcServer, VNishWebServer
from simulators.whatsminer import WhatsminerServer, whatsminer_rig

BRAIINS_PASSWORD = "bos-secret"

# host suffix -> (rig id, firmware, expected driver kind, expected API port)
LAYOUT = {
    1: ("rig-001", "luxos", "luxos", 4028),
    2: ("rig-002", "bmminer", "antminer", 4028),
    3: ("wm-001", "btminer", "whatsminer", 4028),
    4: ("wm-002", "btminer", "whatsminer-v3", 4433),
    5: ("rig-003", "bosminer", "braiins", 4028),
    6: ("av-001", "avalon", "avalon", 4028),
    7: ("rig-004", "epic", "epic", 4028),
    8: ("rig-005", "vnish", "vnish", 4028),
}


class _Server(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass
class MixedFarm:
    clock: ManualClock
    farm: Farm
    block: str  # "127.a.b"
    servers: list[_Server] = field(default_factory=list)

    def host(self, n: int) -> str:
        return f"{self.block}.{n}"

    async def stop(self) -> None:
        for s in reversed(self.servers):
            await s.stop()


def _servers(farm: Farm, block: str) -> list[_Server]:
    h = {n: f"{block}.{n}" for n in LAYOUT}
    stock_rpc = MinerServer(farm, "rig-002", host=h[2], port=4028)
    return [
        MinerServer(farm, "rig-001", host=h[1], port=4028),
        stock_rpc,
        # Fast web UI: the real one answers a mode write after ~21 s.
        AntminerWebServer(
            farm,
            "rig-002",
            host=h[2],
            port=80,
            rpc=stock_rpc,
            set_delay_s=0.05,
            get_delay_s=0.005,
            rpc_restart_s=0.0,
        ),
        WhatsminerServer(farm, "wm-001", host=h[3], api="v2", port_v2=4028),
        WhatsminerServer(farm, "wm-002", host=h[4], api="v3", port_v3=4433),
        MinerServer(farm, "rig-003", host=h[5], port=4028),
        BraiinsRestServer(farm, "rig-003", host=h[5], port=80, password=BRAIINS_PASSWORD),
        AvalonServer(farm, "av-001", host=h[6], port=4028),
        EpicServer(farm, "rig-004", host=h[7], port=4028),
        EpicDashboard(farm, "rig-004", host=h[7], port=80),
        VNishRpcServer(farm, "rig-005", host=h[8], port=4028),
        VNishWebServer(farm, "rig-005", host=h[8], port=80),
    ]


async def _start() -> MixedFarm:
    clock = ManualClock()
    farm = Farm.build(clock, rigs=5, pdus=1, models={"Antminer S19j Pro": 1.0})
    for rid, firmware, _kind, _port in LAYOUT.values():
        if rid in farm.rigs:
            farm.rigs[rid].firmware = firmware
    for n, rid in ((1, "wm-001"), (2, "wm-002")):
        farm.rigs[rid] = whatsminer_rig(rid, "Whatsminer M50S_VH50", clock.now(), seed=n)
    farm.rigs["av-001"] = avalon_rig("av-001", "AvalonMiner 15-194", clock.now(), seed=3)
    last: OSError | None = None
    for _ in range(10):
        mixed = MixedFarm(clock, farm, f"127.{random.randint(100, 250)}.{random.randint(1, 254)}")
        try:
            for s in _servers(farm, mixed.block):
                mixed.servers.append(s)
                await s.start()
        except OSError as e:  # a concurrent test holds an address of this block
            last = e
            await mixed.stop()
            continue
        return mixed
    pytest.skip(f"no free loopback block: {last}")


@pytest.fixture
async def mixed() -> AsyncIterator[MixedFarm]:
    m = await _start()
    try:
        yield m
    finally:
        await m.stop()


async def test_scan_add_and_control_a_mixed_farm(mixed: MixedFarm, tmp_path: Path) -> None:
    t0 = time.monotonic()
    found = await scan(addresses([f"{mixed.block}.0/24"]), wait_s=0.5)
    took = time.monotonic() - t0
    assert {f.host: (f.driver, f.port) for f in found} == {
        mixed.host(n): (kind, port) for n, (_rid, _fw, kind, port) in LAYOUT.items()
    }
    makes = {f.driver: (f.make, f.firmware) for f in found}
    assert makes["whatsminer"] == makes["whatsminer-v3"] == ("Whatsminer", "btminer")
    assert makes["antminer"] == ("Antminer", "bmminer")
    assert makes["luxos"][1] == "LuxOS"
    assert makes["avalon"] == ("Avalon", "Avalon cgminer")
    assert makes["epic"] == ("Antminer", "ePIC PowerPlay")
    assert makes["vnish"] == ("Antminer", "VNish")
    assert took < 5.0, took  # 256 addresses, 251 of them empty

    cfg_path = tmp_path / "rigd.toml"
    cfg_path.write_text('[site]\nid = "mixed"\n')
    added = add_to_config(cfg_path, found)
    assert len(added) == len(LAYOUT)
    assert add_to_config(cfg_path, found) == []  # a second scan adds nothing
    cfg = load_config(cfg_path, environ={})
    rigs = {r.host: r for r in cfg.rigs()}
    assert {h: (r.miner.driver, r.miner.port) for h, r in rigs.items()} == {
        f.host: (f.driver, f.port) for f in found
    }

    for n, (sim_id, _fw, kind, _port) in LAYOUT.items():
        m = rigs[mixed.host(n)].miner
        extra: dict[str, Any] = {"password": BRAIINS_PASSWORD} if kind == "braiins" else {}
        access = MinerAccess(
            mixed.host(n), m.port, username=m.username, timeout=1.0, retries=0, **extra
        )
        drv = make_miner_driver(
            m.driver, rigs[mixed.host(n)].id, access, m.driver_settings(cfg.poll.interval_s)
        )
        await _read_sleep_wake(drv, mixed, sim_id, kind)


def _mode(rig: SimRig) -> RigMode:
    """Read fresh each time, so an assert's type narrowing does not stick to the next one."""
    return rig.mode


async def _read_sleep_wake(drv: MinerDriver, mixed: MixedFarm, sim_id: str, kind: str) -> None:
    rig = mixed.farm.rigs[sim_id]
    try:
        tel = await drv.read(mixed.clock.now())
        assert tel.state is RigState.MINING, kind
        assert tel.hashrate_ths is not None and tel.hashrate_ths > 0, kind
        assert drv.capabilities.can_sleep, kind
        await drv.sleep()
        assert _mode(rig) is RigMode.SLEEPING, kind
        mixed.clock.advance(120)  # hashboards off, power down to idle
        assert (await drv.read(mixed.clock.now())).state is RigState.SLEEPING, kind
        await drv.wake()
        assert _mode(rig) is RigMode.MINING, kind
    except DeviceError as e:  # name the rig's kind: the trace alone does not
        raise AssertionError(f"{kind}: {e!r}") from e
    finally:
        await drv.close()


def test_every_kind_builds_with_its_settings() -> None:
    """The config's settings reach the kinds that use them, whatever else is passed."""
    common = MinerAccess("127.0.0.1", timeout=1.5, retries=0)
    stock = make_miner_driver("antminer", "r", common, AntminerSettings(low_power_w=2300))
    assert isinstance(stock, AntminerDriver) and stock.capabilities.can_sleep
    bos = make_miner_driver("braiins", "r", common, BraiinsSettings(web_port=8080))
    assert isinstance(bos, BraiinsDriver)
    v2 = make_miner_driver("whatsminer", "r", common, WhatsminerSettings(power_max_w=3500))
    assert isinstance(v2, WhatsminerDriver) and v2.client.port == 4028
    v3 = make_miner_driver("Whatsminer-V3", "r", common)
    assert isinstance(v3, WhatsminerV3Driver) and v3.client.port == 4433  # its own default
    explicit = make_miner_driver("whatsminer-v3", "r", MinerAccess("127.0.0.1", 9999))
    assert isinstance(explicit, WhatsminerV3Driver) and explicit.client.port == 9999
    for d in (stock, bos, v2, v3):
        assert isinstance(d, MinerDriver)


# -- the daemon's control loop over a scanned mixed farm ------------------------------------

SPEED = 20.0  # farm seconds per wall second
MIX = (
    "luxos", "antminer", "whatsminer", "whatsminer-v3", "braiins", "avalon", "epic", "vnish",
)  # fmt: skip


async def _scan_add(cfg: Path, block: str) -> str:
    """`rigctl scan --add`, as a technician runs it; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli.rigctl", "-c", str(cfg),
        "scan", f"{block}.1-30", "--timeout", "0.5", "--add",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def _measured_low_power(text: str, site: SimSite, block: str) -> str:
    """Add each stock Antminer's (and Avalon's) low-power draw, as an operator does after
    measuring it on the outlet: scan cannot know it, and without it the driver offers sleep
    only."""
    out = []
    for chunk in text.split("\n[[miners]]"):
        m = re.search(r'host = "([\d.]+)"', chunk)
        low: float | None = None
        if m and 'driver = "antminer"' in chunk:
            rid = next(r for r in site.farm.rigs if site.address_of(r)[0] == m.group(1))
            low = site.antminer_web.servers[rid].low_power_w
        elif m and 'driver = "avalon"' in chunk:
            rid = next(r for r in site.farm.rigs if site.address_of(r)[0] == m.group(1))
            low = site.families.avalon.servers[rid].avalon.work_mode_w[0]
        if low is not None:
            chunk = chunk.rstrip("\n") + f"\nlow_power_w = {low:g}\n"
        out.append(chunk)
    return "\n[[miners]]".join(out)


async def _until(pred: Callable[[], bool], what: str, wall_s: float = 30.0) -> None:
    for _ in range(int(wall_s / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _random_block() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(1, 254)}"


async def test_daemon_curtails_and_restores_a_scanned_mixed_farm(tmp_path: Path) -> None:
    """Done-when of the mixed fleet: found by `rigctl scan`, added, polled, curtailed and
    restored by the control loop, each dialect's commands checked on its simulator."""
    site: SimSite | None = None
    for _ in range(10):
        block = _random_block()
        candidate = SimSite(
            rigs=15, pdus=3, subnet=f"{block}.0/24", clock=ScaledClock(SPEED), mix=MIX
        )
        try:
            await candidate.start()
        except OSError:  # a concurrent test holds an address of this block
            continue
        site = candidate
        break
    if site is None:
        pytest.skip("no free loopback block")
    farm = site.farm
    state = Path(tempfile.mkdtemp(prefix="mixed-", dir="/tmp"))  # socket paths are capped
    try:
        cfg_path = state / "rigd.toml"
        cfg_path.write_text(
            site.config_toml(
                broker_url="mqtt://127.0.0.1:9",  # no broker needed to control the farm
                state_dir=state,
                interval_s=10,
                miners=False,
                extra="[control]\nmax_import_kw = 1000\nmin_off_s = 0\nmin_on_s = 0\n"
                "ramp_kw_per_interval = 100\n",
            )
        )
        out = await _scan_add(cfg_path, block)
        assert "added 15" in out, out
        cfg_path.write_text(_measured_low_power(cfg_path.read_text(), site, block))
        cfg = load_config(cfg_path, environ={})
        kinds = {r.host: r.miner.driver for r in cfg.rigs()}
        by_host = {site.address_of(rid)[0]: rid for rid in farm.rigs}
        assert {by_host[h]: k for h, k in kinds.items()} == site.dialects

        daemon = Daemon(cfg, clock=site.clock, config_path=str(cfg_path))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            await _until(
                lambda: daemon.last is not None and daemon.last.document["rigs"]["mining"] == 15,
                "every rig polled and mining",
            )
            ctl = daemon.controller
            assert ctl is not None
            rig_of = {r.id: by_host[r.host] for r in cfg.rigs()}  # config id -> sim rig id
            sims = {cid: farm.rigs[sid] for cid, sid in rig_of.items()}
            dialect = {cid: site.dialects[sid] for cid, sid in rig_of.items()}
            m = farm.meter
            base_kw = m.overhead_base_w / 1000

            # 1. A cap that all rigs at their lowest power target just fit under: throttled.
            floor_w = sum(
                daemon.devices.miners[c].capabilities.power_target_min_w or 0 for c in sims
            )
            cap1 = base_kw + floor_w * (1 + m.overhead_frac) / 1000 * 1.15
            ctl.set_override(cap1, site.clock.now() + 3600, "test: throttle", "test")
            throttled: set[str] = set()

            def under(cap: float) -> bool:
                for c, r in sims.items():
                    if r.power_target_w is not None and r.mode is RigMode.MINING:
                        throttled.add(dialect[c])
                return m.true_power_w(farm.now()) / 1000 <= cap

            # The planner may sleep the rig whose whole-rig hashrate per kW is the lowest
            # (an Avalon, here) rather than throttle it: issue 17's marginal-value rule.
            def each_throttled_or_asleep() -> bool:
                asleep = {dialect[c] for c, r in sims.items() if _mode(r) is RigMode.SLEEPING}
                return throttled | asleep >= set(MIX) and len(throttled) >= len(MIX) - 1

            await _until(
                lambda: under(cap1) and each_throttled_or_asleep(), "throttled under cap 1"
            )

            # 2. Nothing but the site's own load: every rig asleep, by its own dialect.
            cap2 = base_kw + 0.5
            ctl.set_override(cap2, site.clock.now() + 3600, "test: sleep", "test")
            await _until(
                lambda: all(_mode(r) is RigMode.SLEEPING for r in sims.values()) and under(cap2),
                "every rig asleep",
            )

            # 3. The cap lifted: everything back, at full power.
            ctl.clear_override()
            await _until(
                lambda: all(
                    _mode(r) is RigMode.MINING and r.power_target_w in (None, r.model.nominal_w)
                    for r in sims.values()
                ),
                "every rig restored",
                wall_s=45,
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)

        # Each dialect's own commands reached its own simulator.
        web = [h for s in site.antminer_web.servers.values() for h in s.hits]
        writes = [h for h in web if h.method == "POST" and h.path.endswith("set_miner_conf.cgi")]
        assert len(writes) >= 3 * 2, web  # low power, sleep and normal, on both stock rigs
        bos = [r for s in site.braiins_rest.servers.values() for r in s.requests]
        assert ("PUT", "/api/v1/actions/pause") in bos and ("PUT", "/api/v1/actions/resume") in bos
        assert any("power-target" in path for _m, path in bos), bos
        wants = {
            "v2": {"power_off", "power_on", "adjust_power_limit"},
            "v3": {"set.miner.service", "set.miner.power_limit"},
        }
        for api, fleet in site.whatsminers.items():
            cmds = {c for s in fleet.servers.values() for c in s.commands()}
            assert wants[api] <= cmds, (api, sorted(cmds))
        ascset = {c for s in site.families.avalon.servers.values() for c in s.commands_seen}
        # A work mode only where the planner throttled the Avalon rather than slept it (its
        # work modes are driven in tests/drivers/test_avalon.py).
        avalon_wants = {"softoff", "softon"} | ({"workmode"} if "avalon" in throttled else set())
        assert avalon_wants <= ascset, sorted(ascset)
        posts = {(p, str(v)) for s in site.families.epic.api.values() for p, v in s.posts}
        assert {("/miner", "Stop"), ("/miner", "Autostart")} <= posts, sorted(posts)
        assert any(p == "/perpetualtune/algo" for p, _ in posts), sorted(posts)
        vnish = {p for s in site.families.vnish.web.values() for p, _ in s.posts}
        assert {"/mining/stop", "/mining/start", "/settings"} <= vnish, sorted(vnish)
    finally:
        await site.stop()
        shutil.rmtree(state, ignore_errors=True)
