"""Reading token usage out of responses as they pass, by structure, for any size.

Usage is the JSON `usage` object of a response body (top level), or of an
event of a stream (top level for chat/completions chunks, `response.usage`
for the Responses API's events). It is found by parsing, never by looking for
a substring, so text that mentions "usage" cannot hide or fake it.

- `ask_for_usage(body)`: a streamed chat completion gets
  `stream_options.include_usage: true` (the one change the proxy makes to a
  request body), and we remember whether the client had asked for it.
- `SSEScanner`: an event stream is forwarded block by block as it arrives and
  framed into events in one linear pass. An event of up to `_SMALL_EVENT`
  bytes is parsed whole (only if the bytes `"usage"` occur in it, a cheap
  filter, not the decision); a bigger one (a `response.completed` carrying an
  image) is parsed incrementally as it passes, with constant memory. When the
  client did not ask for usage, the usage-only chunk (empty `choices`) is cut
  out; only then are partial events held back until their blank line arrives.
- `BodyUsage`: a plain body, parsed whole when small, incrementally when not;
  gzip/deflate bodies are inflated for the parse (up to `MAX_INFLATED` bytes).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

import ijson

# A cheap filter, not the decision: only events where a usage *object* may start are parsed
# (with include_usage, every chunk carries `"usage":null`).
_MARKER = re.compile(rb'"usage"\s*:\s*\{')
_SMALL_EVENT = 256 * 1024  # parsed whole; bigger events are parsed as they pass
_MAX_HELD = 64 * 1024  # strip mode: longest partial event held back (usage chunks are tiny)
MAX_INFLATED = 64 * 1024 * 1024  # most bytes inflated to read one compressed body
STEP = 1024 * 1024  # most bytes inflated (and then parsed) per step on the event loop


@dataclass(frozen=True)
class Usage:
    """Token counts; None where the upstream did not say. `cached_tokens` is the part of
    the prompt served from OpenAI's prompt cache (billed at the cached-input price)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None

    @classmethod
    def from_object(cls, usage: Any) -> Usage | None:
        """Chat/embeddings (`prompt_tokens`...) or Responses API (`input_tokens`...) usage,
        with `prompt_tokens_details` / `input_tokens_details` `.cached_tokens`."""
        if not isinstance(usage, dict):
            return None

        def count(source: dict[str, Any], *names: str) -> int | None:
            for name in names:
                value = source.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            return None

        cached = None
        for details in ("prompt_tokens_details", "input_tokens_details"):
            found = usage.get(details)
            if isinstance(found, dict) and (cached := count(found, "cached_tokens")) is not None:
                break
        return cls(
            count(usage, "prompt_tokens", "input_tokens"),
            count(usage, "completion_tokens", "output_tokens"),
            count(usage, "total_tokens"),
            cached,
        )

    @property
    def tokens(self) -> int | None:
        """Total tokens: `total_tokens`, else prompt + completion, else None."""
        if self.total_tokens is not None:
            return self.total_tokens
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


def event_usage(obj: Any) -> Usage | None:
    """The usage of one parsed stream event: `usage`, or `response.usage` (Responses API)."""
    if not isinstance(obj, dict):
        return None
    found = obj.get("usage")
    if found is None and isinstance(obj.get("response"), dict):
        found = obj["response"].get("usage")
    return Usage.from_object(found)


def _event_json(event: bytes) -> Any:
    lines = [
        line.rstrip(b"\r")[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except (ValueError, RecursionError):
        return None


class Inflater:
    """Incremental gzip/deflate decoding, bounded to `MAX_INFLATED` bytes in all and to
    `STEP` bytes per call: input that inflates to more waits in `pending` for `more()`,
    so a caller can let the event loop run between steps."""

    def __init__(self, encoding: str | None, limit: int = MAX_INFLATED) -> None:
        encoding = (encoding or "").strip().lower() or "identity"
        self.readable = encoding in ("identity", "gzip", "x-gzip", "deflate")
        compressed = self.readable and encoding != "identity"
        self._zlib = zlib.decompressobj(wbits=47) if compressed else None
        self._left = limit
        self._tail = b""

    @property
    def compressed(self) -> bool:
        """True for a gzip/deflate body (its bytes are not the text)."""
        return self._zlib is not None

    @property
    def pending(self) -> bool:
        """Whether input fed so far still holds output (take it with `more()`)."""
        return self.readable and bool(self._tail)

    def feed(self, block: bytes) -> bytes | None:
        """The first decoded bytes of `block`; None once the body cannot be read further."""
        if not self.readable:
            return None
        if self._zlib is None:
            return block
        return self._step(self._tail + block if self._tail else block)

    def more(self) -> bytes | None:
        """The next step of what `feed` left pending."""
        tail, self._tail = self._tail, b""
        return self._step(tail) if self.readable else None

    def whole(self, body: bytes) -> bytes | None:
        """All of `body`, decoded (for small bodies: error bodies)."""
        first = self.feed(body)
        if first is None:
            return None
        parts = [first]
        while self.pending:
            step = self.more()
            if step is None:
                return None
            parts.append(step)
        return b"".join(parts)

    def _step(self, data: bytes) -> bytes | None:
        assert self._zlib is not None
        try:
            out = self._zlib.decompress(data, min(self._left + 1, STEP))
        except zlib.error:
            self.readable = False
            return None
        self._left -= len(out)
        if self._left < 0:
            self.readable = False  # over the bound: stop reading (the body still passes)
            return None
        self._tail = self._zlib.unconsumed_tail
        return out


class _Incremental:
    """Pulls JSON objects at given prefixes out of a document fed in pieces (ijson, C)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.found: list[Any] = []
        self._coros = []
        for prefix in prefixes:
            target = ijson.sendable_list()
            self._coros.append((target, ijson.items_coro(target, prefix, use_float=True)))
        self.failed = False

    def feed(self, data: bytes) -> None:
        if self.failed or not data:
            return
        for target, coro in self._coros:
            try:
                coro.send(data)
            except (ijson.JSONError, ijson.IncompleteJSONError, ValueError, RecursionError):
                self.failed = True
                return
            if target:
                self.found.extend(target)
                del target[:]

    def close(self) -> None:
        if self.failed:
            return
        for target, coro in self._coros:
            try:
                coro.close()
            except (ijson.JSONError, ijson.IncompleteJSONError, ValueError):
                pass
            self.found.extend(target)
            del target[:]


class BodyUsage:
    """The top-level `usage` of a JSON body fed in blocks (any size, gzip or plain)."""

    def __init__(self, content_encoding: str | None) -> None:
        self._inflate = Inflater(content_encoding)
        self._small: list[bytes] | None = []
        self._size = 0
        self._parser: _Incremental | None = None

    @property
    def pending(self) -> bool:
        """Whether a step of inflation waits (call `more()`, letting the loop run first)."""
        return self._inflate.pending

    def more(self) -> None:
        self._take(self._inflate.more())

    def feed(self, block: bytes) -> None:
        self._take(self._inflate.feed(block))

    def _take(self, data: bytes | None) -> None:
        if data is None:
            self._small = None
            self._parser = None
            return
        if self._small is not None:
            self._small.append(data)
            self._size += len(data)
            if self._size <= _SMALL_EVENT:
                return
            self._parser = _Incremental(("usage",))  # too big to parse whole: go incremental
            self._parser.feed(b"".join(self._small))
            self._small = None
        elif self._parser is not None:
            self._parser.feed(data)

    def seen(self) -> Usage | None:
        """The usage already passed in a big body that did not end (a client that left)."""
        if self._parser is None:
            return None
        return next((u for u in map(Usage.from_object, self._parser.found) if u), None)

    def usage(self) -> Usage | None:
        """The usage, once the whole body was fed; None if there is none or it is unreadable."""
        if self._small is not None:
            try:
                obj = json.loads(b"".join(self._small))
            except (ValueError, RecursionError):
                return None
            return Usage.from_object(obj.get("usage")) if isinstance(obj, dict) else None
        if self._parser is None:
            return None
        self._parser.close()
        return next((u for u in map(Usage.from_object, self._parser.found) if u), None)


_BOUNDARY = re.compile(rb"\r?\n\r?\n")


class SSEScanner:
    """Passes an event stream through, reading usage from its events and optionally
    dropping the usage-only chunk. Linear in the stream size, whatever the event sizes."""

    def __init__(self, strip_usage_chunk: bool, content_encoding: str | None = None) -> None:
        self.strip = strip_usage_chunk
        self.usage: Usage | None = None
        self._inflate = Inflater(content_encoding)
        if self._inflate.compressed:
            self.strip = False  # compressed anyway: pass it as it is, read a decoded copy
        self._parts: list[bytes] = []  # the current event so far (small events)
        self._size = 0
        self._big: _Incremental | None = None  # the current event, when it is big
        self._carry = b""  # last bytes of the previous block (a boundary may straddle)
        self._held: list[bytes] = []  # strip mode: what is held back from the client
        self._held_size = 0
        self._passing = False  # strip mode: the current event is too long to hold back

    def feed(self, block: bytes) -> bytes:
        """Take one block from the upstream; return what to send to the client now."""
        data = self._inflate.feed(block)
        if data is None:  # unreadable stream: pass it on untouched
            return self._release() + block if self.strip else block
        if (
            not self._parts
            and self._big is None
            and data.endswith(b"\n\n")
            and not _MARKER.search(data)
            and data is block
        ):
            # The usual block: whole events, none with usage. Nothing to hold or read.
            self._carry = data[-3:]
            return block
        if not self.strip:
            self._frame(data, None)
            return block
        out: list[bytes] = []
        self._frame(data, out)
        if self._held_size > _MAX_HELD:  # a long event is never the usage chunk: let it go
            out.append(self._release())
            self._passing = True
        return b"".join(out)

    def finish(self) -> bytes:
        """End of stream: read and release whatever is held back."""
        out: list[bytes] | None = [] if self.strip else None
        if self._parts or self._big is not None:
            self._end_event(b"", out)
        return b"".join(out) + self._release() if out is not None else b""

    def _release(self) -> bytes:
        held, self._held, self._held_size = b"".join(self._held), [], 0
        return held

    def _frame(self, data: bytes, out: list[bytes] | None) -> None:
        """Split `data` into the current event's pieces and complete events."""
        probe = self._carry + data
        offset = len(self._carry)
        start = 0  # in `data`
        for match in _BOUNDARY.finditer(probe):
            end = match.end() - offset
            if end <= start:
                continue  # a boundary wholly inside the carry was handled before
            self._end_event(data[start:end], out)
            start = end
        if start < len(data):
            self._add(data[start:], out)
        self._carry = probe[-3:]

    def _add(self, piece: bytes, out: list[bytes] | None) -> None:
        """`piece` continues the current event."""
        if out is not None:
            if self._passing:
                out.append(piece)
            else:
                self._held.append(piece)
                self._held_size += len(piece)
        if self._big is not None:
            self._big.feed(piece)
            return
        self._parts.append(piece)
        self._size += len(piece)
        if self._size > _SMALL_EVENT:
            self._big = _event_parser(b"".join(self._parts))
            self._parts, self._size = [], 0

    def _end_event(self, piece: bytes, out: list[bytes] | None) -> None:
        """`piece` ends the current event (with its blank line): read it, send or drop it."""
        obj: Any = None
        if self._big is not None:
            self._big.feed(_payload_end(piece))
            self._big.close()
            usage = next((u for u in map(Usage.from_object, self._big.found) if u), None)
            self._big = None
        else:
            event = b"".join([*self._parts, piece]) if self._parts else piece
            self._parts, self._size = [], 0
            usage = None
            if _MARKER.search(event):
                obj = _event_json(event)
                usage = event_usage(obj)
        if usage is not None:
            self.usage = usage
        if out is not None:
            held = self._release()
            usage_only = usage is not None and isinstance(obj, dict) and obj.get("choices") == []
            if not usage_only or self._passing:
                out.append(held + piece)
        self._passing = False


def _payload_end(piece: bytes) -> bytes:
    """The data bytes of the last piece of a big event (its trailing blank line removed)."""
    return piece.rstrip(b"\r\n")


def _event_parser(head: bytes) -> _Incremental:
    """An incremental parser for a big event whose first bytes are `head`.

    A big event is one `data:` line (OpenAI's are); its JSON starts after the
    first `data:` and runs to the end of the event.
    """
    parser = _Incremental(("usage", "response.usage"))
    at = head.find(b"data:")
    if at < 0 or (at > 0 and head[at - 1 : at] not in (b"\n", b"\r")):
        parser.failed = True
        return parser
    parser.feed(head[at + 5 :])
    return parser
