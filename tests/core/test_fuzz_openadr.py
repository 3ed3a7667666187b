"""Fuzzing OpenADR events: whatever a VTN sends, the mapping gives orders or EventError.

Seeds are real event shapes (the User Guide's IMPORT_CAPACITY_LIMIT, SIMPLE, alert and
multi-interval examples), mutated as tests/fuzz_support.py does for every other parser.
The contract: `parse_event`, `slots`, `resolve` and `changes` return values the order book
accepts, or raise EventError; nothing else, ever.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given

from controller.core.grid.book import GridRules, OrderBook
from controller.core.grid.openadr_events import (
    EventError,
    SiteRules,
    changes,
    parse_event,
    randomize_range_s,
    resolve,
    slots,
)
from tests.fuzz_support import fuzz_settings, replies

T0 = 1_800_000_000.0
RULES = SiteRules(1000.0, None, (100.0, 66.0, 33.0, 0.0), 2, frozenset({"rigd-site"}))

SEEDS: tuple[dict[str, Any], ...] = (
    {
        "id": "e1",
        "programID": "p1",
        "priority": 0,
        "targets": ["rigd-site"],
        "payloadDescriptors": [
            {
                "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                "payloadType": "IMPORT_CAPACITY_LIMIT",
                "units": "KW",
            }
        ],
        "reportDescriptors": [{"payloadType": "USAGE", "frequency": 1}],
        "intervalPeriod": {
            "start": "2027-01-15T08:00:00Z",
            "duration": "PT1H",
            "randomizeStart": "PT5M",
        },
        "intervals": [
            {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [400.5]}]},
            {
                "id": 1,
                "intervalPeriod": {"duration": "PT30M"},
                "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [300, 200]}],
            },
        ],
    },
    {
        "id": "e2",
        "programID": "p1",
        "intervalPeriod": {"start": "0001-01-01", "duration": "P9999Y"},
        "intervals": [
            {
                "id": 0,
                "payloads": [
                    {"type": "ALERT_GRID_EMERGENCY", "values": ["grid emergency"]},
                    {"type": "SIMPLE", "values": [2]},
                ],
            }
        ],
    },
    {
        "id": "e3",
        "programID": "p1",
        "duration": "PT2H",
        "intervals": [
            {
                "id": 7,
                "intervalPeriod": {"start": "2027-01-15T08:00:00+06:00", "duration": "PT90M"},
                "payloads": [{"type": "DISPATCH_SETPOINT", "values": [1.5]}],
            },
            {
                "id": 8,
                "intervalPeriod": {"start": "0001-01-01T00:00:00Z", "duration": "PT1H"},
                "payloads": [{"type": "SIMPLE", "values": [3]}],
            },
        ],
        "payloadDescriptors": [{"payloadType": "DISPATCH_SETPOINT", "units": "MW"}],
    },
)


@fuzz_settings()
@given(replies(*SEEDS))
def test_events_map_to_orders_or_event_error(doc: Any) -> None:
    try:
        ev = parse_event(doc)
        r = randomize_range_s(ev)
        got = slots(ev, RULES, first_seen=T0, offset_s=min(r, 3600.0))
    except EventError:
        return
    for s in got:
        assert s.end > s.start and s.cap_kw >= 0 and math.isfinite(s.cap_kw)
    book = OrderBook(GridRules(60.0, 5.0, None, (100.0, 66.0, 33.0, 0.0), None), 1000.0)
    ch = changes(
        resolve(got), {}, now=T0, site="s", respond_within_s=60, iss="openadr:x", jti_base="fuzz"
    )
    for msg in [*ch.cancel, *ch.curtail]:
        out = book.apply(msg, T0, signed=True, kid=None)
        assert out.accepted or out.reason == "not_applicable", out


def test_an_interval_id_of_any_size_makes_a_valid_order_id() -> None:
    """Found by the fuzz test: an interval id hundreds of digits long made an order id the
    order book refused (a crash of the mapping, not an invalid event)."""
    from controller.core.grid.openadr_events import order_id

    huge = str(10**400)
    ids = {order_id("e2", huge), order_id("e2", huge + "1"), order_id("e2", "7")}
    assert len(ids) == 3
    assert all(len(i) <= 120 for i in ids)
    assert order_id("e2", "7").endswith(".7")
