"""The console's one way to the data: the admin API's own routes, called in process.

Each call is an ASGI request to the admin app, carrying the signed-in user's
credential as `Authorization: Bearer`, so who may see and change what is the
admin API's decision (a tenant's key on another tenant's id gets 404). The
console's browser request lends the call its client address, forwarding
headers and request id: audit events and the failed-sign-in limit see the
real client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.types import ASGIApp, Message

from admin.auth import ACTING_FOR
from proxy.security import Secret

PREFIX = "/api/v1"
_FORWARDED = (b"x-forwarded-for", b"user-agent")


@dataclass(frozen=True)
class Answer:
    """The admin API's status and JSON body (None for a 204)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def code(self) -> str | None:
        """The error code of an OpenAI-shaped error body, if any."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return code if isinstance(code, str) else None
        return None

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message") or "")
        return ""


def path(*parts: str) -> str:
    """An admin API path, each part percent-encoded (ids come from URLs and forms)."""
    return PREFIX + "".join("/" + quote(part, safe="") for part in parts)


class AdminAPI:
    """Calls the admin app in process."""

    def __init__(self, admin_app: ASGIApp) -> None:
        self._app = admin_app

    async def call(
        self,
        request: Request,
        credential: Secret,
        method: str,
        target: str,
        *,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
        acting_for: str | None = None,
    ) -> Answer:
        """`method target` on the admin API as `credential`, on behalf of `request`; with
        `acting_for`, the admin API confines the call to that tenant's id and audits it
        as the tenant's (`admin.auth.ACTING_FOR`)."""
        raw = b"" if body is None else json.dumps(body).encode()
        headers = [
            (b"authorization", b"Bearer " + credential.reveal().encode("latin-1")),
            (b"host", b"console.internal"),
            (b"content-length", str(len(raw)).encode()),
        ]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        headers += [(k, v) for k, v in request.scope["headers"] if k in _FORWARDED]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": request.scope.get("scheme", "http"),
            "path": target,
            "raw_path": target.encode(),
            "root_path": "",
            "query_string": urlencode(query or {}).encode(),
            "headers": headers,
            "client": request.scope.get("client"),
            "server": request.scope.get("server"),
            "state": {"request_id": request.scope.get("state", {}).get("request_id")},
        }
        if acting_for is not None:
            scope["state"][ACTING_FOR] = acting_for
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        status = 500
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._app(scope, receive, send)
        data = b"".join(chunks)
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = None
        return Answer(status, parsed)
