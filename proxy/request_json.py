"""What the proxy reads from a JSON request body (`model`, `stream`, `stream_options`), and
the one change it makes to it: asking a streamed chat completion for its usage.

- Bodies up to `SMALL` (1 MiB) are parsed whole: a few milliseconds at most.
- Larger bodies are read incrementally (ijson's C parser, 16 KiB at a time,
  growing to 4 MiB inside one long string, which the parser re-reads per piece),
  yielding to the event loop between pieces, so no request holds the loop for
  more than a piece's worth of parsing however big it is.
- The change is a splice: the bytes `"include_usage":true` go in at one place
  and every other byte is the caller's (escapes, number spellings, key order
  and repeats all kept). The top-level object is walked with the standard
  library's own JSON scanner to find that place.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import ijson

from proxy.errors import BadRequest

SMALL = 1 << 20
_PIECE = 16 * 1024
_MAX_PIECE = 4 * 1024 * 1024  # pieces grow to this inside one long token
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_ABSENT = object()
_USAGE = '"include_usage":true'


# Top-level fields a cost estimate reads (`proxy.platform.estimate_tokens`, `proxy.estimate`).
COUNT_FIELDS = frozenset(
    {"max_completion_tokens", "max_tokens", "max_output_tokens", "n", "best_of", "service_tier"}
)
PROMPT_LISTS = "prompt_lists"  # a big completions body's text prompts (counted, not kept)
# Tools the caller runs itself: their calls and results travel in the bodies. Any other
# tool runs at OpenAI (`proxy.estimate`).
CLIENT_TOOLS = frozenset({"function", "custom", "local_shell"})
_MAX_TOOLS = 16  # hosted tools kept of a big body (one is enough to refuse it)


def _note_tool(counts: dict[str, Any], kind: Any) -> None:
    """Keep a big body's hosted tool types in `counts["tools"]`, as a small body has them."""
    if not isinstance(kind, str) or kind not in CLIENT_TOOLS:
        tools = counts.setdefault("tools", [])
        if len(tools) < _MAX_TOOLS:
            tools.append({"type": kind[:64] if isinstance(kind, str) else kind})


@dataclass(slots=True)
class Fields:
    """The top-level fields the proxy cares about (`options` is `_ABSENT` when missing)."""

    model: Any = None
    stream: Any = None
    options: Any = _ABSENT
    counts: dict[str, Any] = field(default_factory=dict)  # COUNT_FIELDS, for estimates

    @property
    def streams(self) -> bool:
        return self.stream is True


def parse_small(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (not JSON, not an object, too deep)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return request if isinstance(request, dict) else None


def fields_of(request: dict[str, Any]) -> Fields:
    return Fields(
        request.get("model"), request.get("stream"), request.get("stream_options", _ABSENT)
    )


async def read_large(body: bytes) -> Fields | None:
    """The fields of a body, parsed in pieces with the loop free between them; None if
    the body is not one strict JSON object (RFC 8259: no NaN; any depth is fine).

    Keys are tracked by depth from the parser's events, never by ijson's dotted
    prefixes (a top-level key may itself contain a dot)."""
    events = ijson.sendable_list()
    parser = ijson.basic_parse_coro(events, use_float=True)
    fields = Fields()
    depth = 0
    top_key: str | None = None  # the current key of the top-level object
    inner_key: str | None = None  # the current key inside top-level stream_options
    options: dict[str, Any] | None = None
    seen_start = False
    piece, start = _PIECE, 0
    try:
        while start < len(body):
            parser.send(body[start : start + piece])
            start += piece
            # Inside one long token (a huge string) the parser keeps re-reading what it has
            # buffered: take bigger pieces until it gets out, so the cost stays linear.
            piece = min(piece * 2, _MAX_PIECE) if not events else _PIECE
            for event, value in events:
                if not seen_start:
                    if event != "start_map":
                        return None
                    seen_start = True
                if event in ("start_map", "start_array"):
                    if depth == 2 and top_key == "prompt":  # a token list: one prompt
                        fields.counts[PROMPT_LISTS] = fields.counts.get(PROMPT_LISTS, 0) + 1
                    if depth == 1 and top_key == "stream_options":
                        options = {} if event == "start_map" else None
                        fields.options = options if options is not None else []
                    elif depth == 1 and top_key == "web_search_options":
                        fields.counts[top_key] = True
                    depth += 1
                elif event in ("end_map", "end_array"):
                    depth -= 1
                elif event == "map_key":
                    if depth == 1:
                        top_key, inner_key = value, None
                    elif depth == 2 and top_key == "stream_options":
                        inner_key = value
                    elif depth == 3 and top_key == "tools":
                        inner_key = value
                elif depth == 1:  # a scalar value of a top-level key
                    if top_key == "model":
                        fields.model = value
                    elif top_key == "stream":
                        fields.stream = value
                    elif top_key == "stream_options":
                        fields.options, options = value, None
                    elif top_key in COUNT_FIELDS:
                        fields.counts[top_key] = value
                elif depth == 2 and options is not None and inner_key == "include_usage":
                    options["include_usage"] = value
                elif depth == 3 and top_key == "tools" and inner_key == "type":
                    _note_tool(fields.counts, value)
                elif depth == 2 and top_key == "prompt" and event == "string":
                    fields.counts[PROMPT_LISTS] = fields.counts.get(PROMPT_LISTS, 0) + 1
            del events[:]
            await asyncio.sleep(0)
        parser.close()
    except (ijson.JSONError, ijson.IncompleteJSONError, ValueError, RecursionError):
        return None
    return fields


def ask_for_usage(body: bytes, fields: Fields) -> tuple[bytes, bool]:
    """Make a streamed chat completion ask for usage (`stream_options.include_usage`).

    Returns the body to send and True when the client had not asked itself
    (the usage chunk must then be removed from what it sees). A body that is
    not UTF-8 goes unchanged (an ASCII splice would corrupt UTF-16/32).
    """
    options = fields.options
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    if options is _ABSENT:
        start = len(body) - len(body.lstrip(b" \t\r\n"))
        if body[start : start + 1] != b"{":  # UTF-16/32, a BOM: not safe to splice
            return body, False
        return body[: start + 1] + b'"stream_options":{' + _USAGE.encode() + b"}," + body[
            start + 1 :
        ], True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body, False
    if len(body) > SMALL:
        raise BadRequest(
            "A streamed chat completion over 1 MiB with 'stream_options' must set "
            "'stream_options.include_usage' to true (the proxy meters every stream).",
            param="stream_options",
        )
    span = _value_span(text, "stream_options")
    if span is None:
        return body, False
    start, end = span
    if not isinstance(options, dict):  # null or another non-object: replace it
        return (text[:start] + "{" + _USAGE + "}" + text[end:]).encode("utf-8"), True
    inner = _value_span(text[start:end], "include_usage")
    if inner is not None:  # present but not true: replace its value
        a, b = start + inner[0], start + inner[1]
        return (text[:a] + "true" + text[b:]).encode("utf-8"), True
    brace = start + 1
    rest = text[brace:end].lstrip(" \t\n\r")
    sep = "" if rest.startswith("}") else ","
    return (text[:brace] + _USAGE + sep + text[brace:]).encode("utf-8"), True


def _value_span(text: str, wanted: str) -> tuple[int, int] | None:
    """Character span of the value of the last top-level `wanted` key in the JSON object
    `text` (the one a JSON parser keeps), or None if the object cannot be walked."""
    try:
        i = _WS.match(text, 0).end()  # type: ignore[union-attr]
        if text[i : i + 1] != "{":
            return None
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        found = None
        if text[i : i + 1] == "}":
            return None
        while True:
            if text[i : i + 1] != '"':
                return None
            key, i = scanstring(text, i + 1)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] != ":":
                return None
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            _, end = _DECODER.raw_decode(text, i)
            if key == wanted:
                found = (i, end)
            i = _WS.match(text, end).end()  # type: ignore[union-attr]
            if text[i : i + 1] == ",":
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                continue
            return found if text[i : i + 1] == "}" else None
    except (ValueError, RecursionError):
        return None
