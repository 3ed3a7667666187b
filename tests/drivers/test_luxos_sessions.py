"""Held LuxOS write sessions: one connection per command, renewed before they lapse,
replaced when refused, let go for a technician. Against the socket simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.config import ConfigError, parse_config
from controller.core.status import Hold
from controller.runtime.daemon import Daemon
from controller.runtime.devices import build_devices
from drivers.cgminer import CGMinerClient
from drivers.luxos import LuxOSDriver, renew_after_s
from drivers.registry import LuxOSSettings, MinerAccess, make_miner_driver
from simulators.cgminer import MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode
from simulators.site import SimSite

RENEW = renew_after_s(10.0)


@dataclass
class Env:
    clock: ManualClock
    server: MinerServer

    def driver(self, renew: float | None = RENEW) -> LuxOSDriver:
        s = self.server
        drv = make_miner_driver(
            "luxos",
            s.rig_id,
            MinerAccess(s.host, s.port, timeout=2.0),
            LuxOSSettings(renew_session_after=renew),
        )
        assert isinstance(drv, LuxOSDriver)
        return drv

    def client(self) -> CGMinerClient:
        return CGMinerClient(self.server.host, self.server.port, timeout=2.0)

    @property
    def mode(self) -> RigMode:
        return self.server.rig.mode


@pytest.fixture
async def env(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    # No random phase: renewals fall exactly RENEW after the logon.
    monkeypatch.setattr("drivers.luxos.random.random", lambda: 0.0)
    clock = ManualClock()
    farm = Farm.build(clock, rigs=1, pdus=0)
    server = MinerServer(farm, "rig-001")
    await server.start()
    try:
        yield Env(clock, server)
    finally:
        await server.stop()


def test_renewal_age_follows_the_poll_interval() -> None:
    assert renew_after_s(10.0) == 45.0
    assert renew_after_s(55.0) is None  # a session would lapse between two polls


async def test_a_poll_holds_a_session_so_a_command_is_one_request(env: Env) -> None:
    drv = env.driver()
    await drv.read(env.clock.now())
    sid = env.server.session_id
    assert sid and drv.control.holding  # logged on before any command was due
    before = env.server.requests
    await drv.sleep()
    assert env.mode is RigMode.SLEEPING
    assert env.server.requests == before + 1  # curtail only: no logon, no logoff
    assert env.server.session_id == sid  # still ours for the next command
    await drv.wake()
    assert env.mode is RigMode.MINING and env.server.requests == before + 2


async def test_the_poll_renews_the_session_before_the_firmware_ends_it(env: Env) -> None:
    drv = env.driver()
    await drv.read(env.clock.now())
    first = env.server.session_id
    env.clock.advance(40)
    await drv.read(env.clock.now())
    assert env.server.session_id == first  # young enough: left alone
    env.clock.advance(10)  # 50 s old: the next poll would find it lapsed
    await drv.read(env.clock.now())
    renewed = env.server.session_id
    assert renewed and renewed != first
    for _ in range(12):  # two minutes of polls every 10 s, no command at all
        env.clock.advance(10)
        await drv.read(env.clock.now())
    before = env.server.requests
    await drv.sleep()
    assert env.mode is RigMode.SLEEPING and env.server.requests == before + 1


async def test_a_lapsed_session_is_replaced_and_the_command_sent_again(env: Env) -> None:
    drv = env.driver()
    await drv.read(env.clock.now())
    env.clock.advance(61)  # no poll for a minute: the firmware ended the session
    await drv.sleep()
    assert env.mode is RigMode.SLEEPING
    assert env.server.session_id and drv.control.holding  # the new one is held


async def test_a_session_taken_over_elsewhere_is_borrowed_not_ended(env: Env) -> None:
    drv = env.driver()
    await drv.read(env.clock.now())
    other = env.client()
    await other.command("logoff", env.server.session_id)  # e.g. pyasic, then its own
    theirs = (await other.command("logon"))["SESSION"][0]["SessionID"]
    await drv.sleep()
    assert env.mode is RigMode.SLEEPING
    assert env.server.session_id == theirs  # used, never logged off under its owner
    assert not drv.control.holding
    await drv.read(env.clock.now())  # and not fought over: no logon while theirs lives
    assert env.server.session_id == theirs


async def test_a_rig_let_go_logs_off_so_a_technicians_tools_can_log_on(env: Env) -> None:
    drv = env.driver()
    await drv.read(env.clock.now())
    assert env.server.session_id
    drv.hold_session = False  # the daemon does this for a rig in maintenance
    await drv.read(env.clock.now())
    assert env.server.session_id == ""
    await drv.read(env.clock.now())
    assert env.server.session_id == ""  # not taken again while let go
    sid = (await env.client().command("logon"))["SESSION"][0]["SessionID"]
    assert sid
    await env.client().command("logoff", sid)
    drv.hold_session = True
    await drv.read(env.clock.now())
    assert env.server.session_id  # back under control: held again


async def test_per_write_logs_off_after_each_command(env: Env) -> None:
    drv = env.driver(renew=None)
    await drv.read(env.clock.now())
    assert env.server.session_id == ""
    before = env.server.requests
    await drv.sleep()
    assert env.mode is RigMode.SLEEPING
    assert env.server.requests == before + 3  # logon, curtail, logoff
    assert env.server.session_id == ""
    drv.hold_session = True  # cannot hold what the config said not to
    await drv.read(env.clock.now())
    assert env.server.session_id == ""


# -- config and the daemon's side --------------------------------------------------------

BASE = """
[site]
id = "s"
state_dir = "{d}"
[poll]
interval_s = {interval}
[[miners]]
id = "r1"
host = "127.0.0.1"
{extra}
"""


def _cfg(tmp_path: Path, interval: float = 10, extra: str = "") -> str:
    return BASE.format(d=tmp_path, interval=interval, extra=extra)


def test_config_session_setting(tmp_path: Path) -> None:
    lux = build_devices(parse_config(_cfg(tmp_path), environ={})).miners["r1"]
    assert isinstance(lux, LuxOSDriver) and lux.control.renew_after == RENEW
    per = parse_config(_cfg(tmp_path, extra='session = "per-write"'), environ={})
    drv = build_devices(per).miners["r1"]
    assert isinstance(drv, LuxOSDriver) and drv.control.renew_after is None
    slow = build_devices(parse_config(_cfg(tmp_path, 60), environ={})).miners["r1"]
    assert isinstance(slow, LuxOSDriver) and slow.control.renew_after is None  # quietly
    with pytest.raises(ConfigError, match=r"needs poll\.interval_s under 55"):
        parse_config(_cfg(tmp_path, 60, 'session = "hold"'), environ={})
    with pytest.raises(ConfigError, match="`session` does not apply to driver 'cgminer'"):
        parse_config(_cfg(tmp_path, extra='driver = "cgminer"\nsession = "hold"'), environ={})


async def test_maintenance_and_reload_hand_the_session_on(tmp_path: Path, env: Env) -> None:
    text = _cfg(tmp_path).replace('host = "127.0.0.1"', f'host = "{env.server.host}"')
    text += f"port = {env.server.port}\n"
    devs = build_devices(parse_config(text, environ={}))
    await devs.miners["r1"].read(env.clock.now())
    sid = env.server.session_id
    assert sid
    again = build_devices(parse_config(text, environ={}))  # a reload builds new drivers
    again.adopt_sessions(devs)
    new = again.miners["r1"]
    assert isinstance(new, LuxOSDriver) and new.control.holding
    before = env.server.requests
    await new.sleep()
    assert env.server.requests == before + 1 and env.server.session_id == sid
    again.hold_sessions(True, except_for={"r1"})  # in maintenance
    await new.read(env.clock.now())
    assert env.server.session_id == ""
    again.hold_sessions(True)
    await new.read(env.clock.now())
    assert env.server.session_id
    again.hold_sessions(False)  # monitoring only, or a dry run: no session at all
    await new.read(env.clock.now())
    assert env.server.session_id == ""


@pytest.mark.parametrize(
    ("control", "dry_run", "held"),
    [
        ("max_import_kw = 100", False, True),
        ("max_import_kw = 100", True, False),
        ("max_import_kw = 100\ndry_run = true", False, False),
        (None, False, False),
    ],
    ids=["controlling", "dry-run", "dry-run-in-config", "monitor-only"],
)
async def test_the_daemon_holds_sessions_only_where_it_may_command(
    tmp_path: Path, control: str | None, dry_run: bool, held: bool
) -> None:
    site = SimSite(rigs=2, pdus=0, clock=ManualClock())
    async with site:
        extra = f"[control]\n{control}\n" if control else ""
        cfg = parse_config(site.config_toml(state_dir=tmp_path, extra=extra), environ={})
        daemon = Daemon(cfg, clock=site.clock, dry_run=dry_run)
        try:
            await daemon.cycle()
            sessions = {rid: s.session_id for rid, s in site.fleet.servers.items()}
            assert all(bool(sid) is held for sid in sessions.values()), sessions
            if not held:
                return
            assert daemon.controller is not None
            daemon.controller.set_maintenance("rig-001", Hold("board swap", "tech"))
            await daemon.cycle()
            assert site.fleet.servers["rig-001"].session_id == ""  # free for Luxor's tools
            assert site.fleet.servers["rig-002"].session_id == sessions["rig-002"]
        finally:
            if daemon.controller is not None:
                await daemon.controller.close()
            await daemon.devices.close()
