"""The admin API's request bodies and responses, as pydantic models.

Request bodies are validated with these models (`read_body`); responses are
built with them and checked against them before they leave (`admin.app`); the
OpenAPI document is generated from them (`admin.openapi`). The table models
(`proxy.models`) never leave the process as-is: the public tenant never
carries the ciphertext.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    RootModel,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import Request

from proxy import keyformat
from proxy.config import Tier
from proxy.errors import BadRequest, RequestTooLarge, ValidationFailed
from proxy.models import ProxyKey, Tenant, rfc3339
from proxy.policy import PolicyIn
from proxy.policy import public as public_policy
from proxy.security import Secret

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_ADMIN_BODY_BYTES = 64 * 1024


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


def _openai_key(value: object) -> Secret:
    """Apply `proxy.keyformat`'s rule; a broken rule is its own error type, named."""
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    try:
        return keyformat.check_openai_key(value)
    except keyformat.KeyFormatError as exc:
        raise PydanticCustomError(INVALID_KEY_FORMAT, "{rule}", {"rule": str(exc)}) from None


INVALID_KEY_FORMAT = "invalid_key_format"
OpenAIKey = Annotated[
    Secret,
    PlainValidator(_openai_key),
    WithJsonSchema({"type": "string", "pattern": keyformat.PATTERN}),
]


class OpenAIKeyIn(_Body):
    """The key arrives as a masked `Secret`, and errors never quote it: neither a repr
    of the body nor a `ValidationError`'s text shows it."""

    model_config = ConfigDict(hide_input_in_errors=True)

    api_key: OpenAIKey


BODY_MODEL = "byok.body_model"  # request scope: the body model the route table documents


async def read_body(request: Request, model: type[_Body], optional: bool = False) -> Any:
    """Read a small JSON body and validate it; 413/400/422 in OpenAI's shape otherwise.

    Validation messages name the field and the rule, never the input value
    (it may be a key). A handler reading a model other than the one its route
    documents is a bug, refused before anything is read.
    """
    if request.scope.get(BODY_MODEL) is not model:
        raise RuntimeError(f"{model.__name__} is not the body model this route documents")
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
        code = INVALID_KEY_FORMAT if first["type"] == INVALID_KEY_FORMAT else None
        raise ValidationFailed(f"{param}: {first['msg']}", param=param, code=code) from None


# --- responses -----------------------------------------------------------------------

# A timestamp goes out as RFC 3339 UTC text with milliseconds (`proxy.models.rfc3339`).
Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class _Out(BaseModel):
    """A response body: an unknown field in it is a bug (a leak, or an undocumented field)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(_Out):
    """Every error of the admin API, in OpenAI's shape (`proxy.errors`)."""

    error: ErrorDetail


class OpenAIKeyStatus(_Out):
    status: Literal["none", "active", "invalid"]
    hint: str | None
    validated_at: Timestamp | None
    updated_at: Timestamp | None


class TenantPublic(_Out):
    id: str
    name: str
    tier: Tier
    created_at: Timestamp
    updated_at: Timestamp
    openai_key: OpenAIKeyStatus
    policy: PolicyIn


class TenantList(_Out):
    data: list[TenantPublic]


class TenantCreated(_Out):
    """`api_key` is shown here only."""

    id: str
    name: str
    tier: Tier
    api_key: str
    api_key_id: str
    created_at: Timestamp


class ApiKeyPublic(_Out):
    id: str
    name: str | None
    created_at: Timestamp
    expires_at: Timestamp | None
    last_used_at: Timestamp | None
    policy: PolicyIn


class ApiKeyList(_Out):
    data: list[ApiKeyPublic]


class ApiKeyIssued(ApiKeyPublic):
    """`api_key` is shown here only."""

    api_key: str


class OpenAIKeySet(_Out):
    status: Literal["active"]
    hint: str
    validated_at: Timestamp


class AuditEventPublic(_Out):
    id: int
    ts: Timestamp
    tenant_id: str
    action: str
    actor: Literal["admin", "tenant", "system"]
    key_hint: str | None
    request_id: str | None
    source_ip: str | None


class AuditEventList(_Out):
    data: list[AuditEventPublic]


class UsageCounters(_Out):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    unpriced_requests: int


class UsageRow(UsageCounters):
    """One group: `tenant_id` on the all-tenants route, and the one label of `group_by`."""

    tenant_id: str | None = None
    day: date | None = None
    model: str | None = None
    api_key_id: str | None = None


class TrialAllowanceStatus(_Out):
    day: date
    requests_used: int
    requests_left: int
    tokens_used: int
    tokens_left: int


class UsageReport(_Out):
    data: list[UsageRow]
    total: UsageCounters
    from_: date = Field(alias="from")
    to: date
    trial_allowance: TrialAllowanceStatus | None = None


class AdminCaller(_Out):
    """`GET /whoami` with the admin token."""

    kind: Literal["admin"]


class TenantCaller(_Out):
    """A tenant's proxy key: whose it is and its id (never the secret)."""

    kind: Literal["tenant"]
    tenant_id: str
    api_key_id: str


class Whoami(RootModel[Annotated[AdminCaller | TenantCaller, Field(discriminator="kind")]]):
    """Who the bearer token is: the operator, or a tenant's valid proxy key."""


class OpenAPIDocument(RootModel[dict[str, Any]]):
    """This API's OpenAPI 3.1 document."""


def _today() -> date:
    return datetime.now(UTC).date()


class UsageQuery(BaseModel):
    """The query of the usage routes (UTC days, inclusive; default: today)."""

    from_: date = Field(default_factory=_today, alias="from")
    to: date = Field(default_factory=_today)
    group_by: Literal["day", "model", "api_key"] = "day"


class AuditQuery(BaseModel):
    limit: int = Field(default=100, ge=1, le=1000)


def _key_status(tenant: Tenant) -> OpenAIKeyStatus:
    """The public view of a tenant's stored OpenAI key."""
    return OpenAIKeyStatus(
        status=tenant.openai_key_status,  # type: ignore[arg-type]
        hint=tenant.openai_key_hint,
        validated_at=tenant.openai_key_validated_at,
        updated_at=tenant.openai_key_updated_at,
    )


def tenant_public(tenant: Tenant) -> dict[str, Any]:
    """The public view of a tenant, as JSON: never the ciphertext."""
    return TenantPublic(
        id=tenant.id,
        name=tenant.name,
        tier=tenant.tier,  # type: ignore[arg-type]
        created_at=tenant.created_at,
        updated_at=tenant.updated_at,
        openai_key=_key_status(tenant),
        policy=PolicyIn.model_validate(public_policy(tenant.policy)),
    ).model_dump(mode="json")


def tenant_created(tenant: Tenant, key: ProxyKey, plaintext: str) -> dict[str, Any]:
    """The answer to a tenant's creation (admin API and CLI): its proxy key, this once."""
    return TenantCreated(
        id=tenant.id,
        name=tenant.name,
        tier=tenant.tier,  # type: ignore[arg-type]
        api_key=plaintext,
        api_key_id=key.id,
        created_at=tenant.created_at,
    ).model_dump(mode="json")


def api_key_public(key: ProxyKey) -> dict[str, Any]:
    """The public view of a proxy key, as JSON: never its secret or hash."""
    return ApiKeyPublic(
        id=key.id,
        name=key.name,
        created_at=key.created_at,
        expires_at=key.expires_at,
        last_used_at=key.last_used_at,
        policy=PolicyIn.model_validate(public_policy(key.policy)),
    ).model_dump(mode="json")
