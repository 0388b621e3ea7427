"""The console's pages: sign-in and sign-out, the operator's tenant list, a tenant's page
and its changes (register or remove the OpenAI key, issue or revoke a proxy key).

Every page reads through the admin API as the signed-in user (`Console.call`);
every change is a POST carrying the session's CSRF token, answered with a
redirect to the page (or, for a new proxy key, the one page showing its secret).
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from admin.console.api import Answer, path
from admin.console.context import Console, console_of, month_start_and_today
from admin.console.render import NOTICES, key_outcome, page
from admin.console.session import Session, pre_session_token, set_pre_session_cookie
from proxy.security import Secret

EXPIRING_SOON = timedelta(days=7)
BUDGET_WARNING = 0.8  # a budget this much used needs attention
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]{1,1024}")  # any proxy key or admin token
_NOT_RECOGNISED = "That proxy key or admin token is not recognised."


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _home(tenant_id: str | None) -> str:
    """Where a sign-in lands: the operator (None) on the list, a tenant on its own page."""
    return "/console/tenants" if tenant_id is None else f"/console/tenants/{tenant_id}"


async def home(request: Request) -> Response:
    """`/console`: the signed-in user's start page, or sign-in."""
    return _redirect(_home((await console_of(request).session(request)).tenant_id))


# --- signing in and out ---------------------------------------------------------------


async def sign_in_form(request: Request) -> Response:
    """The sign-in form, with a CSRF token of its own (a pre-session cookie)."""
    console = console_of(request)
    session = await console.current(request)
    if session is not None:
        return _redirect(_home(session.tenant_id))
    return _sign_in_page(request, notice=NOTICES.get(request.query_params.get("notice", "")))


def _sign_in_page(request: Request, status: int = 200, **context: Any) -> Response:
    token, new = pre_session_token(request)
    response = page(request, "sign_in.html", status, title="Sign in", csrf=token, **context)
    if new:
        set_pre_session_cookie(response, token)
    return response


async def sign_in(request: Request) -> Response:
    """Ask the admin API whose credential this is (`GET /whoami`: the admin token, or a
    tenant's valid proxy key), start a session and seal its id, the credential and its
    tenant into the session cookie. A credential that is not printable ASCII is no
    credential of ours: refused without asking."""
    console = console_of(request)
    fields = await console.form(request, None)
    credential = fields.get("credential", "").strip()
    if not credential:
        return _sign_in_page(request, 400, problem="Enter a proxy key or the admin token.")
    if not _PRINTABLE_ASCII.fullmatch(credential):
        return _sign_in_page(request, 401, problem=_NOT_RECOGNISED)
    who = await console.api.call(request, Secret(credential), "GET", path("whoami"))
    if not who.ok:
        return _sign_in_page(request, who.status, problem=_refused(who))
    tenant_id = None if who.body["kind"] == "admin" else str(who.body["tenant_id"])
    session_id = await console.records.start()
    response = _redirect(_home(tenant_id))
    console.sessions.set_cookie(response, console.sessions.seal(credential, tenant_id, session_id))
    return response


def _refused(answer: Answer) -> str:
    if answer.status == 429:
        return "Too many failed sign-ins from your address; wait a minute and try again."
    if answer.code == "proxy_key_expired":
        return "That proxy key has expired."
    if answer.status == 401:
        return _NOT_RECOGNISED
    return f"Sign-in failed ({answer.status}); try again later."


async def sign_out(request: Request) -> Response:
    """End the session (its row says so: a copy of the cookie stops working too). Without
    a live session there is nothing to end: back to the sign-in page, cookies untouched."""
    console = console_of(request)
    session = await console.current(request)
    if session is None:
        return _redirect("/console/sign-in")
    await console.form(request, session)
    await console.records.end(session.id)
    response = _redirect("/console/sign-in?notice=signed_out")
    console.sessions.clear_cookie(response)
    return response


# --- the operator's list ----------------------------------------------------------------


async def tenants_page(request: Request) -> Response:
    """Every tenant with its status, tier, spend this month and what needs attention."""
    console = console_of(request)
    session = await console.session(request)
    tenants = (await console.need(request, session, "GET", path("tenants")))["data"]
    start, today = month_start_and_today()
    usage = await console.need(
        request,
        session,
        "GET",
        path("usage"),
        query={"from": start, "to": today, "group_by": "day"},
    )
    month: dict[str, float] = defaultdict(float)
    day: dict[str, float] = defaultdict(float)
    for row in usage["data"]:
        month[row["tenant_id"]] += row["cost_usd"]
        if row["day"] == today:
            day[row["tenant_id"]] += row["cost_usd"]
    key_lists = await asyncio.gather(
        *(
            console.call(request, session, "GET", path("tenants", t["id"], "api-keys"))
            for t in tenants
        )
    )
    rows = []
    for tenant, keys in zip(tenants, key_lists, strict=True):
        tid = tenant["id"]
        notes = attention(
            console, tenant, keys.body["data"] if keys.ok else [], month[tid], day[tid]
        )
        rows.append({"tenant": tenant, "month_usd": month[tid], "attention": notes})
    query = request.query_params.get("q", "").strip().lower()[:100]
    if query:
        rows = [
            r for r in rows if query in r["tenant"]["id"] or query in r["tenant"]["name"].lower()
        ]
    return page(request, "tenants.html", title="Tenants", rows=rows, q=query, month=start[:7])


def attention(
    console: Console, tenant: dict[str, Any], keys: list[dict[str, Any]], month: float, day: float
) -> list[str]:
    """What an operator should look at: an invalid or missing key, proxy keys expired or
    expiring within a week, a budget at least 80% used."""
    notes = []
    status = tenant["openai_key"]["status"]
    tier = console.tiers.get(tenant["tier"])
    if status == "invalid":
        notes.append("OpenAI key invalid")
    elif status == "none" and not (tier and tier.platform_fallback):
        notes.append("no OpenAI key")
    now = datetime.now(UTC)
    for key in keys:
        if key["expires_at"]:
            expires = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
            label = key["name"] or key["id"]
            if expires <= now:
                notes.append(f"proxy key {label} expired")
            elif expires - now <= EXPIRING_SOON:
                notes.append(f"proxy key {label} expires {expires.date().isoformat()}")
    for budget in budget_use(tenant, month, day):
        if budget["share"] >= BUDGET_WARNING:
            notes.append(f"{budget['period']} budget {budget['share']:.0%} used")
    return notes


def budget_use(tenant: dict[str, Any], month: float, day: float) -> list[dict[str, Any]]:
    """The tenant's budgets with what the usage ledger shows spent in their period."""
    out = []
    for budget in tenant["policy"].get("budgets") or []:
        spent = month if budget["period"] == "month" else day
        limit = budget["limit_usd"]
        share = spent / limit if limit > 0 else (1.0 if spent > 0 else 0.0)
        out.append({**budget, "spent": spent, "share": share})
    return out


# --- a tenant's page ------------------------------------------------------------------


async def tenant_page(request: Request) -> Response:
    """A tenant's page: key status and form, proxy keys, policy, audit trail."""
    console = console_of(request)
    session = await console.session(request)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    return await _tenant(request, console, session, request.path_params["tenant_id"], notice=notice)


async def _tenant(
    request: Request,
    console: Console,
    session: Session,
    tenant_id: str,
    status: int = 200,
    **context: Any,
) -> Response:
    tenant = await console.need(request, session, "GET", path("tenants", tenant_id))
    audit = await console.need(
        request, session, "GET", path("tenants", tenant_id, "audit"), query={"limit": "50"}
    )
    keys = await console.as_key_manager(request, session, tenant_id, "GET")
    start, today = month_start_and_today()
    usage = await console.need(
        request,
        session,
        "GET",
        path("tenants", tenant_id, "usage"),
        query={"from": start, "to": today, "group_by": "day"},
    )
    month = sum(row["cost_usd"] for row in usage["data"])
    day = sum(row["cost_usd"] for row in usage["data"] if row["day"] == today)
    invalidated = next((e for e in audit["data"] if e["action"] == "openai_key.invalidated"), None)
    return page(
        request,
        "tenant.html",
        status,
        title=tenant["name"],
        tenant=tenant,
        keys=keys.body["data"] if keys.ok else None,
        events=audit["data"],
        invalidated=invalidated,
        budgets=budget_use(tenant, month, day),
        month_usd=month,
        trial=usage.get("trial_allowance"),
        **context,
    )


async def register_key(request: Request) -> Response:
    """Register or replace the OpenAI key; the admin API validates it with OpenAI."""
    console = console_of(request)
    session = await console.session(request)
    fields = await console.form(request, session)
    tenant_id = request.path_params["tenant_id"]
    key = fields.get("api_key", "")
    answer = await console.call(
        request,
        session,
        "POST",
        path("tenants", tenant_id, "openai-key"),
        body={"api_key": key},
    )
    if answer.ok:
        return _redirect(f"/console/tenants/{tenant_id}?notice=key_registered")
    if answer.status in (401, 403, 404):
        return console.failure(request, answer)
    return await _tenant(
        request, console, session, tenant_id, answer.status, problem=key_outcome(answer)
    )


async def remove_key(request: Request) -> Response:
    """Remove the tenant's stored OpenAI key (a form POST)."""
    console = console_of(request)
    session = await console.session(request)
    await console.form(request, session)
    tenant_id = request.path_params["tenant_id"]
    await console.need(request, session, "DELETE", path("tenants", tenant_id, "openai-key"))
    return _redirect(f"/console/tenants/{tenant_id}?notice=key_removed")


async def issue_proxy_key(request: Request) -> Response:
    """Issue a proxy key; its secret is on this one answer's page, never again."""
    console = console_of(request)
    session = await console.session(request)
    fields = await console.form(request, session)
    tenant_id = request.path_params["tenant_id"]
    body: dict[str, Any] = {}
    if fields.get("name", "").strip():
        body["name"] = fields["name"].strip()
    expires = fields.get("expires", "").strip()
    if expires:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", expires):
            return await _tenant(
                request, console, session, tenant_id, 422, key_problem="Expiry: a date, YYYY-MM-DD."
            )
        body["expires_at"] = f"{expires}T00:00:00Z"
    answer = await console.as_key_manager(request, session, tenant_id, "POST", body=body)
    if answer.status == 422:
        return await _tenant(request, console, session, tenant_id, 422, key_problem=answer.message)
    if not answer.ok:
        return console.failure(request, answer)
    return await _tenant(request, console, session, tenant_id, 201, issued=answer.body)


async def revoke_proxy_key(request: Request) -> Response:
    """Revoke one of the tenant's proxy keys (a form POST)."""
    console = console_of(request)
    session = await console.session(request)
    await console.form(request, session)
    tenant_id = request.path_params["tenant_id"]
    key_id = request.path_params["key_id"]
    answer = await console.as_key_manager(request, session, tenant_id, "DELETE", key_id)
    if not answer.ok:
        return console.failure(request, answer)
    return _redirect(f"/console/tenants/{tenant_id}?notice=proxy_key_revoked")
