"""Every row of the status table, through the official SDK against the real proxy."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import sqlalchemy
from servers import free_port
from stack import PLATFORM_KEY, TENANT_KEY, Stack

OTHER = "sk-test-SECONDkeyabcdefghijklmnopqrstuvwxyz123456"


def chat(client: openai.OpenAI, model: str = "gpt-4o-mini", **kw: object) -> object:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], **kw
    )  # type: ignore[call-overload]


def expect(
    exc_type: type[openai.APIStatusError],
    status: int,
    code: str,
    call: object,
    *args: object,
    **kw: object,
) -> openai.APIStatusError:
    with pytest.raises(exc_type) as info:
        call(*args, **kw)  # type: ignore[operator]
    err = info.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and err.body.get("code") == code, err.body
    assert err.response.headers["x-byok-request-id"].startswith("req_")
    return err


def test_invalid_proxy_key(stack: Stack) -> None:
    stack.tenant("acme")
    for key in ("byok-not-a-real-key", "sk-looks-like-openai", ""):
        expect(openai.AuthenticationError, 401, "invalid_proxy_key", chat, stack.sdk(key or "x"))
    assert stack.fake.requests[-1].path == "/v1/models"  # only the registration's validation
    lines = stack.usage(3)
    assert lines[-1]["tenant_id"] is None and lines[-1]["status"] == 401
    assert lines[-1]["error_code"] == "invalid_proxy_key"


def test_revoked_proxy_key_is_refused_at_once(stack: Stack) -> None:
    key = stack.tenant("acme")
    client = stack.sdk(key)
    chat(client)
    key_id = stack.admin.get("/api/v1/tenants/acme/audit").json()["data"][-2]["key_hint"]
    assert stack.admin.delete(f"/api/v1/tenants/acme/api-keys/{key_id}").status_code == 204
    expect(openai.AuthenticationError, 401, "invalid_proxy_key", chat, client)


def test_key_missing_for_pro_tier(stack: Stack) -> None:
    key = stack.tenant("acme", tier="pro", key=None)
    err = expect(openai.APIStatusError, 402, "openai_key_missing", chat, stack.sdk(key))
    assert "/api/v1/tenants/acme/openai-key" in err.message
    assert not any(r.path == "/v1/chat/completions" for r in stack.fake.requests)


def test_invalid_key_is_marked_and_fails_fast(stack: Stack) -> None:
    key = stack.tenant("acme")
    client = stack.sdk(key)
    stack.fake.revoked.add(TENANT_KEY)
    err = expect(openai.APIStatusError, 402, "openai_key_invalid", chat, client)
    assert TENANT_KEY[8:20] not in str(err.body) and "Incorrect API key" not in err.message
    tenant = stack.admin.get("/api/v1/tenants/acme").json()
    assert tenant["openai_key"]["status"] == "invalid"
    events = stack.admin.get("/api/v1/tenants/acme/audit").json()["data"]
    assert (events[0]["action"], events[0]["actor"]) == ("openai_key.invalidated", "system")
    assert events[0]["key_hint"] == "sk-...7654"  # TENANT_KEY's hint, never the key

    upstream_calls = len(stack.fake.requests)
    expect(openai.APIStatusError, 402, "openai_key_invalid", chat, client)
    assert len(stack.fake.requests) == upstream_calls, "fast-fail must not reach the upstream"

    stack.register("acme", OTHER)
    chat(client)
    assert stack.fake.requests[-1].header("authorization") == f"Bearer {OTHER}"


def test_quota_exceeded(stack: Stack) -> None:
    key = stack.tenant("acme")
    stack.fake.no_quota.add(TENANT_KEY)
    err = expect(openai.APIStatusError, 402, "openai_quota_exceeded", chat, stack.sdk(key))
    assert "billing" in err.message
    assert stack.admin.get("/api/v1/tenants/acme").json()["openai_key"]["status"] == "active"


def test_rate_limit_passes_through(stack: Stack) -> None:
    key = stack.tenant("acme")
    err = expect(
        openai.RateLimitError, 429, "rate_limit_exceeded", chat, stack.sdk(key), "rate-limited"
    )
    assert err.response.headers["retry-after"] == "7"
    assert err.response.headers["x-ratelimit-reset-requests"] == "7s"
    assert err.response.headers["x-request-id"].startswith("up-req-")
    assert err.message.startswith("Error code: 429") and "Rate limit reached" in err.message


def test_upstream_unreachable(tmp_path: Path, master_key: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with Stack.sqlite(tmp_path, master_key, upstream=dead) as stack:
        key = stack.tenant("acme", tier="trial", key=None)  # platform fallback: no validation
        expect(openai.APIStatusError, 502, "upstream_unreachable", chat, stack.sdk(key))


def test_upstream_timeout(tmp_path: Path, master_key: str) -> None:
    with Stack.sqlite(
        tmp_path, master_key, yaml="upstream:\n  read_timeout_seconds: 0.5\n"
    ) as stack:
        key = stack.tenant("acme")
        expect(openai.APIStatusError, 504, "upstream_timeout", chat, stack.sdk(key), "slow")


def test_request_too_large(tmp_path: Path, master_key: str) -> None:
    with Stack.sqlite(
        tmp_path, master_key, yaml="limits:\n  max_body_bytes: 2000\n  max_upload_bytes: 2000\n"
    ) as stack:
        key = stack.tenant("acme")
        client = stack.sdk(key)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 5000}]
            )
        assert info.value.status_code == 413
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as info:
            client.files.create(file=("big.bin", b"x" * 5000), purpose="batch")
        assert info.value.status_code == 413
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "request_too_large"
        assert not any(r.path in ("/v1/files", "/v1/chat/completions") for r in stack.fake.requests)


def test_key_decryption_failed(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    key = stack.tenant("acme")
    engine = sqlalchemy.create_engine(stack.config.database_url)
    with engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "UPDATE tenants SET openai_api_key_encrypted = "
                "substr(openai_api_key_encrypted, 1, 40) || 'AAAA' || "
                "substr(openai_api_key_encrypted, 45)"
            )
        )
    engine.dispose()
    for app in stack.apps:
        app.runtime.store.invalidate_tenant("acme")
    expect(openai.InternalServerError, 500, "key_decryption_failed", chat, stack.sdk(key))
    assert "KEY DECRYPTION FAILED for tenant acme" in caplog.text
    assert TENANT_KEY not in caplog.text


def test_trial_fallback_and_platform_key_rejected(stack: Stack) -> None:
    key = stack.tenant("trial-co", tier="trial", key=None)
    client = stack.sdk(key)
    completion = chat(client)
    assert completion.choices[0].message.content == "Hello!"  # type: ignore[attr-defined]
    seen = stack.fake.requests[-1]
    assert seen.header("authorization") == f"Bearer {PLATFORM_KEY}"
    assert stack.usage(1)[-1]["key_source"] == "platform"

    # On the platform key, the caller may not choose an OpenAI organization or project.
    client.with_options(default_headers={"OpenAI-Organization": "org-x"}).models.list()
    assert stack.fake.requests[-1].header("openai-organization") is None

    stack.fake.revoked.add(PLATFORM_KEY)
    expect(openai.APIStatusError, 502, "platform_key_rejected", chat, client)


def test_trial_with_own_key_uses_it(stack: Stack) -> None:
    key = stack.tenant("trial-co", tier="trial")
    chat(stack.sdk(key))
    assert stack.fake.requests[-1].header("authorization") == f"Bearer {TENANT_KEY}"
    assert stack.usage(1)[-1]["key_source"] == "byok"


def test_unknown_routes_outside_v1(stack: Stack) -> None:
    key = stack.tenant("acme")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=stack.url + "/v2", api_key=key, max_retries=0).models.list()


def test_compressed_quota_error_is_still_recognised(stack: Stack) -> None:
    key = stack.tenant("acme")
    stack.fake.compress = True
    stack.fake.no_quota.add(TENANT_KEY)
    expect(openai.APIStatusError, 402, "openai_quota_exceeded", chat, stack.sdk(key))


def test_compressed_answers_still_count_tokens(stack: Stack) -> None:
    key = stack.tenant("trial-co", tier="trial", key=None)
    stack.fake.compress = True
    import httpx

    r = httpx.post(
        stack.url + "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "br, gzip"},
    )
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 18
    # The platform key's requests are asked for uncompressed answers, so usage is readable.
    assert stack.fake.requests[-1].header("accept-encoding") == "identity"
    assert stack.usage(1)[-1]["total_tokens"] == 18


def test_accept_encoding_narrowed_to_readable_codings(stack: Stack) -> None:
    import httpx

    key = stack.tenant("acme")
    stack.fake.compress = True
    r = httpx.post(
        stack.url + "/v1/embeddings",
        json={"model": "m", "input": "x"},
        headers={
            "Authorization": f"Bearer {key}",
            "Accept-Encoding": "br, gzip;q=0.9, zstd, deflate",
        },
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert stack.fake.requests[-1].header("accept-encoding") == "gzip;q=0.9, deflate"
    assert stack.usage(1)[-1]["total_tokens"] == 5  # read from the gzipped body
    stack.stream_raw(
        key, {"model": "m", "messages": [], "stream": True}, **{"Accept-Encoding": "gzip"}
    )
    assert stack.fake.requests[-1].header("accept-encoding") == "identity"


def test_chunked_upload_over_the_limit_is_413(tmp_path: Path, master_key: str) -> None:
    import httpx

    with Stack.sqlite(
        tmp_path, master_key, yaml="limits:\n  max_body_bytes: 100000\n  max_upload_bytes: 100000\n"
    ) as stack:
        key = stack.tenant("acme")

        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(50):
                yield b"x" * 10_000

        r = httpx.post(
            stack.url + "/v1/files",
            content=chunks(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        one = httpx.post(
            stack.url + "/v1/files",
            content=iter([b"y" * 150_000]),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert one.status_code == 413
        lines = stack.usage(2)
        assert [x["error_code"] for x in lines[-2:]] == ["request_too_large"] * 2


def test_unexpected_failure_is_an_openai_shaped_500(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    key = stack.tenant("acme")
    store = stack.apps[0].runtime.store

    async def broken(_key: str) -> None:
        raise RuntimeError("database exploded: " + key)

    store.principal_async = broken
    err = expect(openai.InternalServerError, 500, "internal_error", chat, stack.sdk(key))
    assert key not in str(err.body)
    assert "RuntimeError" in caplog.text and key not in caplog.text
    line = stack.usage(1)[-1]
    assert (line["status"], line["error_code"]) == (500, "internal_error")
