"""The admin API, route by route: success and every failure status, on SQLite and PostgreSQL.

respx stands in for OpenAI's `GET /models` validation call.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from helpers import GOOD_KEY, OTHER_KEY, UPSTREAM, admin_headers, bearer

from proxy.app import ByokApp
from proxy.security import key_hint

ADMIN = admin_headers()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Pin OpenAI's error shape and our status/code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code
    return body["error"]


@pytest.fixture
def openai() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as mock:
        yield mock


async def make_tenant(client: httpx.AsyncClient, tid: str, tier: str = "pro") -> str:
    r = await client.post(
        "/api/v1/tenants", json={"name": tid.title(), "tier": tier, "id": tid}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    return str(r.json()["api_key"])


async def register(
    client: httpx.AsyncClient, tid: str, key: str, headers: dict[str, str] = ADMIN
) -> httpx.Response:
    return await client.post(
        f"/api/v1/tenants/{tid}/openai-key", json={"api_key": key}, headers=headers
    )


async def audit_actions(client: httpx.AsyncClient, tid: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/tenants/{tid}/audit", headers=ADMIN)
    assert r.status_code == 200
    return list(r.json()["data"])


# --- tenants -----------------------------------------------------------------------


async def test_create_get_list_tenant(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/tenants", json={"name": "Acme", "tier": "trial"}, headers=ADMIN)
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"id", "name", "tier", "api_key", "api_key_id", "created_at"}
    assert body["api_key"].startswith("byok-") and body["created_at"].endswith("Z")
    assert r.headers["x-byok-request-id"].startswith("req_")

    r = await client.get(f"/api/v1/tenants/{body['id']}", headers=ADMIN)
    assert r.status_code == 200
    tenant = r.json()
    assert tenant["name"] == "Acme" and tenant["tier"] == "trial"
    assert tenant["openai_key"] == {
        "status": "none",
        "hint": None,
        "validated_at": None,
        "updated_at": None,
    }
    assert "api_key" not in tenant and "openai_api_key_encrypted" not in tenant

    r = await client.get("/api/v1/tenants", headers=ADMIN)
    assert r.status_code == 200 and [t["id"] for t in r.json()["data"]] == [body["id"]]

    r = await client.get(f"/api/v1/tenants/{body['id']}", headers=bearer(body["api_key"]))
    assert r.status_code == 200 and r.json()["id"] == body["id"]


async def test_create_tenant_bad_input(client: httpx.AsyncClient) -> None:
    url = "/api/v1/tenants"
    assert_error(await client.post(url, content=b"{not json", headers=ADMIN), 400, "invalid_json")
    assert_error(await client.post(url, json=["a"], headers=ADMIN), 400, "invalid_json")
    assert_error(await client.post(url, content=b"", headers=ADMIN), 400, "invalid_json")
    err = assert_error(
        await client.post(url, json={"name": 5, "tier": "pro"}, headers=ADMIN),
        422,
        "invalid_request",
    )
    assert err["param"] == "name"
    assert_error(
        await client.post(url, json={"name": "x", "tier": "gold"}, headers=ADMIN),
        422,
        "invalid_request",
    )
    err = assert_error(
        await client.post(url, json={"name": "x", "tier": "pro", "extra": 1}, headers=ADMIN),
        422,
        "invalid_request",
    )
    assert err["param"] == "extra"
    for bad_id in ("Upper", "-lead", "a" * 64, "sp ace", "../x"):
        assert_error(
            await client.post(url, json={"name": "x", "tier": "pro", "id": bad_id}, headers=ADMIN),
            422,
            "invalid_request",
        )
    assert_error(
        await client.post(url, json={"tier": "pro"}, headers=ADMIN), 422, "invalid_request"
    )
    big = {"name": "x" * 100_000, "tier": "pro"}
    assert_error(await client.post(url, json=big, headers=ADMIN), 413, "request_too_large")
    await make_tenant(client, "dup")
    assert_error(
        await client.post(url, json={"name": "x", "tier": "pro", "id": "dup"}, headers=ADMIN),
        409,
        "tenant_exists",
    )


async def test_body_over_limit_without_content_length(client: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 10_000

    r = await client.post("/api/v1/tenants", content=chunks(), headers=ADMIN)
    assert_error(r, 413, "request_too_large")


async def test_auth_failures(client: httpx.AsyncClient) -> None:
    url = "/api/v1/tenants"
    assert_error(await client.get(url), 401, "unauthorized")
    assert_error(
        await client.get(url, headers=bearer("wrong-token-" + "x" * 30)), 401, "unauthorized"
    )
    assert_error(await client.get(url, headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    assert_error(await client.get(url, headers=bearer("byok-unknownkey")), 401, "unauthorized")
    key = await make_tenant(client, "acme")
    tenant = bearer(key)
    assert_error(await client.get(url, headers=tenant), 403, "forbidden")
    assert_error(
        await client.post(url, json={"name": "x", "tier": "pro"}, headers=tenant), 403, "forbidden"
    )
    assert_error(
        await client.patch("/api/v1/tenants/acme", json={"tier": "trial"}, headers=tenant),
        403,
        "forbidden",
    )
    assert_error(await client.delete("/api/v1/tenants/acme", headers=tenant), 403, "forbidden")
    assert_error(
        await client.post("/api/v1/tenants/acme/api-keys", headers=tenant), 403, "forbidden"
    )
    assert_error(await client.get("/api/v1/openapi.json", headers=tenant), 403, "forbidden")


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/nope", headers=ADMIN), 404, "not_found")
    assert_error(await client.get("/nope"), 404, "not_found")
    r = await client.put("/api/v1/tenants", headers=ADMIN)
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert_error(
        await client.post("/api/v1/tenants/acme/audit", headers=ADMIN), 405, "method_not_allowed"
    )


async def test_update_and_delete_tenant(client: httpx.AsyncClient) -> None:
    key = await make_tenant(client, "acme", "trial")
    r = await client.patch(
        "/api/v1/tenants/acme", json={"tier": "pro", "name": "Acme Inc"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["tier"] == "pro" and r.json()["name"] == "Acme Inc"
    assert_error(
        await client.patch("/api/v1/tenants/acme", json={"tier": 3}, headers=ADMIN),
        422,
        "invalid_request",
    )
    assert_error(
        await client.patch("/api/v1/tenants/nope", json={"tier": "pro"}, headers=ADMIN),
        404,
        "not_found",
    )
    assert_error(await client.delete("/api/v1/tenants/nope", headers=ADMIN), 404, "not_found")
    assert_error(await client.get("/api/v1/tenants/nope", headers=ADMIN), 404, "not_found")

    r = await client.delete("/api/v1/tenants/acme", headers=ADMIN)
    assert r.status_code == 204 and r.content == b""
    assert_error(await client.get("/api/v1/tenants/acme", headers=ADMIN), 404, "not_found")
    assert_error(await client.get("/api/v1/tenants/acme", headers=bearer(key)), 401, "unauthorized")
    actions = [e["action"] for e in await audit_actions(client, "acme")]
    assert actions == ["tenant.deleted", "tenant.updated", "api_key.issued", "tenant.created"]


# --- OpenAI key registration --------------------------------------------------------


async def test_register_key(client: httpx.AsyncClient, openai: respx.MockRouter) -> None:
    route = openai.get("/models").respond(200, json={"object": "list", "data": []})
    await make_tenant(client, "acme")
    r = await register(client, "acme", f"  {GOOD_KEY}\n")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"status", "hint", "validated_at"}
    assert body["status"] == "active" and body["hint"] == key_hint(GOOD_KEY) == "sk-...6789"
    assert GOOD_KEY not in r.text
    assert route.call_count == 1
    assert route.calls.last.request.headers["authorization"] == f"Bearer {GOOD_KEY}"

    tenant = (await client.get("/api/v1/tenants/acme", headers=ADMIN)).json()
    assert tenant["openai_key"]["status"] == "active"
    assert tenant["openai_key"]["hint"] == "sk-...6789"
    assert tenant["openai_key"]["validated_at"] == body["validated_at"]

    r = await register(client, "acme", OTHER_KEY)
    assert r.status_code == 200 and r.json()["hint"] == key_hint(OTHER_KEY)
    events = await audit_actions(client, "acme")
    assert [(e["action"], e["actor"], e["key_hint"]) for e in events[:2]] == [
        ("openai_key.replaced", "admin", key_hint(OTHER_KEY)),
        ("openai_key.set", "admin", key_hint(GOOD_KEY)),
    ]
    assert events[0]["source_ip"] == "203.0.113.7" and events[0]["request_id"].startswith("req_")


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("pk-abcdefghijklmnopqrstuvwxyz", "starts with 'sk-'"),
        ("sk-admin-abcdefghijklmnopqrstuvwxyz", "admin keys"),
        ("sk-short", "20 to 512 characters long; this one is 8"),
        ("sk-" + "a" * 600, "20 to 512 characters long; this one is 603"),
        ("sk-" + "Q" * 5005, "20 to 512 characters long; this one is 5008"),  # was a schema 422
        ("sk-abcdefghij klmnopqrstuvwxyz", "no spaces or line breaks inside"),
        ("sk-abcdefghij\u00e9klmnopqrstuvwxyz", "only letters, digits"),
        ("   ", "is empty"),
    ],
)
async def test_register_key_format(
    client: httpx.AsyncClient, openai: respx.MockRouter, key: str, rule: str
) -> None:
    route = openai.get("/models").respond(200, json={"data": []})
    await make_tenant(client, "acme")
    r = await register(client, "acme", key)
    err = assert_error(r, 422, "invalid_key_format")
    assert rule in err["message"] and err["param"] == "api_key"
    assert not key.strip() or key.strip()[3:11] not in r.text
    assert route.call_count == 0


async def test_register_key_wrong_type(client: httpx.AsyncClient) -> None:
    await make_tenant(client, "acme")
    r = await client.post(
        "/api/v1/tenants/acme/openai-key", json={"api_key": 12345678}, headers=ADMIN
    )
    err = assert_error(r, 422, "invalid_request")
    assert "12345678" not in err["message"]
    r = await client.post("/api/v1/tenants/acme/openai-key", json={"key": GOOD_KEY}, headers=ADMIN)
    err = assert_error(r, 422, "invalid_request")
    assert GOOD_KEY not in r.text


VALIDATION_OUTCOMES = [
    (
        httpx.Response(
            401,
            json={
                "error": {
                    "message": f"Incorrect API key provided: {OTHER_KEY[:8]}",
                    "code": "invalid_api_key",
                }
            },
        ),
        402,
        "openai_key_invalid",
    ),
    (
        httpx.Response(
            429,
            json={
                "error": {
                    "message": "quota",
                    "type": "insufficient_quota",
                    "code": "insufficient_quota",
                }
            },
        ),
        402,
        "openai_quota_exceeded",
    ),
    (
        httpx.Response(
            429, json={"error": {"message": "slow down", "code": "rate_limit_exceeded"}}
        ),
        503,
        "openai_unreachable",
    ),
    (
        httpx.Response(403, json={"error": {"message": "unsupported region"}}),
        422,
        "openai_key_forbidden",
    ),
    (httpx.Response(500, text="oops"), 503, "openai_unreachable"),
    (httpx.ConnectTimeout("timed out"), 503, "openai_unreachable"),
    (httpx.ReadTimeout("timed out"), 503, "openai_unreachable"),
    (httpx.ConnectError("refused"), 503, "openai_unreachable"),
]


@pytest.mark.parametrize(("outcome", "status", "code"), VALIDATION_OUTCOMES)
async def test_failed_registration_keeps_previous_key(
    client: httpx.AsyncClient, openai: respx.MockRouter, outcome: Any, status: int, code: str
) -> None:
    route = openai.get("/models")
    route.respond(200, json={"data": []})
    await make_tenant(client, "acme")
    assert (await register(client, "acme", GOOD_KEY)).status_code == 200
    before = (await client.get("/api/v1/tenants/acme", headers=ADMIN)).json()
    events_before = await audit_actions(client, "acme")

    if isinstance(outcome, Exception):
        route.side_effect = outcome
    else:
        route.return_value = outcome
    r = await register(client, "acme", OTHER_KEY)
    err = assert_error(r, status, code)
    assert OTHER_KEY not in r.text and OTHER_KEY[:8] not in err["message"]
    if status == 402:
        assert "/api/v1/tenants/acme/openai-key" in err["message"]

    after = (await client.get("/api/v1/tenants/acme", headers=ADMIN)).json()
    assert after == before and after["openai_key"]["hint"] == key_hint(GOOD_KEY)
    events = await audit_actions(client, "acme")  # newest first: the refusal, audited
    assert events[1:] == events_before
    assert events[0]["action"].startswith("openai_key.rejected.")
    assert events[0]["key_hint"] is None


async def test_register_for_unknown_tenant_makes_no_upstream_call(
    client: httpx.AsyncClient, openai: respx.MockRouter
) -> None:
    route = openai.get("/models").respond(200, json={"data": []})
    assert_error(await register(client, "ghost", GOOD_KEY), 404, "not_found")
    assert route.call_count == 0


async def test_delete_key_is_idempotent(
    client: httpx.AsyncClient, openai: respx.MockRouter
) -> None:
    openai.get("/models").respond(200, json={"data": []})
    await make_tenant(client, "acme")
    assert (
        await client.delete("/api/v1/tenants/acme/openai-key", headers=ADMIN)
    ).status_code == 204
    await register(client, "acme", GOOD_KEY)
    assert (
        await client.delete("/api/v1/tenants/acme/openai-key", headers=ADMIN)
    ).status_code == 204
    assert (
        await client.delete("/api/v1/tenants/acme/openai-key", headers=ADMIN)
    ).status_code == 204
    tenant = (await client.get("/api/v1/tenants/acme", headers=ADMIN)).json()
    assert tenant["openai_key"]["status"] == "none" and tenant["openai_key"]["hint"] is None
    actions = [(e["action"], e["key_hint"]) for e in await audit_actions(client, "acme")]
    assert actions.count(("openai_key.removed", key_hint(GOOD_KEY))) == 1
    assert actions[0] == ("openai_key.removed", key_hint(GOOD_KEY))
    assert_error(
        await client.delete("/api/v1/tenants/nope/openai-key", headers=ADMIN), 404, "not_found"
    )


# --- tenant self-service and isolation ------------------------------------------------


async def test_tenant_isolation(client: httpx.AsyncClient, openai: respx.MockRouter) -> None:
    openai.get("/models").respond(200, json={"data": []})
    key_a = await make_tenant(client, "tenant-a")
    await make_tenant(client, "tenant-b")
    a = bearer(key_a)
    assert (await register(client, "tenant-b", OTHER_KEY)).status_code == 200

    # Tenant A manages itself...
    r = await register(client, "tenant-a", GOOD_KEY, headers=a)
    assert r.status_code == 200
    assert (await client.get("/api/v1/tenants/tenant-a", headers=a)).status_code == 200
    assert (await client.get("/api/v1/tenants/tenant-a/audit", headers=a)).status_code == 200
    events = await audit_actions(client, "tenant-a")
    assert (events[0]["action"], events[0]["actor"]) == ("openai_key.set", "tenant")

    # ...and cannot see or touch tenant B: B does not exist for it.
    for call in (
        client.get("/api/v1/tenants/tenant-b", headers=a),
        client.get("/api/v1/tenants/tenant-b/audit", headers=a),
        client.post("/api/v1/tenants/tenant-b/openai-key", json={"api_key": GOOD_KEY}, headers=a),
        client.delete("/api/v1/tenants/tenant-b/openai-key", headers=a),
        client.get("/api/v1/tenants/no-such", headers=a),
    ):
        assert_error(await call, 404, "not_found")
    b = (await client.get("/api/v1/tenants/tenant-b", headers=ADMIN)).json()
    assert b["openai_key"]["hint"] == key_hint(OTHER_KEY) and b["openai_key"]["status"] == "active"


# --- proxy keys ---------------------------------------------------------------------


async def test_issue_and_revoke_proxy_keys(client: httpx.AsyncClient) -> None:
    first = await make_tenant(client, "acme")
    await make_tenant(client, "other")
    r = await client.post("/api/v1/tenants/acme/api-keys", headers=ADMIN)
    assert r.status_code == 201
    issued = r.json()
    assert set(issued) == {
        "id",
        "api_key",
        "created_at",
        "name",
        "expires_at",
        "last_used_at",
        "policy",
    }
    assert issued["api_key"] != first
    assert (
        await client.get("/api/v1/tenants/acme", headers=bearer(issued["api_key"]))
    ).status_code == 200

    assert_error(
        await client.post("/api/v1/tenants/nope/api-keys", headers=ADMIN), 404, "not_found"
    )
    assert_error(
        await client.delete(f"/api/v1/tenants/other/api-keys/{issued['id']}", headers=ADMIN),
        404,
        "not_found",
    )
    assert_error(
        await client.delete("/api/v1/tenants/acme/api-keys/key_nope", headers=ADMIN),
        404,
        "not_found",
    )
    assert_error(
        await client.delete(f"/api/v1/tenants/acme/api-keys/{issued['id']}", headers=bearer(first)),
        403,
        "forbidden",
    )

    r = await client.delete(f"/api/v1/tenants/acme/api-keys/{issued['id']}", headers=ADMIN)
    assert r.status_code == 204
    assert_error(
        await client.get("/api/v1/tenants/acme", headers=bearer(issued["api_key"])),
        401,
        "unauthorized",
    )
    assert (await client.get("/api/v1/tenants/acme", headers=bearer(first))).status_code == 200
    r = await client.delete(f"/api/v1/tenants/acme/api-keys/{issued['id']}", headers=ADMIN)
    assert r.status_code == 204
    actions = [(e["action"], e["key_hint"]) for e in await audit_actions(client, "acme")]
    assert actions[:2] == [("api_key.revoked", issued["id"]), ("api_key.issued", issued["id"])]
    assert actions.count(("api_key.revoked", issued["id"])) == 1


async def test_audit_default_limit_is_100(client: httpx.AsyncClient) -> None:
    await make_tenant(client, "acme")
    for _ in range(105):
        await client.post("/api/v1/tenants/acme/api-keys", headers=ADMIN)
    r = await client.get("/api/v1/tenants/acme/audit", headers=ADMIN)
    assert len(r.json()["data"]) == 100
    r = await client.get("/api/v1/tenants/acme/audit?limit=1000", headers=ADMIN)
    assert len(r.json()["data"]) == 107  # tenant.created + 106 api_key.issued


async def test_audit_newest_first_and_limit(client: httpx.AsyncClient) -> None:
    await make_tenant(client, "acme")
    for _ in range(3):
        await client.post("/api/v1/tenants/acme/api-keys", headers=ADMIN)
    events = await audit_actions(client, "acme")
    assert [e["action"] for e in events] == ["api_key.issued"] * 4 + ["tenant.created"]
    assert [e["ts"] for e in events] == sorted((e["ts"] for e in events), reverse=True)
    assert set(events[0]) >= {
        "ts",
        "tenant_id",
        "action",
        "actor",
        "key_hint",
        "request_id",
        "source_ip",
    }
    r = await client.get("/api/v1/tenants/acme/audit?limit=2", headers=ADMIN)
    assert len(r.json()["data"]) == 2
    for bad in ("0", "1001", "x", "-1"):
        r = await client.get(f"/api/v1/tenants/acme/audit?limit={bad}", headers=ADMIN)
        assert assert_error(r, 422, "invalid_request")["param"] == "limit"
    assert_error(await client.get("/api/v1/tenants/ghost/audit", headers=ADMIN), 404, "not_found")


# --- whoami -------------------------------------------------------------------------


async def test_whoami(client: httpx.AsyncClient) -> None:
    url = "/api/v1/whoami"
    r = await client.get(url, headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"kind": "admin"}
    created = (
        await client.post("/api/v1/tenants", json={"name": "A", "tier": "pro"}, headers=ADMIN)
    ).json()
    await make_tenant(client, "other")
    first = bearer(created["api_key"])
    r = await client.get(url, headers=first)
    assert r.status_code == 200
    assert r.json() == {
        "kind": "tenant",
        "tenant_id": created["id"],
        "api_key_id": created["api_key_id"],
    }
    assert created["api_key"] not in r.text

    issued = (await client.post(f"/api/v1/tenants/{created['id']}/api-keys", headers=ADMIN)).json()
    r = await client.get(url, headers=bearer(issued["api_key"]))
    assert r.json()["tenant_id"] == created["id"] and r.json()["api_key_id"] == issued["id"]

    assert_error(await client.get(url), 401, "unauthorized")
    assert_error(await client.get(url, headers=bearer("byok-unknownkey")), 401, "unauthorized")
    assert_error(await client.get(url, headers=bearer("wrong-" + "x" * 40)), 401, "unauthorized")
    revoke = f"/api/v1/tenants/{created['id']}/api-keys/{issued['id']}"
    assert (await client.delete(revoke, headers=ADMIN)).status_code == 204
    assert_error(await client.get(url, headers=bearer(issued["api_key"])), 401, "unauthorized")
    assert (await client.get(url, headers=first)).status_code == 200

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired = await client.post(
        f"/api/v1/tenants/{created['id']}/api-keys", json={"expires_at": past}, headers=ADMIN
    )
    assert expired.status_code == 201
    r = await client.get(url, headers=bearer(expired.json()["api_key"]))
    assert_error(r, 401, "proxy_key_expired")
    assert expired.json()["api_key"] not in r.text


async def test_whoami_shares_the_failed_auth_limit(
    client: httpx.AsyncClient, app: ByokApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guessing keys on whoami counts toward the same 429 as every other route."""
    guards = app.runtime.auth_limit
    monkeypatch.setattr(guards, "_window", lambda: 1)  # no minute ends during the test
    key = bearer(await make_tenant(client, "acme"))
    assert (await client.get("/api/v1/whoami", headers=key)).status_code == 200  # known
    for n in range(guards.per_minute):
        r = await client.get("/api/v1/whoami", headers=bearer(f"byok-guess{n}"))
        assert_error(r, 401, "unauthorized")
    r = await client.get("/api/v1/tenants/acme", headers=bearer("byok-guess"))
    assert_error(r, 429, "too_many_failed_authentications")
    r = await client.get("/api/v1/whoami", headers=bearer("byok-guess"))
    assert_error(r, 429, "too_many_failed_authentications")
    assert (await client.get("/api/v1/whoami", headers=key)).status_code == 200
    assert (await client.get("/api/v1/whoami", headers=ADMIN)).json() == {"kind": "admin"}
