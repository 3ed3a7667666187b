"""How long each kind of rig takes to wake, learned from its own telemetry. Pure.

Why: the planner counts a wake as in flight for the rig's wake time, and prepares a
restore before a cap's known end by the slowest wake (controller/core/restore.py); both
need the real time, which differs by model and firmware (an Antminer on LuxOS boots and
ramps in about three minutes, a Whatsminer in nearly six) and is nowhere in a datasheet.

What is measured: from the wake command (or outlet switched on) to the first poll that
shows the rig's power at its target (within `AT_TARGET`), per model and firmware. Polls
make an observation late by at most one interval: the estimate errs long, on the side
that keeps in-flight accounting safe.

The prior: the configured wake time for the model (`[control.timing]`, else
`timing_default`, 300 s), weighed as `PRIOR_WEIGHT` observations. The estimate errs long:
a rig seen slower than its prior is taken at the running mean of what was seen at once (an
estimate too short would end a wake's in-flight accounting while the rig still ramps);
one seen faster comes down from the prior by a weighted mean of the two. The running mean
weighs the last `MAX_SEEN` observations or so, so a new firmware's change shows within a
few wakes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

AT_TARGET = 0.03  # a rig within this share of its target has reached it
PRIOR_WEIGHT = 0.5  # the configured time counts as this many observations
MAX_SEEN = 20  # observations beyond this weigh as this many (a running mean that adapts)
GIVE_UP_FACTOR = 4.0  # a wake not seen at its target after this many prior times: not timed


def kind_key(model: str, firmware: str) -> str:
    """The key wake times are learned under: model and firmware."""
    return f"{model}|{firmware}"


@dataclass(frozen=True, slots=True)
class WakeStat:
    n: int
    mean_s: float


@dataclass(frozen=True, slots=True)
class WakeTimes:
    """Learned wake times per `kind_key`."""

    seen: Mapping[str, WakeStat] = field(default_factory=lambda: MappingProxyType({}))

    def observe(self, key: str, seconds: float) -> WakeTimes:
        old = self.seen.get(key)
        if old is None:
            stat = WakeStat(1, seconds)
        else:
            n = min(old.n, MAX_SEEN - 1) + 1
            stat = WakeStat(old.n + 1, old.mean_s + (seconds - old.mean_s) / n)
        return WakeTimes(MappingProxyType({**self.seen, key: stat}))

    def wake_s(self, key: str, prior_s: float) -> float:
        """The estimate for `key`: the prior until observed, then mostly what was seen."""
        stat = self.seen.get(key)
        if stat is None:
            return prior_s
        if stat.mean_s >= prior_s:
            return stat.mean_s
        n = min(stat.n, MAX_SEEN)
        return (PRIOR_WEIGHT * prior_s + n * stat.mean_s) / (PRIOR_WEIGHT + n)

    def as_dict(self) -> dict[str, Any]:
        return {k: [s.n, round(s.mean_s, 1)] for k, s in self.seen.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WakeTimes:
        return cls(MappingProxyType({k: WakeStat(int(n), float(m)) for k, (n, m) in d.items()}))


def reached(power_w: float | None, target_w: float) -> bool:
    """Whether a rig drawing `power_w` has reached `target_w`."""
    return power_w is not None and target_w > 0 and power_w >= (1.0 - AT_TARGET) * target_w
