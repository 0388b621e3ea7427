"""The benchmark's reference: the floor for any Python design of this proxy.

A bare pass-through: one ASGI callable on uvicorn (the same server settings as
`byok-proxy serve`: httptools, no access log, no X-Forwarded-* handling, no server or
date header) with one shared aiohttp session. It reads the request body, swaps the caller's
`Authorization` for a fixed upstream key, sends the request to the upstream and
streams the response bytes back as they come. No authentication of the caller, no
policy, no usage line, no metrics: what byok-proxy does on top of this is what the
benchmark's ratios measure.

It shares no code with the product on purpose, so that a change to the product
can never move the reference.

Run: `python -m bench.reference --port 9200 --upstream http://127.0.0.1:9100`.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

UPSTREAM_KEY = "sk-reference-" + "r" * 40
_DROP_REQUEST = frozenset({b"host", b"authorization", b"content-length", b"connection"})
_DROP_RESPONSE = frozenset({"transfer-encoding", "connection", "keep-alive"})


class PassThrough:
    """The ASGI callable; the session is made at lifespan startup."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _DROP_REQUEST
        ]
        headers.append(("Authorization", f"Bearer {UPSTREAM_KEY}"))
        url = self.upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        assert self.session is not None
        async with self.session.request(
            scope["method"], url, data=bytes(body), headers=headers
        ) as upstream:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": [
                        (name, value)
                        for name, value in upstream.raw_headers
                        if name.decode("latin-1").lower() not in _DROP_RESPONSE
                    ],
                }
            )
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    auto_decompress=False,
                    skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL")
    args = parser.parse_args()
    uvicorn.run(
        PassThrough(args.upstream),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        ws="none",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
