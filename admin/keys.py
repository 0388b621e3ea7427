"""The tenant's OpenAI key: format check, one validation call upstream, encrypt, store, audit.

Registration order matters: nothing is written until the key has passed the
format rules and OpenAI has accepted it, and the ciphertext and its audit
event commit in one transaction, so any failure leaves the previous key.
"""

from __future__ import annotations

import httpx
from sqlmodel import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from admin.auth import authorize, runtime_of
from admin.schemas import INVALID_KEY_FORMAT, OpenAIKeyIn, read_body
from admin.tenants import get_tenant_or_404
from proxy import audit, invalidation
from proxy.config import UpstreamConfig
from proxy.errors import (
    OpenAIKeyForbidden,
    OpenAIKeyInvalid,
    OpenAIQuotaExceeded,
    OpenAIUnreachable,
    ProxyError,
)
from proxy.models import Tenant, rfc3339, utcnow
from proxy.security import Secret, key_hint


def _insufficient_quota(response: httpx.Response) -> bool:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return False
    return isinstance(error, dict) and "insufficient_quota" in (
        error.get("code"),
        error.get("type"),
    )


async def validate_with_openai(
    client: httpx.AsyncClient, upstream: UpstreamConfig, key: Secret, tenant_id: str
) -> None:
    """One cheap upstream call with the candidate key; map the outcome to our errors."""
    url = f"{upstream.base_url}/models"
    try:
        response = await client.get(
            url,
            headers={"Authorization": f"Bearer {key.reveal()}"},
            timeout=upstream.validation_timeout,
        )
    except httpx.HTTPError:
        raise OpenAIUnreachable() from None
    status = response.status_code
    register = f"POST /api/v1/tenants/{tenant_id}/openai-key"
    if status == 200:
        return
    if status == 401:
        raise OpenAIKeyInvalid(
            "OpenAI rejected this key (invalid, revoked or expired). Nothing was stored; "
            f"create a new key in the OpenAI dashboard and register it at {register}."
        )
    if status == 429 and _insufficient_quota(response):
        raise OpenAIQuotaExceeded(
            "This key's OpenAI account is out of credit. Nothing was stored; add credit in "
            f"OpenAI billing, then register the key again at {register}."
        )
    if status == 403:
        raise OpenAIKeyForbidden(
            "OpenAI refused this key access to the API (forbidden: restricted key, region or "
            "organisation). Nothing was stored; use a key with model access.",
            param="api_key",
        )
    raise OpenAIUnreachable(
        f"OpenAI answered {status} while validating the key; nothing was stored. Retry later."
    )


def store_openai_key(
    session: Session, actor: audit.Actor, tenant_id: str, ciphertext: str, hint: str
) -> dict[str, object]:
    """Store a validated key's ciphertext and its audit event in one commit (also the CLI's).

    The tenant's row is locked first, so of two registrations at once (two
    replicas) the later sees the earlier's key and is audited as a replacement.
    """
    tenant = get_tenant_or_404(session, tenant_id, lock=True)
    action = "openai_key.replaced" if tenant.openai_api_key_encrypted else "openai_key.set"
    now = utcnow()
    tenant.openai_api_key_encrypted = ciphertext
    tenant.openai_key_status = "active"
    tenant.openai_key_hint = hint
    tenant.openai_key_validated_at = now
    tenant.openai_key_updated_at = now
    tenant.updated_at = now
    audit.record(session, actor, tenant_id, action, hint)
    invalidation.tenant_changed(session, tenant_id)
    session.commit()
    return {"status": "active", "hint": hint, "validated_at": rfc3339(now)}


# A refused registration is audited with why, never with the key: error code -> action.
REJECTIONS = {
    INVALID_KEY_FORMAT: "openai_key.rejected.format",
    OpenAIKeyInvalid.code: "openai_key.rejected.invalid",
    OpenAIQuotaExceeded.code: "openai_key.rejected.no_credit",
    OpenAIKeyForbidden.code: "openai_key.rejected.forbidden",
    OpenAIUnreachable.code: "openai_key.rejected.unverified",
}


def audit_rejection(session: Session, actor: audit.Actor, tenant_id: str, code: str) -> None:
    """Audit a key registration refused with error `code` (one of REJECTIONS), if the
    tenant exists (also the CLI's)."""
    if session.get(Tenant, tenant_id) is not None:
        audit.record(session, actor, tenant_id, REJECTIONS[code])
        session.commit()


async def set_openai_key(request: Request) -> Response:
    actor = await authorize(request, self_route=True)
    runtime = runtime_of(request)
    tenant_id = request.path_params["tenant_id"]
    store = runtime.store

    def exists() -> None:
        with store.session() as s:
            get_tenant_or_404(s, tenant_id)

    def rejected(code: str) -> None:
        with store.session() as s:
            audit_rejection(s, actor, tenant_id, code)

    try:
        body: OpenAIKeyIn = await read_body(request, OpenAIKeyIn)  # rule: proxy.keyformat
        key = body.api_key
        await runtime.store.run(exists)
        await validate_with_openai(
            runtime.validation_client, runtime.config.upstream, key, tenant_id
        )
    except ProxyError as refusal:
        if refusal.code in REJECTIONS:
            await store.run(rejected, refusal.code)
        raise
    ciphertext = runtime.vault.encrypt_openai_key(key, tenant_id)
    hint = key_hint(key.reveal())
    del key, body

    def store_key() -> dict[str, object]:
        with store.session() as s:
            return store_openai_key(s, actor, tenant_id, ciphertext, hint)

    result = await runtime.store.run(store_key)
    store.invalidate_tenant(tenant_id)
    return JSONResponse(result)


def remove_openai_key(session: Session, actor: audit.Actor, tenant_id: str) -> bool:
    """Remove the tenant's stored key (idempotent); True if there was one (then audited)."""
    tenant = get_tenant_or_404(session, tenant_id)
    if tenant.openai_api_key_encrypted is None:
        return False
    audit.record(session, actor, tenant_id, "openai_key.removed", tenant.openai_key_hint)
    now = utcnow()
    tenant.openai_api_key_encrypted = None
    tenant.openai_key_status = "none"
    tenant.openai_key_hint = None
    tenant.openai_key_validated_at = None
    tenant.openai_key_updated_at = now
    tenant.updated_at = now
    invalidation.tenant_changed(session, tenant_id)
    session.commit()
    return True


async def delete_openai_key(request: Request) -> Response:
    actor = await authorize(request, self_route=True)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]

    def work() -> None:
        with store.session() as s:
            remove_openai_key(s, actor, tenant_id)

    await store.run(work)
    store.invalidate_tenant(tenant_id)
    return Response(status_code=204)
