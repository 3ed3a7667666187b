"""`rigctl scan` tells an API v3 Whatsminer from a v2 one whether or not its 4028 answers.

API v3 firmware serves its API on 4433 and, on real units, still answers `get_version` on
4028 (and nothing else there); some units' 4028 does not answer at all. Either way the
scan must find a v3 unit, call it "whatsminer-v3" and point it at 4433.
"""

from __future__ import annotations

import errno
import random

import pytest

from controller.adapters.discovery import addresses, scan
from simulators.clock import ManualClock
from simulators.whatsminer import (
    V2_FIRMWARE_VERSION,
    V3_FIRMWARE_VERSION,
    WhatsminerFleet,
    build_whatsminer_farm,
)


async def _fleet(api: str, *, answers_4028: bool = True) -> tuple[WhatsminerFleet, str]:
    for _ in range(20):
        block = f"127.{random.randint(100, 250)}.{random.randint(1, 254)}"
        farm = build_whatsminer_farm(ManualClock(), rigs=1)
        fleet = WhatsminerFleet(farm, subnet=f"{block}.0/29", api=api)  # type: ignore[arg-type]
        for server in fleet.servers.values():
            server.v3_version_on_4028 = answers_4028 and api == "v3"
        try:
            await fleet.start()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            raise
        return fleet, block
    pytest.skip("no free loopback block")


@pytest.mark.parametrize("answers_4028", [True, False], ids=["4028-answers", "4028-closed"])
async def test_scan_finds_a_v3_whatsminer(answers_4028: bool) -> None:
    fleet, block = await _fleet("v3", answers_4028=answers_4028)
    try:
        server = next(iter(fleet.servers.values()))
        assert server.listens_4028 is answers_4028
        found = await scan(addresses([f"{block}.0/29"]), wait_s=0.5)
        assert [(f.host, f.driver, f.port) for f in found] == [
            (f"{block}.1", "whatsminer-v3", 4433)
        ]
        assert (found[0].make, found[0].firmware) == ("Whatsminer", "btminer")
        assert found[0].firmware_version == V3_FIRMWARE_VERSION
        assert found[0].model == server.rig.model.name  # "Whatsminer M50S_VH50"
    finally:
        await fleet.stop()


async def test_scan_keeps_a_v2_whatsminer_on_v2() -> None:
    fleet, block = await _fleet("v2")
    try:
        found = await scan(addresses([f"{block}.0/29"]), wait_s=0.5)
        assert [(f.driver, f.port) for f in found] == [("whatsminer", 4028)]
        assert found[0].firmware_version == V2_FIRMWARE_VERSION
    finally:
        await fleet.stop()
