"""Who is calling the admin API: the operator (admin token) or a tenant (its proxy key).

Admins may use every route. A tenant's proxy key may use the *self* routes for
its own id only: another tenant's id answers 404 as if it did not exist, and
an admin-only route answers 403.
"""

from __future__ import annotations

import re
import time

from starlette.requests import Request

from proxy.audit import Actor
from proxy.errors import Forbidden, NotFound, ProxyKeyExpired, Unauthorized
from proxy.runtime import Runtime
from proxy.security import PROXY_KEY_PREFIX, bearer_token, tokens_equal
from proxy.store import Principal

# Set in the ASGI scope's state by the console (in process; no HTTP request can set it)
# when it uses the admin token for a signed-in tenant's own id: the call is confined to
# that id's proxy-key routes (`.../tenants/{id}/api-keys` and below; any other route
# answers 403) and audited as the tenant's (`admin.console.context`).
ACTING_FOR = "byok.acting_for_tenant"
_KEY_ROUTES = re.compile(r"/api/v1/tenants/[^/]+/api-keys(/[^/]+)?")
_ACTING_METHODS = frozenset({"GET", "POST", "DELETE"})  # never PATCH: a key's policy


def runtime_of(request: Request) -> Runtime:
    """The shared runtime of the app serving this request."""
    runtime: Runtime = request.app.state.runtime
    return runtime


async def authenticate(request: Request) -> Principal | None:
    """Who the bearer token is: None for the admin token, else the tenant's valid proxy
    key. A missing or unknown token is 401 (and counts against the caller's address,
    which answers 429 once over its limit); an expired key is 401 `proxy_key_expired`."""
    runtime = runtime_of(request)
    token = bearer_token(request.headers.get("authorization", "").encode("latin-1"))
    if token is not None and tokens_equal(token, runtime.config.admin_token.reveal()):
        return None
    source_ip = _source_ip(request)
    guards = runtime.auth_limit
    known = token is not None and runtime.store.recently_valid(token)
    if not known and guards.over(source_ip):
        raise guards.refuse()  # guessing proxy keys: no lookup
    if token is None or not token.startswith(PROXY_KEY_PREFIX):
        guards.failed(source_ip)
        raise Unauthorized()
    principal = await runtime.store.principal_async(token)
    if principal is None:
        guards.failed(source_ip)
        raise Unauthorized()
    if principal.expired(time.time()):
        raise ProxyKeyExpired()
    return principal


async def authorize(request: Request, *, self_route: bool = False) -> Actor:
    """Check the caller may use this route; return it as an audit Actor."""
    principal = await authenticate(request)
    request_id = request.scope.get("state", {}).get("request_id")
    source_ip = _source_ip(request)
    if principal is None:
        acting_for = request.scope.get("state", {}).get(ACTING_FOR)
        if acting_for is None:
            return Actor("admin", None, request_id, source_ip)
        if (
            not _KEY_ROUTES.fullmatch(request.scope["path"])
            or request.method not in _ACTING_METHODS
        ):
            raise Forbidden(
                "Acting for a tenant is confined to listing, issuing and revoking its proxy keys."
            )
        if request.path_params.get("tenant_id") != acting_for:
            raise NotFound("No such tenant.")
        return Actor("tenant", acting_for, request_id, source_ip)
    if not self_route:
        raise Forbidden("A tenant's proxy key may not use this route; it needs the admin token.")
    if request.path_params.get("tenant_id") != principal.tenant_id:
        raise NotFound("No such tenant.")
    return Actor("tenant", principal.tenant_id, request_id, source_ip)


def _source_ip(request: Request) -> str | None:
    return runtime_of(request).config.trusted_proxies.client(request.scope)
