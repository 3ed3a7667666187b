"""What the meter sees besides the rigs, and how much to trust one reading. Pure.

The import meter reads the rigs plus the site's own load: a fixed part (lighting, network,
offices) and a part that grows with the rigs' power (cooling, transformer and cable
losses). Treating all of it as fixed makes every change of rig power move the import by
less than it really does: a large shed over-sheds by the proportional part (4 % on the
simulated farm), and the sleepers it left cannot wake for `min_off_s`.

`ImportModel` learns  import = base_kw + (1 + frac) x rig_kw  from the meter, by
exponentially weighted least squares over readings taken while nothing was in flight (a
ramp seen half by the rigs and half by the meter would blur it). `frac` is only fitted
once the rigs' power has varied enough to tell it from `base_kw` (a few percent of its
level); until then, and whenever the farm holds one level so long that the old spread is
forgotten, the last fitted `frac` stands and only `base_kw` follows.

It also filters the reading the planner decides on. A meter's reading is noisy (0.3 % on
the simulated SDM630), and deciding on one raw reading means either a margin of several
times that noise or sheds and restores that chase it. The model predicts the import from
the rigs' own readings, which are far steadier; what the meter says beyond the model (the
residual) is smoothed, so the estimate keeps the meter's level and loses most of its noise.
A residual that jumps by more than `JUMP_SIGMA` standard deviations is taken at once: a
real step in the site's load is never smoothed away.

The short-term noise is measured from the residual's successive differences, which a slow
drift does not inflate; the planner sizes its headroom from it (`margin_kw`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

FORGET = 0.999  # per settled reading: the fit remembers the last few thousand readings
MIN_SPREAD = 0.03  # rig power must vary by this share of its level to fit `frac`
FRAC_MAX = 0.3
SMOOTH = 0.3  # weight of a new residual in the filtered one
NOISE_WEIGHT = 0.05  # weight of a new squared difference in the noise variance
JUMP_SIGMA = 4.0  # a residual this many standard deviations off is a step, not noise
MARGIN_SIGMA = 4.0  # the noise margin: this many standard deviations of the estimate
MIN_NOISE_FRAC = 0.0005  # the noise is never taken as less than this share of the import


@dataclass(frozen=True, slots=True)
class ImportModel:
    base_kw: float | None = None
    frac: float = 0.0
    # Exponentially weighted sums over settled readings: x is rig kW, y the rest.
    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    resid_kw: float | None = None  # the meter beyond the model, smoothed
    last_resid_kw: float | None = None  # the latest raw residual
    noise_var: float | None = None  # kW^2: short-term variance of one reading

    def nonrig_kw(self, rig_kw: float) -> float:
        """What the meter reads besides rigs drawing `rig_kw`, the residual included."""
        return (self.base_kw or 0.0) + self.frac * rig_kw + (self.resid_kw or 0.0)

    def estimate_kw(self, rig_kw: float) -> float:
        return rig_kw + self.nonrig_kw(rig_kw)

    @property
    def factor(self) -> float:
        """How much the import moves per kW of rig power."""
        return 1.0 + self.frac

    def noise_kw(self, import_kw: float) -> float:
        """Standard deviation of one reading's noise."""
        var = self.noise_var if self.noise_var is not None else 0.0
        return max(math.sqrt(var), MIN_NOISE_FRAC * abs(import_kw))

    def margin_kw(self, import_kw: float) -> float:
        """A margin for the filtered estimate's error: `MARGIN_SIGMA` of its standard
        deviation (smoothing leaves sqrt(SMOOTH / (2 - SMOOTH)) of one reading's)."""
        if self.noise_var is None:
            return 0.0
        return MARGIN_SIGMA * self.noise_kw(import_kw) * math.sqrt(SMOOTH / (2.0 - SMOOTH))

    def update(self, import_kw: float, rig_kw: float, settled: bool) -> ImportModel:
        """One fresh meter reading with the rigs' power at the same time."""
        m = self
        y = import_kw - rig_kw
        if settled:
            f = FORGET
            m = replace(
                m,
                sw=m.sw * f + 1.0,
                sx=m.sx * f + rig_kw,
                sy=m.sy * f + y,
                sxx=m.sxx * f + rig_kw * rig_kw,
                sxy=m.sxy * f + rig_kw * y,
            )
            mx, my = m.sx / m.sw, m.sy / m.sw
            var_x = max(0.0, m.sxx / m.sw - mx * mx)
            frac = m.frac
            if var_x > (MIN_SPREAD * max(mx, 1e-9)) ** 2:
                cov = m.sxy / m.sw - mx * my
                frac = min(FRAC_MAX, max(0.0, cov / var_x))
            m = replace(m, frac=frac, base_kw=max(0.0, my - frac * mx))
        elif m.base_kw is None:
            m = replace(m, base_kw=max(0.0, y))
        assert m.base_kw is not None
        raw = y - (m.base_kw + m.frac * rig_kw)
        noise = m.noise_var
        if settled and m.last_resid_kw is not None:
            d2 = (raw - m.last_resid_kw) ** 2 / 2.0
            if noise is not None:
                d2 = min(d2, (JUMP_SIGMA**2) * max(noise, 1e-12))  # a step is not noise
            noise = d2 if noise is None else noise + NOISE_WEIGHT * (d2 - noise)
        resid = m.resid_kw
        sigma = m.noise_kw(import_kw) if noise is not None else 0.01 * abs(import_kw)
        if resid is None or abs(raw - resid) > JUMP_SIGMA * sigma:
            resid = raw
        else:
            resid += SMOOTH * (raw - resid)
        return replace(m, resid_kw=resid, last_resid_kw=raw, noise_var=noise)

    def shifted_to(self, base_kw: float) -> ImportModel:
        """The same model with its fixed part set (a site told what its load is)."""
        return replace(self, base_kw=base_kw)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImportModel:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)
