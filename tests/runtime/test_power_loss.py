"""After a farm-wide power loss (docs/operations.md): every miner reboots mining, whatever
rigd had told it, and rigd, started after the farm, brings import back under the cap from
its first cycles, with what it remembered in its state database."""

from __future__ import annotations

from pathlib import Path

from bench.sim_harness import SimHarness, flat_out_kw
from simulators.farm import RigMode


async def test_power_returns_every_rig_mines_and_rigd_brings_the_farm_under_the_cap(
    tmp_path: Path,
) -> None:
    h = SimHarness.create(tmp_path, rigs=12, pdus=2, control={})
    cap = 0.4 * flat_out_kw(h.farm)
    h.set_override(cap, 6 * 3600, "feeder limit")
    await h.run_for(1200)
    slept = {k for k, r in h.farm.rigs.items() if r.mode is RigMode.SLEEPING}
    assert slept and h.recorder.report(since=h.now - 600).over_frac == 0

    # the power goes: the farm and the edge host with it
    await h.close_daemon()
    for r in h.farm.rigs.values():
        r.set_powered(False, h.now)
    h._advance(1800)
    # it comes back: every miner boots and mines (sleep does not survive a power cycle),
    # and the edge host takes five minutes to boot and start rigd
    for r in h.farm.rigs.values():
        r.set_powered(True, h.now)
    assert all(r.mode is RigMode.MINING for r in h.farm.rigs.values())
    h._advance(300)
    assert h.true_import_kw() > cap  # over the cap before rigd is back
    h.daemon = h._new_daemon()
    started = h.now
    h.recorder.mark(started)  # the farm cannot obey faster than it can shed
    await h.run_for(1800)

    rep = h.recorder.report(since=started + 1)
    assert rep.over_frac_settled == 0, rep.line("after the power loss")
    # the override survived the restart, and what rigd had slept is down again
    assert h.controller.override is not None and h.cap().kw == cap
    assert all(h.farm.rigs[k].mode is RigMode.SLEEPING or not h.farm.rigs[k].powered for k in slept)
