"""The effective cap and the energy counter, at chosen instants (no clock, no sockets)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from controller.config import ScheduleConfig
from controller.core.budget import EnergyCounter
from controller.core.caps import (
    BUDGET,
    MAX_IMPORT,
    OVERRIDE,
    SCHEDULE,
    BudgetSettings,
    CapSettings,
    Limit,
    Schedule,
    effective_cap,
    pacing_limit,
    period_bounds,
    schedule_active,
    schedule_limits,
)

BISHKEK = "Asia/Bishkek"  # UTC+6, no DST
BERLIN = "Europe/Berlin"  # has DST


def at(tz: str, *args: int) -> float:
    return dt.datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


def winter_peak(**kw: object) -> Schedule:
    base: dict[str, object] = {
        "name": "winter evening peak",
        "months": [11, 12, 1, 2],
        "start": "17:00",
        "end": "21:00",
        "cap_pct": 60,
    }
    base.update(kw)
    c = ScheduleConfig.model_validate(base)  # validated as the config would be
    return Schedule(c.name, c.start, c.end, tuple(c.days), tuple(c.months), c.cap_kw, c.cap_pct)


def test_lowest_limit_wins_and_names_its_source() -> None:
    cap = effective_cap(
        [
            Limit(MAX_IMPORT, 1000.0, "site"),
            Limit(SCHEDULE, 600.0, "winter evening peak"),
            Limit(OVERRIDE, 800.0, "repair"),
        ]
    )
    assert (cap.kw, cap.source, cap.detail) == (600.0, SCHEDULE, "winter evening peak")
    assert [lim.source for lim in cap.limits] == [SCHEDULE, OVERRIDE, MAX_IMPORT]
    # On a tie the more specific source is reported.
    tie = effective_cap([Limit(MAX_IMPORT, 500.0), Limit(OVERRIDE, 500.0)])
    assert tie.source == OVERRIDE
    assert effective_cap([Limit(BUDGET, -3.0)]).kw == 0.0


def test_schedule_in_site_local_time() -> None:
    s = winter_peak()
    tz = ZoneInfo(BISHKEK)
    assert schedule_active(s, dt.datetime(2026, 12, 1, 17, 0, tzinfo=tz))
    assert schedule_active(s, dt.datetime(2026, 12, 1, 20, 59, tzinfo=tz))
    assert not schedule_active(s, dt.datetime(2026, 12, 1, 21, 0, tzinfo=tz))
    assert not schedule_active(s, dt.datetime(2026, 12, 1, 16, 59, tzinfo=tz))
    assert not schedule_active(s, dt.datetime(2026, 7, 1, 18, 0, tzinfo=tz))  # summer
    # 17:30 in Bishkek is 11:30 UTC: the limit follows the site's clock, not UTC.
    caps = CapSettings(max_import_kw=20_000, timezone=BISHKEK, schedules=(s,))
    limits = schedule_limits(caps, at("UTC", 2026, 12, 1, 11, 30))
    # It ends with its window, 21:00 in Bishkek (15:00 UTC): a known end, for the restore.
    end = at("UTC", 2026, 12, 1, 15, 0)
    assert limits == [Limit(SCHEDULE, 12_000.0, "winter evening peak", end)]
    assert schedule_limits(caps, at("UTC", 2026, 12, 1, 17, 30)) == []


def test_schedule_past_midnight_belongs_to_the_day_it_starts() -> None:
    s = winter_peak(start="22:00", end="06:00", days=["fri"], cap_kw=5000, cap_pct=None)
    tz = ZoneInfo(BISHKEK)
    friday_night = dt.datetime(2026, 11, 27, 23, 0, tzinfo=tz)  # a Friday
    saturday_morning = dt.datetime(2026, 11, 28, 5, 59, tzinfo=tz)
    assert friday_night.weekday() == 4
    assert schedule_active(s, friday_night)
    assert schedule_active(s, saturday_morning)
    assert not schedule_active(s, dt.datetime(2026, 11, 28, 6, 0, tzinfo=tz))
    assert not schedule_active(s, dt.datetime(2026, 11, 28, 23, 0, tzinfo=tz))  # Saturday night


def test_schedule_config_errors() -> None:
    with pytest.raises(ValueError, match="exactly one of cap_kw and cap_pct"):
        winter_peak(cap_kw=10)
    with pytest.raises(ValueError, match="HH:MM"):
        winter_peak(start="5pm")
    with pytest.raises(ValueError, match="empty"):
        winter_peak(start="17:00", end="17:00")


def test_period_bounds_follow_local_calendar_dst_included() -> None:
    start, end = period_bounds("day", BERLIN, at(BERLIN, 2026, 3, 29, 12))
    assert (end - start) / 3600 == 23  # the spring-forward day
    start, end = period_bounds("day", BERLIN, at(BERLIN, 2026, 10, 25, 12))
    assert (end - start) / 3600 == 25
    start, end = period_bounds("month", BISHKEK, at(BISHKEK, 2026, 12, 31, 23, 59))
    assert start == at(BISHKEK, 2026, 12, 1) and end == at(BISHKEK, 2027, 1, 1)
    start, end = period_bounds("month", BISHKEK, at(BISHKEK, 2027, 2, 10))
    assert (end - start) / 86400 == 28


def test_pacing_spreads_what_remains_over_what_remains() -> None:
    b = BudgetSettings(period="day", kwh=24_000, reserve_pct=0)
    now = at(BISHKEK, 2026, 12, 1, 0)
    end = at(BISHKEK, 2026, 12, 2, 0)
    assert pacing_limit(b, 0.0, end, now).kw == pytest.approx(1000.0)
    # Half used by 06:00: the other half over 18 h.
    lim = pacing_limit(b, 12_000.0, end, at(BISHKEK, 2026, 12, 1, 6))
    assert lim.kw == pytest.approx(12_000 / 18)
    assert lim.source == BUDGET and "12000 of 24000 kWh left" in lim.detail
    # Overdrawn: nothing more.
    assert pacing_limit(b, 25_000.0, end, at(BISHKEK, 2026, 12, 1, 20)).kw == 0.0
    # The reserve is held back.
    r = BudgetSettings(period="day", kwh=24_000, reserve_pct=1)
    assert pacing_limit(r, 0.0, end, now).kw == pytest.approx(1000.0 * 0.99)


def test_the_reserve_is_released_over_the_periods_end_down_to_the_lag() -> None:
    b = BudgetSettings(period="day", kwh=24_000, reserve_pct=1, lag_kwh=10.0)
    start, end = at(BISHKEK, 2026, 12, 1, 0), at(BISHKEK, 2026, 12, 2, 0)
    # Held whole until the last tenth of the day (2.4 h).
    assert pacing_limit(b, 0.0, end, start, start).kw == pytest.approx(1000.0 * 0.99)
    noon = at(BISHKEK, 2026, 12, 1, 12)
    assert pacing_limit(b, 12_000.0, end, noon, start).kw == pytest.approx((12_000 - 240) / 12)
    # Half released 1.2 h before the end, all but the lag at the end.
    late = end - 1.2 * 3600
    used = 24_000 - 1_200
    assert pacing_limit(b, used, end, late, start).kw == pytest.approx((1_200 - 120) / 1.2)
    last = end - 360
    assert pacing_limit(b, 23_900, end, last, start).kw == pytest.approx((100 - 10) / 0.1)


def test_energy_counter_counts_register_differences() -> None:
    t0 = at(BISHKEK, 2026, 12, 1, 10)
    c = EnergyCounter.new("day", BISHKEK, t0)
    c.update(1_000_000.0, t0, BISHKEK)
    assert c.used_kwh == 0.0  # the first reading is the baseline
    c.update(1_000_500.0, t0 + 3600, BISHKEK)
    c.update(1_001_000.0, t0 + 7200, BISHKEK)
    assert c.used_kwh == pytest.approx(1000.0)
    # Survives a restart as plain data.
    again = EnergyCounter.from_dict(c.as_dict())
    again.update(1_001_100.0, t0 + 7300, BISHKEK)
    assert again.used_kwh == pytest.approx(1100.0)


def test_energy_counter_meter_reset_is_not_negative() -> None:
    t0 = at(BISHKEK, 2026, 12, 1, 10)
    c = EnergyCounter.new("day", BISHKEK, t0)
    c.update(5000.0, t0, BISHKEK)
    c.update(5100.0, t0 + 600, BISHKEK)
    c.update(3.0, t0 + 1200, BISHKEK)  # meter replaced
    c.update(53.0, t0 + 1800, BISHKEK)
    assert c.used_kwh == pytest.approx(150.0) and c.resets == 1


def test_energy_counter_splits_a_reading_across_the_period_boundary() -> None:
    """Down from 22:00 to 02:00 across midnight: half the energy belongs to the new day."""
    t0 = at(BISHKEK, 2026, 12, 1, 22)
    c = EnergyCounter.new("day", BISHKEK, t0)
    c.update(0.0, t0, BISHKEK)
    c.update(400.0, t0 + 4 * 3600, BISHKEK)
    assert c.period_start == at(BISHKEK, 2026, 12, 2)
    assert c.used_kwh == pytest.approx(200.0)
    # In a new period before any reading: nothing used yet, and the counter is left as it
    # is, so the next reading is split between the two periods.
    used, end = c.used_at(at(BISHKEK, 2026, 12, 3, 0, 1), BISHKEK)
    assert (used, end) == (0.0, at(BISHKEK, 2026, 12, 4))
    assert c.period_start == at(BISHKEK, 2026, 12, 2) and c.used_kwh == pytest.approx(200.0)
    # 200 kWh over the 24 h since the last reading (02:00 on the 2nd); 2 h are the 3rd's.
    c.update(600.0, at(BISHKEK, 2026, 12, 3, 2), BISHKEK)
    assert c.period_start == at(BISHKEK, 2026, 12, 3)
    assert c.used_kwh == pytest.approx(200.0 * 2 / 24)
