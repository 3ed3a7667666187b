"""rigctl scan over miners on their own loopback addresses, as on a farm subnet."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from controller.adapters import discovery
from controller.adapters.discovery import Found, addresses, scan
from controller.config import load_config
from simulators.clock import ScaledClock
from simulators.site import SimSite


@pytest.fixture
async def subnet_site() -> AsyncIterator[SimSite]:
    site = SimSite(rigs=20, pdus=1, subnet="127.0.88.0/24", clock=ScaledClock(1))
    site.farm.rigs["rig-005"].firmware = "bmminer"  # one stock Antminer among LuxOS rigs
    try:
        await site.start()
    except OSError as e:  # pragma: no cover
        pytest.skip(f"cannot bind loopback aliases: {e}")
    try:
        yield site
    finally:
        await site.stop()


async def test_scan_finds_and_identifies(subnet_site: SimSite) -> None:
    t0 = time.monotonic()
    found = await scan(addresses(["127.0.88.0/24"]), wait_s=0.5)
    took = time.monotonic() - t0
    assert [f.host for f in found] == [f"127.0.88.{n}" for n in range(1, 21)]
    stock = next(f for f in found if f.host == "127.0.88.5")
    assert (stock.make, stock.firmware, stock.driver) == ("Antminer", "bmminer", "cgminer")
    lux = next(f for f in found if f.host == "127.0.88.1")
    assert lux.firmware == "LuxOS" and lux.driver == "luxos"
    assert lux.model == subnet_site.farm.rigs["rig-001"].model.name
    assert took < 5.0  # 254 addresses, 234 of them empty


def _stall_each_turn(seconds: float, *, while_: Callable[[], bool]) -> None:
    """Block the event loop `seconds` in every turn while `while_()`: a loop starved by a
    busy host (both cores taken by other work) or flooded by the scan and a control cycle."""
    loop = asyncio.get_running_loop()

    def stall() -> None:
        if while_():
            time.sleep(seconds)
            loop.call_soon(stall)

    loop.call_soon(stall)


def _assert_all_20(found: list[Found]) -> None:
    assert [f.host for f in found] == [f"127.0.88.{n}" for n in range(1, 21)]
    drivers = {f.host: f.driver for f in found}
    assert drivers.pop("127.0.88.5") == "cgminer" and set(drivers.values()) == {"luxos"}


async def test_a_starved_loop_does_not_time_out_the_screening_connects(
    subnet_site: SimSite,
) -> None:
    """A connect answered by the kernel at once, seen by the loop a second later, is a miner."""
    until = time.monotonic() + 1.5
    _stall_each_turn(0.3, while_=lambda: time.monotonic() < until)
    _assert_all_20(await scan(addresses(["127.0.88.1-30"]), wait_s=0.5))


async def test_firmware_probes_starved_of_the_loop_are_repeated(
    subnet_site: SimSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drivers' request timeouts are wall time: probes that ran while the loop was
    starved may all have timed out, and are asked again once it is not."""
    real = discovery._probe
    first: set[str] = set()
    in_flight = 0

    async def starved_first_time(host: str, port: int, wait_s: float) -> Found | None:
        nonlocal in_flight
        if host in first:
            return await real(host, port, wait_s)
        first.add(host)
        in_flight += 1
        if in_flight == 1:
            _stall_each_turn(0.3, while_=lambda: in_flight > 0)
        try:
            return await real(host, port, wait_s)
        finally:
            in_flight -= 1

    monkeypatch.setattr(discovery, "_probe", starved_first_time)
    _assert_all_20(await scan(addresses(["127.0.88.1-30"]), wait_s=0.5))
    assert len(first) == 20


async def _scan_add(cfg: Path, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli.rigctl",
        "-c",
        str(cfg),
        "scan",
        "127.0.88.1-30",
        "--timeout",
        "0.5",
        "--add",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rigctl_scan_add_writes_a_valid_config(subnet_site: SimSite, tmp_path: Path) -> None:
    cfg = tmp_path / "rigd.toml"
    cfg.write_text(
        '# my farm\n[site]\nid = "s"\n\n[[miners]]\nid = "old"\nhost = "127.0.88.1"\nport = 4028\n'
    )
    rc, text, err = await _scan_add(cfg)
    assert rc == 0, err
    assert "20 miner(s) among 30 address(es)" in text
    assert "added 19 miner(s)" in text and "rigctl config reload" in text
    loaded = load_config(cfg, environ={})
    rigs = {r.id: r for r in loaded.rigs()}
    assert len(rigs) == 20 and rigs["old"].host == "127.0.88.1"
    assert rigs["rig-88-5"].miner.driver == "cgminer" and rigs["rig-88-2"].miner.driver == "luxos"
    assert cfg.read_text().startswith("# my farm")  # comments kept
    # Scanning again adds nothing.
    rc, text, _ = await _scan_add(cfg, "--json")
    assert rc == 0
    assert len(json.loads(text.split("\nadded")[0])) == 20
    assert "added 0 miner(s)" in text


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="bad address range"):
        addresses(["10.0.0.300/24"])
