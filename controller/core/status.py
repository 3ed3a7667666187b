"""What control holds and decided, as values: overrides, technicians' holds, a cycle's result.

The runtime's `Controller` keeps these; adapters (the admin API, Home Assistant, metrics,
systemd) read them through the narrow views in `controller.adapters.ports`. Being frozen
values, they can be handed out without a reader ever seeing them change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.core.caps import Cap
from controller.core.planner import Action, Plan
from controller.core.snapshot import SiteSnapshot


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
            },
        }
        if self.budget is not None:
            doc["budget"] = self.budget
        return doc


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
