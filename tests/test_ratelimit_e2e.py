"""Rate limits end to end: the real proxy in front of the fake OpenAI, driven by the
official SDK.

- The SDK's own retry: a 429 from the proxy says when the request fits
  (`retry-after-ms`), the SDK waits that long and the retry goes through.
- TPM: a request is held at its estimate, then settled to its real usage.
- `byok-proxy serve --workers 2` with `REDIS_URL`: one bucket between the workers.

Timing: the limiter's clock cannot be stopped here, so every bound allows for what
the buckets drain in the time the test measures itself taking, and a step that needs
a bucket to be still full is repeated if the machine was too slow to get there in
time (fair only once the wait the proxy announced has passed, which the test checks).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from fake_openai import start_fake
from helpers import admin_headers, bearer
from prometheus_client.multiprocess import MultiProcessCollector
from servers import create_tenant, free_port, serve, serve_env, until
from stack import TENANT_KEY, Stack

SHARED_REDIS = "redis://127.0.0.1:6379/0"
RPM = 60  # a burst of 60, then a request drains every second
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Tenant:
    """A tenant of the stack with a rate limit, and the requests made as it so far
    (each one usage line, so the log's last lines are the last requests')."""

    stack: Stack
    key: str
    sent: int = 0
    chats_before: int = 0  # upstream chat calls before the last attempt (on_full_bucket)

    def limit(self, rate_limits: dict[str, int]) -> None:
        r = self.stack.admin.patch(
            "/api/v1/tenants/acme", json={"policy": {"rate_limits": rate_limits}}
        )
        assert r.status_code == 200, r.text

    def exhaust(self) -> tuple[float, float]:
        """GET /v1/models until the proxy refuses one: when that one was sent (monotonic)
        and the wait it announced (seconds)."""
        with httpx.Client(base_url=self.stack.url, headers=bearer(self.key)) as client:
            for _ in range(10 * RPM):
                sent_at = time.monotonic()
                r = client.get("/v1/models")
                self.sent += 1
                if r.status_code == 429:
                    return sent_at, int(r.headers["retry-after-ms"]) / 1000
                assert r.status_code == 200, r.text
        raise AssertionError("the proxy never refused a request")

    def on_full_bucket(self, call: Callable[[], Any]) -> Any:
        """Fill the requests bucket, then `call` (whose first attempt must meet a 429)."""
        for _ in range(5):
            refused_at, wait = self.exhaust()  # (refused after it was sent)
            # Upstream calls before this attempt: an earlier attempt admitted at once (a
            # slow machine let the bucket refill) reached the upstream too.
            self.chats_before = sum(r.path == CHAT for r in self.stack.upstream.requests)
            try:
                raw = call()
            except openai.RateLimitError as error:
                self.sent += 1
                return error
            self.sent += raw.retries_taken + 1
            if raw.retries_taken:
                return raw
            # Admitted at once: fair only if it reached the proxy after the announced wait.
            assert time.monotonic() - refused_at >= wait, "admitted before the announced wait"
        pytest.fail("five times the call did not reach the proxy within the announced wait")

    def last_lines(self, count: int) -> list[dict[str, Any]]:
        return self.stack.usage(self.sent)[-count:]


@pytest.fixture
def acme(tmp_path: Path, master_key: str) -> Iterator[Tenant]:
    with Stack.sqlite(tmp_path, master_key) as stack:
        yield Tenant(stack, stack.tenant("acme"))


def test_the_sdk_retries_after_the_proxys_retry_after(acme: Tenant) -> None:
    acme.limit({"rpm": RPM})
    sdk = acme.stack.sdk(acme.key).with_options(max_retries=2)

    def plain() -> Any:
        return sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)

    def streamed() -> Any:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text.startswith("tok0 ")
        return raw

    def async_plain() -> Any:
        async def go() -> Any:
            client = acme.stack.async_sdk(acme.key).with_options(max_retries=2)
            try:
                return await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=HI
                )
            finally:
                await client.close()

        return asyncio.run(go())

    for call in (plain, async_plain, streamed):
        raw = acme.on_full_bucket(call)
        assert raw.status_code == 200 and raw.retries_taken == 1, call.__name__
        # The proxy's own x-ratelimit-* replace the upstream's (the fake sends 5000).
        assert raw.headers.get_list("x-ratelimit-limit-requests") == [str(RPM)]
        lines = acme.last_lines(2)  # the proxy answered 429, then 200 to the retry
        assert [(x["path"], x["status"]) for x in lines] == [(CHAT, 429), (CHAT, 200)]
        assert lines[0]["error_code"] == "rate_limit_exceeded"
        assert sum(r.path == CHAT for r in acme.stack.upstream.requests) == acme.chats_before + 1


def test_without_retries_the_caller_sees_openais_429(acme: Tenant) -> None:
    acme.limit({"rpm": RPM})
    sdk = acme.stack.sdk(acme.key)  # max_retries=0
    error = acme.on_full_bucket(lambda: sdk.models.with_raw_response.list())
    assert isinstance(error, openai.RateLimitError)
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert (
        f"Rate limit reached for tenant acme on requests per min (RPM): Limit {RPM}, Used {RPM}, "
        "Requested 1. Please try again in "
    ) in error.message
    headers = error.response.headers
    assert headers["retry-after"] == "1"
    assert 0 < int(headers["retry-after-ms"]) <= 1000
    assert headers["x-ratelimit-limit-requests"] == str(RPM)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in headers  # no tpm set
    assert acme.last_lines(1)[0]["status"] == 429


def test_tpm_holds_the_estimate_then_settles_to_the_usage(acme: Tenant) -> None:
    tpm = 1000  # drains 1000/60 tokens a second
    acme.limit({"tpm": tpm})
    sdk = acme.stack.sdk(acme.key)

    def chat(max_tokens: int) -> Any:
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, max_tokens=max_tokens
        )
        acme.sent += 1
        return raw

    first = chat(600)  # held: its body / 4 + 600
    admitted_at = time.monotonic()
    estimate = tpm - int(first.headers["x-ratelimit-remaining-tokens"])
    assert 600 < estimate < 700
    assert first.parse().usage.total_tokens == 18  # what the fake upstream reports
    # Held at the estimate, a second one fits only once that much has drained:
    drain_only = (2 * estimate - tpm) * 60 / tpm
    while True:  # settled to 18 tokens (off the response's path: poll a moment)
        try:
            second = chat(600)
            break
        except openai.RateLimitError:
            acme.sent += 1
            assert time.monotonic() - admitted_at < drain_only / 2, "the usage never settled"
            time.sleep(0.05)
    left = int(second.headers["x-ratelimit-remaining-tokens"])
    assert tpm - 18 - estimate <= left  # only the first's real usage stayed in the bucket

    # A stream held open keeps its estimate in the bucket (the fake's "hold" model; it
    # fits whether or not the second has settled yet) while one more request asks for
    # the whole tpm (its estimate, capped).
    held_at = time.monotonic()
    held = sdk.chat.completions.create(model="hold", messages=HI, max_tokens=300, stream=True)
    chunks = iter(held)
    next(chunks)  # admitted and streaming
    acme.sent += 1
    with pytest.raises(openai.RateLimitError) as refused:
        chat(5000)
    acme.sent += 1
    drained = math.ceil(tpm * (time.monotonic() - held_at) / 60)
    error = refused.value
    assert error.code == "rate_limit_exceeded" and error.type == "tokens"
    assert f"on tokens per min (TPM): Limit {tpm}" in error.message
    assert f"Requested {tpm}. Please try again in " in error.message
    headers = error.response.headers
    assert headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert int(headers["x-ratelimit-remaining-tokens"]) <= tpm - 300 + drained
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    assert 1 <= int(headers["retry-after"]) <= 60
    assert "x-ratelimit-limit-requests" not in headers  # no rpm set
    acme.stack.upstream.release.set()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    lines = acme.last_lines(2)  # the refusal, then the held stream's end
    assert [x["status"] for x in lines] == [429, 200]
    assert lines[0]["error_code"] == "rate_limit_exceeded" and lines[1]["model"] == "hold"


def _shared_redis() -> str:
    try:
        redis.Redis.from_url(SHARED_REDIS, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.fail(f"the machine's Redis ({SHARED_REDIS}) does not answer: {exc!r}")
    return SHARED_REDIS


def served_by(prom: Path, tenant: str) -> dict[int, float]:
    """Requests of `tenant` each worker has answered, by pid (prometheus' files)."""
    served: dict[int, float] = {}
    for path in prom.glob("counter_*.db"):
        metrics = MultiProcessCollector.merge([str(path)], accumulate=True)
        count = sum(
            s.value
            for m in metrics
            for s in m.samples
            if s.name == "byok_requests_total" and s.labels.get("tenant") == tenant
        )
        if count:
            served[int(path.stem.rsplit("_", 1)[1])] = count
    return served


def test_two_workers_share_one_bucket_through_redis(tmp_path: Path, master_key: str) -> None:
    url = _shared_redis()
    prefix = f"byok-test:{uuid.uuid4().hex}:"
    rpm = 10  # a request drains every 6 s
    fake, fake_server = start_fake()
    yaml = f"rate_limits:\n  key_prefix: '{prefix}'\n  fail: closed\n"  # no silent fallback
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'w.db'}", fake.base_url, yaml)
    env["REDIS_URL"] = url
    prom = tmp_path / "prom"
    port = free_port()
    statuses: list[int] = []
    try:
        with fake_server, serve(["--workers", "2"], env, tmp_path, port, tmp_path / "serve.log"):
            base = f"http://127.0.0.1:{port}"
            key = create_tenant(base, "shared", openai_key=TENANT_KEY)
            policy = {"policy": {"rate_limits": {"rpm": rpm}}}
            r = httpx.patch(f"{base}/api/v1/tenants/shared", json=policy, headers=admin_headers())
            assert r.status_code == 200, r.text
            upstream_before = len(fake.requests)  # registering the key called the upstream

            def one(_: int) -> int:
                with httpx.Client(timeout=20) as client:  # a new connection each time
                    return client.get(base + "/v1/models", headers=bearer(key)).status_code

            started = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                while len(statuses) < 3 * rpm or len(served_by(prom, "shared")) < 2:
                    assert len(statuses) < 100 * rpm, "one worker answered every request"
                    statuses += pool.map(one, range(8))
            elapsed = time.monotonic() - started
            until(lambda: sum(served_by(prom, "shared").values()) == len(statuses), 10, "metrics")
        workers = served_by(prom, "shared")
        assert len(workers) == 2 and all(workers.values())  # both answered some
        assert set(statuses) == {200, 429}
        admitted = statuses.count(200)
        assert rpm <= admitted <= rpm + math.floor(rpm * elapsed / 60), (admitted, elapsed)
        assert len(fake.requests) - upstream_before == admitted  # no 429 went upstream
    finally:
        client = redis.Redis.from_url(url)
        for name in client.scan_iter(match=prefix + "*"):
            client.delete(name)
        client.close()
