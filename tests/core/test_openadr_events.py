"""OpenADR 3.1 events mapped to rigd's grid orders: pure, time handed in."""

from __future__ import annotations

import math
from typing import Any

import pytest

from controller.core.grid.book import GridRules, OrderBook
from controller.core.grid.openadr_events import (
    EventError,
    Known,
    SiteRules,
    applies,
    changes,
    iso_duration,
    parse_duration,
    parse_event,
    parse_start,
    randomize_range_s,
    resolve,
    rfc3339,
    slots,
)

T0 = 1_800_000_000.0
RULES = SiteRules(
    max_import_kw=1000.0,
    levels_kw=None,
    levels_pct=(100.0, 66.0, 33.0, 0.0),
    alert_level=2,
    targets=frozenset({"rigd-site", "site-1"}),
)


def ev(intervals: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"id": kw.pop("id", "e1"), "programID": "p1", "intervals": intervals, **kw}


def cap(value: Any, typ: str = "IMPORT_CAPACITY_LIMIT", iid: int = 0) -> dict[str, Any]:
    return {"id": iid, "payloads": [{"type": typ, "values": [value]}]}


def period(start: float | str, duration: str) -> dict[str, str]:
    return {"start": start if isinstance(start, str) else rfc3339(start), "duration": duration}


def test_durations_and_starts() -> None:
    assert parse_duration("PT1H") == 3600
    assert parse_duration("P1DT30M") == 86_400 + 1800
    assert parse_duration("PT0.5S") == 0.5
    assert parse_duration("P2W") == 14 * 86_400
    assert math.isinf(parse_duration("P9999Y"))
    assert parse_start("0001-01-01") is None
    assert parse_start("0001-01-01T00:00:00") is None
    assert parse_start(rfc3339(T0)) == T0
    assert parse_start("2027-01-15T08:00:00") == parse_start("2027-01-15T08:00:00Z")
    assert iso_duration(90) == "PT90S" and iso_duration(math.inf) == "P9999Y"
    with pytest.raises(EventError):
        parse_duration("1 hour")
    with pytest.raises(EventError):
        parse_start("yesterday")


def test_import_capacity_limit_becomes_one_order_per_interval() -> None:
    e = parse_event(
        ev(
            [cap(400.0, iid=7), cap(300.0, iid=8)],
            intervalPeriod=period(T0 + 60, "PT10M"),
        )
    )
    got = slots(e, RULES, first_seen=T0)
    assert [(s.interval_id, s.start, s.end, s.cap_kw) for s in got] == [
        (7, T0 + 60, T0 + 660, 400.0),
        (8, T0 + 660, T0 + 1260, 300.0),
    ]
    specs = resolve(got)
    assert [s.order_id for s in specs] == ["oadr.e1.7", "oadr.e1.8"]


def test_units_levels_alerts_and_setpoints() -> None:
    e = parse_event(
        ev(
            [cap(250_000, iid=0)],
            intervalPeriod=period(T0, "PT1H"),
            payloadDescriptors=[
                {
                    "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                    "payloadType": "IMPORT_CAPACITY_LIMIT",
                    "units": "W",
                }
            ],
        )
    )
    assert slots(e, RULES, first_seen=T0)[0].cap_kw == 250.0
    simple = parse_event(ev([cap(1, "SIMPLE")], intervalPeriod=period(T0, "PT1H")))
    assert slots(simple, RULES, first_seen=T0)[0].cap_kw == pytest.approx(660.0)
    kw_rules = SiteRules(1000.0, (900.0, 500.0, 200.0, 0.0), (100, 66, 33, 0), 3, frozenset())
    assert slots(simple, kw_rules, first_seen=T0)[0].cap_kw == 500.0
    alert = parse_event(
        ev(
            [cap("The grid is under emergency conditions", "ALERT_GRID_EMERGENCY")],
            intervalPeriod=period("0001-01-01", "P9999Y"),
        )
    )
    (s,) = slots(alert, RULES, first_seen=T0)
    assert s.cap_kw == pytest.approx(330.0) and s.start == T0 and math.isinf(s.end)
    assert resolve([s])[0].end is None  # open-ended order
    no_alerts = SiteRules(1000.0, None, (100, 66, 33, 0), None, frozenset())
    assert slots(alert, no_alerts, first_seen=T0) == []
    setpoint = parse_event(
        ev(
            [cap(1.5, "DISPATCH_SETPOINT")],
            intervalPeriod=period(T0, "PT1H"),
            payloadDescriptors=[{"payloadType": "DISPATCH_SETPOINT", "units": "MW"}],
        )
    )
    assert slots(setpoint, RULES, first_seen=T0)[0].cap_kw == 1500.0
    price = parse_event(ev([cap(0.17, "PRICE")], intervalPeriod=period(T0, "PT1H")))
    assert slots(price, RULES, first_seen=T0) == []  # not a cap: not an order


def test_do_it_now_intervals_follow_each_other_and_randomize_shifts_all() -> None:
    e = parse_event(
        ev(
            [
                cap(500, iid=0),
                cap(400, iid=1),
                {**cap(300, iid=2), "intervalPeriod": {"duration": "PT5M"}},
            ],
            intervalPeriod={"start": "0001-01-01", "duration": "PT10M", "randomizeStart": "PT2M"},
        )
    )
    assert randomize_range_s(e) == 120
    got = slots(e, RULES, first_seen=T0, offset_s=-30)
    assert [(s.start, s.end) for s in got] == [
        (T0 - 30, T0 + 570),
        (T0 + 570, T0 + 1170),
        (T0 + 1170, T0 + 1470),
    ]


def test_multi_valued_payload_splits_the_interval() -> None:
    e = parse_event(
        ev(
            [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [500, 400]}]}],
            intervalPeriod=period(T0, "PT1H"),
        )
    )
    got = slots(e, RULES, first_seen=T0)
    assert [(s.key, s.start, s.end, s.cap_kw) for s in got] == [
        ("0", T0, T0 + 1800, 500),
        ("0-1", T0 + 1800, T0 + 3600, 400),
    ]


def test_event_duration_clips_and_shrink_to_nothing_leaves_no_slot() -> None:
    e = parse_event(
        ev([cap(500, iid=0), cap(400, iid=1)], intervalPeriod=period(T0, "PT1H"), duration="PT90M")
    )
    got = slots(e, RULES, first_seen=T0)
    assert [(s.start, s.end) for s in got] == [(T0, T0 + 3600), (T0 + 3600, T0 + 5400)]
    gone = parse_event(ev([cap(500)], intervalPeriod={"start": "0001-01-01", "duration": "PT0S"}))
    assert slots(gone, RULES, first_seen=T0) == []


def test_targets_and_programs() -> None:
    assert applies(parse_event(ev([], targets=["site-1"])), RULES)
    assert applies(parse_event(ev([])), RULES)
    assert not applies(parse_event(ev([], targets=["another-site"])), RULES)
    only_p2 = SiteRules(1000.0, None, (100, 66, 33, 0), 2, frozenset(), frozenset({"p2"}))
    assert not applies(parse_event(ev([])), only_p2)


def test_priority_cuts_lower_priority_time_out() -> None:
    high = parse_event(
        ev([cap(800)], id="hi", priority=0, intervalPeriod=period(T0 + 600, "PT10M"))
    )
    low = parse_event(ev([cap(300)], id="lo", priority=5, intervalPeriod=period(T0, "PT1H")))
    specs = resolve(slots(high, RULES, first_seen=T0) + slots(low, RULES, first_seen=T0))
    got = sorted((s.order_id, s.start, s.end, s.cap_kw) for s in specs)
    assert got == [
        ("oadr.hi.0", T0 + 600, T0 + 1200, 800),
        ("oadr.lo.0", T0, T0 + 600, 300),
        ("oadr.lo.0-p1", T0 + 1200, T0 + 3600, 300),
    ]
    # same priority: both apply, the book takes the lowest
    a = parse_event(ev([cap(800)], id="a", intervalPeriod=period(T0, "PT1H")))
    b = parse_event(ev([cap(300)], id="b", intervalPeriod=period(T0, "PT1H")))
    assert len(resolve(slots(a, RULES, first_seen=T0) + slots(b, RULES, first_seen=T0))) == 2


@pytest.mark.parametrize(
    "bad",
    [
        ev([cap("forty")], intervalPeriod=period(T0, "PT1H")),
        ev([cap(-5)], intervalPeriod=period(T0, "PT1H")),
        ev([cap(float("nan"))], intervalPeriod=period(T0, "PT1H")),
        ev([cap(7, "SIMPLE")], intervalPeriod=period(T0, "PT1H")),
        ev([cap(5)], intervalPeriod=period(T0, "one hour")),
        ev([cap(5)]),  # no time at all
        ev(
            [cap(5)],
            intervalPeriod=period(T0, "PT1H"),
            payloadDescriptors=[{"payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KWH"}],
        ),
        ev([cap(5, iid=1), cap(6, iid=1)], intervalPeriod=period(T0, "PT1H")),
        {"id": "bad id!", "programID": "p1"},
        {"programID": "p1"},
        ["not", "an", "object"],
    ],
)
def test_events_that_do_not_validate_are_refused(bad: Any) -> None:
    with pytest.raises(EventError):
        slots(parse_event(bad), RULES, first_seen=T0)


def _book() -> OrderBook:
    rules = GridRules(60.0, 5.0, None, (100.0, 66.0, 33.0, 0.0), None)
    return OrderBook(rules, 1000.0)


def _known(book: OrderBook) -> dict[str, Known]:
    return {
        o.order_id: Known(
            o.modification,
            o.start,
            o.end,
            o.cap_kw,
            o.status in ("pending", "active"),
            o.status == "active",
        )
        for o in book.orders.values()
        if o.order_id.startswith("oadr.")
    }


def _apply(book: OrderBook, event: dict[str, Any], now: float, n: int) -> int:
    specs = resolve(slots(parse_event(event), RULES, first_seen=T0))
    ch = changes(
        specs,
        _known(book),
        now=now,
        site="s",
        respond_within_s=60,
        iss="openadr:vtn",
        jti_base=f"e1@{n}",
    )
    for msg in [*ch.cancel, *ch.curtail]:
        out = book.apply(msg, now, signed=True, kid=None)
        assert out.accepted, out
    book.tick(now)
    return len(ch.cancel) + len(ch.curtail)


def test_events_created_updated_and_cancelled_through_the_order_book() -> None:
    book = _book()
    e = ev([cap(400.0)], intervalPeriod=period(T0, "PT1H"))
    assert _apply(book, e, T0 + 1, 1) == 1
    lim = book.limits()["grid:oadr.e1.0"]
    assert lim.kw == 400.0 and lim.source == "grid" and "oadr.e1.0" in lim.detail
    assert book.comply_by() == T0 + 60
    assert _apply(book, e, T0 + 2, 2) == 0  # the same event again: nothing to do
    e2 = ev([cap(250.0)], intervalPeriod=period(T0, "PT1H"))
    assert _apply(book, e2, T0 + 3, 3) == 1  # revised: modification 1
    o = book.orders["oadr.e1.0"]
    assert o.modification == 1 and o.cap_kw == 250.0 and o.status == "active"
    # shrink to nothing: cancelled
    gone = ev([cap(250.0)], intervalPeriod={"start": "0001-01-01", "duration": "PT0S"})
    assert _apply(book, gone, T0 + 4, 4) == 1
    assert book.orders["oadr.e1.0"].status == "cancelled" and book.limits() == {}
    # the utility restores the event: the cancelled order is not reopened, a new one goes on
    assert _apply(book, e, T0 + 5, 5) == 1
    assert book.orders["oadr.e1.0-r1"].status == "active"
    assert book.orders["oadr.e1.0"].status == "cancelled"


def test_intervals_over_already_are_not_sent() -> None:
    book = _book()
    e = ev([cap(400.0, iid=0), cap(300.0, iid=1)], intervalPeriod=period(T0, "PT10M"))
    assert _apply(book, e, T0 + 700, 1) == 1
    assert list(book.orders) == ["oadr.e1.1"]


# -- reports (core/grid/openadr_reports.py) ------------------------------------------------


def test_tally_usage_demand_and_report_document() -> None:
    from controller.core.grid.openadr_reports import (
        Tally,
        operating_state,
        report_plan,
        report_request,
    )

    t = Tally("0", 0, T0, T0 + 3600)
    t.observe(T0 - 10, 500.0, "RUNNING_NORMAL", 60)  # before the interval: nothing counted
    t.observe(T0 + 10, 400.0, "RUNNING_CURTAILED", 60)
    t.observe(T0 + 40, 300.0, "RUNNING_CURTAILED", 60)  # 30 s at 400 kW
    t.observe(T0 + 1000, 300.0, "RUNNING_CURTAILED", 60)  # 960 s silence: a gap, not counted
    t.observe(T0 + 1030, 300.0, "RUNNING_CURTAILED", 60)  # 30 s at 300 kW
    assert t.energy_kwh == pytest.approx((400 * 30 + 300 * 30) / 3600)
    assert t.seconds == 60
    t.baseline_kw = 520.0
    doc = report_request(
        event_id="e1",
        client_name="rigd-site",
        resource_name="site-1",
        report_name="r",
        types=("USAGE", "DEMAND", "BASELINE", "OPERATING_STATE"),
        tallies=[t],
        now=T0 + 1030,
    )
    (iv,) = doc["resources"][0]["intervals"]
    got = {p["type"]: p["values"][0] for p in iv["payloads"]}
    assert got == {
        "USAGE": pytest.approx(5.8333, abs=1e-3),
        "DEMAND": 350.0,
        "BASELINE": 520.0,
        "OPERATING_STATE": "RUNNING_CURTAILED",
    }
    assert iv["id"] == 0 and iv["intervalPeriod"] == {"start": rfc3339(T0), "duration": "PT1030S"}
    assert [d["payloadType"] for d in doc["payloadDescriptors"]] == [
        "USAGE",
        "DEMAND",
        "BASELINE",
        "OPERATING_STATE",
    ]
    assert operating_state(curtailed=True, import_kw=0.5, idle_kw=1.0) == "IDLE_CURTAILED"
    assert operating_state(curtailed=False, import_kw=None, idle_kw=1.0) == "ERROR"
    # cadence from the event's report descriptors
    plain = parse_event(ev([cap(5)], intervalPeriod=period(T0, "PT1H")))
    assert report_plan(plain, ("USAGE",), False).mode == "periodic"

    def with_freq(f: int) -> Any:
        return parse_event(
            ev(
                [cap(5)],
                intervalPeriod=period(T0, "PT1H"),
                reportDescriptors=[
                    {"payloadType": "USAGE", "frequency": f},
                    {"payloadType": "PRICE"},
                ],
            )
        )

    assert report_plan(with_freq(2), (), False) == report_plan(with_freq(2), (), False)
    assert (
        report_plan(with_freq(2), (), False).mode,
        report_plan(with_freq(2), (), False).every_n,
    ) == ("every_n", 2)
    assert report_plan(with_freq(-1), (), False).mode == "end"
    assert report_plan(with_freq(-1), (), True).mode == "periodic"  # open-ended
    assert report_plan(with_freq(0), (), False).types == ("USAGE",)


def test_an_interval_extended_after_its_order_ended_goes_on_as_a_new_order() -> None:
    book = _book()
    e = ev([cap(400.0)], intervalPeriod=period(T0, "PT10M"))
    assert _apply(book, e, T0 + 1, 1) == 1
    book.tick(T0 + 601)
    assert book.orders["oadr.e1.0"].status == "completed"
    longer = ev([cap(400.0)], intervalPeriod=period(T0, "PT20M"))
    assert _apply(book, longer, T0 + 602, 2) == 1
    o = book.orders["oadr.e1.0-r1"]
    assert o.status == "active" and o.end == T0 + 1200 and o.cap_kw == 400.0
    assert _apply(book, longer, T0 + 603, 3) == 0  # and it is then left alone


def test_out_of_range_caps_and_times_are_refused_or_open_ended() -> None:
    huge = parse_event(ev([cap(2e9)], intervalPeriod=period(T0, "PT1H")))
    with pytest.raises(EventError):
        slots(huge, RULES, first_seen=T0)
    far = parse_event(
        ev([cap(5)], intervalPeriod={"start": "9999-01-01T00:00:00Z", "duration": "PT1H"})
    )
    with pytest.raises(EventError):
        slots(far, RULES, first_seen=T0)
    past = parse_event(
        ev([cap(5)], intervalPeriod={"start": "1001-01-01T00:00:00Z", "duration": "PT1H"})
    )
    with pytest.raises(EventError):
        slots(past, RULES, first_seen=T0)
    long = parse_event(ev([cap(5)], intervalPeriod=period(T0, "P5000Y")))
    (s,) = slots(long, RULES, first_seen=T0)
    assert math.isinf(s.end) and resolve([s])[0].end is None
