"""Request bodies of the admin API and the public shape of a tenant.

The table models (`proxy.models`) never leave the process as-is: responses are
built here, and the public tenant never carries the ciphertext.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
)
from starlette.requests import Request

from proxy.errors import BadRequest, RequestTooLarge, ValidationFailed
from proxy.models import ProxyKey, Tenant, rfc3339
from proxy.policy import PolicyIn
from proxy.policy import public as public_policy

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_ADMIN_BODY_BYTES = 64 * 1024

Tier = Literal["trial", "pro", "enterprise"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# A printable name: no control characters (PostgreSQL refuses NUL; logs and tables need none).
_NAME = r"^[^\x00-\x1f\x7f]+$"


class TenantCreate(_Body):
    name: StrictStr = Field(min_length=1, max_length=200, pattern=_NAME)
    tier: Tier
    id: StrictStr | None = Field(default=None, pattern=TENANT_ID_PATTERN)


class TenantUpdate(_Body):
    """`policy` replaces the whole policy; `"policy": null` removes it."""

    name: StrictStr | None = Field(default=None, min_length=1, max_length=200, pattern=_NAME)
    tier: Tier | None = None
    policy: PolicyIn | None = None


class ApiKeyCreate(_Body):
    name: StrictStr | None = Field(default=None, min_length=1, max_length=200, pattern=_NAME)
    expires_at: AwareDatetime | None = Field(default=None, strict=False)  # RFC 3339, with zone
    policy: PolicyIn | None = None

    @field_validator("expires_at")
    @classmethod
    def _sane_year(cls, value: datetime | None) -> datetime | None:
        if value is not None and not 2000 <= value.year <= 9000:
            raise ValueError("must be a date between the years 2000 and 9000")
        return value


class ApiKeyUpdate(ApiKeyCreate):
    """Only the fields given change; `null` clears one."""


class OpenAIKeyIn(_Body):
    api_key: StrictStr = Field(max_length=4096)


async def read_body(request: Request, model: type[_Body], optional: bool = False) -> Any:
    """Read a small JSON body and validate it; 413/400/422 in OpenAI's shape otherwise.

    Validation messages name the field and the rule, never the input value
    (it may be a key).
    """
    declared = request.headers.get("content-length")
    if declared is not None and (
        not (declared.isascii() and declared.isdigit()) or int(declared) > MAX_ADMIN_BODY_BYTES
    ):
        raise RequestTooLarge(f"Request body over {MAX_ADMIN_BODY_BYTES} bytes.")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_ADMIN_BODY_BYTES:
            raise RequestTooLarge(f"Request body over {MAX_ADMIN_BODY_BYTES} bytes.")
    if optional and not raw.strip():
        raw = bytearray(b"{}")
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ValidationFailed(f"{param}: {first['msg']}", param=param) from None


def key_status(tenant: Tenant) -> dict[str, Any]:
    """The public view of a tenant's stored OpenAI key."""
    return {
        "status": tenant.openai_key_status,
        "hint": tenant.openai_key_hint,
        "validated_at": rfc3339(tenant.openai_key_validated_at),
        "updated_at": rfc3339(tenant.openai_key_updated_at),
    }


def tenant_public(tenant: Tenant) -> dict[str, Any]:
    """The public view of a tenant: never the ciphertext."""
    return {
        "id": tenant.id,
        "name": tenant.name,
        "tier": tenant.tier,
        "created_at": rfc3339(tenant.created_at),
        "updated_at": rfc3339(tenant.updated_at),
        "openai_key": key_status(tenant),
        "policy": public_policy(tenant.policy),
    }


def api_key_public(key: ProxyKey) -> dict[str, Any]:
    """The public view of a proxy key: never its secret or hash."""
    return {
        "id": key.id,
        "name": key.name,
        "created_at": rfc3339(key.created_at),
        "expires_at": rfc3339(key.expires_at),
        "last_used_at": rfc3339(key.last_used_at),
        "policy": public_policy(key.policy),
    }
