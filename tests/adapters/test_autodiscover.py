"""`driver = "auto"` ranges: the daemon scans them, gives each miner its driver, remembers.

A farm is configured by subnet; the rigs in it, and their firmwares, are found. What was
found must survive a restart: a rig switched off at its outlet answers no scan, and a
daemon that forgot it would never switch it back on.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.config import ConfigError, parse_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite

SITE = '[site]\nid = "s"\n'
MIX = ("luxos", "antminer", "whatsminer", "whatsminer-v3", "braiins")


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    for _ in range(10):
        block = f"127.{random.randint(100, 250)}.{random.randint(1, 254)}"
        s = SimSite(rigs=10, pdus=2, subnet=f"{block}.0/24", clock=ScaledClock(20), mix=MIX)
        try:
            await s.start()
        except OSError:  # a concurrent test holds an address of this block
            continue
        try:
            yield s
        finally:
            await s.stop()
        return
    pytest.skip("no free loopback block")


@pytest.fixture
def state_dir() -> AsyncIterator[Path]:  # type: ignore[misc]
    d = Path(tempfile.mkdtemp(prefix="auto-", dir="/tmp"))  # socket paths are capped
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _auto_config(site: SimSite, state: Path, *, discover_every: float = 0) -> str:
    """The site's config with its miners given as one auto range over the whole /24."""
    text = site.config_toml(
        broker_url="mqtt://127.0.0.1:9", state_dir=state, interval_s=10, timeout_s=0.5
    )
    head = text[: text.index("\n[[miners]]")]
    block = site.address_of("rig-001")[0].rsplit(".", 1)[0]
    return (
        head.replace("[poll]\n", f"[poll]\ndiscover_interval_s = {discover_every:g}\n")
        + "\n\n[[miners]]\n"
        + f'range = "{block}.1-254"\n'
        + 'id_format = "rig-{n:03d}"  # the PDU outlet maps name rigs so\n'
        + 'driver = "auto"\n'
    )


def test_auto_is_for_ranges_and_takes_every_kind_of_setting() -> None:
    with pytest.raises(ConfigError, match='driver "auto" is for a `range`'):
        parse_config(SITE + '[[miners]]\nid = "r"\nhost = "127.0.0.1"\ndriver = "auto"\n')
    cfg = parse_config(
        SITE + '[[miners]]\nrange = "127.0.0.1-3"\ndriver = "auto"\nlow_power_w = 2300\n'
        "power_max_w = 3400\nweb_port = 8080\n"
    )
    assert cfg.miners[0].driver == "auto" and cfg.miners[0].settings.low_power_w == 2300


async def test_daemon_finds_each_firmware_and_remembers_a_rig_switched_off(
    site: SimSite, state_dir: Path
) -> None:
    cfg = parse_config(_auto_config(site, state_dir), environ={})
    daemon = Daemon(cfg, clock=site.clock)
    try:
        assert daemon.devices.miners == {}  # nothing known yet: nothing to poll
        assert await daemon.rediscover() is True
        assert {r.id: r.driver for r in daemon.devices.rigs} == site.dialects
        ports = {r.id: r.port for r in daemon.devices.rigs}
        assert ports["rig-004"] == 4433 and ports["rig-001"] == 4028
        result = await daemon.cycle()
        assert result.document["rigs_total"] == 10  # 244 empty addresses are not rigs
        assert result.document["rigs"]["mining"] == 10
        # PDU outlets map the found rigs by the range's ids.
        rig3 = result.snapshot.rigs["rig-003"]
        assert rig3.info.outlet is not None and rig3.outlet_on is True
        assert await daemon.rediscover() is False  # nothing new: nothing rebuilt
    finally:
        await daemon.devices.close()
        if daemon.store is not None:
            daemon.store.close()

    # rig-002 is switched off at its PDU; rigd restarts: it is still a rig from cycle 1,
    # and a new scan (which cannot see it) does not drop it.
    farm = site.farm
    pdu, outlet = farm.outlet_of("rig-002") or ("", 0)
    farm.pdus[pdu].switch(outlet, "off", farm.now())
    again = Daemon(cfg, clock=site.clock)
    try:
        assert len(again.devices.miners) == 10
        await again.rediscover()
        assert len(again.devices.miners) == 10
        result = await again.cycle()
        assert result.snapshot.rigs["rig-002"].state.value == "off"
    finally:
        await again.devices.close()
        if again.store is not None:
            again.store.close()


async def test_run_scans_at_start_and_a_reload_keeps_what_was_found(
    site: SimSite, state_dir: Path
) -> None:
    path = state_dir / "rigd.toml"
    path.write_text(_auto_config(site, state_dir, discover_every=3600))
    cfg = parse_config(path.read_text(), environ={})
    daemon = Daemon(cfg, clock=site.clock, config_path=str(path))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        for _ in range(200):
            if daemon.last is not None and daemon.last.document["rigs"]["mining"] == 10:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the daemon never found and polled the 10 rigs")
        await daemon.reload()
        assert len(daemon.devices.miners) == 10  # no new scan needed
        assert daemon.source_cfg.miners[0].driver == "auto"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
