"""Simulators for the floor comparison, in a child process so their CPU is not counted.

`simulated(dialect, devices)` starts `python -m bench.floors.sim` (a `SimSite` on a
loopback subnet, every rig on its own 127.x address and real ports; PDUs as SNMP agents
on 127.0.0.1) and yields the targets it printed; closing its stdin stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator

from bench.floors.dialects import PDU_OUTLETS
from controller.runtime import eventloop
from simulators.site import SimSite

Target = tuple[str, int]
DEFAULT_SUBNET = "127.80.0.0/16"
_MARK = "targets: "


@contextlib.contextmanager
def simulated(
    dialect: str, devices: int, subnet: str = DEFAULT_SUBNET, timeout_s: float = 120.0
) -> Iterator[list[Target]]:
    """Targets of `devices` simulated devices of `dialect`, served from a child process."""
    if not subnet.startswith("127."):
        raise ValueError("simulators stay on loopback: the subnet must be inside 127.0.0.0/8")
    cmd = [sys.executable, "-m", "bench.floors.sim", "--dialect", dialect,
           "--devices", str(devices), "--subnet", subnet]  # fmt: skip
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:  # simulators may log to stdout before the targets
            if line.startswith(_MARK):
                yield [(h, int(p)) for h, p in json.loads(line[len(_MARK) :])]
                return
        raise RuntimeError(f"simulators for {dialect} did not start (exit {child.wait()})")
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def _serve(dialect: str, devices: int, subnet: str) -> None:
    if dialect == "pdu":
        site = SimSite(rigs=devices * PDU_OUTLETS, pdus=devices, subnet=subnet, mix="luxos")
    else:
        site = SimSite(rigs=devices, pdus=0, subnet=subnet, mix=dialect)
    async with site:
        if dialect == "pdu":
            targets = [(a.host, a.port) for a in site.pdu_agents.values()]
        else:
            targets = [site.address_of(r) for r in site.farm.rigs]
        print(_MARK + json.dumps(targets), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floors.sim")
    p.add_argument("--dialect", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--subnet", default=DEFAULT_SUBNET)
    a = p.parse_args(argv)
    eventloop.run(_serve(a.dialect, a.devices, a.subnet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
