"""The web console end to end: a real `byok-proxy serve` in front of the fake OpenAI, driven
by headless Chromium (Debian's `chromium`, through Playwright's Python package).

One server (at LOG_LEVEL=DEBUG) and one browser for the module; each test has its own
browser context (cookies). Screenshots of each page go to $BYOK_CONSOLE_SCREENSHOTS,
else to a temporary folder (its path is printed). Every response the browser got (body
and headers), every page's source and text, the cookies, the CSV, the server's log, its
database file and its usage log are grepped for the plaintext OpenAI keys with the
suite's own check (`helpers.assert_clean`, as in `test_proxy_no_leaks`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_openai import FakeOpenAI, start_fake
from helpers import ADMIN_TOKEN, admin_headers, assert_clean, bearer, secret_forms
from servers import create_tenant, free_port, serve, serve_env, until
from stack import PLATFORM_KEY

from proxy.security import generate_master_key

CHROMIUM = os.environ.get("BYOK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GOOD_KEY = "sk-test-CONSOLEgoodKEYabcdefghijklmnopqrstuvwxyz01"
BAD_KEY = "sk-test-CONSOLEbadKEYzyxwvutsrqponmlkjihgfedcba98"
OPENAI_SECRETS = secret_forms(GOOD_KEY, BAD_KEY, PLATFORM_KEY)
PRICED = """
prices:
  as_of: 2025-08-07
  source: https://platform.openai.com/docs/pricing
  models:
    gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60}
"""

try:
    from playwright import sync_api
except ImportError:
    if os.environ.get("CI"):
        raise  # in CI a missing browser driver is a failure, not a skip
    pytest.skip("playwright is not installed", allow_module_level=True)


@dataclass
class Server:
    url: str
    fake: FakeOpenAI
    tmp: Path  # its log, database and usage log
    shots: Path
    seen: list[tuple[str, str | bytes]] = field(default_factory=list)  # (where, data) to grep

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    shots = Path(os.environ.get("BYOK_CONSOLE_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {shots}")
    fake, fake_server = start_fake()
    fake.revoked.add(BAD_KEY)
    env = serve_env(
        tmp, generate_master_key(), f"sqlite:///{tmp / 'console.db'}", fake.base_url, PRICED
    )
    port = free_port()
    with fake_server, serve([], {**env, "LOG_LEVEL": "DEBUG"}, tmp, port, tmp / "serve.log"):
        yield Server(f"http://127.0.0.1:{port}", fake, tmp, shots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """A page in a fresh context (no cookies); script errors and CSP refusals fail the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    problems: list[str] = []
    opened.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    opened.on("pageerror", lambda e: problems.append(str(e)))
    opened.on("response", lambda r: _keep(server, r))
    yield opened
    for cookie in context.cookies():
        server.seen.append((f"cookie {cookie['name']}", cookie["value"]))
    context.close()
    assert not problems, f"the browser reported: {problems}"


def _keep(server: Server, response: Any) -> None:
    """Every response the browser gets, for the leak check (a redirect has no body)."""
    where = f"response {response.status} {response.url}"
    server.seen.append((where + " headers", repr(response.headers_array())))
    if not 300 <= response.status < 400:
        server.seen.append((where, response.body()))


def look(server: Server, page: Any, name: str) -> None:
    """Screenshot the page into the folder and keep its source and text for the leak check."""
    page.screenshot(path=str(server.shots / f"{name}.png"), full_page=True)
    server.seen.append((f"page {name}", page.content()))
    server.seen.append((f"text of {name}", page.inner_text("body")))


def assert_no_leaks(server: Server, *also_secret: str) -> None:
    """No plaintext OpenAI key (nor a fragment) in what was seen, the server's log, its
    database files or its usage log; `also_secret` (sign-in credentials) in no page."""
    files = [server.tmp / "serve.log", *server.tmp.glob("console.db*")]
    files += [path for path in [server.tmp / "usage.jsonl"] if path.exists()]
    for where, data in [*server.seen, *((f"file {f.name}", f.read_bytes()) for f in files)]:
        assert_clean(where, data, OPENAI_SECRETS)
        if where.startswith(("page", "text", "response")):
            assert_clean(where, data, list(also_secret))


def sign_in(page: Any, server: Server, credential: str, shot: str | None = None) -> None:
    page.goto(server.url + "/console")
    if shot:
        look(server, page, shot)
    page.get_by_label("Proxy key or admin token").fill(credential)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def chart_of(page: Any, group: str) -> dict[str, Any]:
    data: dict[str, Any] = page.evaluate(
        "g => { const c = Chart.getChart("
        "document.querySelector(`canvas[data-chart-for=usage-${g}]`));"
        " return c ? {labels: c.data.labels, cost: c.data.datasets[0].data,"
        " tokens: c.data.datasets[1].data} : null; }",
        group,
    )
    return data


def test_a_tenant_registers_its_key_manages_proxy_keys_and_sees_its_spend(
    server: Server, page: Any
) -> None:
    proxy_key = create_tenant(server.url, "acme")
    sign_in(page, server, proxy_key, shot="sign-in")
    assert page.url == server.url + "/console/tenants/acme"
    assert "No OpenAI key is stored" in page.inner_text("main")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    look(server, page, "tenant")

    # A key OpenAI rejects: the admin API's 402, in words; nothing echoed.
    key_field = page.get_by_label("Register an OpenAI key")
    key_field.fill(BAD_KEY)
    with page.expect_response(lambda r: r.url.endswith("/openai-key")) as answer:
        page.get_by_role("button", name="Validate and store").click()
    assert answer.value.status == 402
    assert "OpenAI rejected this key" in page.locator("#key-problem").inner_text()
    assert page.get_by_label("Register an OpenAI key").input_value() == ""
    assert page.get_by_label("Register an OpenAI key").get_attribute("autocomplete") == "off"
    look(server, page, "tenant-bad-key")

    page.get_by_label("Register an OpenAI key").fill(GOOD_KEY)
    page.get_by_role("button", name="Validate and store").click()
    assert "validated by OpenAI and stored" in page.locator(".notice").inner_text()
    assert f"sk-...{GOOD_KEY[-4:]}" in page.inner_text("main")

    # Issue a proxy key: its secret once, with a copy button; it works, then is revoked.
    page.get_by_label("Name").fill("ci")
    page.get_by_role("button", name="Issue a proxy key").click()
    issued = page.locator("#issued-secret").input_value()
    assert issued.startswith("byok-")
    page.get_by_role("button", name="Copy").click()
    sync_api.expect(page.locator(".copied")).to_have_text(re.compile(r"Copied|Select"))
    page.screenshot(path=str(server.shots / "tenant-key-issued.png"), full_page=True)
    server.sdk(issued).chat.completions.create(model="gpt-4o-mini", messages=[])
    page.goto(server.url + "/console/tenants/acme")
    assert issued not in page.content()
    assert page.locator("#proxy-keys").get_by_text("ci", exact=True).count() == 1
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke ci").click()
    assert "revoked" in page.locator(".notice").inner_text()
    assert page.locator("#proxy-keys").get_by_text("ci", exact=True).count() == 0
    with pytest.raises(openai.AuthenticationError):
        server.sdk(issued).chat.completions.create(model="gpt-4o-mini", messages=[])
    look(server, page, "tenant-after-revoke")
    # The tenant did both through the console: audited as the tenant's, not the operator's.
    events = httpx.get(server.url + "/api/v1/tenants/acme/audit", headers=admin_headers())
    actors = {e["action"]: e["actor"] for e in reversed(events.json()["data"])}  # newest
    assert actors["api_key.issued"] == actors["api_key.revoked"] == "tenant", actors

    # Spend: the table and the chart follow requests made through the proxy.
    spend = server.url + "/console/tenants/acme/spend"

    def shows(requests: int) -> bool:
        page.goto(spend)
        return page.locator("#total-requests").inner_text() == str(requests)

    until(lambda: shows(1), 60, "the spend page never showed the issued key's call")
    assert chart_of(page, "model")["tokens"] == [18]
    for _ in range(3):
        server.sdk(proxy_key).chat.completions.create(model="gpt-4o-mini", messages=[])
    until(lambda: shows(4), 60, "the spend page never showed the new requests")
    by_model = chart_of(page, "model")
    assert by_model["labels"] == ["gpt-4o-mini"]
    assert by_model["tokens"] == [4 * 18] and by_model["cost"][0] > 0
    assert sum(chart_of(page, "day")["tokens"]) == 4 * 18
    assert len(chart_of(page, "api_key")["labels"]) == 2  # the first key and "ci (revoked)"
    row = page.locator("#usage-model tbody tr").first.inner_text()
    assert "gpt-4o-mini" in row and "72" in row
    look(server, page, "tenant-spend")
    clip = {"x": 0, "y": 0, "width": 1100, "height": 1000}  # docs/console.png is this one
    page.screenshot(path=str(server.shots / "readme-console.png"), clip=clip)
    csv = page.context.request.get(
        server.url + "/console/tenants/acme/usage.csv?group_by=model"
    ).text()
    assert csv.splitlines()[1].startswith("gpt-4o-mini,4,44,28,72,")
    server.seen.append(("the CSV", csv))

    # A narrow window: nothing wider than the screen but the scrolling tables.
    page.set_viewport_size({"width": 360, "height": 800})
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    look(server, page, "tenant-spend-narrow")

    # Signing out ends the session: a copy of its cookie no longer signs anyone in.
    copied = page.context.cookies()
    assert {c["name"] for c in copied} == {"__Host-byok_console"}
    assert all(c["secure"] and c["httpOnly"] and c["path"] == "/" for c in copied)
    page.get_by_role("button", name="Sign out").click()
    assert "You are signed out" in page.inner_text("main")
    page.goto(server.url + "/console/tenants/acme")
    assert page.url == server.url + "/console/sign-in"
    page.context.add_cookies(copied)
    page.goto(server.url + "/console/tenants/acme")
    assert page.url == server.url + "/console/sign-in"
    assert_no_leaks(server, proxy_key, ADMIN_TOKEN)


def test_a_tenant_sees_only_itself_and_changes_nothing_without_the_csrf_token(
    server: Server, page: Any
) -> None:
    own = create_tenant(server.url, "iso-a")
    create_tenant(server.url, "iso-b")
    sign_in(page, server, own)
    assert page.url.endswith("/console/tenants/iso-a")
    csrf = page.locator("input[name=csrf]").first.input_value()
    for path in ("/console/tenants/iso-b", "/console/tenants/iso-b/spend", "/console/tenants"):
        answer = page.goto(server.url + path)
        assert answer.status == (403 if path == "/console/tenants" else 404), path
        assert "iso-b" not in page.inner_text("main")
    look(server, page, "tenant-other-404")

    post = page.context.request.post
    issue = server.url + "/console/tenants/iso-a/api-keys"
    assert post(issue, form={"name": "no-token"}).status == 403
    assert post(issue, form={"name": "wrong", "csrf": csrf[:-2] + "xx"}).status == 403
    other = server.url + "/console/tenants/iso-b/api-keys"
    assert post(other, form={"name": "theirs", "csrf": csrf}).status == 404
    assert post(server.url + "/console/sign-out", form={}).status == 403
    keys = httpx.get(server.url + "/api/v1/tenants/iso-a/api-keys", headers=admin_headers())
    assert len(keys.json()["data"]) == 1
    keys = httpx.get(server.url + "/api/v1/tenants/iso-b/api-keys", headers=admin_headers())
    assert len(keys.json()["data"]) == 1
    assert post(issue, form={"name": "with-token", "csrf": csrf}).status == 201

    # The sign-in form has its own token; a revoked proxy key cannot sign in.
    fresh = page.context.browser.new_context()
    assert (
        fresh.request.post(server.url + "/console/sign-in", form={"credential": own}).status == 403
    )
    fresh.close()
    page.context.clear_cookies()
    key_id = httpx.get(server.url + "/api/v1/whoami", headers=bearer(own)).json()["api_key_id"]
    gone = httpx.delete(
        f"{server.url}/api/v1/tenants/iso-a/api-keys/{key_id}", headers=admin_headers()
    )
    assert gone.status_code == 204
    sign_in(page, server, own)
    assert page.url == server.url + "/console/sign-in"
    assert "not recognised" in page.locator("#sign-in-problem").inner_text()
    assert_no_leaks(server, own, ADMIN_TOKEN)


def test_the_operator_sees_every_tenant(server: Server, page: Any) -> None:
    create_tenant(server.url, "op-keyed", openai_key=GOOD_KEY)
    create_tenant(server.url, "op-trial", tier="trial")
    create_tenant(server.url, "op-keyless")
    sign_in(page, server, ADMIN_TOKEN)
    assert page.url == server.url + "/console/tenants"
    listed = httpx.get(server.url + "/api/v1/tenants", headers=admin_headers()).json()["data"]
    rows = page.locator("#tenants tbody tr")
    assert rows.count() == len(listed) >= 3
    for tenant in listed:
        assert page.locator("#tenants").get_by_role("link", name=tenant["name"]).count() == 1
    keyless = page.locator("#tenants tbody tr", has_text="op-keyless").inner_text()
    assert "no OpenAI key" in keyless
    assert "no OpenAI key" not in page.locator("#tenants tr", has_text="op-trial").inner_text()
    look(server, page, "operator-tenants")

    page.get_by_label("Search by id or name").fill("op-tri")
    visible = [r for r in rows.all() if r.is_visible()]
    assert [r.locator("code").first.inner_text() for r in visible] == ["op-trial"]
    page.get_by_label("Search by id or name").fill("")
    page.get_by_role("button", name="Spend this month").click()
    header = page.locator("#tenants th", has_text="Spend this month")
    assert header.get_attribute("aria-sort") == "ascending"

    page.get_by_role("link", name="op-keyed").click()
    assert page.url == server.url + "/console/tenants/op-keyed"
    assert re.search(r"Active: sk-\.\.\.\w{4}", page.inner_text("main"))
    look(server, page, "operator-tenant")
    assert_no_leaks(server, ADMIN_TOKEN)
