"""The executor against the real drivers and the socket simulators."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.adapters.mqtt import MqttLink
from controller.adapters.store import StateStore
from controller.config import parse_config
from controller.core.planner import Action, ActionKind
from controller.runtime import executor as executor_mod
from controller.runtime.devices import Devices, build_devices
from controller.runtime.executor import Executor
from simulators.clock import ManualClock
from simulators.farm import RigMode
from simulators.site import SimSite


class _Env:
    def __init__(self, site: SimSite, devices: Devices, store: StateStore, link: MqttLink) -> None:
        self.site, self.devices, self.store, self.link = site, devices, store, link
        self.clock = site.clock
        self.farm = site.farm

    def executor(self, **kw: float) -> Executor:
        return Executor(
            self.devices,
            store=self.store,
            link=self.link,
            now=self.farm.now,
            attempts=int(kw.get("attempts", 3)),
            backoff_s=kw.get("backoff_s", 0.01),
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[_Env]:
    site = SimSite(rigs=4, pdus=1, clock=ManualClock())
    site.farm.rigs["rig-004"].firmware = "bmminer"  # stock: no API control
    async with site:
        cfg = parse_config(site.config_toml(state_dir=tmp_path, timeout_s=0.3), environ={})
        devices = build_devices(cfg)
        store = StateStore.open(tmp_path)
        link = MqttLink(cfg.mqtt, cfg.site.id)  # never connected: events stay queued
        try:
            yield _Env(site, devices, store, link)
        finally:
            await devices.close()
            store.close()


async def test_sleep_is_sent_recorded_and_published(env: _Env) -> None:
    rig = env.farm.rigs["rig-001"]
    res = await env.executor().execute(Action("rig-001", ActionKind.SLEEP, "over target"))
    assert res.ok and res.attempts == 1
    assert rig.mode is RigMode.SLEEPING
    (entry,) = env.store.audit_since(0)
    assert (entry.action, entry.rig_id, entry.result, entry.actor) == (
        "sleep",
        "rig-001",
        "ok",
        "planner",
    )
    assert entry.reason == "over target"
    topic, payload = env.link._events[-1]
    assert topic == "rigd/sim/events" and b'"action":"sleep"' in payload


async def test_wake_at_a_power_target(env: _Env) -> None:
    rig = env.farm.rigs["rig-002"]
    rig.sleep(env.farm.now())
    low = rig.model.min_w + 100
    await env.devices.miners["rig-002"].read(env.farm.now())  # learns the profiles
    res = await env.executor().execute(Action("rig-002", ActionKind.WAKE, "room", low))
    assert res.ok, res.error
    assert rig.mode is RigMode.MINING
    assert rig.power_target_w is not None and rig.power_target_w <= low
    env.clock.advance(rig.model.boot_s + rig.model.wake_ramp_s + 1)
    assert rig.power_w(env.farm.now()) == pytest.approx(rig.power_target_w, rel=0.01)


async def test_outlet_off_over_snmp(env: _Env) -> None:
    res = await env.executor().execute(Action("rig-003", ActionKind.OUTLET_OFF, "ignored sleep"))
    assert res.ok, res.error
    assert env.farm.rigs["rig-003"].powered is False
    res = await env.executor().execute(Action("rig-003", ActionKind.OUTLET_ON, "room"))
    assert res.ok and env.farm.rigs["rig-003"].powered is True


async def test_timeouts_are_retried_then_reported(env: _Env) -> None:
    await env.site.fleet.servers["rig-001"].set_fault("silent")
    res = await env.executor(attempts=3).execute(Action("rig-001", ActionKind.SLEEP, "r"))
    assert not res.ok and res.attempts == 3
    assert res.error is not None and "timeout" in res.error
    assert env.farm.rigs["rig-001"].mode is RigMode.MINING
    assert env.store.audit_since(0)[-1].result == "failed"


async def test_unsupported_is_final_not_retried(env: _Env) -> None:
    res = await env.executor(attempts=3).execute(Action("rig-004", ActionKind.SLEEP, "r"))
    assert not res.ok and res.attempts == 1
    assert res.error is not None and "unsupported" in res.error


async def test_power_target_out_of_range_is_refused_before_sending(env: _Env) -> None:
    await env.devices.miners["rig-001"].read(env.farm.now())
    before = env.farm.rigs["rig-001"].command_count
    res = await env.executor().execute(Action("rig-001", ActionKind.SET_POWER, "r", 50.0))
    assert not res.ok and res.error is not None and res.error.startswith("invalid")
    assert env.farm.rigs["rig-001"].command_count == before


async def test_commands_come_before_reads_and_their_bookkeeping(
    env: _Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While actions queue for a slot, reads wait and outcomes are booked afterwards,
    each with the time its device answered."""
    monkeypatch.setattr(executor_mod, "CALM_PENDING", 0)  # a burst of three, booked at its end
    ex = Executor(env.devices, store=env.store, link=env.link, now=env.farm.now, concurrency=1)
    rigs = ("rig-001", "rig-002", "rig-003")
    burst = [
        asyncio.create_task(ex.execute(Action(r, ActionKind.SLEEP, "grid order"))) for r in rigs
    ]
    await asyncio.sleep(0)
    assert ex.queued == 2  # one slot: two wait for it
    assert not gc.isenabled()  # no collector pause holds the burst's replies back
    read = asyncio.create_task(ex.room_for_reads())
    await asyncio.sleep(0)
    assert not read.done()  # the poll holds back while commands queue
    first = await burst[0]
    assert first.ok and env.farm.rigs["rig-001"].mode is RigMode.SLEEPING
    assert env.store.audit_since(0) == []  # kept back: two commands still queued
    results = await asyncio.gather(*burst)
    assert all(r.ok for r in results)
    assert read.done() and ex.queued == 0
    assert gc.isenabled()
    await ex.drain()
    assert sorted(str(e.rig_id) for e in env.store.audit_since(0)) == list(rigs)  # ...none lost
    events = [p for _, p in env.link._events if b'"type":"action"' in p]
    assert len(events) == 3
    assert all(env.farm.rigs[r].mode is RigMode.SLEEPING for r in rigs)


async def test_a_slow_command_gives_its_slot_to_the_next(
    env: _Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stock Antminer's mode write takes ~21 s: past SLOT_HOLD_S it goes on without its
    slot, so a rig that sleeps at once is not kept waiting behind it."""
    monkeypatch.setattr(executor_mod, "SLOT_HOLD_S", 0.05)
    slow_done = asyncio.Event()
    miner = env.devices.miners["rig-001"]

    async def slow_sleep() -> None:
        await slow_done.wait()

    monkeypatch.setattr(miner, "sleep", slow_sleep)
    ex = Executor(env.devices, store=env.store, link=env.link, now=env.farm.now, concurrency=1)
    slow = asyncio.create_task(ex.execute(Action("rig-001", ActionKind.SLEEP, "grid order")))
    await asyncio.sleep(0)
    fast = await asyncio.wait_for(
        ex.execute(Action("rig-002", ActionKind.SLEEP, "grid order")), timeout=30
    )
    assert fast.ok and not slow.done()
    assert env.farm.rigs["rig-002"].mode is RigMode.SLEEPING
    assert ex.queued == 0
    slow_done.set()
    assert (await slow).ok
    await ex.drain()


async def test_a_kind_known_slow_is_paced_in_its_own_lane(
    env: _Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a driver kind's command outlasted SLOT_HOLD_S, its other commands hold a slot
    of their own lane for SLOW_HOLD_S only: 3,000 stock Antminers of a curtailment start
    within seconds instead of holding every slot for SLOT_HOLD_S each."""
    monkeypatch.setattr(executor_mod, "SLOT_HOLD_S", 0.05)
    monkeypatch.setattr(executor_mod, "SLOW_HOLD_S", 0.01)
    release = asyncio.Event()
    entered: dict[str, asyncio.Event] = {}
    for rid in ("rig-001", "rig-002", "rig-003"):
        entered[rid] = asyncio.Event()

        async def slow_sleep(rid: str = rid) -> None:
            entered[rid].set()
            await release.wait()

        monkeypatch.setattr(env.devices.miners[rid], "sleep", slow_sleep)
    ex = Executor(env.devices, store=env.store, link=env.link, now=env.farm.now, concurrency=1)
    first = asyncio.create_task(ex.execute(Action("rig-001", ActionKind.SLEEP, "grid order")))
    await asyncio.wait_for(entered["rig-001"].wait(), timeout=10)
    await asyncio.sleep(0.3)  # past SLOT_HOLD_S...
    assert ex._slow  # ...its kind is known slow
    # From now on a command of the main lane would hold its slot for a minute...
    monkeypatch.setattr(executor_mod, "SLOT_HOLD_S", 60.0)
    rest = [
        asyncio.create_task(ex.execute(Action(r, ActionKind.SLEEP, "grid order")))
        for r in ("rig-002", "rig-003")
    ]
    # ...but the known-slow kind's commands go through their own lane, one after the other.
    await asyncio.wait_for(entered["rig-003"].wait(), timeout=10)
    assert entered["rig-002"].is_set()
    release.set()
    assert all(r.ok for r in await asyncio.gather(first, *rest))
    await ex.drain()
