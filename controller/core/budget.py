"""Energy used in the current budget period, counted from the meter's own energy register.

Differences of the register are what the utility bills, so rigd never integrates
power samples: a missed poll or a restart loses nothing. The counter is plain data
(persisted by the daemon after each update), and handles the awkward cases: a new
period, a daemon that was down across a period boundary, and a meter whose
register went backwards (replaced or reset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from controller.core.caps import period_bounds


@dataclass(slots=True)
class EnergyCounter:
    period: str  # "day" or "month"
    period_start: float
    period_end: float
    used_kwh: float = 0.0  # this period, up to the last reading
    last_register_kwh: float | None = None
    last_ts: float | None = None
    resets: int = 0  # times the register went backwards
    # The period before this one and what it used, so a wall clock stepped back across
    # the boundary (an NTP correction) returns to its count instead of starting from zero.
    prev_start: float | None = None
    prev_used_kwh: float = 0.0

    @classmethod
    def new(cls, period: str, tz: str, now: float) -> EnergyCounter:
        start, end = period_bounds(period, tz, now)
        return cls(period, start, end)

    def update(self, register_kwh: float, ts: float, tz: str) -> None:
        """Account for a new register reading taken at `ts`."""
        if self.last_register_kwh is None or self.last_ts is None:
            self._roll(ts, tz)
            self.last_register_kwh, self.last_ts = register_kwh, ts
            return
        delta = register_kwh - self.last_register_kwh
        if delta < 0:
            # Meter replaced or reset: the new register starts from its own zero. Nothing is
            # known of the gap, so count nothing for it rather than a huge negative.
            self.resets += 1
            delta = 0.0
        if ts >= self.period_end:
            # The reading spans the boundary: split the energy in proportion to time, and
            # start as many new periods as have passed.
            span = max(ts - self.last_ts, 1e-9)
            self.used_kwh += delta * min(1.0, max(0.0, self.period_end - self.last_ts) / span)
            self._roll(ts, tz)
            self.used_kwh += delta * min(1.0, max(0.0, ts - self.period_start) / span)
        elif ts < self.period_start:
            # The wall clock was stepped back across the boundary: the energy belongs to the
            # earlier period, which gets back what it had counted.
            self._roll(ts, tz)
            self.used_kwh += delta
        else:
            self.used_kwh += delta
        self.last_register_kwh, self.last_ts = register_kwh, ts

    def used_at(self, now: float, tz: str) -> tuple[float, float]:
        """(kWh used, period end) for the period `now` is in, without changing the counter.

        Before the first reading of a new period nothing is known of it yet: 0 kWh. The
        counter itself rolls only on a reading, so that reading's energy is split
        between the periods by time.
        """
        if self.period_start <= now < self.period_end:
            return self.used_kwh, self.period_end
        start, end = period_bounds(self.period, tz, now)
        if start == self.prev_start:  # the clock stepped back into the period just left
            return self.prev_used_kwh + self.used_kwh, end
        return 0.0, end

    def _roll(self, ts: float, tz: str) -> None:
        if ts >= self.period_end or ts < self.period_start:
            start, end = period_bounds(self.period, tz, ts)
            if start == self.prev_start:
                # Back into the period just left: its count goes on, and what was counted
                # since (on a clock that was ahead) was used in it too.
                used = self.prev_used_kwh + self.used_kwh
                self.prev_start, self.prev_used_kwh = None, 0.0
            else:
                self.prev_start, self.prev_used_kwh = self.period_start, self.used_kwh
                used = 0.0
            self.period_start, self.period_end, self.used_kwh = start, end, used

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnergyCounter:
        return cls(**d)
