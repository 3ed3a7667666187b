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
A residual that jumps by more than `JUMP_SIGMA` standard deviations is taken as soon as
the next reading confirms it (a real step in the site's load is not smoothed away; a
single odd reading is as likely noise, and taking it would shed for nothing or fill room
that is not there).

The short-term noise is measured from the residual's successive differences, which a slow
drift does not inflate, and so is the rigs' own wander (their power ripples a little
between readings, and the import with it); the planner sizes its headroom from both
(`margin_kw`), with the configured headroom as a floor. The meter's noise is kept as a
share of the reading (a meter's accuracy class is a share of what it reads), so after a
cap drop the margin shrinks with the import at once; kept in kW, it held the full farm's
noise for some 1,000 s after a drop to 40 %. The rigs' wander is kept in kW (fewer rigs
running ripple less in kW, but more as a share: in kW it errs high after a drop).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

FORGET = 0.999  # per settled reading: the fit remembers the last few thousand readings
MIN_SPREAD = 0.03  # rig power must vary by this share of its level to fit `frac`
FRAC_SE = 0.005  # ... and `frac` is fitted only to this standard error
FRAC_MAX = 0.3
SMOOTH = 0.15  # weight of a new residual in the filtered one
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
    last_resid_kw: float | None = None  # the latest raw residual, if nothing was in flight
    # Short-term variance of one reading, relative to the reading (a meter's accuracy is
    # a share of what it reads): after a cap drop the noise in kW falls with the import
    # at once, instead of the headroom keeping the full farm's noise for a thousand
    # seconds while it is relearned.
    noise_rel_var: float | None = None
    jumped: int = 0  # the last reading was far over (1) or under (-1) the estimate
    # The rigs' own short-term wander (ripple): the import moves by it between readings.
    last_rig_kw: float | None = None
    rig_var: float | None = None
    last_ts: float | None = None  # when the last reading was taken

    def nonrig_kw(self, rig_kw: float) -> float:
        """What the meter reads besides rigs drawing `rig_kw`, the residual included."""
        return (self.base_kw or 0.0) + self.frac * rig_kw + (self.resid_kw or 0.0)

    def estimate_kw(self, rig_kw: float) -> float:
        return rig_kw + self.nonrig_kw(rig_kw)

    @property
    def factor(self) -> float:
        """How much the import moves per kW of rig power."""
        return 1.0 + self.frac

    @property
    def noise_known(self) -> bool:
        """Has the meter's noise been measured yet?"""
        return self.noise_rel_var is not None

    def noise_kw(self, import_kw: float) -> float:
        """Standard deviation of one reading's noise."""
        rel = self.noise_rel_var if self.noise_rel_var is not None else 0.0
        return max(math.sqrt(rel), MIN_NOISE_FRAC) * abs(import_kw)

    def margin_kw(self, import_kw: float) -> float:
        """A margin for the filtered estimate's error and for the rigs' wander until the
        next reading: `MARGIN_SIGMA` of their joint standard deviation (smoothing leaves
        sqrt(SMOOTH / (2 - SMOOTH)) of one reading's noise)."""
        if self.noise_rel_var is None:
            return 0.0
        est = self.noise_kw(import_kw) ** 2 * SMOOTH / (2.0 - SMOOTH)
        wander = (self.rig_var or 0.0) * self.factor**2
        return MARGIN_SIGMA * math.sqrt(est + wander)

    def update(
        self, import_kw: float, rig_kw: float, settled: bool, ts: float | None = None
    ) -> ImportModel:
        """One fresh meter reading with the rigs' power at the same time. `settled`:
        nothing in flight now, and nothing commanded since the previous reading (so its
        difference from that one is noise and wander, not a command showing)."""
        m = self
        y = import_kw - rig_kw
        before = None if m.base_kw is None else m.base_kw + m.frac * rig_kw
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
            # Fitted once the rigs' power has spread enough, over enough readings, for the
            # slope's standard error (noise / sqrt(readings x spread)) to be small.
            y_var = m.noise_kw(import_kw) ** 2 if m.noise_known else (0.01 * import_kw) ** 2
            if var_x > (MIN_SPREAD * max(mx, 1e-9)) ** 2 and y_var <= (FRAC_SE**2) * m.sw * var_x:
                cov = m.sxy / m.sw - mx * my
                frac = min(FRAC_MAX, max(0.0, cov / var_x))
            m = replace(m, frac=frac, base_kw=max(0.0, my - frac * mx))
        elif m.base_kw is None:
            m = replace(m, base_kw=max(0.0, y))
        assert m.base_kw is not None
        after = m.base_kw + m.frac * rig_kw
        if before is not None and m.resid_kw is not None:
            # A refit moves the model; the filtered residual moves the other way, so the
            # estimate does not jump with it (only the new reading may move it).
            m = replace(m, resid_kw=m.resid_kw + before - after)
        raw = y - after
        noise = m.noise_rel_var
        if settled and m.last_resid_kw is not None and import_kw > 0:
            # Successive readings with nothing in flight between them: their difference is
            # the meter's noise (twice its variance), not a ramp.
            d2 = ((raw - m.last_resid_kw) / import_kw) ** 2 / 2.0
            cap = (JUMP_SIGMA**2) * noise if noise is not None else 0.01**2
            d2 = min(d2, max(cap, 1e-12))  # a step is not noise
            noise = d2 if noise is None else noise + NOISE_WEIGHT * (d2 - noise)
        resid = m.resid_kw
        sigma = m.noise_kw(import_kw) if m.noise_known else 0.01 * abs(import_kw)
        jumped = 0
        if resid is None:
            resid = raw
        elif abs(raw - resid) > JUMP_SIGMA * sigma:
            # A step is taken once a second reading on the same side confirms it: one odd
            # reading is as likely noise, and taking it would shed for nothing, or fill
            # room that is not there. Meanwhile the estimate moves by a step's share.
            jumped = 1 if raw > resid else -1
            if m.jumped == jumped:
                resid = raw
            else:
                resid += jumped * SMOOTH * JUMP_SIGMA * sigma
        else:
            resid += SMOOTH * (raw - resid)
        rig_var = m.rig_var
        if settled and m.last_rig_kw is not None:
            d2 = (rig_kw - m.last_rig_kw) ** 2 / 2.0
            cap = (JUMP_SIGMA**2) * rig_var if rig_var is not None else (0.01 * rig_kw) ** 2
            d2 = min(d2, max(cap, 1e-12))  # a step is not wander
            rig_var = d2 if rig_var is None else rig_var + NOISE_WEIGHT * (d2 - rig_var)
        return replace(
            m,
            resid_kw=resid,
            last_resid_kw=raw if settled else None,
            noise_rel_var=noise,
            jumped=jumped,
            last_rig_kw=rig_kw if settled else None,
            rig_var=rig_var,
            last_ts=ts,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImportModel:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)
