"""Reading token usage out of responses as they pass, touching as little as possible.

- `ask_for_usage(body)`: a streamed chat completion gets
  `stream_options.include_usage: true` (the one change the proxy makes to a
  request body), and we remember whether the client had asked for it.
- `SSEScanner`: for an event stream, each block is forwarded as it arrives; only
  a block that holds a usage object is parsed. When the client did not ask for
  usage, the usage-only chunk (empty `choices`) is cut out, so the client sees
  the stream it would have seen from OpenAI; only then are partial events held
  back until their blank line arrives (an SSE client cannot use them earlier).
- `JSONTail`: for a plain response, keeps the last bytes of the body (usage
  sits at the end of OpenAI's JSON) and decodes just that object.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

_MARKERS = (b'"usage":{', b'"usage": {')
_TAIL_BYTES = 16 * 1024
_MAX_PENDING = 1024 * 1024
_MAX_COMPRESSED = 8 * 1024 * 1024


@dataclass(frozen=True)
class Usage:
    """Token counts; None where the upstream did not say."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    @classmethod
    def from_object(cls, usage: Any) -> Usage | None:
        """Chat/embeddings (`prompt_tokens`...) or Responses API (`input_tokens`...) usage."""
        if not isinstance(usage, dict):
            return None

        def count(*names: str) -> int | None:
            for name in names:
                value = usage.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            return None

        return cls(
            count("prompt_tokens", "input_tokens"),
            count("completion_tokens", "output_tokens"),
            count("total_tokens"),
        )


def ask_for_usage(body: bytes, request: dict[str, Any]) -> tuple[bytes, bool]:
    """Make a streamed chat completion request (`body`, parsed as `request`) ask for usage.

    Returns the body to send and True when the client had not asked itself
    (so the usage chunk must be removed from what it sees). A body this cannot
    change safely (not UTF-8, or not re-serialisable) goes unchanged.
    """
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return body, False  # UTF-16/32 JSON: an ASCII splice would corrupt it
    if "stream_options" not in request:
        # Splice rather than re-serialise: every other byte stays the caller's.
        start = body.index(b"{") + 1
        return body[:start] + b'"stream_options":{"include_usage":true},' + body[start:], True
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    try:
        text = json.dumps(
            {**request, "stream_options": merged},
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except ValueError:
        return body, False
    return text.encode(), True


def _has_usage(data: bytes) -> bool:
    return _MARKERS[0] in data or _MARKERS[1] in data


def _event_json(event: bytes) -> Any:
    lines = [
        line.rstrip(b"\r")[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _last_event_end(data: bytes) -> int:
    """Index just past the last blank line (event end) in `data`, or -1."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


class SSEScanner:
    """Passes an event stream through, picking up usage and optionally dropping its chunk."""

    def __init__(self, strip_usage_chunk: bool) -> None:
        self.strip = strip_usage_chunk
        self.usage: Usage | None = None
        self._pending = b""

    def feed(self, block: bytes) -> bytes:
        """Take one block from the upstream; return what to send to the client now."""
        if not self._pending and block.endswith(b"\n\n"):
            # The usual case: whole events only. Nothing to hold back.
            if _has_usage(block):
                complete = self._take_usage(block)
                return complete if self.strip else block
            return block
        data = self._pending + block if self._pending else block
        end = _last_event_end(data)
        if end < 0:
            if len(data) > _MAX_PENDING:  # not SSE as we know it: stop holding, pass it on
                self._pending = b""
                return data if self.strip else block
            self._pending = data
            return b"" if self.strip else block
        complete, self._pending = data[:end], data[end:]
        if len(self._pending) > _MAX_PENDING:
            complete, self._pending = data, b""
        if _has_usage(complete):
            complete = self._take_usage(complete)
        return complete if self.strip else block

    def finish(self) -> bytes:
        """End of stream: scan and release whatever is held back."""
        rest, self._pending = self._pending, b""
        if rest and _has_usage(rest):
            rest = self._take_usage(rest)
        return rest if self.strip else b""

    def _take_usage(self, data: bytes) -> bytes:
        parts = _EVENT_END.split(data)  # events, separators kept in between
        seps = _EVENT_END.findall(data)
        out = []
        for i, event in enumerate(parts):
            sep = seps[i] if i < len(seps) else b""
            if _has_usage(event):
                obj = _event_json(event)
                if isinstance(obj, dict):
                    found = obj.get("usage")
                    if found is None and isinstance(obj.get("response"), dict):
                        found = obj["response"].get("usage")  # Responses API
                    usage = Usage.from_object(found)
                    if usage is not None:
                        self.usage = usage
                        if self.strip and obj.get("choices") == []:
                            continue  # the usage-only chunk, with its blank line
            out.append(event + sep)
        return b"".join(out)


class JSONTail:
    """Keeps the end of a JSON body to read its `usage` without parsing the whole body."""

    def __init__(self, content_encoding: str | None) -> None:
        self.encoding = (content_encoding or "").lower() or None
        self._chunks: list[bytes] = []
        self._size = 0
        self._tail = b""

    def feed(self, block: bytes) -> None:
        if self.encoding:
            if self._size + len(block) <= _MAX_COMPRESSED:
                self._chunks.append(block)
            self._size += len(block)
        else:
            self._tail = (self._tail + block)[-_TAIL_BYTES:] if self._tail else block[-_TAIL_BYTES:]

    def usage(self) -> Usage | None:
        """The body's top-level usage, if one can be read."""
        tail = self._tail
        if self.encoding:
            if self._size > _MAX_COMPRESSED or self.encoding not in ("gzip", "deflate"):
                return None
            try:
                tail = zlib.decompress(b"".join(self._chunks), wbits=47)[-_TAIL_BYTES:]
            except zlib.error:
                return None
        at = tail.rfind(b'"usage"')
        while at > 0 and tail[at - 1 : at] == b"\\":
            at = tail.rfind(b'"usage"', 0, at)
        if at < 0:
            return None
        text = tail[at + 7 :].decode("utf-8", "replace").lstrip()
        if not text.startswith(":"):
            return None
        try:
            value, _ = json.JSONDecoder().raw_decode(text[1:].lstrip())
        except ValueError:
            return None
        return Usage.from_object(value)
