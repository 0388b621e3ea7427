"""The console without a browser: where it is served, `admin.console: false`, the session
cookie's attributes and seal, the security headers, escaping, and that the proxy does
not load it until it is used. (End to end in a real browser: `test_console.py`.)"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from helpers import ADMIN_TOKEN, REPO, admin_headers, make_config

from admin.console.session import Sessions
from admin.console.spend import _cell
from proxy.app import create_app
from proxy.config import Config
from proxy.security import Secret


def _config(tmp_path: Path, master_key: str, yaml: str = "") -> Config:
    (tmp_path / "config.yaml").write_text(yaml)
    return make_config(f"sqlite:///{tmp_path / 'c.db'}", master_key, tmp_path / "config.yaml")


@asynccontextmanager
async def _client(
    config: Config, base_url: str = "http://127.0.0.1:8080", **kw: bool
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config, **kw)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4711))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client


async def _sign_in(client: httpx.AsyncClient, credential: str) -> httpx.Response:
    form = await client.get("/console/sign-in")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    return await client.post("/console/sign-in", data={"csrf": csrf[1], "credential": credential})


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


async def test_the_session_cookie_and_the_headers(tmp_path: Path, master_key: str) -> None:
    config = _config(tmp_path, master_key)
    for base_url, secure in (
        ("http://127.0.0.1:8080", False),
        ("http://localhost:8080", False),
        ("https://console.example.com", True),
    ):
        async with _client(config, base_url) as client:
            created = await client.post(
                "/api/v1/tenants", json={"name": "acme", "tier": "pro"}, headers=admin_headers()
            )
            key, tid = created.json()["api_key"], created.json()["id"]
            signed_in = await _sign_in(client, key)
            assert signed_in.status_code == 303
            assert signed_in.headers["location"] == f"/console/tenants/{tid}"
            cookie = next(
                v for v in signed_in.headers.get_list("set-cookie") if v.startswith("byok_console=")
            )
            attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
            assert {"httponly", "path", "samesite"} <= attributes
            assert "Path=/console" in cookie and "SameSite=strict" in cookie
            assert ("secure" in attributes) is secure, base_url
            assert key not in cookie and ADMIN_TOKEN not in cookie
            page = await client.get(f"/console/tenants/{tid}")
            assert page.status_code == 200
            assert key not in page.text and ADMIN_TOKEN not in page.text
            csp = page.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            assert page.headers["x-frame-options"] == "DENY"
            assert page.headers["cache-control"] == "no-store"
            assert "<script>" not in page.text  # no inline script: every script is a file


async def test_a_tampered_or_foreign_cookie_is_no_session(tmp_path: Path, master_key: str) -> None:
    config = _config(tmp_path, master_key)
    foreign = Sessions(Secret("adm-" + "o" * 40)).seal(ADMIN_TOKEN, None)
    async with _client(config) as client:
        signed_in = await _sign_in(client, ADMIN_TOKEN)
        assert signed_in.headers["location"] == "/console/tenants"
        good = client.cookies["byok_console"]
        assert (await client.get("/console/tenants")).status_code == 200
        for value in (good[:-4] + "AAAA", foreign, ""):
            client.cookies.set("byok_console", value, path="/console")
            r = await client.get("/console/tenants")
            assert r.status_code == 303 and r.headers["location"] == "/console/sign-in", value


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
