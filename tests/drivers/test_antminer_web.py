"""Stock Antminer control through its digest-auth web UI, driver against simulator.

Every rig here sits on its own random 127.x.y.z address with the firmware's real ports
(80 for the web UI, 4028 for the API), as on a farm LAN. Fixtures:
`fixtures/antminer-stock-web/get_system_info.json` is a real S21 reply (asic-rs capture);
`get_miner_conf.json` / `set_miner_conf.json` are device replies as quoted in public
sources (see fixtures/README.md), not raw captures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web as aioweb

from drivers.antminer_web import (
    LOW_POWER,
    NAMEPLATE_W,
    NORMAL,
    SLEEP,
    AntminerDriver,
    AntminerWebControl,
    check_set_reply,
    conf_write_body,
    identify,
    make_antminer_driver,
    parse_system_info,
    parse_work_mode,
)
from drivers.base import MinerCapabilities, MinerDriver
from drivers.cgminer import CGMinerClient
from drivers.errors import (
    CommandRejected,
    DeviceAuthError,
    DeviceTimeout,
    DeviceUnreachable,
    MalformedReply,
    UnsupportedOperation,
)
from drivers.telemetry import RigState
from simulators.antminer_web import (
    REALM,
    AntminerWebFleet,
    AntminerWebServer,
    parse_digest_header,
)
from simulators.cgminer import MinerFleet, MinerServer
from simulators.clock import ManualClock
from simulators.farm import Farm, RigMode

FIXTURES = Path(__file__).parent.parent / "fixtures" / "antminer-stock-web"
MODEL = "Antminer S19j Pro"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def mode(r: Rig) -> RigMode:
    """The simulated rig's firmware mode, read fresh (so type narrowing does not stick)."""
    return r.farm.rigs["rig-001"].mode


def random_block() -> str:
    """A 127.a.b prefix unlikely to collide with other tests binding real ports."""
    return f"127.{random.randint(100, 250)}.{random.randint(1, 254)}"


@dataclass
class Rig:
    clock: ManualClock
    farm: Farm
    rpc: MinerServer
    web: AntminerWebServer
    clients: list[AntminerWebControl] = field(default_factory=list)

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        await self.web.stop()
        await self.rpc.stop()

    @property
    def host(self) -> str:
        return self.web.host

    def control(self, **kw: Any) -> AntminerWebControl:
        opts: dict[str, Any] = {
            "device": "rig-001",
            "read_timeout": 1.0,
            "write_timeout": 2.0,
            "connect_timeout": 0.5,
            "verify_attempts": 2,
            "verify_interval_s": 0.05,
        }
        opts.update(kw)
        ctl = AntminerWebControl(self.host, self.web.port, **opts)
        self.clients.append(ctl)  # closed with the rig, whatever the test did
        return ctl

    def driver(
        self, *, low_power_w: Any = "sim", normal_w: float | None = None, **kw: Any
    ) -> AntminerDriver:
        lpm = self.web.low_power_w if low_power_w == "sim" else low_power_w
        client = CGMinerClient(self.host, self.rpc.port, timeout=1.0, retries=0, device="rig-001")
        return AntminerDriver(
            "rig-001", client, self.control(**kw), low_power_w=lpm, normal_w=normal_w
        )

    def posted_modes(self) -> list[Any]:
        return [p.get("miner-mode") for p in self.web.posts if isinstance(p, dict)]

    def gets(self, cgi: str = "get_miner_conf.cgi") -> int:
        return sum(1 for h in self.web.hits if h.path.endswith(cgi) and h.status == 200)


async def start_rig(model: str = MODEL, *, web_port: int = 80, **web_kw: Any) -> Rig:
    """rig-001 (bmminer) with its 4028 API and web UI on a fresh loopback address."""
    clock = ManualClock()
    farm = Farm.build(clock, rigs=1, pdus=1, models={model: 1.0})
    farm.rigs["rig-001"].firmware = "bmminer"
    opts: dict[str, Any] = {"set_delay_s": 0.05, "get_delay_s": 0.005, "rpc_restart_s": 0.0}
    opts.update(web_kw)
    last: OSError | None = None
    for _ in range(5):
        host = f"{random_block()}.1"
        rpc = MinerServer(farm, "rig-001", host=host, port=4028)
        web = AntminerWebServer(farm, "rig-001", host=host, port=web_port, rpc=rpc, **opts)
        try:
            await rpc.start()
            await web.start()
        except OSError as exc:  # address taken by someone else: try another block
            last = exc
            await rpc.stop()
            await web.stop()
            continue
        return Rig(clock, farm, rpc, web)
    raise RuntimeError(f"no free loopback address: {last}")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await start_rig()
    yield r
    await r.stop()


@contextlib.asynccontextmanager
async def driving(r: Rig, **kw: Any) -> AsyncIterator[AntminerDriver]:
    drv = r.driver(**kw)
    try:
        yield drv
    finally:
        await drv.close()


# -- recorded replies ---------------------------------------------------------------------


def test_real_system_info_capture_parses() -> None:
    info = parse_system_info(load("get_system_info"))
    assert info.model == "Antminer S21"
    assert info.serial == "THQING0BDJAB024NF"
    assert info.hostname == "Antminer"
    assert info.firmware_version == "FR-1.12(251009-S21)"
    ident = info.identity()
    assert (ident.make, ident.model, ident.firmware) == ("Antminer", "Antminer S21", "bmminer")
    older = load("get_system_info")
    del older["serinum"]  # older firmware omits it
    assert parse_system_info(older).serial == ""
    with pytest.raises(MalformedReply, match="minertype"):
        parse_system_info({"hostname": "Antminer"})


def test_documented_conf_and_write_body() -> None:
    conf = load("get_miner_conf")
    assert parse_work_mode(conf) == NORMAL
    body = conf_write_body(conf, SLEEP)
    assert body == {
        "bitmain-fan-ctrl": False,
        "bitmain-fan-pwm": "100",
        "miner-mode": 1,
        "freq-level": "100",
        "pools": conf["pools"],
    }
    assert type(body["miner-mode"]) is int  # the string form is ignored by some builds
    check_set_reply(load("set_miner_conf"))
    with pytest.raises(CommandRejected, match="M001"):
        check_set_reply({"stats": "error", "code": "M001", "msg": "Illegal parameters!"})
    with pytest.raises(MalformedReply):
        check_set_reply({"code": "M000"})
    broken: dict[str, Any]
    for broken in ({}, {"pools": []}, {"pools": [{"url": 1}]}, {"pools": "x"}):
        with pytest.raises(MalformedReply, match="pools"):
            conf_write_body(broken, SLEEP)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("0", NORMAL), ("1", SLEEP), ("3", LOW_POWER), (" 3 ", LOW_POWER), (1, SLEEP), ("", NORMAL)],
)
def test_work_mode_encodings(value: Any, mode: int) -> None:
    assert parse_work_mode({"bitmain-work-mode": value}) == mode


def test_work_mode_missing_or_nonsense() -> None:
    assert parse_work_mode({"pools": []}) is None  # S9/S17-era config: no modes at all
    for bad in (None, True, "sleep", [1], 1.5):
        with pytest.raises(MalformedReply):
            parse_work_mode({"bitmain-work-mode": bad})


# -- simulator faithfulness ---------------------------------------------------------------


def _kind(v: Any) -> str:
    return "number" if isinstance(v, int | float) and not isinstance(v, bool) else type(v).__name__


async def test_sim_replies_have_the_recorded_fields_and_types() -> None:
    s21 = await start_rig("Antminer S21")
    try:
        ctl = s21.control()
        info = await ctl.request("GET", "get_system_info.cgi")
        real = load("get_system_info")
        assert set(info) == set(real)
        assert {k: _kind(v) for k, v in info.items()} == {k: _kind(v) for k, v in real.items()}
        assert info["minertype"] == "Antminer S21"
        assert info["serinum"] == s21.farm.rigs["rig-001"].serial
        # S21 Release builds print a trimmed config (jq view of cgminer.conf).
        trimmed = await ctl.request("GET", "get_miner_conf.cgi")
        assert set(trimmed) == {
            "pools",
            "bitmain-fan-ctrl",
            "bitmain-fan-pwm",
            "bitmain-work-mode",
            "bitmain-hashrate-percent",
            "bitmain-user-ip-cat",
        }
        assert trimmed["bitmain-user-ip-cat"] is None
        assert trimmed["bitmain-work-mode"] == "0"
    finally:
        await s21.stop()


async def test_sim_full_conf_matches_the_documented_one(rig: Rig) -> None:
    ctl = rig.control()
    conf = await ctl.request("GET", "get_miner_conf.cgi")
    real = load("get_miner_conf")
    assert set(conf) == set(real)
    assert {k: _kind(v) for k, v in conf.items()} == {k: _kind(v) for k, v in real.items()}
    assert len(conf["pools"]) == 3


async def test_unauthenticated_requests_get_the_digest_challenge(rig: Rig) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/cgi-bin/get_miner_conf.cgi"):
            async with s.get(f"{rig.web.url}{path}") as resp:
                assert resp.status == 401
                challenge = resp.headers["WWW-Authenticate"]
                assert "401 Unauthorized" in await resp.text()
            params = parse_digest_header(challenge)
            assert params is not None
            assert params["realm"] == REALM == "antMiner Configuration"
            assert params["qop"] == "auth" and len(params["nonce"]) >= 16
            assert "stale" not in params
    assert [h.status for h in rig.web.hits] == [401, 401]
    assert rig.web.auth_failures == 0  # no credentials offered is not a failed login


def _digest(nonce: str, uri: str, *, user: str = "root", password: str = "root") -> str:
    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    ha1, ha2 = md5(f"{user}:{REALM}:{password}"), md5(f"GET:{uri}")
    resp = md5(f"{ha1}:{nonce}:00000001:abcdef:auth:{ha2}")
    return (
        f'Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}",'
        f' response="{resp}", qop=auth, nc=00000001, cnonce="abcdef", algorithm=MD5'
    )


async def test_reads_are_one_request_each_once_challenged(rig: Rig) -> None:
    """The nonce is reused with a counted nc and the connection kept alive: a steady read is
    one request on one connection, not a challenge and a request on a new one."""
    ctl = rig.control()
    for _ in range(4):
        assert await ctl.read_mode() == 0
    assert [h.status for h in rig.web.hits] == [401, 200, 200, 200, 200]
    assert ctl.http.connections == 1


async def test_stale_nonce_is_renewed_within_the_read() -> None:
    r = await start_rig(nonce_ttl_s=1.0)  # the sim's nonces are stamped to the second
    try:
        ctl = r.control()
        assert await ctl.read_mode() == 0
        await asyncio.sleep(2.1)
        assert await ctl.read_mode() == 0  # 401 stale=true, then the fresh nonce: one call
        assert [h.status for h in r.web.hits] == [401, 200, 401, 200]
    finally:
        await r.stop()


async def test_sim_checks_the_digest_itself(rig: Rig) -> None:
    uri = "/cgi-bin/get_system_info.cgi"
    async with aiohttp.ClientSession() as s:
        async with s.get(rig.web.url + uri) as resp:
            params = parse_digest_header(resp.headers["WWW-Authenticate"]) or {}
        nonce = params["nonce"]

        async def status(auth: str, path: str = uri) -> tuple[int, str]:
            async with s.get(rig.web.url + path, headers={"Authorization": auth}) as r:
                return r.status, r.headers.get("WWW-Authenticate", "")

        assert (await status(_digest(nonce, uri)))[0] == 200
        assert (await status(_digest(nonce, "/cgi-bin/get_miner_conf.cgi")))[0] == 401
        assert (await status(_digest(nonce, uri, password="admin")))[0] == 401
        assert (await status(_digest(nonce, uri, user="admin")))[0] == 401
        assert (await status(_digest("0" * 40, uri)))[0] == 401  # a nonce it never issued
        rig.web.nonce_ttl_s = -1.0  # every nonce is now too old
        code, challenge = await status(_digest(nonce, uri))
        assert code == 401 and "stale=true" in challenge
    assert rig.web.auth_failures == 4 + 1  # wrong uri/password/user/nonce, stale
    assert not rig.web.posts


async def test_client_recovers_when_the_miner_forgets_its_nonces(rig: Rig) -> None:
    """A rebooted control board no longer knows the nonce the client reuses preemptively."""
    ctl = rig.control()
    assert (await ctl.get_system_info()).model == MODEL
    rig.web._secret = b"rebooted-board"  # every earlier nonce is now unknown
    assert (await ctl.get_system_info()).model == MODEL
    assert [h.status for h in rig.web.hits] == [401, 200, 401, 200]


# -- reads and control ----------------------------------------------------------------------


async def test_sleep_and_wake_over_the_web_show_on_4028(rig: Rig) -> None:
    r = rig
    sim_rig = r.farm.rigs["rig-001"]
    async with driving(r) as drv:
        assert isinstance(drv, MinerDriver)
        tel = await drv.read(r.clock.now())
        assert tel.state is RigState.MINING and (tel.hashrate_ths or 0) > 50
        assert tel.identity.firmware == "bmminer" and tel.identity.model == MODEL
        assert drv.mode == NORMAL

        await drv.sleep()
        assert r.posted_modes() == [1]
        assert r.web.work_mode == "1" and mode(r) is RigMode.SLEEPING
        post = next(h for h in r.web.hits if h.method == "POST")
        assert post.content_type.startswith("text/plain") and post.requested_with
        r.clock.advance(sim_rig.model.sleep_s + 1)
        tel = await drv.read(r.clock.now())
        assert tel.state is RigState.SLEEPING and tel.hashrate_ths == 0
        assert tel.power_limit_w is None

        await drv.sleep()  # already asleep: no second write (each one restarts bmminer)
        assert r.posted_modes() == [1]

        await drv.wake()
        assert r.posted_modes() == [1, 0]
        assert r.web.work_mode == "0" and mode(r) is RigMode.MINING
        r.clock.advance(sim_rig.model.boot_s + sim_rig.model.wake_ramp_s + 5)
        tel = await drv.read(r.clock.now())
        assert tel.state is RigState.MINING and (tel.hashrate_ths or 0) > 100
        assert tel.power_limit_w == NAMEPLATE_W[MODEL]
        assert r.web.mode_changes == 2


async def test_write_keeps_pools_and_fan_settings(rig: Rig) -> None:
    pools = [
        {"url": f"stratum+tcp://pool{i}:3333", "user": "acct.w7", "pass": "p"} for i in (1, 2, 3)
    ]
    rig.web.conf.update({"pools": pools, "bitmain-fan-ctrl": True, "bitmain-fan-pwm": "60"})
    async with driving(rig) as drv:
        await drv.sleep()
    body = rig.web.posts[-1]
    assert body == {
        "bitmain-fan-ctrl": True,
        "bitmain-fan-pwm": "60",
        "miner-mode": 1,
        "freq-level": "100",
        "pools": pools,
    }
    assert rig.web.conf["pools"] == pools and rig.web.conf["bitmain-fan-pwm"] == "60"


async def test_power_target_maps_onto_modes(rig: Rig) -> None:
    r = rig
    sim_rig = r.farm.rigs["rig-001"]
    lpm = r.web.low_power_w
    assert lpm is not None
    async with driving(r) as drv:
        # Before the first read the model, hence the normal-mode power, is unknown.
        assert drv.capabilities == MinerCapabilities(
            can_sleep=True, can_power_target=True, power_target_min_w=lpm
        )
        await drv.read(r.clock.now())
        assert drv.capabilities.power_target_max_w == NAMEPLATE_W[MODEL]
        assert drv.capabilities.needs_pdu_to_power_off

        await drv.set_power_target(lpm + 300)  # between low and normal: low power
        assert r.posted_modes() == [LOW_POWER]
        assert r.web.work_mode == "3" and sim_rig.power_target_w == lpm
        r.clock.advance(sim_rig.model.target_change_s + 1)
        tel = await drv.read(r.clock.now())
        assert tel.power_limit_w == lpm and tel.state is RigState.MINING
        assert sim_rig.power_w(r.clock.now()) == pytest.approx(lpm, rel=0.01)

        await drv.set_power_target(lpm)  # same mode: nothing written
        await drv.set_power_target(None)  # the stock default: normal
        await drv.set_power_target(99_999)  # above normal: normal, already there
        assert r.posted_modes() == [LOW_POWER, NORMAL]
        assert sim_rig.power_target_w is None and r.web.work_mode == "0"

        for bad in (lpm - 1, 0.0, -5.0, math.nan, math.inf):
            with pytest.raises(ValueError):
                await drv.set_power_target(bad)
        assert r.posted_modes() == [LOW_POWER, NORMAL]  # refused before any request


async def test_power_target_while_asleep_waits_for_wake(rig: Rig) -> None:
    r = rig
    sim_rig = r.farm.rigs["rig-001"]
    lpm = r.web.low_power_w
    assert lpm is not None
    async with driving(r) as drv:
        await drv.sleep()
        await drv.set_power_target(lpm)  # must not wake the rig
        assert r.posted_modes() == [SLEEP]
        assert mode(r) is RigMode.SLEEPING and r.web.work_mode == "1"
        await drv.wake()  # wakes straight into low power: one write
        assert r.posted_modes() == [SLEEP, LOW_POWER]
        assert mode(r) is RigMode.MINING and sim_rig.power_target_w == lpm
        await drv.sleep()
        await drv.wake()  # restores the mode in force before sleep
        assert r.posted_modes() == [SLEEP, LOW_POWER, SLEEP, LOW_POWER]


async def test_model_without_low_power(rig: Rig) -> None:
    r = rig
    r.web.low_power_w = None  # this build offers normal and sleep only
    async with driving(r, low_power_w=None) as drv:
        await drv.read(r.clock.now())
        assert drv.capabilities == MinerCapabilities(can_sleep=True, can_power_target=False)
        with pytest.raises(UnsupportedOperation, match="low_power_w"):
            await drv.set_power_target(2000)
        await drv.set_power_target(None)  # normal is always there
        await drv.set_power_target(5000)
        assert r.web.posts == []
    # Configured for low power the firmware does not have: the read-back says so.
    async with driving(r, low_power_w=2000.0) as drv:
        with pytest.raises(CommandRejected, match="ignored the write") as err:
            await drv.set_power_target(2100)
        assert err.value.device == "rig-001" and err.value.operation == "set_power_target"
    assert r.posted_modes() == [LOW_POWER] and r.web.work_mode == "0"


async def test_low_power_figure_must_be_below_normal(rig: Rig) -> None:
    with pytest.raises(ValueError, match="below normal_w"):
        rig.driver(low_power_w=3000.0, normal_w=2500.0)
    async with driving(rig, low_power_w=3100.0) as drv:  # above the S19j Pro nameplate
        await drv.read(rig.clock.now())
        assert drv.capabilities.can_power_target is False


async def test_ignored_write_is_a_clear_rejection(rig: Rig) -> None:
    await rig.web.set_fault("ignore-writes")
    async with driving(rig) as drv:
        with pytest.raises(CommandRejected) as err:
            await drv.sleep()
    msg = str(err.value)
    assert "answered OK" in msg and "ignored the write" in msg and "PDU" in msg
    assert err.value.operation == "sleep"
    assert rig.posted_modes() == [1]
    assert rig.web.work_mode == "0" and mode(rig) is RigMode.MINING
    assert rig.gets() == 1 + 2  # the read before the write, then two read-backs


async def test_firmware_write_quirks(rig: Rig) -> None:
    """What the simulated CGI honours, posted directly."""
    ctl = rig.control()
    conf = await ctl.get_miner_conf()

    async def post(body: Any) -> dict[str, Any]:
        return await ctl.request("POST", "set_miner_conf.cgi", body=body)

    ok = {"stats": "success", "code": "M000", "msg": "OK!"}
    assert await post({**conf, "bitmain-work-mode": "1"}) == ok  # the read key: ignored
    assert await post({**conf_write_body(conf, SLEEP), "miner-mode": "1"}) == ok  # string
    assert await post({**conf_write_body(conf, SLEEP), "miner-mode": 7}) == ok  # no such mode
    assert rig.web.work_mode == "0" and rig.web.mode_changes == 0
    assert await post(conf_write_body(conf, SLEEP)) == ok
    assert rig.web.work_mode == "1" and rig.web.mode_changes == 1
    reply = await post([1, 2])  # not a config object
    assert reply["stats"] == "error"
    async with aiohttp.ClientSession(
        middlewares=(aiohttp.DigestAuthMiddleware("root", "root"),)
    ) as s:
        async with s.post(rig.web.url + "/cgi-bin/set_miner_conf.cgi", data=b"\xff{") as resp:
            assert resp.status == 200 and json.loads(await resp.text())["code"] == "M001"
        async with s.get(rig.web.url + "/cgi-bin/nope.cgi") as resp:
            assert resp.status == 404
    with pytest.raises(UnsupportedOperation, match=r"nope\.cgi"):
        await ctl.request("GET", "nope.cgi")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"miner-mode": None},
        {"miner-mode": True},
        {"miner-mode": -1},
        {"miner-mode": 10**30},
        {"pools": [1, "x", None]},
        {"pools": {"url": 1}},
        {"bitmain-fan-pwm": [1], "freq-level": {"a": 1}},
        {"miner-mode": 1, "pools": [{"url": ["x"]}] * 9},
    ],
)
async def test_odd_config_posts_never_break_the_sim(rig: Rig, body: dict[str, Any]) -> None:
    ctl = rig.control()
    reply = await ctl.request("POST", "set_miner_conf.cgi", body=body)
    assert reply["stats"] == "success"
    conf = await ctl.get_miner_conf()
    assert len(conf["pools"]) == 3
    honoured = type(body.get("miner-mode")) is int and body["miner-mode"] == 1
    assert conf["bitmain-work-mode"] == ("1" if honoured else "0")


async def test_wrong_credentials_are_an_auth_error(rig: Rig) -> None:
    r = rig
    async with driving(r, password="admin") as drv:
        with pytest.raises(DeviceAuthError) as err:
            await drv.sleep()
        msg = str(err.value)
        assert msg.startswith("auth: ")
        assert "rejected user 'root'" in msg and "wrong username or password" in msg
        assert REALM in msg and err.value.device == "rig-001"
        # Monitoring goes on over 4028; the web failure is kept for the operator.
        tel = await drv.read(r.clock.now())
        assert tel.state is RigState.MINING
        assert isinstance(drv.web_error, DeviceAuthError)
    assert r.web.auth_failures >= 2 and not r.web.posts
    assert mode(r) is RigMode.MINING


async def test_slow_write_that_landed_is_a_success() -> None:
    r = await start_rig(set_delay_s=1.5)
    try:
        async with driving(r, write_timeout=0.3) as drv:
            t0 = time.monotonic()
            await drv.sleep()
            assert time.monotonic() - t0 < 1.2  # did not wait for the 1.5 s answer
        assert r.web.work_mode == "1" and r.posted_modes() == [1]
    finally:
        await r.stop()


async def test_slow_write_that_did_not_land_is_a_timeout() -> None:
    r = await start_rig(set_delay_s=1.5)
    try:
        await r.web.set_fault("ignore-writes")
        async with driving(r, write_timeout=0.3) as drv:
            with pytest.raises(DeviceTimeout, match=r"no answer within 0\.3s") as err:
                await drv.sleep()
        assert err.value.operation == "sleep"
        assert r.web.work_mode == "0" and len(r.web.posts) == 1
    finally:
        await r.stop()


async def test_silent_web_ui_times_out_and_reads_go_on(rig: Rig) -> None:
    r = rig
    await r.web.set_fault("silent")
    async with driving(r, read_timeout=0.3) as drv:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"no answer within 0\.3s"):
            await drv.sleep()
        assert time.monotonic() - t0 < 1.0
        # Another tool sleeps the rig through the UI; 4028 then shows 0 hashrate, which
        # alone could as well be a boot.
        r.web.conf["bitmain-work-mode"] = "1"
        r.farm.rigs["rig-001"].sleep(r.clock.now())
        r.clock.advance(30)
        t0 = time.monotonic()
        tel = await drv.read(r.clock.now())
        assert tel.state is RigState.WAKING and drv.mode is None
        assert isinstance(drv.web_error, DeviceTimeout)
        await drv.read(r.clock.now() + 1)  # within web_retry_s: the web UI is left alone
        assert time.monotonic() - t0 < 1.0
        await r.web.set_fault(None)
        r.clock.advance(drv.web_retry_s)
        assert (await drv.read(r.clock.now())).state is RigState.SLEEPING  # "1" from config
        assert drv.web_error is None


@pytest.mark.parametrize("fault", ["garbage", "garbage-http"])
async def test_garbage_replies_are_malformed(rig: Rig, fault: str) -> None:
    await rig.web.set_fault(fault)
    async with driving(rig) as drv:
        with pytest.raises(MalformedReply) as err:
            await drv.sleep()
        assert err.value.operation == "sleep"
        await rig.web.set_fault(None)
        await drv.sleep()
    assert rig.web.work_mode == "1"


async def test_refused_and_dead_web_ui_are_unreachable(rig: Rig) -> None:
    r = rig
    port = r.web.port
    await r.web.set_fault("refuse")
    async with driving(r) as drv:
        with pytest.raises(DeviceUnreachable):
            await drv.wake()
        await r.web.set_fault(None)
        assert r.web.port == port
        await drv.wake()  # not asleep: read only
        pdu = r.farm.pdus["pdu-01"]
        pdu.switch(1, "off", r.clock.now())
        with pytest.raises(DeviceUnreachable):
            await drv.sleep()
        assert not r.web.posts


async def test_mode_change_restarts_bmminer() -> None:
    r = await start_rig(rpc_restart_s=0.4)
    try:
        async with driving(r) as drv:
            await drv.read(r.clock.now())
            await drv.sleep()
            with pytest.raises(DeviceUnreachable):  # bmminer restarting with the new config
                await drv.read(r.clock.now())
            await asyncio.sleep(0.5)
            r.clock.advance(10)
            assert (await drv.read(r.clock.now())).state is RigState.SLEEPING
    finally:
        await r.stop()


async def test_firmware_without_work_modes_cannot_sleep(rig: Rig) -> None:
    del rig.web.conf["bitmain-work-mode"]
    async with driving(rig) as drv:
        with pytest.raises(UnsupportedOperation, match="no work mode"):
            await drv.sleep()
        tel = await drv.read(rig.clock.now())
        assert tel.state is RigState.MINING and drv.mode is None
    assert not rig.web.posts


async def test_reads_ask_the_web_ui_sparingly(rig: Rig) -> None:
    async with driving(rig) as drv:
        for i in range(4):
            await drv.read(rig.clock.now() + i)
        assert rig.gets() == 1  # first poll only, while the rig hashes
        await drv.read(rig.clock.now() + drv.conf_refresh_s + 10)
        assert rig.gets() == 2
        await drv.sleep()  # one read before the write, one read-back
        assert rig.gets() == 4
        rig.clock.advance(3 * drv.conf_refresh_s)
        for i in range(3):  # known asleep, and no hashrate: nothing to ask
            tel = await drv.read(rig.clock.now() + i)
            assert tel.state is RigState.SLEEPING
        assert rig.gets() == 5  # only the stale-config refresh of the first of them
        rig.web.conf["bitmain-work-mode"] = "0"  # woken by another tool
        rig.farm.rigs["rig-001"].wake(rig.clock.now())
        rig.clock.advance(300)
        assert (await drv.read(rig.clock.now())).state is RigState.MINING
        assert rig.gets() == 6 and drv.mode == NORMAL  # hashing while "asleep": re-read
        await rig.rpc.set_fault("garbage")
        with pytest.raises(MalformedReply):  # a broken 4028 API still fails the read
            await drv.read(rig.clock.now())


async def test_make_antminer_driver_defaults_to_root_root(rig: Rig) -> None:
    drv = make_antminer_driver(
        "rig-001", rig.host, rig.rpc.port, web_port=rig.web.port, timeout=1.0, low_power_w=2000
    )
    try:
        assert drv.web.username == "root" and drv.web.read_timeout == 5.0
        assert drv.web.write_timeout >= 30  # the firmware takes ~21 s to answer a write
        await drv.read(rig.clock.now())
        await drv.sleep()
        assert rig.web.hits[-1].user == "root"
    finally:
        await drv.close()


# -- discovery ----------------------------------------------------------------------------


async def test_identify_finds_stock_firmware_on_port_80(rig: Rig) -> None:
    assert rig.web.port == 80 and rig.rpc.port == 4028
    ident = await identify(rig.host, timeout=1.0)
    assert ident is not None
    assert (ident.make, ident.model, ident.firmware) == ("Antminer", MODEL, "bmminer")
    assert ident.firmware_version == "49.0.1.3"
    await rig.rpc.stop()  # no 4028 answer: the model comes from get_system_info (root/root)
    ident = await identify(rig.host, timeout=0.5)
    assert ident is not None and ident.model == MODEL and ident.firmware == "bmminer"
    assert not rig.web.posts


async def test_identify_says_no_quickly_to_anything_else() -> None:
    t0 = time.monotonic()
    assert await identify(f"{random_block()}.9", timeout=1.0) is None  # nothing listening
    assert time.monotonic() - t0 < 0.5

    async def plain(request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(text="<html>Luxor Firmware</html>", content_type="text/html")

    app = aioweb.Application()
    app.router.add_get("/", plain)
    runner = aioweb.AppRunner(app, access_log=None)
    await runner.setup()
    site = aioweb.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        assert await identify("127.0.0.1", timeout=1.0, port=port) is None
    finally:
        await runner.cleanup()

    # An Antminer-like web UI in front of a LuxOS API is not stock firmware.
    r = await start_rig(web_port=0)
    try:
        r.farm.rigs["rig-001"].firmware = "luxos"
        assert await identify(r.host, timeout=1.0, port=r.web.port) is None
    finally:
        await r.stop()


# -- a farm's worth ---------------------------------------------------------------------


async def test_web_fleet_follows_the_miner_fleet() -> None:
    farm = Farm.build(ManualClock(), rigs=3, pdus=1, models={MODEL: 1.0})
    for rid in ("rig-001", "rig-003"):
        farm.rigs[rid].firmware = "bmminer"
    block = random_block()
    rpc = MinerFleet(farm, subnet=f"{block}.0/29")
    webs = AntminerWebFleet(farm, rpc=rpc, set_delay_s=0.02, get_delay_s=0.0, rpc_restart_s=0)
    try:
        await rpc.start()
        await webs.start()
    except OSError as exc:
        await webs.stop()
        await rpc.stop()
        pytest.skip(f"cannot bind {block}.x:80/4028 here: {exc}")
    try:
        assert set(webs.servers) == {"rig-001", "rig-003"}  # LuxOS rig-002 has no stock UI
        assert webs.address_of("rig-003") == (f"{block}.3", 80)
        drv = make_antminer_driver("rig-003", f"{block}.3", timeout=1.0)
        try:
            await drv.sleep()
        finally:
            await drv.close()
        assert farm.rigs["rig-003"].mode is RigMode.SLEEPING
        assert farm.rigs["rig-001"].mode is RigMode.MINING
    finally:
        await webs.stop()
        await rpc.stop()
