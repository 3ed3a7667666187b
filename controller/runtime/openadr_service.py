"""The OpenADR service: rigd as an OpenADR 3.1 VEN, its events in the grid order book.

It finds or registers its ven and resources on the VTN, discovers the VTN's MQTT notifier
binding, and listens on its VEN's event topics (adapters/openadr). It reads the events in
force over REST at start, on every MQTT (re)connect and every `resync_interval_s`; without
an MQTT binding it polls at a jittered `poll_interval_s`. A notification only says which
event to read again: an event the REST API does not confirm is not acted on.

Events become orders in the same `OrderBook` as signed grid orders (core/grid/
openadr_events.py), so the cap chain (`cap_source: "grid"`, the order `oadr.<event>.<i>`),
compliance, the failsafe, persistence, audit and `rigctl grid status` are shared. The
book is saved before the control loop is kicked, and the service's own state (events
seen, their first sighting and randomizeStart offset, interval tallies, undelivered
reports) in the same state database, so a daemon killed with -9 resumes under the same
caps, and reports that could not be delivered wait in its outbox.

A VTN that is unreachable, answers 401/403/5xx, or sends an event that does not validate
changes nothing in force: the service logs it once (`openadr_vtn_failed`,
`openadr_event_invalid`), shows it in the state document's `openadr` key (MQTT `state`,
`rigctl status`) and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from controller.adapters.openadr.client import VtnClient, VtnError
from controller.adapters.openadr.notifier import Notifier, parse_binding
from controller.adapters.store import StateStore, StoreError
from controller.config import Config, GridConfig
from controller.config.openadr import OpenADRConfig
from controller.core.grid.book import ACTIVE, OPEN
from controller.core.grid.openadr_events import (
    ORDER_PREFIX,
    Event,
    EventError,
    Known,
    SiteRules,
    Slot,
    applies,
    changes,
    parse_event,
    randomize_range_s,
    resolve,
    slots,
)
from controller.core.grid.openadr_reports import (
    Tally,
    operating_state,
    report_plan,
    report_request,
)
from controller.core.grid.orders import Cancel, Curtail
from drivers.telemetry import RigState

if TYPE_CHECKING:
    from controller.core.snapshot import SiteSnapshot
    from controller.core.status import ControlStatus
    from controller.runtime.clock import Clock
    from controller.runtime.grid_service import GridService

log = structlog.get_logger(__name__)

STORE_KEY = "openadr.state"
MAX_OUTBOX = 500
KEEP_ENDED_S = 86_400.0  # an ended event's record is kept this long (its final report)


def grid_config_for_openadr(cfg: Config) -> Config:
    """A config whose `[grid]` lets the grid service keep OpenADR's orders when the site
    takes no signed orders: no keys, unsigned refused, so nothing else gets in."""
    return cfg.model_copy(update={"grid": GridConfig(allow_unsigned=False)})


class OpenADRService:
    def __init__(
        self,
        cfg: Config,
        grid: GridService,
        store: StateStore,
        *,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        assert cfg.openadr is not None and cfg.control is not None
        self.cfg: OpenADRConfig = cfg.openadr
        self.site = cfg.site.id
        self.grid = grid
        self.store = store
        self.clock = clock
        self.now = clock.now
        self.rng = rng or random.Random()
        self.client = VtnClient(self.cfg, now=self.now)
        self.resource_names = [self.cfg.resource_name or self.site]
        if cfg.zone is not None:
            zone = cfg.zone.id or self.site
            if zone not in self.resource_names:
                self.resource_names.append(zone)
        c = self.cfg
        self.rules = SiteRules(
            max_import_kw=cfg.control.max_import_kw,
            levels_kw=None if c.levels_kw is None else tuple(c.levels_kw),
            levels_pct=tuple(c.levels_pct),
            alert_level=c.alert_level,
            targets=frozenset({c.ven_name, *self.resource_names, *c.targets}),
            programs=frozenset(c.programs),
        )
        self.idle_kw = max(1.0, cfg.control.max_import_kw * 0.02)
        self.max_gap_s = max(60.0, 3 * cfg.poll.interval_s)
        self.cert_dir = Path(cfg.site.state_dir) / "openadr"
        self.iss = f"openadr:{urlsplit(self.cfg.vtn_url).hostname}"
        # health, for the state document and rigctl status
        self.status = "starting"
        self.last_error: str | None = None
        self.last_sync: float | None = None
        self.invalid_events = 0
        self.unconfirmed = 0
        self.notifier: Notifier | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._failing = asyncio.Event()  # set on a VTN failure: the resync wait ends
        self._load()
        log.info(
            "openadr_loaded",
            vtn=self.cfg.vtn_url,
            ven_name=self.cfg.ven_name,
            events=sorted(self.events),
            outbox=len(self.outbox),
        )

    # -- persistence ----------------------------------------------------------------------

    def _load(self) -> None:
        try:
            d = self.store.get(STORE_KEY) or {}
        except StoreError as e:
            log.error("openadr_state_unreadable", error=str(e))
            d = {}
        self.ven_id: str | None = d.get("ven_id")
        self.events: dict[str, dict[str, Any]] = d.get("events", {})
        self.outbox: list[dict[str, Any]] = d.get("outbox", [])
        self.seq = int(d.get("seq", 0))

    def _state(self) -> dict[str, Any]:
        return {
            "ven_id": self.ven_id,
            "events": self.events,
            "outbox": self.outbox,
            "seq": self.seq,
        }

    def _save(self, *, book: bool = False) -> None:
        items: dict[str, Any] = {STORE_KEY: self._state()}
        if book:
            items["grid.book"] = self.grid.book.as_dict()
        try:
            self.store.put_many(items)
        except StoreError as e:
            log.error("openadr_state_write_failed", error=str(e))

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="openadr"),
            asyncio.create_task(self._flush_loop(), name="openadr-reports"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.client.close()

    def _ok(self) -> None:
        if self.status not in ("ok", "starting"):
            log.info("openadr_vtn_recovered", vtn=self.cfg.vtn_url, was=self.status)
        self.status = "ok"
        self.last_error = None

    def _failed(self, e: VtnError, doing: str) -> None:
        status = {
            "unreachable": "unreachable",
            "auth": "auth_failed",
            "server": "vtn_error",
            "refused": "refused",
            "bad_answer": "bad_answer",
        }[e.kind]
        if status != self.status or e.detail != self.last_error:
            log.error(
                "openadr_vtn_failed",
                doing=doing,
                kind=e.kind,
                http_status=e.status,
                error=e.detail,
                vtn=self.cfg.vtn_url,
                orders_kept=[o.order_id for o in self._oadr_orders() if o.status in OPEN],
            )
        self.status = status
        self.last_error = e.detail
        self._failing.set()

    async def _run(self) -> None:
        """Enrol, discover the notifier, listen; on any VTN failure start over, backing off."""
        backoff = 1.0
        while True:
            try:
                await self._session()
            except VtnError as e:
                self._failed(e, "connecting")
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the farm's control
                log.exception("openadr_service_error")
            finally:
                if self.notifier is not None:
                    self.notifier = None
            await asyncio.sleep(backoff * (0.5 + self.rng.random()))
            backoff = min(backoff * 2, max(5.0, self.cfg.poll_interval_s))

    async def _enrol(self) -> str:
        ven = await self.client.ven(self.cfg.ven_name)
        ven_id = str(ven["id"])
        for name in self.resource_names:
            await self.client.resource(ven_id, name)
        if ven_id != self.ven_id:
            self.ven_id = ven_id
            self._save()
        return ven_id

    async def _session(self) -> None:
        ven_id = await self._enrol()
        binding = parse_binding(await self.client.notifiers())
        if binding is None:
            log.info("openadr_polling", every_s=self.cfg.poll_interval_s)
            while True:
                await self.sync()
                j = self.cfg.poll_interval_s * (0.8 + 0.4 * self.rng.random())
                await self.clock.sleep(j)
        topics = await self.client.ven_event_topics(ven_id)
        wanted = (
            [topics["ALL"]]
            if "ALL" in topics
            else [t for k, t in topics.items() if k in ("CREATE", "UPDATE", "DELETE")]
        )
        self.notifier = Notifier(
            binding,
            wanted,
            identifier=f"rigd-ven-{self.site}-{self.rng.randrange(1 << 24):06x}",
            client_id=self.cfg.client_id,
            token=self.client.token,
            on_message=self.on_notification,
            on_connect=self.sync,
            keepalive_s=self.cfg.mqtt_keepalive_s,
            ca_file=self.cfg.mqtt_ca_file,
            cert_dir=self.cert_dir,
        )
        listening = asyncio.create_task(self.notifier.run(), name="openadr-mqtt")
        try:
            await self.sync()  # at start, before the broker has said anything
            while True:
                if self.status == "ok":  # until the next resync, or a failure
                    self._failing.clear()
                    await _first(self.clock.sleep(self.cfg.resync_interval_s), self._failing.wait())
                if self.status != "ok":
                    # While the VTN fails, read again at the poll interval: a notification
                    # that could not be confirmed meanwhile is caught up then.
                    await self.clock.sleep(
                        min(self.cfg.resync_interval_s, self.cfg.poll_interval_s)
                    )
                await self.sync()
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

    # -- events in ------------------------------------------------------------------------

    async def sync(self) -> None:
        """Read every event in force over REST and bring the book to them."""
        async with self._sync_lock:
            try:
                docs = await self.client.events()
            except VtnError as e:
                self._failed(e, "reading events")
                return
            self._ok()
            self.last_sync = self.now()
            self.merge(docs, complete=True)

    async def on_notification(self, topic: str, payload: bytes) -> None:
        """A notification names an event; only the REST API's answer is acted on."""
        try:
            note = json.loads(payload)
            obj = note["object"]
            kind, event_id = note.get("objectType"), obj["id"]
        except (ValueError, TypeError, KeyError):
            log.warning("openadr_notification_malformed", topic=topic, size=len(payload))
            return
        if kind != "EVENT" or not isinstance(event_id, str):
            return
        async with self._sync_lock:
            try:
                doc = await self.client.event(event_id)
            except VtnError as e:
                self._failed(e, f"confirming event {event_id}")
                return
            self._ok()
            if doc is None:
                if event_id in self.events and not self.events[event_id].get("deleted_at"):
                    log.info("openadr_event_deleted", event_id=event_id, via="notification")
                    self._deleted(event_id)
                    self.reconcile()
                else:
                    self.unconfirmed += 1
                    log.warning(
                        "openadr_notification_unconfirmed",
                        event_id=event_id,
                        operation=note.get("operation"),
                        detail="the VTN's REST API does not have this event: not acted on",
                    )
                return
            self.merge([doc], complete=False)

    def merge(self, docs: list[Any], *, complete: bool) -> None:
        """Take in events read from the VTN; with `complete`, the VTN's whole list (an
        event missing from it was deleted)."""
        now = self.now()
        seen: set[str] = set()
        for doc in docs:
            raw_id = doc.get("id") if isinstance(doc, dict) else None
            if isinstance(raw_id, str):
                seen.add(raw_id)  # an invalid new version keeps the old one in force
            try:
                ev = parse_event(doc)
                rec = self.events.get(ev.id)
                first_seen = now if rec is None else float(rec["first_seen"])
                r = randomize_range_s(ev)
                offset = (
                    float(rec["offset_s"])
                    if rec is not None and rec.get("range_s") == r
                    else (self.rng.uniform(-r, r) if r else 0.0)
                )
                slots(ev, self.rules, first_seen=first_seen, offset_s=offset)  # checks it
            except EventError as e:
                self.invalid_events += 1
                log.error(
                    "openadr_event_invalid",
                    event_id=raw_id,
                    error=str(e),
                    detail="not acted on; what was in force stays in force",
                )
                continue
            if not applies(ev, self.rules):
                if rec is not None and not rec.get("deleted_at"):
                    log.info("openadr_event_no_longer_targets_us", event_id=ev.id)
                    self._deleted(ev.id)
                continue
            stored = ev.model_dump(mode="json", exclude_none=True)
            if rec is None:
                log.info(
                    "openadr_event_received",
                    event_id=ev.id,
                    name=ev.eventName,
                    program_id=ev.programID,
                    randomize_offset_s=round(offset, 1),
                )
                self.events[ev.id] = {
                    "doc": stored,
                    "first_seen": first_seen,
                    "offset_s": offset,
                    "range_s": r,
                    "tallies": {},
                    "reported": [],
                    "last_report": 0.0,
                }
            elif rec.get("doc") != stored or rec.get("deleted_at"):
                log.info("openadr_event_updated", event_id=ev.id, modified=ev.modificationDateTime)
                rec.update(
                    doc=stored, offset_s=offset, range_s=r, deleted_at=None, final_sent=False
                )
        if complete:
            for event_id, rec in self.events.items():
                if event_id not in seen and not rec.get("deleted_at"):
                    log.info("openadr_event_deleted", event_id=event_id, via="rest")
                    self._deleted(event_id)
        self.reconcile()

    def _deleted(self, event_id: str) -> None:
        self.events[event_id]["deleted_at"] = self.now()

    def _event(self, rec: dict[str, Any]) -> Event:
        return Event.model_validate(rec["doc"])

    def _slots(self, rec: dict[str, Any]) -> list[Slot]:
        return slots(
            self._event(rec),
            self.rules,
            first_seen=float(rec["first_seen"]),
            offset_s=float(rec["offset_s"]),
        )

    def _oadr_orders(self) -> list[Any]:
        return [o for o in self.grid.book.orders.values() if o.order_id.startswith(ORDER_PREFIX)]

    def reconcile(self) -> None:
        """Bring the book's OpenADR orders to the events in force; save; kick control."""
        now = self.now()
        all_slots: list[Slot] = []
        for rec in self.events.values():
            if not rec.get("deleted_at"):
                all_slots.extend(self._slots(rec))
        known = {
            o.order_id: Known(
                o.modification, o.start, o.end, o.cap_kw, o.status in OPEN, o.status == ACTIVE
            )
            for o in self._oadr_orders()
        }
        specs = resolve(all_slots)
        for event_id, rec in self.events.items():
            rec["orders"] = [sp.order_id for sp in specs if sp.event_id == event_id] or rec.get(
                "orders", []
            )
        self.seq += 1
        try:
            ch = changes(
                specs,
                known,
                now=now,
                site=self.site,
                respond_within_s=self.cfg.respond_within_s,
                iss=self.iss,
                jti_base=f"oadr-{self.seq}",
            )
        except ValueError as e:  # an order the book's own model refuses: keep what is
            log.error(
                "openadr_orders_not_made",
                error=str(e)[:300],
                detail="what was in force stays in force",
            )
            return
        msgs: list[Cancel | Curtail] = [*ch.cancel, *ch.curtail]
        for msg in msgs:
            outcome = self.grid.book.apply(msg, now, signed=True, kid=None)
            o = outcome.order
            fields = {
                "order_id": msg.order_id,
                "kind": msg.kind,
                "modification": msg.modification,
                "cap_kw": None if o is None or o.cap_kw is None else round(o.cap_kw, 3),
                "start": getattr(msg, "start", None),
                "end": getattr(msg, "end", None),
            }
            (log.info if outcome.accepted else log.warning)(
                "openadr_order_applied" if outcome.accepted else "openadr_order_refused",
                reason=outcome.reason,
                detail=outcome.detail,
                **fields,
            )
            try:
                self.store.audit(
                    ts=now,
                    actor=self.iss,
                    action=f"grid_{msg.kind}",
                    rig_id=None,
                    params={k: v for k, v in fields.items() if v is not None},
                    reason=f"OpenADR event {msg.order_id.split('.')[1]}",
                    result="accepted" if outcome.accepted else f"rejected:{outcome.reason}",
                )
            except StoreError as e:
                log.error("audit_write_failed", error=str(e))
        self._save(book=bool(ch))
        if ch:
            self.grid.kick.set()

    # -- reports out ----------------------------------------------------------------------

    def after_step(self, now: float, snap: SiteSnapshot, status: ControlStatus | None) -> None:
        plan = status.plan if status is not None else None
        kw = plan.measured_kw if plan is not None else None
        orders = {o.order_id: o for o in self._oadr_orders()}
        changed = False
        for event_id, rec in list(self.events.items()):
            deleted = rec.get("deleted_at")
            if deleted and now - float(deleted) > KEEP_ENDED_S:
                del self.events[event_id]
                changed = True
                continue
            if rec.get("final_sent"):
                continue  # over and reported: nothing more to measure
            try:
                ev = self._event(rec)
                ev_slots = self._slots(rec) if not deleted else []
            except EventError:
                continue
            ids = rec.get("orders", [])
            mine = [
                o
                for oid, o in orders.items()
                if oid in ids or any(oid.startswith(f"{i}-r") for i in ids)
            ]
            curtailed = any(o.status == ACTIVE for o in mine)
            state = operating_state(curtailed=curtailed, import_kw=kw, idle_kw=self.idle_kw)
            tallies = {k: Tally.from_dict(t) for k, t in rec["tallies"].items()}
            for s in ev_slots:
                if s.key not in tallies:
                    tallies[s.key] = Tally(
                        s.key, s.interval_id, s.start, None if s.end == float("inf") else s.end
                    )
                t = tallies[s.key]
                t.start, t.end = s.start, None if s.end == float("inf") else s.end
                of_slot = [o for o in mine if _base_id(o.order_id).endswith(f".{s.key}")]
                order = of_slot[-1] if of_slot else None
                if order is not None and order.baseline_kw is not None:
                    t.baseline_kw = order.baseline_kw
            if not deleted:  # a deleted event's figures stop where it was deleted
                for t in tallies.values():
                    t.observe(now, kw, state, self.max_gap_s)
            rec["tallies"] = {k: t.as_dict() for k, t in tallies.items()}
            changed = True
            self._reports_due(event_id, rec, ev, tallies, now, snap, bool(deleted))
        if changed:
            self._save()
        if self.outbox and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.ensure_future(self._flush())

    def _reports_due(
        self,
        event_id: str,
        rec: dict[str, Any],
        ev: Event,
        tallies: dict[str, Tally],
        now: float,
        snap: SiteSnapshot,
        deleted: bool,
    ) -> None:
        if rec.get("final_sent") or not tallies:
            return
        open_ended = any(t.end is None for t in tallies.values())
        plan = report_plan(ev, tuple(self.cfg.default_reports), open_ended)
        measured = [t for t in plan.types if t != "LOAD_SHED_DELTA_AVAILABLE"]
        reported = set(rec.get("reported", []))
        ordered = sorted(tallies.values(), key=lambda t: t.start)
        first = ordered[0].start
        # Ahead of the event: what the site could shed, per upcoming interval.
        if (
            "LOAD_SHED_DELTA_AVAILABLE" in plan.types
            and not rec.get("shed_sent")
            and now < first <= now + self.cfg.shed_available_lead_s
        ):
            self._queue(
                event_id, ("LOAD_SHED_DELTA_AVAILABLE",), ordered, now, shed_kw=_running_kw(snap)
            )
            rec["shed_sent"] = True
        if not measured:
            return
        ended = [t for t in ordered if t.end is not None and t.end <= now]
        all_over = deleted or len(ended) == len(ordered)
        fresh = [t for t in ended if t.key not in reported]
        send: list[Tally] = []
        if plan.mode == "every_n":
            if len(fresh) >= plan.every_n or (all_over and fresh):
                send = fresh
        elif plan.mode == "end":
            if all_over:
                send = [t for t in ordered if t.start <= now]
        else:
            # the first report one interval into the event, not at its first observation
            last = float(rec.get("last_report") or max(first, float(rec["first_seen"])))
            if all_over or now - last >= self.cfg.report_interval_s:
                send = [t for t in ordered if t.start <= now and t.key not in reported]
        if send and now >= first:
            self._queue(event_id, tuple(measured), send, now)
            rec["last_report"] = now
            rec["reported"] = sorted(reported | {t.key for t in send if t in ended})
        if all_over and now >= first:
            rec["final_sent"] = True

    def _queue(
        self,
        event_id: str,
        types: tuple[str, ...],
        tallies: list[Tally],
        now: float,
        shed_kw: float | None = None,
    ) -> None:
        assert self.cfg is not None
        self.seq += 1
        doc = report_request(
            event_id=event_id,
            client_name=self.cfg.ven_name,
            resource_name=self.resource_names[0],
            report_name=f"rigd {self.site} {event_id} #{self.seq}",
            types=types,
            tallies=tallies,
            now=now,
            shed_kw=shed_kw,
        )
        self.outbox.append(doc)
        if len(self.outbox) > MAX_OUTBOX:
            dropped = self.outbox.pop(0)
            log.error(
                "openadr_report_dropped",
                event_id=dropped.get("eventID"),
                detail=f"more than {MAX_OUTBOX} reports undelivered",
            )

    async def _flush(self) -> None:
        """Post the waiting reports in order; stop at the first the VTN cannot take now."""
        sent = 0
        while self.outbox:
            doc = self.outbox[0]
            try:
                await self.client.post_report(doc)
            except VtnError as e:
                if e.kind == "refused":  # the VTN will never take this one
                    log.error("openadr_report_refused", event_id=doc.get("eventID"), error=e.detail)
                    self.outbox.pop(0)
                    continue
                self._failed(e, "posting a report")
                break
            self.outbox.pop(0)
            sent += 1
        if sent:
            log.debug("openadr_reports_sent", count=sent, waiting=len(self.outbox))
            self._save()

    async def _flush_loop(self) -> None:
        """Retry waiting reports even when no cycle brings new ones."""
        while True:
            await asyncio.sleep(2.0)
            if self.outbox and (self._flushing is None or self._flushing.done()):
                self._flushing = asyncio.ensure_future(self._flush())

    # -- views ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The `openadr` part of the state document (and of `rigctl status`)."""
        n = self.notifier
        return {
            "vtn": self.cfg.vtn_url,
            "status": self.status,
            "error": self.last_error,
            "ven_id": self.ven_id,
            "mqtt": "polling"
            if n is None and self.status == "ok"
            else ("connected" if n is not None and n.connected else "disconnected"),
            "last_sync": self.last_sync,
            "events": sorted(k for k, r in self.events.items() if not r.get("deleted_at")),
            "invalid_events": self.invalid_events,
            "unconfirmed_notifications": self.unconfirmed,
            "reports_waiting": len(self.outbox),
            "token_expires_at": self.client.token_expires_at or None,
        }


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of `aws` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def _base_id(order_id: str) -> str:
    """An order's id without the `-r<n>` of an interval that went on after a closed order."""
    return re.sub(r"-r\d+$", "", order_id)


def _running_kw(snap: SiteSnapshot) -> float:
    """The power of the rigs still running: what the site could shed."""
    w = 0.0
    for rig in snap.rigs.values():
        if rig.state in (RigState.MINING, RigState.WAKING):
            w += rig.power_w or 0.0
    return w / 1000.0
