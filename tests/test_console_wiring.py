"""The console without a browser: where it is served, `admin.console: false`, the cookies'
attributes and seal, the session rows (sign-out, idle, expiry, a database outage), the
refusals of every POST (CSRF token, another site), the security headers, escaping, the
admin API's confinement of `ACTING_FOR`, and that the proxy does not load the console
until it is used. (End to end in a real browser: `test_console.py`.)"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import sqlalchemy
from helpers import ADMIN_TOKEN, GOOD_KEY, REPO, UPSTREAM, admin_headers, make_config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from admin.console import create_console_app
from admin.console import session as session_module
from admin.console.api import AdminAPI, path
from admin.console.session import COOKIE, PRE_COOKIE, SESSION_SECONDS, Sessions
from admin.console.spend import _cell
from proxy.app import ByokApp, create_app
from proxy.config import Config
from proxy.security import Secret
from proxy.store import make_engine

BASE = "https://127.0.0.1:8080"  # https: the client's cookie jar returns Secure cookies
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)", re.IGNORECASE)
# An on*= attribute in a tag (the values of other attributes skipped: text may say "onx=").
EVENT_HANDLER = re.compile(
    r"""<[a-z][^\s>]*(?:\s+[\w:.-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'>]+))?)*\s+on\w+\s*=""",
    re.IGNORECASE,
)
# Every POST route of the console, by what it does; the test below holds this to the app's.
POST_ROUTES = {
    "sign in": "/console/sign-in",
    "sign out": "/console/sign-out",
    "register OpenAI key": "/console/tenants/{tenant_id}/openai-key",
    "remove OpenAI key": "/console/tenants/{tenant_id}/openai-key/remove",
    "issue proxy key": "/console/tenants/{tenant_id}/api-keys",
    "revoke proxy key": "/console/tenants/{tenant_id}/api-keys/{key_id}/revoke",
}


def _config(tmp_path: Path, master_key: str, yaml: str = "") -> Config:
    (tmp_path / "config.yaml").write_text(yaml)
    return make_config(f"sqlite:///{tmp_path / 'c.db'}", master_key, tmp_path / "config.yaml")


@asynccontextmanager
async def _running(
    config: Config, base_url: str = BASE, **kw: bool
) -> AsyncIterator[tuple[ByokApp, httpx.AsyncClient]]:
    app = create_app(config, **kw)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4711))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield app, client


@asynccontextmanager
async def _client(
    config: Config, base_url: str = BASE, **kw: bool
) -> AsyncIterator[httpx.AsyncClient]:
    async with _running(config, base_url, **kw) as (_, client):
        yield client


def _csrf_in(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found[1]


async def _sign_in(client: httpx.AsyncClient, credential: str) -> httpx.Response:
    csrf = _csrf_in(await client.get("/console/sign-in"))
    return await client.post("/console/sign-in", data={"csrf": csrf, "credential": credential})


def _set_cookie(response: httpx.Response, name: str) -> dict[str, str]:
    """The `Set-Cookie` of `name`: its value under "", each attribute (lower case) after."""
    header = next(v for v in response.headers.get_list("set-cookie") if v.startswith(name + "="))
    value, *attributes = header.split(";")
    found = {"": value.split("=", 1)[1]}
    for attribute in attributes:
        key, _, val = attribute.strip().partition("=")
        found[key.lower()] = val
    return found


def _assert_host_cookie(attributes: dict[str, str], where: str) -> None:
    """What the `__Host-` prefix requires, and HttpOnly, SameSite=Strict."""
    assert "secure" in attributes and "httponly" in attributes, (where, attributes)
    assert attributes["path"] == "/" and "domain" not in attributes, (where, attributes)
    assert attributes["samesite"].lower() == "strict", (where, attributes)


async def test_the_console_is_served_wherever_the_admin_api_is(
    tmp_path: Path, master_key: str
) -> None:
    config = _config(tmp_path, master_key)
    async with _client(config) as both:
        assert (await both.get("/console/sign-in")).status_code == 200
        assert (await both.get("/console")).headers["location"] == "/console/sign-in"
    async with _client(config, serve_admin=False) as proxy_only:
        r = await proxy_only.get("/console/sign-in")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    async with _client(config, serve_proxy=False) as admin_only:
        assert (await admin_only.get("/console/sign-in")).status_code == 200


async def test_console_false_answers_404_like_any_unknown_route(
    tmp_path: Path, master_key: str
) -> None:
    config = _config(tmp_path, master_key, "admin:\n  console: false\n")
    assert config.console is False
    async with _client(config) as client:
        for path in ("/console", "/console/sign-in", "/console/static/console.js"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == "not_found"
        assert (await client.get("/api/v1/tenants", headers=admin_headers())).status_code == 200


@pytest.mark.parametrize(
    ("base_url", "headers"),
    [
        ("http://127.0.0.1:8080", {}),
        ("http://localhost:8080", {}),
        ("https://console.example.com", {}),
        # TLS ended by a reverse proxy on the same host: the Host says loopback.
        ("http://127.0.0.1:8080", {"host": "127.0.0.1", "x-forwarded-proto": "https"}),
    ],
)
async def test_the_cookies_are_secure_host_cookies_whatever_the_host_says(
    tmp_path: Path, master_key: str, base_url: str, headers: dict[str, str]
) -> None:
    assert COOKIE == "__Host-byok_console" and PRE_COOKIE == "__Host-byok_console_csrf"
    config = _config(tmp_path, master_key)
    async with _client(config, base_url) as client:
        created = await client.post(
            "/api/v1/tenants", json={"name": "acme", "tier": "pro"}, headers=admin_headers()
        )
        key, tid = created.json()["api_key"], created.json()["id"]
        # Cookies by hand: a client's jar keeps Secure cookies from plain http to itself.
        form = await client.get("/console/sign-in", headers=headers)
        pre = _set_cookie(form, PRE_COOKIE)
        _assert_host_cookie(pre, "the sign-in form's cookie")
        client.cookies.clear()
        signed_in = await client.post(
            "/console/sign-in",
            data={"csrf": _csrf_in(form), "credential": key},
            headers={**headers, "cookie": f"{PRE_COOKIE}={pre['']}"},
        )
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == f"/console/tenants/{tid}"
        cookie = _set_cookie(signed_in, COOKIE)
        _assert_host_cookie(cookie, "the session cookie")
        assert cookie["max-age"] == str(SESSION_SECONDS)
        _assert_host_cookie(_set_cookie(signed_in, PRE_COOKIE), "the form cookie's removal")
        raw = "; ".join(signed_in.headers.get_list("set-cookie"))
        assert key not in raw and ADMIN_TOKEN not in raw
        client.cookies.clear()
        page = await client.get(
            f"/console/tenants/{tid}", headers={**headers, "cookie": f"{COOKIE}={cookie['']}"}
        )
        assert page.status_code == 200
        assert key not in page.text and ADMIN_TOKEN not in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["referrer-policy"] == "same-origin"  # "no-referrer": Origin null
        assert page.headers["cache-control"] == "no-store"
        # No inline script: every script is a file, no element has an on*= handler.
        assert "<script" in page.text
        assert not INLINE_SCRIPT.search(page.text) and not EVENT_HANDLER.search(page.text)


async def test_a_tampered_foreign_or_expired_cookie_is_no_session(
    tmp_path: Path, master_key: str
) -> None:
    config = _config(tmp_path, master_key)
    sessions = Sessions(config.admin_token)
    foreign = Sessions(Secret("adm-" + "o" * 40)).seal(ADMIN_TOKEN, None, "x" * 32)
    async with _client(config) as client:
        signed_in = await _sign_in(client, ADMIN_TOKEN)
        assert signed_in.headers["location"] == "/console/tenants"
        good = client.cookies[COOKIE]
        assert (await client.get("/console/tenants")).status_code == 200
        opened = sessions.open(Request({"type": "http", "headers": [(b"cookie", _c(good))]}))
        assert opened is not None
        # The same session's row, sealed now (fine) and sealed longer ago than a session lives.
        now = session_module.clock()
        resealed = sessions.seal(ADMIN_TOKEN, None, opened.id)
        stale = sessions.seal(ADMIN_TOKEN, None, opened.id, at=now - SESSION_SECONDS - 5)
        client.cookies.set(COOKIE, resealed, path="/")
        assert (await client.get("/console/tenants")).status_code == 200
        for value in (good[:-4] + "AAAA", foreign, stale, ""):
            client.cookies.set(COOKIE, value, path="/")
            r = await client.get("/console/tenants")
            assert r.status_code == 303 and r.headers["location"] == "/console/sign-in", value


def _c(value: str) -> bytes:
    return f"{COOKIE}={value}".encode()


# --- the sessions' rows: sign-out, idle, expiry, a database outage ---------------------


async def _rows(app: ByokApp) -> list[Any]:
    assert app.runtime is not None
    with app.runtime.store.engine.connect() as conn:
        return list(
            conn.execute(
                sqlalchemy.text(
                    "SELECT id, last_seen_at, signed_out_at FROM console_sessions"
                    " ORDER BY created_at"
                )
            )
        )


async def test_sign_out_ends_the_session_for_every_copy_of_its_cookie(
    database_url: str, master_key: str
) -> None:
    config = make_config(database_url, master_key)
    async with _running(config) as (app, client):
        await _sign_in(client, ADMIN_TOKEN)
        copied = client.cookies[COOKIE]
        page = await client.get("/console/tenants")
        assert page.status_code == 200
        out = await client.post("/console/sign-out", data={"csrf": _csrf_in(page)})
        assert out.status_code == 303
        assert out.headers["location"] == "/console/sign-in?notice=signed_out"
        assert _set_cookie(out, COOKIE)["max-age"] == "0"
        [(_, _, signed_out_at)] = await _rows(app)
        assert signed_out_at is not None
        client.cookies.set(COOKIE, copied, path="/")
        again = await client.get("/console/tenants")
        assert again.status_code == 303 and again.headers["location"] == "/console/sign-in"
        assert _set_cookie(again, COOKIE)["max-age"] == "0"  # the dead cookie is dropped
        client.cookies.set(COOKIE, copied, path="/")
        form = await client.get("/console/sign-in")  # the form, not a redirect loop
        assert form.status_code == 200 and 'name="credential"' in form.text
        # Sign-out without a live session changes nothing: back to the sign-in page.
        client.cookies.clear()
        nobody = await client.post("/console/sign-out", data={})
        assert nobody.status_code == 303 and nobody.headers["location"] == "/console/sign-in"
        assert "set-cookie" not in nobody.headers


async def test_a_session_ends_when_idle_or_old_and_use_keeps_it_alive(
    database_url: str, master_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [session_module.clock()]
    monkeypatch.setattr(session_module, "clock", lambda: now[0])
    config = make_config(database_url, master_key)
    minute = 60.0
    async with _running(config) as (app, client):
        await _sign_in(client, ADMIN_TOKEN)
        first = client.cookies[COOKIE]
        [(_, signed_in_at, _)] = await _rows(app)
        now[0] += 29 * minute
        assert (await client.get("/console/tenants")).status_code == 200
        [(_, seen, _)] = await _rows(app)
        assert seen != signed_in_at  # the use was written
        now[0] += 0.5 * minute
        assert (await client.get("/console/tenants")).status_code == 200
        assert (await _rows(app))[0][1] == seen  # not again within the minute
        now[0] += 29 * minute  # 29.5 minutes since the use written: still alive
        assert (await client.get("/console/tenants")).status_code == 200
        now[0] += 31 * minute
        idle = await client.get("/console/tenants")
        assert idle.status_code == 303 and idle.headers["location"] == "/console/sign-in"

        # Used every 20 minutes, a session still ends 8 hours after sign-in.
        client.cookies.clear()
        await _sign_in(client, ADMIN_TOKEN)
        ends = now[0] + SESSION_SECONDS
        while now[0] + 20 * minute < ends:
            now[0] += 20 * minute
            assert (await client.get("/console/tenants")).status_code == 200
        now[0] = ends + 1
        cookie = client.cookies[COOKIE]
        old = await client.get("/console/tenants")
        assert old.status_code == 303 and old.headers["location"] == "/console/sign-in"
        # The row ends it too, not only the sealed cookie's own life: sealed anew, still over.
        sessions = Sessions(config.admin_token)
        opened = sessions.open(Request({"type": "http", "headers": [(b"cookie", _c(cookie))]}))
        assert opened is None
        [*_, (session_id, _, _)] = await _rows(app)
        client.cookies.set(COOKIE, sessions.seal(ADMIN_TOKEN, None, session_id), path="/")
        old = await client.get("/console/tenants")
        assert old.status_code == 303 and old.headers["location"] == "/console/sign-in"

        # A day after their end, rows are deleted at the next sign-in.
        now[0] += 24 * 3600
        client.cookies.clear()
        await _sign_in(client, ADMIN_TOKEN)
        assert len(await _rows(app)) == 1
        assert client.cookies[COOKIE] != first


async def test_a_database_outage_is_a_503_page_not_a_crash(
    tmp_path: Path, master_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, master_key)
    async with _running(config) as (app, client):
        await _sign_in(client, ADMIN_TOKEN)
        assert app.runtime is not None
        store = app.runtime.store
        working = store.engine
        (tmp_path / "gone").mkdir()
        store.engine = make_engine(f"sqlite:///{tmp_path / 'gone' / 'byok.db'}")
        (tmp_path / "gone").rmdir()  # the database cannot be opened
        try:
            for answer in (
                await client.get("/console/tenants"),
                await client.get("/console/sign-in"),
            ):
                assert answer.status_code == 503, answer.text
                assert "text/html" in answer.headers["content-type"]
                assert "The database is unavailable" in answer.text
                assert "Traceback" not in answer.text
        finally:
            store.engine.dispose()
            store.engine = working
    assert "crashed" not in caplog.text


# --- every POST: its CSRF token, and from this site only -------------------------------


def test_the_post_routes_tested_are_every_post_route_of_the_console(
    tmp_path: Path, master_key: str
) -> None:
    console: Any = create_console_app(Starlette(), _config(tmp_path, master_key))
    posted = {
        re.sub(r":\w+}", "}", route.path)
        for route in console.app.routes
        if isinstance(route, Route) and "POST" in (route.methods or ())
    }
    assert posted == set(POST_ROUTES.values())


@pytest.mark.parametrize("action", list(POST_ROUTES))
async def test_every_post_is_refused_without_its_csrf_token_or_from_another_site(
    tmp_path: Path, master_key: str, action: str
) -> None:
    config = _config(tmp_path, master_key)
    async with _client(config) as client, respx.mock(base_url=UPSTREAM) as openai:
        openai.get("/models").respond(200, json={"data": []})
        created = await client.post(
            "/api/v1/tenants", json={"name": "acme", "tier": "pro"}, headers=admin_headers()
        )
        tid = created.json()["id"]
        keys = f"/api/v1/tenants/{tid}/api-keys"
        registered = await client.post(
            f"/api/v1/tenants/{tid}/openai-key", json={"api_key": GOOD_KEY}, headers=admin_headers()
        )
        assert registered.status_code == 200
        key_id = (await client.post(keys, json={}, headers=admin_headers())).json()["id"]
        if action == "sign in":
            csrf = _csrf_in(await client.get("/console/sign-in"))
        else:
            await _sign_in(client, ADMIN_TOKEN)
            csrf = _csrf_in(await client.get(f"/console/tenants/{tid}"))
        target = POST_ROUTES[action].format(tenant_id=tid, key_id=key_id)
        fields = {
            "sign in": {"credential": ADMIN_TOKEN},
            "register OpenAI key": {"api_key": GOOD_KEY},
            "issue proxy key": {"name": "extra"},
        }.get(action, {})
        before = (await client.get(keys, headers=admin_headers())).json()["data"]

        refusals = [
            (fields, {}),  # no token
            ({**fields, "csrf": csrf[:-2] + "xx"}, {}),  # a wrong one
            ({**fields, "csrf": csrf}, {"sec-fetch-site": "cross-site"}),
            ({**fields, "csrf": csrf}, {"sec-fetch-site": "same-site"}),
            ({**fields, "csrf": csrf}, {"origin": "https://evil.example"}),
            ({**fields, "csrf": csrf}, {"origin": "null"}),
        ]
        for data, headers in refusals:
            refused = await client.post(target, data=data, headers=headers)
            assert refused.status_code == 403, (action, headers, refused.text)
            assert "text/html" in refused.headers["content-type"]
            assert COOKIE not in refused.headers.get("set-cookie", ""), (action, headers)

        # Nothing changed: the keys, the OpenAI key, and the session (still signed in).
        assert (await client.get(keys, headers=admin_headers())).json()["data"] == before
        tenant = await client.get(f"/api/v1/tenants/{tid}", headers=admin_headers())
        assert tenant.json()["openai_key"]["status"] == "active"
        if action != "sign in":
            assert (await client.get(f"/console/tenants/{tid}")).status_code == 200
        # The same POST from the console's own page goes through.
        own = {"origin": BASE, "sec-fetch-site": "same-origin"}
        done = await client.post(target, data={**fields, "csrf": csrf}, headers=own)
        assert done.status_code in (201, 303), (action, done.text)


async def test_behind_a_reverse_proxy_the_forwarded_origin_is_the_consoles_own(
    tmp_path: Path, master_key: str
) -> None:
    config = _config(tmp_path, master_key)
    async with _client(config, "http://127.0.0.1:8080") as client:
        form = await client.get("/console/sign-in")
        pre = _set_cookie(form, PRE_COOKIE)[""]
        client.cookies.clear()
        proxied = {
            "cookie": f"{PRE_COOKIE}={pre}",
            "origin": "https://console.example.com",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "console.example.com",
        }
        data = {"csrf": _csrf_in(form), "credential": ADMIN_TOKEN}
        assert (
            await client.post("/console/sign-in", data=data, headers=proxied)
        ).status_code == 303
        proxied["x-forwarded-host"] = "other.example.com"
        assert (
            await client.post("/console/sign-in", data=data, headers=proxied)
        ).status_code == 403
        # A browser that says same-origin is believed (a proxy that rewrites Host and
        # sends no X-Forwarded-Host, as nginx's default proxy_pass does).
        proxied["sec-fetch-site"] = "same-origin"
        assert (
            await client.post("/console/sign-in", data=data, headers=proxied)
        ).status_code == 303


@pytest.mark.parametrize("credential", ["byok-ключ", "adm-\u20ac" + "t" * 40, "byok-\x01abc"])
async def test_a_credential_that_is_not_printable_ascii_is_not_recognised(
    tmp_path: Path, master_key: str, credential: str
) -> None:
    async with _client(_config(tmp_path, master_key)) as client:
        refused = await _sign_in(client, credential)
    assert refused.status_code == 401
    assert "not recognised" in refused.text and COOKIE not in str(refused.headers)


async def test_acting_for_a_tenant_reaches_only_its_proxy_key_routes(
    tmp_path: Path, master_key: str
) -> None:
    config = _config(tmp_path, master_key)
    async with _running(config) as (app, client):
        for tid in ("acme", "globex"):
            made = await client.post(
                "/api/v1/tenants",
                json={"name": tid, "tier": "pro", "id": tid},
                headers=admin_headers(),
            )
            assert made.status_code == 201
        api = AdminAPI(app.admin)
        request = Request({"type": "http", "headers": [], "client": ("127.0.0.1", 4711)})

        async def acting(method: str, *parts: str, **kw: Any) -> int:
            answer = await api.call(
                request, config.admin_token, method, path(*parts), acting_for="acme", **kw
            )
            return answer.status

        assert await acting("GET", "tenants", "acme", "api-keys") == 200
        assert await acting("GET", "tenants", "globex", "api-keys") == 404
        listed = await client.get("/api/v1/tenants/acme/api-keys", headers=admin_headers())
        key_id = listed.json()["data"][0]["id"]
        policy = {"policy": {"rate_limits": {"rpm": 1}}}  # a key's own limits: never this way
        assert await acting("PATCH", "tenants", "acme", "api-keys", key_id, body=policy) == 403
        for method, parts, kw in [
            ("GET", ("tenants",), {}),
            ("GET", ("tenants", "acme"), {}),
            ("PATCH", ("tenants", "acme"), {"body": {"name": "Renamed"}}),
            ("DELETE", ("tenants", "acme"), {}),
            ("GET", ("tenants", "acme", "audit"), {}),
            ("GET", ("tenants", "acme", "usage"), {}),
            ("DELETE", ("tenants", "acme", "openai-key"), {}),
            ("GET", ("usage",), {}),
            ("GET", ("openapi.json",), {}),
            ("GET", ("whoami",), {}),
        ]:
            assert await acting(method, *parts, **kw) == 403, (method, parts)
        tenant = await client.get("/api/v1/tenants/acme", headers=admin_headers())
        assert tenant.status_code == 200 and tenant.json()["name"] == "acme"


@pytest.mark.parametrize("limited", ["policy", "expiry"])
async def test_a_key_with_limits_of_its_own_may_not_issue_or_revoke_keys(
    tmp_path: Path, master_key: str, limited: str
) -> None:
    """Else its holder could mint an unrestricted, lasting key, or revoke the others."""
    config = _config(tmp_path, master_key)
    async with _client(config) as client:
        made = await client.post(
            "/api/v1/tenants",
            json={"name": "acme", "tier": "pro", "id": "acme"},
            headers=admin_headers(),
        )
        first = made.json()["api_key"]
        keys = "/api/v1/tenants/acme/api-keys"
        body = (
            {"name": "ci", "policy": {"rate_limits": {"rpm": 5}}}
            if limited == "policy"
            else {"name": "ci", "expires_at": "2099-01-01T00:00:00Z"}
        )
        issued = await client.post(keys, json=body, headers=admin_headers())
        assert issued.status_code == 201, issued.text
        before = (await client.get(keys, headers=admin_headers())).json()["data"]
        first_id = next(k["id"] for k in before if k["id"] != issued.json()["id"])

        assert (await _sign_in(client, issued.json()["api_key"])).status_code == 303
        page = await client.get("/console/tenants/acme")
        assert page.status_code == 200  # it may look
        csrf = _csrf_in(page)
        refused = await client.post(
            "/console/tenants/acme/api-keys", data={"csrf": csrf, "name": "unlimited"}
        )
        assert refused.status_code == 403 and "limits of its own" in refused.text
        refused = await client.post(
            f"/console/tenants/acme/api-keys/{first_id}/revoke", data={"csrf": csrf}
        )
        assert refused.status_code == 403 and "limits of its own" in refused.text
        assert (await client.get(keys, headers=admin_headers())).json()["data"] == before

        # The tenant's unrestricted key may.
        client.cookies.clear()
        assert (await _sign_in(client, first)).status_code == 303
        csrf = _csrf_in(await client.get("/console/tenants/acme"))
        done = await client.post(
            "/console/tenants/acme/api-keys", data={"csrf": csrf, "name": "extra"}
        )
        assert done.status_code == 201, done.text


async def test_every_value_is_escaped(tmp_path: Path, master_key: str) -> None:
    config = _config(tmp_path, master_key)
    name = "<img src=x onerror=alert(1)>"
    async with _client(config) as client:
        r = await client.post(
            "/api/v1/tenants", json={"name": name, "tier": "pro"}, headers=admin_headers()
        )
        await _sign_in(client, ADMIN_TOKEN)
        listing = (await client.get("/console/tenants")).text
        page = (await client.get(f"/console/tenants/{r.json()['id']}")).text
    for html in (listing, page):
        assert name not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        assert not EVENT_HANDLER.search(html) and not INLINE_SCRIPT.search(html)


def test_csv_cells_a_spreadsheet_would_run_are_quoted() -> None:
    assert _cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert _cell("@sum") == "'@sum" and _cell("gpt-4o") == "gpt-4o" and _cell(3) == 3


def test_the_proxy_does_not_load_the_console_until_it_is_used() -> None:
    code = (
        "import sys; from proxy.app import create_app; "
        "print(sorted(m for m in sys.modules if m.startswith(('admin.console', 'jinja2'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
