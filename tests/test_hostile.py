"""Hostile input against a real `byok-proxy serve`: nothing a caller sends grows the
proxy's state, holds its event loop, or gets a 500."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import pytest
from fake_openai import start_fake
from helpers import ADMIN_TOKEN, bearer, clear_of_the_minute_ending
from prometheus_client.parser import text_string_to_metric_families
from servers import create_tenant, free_port, serve, serve_env
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
    return create_tenant(url, tid, openai_key=TENANT_KEY)


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


@pytest.mark.parametrize("gz", [False, True])
def test_upstream_error_bodies_never_carry_a_key(stack: Stack, gz: bool) -> None:
    trial = stack.tenant("tri", tier="trial", key=None)
    byok = stack.tenant("acme")
    for status in (400, 404, 409, 422, 429, 500, 503):
        model = f"echo-{'gz-' if gz else ''}{status}"
        for key, secret in ((trial, PLATFORM_KEY), (byok, TENANT_KEY)):
            r = httpx.post(
                stack.url + "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "x"}]},
                headers={**bearer(key), "Accept-Encoding": "gzip"},
            )
            assert r.status_code == status
            text = r.text  # decoded as the client would (a correct length and coding)
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


# --- a flood of wrong proxy keys -------------------------------------------------------


def test_a_flood_of_wrong_keys_is_cut_off_per_address(tmp_path: Path, master_key: str) -> None:
    yaml = "limits:\n  failed_auth_per_minute: 20\ncache_ttl_seconds: 0.2\n"
    with Stack.sqlite(tmp_path, master_key, yaml=yaml) as stack:
        good = stack.tenant("acme")
        assert stack.sdk(good).models.list().data  # known (cached) from now on
        store = stack.apps[0].runtime.store
        statuses = []
        clear_of_the_minute_ending()  # the flood in one window of the limiter
        with httpx.Client() as client:
            for _ in range(50):
                r = client.get(
                    stack.url + "/v1/models", headers=bearer("byok-" + secrets.token_urlsafe(32))
                )
                statuses.append(r.status_code)
            loads = store.loads
            assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
            assert r.json()["error"]["code"] == "too_many_failed_authentications"
            assert 1 <= int(r.headers["retry-after"]) <= 61
            for _ in range(20):  # refused without a database lookup each
                r = client.get(
                    stack.url + "/v1/models", headers=bearer("byok-" + secrets.token_urlsafe(32))
                )
                assert r.status_code == 429
            assert store.loads == loads
            # A key that authenticated before keeps working from the same address, also once
            # its cache entry has expired (it is looked up again: revocation still counts).
            time.sleep(0.5)
            assert client.get(stack.url + "/v1/models", headers=bearer(good)).status_code == 200
            # So does the admin token; guessing proxy keys on the admin API is cut off too.
            assert stack.admin.get("/api/v1/tenants").status_code == 200
            r = client.get(stack.url + "/api/v1/tenants", headers=bearer("byok-guess"))
            assert r.status_code == 429
            metrics = client.get(stack.url + "/metrics").text
        assert "byok_auth_failures_total 20.0" in metrics
        assert "byok_auth_blocked_total 51.0" in metrics


# --- admin inputs that used to answer 500 ----------------------------------------------


def _raw(url: str, requests: list[bytes]) -> list[bytes]:
    """Send raw HTTP/1.1 requests on one connection; each response's head and body."""
    host, port = url.removeprefix("http://").split(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                assert line, "connection closed"
                head += line
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append(head + reader.read(length))
    return answers


def _get(path: str, token: str = ADMIN_TOKEN) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def _post(path: str, body: bytes, token: str = ADMIN_TOKEN) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_hostile_admin_inputs_are_clear_errors_on_a_live_connection(
    stack: Stack, database_url: str
) -> None:
    stack.tenant("acme")
    deep = b'{"name":' + b"[" * 5000 + b"]" * 5000 + b',"tier":"pro"}'
    answers = _raw(
        stack.url,
        [
            _get("/api/v1/tenants/acme/audit?limit=%C2%B2"),
            _post("/api/v1/tenants", deep),
            _post("/api/v1/tenants", b'{"name":"a\\u0000b","tier":"pro"}'),
            _post("/api/v1/tenants", b'{"name":"tab\\there","tier":"pro"}'),
            _get("/api/v1/tenants/acme"),  # the connection still serves
        ],
    )
    statuses = [int(a.split(b" ", 2)[1]) for a in answers]
    assert statuses == [422, 400, 422, 422, 200]
    for answer in answers[:4]:
        assert b'"error"' in answer and b'"code"' in answer


def test_an_admin_bug_is_a_500_without_traceback_or_data_on_a_live_connection(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import admin.tenants

    def broken(_tenant: object) -> None:
        raise ValueError("request data sk-leak-0123456789abcdef")

    stack.tenant("acme")
    monkeypatch.setattr(admin.tenants, "tenant_public", broken)
    first, second = _raw(stack.url, [_get("/api/v1/tenants"), _get("/api/v1/tenants/acme/audit")])
    assert first.startswith(b"HTTP/1.1 500") and b'"internal_error"' in first
    assert second.startswith(b"HTTP/1.1 200")
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "admin request crashed: ValueError at" in text and "tenants.py" in text
    assert "sk-leak" not in text and "Traceback" not in text


def test_tenant_deletion_takes_its_trial_allowance(stack: Stack) -> None:
    from sqlmodel import select

    from proxy.models import TrialAllowance

    key = stack.tenant("tri", tier="trial", key=None)
    assert stack.sdk(key).models.list().data
    store = stack.apps[0].runtime.store
    with store.session() as s:
        assert s.exec(select(TrialAllowance)).all()
    assert stack.admin.delete("/api/v1/tenants/tri").status_code == 204
    with store.session() as s:
        assert s.exec(select(TrialAllowance)).all() == []


# --- the upstream clients keep nothing between tenants ----------------------------------


def test_key_validation_keeps_no_cookies_and_ignores_proxy_settings(
    tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Stack.sqlite(tmp_path, master_key) as stack:
        # Set after the test's own clients exist; the proxy's validation client is made later.
        dead = f"http://127.0.0.1:{free_port()}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, dead)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        stack.tenant("a")  # its validation gets two Set-Cookie headers back
        stack.tenant("b", key=TENANT_KEY[:-1] + "Z")
        checks = [r for r in stack.fake.requests if r.path.endswith("/models")]
        assert len(checks) == 2  # both reached the fake, not the "proxy"
        assert all(r.header("cookie") is None for r in checks)


def test_waiting_for_an_upstream_connection_is_bounded(tmp_path: Path, master_key: str) -> None:
    yaml = (
        "upstream:\n  max_connections: 1\n  pool_timeout_seconds: 0.5\n"
        "  connect_timeout_seconds: 0.5\n"
    )
    with Stack.sqlite(tmp_path, master_key, yaml=yaml) as stack:
        key = stack.tenant("acme")
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(
                httpx.post,
                stack.url + "/v1/chat/completions",
                json={"model": "slow", "messages": []},
                headers=bearer(key),
                timeout=30,
            )
            time.sleep(0.5)  # the slow request holds the only connection
            r = httpx.post(
                stack.url + "/v1/chat/completions",
                json={"model": "m", "messages": []},
                headers=bearer(key),
                timeout=30,
            )
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
            assert slow.result().status_code == 200


# --- body-sized work never holds the event loop ----------------------------------------

PROBE = """
import http.client, json, os, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection(host, port, timeout=30)
took, end = [], time.monotonic() + 120
while time.monotonic() < end and not os.path.exists(stop):
    start = time.monotonic()
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    took.append(time.monotonic() - start)
    time.sleep(0.01)
print(json.dumps(sorted(took)))
"""


def test_body_sized_work_never_holds_the_loop(served: tuple[str, Path]) -> None:
    url, tmp = served
    key = _tenant(url, "acme")
    # A stall seen once may be the machine (another process had both cores; CI at a load
    # average of 9 once saw two in a row, 1.1 s worst); the bug this catches stalls
    # every time, so three runs in a row must stall to fail. The worst
    # allowed is 0.5 s: after the whole suite has run, the client, the proxy and the
    # probe on two cores have shown 0.33 s twice in a row without the bug (0.08-0.15 s
    # alone), and parsing the 60 MiB body whole on the loop took 0.38 s on a slower day,
    # so on fast machines this guards against the gross case only (README).
    for attempt in range(3):
        p50, worst = _probe_while_big_bodies_pass(url, key, tmp / f"stop-probe-{attempt}")
        if p50 < 0.05 and worst < 0.5:
            return
    raise AssertionError(f"the loop stalled three times: p50 {p50:.3f} s, worst {worst:.3f} s")


def _probe_while_big_bodies_pass(url: str, key: str, stop: Path) -> tuple[float, float]:
    """p50 and worst /healthz time of a probe process while big bodies go through."""
    host, port = url.removeprefix("http://").split(":")
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, host, port, str(stop)], stdout=subprocess.PIPE
    )
    try:
        time.sleep(1)  # a baseline second of probes
        with httpx.Client(timeout=60) as client:
            # 60 MiB of JSON, streamed: inspected (and spliced) without one long parse.
            big = (
                b'{"model":"m","stream":true,"messages":[{"role":"user","content":"'
                + b"x" * (60 << 20)
                + b'"}]}'
            )
            r = client.post(
                url + "/v1/chat/completions",
                content=big,
                headers={**bearer(key), "Content-Type": "application/json"},
            )
            assert r.status_code == 200, r.text[:200]
            # A gzip body that inflates 1000-fold: scanned in bounded steps, passed intact.
            with client.stream(
                "POST",
                url + "/v1/chat/completions",
                json={"model": "bomb", "messages": []},
                headers={**bearer(key), "Accept-Encoding": "gzip"},
            ) as r:
                raw = b"".join(r.iter_raw())
            assert r.status_code == 200 and raw[:2] == b"\x1f\x8b"
            assert len(raw) == int(r.headers["content-length"])
            # A 3 MiB event in small blocks: scanned in linear time.
            r = client.post(
                url + "/v1/chat/completions",
                json={"model": "huge", "stream": True, "messages": []},
                headers=bearer(key),
            )
            assert r.status_code == 200
    finally:
        stop.touch()
        out, _ = probe.communicate(timeout=60)
    took = json.loads(out)
    assert len(took) > 50
    return took[len(took) // 2], took[-1]


def test_deeply_nested_proxy_bodies_are_never_a_500(stack: Stack) -> None:
    byok = stack.tenant("acme")
    trial = stack.tenant("tri", tier="trial", key=None)
    deep = b'{"model":"m","stream":true,"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    before = len(stack.fake.requests)
    r = _raw_post(stack, byok, deep)  # BYOK: the upstream judges it, byte for byte
    assert r.status_code == 400 and r.json()["error"]["message"] == "bad JSON"
    assert stack.fake.requests[before].body.endswith(b"]" * 1000 + b"}")
    r = _raw_post(stack, trial, deep)  # platform key: refused, never forwarded
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert len(stack.fake.requests) == before + 1


def test_a_body_that_stops_arriving_is_timed_out(tmp_path: Path, master_key: str) -> None:
    fake, server = start_fake()
    with server:
        env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", fake.base_url)
        env.pop("PROMETHEUS_MULTIPROC_DIR")
        env.update(BYOK_HTTP_HEAD_TIMEOUT="1", BYOK_HTTP_BODY_IDLE_TIMEOUT="1")
        port = free_port()
        with serve([], env, tmp_path, port, tmp_path / "serve.log"):
            url = f"http://127.0.0.1:{port}"
            key = _tenant(url, "acme")
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                head = (
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + key.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                )
                sock.sendall(head + b"{")
                started = time.monotonic()
                for _ in range(4):  # a trickle keeps it alive past the head timeout...
                    time.sleep(0.5)
                    sock.sendall(b" ")
                answer = sock.recv(65536)  # ...silence does not
            took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
            assert 2 < took < 10, took
            assert httpx.get(url + "/healthz").status_code == 200


def test_failed_auth_counts_ipv6_per_64_and_forgets_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy import auth_limit

    limit = auth_limit.FailedAuthLimit(2)
    for host in range(3):  # three addresses of one /64: one counter
        limit.failed(f"2001:db8::{host + 1}")
    assert limit.over("2001:db8::ffff") and not limit.over("2001:db8:1::1")
    monkeypatch.setattr(auth_limit, "MAX_ADDRESSES", 10)
    limit = auth_limit.FailedAuthLimit(1)
    for i in range(12):
        limit.failed(f"10.0.0.{i}")
    assert not limit.over("10.0.0.0") and limit.over("10.0.0.11")  # oldest forgotten
