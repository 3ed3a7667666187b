"""The daemon against a simulated farm over real sockets and a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import Config, parse_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite
from tests.conftest import Mosquitto, running, watch

SPEED = 20.0  # farm seconds per wall second: a 6 s sleep shows in 0.3 s


def make_config(site: SimSite, broker: Mosquitto, tmp_path: Path, **kw: float) -> Config:
    text = site.config_toml(
        broker_url=broker.url,
        state_dir=tmp_path / "state",
        interval_s=kw.get("interval_s", 0.5 * SPEED),  # 0.5 s wall
        timeout_s=kw.get("timeout_s", 0.4),
        retries=int(kw.get("retries", 0)),
    )
    return parse_config(text, environ={})


async def test_retained_topics_carry_the_farm_and_track_it(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with SimSite(rigs=12, pdus=2, clock=ScaledClock(SPEED)) as site:
        farm = site.farm
        cfg = make_config(site, mosquitto, tmp_path)
        async with watch(mosquitto.host, mosquitto.port) as w, running(cfg, site):
            assert (await w.wait_for("rigd/sim/status")) == b"online"
            state = await w.wait_json("rigd/sim/state", lambda d: d["rigs"]["mining"] == 12)
            true_kw = farm.meter.true_power_w(farm.now()) / 1000
            assert state["import_kw"] == pytest.approx(true_kw, rel=0.03)
            assert state["rigs_total"] == 12 and state["meter_ok"] is True
            expected_ths = sum(r.hashrate_ths(farm.now()) for r in farm.rigs.values())
            assert state["hashrate_ths"] == pytest.approx(expected_ths, rel=0.05)
            assert state["rig_power_kw"] > 12 * 2.5
            assert {"ts", "import_kw", "rigs", "hashrate_ths", "rig_power_kw"} <= set(state)

            rig = await w.wait_json("rigd/sim/rigs/rig-001/state")
            sim = farm.rigs["rig-001"]
            assert rig["state"] == "mining"
            assert rig["telemetry"]["model"] == sim.model.name
            assert rig["telemetry"]["hashrate_ths"] == pytest.approx(
                sim.hashrate_ths(farm.now()), rel=0.05
            )
            assert rig["telemetry"]["power_w"] == pytest.approx(sim.power_w(farm.now()), rel=0.03)
            assert rig["health"]["reachable"] is True and rig["outlet"]["on"] is True
            assert len(rig["telemetry"]["hashboards"]) == sim.model.boards

            # The farm changes: three rigs told to sleep (by someone else), one outlet off.
            for rid in ("rig-002", "rig-003", "rig-004"):
                farm.rigs[rid].sleep(farm.now())
            pdu_id, outlet = farm.outlet_of("rig-005") or ("", 0)
            farm.pdus[pdu_id].switch(outlet, "off", farm.now())
            state = await w.wait_json(
                "rigd/sim/state",
                lambda d: d["rigs"]["sleeping"] == 3 and d["rigs"]["off"] == 1,
            )
            assert state["rigs"]["mining"] == 8
            off = await w.wait_json("rigd/sim/rigs/rig-005/state", lambda d: d["state"] == "off")
            assert off["outlet"]["on"] is False and off["power_w"] == 0.0
            asleep = await w.wait_json(
                "rigd/sim/rigs/rig-002/state",
                lambda d: d["state"] == "sleeping" and d["power_w"] < 100,
            )
            assert asleep["hashrate_ths"] == 0.0
            # Import follows: four rigs' worth of power less (plus overhead on it).
            await w.wait_json(
                "rigd/sim/state",
                lambda d: d["import_kw"] < true_kw - 4 * 2.9 * (1 + farm.meter.overhead_frac) * 0.9,
            )
            pdu = await w.wait_json(f"rigd/sim/pdus/{pdu_id}/state")
            assert pdu["health"]["reachable"] is True
            assert await w.wait_json("rigd/sim/meters/meter-main/state")

        # Stopped cleanly: offline, and every retained topic is still there for a newcomer.
        async with watch(mosquitto.host, mosquitto.port) as w2:
            assert (await w2.wait_for("rigd/sim/status", lambda p: p == b"offline")) == b"offline"
            await w2.wait_for("rigd/sim/rigs/rig-012/state")
            assert w2.retained["rigd/sim/state"] and w2.retained["rigd/sim/rigs/rig-012/state"]
        # The daemon commanded nothing: only our three sleeps were ever sent.
        assert sum(r.command_count for r in farm.rigs.values()) == 3


async def test_silent_devices_show_unreachable_and_daemon_keeps_running(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with SimSite(rigs=6, pdus=1, clock=ScaledClock(SPEED)) as site:
        cfg = make_config(site, mosquitto, tmp_path)
        async with watch(mosquitto.host, mosquitto.port) as w, running(cfg, site):
            await w.wait_json("rigd/sim/state", lambda d: d["rigs"]["mining"] == 6)
            await site.fleet.servers["rig-003"].set_fault("silent")
            site.meter.fault = "silent"
            rig = await w.wait_json(
                "rigd/sim/rigs/rig-003/state", lambda d: d["state"] == "unreachable"
            )
            assert rig["health"]["reachable"] is False
            assert rig["health"]["last_error_kind"] == "timeout"
            assert "timeout" in rig["health"]["last_error"]
            assert rig["health"]["last_seen"] is not None
            # Its outlet is still metered, so its power is still known.
            assert rig["power_w"] and rig["power_w"] > 1000
            state = await w.wait_json(
                "rigd/sim/state", lambda d: d["meter_ok"] is False and d["rigs"]["unreachable"] == 1
            )
            assert state["import_kw"] is None
            meter = await w.wait_json(
                "rigd/sim/meters/meter-main/state", lambda d: d["health"]["reachable"] is False
            )
            assert meter["health"]["last_error_kind"] == "timeout"
            cycle = state["cycle"]
            # Still cycling on cadence despite the silence.
            await w.wait_json("rigd/sim/state", lambda d: d["cycle"] >= cycle + 3, within=10)
            # Devices come back: health recovers.
            await site.fleet.servers["rig-003"].set_fault(None)
            site.meter.fault = None
            await w.wait_json(
                "rigd/sim/state", lambda d: d["meter_ok"] and d["rigs"]["mining"] == 6
            )
            rig = await w.wait_json(
                "rigd/sim/rigs/rig-003/state", lambda d: d["health"]["reachable"] is True
            )
            assert rig["health"]["last_error"]  # the last error is kept for the technician


async def test_garbage_and_refused_devices_do_not_stop_the_loop(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with SimSite(rigs=4, pdus=1, clock=ScaledClock(SPEED)) as site:
        cfg = make_config(site, mosquitto, tmp_path)
        async with watch(mosquitto.host, mosquitto.port) as w, running(cfg, site):
            await w.wait_json("rigd/sim/state", lambda d: d["rigs"]["mining"] == 4)
            await site.fleet.servers["rig-001"].set_fault("garbage")
            await site.fleet.servers["rig-002"].set_fault("refuse")
            await site.fleet.servers["rig-003"].set_fault("truncated")
            r1 = await w.wait_json(
                "rigd/sim/rigs/rig-001/state", lambda d: d["state"] == "unreachable"
            )
            r2 = await w.wait_json(
                "rigd/sim/rigs/rig-002/state", lambda d: d["state"] == "unreachable"
            )
            r3 = await w.wait_json(
                "rigd/sim/rigs/rig-003/state", lambda d: d["state"] == "unreachable"
            )
            assert r1["health"]["last_error_kind"] == "malformed"
            assert r2["health"]["last_error_kind"] == "unreachable"
            assert r3["health"]["last_error_kind"] == "malformed"
            await w.wait_json(
                "rigd/sim/state", lambda d: d["rigs"]["mining"] == 1 and d["meter_ok"]
            )


async def _stock_mosquitto_sub_sees_retained_topics(broker: Mosquitto) -> None:
    """What the README promises a user: `mosquitto_sub -t 'rigd/#' -v` shows the farm."""
    sub = shutil.which("mosquitto_sub")
    if sub is None:
        pytest.fail("mosquitto_sub is not installed: run the tests with scripts/test.sh")
    proc = await asyncio.create_subprocess_exec(
        sub,
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-t",
        "rigd/#",
        "-v",
        "-W",
        "2",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()  # -W 2: exits after 2 s without new messages
    lines = out.decode().splitlines()
    topics = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines if " " in line}
    assert topics["rigd/sim/status"] == "online"
    assert json.loads(topics["rigd/sim/state"])["rigs_total"] == 8
    assert {f"rigd/sim/rigs/rig-00{n}/state" for n in range(1, 9)} <= set(topics)
    assert {"rigd/sim/pdus/pdu-01/state", "rigd/sim/meters/meter-main/state"} <= set(topics)


def _rigd(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli.rigd", *args]


async def test_cli_sim_and_run_publish_and_sigterm_leaves_rigs_alone(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """`rigd sim --write-config` + `rigd run` as processes; SIGTERM is a clean stop; SIGKILL
    leaves the Last Will."""
    cfg_path = tmp_path / "sim.toml"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sim = await asyncio.create_subprocess_exec(
        *_rigd(
            "sim",
            "--rigs",
            "8",
            "--pdus",
            "2",
            "--write-config",
            str(cfg_path),
            "--broker",
            mosquitto.url,
            "--state-dir",
            str(tmp_path / "state"),
            "--interval",
            "1",
        ),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert sim.stdout is not None
        out = b""
        while b"Ctrl-C" not in out:
            line = await asyncio.wait_for(sim.stdout.readline(), 20)
            assert line, f"rigd sim ended early: {out!r}"
            out += line
        assert cfg_path.exists()
        check = await asyncio.to_thread(
            subprocess.run,
            _rigd("check-config", "-c", str(cfg_path)),
            capture_output=True,
            text=True,
            env=env,
        )
        assert check.returncode == 0, check.stdout
        assert "8 miner(s)" in check.stdout

        async with watch(mosquitto.host, mosquitto.port) as w:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                daemon = await asyncio.create_subprocess_exec(
                    *_rigd("run", "-c", str(cfg_path)),
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                )
                try:
                    await w.wait_for("rigd/sim/status", lambda p: p == b"online", within=20)
                    await w.wait_json(
                        "rigd/sim/state", lambda d: d["rigs"]["mining"] == 8, within=20
                    )
                    if sig == signal.SIGTERM:
                        await _stock_mosquitto_sub_sees_retained_topics(mosquitto)
                    daemon.send_signal(sig)
                    rc = await asyncio.wait_for(daemon.wait(), 20)
                    await w.wait_for("rigd/sim/status", lambda p: p == b"offline", within=20)
                finally:
                    if daemon.returncode is None:
                        daemon.kill()
                        await daemon.wait()
                assert daemon.stderr is not None
                logs = (await daemon.stderr.read()).decode()
                if sig == signal.SIGTERM:
                    assert rc == 0, logs
                    events = [json.loads(line)["event"] for line in logs.splitlines() if line]
                    assert "rigd_stopped" in events
                else:
                    assert rc == -signal.SIGKILL  # offline came from the broker's Last Will
    finally:
        sim.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sim.wait(), 10)
        if sim.returncode is None:
            sim.kill()
            await sim.wait()


async def test_miners_on_their_own_loopback_addresses(tmp_path: Path) -> None:
    """`--subnet`: each miner on 127.0.x.y:4028, as on a farm subnet; the daemon and any
    third-party client reach them there."""
    try:
        site = SimSite(rigs=3, pdus=1, subnet="127.0.77.0/24", clock=ScaledClock(SPEED))
        await site.start()
    except OSError as e:  # pragma: no cover - a host that forbids binding 127.0.77.x
        pytest.skip(f"cannot bind loopback aliases here: {e}")
    try:
        assert [site.fleet.address_of(r) for r in site.farm.rigs] == [
            ("127.0.77.1", 4028),
            ("127.0.77.2", 4028),
            ("127.0.77.3", 4028),
        ]
        cfg = parse_config(site.config_toml(state_dir=tmp_path), environ={})
        daemon = Daemon(cfg, clock=site.clock)
        snap = await daemon.poll_cycle()
        assert snap.rig_counts()["mining"] == 3
        assert snap.rigs["rig-002"].info.host == "127.0.77.2"
        # What any CGMiner-API tool does: connect, send JSON, read to the NUL.
        reader, writer = await asyncio.open_connection("127.0.77.2", 4028)
        writer.write(b'{"command":"version"}')
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.endswith(b"\x00")
        version = json.loads(raw[:-1])
        assert version["VERSION"][0]["Type"] == site.farm.rigs["rig-002"].model.name
        await daemon.devices.close()
    finally:
        await site.stop()


def test_sim_refuses_a_subnet_outside_loopback() -> None:
    r = subprocess.run(
        _rigd("sim", "--rigs", "2", "--subnet", "10.0.0.0/24", "--duration", "1"),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "loopback only" in r.stderr


def test_run_with_bad_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[site]\nid = "s"\n[mqtt]\nurl = "ftp://x"\n')
    r = subprocess.run(_rigd("run", "-c", str(bad)), capture_output=True, text=True)
    assert r.returncode == 78
    assert f"{bad}:4: mqtt.url" in r.stderr


def test_sim_can_write_a_controlling_config(tmp_path: Path) -> None:
    out = tmp_path / "sim.toml"
    r = subprocess.run(
        _rigd(
            "sim",
            "--rigs",
            "2",
            "--pdus",
            "1",
            "--write-config",
            str(out),
            "--max-import-kw",
            "50",
            "--duration",
            "1",
        ),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    from controller.config import load_config

    cfg = load_config(out, environ={})
    assert cfg.control is not None and cfg.control.max_import_kw == 50
    assert cfg.admin.socket.name == "rigd.sock"
