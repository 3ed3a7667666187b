"""The firmware families a simulated site serves beside its CGMiner fleet: Avalon, ePIC
PowerPlay and VNish, one fleet each, so `simulators.site` only asks this module.

For each dialect it knows: which rig a farm gets for it (an Avalon is a rig of its own
models, put in the place and on the PDU outlet of the Antminer the farm was built with; ePIC
and VNish run on the farm's Antminers), which fleet serves it, where the daemon reaches it, and what
its config row adds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Final

from simulators import avalon, epic, vnish
from simulators.avalon import AvalonFleet
from simulators.epic import EpicFleet
from simulators.farm import Farm, SimRig
from simulators.fleet import Fleet
from simulators.vnish import VNishFleet

# Dialect (a driver kind) -> the `SimRig.firmware` it serves.
DIALECTS: Final = {"avalon": avalon.FIRMWARE, "epic": epic.FIRMWARE, "vnish": vnish.FIRMWARE}


def make_rig(dialect: str, rig_id: str, t: float, rng: random.Random, seed: int) -> SimRig | None:
    """The rig a farm gets for `dialect`, or None when the farm's own rig will do."""
    if dialect == "avalon":
        return avalon.avalon_rig(rig_id, rng.choice(list(avalon.AVALON_MODELS)), t, seed=seed)
    return None


class Families:
    """The fleets of these dialects on one site (started after the CGMiner fleet)."""

    def __init__(self, farm: Farm, dialects: Mapping[str, str], *, subnet: str | None) -> None:
        self.dialects = dict(dialects)
        ids = {d: [r for r, rd in dialects.items() if rd == d] for d in DIALECTS}
        self.avalon = AvalonFleet(farm, subnet=subnet, rig_ids=ids["avalon"])
        self.epic = EpicFleet(farm, subnet=subnet, rig_ids=ids["epic"])
        self.vnish = VNishFleet(farm, subnet=subnet, rig_ids=ids["vnish"])

    @property
    def fleets(self) -> list[Fleet[Any]]:
        return [self.avalon, self.epic, self.vnish]

    def serves(self, rig_id: str) -> bool:
        return self.dialects.get(rig_id) in DIALECTS

    def address_of(self, rig_id: str) -> tuple[str, int]:
        if rig_id in self.epic.api:
            return self.epic.address_of(rig_id)
        if rig_id in self.vnish.rpc:
            return self.vnish.address_of(rig_id)
        return self.avalon.address_of(rig_id)

    def miner_rows(self, rig_id: str) -> list[str]:
        """What the rig's `[[miners]]` row adds to id, host, port and driver."""
        if rig_id in self.avalon.servers:
            low = self.avalon.servers[rig_id].avalon.work_mode_w[avalon.LOW]
            return [f"low_power_w = {low:g}  # measured on its outlet in the low work mode"]
        if rig_id in self.vnish.web and self.vnish.web[rig_id].port != vnish.WEB_PORT:
            return [f"web_port = {self.vnish.web[rig_id].port}"]
        return []
