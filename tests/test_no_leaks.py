"""A full admin scenario at DEBUG log level: the plaintext key appears nowhere it must not.

Checked: every captured log line (all loggers, DEBUG), every response body and
header, every audit event, the raw bytes of the SQLite database (and its WAL),
and every row of every table on PostgreSQL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import respx
import sqlalchemy
from helpers import GOOD_KEY, OTHER_KEY, UPSTREAM, admin_headers, bearer

from proxy.app import create_app
from proxy.config import Config

ADMIN = admin_headers()
# Fragments that must not appear either: the secret part of the keys.
FORBIDDEN = [GOOD_KEY, OTHER_KEY, GOOD_KEY[8:30], OTHER_KEY[8:30]]


def assert_clean(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in FORBIDDEN:
        assert secret.encode() not in data, f"plaintext key found in {where}"


async def test_scenario_leaves_no_plaintext_key(
    config: Config, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
    responses: list[httpx.Response] = []
    app = create_app(config)
    try:
        async with app.lifespan():
            transport = httpx.ASGITransport(app=app)
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client,
                respx.mock(base_url=UPSTREAM) as openai,
            ):
                models = openai.get("/models")

                async def call(method: str, url: str, **kw: object) -> httpx.Response:
                    r = await client.request(method, url, **kw)  # type: ignore[arg-type]
                    responses.append(r)
                    return r

                created = await call(
                    "POST",
                    "/api/v1/tenants",
                    json={"name": "Acme", "tier": "pro", "id": "acme"},
                    headers=ADMIN,
                )
                tenant = bearer(created.json()["api_key"])
                models.respond(200, json={"data": []})
                assert (
                    await call(
                        "POST",
                        "/api/v1/tenants/acme/openai-key",
                        json={"api_key": GOOD_KEY + "\n"},
                        headers=ADMIN,
                    )
                ).status_code == 200
                # Upstream rejections echo key fragments; none may come back.
                models.respond(
                    401,
                    json={
                        "error": {
                            "message": f"Incorrect API key provided: {OTHER_KEY}",
                            "code": "invalid_api_key",
                        }
                    },
                )
                assert (
                    await call(
                        "POST",
                        "/api/v1/tenants/acme/openai-key",
                        json={"api_key": OTHER_KEY},
                        headers=tenant,
                    )
                ).status_code == 402
                models.side_effect = httpx.ConnectError(f"boom {OTHER_KEY}")
                assert (
                    await call(
                        "POST",
                        "/api/v1/tenants/acme/openai-key",
                        json={"api_key": OTHER_KEY},
                        headers=ADMIN,
                    )
                ).status_code == 503
                models.side_effect = None
                await call(
                    "POST",
                    "/api/v1/tenants/acme/openai-key",
                    json={"api_key": "sk-admin-" + OTHER_KEY[3:]},
                    headers=ADMIN,
                )
                await call(
                    "POST",
                    "/api/v1/tenants/acme/openai-key",
                    json={"api_key": 12345, "x": OTHER_KEY},
                    headers=ADMIN,
                )
                await call("GET", "/api/v1/tenants/acme", headers=tenant)
                await call("GET", "/api/v1/tenants", headers=ADMIN)
                audit = await call("GET", "/api/v1/tenants/acme/audit", headers=ADMIN)
                assert len(audit.json()["data"]) >= 3
                await call("DELETE", "/api/v1/tenants/acme/openai-key", headers=tenant)
                models.respond(200, json={"data": []})
                await call(
                    "POST",
                    "/api/v1/tenants/acme/openai-key",
                    json={"api_key": OTHER_KEY},
                    headers=ADMIN,
                )

            assert app.runtime is not None
            with app.runtime.store.engine.connect() as conn:
                for table in ("tenants", "proxy_keys", "audit_events", "trial_allowance"):
                    rows = conn.execute(sqlalchemy.text(f"SELECT * FROM {table}")).all()  # noqa: S608
                    assert_clean(f"table {table}", repr(rows))
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)

    for r in responses:
        assert_clean(f"response to {r.request.url}", r.content)
        assert_clean("response headers", repr(r.headers.raw))
    assert len(caplog.records) > 10  # DEBUG logging really was on
    for record in caplog.records:
        assert_clean(f"log line from {record.name}", record.getMessage())
    assert_clean("captured log text", caplog.text)
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for file in path.parent.glob(path.name + "*"):
            assert_clean(f"database file {file.name}", file.read_bytes())
