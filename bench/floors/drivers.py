"""rigd's drivers for the floor comparison, built as the daemon builds them."""

from __future__ import annotations

from typing import Any

from drivers.apc_snmp import ApcPdu
from drivers.registry import MinerAccess, make_miner_driver


def make_drivers(dialect: str, targets: list[tuple[str, int]]) -> list[Any]:
    """One driver per target: (host, port) is the rig's API address, or the PDU's agent."""
    if dialect == "pdu":
        return [ApcPdu(f"pdu{n}", h, p) for n, (h, p) in enumerate(targets)]
    return [
        make_miner_driver(dialect, f"rig{n}", MinerAccess(host=h, port=p))
        for n, (h, p) in enumerate(targets)
    ]
