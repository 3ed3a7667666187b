"""Telling systemd how rigd is doing: sd_notify, and a watchdog fed only by real progress.

Under `Type=notify` systemd counts rigd as started on READY=1, shows the STATUS= line in
`systemctl status`, and with `WatchdogSec=` restarts rigd when the keep-alives stop. rigd
sends:

- READY=1 after its first control cycle, so "started" means the farm is under control,
  and EXTEND_TIMEOUT_USEC= before it: that first cycle may outlast TimeoutStartSec;
- STATUS= after each cycle: import against the cap, rigs by state, the broker connection;
- WATCHDOG=1 while cycles keep completing (see `Watchdog`), WATCHDOG=trigger once they stop;
- RELOADING=1 with MONOTONIC_USEC, then READY=1, around a SIGHUP reload;
- STOPPING=1 when told to stop.

Outside systemd (no $NOTIFY_SOCKET) all of it does nothing.

The protocol is one datagram of KEY=VALUE lines to a Unix socket, so it is written here
rather than taken from PyPI: the pure-Python packages there are unmaintained (sdnotify 0.3.2
of 2017, sd-notify 0.1.0 of 2020), and the maintained ones (systemd-python, cysystemd) are C
extensions that need libsystemd's headers to build.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from controller.adapters.ports import ServiceView
    from controller.config import Config
    from controller.core.status import CycleResult

log = structlog.get_logger(__name__)

# Slack on top of a cycle's worst case (every device silent): deciding, publishing, a reload
# waiting for the cycle lock. A loop this late is stuck, not slow.
CYCLE_SLACK_S = 30.0
# Before READY=1, how often the start-up deadline given to systemd is looked at again.
START_CHECK_S = 5.0


def _address(raw: str) -> str | None:
    """The socket address of $NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None


class Notifier:
    """Sends sd_notify messages; does nothing when systemd did not ask for them."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        # systemd's WatchdogSec for this process; None: no watchdog to feed.
        self.watchdog_s = watchdog_s if address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw)
        if raw and address is None:
            log.warning("sd_notify_socket_unsupported", notify_socket=raw)
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        watchdog_s = None
        # WATCHDOG_PID names the process systemd watches; a child that inherited it is not it.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of KEY=VALUE lines. Never blocks and never raises: a lost message
        costs at most a status line or one keep-alive, never the farm's control."""
        if self.address is None:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self.address)
        except OSError as e:
            if not self._failing:
                log.warning("sd_notify_failed", error=str(e))
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass(slots=True)
class Watchdog:
    """Whether to feed systemd's watchdog now, decided from the control loop's progress.

    After each cycle the loop promises its next one within `within_s` (see
    `next_cycle_within_s`); the watchdog is fed only while that promise holds. A loop stuck
    anywhere (an await that never returns, a blocked event loop) stops the feeding, and once
    the promise is broken `tick` asks for WATCHDOG=trigger: systemd then restarts rigd at once
    instead of a WatchdogSec later. The keep-alives are carried by a timer because the poll
    interval may be longer than WatchdogSec, but only progress decides whether they are sent.
    """

    deadline: float | None = None  # monotonic; None until the first cycle
    triggered: bool = False

    def progress(self, now: float, within_s: float) -> None:
        self.deadline = now + within_s
        self.triggered = False

    def overdue_s(self, now: float) -> float:
        return 0.0 if self.deadline is None else max(0.0, now - self.deadline)

    def tick(self, now: float) -> str | None:
        """The message to send now: WATCHDOG=1, WATCHDOG=trigger (once per stall), or None.

        Before the first cycle nothing is due: systemd arms the watchdog only after READY=1,
        and start-up has TimeoutStartSec."""
        if self.deadline is None:
            return None
        if now <= self.deadline:
            return "WATCHDOG=1"
        if not self.triggered:
            self.triggered = True
            return "WATCHDOG=trigger"
        return None


def cycle_within_s(cfg: Config, devices: int, slack_s: float = CYCLE_SLACK_S) -> float:
    """The longest one cycle may take: a cycle in which every device is silent (reads run
    `poll.concurrency` at a time and each is cut off after the daemon's guard of
    timeout_s x (retries + 1) + 2 s, Daemon._apply_poll), plus `slack_s`."""
    p = cfg.poll
    guard = p.timeout_s * (p.retries + 1) + 2.0
    batches = max(1, math.ceil(devices / p.concurrency))
    return batches * guard + slack_s


def next_cycle_within_s(cfg: Config, devices: int, slack_s: float = CYCLE_SLACK_S) -> float:
    """How soon after one cycle ends the next must have ended, at the latest: the wait for
    the next interval, plus the longest a cycle may take (`cycle_within_s`)."""
    return cfg.poll.interval_s + cycle_within_s(cfg, devices, slack_s)


def status_line(doc: Mapping[str, Any], mqtt_connected: bool) -> str:
    """One line for `systemctl status`: import against the cap, rigs by state, the broker."""
    imp, cap = doc.get("import_kw"), doc.get("cap_kw")
    imp_s = f"import {imp:,.1f} kW" if isinstance(imp, int | float) else "import unknown (no meter)"
    if isinstance(cap, int | float):
        head = f"{imp_s} of cap {cap:,.1f} kW ({doc.get('cap_source')})"
    else:
        head = f"{imp_s}, monitoring only"
    rigs = doc.get("rigs") or {}
    counts = ", ".join(f"{n} {state}" for state, n in rigs.items() if n) or "none"
    broker = "MQTT connected" if mqtt_connected else "MQTT disconnected"
    short = (doc.get("control") or {}).get("cannot_shed")
    if short:
        head += f", CANNOT SHED ENOUGH ({short['over_kw']:,.1f} kW over target)"
    return f"cycle {doc.get('cycle')}: {head}; rigs: {counts}; {broker}"


class ServiceNotifications:
    """The daemon's side of Type=notify: hooks for its cycle, reload and stop."""

    def __init__(
        self,
        notifier: Notifier,
        daemon: ServiceView,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        slack_s: float = CYCLE_SLACK_S,
    ) -> None:
        self.notifier = notifier
        self.daemon = daemon
        self.watchdog = Watchdog()
        self._monotonic = monotonic
        self._slack_s = slack_s
        self._ready = False  # READY=1 reached systemd (a dropped one is sent again)
        self._note = ""  # appended to the status line: a refused reload stays visible
        # Start-up: when it began (monotonic), and the deadline for the first cycle that
        # systemd was last given with EXTEND_TIMEOUT_USEC (see `starting`).
        self._started_at: float | None = None
        self._start_deadline: float | None = None

    def _devices(self) -> int:
        d = self.daemon.devices
        return len(d.miners) + len(d.meters) + len(d.pdus)

    def starting(self) -> None:
        """Before the first cycle. READY=1 waits for that cycle, which on a large fleet that is
        still booting (every device silent) takes minutes: 10,000 rigs at 256 at a time and
        3 s x 2 tries each take over 5 min, beyond TimeoutStartSec. So systemd is asked
        to wait for that cycle's worst case (`cycle_within_s`) with EXTEND_TIMEOUT_USEC;
        `run` asks again if the worst case grows before READY=1 (more devices found)."""
        self._started_at = self._monotonic()
        fields = [f"STATUS=starting: first poll of {self._devices()} devices"]
        extend = self._start_extension(force=True)
        if extend is not None:
            fields.append(extend)
        if not self.notifier.send(*fields):
            self._start_deadline = None  # not given: `run` sends it again

    def _start_extension(self, *, force: bool = False) -> str | None:
        """EXTEND_TIMEOUT_USEC= for the first cycle's worst case, counted from `starting`,
        when that is later than the deadline systemd already has (or `force`); else None.

        Never past it: a first cycle that outlasts its own worst case is stuck, and
        systemd's start timeout is then what restarts rigd."""
        if self._ready or self._started_at is None or not self.notifier.enabled:
            return None
        cfg = self.daemon.cfg
        deadline = self._started_at + cycle_within_s(cfg, self._devices(), self._slack_s)
        if not force and self._start_deadline is not None and deadline <= self._start_deadline:
            return None
        left = deadline - self._monotonic()
        if left <= 0:
            return None
        self._start_deadline = deadline
        return f"EXTEND_TIMEOUT_USEC={math.ceil(left * 1e6)}"

    def on_cycle(self, result: CycleResult) -> None:
        """After each completed cycle (the daemon's on_snapshot hook)."""
        within = next_cycle_within_s(self.daemon.cfg, self._devices(), self._slack_s)
        self.watchdog.progress(self._monotonic(), within)
        if not self.notifier.enabled:
            return
        status = status_line(result.document, self.daemon.link.connected.is_set()) + self._note
        fields = [f"STATUS={status}"]
        if not self._ready:
            fields.insert(0, "READY=1")
        if self.notifier.watchdog_s is not None:
            fields.append("WATCHDOG=1")
        sent = self.notifier.send(*fields)
        # A READY=1 that was not sent (EAGAIN: systemd busy) goes with the next cycle's.
        if sent and not self._ready:
            self._ready = True
            log.info("sd_notify_ready", watchdog_s=self.notifier.watchdog_s)

    def reloading(self) -> None:
        usec = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, as systemd wants it
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading config")

    def reloaded(self, refused: list[str] | None) -> None:
        """After a reload, applied (`refused` None) or refused: rigd runs on either way."""
        if refused is None:
            self._note = ""
            self.notifier.send("READY=1", "STATUS=config reloaded")
        else:
            n = len(refused)
            self._note = f"; last reload refused ({n} problem{'s' if n != 1 else ''})"
            self.notifier.send(
                "READY=1",
                f"STATUS=config reload refused, running on the previous config{self._note}",
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Feed the watchdog while the loop progresses; STOPPING=1 once `stop` is set."""
        if not self.notifier.enabled:
            await stop.wait()
            return
        feed = self.notifier.watchdog_s / 4 if self.notifier.watchdog_s else None
        try:
            while not stop.is_set():
                # Until READY=1, also look every START_CHECK_S at the start-up deadline.
                period = feed if self._ready else min(feed or START_CHECK_S, START_CHECK_S)
                if period is None:
                    await stop.wait()
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
                if stop.is_set():
                    break
                extend = self._start_extension()
                if extend is not None and not self.notifier.send(extend):
                    self._start_deadline = None  # not given: try again next time
                self._feed()
            self.notifier.send(
                "STOPPING=1", "STATUS=stopping: going offline, rigs left as they are"
            )
        finally:
            self.notifier.close()

    def _feed(self) -> None:
        now = self._monotonic()
        msg = self.watchdog.tick(now)
        if msg is None:
            return
        if msg == "WATCHDOG=trigger":
            log.error(
                "watchdog_starved",
                overdue_s=round(self.watchdog.overdue_s(now), 1),
                waiting=_where_tasks_wait(),
                note="no control cycle completed in time: asking systemd to restart rigd",
            )
            self.notifier.send(msg, "STATUS=control loop stalled: restarting")
            return
        self.notifier.send(msg)


def _where_tasks_wait() -> list[str]:
    """Where each task is suspended, as its chain of awaits: what a stalled loop's log line
    needs in order to be fixed."""
    out = []
    for task in asyncio.all_tasks():
        chain: list[str] = []
        where = ""
        aw: Any = task.get_coro()
        while aw is not None:
            frame = getattr(aw, "cr_frame", None) or getattr(aw, "gi_frame", None)
            if frame is None:
                break
            chain.append(frame.f_code.co_name)
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            aw = getattr(aw, "cr_await", None) or getattr(aw, "gi_yieldfrom", None)
        out.append(f"{task.get_name()}: {' > '.join(chain) or 'running'} ({where})")
    return sorted(out)
