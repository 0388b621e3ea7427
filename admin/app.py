"""The admin API (control plane) as a Starlette app: routes, and errors rendered once."""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from admin import keys, tenants
from admin.auth import authorize
from admin.openapi import openapi_schema
from proxy.errors import MethodNotAllowed, NotFound, ProxyError

log = logging.getLogger("byok.admin")

PREFIX = "/api/v1"


def error_response(exc: ProxyError) -> Response:
    """The one renderer of our errors, in OpenAI's shape."""
    return Response(exc.render(), status_code=exc.status_code, media_type="application/json")


async def _proxy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    if exc.status_code >= 500:
        log.error("admin request failed: %s (%s)", exc.code, type(exc).__name__)
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed())
    if exc.status_code == 404:
        return error_response(NotFound(f"No such route; the admin API lives under {PREFIX}."))
    return error_response(ProxyError(exc.detail, code="http_error"))


async def _unexpected(_request: Request, exc: Exception) -> Response:
    log.error("admin request crashed: %s", type(exc).__name__)
    return error_response(ProxyError())


async def _openapi(request: Request) -> Response:
    await authorize(request)
    return JSONResponse(openapi_schema())


def create_admin_app() -> Starlette:
    """The admin app; its `state.runtime` is set by the serving app's lifespan."""
    t = f"{PREFIX}/tenants"
    routes = [
        Route(f"{PREFIX}/openapi.json", _openapi, methods=["GET"]),
        Route(t, tenants.create_tenant, methods=["POST"]),
        Route(t, tenants.list_tenants, methods=["GET"]),
        Route(t + "/{tenant_id}", tenants.get_tenant, methods=["GET"]),
        Route(t + "/{tenant_id}", tenants.update_tenant, methods=["PATCH"]),
        Route(t + "/{tenant_id}", tenants.delete_tenant, methods=["DELETE"]),
        Route(t + "/{tenant_id}/openai-key", keys.set_openai_key, methods=["POST"]),
        Route(t + "/{tenant_id}/openai-key", keys.delete_openai_key, methods=["DELETE"]),
        Route(t + "/{tenant_id}/api-keys", tenants.issue_api_key, methods=["POST"]),
        Route(t + "/{tenant_id}/api-keys/{key_id}", tenants.revoke_api_key, methods=["DELETE"]),
        Route(t + "/{tenant_id}/audit", tenants.list_audit, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            ProxyError: _proxy_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
