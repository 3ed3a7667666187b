"""One farm size, end to end: simulated farm, broker and daemon, each in its own process.

The simulated farm is `rigd sim` itself: every miner on its own loopback address and its
firmware's real ports (the `mix` of dialects, in its shares), switched PDUs, and one import
meter that sums the whole farm. Above 2,500 rigs it runs over several processes
(`rigd sim --processes`, one per `RIGS_PER_PROCESS` rigs: one process ran out of open
files, and of CPU, in a 10,000-rig curtailment), each serving a slice of rigs with their
PDUs; the meter, in `rigd sim`'s own process, sums what they report. The simulator's CPU
is its processes' together. The broker is a real mosquitto. The daemon is `rigd run` on
the config `rigd sim` wrote, so its CPU and memory are its own, read from /proc.

What is measured, and from where:

- the yardsticks (bench/ratios.py): the floors of the farm's dialects and PDUs, and pyasic
  where asked, each in a child process, after the farm is up and before the daemon starts;

- poll cycles: the `poll_duration_s` of every cycle, from the daemon's retained `state`
  document, which also says how many rigs answered;
- the daemon's CPU per cycle and its average share of a core, over whole steady cycles
  (after the warm-up ones that learn each rig's identity and profiles), and its peak
  resident memory (VmHWM) at the end;
- MQTT: every message the daemon publishes, counted by a subscriber to `rigd/<site>/#`;
- curtailment: a signed grid order (a full curtailment: the cap is just above what the
  farm draws with every rig asleep, so every rig must be slept) is published at a chosen
  moment of a poll cycle. Latency per rig runs from just before that publish (so broker
  delivery is included) to the time the executor recorded the rig's sleep as acknowledged
  in the audit table (a sleep, or an outlet switched off); the daemon's own marks of the
  order's way to its first command come from its log; "metered" is when the simulated
  meter, read over Modbus by this benchmark, first shows import under the order's cap;
- the command floor: then the daemon is stopped, and the floor client of each dialect
  (bench/floors/commands.py, in a child process) wakes every rig the daemon shed and
  sends the very commands the daemon's audit shows, every one at once: its p99 from the
  first send is `floor_curtail_p99_s`, beside the daemon's from the order's publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from bench import proc, ratios
from controller.adapters.grid.sign import build, generate, sign, write_keypair
from drivers.modbus_meter import ModbusMeter
from simulators.avalon import AVALON_MODELS
from simulators.farm import MODELS, SimMeter
from simulators.shards import default_processes
from simulators.whatsminer import WHATSMINER_MODELS

SITE = "bench"
# An order's way to its first command, as the daemon logs it (ms since it arrived).
FIRST_COMMAND_MARKS = (
    *("verified", "stored", "poll_cut", "meter_read", "snapshot", "control"),
    *("plan_input", "planned", "tasks_made", "launched", "first_send"),
)
# What the planner sheds load with: a rig slept, powered down, or its outlet switched off.
SHED_ACTIONS = ("sleep", "set_power", "outlet_off")


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )
    if found is None:
        raise BenchError("mosquitto is not installed (scripts/test.sh installs it)")
    return found


@dataclass(frozen=True)
class Settings:
    rigs: int
    pdus: int = 0  # 0: no switched PDUs (rigs sleep over their own API)
    mix: str = "luxos"  # the firmware mix, as `rigd sim --mix` takes it
    interval_s: float = 10.0
    warmup_cycles: int = 2
    cycles: int = 6  # steady cycles measured
    subnet: str = "127.64.0.0/18"
    order_phase_s: float = 0.5  # the order arrives this long after a poll cycle began
    workdir: Path | None = None  # None: a temporary directory, removed afterwards
    daemon_env: dict[str, str] = field(default_factory=dict)
    profile: Path | None = None  # py-spy's collapsed stacks of the daemon, steady cycles
    verbose: bool = True
    floors: bool = True  # measure bench/floors against this farm before the daemon starts
    floor_rounds: int = 2
    sim_processes: int | None = None  # None: one per 2,500 rigs (`rigd sim --processes`)
    pyasic: bool = False  # and pyasic reading a sample of each dialect's rigs
    # After the daemon's curtailment: stop it, and have the command floor (bench/floors/
    # commands.py) wake the farm and send the same commands
    command_floor: bool = True


class BenchError(RuntimeError):
    """The benchmark could not run (a process failed to start, a deadline passed)."""


def _say(s: Settings, msg: str) -> None:
    if s.verbose:
        print(f"  [{s.rigs} rigs] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def idle_floor_kw(rigs: int, by_driver: dict[str, int] | None = None) -> float:
    """What the simulated meter reads with every rig asleep, at most: the farm model's own
    figures, each rig at the highest sleep draw of the models its dialect can be (a
    Whatsminer or an Avalon is a rig of its own models and idles higher than an Antminer).
    Without `by_driver`, every rig is taken for one of the farm's Antminer models."""
    meter = SimMeter.__dataclass_fields__
    base_w = float(meter["overhead_base_w"].default)  # type: ignore[arg-type]
    frac = float(meter["overhead_frac"].default)  # type: ignore[arg-type]
    counts = by_driver if by_driver else {"antminer": rigs}
    idle_w = sum(n * _dialect_idle_w(d) for d, n in counts.items())
    return (base_w + idle_w * (1.0 + frac)) / 1000.0


def _dialect_idle_w(driver: str) -> float:
    if driver.startswith("whatsminer"):
        return max(m.idle_w for m in WHATSMINER_MODELS.values())
    if driver == "avalon":
        return max(m.physics.idle_w for m in AVALON_MODELS.values())
    return max(m.idle_w for m in MODELS.values())


# -- the processes ---------------------------------------------------------------------------


class _Procs:
    """Every process this run started, stopped in reverse order however the run ends."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[Any], int]] = []

    def add(self, name: str, p: subprocess.Popen[Any], stop_signal: int) -> None:
        self.started.append((name, p, stop_signal))

    def stop_all(self) -> None:
        for _name, p, sig in reversed(self.started):
            if p.poll() is None:
                p.send_signal(sig)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.started.clear()


def _start_mosquitto(work: Path, procs: _Procs) -> int:
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type warning\n"
    )
    p = subprocess.Popen(
        [_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    procs.add("mosquitto", p, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise BenchError(f"mosquitto exited with {p.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return port
        time.sleep(0.05)
    raise BenchError("mosquitto did not start listening")


def sim_processes(s: Settings) -> int:
    return s.sim_processes or default_processes(s.rigs)


def _start_farm(s: Settings, work: Path, broker: str, pub: Path, procs: _Procs) -> Path:
    cfg = work / "rigd.toml"
    max_import = round(s.rigs * 4.0 + 100.0)  # above the whole farm at full power
    p = subprocess.Popen(
        [sys.executable, "-m", "controller.cli.rigd", "sim", "--rigs", str(s.rigs),
         "--pdus", str(s.pdus), "--subnet", s.subnet, "--mix", s.mix,
         "--processes", str(sim_processes(s)),
         "--write-config", str(cfg), "--broker", broker, "--site", SITE,
         "--state-dir", str(work / "state"), "--interval", f"{s.interval_s:g}",
         "--max-import-kw", str(max_import), "--grid-key", str(pub),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=(work / "sim.log").open("w"), text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    procs.add("sim", p, signal.SIGINT)
    assert p.stdout is not None
    # A failure deadline, not a figure: a 10,000-rig farm took 150 s to start on a busy host
    # (its workers' SNMP agents cost 0.1 s of CPU each to set up).
    deadline = time.monotonic() + 60 + s.rigs / 20
    for line in p.stdout:
        if "Ctrl-C" in line:
            return cfg
        if time.monotonic() > deadline:
            break
    raise BenchError(f"the simulated farm did not start: see {work / 'sim.log'}")


def _start_daemon(s: Settings, cfg: Path, work: Path, procs: _Procs) -> subprocess.Popen[Any]:
    p = subprocess.Popen(
        [sys.executable, "-m", "controller.cli.rigd", "run", "-c", str(cfg), "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=(work / "daemon.log").open("w"),
        env={**os.environ, **s.daemon_env},
    )
    procs.add("daemon", p, signal.SIGTERM)
    return p


def _start_profiler(
    s: Settings, pid: int, procs: _Procs, suffix: str = ""
) -> subprocess.Popen[Any] | None:
    """py-spy (a dev tool, not a dependency of rigd) sampling the daemon, when asked."""
    if s.profile is None:
        return None
    out = s.profile.with_name(s.profile.stem + suffix + s.profile.suffix)
    # Beside this interpreter first: the venv's bin is rarely on PATH.
    here = Path(sys.executable).parent / "py-spy"
    spy = str(here) if here.exists() else shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy, or scripts/bootstrap.sh dev)")
    p = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs.add("py-spy", p, signal.SIGINT)
    return p


# -- watching the daemon over MQTT --------------------------------------------------------


@dataclass
class _Cycle:
    cycle: int
    ts: float  # the daemon's clock when the cycle's poll began
    poll_s: float
    answered: int
    arrived: float  # our clock when the state document came in
    import_kw: float | None
    cpu_s: float  # the daemon's CPU when the state document came in
    msgs: int  # messages seen so far
    bytes: int


class _Observer:
    """A subscriber to everything the daemon publishes, keeping count and every cycle."""

    def __init__(self, port: int, rigs: int) -> None:
        self.port = port
        self.rigs = rigs
        self.msgs = 0
        self.bytes = 0
        self.cycles: list[_Cycle] = []
        self.pid: int | None = None
        self.changed = asyncio.Event()
        self.sleeps_seen = 0
        self.client: aiomqtt.Client | None = None
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(
            "127.0.0.1", self.port, identifier=f"bench-{uuid.uuid4().hex[:8]}"
        ) as client:
            self.client = client
            await client.subscribe(f"rigd/{SITE}/#", qos=0)
            self.ready.set()
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                self.msgs += 1
                self.bytes += len(payload)
                topic = m.topic.value
                if topic == f"rigd/{SITE}/state":
                    self._state(payload)
                elif topic == f"rigd/{SITE}/events" and b'"sleep"' in payload:
                    self.sleeps_seen += 1

    def _state(self, payload: bytes) -> None:
        doc = json.loads(payload)
        rigs = doc.get("rigs") or {}
        answered = sum(v for k, v in rigs.items() if k not in ("unreachable", "off"))
        cpu = proc.cpu_s(self.pid) if self.pid is not None else 0.0
        self.cycles.append(
            _Cycle(
                cycle=int(doc["cycle"]),
                ts=float(doc["ts"]),
                poll_s=float(doc["poll_duration_s"]),
                answered=answered,
                arrived=time.time(),
                import_kw=doc.get("import_kw"),
                cpu_s=cpu,
                msgs=self.msgs,
                bytes=self.bytes,
            )
        )
        self.changed.set()

    async def wait_cycle(self, n: int, within: float) -> _Cycle:
        """The first state document of cycle `n` or later."""
        async with asyncio.timeout(within):
            while True:
                for c in self.cycles:
                    if c.cycle >= n:
                        return c
                self.changed.clear()
                await self.changed.wait()


# -- one run --------------------------------------------------------------------------------


async def _meter_under(meter: ModbusMeter, cap_kw: float, since: float, limit_s: float) -> float:
    """Seconds from `since` to the first meter reading under `cap_kw` (NaN if never)."""
    deadline = since + limit_s
    while time.time() < deadline:
        try:
            r = await meter.read(time.time())
        except Exception:  # a busy simulator: try again
            await asyncio.sleep(0.2)
            continue
        if r.power_w / 1000.0 < cap_kw:
            return time.time() - since
        await asyncio.sleep(0.1)
    return math.nan


def _audit_sheds(db: Path, since: float, columns: str) -> list[tuple[Any, ...]]:
    """`columns` of the shedding commands in the daemon's audit since `since`, in order
    (read-only: the daemon may still be writing)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(
            f"SELECT {columns} FROM audit WHERE action IN (?, ?, ?) AND ts >= ? ORDER BY ts",
            (*SHED_ACTIONS, since),
        ).fetchall()
    finally:
        con.close()


def _audit_actions(db: Path, since: float) -> tuple[dict[str, str], set[str]]:
    """The first shed action sent to each rig since `since`, acknowledged or not (the
    command floor sends the same ones), and the rigs whose outlet was switched off (the
    planner's next turn may add that to a sleep: the floor must power them first)."""
    rows = _audit_sheds(db, since, "rig_id, action")
    out: dict[str, str] = {}
    for rig, action in rows:
        out.setdefault(str(rig), str(action))
    return out, {str(rig) for rig, action in rows if action == "outlet_off"}


def _command_floor(s: Settings, cfg: Path, db: Path, since: float,
                   daemon: subprocess.Popen[Any]) -> dict[str, Any]:  # fmt: skip
    """Stop the daemon, then have the command floor wake every rig it shed and shed them
    again the bare way (bench/floors/commands.py): the floor_curtail_* figures."""
    first, switched_off = _audit_actions(db, since)
    jobs, skipped = ratios.shed_commands(cfg, first)
    restore, _ = ratios.shed_commands(cfg, dict.fromkeys(switched_off, "outlet_off"))
    daemon.send_signal(signal.SIGTERM)  # it must not fight the floor over the rigs
    try:
        daemon.wait(60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    _say(s, f"daemon stopped; the command floor wakes and sheds {len(jobs)} rigs")
    got = ratios.measure_command_floor(jobs, restore)
    shed = got.get("sleep") or {}
    return {
        "floor_curtail_commands": len(jobs),
        "floor_curtail_skipped": skipped,  # commands with no floor (none on a full shed)
        "floor_curtail_acknowledged": shed.get("acknowledged"),
        "floor_curtail_errors": shed.get("errors") or got.get("error"),
        "floor_curtail_p50_s": shed.get("p50_s"),
        "floor_curtail_p99_s": shed.get("p99_s"),
        "floor_curtail_max_s": shed.get("max_s"),
        "floor_curtail_cpu_s": shed.get("cpu_s"),
        "floor_curtail": got,
    }


def _audit_sleeps(db: Path, since: float) -> tuple[list[float], int]:
    """Latencies of acknowledged sleeps since `since`, and how many sleeps failed."""
    rows = _audit_sheds(db, since, "rig_id, ts, result")
    ok: dict[str, float] = {}
    failed = 0
    for rig, ts, result in rows:
        if result == "ok":
            ok.setdefault(rig, ts - since)
        else:
            failed += 1
    return sorted(ok.values()), failed


async def _run(s: Settings, work: Path) -> dict[str, Any]:
    procs = _Procs()
    observer: _Observer | None = None
    watch: asyncio.Task[None] | None = None
    try:
        kp = generate("EdDSA")
        key_path, pub_path = write_keypair(kp, work / "op")
        from controller.adapters.grid.sign import load_private_key

        key, alg = load_private_key(key_path)
        port = _start_mosquitto(work, procs)
        broker = f"mqtt://127.0.0.1:{port}"
        t_start = time.monotonic()
        cfg = _start_farm(s, work, broker, pub_path, procs)
        farm_up_s = time.monotonic() - t_start
        sim_pid = procs.started[-1][1].pid
        sim_pids = [sim_pid, *proc.children(sim_pid)]  # its workers, when it has any
        rig_targets, pdu_targets = ratios.farm_targets(cfg)
        yardsticks: dict[str, Any] = {}
        if s.floors:
            _say(s, f"farm up in {farm_up_s:.1f} s; measuring the floors")
            yardsticks["floors"] = ratios.measure_floors(rig_targets, pdu_targets, s.floor_rounds)
        if s.pyasic:
            _say(s, "measuring pyasic on a sample of each dialect")
            yardsticks["pyasic"] = ratios.measure_pyasic(rig_targets)
        _say(s, f"farm up in {farm_up_s:.1f} s; starting the daemon")
        observer = _Observer(port, s.rigs)
        watch = asyncio.create_task(observer.run())
        await asyncio.wait_for(observer.ready.wait(), 10)
        daemon = _start_daemon(s, cfg, work, procs)
        observer.pid = daemon.pid
        # The daemon's start (its config and drivers) and its first full cycle (identities,
        # every PDU's outlet names) on a host the farm keeps busy: a deadline, not a figure.
        first_wait = 60 + s.rigs / 40
        await observer.wait_cycle(1, first_wait)
        last = s.warmup_cycles + s.cycles
        slowest = max([s.interval_s, *(c.poll_s for c in observer.cycles)])
        begin = await observer.wait_cycle(s.warmup_cycles, first_wait + 1.5 * slowest * 3)
        sim_cpu0 = proc.tree_cpu_s(sim_pids)
        _say(s, f"warm; measuring {s.cycles} cycles")
        spy = _start_profiler(s, daemon.pid, procs)
        # A busy host may overrun the interval: allow each cycle what the warm-up ones took
        # (the overruns are reported, not fatal).
        slowest = max([s.interval_s, *(c.poll_s for c in observer.cycles)])
        end = await observer.wait_cycle(last, 1.5 * slowest * (s.cycles + 3))
        sim_cpu1 = proc.tree_cpu_s(sim_pids)
        rss_steady = proc.rss_mb(daemon.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)
        if daemon.poll() is not None:
            raise BenchError(f"the daemon exited with {daemon.returncode}")
        steady = [c for c in observer.cycles if begin.cycle < c.cycle <= end.cycle]
        n_cycles = end.cycle - begin.cycle
        window_s = end.arrived - begin.arrived
        polls = [c.poll_s for c in steady]
        cpu = end.cpu_s - begin.cpu_s
        msgs, nbytes = end.msgs - begin.msgs, end.bytes - begin.bytes
        fully = sum(1 for c in steady if c.answered == s.rigs)

        # -- the grid order ---------------------------------------------------------------
        import_kw = end.import_kw or 0.0
        by_driver = {d: len(t) for d, t in rig_targets.items()}
        cap_kw = round(idle_floor_kw(s.rigs, by_driver) * 1.05, 1)
        when = end.ts + s.interval_s + s.order_phase_s  # into the next cycle's poll
        await asyncio.sleep(max(0.0, when - time.time()))
        msg = build(
            "curtail",
            SITE,
            order_id=f"bench-{uuid.uuid4().hex[:8]}",
            target={"max_import_kw": cap_kw},
            duration_s=600,
            respond_within_s=60,
        )
        token = sign(msg, key, alg, kid="op").encode()
        spy = _start_profiler(s, daemon.pid, procs, ".curtail")
        await asyncio.sleep(0.3 if spy is not None else 0.0)  # py-spy attaching
        assert observer.client is not None
        cpu_before = proc.cpu_s(daemon.pid), proc.tree_cpu_s(sim_pids)
        t_order = time.time()
        await observer.client.publish(f"rigd/{SITE}/grid/orders", token, qos=1)
        _say(s, f"order sent: cap {cap_kw} kW (import was {import_kw:.0f} kW)")
        meter_cfg = tomllib.loads(cfg.read_text())["meters"][0]
        meter = ModbusMeter("bench-meter", meter_cfg["host"], int(meter_cfg["port"]))
        metered = await _meter_under(meter, cap_kw, t_order, 60 + s.rigs / 200)
        with contextlib.suppress(Exception):
            await meter.close()
        db = work / "state" / "rigd.sqlite"
        deadline = time.time() + 60
        lat: list[float] = []
        failed = 0
        while time.time() < deadline:
            lat, failed = _audit_sleeps(db, t_order)
            if len(lat) + failed >= s.rigs:
                break
            await asyncio.sleep(0.5)
        cpu_after = proc.cpu_s(daemon.pid), proc.tree_cpu_s(sim_pids)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if daemon.poll() is not None:
            raise BenchError(f"the daemon exited with {daemon.returncode}: see its log")
        peak_rss = proc.peak_rss_mb(daemon.pid)
        rss_now = proc.rss_mb(daemon.pid)
        wall = time.time() - t_order
        floor_cmds: dict[str, Any] = {}
        if s.command_floor:
            floor_cmds = _command_floor(s, cfg, db, t_order, daemon)
        overruns = 0
        accepted_log = None
        first_command: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            for line in (work / "daemon.log").read_text().splitlines():
                if '"poll_overrun"' in line:
                    overruns += 1
                elif '"grid_order_accepted"' in line and accepted_log is None:
                    accepted_log = json.loads(line).get("timestamp")
                elif '"grid_order_first_command"' in line and not first_command:
                    first_command = json.loads(line)
        result: dict[str, Any] = {
            "rigs": s.rigs,
            "pdus": s.pdus,
            "mix": s.mix,
            "interval_s": s.interval_s,
            "cycles_measured": n_cycles,
            "cycles_fully_polled": fully,
            "poll_cycle_p50_s": round(statistics.median(polls), 3),
            "poll_cycle_p99_s": round(percentile(polls, 99), 3),
            "poll_cycle_max_s": round(max(polls), 3),
            "polls_per_s": round(s.rigs / statistics.median(polls), 1),
            "poll_overruns": overruns,
            "daemon_cpu_s_per_cycle": round(cpu / n_cycles, 3),
            "daemon_cpu_cores_avg": round(cpu / window_s, 3),
            "daemon_cpu_us_per_rig_poll": round(cpu / n_cycles / s.rigs * 1e6, 1),
            "daemon_peak_rss_mb": round(peak_rss, 1),
            "daemon_rss_mb_steady": round(rss_steady, 1),
            "daemon_rss_mb_at_end": round(rss_now, 1),
            "sim_processes": len(sim_pids),
            "sim_cpu_cores_avg": round((sim_cpu1 - sim_cpu0) / window_s, 3),
            "mqtt_msgs_per_cycle": round(msgs / n_cycles, 1),
            "mqtt_msgs_per_s": round(msgs / window_s, 1),
            "mqtt_bytes_per_cycle": round(nbytes / n_cycles),
            "order_cap_kw": cap_kw,
            "import_before_order_kw": import_kw,
            "order_phase_s": s.order_phase_s,
            "curtail_rigs_commanded": len(lat) + failed,
            "curtail_rigs_acknowledged": len(lat),
            "curtail_failed": failed,
            "curtail_commanded_first_s": round(min(lat), 3) if lat else math.nan,
            # The first command leaving, from just before the order was published
            "curtail_first_send_s": round(
                first_command["arrived_at"] + first_command["first_send"] / 1000.0 - t_order, 4
            )
            if "arrived_at" in first_command and "first_send" in first_command
            else math.nan,
            "curtail_commanded_p50_s": round(percentile(lat, 50), 3),
            "curtail_commanded_p99_s": round(percentile(lat, 99), 3),
            "curtail_commanded_max_s": round(max(lat), 3) if lat else math.nan,
            "curtail_metered_s": round(metered, 3),
            "order_accepted_log_ts": accepted_log,
            # The daemon's own marks, ms from the order's arrival (controller/runtime/timeline.py)
            "curtail_first_breakdown_ms": {
                k: first_command[k] for k in FIRST_COMMAND_MARKS if k in first_command
            },
            # The daemon's CPU at the same marks: its own work, without the waits for a core
            "curtail_first_breakdown_cpu_ms": first_command.get("cpu_ms", {}),
            # CPU from the order until the check above saw every sleep (it polls every 0.5 s)
            "curtail_daemon_cpu_s": round(cpu_after[0] - cpu_before[0], 2),
            "curtail_sim_cpu_s": round(cpu_after[1] - cpu_before[1], 2),
            "curtail_wall_s": round(wall, 2),
            "farm_start_s": round(farm_up_s, 1),
            "rigs_by_driver": {d: len(t) for d, t in rig_targets.items()},
            **yardsticks,
            **floor_cmds,
        }
        return result
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await watch
        procs.stop_all()


def run(s: Settings) -> dict[str, Any]:
    """Run one farm size; the result document (see the module docstring)."""
    proc.raise_open_files()
    if s.workdir is not None:
        s.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_run(s, s.workdir))
    with tempfile.TemporaryDirectory(prefix=f"rigd-bench-{s.rigs}-") as tmp:
        return asyncio.run(_run(s, Path(tmp)))
