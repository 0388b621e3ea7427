"""Database tables (SQLModel). Public API shapes live in `admin/schemas.py`.

`Tenant.openai_api_key_encrypted` holds only ciphertext (see `proxy.security`);
`ProxyKey` holds only a SHA-256 hash; `AuditEvent` has no foreign key so the
history outlives a deleted tenant.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import BigInteger, Column
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 UTC text of a stored timestamp."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


class Tenant(SQLModel, table=True):
    """A contractor: its tier and, encrypted, its OpenAI key."""

    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=63)
    name: str = Field(max_length=200)
    tier: str = Field(max_length=20)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    openai_api_key_encrypted: str | None = Field(default=None, repr=False)
    openai_key_status: str = Field(default="none", max_length=10)
    openai_key_hint: str | None = Field(default=None, max_length=20)
    openai_key_validated_at: datetime | None = None
    openai_key_updated_at: datetime | None = None
    policy: str | None = None  # JSON of `proxy.policy.PolicyIn`; None: no limits


class ProxyKey(SQLModel, table=True):
    """A tenant's proxy key, stored as its SHA-256 hash."""

    __tablename__ = "proxy_keys"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, ondelete="CASCADE")
    key_hash: str = Field(unique=True, max_length=64, repr=False)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    name: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = None
    last_used_at: datetime | None = None  # written off the hot path, at most once a minute
    policy: str | None = None  # JSON of `proxy.policy.PolicyIn`; None: no limits


class AuditEvent(SQLModel, table=True):
    """One change to a tenant or its keys. Never holds a key, only its hint."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(default_factory=utcnow, index=True)
    tenant_id: str = Field(index=True, max_length=63)
    action: str = Field(max_length=40)
    actor: str = Field(max_length=10)
    key_hint: str | None = Field(default=None, max_length=40)
    request_id: str | None = Field(default=None, max_length=64)
    source_ip: str | None = Field(default=None, max_length=64)


class TrialAllowance(SQLModel, table=True):
    """Platform-key use by a tenant on one UTC day, shared by all workers.

    `tokens` are settled (charged) tokens; `reserved` is held by requests in flight.
    """

    __tablename__ = "trial_allowance"

    tenant_id: str = Field(primary_key=True, max_length=63)
    day: date = Field(primary_key=True)
    requests: int = 0
    tokens: int = 0
    reserved: int = 0


def _big(**kw: object) -> object:
    return Field(default=0, sa_column=Column(BigInteger(), nullable=False, **kw))  # type: ignore[arg-type]


class UsageLedger(SQLModel, table=True):
    """Usage per tenant, proxy key, model and UTC day, summed from the usage lines
    (`proxy.ledger`); `api_key_id`/`model` are "" when unknown. `cost_nanos` is in
    1e-9 USD; `unpriced` counts the requests whose cost is unknown (not in the sum)."""

    __tablename__ = "usage_ledger"

    tenant_id: str = Field(primary_key=True, max_length=63)
    day: date = Field(primary_key=True)
    api_key_id: str = Field(primary_key=True, max_length=40)
    model: str = Field(primary_key=True, max_length=128)
    requests: int = _big()  # type: ignore[assignment]
    prompt_tokens: int = _big()  # type: ignore[assignment]
    completion_tokens: int = _big()  # type: ignore[assignment]
    cached_tokens: int = _big()  # type: ignore[assignment]
    cost_nanos: int = _big()  # type: ignore[assignment]
    unpriced: int = _big()  # type: ignore[assignment]


class BudgetSpend(SQLModel, table=True):
    """Spend against one budget (`scope` is `tenant:<id>` or `key:<id>`) in one period
    (`day` or `month`, starting `start`), shared by every worker: `spent_nanos` settled,
    `reserved_nanos` leased by workers for requests in flight (`proxy.budgets`)."""

    __tablename__ = "budget_spend"

    scope: str = Field(primary_key=True, max_length=80)
    period: str = Field(primary_key=True, max_length=5)
    start: date = Field(primary_key=True)
    spent_nanos: int = _big()  # type: ignore[assignment]
    reserved_nanos: int = _big()  # type: ignore[assignment]
    warned_at: datetime | None = None  # a soft budget's crossing, audited once


class Replica(SQLModel, table=True):
    """A running serving process and the master key ids it can decrypt (`proxy.replicas`),
    read by `rotate-keys`. `key_ids` is comma-separated, in `ENCRYPTION_KEY`'s order."""

    __tablename__ = "replicas"

    id: str = Field(primary_key=True, max_length=120)
    host: str = Field(max_length=200)
    pid: int
    key_ids: str
    primary_key_id: str = Field(max_length=8)
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow, index=True)


class ConsoleSession(SQLModel, table=True):
    """A console sign-in (`admin.console.session`): its cookie names the row, which ends
    at `expires_at`, when idle (`last_seen_at`, refreshed at most once a minute) or
    when signed out. Holds no credential."""

    __tablename__ = "console_sessions"

    id: str = Field(primary_key=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)
    last_seen_at: datetime = Field(default_factory=utcnow)
    signed_out_at: datetime | None = None
