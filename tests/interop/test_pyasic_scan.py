"""The issue's own check: pyasic scans a mixed simulated subnet, as `rigd sim --subnet ...
--mix luxos,antminer,whatsminer,whatsminer-v3,braiins` serves it, and tells each rig's
firmware as it would on hardware."""

from __future__ import annotations

from pyasic.miners.backends.antminer import AntminerModern
from pyasic.miners.backends.braiins_os import BOSer
from pyasic.miners.backends.btminer import BTMinerV2, BTMinerV3
from pyasic.miners.backends.luxminer import LUXMiner
from pyasic.network import MinerNetwork

from tests.interop.conftest import ROOT_ONLY, RigFactory

pytestmark = ROOT_ONLY

MIX = "luxos,antminer,whatsminer,whatsminer-v3,braiins"


async def test_pyasic_scan_tells_every_simulated_firmware(rig_of: RigFactory) -> None:
    rig = await rig_of(MIX, rigs=5)
    hosts = [rig.site.address_of(rid)[0] for rid in rig.site.farm.rigs]
    subnet = hosts[0].rsplit(".", 1)[0] + ".0/29"
    miners = await MinerNetwork.from_subnet(subnet).scan()
    found = {str(m.ip): m for m in miners}
    assert sorted(found) == sorted(hosts)
    expected = [LUXMiner, AntminerModern, BTMinerV2, BTMinerV3, BOSer]
    for host, cls in zip(hosts, expected, strict=True):
        assert isinstance(found[host], cls), (host, type(found[host]).__mro__)
