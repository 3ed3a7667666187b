"""The effective cap: the lowest of every limit in force at one moment, and who set it.

Pure functions of config, state and time, so every limit can be tested at any
instant (a winter evening in Bishkek, the last minute of a month) without a clock.
Each source may only tighten the cap, never loosen another's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

# cap_source values, in the order a tie is reported (the first listed wins a tie).
GRID = "grid"
ZONE = "zone"  # this zone's share of a site shared by several rigd instances
OVERRIDE = "override"
SCHEDULE = "schedule"
BUDGET = "budget"
MAX_IMPORT = "max_import"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit in force: where it comes from, its value, and why."""

    source: str  # one of the constants above
    kw: float
    detail: str = ""  # the schedule's name, the order's id, the override's reason
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Cap:
    kw: float
    source: str
    detail: str
    limits: tuple[Limit, ...]  # every limit considered, lowest first
    # When the binding limit ends, if that is known (an override's duration, a grid order's
    # end, a schedule's window), and the cap once it has ended (the lowest of the limits
    # still in force then): what lets the planner prepare a restore (controller.core.restore).
    ends_at: float | None = None
    after_kw: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "cap_kw": round(self.kw, 3),
            "cap_source": self.source,
            "cap_detail": self.detail,
            "limits": [
                {"source": lim.source, "kw": round(lim.kw, 3), "detail": lim.detail}
                for lim in self.limits
            ],
        }


_TIE_ORDER = {s: i for i, s in enumerate((GRID, OVERRIDE, ZONE, SCHEDULE, BUDGET, MAX_IMPORT))}


def effective_cap(limits: list[Limit]) -> Cap:
    if not limits:
        raise ValueError("no limits: the site's max import is always one")
    ordered = sorted(limits, key=lambda lim: (lim.kw, _TIE_ORDER.get(lim.source, 99)))
    low = ordered[0]
    kw = max(0.0, low.kw)
    # The cap lifts when every limit at its level has ended: the latest of their ends, and
    # never if one of them has none.
    binding = [lim for lim in ordered if max(0.0, lim.kw) <= kw]
    ends = [lim.expires_at for lim in binding]
    if any(e is None for e in ends):
        return Cap(kw, low.source, low.detail, tuple(ordered))
    end = max(e for e in ends if e is not None)
    rest = [lim for lim in ordered if lim.expires_at is None or lim.expires_at > end]
    after = max(0.0, min(lim.kw for lim in rest)) if rest else None
    return Cap(kw, low.source, low.detail, tuple(ordered), end, after)


# -- settings (plain values the runtime takes from the config) ------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    """A recurring cap in the site's local time (`[[control.schedules]]`)."""

    name: str
    start: str  # "17:00", local time
    end: str  # "21:00"; an end before the start runs past midnight
    days: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    months: tuple[int, ...] = tuple(range(1, 13))
    cap_kw: float | None = None
    cap_pct: float | None = None  # of the site's max import


@dataclass(frozen=True, slots=True)
class CapSettings:
    """What the site's own limits are made of: its maximum import, its local time zone and
    its scheduled caps."""

    max_import_kw: float
    timezone: str = "UTC"
    schedules: tuple[Schedule, ...] = ()


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    """An energy budget that must last its period (`[budget]`)."""

    period: Literal["day", "month"]
    kwh: float
    reserve_pct: float = 0.5  # kept back from pacing, and released over the period's end
    # Never released: what the farm could draw over the cap while it obeys a lower one
    # (its maximum import over a few poll intervals and its slowest power-down).
    lag_kwh: float = 0.0


# -- schedules ------------------------------------------------------------------------------


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def schedule_active(s: Schedule, local: dt.datetime) -> bool:
    """Whether `local` (site time) falls in the window; a window past midnight belongs to the
    day (and month) it starts on."""
    start, end = _minutes(s.start), _minutes(s.end)
    now = local.hour * 60 + local.minute
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    if start < end:
        return days[local.weekday()] in s.days and local.month in s.months and start <= now < end
    # Past midnight: the evening part today, or the morning part of a window that began yesterday.
    if now >= start:
        return days[local.weekday()] in s.days and local.month in s.months
    if now < end:
        y = local - dt.timedelta(days=1)
        return days[y.weekday()] in s.days and y.month in s.months
    return False


def schedule_end(s: Schedule, local: dt.datetime) -> float:
    """When the window active at `local` (site time) ends, as epoch seconds."""
    end = _minutes(s.end)
    day = local.date()
    if _minutes(s.start) >= end and local.hour * 60 + local.minute >= _minutes(s.start):
        day += dt.timedelta(days=1)  # the evening part of a window past midnight
    at = dt.datetime(day.year, day.month, day.day, end // 60, end % 60, tzinfo=local.tzinfo)
    return at.timestamp()


def schedule_limits(caps: CapSettings, now: float) -> list[Limit]:
    local = dt.datetime.fromtimestamp(now, ZoneInfo(caps.timezone))
    out = []
    for s in caps.schedules:
        if schedule_active(s, local):
            kw = s.cap_kw if s.cap_kw is not None else caps.max_import_kw * (s.cap_pct or 0) / 100
            out.append(Limit(SCHEDULE, kw, s.name, schedule_end(s, local)))
    return out


# -- energy budget pacing -------------------------------------------------------------------


def period_bounds(period: str, tz: str, now: float) -> tuple[float, float]:
    """Start and end (epoch seconds) of the budget period containing `now`, in site time.

    Computed from local calendar dates, so a day is 23 or 25 hours across a DST change,
    as the contract's day is.
    """
    zone = ZoneInfo(tz)
    local = dt.datetime.fromtimestamp(now, zone)
    if period == "day":
        start = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
        nxt = start.date() + dt.timedelta(days=1)
        end = dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    elif period == "month":
        start = dt.datetime(local.year, local.month, 1, tzinfo=zone)
        y, m = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        end = dt.datetime(y, m, 1, tzinfo=zone)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return start.timestamp(), end.timestamp()


RELEASE_SHARE = 0.1  # the reserve is released over this last share of the period


def pacing_limit(
    budget: BudgetSettings,
    used_kwh: float,
    period_end: float,
    now: float,
    period_start: float | None = None,
) -> Limit:
    """Spread what remains of the budget over what remains of the period.

    A reserve is kept back so that the lag between a cap and the farm obeying it can
    never overdraw the budget, and what is not used early raises the cap later, so pacing
    self-corrects towards using all of the budget. The reserve matters most early, when a
    misjudged month could run out; over the last `RELEASE_SHARE` of the period it is
    released, down to `lag_kwh` (what the farm could overdraw while it obeys), so the
    period ends with nearly all of its budget used and none overdrawn. Without
    `period_start` the reserve is kept whole (as before the release).
    """
    reserve = budget.kwh * budget.reserve_pct / 100.0
    if period_start is not None and period_end > period_start:
        release_s = RELEASE_SHARE * (period_end - period_start)
        reserve *= min(1.0, max(0.0, period_end - now) / release_s)
    reserve = max(reserve, min(budget.lag_kwh, budget.kwh * budget.reserve_pct / 100.0))
    remaining_kwh = budget.kwh - used_kwh - reserve
    remaining_h = max(period_end - now, 1.0) / 3600.0
    kw = max(0.0, remaining_kwh) / remaining_h
    detail = (
        f"{max(0.0, budget.kwh - used_kwh):.0f} of {budget.kwh:.0f} kWh left "
        f"for {remaining_h:.1f} h ({budget.period})"
    )
    return Limit(BUDGET, kw, detail)
