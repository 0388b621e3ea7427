"""The admin API's OpenAPI 3 schema, built from the same pydantic models that validate bodies."""

from __future__ import annotations

from functools import cache
from typing import Any

from admin.schemas import (
    TENANT_ID_PATTERN,
    ApiKeyCreate,
    ApiKeyUpdate,
    OpenAIKeyIn,
    TenantCreate,
    TenantUpdate,
)
from proxy.policy import PolicyIn

_TS = {"type": "string", "format": "date-time"}
_NULLABLE_TS = {"anyOf": [_TS, {"type": "null"}]}


_REF = "#/components/schemas/{model}"


def _schema(model: Any) -> dict[str, Any]:
    """A model's JSON schema, its nested models referenced as components of their own."""
    schema: dict[str, Any] = model.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json(_ref("Error"))}


_AUTH_ERRORS = {"401": _error("Missing or invalid bearer token")}
_ADMIN_ONLY = {**_AUTH_ERRORS, "403": _error("A tenant key on an admin-only route")}
_NOT_FOUND = {"404": _error("No such tenant (or not the caller's own)")}
_BODY_ERRORS = {
    "400": _error("Body is not a JSON object"),
    "413": _error("Body too large"),
    "422": _error("Body failed validation"),
}
_TENANT_ID = {
    "name": "tenant_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": TENANT_ID_PATTERN},
}


def _op(
    summary: str,
    responses: dict[str, Any],
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses, "parameters": params or []}
    if body:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    return op


@cache
def openapi_schema() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document of `/api/v1`."""
    tenant = {
        "type": "object",
        "required": ["id", "name", "tier", "created_at", "updated_at", "openai_key"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "tier": {"type": "string", "enum": ["trial", "pro", "enterprise"]},
            "created_at": _TS,
            "updated_at": _TS,
            "openai_key": _ref("OpenAIKeyStatus"),
            "policy": _ref("PolicyIn"),
        },
    }
    api_key: dict[str, Any] = {
        "type": "object",
        "required": ["id", "name", "created_at", "expires_at", "last_used_at", "policy"],
        "properties": {
            "id": {"type": "string"},
            "name": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "created_at": _TS,
            "expires_at": _NULLABLE_TS,
            "last_used_at": _NULLABLE_TS,
            "policy": _ref("PolicyIn"),
        },
    }
    counters = {
        "requests": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "cost_usd": {"type": "number"},
        "unpriced_requests": {"type": "integer"},
    }
    nullable_str = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    usage_report = {
        "type": "object",
        "required": ["data", "total", "from", "to"],
        "properties": {
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "tenant_id": {"type": "string"},
                        "day": {"type": "string", "format": "date"},
                        "model": nullable_str,
                        "api_key_id": nullable_str,
                        **counters,
                    },
                },
            },
            "total": {"type": "object", "properties": counters},
            "from": {"type": "string", "format": "date"},
            "to": {"type": "string", "format": "date"},
            "trial_allowance": {
                "type": "object",
                "properties": {
                    "day": {"type": "string", "format": "date"},
                    "requests_used": {"type": "integer"},
                    "requests_left": {"type": "integer"},
                    "tokens_used": {"type": "integer"},
                    "tokens_left": {"type": "integer"},
                },
            },
        },
    }
    usage_params = [
        {
            "name": n,
            "in": "query",
            "required": False,
            "schema": {"type": "string", "format": "date"},
        }
        for n in ("from", "to")
    ] + [
        {
            "name": "group_by",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["day", "model", "api_key"]},
        }
    ]
    key_status = {
        "type": "object",
        "required": ["status", "hint", "validated_at", "updated_at"],
        "properties": {
            "status": {"type": "string", "enum": ["none", "active", "invalid"]},
            "hint": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "validated_at": _NULLABLE_TS,
            "updated_at": _NULLABLE_TS,
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            }
        },
    }
    created = {
        "type": "object",
        "required": ["id", "name", "tier", "api_key", "api_key_id", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "tier": {"type": "string"},
            "api_key": {"type": "string"},
            "api_key_id": {"type": "string"},
            "created_at": _TS,
        },
    }
    issued = {
        "type": "object",
        "required": [*api_key["required"], "api_key"],
        "properties": {**api_key["properties"], "api_key": {"type": "string"}},
    }
    key_set = {
        "type": "object",
        "required": ["status", "hint", "validated_at"],
        "properties": {
            "status": {"type": "string"},
            "hint": {"type": "string"},
            "validated_at": _TS,
        },
    }
    event = {
        "type": "object",
        "required": ["ts", "tenant_id", "action", "actor", "key_hint", "request_id", "source_ip"],
        "properties": {
            "id": {"type": "integer"},
            "ts": _TS,
            "tenant_id": {"type": "string"},
            "action": {"type": "string"},
            "actor": {"type": "string", "enum": ["admin", "tenant", "system"]},
            "key_hint": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "request_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "source_ip": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    listing = lambda item: {  # noqa: E731
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": _ref(item)}},
    }
    ok = lambda schema, code="200", d="OK": {code: {"description": d, **_json(schema)}}  # noqa: E731
    gone = {"204": {"description": "Done"}}
    key_id = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    }
    # The format rules are checked by hand (to name the rule that failed); the schema
    # states them for clients and fuzzers: sk-, not sk-admin-, 20-512 of [A-Za-z0-9_-].
    openai_key_in = OpenAIKeyIn.model_json_schema()
    openai_key_in["properties"]["api_key"]["pattern"] = (
        r"^\s*sk-(?!admin-)[A-Za-z0-9_-]{17,509}\s*$"
    )
    t = "/api/v1/tenants"
    return {
        "openapi": "3.1.0",
        "info": {"title": "byok-proxy admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Tenant": tenant,
                "OpenAIKeyStatus": key_status,
                "Error": error,
                "TenantCreated": created,
                "ApiKeyIssued": issued,
                "OpenAIKeySet": key_set,
                "AuditEvent": event,
                "TenantCreate": TenantCreate.model_json_schema(),
                "TenantUpdate": _schema(TenantUpdate),
                "OpenAIKeyIn": openai_key_in,
                "ApiKey": api_key,
                "ApiKeyCreate": _schema(ApiKeyCreate),
                "ApiKeyUpdate": _schema(ApiKeyUpdate),
                "PolicyIn": _schema(PolicyIn),
                "BudgetIn": PolicyIn.model_json_schema()["$defs"]["BudgetIn"],
                "RateLimitsIn": PolicyIn.model_json_schema()["$defs"]["RateLimitsIn"],
                "UsageReport": usage_report,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            t: {
                "post": _op(
                    "Create a tenant and its first proxy key",
                    {
                        **ok(_ref("TenantCreated"), "201", "Created"),
                        **_ADMIN_ONLY,
                        **_BODY_ERRORS,
                        "409": _error("Tenant id taken"),
                    },
                    "TenantCreate",
                ),
                "get": _op("List tenants", {**ok(listing("Tenant")), **_ADMIN_ONLY}),
            },
            t + "/{tenant_id}": {
                "get": _op(
                    "One tenant (self)",
                    {**ok(_ref("Tenant")), **_AUTH_ERRORS, **_NOT_FOUND},
                    params=[_TENANT_ID],
                ),
                "patch": _op(
                    "Change name or tier",
                    {**ok(_ref("Tenant")), **_ADMIN_ONLY, **_NOT_FOUND, **_BODY_ERRORS},
                    "TenantUpdate",
                    [_TENANT_ID],
                ),
                "delete": _op(
                    "Delete a tenant and its keys",
                    {**gone, **_ADMIN_ONLY, **_NOT_FOUND},
                    params=[_TENANT_ID],
                ),
            },
            t + "/{tenant_id}/openai-key": {
                "post": _op(
                    "Validate, encrypt and store the tenant's OpenAI key (self)",
                    {
                        **ok(_ref("OpenAIKeySet")),
                        **_AUTH_ERRORS,
                        **_NOT_FOUND,
                        **_BODY_ERRORS,
                        "402": _error("OpenAI rejected the key"),
                        "503": _error("OpenAI unreachable"),
                    },
                    "OpenAIKeyIn",
                    [_TENANT_ID],
                ),
                "delete": _op(
                    "Remove the stored OpenAI key (self)",
                    {**gone, **_AUTH_ERRORS, **_NOT_FOUND},
                    params=[_TENANT_ID],
                ),
            },
            t + "/{tenant_id}/api-keys": {
                "post": _op(
                    "Issue another proxy key (body optional: name, expires_at, policy)",
                    {
                        **ok(_ref("ApiKeyIssued"), "201", "Created"),
                        **_ADMIN_ONLY,
                        **_NOT_FOUND,
                        **_BODY_ERRORS,
                    },
                    "ApiKeyCreate",
                    [_TENANT_ID],
                ),
                "get": _op(
                    "The tenant's proxy keys that are not revoked (never a secret)",
                    {**ok(listing("ApiKey")), **_ADMIN_ONLY, **_NOT_FOUND},
                    params=[_TENANT_ID],
                ),
            },
            t + "/{tenant_id}/usage": {
                "get": _op(
                    "Usage and cost from the ledger (self)",
                    {
                        **ok(_ref("UsageReport")),
                        **_AUTH_ERRORS,
                        **_NOT_FOUND,
                        "422": _error("Bad from/to/group_by"),
                    },
                    params=[_TENANT_ID, *usage_params],
                ),
            },
            "/api/v1/usage": {
                "get": _op(
                    "Usage and cost of every tenant, from the ledger",
                    {**ok(_ref("UsageReport")), **_ADMIN_ONLY, "422": _error("Bad query")},
                    params=usage_params,
                ),
            },
            t + "/{tenant_id}/api-keys/{key_id}": {
                "patch": _op(
                    "Change a proxy key's name, expiry or policy",
                    {**ok(_ref("ApiKey")), **_ADMIN_ONLY, **_NOT_FOUND, **_BODY_ERRORS},
                    "ApiKeyUpdate",
                    [_TENANT_ID, key_id],
                ),
                "delete": _op(
                    "Revoke a proxy key",
                    {**gone, **_ADMIN_ONLY, **_NOT_FOUND},
                    params=[_TENANT_ID, key_id],
                ),
            },
            t + "/{tenant_id}/audit": {
                "get": _op(
                    "The tenant's audit events, newest first (self)",
                    {
                        **ok(listing("AuditEvent")),
                        **_AUTH_ERRORS,
                        **_NOT_FOUND,
                        "422": _error("limit out of range"),
                    },
                    params=[_TENANT_ID, limit],
                ),
            },
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OK"}, **_ADMIN_ONLY},
                },
            },
        },
    }
