"""The admin API's OpenAPI document: valid OpenAPI 3.1, complete, and true of what runs.

The document is generated from `admin.app.ROUTES`; these tests walk it and
hold the running API to it: every route is in it, every answer validates
against the schema it documents for that status (checked with jsonschema,
independently of pydantic), the access rule and query constraints it states
are the ones enforced, and a handler that strays from it is a 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import respx
from helpers import GOOD_KEY, UPSTREAM, admin_headers, bearer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from admin.app import ROUTES, _route, openapi_document
from admin.openapi import Operation, build_document
from admin.schemas import OpenAIKeyIn, TenantCreate, TenantCreated, read_body
from proxy.app import ByokApp
from proxy.models import UsageLedger

ADMIN = admin_headers()
OPENAPI = "/api/v1/openapi.json"


@pytest.fixture
def openai() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as mock:
        mock.get("/models").respond(200, json={"object": "list", "data": []})
        yield mock


def test_document_is_valid_openapi() -> None:
    doc = build_document(ROUTES)
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert doc["openapi"] == "3.1.0"
    ops = [op for methods in doc["paths"].values() for op in methods.values()]
    assert len({op["operationId"] for op in ops}) == len(ops)


def test_broken_document_is_caught() -> None:
    """The validator is not a no-op: a response without a description is refused."""
    doc = build_document(ROUTES)
    del doc["paths"][OPENAPI]["get"]["responses"]["200"]["description"]
    with pytest.raises(Exception, match="description"):
        validate(doc)


async def test_every_route_is_documented(client: httpx.AsyncClient, app: ByokApp) -> None:
    assert (await client.get(OPENAPI)).status_code == 401
    r = await client.get(OPENAPI, headers=ADMIN)
    assert r.status_code == 200 and r.json() == openapi_document()
    documented = {(path, m.upper()) for path, ops in r.json()["paths"].items() for m in ops}
    routed = {
        (route.path, method)
        for route in app.admin.routes
        for method in (route.methods or ())  # type: ignore[attr-defined]
        if method != "HEAD"
    }
    assert documented == routed


def _schema_for(doc: dict[str, Any], path: str, method: str, status: int) -> Any:
    responses = doc["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path}: {status} is not documented"
    content = responses[str(status)].get("content")
    return content and content["application/json"]["schema"]


class Checker:
    """Calls the API and checks each answer against the document."""

    def __init__(self, client: httpx.AsyncClient, doc: dict[str, Any]) -> None:
        self.client, self.doc = client, doc
        self.seen: set[tuple[str, str]] = set()

    async def call(
        self, method: str, template: str, status: int, headers: dict[str, str] = ADMIN, **kw: Any
    ) -> httpx.Response:
        ids = {"tenant_id": kw.pop("tenant_id", "acme"), "key_id": kw.pop("key_id", "none")}
        url = template.format(**ids)
        r = await self.client.request(method, url, headers=headers, **kw)
        assert r.status_code == status, (method, url, r.text)
        schema = _schema_for(self.doc, template, method, status)
        if schema is None:
            assert r.content == b""
        else:
            checker = Draft202012Validator.FORMAT_CHECKER
            validator = Draft202012Validator(
                {**schema, "components": self.doc["components"]}, format_checker=checker
            )
            errors = [
                f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(r.json())
            ]
            assert not errors, (method, url, errors)
        if status < 400:
            self.seen.add((template, method))
        return r


async def test_every_answer_matches_the_document(
    client: httpx.AsyncClient, app: ByokApp, openai: respx.MockRouter
) -> None:
    doc = openapi_document()
    api = Checker(client, doc)
    t, one = "/api/v1/tenants", "/api/v1/tenants/{tenant_id}"
    await api.call("GET", OPENAPI, 200)
    body = {"name": "Acme", "tier": "trial", "id": "acme"}
    await api.call("POST", t, 201, json=body)
    await api.call("POST", t, 409, json=body)
    await api.call("POST", t, 422, json={"name": "Acme", "tier": "gold"})
    await api.call("POST", t, 400, content=b"[1]")
    await api.call("GET", t, 200)
    await api.call("GET", one, 404, tenant_id="ghost")
    policy = {"budgets": [{"period": "day", "limit_usd": 5}], "rate_limits": {"rpm": 60}}
    await api.call("PATCH", one, 200, json={"name": "Acme Inc", "policy": policy})
    await api.call("POST", one + "/openai-key", 200, json={"api_key": GOOD_KEY})
    await api.call("POST", one + "/openai-key", 422, json={"api_key": "sk-" + "Q" * 5005})
    issued = await api.call("POST", one + "/api-keys", 201)
    key_id = issued.json()["id"]
    keys = one + "/api-keys/{key_id}"
    await api.call("PATCH", keys, 200, key_id=key_id, json={"name": "ci", "policy": policy})
    await api.call("GET", one + "/api-keys", 200)
    tenant_key = bearer(issued.json()["api_key"])
    await api.call("GET", t, 403, headers=tenant_key)
    await api.call("GET", one, 200, headers=tenant_key)
    await api.call("GET", "/api/v1/whoami", 200)
    await api.call("GET", "/api/v1/whoami", 200, headers=tenant_key)
    await api.call("DELETE", keys, 204, key_id=key_id)
    await api.call("GET", one, 401, headers=tenant_key)
    await api.call("GET", "/api/v1/whoami", 401, headers=tenant_key)

    def ledger() -> None:
        with app.runtime.store.session() as s:
            today = datetime.now(UTC).date()
            for model, key in (("gpt-4o-mini", key_id), ("", "")):
                s.add(
                    UsageLedger(
                        tenant_id="acme",
                        day=today,
                        api_key_id=key,
                        model=model,
                        requests=2,
                        prompt_tokens=10,
                        completion_tokens=5,
                        cached_tokens=0,
                        cost_nanos=1500,
                        unpriced=0,
                    )
                )
            s.commit()

    await app.runtime.store.run(ledger)
    for group in ("day", "model", "api_key"):
        r = await api.call("GET", one + "/usage", 200, params={"group_by": group})
        assert r.json()["data"] and "trial_allowance" in r.json()
        await api.call("GET", "/api/v1/usage", 200, params={"group_by": group})
    await api.call("GET", "/api/v1/usage", 422, params={"from": "yesterday"})
    assert len((await api.call("GET", one + "/audit", 200)).json()["data"]) > 3
    await api.call("DELETE", one + "/openai-key", 204)
    await api.call("DELETE", one, 204)
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert api.seen == documented  # a new route needs a line here


async def test_access_rule_is_the_documented_one(client: httpx.AsyncClient) -> None:
    """A tenant's own key: 403 on every admin-only operation, let through on the self ones."""
    r = await client.post(
        "/api/v1/tenants", json={"name": "A", "tier": "pro", "id": "acme"}, headers=ADMIN
    )
    own = bearer(r.json()["api_key"])
    doc = openapi_document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            url = path.format(tenant_id="acme", key_id=r.json()["api_key_id"])
            body = {"api_key": "pk-not-a-key-at-all-really"} if "openai-key" in path else {}
            got = await client.request(method.upper(), url, headers=own, json=body)
            if "403" in op["responses"]:
                assert got.status_code == 403, (method, path, got.text)
            else:
                assert got.status_code not in (401, 403), (method, path, got.text)


def _bad_values(schema: dict[str, Any]) -> list[str]:
    """Values a query parameter's documented schema refuses."""
    if "enum" in schema:
        return ["nope"]
    if schema.get("type") == "integer":
        return ["x", str(schema["minimum"] - 1), str(schema["maximum"] + 1)]
    if schema.get("format") == "date":
        return ["yesterday", "2026-13-01", "20260101"]
    raise AssertionError(f"no bad values known for {schema}")


def _good_values(schema: dict[str, Any]) -> list[str]:
    if "enum" in schema:
        return list(schema["enum"])
    if schema.get("type") == "integer":
        return [str(schema["minimum"]), str(schema["maximum"])]
    return [datetime.now(UTC).date().isoformat()]


async def test_query_parameters_are_the_documented_ones(client: httpx.AsyncClient) -> None:
    await client.post(
        "/api/v1/tenants", json={"name": "A", "tier": "pro", "id": "acme"}, headers=ADMIN
    )
    checked = 0
    for path, ops in openapi_document()["paths"].items():
        url = path.format(tenant_id="acme", key_id="none")
        for param in ops.get("get", {}).get("parameters", []):
            if param["in"] != "query":
                continue
            name, schema = param["name"], param["schema"]
            for value in _bad_values(schema):
                r = await client.get(url, params={name: value}, headers=ADMIN)
                assert r.status_code == 422 and r.json()["error"]["param"] in (name, "to"), (
                    path,
                    name,
                    value,
                    r.text,
                )
            for value in _good_values(schema):
                r = await client.get(url, params={name: value}, headers=ADMIN)
                assert r.status_code == 200, (path, name, value, r.text)
            checked += 1
    assert checked == 7  # usage (x2): from, to, group_by; audit: limit


# --- a handler that strays from its documented operation ---------------------------


async def _leaky(_request: Request) -> Response:
    row = {"id": "t1", "name": "A", "tier": "pro", "api_key": "byok-x", "api_key_id": "k"}
    return JSONResponse(
        {**row, "created_at": "2026-01-01T00:00:00.000Z", "ciphertext": "gAAA"}, status_code=201
    )


async def _wrong_status(_request: Request) -> Response:
    return Response(status_code=200)


side_effects: list[str] = []


async def _reads_another_model(request: Request) -> Response:
    await read_body(request, OpenAIKeyIn)
    side_effects.append("ran")
    return Response(status_code=204)


@pytest.mark.parametrize(
    ("operation", "logged"),
    [
        (Operation(_leaky, "leaks", TenantCreated, status=201), "ciphertext: extra_forbidden"),
        (Operation(_wrong_status, "204", status=204), "status 200"),
        (Operation(_reads_another_model, "x", status=204, body=TenantCreate), None),
    ],
)
async def test_a_handler_straying_from_its_document_is_a_500(
    operation: Operation, logged: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    app = Starlette(routes=[_route("/x", {"POST": operation})])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as c:
        with caplog.at_level(logging.ERROR):
            r = await c.post("/x", json={"api_key": GOOD_KEY})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "gAAA" not in r.text and GOOD_KEY not in caplog.text
    assert side_effects == []
    if logged:
        assert re.search(rf"POST /x answered outside its documented .*{logged}", caplog.text)
