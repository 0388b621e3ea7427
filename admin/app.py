"""The admin API (control plane) as a Starlette app: errors rendered once, and `ROUTES`.

`ROUTES` names each operation's handler and models; the OpenAPI document is
generated from it, and each answer is held to it (`_as_documented`).
"""

from __future__ import annotations

import logging
import traceback
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from admin import keys, tenants, usage
from admin.auth import ACTING_FOR, authenticate, authorize
from admin.openapi import Operation, build_document
from admin.schemas import (
    BODY_MODEL,
    ApiKeyCreate,
    ApiKeyIssued,
    ApiKeyList,
    ApiKeyPublic,
    ApiKeyUpdate,
    AuditEventList,
    AuditQuery,
    OpenAIKeyIn,
    OpenAIKeySet,
    OpenAPIDocument,
    TenantCreate,
    TenantCreated,
    TenantList,
    TenantPublic,
    TenantUpdate,
    UsageQuery,
    UsageReport,
    Whoami,
)
from proxy.errors import Forbidden, MethodNotAllowed, NotFound, ProxyError

log = logging.getLogger("byok.admin")

PREFIX = "/api/v1"


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> Response:
    """The one renderer of our errors, in OpenAI's shape."""
    carried = {name.decode(): value.decode() for name, value in exc.headers}
    return Response(
        exc.render(),
        status_code=exc.status_code,
        media_type="application/json",
        headers={**carried, **(headers or {})},
    )


async def _proxy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    if exc.status_code >= 500:
        log.error("admin request failed: %s (%s)", exc.code, type(exc).__name__)
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:  # keeps Starlette's Allow header (RFC 9110)
        return error_response(MethodNotAllowed(), dict(exc.headers or {}))
    if exc.status_code == 404:
        return error_response(NotFound(f"No such route; the admin API lives under {PREFIX}."))
    return error_response(ProxyError(exc.detail, code="http_error"))


def crashed(exc: BaseException) -> Response:
    """A bug: logged at ERROR with where it happened (file, line, function: never the
    exception's message or locals, which may hold request data), answered as a 500 in
    OpenAI's shape on a connection that stays usable."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1])
    log.error("admin request crashed: %s at %s", type(exc).__name__, where or "?")
    return error_response(ProxyError())


async def _unexpected(_request: Request, exc: Exception) -> Response:
    return crashed(exc)


@cache
def openapi_document() -> dict[str, Any]:
    """The document of `ROUTES`, built on first use (~10 ms), not at import."""
    return build_document(ROUTES)


async def _openapi(request: Request) -> Response:
    await authorize(request)
    return JSONResponse(openapi_document())


async def whoami(request: Request) -> Response:
    """Whose credential this is: the console signs in with the credential alone."""
    principal = await authenticate(request)
    if principal is None:
        if request.scope.get("state", {}).get(ACTING_FOR) is not None:
            raise Forbidden("Acting for a tenant is confined to its proxy-key routes.")
        return JSONResponse({"kind": "admin"})
    return JSONResponse(
        {"kind": "tenant", "tenant_id": principal.tenant_id, "api_key_id": principal.key_id}
    )


_T = f"{PREFIX}/tenants"
_ID = _T + "/{tenant_id}"
_KEY_ERRORS = {
    402: "OpenAI rejected the key, or its account is out of credit; nothing was stored",
    422: "The key broke a format rule (`invalid_key_format`, the rule named), OpenAI "
    "refused it access (`openai_key_forbidden`), or the body failed validation",
    503: "OpenAI or the database is unreachable; nothing was stored",
}

# The admin API: path -> method -> operation. The OpenAPI document is generated from this.
ROUTES: dict[str, dict[str, Operation]] = {
    f"{PREFIX}/openapi.json": {
        "GET": Operation(_openapi, "This document", OpenAPIDocument),
    },
    f"{PREFIX}/whoami": {
        "GET": Operation(
            whoami,
            "Whose bearer token this is: the admin token, or which tenant's proxy key",
            Whoami,
            self_route=True,
        ),
    },
    _T: {
        "POST": Operation(
            tenants.create_tenant,
            "Create a tenant and its first proxy key (shown only here)",
            TenantCreated,
            status=201,
            body=TenantCreate,
            errors={409: "Tenant id taken"},
        ),
        "GET": Operation(tenants.list_tenants, "List tenants", TenantList),
    },
    _ID: {
        "GET": Operation(tenants.get_tenant, "One tenant", TenantPublic, self_route=True),
        "PATCH": Operation(
            tenants.update_tenant,
            "Change a tenant's name, tier or policy",
            TenantPublic,
            body=TenantUpdate,
        ),
        "DELETE": Operation(
            tenants.delete_tenant, "Delete a tenant, its proxy keys and its stored key", status=204
        ),
    },
    _ID + "/openai-key": {
        "POST": Operation(
            keys.set_openai_key,
            "Validate, encrypt and store the tenant's OpenAI key (replaces any previous one)",
            OpenAIKeySet,
            body=OpenAIKeyIn,
            self_route=True,
            errors=_KEY_ERRORS,
        ),
        "DELETE": Operation(
            keys.delete_openai_key,
            "Remove the stored OpenAI key (204 whether or not one was stored)",
            status=204,
            self_route=True,
        ),
    },
    _ID + "/api-keys": {
        "POST": Operation(
            tenants.issue_api_key,
            "Issue another proxy key (body optional: name, expires_at, policy)",
            ApiKeyIssued,
            status=201,
            body=ApiKeyCreate,
            body_optional=True,
        ),
        "GET": Operation(
            tenants.list_api_keys,
            "The tenant's proxy keys that are not revoked (never a secret)",
            ApiKeyList,
        ),
    },
    _ID + "/api-keys/{key_id}": {
        "PATCH": Operation(
            tenants.update_api_key,
            "Change a proxy key's name, expiry or policy",
            ApiKeyPublic,
            body=ApiKeyUpdate,
        ),
        "DELETE": Operation(tenants.revoke_api_key, "Revoke a proxy key", status=204),
    },
    _ID + "/audit": {
        "GET": Operation(
            tenants.list_audit,
            "The tenant's audit events, newest first",
            AuditEventList,
            query=AuditQuery,
            self_route=True,
        ),
    },
    _ID + "/usage": {
        "GET": Operation(
            usage.tenant_usage,
            "The tenant's usage and cost from the ledger",
            UsageReport,
            query=UsageQuery,
            self_route=True,
        ),
    },
    f"{PREFIX}/usage": {
        "GET": Operation(
            usage.all_usage,
            "Usage and cost of every tenant, from the ledger",
            UsageReport,
            query=UsageQuery,
        ),
    },
}


def _as_documented(path: str, request: Request, op: Operation, response: Response) -> Response:
    """The handler's response if it is the documented one; else a bug, answered as a 500.

    Like FastAPI's `response_model`: the document cannot promise what the
    code does not send, and an undocumented field (a leak) never leaves.
    """
    problem = None
    if response.status_code != op.status:
        problem = f"status {response.status_code}"
    elif op.response is not None:
        try:
            op.response.model_validate_json(bytes(response.body))
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False)[:3]
            problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in errors)
    if problem is None:
        return response
    log.error(
        "admin %s %s answered outside its documented %d response (%s)",
        request.method,
        path,
        op.status,
        problem,
    )
    return error_response(ProxyError())


def _route(path: str, ops: dict[str, Operation]) -> Route:
    """One route per path, dispatching on the method, so a 405's `Allow` lists them all."""

    async def endpoint(request: Request) -> Response:
        op = ops["GET" if request.method == "HEAD" else request.method]
        request.scope[BODY_MODEL] = op.body
        try:
            return _as_documented(path, request, op, await op.handler(request))
        except ProxyError as exc:
            return await _proxy_error(request, exc)
        except Exception as exc:  # answered here: Starlette would re-raise and drop the connection
            return crashed(exc)

    return Route(path, endpoint, methods=list(ops))


def create_admin_app() -> Starlette:
    """The admin app; its `state.runtime` is set by the serving app's lifespan."""
    return Starlette(
        routes=[_route(path, ops) for path, ops in ROUTES.items()],
        exception_handlers={
            ProxyError: _proxy_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
