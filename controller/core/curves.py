"""Each rig's value curve: its hashrate as a function of its power, learned from its own
telemetry. Pure: observations in, frozen values out.

The model is a power law, hashrate = scale x power^alpha over the rig's running range:
concave for alpha <= 1 (a miner's efficiency improves as it is underclocked, so hashrate
falls slower than power), with a closed-form marginal value and inverse, which is what
allocation by marginal value needs.

What it is learned from, best first:

- what the rig showed: its measured power and hashrate at each power it ran at, averaged
  per 2 % band of power (only once a command has settled, so ramps are not mistaken for
  steady states);
- what its firmware publishes: LuxOS profiles carry a hashrate per profile, taken as
  observations with the weight of many polls (the firmware's own figures);
- with a single power seen (a rig only ever at its default), the prior exponent
  `ALPHA_PRIOR` through that point;
- never seen hashing at all: the prior through its nominal figures (nominal hashrate or
  J/TH at its full power), and with nothing known, no curve (the planner then counts the
  rig as worth nothing, so it is the first to go and the last to come back).

Once two bands at least 10 % apart hold settled observations, alpha and scale are fitted
by weighted least squares of log hashrate on log power, alpha clamped to [0.5, 1.0].

`ALPHA_PRIOR` is an assumption, not a measurement: hashrate falls slower than power when a
miner is underclocked (alpha < 1), and 0.85 is a middle value for that. It only sets how a
rig seen at a single power is extrapolated, until the rig has run at a second power (a
throttle) or its firmware has published a table; from then on the rig's own alpha is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA_PRIOR = 0.85
ALPHA_MIN, ALPHA_MAX = 0.5, 1.0
BAND = math.log(1.02)  # observations are averaged per 2 % band of power
MAX_BANDS = 16  # per rig: the least observed band is dropped beyond this
WEIGHT_CAP = 60.0  # an average over more polls than this follows slow drift (ageing, dust)
MIN_SAMPLES = 3.0  # a band counts for the fit once it holds this many polls
FIRMWARE_WEIGHT = 30.0  # a published figure (a LuxOS profile) counts as this many polls
MIN_SPREAD = math.log(1.10)  # fitting alpha needs powers at least 10 % apart
RIDGE = 10.0 * MIN_SPREAD**2  # pull of the prior on a fitted alpha


@dataclass(frozen=True, slots=True)
class Curve:
    """hashrate (TH/s) = scale x power (W) ^ alpha."""

    scale: float
    alpha: float

    @classmethod
    def through(cls, watts: float, ths: float, alpha: float = ALPHA_PRIOR) -> Curve:
        """The curve with exponent `alpha` through one point."""
        return cls(ths / watts**alpha, alpha)

    def ths(self, watts: float) -> float:
        return float(self.scale * watts**self.alpha) if watts > 0 else 0.0

    def slope(self, watts: float) -> float:
        """Marginal value: TH/s gained per W at `watts`."""
        return self.alpha * self.scale * watts ** (self.alpha - 1.0) if watts > 0 else math.inf

    def watts_at_slope(self, slope: float) -> float:
        """The power where the marginal value is `slope` (inverse of `slope`)."""
        if slope <= 0:
            return math.inf
        if self.alpha >= 1.0:
            # Linear: the marginal value is the same everywhere; any power is optimal when
            # it equals the price, none when below it. Callers clamp to the rig's range.
            return math.inf if slope < self.scale else 0.0
        return float((self.alpha * self.scale / slope) ** (1.0 / (1.0 - self.alpha)))


@dataclass(frozen=True, slots=True)
class Band:
    key: int  # round(log(watts) / BAND)
    n: float  # polls averaged (capped at WEIGHT_CAP)
    watts: float  # mean power
    ths: float  # mean hashrate


@dataclass(frozen=True, slots=True)
class CurveData:
    """What has been seen of one rig: mean power and hashrate per band of power."""

    bands: tuple[Band, ...] = ()

    def observe(self, watts: float, ths: float, weight: float = 1.0) -> CurveData:
        """One settled reading (or a published figure, with a larger weight)."""
        if not (watts > 0 and ths > 0 and math.isfinite(watts) and math.isfinite(ths)):
            return self
        key = round(math.log(watts) / BAND)
        out = list(self.bands)
        for i, b in enumerate(out):
            if b.key == key:
                n = min(WEIGHT_CAP, b.n + weight)
                k = weight / n
                out[i] = Band(key, n, b.watts + k * (watts - b.watts), b.ths + k * (ths - b.ths))
                return CurveData(tuple(out))
        out.append(Band(key, min(WEIGHT_CAP, weight), watts, ths))
        if len(out) > MAX_BANDS:
            out.remove(min(out, key=lambda b: b.n))
        return CurveData(tuple(sorted(out, key=lambda b: b.key)))

    def fit(self, alpha_prior: float = ALPHA_PRIOR) -> Curve | None:
        """The curve these observations support; None if there are none yet."""
        ready = [b for b in self.bands if b.n >= MIN_SAMPLES] or list(self.bands)
        if not ready:
            return None
        xs = [math.log(b.watts) for b in ready]
        ys = [math.log(b.ths) for b in ready]
        ws = [b.n for b in ready]
        sw = sum(ws)
        mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
        my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
        alpha = alpha_prior
        if max(xs) - min(xs) >= MIN_SPREAD:
            # Ridge towards the prior: powers only a little apart, with noisy hashrates,
            # say little about the exponent.
            sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
            sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
            fitted = (sxy + RIDGE * alpha_prior) / (sxx + RIDGE)
            alpha = min(ALPHA_MAX, max(ALPHA_MIN, fitted))
        return Curve(math.exp(my - alpha * mx), alpha)


def prior_curve(
    full_w: float, nominal_ths: float | None, efficiency_j_th: float | None
) -> Curve | None:
    """The prior for a rig with no settled observation: through its nominal hashrate at
    full power, or its J/TH there; None with neither."""
    if full_w <= 0:
        return None
    if nominal_ths and nominal_ths > 0:
        return Curve.through(full_w, nominal_ths)
    if efficiency_j_th and efficiency_j_th > 0 and math.isfinite(efficiency_j_th):
        return Curve.through(full_w, full_w / efficiency_j_th)
    return None
