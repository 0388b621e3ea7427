"""End to end: the official OpenAI SDK → the real proxy → the fake OpenAI, over loopback.

For every call, the upstream must have seen the tenant's OpenAI key and never
the proxy key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Iterator

import httpx
import httpx2
import openai
import pytest
from fake_openai import STREAM_CHUNKS
from stack import TENANT_KEY, Stack


def assert_tenant_key_only(stack: Stack, proxy_key: str) -> None:
    """Every upstream request (the key's validation included) carried the tenant's OpenAI
    key, and none carried the proxy key anywhere."""
    assert len(stack.fake.requests) > 1, "the upstream saw no proxied request"
    for seen in stack.fake.requests:
        assert seen.header("authorization") == f"Bearer {TENANT_KEY}"
        assert proxy_key not in json.dumps(seen.headers) and proxy_key.encode() not in seen.body


def test_chat_completion_sync(stack: Stack) -> None:
    key = stack.tenant("acme")
    client = stack.sdk(key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello!"
    assert completion.usage is not None and completion.usage.total_tokens == 18
    assert raw.headers["x-request-id"] == f"up-req-{stack.fake.counter}"
    assert raw.headers["x-byok-request-id"].startswith("req_")
    assert raw.headers["openai-processing-ms"] == "12"
    assert raw.headers["x-ratelimit-remaining-requests"] == "4999"
    seen = stack.fake.requests[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.json["messages"] == [{"role": "user", "content": "hi"}]
    assert "stream_options" not in seen.json
    assert_tenant_key_only(stack, key)


def test_request_body_passes_byte_for_byte(stack: Stack) -> None:
    key = stack.tenant("acme")
    body = b'{ "model" : "gpt-4o-mini",\n "messages": [{"role":"user","content":"h\\u00e9"}] }'
    r = httpx.post(
        stack.url + "/v1/chat/completions?api-version=1",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200
    seen = stack.fake.requests[-1]
    assert seen.body == body and seen.query == "api-version=1"


def test_chat_stream_sync_without_usage_requested(stack: Stack) -> None:
    key = stack.tenant("acme")
    stream = stack.sdk(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(STREAM_CHUNKS))
    assert all(c.choices for c in chunks), "the usage-only chunk must not reach the client"
    sent = stack.fake.requests[-1].json
    assert sent["stream_options"] == {"include_usage": True}
    line = stack.usage(1)[-1]
    assert line["stream"] is True and line["total_tokens"] == 18
    assert_tenant_key_only(stack, key)


def test_stream_bytes_identical_apart_from_usage_chunk(stack: Stack) -> None:
    key = stack.tenant("acme")
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    r, seen_by_client = stack.stream_raw(key, body)
    upstream = stack.fake.raw_streams[-1]
    events = upstream.split(b"\n\n")
    usage_events = [e for e in events if b'"choices":[]' in e]
    assert len(usage_events) == 1
    assert seen_by_client == upstream.replace(usage_events[0] + b"\n\n", b"")
    assert "content-length" not in r.headers


def test_chat_stream_with_usage_requested(stack: Stack) -> None:
    key = stack.tenant("acme")
    stream = stack.sdk(key).chat.completions.create(
        model="gpt-4o-mini", messages=[], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 18
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    _, raw = stack.stream_raw(key, body)
    assert raw == stack.fake.raw_streams[-1]


async def test_async_sdk_plain_and_streamed(stack: Stack) -> None:
    key = await asyncio.to_thread(stack.tenant, "acme")
    client = stack.async_sdk(key)
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert completion.choices[0].message.content == "Hello!"
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("tok0 ")
    embedding = await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert embedding.data[0].embedding == [0.25, 0.5, 0.75]
    response = await client.responses.create(model="gpt-4o-mini", input="hi")
    assert response.output_text == "Hi there"
    events = [e async for e in await client.responses.create(model="m", input="hi", stream=True)]
    assert events[-1].type == "response.completed"
    models = await client.models.list(extra_query={"limit": "2"})
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert stack.fake.requests[-1].query == "limit=2"
    data = bytes(range(256)) * 64
    uploaded = await client.files.create(file=("b.jsonl", data), purpose="batch")
    assert uploaded.object == "file" and data in stack.fake.requests[-1].body
    text = await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data))
    assert text.text == "hello from audio" and data in stack.fake.requests[-1].body
    await client.close()
    assert_tenant_key_only(stack, key)


def test_embeddings_responses_models_and_query(stack: Stack) -> None:
    key = stack.tenant("acme")
    client = stack.sdk(key)
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert embedding.data[0].embedding == [0.25, 0.5, 0.75]
    response = client.responses.create(model="gpt-4o-mini", input="hi")
    assert response.output_text == "Hi there"
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    models = client.models.list(extra_query={"limit": "2", "order": "desc"})
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert stack.fake.requests[-1].query == "limit=2&order=desc"
    lines = stack.usage(4)
    by_path = {(x["path"], x["stream"]): x for x in lines}
    emb = by_path[("/v1/embeddings", False)]
    assert (emb["prompt_tokens"], emb["completion_tokens"], emb["total_tokens"]) == (5, None, 5)
    resp = by_path[("/v1/responses", False)]
    assert (resp["prompt_tokens"], resp["completion_tokens"], resp["total_tokens"]) == (9, 4, 13)
    assert by_path[("/v1/responses", True)]["total_tokens"] == 13
    assert_tenant_key_only(stack, key)


def test_file_upload_and_audio_transcription(stack: Stack) -> None:
    """Multipart bodies reach the upstream byte for byte as the SDK sent them."""
    key = stack.tenant("acme")
    sent: list[bytes] = []

    def capture(request: httpx2.Request) -> None:
        request.read()
        sent.append(request.content)

    client = openai.OpenAI(
        base_url=stack.url + "/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx2.Client(event_hooks={"request": [capture]}),
    )
    data = bytes(range(256)) * 4096  # 1 MiB of every byte value
    uploaded = client.files.create(file=("batch.jsonl", data), purpose="batch")
    seen = stack.fake.requests[-1]
    assert seen.path == "/v1/files" and uploaded.bytes == len(seen.body)
    assert seen.body == sent[-1] and data in seen.body
    assert seen.header(
        "content-type",
    ).startswith("multipart/form-data; boundary=")

    audio = b"RIFF" + bytes(range(256)) * 20
    text = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    assert text.text == "hello from audio"
    assert stack.fake.requests[-1].path == "/v1/audio/transcriptions"
    assert stack.fake.requests[-1].body == sent[-1] and audio in sent[-1]
    assert_tenant_key_only(stack, key)


def test_streamed_multipart_upload_is_identical(stack: Stack) -> None:
    key = stack.tenant("acme")
    boundary = b"----byoktestboundary"
    payload = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        b"batch\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="x.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + bytes(range(256)) * 2000
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for i in range(0, len(payload), 7000):
            yield payload[i : i + 7000]

    r = httpx.post(
        stack.url + "/v1/files",
        content=chunks(),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "multipart/form-data; boundary=" + boundary.decode(),
        },
    )
    assert r.status_code == 200
    seen = stack.fake.requests[-1]
    assert seen.body == payload
    assert seen.header("transfer-encoding") == "chunked"  # a chunked upload stays chunked
    assert seen.header("content-length") is None


def test_stream_is_not_buffered(stack: Stack) -> None:
    """The client gets the first chunk while the upstream still holds back the rest."""
    key = stack.tenant("acme")
    stream = stack.sdk(key).chat.completions.create(model="hold", messages=[], stream=True)
    iterator = iter(stream)
    first = next(iterator)  # would block forever if the proxy buffered
    assert stack.fake.first_chunk_sent.is_set() and not stack.fake.release.is_set()
    assert first.choices[0].delta.role == "assistant"
    stack.fake.release.set()
    rest = list(iterator)
    assert len(rest) == STREAM_CHUNKS + 1


def test_client_disconnect_closes_upstream(stack: Stack) -> None:
    key = stack.tenant("acme")
    with httpx.stream(
        "POST",
        stack.url + "/v1/chat/completions",
        json={"model": "endless", "messages": [], "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        received = 0
        for block in r.iter_raw():
            received += len(block)
            if received > 500:
                break
        closed_at = __import__("time").monotonic()
    assert stack.fake.stream_closed.wait(5), "upstream stream never closed"
    assert stack.fake.stream_closed_at is not None
    assert stack.fake.stream_closed_at - closed_at < 1.0
    line = stack.usage(1)[-1]
    assert line["client_disconnected"] is True and line["status"] == 200


def test_headers_forwarded_faithfully(stack: Stack) -> None:
    key = stack.tenant("acme")
    r = httpx.get(
        stack.url + "/v1/models",
        headers=[
            ("Authorization", f"Bearer {key}"),
            ("OpenAI-Organization", "org-123"),
            ("OpenAI-Project", "proj-9"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "drop me"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic secret"),
            ("Cookie", "__Host-byok_console=sealed-session"),
            ("X-Custom", "a"),
            ("X-Rep", "1"),
            ("X-Rep", "2"),
        ],
    )
    assert r.status_code == 200
    seen = stack.fake.requests[-1]
    names = [name for name, _ in seen.headers]
    assert seen.header("openai-organization") == "org-123"
    assert seen.header("openai-project") == "proj-9"
    assert seen.header("x-custom") == "a"
    assert seen.all("x-rep") == ["1", "2"]  # repeated request headers kept, in order
    for dropped in ("x-hop", "keep-alive", "proxy-authorization", "connection", "cookie"):
        assert dropped not in names
    # Nothing the client did not send, beyond what HTTP requires (host).
    sent = {
        "authorization",
        "openai-organization",
        "openai-project",
        "x-custom",
        "x-rep",
        "accept",
        "accept-encoding",
        "user-agent",
    }
    assert set(names) - sent == {"host"}

    # Response: exactly the upstream's headers (repeats and order kept), plus our request id.
    direct = httpx.get(
        stack.fake.base_url + "/models", headers={"Authorization": f"Bearer {TENANT_KEY}"}
    )

    def comparable(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        varying = {b"date", b"x-request-id", b"x-byok-request-id"}
        return [(k.lower(), v) for k, v in raw if k.lower() not in varying]

    assert comparable(r.headers.raw) == comparable(direct.headers.raw)
    assert r.headers.get_list("set-cookie") == ["__cf_bm=one; Path=/", "_cfuvid=two; Path=/"]
    proxied_names = [k.lower() for k, _ in r.headers.raw]
    assert proxied_names.count(b"x-byok-request-id") == 1
    assert proxied_names.count(b"x-request-id") == 1 and proxied_names.count(b"date") == 1
    assert proxied_names.count(b"server") == 1  # the upstream's; the proxy adds none


def test_no_request_can_steer_the_upstream(stack: Stack) -> None:
    import http.client

    key = stack.tenant("acme")
    before = len(stack.fake.requests)
    port = int(stack.url.rsplit(":", 1)[1])
    for target in (
        "/v1/../admin",
        "/v1/%2e%2e/x",
        "/v1/files%2F..%2Fx",
        "/v1/a/./b",
        "/v1/..%5cx",
        "/v1%2f..%2fx",
    ):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", target, headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 400, target
        assert body["error"]["code"] == "invalid_path", target
    assert len(stack.fake.requests) == before
    # An absolute-form target or a Host header cannot choose another host.
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request(
        "GET",
        "http://evil.example/v1/models",
        headers={"Authorization": f"Bearer {key}", "Host": "evil.example"},
    )
    assert conn.getresponse().status == 200
    conn.close()
    assert stack.fake.requests[-1].header("host") == f"127.0.0.1:{stack.fake.port}"


def test_embeddings_base64_roundtrip(stack: Stack) -> None:
    key = stack.tenant("acme")
    r = httpx.post(
        stack.url + "/v1/embeddings",
        json={"model": "m", "input": "x", "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {key}"},
    )
    vector = struct.unpack("<3f", base64.b64decode(r.json()["data"][0]["embedding"]))
    assert vector == (0.25, 0.5, 0.75)
    assert r.json()["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


def test_disconnect_noticed_on_a_bodyless_stream(stack: Stack) -> None:
    key = stack.tenant("acme")
    with httpx.stream(
        "GET",
        stack.url + "/v1/responses/resp_1?stream=true",
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        for _ in r.iter_raw():
            break
        closed_at = __import__("time").monotonic()
    assert stack.fake.stream_closed.wait(5)
    assert stack.fake.stream_closed_at is not None
    assert stack.fake.stream_closed_at - closed_at < 1.0
    assert stack.usage(1)[-1]["client_disconnected"] is True


def test_nothing_added_to_a_bare_request(stack: Stack) -> None:
    """A request with only what HTTP needs reaches the upstream with only that (plus the key)."""
    import http.client

    key = stack.tenant("acme")
    port = int(stack.url.rsplit(":", 1)[1])
    for body in (None, b'{"model":"m","messages":[],"stream":true}'):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.putrequest(
            "POST" if body else "GET",
            "/v1/chat/completions" if body else "/v1/models",
            skip_host=False,
            skip_accept_encoding=True,
        )
        conn.putheader("Authorization", f"Bearer {key}")
        if body:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        assert conn.getresponse().read()
        conn.close()
        names = sorted(name for name, _ in stack.fake.requests[-1].headers)
        expected = ["authorization", "host"] + (["content-length", "content-type"] if body else [])
        assert names == sorted(expected)


def test_client_gone_before_any_answer_is_499(stack: Stack) -> None:
    key = stack.tenant("acme")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            stack.url + "/v1/chat/completions",
            json={"model": "slow", "messages": []},
            headers={"Authorization": f"Bearer {key}"},
            timeout=0.5,
        )
    line = stack.usage(1, timeout=10)[-1]
    assert (line["status"], line["client_disconnected"]) == (499, True)
    assert line["upstream_status"] is None and line["ttfb_ms"] is None


def test_upstream_cut_mid_stream(stack: Stack) -> None:
    key = stack.tenant("acme")
    with pytest.raises(httpx.RemoteProtocolError):  # the client sees the stream cut, too
        with httpx.stream(
            "POST",
            stack.url + "/v1/chat/completions",
            json={"model": "broken", "messages": [], "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            assert r.status_code == 200
            for _ in r.iter_raw():
                pass
    line = stack.usage(1)[-1]
    assert (line["status"], line["upstream_status"]) == (200, 200)
    assert line["error_code"] == "upstream_unreachable" and line["client_disconnected"] is False


def test_redirects_are_passed_back_not_followed(stack: Stack) -> None:
    key = stack.tenant("acme")
    before = len(stack.fake.requests)
    r = httpx.get(stack.url + "/v1/redirect", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 302 and r.headers["location"].endswith("/v1/models")
    assert len(stack.fake.requests) == before + 1


def test_legacy_completions_stream_asks_for_usage(stack: Stack) -> None:
    key = stack.tenant("acme")
    httpx.post(
        stack.url + "/v1/completions",
        json={"model": "m", "prompt": "x", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert stack.fake.requests[-1].json["stream_options"] == {"include_usage": True}
