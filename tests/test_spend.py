"""Spend control end to end: cost on usage lines, the usage API, budgets, rate limits,
model allow-lists and key expiry, with the real proxy, the fake OpenAI and the SDK."""

from __future__ import annotations

import asyncio
import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from servers import until
from stack import Stack

from proxy.prices import load_prices

ROOT = Path(__file__).resolve().parent.parent
_PRICES = yaml.safe_load((ROOT / "config.yaml").read_text())["prices"]
_PRICES["models"]["pause"] = dict(_PRICES["models"]["gpt-4o-mini"])  # the fake's slow model
PRICES_YAML = yaml.safe_dump({"prices": _PRICES})
TABLE = load_prices(yaml.safe_load(PRICES_YAML)["prices"])


@pytest.fixture
def spend_stack(tmp_path: Path, master_key: str) -> Any:
    with Stack.sqlite(tmp_path, master_key, yaml=PRICES_YAML) as s:
        yield s


@pytest.fixture
def budget_stack(tmp_path: Path, master_key: str, database_url: str) -> Any:
    """The stack on SQLite and on PostgreSQL (budgets are counted in the database)."""
    with Stack(tmp_path, database_url, master_key, yaml=PRICES_YAML) as s:
        yield s


def _expected(model: str, prompt: int, completion: int) -> float:
    price = TABLE.lookup(model)
    assert price is not None and price.input is not None
    return (prompt * price.input + completion * (price.output or 0)) / 1e6


def _policy(stack: Stack, tid: str, policy: dict[str, Any], key_id: str | None = None) -> None:
    path = f"/api/v1/tenants/{tid}" + (f"/api-keys/{key_id}" if key_id else "")
    r = stack.admin.patch(path, json={"policy": policy})
    assert r.status_code == 200, r.text
    assert r.json()["policy"]["allowed_models"] == policy.get("allowed_models")


def _key_id(stack: Stack, tid: str) -> str:
    keys = stack.admin.get(f"/api/v1/tenants/{tid}/api-keys").json()["data"]
    assert len(keys) == 1 and "api_key" not in keys[0] and "key_hash" not in keys[0]
    return str(keys[0]["id"])


def test_cost_and_key_id_on_every_kind_of_call(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    key_id = _key_id(spend_stack, "acme")
    sdk = spend_stack.sdk(key)
    sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    for _ in sdk.chat.completions.create(
        model="gpt-4o-mini-2024-07-18", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        pass
    sdk.responses.create(model="gpt-4.1", input="hi")
    sdk.embeddings.create(model="text-embedding-3-small", input="hi")
    sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    lines = spend_stack.usage(5)
    by_model = {line["model"]: line for line in lines}
    assert all(line["api_key_id"] == key_id for line in lines)
    for model, line in by_model.items():
        if model == "no-such-model":
            assert line["cost_usd"] is None  # unknown: never a guess
            continue
        family = "gpt-4o-mini" if model.startswith("gpt-4o-mini") else model
        expected = _expected(family, line["prompt_tokens"], line["completion_tokens"] or 0)
        assert line["cost_usd"] == pytest.approx(expected, rel=1e-9, abs=1e-12), model
        assert line["cost_usd"] > 0


def test_cached_input_is_priced_at_the_cached_rate(spend_stack: Stack) -> None:
    """Prompt-cache hits (the fake reports 8 of the prompt cached when the request names a
    prompt_cache_key) cost the cached-input price: plain, streamed and Responses calls."""
    sdk = spend_stack.sdk(spend_stack.tenant("acme"))
    hi = [{"role": "user", "content": "hi"}]
    sdk.chat.completions.create(model="gpt-4o-mini", messages=hi, prompt_cache_key="k")
    for _ in sdk.chat.completions.create(
        model="gpt-4o-mini", messages=hi, prompt_cache_key="k", stream=True
    ):
        pass
    sdk.responses.create(model="gpt-4.1", input="hi", prompt_cache_key="k")
    for line in spend_stack.usage(3):
        price = TABLE.lookup(line["model"])
        assert price is not None and price.input and price.cached_input and price.output
        cached, uncached = 8, line["prompt_tokens"] - 8
        expected = (
            uncached * price.input
            + cached * price.cached_input
            + line["completion_tokens"] * price.output
        ) / 1e6
        assert line["cost_usd"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert line["cost_usd"] < _expected(
            line["model"], line["prompt_tokens"], line["completion_tokens"]
        )


def test_usage_api_totals_equal_the_usage_log(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    other = spend_stack.tenant("other")
    sdk = spend_stack.sdk(key)
    for model in ("gpt-4o-mini", "gpt-4o-mini", "gpt-4.1"):
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    spend_stack.sdk(other).embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.AuthenticationError):
        spend_stack.sdk("byok-wrong").models.list()
    lines = spend_stack.usage(5)
    mine = [x for x in lines if x["tenant_id"] == "acme"]
    deadline = time.monotonic() + 20
    while True:  # the ledger is written every second
        report = spend_stack.admin.get("/api/v1/tenants/acme/usage?group_by=model").json()
        if report["total"]["requests"] == len(mine) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    total = report["total"]
    assert total["requests"] == len(mine) == 3
    assert total["prompt_tokens"] == sum(x["prompt_tokens"] for x in mine)
    assert total["completion_tokens"] == sum(x["completion_tokens"] for x in mine)
    assert total["cost_usd"] == pytest.approx(sum(x["cost_usd"] for x in mine), abs=1e-9)
    assert {row["model"] for row in report["data"]} == {"gpt-4o-mini", "gpt-4.1"}
    # The tenant's own key sees its own usage, and another tenant's is a 404.
    own = spend_stack.admin.get(
        "/api/v1/tenants/acme/usage", headers={"Authorization": f"Bearer {key}"}
    )
    assert own.status_code == 200 and own.json()["total"]["requests"] == 3
    theirs = spend_stack.admin.get(
        "/api/v1/tenants/other/usage", headers={"Authorization": f"Bearer {key}"}
    )
    assert theirs.status_code == 404
    everyone = spend_stack.admin.get("/api/v1/usage?group_by=day").json()
    assert {row["tenant_id"] for row in everyone["data"]} == {"acme", "other"}
    bad = spend_stack.admin.get("/api/v1/usage?from=yesterday")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "from"


def test_model_allow_list_refuses_before_the_upstream(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    _policy(spend_stack, "acme", {"allowed_models": ["gpt-4o-mini", "gpt-4.1*"]})
    sdk = spend_stack.sdk(key)
    before = len(spend_stack.upstream.requests)
    for model in ("gpt-4o", "o1", "gpt-4o-mini-evil"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert refused.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):  # multipart: the form's model field
        sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", io.BytesIO(b"RIFF")))
    with pytest.raises(openai.PermissionDeniedError):  # a batch may run any model
        sdk.batches.create(
            input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert len(spend_stack.upstream.requests) == before  # nothing reached the upstream
    sdk.chat.completions.create(model="GPT-4o-mini", messages=[{"role": "user", "content": "x"}])
    sdk.chat.completions.create(model="gpt-4.1-nano", messages=[{"role": "user", "content": "x"}])
    assert len(spend_stack.upstream.requests) == before + 2


_BOUNDARY = "b0undary"
_WAV = b"RIFF" + b"\0" * 64
_NO_MODEL_READABLE = [
    # (path, content type, body): each runs a model the proxy cannot read
    ("/v1/chat/completions", "application/json", b'{"model": "gpt-4o", "messages": [}'),
    ("/v1/chat/completions", "application/json", b'{"model": ["gpt-4o"], "messages": []}'),
    ("/v1/images/generations", "application/json", b'{"prompt": "a cat"}'),
    ("/v1/threads/runs", "application/json", b'{"assistant_id": "asst_1"}'),
    ("/v1/evals/ev_1/runs", "application/json", b'{"data_source": {"model": "o3"}}'),
    ("/v1/realtime/sessions", "application/json", b"{}"),
    # a query-string model names nothing outside Realtime; batches and eval runs never pass
    ("/v1/images/generations?model=gpt-4o-mini", "application/json", b'{"prompt": "a"}'),
    ("/v1/threads/runs?model=gpt-4o-mini", "application/json", b'{"assistant_id": "a"}'),
    ("/v1/batches?model=gpt-4o-mini", "application/json", b"{}"),
    ("/v1/batches", "application/json", b'{"model": "gpt-4o-mini"}'),
    ("/v1/evals/ev_1/runs?model=gpt-4o-mini", "application/json", b'{"model": "gpt-4o-mini"}'),
    ("/v1/chat/completions?model=o3", "application/json", b'{"model": "gpt-4o-mini"}'),
    (
        "/v1/audio/transcriptions",
        f"multipart/form-data; boundary={_BOUNDARY}; charset=utf-16",
        (
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            f"whisper-1\r\n--{_BOUNDARY}--\r\n"
        ).encode(),
    ),
    (
        "/v1/audio/transcriptions",
        f"multipart/form-data; boundary={_BOUNDARY}",
        (
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"\r\n{'x' * (2 << 20)}\r\n--{_BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--{_BOUNDARY}--\r\n'
        ).encode(),
    ),
]


@pytest.mark.parametrize("path,content_type,body", _NO_MODEL_READABLE)
def test_an_allow_list_refuses_what_it_cannot_read(
    spend_stack: Stack, path: str, content_type: str, body: bytes
) -> None:
    key = spend_stack.tenant("acme")
    _policy(spend_stack, "acme", {"allowed_models": ["gpt-4o-mini"]})
    before = len(spend_stack.upstream.requests)
    r = httpx.post(
        spend_stack.url + path,
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=20,
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "model_not_allowed"
    assert len(spend_stack.upstream.requests) == before


def test_an_allow_list_lets_model_free_calls_through(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    _policy(spend_stack, "acme", {"allowed_models": ["gpt-4o-mini"]})
    sdk = spend_stack.sdk(key)
    before = len(spend_stack.upstream.requests)
    sdk.models.list()
    sdk.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    for path in ("/moderations", "/threads"):  # the fake answers these 404
        with pytest.raises(openai.NotFoundError):
            sdk.post(path, body={"input": "hello"}, cast_to=object)
    assert [r.path for r in spend_stack.upstream.requests[before:]] == [
        "/v1/models",
        "/v1/files",
        "/v1/moderations",
        "/v1/threads",
    ]


def test_a_keys_own_allow_list_and_expiry(spend_stack: Stack) -> None:
    spend_stack.tenant("acme")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    r = spend_stack.admin.post(
        "/api/v1/tenants/acme/api-keys",
        json={"name": "ci", "policy": {"allowed_models": ["gpt-4.1"]}},
    )
    assert r.status_code == 201 and r.json()["name"] == "ci"
    scoped = r.json()["api_key"]
    with pytest.raises(openai.PermissionDeniedError):
        spend_stack.sdk(scoped).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    r = spend_stack.admin.post("/api/v1/tenants/acme/api-keys", json={"expires_at": past})
    assert r.status_code == 201
    with pytest.raises(openai.AuthenticationError) as expired:
        spend_stack.sdk(r.json()["api_key"]).models.list()
    assert expired.value.code == "proxy_key_expired"
    unknown = spend_stack.admin.post("/api/v1/tenants/acme/api-keys", json={"nmae": "typo"})
    assert unknown.status_code == 422
    events = spend_stack.admin.get("/api/v1/tenants/acme/audit").json()["data"]
    assert [e["action"] for e in events].count("api_key.issued") == 3


def test_hard_budget_refuses_with_402_and_bounded_overshoot(budget_stack: Stack) -> None:
    key = budget_stack.tenant("acme")
    limit = 0.00002  # about three and a half requests of 11 + 7 gpt-4o-mini tokens
    _policy(budget_stack, "acme", {"budgets": [{"period": "day", "limit_usd": limit}]})
    sdk = budget_stack.sdk(key)
    made = 0
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(20):
            sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
            made += 1
    assert refused.value.status_code == 402 and refused.value.code == "budget_exceeded"
    assert (
        "daily budget of tenant acme" in refused.value.message
        and "resets at" in refused.value.message
    )
    chats = [r for r in budget_stack.upstream.requests if r.path == "/v1/chat/completions"]
    assert len(chats) == made >= 3  # the refusal made no upstream call
    spent = sum(x["cost_usd"] or 0 for x in budget_stack.usage(made + 1))
    one = _expected("gpt-4o-mini", 11, 7)
    assert limit - one < spent <= limit + one  # used up, and over by less than one request


async def test_concurrent_requests_overshoot_no_more_than_the_bound(budget_stack: Stack) -> None:
    key = budget_stack.tenant("acme")
    limit = 0.0001  # about 17 requests
    _policy(budget_stack, "acme", {"budgets": [{"period": "day", "limit_usd": limit}]})
    client = budget_stack.async_sdk(key)

    async def one() -> int:
        try:
            await client.chat.completions.create(
                model="pause", messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    before = [await one() for _ in range(14)]  # the budget nearly used: ~3 requests left
    assert before == [200] * 14
    statuses = await asyncio.gather(*(one() for _ in range(50)))
    await client.close()
    assert set(statuses) == {200, 402}
    statuses += before
    lines = budget_stack.usage(64)
    spent = sum(x["cost_usd"] or 0 for x in lines)
    # README bound: one request's estimate per worker (body under 200 bytes + max_tokens,
    # at gpt-4o-mini's dearest rate); here one worker.
    estimate = (200 + 10) * 0.60 / 1e6
    # (Requests in flight hold their estimates, so under this much concurrency most are
    # refused early; the bound is on the other side.)
    assert 0 < spent <= limit + estimate
    assert statuses.count(200) == sum(1 for x in lines if x["status"] == 200)


def test_a_hard_budget_refuses_what_it_cannot_meter(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    sdk = spend_stack.sdk(key)
    hi = [{"role": "user", "content": "hi"}]
    sdk.chat.completions.create(model="gpt-4o-mini", messages=hi, service_tier="flex")
    assert spend_stack.usage(1)[0]["cost_usd"] is None  # flex is not priced in the table
    _policy(spend_stack, "acme", {"budgets": [{"period": "day", "limit_usd": 10.0}]})
    before = len(spend_stack.upstream.requests)
    for extra in (
        {"service_tier": "priority"},
        {"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "web_search"}]},
        {"web_search_options": {}},
    ):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=hi, extra_body=extra)
        assert refused.value.code == "endpoint_not_metered"
    with pytest.raises(openai.PermissionDeniedError):
        sdk.responses.create(model="gpt-4o-mini", input="hi", tools=[{"type": "file_search"}])  # type: ignore[list-item]
    assert len(spend_stack.upstream.requests) == before
    sdk.chat.completions.create(model="gpt-4o-mini", messages=hi, tools=[])
    lines = spend_stack.usage(6)
    assert [x["status"] for x in lines] == [200, 403, 403, 403, 403, 200]
    assert lines[-1]["cost_usd"] is not None and len(spend_stack.upstream.requests) == before + 1


def test_soft_budget_warns_audits_and_lets_calls_through(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    _policy(
        spend_stack,
        "acme",
        {"budgets": [{"period": "month", "limit_usd": 0.000001, "hard": False}]},
    )
    sdk = spend_stack.sdk(key)
    warned = None
    for _ in range(3):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.status_code == 200
        warned = raw.headers.get("x-byok-budget-warning") or warned
    assert warned is not None and "soft budget" in warned
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events = spend_stack.admin.get("/api/v1/tenants/acme/audit").json()["data"]
        crossed = [e for e in events if e["action"] == "budget.soft_exceeded"]
        if crossed:
            break
        time.sleep(0.1)
    assert len(crossed) == 1 and crossed[0]["actor"] == "system"


def test_rpm_limit_answers_429_in_openais_shape(spend_stack: Stack) -> None:
    key = spend_stack.tenant("acme")
    _policy(spend_stack, "acme", {"rate_limits": {"rpm": 2}})
    sdk = spend_stack.sdk(key)
    for _ in range(2):
        sdk.models.list()
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.models.list()
    headers = limited.value.response.headers
    assert limited.value.code == "rate_limit_exceeded"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 30  # one request drains in 60 / rpm s
    assert 1 <= int(headers["retry-after-ms"]) <= 30_000
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    lines = spend_stack.usage(3)
    assert lines[-1]["status"] == 429 and lines[-1]["error_code"] == "rate_limit_exceeded"
    _policy(spend_stack, "acme", {"rate_limits": {"rpm": 100}})  # applies to the next call
    assert sdk.models.list().data


def _redis_yaml(prefix: str, fail: str = "open") -> str:
    return PRICES_YAML + f"rate_limits:\n  key_prefix: '{prefix}'\n  fail: {fail}\n"


def _shared_redis_or_skip() -> str:
    import os
    import socket

    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("the machine's Redis (127.0.0.1:6379) is required in CI")
        pytest.skip("no Redis on 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/0"


def _alternate(s: Stack, key: str, count: int) -> int:
    """`count` requests alternating between two replicas; how many were admitted."""
    ok = 0
    for i in range(count):
        try:
            s.sdk(key, replica=i % 2).models.list()
            ok += 1
        except openai.RateLimitError:
            pass
    return ok


def test_two_replicas_share_one_limit_through_redis(tmp_path: Path, master_key: str) -> None:
    import uuid

    import redis

    url = _shared_redis_or_skip()
    prefix = f"byok-test:{uuid.uuid4().hex}:"
    try:
        with Stack.sqlite(tmp_path, master_key, yaml=_redis_yaml(prefix), REDIS_URL=url) as s:
            s.add_replica()
            key = s.tenant("acme")
            _policy(s, "acme", {"rate_limits": {"rpm": 5}})
            started = time.monotonic()
            ok = _alternate(s, key, 12)
            refill = int(5 * (time.monotonic() - started) / 60)  # one more each 12 s
            assert 5 <= ok <= 5 + refill  # one limit between the two, not five each
    finally:
        client = redis.Redis.from_url(url)
        for name in client.scan_iter(match=prefix + "*"):
            client.delete(name)
        client.close()


def test_redis_stopped_mid_run_changes_nothing_under_fail_open(
    tmp_path: Path, master_key: str
) -> None:
    import shutil

    from servers import free_port
    from test_ratelimit import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port())
    asyncio.run(server.start())
    try:
        yaml_text = _redis_yaml("byok-test-own:")
        with Stack.sqlite(tmp_path, master_key, yaml=yaml_text, REDIS_URL=server.url) as s:
            key = s.tenant("acme")
            _policy(s, "acme", {"rate_limits": {"rpm": 1000, "tpm": 10_000_000}})
            sdk = s.sdk(key)
            for _ in range(3):
                sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            server.kill()  # our own redis-server, by its PID
            for _ in range(5):
                sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            metrics = httpx_get(s.url + "/metrics")
            assert "byok_rate_limiter_redis_up 0.0" in metrics
            assert all(x["status"] == 200 for x in s.usage(8))
    finally:
        server.kill()


def httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10).text


def test_deleting_a_tenant_does_not_reset_its_budget_or_history(spend_stack: Stack) -> None:
    """The money was spent: a tenant deleted and re-created under its id within the
    period is still over its budget, and the ledger keeps its lines (README)."""
    hi = [{"role": "user", "content": "hi"}]
    key = spend_stack.tenant("acme")
    _policy(spend_stack, "acme", {"budgets": [{"period": "day", "limit_usd": 0.00002}]})
    sdk = spend_stack.sdk(key)
    made = 0
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(20):
            sdk.chat.completions.create(model="gpt-4o-mini", messages=hi)
            made += 1
    assert refused.value.code == "budget_exceeded"
    spend_stack.usage(made + 1)

    def ledger_requests() -> int:
        return int(spend_stack.admin.get("/api/v1/usage").json()["total"]["requests"])

    until(lambda: ledger_requests() == made + 1, 10, "the ledger write")
    assert spend_stack.admin.delete("/api/v1/tenants/acme").status_code == 204
    key = spend_stack.tenant("acme")
    _policy(spend_stack, "acme", {"budgets": [{"period": "day", "limit_usd": 0.00002}]})
    with pytest.raises(openai.APIStatusError) as again:
        spend_stack.sdk(key).chat.completions.create(model="gpt-4o-mini", messages=hi)
    assert again.value.code == "budget_exceeded"
    assert ledger_requests() >= made + 1
