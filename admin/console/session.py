"""The console's session cookie and its CSRF token, shared by every worker and replica.

The cookie is a Fernet token (AES-CBC + HMAC, key derived with HKDF from the
server's `ADMIN_TOKEN` under a console-only label) sealing the credential the
user signed in with, its tenant (None for the operator) and when it was made.
Nothing is kept in process memory: any worker of any replica with the same
`ADMIN_TOKEN` opens it, and changing `ADMIN_TOKEN` signs everyone out. The
credential is checked again by the admin API on every page, so a revoked key
stops working at once; a sealed cookie itself lives `SESSION_SECONDS`.

The CSRF token is an HMAC of the cookie's value (another derived key): forms
carry it in a hidden field and every POST must present it. Before sign-in, a
random `byok_console_csrf` cookie and the same value in the form guard the
sign-in form (double submit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.requests import Request
from starlette.responses import Response

from proxy.security import Secret

COOKIE = "byok_console"
PRE_COOKIE = "byok_console_csrf"  # the sign-in form's own CSRF value, before a session exists
PATH = "/console"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True)
class Session:
    """Who is signed in: `tenant_id` None is the operator (admin token)."""

    credential: Secret
    tenant_id: str | None
    csrf: str

    @property
    def is_operator(self) -> bool:
        return self.tenant_id is None


def _derive(root: str, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(root.encode())


class Sessions:
    """Seals and opens session cookies with keys derived from the admin token."""

    def __init__(self, admin_token: Secret) -> None:
        root = admin_token.reveal()
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(root, b"byok-console session v1")))
        self._csrf_key = _derive(root, b"byok-console csrf v1")

    def _csrf_of(self, cookie: str) -> str:
        digest = hmac.new(self._csrf_key, cookie.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def seal(self, credential: str, tenant_id: str | None) -> str:
        """A new cookie value for this credential."""
        payload = json.dumps({"c": credential, "t": tenant_id}).encode()
        return self._fernet.encrypt(payload).decode()

    def open(self, request: Request) -> Session | None:
        """The request's session, or None (no cookie, tampered, or older than its life)."""
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            payload = json.loads(self._fernet.decrypt(cookie.encode(), ttl=SESSION_SECONDS))
        except (InvalidToken, ValueError):
            return None
        return Session(Secret(payload["c"]), payload["t"], self._csrf_of(cookie))

    @staticmethod
    def csrf_ok(given: object, expected: str) -> bool:
        """Whether a form's CSRF field matches (constant time)."""
        return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())

    def set_cookie(self, response: Response, request: Request, value: str) -> None:
        _set(response, request, COOKIE, value, SESSION_SECONDS)
        _set(response, request, PRE_COOKIE, "", 0)

    @staticmethod
    def clear_cookie(response: Response, request: Request) -> None:
        _set(response, request, COOKIE, "", 0)


def pre_session_token(request: Request) -> tuple[str, bool]:
    """The sign-in form's CSRF value (from its cookie, else new) and whether it is new."""
    current = request.cookies.get(PRE_COOKIE)
    if current and 20 <= len(current) <= 64:
        return current, False
    return secrets.token_urlsafe(24), True


def set_pre_session_cookie(response: Response, request: Request, value: str) -> None:
    _set(response, request, PRE_COOKIE, value, 3600)


def _set(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    """HttpOnly, SameSite=Strict, Path=/console; Secure unless the browser talks to loopback
    (where plain http is the only way a developer can reach it). `max_age` 0 deletes it."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=not _is_loopback(request.url.hostname or ""),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
