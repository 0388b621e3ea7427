"""Rendering console pages: Jinja2 templates (every value HTML-escaped) and the
security headers every console answer carries; the admin API's outcomes in words."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from admin.console.api import Answer

HERE = Path(__file__).resolve().parent

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # our own POSTs then carry their Origin
]
NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    """Pure ASGI wrapper: the CSP and friends on every console answer; pages are never
    stored by a cache (one shows a new key's secret), static files may be."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        static = scope["path"].startswith("/console/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", ())
                    if static or k.lower() != b"cache-control"
                ]
                headers += SECURITY_HEADERS
                headers.append((b"cache-control", b"max-age=3600") if static else NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


@cache
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["usd"] = usd
    env.filters["count"] = lambda v: f"{v:,}" if isinstance(v, int) else "—"
    return env


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """The HTML of `template` with `context` (and the request's session, if any)."""
    context.setdefault("session", request.scope.get("console.session"))
    html = environment().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status)


def error_page(request: Request, status: int, message: str) -> Response:
    titles = {403: "Not allowed", 404: "Not found"}
    title = titles.get(status, "Something went wrong")
    return page(request, "error.html", status=status, title=title, message=message)


def usd(value: object) -> str:
    """Dollars: cents, or six decimals below a cent (a few calls cost millionths)."""
    if not isinstance(value, int | float):
        return "—"
    return f"${value:,.2f}" if value == 0 or value >= 0.01 else f"${value:.6f}"


def when(value: str | None) -> str:
    """An RFC 3339 timestamp as 'YYYY-MM-DD HH:MM UTC', or 'never'."""
    if not value:
        return "never"
    return value[:16].replace("T", " ") + " UTC"


# The admin API's answers to a key registration, in words: what happened, what to do.
KEY_OUTCOMES = {
    "openai_key_invalid": "OpenAI rejected this key: it is mistyped, revoked or deleted. "
    "Nothing was stored and your previous key, if any, stays in use. Copy the whole key "
    "again from platform.openai.com/api-keys, or create a new one there.",
    "openai_quota_exceeded": "OpenAI accepted the key but its account has no credit left. "
    "Nothing was stored. Add credit or a payment method to the OpenAI account, then "
    "register the key again.",
    "openai_key_forbidden": "OpenAI refused this key access to the models list: it is a "
    "restricted key without the Models permission. Nothing was stored. Give the key read "
    "access to Models (or use an unrestricted key) and register it again.",
    "openai_unreachable": "OpenAI could not be reached to check the key. Nothing was "
    "stored; try again in a minute.",
    "invalid_key_format": "That does not look like an OpenAI API key",
}


def key_outcome(answer: Answer) -> str:
    """Why a key registration failed, and what to do, in words."""
    code = answer.code or ""
    if code == "invalid_key_format":
        rule = answer.message.split(": ", 1)[-1]
        return f"{KEY_OUTCOMES[code]} ({rule}). Nothing was stored."
    if code in KEY_OUTCOMES:
        return KEY_OUTCOMES[code]
    return f"The key could not be registered ({answer.status}): {answer.message}"


# Fixed notices shown after a redirect (`?notice=`): never text taken from the URL.
NOTICES = {
    "key_registered": "Your OpenAI key was validated by OpenAI and stored.",
    "key_removed": "The stored OpenAI key was removed.",
    "proxy_key_revoked": "The proxy key was revoked; it no longer works.",
    "signed_out": "You are signed out.",
    "expired": "Your session ended or its key no longer works; sign in again.",
}
