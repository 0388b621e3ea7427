"""The usage line: its fields for every kind of request, the writer, and the summary command."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from pathlib import Path

import httpx
import pytest
from fake_openai import USAGE
from servers import free_port
from stack import Stack

from proxy.request_json import ask_for_usage, fields_of
from proxy.streaming import BodyUsage, SSEScanner, Usage
from proxy.usage import UsageRecord
from proxy.usage_sink import UsageLog

FIELDS = {
    "ts",
    "cost_usd",
    "api_key_id",
    "request_id",
    "tenant_id",
    "method",
    "path",
    "model",
    "stream",
    "status",
    "upstream_status",
    "duration_ms",
    "ttfb_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "key_source",
    "error_code",
    "client_disconnected",
}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def assert_usage_line(
    line: dict[str, object], *, upstream_reached: bool, **expected: object
) -> None:
    """Every field of a usage line: the exact values given, and sane ids and timings."""
    assert set(line) == FIELDS
    assert RFC3339.match(str(line["ts"])) and str(line["request_id"]).startswith("req_")
    duration = line["duration_ms"]
    assert isinstance(duration, int | float) and duration >= 0
    ttfb = line["ttfb_ms"]
    if upstream_reached:
        assert isinstance(ttfb, int | float) and 0 <= ttfb <= duration
    else:
        assert ttfb is None
    rest = {
        k: v
        for k, v in line.items()
        if k not in ("ts", "request_id", "duration_ms", "ttfb_ms", "api_key_id", "cost_usd")
    }
    assert rest == expected


# --- pieces ---------------------------------------------------------------------------


def test_ask_for_usage_splices_and_merges() -> None:
    body = b'{"model":"m","stream":true, "messages":[]}'
    sent, strip = ask_for_usage(body, fields_of(json.loads(body)))
    assert strip and sent == b'{"stream_options":{"include_usage":true},' + body[1:]
    assert json.loads(sent)["stream_options"] == {"include_usage": True}

    asked = b'{"stream":true,"stream_options":{"include_usage":true}}'
    assert ask_for_usage(asked, fields_of(json.loads(asked))) == (asked, False)

    other = b'{"stream":true,"stream_options":{"include_obfuscation":false}}'
    sent, strip = ask_for_usage(other, fields_of(json.loads(other)))
    assert strip and json.loads(sent)["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    null = b'{"stream":true,"stream_options":null}'
    sent, strip = ask_for_usage(null, fields_of(json.loads(null)))
    assert strip and json.loads(sent)["stream_options"] == {"include_usage": True}


CHUNK = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
USAGE_CHUNK = (
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def scan(scanner: SSEScanner, stream: bytes, size: int) -> bytes:
    """Feed `stream` to `scanner` in `size`-byte blocks; what the client would receive."""
    out = b"".join(scanner.feed(stream[i : i + size]) for i in range(0, len(stream), size))
    return out + scanner.finish()


@pytest.mark.parametrize("size", [1, 3, 7, 50, 10_000])
def test_sse_scanner_strips_usage_chunk_across_any_split(size: int) -> None:
    stream = CHUNK * 3 + USAGE_CHUNK + DONE
    scanner = SSEScanner(strip_usage_chunk=True)
    out = scan(scanner, stream, size)
    assert out == CHUNK * 3 + DONE
    assert scanner.usage == Usage(3, 4, 7)


@pytest.mark.parametrize("size", [1, 5, 10_000])
def test_sse_scanner_passes_everything_when_client_asked(size: int) -> None:
    stream = CHUNK * 2 + USAGE_CHUNK + DONE
    scanner = SSEScanner(strip_usage_chunk=False)
    blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert [scanner.feed(b) for b in blocks] == blocks  # forwarded untouched, as they came
    assert scanner.finish() == b""
    assert scanner.usage == Usage(3, 4, 7)


def test_sse_scanner_reads_responses_api_usage() -> None:
    event = (
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"usage": {"input_tokens":9,"output_tokens":4,"total_tokens":13}}}\n\n'
    )
    scanner = SSEScanner(strip_usage_chunk=False)
    scanner.feed(event)
    assert scanner.usage == Usage(9, 4, 13)


@pytest.mark.parametrize("block", [4096, 1_000_000])
def test_body_usage_is_found_by_structure_in_bodies_of_any_size(block: int) -> None:
    body = json.dumps(
        {
            "data": [{"embedding": [0.1] * 50_000}],
            "note": 'say "usage": {"total_tokens": 1}',
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
            "user": "usage",
            "metadata": {"tag": "usage", "usage": "1"},
        }
    ).encode()
    plain = BodyUsage(None)
    for i in range(0, len(body), block):
        plain.feed(body[i : i + block])
    assert plain.usage() == Usage(5, None, 5)
    zipped = BodyUsage("gzip")
    packed = gzip.compress(body)
    for i in range(0, len(packed), block):
        zipped.feed(packed[i : i + block])
    assert zipped.usage() == Usage(5, None, 5)
    assert BodyUsage(None).usage() is None
    broken = BodyUsage("br")
    broken.feed(b"\x00\x01")
    assert broken.usage() is None


@pytest.mark.parametrize(
    "decoy",
    [
        {"user": "usage"},
        {"metadata": {"tag": "usage"}},
        {"instructions": 'return {"usage": {"total_tokens": 1}}'},
    ],
)
def test_body_usage_ignores_the_word_usage_elsewhere(decoy: dict[str, object]) -> None:
    """Values that say "usage" after the real object cannot hide it (they did with a tail scan)."""
    body = json.dumps(
        {"id": "resp_1", "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}}
        | decoy
    ).encode()
    scanned = BodyUsage(None)
    scanned.feed(body)
    assert scanned.usage() == Usage(9, 4, 13)


def test_body_usage_inflation_is_bounded() -> None:
    from proxy.streaming import MAX_INFLATED

    bomb = gzip.compress(b" " * (MAX_INFLATED + 1024 * 1024))
    scanned = BodyUsage("gzip")
    for i in range(0, len(bomb), 65536):
        scanned.feed(bomb[i : i + 65536])
    assert scanned.usage() is None


@pytest.mark.parametrize("size", [4096, 65536, 10_000_000])
@pytest.mark.parametrize("strip", [True, False])
def test_sse_scanner_reads_usage_from_events_of_any_size(size: int, strip: bool) -> None:
    image = "A" * (3 * 1024 * 1024)
    completed = json.dumps(
        {
            "type": "response.completed",
            "response": {
                "output": [{"type": "image_generation_call", "result": image}],
                "usage": {"input_tokens": 20, "output_tokens": 1600, "total_tokens": 1620},
            },
        }
    ).encode()
    stream = (
        b"event: response.created\ndata: {}\n\n"
        + b"event: response.completed\ndata: "
        + completed
        + b"\n\n"
    )
    scanner = SSEScanner(strip_usage_chunk=strip)
    out = scan(scanner, stream, size)
    assert out == stream  # the event carries usage but is not the usage-only chunk: kept
    assert scanner.usage == Usage(20, 1600, 1620)


def test_sse_scanner_keeps_a_content_chunk_that_carries_usage() -> None:
    """Only the usage-only chunk (empty choices) is cut, never a chunk with content."""
    last = (
        b'data: {"choices":[{"delta":{"content":"end"}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    )
    scanner = SSEScanner(strip_usage_chunk=True)
    out = scanner.feed(CHUNK + last + DONE) + scanner.finish()
    assert out == CHUNK + last + DONE
    assert scanner.usage == Usage(3, 4, 7)


async def test_usage_log_writes_everything_on_close(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    log = UsageLog(str(path))
    await log.start()
    for i in range(1000):
        log.write(UsageRecord(f"req_{i}", "POST", "/v1/x", 0.0, 1_700_000_000.0))
    await asyncio.sleep(0)
    await log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1000 and [json.loads(x)["request_id"] for x in lines][-1] == "req_999"
    assert set(json.loads(lines[0])) == FIELDS


# --- every field, end to end ------------------------------------------------------------


def post(
    stack: Stack, key: str, body: dict[str, object], path: str = "/v1/chat/completions"
) -> httpx.Response:
    return httpx.post(
        stack.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def test_usage_fields_for_each_kind_of_request(stack: Stack) -> None:
    key = stack.tenant("acme")
    missing = stack.tenant("nokey", key=None)
    rids = []
    rids.append(post(stack, key, {"model": "gpt-4o-mini", "messages": []}))
    r, _ = stack.stream_raw(
        key, {"model": "gpt-4o-mini", "messages": [], "stream": True}, "/v1/chat/completions?x=1"
    )
    rids.append(r)
    rids.append(
        post(
            stack,
            key,
            {
                "model": "gpt-4o-mini",
                "messages": [],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    )
    rids.append(post(stack, missing, {"model": "gpt-4o-mini", "messages": []}))
    rids.append(post(stack, key, {"model": "rate-limited", "messages": []}))
    rids.append(post(stack, "byok-unknown", {"model": "x", "messages": []}))
    lines = {x["request_id"]: x for x in stack.usage(6)}
    plain, streamed, asked, no_key, limited, unknown = (
        lines[r.headers["x-byok-request-id"]] for r in rids
    )
    chat = {"method": "POST", "path": "/v1/chat/completions", "client_disconnected": False}
    tokens = {
        "prompt_tokens": USAGE["prompt_tokens"],
        "completion_tokens": USAGE["completion_tokens"],
        "total_tokens": USAGE["total_tokens"],
    }
    none = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
    ok = {"status": 200, "upstream_status": 200, "key_source": "byok", "error_code": None}
    assert_usage_line(
        plain,
        upstream_reached=True,
        **chat,
        **tokens,
        **ok,
        tenant_id="acme",
        model="gpt-4o-mini",
        stream=False,
    )
    assert_usage_line(
        streamed,
        upstream_reached=True,
        **chat,
        **tokens,
        **ok,
        tenant_id="acme",
        model="gpt-4o-mini",
        stream=True,
    )
    assert_usage_line(
        asked,
        upstream_reached=True,
        **chat,
        **tokens,
        **ok,
        tenant_id="acme",
        model="gpt-4o-mini",
        stream=True,
    )
    # Refused before its body was read: the model is not known.
    assert_usage_line(
        no_key,
        upstream_reached=False,
        **chat,
        **none,
        tenant_id="nokey",
        model=None,
        stream=False,
        status=402,
        upstream_status=None,
        key_source=None,
        error_code="openai_key_missing",
    )
    assert_usage_line(
        limited,
        upstream_reached=True,
        **chat,
        **none,
        tenant_id="acme",
        model="rate-limited",
        stream=False,
        status=429,
        upstream_status=429,
        key_source="byok",
        error_code=None,
    )
    assert_usage_line(
        unknown,
        upstream_reached=False,
        **chat,
        **none,
        tenant_id=None,
        model=None,
        stream=False,
        status=401,
        upstream_status=None,
        key_source=None,
        error_code="invalid_proxy_key",
    )


def test_usage_fields_upstream_unreachable(tmp_path: Path, master_key: str) -> None:
    with Stack.sqlite(tmp_path, master_key, upstream=f"http://127.0.0.1:{free_port()}/v1") as stack:
        key = stack.tenant("t", tier="trial", key=None)
        r = post(stack, key, {"model": "gpt-4o-mini", "messages": []})
        assert r.status_code == 502
        assert_usage_line(
            stack.usage(1)[-1],
            upstream_reached=False,
            tenant_id="t",
            method="POST",
            path="/v1/chat/completions",
            model="gpt-4o-mini",
            stream=False,
            status=502,
            upstream_status=None,
            prompt_tokens=None,
            completion_tokens=None,
            total_tokens=None,
            key_source="platform",
            error_code="upstream_unreachable",
            client_disconnected=False,
        )


CRLF_CHUNK = CHUNK.replace(b"\n", b"\r\n")
CRLF_USAGE = USAGE_CHUNK.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("size", [1, 9, 10_000])
def test_sse_scanner_handles_crlf_events(size: int) -> None:
    stream = CRLF_CHUNK * 2 + CRLF_USAGE + DONE.replace(b"\n", b"\r\n")
    scanner = SSEScanner(strip_usage_chunk=True)
    out = scan(scanner, stream, size)
    assert out == CRLF_CHUNK * 2 + DONE.replace(b"\n", b"\r\n")
    assert scanner.usage == Usage(3, 4, 7)


def test_sse_scanner_never_drops_what_it_cannot_parse() -> None:
    scanner = SSEScanner(strip_usage_chunk=True)
    blob = b"x" * (1024 * 1024 + 10)  # no event boundary anywhere
    out = b"".join(scanner.feed(blob[i : i + 65536]) for i in range(0, len(blob), 65536))
    assert out + scanner.finish() == blob


def test_ask_for_usage_leaves_unsafe_bodies_alone() -> None:
    utf16 = '{"stream":true,"model":"m"}'.encode("utf-16")
    assert ask_for_usage(utf16, fields_of(json.loads(utf16))) == (utf16, False)
    nan = b'{"stream":true,"stream_options":null,"temperature":1e999,"top_p":NaN}'
    sent, strip = ask_for_usage(nan, fields_of(json.loads(nan)))  # spliced, not re-serialised
    assert strip and sent == nan.replace(b"null", b'{"include_usage":true}')
    unicode = '{"stream":true,"stream_options":null,"messages":"h\u00e9"}'.encode()
    sent, strip = ask_for_usage(unicode, fields_of(json.loads(unicode)))
    assert strip and json.loads(sent)["messages"] == "h\u00e9"


def test_store_caches_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import store as store_module
    from proxy.store import Store, migrate

    monkeypatch.setattr(store_module, "_MAX_CACHED", 10)
    store = Store.connect(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(store.engine)
    for i in range(35):
        assert store.principal(f"byok-random-{i}") is None
        assert store.tenant(f"t{i}") is None
    assert len(store._keys) <= 10 and len(store._tenants) <= 10
    store.dispose()


def test_body_usage_seen_before_a_big_body_ends() -> None:
    """A client that leaves after the usage of a big body passed still pays that usage."""
    head = b'{"output":"' + b"x" * 400_000 + b'","usage":{"input_tokens":9,"output_tokens":4,'
    head += b'"total_tokens":13},"metadata":{"note":"'
    scanned = BodyUsage(None)
    scanned.feed(head)
    scanned.feed(b"y" * 10_000)  # the body goes on; the client leaves here
    assert scanned.seen() == Usage(9, 4, 13)


async def test_big_bodies_are_read_by_structure_not_by_dotted_names() -> None:
    from proxy.request_json import read_large

    dotted = b'{"model":"m","stream":true,"stream_options.include_usage":true}'
    fields = await read_large(dotted)
    assert fields is not None and fields.streams
    sent, strip = ask_for_usage(dotted, fields)  # the dotted key is not stream_options
    assert strip and json.loads(sent)["stream_options"] == {"include_usage": True}
    nested = b'{"stream":true,"stream_options":{"x":{"include_usage":true}}}'
    fields = await read_large(nested)
    assert fields is not None and fields.options == {}
    assert await read_large(b'{"top_p":NaN}') is None  # not strict JSON: not read


def test_a_gzip_error_body_is_inflated_only_so_far() -> None:
    import gzip
    import time as clock

    from proxy.rejections import relayable

    bomb = gzip.compress(b'{"error":{"message":"' + b"word " * 13_000_000 + b'"}}')
    started = clock.monotonic()
    replaced = relayable(bomb, "gzip", "sk-test-abcdefghijklmnop", True)
    assert replaced is not None and b"upstream_error_unreadable" in replaced
    assert clock.monotonic() - started < 0.5
