"""A fake OpenAI API: a real HTTP server on a loopback port, for end-to-end tests.

It records every request it sees (method, raw path, query, headers, body) and
answers like OpenAI for the endpoints the tests use. Behaviour is chosen by
the caller's key or model:

- a key in `revoked` → 401 whose message echoes the key (as OpenAI's does);
  in `no_quota` → 429 ``insufficient_quota``; in `forbidden` → 403;
- model ``rate-limited`` → 429 ``rate_limit_exceeded`` with retry-after and rate headers;
- model ``hold`` (streamed) → first chunk, then waits for `release` before the rest;
- model ``endless`` (streamed) → a chunk every 20 ms until the client goes away,
  recording when it noticed (`stream_closed`);
- model ``slow`` → waits 3 s before answering;
- model ``echo-<status>`` (``echo-gz-<status>``: gzipped) → that status, the error body
  echoing the key it was sent; ``big-429`` → a 429 with a 200 KB body;
- model ``broken`` (streamed) → one chunk, then the connection is cut;
- path ``/v1/redirect`` → 302 to ``/v1/models``;
- model ``gate`` → waits for `release` before anything else (the key is checked after);
- model ``pause`` → waits 0.3 s (so many requests are in flight at once);
- header ``OpenAI-Organization: org-wrong`` → 401 ``mismatched_organization`` whose message
  echoes the key; model ``no-scope`` → 401 for a restricted key missing a scope (no code);
- files (``/v1/files``) are kept per key, as OpenAI keeps them per project: list, upload,
  retrieve and delete see only the caller key's files;
- streamed model ``usage-in-last`` → the usage rides on the last content chunk;
  ``sized`` → the stream carries a Content-Length; ``linger`` → after the usage chunk
  and ``[DONE]`` the connection stays open until the client leaves; ``huge`` → one
  3 MiB event (chat) or a 3 MiB ``response.completed`` (Responses API);
- ``store_objects`` holds the Responses API's stored responses per key.
Every response carries two `Set-Cookie` headers, `x-request-id`,
`openai-processing-ms` and `x-ratelimit-*` headers.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from servers import free_port

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
CACHED_TOKENS = 8  # of the prompt, when the request names a `prompt_cache_key`
STREAM_CHUNKS = 5


def _usage_for(request: dict[str, Any]) -> dict[str, Any]:
    """Chat usage as OpenAI reports it; a `prompt_cache_key` gets a prompt-cache hit."""
    if not request.get("prompt_cache_key"):
        return USAGE
    return {**USAGE, "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0}}


_BOMB: list[bytes] = []


def _bomb() -> bytes:
    if not _BOMB:
        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = b" " * (1 << 20)
        parts = [z.compress(b'{"data":"')]
        parts += [z.compress(block.replace(b" ", b"a")) for _ in range(128)]
        parts += [z.compress(b'","usage":{"prompt_tokens":1}}'), z.flush()]
        _BOMB.append(b"".join(parts))
    return _BOMB[0]


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeOpenAI:
    """The fake server's state, shared with the test thread."""

    requests: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    first_chunk_sent: threading.Event = field(default_factory=threading.Event)
    stream_closed: threading.Event = field(default_factory=threading.Event)
    stream_closed_at: float | None = None
    raw_streams: list[bytes] = field(default_factory=list)
    compress: bool = False  # gzip JSON answers when the request accepts gzip
    revoked: set[str] = field(default_factory=set)
    no_quota: set[str] = field(default_factory=set)
    forbidden: set[str] = field(default_factory=set)
    counter: int = 0
    port: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> file, with "key"
    stored: dict[str, str] = field(default_factory=dict)  # stored response id -> key

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def keys_seen(self) -> list[str | None]:
        return [r.header("authorization") for r in self.requests]

    # --- ASGI --------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen = Seen(
            scope["method"],
            scope["raw_path"].decode(),
            scope["query_string"].decode(),
            [(k.decode().lower(), v.decode("latin-1")) for k, v in scope["headers"]],
            bytes(body),
        )
        self.requests.append(seen)
        self.counter += 1
        headers = [
            (b"x-request-id", f"up-req-{self.counter}".encode()),
            (b"openai-processing-ms", b"12"),
            (b"x-ratelimit-limit-requests", b"5000"),
            (b"x-ratelimit-remaining-requests", b"4999"),
            (b"set-cookie", b"__cf_bm=one; Path=/"),
            (b"set-cookie", b"_cfuvid=two; Path=/"),
        ]
        if self.compress and "gzip" in (seen.header("accept-encoding") or ""):
            send = _gzipping(send)
        key = (seen.header("authorization") or "").removeprefix("Bearer ")
        request: Any = {}
        if (seen.header("content-type") or "").lower().startswith("application/json") and seen.body:
            try:
                request = json.loads(seen.body)
            except (ValueError, RecursionError):  # OpenAI answers 400 to these
                return await self._json(
                    send, 400, [], {"error": {"message": "bad JSON", "code": "invalid_json"}}
                )
        model = request.get("model") if isinstance(request, dict) else None
        if model == "gate":
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        if model == "pause":
            await asyncio.sleep(0.3)
        if seen.header("openai-organization") == "org-wrong":
            return await self._json(
                send,
                401,
                headers,
                {
                    "error": {
                        "message": "OpenAI-Organization header should match organization for "
                        f"API key {key[:8]}****{key[-4:]} ({key}).",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "mismatched_organization",
                    }
                },
            )
        if model == "no-scope":
            return await self._json(
                send,
                401,
                headers,
                {
                    "error": {
                        "message": "You have insufficient permissions for this operation. "
                        f"Missing scopes: model.request. Key: {key[:8]}***{key[-4:]}.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
        if key in self.revoked:
            return await self._json(
                send,
                401,
                headers,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {key}. You can find "
                        "your API key at https://platform.openai.com/account/api-keys.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        if key in self.no_quota:
            return await self._json(
                send,
                429,
                headers,
                {
                    "error": {
                        "message": "You exceeded your current quota, please check your "
                        "plan and billing details.",
                        "type": "insufficient_quota",
                        "param": None,
                        "code": "insufficient_quota",
                    }
                },
            )
        if key in self.forbidden:
            return await self._json(
                send,
                403,
                headers,
                {
                    "error": {
                        "message": "Country, region, or territory not supported",
                        "type": "request_forbidden",
                        "param": None,
                        "code": "unsupported_country",
                    }
                },
            )

        path = seen.path.removeprefix("/v1")
        if model == "rate-limited":
            return await self._json(
                send,
                429,
                [*headers, (b"retry-after", b"7"), (b"x-ratelimit-reset-requests", b"7s")],
                {
                    "error": {
                        "message": "Rate limit reached for requests",
                        "type": "requests",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                },
            )
        if isinstance(model, str) and model.startswith("echo-"):
            # A careless upstream: the error body echoes the key it was sent, whole.
            status = int(model.rsplit("-", 1)[1])
            echoed = {
                "error": {
                    "message": f"Bad request with key {key}; other key sk-other-{'x' * 30}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "echo",
                    "detail": {"authorization": f"Bearer {key}"},
                }
            }
            if model.startswith("echo-gz-"):
                data = gzip.compress(json.dumps(echoed).encode())
                head = [*headers, (b"content-type", b"application/json")]
                head += [
                    (b"content-encoding", b"gzip"),
                    (b"content-length", str(len(data)).encode()),
                ]
                await send({"type": "http.response.start", "status": status, "headers": head})
                await send({"type": "http.response.body", "body": data})
                return None
            return await self._json(send, status, headers, echoed)
        if model == "bomb":
            # 130 KB of gzip that inflates to 128 MiB (the usage scan must stay bounded).
            data = _bomb()
            head = [*headers, (b"content-type", b"application/json")]
            head += [(b"content-encoding", b"gzip")]
            head += [(b"content-length", str(len(data)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": data})
            return None
        if model == "big-429":
            padding = "p" * 200_000
            return await self._json(
                send, 429, headers, {"error": {"message": padding, "code": "rate_limit_exceeded"}}
            )
        if model == "slow":
            await asyncio.sleep(3)

        if path == "/redirect":
            location = f"http://127.0.0.1:{self.port}/v1/models".encode()
            return await self._json(send, 302, [*headers, (b"location", location)], {})
        if seen.method == "GET" and path.startswith("/responses/") and "stream=true" in seen.query:
            return await self._chat_stream(send, headers, {"model": "endless"}, receive)
        if path.startswith("/models"):
            return await self._json(
                send,
                200,
                headers,
                {
                    "object": "list",
                    "data": [
                        {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"}
                    ],
                },
            )
        if path == "/chat/completions":
            if request.get("stream"):
                return await self._chat_stream(send, headers, request, receive)
            return await self._json(
                send,
                200,
                headers,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Hello!"},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": _usage_for(request),
                },
            )
        if path == "/embeddings":
            vector = [0.25, 0.5, 0.75]
            encoded: Any = vector
            if request.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack("<3f", *vector)).decode()
            return await self._json(
                send,
                200,
                headers,
                {
                    "object": "list",
                    "model": model,
                    "data": [{"object": "embedding", "index": 0, "embedding": encoded}],
                    "usage": {"prompt_tokens": 5, "total_tokens": 5},
                },
            )
        if path == "/responses":
            if request.get("stream"):
                return await self._responses_stream(send, headers, model, request)
            answer = self._response_object(model, request)
            if request.get("store") is not False:  # OpenAI stores responses by default
                answer["id"] = f"resp_{len(self.stored) + 1}"
                self.stored[answer["id"]] = key
            if isinstance(request.get("metadata"), dict):
                answer["metadata"] = request["metadata"]
            if isinstance(request.get("user"), str):
                answer["user"] = request["user"]
            return await self._json(send, 200, headers, answer)
        if path.startswith("/files"):
            return await self._files(send, headers, seen, key, path)
        if path == "/audio/transcriptions":
            return await self._json(send, 200, headers, {"text": "hello from audio"})
        return await self._json(
            send,
            404,
            headers,
            {
                "error": {
                    "message": f"Unknown path {path}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "unknown_url",
                }
            },
        )

    async def _files(
        self, send: Any, headers: list[tuple[bytes, bytes]], seen: Seen, key: str, path: str
    ) -> None:
        """The Files API, with files kept per key (OpenAI keeps them per project)."""
        mine = {i: f for i, f in self.files.items() if f["key"] == key}
        public = {i: {k: v for k, v in f.items() if k != "key"} for i, f in mine.items()}
        if path == "/files" and seen.method == "POST":
            file_id = f"file-{len(self.files) + 1}-" + hashlib.sha256(seen.body).hexdigest()[:8]
            self.files[file_id] = {
                "id": file_id,
                "object": "file",
                "bytes": len(seen.body),
                "created_at": 1,
                "filename": "upload",
                "purpose": "batch",
                "status": "processed",
                "key": key,
            }
            return await self._json(
                send,
                200,
                headers,
                public.get(file_id) or {k: v for k, v in self.files[file_id].items() if k != "key"},
            )
        if path == "/files":
            return await self._json(
                send, 200, headers, {"object": "list", "data": list(public.values())}
            )
        file_id = path.removeprefix("/files/")
        if file_id not in mine:
            return await self._json(
                send,
                404,
                headers,
                {
                    "error": {
                        "message": f"No such File object: {file_id}",
                        "type": "invalid_request_error",
                        "param": "id",
                        "code": None,
                    }
                },
            )
        if seen.method == "DELETE":
            del self.files[file_id]
            return await self._json(
                send, 200, headers, {"id": file_id, "object": "file", "deleted": True}
            )
        return await self._json(send, 200, headers, public[file_id])

    @staticmethod
    async def _json(send: Any, status: int, headers: list[tuple[bytes, bytes]], obj: Any) -> None:
        body = json.dumps(obj).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _response_object(model: str | None, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi there", "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 9,
                "output_tokens": 4,
                "total_tokens": 13,
                "input_tokens_details": {
                    "cached_tokens": CACHED_TOKENS if request.get("prompt_cache_key") else 0
                },
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    async def _chat_stream(
        self, send: Any, headers: list[tuple[bytes, bytes]], request: dict[str, Any], receive: Any
    ) -> None:
        model = request.get("model")
        with_usage = (request.get("stream_options") or {}).get("include_usage") is True
        if model in ("sized", "usage-in-last", "huge", "linger"):
            return await self._prepared_stream(send, headers, model, with_usage, receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), *headers],
            }
        )
        sent: list[bytes] = []

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _chunk(model, delta, finish, **({"usage": None} if with_usage else {}))

        async def emit(data: bytes) -> None:
            sent.append(data)
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if model == "endless":
            gone = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.create_task(watch())
            try:
                while not gone.is_set():
                    await emit(chunk({"content": "x"}))
                    try:
                        await asyncio.wait_for(gone.wait(), 0.02)
                    except TimeoutError:
                        pass
            finally:
                watcher.cancel()
                self.stream_closed_at = time.monotonic()
                self.stream_closed.set()
            return

        await emit(chunk({"role": "assistant", "content": ""}))
        if model == "broken":  # the upstream dies mid-stream
            raise RuntimeError("fake upstream crashed mid-stream")
        if model == "hold":
            self.first_chunk_sent.set()
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        for i in range(STREAM_CHUNKS):
            await emit(chunk({"content": f"tok{i} "}))
        await emit(chunk({}, "stop"))
        if with_usage:
            usage_chunk = {
                "id": "chatcmpl-s",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [],
                "usage": _usage_for(request),
            }
            await emit(
                b"data: " + json.dumps(usage_chunk, separators=(",", ":")).encode() + b"\n\n"
            )
        await emit(b"data: [DONE]\n\n")
        self.raw_streams.append(b"".join(sent))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _prepared_stream(
        self,
        send: Any,
        headers: list[tuple[bytes, bytes]],
        model: str,
        with_usage: bool,
        receive: Any,
    ) -> None:
        """The chat streams whose whole body is known in advance (see the module docstring)."""

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            return _chunk(model, delta, finish, **extra)

        usage_only = (
            b"data: "
            + json.dumps(
                {
                    "id": "chatcmpl-s",
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": USAGE,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n\n"
        )
        content = "x" * (3 * 1024 * 1024) if model == "huge" else "tok"
        blocks = [chunk({"role": "assistant", "content": ""}), chunk({"content": content})]
        if model == "usage-in-last" and with_usage:
            blocks.append(chunk({}, "stop", usage=USAGE))
        else:
            blocks.append(chunk({}, "stop"))
            if with_usage:
                blocks.append(usage_only)
        blocks.append(b"data: [DONE]\n\n")
        body = b"".join(blocks)
        start_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), *headers]
        if model == "sized":
            start_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        self.raw_streams.append(body)
        if model == "huge":  # in 64 KiB pieces, as a socket would deliver it
            for i in range(0, len(body), 65536):
                await send(
                    {"type": "http.response.body", "body": body[i : i + 65536], "more_body": True}
                )
        else:
            for block in blocks:
                await send({"type": "http.response.body", "body": block, "more_body": True})
        if model == "linger":  # everything sent, the connection left open
            self.first_chunk_sent.set()
            while (await receive())["type"] != "http.disconnect":
                pass
            self.stream_closed.set()
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _responses_stream(
        self,
        send: Any,
        headers: list[tuple[bytes, bytes]],
        model: str | None,
        request: dict[str, Any],
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), *headers],
            }
        )
        final = self._response_object(model, request)
        if model == "huge":  # an image in the final event: one 3 MiB event
            final["output"].append(
                {"type": "image_generation_call", "id": "ig_1", "result": "A" * (3 * 1024 * 1024)}
            )
        events = [
            (
                "response.created",
                {
                    "type": "response.created",
                    "sequence_number": 0,
                    "response": {**final, "status": "in_progress", "usage": None, "output": []},
                },
            ),
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": 1,
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": "Hi there",
                    "logprobs": [],
                },
            ),
            (
                "response.completed",
                {"type": "response.completed", "sequence_number": 2, "response": final},
            ),
        ]
        body = b"".join(
            f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
        )
        self.raw_streams.append(body)
        for i in range(0, len(body), 65536):
            await send(
                {"type": "http.response.body", "body": body[i : i + 65536], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _chunk(model: Any, delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
    """One chat.completion.chunk event, compact as OpenAI sends it."""
    obj: dict[str, Any] = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _gzipping(send: Any) -> Any:
    """Wrap `send` so a one-piece body goes out gzip-compressed."""
    start: dict[str, Any] = {}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message.get("more_body") or not start:
            if start:
                await send(dict(start))
                start.clear()
            await send(message)
            return
        body = gzip.compress(message.get("body", b""))
        headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        headers += [(b"content-encoding", b"gzip"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        start.clear()
        await send({"type": "http.response.body", "body": body})

    return wrapped


class ServerThread:
    """Runs an ASGI app with uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any, port: int | None = None, *, like_serve: bool = False) -> None:
        """`like_serve`: uvicorn set up as `byok-proxy serve` does (no Server/Date headers
        of its own); otherwise it adds them, like a real upstream."""
        self.port = port or free_port()
        extra = (
            {"server_header": False, "date_header": False, "ws": "none", "proxy_headers": False}
            if like_serve
            else {}
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="auto",
            timeout_graceful_shutdown=2,
            # Idle keep-alive connections kept longer than the proxy's pool keeps them
            # (30 s), as OpenAI does: with uvicorn's 5 s, a loaded machine saw the fake
            # close a connection the proxy was just reusing for a 60 MiB body (a reset).
            timeout_keep_alive=75,
            **extra,  # type: ignore[arg-type]
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 180  # generous: a loaded machine starts slowly
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_fake() -> tuple[FakeOpenAI, ServerThread]:
    """A fake OpenAI on a free port (enter the returned ServerThread to run it)."""
    fake = FakeOpenAI()
    server = ServerThread(fake)
    fake.port = server.port
    return fake, server
