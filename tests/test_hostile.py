"""Hostile input against a real `byok-proxy serve`: nothing a caller sends grows the
proxy's state, holds its event loop, or gets a 500."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from fake_openai import start_fake
from helpers import ADMIN_TOKEN, bearer
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, serve, serve_env
from stack import PLATFORM_KEY, TENANT_KEY, Stack

from proxy.routes import OTHER, TEMPLATES


@pytest.fixture
def served(tmp_path: Path, master_key: str) -> Iterator[tuple[str, Path]]:
    """One `byok-proxy serve` worker on SQLite in front of the fake; (url, tmp_path)."""
    fake, server = start_fake()
    with server:
        env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", fake.base_url)
        env.pop("PROMETHEUS_MULTIPROC_DIR")
        port = free_port()
        with serve([], env, tmp_path, port, tmp_path / "serve.log"):
            yield f"http://127.0.0.1:{port}", tmp_path


def _tenant(url: str, tid: str) -> str:
    admin = bearer(ADMIN_TOKEN)
    r = httpx.post(
        url + "/api/v1/tenants", json={"name": tid, "tier": "pro", "id": tid}, headers=admin
    )
    assert r.status_code == 201, r.text
    key = str(r.json()["api_key"])
    r = httpx.post(
        f"{url}/api/v1/tenants/{tid}/openai-key", json={"api_key": TENANT_KEY}, headers=admin
    )
    assert r.status_code == 200, r.text
    return key


async def _flood(url: str, paths: list[str], headers: dict[str, str]) -> list[int]:
    """GET every path, 32 at a time; the statuses."""
    statuses: list[int] = []
    queue = iter(paths)
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for path in queue:
                async with session.get(url + path, headers=headers) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(*(worker() for _ in range(32)))
    return statuses


def _series(text: str) -> tuple[int, set[str]]:
    """Number of samples on the page, and every `path` label value."""
    count, paths = 0, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            count += 1
            if "path" in sample.labels:
                paths.add(sample.labels["path"])
    return count, paths


def test_random_paths_cannot_grow_metrics(served: tuple[str, Path]) -> None:
    url, _ = served
    key = _tenant(url, "acme")

    def paths(n: int) -> list[str]:
        shapes = ("/v1/rand{}", "/v1/files/{}", "/v1/{}/{}", "/v1/files/{}/content", "/v1/x/{}/y")
        return [
            shapes[i % len(shapes)].format(secrets.token_hex(4), secrets.token_hex(3))
            for i in range(n)
        ]

    asyncio.run(_flood(url, paths(1000), {}))
    first = httpx.get(url + "/metrics").text
    statuses = asyncio.run(_flood(url, paths(8000), {}))
    statuses += asyncio.run(_flood(url, paths(1000), bearer(key)))  # authenticated, too
    assert len(statuses) == 9000 and 500 not in statuses
    last = httpx.get(url + "/metrics")
    assert last.status_code == 200
    count_first, _ = _series(first)
    count_last, labels = _series(last.text)
    # Only route templates or `other`, however many distinct paths were asked for.
    assert labels <= {*TEMPLATES, OTHER}, labels - {*TEMPLATES, OTHER}
    assert OTHER in labels and "/v1/files/{id}" in labels
    # 10,000 distinct paths add a bounded handful of series (the authenticated tenant's).
    assert count_last - count_first < 200, (count_first, count_last)
    assert len(last.content) < 100_000


# --- bytes exact, errors scrubbed (in front of the recording fake) ---------------------


def _raw_post(stack: Stack, key: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        stack.url + "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        timeout=30,
    )


def test_a_changed_body_is_a_splice_that_keeps_every_other_byte(stack: Stack) -> None:
    key = stack.tenant("acme")
    cases = [
        # a lone surrogate escape (was a 500), escapes, number spellings, a repeated key, NaN
        rb'{"model":"m","stream":true,"stream_options":{},"messages":[{"role":"user",'
        rb'"content":"\ud800 caf\u00e9 1e2"}],"temperature":1e0,"n":1,"n":1,"top_p":NaN}',
        rb'{"model":"m", "stream" : true, "stream_options" : {"include_usage":false} }',
        rb'{"model":"m","stream":true,"stream_options":null,"x":"\"}"}',
        rb'{"model":"m","stream":true,"messages":[],"x":100.0e-0}',
    ]
    for body in cases:
        before = len(stack.fake.requests)
        r = _raw_post(stack, key, body)
        assert r.status_code == 200, (body, r.text)
        sent = stack.fake.requests[before].body
        assert json.loads(sent)["stream_options"]["include_usage"] is True
        # What changed is the usage request alone: take it out again, the rest is the caller's.
        if b'"stream_options":{},' in body:
            assert sent == body.replace(b"{},", b'{"include_usage":true},', 1)
        elif b"false" in body:
            assert sent == body.replace(b"false", b"true")
        elif b"null" in body:
            assert sent == body.replace(b"null", b'{"include_usage":true}')
        else:
            assert sent == b'{"stream_options":{"include_usage":true},' + body[1:]
        assert b"usage" not in r.content.split(b"[DONE]")[0].replace(b'"usage":null', b"")


def test_non_ascii_header_bytes_reach_the_upstream_as_sent(stack: Stack) -> None:
    key = stack.tenant("acme")
    host, port = stack.url.removeprefix("http://").split(":")
    body = b'{"model":"m","messages":[]}'

    def send(value: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + key.encode()
                + b"\r\nX-Name: "
                + value
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    answer = send(b"caf\xc3\xa9 \xe2\x82\xac")  # UTF-8: passes byte for byte
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    seen = stack.fake.requests[-1].header("x-name")
    assert seen is not None and seen.encode("latin-1") == b"caf\xc3\xa9 \xe2\x82\xac"
    before = len(stack.fake.requests)
    answer = send(b"caf\xe9")  # not UTF-8: refused, never re-encoded
    assert answer.startswith(b"HTTP/1.1 400") and b'"invalid_header"' in answer
    assert len(stack.fake.requests) == before


@pytest.mark.parametrize("status", [400, 404, 409, 422, 429, 500, 503])
@pytest.mark.parametrize("gz", [False, True])
def test_upstream_error_bodies_never_carry_a_key(stack: Stack, status: int, gz: bool) -> None:
    trial = stack.tenant("tri", tier="trial", key=None)
    byok = stack.tenant("acme")
    model = f"echo-{'gz-' if gz else ''}{status}"
    for key, secret in ((trial, PLATFORM_KEY), (byok, TENANT_KEY)):
        r = httpx.post(
            stack.url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "x"}]},
            headers={**bearer(key), "Accept-Encoding": "gzip"},
        )
        assert r.status_code == status
        text = r.text  # decoded as the client would (a correct length, a correct coding)
        assert secret not in text and secret[8:20] not in text and "sk-other" not in text
        assert int(r.headers["content-length"]) == len(r.content)
        assert r.json()["error"]["type"] in ("invalid_request_error", "upstream_error")
    log = stack.usage_path.read_text() if stack.usage_path.exists() else ""
    assert PLATFORM_KEY not in log and TENANT_KEY not in log


def test_a_big_429_is_not_cut_under_its_length(stack: Stack) -> None:
    key = stack.tenant("acme")
    r = httpx.post(
        stack.url + "/v1/chat/completions",
        json={"model": "big-429", "messages": []},
        headers=bearer(key),
    )
    assert r.status_code == 429
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json()["error"]["code"] == "upstream_error_unreadable"
