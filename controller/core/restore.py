"""End-aware restore: when the cap in force ends at a known time and lifts then, prepare
the farm inside the cap so that it is back at full hashrate soon after the end. Pure.

Why: a rig asleep when a cap lifts gives nothing until it has booted and ramped (a
Whatsminer takes over five minutes), while a rig running at a low power target is back
at full power within its power-change time (a minute). So in the last minutes before the
end the planner swaps slow-to-wake sleepers in (woken at a power that fits) for rigs that
wake fast, which sleep instead, all under the same target: the predicted import never
counts on the cap lifting. If the end is moved or cancelled, nothing was planned over the
cap: the swapped rigs are just part of the plan, and the ordinary re-optimisation may move
back later (its hold and gain rules apply as ever).

Which rigs are slow comes from their wake times (`RigTiming.wake_s`: learned from the
rig's own telemetry, `controller.core.wake_times`, with the configured time as a prior),
never from any simulator: a rig is slow when its wake takes `SLOW_FACTOR` times the
quickest wake among the rigs that can sleep, and raising its power target is quicker than
waking it.

The cost is bounded twice: the planner takes the swap only while its allocation with the
slow rigs kept running holds at least 1 - `PREPARE_LOSS` of the hashrate of the free
allocation (planner._improve, which forces fewer of them until it does), and only in the
last `lead_s` seconds before the end (the slowest of their wakes, plus one sleep and
`PREPARE_MARGIN_S` for polls and the re-optimisation's own period). So a prepared restore
gives up at most `PREPARE_LOSS` of the hashrate for a few minutes, and in exchange every
slow rig is hashing when the cap lifts, instead of a wake's worth of minutes later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from controller.core.caps import Cap


class _Timing(Protocol):
    @property
    def sleep_s(self) -> float: ...
    @property
    def wake_s(self) -> float: ...
    @property
    def power_change_s(self) -> float: ...


class RigTimingLike(Protocol):
    """What this module reads of a rig (the planner's `RigInput`)."""

    @property
    def id(self) -> str: ...
    @property
    def can_sleep(self) -> bool: ...
    @property
    def timing(self) -> _Timing: ...


SLOW_FACTOR = 1.25  # slower to wake than the quickest sleeper by this factor: worth preparing
PREPARE_LOSS = 0.15  # most share of the hashrate a prepared restore may give up meanwhile
PREPARE_MARGIN_S = 60.0  # polls and command round trips
LIFT_EPS_KW = 1e-6


def slow_ids(rigs: Iterable[RigTimingLike]) -> dict[str, float]:
    """The rigs slow to wake (id -> wake seconds), among those that can sleep."""
    pool = [r for r in rigs if r.can_sleep]
    if not pool:
        return {}
    quickest = min(r.timing.wake_s for r in pool)
    return {
        r.id: r.timing.wake_s
        for r in pool
        if r.timing.wake_s > SLOW_FACTOR * quickest and r.timing.power_change_s < r.timing.wake_s
    }


def lead_s(slow: dict[str, float], rigs: Iterable[RigTimingLike]) -> float:
    """How long before the end a restore is prepared: the slowest wake among `slow`, after
    the sleep or power change that makes room for it, and a margin."""
    down = max((max(r.timing.sleep_s, r.timing.power_change_s) for r in rigs), default=0.0)
    return max(slow.values(), default=0.0) + down + PREPARE_MARGIN_S


def to_prepare(cap: Cap, now: float, rigs: Iterable[RigTimingLike]) -> dict[str, float]:
    """The slow rigs to keep running now (id -> wake seconds), and, if asleep, to bring to
    run: those whose wake is still `in_time` for the end (else -1 in place of their wake
    seconds: kept running only). Empty unless the cap has a known end, lifts then, and the
    end is within the lead."""
    if cap.ends_at is None or cap.after_kw is None or cap.after_kw <= cap.kw + LIFT_EPS_KW:
        return {}
    if now >= cap.ends_at:
        return {}
    rigs = list(rigs)
    slow = slow_ids(rigs)
    if not slow or now < cap.ends_at - lead_s(slow, rigs):
        return {}
    quickest = min(r.timing.wake_s for r in rigs if r.can_sleep)
    return {k: w if in_time(w, quickest, now, cap.ends_at) else -1.0 for k, w in slow.items()}


def in_time(wake_s: float, quickest_s: float, now: float, ends_at: float) -> bool:
    """Whether a sleeper woken now is up no later than a quick one woken at the end: else
    waking it early costs its ramp under the cap and wins nothing the target sees."""
    return now + wake_s <= ends_at + quickest_s
