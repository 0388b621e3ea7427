"""Tenant and proxy-key endpoints of the admin API."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from admin.auth import authorize, runtime_of
from admin.schemas import (
    ApiKeyCreate,
    ApiKeyUpdate,
    TenantCreate,
    TenantUpdate,
    api_key_public,
    read_body,
    tenant_created,
    tenant_public,
)
from proxy import audit, invalidation, policy
from proxy.errors import Conflict, NotFound, ValidationFailed
from proxy.models import ProxyKey, Tenant, TrialAllowance, utcnow
from proxy.security import hash_proxy_key, new_proxy_key


def _issue_key(
    session: Session, actor: audit.Actor, tenant_id: str, spec: ApiKeyCreate | None = None
) -> tuple[ProxyKey, str]:
    """Add a new proxy key to `session`; return its row and the plaintext (shown once)."""
    spec = spec or ApiKeyCreate()
    plaintext = new_proxy_key()
    row = ProxyKey(
        id="key_" + secrets.token_hex(8),
        tenant_id=tenant_id,
        key_hash=hash_proxy_key(plaintext),
        name=spec.name,
        expires_at=spec.expires_at,
        policy=policy.dump(spec.policy),
    )
    session.add(row)
    audit.record(session, actor, tenant_id, "api_key.issued", row.id)
    return row, plaintext


def get_tenant_or_404(session: Session, tenant_id: str, lock: bool = False) -> Tenant:
    """The tenant (its row locked until commit if `lock`; SQLite locks on write), or 404."""
    tenant = session.get(Tenant, tenant_id, with_for_update=lock)
    if tenant is None:
        raise NotFound("No such tenant.")
    return tenant


def create_tenant_row(
    store_session: Session, actor: audit.Actor, name: str, tier: str, tenant_id: str | None
) -> tuple[Tenant, ProxyKey, str]:
    """Create a tenant and its first proxy key in one transaction (also used by the CLI)."""
    tenant = Tenant(id=tenant_id or "t" + secrets.token_hex(6), name=name, tier=tier)
    store_session.add(tenant)
    audit.record(store_session, actor, tenant.id, "tenant.created")
    try:
        store_session.flush()
    except IntegrityError:
        store_session.rollback()
        raise Conflict(
            f"A tenant with id {tenant.id!r} already exists.", param="id", code="tenant_exists"
        ) from None
    key, plaintext = _issue_key(store_session, actor, tenant.id)
    invalidation.tenant_changed(store_session, tenant.id)  # a replica may cache "no such"
    store_session.commit()
    return tenant, key, plaintext


async def create_tenant(request: Request) -> Response:
    actor = await authorize(request)
    body: TenantCreate = await read_body(request, TenantCreate)
    store = runtime_of(request).store

    def work() -> tuple[Tenant, ProxyKey, str]:
        with store.session() as s:
            return create_tenant_row(s, actor, body.name, body.tier, body.id)

    tenant, key, plaintext = await store.run(work)
    return JSONResponse(
        tenant_created(tenant, key, plaintext),
        status_code=201,
    )


def tenant_rows(session: Session) -> list[Tenant]:
    """Every tenant, oldest first."""
    return list(session.exec(select(Tenant).order_by(col(Tenant.created_at), col(Tenant.id))))


async def list_tenants(request: Request) -> Response:
    await authorize(request)
    store = runtime_of(request).store

    def work() -> list[dict[str, object]]:
        with store.session() as s:
            return [tenant_public(t) for t in tenant_rows(s)]

    return JSONResponse({"data": await store.run(work)})


async def get_tenant(request: Request) -> Response:
    await authorize(request, self_route=True)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]

    def work() -> dict[str, object]:
        with store.session() as s:
            return tenant_public(get_tenant_or_404(s, tenant_id))

    return JSONResponse(await store.run(work))


def update_tenant_row(
    session: Session, actor: audit.Actor, tenant_id: str, body: TenantUpdate
) -> Tenant:
    """Apply the fields given in `body`; audit and commit only what changed (also the CLI's)."""
    tenant = get_tenant_or_404(session, tenant_id)
    changes = body.model_dump(exclude_none=True, exclude={"policy"})
    changed = False
    if any(getattr(tenant, k) != v for k, v in changes.items()):
        for k, v in changes.items():
            setattr(tenant, k, v)
        audit.record(session, actor, tenant_id, "tenant.updated")
        changed = True
    if "policy" in body.model_fields_set:
        stored = policy.dump(body.policy)
        if stored != tenant.policy:
            tenant.policy = stored
            audit.record(session, actor, tenant_id, "policy.updated")
            changed = True
    if changed:
        tenant.updated_at = utcnow()
        invalidation.tenant_changed(session, tenant_id)
        session.commit()
    return tenant


async def update_tenant(request: Request) -> Response:
    actor = await authorize(request)
    body: TenantUpdate = await read_body(request, TenantUpdate)
    runtime = runtime_of(request)
    tenant_id = request.path_params["tenant_id"]

    def work() -> dict[str, object]:
        with runtime.store.session() as s:
            return tenant_public(update_tenant_row(s, actor, tenant_id, body))

    result = await runtime.store.run(work)
    runtime.store.invalidate_tenant(tenant_id)
    return JSONResponse(result)


def delete_tenant_row(session: Session, actor: audit.Actor, tenant_id: str) -> None:
    """Delete a tenant, its proxy keys, stored key and allowance; audited (also the CLI's)."""
    tenant = get_tenant_or_404(session, tenant_id)
    for key in session.exec(select(ProxyKey).where(ProxyKey.tenant_id == tenant_id)).all():
        session.delete(key)
        # Its own keys only: every process dropping every cached key would reload them all.
        invalidation.key_changed(session, key.key_hash)
    audit.record(session, actor, tenant_id, "tenant.deleted", tenant.openai_key_hint)
    # Its trial allowance goes with it (a tenant re-created under the id starts afresh).
    session.execute(delete(TrialAllowance).where(col(TrialAllowance.tenant_id) == tenant_id))
    session.delete(tenant)
    invalidation.tenant_changed(session, tenant_id)
    session.commit()


async def delete_tenant(request: Request) -> Response:
    actor = await authorize(request)
    runtime = runtime_of(request)
    tenant_id = request.path_params["tenant_id"]

    def work() -> None:
        with runtime.store.session() as s:
            delete_tenant_row(s, actor, tenant_id)

    await runtime.store.run(work)
    runtime.store.invalidate_tenant(tenant_id)
    runtime.store.invalidate_keys()
    return Response(status_code=204)


def issue_api_key_row(
    session: Session, actor: audit.Actor, tenant_id: str, spec: ApiKeyCreate
) -> tuple[ProxyKey, str]:
    """Issue and commit another proxy key for the tenant; the plaintext is shown once."""
    get_tenant_or_404(session, tenant_id)
    row, plaintext = _issue_key(session, actor, tenant_id, spec)
    session.commit()
    return row, plaintext


async def issue_api_key(request: Request) -> Response:
    actor = await authorize(request)
    body: ApiKeyCreate = await read_body(request, ApiKeyCreate, optional=True)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]

    def work() -> tuple[ProxyKey, str]:
        with store.session() as s:
            return issue_api_key_row(s, actor, tenant_id, body)

    row, plaintext = await store.run(work)
    return JSONResponse({**api_key_public(row), "api_key": plaintext}, status_code=201)


def api_key_rows(session: Session, tenant_id: str) -> list[ProxyKey]:
    """The tenant's proxy keys that are not revoked, oldest first (404 for no tenant)."""
    get_tenant_or_404(session, tenant_id)
    return list(
        session.exec(
            select(ProxyKey)
            .where(ProxyKey.tenant_id == tenant_id, col(ProxyKey.revoked_at).is_(None))
            .order_by(col(ProxyKey.created_at), col(ProxyKey.id))
        )
    )


async def list_api_keys(request: Request) -> Response:
    """The tenant's proxy keys that are not revoked, oldest first; never a secret."""
    await authorize(request)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]

    def work() -> list[dict[str, object]]:
        with store.session() as s:
            return [api_key_public(k) for k in api_key_rows(s, tenant_id)]

    return JSONResponse({"data": await store.run(work)})


async def update_api_key(request: Request) -> Response:
    """Change a key's name, expiry or policy; audited as `api_key.updated`."""
    actor = await authorize(request)
    body: ApiKeyUpdate = await read_body(request, ApiKeyUpdate)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]
    key_id = request.path_params["key_id"]

    def work() -> dict[str, object]:
        with store.session() as s:
            get_tenant_or_404(s, tenant_id)
            row = s.get(ProxyKey, key_id)
            if row is None or row.tenant_id != tenant_id or row.revoked_at is not None:
                raise NotFound("No such proxy key for this tenant.")
            given = body.model_fields_set
            changes = {
                name: value
                for name, value in (
                    ("name", body.name),
                    ("expires_at", body.expires_at),
                    ("policy", policy.dump(body.policy)),
                )
                if name in given
            }
            if any(_differs(getattr(row, k), v) for k, v in changes.items()):
                for k, v in changes.items():
                    setattr(row, k, v)
                audit.record(s, actor, tenant_id, "api_key.updated", key_id)
                invalidation.key_changed(s, row.key_hash)
                s.commit()
            return api_key_public(row)

    result = await store.run(work)
    store.invalidate_keys()
    return JSONResponse(result)


def _differs(stored: object, new: object) -> bool:
    """Whether a new value differs from the stored one (timestamps compared as instants)."""
    if isinstance(stored, datetime) and isinstance(new, datetime):
        as_utc = [v if v.tzinfo else v.replace(tzinfo=UTC) for v in (stored, new)]
        return as_utc[0] != as_utc[1]
    return stored != new


def revoke_api_key_row(session: Session, actor: audit.Actor, tenant_id: str, key_id: str) -> None:
    """Revoke one of the tenant's proxy keys (idempotent; audited once)."""
    get_tenant_or_404(session, tenant_id)
    row = session.get(ProxyKey, key_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound("No such proxy key for this tenant.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(session, actor, tenant_id, "api_key.revoked", key_id)
        invalidation.key_changed(session, row.key_hash)
        session.commit()


async def revoke_api_key(request: Request) -> Response:
    actor = await authorize(request)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]
    key_id = request.path_params["key_id"]

    def work() -> None:
        with store.session() as s:
            revoke_api_key_row(s, actor, tenant_id, key_id)

    await store.run(work)
    store.invalidate_keys()
    return Response(status_code=204)


def audit_events(session: Session, tenant_id: str, limit: int) -> list[dict[str, object]]:
    """The tenant's audit events, newest first; they outlive a deleted tenant, so
    404 only when there never was one."""
    events = audit.list_events(session, tenant_id, limit)
    if not events and session.get(Tenant, tenant_id) is None:
        raise NotFound("No such tenant.")
    return events


async def list_audit(request: Request) -> Response:
    await authorize(request, self_route=True)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]
    limit_text = request.query_params.get("limit", "100")
    if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= 1000:
        raise ValidationFailed("limit: an integer from 1 to 1000", param="limit")
    limit = int(limit_text)

    def work() -> list[dict[str, object]]:
        with store.session() as s:
            return audit_events(s, tenant_id, limit)

    return JSONResponse({"data": await store.run(work)})
