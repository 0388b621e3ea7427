"""The tenant's OpenAI key: format check, one validation call upstream, encrypt, store, audit.

Registration order matters: nothing is written until the key has passed the
format rules and OpenAI has accepted it, and the ciphertext and its audit
event commit in one transaction, so any failure leaves the previous key.
"""

from __future__ import annotations

import re

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from admin.auth import authorize, runtime_of
from admin.schemas import OpenAIKeyIn, read_body
from admin.tenants import get_tenant_or_404
from proxy import audit
from proxy.errors import (
    OpenAIKeyForbidden,
    OpenAIKeyInvalid,
    OpenAIQuotaExceeded,
    OpenAIUnreachable,
    ValidationFailed,
)
from proxy.models import rfc3339, utcnow
from proxy.runtime import Runtime
from proxy.security import Secret, key_hint

_KEY_CHARS = re.compile(r"[A-Za-z0-9_-]+")
MIN_KEY_LENGTH = 20
MAX_KEY_LENGTH = 512


def check_key_format(raw: str) -> Secret:
    """Strip and check a pasted key; raise 422 `invalid_key_format` naming the failed rule."""
    key = raw.strip()

    def fail(rule: str) -> ValidationFailed:
        return ValidationFailed(rule, param="api_key", code="invalid_key_format")

    if not key.startswith("sk-"):
        raise fail("An OpenAI API key starts with 'sk-'.")
    if key.startswith("sk-admin-"):
        raise fail(
            "OpenAI admin keys ('sk-admin-') are refused; register a project or user API key."
        )
    if not MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH:
        raise fail(f"An OpenAI API key is {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} characters long.")
    if not _KEY_CHARS.fullmatch(key):
        raise fail("An OpenAI API key holds only letters, digits, '-' and '_'.")
    return Secret(key)


def _insufficient_quota(response: httpx.Response) -> bool:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return False
    return isinstance(error, dict) and "insufficient_quota" in (
        error.get("code"),
        error.get("type"),
    )


async def validate_with_openai(runtime: Runtime, key: Secret, tenant_id: str) -> None:
    """One cheap upstream call with the candidate key; map the outcome to our errors."""
    upstream = runtime.config.upstream
    url = f"{upstream.base_url}/models"
    try:
        response = await runtime.validation_client.get(
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


async def set_openai_key(request: Request) -> Response:
    actor = await authorize(request, self_route=True)
    body: OpenAIKeyIn = await read_body(request, OpenAIKeyIn)
    key = check_key_format(body.api_key)
    runtime = runtime_of(request)
    tenant_id = request.path_params["tenant_id"]
    store = runtime.store

    def exists() -> None:
        with store.session() as s:
            get_tenant_or_404(s, tenant_id)

    await runtime.store.run(exists)
    await validate_with_openai(runtime, key, tenant_id)
    ciphertext = runtime.vault.encrypt_openai_key(key, tenant_id)
    hint = key_hint(key.reveal())
    del key

    def store_key() -> dict[str, object]:
        with store.session() as s:
            tenant = get_tenant_or_404(s, tenant_id)
            action = "openai_key.replaced" if tenant.openai_api_key_encrypted else "openai_key.set"
            now = utcnow()
            tenant.openai_api_key_encrypted = ciphertext
            tenant.openai_key_status = "active"
            tenant.openai_key_hint = hint
            tenant.openai_key_validated_at = now
            tenant.openai_key_updated_at = now
            tenant.updated_at = now
            audit.record(s, actor, tenant_id, action, hint)
            s.commit()
            return {"status": "active", "hint": hint, "validated_at": rfc3339(now)}

    result = await runtime.store.run(store_key)
    store.invalidate_tenant(tenant_id)
    return JSONResponse(result)


async def delete_openai_key(request: Request) -> Response:
    actor = await authorize(request, self_route=True)
    store = runtime_of(request).store
    tenant_id = request.path_params["tenant_id"]

    def work() -> None:
        with store.session() as s:
            tenant = get_tenant_or_404(s, tenant_id)
            if tenant.openai_api_key_encrypted is None:
                return
            audit.record(s, actor, tenant_id, "openai_key.removed", tenant.openai_key_hint)
            now = utcnow()
            tenant.openai_api_key_encrypted = None
            tenant.openai_key_status = "none"
            tenant.openai_key_hint = None
            tenant.openai_key_validated_at = None
            tenant.openai_key_updated_at = now
            tenant.updated_at = now
            s.commit()

    await store.run(work)
    store.invalidate_tenant(tenant_id)
    return Response(status_code=204)
