"""The grid protocol's rules that an operator's client written only from
docs/grid-protocol.md relies on: what a heartbeat is, that a repeated JSON key is
malformed, which response topics rigd refuses, when progress reports go out, and what a
report says about time nobody watched (a daemon killed and restarted mid-order)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from bench.sim_harness import SimHarness
from controller.adapters.grid.verify import Rejected, Verifier, load_keys
from controller.adapters.mqtt import MqttLink
from controller.adapters.store import StateStore
from controller.config import GridConfig, MqttConfig, parse_config
from controller.core.grid.book import OrderBook, report_doc
from controller.core.grid.orders import GridMessage
from controller.runtime.grid_service import GridService
from tests.grid_helpers import Operator, grid_toml, order, plain

NOW = 1_790_000_000.0
BASE = """
[site]
id = "sim"
state_dir = "{state}"
[control]
max_import_kw = 1000
"""
HEARTBEAT = '\n[grid.heartbeat]\ntopic = "op/hb"\ntimeout_s = 60\nfailsafe_kw = 100\n'


def service(
    tmp_path: Path,
    *ops: Operator,
    clock: list[float],
    allow_unsigned: bool = False,
    extra: str = "",
    link: MqttLink | None = None,
) -> GridService:
    text = BASE.format(state=tmp_path / "state") + grid_toml(
        *ops, allow_unsigned=allow_unsigned, extra=extra
    )
    cfg = parse_config(text, environ={})
    return GridService(cfg, StateStore.open(cfg.site.state_dir), link, now=lambda: clock[0])


def book(**grid: Any) -> OrderBook:
    return OrderBook(GridConfig.model_validate({"allow_unsigned": True, **grid}), 1000.0)


def apply(b: OrderBook, kind: str, now: float, **f: Any) -> Any:
    msg = GridMessage.model_validate({"message": order(kind, now=now, **f)}).message
    return b.apply(msg, now, signed=False, kid=None)


def restarted(b: OrderBook, now: float, **grid: Any) -> OrderBook:
    """The book as a new process reads it back from the state database at `now`."""
    again = book(**grid)
    again.load(json.loads(json.dumps(b.as_dict())), now)
    return again


# -- 5. a JSON object with a repeated key is malformed -----------------------------------------


def test_a_repeated_key_is_malformed_signed_or_plain_at_any_depth(tmp_path: Path) -> None:
    op = Operator.new()
    clock = [NOW]
    svc = service(tmp_path, op, clock=clock, allow_unsigned=True)
    assert svc.grid.allow_unsigned
    v = Verifier(svc.grid, "sim", load_keys(svc.grid))
    ping = json.dumps(order("ping", now=NOW, jti="dup-1"))
    # Last key wins in Python's json: this was a curtail sleeping every rig.
    two_kinds = ping[:-1] + ', "kind": "curtail", "order_id": "x", "target": {"level": 3}}'
    nested = json.dumps(order(now=NOW, jti="dup-2"))
    nested = nested.replace('"target": {', '"target": {"max_import_kw": 900, ', 1)
    assert '"max_import_kw": 900, "max_import_kw"' in nested
    for raw in (op.sign_raw(two_kinds.encode()), two_kinds.encode(), op.sign_raw(nested.encode())):
        with pytest.raises(Rejected) as e:
            v.verify(raw, NOW)
        assert e.value.reason == "malformed", e.value
        assert "more than once" in e.value.detail
    header = b'{"alg": "EdDSA", "kid": "nobody", "kid": "op-1"}'
    with pytest.raises(Rejected) as e:
        v.verify(op.sign_raw(json.dumps(order(now=NOW)).encode(), header=header), NOW)
    assert e.value.reason == "malformed" and "JWS header" in e.value.detail
    # Through the service: refused, acknowledged as such, and nothing in the book.
    ack = svc.handle_order(op.sign_raw(two_kinds.encode()))
    assert ack["status"] == "rejected" and ack["reason"] == "malformed"
    assert not svc.book.orders and not svc.book.limits()
    # The same order without the repeat is fine.
    assert svc.handle_order(op.sign_raw(ping.encode()))["status"] == "accepted"


# -- 2. only a heartbeat message resets the heartbeat ------------------------------------------


def test_a_replayed_order_or_ping_is_no_heartbeat(tmp_path: Path) -> None:
    op = Operator.new()
    clock = [NOW]
    svc = service(tmp_path, op, clock=clock, extra=HEARTBEAT)
    svc.book.failsafe.last_heartbeat = NOW
    # Anyone who reads the orders topic has these, signed by the operator.
    ping = op.sign(order("ping", now=NOW))
    curtail = op.sign(order(now=NOW, duration_s=60))
    for t in range(5, 120, 5):
        clock[0] = NOW + t
        assert not svc.handle_heartbeat(op.sign(order("ping", now=clock[0])))
        assert not svc.handle_heartbeat(ping)
        assert not svc.handle_heartbeat(curtail)
        assert not svc.handle_heartbeat(op.sign({"iat": clock[0], "site": "sim"}))  # no kind
    assert svc.book.failsafe.heartbeats == 0 and svc.book.failsafe.last_heartbeat == NOW
    assert svc.book.heartbeat_lost(NOW + 61)
    clock[0] = NOW + 120
    assert svc.handle_heartbeat(op.sign({"kind": "heartbeat", "iat": NOW + 120, "site": "sim"}))
    assert svc.book.failsafe.last_heartbeat == NOW + 120


def test_the_failsafe_starts_while_orders_are_replayed_on_the_heartbeat_topic(
    tmp_path: Path,
) -> None:
    op = Operator.new()
    clock = [NOW]
    extra = HEARTBEAT + "always = true\n"
    svc = service(tmp_path, op, clock=clock, extra=extra)
    svc.book.load(None, NOW)
    for t in range(10, 200, 10):
        clock[0] = NOW + t
        svc.handle_heartbeat(op.sign(order("ping", now=clock[0])))
        svc.before_step(clock[0], None)
    assert svc.book.failsafe.since is not None and "grid:failsafe" in svc.book.limits()


def test_where_unsigned_is_allowed_any_payload_but_another_kind_of_message_counts(
    tmp_path: Path,
) -> None:
    clock = [NOW]
    svc = service(tmp_path, clock=clock, allow_unsigned=True, extra=HEARTBEAT)
    assert svc.handle_heartbeat(b"alive")
    assert svc.handle_heartbeat(b'{"kind": "heartbeat"}')
    assert svc.handle_heartbeat(b'{"seq": 7}')
    assert not svc.handle_heartbeat(plain(order("ping", now=NOW)))
    assert not svc.handle_heartbeat(plain(order(now=NOW)))
    assert not svc.handle_heartbeat(Operator.new().sign(order("cancel", now=NOW)))
    assert svc.book.failsafe.heartbeats == 3


# -- 6. response topics; time to comply after a modify ------------------------------------------


def test_rigds_own_topics_and_dollar_topics_are_never_response_topics(tmp_path: Path) -> None:
    op = Operator.new()
    clock = [NOW]
    link = MqttLink(MqttConfig(), "sim")
    svc = service(tmp_path, op, clock=clock, extra=HEARTBEAT, link=link)
    link.set_retained_raw("homeassistant/sensor/rigd_sim/import/config", b"{}")
    refused = [
        "$SYS/broker/acks",
        "$share/g/acks",
        "rigd/sim/grid/reports",
        "rigd/sim/grid/orders",
        "rigd/sim/grid/orders/x",
        "rigd/sim/state",
        "rigd/other/grid/acks",
        "op/hb",
        "homeassistant/sensor/rigd_sim/import/config",
        "dispatch/+/acks",
        "x" * 300,
    ]
    allowed = ["dispatch/acks", "rigd/sim/grid/acks/rigctl-1f2e", "rigd/sim/grid/acks"]
    for n, topic in enumerate(refused + allowed):
        link._urgent.clear()
        with capture_logs() as logs:
            ack = svc.handle_order(
                op.sign(order("ping", now=NOW, jti=f"p-{n}")), response_topic=topic
            )
        assert ack["status"] == "accepted"
        sent_to = [t for t, *_ in link._urgent]
        refusals = [e for e in logs if e["event"] == "grid_response_topic_refused"]
        if topic in refused:
            assert sent_to == ["rigd/sim/grid/acks"], topic
            assert len(refusals) == 1 and refusals[0]["why"], topic
        else:
            assert sent_to == [topic] and not refusals, topic


def test_time_to_comply_after_a_new_target_counts_from_the_modify() -> None:
    b = book(respond_within_s=60)
    apply(b, "curtail", NOW, target={"max_import_kw": 500.0}, duration_s=600)
    b.tick(NOW)
    b.observe(NOW, 900.0, "meter")
    b.observe(NOW + 6, 450.0, "meter")
    assert report_doc("sim", b.orders["ord-1"], NOW + 6, {}, False)["time_to_comply_s"] == 6.0
    assert apply(b, "modify", NOW + 84.9, modification=1, target={"max_import_kw": 300.0}).accepted
    b.observe(NOW + 90, 450.0, "meter")
    b.observe(NOW + 93.4, 290.0, "meter")
    doc = report_doc("sim", b.orders["ord-1"], NOW + 94, {}, False)
    assert doc["compliant"] is True
    assert doc["time_to_comply_s"] == pytest.approx(8.5)
    assert doc["deadline"] == pytest.approx(NOW + 84.9 + 60)


# -- 1. what a report says about an outage ------------------------------------------------------


def test_an_order_that_ends_during_an_outage_reports_the_outage_as_a_gap() -> None:
    """Killed 0.4 s after the order began, down 78 s: the 40 s order ended unwatched."""
    b = book()
    apply(b, "curtail", NOW, target={"max_import_kw": 500.0}, duration_s=40, respond_within_s=30)
    b.tick(NOW)
    rigs = {"mining": 10, "sleeping": 0, "off": 0, "throttled": 0, "unreachable": 0}
    b.observe(NOW + 0.01, 900.0, "meter", rigs)  # over target, as any order begins
    again = restarted(b, NOW + 78.4)
    notes = again.tick(NOW + 78.4)
    o = again.orders["ord-1"]
    assert [n.kind for n in notes] == ["completed"]
    doc = report_doc("sim", o, NOW + 78.4, o.rigs, final=True)
    assert doc["data_gap_s"] == pytest.approx(39.99)
    assert doc["seconds_over_target"] == 0.0 and doc["seconds_out_of_compliance"] == 0.0
    # Nobody saw the end: neither a reading, nor compliance, nor rig counts stand for it.
    assert doc["compliant"] is None and doc["measured_kw"] is None and doc["rigs"] == {}


def test_an_order_cancelled_before_rigd_saw_it_again_reports_the_gap_to_the_cancel() -> None:
    b = book()
    apply(b, "curtail", NOW, target={"max_import_kw": 500.0}, duration_s=600)
    b.tick(NOW)
    b.observe(NOW + 5, 900.0, "meter", {"mining": 3})
    again = restarted(b, NOW + 60)
    assert apply(again, "cancel", NOW + 60).accepted  # before the first cycle since
    o = again.orders["ord-1"]
    assert o.status == "cancelled" and o.data_gap_s == pytest.approx(55.0) and o.over_s == 0
    doc = report_doc("sim", o, NOW + 60, o.rigs, final=True)
    assert doc["compliant"] is None and doc["measured_kw"] is None and doc["rigs"] == {}


@pytest.mark.parametrize("max_gap_s", [60.0, 3 * 300.0])
def test_a_short_outage_mid_order_is_a_gap_whatever_the_poll_interval(max_gap_s: float) -> None:
    b = OrderBook(GridConfig(allow_unsigned=True), 1000.0, max_gap_s=max_gap_s)
    apply(b, "curtail", NOW, target={"max_import_kw": 500.0}, duration_s=600)
    b.tick(NOW)
    for t in range(0, 101, 10):
        b.observe(NOW + t, 450.0, "meter")
    again = OrderBook(GridConfig(allow_unsigned=True), 1000.0, max_gap_s=max_gap_s)
    again.load(json.loads(json.dumps(b.as_dict())), NOW + 122)  # down 22 s
    again.tick(NOW + 122)
    o = again.orders["ord-1"]
    report = again.reports_due(NOW + 122)
    assert report == []  # nothing to report before the first observation since the restart
    again.observe(NOW + 122, 600.0, "meter")  # over target again: the 22 s are not
    assert o.data_gap_s == pytest.approx(22.0)
    assert o.over_s == 0.0
    for t in range(132, 600, 10):
        again.observe(NOW + t, 450.0, "meter")
    assert o.data_gap_s == pytest.approx(22.0) and o.over_s == pytest.approx(10.0)
    again.tick(NOW + 600)
    doc = report_doc("sim", o, NOW + 600, o.rigs, final=True)
    assert doc["data_gap_s"] == pytest.approx(22.0) and doc["compliant"] is True


def test_an_order_that_started_while_rigd_was_down_counts_from_its_start() -> None:
    b = book()
    b.observe(NOW - 5, 800.0, "meter")
    apply(b, "curtail", NOW - 5, target={"max_import_kw": 500.0}, start=NOW + 10, duration_s=100)
    again = restarted(b, NOW + 40)  # killed before the start, back 30 s after it
    again.tick(NOW + 40)
    again.observe(NOW + 40, 450.0, "meter")
    o = again.orders["ord-1"]
    assert o.status == "active" and o.data_gap_s == pytest.approx(30.0) and o.over_s == 0.0


async def _grid_harness(harness: Callable[..., SimHarness], **grid: Any) -> SimHarness:
    h = harness(rigs=8, pdus=1, control={})
    h.cfg = h.cfg.model_copy(update={"grid": GridConfig(allow_unsigned=True, **grid)})
    await h.close_daemon()
    h.daemon = h._new_daemon()
    return h


def _reports(h: SimHarness) -> list[dict[str, Any]]:
    """Final reports queued on the (offline) link, oldest first."""
    return [
        json.loads(p)
        for topic, p, _c, _d in h.link._urgent
        if topic == f"rigd/{h.cfg.site.id}/grid/reports"
    ]


async def test_daemon_killed_mid_order_reports_the_outage_not_a_violation(
    harness: Callable[..., SimHarness],
) -> None:
    h = await _grid_harness(harness)
    g = h.daemon.grid
    assert g is not None
    await h.step()
    low = 0.3 * h.true_import_kw()
    send = {"site": "simsite", "target": {"max_import_kw": round(low, 1)}, "respond_within_s": 30}
    g.handle_order(plain(order(now=h.now, order_id="short", duration_s=40, **send)))
    g.handle_order(plain(order(now=h.now, order_id="long", duration_s=3600, **send)))
    t0 = h.now
    await h.step()  # both active, over target: rigs take a while to go down
    await h.restart(downtime_s=78)  # the daemon goes at t0 + 10, back at t0 + 88
    g = h.daemon.grid
    assert g is not None
    await h.step()
    finals = [r for r in _reports(h) if r["order_id"] == "short"]
    assert len(finals) == 1, _reports(h)
    final = finals[0]
    assert final["type"] == "final" and final["status"] == "completed"
    assert final["data_gap_s"] == pytest.approx(40.0, abs=0.01)
    assert final["seconds_over_target"] == 0.0 and final["seconds_out_of_compliance"] == 0.0
    assert final["compliant"] is None and final["rigs"] == {}
    long = g.book.orders["long"]
    assert long.data_gap_s == pytest.approx(t0 + 88 - t0, abs=0.01)
    assert long.rigs is not None and sum(long.rigs.values()) == 8
    await h.step()
    g.handle_order(plain(order("cancel", now=h.now, order_id="long", site="simsite")))
    final = [r for r in _reports(h) if r["order_id"] == "long"][-1]
    assert final["status"] == "cancelled" and sum(final["rigs"].values()) == 8
    assert final["data_gap_s"] == pytest.approx(88.0, abs=0.01)


# -- 4. progress reports on time ---------------------------------------------------------------


class VirtualClock:
    """Time that moves only to the next sleeper's wake-up, once every task waits: a
    scheduler in virtual time, so a test of timing is exact and does not sleep."""

    def __init__(self, start: float) -> None:
        self.t = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def run_until(self, end: float) -> None:
        while True:
            for _ in range(20):  # every task runs until it waits on this clock again
                await asyncio.sleep(0)
            live = [s for s in self._sleepers if not s[2].done()]
            heapq.heapify(live)
            self._sleepers = live
            if not live or live[0][0] > end:
                self.t = end
                return
            when, _, fut = heapq.heappop(self._sleepers)
            self.t = max(self.t, when)
            fut.set_result(None)


async def test_progress_reports_are_sent_when_due_not_once_a_cycle(tmp_path: Path) -> None:
    """report_interval_s = 5 with a 10 s poll: a report every 5 s, not every 10."""
    clock = VirtualClock(NOW)
    link = MqttLink(MqttConfig(), "sim")
    svc = service(
        tmp_path, clock=[NOW], allow_unsigned=True, extra="report_interval_s = 5", link=link
    )
    svc.now = clock.now
    sent: list[tuple[float, dict[str, Any]]] = []
    link.set_latest = lambda key, sub, doc: sent.append((clock.now(), doc))  # type: ignore[method-assign]
    svc.handle_order(plain(order(now=NOW, duration_s=3600)))
    snap = SimpleNamespace(rigs={})

    async def cycles() -> None:  # what the daemon's loop does every poll interval
        while True:
            now = clock.now()
            svc.before_step(now, None)
            plan = SimpleNamespace(measured_kw=80.0, basis="meter")
            svc.after_step(now, snap, SimpleNamespace(plan=plan), None)  # type: ignore[arg-type]
            await clock.sleep(10.0)

    stop = asyncio.Event()
    tasks = [asyncio.create_task(cycles()), asyncio.create_task(svc.run_reports(clock, stop))]
    try:
        await clock.run_until(NOW + 120)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    times = [t for t, _ in sent]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 24 and max(gaps) <= 5.0 + 1.0, gaps
    assert all(doc["type"] == "progress" and doc["measured_kw"] == 80.0 for _, doc in sent)
