"""rigctl against a running daemon on a simulated farm, over the real admin socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.config import parse_config
from controller.runtime.daemon import Daemon
from simulators.clock import ScaledClock
from simulators.site import SimSite

SPEED = 20.0
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Env:
    site: SimSite
    daemon: Daemon
    config: Path

    async def rigctl(
        self, *args: str, user_env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.cli.rigctl",
            "-c",
            str(self.config),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200", **(user_env or {})},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def json(self, *args: str) -> object:
        rc, out, err = await self.rigctl(*args, "--json")
        assert rc == 0, err
        return json.loads(out)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    state = Path(tempfile.mkdtemp(prefix="rigctl-", dir="/tmp"))  # short: socket paths are capped
    try:
        async with SimSite(rigs=8, pdus=1, clock=ScaledClock(SPEED)) as site:
            full = site.nominal_import_kw()
            text = site.config_toml(
                broker_url="mqtt://127.0.0.1:9",  # no broker: rigctl must not need one
                state_dir=state,
                interval_s=10,
                extra=f"[groups.row-a]\npriority = 1\n\n[control]\n"
                f"max_import_kw = {full * 1.1:.0f}\nmin_off_s = 0\nmin_on_s = 0\n",
            )
            text = text.replace('driver = "luxos"\n', 'driver = "luxos"\ngroup = "row-a"\n', 2)
            cfg_path = state / "rigd.toml"
            cfg_path.write_text(text)
            cfg = parse_config(text, environ={})
            daemon = Daemon(cfg, clock=site.clock, config_path=str(cfg_path))
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop))
            for _ in range(200):
                if daemon.last is not None and cfg.admin.socket.exists():
                    break
                await asyncio.sleep(0.05)
            try:
                yield Env(site, daemon, cfg_path)
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def test_status_and_rigs(env: Env) -> None:
    rc, out, _ = await env.rigctl("status")
    assert rc == 0
    assert "import" in out and "cap" in out and "set by max_import" in out
    assert "rigs: mining 8" in out
    doc = await env.json("status")
    assert isinstance(doc, dict) and doc["rigs_total"] == 8 and doc["cap_source"] == "max_import"
    rigs = await env.json("rigs", "--group", "row-a")
    assert isinstance(rigs, list) and {r["id"] for r in rigs} == {"rig-001", "rig-002"}
    rigs = await env.json("rigs", "--sort", "efficiency")
    assert isinstance(rigs, list)
    effs = [r["telemetry"]["efficiency_j_th"] for r in rigs]
    assert effs == sorted(effs)
    rc, out, _ = await env.rigctl("rigs", "--sort", "temp")
    assert rc == 0 and "rig-008" in out and "8 rig(s)" in out


async def test_find_a_rig_put_it_in_maintenance_and_see_the_audit(env: Env) -> None:
    rc, out, _ = await env.rigctl("rig", "rig-003")
    assert rc == 0 and "rig-003" in out and "board 0" in out and "state history" in out
    rc, out, err = await env.rigctl(
        "maintenance", "on", "rig-003", "--reason", "fan 2 noisy", "--for", "2h"
    )
    assert rc == 0, err
    assert "rig-003: in maintenance until" in out
    rig = await env.json("rig", "rig-003")
    assert isinstance(rig, dict)
    hold = rig["control"]["maintenance"]
    assert hold["reason"] == "fan 2 noisy" and hold["actor"].startswith("user:")
    entries = await env.json("audit", "--since", "1h")
    assert isinstance(entries, list)
    (entry,) = [e for e in entries if e["action"] == "maintenance_on"]
    assert entry["rig"] == "rig-003" and entry["reason"] == "fan 2 noisy"
    assert entry["actor"] == "user:" + __import__("pwd").getpwuid(os.getuid()).pw_name
    rc, out, _ = await env.rigctl("maintenance", "off", "rig-003", "--reason", "fixed")
    assert rc == 0 and "out of maintenance" in out


async def test_budget_override_for_an_hour(env: Env) -> None:
    rc, out, err = await env.rigctl(
        "budget", "override", "12", "--for", "1h", "--reason", "grid call"
    )
    assert rc == 0, err
    assert "override 12.0 kW" in out
    status = await env.json("status")
    assert isinstance(status, dict)
    await asyncio.sleep(1.0)  # a cycle or two
    status = await env.json("status")
    assert isinstance(status, dict)
    assert status["cap_source"] == "override" and status["cap_kw"] == 12.0
    assert "grid call" in status["cap_detail"]
    show = await env.json("budget", "show")
    assert isinstance(show, dict) and show["override"]["kw"] == 12.0
    # What the plan keeps of the best plan under this cap (from the learned curves).
    assert 0 < show["hashrate"]["kept_pct"] <= 100
    assert show["hashrate"]["hashrate_ths"] <= show["hashrate"]["attainable_ths"]
    rc, out, _ = await env.rigctl("budget", "clear")
    assert rc == 0 and "override cleared" in out


async def test_sleep_wake_and_limit_go_through_the_executor(env: Env) -> None:
    farm = env.site.farm
    rc, out, err = await env.rigctl("sleep", "rig-004", "--reason", "swap PSU")
    assert rc == 0, err
    assert "rig-004: ok" in out
    assert farm.rigs["rig-004"].mode.value == "sleeping"
    rig = await env.json("rig", "rig-004")
    assert isinstance(rig, dict) and rig["control"]["pinned"]["reason"].startswith("sleep by")
    # Limit a rig: watts outside its range are refused with its range.
    rc, _, err = await env.rigctl("limit", "50", "rig-005", "--reason", "test")
    assert rc == 1 and "outside rig-005's range" in err
    sim = farm.rigs["rig-005"]
    rc, out, err = await env.rigctl(
        "limit", str(int(sim.model.min_w + 200)), "rig-005", "--reason", "hot"
    )
    assert rc == 0, err
    assert sim.power_target_w is not None and sim.power_target_w <= sim.model.min_w + 200
    await asyncio.sleep(1.0)
    rc, out, err = await env.rigctl("wake", "rig-004", "--reason", "PSU swapped")
    assert rc == 0, err
    assert farm.rigs["rig-004"].mode.value == "mining"


async def test_wake_refused_when_it_would_push_import_over_the_cap(env: Env) -> None:
    rc, _, err = await env.rigctl("sleep", "rig-006", "--reason", "x")
    assert rc == 0, err
    await asyncio.sleep(1.0)
    low = env.daemon.last.document["import_kw"] + 1.0  # type: ignore[union-attr]
    rc, _, err = await env.rigctl(
        "budget", "override", f"{low:.1f}", "--for", "1h", "--reason", "tight"
    )
    assert rc == 0, err
    await asyncio.sleep(1.0)
    rc, _, err = await env.rigctl("wake", "rig-006", "--reason", "try")
    assert rc == 1
    assert "refused: this would add" in err and "over the" in err and "set by override" in err
    assert env.site.farm.rigs["rig-006"].mode.value == "sleeping"


async def test_errors_a_technician_understands(env: Env) -> None:
    rc, _, err = await env.rigctl("rig", "rig-999")
    assert rc == 1 and "unknown rig 'rig-999'" in err
    rc, _, err = await env.rigctl("sleep", "--group", "nope", "--reason", "x")
    assert rc == 1 and "no rigs in group 'nope'" in err
    rc, _, err = await env.rigctl("maintenance", "on", "rig-001", "--reason", "x", "--for", "soon")
    assert rc == 2 and "bad duration 'soon'" in err
    rc, _, err = await env.rigctl("sleep", "rig-001")
    assert rc == 2 and "--reason" in err


async def test_two_technicians_at_once(env: Env) -> None:
    results = await asyncio.gather(
        env.rigctl("maintenance", "on", "rig-001", "--reason", "tech A"),
        env.rigctl("maintenance", "on", "rig-002", "--reason", "tech B"),
        env.rigctl("sleep", "rig-007", "--reason", "tech A"),
        env.rigctl("status"),
    )
    assert all(rc == 0 for rc, _, _ in results), results
    rigs = await env.json("rigs")
    assert isinstance(rigs, list)
    held = {r["id"]: r["control"]["maintenance"] for r in rigs if r["control"]["maintenance"]}
    assert set(held) == {"rig-001", "rig-002"}
    assert {h["reason"] for h in held.values()} == {"tech A", "tech B"}


async def test_daemon_not_running_or_socket_denied(env: Env, tmp_path: Path) -> None:
    cfg = env.config.read_text().replace(
        str(env.daemon.cfg.admin.socket), str(tmp_path / "none.sock")
    )
    other = tmp_path / "other.toml"
    other.write_text(cfg)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli.rigctl",
        "-c",
        str(other),
        "status",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"rigd is not running" in err
    if os.getuid() == 0:
        # root bypasses file permissions: check the path as an unprivileged user instead.
        # rigctl is imported while still root, then the process drops to nobody: a clone
        # under a directory nobody cannot read (/root) must not fail the import, nor the
        # venv's interpreter there its exec.
        sock = env.daemon.cfg.admin.socket
        mode = await asyncio.to_thread(lambda: sock.stat().st_mode & 0o777)
        assert oct(mode) == "0o600"
        await asyncio.to_thread(os.chmod, sock.parent, 0o755)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import os, pathlib, sys\n"
            "from controller.cli.rigctl import AdminClient, Unreachable\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "try:\n AdminClient(pathlib.Path(sys.argv[1])).call('status')\n"
            "except Unreachable as e:\n print(e); sys.exit(2)",
            str(sock),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        out, err = await proc.communicate()
        assert proc.returncode == 2 and b"permission denied" in out, (out, err)


async def test_config_reload_keeps_state_and_refuses_a_bad_file(env: Env) -> None:
    rc, _, err = await env.rigctl("maintenance", "on", "rig-002", "--reason", "keep me")
    assert rc == 0, err
    good = env.config.read_text()
    cap = env.daemon.cfg.control.max_import_kw  # type: ignore[union-attr]
    env.config.write_text(good.replace(f"max_import_kw = {cap:.0f}", "max_import_kw = 500"))
    rc, out, err = await env.rigctl("config", "reload")
    assert rc == 0, err
    assert "config reloaded: 8 rig(s)" in out
    await asyncio.sleep(1.0)
    status = await env.json("status")
    assert isinstance(status, dict) and status["cap_kw"] == 500.0
    rig = await env.json("rig", "rig-002")
    assert isinstance(rig, dict) and rig["control"]["maintenance"]["reason"] == "keep me"
    assert rig["health"]["reachable"] is True and rig["history"]
    # A broken file: refused with its errors, the running config stays.
    env.config.write_text(good.replace("[control]", "[control]\nmax_import_kw_typo = 1"))
    rc, _, err = await env.rigctl("config", "reload")
    assert rc == 1
    assert "control.max_import_kw_typo" in err and "daemon keeps its running config" in err
    # rigctl still reaches the daemon through the broken file's [admin] socket.
    rc, _, err = await env.rigctl("status")
    assert rc == 0 and "has errors" in err
    await asyncio.sleep(0.5)
    status = await env.json("status")
    assert isinstance(status, dict) and status["cap_kw"] == 500.0 and status["rigs_total"] == 8


async def test_daemon_refuses_an_invalid_config_on_reload(env: Env) -> None:
    """The SIGHUP path: the daemon itself refuses, and keeps what it runs."""
    from controller.config import ConfigError

    good = env.config.read_text()
    env.config.write_text(good.replace("[control]", "[control]\nbogus = 1"))
    before = env.daemon.cfg
    with pytest.raises(ConfigError):
        await env.daemon.reload()
    assert env.daemon.cfg is before
    await asyncio.sleep(0.5)
    assert env.daemon.last is not None and env.daemon.last.document["rigs_total"] == 8


async def test_top_refreshes_in_place(env: Env) -> None:
    rc, out, err = await env.rigctl("top", "--interval", "0.3", "--duration", "1s", "--rows", "3")
    assert rc == 0, err
    assert out.count("site sim") >= 2  # redrawn, not printed once
    assert "3 rig(s)" in out


async def test_top_on_a_terminal_quits_on_q_and_says_so(env: Env) -> None:
    import pty
    import select

    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli.rigctl",
        "-c",
        str(env.config),
        "top",
        "--interval",
        "0.5",
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "200", "LINES": "60", "TERM": "xterm"},
    )
    os.close(slave)

    def read() -> bytes:
        ready, _, _ = select.select([master], [], [], 0.5)
        return os.read(master, 65536) if ready else b""

    loop = asyncio.get_running_loop()
    seen = b""
    try:
        deadline = loop.time() + 30
        while b"q quits" not in seen and loop.time() < deadline:
            seen += await loop.run_in_executor(None, read)
        assert b"q quits" in seen and b"site sim" in seen
        os.write(master, b"q")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


async def test_tables_of_budget_events_and_audit(env: Env) -> None:
    rc, _, err = await env.rigctl("budget", "override", "30", "--for", "1h", "--reason", "peak")
    assert rc == 0, err
    rc, out, err = await env.rigctl("budget", "show")
    assert rc == 0, err
    assert "set by override" in out and "max_import" in out and "override" in out
    assert "hashrate kept" in out and "% of attainable under this cap" in out
    # audit: who asked for what (people, Home Assistant, the grid), not rigd's own commands
    rc, out, err = await env.rigctl("audit", "--since", "10m")
    assert rc == 0, err
    assert "budget_override" in out and "peak" in out and "user:" in out and "kw=30" in out
    audit = await env.json("audit", "--since", "10m")
    assert isinstance(audit, list) and any(e["action"] == "budget_override" for e in audit)
    assert all(e["actor"] not in ("planner", "rigd") for e in audit)
    # events: what happened to rigs (the override's sheds), one line each
    for _ in range(100):
        events = await env.json("events", "--since", "10m")
        assert isinstance(events, list)
        if events:
            break
        await asyncio.sleep(0.1)
    assert events and all(e["action"] != "budget_override" for e in events)
    assert {e["action"] for e in events} <= {"sleep", "set_power", "wake", "outlet_off"}
    rc, out, err = await env.rigctl("events", "--since", "10m")
    assert rc == 0, err
    assert "over target" in out and "event(s)" in out and "budget_override" not in out
