"""What control holds and decided, as values: overrides, technicians' holds, a cycle's result.

The runtime's `Controller` keeps these; adapters (the admin API, Home Assistant, metrics,
systemd) read them through the narrow views in `controller.adapters.ports`. Being frozen
values, they can be handed out without a reader ever seeing them change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.core.caps import Cap
from controller.core.planner import Action, Mode, Plan, PlanInput
from controller.core.snapshot import SiteSnapshot
from drivers.telemetry import RigState

# Import this far over the target after planning is a shortfall (the planner's rounding).
SHORTFALL_KW = 0.001


@dataclass(frozen=True, slots=True)
class Override:
    kw: float
    expires_at: float
    reason: str
    actor: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "kw": self.kw,
            "expires_at": self.expires_at,
            "reason": self.reason,
            "actor": self.actor,
        }


@dataclass(frozen=True, slots=True)
class Hold:
    """A technician's exclusion of a rig from control (maintenance or pin)."""

    reason: str
    actor: str
    expires_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "actor": self.actor, "expires_at": self.expires_at}


@dataclass(frozen=True, slots=True)
class ControlStatus:
    cap: Cap
    plan: Plan | None
    budget: dict[str, Any] | None
    dry_run: bool
    inflight: int
    held: dict[str, int] = field(default_factory=dict)
    # Import stays over the target with nothing left that control may shed:
    # {"over_kw", "since", "nonrig_kw", "held": {why: rigs}} (see `Shortfall`); else None.
    cannot_shed: dict[str, Any] | None = None
    # Under the target, yet rigs rigd slept stay asleep for `min_off_s`:
    # {"rigs", "min_off_s", "next_in_s", "all_in_s"}; else None.
    min_off_wait: dict[str, Any] | None = None
    override: Override | None = None  # a technician's (or Home Assistant's) override
    # (TH/s the plan gives once settled, TH/s the best plan under the cap would give),
    # both from the learned curves, as of the last full allocation.
    attainment: tuple[float, float] | None = None

    def site_fields(self) -> dict[str, Any]:
        """Fields merged into the `state` document."""
        doc: dict[str, Any] = {
            "cap_kw": round(self.cap.kw, 3),
            "cap_source": self.cap.source,
            "cap_detail": self.cap.detail,
            "control": {
                "mode": "dry_run" if self.dry_run else "active",
                "inflight_actions": self.inflight,
                **(self.plan.as_dict() if self.plan else {}),
                **self.held,
                "cannot_shed": self.cannot_shed,
                "min_off_wait": self.min_off_wait,
                **attainment_fields(self.attainment),
            },
        }
        doc["override"] = None if self.override is None else self.override.as_dict()
        if self.budget is not None:
            doc["budget"] = self.budget
        return doc


def attainment_fields(att: tuple[float, float] | None) -> dict[str, Any]:
    """What the plan gives up against the best plan under the cap, for documents."""
    if att is None or att[1] <= 0:
        return {}
    return {
        "hashrate_ths": round(att[0], 1),
        "attainable_ths": round(att[1], 1),
        "kept_pct": round(100.0 * min(1.0, att[0] / att[1]), 1),
    }


@dataclass(frozen=True, slots=True)
class CycleResult:
    """One cycle's outcome: the farm, what control decided, and the published document."""

    snapshot: SiteSnapshot
    control: ControlStatus | None
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What became of one command: sent and acknowledged, or why not."""

    action: Action
    ok: bool
    error: str | None
    attempts: int
    duration_s: float


def shortfall_kw(plan: Plan | None) -> float:
    """How far the import will stay over the target once every command planned and in
    flight has landed: more than nothing only when nothing controllable is left to shed."""
    if plan is None or plan.predicted_kw is None:
        return 0.0
    over = plan.predicted_kw - plan.target_kw
    return over if over > SHORTFALL_KW else 0.0


def shed_blockers(inp: PlanInput) -> dict[str, int]:
    """Rigs still drawing power that control may not shed, by why: what a technician can
    do something about when import stays over the cap."""
    out: dict[str, int] = {}
    for r in inp.rigs:
        drawing = r.state in (RigState.MINING, RigState.WAKING) or (
            r.state is RigState.UNREACHABLE and (r.last_known_w or 0.0) > 0.0
        )
        if not drawing:
            continue
        mm = inp.memory.get(r.id)
        if r.maintenance:
            why = "maintenance"
        elif r.pinned:
            why = "pinned"
        elif r.state is RigState.UNREACHABLE:
            why = "unreachable"
        elif r.busy:
            why = "command_in_flight"
        elif mm is not None and inp.now < mm.retry_at:
            why = "command_failed"  # retried after a backoff
        elif not (r.can_sleep or r.has_outlet or r.can_power_target):
            why = "no_means"  # read-only firmware and no switchable outlet
        else:
            continue
        out[why] = out.get(why, 0) + 1
    return out


def min_off_wait(inp: PlanInput, plan: Plan | None) -> dict[str, Any] | None:
    """Rigs rigd slept that must stay asleep `min_off_s` although import is under the
    target (an order just ended, an override was cleared): how many, and when they may
    come back. None when there is nothing to wait for."""
    if plan is None or plan.predicted_kw is None or plan.predicted_kw >= plan.target_kw:
        return None
    min_off = inp.settings.min_off_s
    left = []
    for r in inp.rigs:
        mm = inp.memory.get(r.id)
        if mm is None or mm.mode not in (Mode.SLEEP, Mode.OFF) or r.maintenance or r.pinned:
            continue
        wait = mm.since + min_off - inp.now
        if wait > 0:
            left.append(wait)
    if not left:
        return None
    return {
        "rigs": len(left),
        "min_off_s": min_off,
        "next_in_s": round(min(left), 1),
        "all_in_s": round(max(left), 1),
    }
