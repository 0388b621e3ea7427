"""The caller's side of a /v1 request: its body, read within the limit, and its disconnect.

- `read_all` reads a (JSON) body whole; `stream_body` hands an upload on as it
  arrives. Both stop at their limit with 413 (`max_body_bytes` for JSON read whole,
  `max_upload_bytes` for streamed uploads).
- `DisconnectWatch` cancels the request when the caller goes away, so the
  upstream response is closed at once (the tenant pays for every token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from proxy.asgi import Receive
from proxy.errors import RequestTooLarge
from proxy.usage import UsageRecord

WATCH_AFTER = 0.05  # seconds


class ClientGone(Exception):
    """The client disconnected; stop everything for this request."""


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"Request body over the {limit}-byte limit.")


class DisconnectWatch:
    """Cancels the request's task when the client disconnects, until stopped.

    The watching task starts only once a request has lasted `WATCH_AFTER`
    seconds: quick requests (most non-streamed ones) never pay for a task, and
    a client that leaves a long request is still noticed within that delay.
    """

    def __init__(
        self,
        receive: Receive,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
        record: UsageRecord,
    ) -> None:
        self._receive = receive
        self._target = task
        self._record = record
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._timer = loop.call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        if not self._stopped:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        # A bodyless request's first message is its (empty) body: keep listening.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._stopped:
            self._record.client_disconnected = True
            self._target.cancel()

    def stop(self) -> None:
        """Stop watching (before the last message is sent: uvicorn then reports a disconnect)."""
        self._stopped = True
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


async def next_chunk(receive: Receive, size: int, limit: int) -> tuple[bytes, bool]:
    """The body's next chunk, after `size` bytes already received, and whether more
    follows; ClientGone on a disconnect, 413 past `limit`."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone()
    chunk = message.get("body", b"")
    if size + len(chunk) > limit:
        raise too_large(limit)
    return chunk, bool(message.get("more_body"))


async def read_all(receive: Receive, first: bytes, limit: int) -> bytes:
    """The rest of a body whose first chunk was `first`, whole."""
    chunks, size, more = [first], len(first), True
    while more:
        chunk, more = await next_chunk(receive, size, limit)
        size += len(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


async def stream_body(
    receive: Receive, first: bytes, limit: int, failure: list[Exception]
) -> AsyncIterator[bytes]:
    """The caller's body as it arrives. aiohttp wraps what this raises in a
    ClientError, so the real cause also goes into `failure`."""
    size = len(first)
    if size > limit:  # uvicorn may hand over several network reads as one first chunk
        failure.append(too_large(limit))
        raise failure[0]
    yield first
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            failure.append(ClientGone())
            raise failure[0]
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            failure.append(too_large(limit))
            raise failure[0]
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return
