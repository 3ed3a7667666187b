"""The command floor really sleeps (and wakes) simulated rigs of every dialect, and
switches PDU outlets (no timing assertions)."""

from __future__ import annotations

import asyncio

from bench.floors.commands import KINDS, Command, CommandFloor, curtail
from simulators.farm import RigMode
from simulators.site import DIALECTS, SimSite

SUBNET = "127.86.0.0/24"
MIX = ",".join(DIALECTS)  # every dialect, in turn


def _commands(site: SimSite) -> list[Command]:
    out = []
    for rid, dialect in site.dialects.items():
        host, port = site.address_of(rid)
        out.append(Command(rid, dialect, host, port))
    return out


async def _settled(site: SimSite, want: RigMode) -> dict[str, str]:
    """Rigs not in `want` after a few seconds (a Whatsminer answers `power_off` before
    acting on it, as real ones do with respbefore)."""
    late: dict[str, str] = {}
    for _ in range(50):
        late = {r: d for r, d in site.dialects.items() if site.farm.rigs[r].mode is not want}
        if not late:
            break
        await asyncio.sleep(0.1)
    return late


def test_every_command_dialect_is_a_simulated_one() -> None:
    assert set(DIALECTS) <= set(KINDS)


def test_command_floor_sleeps_and_wakes_every_dialect() -> None:
    async def main() -> None:
        # A fast farm clock: the Antminer's ~21 s mode write shrinks with it (and a LuxOS
        # session's 60 s with it: the floor logs on again when one lapsed).
        async with SimSite(rigs=len(DIALECTS) * 2, pdus=0, subnet=SUBNET, mix=MIX,
                           speed=20.0) as site:  # fmt: skip
            cmds = _commands(site)
            floor = CommandFloor()
            assert await floor.prepare(cmds) == []
            try:
                slept = await curtail(cmds, "sleep", floor)
                assert slept["errors"] == {}, slept
                assert slept["acknowledged"] == len(cmds)
                assert slept["requests"] >= len(cmds)
                assert await _settled(site, RigMode.SLEEPING) == {}
                woke = await curtail(cmds, "wake", floor)
                assert woke["errors"] == {}, woke
                assert await _settled(site, RigMode.MINING) == {}
            finally:
                await floor.release()

    asyncio.run(main())


def test_command_floor_switches_pdu_outlets() -> None:
    async def main() -> None:
        async with SimSite(rigs=6, pdus=1, subnet=SUBNET, mix="luxos") as site:
            (pid,) = site.farm.pdus
            agent = site.pdu_agents[pid]
            cmds = [
                Command(f"outlet{n}", "pdu", agent.host, agent.port, outlet=n) for n in (1, 2, 3)
            ]
            floor = CommandFloor()
            await floor.prepare(cmds)
            try:
                got = await curtail(cmds, "sleep", floor)
                assert got["errors"] == {} and got["acknowledged"] == 3, got
                assert got["requests"] == 6  # a SET and its read-back each
                outlets = site.farm.pdus[pid].outlets
                assert [outlets[n].on for n in (1, 2, 3, 4)] == [False, False, False, True]
            finally:
                await floor.release()

    asyncio.run(main())
