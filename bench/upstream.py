"""A fast fake OpenAI upstream for the benchmark: bare asyncio + httptools, HTTP/1.1 keep-alive.

- `GET /v1/models` → a model list (key validation).
- `POST /v1/embeddings` → one embedding with usage (`EMBEDDING`; used by the soak).
- `POST /v1/chat/completions` → a chat completion with usage, or, when the body
  says `"stream":true`, an SSE stream of `chunks` chunks `interval_ms` apart
  (query string, defaults 20 and 20), plus a usage chunk when the body asks for
  `include_usage`. The stream's bytes are `stream_bytes(chunks, with_usage)`,
  so a client can check what it received.

Run: `python -m bench.upstream --port 9100`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import parse_qs, urlsplit

import httptools

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    },
    separators=(",", ":"),
).encode()
EMBEDDING = json.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456, 0.0789]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    },
    separators=(",", ":"),
).encode()
# What OpenAI sends on every response (https://platform.openai.com/docs/guides/rate-limits);
# a proxy enforcing its own limits replaces these rather than adding to them.
RATE_LIMIT_HEADERS = (
    b"x-ratelimit-limit-requests: 30000\r\nx-ratelimit-limit-tokens: 150000000\r\n"
    b"x-ratelimit-remaining-requests: 29999\r\nx-ratelimit-remaining-tokens: 149999985\r\n"
    b"x-ratelimit-reset-requests: 2ms\r\nx-ratelimit-reset-tokens: 0s\r\n"
)
MODELS = (
    b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1,'
    b'"owned_by":"openai"}]}'
)


def chunk_bytes(i: int, with_usage: bool) -> bytes:
    """The i-th SSE event of a stream."""
    usage = ',"usage":null' if with_usage else ""
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
        b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok%d "},'
        b'"finish_reason":null}]%s}\n\n' % (i, usage.encode())
    )


def usage_chunk(chunks: int) -> bytes:
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
        b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,'
        b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (chunks, chunks + 12)
    )


def stream_bytes(chunks: int, with_usage: bool) -> bytes:
    """Everything a stream of `chunks` chunks carries (what a client must receive)."""
    body = b"".join(chunk_bytes(i, with_usage) for i in range(chunks))
    if with_usage:
        body += usage_chunk(chunks)
    return body + b"data: [DONE]\n\n"


def proxied_stream_bytes(chunks: int) -> bytes:
    """What a client must receive through byok-proxy: the proxy asked for usage (so every
    chunk carries `"usage":null`, as OpenAI's do) and removed the usage chunk."""
    return stream_bytes(chunks, with_usage=True).replace(usage_chunk(chunks), b"")


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path = self.url.split(b"?", 1)[0]
        if path.endswith(b"/models"):
            self._send(MODELS)
        elif path.endswith(b"/embeddings"):
            self._send(EMBEDDING)
        elif b'"stream":true' in self.body or b'"stream": true' in self.body:
            query = parse_qs(urlsplit(self.url.decode()).query)
            chunks = int(query.get("chunks", ["20"])[0])
            interval = int(query.get("interval_ms", ["20"])[0]) / 1000
            with_usage = b'"include_usage":true' in self.body
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._stream(chunks, interval, with_usage))
        else:
            self._send(COMPLETION)

    def _send(self, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: req-bench\r\nopenai-processing-ms: 1\r\n%s\r\n%s"
            % (len(body), RATE_LIMIT_HEADERS, body)
        )

    async def _stream(self, chunks: int, interval: float, with_usage: bool) -> None:
        transport = self.transport
        assert transport is not None

        def write(data: bytes) -> None:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))

        transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nx-request-id: req-bench\r\n\r\n"
        )
        try:
            for i in range(chunks):
                if i:
                    await asyncio.sleep(interval)
                if transport.is_closing():
                    return
                write(chunk_bytes(i, with_usage))
            if with_usage:
                write(usage_chunk(chunks))
            write(b"data: [DONE]\n\n")
            transport.write(b"0\r\n\r\n")
            transport.resume_reading()
        except (ConnectionError, RuntimeError):
            transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, backlog=4096)
    print(f"fake OpenAI upstream on http://{host}:{port}/v1 (Ctrl-C stops it)", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass  # Ctrl-C: the documented way to stop it


if __name__ == "__main__":
    main()
