"""The grid service: MQTT messages in, the order book, acks and reports out, limits to control.

It sits between the daemon's MQTT link, the state database and the control loop, and
holds no decision of its own: `verify` says whether a message is genuine, `book` what
it means. What it guarantees is ordering: an order is in the state database (seen jti,
book, queued ack, one transaction) before the broker gets our PUBACK; the limits of
active orders are handed to the controller when the service is built, before the
daemon first connects, so a restart never opens a window of uncurtailed load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from controller.adapters.grid import topics
from controller.adapters.grid.verify import Rejected, Verified, Verifier, load_keys
from controller.adapters.mqtt import MqttLink, encode
from controller.adapters.store import StateStore, StoreError
from controller.config import Config, GridConfig
from controller.core.grid.book import (
    CANCELLED,
    COMPLETED,
    GridRules,
    HeartbeatRules,
    Note,
    Order,
    OrderBook,
    Outcome,
    report_doc,
)
from controller.core.planner import Mode
from controller.runtime.timeline import Timeline
from drivers.telemetry import RigState

if TYPE_CHECKING:
    from controller.core.snapshot import SiteSnapshot
    from controller.core.status import ControlStatus
    from controller.runtime.clock import Clock
    from controller.runtime.control import Controller

log = structlog.get_logger(__name__)


def grid_rules(grid: GridConfig) -> GridRules:
    """The order book's rules from the `[grid]` config section."""
    hb = grid.heartbeat
    return GridRules(
        respond_within_s=grid.respond_within_s,
        report_interval_s=grid.report_interval_s,
        levels_kw=None if grid.levels_kw is None else tuple(grid.levels_kw),
        levels_pct=tuple(grid.levels_pct),
        heartbeat=None
        if hb is None
        else HeartbeatRules(
            timeout_s=hb.timeout_s,
            failsafe_kw=hb.failsafe_kw,
            min_failsafe_s=hb.min_failsafe_s,
            recovery_s=hb.recovery_s,
            always=hb.always,
        ),
    )


class GridService:
    def __init__(
        self,
        cfg: Config,
        store: StateStore,
        link: MqttLink | None,
        *,
        now: Callable[[], float],
    ) -> None:
        assert cfg.grid is not None and cfg.control is not None
        self.grid: GridConfig = cfg.grid
        self.site = cfg.site.id
        self.store = store
        self.link = link
        self.now = now
        self.verifier = Verifier(self.grid, self.site, load_keys(self.grid))
        self.book = OrderBook(
            grid_rules(self.grid),
            cfg.control.max_import_kw,
            max_gap_s=max(60.0, 3 * cfg.poll.interval_s),
        )
        self.book.load(store.get("grid.book"), now())
        base = f"rigd/{self.site}/grid"
        self.orders_topic = f"{base}/orders"
        self.acks_topic = f"{base}/acks"
        self.reports_subtopic = "grid/reports"
        self.kick = asyncio.Event()  # set when limits changed: run a control cycle now
        self.timeline: Timeline | None = None  # the newest such order's way to its commands
        # Called once such an order is stored and its ack handed to the link: the daemon's
        # first commands for it (controller.runtime.daemon.Daemon.shed_now).
        self.on_lowered: Callable[[], None] | None = None
        self.rejected = 0
        self._hb_iat = 0.0  # newest signed heartbeat: an older one is a replay
        if link is not None:
            link.subscribe(self.orders_topic, 1)
            if self.grid.heartbeat is not None:
                link.subscribe(self.grid.heartbeat.topic, 0)
            link.on_message = self.on_message
            for row_id, topic, payload, corr in store.outbox():
                link.send(topic, payload, correlation=corr, done=partial(self._sent, row_id))
        log.info(
            "grid_orders_loaded",
            open=[o.order_id for o in self.book.open_orders()],
            failsafe=self.book.failsafe.since is not None,
            keys=len(self.verifier.keys),
            unsigned_allowed=self.grid.allow_unsigned,
        )

    # -- to and from the control loop -----------------------------------------------------

    def attach(self, controller: Controller) -> None:
        """Hand the limits of the orders in force (and the compliance deadline) to control."""
        limits = self.book.limits()
        for name in [n for n in controller.external if n.startswith("grid:")]:
            if name not in limits:
                controller.set_external(name, None)
        for name, lim in limits.items():
            controller.set_external(name, lim)
        controller.comply_by = self.book.comply_by()

    def before_step(self, now: float, controller: Controller | None) -> None:
        for note in self.book.tick(now):
            self._noted(note, now)
        if controller is not None:
            self.attach(controller)

    def after_step(
        self,
        now: float,
        snap: SiteSnapshot,
        status: ControlStatus | None,
        controller: Controller | None,
    ) -> None:
        plan = status.plan if status is not None else None
        kw = plan.measured_kw if plan is not None else None
        basis = plan.basis if plan is not None else None
        rigs = self._rig_counts(snap, controller) if self.book.active() else None
        self.book.observe(now, kw, basis, rigs)
        self.send_reports(now)  # also the timer's job (run_reports): whichever comes first
        if controller is not None:
            controller.comply_by = self.book.comply_by()
        self._save()

    def send_reports(self, now: float) -> None:
        """The progress reports due at `now`, each with its order's last observation."""
        due = self.book.reports_due(now)
        if due and self.link is not None:
            for o in due:
                self.link.set_latest(
                    f"report:{o.order_id}",
                    self.reports_subtopic,
                    report_doc(self.site, o, now, o.rigs, final=False),
                )

    async def run_reports(self, clock: Clock, stop: asyncio.Event) -> None:
        """Send progress reports when they are due, not when a control cycle happens to
        end: with a poll interval longer than `report_interval_s`, checking once a cycle
        sent them an interval late. Until `stop`."""
        every = self.grid.report_interval_s
        while not stop.is_set():
            now = self.now()
            try:
                self.send_reports(now)
            except Exception:  # a report problem must never stop the farm's control
                log.exception("grid_report_failed")
            nxt = self.book.next_report_at()
            delay = every if nxt is None else min(every, max(0.0, nxt - now))
            sleeping = asyncio.ensure_future(clock.sleep(delay))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((sleeping, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (sleeping, stopping):
                    f.cancel()

    def _rig_counts(
        self, snap: SiteSnapshot | None, controller: Controller | None
    ) -> dict[str, int]:
        counts = {"mining": 0, "sleeping": 0, "off": 0, "throttled": 0, "unreachable": 0}
        if snap is None:
            return counts
        for rig_id, rig in snap.rigs.items():
            st = rig.state
            if st in (RigState.MINING, RigState.WAKING):
                mm = controller.memory.get(rig_id) if controller is not None else None
                counts[
                    "throttled" if mm is not None and mm.mode is Mode.THROTTLE else "mining"
                ] += 1
            elif st is RigState.SLEEPING:
                counts["sleeping"] += 1
            elif st is RigState.OFF:
                counts["off"] += 1
            else:
                counts["unreachable"] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        """The `grid` part of the state document and of `rigctl grid status`."""
        now = self.now()
        f = self.book.failsafe
        hb = self.grid.heartbeat
        return {
            "active": [o.summary() for o in self.book.active()],
            "pending": [o.summary() for o in self.book.open_orders() if o.status == "pending"],
            "failsafe": f.since is not None,
            "failsafe_since": f.since,
            "heartbeat_age_s": None
            if hb is None or f.last_heartbeat is None
            else round(now - f.last_heartbeat, 1),
        }

    def orders(self) -> list[dict[str, Any]]:
        out = []
        for o in sorted(self.book.orders.values(), key=lambda o: o.received_at):
            d = o.summary()
            d["revisions"] = [r.modification for r in o.revisions]
            d["ended_at"] = o.ended_at
            out.append(d)
        return out

    # -- messages -------------------------------------------------------------------------

    async def on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload
        raw = payload if isinstance(payload, bytes) else str(payload or "").encode()
        if topic == self.orders_topic:
            props = message.properties
            resp = getattr(props, "ResponseTopic", None) if props is not None else None
            corr = getattr(props, "CorrelationData", None) if props is not None else None
            self.handle_order(raw, response_topic=resp, correlation=corr)
        elif self.grid.heartbeat is not None and topic == self.grid.heartbeat.topic:
            self.handle_heartbeat(raw)

    def _reply_topic(self, response_topic: str | None) -> str:
        """The MQTT 5 response topic if it is a sane one, else rigd/<site>/grid/acks.

        A message may name any response topic, and we refuse to be made to publish on
        rigd's own topics or the broker's (grid/topics.py); a refusal is logged."""
        if not response_topic:
            return self.acks_topic
        hb = self.grid.heartbeat
        why = topics.refusal(
            response_topic,
            site=self.site,
            heartbeat_topic=hb.topic if hb is not None else None,
            used_by_rigd=self.link.used_topic if self.link is not None else None,
        )
        if why is not None:
            log.warning(
                "grid_response_topic_refused",
                response_topic=response_topic[:300],
                why=why,
                ack_topic=self.acks_topic,
            )
            return self.acks_topic
        return response_topic

    def _ack(self, **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "site": self.site,
            "jti": None,
            "kind": None,
            "order_id": None,
            "modification": None,
            "status": "accepted",
            "reason": None,
            "detail": "",
            "received_at": self.now(),
            "duplicate": False,
            "order_status": None,
            "cap_kw": None,
        }
        doc.update(fields)
        return doc

    def handle_order(
        self, raw: bytes, *, response_topic: str | None = None, correlation: bytes | None = None
    ) -> dict[str, Any]:
        """Verify, apply, persist and acknowledge one message; returns the ack document."""
        timeline = Timeline()
        now = self.now()
        reply_to = self._reply_topic(response_topic)
        try:
            v = self.verifier.verify(raw, now)
        except Rejected as r:
            ack = self._ack(status="rejected", reason=r.reason, detail=r.detail, **r.hint)
            self._rejected(ack, raw)
            self._publish(reply_to, ack, correlation, persist=False)
            return ack
        msg = v.message
        timeline.mark("verified")
        seen = self.store.grid_seen(msg.jti)
        if seen is not None:
            digest, old_ack = seen
            if digest == v.digest:  # the broker redelivered it: answer the same again
                ack = {**old_ack, "duplicate": True}
                log.info("grid_order_redelivered", jti=msg.jti)
                self._publish(reply_to, ack, correlation, persist=False)
                return ack
            ack = self._ack(
                status="rejected",
                reason="replayed",
                detail=f"jti {msg.jti!r} was already used by another message",
                jti=msg.jti,
                kind=msg.kind,
                order_id=getattr(msg, "order_id", None),
            )
            self._rejected(ack, raw)
            self._publish(reply_to, ack, correlation, persist=False)
            return ack
        outcome = self.book.apply(msg, now, signed=v.signed, kid=v.kid)
        ack = self._outcome_ack(v, outcome)
        if outcome.accepted:
            log.info(
                "grid_order_accepted",
                jti=msg.jti,
                kind=msg.kind,
                order_id=ack["order_id"],
                modification=ack["modification"],
                order_status=ack["order_status"],
                cap_kw=ack["cap_kw"],
                signed=v.signed,
                kid=v.kid,
                iss=msg.iss,
            )
        else:
            self._rejected(ack, raw, audit=False)  # audited below, with the order
        outbox = [(reply_to, encode(ack), correlation)]
        final: Order | None = None
        if outcome.accepted and outcome.order is not None and outcome.order.status == CANCELLED:
            final = outcome.order
            doc = report_doc(self.site, final, now, final.rigs, final=True)
            outbox.append((f"rigd/{self.site}/{self.reports_subtopic}", encode(doc), None))
        self._audit(v, ack)
        try:
            ids = self.store.grid_accept(
                jti=msg.jti,
                digest=v.digest,
                exp=msg.exp + self.grid.clock_skew_s,
                ack=ack,
                state=self.book.as_dict() if outcome.accepted else None,
                outbox=outbox,
                prune_before=now,
            )
        except StoreError as e:
            # Obeying is still safe (orders only lower the cap); say so loudly.
            log.error("grid_state_write_failed", error=str(e), jti=msg.jti)
            ids = [0] * len(outbox)
        timeline.mark("stored")
        if self.link is not None:
            for row_id, (topic, payload, corr) in zip(ids, outbox, strict=True):
                self._send(topic, payload, corr, row_id)
        if outcome.changed:
            timeline.order_id = ack["order_id"]
            self.timeline = timeline
            self.kick.set()
            if self.on_lowered is not None:
                self.on_lowered()
        return ack

    def _outcome_ack(self, v: Verified, outcome: Outcome) -> dict[str, Any]:
        msg = v.message
        o = outcome.order
        fields: dict[str, Any] = {
            "jti": msg.jti,
            "kind": msg.kind,
            "order_id": getattr(msg, "order_id", None),
            "modification": getattr(msg, "modification", None),
        }
        if o is not None:
            fields.update(
                order_status=o.status,
                cap_kw=None if o.cap_kw is None else round(o.cap_kw, 3),
                modification=o.modification if outcome.accepted else fields["modification"],
            )
        if outcome.accepted:
            fields.update(detail=outcome.detail)
            if msg.kind == "ping":
                fields.update(
                    active_orders=[x.order_id for x in self.book.active()],
                    failsafe=self.book.failsafe.since is not None,
                )
            return self._ack(**fields)
        return self._ack(status="rejected", reason=outcome.reason, detail=outcome.detail, **fields)

    def _rejected(self, ack: dict[str, Any], raw: bytes, *, audit: bool = True) -> None:
        """Count, log and (unless the caller audits it with the order) audit a refusal."""
        self.rejected += 1
        if audit:
            self._audit_entry(
                actor="grid:unverified",
                action=f"grid_{ack.get('kind') or 'message'}",
                params={k: ack[k] for k in ("jti", "order_id") if ack.get(k)},
                reason=ack["detail"][:300],
                result=f"rejected:{ack['reason']}",
            )
        log.warning(
            "grid_order_rejected",
            reason=ack["reason"],
            detail=ack["detail"],
            jti=ack.get("jti"),
            kind=ack.get("kind"),
            order_id=ack.get("order_id"),
            size=len(raw),
        )

    def _audit(self, v: Verified, ack: dict[str, Any]) -> None:
        msg = v.message
        self._audit_entry(
            actor=f"grid:{msg.iss or v.kid or ('unsigned' if not v.signed else 'operator')}",
            action=f"grid_{msg.kind}",
            params={k: ack[k] for k in ("jti", "order_id", "modification", "cap_kw") if ack.get(k)},
            reason=ack["detail"] or ack["status"],
            result=ack["status"] if ack["reason"] is None else f"rejected:{ack['reason']}",
        )

    def _publish(
        self, topic: str, doc: dict[str, Any], correlation: bytes | None, *, persist: bool
    ) -> None:
        if self.link is None:
            return
        payload = encode(doc)
        row_id = 0
        if persist:
            try:
                row_id = self.store.outbox_add(topic, payload, correlation)
            except StoreError as e:
                log.error("grid_state_write_failed", error=str(e))
        self._send(topic, payload, correlation, row_id)

    def _send(self, topic: str, payload: bytes, correlation: bytes | None, row_id: int) -> None:
        """Hand a message to the link; once sent, its outbox row (if any) is done."""
        if self.link is not None:
            done = partial(self._sent, row_id) if row_id else None
            self.link.send(topic, payload, correlation=correlation, done=done)

    def _sent(self, row_id: int) -> None:
        try:
            self.store.outbox_done(row_id)
        except StoreError as e:
            log.error("grid_state_write_failed", error=str(e))

    def handle_heartbeat(self, raw: bytes) -> bool:
        """Count a heartbeat message, and nothing else (verify.py says what one is); where
        only signed orders are accepted, only a signed one."""
        now = self.now()
        try:
            if self.grid.allow_unsigned:
                self.verifier.unsigned_heartbeat(raw)
            else:
                iat = self.verifier.heartbeat(raw, now)
                if iat <= self._hb_iat:
                    raise Rejected("replayed", "a heartbeat no newer than the last one")
                self._hb_iat = iat
        except Rejected as r:
            log.warning(
                "grid_heartbeat_rejected",
                reason=r.reason,
                detail=r.detail,
                jti=r.hint.get("jti"),
                kind=r.hint.get("kind"),
            )
            return False
        self.book.heartbeat(now)
        return True

    # -- lifecycle notes ------------------------------------------------------------------

    def _noted(self, note: Note, now: float) -> None:
        o = note.order
        if note.kind in ("failsafe_on", "failsafe_off"):
            (log.warning if note.kind == "failsafe_on" else log.info)(
                f"grid_{note.kind}", detail=note.detail
            )
            self._audit_note(note.kind, note.detail)
            self.kick.set()
            return
        assert o is not None
        log.info(
            f"grid_order_{note.kind}",
            order_id=o.order_id,
            modification=o.modification,
            cap_kw=o.cap_kw,
            end=o.end,
            deadline=o.deadline,
        )
        self._audit_note(f"grid_order_{note.kind}", f"order {o.order_id}", o.order_id)
        if note.kind == COMPLETED:
            self._publish(
                f"rigd/{self.site}/{self.reports_subtopic}",
                report_doc(self.site, o, now, o.rigs, final=True),
                None,
                persist=True,
            )
        self._save()

    def _audit_note(self, action: str, detail: str, order_id: str | None = None) -> None:
        self._audit_entry(
            actor="rigd",
            action=action,
            params={"order_id": order_id} if order_id else {},
            reason=detail,
            result="ok",
        )

    def _audit_entry(
        self, *, actor: str, action: str, params: dict[str, Any], reason: str, result: str
    ) -> None:
        """An audit line; a failing disk is logged, never allowed to stop an order."""
        try:
            self.store.audit(
                ts=self.now(),
                actor=actor,
                action=action,
                rig_id=None,
                params=params,
                reason=reason,
                result=result,
            )
        except StoreError as e:
            log.error("audit_write_failed", error=str(e))

    def _save(self) -> None:
        try:
            self.store.put("grid.book", self.book.as_dict())
        except StoreError as e:
            log.error("grid_state_write_failed", error=str(e))
