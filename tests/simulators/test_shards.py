"""A farm served by several processes (`SimSite(processes=N)`, `rigd sim --processes`):
the meter in the parent reads every worker's rigs, a PDU outlet switched off in a worker
takes its rig's power off that meter, the config keeps its one-process shape, and
stopping the site leaves no worker behind."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.config import parse_config
from drivers.apc_snmp import ApcPdu
from drivers.modbus_meter import ModbusMeter
from simulators.clock import ManualClock
from simulators.farm import Farm
from simulators.shards import REPORT_S, RemotePower, default_processes, slices
from simulators.site import SimSite

# Inside the loopback block this worktree's benchmarks use, above any farm they start.
SUBNET = "127.112.240.0/24"
MIX = "luxos,antminer,whatsminer,braiins,avalon"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _expected_import_w(site: SimSite, t: float, off: frozenset[str] = frozenset()) -> float:
    """What the meter should read: the parent's copy of the farm (the same seed, never
    commanded) summed, as the one-process meter would."""
    m = site.farm.meter
    rigs = sum(r.power_w(t) for rid, r in site.farm.rigs.items() if rid not in off)
    return m.overhead_base_w + rigs * (1.0 + m.overhead_frac)


async def _meter_w(meter: ModbusMeter) -> float:
    return (await meter.read(time.time())).power_w


def test_slices_keep_each_pdu_with_its_rigs() -> None:
    farm = Farm.build(ManualClock(), rigs=100, pdus=5)
    got = slices(farm, 3)
    assert len(got) == 3
    assert sorted(r for rigs, _ in got for r in rigs) == sorted(farm.rigs)
    for rigs, pdus in got:
        for pid in pdus:
            assert {o.rig.id for o in farm.pdus[pid].outlets.values() if o.rig} <= set(rigs)
    # No PDUs: plain runs of rigs; more processes than PDUs: one slice per PDU.
    assert [len(r) for r, _ in slices(Farm.build(ManualClock(), rigs=10, pdus=0), 2)] == [5, 5]
    assert len(slices(Farm.build(ManualClock(), rigs=40, pdus=2), 4)) == 2
    assert default_processes(100) == 1 and default_processes(10_000) == 4


def test_remote_power_integrates_reports() -> None:
    p = RemotePower()
    p.report(0, 100.0, 1000.0, energy_j=5.0)
    p.report(1, 100.0, 500.0, energy_j=0.0)
    p.report(0, 102.0, 3000.0)  # trapezoid: 2 s at 2,000 W on average
    assert p.power_w(102.0) == 3500.0
    assert p.energy_j(102.0) == pytest.approx(5.0 + 4000.0 + 1000.0)
    assert p.energy_j(103.0) == pytest.approx(5.0 + 4000.0 + 1000.0 + 3500.0)


async def test_three_processes_meter_the_whole_farm_and_stop_cleanly() -> None:
    site = SimSite(rigs=60, pdus=3, processes=3, mix=MIX)
    await site.start()
    pids = site.worker_pids
    try:
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        assert site.pdu_agents == {}  # the parent serves the meter only
        meter = ModbusMeter("m", site.meter.host, site.meter.port, timeout=2.0)
        try:
            before = await _meter_w(meter)
            assert before == pytest.approx(_expected_import_w(site, site.farm.now()), rel=0.02)

            # Switch off every outlet of the last worker's PDU, over SNMP.
            pid = "pdu-03"
            host, port = site.pdu_address(pid)
            pdu = ApcPdu(pid, host, port, timeout=2.0, retries=1)
            try:
                for n in site.farm.pdus[pid].outlets:
                    await pdu.set_outlet(n, "off")
            finally:
                await pdu.close()
            off = frozenset(o.rig.id for o in site.farm.pdus[pid].outlets.values() if o.rig)
            want = _expected_import_w(site, site.farm.now(), off)
            deadline = time.monotonic() + 10 * REPORT_S + 5.0  # a report or two, a busy host
            after = await _meter_w(meter)
            while after > want * 1.02 and time.monotonic() < deadline:
                await asyncio.sleep(REPORT_S / 2)
                after = await _meter_w(meter)
            assert after == pytest.approx(want, rel=0.02)
            assert before - after > 0.25 * before  # a third of the rigs went dark
        finally:
            await meter.close()
    finally:
        await site.stop()
    assert not any(_alive(p) for p in pids)  # exited and reaped by `stop`


def _ports_out(config: str) -> str:
    """The config without the meter's and PDUs' ports (ephemeral in every run)."""
    return re.sub(r"(?m)^port = \d+$", "port = N", config)


async def test_the_config_is_the_one_process_config() -> None:
    texts = []
    for processes in (1, 2):
        site = SimSite(rigs=24, pdus=2, subnet=SUBNET, mix=MIX, processes=processes)
        async with site:
            texts.append(site.config_toml())
    one, two = texts
    assert one.count("[[miners]]") == 24 and one.count("[[pdus]]") == 2
    # Miners keep their real ports on the subnet: only the ephemeral ones differ.
    assert "port = 4028" in two and _ports_out(one) == _ports_out(two)


def test_rigd_sim_processes_writes_one_valid_config(tmp_path: Path) -> None:
    """`rigd sim --processes 2`: the farm comes up, its config passes the daemon's checks
    with every rig and PDU, and Ctrl-C's path (`--duration`) stops every worker."""
    cfg_path = tmp_path / "sim.toml"
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", "sim", "--rigs", "30", "--pdus", "2",
         "--processes", "2", "--mix", MIX, "--write-config", str(cfg_path),
         "--state-dir", str(tmp_path / "state"), "--duration", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "30 rigs on 2 PDUs" in r.stdout and "served by 2 processes" in r.stdout
    cfg = parse_config(cfg_path.read_text(), environ={})
    assert len(cfg.miners) == 30 and len(cfg.pdus) == 2 and len(cfg.meters) == 1
