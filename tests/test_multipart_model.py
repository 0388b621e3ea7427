"""Learning the `model` field of a multipart upload before anything goes upstream."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from proxy.downstream import ClientGone
from proxy.errors import BadRequest, RequestTooLarge
from proxy.multipart_model import (
    MAX_MODEL_BYTES,
    SCAN_BYTES,
    read_model_field,
    refuse_second_model,
)

URL = "http://proxy.test/v1/audio/transcriptions"
SIZES = [1, 7, 64 * 1024]
LIMIT = 64 * 1024 * 1024
BOUNDARY = b"b0undary"
HAND_TYPE = b"multipart/form-data; boundary=" + BOUNDARY


def sdk_body(files: dict[str, Any], data: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """A body as the OpenAI SDK builds it (httpx: data fields first, then files)."""
    request = httpx.Request("POST", URL, data=data, files=files)
    return request.read(), request.headers["content-type"].encode()


def hand_body(*parts: tuple[bytes, bytes]) -> bytes:
    """A body from (header lines, value) parts, for headers httpx would not write."""
    out = b""
    for headers, value in parts:
        out += b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"', value


AUDIO = (b"RIFF" + bytes(range(256)) * 40, "audio/wav")  # ~10 KiB


class Client:
    """A fake ASGI `receive` handing out `body` in pieces of `size` bytes."""

    def __init__(self, body: bytes, size: int, disconnect_at: int | None = None) -> None:
        cut = body if disconnect_at is None else body[:disconnect_at]
        pieces = [cut[i : i + size] for i in range(0, len(cut), size)] or [b""]
        self.messages: deque[dict[str, Any]] = deque(
            {"type": "http.request", "body": p, "more_body": True} for p in pieces
        )
        if disconnect_at is None:
            self.messages[-1]["more_body"] = False
        first = self.messages.popleft()
        self.first: bytes = first["body"]
        self.more: bool = first["more_body"]
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        if self.messages:
            return self.messages.popleft()
        return {"type": "http.disconnect"}

    async def rest(self) -> bytes:
        out = []
        while True:
            message = await self.receive()
            assert message["type"] == "http.request"
            out.append(message["body"])
            if not message["more_body"]:
                return b"".join(out)


async def scan(
    body: bytes, content_type: bytes, size: int, limit: int = LIMIT
) -> tuple[str | None, list[bytes], bool, Client]:
    client = Client(body, size)
    model, chunks, more = await read_model_field(
        content_type, client.first, client.more, client.receive, limit
    )
    return model, chunks, more, client


async def reassembled(chunks: list[bytes], more: bool, client: Client) -> bytes:
    return b"".join(chunks) + (await client.rest() if more else b"")


@pytest.mark.parametrize("size", SIZES)
async def test_sdk_order_model_before_file(size: int) -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "whisper-1", "language": "en"})
    model, chunks, more, client = await scan(body, ctype, size)
    assert model == "whisper-1"
    if size < len(body):
        assert more and sum(map(len, chunks)) < 400  # stopped before the file
    assert await reassembled(chunks, more, client) == body


async def test_model_first_in_one_chunk_reads_nothing_more() -> None:
    big = (b"\0" * (2 << 20), "audio/wav")
    body, ctype = sdk_body({"file": ("a.wav", *big)}, {"model": "whisper-1"})
    model, chunks, more, client = await scan(body, ctype, 64 * 1024)
    assert (model, len(chunks), more, client.calls) == ("whisper-1", 1, True, 0)
    assert await reassembled(chunks, more, client) == body


@pytest.mark.parametrize("size", SIZES)
async def test_model_after_small_file(size: int) -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO), "model": (None, b"whisper-1")})
    assert body.index(b'name="model"') > body.index(b'name="file"')
    model, chunks, more, client = await scan(body, ctype, size)
    assert model == "whisper-1"
    assert await reassembled(chunks, more, client) == body


@pytest.mark.parametrize("size", [7, 64 * 1024])
async def test_model_after_3_mib_file_is_not_looked_for(size: int) -> None:
    body, ctype = sdk_body(
        {"file": ("a.wav", b"\1" * (3 << 20), "audio/wav"), "model": (None, b"whisper-1")}
    )
    model, chunks, more, client = await scan(body, ctype, size)
    assert model is None
    assert more
    assert SCAN_BYTES <= sum(map(len, chunks)) <= SCAN_BYTES + size
    assert await reassembled(chunks, more, client) == body


@pytest.mark.parametrize("size", SIZES)
async def test_no_model_field_reads_the_whole_body(size: int) -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"language": "en"})
    model, chunks, more, _ = await scan(body, ctype, size)
    assert (model, more) == (None, False)
    assert b"".join(chunks) == body


async def test_single_chunk_body() -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "whisper-1"})
    model, chunks, more = await read_model_field(ctype, body, False, _never_called, LIMIT)
    assert (model, chunks, more) == ("whisper-1", [body], False)


async def _never_called() -> dict[str, Any]:
    raise AssertionError("receive called")


@pytest.mark.parametrize("size", SIZES)
async def test_a_file_called_model_is_not_the_model(size: int) -> None:
    body, ctype = sdk_body({"file": ("model", b"gpt-4o", "text/plain")})
    model, *_ = await scan(body, ctype, size)
    assert model is None
    body, ctype = sdk_body({"file": ("model", b"gpt-4o", "text/plain"), "model": (None, b"tts-1")})
    model, *_ = await scan(body, ctype, size)
    assert model == "tts-1"


@pytest.mark.parametrize(
    "headers",
    [
        b'Content-Disposition: form-data; name="model2"',
        b'Content-Disposition: form-data; name="mode"',
        b'Content-Disposition: form-data; name="Model"',
        b'Content-Disposition: form-data; name="model "',
        b'Content-Disposition: form-data; filename="model"',
        b'Content-Disposition: form-data; name="model"; filename="m.txt"',  # a file
        b"Content-Disposition: form-data; name*=UTF-8''model",  # RFC 7578 4.2 forbids it
        b'X-Content-Disposition: form-data; name="model"',
    ],
)
async def test_parts_that_are_not_the_model_field(headers: bytes) -> None:
    body = hand_body((headers, b"gpt-4o"), field(b"language", b"en"))
    for size in SIZES:
        model, chunks, more, _ = await scan(body, HAND_TYPE, size)
        assert (model, more) == (None, False)
        assert b"".join(chunks) == body


@pytest.mark.parametrize(
    "headers",
    [
        b'Content-Disposition: form-data; name="model"',
        b'Content-Disposition: form-data; NAME="model"',  # parameter names: any case
        b'content-disposition: FORM-DATA; Name="model"',
        b"Content-Disposition: form-data; name=model",  # unquoted
        b'Content-Disposition: form-data ; name = "model" ',
        b'Content-Disposition: attachment; name="model"',  # Starlette does not check the type
        b'Content-Disposition: form-data; name="x"\r\nContent-Disposition: form-data; name="model"',
        b'Content-Type: text/plain\r\nContent-Disposition: form-data; name="model"',
    ],
)
async def test_parts_that_are_the_model_field(headers: bytes) -> None:
    body = hand_body(field(b"language", b"en"), (headers, b"gpt-4o"), field(b"n", b"1"))
    for size in SIZES:
        model, chunks, more, client = await scan(body, HAND_TYPE, size)
        assert model == "gpt-4o"
        assert await reassembled(chunks, more, client) == body


async def test_a_model_header_inside_file_data_does_not_count() -> None:
    inner = b'\r\n--other\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n'
    body, ctype = sdk_body({"file": ("a.txt", inner, "text/plain")})
    for size in SIZES:
        model, *_ = await scan(body, ctype, size)
        assert model is None


@pytest.mark.parametrize("size", SIZES)
async def test_over_long_value_is_cut_and_reading_stops(size: int) -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "a" * 5000})
    model, chunks, more, client = await scan(body, ctype, size)
    assert model == "a" * MAX_MODEL_BYTES
    if size < len(body):
        assert more and sum(map(len, chunks)) < 5000  # did not read the value to its end
    assert await reassembled(chunks, more, client) == body


async def test_value_of_exactly_the_maximum_is_whole() -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "m" * MAX_MODEL_BYTES})
    model, *_ = await scan(body, ctype, 7)
    assert model == "m" * MAX_MODEL_BYTES


async def test_over_long_multibyte_value_does_not_depend_on_chunking() -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "é" * 400})
    results = {(await scan(body, ctype, size))[0] for size in [1, 2, 3, 7, 300, 64 * 1024]}
    assert len(results) == 1
    (model,) = results
    assert model is not None and len(model) <= MAX_MODEL_BYTES
    assert model.startswith("é" * 128)


@pytest.mark.parametrize("size", SIZES)
async def test_value_not_utf8_comes_back_replaced(size: int) -> None:
    body = hand_body(field(b"model", b"gpt-\xff\xfe"), field(b"language", b"en"))
    model, *_ = await scan(body, HAND_TYPE, size)
    assert model == "gpt-\ufffd\ufffd"


@pytest.mark.parametrize("size", SIZES)
async def test_empty_model_value(size: int) -> None:
    body = hand_body(field(b"model", b""), field(b"language", b"en"))
    model, *_ = await scan(body, HAND_TYPE, size)
    assert model == ""


@pytest.mark.parametrize("size", SIZES)
async def test_disconnect_is_client_gone(size: int) -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO), "model": (None, b"whisper-1")})
    client = Client(body, size, disconnect_at=len(body) // 2)
    with pytest.raises(ClientGone):
        await read_model_field(ctype, client.first, client.more, client.receive, LIMIT)


@pytest.mark.parametrize("size", SIZES)
async def test_body_over_the_limit_is_413(size: int) -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO), "model": (None, b"whisper-1")})
    with pytest.raises(RequestTooLarge):
        await scan(body, ctype, size, limit=len(body) // 2)


async def test_first_chunk_over_the_limit_is_413() -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "whisper-1"})
    with pytest.raises(RequestTooLarge):
        await read_model_field(ctype, body, False, _never_called, len(body) - 1)


async def test_model_found_before_the_limit_is_reached() -> None:
    body, ctype = sdk_body({"file": ("a.wav", *AUDIO)}, {"model": "whisper-1"})
    model, chunks, more, _ = await scan(body, ctype, 64, limit=len(body) + 1)
    assert model == "whisper-1" and more


@pytest.mark.parametrize(
    "ctype",
    [
        b"multipart/form-data",
        b"multipart/form-data; boundary=",
        b"multipart/form-data; boundary=" + b"x" * 300,  # over the parser's limit
        b"multipart/mixed; boundary=" + BOUNDARY,
        b"application/octet-stream",
        b"",
        HAND_TYPE + b"; charset=utf-16-le",  # part names would be decoded with it upstream
        HAND_TYPE + b"; charset=no-such-charset",
    ],
)
async def test_not_readable_multipart_returns_what_was_read(ctype: bytes) -> None:
    body = hand_body(field(b"model", b"gpt-4o"))
    client = Client(body, 7)
    model, chunks, more = await read_model_field(
        ctype, client.first, client.more, client.receive, LIMIT
    )
    assert (model, chunks, more, client.calls) == (None, [client.first], True, 0)
    assert await reassembled(chunks, more, client) == body


async def test_utf8_charset_is_fine() -> None:
    body = hand_body(field(b"model", b"gpt-4o"))
    model, *_ = await scan(body, HAND_TYPE + b'; charset="UTF-8"', 7)
    assert model == "gpt-4o"


@pytest.mark.parametrize(
    "body",
    [
        b"not multipart at all" * 10,
        b"--wrong-boundary\r\n" + b"x" * 100,
        b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nv\r\n--" + BOUNDARY + b"--\r\n",
        b"--" + BOUNDARY + b"\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\nv",
    ],
)
async def test_malformed_body_returns_what_was_read(body: bytes) -> None:
    for size in SIZES:
        model, chunks, more, client = await scan(body, HAND_TYPE, size)
        assert model is None
        assert await reassembled(chunks, more, client) == body


async def test_mangled_bodies_never_raise() -> None:
    body = hand_body(
        field(b"language", b"en"),
        (b'Content-Disposition: form-data; name="file"; filename="a"', b"\r\n--" + b"z" * 50),
        field(b"model", b"gpt-4o"),
    )
    rng = random.Random(7578)
    for _ in range(300):
        mangled = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            mangled[rng.randrange(len(mangled))] = rng.choice(b'\r\n-;="\\ :b0mx\xff')
        for size in (1, 13):
            model, chunks, more, client = await scan(bytes(mangled), HAND_TYPE, size)
            assert model is None or isinstance(model, str)
            assert await reassembled(chunks, more, client) == bytes(mangled)


async def pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def passed(ctype: bytes, body: bytes, size: int, failure: list[Exception]) -> bytes:
    out = b""
    async for chunk in refuse_second_model(ctype, pieces(body, size), failure):
        out += chunk
    return out


@pytest.mark.parametrize("size", SIZES)
async def test_one_model_field_passes_unchanged(size: int) -> None:
    body, ctype = sdk_body({"file": ("model", *AUDIO)}, {"model": "whisper-1"})
    failure: list[Exception] = []
    assert await passed(ctype, body, size, failure) == body
    assert failure == []


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "second",
    [
        field(b"model", b"gpt-4o"),
        (b'Content-Disposition: form-data; name="model"; filename="m"', b"gpt-4o"),
        (b"content-disposition: attachment; NAME=model", b"gpt-4o"),
    ],
)
async def test_second_model_part_fails_before_its_headers_go(
    size: int, second: tuple[bytes, bytes]
) -> None:
    body = hand_body(field(b"model", b"whisper-1"), (b"Content-Type: a/b\r\n" + second[0], b"x"))
    sent = b""
    failure: list[Exception] = []
    with pytest.raises(BadRequest) as caught:
        async for chunk in refuse_second_model(HAND_TYPE, pieces(body, size), failure):
            sent += chunk
    assert failure == [caught.value]
    assert body.startswith(sent)
    assert len(sent) < body.rindex(b"\r\n\r\nx") + 4  # the second part's headers never all went


async def test_malformed_rest_fails() -> None:
    good = hand_body(field(b"model", b"whisper-1"))
    body = good[: good.rindex(b"--")] + b"\r\nno colon\r\n\r\nx\r\n--" + BOUNDARY + b"--\r\n"
    failure: list[Exception] = []
    with pytest.raises(BadRequest):
        await passed(HAND_TYPE, body, 7, failure)
    assert len(failure) == 1


async def test_not_multipart_passes_through() -> None:
    body = b"anything" * 100
    assert await passed(b"application/octet-stream", body, 7, []) == body
