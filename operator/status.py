"""Status of an ``ImTenant``: one condition per component, ``Ready`` and a phase.

Pure functions over dicts, so the rules (when ``lastTransitionTime`` moves,
what the phase is) are tested without a cluster. The reconciler collects one
:class:`Outcome` per component and :func:`build_status` turns them into the
``status`` it writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "COMPONENTS",
    "Outcome",
    "build_status",
    "condition",
    "merge_conditions",
    "now_iso",
]

# Order matters: each step needs the ones before it (the Secret holds the
# database password, the workloads read the Secret).
COMPONENTS = ("Credentials", "Database", "Topics", "Storage", "Turn", "Workloads")


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How one component fared in this reconcile."""

    type: str
    ok: bool
    reason: str
    message: str = ""

    @property
    def status(self) -> str:
        return "True" if self.ok else "False"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def merge_conditions(
    old: Sequence[Mapping[str, Any]],
    outcomes: Iterable[Outcome],
    *,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """New conditions; ``lastTransitionTime`` moves only when a status flips."""
    merged: dict[str, dict[str, Any]] = {c["type"]: dict(c) for c in old if "type" in c}
    for outcome in outcomes:
        before = merged.get(outcome.type) or {}
        changed = before.get("status") != outcome.status
        entry: dict[str, Any] = {
            "type": outcome.type,
            "status": outcome.status,
            "reason": outcome.reason,
            "message": outcome.message[:4000],
            "lastTransitionTime": now if changed else before.get("lastTransitionTime") or now,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        merged[outcome.type] = entry
    order = {t: i for i, t in enumerate((*COMPONENTS, "Ready"))}
    return sorted(merged.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def ready_outcome(outcomes: Sequence[Outcome]) -> Outcome:
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return Outcome("Ready", True, "Reconciled", "all components are provisioned")
    first = failed[0]
    names = ", ".join(o.type for o in failed)
    return Outcome("Ready", False, first.reason, f"not ready: {names}. {first.message}")


def build_status(
    old_status: Mapping[str, Any] | None,
    outcomes: Sequence[Outcome],
    *,
    generation: int | None,
    endpoints: Mapping[str, str],
    resources: Mapping[str, Any],
    now: str | None = None,
) -> dict[str, Any]:
    """The full ``status`` for the outcomes of one reconcile."""
    old_status = old_status or {}
    now = now or now_iso()
    ready = ready_outcome(outcomes)
    conditions = merge_conditions(
        old_status.get("conditions") or [], [*outcomes, ready], generation=generation, now=now
    )
    was_ready = old_status.get("phase") in ("Ready", "Degraded")
    phase = "Ready" if ready.ok else ("Degraded" if was_ready else "Provisioning")
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "endpoints": dict(endpoints),
        "resources": dict(resources),
    }
    # As for built-in kinds: the generation this status was computed from;
    # whether it is fully applied is what the conditions say.
    if generation is not None:
        status["observedGeneration"] = generation
    return status
