"""OpenADR 3.1 events as rigd's grid orders: pure mapping, no I/O and no clock.

An OpenADR event is a list of intervals, each with payloads. rigd acts on the payloads
that cap a site's import: `IMPORT_CAPACITY_LIMIT` and `DISPATCH_SETPOINT` (kW, or the
units of the event's payload descriptor), `SIMPLE` levels 0-3 and `ALERT_GRID_EMERGENCY`
(both mapped through the site's config, as a grid order's `level`). Every such interval
becomes one order in rigd's order book (`core/grid/book.py`), with the order id
`oadr.<eventID>.<intervalID>`, so the event takes exactly the path a signed order takes:
the cap chain, compliance, failsafe, persistence, audit and `rigctl grid status`.

What the User Guide (3.1.0, section 7.3) says of timing, and how it is read here:

- `intervalPeriod` on the event gives every interval's default start and duration; an
  interval's own `intervalPeriod` overrides it. Without an absolute start, an interval
  follows the one before it.
- A start of `0001-01-01` means "now": the moment rigd first saw the event (`first_seen`,
  kept across restarts by the runtime, so a restart does not move it).
- A duration of `P9999Y` is infinity: the order is open-ended.
- `randomizeStart` shifts every start by one offset, drawn by the runtime (this module has
  no random numbers) within the range `randomize_range_s` gives, and kept per event.
- The event's `duration`, when given, clips the intervals to that span from the first
  start (looping intervals past their end is not supported: they are not repeated).
- Shrinking an event to nothing (start `0001-01-01`, duration `PT0S`) leaves no interval in
  force: its orders are cancelled, as for a deleted event (User Guide 7.9).
- `priority`: where events overlap in time, an event with a lower priority number (a
  higher priority) decides; its time is cut out of the lower-priority events' orders. Same
  priority (or none): every cap applies, and the lowest wins, as for signed orders.
- `targets`: an event with targets applies only if one of them is the VEN's name, one of
  its resources' names, or one of the targets configured for it. No targets: it applies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from controller.core.grid.orders import Cancel, Curtail, Target

INF = math.inf
# Types of payloads that cap the site's import.
CAP_TYPES = ("IMPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT", "SIMPLE", "ALERT_GRID_EMERGENCY")
ORDER_PREFIX = "oadr."

ObjectId = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]*$", min_length=1, max_length=128)]


class EventError(ValueError):
    """An event that does not validate, or that rigd cannot act on safely."""


# -- wire models: the parts of the 3.1.0 schema rigd reads (unknown keys are allowed, as
# a VTN may add its own; what is read is checked strictly) ------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class IntervalPeriod(_Wire):
    start: str | None = None
    duration: str | None = None
    randomizeStart: str | None = None


class ValuesMap(_Wire):
    type: Annotated[str, Field(min_length=1, max_length=128)]
    values: list[Any]


class Interval(_Wire):
    id: int
    intervalPeriod: IntervalPeriod | None = None
    payloads: list[ValuesMap]


class PayloadDescriptor(_Wire):
    payloadType: str
    units: str | None = None


class ReportDescriptor(_Wire):
    payloadType: Annotated[str, Field(min_length=1, max_length=128)]
    readingType: str | None = None
    units: str | None = None
    targets: list[str] | None = None
    aggregate: bool = False
    startInterval: int = -1
    numIntervals: int = -1
    historical: bool = True
    frequency: int = -1
    repeat: int = 1


class Event(_Wire):
    id: ObjectId
    programID: ObjectId
    eventName: str | None = None
    priority: Annotated[int, Field(ge=0)] | None = None
    targets: list[str] | None = None
    reportDescriptors: list[ReportDescriptor] | None = None
    payloadDescriptors: list[PayloadDescriptor] | None = None
    intervalPeriod: IntervalPeriod | None = None
    intervals: list[Interval] = Field(default_factory=list)
    duration: str | None = None
    modificationDateTime: str | None = None
    createdDateTime: str | None = None

    @field_validator("intervals")
    @classmethod
    def _unique_ids(cls, v: list[Interval]) -> list[Interval]:
        ids = [i.id for i in v]
        if len(set(ids)) != len(ids):
            raise ValueError("interval ids must be unique within an event")
        return v


def parse_event(doc: object) -> Event:
    """An event object as the VTN sent it, or EventError naming what is wrong."""
    if not isinstance(doc, Mapping):
        raise EventError("an event is a JSON object")
    try:
        return Event.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EventError(f"{where or 'event'}: {first['msg']}") from e


# -- time --------------------------------------------------------------------------------

_DURATION = re.compile(
    r"^(-?)P(?=\d|T\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)([DW]))?"
    r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
FOREVER_YEARS = 9999


def parse_duration(text: str) -> float:
    """ISO 8601 duration (the schema's pattern) in seconds; P9999Y (or more) is infinity.

    Months count 30 days and years 365, as the User Guide advises against both anyway."""
    m = _DURATION.match(text)
    if m is None:
        raise EventError(f"not an ISO 8601 duration: {text!r}")
    sign, y, mo, d, dw, h, mi, s = m.groups()
    years = int(y or 0)
    if years >= FOREVER_YEARS:
        return INF
    days = int(d or 0) * (7 if dw == "W" else 1)
    secs = (
        years * 365 * 86_400
        + int(mo or 0) * 30 * 86_400
        + days * 86_400
        + int(h or 0) * 3600
        + int(mi or 0) * 60
        + float(s or 0)
    )
    return -secs if sign else secs


def parse_start(text: str) -> float | None:
    """RFC 3339 date-time in epoch seconds; None for the 'now' of 0001-01-01.

    A time without an offset is read as UTC (the User Guide's own examples mix both)."""
    if text.startswith("0001-01-01"):
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise EventError(f"not an RFC 3339 date-time: {text!r}") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def rfc3339(ts: float) -> str:
    """Epoch seconds as the RFC 3339 text OpenADR sends (UTC, Z)."""
    t = dt.datetime.fromtimestamp(ts, dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_duration(seconds: float) -> str:
    """Seconds as an ISO 8601 duration; infinity as P9999Y."""
    if math.isinf(seconds):
        return "P9999Y"
    s = max(0.0, seconds)
    if s == int(s):
        return f"PT{int(s)}S"
    return f"PT{s:.3f}S"


def randomize_range_s(event: Event) -> float:
    """The +/- range within which the runtime draws this event's start offset."""
    for period in (event.intervalPeriod, *(i.intervalPeriod for i in event.intervals[:1])):
        if period is not None and period.randomizeStart:
            return abs(parse_duration(period.randomizeStart))
    return 0.0


# -- what an event asks of this site -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteRules:
    """The parts of `[openadr]` (and `[control]`) the mapping decides with: a frozen value,
    so the core stays pure."""

    max_import_kw: float
    levels_kw: tuple[float, ...] | None
    levels_pct: tuple[float, ...]
    alert_level: int | None
    targets: frozenset[str]  # the VEN name, its resource names, configured targets
    programs: frozenset[str] = frozenset()  # empty: every program

    def level_kw(self, level: int) -> float:
        if self.levels_kw is not None:
            return self.levels_kw[level]
        return self.max_import_kw * self.levels_pct[level] / 100.0


@dataclass(frozen=True, slots=True)
class Slot:
    """One interval (or sub-interval) of an event that caps the site."""

    event_id: str
    interval_id: int
    sub: int  # sub-interval of a multi-valued payload (0 for most)
    start: float
    end: float  # INF: open-ended
    cap_kw: float
    kinds: tuple[str, ...]  # the payload types that set it
    priority: float  # the event's priority; INF when it has none

    @property
    def key(self) -> str:
        return f"{self.interval_id}" if self.sub == 0 else f"{self.interval_id}-{self.sub}"


_UNIT_KW = {"KW": 1.0, "W": 0.001, "MW": 1000.0, "KVA": 1.0, "VA": 0.001, "MVA": 1000.0}


def _unit_factor(event: Event, payload_type: str) -> float:
    for d in event.payloadDescriptors or ():
        if d.payloadType == payload_type and d.units:
            f = _UNIT_KW.get(d.units.upper())
            if f is None:
                raise EventError(f"{payload_type}: units {d.units!r} are not a power (KW, W, MW)")
            return f
    return 1.0  # OpenADR's capacity payloads are in kW unless the descriptor says otherwise


def _number(payload_type: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise EventError(f"{payload_type}: value {v!r} is not a number")
    if v < 0:
        raise EventError(f"{payload_type}: value {v!r} is negative")
    return float(v)


MAX_KW = 1e7  # what an order's cap may be (core/grid/orders.py)
LAST_TIME = 1e11  # epoch seconds an order may name (year 5138)


def _cap_kw(payload_type: str, kw: float) -> float:
    if kw > MAX_KW:
        raise EventError(f"{payload_type}: {kw:g} kW is out of range")
    return kw


def _caps(event: Event, payload: ValuesMap, rules: SiteRules) -> list[float]:
    """The cap of each value of one payload (a multi-valued payload has sub-intervals)."""
    t = payload.type
    if not payload.values:
        raise EventError(f"{t}: no values")
    if t in ("IMPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT"):
        f = _unit_factor(event, t)
        return [_cap_kw(t, _number(t, v) * f) for v in payload.values]
    if t == "SIMPLE":
        out = []
        for v in payload.values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 3:
                raise EventError(f"SIMPLE: value {v!r} is not a level 0, 1, 2 or 3")
            out.append(rules.level_kw(v))
        return out
    if t == "ALERT_GRID_EMERGENCY":
        if rules.alert_level is None:
            return []
        return [rules.level_kw(rules.alert_level)]  # one alert: its text is not a value
    return []


def applies(event: Event, rules: SiteRules) -> bool:
    """The event is meant for this site: its program and its targets."""
    if rules.programs and event.programID not in rules.programs:
        return False
    if not event.targets:
        return True
    return bool(rules.targets.intersection(event.targets))


def slots(
    event: Event, rules: SiteRules, *, first_seen: float, offset_s: float = 0.0
) -> list[Slot]:
    """Every interval of `event` that caps the site, in absolute time.

    `first_seen` stands for a start of 0001-01-01 ('now'); `offset_s` is the event's drawn
    randomizeStart offset. Raises EventError for an event that does not make sense."""
    default = event.intervalPeriod or IntervalPeriod()
    prio = INF if event.priority is None else float(event.priority)
    out: list[Slot] = []
    prev_end: float | None = None
    first_start: float | None = None
    for n, iv in enumerate(event.intervals):
        own = iv.intervalPeriod or IntervalPeriod()
        dur_text = own.duration or default.duration
        # The first interval starts at its own start, else the event's; a later one at its
        # own absolute start, else right after the one before (User Guide 7.3).
        start_text = own.start if n > 0 else (own.start or default.start)
        t = None if start_text is None else parse_start(start_text)
        if t is not None:
            start = t + offset_s
        elif n > 0 and prev_end is not None:
            start = prev_end  # already shifted with the first
        elif start_text is None:
            raise EventError(f"interval {iv.id}: no start (neither its own nor the event's)")
        else:
            # 'now' (0001-01-01): the event's default start if it is an absolute one, else
            # the moment rigd first saw the event.
            dflt = parse_start(default.start) if default.start else None
            start = (first_seen if dflt is None else dflt) + offset_s
        if dur_text is None:
            raise EventError(f"interval {iv.id}: no duration (neither its own nor the event's)")
        duration = parse_duration(dur_text)
        if duration < 0:
            raise EventError(f"interval {iv.id}: negative duration {dur_text!r}")
        if not 0 <= start <= LAST_TIME:
            raise EventError(f"interval {iv.id}: its start is out of range")
        end = start + duration
        if end > LAST_TIME:
            end = INF  # further than any order can name: open-ended
        prev_end = end
        if first_start is None:
            first_start = start
        caps: list[list[float]] = []
        kinds: list[str] = []
        for p in iv.payloads:
            c = _caps(event, p, rules)
            if c:
                caps.append(c)
                kinds.append(p.type)
        if not caps:
            continue
        width = max(len(c) for c in caps)
        if width > 1 and math.isinf(duration):
            raise EventError(f"interval {iv.id}: several values in an interval without end")
        for k in range(width):
            # A multi-valued payload splits the interval evenly (User Guide 7.3).
            s0 = start + duration * k / width if width > 1 else start
            s1 = start + duration * (k + 1) / width if width > 1 else end
            cap = min(c[k] if k < len(c) else c[-1] for c in caps)
            out.append(Slot(event.id, iv.id, k, s0, s1, cap, tuple(kinds), prio))
    if event.duration is not None and first_start is not None:
        span_end = first_start + parse_duration(event.duration)
        out = [
            Slot(
                s.event_id,
                s.interval_id,
                s.sub,
                s.start,
                min(s.end, span_end),
                s.cap_kw,
                s.kinds,
                s.priority,
            )
            for s in out
            if s.start < span_end
        ]
    return [s for s in out if s.end > s.start]


def _subtract(
    lo: float, hi: float, cuts: Iterable[tuple[float, float]]
) -> list[tuple[float, float]]:
    parts = [(lo, hi)]
    for c0, c1 in sorted(cuts):
        nxt = []
        for a, b in parts:
            if c1 <= a or c0 >= b:
                nxt.append((a, b))
                continue
            if a < c0:
                nxt.append((a, c0))
            if c1 < b:
                nxt.append((c1, b))
        parts = nxt
    return [(a, b) for a, b in parts if b > a]


@dataclass(frozen=True, slots=True)
class OrderSpec:
    """What one order of the book should be: its id, time span and cap."""

    order_id: str
    event_id: str
    interval_id: int
    start: float
    end: float | None  # None: open-ended
    cap_kw: float
    detail: str = ""


KEY_MAX = 24  # characters of an interval's key kept as they are in an order id


def order_id(event_id: str, key: str) -> str:
    """`oadr.<eventID>.<interval>`, within 120 of an order id's 128 characters (a long
    event id is shortened with a hash, so two long ids never meet; so is a long interval
    key, since OpenADR's interval ids are integers of any size)."""
    if len(key) > KEY_MAX:
        key = "h" + hashlib.sha256(key.encode()).hexdigest()[:16]
    base = f"{ORDER_PREFIX}{event_id}"
    if len(base) + 1 + len(key) > 120:  # room for a -r<n> suffix (see `live_id`)
        h = hashlib.sha256(event_id.encode()).hexdigest()[:16]
        base = f"{ORDER_PREFIX}{event_id[: 120 - len(ORDER_PREFIX) - 18 - len(key)]}-{h}"
    return f"{base}.{key}"


def resolve(all_slots: Sequence[Slot]) -> list[OrderSpec]:
    """The orders for every event's slots, with the time of higher-priority events cut out
    of lower-priority ones (a slot split in two keeps its id for the first part)."""
    out: list[OrderSpec] = []
    for s in all_slots:
        better = [(o.start, o.end) for o in all_slots if o.priority < s.priority]
        parts = _subtract(s.start, s.end, better)
        for n, (a, b) in enumerate(parts):
            key = s.key if n == 0 else f"{s.key}-p{n}"
            out.append(
                OrderSpec(
                    order_id(s.event_id, key),
                    s.event_id,
                    s.interval_id,
                    a,
                    None if math.isinf(b) else b,
                    s.cap_kw,
                    "+".join(s.kinds),
                )
            )
    return out


# -- into the order book -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Known:
    """An order of the book that came from an event, as the book has it now."""

    modification: int
    start: float
    end: float | None
    cap_kw: float | None
    open: bool  # pending or active
    active: bool = False  # started: its start can no longer move


@dataclass(slots=True)
class Changes:
    """Messages for the book, and what they were for (the runtime logs and audits them)."""

    curtail: list[Curtail] = field(default_factory=list)
    cancel: list[Cancel] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.curtail or self.cancel)


def changes(
    wanted: Iterable[OrderSpec],
    known: Mapping[str, Known],
    *,
    now: float,
    site: str,
    respond_within_s: float,
    iss: str,
    jti_base: str,
) -> Changes:
    """The Curtail and Cancel messages that bring the book's OpenADR orders to `wanted`.

    `known` holds the book's orders that came from OpenADR (ids starting `oadr.`). An open
    order no longer wanted is cancelled; a new one is curtailed; a changed one is re-sent
    with a higher modification (OpenADR's way to revise, which the book understands). An
    order already closed (completed, cancelled) cannot be reopened: when its interval is
    wanted again with time still to run (an event extended after the order's end), it goes
    on as a new order `<id>-r1` (`-r2`, ...)."""
    out = Changes()
    want = {live_id(w.order_id, known): w for w in wanted}
    n = 0

    def claims() -> dict[str, Any]:
        nonlocal n
        n += 1
        return {
            "jti": _jti(f"{jti_base}.{n}"),
            "iat": now,
            "exp": now + 300,
            "iss": iss,
            "site": site,
        }

    for oid, had in sorted(known.items()):
        if had.open and oid not in want:
            out.cancel.append(
                Cancel(kind="cancel", order_id=oid, modification=had.modification + 1, **claims())
            )
    for oid, w in sorted(want.items()):
        k = known.get(oid)
        if w.end is not None and w.end <= now:
            continue  # over already: nothing to obey (a past interval of a fresh event)
        cap = round(w.cap_kw, 6)
        if (
            k is not None
            and (k.active or k.start == w.start)
            and k.end == w.end
            and k.cap_kw is not None
            and abs(k.cap_kw - cap) < 1e-6
        ):
            continue  # unchanged (an active order's start is history, not a change)
        out.curtail.append(
            Curtail(
                kind="curtail",
                order_id=oid,
                modification=0 if k is None else k.modification + 1,
                target=Target(max_import_kw=cap),
                start=w.start,
                end=w.end,
                respond_within_s=respond_within_s,
                **claims(),
            )
        )
    return out


def live_id(order_id: str, known: Mapping[str, Known]) -> str:
    """The id under which an interval's order goes on: its own, or `-r<n>` after closed
    ones (the book never reopens a closed order)."""
    cur, n = order_id, 0
    while cur in known and not known[cur].open:
        n += 1
        cur = f"{order_id}-r{n}"
    return cur


def _jti(text: str) -> str:
    """A jti within the order-id pattern, unique per (event version, message)."""
    if len(text) <= 128:
        return re.sub(r"[^A-Za-z0-9_.:-]", "-", text)
    return "oadr:" + hashlib.sha256(text.encode()).hexdigest()
