"""How zones share one site's import: max-min fair shares, grown and given back from the
reports every zone publishes (pure; the MQTT side is `controller.adapters.zones`).

Every zone computes the same thing from the same published figures, so their caps add up
to at most the site's maximum without a coordinator (docs/zones.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from controller.core.planner import Mode, PlanInput


class ZoneReport(BaseModel):
    """What one zone publishes about itself each cycle (the wire format)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    zone: str = Field(min_length=1, max_length=64)
    ts: float = Field(allow_inf_nan=False)
    cap_kw: float = Field(ge=0, allow_inf_nan=False)
    load_kw: float = Field(ge=0, allow_inf_nan=False)
    demand_kw: float = Field(ge=0, allow_inf_nan=False)
    reserved_kw: float = Field(ge=0, allow_inf_nan=False)
    site_max_import_kw: float = Field(gt=0, allow_inf_nan=False)

    def encode(self) -> bytes:
        return json.dumps(self.model_dump(), separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Allocation:
    cap_kw: float
    why: str  # for the limit's detail and the logs
    fair_kw: float | None = None


def fair_shares(demands: Mapping[str, float], budget_kw: float) -> dict[str, float]:
    """Max-min fair division of `budget_kw`: nobody gets more than it asks for, and what a
    modest zone leaves is shared by the rest equally."""
    out: dict[str, float] = {}
    left = max(0.0, budget_kw)
    pending = dict(demands)
    while pending:
        each = left / len(pending)
        small = {z: d for z, d in pending.items() if d <= each}
        if not small:
            for z in pending:
                out[z] = each
            break
        for z, d in small.items():
            out[z] = max(0.0, d)
            left -= max(0.0, d)
            del pending[z]
    return out


def allocate(
    me: str,
    *,
    mine: ZoneReport | None,
    my_demand_kw: float,
    fresh: Mapping[str, ZoneReport],
    silent: Mapping[str, ZoneReport],
    site_kw: float,
    connected: bool,
    fallback_kw: float,
) -> Allocation:
    """The cap this zone holds next cycle, from the reports as published (pure).

    `mine` is this zone's own last published report; `fresh`/`silent` are the other
    zones', split by age by the caller. Growth is computed only from published figures,
    this zone's included (its demand counts as published, a cycle late), so zones that
    move in the same instant from the same reports compute the same free power and the
    same shortfalls, and their slices add up to at most what is free."""
    if mine is None:
        return Allocation(min(fallback_kw, site_kw), "fallback: nothing published yet")
    if not connected:
        held = min(mine.cap_kw, mine.load_kw)
        return Allocation(held, "broker unreachable: holding the last reported load")
    silent_kw = sum(r.load_kw for r in silent.values())
    everyone = {**fresh, me: mine}
    reserved = sum(r.reserved_kw for r in everyone.values()) + silent_kw
    reserved_by_others = reserved - mine.reserved_kw
    budget = site_kw - silent_kw
    fair = fair_shares({z: r.demand_kw for z, r in everyone.items()}, budget)
    shortfall = {z: max(0.0, min(r.demand_kw, fair[z]) - r.cap_kw) for z, r in everyone.items()}
    my_fair = fair[me]
    others_short = any(s > 1e-6 for z, s in shortfall.items() if z != me)
    # What this zone needs now is known at once: it may give back on it without waiting.
    own_fair = fair_shares(
        {**{z: r.demand_kw for z, r in fresh.items()}, me: my_demand_kw}, budget
    )[me]
    cap, why = mine.cap_kw, "holding"
    if cap > my_fair and (others_short or reserved > site_kw):
        cap, why = my_fair, "giving back down to the fair share"
    if others_short and cap > max(own_fair, my_demand_kw):
        cap, why = max(own_fair, my_demand_kw), "giving back what it no longer needs"
    free = site_kw - reserved
    total_short = sum(shortfall.values())
    if shortfall[me] > 1e-6 and free > 1e-6 and cap >= mine.cap_kw:
        grant = min(shortfall[me], free * shortfall[me] / total_short)
        cap, why = cap + grant, "growing into unreserved power"
    # Whatever the figures say, never grow past what the others leave. (Holding or giving
    # back is not clamped by others still shedding: their loads fall to their own caps.)
    if cap > mine.cap_kw:
        cap = min(cap, max(mine.cap_kw, site_kw - reserved_by_others))
    cap = max(0.0, cap)
    return Allocation(cap, why, my_fair)


def demand_kw(load_kw: float, inp: PlanInput | None) -> float:
    """The zone's load with every rig rigd holds back (asleep, throttled, switched off) at
    its full power again: what the zone would import if its cap allowed."""
    if inp is None:
        return load_kw
    held = 0.0
    for r in inp.rigs:
        mm = inp.memory.get(r.id)
        if mm is None or mm.mode is Mode.RUN:
            continue
        held += max(0.0, r.full_w - (r.power_w or 0.0))
    return load_kw + held / 1000.0
