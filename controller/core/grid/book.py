"""The order book: every grid order's lifecycle, its compliance, and the heartbeat failsafe.

Pure: messages, readings and time go in; limits, acknowledgement outcomes and reports
come out. No sockets and no clock, so a four-hour curtailment or a heartbeat lost at
3 a.m. is tested by handing it times. The whole book serialises to one JSON document
that the service writes to the state database after every change, so a daemon killed
mid-order resumes exactly where it was, and an order that ended while it was down is
closed with a report that says how long nobody was watching.

Lifecycle of an order revision: pending -> active -> completed | cancelled, and a
revision replaced by a `modify` (or by a `curtail` re-sent with a higher modification)
is superseded; the order itself carries on under the new revision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from controller.core.caps import GRID, Limit
from controller.core.grid.orders import (
    Cancel,
    Curtail,
    Modify,
    Ping,
    RejectReason,
    Target,
    parse_time,
)

PENDING, ACTIVE, COMPLETED, CANCELLED, SUPERSEDED = (
    "pending",
    "active",
    "completed",
    "cancelled",
    "superseded",
)
OPEN = (PENDING, ACTIVE)


@dataclass(slots=True)
class Revision:
    """A superseded version of an order, kept for the record and the final report."""

    modification: int
    target: dict[str, Any]
    start: float
    end: float | None
    respond_within_s: float
    superseded_at: float
    status: str = SUPERSEDED


@dataclass(slots=True)
class Order:
    order_id: str
    modification: int
    status: str
    target: dict[str, Any]  # the Target as received
    start: float
    end: float | None  # None: open-ended (until cancelled)
    respond_within_s: float
    received_at: float
    jti: str
    signed: bool
    kid: str | None = None
    iss: str | None = None
    cap_kw: float | None = None  # resolved; a shed waits for its baseline at the start
    baseline_kw: float | None = None
    # compliance, accumulated from observations (sample and hold)
    last_obs_ts: float | None = None
    last_kw: float | None = None
    last_basis: str | None = None
    compliant: bool | None = None
    first_compliant_at: float | None = None
    over_s: float = 0.0
    out_of_compliance_s: float = 0.0
    max_overshoot_kw: float = 0.0
    energy_shed_kwh: float = 0.0
    data_gap_s: float = 0.0
    last_report_ts: float = 0.0
    ended_at: float | None = None
    revisions: list[Revision] = field(default_factory=list)
    # The current target's obligation began here (a new target while active): None, the start.
    obliged_since: float | None = None
    # rigd has restarted since it last observed this order: until the next observation,
    # nobody watched, and that time is a data gap whatever the poll interval.
    unwatched: bool = False
    # The rig counts of the last observation (reports say what was seen, and when).
    rigs: dict[str, int] | None = None

    @property
    def deadline(self) -> float:
        return self.start + self.respond_within_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Order:
        d = dict(d)
        d["revisions"] = [Revision(**r) for r in d.get("revisions", [])]
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "modification": self.modification,
            "status": self.status,
            "target": self.target,
            "cap_kw": None if self.cap_kw is None else round(self.cap_kw, 3),
            "start": self.start,
            "end": self.end,
            "deadline": self.deadline,
            "compliant": self.compliant,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the acknowledgement says about one message."""

    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""
    order: Order | None = None
    changed: bool = False  # limits may have changed: run a control cycle now


@dataclass(slots=True)
class Failsafe:
    last_heartbeat: float | None = None
    back_since: float | None = None  # heartbeat returned during a failsafe
    since: float | None = None  # failsafe in force since
    fresh_order_at: float | None = None  # an order accepted during the failsafe
    heartbeats: int = 0


@dataclass(frozen=True, slots=True)
class Note:
    """Something the service logs, audits and (for finals) reports."""

    kind: str  # "activated", "completed", "cancelled", "superseded", "failsafe_on", ...
    order: Order | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HeartbeatRules:
    """The operator's liveness contract (config `[grid.heartbeat]`), as the book applies it."""

    timeout_s: float
    failsafe_kw: float
    min_failsafe_s: float
    recovery_s: float
    always: bool


@dataclass(frozen=True, slots=True)
class GridRules:
    """The parts of `[grid]` the order book decides with. A frozen value rather than the
    config model, so the book stays pure and a reload hands it a new one."""

    respond_within_s: float
    report_interval_s: float
    levels_kw: tuple[float, ...] | None
    levels_pct: tuple[float, ...]
    heartbeat: HeartbeatRules | None


class OrderBook:
    def __init__(
        self,
        grid: GridRules,
        max_import_kw: float,
        *,
        max_gap_s: float = 60.0,
        keep_closed: int = 50,
    ) -> None:
        self.grid = grid
        self.max_import_kw = max_import_kw
        self.max_gap_s = max_gap_s  # a longer silence between observations is a data gap
        self.keep_closed = keep_closed
        self.orders: dict[str, Order] = {}
        self.failsafe = Failsafe()
        self.last_import: tuple[float, float] | None = None  # (ts, kW)

    # -- persistence ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {
            "orders": [o.as_dict() for o in self.orders.values()],
            "failsafe": asdict(self.failsafe),
            "last_import": self.last_import,
        }

    def load(self, d: dict[str, Any] | None, now: float) -> None:
        """Read back a saved book. The heartbeat gets a fresh timeout from `now` (we could
        not hear it while down), but a failsafe in force stays in force. Every order in
        force, or due to have started, was unwatched from its last saved observation (or
        its start) until the first observation from now on: that is its data gap."""
        if not d:
            self.failsafe.last_heartbeat = now
            return
        self.orders = {o["order_id"]: Order.from_dict(o) for o in d.get("orders", [])}
        for o in self.orders.values():
            if o.status == ACTIVE or (o.status == PENDING and o.start <= now):
                o.unwatched = True
        self.failsafe = Failsafe(**d.get("failsafe", {}))
        self.failsafe.last_heartbeat = now
        self.failsafe.back_since = None
        li = d.get("last_import")
        self.last_import = (float(li[0]), float(li[1])) if li else None

    def shift_local_times(self, dt: float, *, heartbeat: bool = True) -> None:
        """The wall clock stepped by `dt` s: move what rigd timed itself (heartbeat timeout,
        failsafe durations, report pacing, the compliance clock), not the orders' own start,
        end and deadline, which are the operator's wall-clock times. `heartbeat=False` keeps
        the heartbeat's stamp (`load` has just given it a fresh timeout from now)."""

        def sh(t: float | None) -> float | None:
            return None if t is None else t + dt

        f = self.failsafe
        if heartbeat:
            f.last_heartbeat = sh(f.last_heartbeat)
        f.back_since, f.since, f.fresh_order_at = (
            sh(f.back_since),
            sh(f.since),
            sh(f.fresh_order_at),
        )
        for o in self.orders.values():
            o.received_at += dt
            o.last_obs_ts = sh(o.last_obs_ts)
            if o.last_report_ts:
                o.last_report_ts += dt
        if self.last_import is not None:
            self.last_import = (self.last_import[0] + dt, self.last_import[1])

    # -- messages ---------------------------------------------------------------------------

    def level_kw(self, level: int) -> float:
        g = self.grid
        if g.levels_kw is not None:
            return g.levels_kw[level]
        return self.max_import_kw * g.levels_pct[level] / 100.0

    def _cap_for(self, target: dict[str, Any], baseline_kw: float | None) -> float | None:
        if target.get("max_import_kw") is not None:
            return float(target["max_import_kw"])
        if target.get("level") is not None:
            return self.level_kw(int(target["level"]))
        if baseline_kw is None:
            return None  # resolved at the start
        return max(0.0, baseline_kw - float(target["shed_kw"]))

    def apply(
        self, msg: Curtail | Modify | Cancel | Ping, now: float, *, signed: bool, kid: str | None
    ) -> Outcome:
        if isinstance(msg, Ping):
            return Outcome(True, detail="pong")
        if isinstance(msg, Curtail):
            prev = self.orders.get(msg.order_id)
            if prev is not None:
                if prev.status not in OPEN:
                    return Outcome(
                        False,
                        "order_closed",
                        f"order {msg.order_id} has ended ({prev.status})",
                        prev,
                    )
                if msg.modification <= prev.modification:
                    return Outcome(
                        False,
                        "duplicate_order" if msg.modification == 0 else "stale_modification",
                        f"order {msg.order_id} is at modification {prev.modification}",
                        prev,
                    )
                # A full re-send with a higher modification number: OpenADR's way to revise.
                return self._revise(prev, msg, now)
            start = now if msg.start == "now" else parse_time(msg.start)
            end = (
                parse_time(msg.end)
                if msg.end is not None
                else (start + msg.duration_s if msg.duration_s is not None else None)
            )
            if end is not None and end <= now:
                return Outcome(False, "not_applicable", "the order's end is already past")
            resp = msg.respond_within_s or self.grid.respond_within_s
            new = Order(
                msg.order_id,
                msg.modification,
                PENDING,
                _target(msg.target),
                start,
                end,
                resp,
                now,
                msg.jti,
                signed,
                kid,
                msg.iss,
            )
            new.cap_kw = self._cap_for(new.target, None)
            self.orders[new.order_id] = new
            self._note_fresh(now)
            return Outcome(True, order=new, changed=True)
        order = self.orders.get(msg.order_id)
        if order is None:
            return Outcome(False, "unknown_order", f"no order {msg.order_id!r}")
        if isinstance(msg, Cancel):
            if order.status not in OPEN:
                return Outcome(
                    False,
                    "order_closed",
                    f"order {msg.order_id} has already ended ({order.status})",
                    order,
                )
            if msg.modification is not None and msg.modification <= order.modification:
                return Outcome(
                    False,
                    "stale_modification",
                    f"order {msg.order_id} is at modification {order.modification}",
                    order,
                )
            if msg.modification is not None:
                order.modification = msg.modification
            if order.status == ACTIVE or (order.unwatched and order.start <= now):
                self._accumulate(order, now)  # up to the cancel: held, or a gap
            if order.unwatched:
                self._unseen_end(order)
            order.status = CANCELLED
            order.ended_at = now
            self._note_fresh(now)
            return Outcome(True, order=order, changed=True)
        # Modify
        if order.status not in OPEN:
            return Outcome(
                False,
                "order_closed",
                f"order {msg.order_id} has already ended ({order.status})",
                order,
            )
        if msg.modification <= order.modification:
            return Outcome(
                False,
                "stale_modification",
                f"order {msg.order_id} is at modification {order.modification}",
                order,
            )
        return self._revise(order, msg, now)

    def _revise(self, order: Order, msg: Curtail | Modify, now: float) -> Outcome:
        start = order.start
        if msg.start is not None:
            if order.status == ACTIVE and isinstance(msg, Modify):
                return Outcome(
                    False, "not_applicable", "an active order's start cannot move", order
                )
            if order.status == PENDING:
                start = now if msg.start == "now" else parse_time(msg.start)
        end = order.end
        if msg.end is not None:
            end = parse_time(msg.end)
        elif msg.duration_s is not None:
            end = start + msg.duration_s
        elif isinstance(msg, Curtail):
            end = None  # a full re-send without an end is open-ended
        if end is not None and (end <= now or end <= start):
            return Outcome(False, "not_applicable", "the revised end is already past", order)
        order.revisions.append(
            Revision(
                order.modification,
                order.target,
                order.start,
                order.end,
                order.respond_within_s,
                now,
            )
        )
        order.modification = msg.modification
        order.start, order.end = start, end
        if msg.respond_within_s is not None:
            order.respond_within_s = msg.respond_within_s
        if msg.target is not None:
            order.target = _target(msg.target)
            order.cap_kw = self._cap_for(order.target, order.baseline_kw)
            if order.cap_kw is None and order.status == ACTIVE:
                order.cap_kw = self._cap_for(order.target, self._baseline())
            if order.status == ACTIVE:
                # A new target is a new obligation: its own deadline from now.
                order.compliant = None
                order.first_compliant_at = None
                order.obliged_since = now
                order.respond_within_s = (now - order.start) + (
                    msg.respond_within_s or self.grid.respond_within_s
                )
        order.received_at = now
        order.jti = msg.jti
        self._note_fresh(now)
        return Outcome(True, order=order, changed=True)

    def _note_fresh(self, now: float) -> None:
        if self.failsafe.since is not None:
            self.failsafe.fresh_order_at = now

    # -- time -------------------------------------------------------------------------------

    def _baseline(self) -> float | None:
        return None if self.last_import is None else self.last_import[1]

    def tick(self, now: float) -> list[Note]:
        """Start what is due, end what is over, run the heartbeat failsafe."""
        notes: list[Note] = []
        for o in list(self.orders.values()):
            if o.status == PENDING and now >= o.start and (o.end is None or now < o.end):
                o.status = ACTIVE
                o.baseline_kw = self._baseline()
                if o.cap_kw is None:  # a shed: from the import just before the start
                    o.cap_kw = self._cap_for(o.target, o.baseline_kw)
                    if o.cap_kw is None:
                        # No reading at all: shed from the site maximum, the safe upper bound.
                        o.cap_kw = max(0.0, self.max_import_kw - float(o.target["shed_kw"]))
                notes.append(Note("activated", o))
            if o.status in OPEN and o.end is not None and now >= o.end:
                if o.status == ACTIVE or o.unwatched:
                    self._accumulate(o, o.end)  # a silence up to the end is a gap
                else:
                    o.data_gap_s += max(0.0, o.end - o.start)  # began and ended between ticks
                if o.unwatched:
                    self._unseen_end(o)
                o.status = COMPLETED
                o.ended_at = o.end
                notes.append(Note("completed", o))
        notes += self._run_failsafe(now)
        self._prune()
        return notes

    @staticmethod
    def _unseen_end(o: Order) -> None:
        """Nobody saw the end: no reading, compliance or rig count stands for it."""
        o.compliant = None
        o.last_kw = o.last_basis = None
        o.rigs = None

    def _prune(self) -> None:
        closed = [o for o in self.orders.values() if o.status not in OPEN]
        closed.sort(key=lambda o: o.ended_at or 0.0)
        for o in closed[: max(0, len(closed) - self.keep_closed)]:
            del self.orders[o.order_id]

    def active(self) -> list[Order]:
        return [o for o in self.orders.values() if o.status == ACTIVE]

    def open_orders(self) -> list[Order]:
        return [o for o in self.orders.values() if o.status in OPEN]

    def limits(self) -> dict[str, Limit]:
        out = {}
        for o in self.active():
            if o.cap_kw is not None:
                out[f"grid:{o.order_id}"] = Limit(
                    GRID, o.cap_kw, f"order {o.order_id} (modification {o.modification})", o.end
                )
        hb = self.grid.heartbeat
        if hb is not None and self.failsafe.since is not None:
            out["grid:failsafe"] = Limit(GRID, hb.failsafe_kw, "failsafe: operator heartbeat lost")
        return out

    def comply_by(self) -> float | None:
        """The earliest deadline of an active order not (yet) seen compliant."""
        due = [o.deadline for o in self.active() if not o.compliant]
        return min(due) if due else None

    # -- compliance -------------------------------------------------------------------------

    def _accumulate(self, o: Order, until: float) -> None:
        """Fold the time since the last observation into the order's figures (sample and
        hold). A data gap, not compliance either way, is: the time since the last
        observation before a restart (or since the start, if rigd never saw the order
        active), a silence longer than `max_gap_s`, and time without an import figure.
        A reading is never held across a gap."""
        t0 = o.start if o.last_obs_ts is None else max(o.last_obs_ts, o.start)
        dt = until - t0
        if dt <= 0:
            return
        if o.unwatched:
            o.data_gap_s += dt
            return
        if o.last_obs_ts is None:
            return  # activated by this process since its last observation: nothing held yet
        if o.last_kw is None or o.cap_kw is None or until - o.last_obs_ts > self.max_gap_s:
            o.data_gap_s += dt
            return
        over = o.last_kw - o.cap_kw
        if over > 1e-9:
            o.over_s += dt
            o.out_of_compliance_s += max(0.0, until - max(t0, o.deadline))
            o.max_overshoot_kw = max(o.max_overshoot_kw, over)
        if o.baseline_kw is not None:
            o.energy_shed_kwh += (o.baseline_kw - o.last_kw) * dt / 3600.0

    def observe(
        self,
        now: float,
        import_kw: float | None,
        basis: str | None,
        rigs: dict[str, int] | None = None,
    ) -> None:
        """One control cycle's view: import (None: not known) and the rigs' states."""
        if import_kw is not None and basis == "meter":
            self.last_import = (now, import_kw)
        for o in self.active():
            self._accumulate(o, now)
            o.last_obs_ts = now
            o.unwatched = False
            o.last_kw = import_kw
            o.last_basis = basis
            o.rigs = rigs
            if import_kw is None or o.cap_kw is None:
                continue
            o.compliant = import_kw <= o.cap_kw + 1e-9
            if o.compliant and o.first_compliant_at is None:
                o.first_compliant_at = now

    def _reportable(self) -> list[Order]:
        """Active orders with an observation since rigd last started: a progress report
        shows what was seen, never a reading from before an outage."""
        return [o for o in self.active() if o.last_obs_ts is not None and not o.unwatched]

    def reports_due(self, now: float) -> list[Order]:
        due = []
        for o in self._reportable():
            if now >= o.last_report_ts + self.grid.report_interval_s:
                o.last_report_ts = now
                due.append(o)
        return due

    def next_report_at(self) -> float | None:
        """When the next progress report is due (None: no order to report on)."""
        due = [o.last_report_ts + self.grid.report_interval_s for o in self._reportable()]
        return min(due) if due else None

    # -- heartbeat and failsafe -------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        f = self.failsafe
        hb = self.grid.heartbeat
        lost = hb is not None and (
            f.last_heartbeat is None or now - f.last_heartbeat > hb.timeout_s
        )
        if lost or f.back_since is None:
            f.back_since = now
        f.last_heartbeat = now
        f.heartbeats += 1

    def heartbeat_lost(self, now: float) -> bool:
        hb = self.grid.heartbeat
        f = self.failsafe
        return hb is not None and (
            f.last_heartbeat is None or now - f.last_heartbeat > hb.timeout_s
        )

    def _armed(self, hb: HeartbeatRules) -> bool:
        return hb.always or any(o.end is None for o in self.active())

    def _run_failsafe(self, now: float) -> list[Note]:
        hb = self.grid.heartbeat
        if hb is None:
            return []
        f = self.failsafe
        lost = self.heartbeat_lost(now)
        if lost:
            f.back_since = None
        if f.since is None:
            if lost and self._armed(hb):
                f.since = now
                f.fresh_order_at = None
                return [
                    Note(
                        "failsafe_on",
                        detail=f"no heartbeat for {hb.timeout_s:g} s: "
                        f"cap {hb.failsafe_kw:g} kW for at least {hb.min_failsafe_s:g} s",
                    )
                ]
            return []
        if now - f.since < hb.min_failsafe_s:
            return []
        if f.fresh_order_at is not None:
            why = "a fresh order arrived"
        elif not lost and f.back_since is not None and now - f.back_since >= hb.recovery_s:
            why = f"heartbeat back for {now - f.back_since:.0f} s"
        else:
            return []
        f.since = None
        f.fresh_order_at = None
        return [Note("failsafe_off", detail=why)]


def _target(t: Target) -> dict[str, Any]:
    return {k: v for k, v in t.model_dump().items() if v is not None}


def report_doc(
    site: str, o: Order, now: float, rigs: dict[str, int] | None, final: bool
) -> dict[str, Any]:
    """The report document (orders.Report) for one order. Its figures are those of the
    order's last observation; `rigs` None (nothing seen) is reported as {}."""
    return {
        "site": site,
        "order_id": o.order_id,
        "modification": o.modification,
        "type": "final" if final else "progress",
        "status": o.status,
        "ts": now,
        "start": o.start,
        "end": o.end if not final or o.ended_at is None else o.ended_at,
        "deadline": o.deadline,
        "target_kw": None if o.cap_kw is None else round(o.cap_kw, 3),
        "measured_kw": None if o.last_kw is None else round(o.last_kw, 3),
        "basis": o.last_basis,
        "baseline_kw": None if o.baseline_kw is None else round(o.baseline_kw, 3),
        "compliant": o.compliant,
        # From the start of the current target's obligation (a modify's new target).
        "time_to_comply_s": None
        if o.first_compliant_at is None
        else round(max(0.0, o.first_compliant_at - (o.obliged_since or o.start)), 3),
        "seconds_out_of_compliance": round(o.out_of_compliance_s, 3),
        "seconds_over_target": round(o.over_s, 3),
        "max_overshoot_kw": round(o.max_overshoot_kw, 3),
        "energy_shed_kwh": round(o.energy_shed_kwh, 4),
        "rigs": rigs or {},
        "data_gap_s": round(o.data_gap_s, 3),
        "missed_reports": 0,
    }
