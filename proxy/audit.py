"""Writing and listing audit events: one per change, never the key, only its hint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from proxy.models import AuditEvent, rfc3339

ACTIONS = (
    "openai_key.set",
    "openai_key.replaced",
    "openai_key.removed",
    "openai_key.invalidated",
    "openai_key.rotated",
    "openai_key.rejected.format",  # a refused registration: why (admin/keys.py REJECTIONS)
    "openai_key.rejected.invalid",
    "openai_key.rejected.no_credit",
    "openai_key.rejected.forbidden",
    "openai_key.rejected.unverified",
    "api_key.issued",
    "api_key.revoked",
    "api_key.updated",
    "policy.updated",
    "budget.soft_exceeded",
    "tenant.created",
    "tenant.updated",
    "tenant.deleted",
)


@dataclass(frozen=True)
class Actor:
    """Who made a change, and from where."""

    kind: str  # "admin" | "tenant" | "system"
    tenant_id: str | None = None
    request_id: str | None = None
    source_ip: str | None = None


SYSTEM = Actor("system")


def record(
    session: Session, actor: Actor, tenant_id: str, action: str, key_hint: str | None = None
) -> None:
    """Add an audit event to `session` (committed with the change it describes)."""
    assert action in ACTIONS, action
    session.add(
        AuditEvent(
            tenant_id=tenant_id,
            action=action,
            actor=actor.kind,
            key_hint=key_hint,
            request_id=actor.request_id,
            source_ip=actor.source_ip,
        )
    )


def list_events(session: Session, tenant_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """A tenant's audit events, newest first."""
    rows = session.exec(
        select(AuditEvent)
        .where(AuditEvent.tenant_id == tenant_id)
        .order_by(col(AuditEvent.ts).desc(), col(AuditEvent.id).desc())
        .limit(limit)
    ).all()
    return [
        {
            "id": row.id,
            "ts": rfc3339(row.ts),
            "tenant_id": row.tenant_id,
            "action": row.action,
            "actor": row.actor,
            "key_hint": row.key_hint,
            "request_id": row.request_id,
            "source_ip": row.source_ip,
        }
        for row in rows
    ]
