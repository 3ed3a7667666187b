"""The executor: sends the planner's actions to devices, retrying what may succeed later.

Each action runs as its own task (bounded in number), so a rig that takes 20 s to
answer never holds up the poll loop or the rest of the farm. Commands come before reads:
while actions queue for a slot (a grid order sleeping thousands of rigs), the poll waits
(`room_for_reads`), since every connection it opened would delay a command, and on a
busy host the connections are what limits how fast the farm is curtailed. For the same
reason, while actions queue, their outcomes (log line, audit row, MQTT event) are kept
and written once the burst is nearly sent (audit rows in one transaction), each with the
time the device answered, and the garbage collector waits for the burst too. Transport failures
(timeouts, refused connections) are retried with backoff; a refusal, bad
credentials or an unsupported command is final. Every attempt's outcome goes to
the audit log and to `rigd/<site>/events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import deque
from collections.abc import Callable

import structlog

from controller.adapters.mqtt import MqttLink
from controller.adapters.store import AuditRow, StateStore, StoreError, audit_row
from controller.core.planner import Action, ActionKind
from controller.core.status import ActionResult
from controller.runtime.clock import Stopwatch
from controller.runtime.devices import Devices
from controller.runtime.timeline import Timeline
from drivers.base import PduDriver
from drivers.errors import DeviceError, DeviceTimeout, DeviceUnreachable

log = structlog.get_logger(__name__)

RECORD_CHUNK = 250  # outcomes booked between two turns of the event loop
CALM_PENDING = 16  # kept-back outcomes are booked once no more actions than this remain...
RECORD_WAIT_S = 10.0  # ...or after this long
SLOT_HOLD_S = 2.0  # a command slower than this gives its slot to the next (see `execute`)
# A command of a driver kind known to be slow (one of its commands took over SLOT_HOLD_S)
# holds a slot of its own lane (as many as the main one) only this long: enough for its
# requests to leave...
SLOW_HOLD_S = 0.1
# ...plus this many times the event loop's lag (how late the last slot timer fired), up to
# SLOT_HOLD_S (so never slower than the main lane): a busy loop starts slow commands no
# faster than it can serve them (at 10,000 rigs, 3,000 stock Antminers started in 5 s made
# every web connect time out after 3 s).
LAG_HOLD_FACTOR = 2.0


class _Lane:
    """Slots handed out first come, first served, like a semaphore; and the commands of a
    driver kind can be sent out of the queue at once (`divert`), when the kind turns out
    to be slow while they wait."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._queue: deque[tuple[type, asyncio.Future[bool]]] = deque()

    def locked(self) -> bool:
        return self._free <= 0

    async def acquire(self, kind: type) -> bool:
        """True with a slot, False when diverted (see `divert`) without one."""
        if self._free > 0 and not self._queue:
            self._free -= 1
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (kind, fut)
        self._queue.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                if fut.result():
                    self.release()  # handed a slot just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(entry)
            raise

    def release(self) -> None:
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        self._free += 1

    def divert(self, kind: type) -> None:
        """Every queued command of `kind` leaves the queue now, without a slot."""
        keep: deque[tuple[type, asyncio.Future[bool]]] = deque()
        for entry in self._queue:
            if entry[0] is kind and not entry[1].done():
                entry[1].set_result(False)
            else:
                keep.append(entry)
        self._queue = keep


class Executor:
    def __init__(
        self,
        devices: Devices,
        *,
        store: StateStore | None,
        link: MqttLink | None,
        now: Callable[[], float],
        concurrency: int = 64,
        attempts: int = 3,
        backoff_s: float = 0.5,
        attempt_timeout_s: float = 60.0,
    ) -> None:
        self.devices = devices
        self.store = store
        self.link = link
        self.now = now
        self.attempts = attempts
        self.backoff_s = backoff_s
        # Drivers time out their own requests; this bounds an attempt whatever a driver
        # does (a stock Antminer's mode write takes ~21 s), so no slot is held for good.
        self.attempt_timeout_s = attempt_timeout_s
        self._sem: _Lane | asyncio.Semaphore = _Lane(concurrency)
        self._slots = concurrency
        # Driver kinds (classes) whose commands outlast SLOT_HOLD_S, and their own lane.
        self._slow: set[type] = set()
        self._slow_sem = _Lane(concurrency)
        self._lag = 0.0  # s the last slot timer fired late: the event loop's lag
        self._pending = 0  # actions started and not finished, queued ones included
        self._released = 0  # of those, slow ones that gave their slot back (SLOT_HOLD_S)
        self._room = asyncio.Event()
        self._room.set()
        self._calm = asyncio.Event()  # few actions left: time to book the kept-back ones
        self._calm.set()
        self._gc_paused = False
        self._deferred: deque[tuple[ActionResult, str, float]] = deque()
        self._recorder: asyncio.Task[None] | None = None
        self._rigs = {r.id: r for r in devices.rigs}
        self.timeline: Timeline | None = None  # a grid order's, logged at its first command

    @property
    def queued(self) -> int:
        """Actions waiting for a slot."""
        return max(0, self._pending - self._released - self._slots)

    async def room_for_reads(self) -> None:
        """Return once no action waits for a slot (at once, nearly always)."""
        if not self._room.is_set():
            await self._room.wait()

    def _count(self, delta: int, *, released: int = 0) -> None:
        self._pending += delta
        self._released += released  # slow commands going on without a slot
        waiting = self._pending - self._released > self._slots
        if waiting:
            self._room.clear()
        else:
            self._room.set()
        if self._pending > CALM_PENDING:
            self._calm.clear()
            if waiting and gc.isenabled():
                # A burst: no collector pauses until it is sent (it allocates little, for
                # a few seconds; a full collection in it would hold every reply back).
                gc.disable()
                self._gc_paused = True
        else:
            self._calm.set()
            if self._gc_paused:
                self._gc_paused = False
                gc.enable()

    async def _send(self, a: Action) -> None:
        if self.timeline is not None:
            self.timeline.log_first_command()
            self.timeline = None
        if a.kind in (ActionKind.OUTLET_OFF, ActionKind.OUTLET_ON):
            info = self._rigs.get(a.rig_id)
            if info is None or info.outlet is None:
                raise DeviceError("rig has no PDU outlet", device=a.rig_id, operation=a.kind)
            pdu_id, number = info.outlet
            pdu: PduDriver = self.devices.pdus[pdu_id]
            await pdu.set_outlet(number, "off" if a.kind is ActionKind.OUTLET_OFF else "on")
            return
        miner = self.devices.miners[a.rig_id]
        if a.kind is ActionKind.SLEEP:
            await miner.sleep()
        elif a.kind is ActionKind.SET_POWER:
            await miner.set_power_target(a.watts)
        elif a.kind is ActionKind.WAKE:
            if miner.capabilities.can_power_target:
                # Wake at the planned power (None: full), not at whatever was set before.
                await miner.set_power_target(a.watts)
            await miner.wake()
        else:  # pragma: no cover - ActionKind is closed
            raise ValueError(f"unknown action {a.kind}")

    async def _attempt(self, a: Action) -> None:
        try:
            async with asyncio.timeout(self.attempt_timeout_s):
                await self._send(a)
        except TimeoutError as e:
            raise DeviceTimeout(
                f"no answer within {self.attempt_timeout_s:g} s",
                device=a.rig_id,
                operation=a.kind.value,
            ) from e

    def _kind(self, a: Action) -> type:
        """The driver class a command goes to: what slowness is learnt for."""
        if a.kind in (ActionKind.OUTLET_OFF, ActionKind.OUTLET_ON):
            info = self._rigs.get(a.rig_id)
            pdu = self.devices.pdus.get(info.outlet[0]) if info and info.outlet else None
            return type(pdu)
        return type(self.devices.miners.get(a.rig_id))

    async def execute(self, a: Action, *, actor: str = "planner") -> ActionResult:
        """Send one action, with retries; record it; never raises for device errors.

        A command holds one of the slots for at most `SLOT_HOLD_S`, then goes on without
        it: a stock Antminer applies a mode through its web UI in about 21 s, and 3,000 of
        them would otherwise hold every slot of a curtailment for minutes while the rigs
        that sleep in milliseconds wait. Its driver kind is then known to be slow: its
        other commands take a slot of their own lane for `SLOW_HOLD_S` only (so they are
        paced, not queued behind the fast ones), and those already queued in the main lane
        leave it for their own at once."""
        work = Stopwatch()
        self._count(1)
        kind = self._kind(a)
        lane = self._slow_sem if kind in self._slow else self._sem
        slot = "waiting"  # then "held", and "given back" past the hold

        def give_back() -> None:
            nonlocal slot
            self._lag = max(0.0, loop.time() - due)
            if slot == "held":
                slot = "given back"
                lane.release()
                self._count(0, released=1)
                if lane is self._sem and kind not in self._slow:
                    self._slow.add(kind)
                    if isinstance(self._sem, _Lane):
                        self._sem.divert(kind)

        timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        due = 0.0
        try:
            if isinstance(lane, _Lane):
                got = await lane.acquire(kind)
            else:  # a plain semaphore (tests set one)
                got = await lane.acquire()
            if not got or (lane is self._sem and kind in self._slow):
                # Learnt slow while it queued: its own lane, then.
                if got:
                    lane.release()
                lane = self._slow_sem
                await self._slow_sem.acquire(kind)
            slot = "held"
            hold = SLOT_HOLD_S
            if lane is self._slow_sem:
                hold = min(SLOT_HOLD_S, SLOW_HOLD_S + LAG_HOLD_FACTOR * self._lag)
            due = loop.time() + hold
            timer = loop.call_later(hold, give_back)
            error, attempt = await self._attempts(a)
        finally:
            if timer is not None:
                timer.cancel()
            if slot == "held":
                lane.release()
            elif slot == "given back":
                self._count(0, released=-1)
            self._count(-1)
        result = ActionResult(a, error is None, error, attempt, work.elapsed())
        if self._room.is_set() and not self._deferred:
            self.record(result, actor=actor)
        else:  # commands are queued: book this one once they are sent
            self._deferred.append((result, actor, self.now()))
            if self._recorder is None or self._recorder.done():
                self._recorder = asyncio.create_task(self._record_deferred(), name="audit")
        return result

    async def _attempts(self, a: Action) -> tuple[str | None, int]:
        """(error or None, attempts made): the retries of one action."""
        error: str | None = None
        attempt = 0
        for attempt in range(1, self.attempts + 1):
            try:
                await self._attempt(a)
                return None, attempt
            except (DeviceTimeout, DeviceUnreachable) as e:
                error = str(e)
                if attempt < self.attempts:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            except DeviceError as e:
                return str(e), attempt  # rejected, auth, unsupported: retrying will not help
            except ValueError as e:  # e.g. a power target outside the rig's range
                return f"invalid: {e}", attempt
            except Exception as e:  # a driver bug must not take the controller down
                log.exception("action_crashed", rig=a.rig_id, action=a.kind.value)
                return f"{type(e).__name__}: {e}", attempt
        return error, attempt

    async def _record_deferred(self) -> None:
        # Once the burst is nearly done (or after a while: stragglers retrying must not
        # hold the books back), so that the last commands' replies are not kept waiting.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECORD_WAIT_S):
                await self._calm.wait()
        while self._deferred:
            self._record_chunk(RECORD_CHUNK)
            await asyncio.sleep(0)

    def _record_chunk(self, n: int) -> None:
        """Book up to `n` kept-back outcomes, their audit rows in one transaction."""
        rows: list[AuditRow] = []
        for _ in range(min(n, len(self._deferred))):
            r, actor, ts = self._deferred.popleft()
            self.record(r, actor=actor, ts=ts, rows=rows)
        if rows and self.store is not None:
            try:
                self.store.audit_many(rows)
            except StoreError as e:
                log.error("audit_write_failed", error=str(e))

    async def drain(self) -> None:
        """Book every outcome kept back during a burst, now (shutting down)."""
        if self._recorder is not None:
            self._recorder.cancel()
            await asyncio.wait((self._recorder,))
        while self._deferred:
            self._record_chunk(len(self._deferred))

    def record(
        self,
        r: ActionResult,
        *,
        actor: str,
        dry_run: bool = False,
        ts: float | None = None,
        rows: list[AuditRow] | None = None,
    ) -> None:
        """Log, audit and publish one outcome; `rows` collects the audit row instead of
        writing it (`_record_chunk` writes many at once)."""
        a = r.action
        outcome = "dry_run" if dry_run else ("ok" if r.ok else "failed")
        params = {"watts": None if a.watts is None else round(a.watts), "attempts": r.attempts}
        ts = self.now() if ts is None else ts
        (log.info if r.ok or dry_run else log.warning)(
            "action",
            rig=a.rig_id,
            action=a.kind.value,
            watts=params["watts"],
            reason=a.reason,
            result=outcome,
            error=r.error,
            actor=actor,
        )
        if rows is not None:
            rows.append(
                audit_row(
                    ts, actor, a.kind.value, a.rig_id, params, a.reason, outcome, r.error, dry_run
                )
            )
        elif self.store is not None:
            try:
                self.store.audit(
                    ts=ts,
                    actor=actor,
                    action=a.kind.value,
                    rig_id=a.rig_id,
                    params=params,
                    reason=a.reason,
                    result=outcome,
                    error=r.error,
                    dry_run=dry_run,
                )
            except StoreError as e:
                log.error("audit_write_failed", error=str(e))
        if self.link is not None:
            self.link.event(
                "events",
                {
                    "ts": round(ts, 3),
                    "type": "action",
                    **a.as_dict(),
                    "result": outcome,
                    "error": r.error,
                    "actor": actor,
                    "dry_run": dry_run,
                },
            )
