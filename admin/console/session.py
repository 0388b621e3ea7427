"""The console's session cookie and its CSRF token, shared by every worker and replica.

The cookie is a Fernet token (AES-CBC + HMAC, key derived with HKDF from the
server's `ADMIN_TOKEN` under a console-only label) sealing the credential the
user signed in with, its tenant (None for the operator), the id of the
session's row in the database (`sessions_store`) and when it was made. Any
worker of any replica with the same `ADMIN_TOKEN` opens it, and changing
`ADMIN_TOKEN` signs everyone out. The credential is checked again by the admin
API on every page, so a revoked key stops working at once; the row ends the
session when it is signed out, idle for `IDLE_SECONDS` or older than
`SESSION_SECONDS` (which is also the sealed cookie's own life).

The CSRF token is an HMAC of the cookie's value (another derived key): forms
carry it in a hidden field and every POST must present it. Before sign-in, a
random pre-session cookie and the same value in the form guard the sign-in
form (double submit).

Both cookies are `__Host-` cookies: Secure, HttpOnly, SameSite=Strict, Path=/,
no Domain, always, whatever the Host header says (browsers keep Secure cookies
of http://localhost and http://127.0.0.1, which are "potentially trustworthy").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.requests import Request
from starlette.responses import Response

from proxy.security import Secret

COOKIE = "__Host-byok_console"
PRE_COOKIE = "__Host-byok_console_csrf"  # the sign-in form's CSRF value, before a session
PATH = "/"  # the __Host- prefix requires it
SESSION_SECONDS = 8 * 3600
IDLE_SECONDS = 30 * 60  # a session unused this long ends
REFRESH_SECONDS = 60  # a session's last use is written at most this often


def clock() -> float:
    """Now, as Unix time: what sessions are judged by (tests move it)."""
    return time.time()


@dataclass(frozen=True)
class Session:
    """Who is signed in: `tenant_id` None is the operator (admin token); `id` names the
    session's row."""

    id: str
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

    def seal(
        self, credential: str, tenant_id: str | None, session_id: str, at: float | None = None
    ) -> str:
        """A new cookie value for this credential and session row, made `at` (now)."""
        payload = json.dumps({"c": credential, "t": tenant_id, "s": session_id}).encode()
        made = int(clock() if at is None else at)
        return self._fernet.encrypt_at_time(payload, made).decode()

    def open(self, request: Request) -> Session | None:
        """The request's sealed session, or None (no cookie, tampered, or older than its
        life). Whether its row still lives is `sessions_store`'s question."""
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            sealed = self._fernet.decrypt_at_time(
                cookie.encode(), ttl=SESSION_SECONDS, current_time=int(clock())
            )
            payload = json.loads(sealed)
            return Session(
                str(payload["s"]), Secret(payload["c"]), payload["t"], self._csrf_of(cookie)
            )
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def csrf_ok(given: object, expected: str) -> bool:
        """Whether a form's CSRF field matches (constant time)."""
        return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())

    @staticmethod
    def set_cookie(response: Response, value: str) -> None:
        _set(response, COOKIE, value, SESSION_SECONDS)
        _set(response, PRE_COOKIE, "", 0)

    @staticmethod
    def clear_cookie(response: Response) -> None:
        _set(response, COOKIE, "", 0)


def pre_session_token(request: Request) -> tuple[str, bool]:
    """The sign-in form's CSRF value (from its cookie, else new) and whether it is new."""
    current = request.cookies.get(PRE_COOKIE)
    if current and 20 <= len(current) <= 64:
        return current, False
    return secrets.token_urlsafe(24), True


def set_pre_session_cookie(response: Response, value: str) -> None:
    _set(response, PRE_COOKIE, value, 3600)


def _set(response: Response, name: str, value: str, max_age: int) -> None:
    """Secure, HttpOnly, SameSite=Strict, Path=/, no Domain (as `__Host-` requires), on
    every answer: Secure does not depend on the Host header, which behind a reverse
    proxy says nothing of how the browser connected. `max_age` 0 deletes it."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=True,
    )
