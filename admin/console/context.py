"""What every console handler shares: the admin API, the sessions, and the signed-in check.

Proxy-key management (list, issue, revoke) is admin-only in the admin API
(SPEC section 4). The console offers it to a tenant for its own id: the
tenant's credential first passes the admin API's own self check for that id
(`GET /tenants/{id}`), and only then is the key route called with the admin
token, marked as acting for that tenant (`as_key_manager`): the admin API then
refuses any other id and audits the change as the tenant's. Nothing else is
called with a credential the user did not sign in with.

Every POST is refused (403) when the browser says it comes from another site
(`Sec-Fetch-Site: cross-site` or `same-site`) or names an `Origin` that is not
the console's own, before its CSRF token is even read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from admin.console.api import AdminAPI, Answer, path
from admin.console.render import error_page
from admin.console.session import COOKIE, PRE_COOKIE, Session, Sessions
from admin.console.sessions_store import SessionRecords
from proxy.config import TierPolicy
from proxy.security import Secret

MAX_FORM_BYTES = 64 * 1024


class Problem(Exception):
    """A handler stops with this page (an error, or a redirect to sign in)."""

    def __init__(self, response: Response) -> None:
        self.response = response


@dataclass
class Console:
    """What every console handler shares: the admin API, session cookies and records,
    the admin token (for a tenant's own proxy keys only) and the tier policies."""

    api: AdminAPI
    sessions: Sessions
    records: SessionRecords
    admin_token: Secret
    tiers: dict[str, TierPolicy]

    async def current(self, request: Request) -> Session | None:
        """The signed-in user: a sealed cookie whose session row is still alive."""
        session = self.sessions.open(request)
        if session is None or not await self.records.alive(session.id):
            return None
        request.scope["console.session"] = session
        return session

    async def session(self, request: Request) -> Session:
        """The signed-in user, or a redirect to the sign-in page (dropping a cookie whose
        session has ended)."""
        session = await self.current(request)
        if session is None:
            response = RedirectResponse("/console/sign-in", status_code=303)
            if request.cookies.get(COOKIE):
                self.sessions.clear_cookie(response)
            raise Problem(response)
        return session

    async def form(self, request: Request, session: Session | None) -> dict[str, str]:
        """A POSTed form (at most 64 KiB), its CSRF token checked against the session's."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                raise Problem(error_page(request, 413, "That form was too large."))
        fields = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        expected = session.csrf if session else request.cookies.get(PRE_COOKIE, "")
        if not expected or not self.sessions.csrf_ok(fields.get("csrf"), expected):
            raise Problem(
                error_page(
                    request,
                    403,
                    "csrf_failed: this form was not sent from a current console page. "
                    "Reload the page and try again.",
                )
            )
        return fields

    async def call(
        self, request: Request, session: Session, method: str, target: str, **kw: Any
    ) -> Answer:
        """The admin API as the signed-in user."""
        return await self.api.call(request, session.credential, method, target, **kw)

    async def need(
        self, request: Request, session: Session, method: str, target: str, **kw: Any
    ) -> Any:
        """The body of a call that must succeed; otherwise the page that says why."""
        answer = await self.call(request, session, method, target, **kw)
        if not answer.ok:
            raise Problem(self.failure(request, answer))
        return answer.body

    async def as_key_manager(
        self,
        request: Request,
        session: Session,
        tenant_id: str,
        method: str,
        *parts: str,
        **kw: Any,
    ) -> Answer:
        """A proxy-key route of `tenant_id`: as the operator, or for a tenant on its own id
        once the admin API has accepted its credential for that id (see the docstring)."""
        target = path("tenants", tenant_id, "api-keys", *parts)
        if session.is_operator:
            return await self.call(request, session, method, target, **kw)
        if session.tenant_id != tenant_id:
            return Answer(404, {"error": {"message": "No such tenant.", "code": "not_found"}})
        check = await self.call(request, session, "GET", path("tenants", tenant_id))
        if not check.ok:
            return check
        if method != "GET":
            refusal = await self._restricted_signer(request, session, tenant_id)
            if refusal is not None:
                return refusal
        return await self.api.call(
            request, self.admin_token, method, target, acting_for=tenant_id, **kw
        )

    async def _restricted_signer(
        self, request: Request, session: Session, tenant_id: str
    ) -> Answer | None:
        """A 403 when the proxy key this tenant signed in with has limits of its own (a
        policy or an expiry): issuing or revoking keys with it would let its holder mint
        an unrestricted, lasting key, or revoke the keys the operator gave others."""
        me = await self.call(request, session, "GET", path("whoami"))
        keys = await self.api.call(
            request,
            self.admin_token,
            "GET",
            path("tenants", tenant_id, "api-keys"),
            acting_for=tenant_id,
        )
        if not me.ok or not keys.ok:
            return me if not me.ok else keys
        signer = next((k for k in keys.body["data"] if k["id"] == me.body.get("api_key_id")), None)
        if signer is None or _limits(signer.get("policy")) or signer.get("expires_at"):
            message = (
                "The proxy key you signed in with has limits of its own (a policy or an "
                "expiry), so it may not issue or revoke keys. Sign in with an unrestricted "
                "key of this tenant, or ask the operator."
            )
            return Answer(403, {"error": {"message": message, "code": "forbidden"}})
        return None

    def failure(self, request: Request, answer: Answer) -> Response:
        """The page for an admin API refusal: back to sign-in when the credential no
        longer works, else the status and its message."""
        if answer.status == 401:
            response = RedirectResponse("/console/sign-in?notice=expired", status_code=303)
            self.sessions.clear_cookie(response)
            return response
        if answer.status == 404:
            return error_page(request, 404, "No such tenant, or not one you may see.")
        if answer.status == 403:
            return error_page(
                request, 403, answer.message or "Your sign-in may not see or do this."
            )
        return error_page(request, answer.status, answer.message or "The admin API failed.")


def cross_site(request: Request) -> bool:
    """Whether a POST comes from another site. A browser's `Sec-Fetch-Site` decides when
    sent (no page can forge it): `same-origin` passes, `cross-site` and `same-site` do
    not. Without it (older browsers), the `Origin` must be this console's: the request's
    scheme and Host, or, behind a reverse proxy, `X-Forwarded-Proto` and
    `X-Forwarded-Host` (a form on another site cannot set those)."""
    headers = request.headers
    fetch_site = headers.get("sec-fetch-site", "").lower()
    if fetch_site in ("cross-site", "same-site"):
        return True
    if fetch_site == "same-origin":  # e.g. behind a proxy that rewrites Host
        return False
    origin = headers.get("origin")
    if origin is None:
        return False
    scheme = request.url.scheme
    ours = {_origin(scheme, headers.get("host", ""))}
    forwarded_host = headers.get("x-forwarded-host", headers.get("host", ""))
    forwarded_proto = headers.get("x-forwarded-proto", scheme)
    ours.add(_origin(forwarded_proto.split(",")[0], forwarded_host.split(",")[0]))
    return origin.strip().lower() not in ours


def _origin(scheme: str, host: str) -> str:
    """An origin as a browser serialises it: lower case, without the scheme's default port."""
    scheme, host = scheme.strip().lower(), host.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host.removesuffix(default)
    return f"{scheme}://{host}"


def _limits(policy: dict[str, Any] | None) -> bool:
    """Whether a key's public policy (`admin.schemas.ApiKeyPublic`) limits anything."""
    if not policy:
        return False
    rates = policy.get("rate_limits") or {}
    return (
        bool(policy.get("budgets"))
        or any(value is not None for value in rates.values())
        or policy.get("allowed_models") is not None
    )


def console_of(request: Request) -> Console:
    """The console of the app serving `request`."""
    console: Console = request.app.state.console
    return console


def month_start_and_today() -> tuple[str, str]:
    """This calendar month so far (UTC), as the usage API's `from` and `to`."""
    today = datetime.now(UTC).date()
    return today.replace(day=1).isoformat(), today.isoformat()
