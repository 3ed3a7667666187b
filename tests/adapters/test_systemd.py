"""rigd as a systemd service: sd_notify, the watchdog, reload, credentials and the unit file.

systemd itself is not running here, so the tests play its part over the same interfaces: a
Unix datagram socket named by NOTIFY_SOCKET, WATCHDOG_USEC, a CREDENTIALS_DIRECTORY, SIGHUP
and SIGTERM, against a real `rigd run` process, a simulated farm and a real mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from pydantic import BaseModel, BeforeValidator
from structlog.testing import capture_logs

from controller.adapters.sdnotify import (
    Notifier,
    ServiceNotifications,
    Watchdog,
    next_cycle_within_s,
    status_line,
)
from controller.config import Config, ConfigError, load_config, parse_config
from controller.config.credentials import (
    Credentials,
    file_or_credential,
    reference,
    secret_or_credential,
)
from controller.core.status import CycleResult
from controller.runtime.daemon import Daemon
from simulators.clock import ManualClock
from simulators.site import SimSite
from tests.conftest import Mosquitto

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "systemd" / "rigd.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# Measured with systemd 252 (Debian 12): 1.2. The README quotes it; a unit that loses a
# protection fails here.
MAX_EXPOSURE = 1.2

Message = dict[str, str]


# -- a stand-in for systemd's notification socket -------------------------------------------


class NotifySocket:
    """systemd's end of sd_notify: a bound Unix datagram socket keeping every message."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET names it: a path, or "@name"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[Message] = []
        self._seen = 0  # messages already matched by `expect`
        # The process that should be talking, and its log: a failure says why it went quiet.
        self.sender: tuple[asyncio.subprocess.Process, Path] | None = None

    def close(self) -> None:
        self.sock.close()

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(fields)

    async def expect(self, pred: Callable[[Message], bool], within: float = 20.0) -> Message:
        """The next message (after the last one expected) that satisfies `pred`."""
        deadline = time.monotonic() + within
        while True:
            self._drain()
            for i in range(self._seen, len(self.messages)):
                if pred(self.messages[i]):
                    self._seen = i + 1
                    return self.messages[i]
            quit_ = self.sender is not None and self.sender[0].returncode is not None
            if quit_ or time.monotonic() > deadline:
                tail = self.messages[self._seen :][-5:]
                log = self.sender[1].read_text()[-3000:] if self.sender else ""
                raise AssertionError(
                    f"no such sd_notify message ({'rigd exited' if quit_ else f'{within} s'}); "
                    f"last: {tail}\n{log}"
                )
            await asyncio.sleep(0.02)

    def since(self, start: int) -> list[Message]:
        self._drain()
        return self.messages[start:]


def _cycle(msg: Message) -> int:
    m = re.match(r"cycle (\d+):", msg.get("STATUS", ""))
    return int(m.group(1)) if m else -1


# -- sd_notify: the protocol ------------------------------------------------------------------


def test_notifier_sends_to_a_socket_path_and_to_an_abstract_socket(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify"), f"@rigd-test-{uuid.uuid4().hex}"):
        ns = NotifySocket(address)
        try:
            n = Notifier.from_environ({"NOTIFY_SOCKET": address})
            assert n.enabled and n.watchdog_s is None
            assert n.send("READY=1", "STATUS=two\nlines")
            ns._drain()
            assert ns.messages == [{"READY": "1", "STATUS": "two lines"}]
            n.close()
        finally:
            ns.close()


def test_notifier_reads_the_watchdog_and_does_nothing_outside_systemd(tmp_path: Path) -> None:
    sock = str(tmp_path / "notify")
    me, other = str(os.getpid()), str(os.getpid() + 1)
    assert (
        Notifier.from_environ({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "60000000"}).watchdog_s == 60
    )
    with_pid = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "2500000", "WATCHDOG_PID": me}
    assert Notifier.from_environ(with_pid).watchdog_s == 2.5
    # The watchdog belongs to another process (we inherited its environment): not ours to feed.
    assert Notifier.from_environ({**with_pid, "WATCHDOG_PID": other}).watchdog_s is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "x"}).watchdog_s is None
    # No NOTIFY_SOCKET: nothing is sent and no watchdog is fed, whatever else is set.
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_s is None and not n.send("READY=1")
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_a_vanished_notify_socket_never_raises(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone"))
    assert n.send("WATCHDOG=1") is False  # logged once; the farm's control goes on
    assert n.send("WATCHDOG=1") is False


# -- the watchdog: fed by progress only -------------------------------------------------------


def test_watchdog_is_fed_only_while_cycles_complete_and_triggers_once_when_they_stop() -> None:
    wd = Watchdog()
    assert wd.tick(0.0) is None  # before the first cycle: start-up has its own timeout
    wd.progress(0.0, within_s=40.0)
    assert [wd.tick(t) for t in (10.0, 20.0, 39.9, 40.0)] == ["WATCHDOG=1"] * 4
    # No cycle since: the loop is stuck. Ask systemd for the restart once, then stay silent.
    assert wd.tick(40.1) == "WATCHDOG=trigger"
    assert [wd.tick(t) for t in (50.0, 100.0, 1000.0)] == [None, None, None]
    assert wd.overdue_s(100.0) == pytest.approx(60.0)
    # A cycle completes again (systemd did not restart us, e.g. no WatchdogSec): fed again.
    wd.progress(1000.0, within_s=40.0)
    assert wd.tick(1001.0) == "WATCHDOG=1"
    assert wd.tick(1041.0) == "WATCHDOG=trigger"


def test_the_promised_next_cycle_covers_a_cycle_of_silent_devices() -> None:
    cfg = parse_config('[site]\nid = "s"\n[poll]\ninterval_s = 10\ntimeout_s = 3\n', environ={})
    # 10 s wait + one batch of reads each cut off at 3 x 2 + 2 s + 30 s slack
    assert next_cycle_within_s(cfg, devices=100) == pytest.approx(10 + 8 + 30)
    # 1000 devices, 256 at a time: four batches of silent reads
    assert next_cycle_within_s(cfg, devices=1000) == pytest.approx(10 + 4 * 8 + 30)
    long = parse_config('[site]\nid = "s"\n[poll]\ninterval_s = 600\n', environ={})
    assert next_cycle_within_s(long, devices=10) == pytest.approx(600 + 8 + 30)


def test_status_line_says_import_cap_rigs_and_broker() -> None:
    doc: dict[str, Any] = {
        "cycle": 42,
        "import_kw": 342.117,
        "cap_kw": 372.0,
        "cap_source": "schedule",
        "rigs": {"mining": 96, "waking": 0, "sleeping": 2, "off": 1, "unreachable": 1},
    }
    assert status_line(doc, True) == (
        "cycle 42: import 342.1 kW of cap 372.0 kW (schedule); "
        "rigs: 96 mining, 2 sleeping, 1 off, 1 unreachable; MQTT connected"
    )
    doc.update(import_kw=None, cap_kw=None, cap_source=None)
    assert status_line(doc, False).startswith(
        "cycle 42: import unknown (no meter), monitoring only; rigs: 96 mining"
    )
    assert status_line(doc, False).endswith("; MQTT disconnected")


async def test_a_stalled_loop_stops_feeding_and_asks_for_a_restart(tmp_path: Path) -> None:
    """A real daemon whose cycle hangs on an await: the keep-alives stop, one WATCHDOG=trigger
    is sent, and the log says where the loop waits."""
    ns = NotifySocket(str(tmp_path / "notify"))
    async with SimSite(rigs=3, pdus=1) as site:
        text = site.config_toml(
            broker_url="mqtt://127.0.0.1:9", state_dir=tmp_path / "state", interval_s=0.3
        )
        daemon = Daemon(parse_config(text, environ={}))
        notify = ServiceNotifications(Notifier(ns.address, watchdog_s=0.4), daemon, slack_s=0.2)
        daemon.on_snapshot = notify.on_cycle
        within = next_cycle_within_s(daemon.cfg, 5, 0.2)
        hang, poll = asyncio.Event(), daemon.poll_cycle

        async def poll_or_hang(**kw: Any) -> Any:
            if daemon.state.cycle >= 3:
                await hang.wait()  # an await that never returns
            return await poll(**kw)

        daemon.poll_cycle = poll_or_hang  # type: ignore[method-assign]
        stop = asyncio.Event()
        with capture_logs() as logs:
            tasks = [asyncio.create_task(daemon.run(stop)), asyncio.create_task(notify.run(stop))]
            try:
                ready = await ns.expect(lambda m: m.get("READY") == "1")
                assert _cycle(ready) == 1
                await ns.expect(lambda m: _cycle(m) == 3)
                t_last = time.monotonic()
                trigger = await ns.expect(lambda m: m.get("WATCHDOG") == "trigger", within=15)
                waited = time.monotonic() - t_last
                # Not before the promise is broken (the upper bound only catches "never").
                assert within - 0.5 < waited < within + 5.0, (waited, within)
                assert "stalled" in trigger["STATUS"]
                start = len(ns.messages)
                await asyncio.sleep(0.6)  # a period and more: nothing feeds a stuck loop
                assert not [m for m in ns.since(start) if "WATCHDOG" in m]
                hang.set()  # the await returns: cycles, and keep-alives, resume
                await ns.expect(lambda m: m.get("WATCHDOG") == "1" and _cycle(m) == 4)
            finally:
                stop.set()
                hang.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 15)
                ns.close()
    starved = [e for e in logs if e["event"] == "watchdog_starved"]
    assert len(starved) == 1
    assert any("poll_or_hang" in w for w in starved[0]["waiting"]), starved[0]["waiting"]


async def test_a_reload_that_shortens_the_interval_paces_cycles_and_feeds_the_watchdog(
    tmp_path: Path,
) -> None:
    """poll.interval_s 60 s reloaded to 10 s: cycles come every 10 s from then on, and each
    comes while the watchdog's promise (made on the current config) still holds. On the
    daemon's virtual clock, so that minutes of farm time take a moment."""
    clock = ManualClock()
    async with SimSite(rigs=3, pdus=1) as site:
        path = tmp_path / "rigd.toml"
        text = site.config_toml(
            broker_url="mqtt://127.0.0.1:9",
            state_dir=tmp_path / "state",
            interval_s=60,
            timeout_s=0.5,
            retries=0,
        )
        # No rescans: the only sleeps on the virtual clock are the loop's own.
        text = text.replace("[poll]\n", "[poll]\ndiscover_interval_s = 0\n")
        path.write_text(text)
        daemon = Daemon(parse_config(text, environ={}), clock=clock, config_path=str(path))
        notify = ServiceNotifications(Notifier(None), daemon, monotonic=clock.monotonic)
        stop = asyncio.Event()
        seen: list[tuple[float, str | None]] = []  # each cycle: when, what the feeder sends

        async def on_cycle(result: CycleResult) -> None:
            now = clock.monotonic()
            seen.append((now, notify.watchdog.tick(now)))
            notify.on_cycle(result)
            if len(seen) == 3:  # systemctl reload, between two cycles
                path.write_text(text.replace("interval_s = 60", "interval_s = 10"))
                await daemon.reload()
            if len(seen) == 8:
                stop.set()

        daemon.on_snapshot = on_cycle
        await asyncio.wait_for(daemon.run(stop), 60)
    gaps = [round(b[0] - a[0], 6) for a, b in itertools.pairwise(seen)]
    assert gaps == [60.0, 60.0] + [10.0] * 5, gaps
    # Within its promise every time: the feeder never asks systemd for a restart.
    assert [msg for _, msg in seen] == [None] + ["WATCHDOG=1"] * 7


def _start_config(site: SimSite, tmp_path: Path, concurrency: int) -> str:
    text = site.config_toml(
        broker_url="mqtt://127.0.0.1:9",
        state_dir=tmp_path / "state",
        interval_s=10,
        timeout_s=3,
        retries=1,
    )
    return text.replace("[poll]\n", f"[poll]\nconcurrency = {concurrency}\n")


async def test_start_up_asks_systemd_to_wait_for_the_first_cycles_worst_case(
    tmp_path: Path,
) -> None:
    """READY=1 comes after the first cycle, which on a fleet still booting (every device
    silent) outlasts TimeoutStartSec: systemd is given EXTEND_TIMEOUT_USEC for that cycle's
    worst case at start, again if the worst case grows before READY=1, never after it."""
    ns = NotifySocket(str(tmp_path / "notify"))
    t = [1000.0]
    try:
        async with SimSite(rigs=6, pdus=1) as site:
            path = tmp_path / "rigd.toml"
            path.write_text(_start_config(site, tmp_path, concurrency=2))
            cfg = parse_config(path.read_text(), environ={})
            daemon = Daemon(cfg, clock=ManualClock(), config_path=str(path))
            notifier = Notifier(ns.address, watchdog_s=0.4)  # looked at every 0.1 s
            notify = ServiceNotifications(notifier, daemon, monotonic=lambda: t[0])
            notify.starting()
            # 8 devices, 2 at a time: 4 batches of reads cut off at 3 s x 2 + 2 s, + 30 s.
            first = await ns.expect(lambda m: "STATUS" in m)
            assert first == {
                "STATUS": "starting: first poll of 8 devices",
                "EXTEND_TIMEOUT_USEC": str((4 * 8 + 30) * 1_000_000),
            }
            stop = asyncio.Event()
            feeding = asyncio.create_task(notify.run(stop))
            try:
                start = len(ns.messages)
                await asyncio.sleep(0.35)
                assert ns.since(start) == [], "the deadline stands: nothing to send again"
                # Before the first cycle the worst case grows (a reload: 1 device at a time):
                # the start-up deadline moves out, counted from the start, not from now.
                path.write_text(_start_config(site, tmp_path, concurrency=1))
                await daemon.reload()
                t[0] += 10.0
                again = await ns.expect(lambda m: "EXTEND_TIMEOUT_USEC" in m, within=5)
                assert again == {"EXTEND_TIMEOUT_USEC": str((8 * 8 + 30 - 10) * 1_000_000)}
                notify.on_cycle(await daemon.cycle())
                ready = await ns.expect(lambda m: m.get("READY") == "1")
                assert _cycle(ready) == 1
                # Started: no more extensions, whatever changes.
                path.write_text(_start_config(site, tmp_path, concurrency=2))
                await daemon.reload()
                path.write_text(_start_config(site, tmp_path, concurrency=1))
                await daemon.reload()
                start = len(ns.messages)
                await asyncio.sleep(0.35)
                assert not [m for m in ns.since(start) if "EXTEND_TIMEOUT_USEC" in m]
            finally:
                stop.set()
                await asyncio.wait_for(feeding, 10)
                await daemon.devices.close()
    finally:
        ns.close()


async def test_a_ready_that_could_not_be_sent_goes_with_the_next_cycle(tmp_path: Path) -> None:
    """systemd busy (its socket's queue full: EAGAIN) when READY=1 is due: the next cycle
    sends it, since systemd would otherwise keep rigd "activating" until its start timeout."""
    ns = NotifySocket(str(tmp_path / "notify"))
    try:
        async with SimSite(rigs=2, pdus=1) as site:
            text = site.config_toml(broker_url="mqtt://127.0.0.1:9", state_dir=tmp_path / "s")
            daemon = Daemon(parse_config(text, environ={}))
            notifier = Notifier(ns.address)
            notify = ServiceNotifications(notifier, daemon)
            try:
                for _ in range(100_000):  # fill systemd's queue
                    if not notifier.send("STATUS=filler"):
                        break
                else:
                    raise AssertionError("the notify socket's queue never filled")
                notify.on_cycle(await daemon.cycle())  # READY=1 lost: EAGAIN
                ns._drain()  # systemd catches up
                start = len(ns.messages)
                for _ in range(2):
                    notify.on_cycle(await daemon.cycle())
                got = [m for m in ns.since(start) if "cycle" in m.get("STATUS", "")]
                assert [(m.get("READY"), _cycle(m)) for m in got] == [("1", 2), (None, 3)]
            finally:
                await daemon.devices.close()
    finally:
        ns.close()


# -- credentials --------------------------------------------------------------------------------


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The config's models, found through its fields' types."""
    found: list[type[BaseModel]] = []

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in found:
                found.append(tp)
                for f in tp.model_fields.values():
                    walk(f.annotation)
        else:
            for arg in typing.get_args(tp):
                walk(arg)

    walk(model)
    return found


def test_every_secret_setting_accepts_a_credential() -> None:
    secrets, files = [], []
    for m in _models(Config):
        for name, f in m.model_fields.items():
            funcs = {v.func for v in f.metadata if isinstance(v, BeforeValidator)}
            if "SecretStr" in str(f.annotation):
                assert secret_or_credential in funcs, f"{m.__name__}.{name} takes no credential"
                secrets.append(f"{m.__name__}.{name}")
            if file_or_credential in funcs:
                files.append(f"{m.__name__}.{name}")
    assert sorted(secrets) == [
        "MinerConfig.password",
        "MqttConfig.password",
        "PduConfig.auth_key",
        "PduConfig.community",
        "PduConfig.priv_key",
        "PduConfig.write_community",
    ]
    assert sorted(files) == [
        "GridKeyConfig.public_key_file",
        "MqttConfig.ca_file",
        "MqttConfig.cert_file",
        "MqttConfig.key_file",
    ]


ALL_CREDENTIALS = """
[site]
id = "s"
[mqtt]
url = "mqtts://127.0.0.1:8883"
username = "rigd"
password = { credential = "mqtt-password" }
ca_file = { credential = "broker-ca" }
cert_file = { credential = "client-cert" }
key_file = { credential = "client-key" }
[[pdus]]
id = "p1"
host = "127.0.0.1"
community = { credential = "pdu-read" }
write_community = { credential = "pdu-write" }
[[pdus]]
id = "p2"
host = "127.0.0.2"
snmp_version = "3"
user = "rigd"
auth_key = { credential = "pdu-auth" }
priv_key = { credential = "pdu-priv" }
[[miners]]
id = "r1"
host = "127.0.0.1"
password = { credential = "miner-password" }
"""

SECRET_NAMES = ("mqtt-password", "pdu-read", "pdu-write", "pdu-auth", "pdu-priv", "miner-password")
FILE_NAMES = ("broker-ca", "client-cert", "client-key")


def _credentials_dir(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    for name in SECRET_NAMES:
        (d / name).write_text(f"S3cret-{name}\n")  # `echo secret > file` leaves a newline
    for name in FILE_NAMES:
        (d / name).write_text(f"-----BEGIN {name}-----\n")
    return d


def test_credentials_resolve_for_every_secret_and_file(tmp_path: Path) -> None:
    creds = _credentials_dir(tmp_path / "creds")
    cfg = parse_config(ALL_CREDENTIALS, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == "S3cret-mqtt-password"
    p1, p2 = cfg.pdus
    assert p1.community.get_secret_value() == "S3cret-pdu-read"
    assert p1.write_community and p1.write_community.get_secret_value() == "S3cret-pdu-write"
    assert p2.auth_key and p2.auth_key.get_secret_value() == "S3cret-pdu-auth"
    assert p2.priv_key and p2.priv_key.get_secret_value() == "S3cret-pdu-priv"
    assert cfg.miners[0].password
    assert cfg.miners[0].password.get_secret_value() == "S3cret-miner-password"
    assert (cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file) == tuple(
        creds / n for n in FILE_NAMES
    )
    assert "S3cret" not in repr(cfg)  # secrets stay out of reprs, and so out of logs
    # An explicit directory wins over the environment's (`check-config --credentials-dir`).
    again = parse_config(ALL_CREDENTIALS, environ={}, credentials=Credentials(creds))
    assert again == cfg


def test_a_credential_can_come_through_an_environment_override(tmp_path: Path) -> None:
    creds = _credentials_dir(tmp_path / "creds")
    env = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "RIGD_MQTT__PASSWORD": '{ credential = "mqtt-password" }',
    }
    cfg = parse_config('[site]\nid = "s"\n', environ=env)
    assert cfg.mqtt.password and cfg.mqtt.password.get_secret_value() == "S3cret-mqtt-password"


def _problems(text: str, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, **kw)
    return [str(i) for i in e.value.issues]


def test_credential_errors_name_the_setting_its_line_and_the_credential(tmp_path: Path) -> None:
    creds = _credentials_dir(tmp_path / "creds")
    (creds / "pdu-write").unlink()
    (creds / "pdu-read").write_text("\n")
    (creds / "miner-password").write_bytes(b"\xff\xfe")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    problems = _problems(ALL_CREDENTIALS, source="rigd.toml", environ=env)
    assert problems == [
        "rigd.toml:14: pdus[0].community: credential 'pdu-read' is empty",
        f"rigd.toml:15: pdus[0].write_community: credential 'pdu-write' not found in {creds} "
        "(the unit needs LoadCredential=pdu-write:FILE)",
        "rigd.toml:26: miners[0].password: credential 'miner-password' is not UTF-8 text",
    ]
    # Outside systemd: every reference says what is missing and how to check it anyway.
    outside = _problems(ALL_CREDENTIALS, source="rigd.toml", environ={})
    assert len(outside) == len(SECRET_NAMES) + len(FILE_NAMES)
    assert outside[0].startswith(
        "rigd.toml:7: mqtt.password: credential 'mqtt-password': $CREDENTIALS_DIRECTORY is not set"
    )
    assert all("--credentials-dir" in p for p in outside)
    # Malformed references.
    base = '[site]\nid = "s"\n[mqtt]\npassword = '
    assert _problems(base + '{ credential = "../../etc/shadow" }', environ=env) == [
        "<config>:4: mqtt.password: bad credential name '../../etc/shadow': use letters, "
        "digits, '_', '.', '@' and '-'"
    ]
    assert _problems(base + '{ credentials = "x" }', environ=env) == [
        "<config>:4: mqtt.password: give a value, or a systemd credential as "
        '{ credential = "NAME" }'
    ]
    # A table on a setting that is not a secret is not a credential reference.
    assert (
        "mqtt.username" in _problems('[site]\nid = "s"\n[mqtt]\nusername = { credential = "u" }')[0]
    )


def test_a_credential_name_is_one_load_credential_can_pass(tmp_path: Path) -> None:
    """`LoadCredential=a:b:FILE` passes a credential named `a`: a name with ':' can never
    arrive, and neither can one with a newline (a `$`-anchored match lets one through)."""
    creds = _credentials_dir(tmp_path / "creds")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    base = '[site]\nid = "s"\n[mqtt]\npassword = '
    for bad in ("mqtt:password", "mqtt-password\\n", ".mqtt-password", "-x", ""):
        problems = _problems(base + f'{{ credential = "{bad}" }}', environ=env)
        assert len(problems) == 1 and "bad credential name" in problems[0], (bad, problems)
    with pytest.raises(ValueError, match="bad credential name 'mqtt-password\\\\n'"):
        reference({"credential": "mqtt-password\n"})
    assert reference({"credential": "rigd@site_2.mqtt-password"}) == "rigd@site_2.mqtt-password"
    cfg = parse_config(base + '{ credential = "mqtt-password" }', environ=env)
    assert cfg.mqtt.password and cfg.mqtt.password.get_secret_value() == "S3cret-mqtt-password"


def test_no_secret_reaches_an_error_message(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pdu-read").write_text("TopSecret-4711")
    # The rest of the config is wrong: the errors name places, never the secret read.
    text = '[site]\nid = "s"\n[[pdus]]\nid = "p"\nhost = "h"\nport = 0\n'
    text += 'community = { credential = "pdu-read" }\nsnmp_version = "3"\n'
    problems = _problems(text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert problems and not [p for p in problems if "TopSecret" in p]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli.rigd", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
    )


def test_check_config_and_run_with_and_without_the_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "rigd.toml"
    cfg.write_text(ALL_CREDENTIALS)
    creds = _credentials_dir(tmp_path / "creds")
    # Outside systemd: everything else is checked, and the report says what was not read.
    r = _cli("check-config", "-c", str(cfg))
    assert r.returncode == 0, r.stdout
    assert "credentials: 9 referenced, not read: mqtt-password, broker-ca" in r.stdout
    assert "give --credentials-dir DIR to check them" in r.stdout
    # With the directory, they are read: all there.
    r = _cli("check-config", "-c", str(cfg), "--credentials-dir", str(creds))
    assert r.returncode == 0, r.stdout
    assert f"credentials: 9 read from {creds}: mqtt-password" in r.stdout
    assert "S3cret" not in r.stdout + r.stderr
    # As under systemd, from $CREDENTIALS_DIRECTORY; one missing is named with its setting.
    (creds / "pdu-auth").unlink()
    r = _cli("check-config", "-c", str(cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 1
    assert f"{cfg}:21: pdus[1].auth_key: credential 'pdu-auth' not found in {creds}" in r.stdout
    assert "S3cret" not in r.stdout + r.stderr
    # `rigd run` refuses to start without its credentials: 78, which the unit does not restart.
    r = _cli("run", "-c", str(cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 78
    assert "pdus[1].auth_key: credential 'pdu-auth' not found" in r.stderr


def test_rigctl_finds_the_socket_without_reading_rigd_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "rigd.toml"
    sock = tmp_path / "nobody-here.sock"
    cfg.write_text(ALL_CREDENTIALS + f'[admin]\nsocket = "{sock}"\n')
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli.rigctl", "-c", str(cfg), "status"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 2  # no daemon: cannot be reached
    assert str(sock) in r.stderr and "has errors" not in r.stderr


# -- a real `rigd run` under a stand-in systemd ----------------------------------------------


def _passwd_broker(tmp_path: Path, password: str) -> Mosquitto:
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "rigd", password], check=True)
    return Mosquitto(tmp_path, listener=f"password_file {tmp_path / 'passwd'}")


def _site_config(site: SimSite, broker: Mosquitto, state: Path, cap_kw: float) -> str:
    """The simulated farm's config, its secrets as credentials (as on a production host)."""
    text = site.config_toml(
        broker_url=broker.url,
        state_dir=state,
        interval_s=1.0,
        extra=f"[control]\nmax_import_kw = {cap_kw:g}\n",
    )
    text = text.replace('community = "public"', 'community = { credential = "pdu-read" }')
    text = text.replace(
        'write_community = "private"', 'write_community = { credential = "pdu-write" }'
    )
    return text.replace(
        "[mqtt]\n", '[mqtt]\nusername = "rigd"\npassword = { credential = "mqtt-password" }\n'
    )


@contextlib.asynccontextmanager
async def _rigd_run(
    cfg: Path, env: dict[str, str], log: Path, preexec: Callable[[], None] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as err:  # a file, not a pipe: a full pipe would stall the daemon
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.cli.rigd",
            "run",
            "-c",
            str(cfg),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stderr=err,
            preexec_fn=preexec,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _pdu_states(broker: Mosquitto, password: str) -> dict[str, Any]:
    """The retained PDU documents, read as any subscriber with the broker's password would."""
    out: dict[str, Any] = {}
    async with aiomqtt.Client(
        broker.host, broker.port, username="rigd", password=password, identifier="t-pdus"
    ) as c:
        await c.subscribe("rigd/sim/pdus/+/state", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    out[str(msg.topic)] = json.loads(msg.payload)
                    if len(out) == 2:
                        break
    return out


async def test_rigd_run_talks_to_systemd_and_reloads_without_losing_state(tmp_path: Path) -> None:
    secret = f"S3cret-{uuid.uuid4().hex[:8]}"
    broker = _passwd_broker(tmp_path, secret)
    broker.start()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text(secret + "\n")
    (creds / "pdu-read").write_text("public")
    (creds / "pdu-write").write_text("private")
    ns = NotifySocket(str(tmp_path / "notify"))
    cfg, log = tmp_path / "rigd.toml", tmp_path / "rigd.log"
    env = {
        "NOTIFY_SOCKET": ns.address,
        "WATCHDOG_USEC": "1000000",  # fed every 0.25 s and after each cycle
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    try:
        async with SimSite(rigs=6, pdus=2) as site:
            cfg.write_text(_site_config(site, broker, tmp_path / "state", cap_kw=500))
            async with _rigd_run(cfg, env, log) as proc:
                ns.sender = (proc, log)
                starting = await ns.expect(lambda m: "STATUS" in m)
                assert starting["STATUS"] == "starting: first poll of 9 devices"
                # systemd waits for the first cycle's worst case: at least the 30 s slack.
                assert int(starting["EXTEND_TIMEOUT_USEC"]) > 30_000_000
                # Started means controlled: READY=1 comes with the first cycle's status.
                ready = await ns.expect(lambda m: m.get("READY") == "1")
                assert _cycle(ready) == 1, ready
                assert "of cap 500.0 kW (max_import)" in ready["STATUS"]
                assert "rigs: 6 mining" in ready["STATUS"]
                # The broker took the password from the credential.
                await ns.expect(lambda m: "MQTT connected" in m.get("STATUS", ""))
                start = len(ns.messages)
                await asyncio.sleep(1.5)
                fed = [m for m in ns.since(start) if m.get("WATCHDOG") == "1"]
                assert len(fed) >= 3, ns.since(start)
                # And the PDUs answered to the communities from the credentials.
                pdus = await _pdu_states(broker, secret)
                assert sorted(pdus) == ["rigd/sim/pdus/pdu-01/state", "rigd/sim/pdus/pdu-02/state"]
                assert all(d["health"]["reachable"] for d in pdus.values()), pdus

                # systemctl reload: a new cap, applied between two cycles, state kept.
                before = _cycle(await ns.expect(lambda m: _cycle(m) > 0))
                cfg.write_text(_site_config(site, broker, tmp_path / "state", cap_kw=400))
                proc.send_signal(signal.SIGHUP)
                reloading = await ns.expect(lambda m: m.get("RELOADING") == "1")
                usec = int(reloading["MONOTONIC_USEC"])  # CLOCK_MONOTONIC, shared by processes
                assert abs(usec - time.monotonic_ns() // 1000) < 10_000_000
                done = await ns.expect(lambda m: m.get("READY") == "1")
                assert done["STATUS"] == "config reloaded"
                after = await ns.expect(lambda m: "of cap 400.0 kW" in m.get("STATUS", ""))
                assert _cycle(after) > before  # the cycle count goes on: not a restart

                # A config that does not validate is refused; the running one stays in force.
                cfg.write_text(cfg.read_text().replace("max_import_kw = 400", "max_import_kw = -5"))
                proc.send_signal(signal.SIGHUP)
                await ns.expect(lambda m: m.get("RELOADING") == "1")
                refused = await ns.expect(lambda m: m.get("READY") == "1")
                assert refused["STATUS"].startswith("config reload refused, running on the prev")
                later = [await ns.expect(lambda m: _cycle(m) > 0) for _ in range(2)]
                for m in later:
                    assert "of cap 400.0 kW" in m["STATUS"]
                    assert m["STATUS"].endswith("; last reload refused (1 problem)")
                assert _cycle(later[0]) > _cycle(after) and proc.returncode is None

                # systemctl stop
                proc.send_signal(signal.SIGTERM)
                await ns.expect(lambda m: m.get("STOPPING") == "1")
                assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        ns.close()
        broker.stop()
    text = log.read_text()
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    assert "config_reloaded" in events and "config_reload_refused" in events
    assert "rigd_stopped" in events
    assert secret not in text  # the broker password never reaches the journal


async def test_a_reload_that_fails_otherwise_than_on_the_config_is_reported_failed(
    tmp_path: Path,
) -> None:
    """A reload can fail past the config check: here the state database holds control state
    the new controller cannot read (StoreError). rigd runs on, logs it, and tells systemd
    the reload was refused, never "config reloaded"."""
    ns = NotifySocket(str(tmp_path / "notify"))
    cfg, log, state = tmp_path / "rigd.toml", tmp_path / "rigd.log", tmp_path / "state"
    try:
        async with SimSite(rigs=3, pdus=1) as site:
            cfg.write_text(
                site.config_toml(
                    broker_url="mqtt://127.0.0.1:9",
                    state_dir=state,
                    interval_s=0.5,
                    extra="[control]\nmax_import_kw = 500\n",
                )
            )
            async with _rigd_run(cfg, {"NOTIFY_SOCKET": ns.address}, log) as proc:
                ns.sender = (proc, log)
                await ns.expect(lambda m: m.get("READY") == "1")
                # Holds as another rigd version wrote them, put in while rigd runs.
                with sqlite3.connect(state / "rigd.sqlite") as db:
                    db.execute(
                        "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                        ("control.maintenance", '{"rig-001": {"why": "fans", "until": 1}}'),
                    )
                proc.send_signal(signal.SIGHUP)
                await ns.expect(lambda m: m.get("RELOADING") == "1")
                done = await ns.expect(lambda m: m.get("READY") == "1")
                assert done["STATUS"].startswith("config reload refused"), done
                later = await ns.expect(lambda m: _cycle(m) > 0)
                assert later["STATUS"].endswith("; last reload refused (1 problem)"), later
                await ns.expect(lambda m: _cycle(m) > _cycle(later))  # control goes on
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        ns.close()
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    failed = [e for e in logged if e["event"] == "config_reload_failed"]
    assert len(failed) == 1 and "cannot read" in failed[0]["error"], failed
    assert "config_reloaded" not in [e["event"] for e in logged]


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _deny_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes asks of rigd, enforced by the kernel (Linux 6.3+) on
    this process and what it executes: no memory both writable and executable."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _mdwe_supported() -> bool:
    probe = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # PROT_READ | PROT_WRITE | PROT_EXEC
    try:
        r = subprocess.run(
            [sys.executable, "-c", probe], preexec_fn=_deny_write_execute, capture_output=True
        )
    except subprocess.SubprocessError:
        return False  # the kernel has no PR_SET_MDWE
    return r.returncode != 0 and b"PermissionError" in r.stderr


async def test_rigd_runs_with_memory_deny_write_execute(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The unit's MemoryDenyWriteExecute=yes: CPython and rigd's libraries (pydantic-core,
    cryptography, pysnmp, paho) run a farm without writable executable memory."""
    if not _mdwe_supported():
        pytest.skip("this kernel cannot deny write+execute memory (PR_SET_MDWE, Linux 6.3+)")
    ns = NotifySocket(str(tmp_path / "notify"))
    cfg, log = tmp_path / "rigd.toml", tmp_path / "rigd.log"
    try:
        async with SimSite(rigs=4, pdus=1) as site:
            cfg.write_text(
                site.config_toml(
                    broker_url=mosquitto.url,
                    state_dir=tmp_path / "state",
                    interval_s=0.5,
                    extra="[control]\nmax_import_kw = 500\n",
                )
            )
            env = {"NOTIFY_SOCKET": ns.address}
            async with _rigd_run(cfg, env, log, preexec=_deny_write_execute) as proc:
                ns.sender = (proc, log)
                ready = await ns.expect(lambda m: m.get("READY") == "1")
                assert "rigs: 4 mining" in ready["STATUS"]
                await ns.expect(lambda m: _cycle(m) >= 3 and "MQTT connected" in m["STATUS"])
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()[-2000:]
    finally:
        ns.close()


# -- the unit file ------------------------------------------------------------------------------


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with /opt/rigd/bin/rigd pointed at this checkout's rigd, so that
    `systemd-analyze verify` finds the executable it names."""
    rigd = Path(sys.executable).parent / "rigd"
    if not rigd.exists():
        pytest.fail(f"{rigd} is missing: install rigd into the venv (scripts/bootstrap.sh)")
    unit = tmp_path / "rigd.service"
    unit.write_text(UNIT.read_text().replace("/opt/rigd/bin/rigd", str(rigd)))
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env={"LANG": "C"}
    )


def test_unit_verifies_clean(unit_here: Path) -> None:
    r = _analyze("verify", "--man=no", str(unit_here))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_unit_security_exposure(unit_here: Path) -> None:
    r = _analyze("security", "--offline=true", "--no-pager", str(unit_here))
    m = re.search(r"Overall exposure level for rigd\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    # systemd's own gate agrees (its threshold is on a 0-100 scale).
    gate = _analyze(
        "security", "--offline=true", f"--threshold={MAX_EXPOSURE * 10:.0f}", str(unit_here)
    )
    assert gate.returncode == 0, gate.stdout
    # What the unit promises in particular: no capabilities, a system call allow list.
    r = _analyze("security", "--offline=true", "--json=short", "--no-pager", str(unit_here))
    checks = {c["name"]: c["set"] for c in json.loads(r.stdout)}
    for name in (
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "SystemCallFilter=~@privileged",
        "SystemCallFilter=~@resources",
        "MemoryDenyWriteExecute=",
        "RestrictAddressFamilies=~AF_NETLINK",
        "RestrictAddressFamilies=~AF_PACKET",
        "ProtectSystem=",
        "ProtectHome=",
        "NoNewPrivileges=",
        "NotifyAccess=",
    ):
        assert checks.get(name) is True, name


def test_unit_runs_what_the_readme_installs() -> None:
    unit = UNIT.read_text()
    fields = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[:1].isalpha()
    )
    assert fields["Type"] == "notify" and fields["NotifyAccess"] == "main"
    assert fields["ExecStart"] == "/opt/rigd/bin/rigd run -c /etc/rigd/rigd.toml"
    assert fields["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert fields["Restart"] == "on-failure"
    # Exits that a restart cannot mend: a config error, a damaged state database, another
    # rigd on the state directory.
    assert set(fields["RestartPreventExitStatus"].split()) == {"78", "65", "73"}
    # The watchdog outlasts the keep-alive period of rigd (a quarter of it) many times over.
    assert int(fields["WatchdogSec"]) >= 30
    readme = (ROOT / "README.md").read_text()
    for step in (
        "python3 -m venv /opt/rigd",
        "useradd --system",
        "cp systemd/rigd.service /etc/systemd/system/",
        "systemctl enable --now rigd",
        "systemctl reload rigd",
        "journalctl -u rigd",
        "LoadCredential=",
        f"exposure level {MAX_EXPOSURE}",
    ):
        assert step in readme, step


def test_load_config_default_reads_credentials_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's reload reads the file again with systemd's $CREDENTIALS_DIRECTORY."""
    creds = _credentials_dir(tmp_path / "creds")
    cfg = tmp_path / "rigd.toml"
    cfg.write_text('[site]\nid = "s"\n[mqtt]\npassword = { credential = "mqtt-password" }\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    loaded = load_config(cfg)
    assert loaded.mqtt.password and loaded.mqtt.password.get_secret_value().startswith("S3cret")
