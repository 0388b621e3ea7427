"""Counts you can bill by: the trial allowance and the usage line under concurrency,
disconnects, odd casing, decoy fields and huge events.

The real proxy runs in front of the fake OpenAI (18 tokens per chat call, 13 per
Responses call, 5 per embedding). The allowance row is read from the database.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy
from fake_openai import USAGE
from stack import Stack

from proxy.platform import estimate_tokens


def allowance_row(stack: Stack, tenant_id: str, timeout: float = 10) -> tuple[int, int, int]:
    """(requests, tokens, reserved) of the tenant's allowance today, once nothing is reserved
    (a request settles just after its last byte is sent) or `timeout` passed."""
    engine = sqlalchemy.create_engine(stack.config.database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                row = conn.execute(
                    sqlalchemy.text(
                        "SELECT requests, tokens, reserved FROM trial_allowance "
                        "WHERE tenant_id = :t"
                    ),
                    {"t": tenant_id},
                ).first()
            found = (row[0], row[1], row[2]) if row else (0, 0, 0)
            if found[2] == 0 or time.monotonic() > deadline:
                return found
            time.sleep(0.02)
    finally:
        engine.dispose()


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_forty_concurrent_trial_requests_stay_within_the_tokens(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    """40 at once (each in flight 0.3 s) cannot spend more than the day's tokens: each
    reserves before it is sent, so the 500-token day admits only what its reservations fit."""
    yaml = "tiers:\n  trial:\n    daily_tokens: 500\n"
    with Stack(tmp_path, database_url, master_key, yaml=yaml) as stack:
        key = stack.tenant("trial-co", tier="trial", key=None)
        client = openai.AsyncOpenAI(
            base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30
        )

        async def one() -> str:
            try:
                await client.chat.completions.create(model="pause", messages=[], max_tokens=1)
                return "ok"
            except openai.APIStatusError as exc:
                assert exc.status_code == 402, exc.body
                assert isinstance(exc.body, dict) and exc.body["code"] == "trial_quota_exceeded"
                return "refused"

        async def all_at_once() -> list[str]:
            try:
                return await asyncio.gather(*(one() for _ in range(40)))
            finally:
                await client.close()

        outcomes = asyncio.run(all_at_once())
        served = sum(r.path == "/v1/chat/completions" for r in stack.fake.requests)
        assert outcomes.count("ok") == served >= 1
        requests, tokens, reserved = allowance_row(stack, "trial-co")
        assert tokens == 18 * served <= 500, (served, tokens)
        assert reserved == 0 and requests == served
        assert outcomes.count("refused") >= 40 - 500 // 18


def test_allowance_rows_are_per_tenant(tmp_path: Path, master_key: str) -> None:
    """Tenant A spending its tokens does not touch tenant B's allowance."""
    yaml = "tiers:\n  trial:\n    daily_tokens: 200\n"
    with Stack.sqlite(tmp_path, master_key, yaml=yaml) as stack:
        a = stack.sdk(stack.tenant("trial-a", tier="trial", key=None))
        b = stack.sdk(stack.tenant("trial-b", tier="trial", key=None))
        a.chat.completions.create(model="m", messages=[], max_tokens=1)
        b.chat.completions.create(model="m", messages=[], max_tokens=1)
        assert allowance_row(stack, "trial-a")[1] == 18
        assert allowance_row(stack, "trial-b")[1] == 18


def test_a_streamed_platform_request_is_charged_its_usage(stack: Stack) -> None:
    key = stack.tenant("trial-co", tier="trial", key=None)
    chunks = list(stack.sdk(key).chat.completions.create(model="m", messages=[], stream=True))
    assert chunks and all(c.usage is None for c in chunks)  # the usage chunk stays hidden
    assert allowance_row(stack, "trial-co")[1:] == (18, 0)
    line = stack.usage(1)[-1]
    assert (line["key_source"], line["total_tokens"]) == ("platform", 18)


def _read_until(r: httpx.Response, marker: bytes) -> bytes:
    received = b""
    for block in r.iter_raw():
        received += block
        if marker in received:
            break
    return received


@pytest.mark.parametrize("tier", ["trial", "pro"])
def test_a_client_that_leaves_after_the_usage_pays_it(stack: Stack, tier: str) -> None:
    """The upstream sent its usage and [DONE], then kept the connection open; the client
    left. The usage line (and, on the platform key, the allowance) shows the real usage."""
    key = stack.tenant("co", tier=tier, key=None if tier == "trial" else "sk-" + "t" * 40)
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=chat_body(model="linger", stream=True),
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        received = _read_until(r, b"[DONE]")
    assert b'"usage":{' not in received  # the client did not ask: it never sees the chunk
    assert stack.fake.stream_closed.wait(5)
    line = stack.usage(1)[-1]
    assert line["client_disconnected"] is True
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
        USAGE["total_tokens"],
    )
    if tier == "trial":
        assert allowance_row(stack, "co")[1:] == (18, 0)


def test_a_client_that_leaves_before_the_usage_pays_the_reservation(stack: Stack) -> None:
    key = stack.tenant("trial-co", tier="trial", key=None)
    body = chat_body(model="endless", stream=True, max_tokens=50)
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        _read_until(r, b"x")
    assert stack.fake.stream_closed.wait(5)
    line = stack.usage(1)[-1]
    assert line["client_disconnected"] is True and line["total_tokens"] is None
    sent = stack.fake.requests[-1].body  # what the proxy reserved for: the body it sent
    expected = estimate_tokens("/v1/chat/completions", body, len(sent), 4096)
    assert expected == len(sent) + 50
    assert allowance_row(stack, "trial-co")[1:] == (expected, 0)


def test_json_content_type_in_any_case_asks_for_usage(stack: Stack) -> None:
    key = stack.tenant("acme")
    r, raw = stack.stream_raw(
        key, chat_body(stream=True), **{"Content-Type": "Application/JSON; Charset=UTF-8"}
    )
    assert r.status_code == 200 and b"[DONE]" in raw and b'"usage":{' not in raw
    assert stack.fake.requests[-1].json["stream_options"] == {"include_usage": True}
    assert stack.usage(1)[-1]["total_tokens"] == 18


@pytest.mark.parametrize(
    "decoy", [{"metadata": {"tag": "usage"}}, {"user": "usage"}, {"metadata": {"usage": "x"}}]
)
def test_responses_usage_is_not_hidden_by_a_decoy_field(
    stack: Stack, decoy: dict[str, Any]
) -> None:
    key = stack.tenant("acme")
    reply = stack.sdk(key).responses.create(model="gpt-4o-mini", input="hi", **decoy)
    assert reply.usage is not None
    line = stack.usage(1)[-1]
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (9, 4, 13)


def test_usage_of_huge_events_is_read(stack: Stack) -> None:
    """A 3 MiB `response.completed` (an image) and a 3 MiB chat chunk: usage counted, bytes
    passed exactly."""
    key = stack.tenant("acme")
    events = list(stack.sdk(key).responses.create(model="huge", input="draw", stream=True))
    assert events[-1].type == "response.completed"
    r, raw = stack.stream_raw(key, chat_body(model="huge", stream=True))
    assert r.status_code == 200 and len(raw) > 3 * 1024 * 1024
    upstream = stack.fake.raw_streams[-1]
    kept = [e for e in upstream.split(b"\n\n") if b'"choices":[]' not in e]
    assert raw == b"\n\n".join(kept)  # all but the usage-only chunk, byte for byte
    lines = stack.usage(2)
    assert [line["total_tokens"] for line in lines[-2:]] == [13, 18]


def test_gzip_answers_are_counted(stack: Stack) -> None:
    key = stack.tenant("acme")
    stack.fake.compress = True
    r = httpx.post(
        stack.url + "/v1/chat/completions",
        json=chat_body(),
        headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "gzip"},
    )
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert stack.usage(1)[-1]["total_tokens"] == 18


def test_only_the_usage_only_chunk_is_cut(stack: Stack) -> None:
    """A content chunk that also carries usage reaches the client whole."""
    key = stack.tenant("acme")
    r, raw = stack.stream_raw(key, chat_body(model="usage-in-last", stream=True))
    assert raw == stack.fake.raw_streams[-1]
    assert b'"finish_reason":"stop"' in raw and b'"usage":{' in raw
    assert stack.usage(1)[-1]["total_tokens"] == 18


@pytest.mark.parametrize("sdk", ["sync", "async"])
def test_a_sized_stream_with_its_usage_chunk_cut_arrives_whole(stack: Stack, sdk: str) -> None:
    """The upstream sent Content-Length; the proxy cut a chunk, so it must not pass it on."""
    key = stack.tenant("acme")
    if sdk == "sync":
        chunks = list(
            stack.sdk(key).chat.completions.create(model="sized", messages=[], stream=True)
        )
    else:

        async def run() -> list[Any]:
            client = stack.async_sdk(key)
            try:
                stream = await client.chat.completions.create(
                    model="sized", messages=[], stream=True
                )
                return [c async for c in stream]
            finally:
                await client.close()

        chunks = asyncio.run(run())
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    r, raw = stack.stream_raw(key, chat_body(model="sized", stream=True))
    assert "content-length" not in r.headers
    assert raw.endswith(b"data: [DONE]\n\n") and b'"choices":[]' not in raw
    assert [line["total_tokens"] for line in stack.usage(2)] == [18, 18]
