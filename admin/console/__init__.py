"""The web console under /console: tenants and the operator, in a browser, on the admin API.

Server-rendered HTML (Jinja2, every value escaped) with a little JavaScript
(`static/console.js`: copy button, sortable and searchable tables, charts drawn
with the vendored Chart.js from the tables beside them). Every read and change
goes through the admin API's own routes in process (`api.AdminAPI`), as the
signed-in user. Built on first use by `proxy.app.ByokApp`; `admin.console: false`
in config.yaml turns it off.

    pages.py    sign-in/out, the operator's list, a tenant's page and its changes
    spend.py    a tenant's spend: charts, tables, CSV
    session.py  the sealed session cookie and the CSRF token
    sessions_store.py  the sessions' rows: sign-out, idle and expiry on the server
    context.py  what the handlers share; proxy-key management for tenants
    render.py   templates, security headers, outcomes in words
    api.py      in-process calls to the admin API
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from admin.app import crashed
from admin.console import pages, spend
from admin.console.api import AdminAPI
from admin.console.context import Console, Problem, cross_site
from admin.console.render import HERE, SecurityHeaders, error_page
from admin.console.session import Sessions
from admin.console.sessions_store import SessionRecords
from proxy.config import Config
from proxy.errors import StoreUnavailable

if TYPE_CHECKING:
    from proxy.store import Store

__all__ = ["create_console_app"]

Endpoint = Callable[[Request], Awaitable[Response]]
_T = "/console/tenants/{tenant_id:str}"


async def _problem(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_page(request, 405, "That page does not take this method.")
    return error_page(request, exc.status_code, "No such page.")


def _guarded(handler: Endpoint, method: str) -> Endpoint:
    """A POST from another site is refused before it is read (`context.cross_site`).
    The database unreachable is a 503 page; a bug answers an HTML 500, logged by the
    admin API's `crashed` (where, never the message); Starlette would re-raise it to the
    server's log with its message."""

    async def endpoint(request: Request) -> Response:
        if method == "POST" and cross_site(request):
            return error_page(request, 403, "This form was sent from another site; refused.")
        try:
            return await handler(request)
        except (Problem, HTTPException):
            raise
        except StoreUnavailable:
            return error_page(request, 503, "The database is unavailable; try again in a minute.")
        except Exception as exc:
            crashed(exc)
            return error_page(request, 500, "The console failed; the server log says where.")

    return endpoint


def create_console_app(admin_app: Starlette, config: Config) -> ASGIApp:
    """The console, calling `admin_app` (whose runtime, and so the store, the serving
    app sets)."""

    def store() -> Store:
        found: Store = admin_app.state.runtime.store
        return found

    table: list[tuple[str, Endpoint, str]] = [
        ("/console", pages.home, "GET"),
        ("/console/", pages.home, "GET"),
        ("/console/sign-in", pages.sign_in_form, "GET"),
        ("/console/sign-in", pages.sign_in, "POST"),
        ("/console/sign-out", pages.sign_out, "POST"),
        ("/console/tenants", pages.tenants_page, "GET"),
        (_T, pages.tenant_page, "GET"),
        (_T + "/openai-key", pages.register_key, "POST"),
        (_T + "/openai-key/remove", pages.remove_key, "POST"),
        (_T + "/api-keys", pages.issue_proxy_key, "POST"),
        (_T + "/api-keys/{key_id:str}/revoke", pages.revoke_proxy_key, "POST"),
        (_T + "/spend", spend.spend_page, "GET"),
        (_T + "/usage.csv", spend.usage_csv, "GET"),
    ]
    app = Starlette(
        routes=[
            *(Route(p, _guarded(h, m), methods=[m]) for p, h, m in table),
            Mount("/console/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={Problem: _problem, HTTPException: _http_error},
    )
    app.state.console = Console(
        api=AdminAPI(admin_app),
        sessions=Sessions(config.admin_token),
        records=SessionRecords(store),
        admin_token=config.admin_token,
        tiers=dict(config.tiers),
    )
    return SecurityHeaders(app)
