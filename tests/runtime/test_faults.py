"""Faults the daemon must survive, end to end: the broker restarted, and a storm of faults.

Everything here runs over real sockets: mosquitto, the simulated farm's miners, PDUs and
meter, and (for the storm) `rigd`'s daemon as its own process, so that it can be killed
with SIGKILL. Farm and daemon share one accelerated clock (`SPEED` farm seconds per wall
second). The cap is judged on the farm model's *true* import, sampled in the test process
many times per poll, not on what the daemon's meter says.

What is covered elsewhere: devices silent, refusing or answering garbage one at a time
(test_daemon_e2e.py); the broker stopped mid-order and rigd SIGKILLed mid-order
(test_grid_mqtt.py); a silent meter and no trustworthy reading at all, over hours
(test_control_sim.py); clock steps (test_clock_jump.py); a full disk and an unusable state
database (test_store_faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from bench.sim_harness import SimHarness
from controller.adapters.store import StateStore
from controller.config import Config, parse_config
from controller.core.planner import Action, Mode
from controller.core.status import ActionResult, CycleResult
from controller.runtime.daemon import Daemon
from controller.runtime.devices import build_devices
from drivers.errors import DeviceError
from simulators.clock import ScaledClock
from simulators.farm import Farm, RigMode
from simulators.site import SimSite
from tests.conftest import Mosquitto, running, watch
from tests.grid_helpers import Operator, grid_toml, order

SPEED = 20.0  # farm seconds per wall second
INTERVAL_S = 10.0  # farm seconds: a poll every 0.5 wall s
SLOW_S = 0.1  # wall seconds: how late a slow device answers, well inside the poll timeout
ROOT = Path(__file__).resolve().parent.parent.parent
HOUR = 3600.0


# -- an MQTT observer that outlives broker restarts --------------------------------------------


@dataclass(slots=True)
class Msg:
    at: float  # time.monotonic() on arrival
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Observer:
    """Everything published under rigd/#, across broker restarts (it reconnects)."""

    host: str
    port: int
    messages: list[Msg] = field(default_factory=list)
    latest: dict[str, Msg] = field(default_factory=dict)
    connects: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=f"observer-{os.getpid()}-{id(self)}"
                ) as c:
                    await c.subscribe("rigd/#", qos=1)
                    self.connects += 1
                    async for m in c.messages:
                        p = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        msg = Msg(time.monotonic(), str(m.topic), p, bool(m.retain))
                        self.messages.append(msg)
                        self.latest[msg.topic] = msg
                        async with self._changed:
                            self._changed.notify_all()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    async def wait(
        self, topic: str, pred: Callable[[Msg], bool], within: float, *, since: float = 0.0
    ) -> Msg:
        async def check() -> Msg:
            async with self._changed:
                while True:
                    for m in reversed(self.messages):
                        if m.at < since:
                            break
                        if m.topic == topic and pred(m):
                            return m
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(check(), within)
        except TimeoutError:
            last = self.latest.get(topic)
            got = last.payload[:300] if last else None
            raise AssertionError(f"{topic}: not seen within {within} s; last: {got!r}") from None

    async def wait_json(
        self, topic: str, pred: Callable[[Any], bool], within: float, *, since: float = 0.0
    ) -> Any:
        m = await self.wait(topic, lambda m: bool(pred(m.json())), within, since=since)
        return m.json()

    def docs(self, topic: str, since: float = 0.0, until: float = float("inf")) -> list[Any]:
        return [m.json() for m in self.messages if m.topic == topic and since <= m.at <= until]


@contextlib.asynccontextmanager
async def observing(broker: Mosquitto) -> AsyncIterator[Observer]:
    obs = Observer(broker.host, broker.port)
    task = asyncio.create_task(obs.run())
    try:
        yield obs
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the broker restarted ----------------------------------------------------------------------


def _config(site: SimSite, broker: Mosquitto, state: Path, extra: str = "") -> Config:
    text = site.config_toml(
        broker_url=broker.url,
        state_dir=state,
        interval_s=INTERVAL_S,
        timeout_s=0.3,
        retries=0,
        extra=extra,
    )
    (state.parent / "rigd.toml").write_text(text)
    return parse_config(text, environ={})


def _control(site: SimSite, cap_frac: float) -> str:
    full = site.nominal_import_kw()
    return f"""
[control]
max_import_kw = {full * cap_frac:.1f}
min_on_s = 60
min_off_s = 60
escalate_after_s = 120
ramp_kw_per_interval = {full * 0.25:.1f}
timing_default = {{ sleep_s = 15, wake_s = 200, power_change_s = 40 }}
"""


async def test_broker_restart_reconnects_with_backoff_and_republishes_retained_state(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """mosquitto runs without persistence, so a restart loses every retained message: rigd
    must reconnect (backing off 1, 2, 4 ... s) and publish availability and every retained
    topic again, while its control loop carries on at its cadence."""
    async with SimSite(rigs=6, pdus=1, clock=ScaledClock(SPEED)) as site:
        cfg = _config(site, mosquitto, tmp_path / "state")
        rig_topics = {f"rigd/sim/rigs/{r}/state" for r in site.farm.rigs}
        retained = {"rigd/sim/status", "rigd/sim/state", "rigd/sim/pdus/pdu-01/state"}
        retained |= {"rigd/sim/meters/meter-main/state", *rig_topics}
        with capture_logs() as logs:
            async with running(cfg, site) as d:
                async with watch(mosquitto.host, mosquitto.port) as w:
                    await w.wait_json("rigd/sim/state", lambda s: s["rigs"]["mining"] == 6)
                mosquitto.stop()
                down_at = time.monotonic()
                cycle = d.last.snapshot.cycle if d.last else 0
                await asyncio.sleep(3.5)  # tries at ~0, 1 and 3 s fail; the next is at 7 s
                cycles_down = (d.last.snapshot.cycle if d.last else 0) - cycle
                mosquitto.start()
                await asyncio.wait_for(d.link.connected.wait(), 10)
                back_at = time.monotonic()
                assert await d.link.flush(10)
                # A newcomer to the restarted broker finds the whole farm, retained.
                async with watch(mosquitto.host, mosquitto.port) as w:
                    for topic in retained:
                        await w.wait_for(topic, within=10)
                    assert w.latest["rigd/sim/status"] == b"online"
                    assert all(w.retained[t] for t in retained), {
                        t for t in retained if not w.retained[t]
                    }
                    state = w.json("rigd/sim/state")
                    assert state["rigs_total"] == 6 and state["cycle"] >= cycle + cycles_down
    waits = [e["retry_in_s"] for e in logs if e["event"] == "mqtt_disconnected"]
    assert waits[:3] == [1.0, 2.0, 4.0], waits
    assert [e["event"] for e in logs].count("mqtt_connected") == 2
    assert back_at - down_at < 3.5 + 4.0 + 2.0  # back at the first try after the restart
    # 3.5 s without a broker is 7 cycles; the loop never waited for the broker.
    assert cycles_down >= 5, cycles_down


async def test_an_order_sent_while_rigd_reconnects_to_a_restarted_broker_is_not_lost(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """With broker persistence, rigd's session (QoS 1, persistent) outlives a broker
    restart: an order the operator publishes before rigd is back is queued for it."""
    conf = mosquitto.conf.read_text().replace(
        "persistence false\n",
        f"persistence true\npersistence_location {tmp_path}/\n",
    )
    mosquitto.stop()
    mosquitto.conf.write_text(conf)
    mosquitto.start()
    op = Operator.new()
    async with SimSite(rigs=6, pdus=1, clock=ScaledClock(SPEED)) as site:
        cfg = _config(site, mosquitto, tmp_path / "state", _control(site, 1.1) + grid_toml(op))
        async with running(cfg, site) as d, observing(mosquitto) as obs:
            state = await obs.wait_json(
                "rigd/sim/state", lambda s: s["rigs"]["mining"] == 6, within=20
            )
            mosquitto.stop()
            await asyncio.sleep(3.5)  # rigd now waits 4 s before its next try
            mosquitto.start()
            assert not d.link.connected.is_set()
            target = round(state["import_kw"] * 0.6, 1)
            msg = order(now=site.clock.now(), order_id="o-broker", target={"max_import_kw": target})
            # The operator's own client: QoS 1, as the protocol asks.
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="operator") as c:
                await c.publish("rigd/sim/grid/orders", op.sign(msg), qos=1)
            assert not d.link.connected.is_set(), "published before rigd was back"
            ack = await obs.wait_json(
                "rigd/sim/grid/acks", lambda a: a["order_id"] == "o-broker", within=20
            )
            assert ack["status"] == "accepted"
            await obs.wait_json("rigd/sim/state", lambda s: s["cap_source"] == "grid", within=10)


# -- the storm ---------------------------------------------------------------------------------


@dataclass
class Child:
    """The daemon process: started, killed, restarted with the farm's clock."""

    cfg_path: Path
    clock: ScaledClock
    logs: Path
    proc: asyncio.subprocess.Process | None = None
    runs: int = 0

    async def start(self, *, wall_offset_s: float = 0.0) -> None:
        start, mono = self.clock.anchor
        self.runs += 1
        out = (self.logs.parent / f"{self.logs.name}.{self.runs}").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.storm_daemon",
            "-c",
            str(self.cfg_path),
            "--speed",
            repr(self.clock.speed),
            "--start",
            repr(start),
            "--mono-origin",
            repr(mono),
            "--boot",
            self.clock.boot_id,
            "--wall-offset-s",
            repr(wall_offset_s),
            "--usr1-step-s",
            repr(-2 * 3600.0),
            stderr=out,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        out.close()

    def events(self, run: int) -> list[dict[str, Any]]:
        path = self.logs.parent / f"{self.logs.name}.{run}"
        return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), 20)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Sampler:
    """The farm's true import against the cap, many times per poll, by wall time."""

    site: SimSite
    cap_kw: float
    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, kW)

    async def run(self) -> None:
        while True:
            t = self.site.clock.now()
            self.samples.append((time.monotonic(), self.site.farm.meter.true_power_w(t) / 1000))
            await asyncio.sleep(0.02)

    def over(self, since: float) -> list[tuple[float, float]]:
        return [(t - since, kw) for t, kw in self.samples if t >= since and kw > self.cap_kw]


def _memory(state: Path, key: str = "planner.memory") -> dict[str, dict[str, Any]]:
    with sqlite3.connect(state / StateStore.FILENAME) as db:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return dict(json.loads(row[0])) if row else {}


def _wanted_and_real(farm: Farm, memory: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rigs whose firmware is not in the state the control loop last commanded."""
    wrong = {}
    for rid, rig in farm.rigs.items():
        mode = Mode(memory.get(rid, {}).get("mode", "run"))
        target = memory.get(rid, {}).get("target_w")
        real = (rig.mode.value, rig.powered, rig.power_target_w)
        if mode is Mode.OFF:
            ok = not rig.powered
        elif mode is Mode.SLEEP:
            ok = rig.powered and rig.mode is RigMode.SLEEPING
        elif mode is Mode.THROTTLE:
            ok = (
                rig.powered
                and rig.mode is RigMode.MINING
                and rig.power_target_w is not None
                and target is not None
                # LuxOS sets the highest profile at or below the watts asked for, and the
                # simulator's profiles are about 7 % of nominal apart.
                and -0.1 * rig.model.nominal_w
                <= rig.power_target_w - float(target)
                <= 0.05 * rig.model.nominal_w
            )
        else:
            ok = (
                rig.powered
                and rig.mode is RigMode.MINING
                and (rig.power_target_w is None or rig.power_target_w >= rig.model.nominal_w - 1)
            )
        if not ok:
            wrong[rid] = (mode.value, target, real)
    return wrong


async def test_storm_of_faults_holds_the_cap_and_ends_where_the_loop_wants(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A farm capped at 70 % of its load, and a scripted storm: the broker killed and
    restarted; the meter silent, then answering garbage; a PDU silent, then answering
    garbage; a rack of miners silent and one miner answering garbage; the meter, a PDU and a
    rack slow (inside the poll timeout); rigd SIGKILLed in
    the middle of restoring rigs, and restarted on a wall clock stepped an hour forward;
    the wall clock stepped two hours back. Throughout: the farm's true import under the
    cap (once the first shed has had its physical time), the loop on its cadence, health
    published; at the end, every rig where the control loop wants it."""
    clock = ScaledClock(SPEED)
    async with SimSite(rigs=12, pdus=2, clock=clock) as site:
        state = tmp_path / "state"
        cfg = _config(site, mosquitto, state, _control(site, 0.7))
        assert cfg.control is not None
        cap = cfg.control.max_import_kw
        rack = [r for r in site.farm.rigs if (site.farm.outlet_of(r) or ("",))[0] == "pdu-02"]
        garbage_rig = next(r for r in site.farm.rigs if r not in rack)
        assert len(rack) == 6
        child = Child(tmp_path / "rigd.toml", clock, tmp_path / "rigd.log")
        sampler = Sampler(site, cap)
        sampling = asyncio.create_task(sampler.run())
        seen: dict[str, Any] = {}
        marks: dict[str, float] = {}

        async def phase(name: str) -> None:
            marks[name] = time.monotonic()

        try:
            async with observing(mosquitto) as obs:
                await child.start()
                # -- the first shed: the farm starts flat out, 43 % over the cap --
                first = await obs.wait_json("rigd/sim/state", lambda s: "control" in s, within=30)
                assert first["cap_kw"] == pytest.approx(cap, abs=0.01)
                await phase("controlled")
                settle_s = (30 + 2 * INTERVAL_S + 10) / SPEED  # slowest shed + 2 polls + slack
                await asyncio.sleep(3.0)

                # -- the broker dies and comes back (no persistence: retained state lost) --
                await phase("broker")
                mosquitto.stop()
                await asyncio.sleep(2.5)
                mosquitto.start()
                back = time.monotonic()
                await obs.wait("rigd/sim/status", lambda m: m.payload == b"online", 15, since=back)
                for topic in (f"rigd/sim/rigs/{r}/state" for r in site.farm.rigs):
                    await obs.wait(topic, lambda m: True, 10, since=back)
                async with watch(mosquitto.host, mosquitto.port) as w:
                    await w.wait_for("rigd/sim/state", within=5)
                    assert w.retained["rigd/sim/state"] and w.latest["rigd/sim/status"] == b"online"

                # -- the meter: silent, then garbage --
                await phase("meter")
                site.meter.fault = "silent"
                seen["meter_silent"] = await obs.wait_json(
                    "rigd/sim/meters/meter-main/state",
                    lambda d: d["health"]["last_error_kind"] == "timeout",
                    10,
                    since=marks["meter"],
                )
                seen["estimate"] = await obs.wait_json(
                    "rigd/sim/state",
                    lambda s: s["control"]["basis"] == "estimate" and not s["meter_ok"],
                    10,
                    since=marks["meter"],
                )
                await asyncio.sleep(1.5)
                site.meter.fault = "garbage"
                since = time.monotonic()
                seen["meter_garbage"] = await obs.wait_json(
                    "rigd/sim/meters/meter-main/state",
                    lambda d: d["health"]["last_error_kind"] == "malformed",
                    10,
                    since=since,
                )
                await asyncio.sleep(1.0)
                site.meter.fault = None
                since = time.monotonic()
                await obs.wait_json("rigd/sim/state", lambda s: s["meter_ok"], 10, since=since)

                # -- rigd SIGKILLed while it restores what the estimate made it shed --
                await phase("kill")
                with contextlib.suppress(AssertionError):
                    seen["kill_after"] = await obs.wait_json(
                        "rigd/sim/events",
                        lambda d: d["action"] in ("wake", "set_power"),
                        6,
                        since=since,
                    )
                killed = time.monotonic()
                assert await child.stop(signal.SIGKILL) == -signal.SIGKILL
                asleep_at_kill = {
                    r for r, x in site.farm.rigs.items() if x.mode is RigMode.SLEEPING
                }
                await obs.wait(
                    "rigd/sim/status", lambda m: m.payload == b"offline", 10, since=killed
                )
                # Asleep at the kill: remembered asleep, or with a wake in flight whose
                # memory before it (control.inflight) says asleep: the restart checks those.
                slept = {
                    r
                    for key in ("planner.memory", "control.inflight")
                    for r, m in _memory(state, key).items()
                    if m["mode"] in ("sleep", "off")
                }
                assert asleep_at_kill <= slept, "who is asleep survives a SIGKILL"
                # NTP puts the clock an hour forward while rigd is down.
                await child.start(wall_offset_s=3600.0)
                await obs.wait(
                    "rigd/sim/status", lambda m: m.payload == b"online", 30, since=killed
                )
                await phase("restarted")

                # -- a PDU: silent, then garbage --
                pdu = site.pdu_agents["pdu-01"]
                pdu.set_fault("silent")
                seen["pdu_silent"] = await obs.wait_json(
                    "rigd/sim/pdus/pdu-01/state",
                    lambda d: d["health"]["reachable"] is False,
                    10,
                    since=marks["restarted"],
                )
                await asyncio.sleep(1.0)
                pdu.set_fault("garbage")
                await asyncio.sleep(1.5)
                pdu.set_fault(None)
                since = time.monotonic()
                await obs.wait_json(
                    "rigd/sim/pdus/pdu-01/state",
                    lambda d: d["health"]["reachable"] is True,
                    10,
                    since=since,
                )

                # -- a rack of miners silent, another miner answering garbage --
                await phase("rack")
                for r in rack:
                    await site.fleet.servers[r].set_fault("silent")
                await site.fleet.servers[garbage_rig].set_fault("garbage")
                seen["rack"] = await obs.wait_json(
                    "rigd/sim/state",
                    lambda s: s["rigs"]["unreachable"] == len(rack) + 1,
                    10,
                    since=marks["rack"],
                )
                seen["garbage_rig"] = await obs.wait_json(
                    f"rigd/sim/rigs/{garbage_rig}/state",
                    lambda d: d["health"]["last_error_kind"] == "malformed",
                    10,
                    since=marks["rack"],
                )
                await asyncio.sleep(2.0)
                for r in [*rack, garbage_rig]:
                    await site.fleet.servers[r].set_fault(None)
                since = time.monotonic()
                await obs.wait_json(
                    "rigd/sim/state", lambda s: s["rigs"]["unreachable"] == 0, 10, since=since
                )

                # -- slow answers, inside the poll timeout: read, and the cadence holds. A
                # third of the 0.3 s timeout: the simulators share this process, and on a
                # busy host (--busy-cores 2) half of it was answered past the timeout --
                await phase("slow")
                site.meter.slow_s, site.meter.fault = SLOW_S, "slow"
                site.pdu_agents["pdu-02"].set_fault("slow", slow_s=0.05)
                for r in rack:
                    site.fleet.servers[r].slow_s = SLOW_S
                    await site.fleet.servers[r].set_fault("slow")
                seen["slow"] = await obs.wait_json(
                    "rigd/sim/state",
                    lambda s: s["poll_duration_s"] >= SLOW_S,
                    10,
                    since=marks["slow"],
                )
                await asyncio.sleep(2.0)
                site.meter.fault = None
                site.pdu_agents["pdu-02"].set_fault(None)
                for r in rack:
                    await site.fleet.servers[r].set_fault(None)
                slow_docs = obs.docs("rigd/sim/state", marks["slow"], time.monotonic())

                # -- the wall clock stepped two hours back --
                await phase("step")
                before = obs.latest["rigd/sim/state"].json()["ts"]
                assert child.proc is not None
                child.proc.send_signal(signal.SIGUSR1)
                stepped = await obs.wait_json(
                    "rigd/sim/state", lambda s: s["ts"] < before - 3000, 10, since=marks["step"]
                )
                assert stepped["ts"] == pytest.approx(before - 7200, abs=120)

                # -- the end: quiet, and every rig where the loop wants it --
                await phase("settle")
                deadline = time.monotonic() + 25
                while True:
                    events = [m for m in obs.messages if m.topic == "rigd/sim/events"]
                    quiet_since = events[-1].at if events else marks["settle"]
                    last = obs.latest["rigd/sim/state"].json()
                    if (
                        time.monotonic() - quiet_since > 2.0
                        and last["control"]["inflight_actions"] == 0
                    ):
                        break
                    assert time.monotonic() < deadline, "the loop never settled"
                    await asyncio.sleep(0.25)
                rc = await child.stop(signal.SIGTERM)
                ended = time.monotonic()
                assert rc == 0
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            if child.proc is not None and child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()

        # -- the cap: never over, once the first shed has had its physical time --
        over = sampler.over(marks["controlled"] + settle_s)
        worst = max((kw for _, kw in sampler.samples), default=0.0)
        assert over == [], f"over the {cap:.1f} kW cap at (s, kW): {over[:10]} (worst {worst})"
        assert len(sampler.samples) > 20 * (ended - marks["controlled"])  # really sampled

        # -- the cadence: kept through every fault, broker or not. A device that held up the
        # cycle would cost its guard (timeout x tries + 2 s = 2.3 s) a cycle: a quarter of the
        # nominal rate. Half of it leaves room for a busy test machine.
        states = [m for m in obs.messages if m.topic == "rigd/sim/state"]
        rates = {}
        for name, lo, hi in (
            ("run 1", marks["controlled"], killed),
            ("run 2", marks["restarted"], ended),
            ("broker", marks["broker"] - 1.0, marks["meter"]),  # across the outage
            ("meter", marks["meter"], killed),
            ("pdu", marks["restarted"], marks["rack"]),
            ("rack", marks["rack"], marks["slow"]),
            ("slow", marks["slow"], marks["step"]),
        ):
            within = [m for m in states if lo <= m.at <= hi]
            assert len(within) >= 2, f"no state documents in {name}"
            first, last = within[0], within[-1]
            rates[name] = (last.json()["cycle"] - first.json()["cycle"]) / (last.at - first.at)
        slow = {k: round(v, 2) for k, v in rates.items() if v < 0.5 * SPEED / INTERVAL_S}
        assert slow == {}, f"cycles/s (nominal {SPEED / INTERVAL_S})"

        # -- health was published for every fault --
        assert seen["meter_silent"]["health"]["reachable"] is False
        assert seen["estimate"]["import_kw"] is None
        assert seen["meter_garbage"]["health"]["reachable"] is False
        assert seen["pdu_silent"]["health"]["last_error_kind"] in ("timeout", "malformed")
        assert seen["rack"]["unreachable"]["miners"] == len(rack) + 1
        assert seen["garbage_rig"]["state"] == "unreachable"
        assert all(d["meter_ok"] and d["unreachable"]["miners"] == 0 for d in slow_docs[2:])
        assert seen["slow"]["unreachable"] == {"miners": 0, "pdus": 0, "meters": 0}

        # -- the steps were seen and applied --
        steps = [e for run in (1, 2) for e in child.events(run) if e["event"] == "clock_stepped"]
        assert [(round(e["step_s"], -1), e["while_down"]) for e in steps] == [
            (3600.0, True),
            (-7200.0, False),
        ]
        # rigd's own log (library loggers, e.g. pymodbus on garbage, are not rigd's word)
        own = [e for run in (1, 2) for e in child.events(run) if "logger" not in e]
        assert not [e for e in own if e["level"] in ("error", "critical")]

        # -- the end state: what the loop last commanded is what every rig does --
        memory = _memory(state)
        assert _wanted_and_real(site.farm, memory) == {}
        assert any(m["mode"] != "run" for m in memory.values()), "the cap had rigs curtailed"

        loaded = next(e for e in child.events(2) if e["event"] == "control_state_loaded")
        after = [kw for t, kw in sampler.samples if t >= marks["controlled"] + settle_s]
        with capsys.disabled():
            print(
                f"\nstorm: {ended - marks['controlled']:.1f} s wall "
                f"({(ended - marks['controlled']) * SPEED / 60:.0f} farm min), "
                f"{len(sampler.samples)} samples; import after the first shed "
                f"{min(after):.1f}-{max(after):.1f} kW under a {cap:.1f} kW cap; "
                f"cycles/s {', '.join(f'{k} {r:.2f}' for k, r in rates.items())} "
                f"(nominal {SPEED / INTERVAL_S}); "
                f"killed after {seen.get('kill_after', {}).get('action')} on "
                f"{seen.get('kill_after', {}).get('rig')}, {len(asleep_at_kill)} asleep, "
                f"unconfirmed at restart {loaded['unconfirmed']}; "
                f"end modes {sorted(m['mode'] for m in memory.values())}"
            )


# -- killed between remembering a command and sending it ---------------------------------------


async def _kill_with_commands_unsent(h: SimHarness, downtime_s: float) -> Daemon:
    """What SIGKILL leaves when it lands after a plan was remembered (the memory is written
    before the commands go out) and before the commands reached the rigs: the new daemon
    reads that memory. Returns the dead daemon, for the test to close its files."""
    dead = h.daemon
    ctl = h.controller
    for task in ctl._inflight.values():
        task.cancel()
    await asyncio.gather(*ctl._inflight.values(), return_exceptions=True)
    ctl._inflight.clear()  # no harvest: the process is gone
    h._advance(downtime_s)
    h.daemon = h._new_daemon()
    return dead


def _hang_commands(h: SimHarness) -> None:
    async def never(a: Action, *, actor: str = "planner") -> ActionResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    h.controller.executor.execute = never  # type: ignore[method-assign]


async def test_wakes_lost_to_a_kill_are_noticed_and_sent_again(
    harness: Callable[..., SimHarness],
) -> None:
    """Killed as it woke rigs, before the wakes went out: memory says they run, the rigs
    sleep. Once a wake's settle time has passed, rigd sees it never landed, takes the rigs
    back as its own sleepers and wakes them (else they would sleep forever, looking like
    someone else's)."""
    h = harness(rigs=12, pdus=2, control={"power_targets": False, "min_off_s": 300})
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    h.at(t0 + 303, lambda: h.set_override(0.6 * ctl.max_import_kw, 600, "feeder"))
    h.at(t0 + 895, lambda: _hang_commands(h))
    await h.run_until(t0 + 960)
    lost = {
        rid
        for rid, m in h.controller.memory.items()
        if m.mode is Mode.RUN and h.rig(rid).mode is RigMode.SLEEPING
    }
    assert lost, "wakes were planned and never sent"
    dead = await _kill_with_commands_unsent(h, downtime_s=30)
    assert set(h.controller._unconfirmed) == lost
    with capture_logs() as logs:
        await h.run_for(1800)
    noticed = {e["rig"] for e in logs if e["event"] == "command_not_confirmed"}
    assert noticed == lost
    assert all(r.mode is RigMode.MINING for r in h.farm.rigs.values())
    assert h.controller._unconfirmed == {}
    assert h.store.get("control.inflight") == {}
    assert dead.store is not None
    dead.store.close()


async def test_sleeps_lost_to_a_kill_are_planned_again_not_escalated(
    harness: Callable[..., SimHarness],
) -> None:
    """Killed as it slept rigs, before the sleeps went out, and down longer than
    `escalate_after_s`: the rigs still run. A sleep that did not take would be escalated to
    an outlet switch-off; one that was never sent is just planned again."""
    h = harness(rigs=12, pdus=2, control={"power_targets": False, "escalate_after_s": 120})
    ctl = h.cfg.control
    assert ctl is not None
    t0 = h.now
    await h.run_until(t0 + 300)
    _hang_commands(h)
    h.set_override(0.6 * ctl.max_import_kw, 2 * HOUR, "feeder")
    await h.run_for(h.interval_s)
    lost = {rid for rid, m in h.controller.memory.items() if m.mode is Mode.SLEEP}
    assert lost and all(h.rig(r).mode is RigMode.MINING for r in lost)
    dead = await _kill_with_commands_unsent(h, downtime_s=300)
    acts: list[tuple[str, str]] = []

    def each(r: CycleResult) -> None:
        if r.control is not None and r.control.plan is not None:
            acts.extend((a.rig_id, a.kind.value) for a in r.control.plan.actions)

    restarted = h.now
    await h.run_for(900, each)
    assert not [a for a in acts if a[1] == "outlet_off"], acts
    assert {r for r, k in acts if k == "sleep"}, "shed afresh"
    assert h.recorder.over_times(restarted + 60) == []
    memory = {k: v.as_dict() for k, v in h.controller.memory.items()}
    assert _wanted_and_real(h.farm, memory) == {}
    assert dead.store is not None
    dead.store.close()


# -- the simulators' own faults ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fault", "slow_s", "expect"),
    [
        ("pdu", "garbage", None, ("timeout", "malformed")),
        ("pdu", "slow", 0.1, None),
        ("pdu", "slow", 1.0, ("timeout",)),
        ("meter", "slow", 0.1, None),
        ("meter", "slow", 1.0, ("timeout",)),
        ("miner", "slow", 0.1, None),
        ("miner", "slow", 1.0, ("timeout",)),
    ],
)
async def test_slow_and_garbage_devices_through_the_real_drivers(
    tmp_path: Path, kind: str, fault: str, slow_s: float | None, expect: tuple[str, ...] | None
) -> None:
    """A slow answer inside the timeout is read (late); outside it, it is a timeout; garbage
    is an error of its own kind, never a reading."""
    async with SimSite(rigs=2, pdus=1, clock=ScaledClock(1.0)) as site:
        cfg = parse_config(
            site.config_toml(state_dir=tmp_path, timeout_s=0.5, retries=0), environ={}
        )
        devices = build_devices(cfg)
        try:
            reader: Any
            if kind == "pdu":
                site.pdu_agents["pdu-01"].set_fault(fault, slow_s=slow_s)  # type: ignore[arg-type]
                reader = devices.pdus["pdu-01"]
            elif kind == "meter":
                site.meter.fault, site.meter.slow_s = fault, slow_s or 0.0  # type: ignore[assignment]
                reader = devices.meters["meter-main"]
            else:
                server = site.fleet.servers["rig-001"]
                server.slow_s = slow_s or 0.0
                await server.set_fault(fault)
                reader = devices.miners["rig-001"]
            t0 = time.monotonic()
            if expect is None:
                reading = await reader.read(site.clock.now())
                assert reading is not None and time.monotonic() - t0 >= (slow_s or 0.0)
            else:
                with pytest.raises(DeviceError) as e:
                    await asyncio.wait_for(reader.read(site.clock.now()), 5)
                assert e.value.kind in expect
                assert time.monotonic() - t0 < 3.0
        finally:
            await devices.close()
