"""The admin API (control plane) as a Starlette app: routes, and errors rendered once."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from admin import keys, tenants, usage
from admin.auth import authorize
from admin.openapi import openapi_schema
from proxy.errors import MethodNotAllowed, NotFound, ProxyError

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


async def _openapi(request: Request) -> Response:
    await authorize(request)
    return JSONResponse(openapi_schema())


Endpoint = Callable[[Request], Awaitable[Response]]


def _route(path: str, **handlers: Endpoint) -> Route:
    """One route per path, dispatching on the method, so a 405's `Allow` lists them all."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        try:
            return await handlers[method](request)
        except ProxyError as exc:
            return await _proxy_error(request, exc)
        except Exception as exc:  # answered here: Starlette would re-raise and drop the connection
            return crashed(exc)

    return Route(path, endpoint, methods=list(handlers))


def create_admin_app() -> Starlette:
    """The admin app; its `state.runtime` is set by the serving app's lifespan."""
    t = f"{PREFIX}/tenants"
    routes = [
        _route(f"{PREFIX}/openapi.json", GET=_openapi),
        _route(t, POST=tenants.create_tenant, GET=tenants.list_tenants),
        _route(
            t + "/{tenant_id}",
            GET=tenants.get_tenant,
            PATCH=tenants.update_tenant,
            DELETE=tenants.delete_tenant,
        ),
        _route(
            t + "/{tenant_id}/openai-key", POST=keys.set_openai_key, DELETE=keys.delete_openai_key
        ),
        _route(t + "/{tenant_id}/api-keys", POST=tenants.issue_api_key, GET=tenants.list_api_keys),
        _route(
            t + "/{tenant_id}/api-keys/{key_id}",
            PATCH=tenants.update_api_key,
            DELETE=tenants.revoke_api_key,
        ),
        _route(t + "/{tenant_id}/audit", GET=tenants.list_audit),
        _route(t + "/{tenant_id}/usage", GET=usage.tenant_usage),
        _route(f"{PREFIX}/usage", GET=usage.all_usage),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            ProxyError: _proxy_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
