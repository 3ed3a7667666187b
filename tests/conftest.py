"""Shared fixtures: a real mosquitto broker on a free loopback port, and an MQTT watcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from bench.sim_harness import SimHarness
from controller.config import Config
from controller.runtime.daemon import Daemon
from simulators.site import SimSite

# -- running the suite on a busy machine ----------------------------------------------------------

# An edge host is often busy: `--busy-cores N` (or RIGD_TEST_LOAD=N) keeps N cores saturated
# by other processes for the whole session, so that what only fails under load fails here.
_BUSY_LOOP = (
    "import os\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:  # ends with the test session, even a killed one\n"
    "    for _ in range(200_000):\n"
    "        pass\n"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--busy-cores",
        type=int,
        default=int(os.environ.get("RIGD_TEST_LOAD") or 0),
        metavar="N",
        help="run N busy-loop processes for the whole session, to test on a loaded machine "
        "(default: $RIGD_TEST_LOAD, else 0)",
    )


def pytest_configure(config: pytest.Config) -> None:
    n = int(config.getoption("--busy-cores") or 0)
    if n <= 0 or hasattr(config, "workerinput"):  # started once, by the xdist controller
        return
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUSY_LOOP],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    config.stash[_busy_key] = procs


def pytest_unconfigure(config: pytest.Config) -> None:
    for p in config.stash.get(_busy_key, []):
        p.kill()
        p.wait()


def pytest_report_header(config: pytest.Config) -> str | None:
    procs = config.stash.get(_busy_key, [])
    return f"load: {len(procs)} busy-loop process(es) beside the tests" if procs else None


_busy_key = pytest.StashKey[list[subprocess.Popen[bytes]]]()


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """A test that configures logging in-process (the bench, rigd's CLI at "warning") must
    not silence the info events a later test captures with `capture_logs`."""
    yield
    structlog.reset_defaults()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )
    if not found:
        pytest.fail(
            "mosquitto is not installed: run the tests with scripts/test.sh, which installs it"
        )
    return found


class Mosquitto:
    """A mosquitto process the test owns: can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, *, listener: str = "", scheme: str = "mqtt") -> None:
        """`listener`: extra lines for the listener (TLS files, password_file, ...)."""
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.scheme = scheme
        self.conf = workdir / "mosquitto.conf"
        anonymous = "false" if "password_file" in listener else "true"
        self.conf.write_text(
            # `user root`: when the tests run as root, keep reading the test's own files.
            f"user root\nper_listener_settings false\nlistener {self.port} 127.0.0.1\n"
            f"{listener}\nallow_anonymous {anonymous}\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.stop()


class Watcher:
    """Subscribes to a topic filter and keeps the latest payload of every topic."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.latest: dict[str, bytes] = {}
        self.retained: dict[str, bool] = {}
        self.count = 0
        self._changed = asyncio.Condition()

    async def _pump(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            self.latest[str(msg.topic)] = payload
            self.retained[str(msg.topic)] = bool(msg.retain)
            self.count += 1
            async with self._changed:
                self._changed.notify_all()

    def json(self, topic: str) -> Any:
        return json.loads(self.latest[topic])

    async def wait_for(
        self, topic: str, pred: Callable[[bytes], bool] = lambda _: True, within: float = 10.0
    ) -> bytes:
        async def check() -> bytes:
            async with self._changed:
                while True:
                    p = self.latest.get(topic)
                    if p is not None and pred(p):
                        return p
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(check(), within)
        except TimeoutError:
            last = self.latest.get(topic)
            raise AssertionError(
                f"{topic}: condition not met in {within} s; last: {last!r}"
            ) from None

    async def wait_json(
        self, topic: str, pred: Callable[[Any], bool] = lambda _: True, within: float = 10.0
    ) -> Any:
        p = await self.wait_for(topic, lambda b: bool(pred(json.loads(b))), within)
        return json.loads(p)


@contextlib.asynccontextmanager
async def watch(url_host: str, port: int, topic: str = "rigd/#") -> AsyncIterator[Watcher]:
    async with aiomqtt.Client(url_host, port, identifier=f"watcher-{_free_port()}") as client:
        await client.subscribe(topic, qos=1)
        w = Watcher(client)
        task = asyncio.create_task(w._pump())
        try:
            yield w
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@contextlib.asynccontextmanager
async def running(cfg: Config, site: SimSite) -> AsyncIterator[Daemon]:
    """The daemon's loop over a simulated site, in this process, stopped cleanly on exit."""
    daemon = Daemon(cfg, clock=site.clock)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Callable[..., SimHarness]]:
    """Make simulated-time harnesses (bench/sim_harness.py), each in its own directory,
    all closed at the end of the test."""
    made: list[SimHarness] = []

    def make(**kw: Any) -> SimHarness:
        h = SimHarness.create(tmp_path / f"h{len(made)}", **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()
