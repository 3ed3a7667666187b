"""The README's table of what each driver reads is what the drivers read.

One rig of each of the eight dialects, and a plain CGMiner (a stock Antminer's 4028 side
with no web UI), each on its own loopback address and real ports as on a farm LAN. Each is
read once through the driver its config row builds, and the fields that came back filled
are compared with the README's table: a driver that stops reading something, or starts
to, shows up here instead of in an operator's dashboard.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.config import parse_config
from controller.runtime.devices import build_devices
from drivers.telemetry import RigTelemetry
from simulators.clock import ScaledClock
from simulators.site import SimSite

README = Path(__file__).resolve().parent.parent.parent / "README.md"
MIX = (
    "luxos", "antminer", "whatsminer", "whatsminer-v3", "braiins", "avalon", "epic", "vnish",
    "luxos",  # rig-009: made a plain CGMiner below
)  # fmt: skip
COLUMNS = {
    "hashrate": lambda t: t.hashrate_ths,
    "power": lambda t: t.power_w,
    "power limit": lambda t: t.power_limit_w,
    "board temp": lambda t: t.temp_c,
    "chip temp": lambda t: t.chip_temp_c,
    "fans": lambda t: t.fans_rpm or None,
    "per board": lambda t: t.hashboards or None,
    "uptime": lambda t: t.uptime_s,
}


def readme_table() -> dict[str, dict[str, bool]]:
    """driver -> column -> "yes", from the README's table headed by these columns."""
    text = README.read_text(encoding="utf-8")
    head = "| `driver` | " + " | ".join(COLUMNS) + " |"
    assert head in text, "the README's table of what each driver reads is gone"
    rows = text.split(head, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        m = re.fullmatch(r"`([\w-]+)`", cells[0])
        assert m, row
        out[m.group(1)] = {col: cell == "yes" for col, cell in zip(COLUMNS, cells[1:], strict=True)}
    return out


def filled(tel: RigTelemetry) -> dict[str, bool]:
    return {col: get(tel) is not None for col, get in COLUMNS.items()}


@pytest.fixture
async def site() -> AsyncIterator[SimSite]:
    for _ in range(10):
        block = f"127.{random.randint(100, 250)}.{random.randint(1, 254)}"
        s = SimSite(rigs=len(MIX), pdus=1, subnet=f"{block}.0/24", clock=ScaledClock(1), mix=MIX)
        s.farm.rigs["rig-009"].firmware = "bmminer"  # the 4028 side of stock firmware only
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


async def test_readme_says_what_each_driver_reads(site: SimSite) -> None:
    state = Path(tempfile.mkdtemp(prefix="table-", dir="/tmp"))
    try:
        text = site.config_toml(
            broker_url="mqtt://127.0.0.1:9", state_dir=state, interval_s=10, timeout_s=2.0
        )
        cfg = parse_config(text, environ={})
        devices = build_devices(cfg)
        kinds = {r.id: r.miner.driver for r in cfg.rigs()}
        assert set(kinds.values()) == {*MIX, "cgminer"} and len(kinds) == len(MIX)
        seen = {}
        try:
            for rid, driver in devices.miners.items():
                seen[kinds[rid]] = filled(await driver.read(site.clock.now()))
        finally:
            for driver in devices.miners.values():
                await driver.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert seen == readme_table()
