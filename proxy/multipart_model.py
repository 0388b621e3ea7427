"""The `model` field of a multipart/form-data upload, learnt before anything goes upstream.

A tenant's model allow-list needs the model of an audio transcription or an
image edit too, and those bodies can be hundreds of MB. `read_model_field` feeds the
body, chunk by chunk as it arrives, to python-multipart's streaming parser (the
one Starlette uses) and stops as soon as the first `model` field is complete.
The OpenAI SDKs send data fields before files, so that is usually within the
first chunk; the chunks read so far go upstream first, then the rest streams.

Which part is the `model` field follows python-multipart's (and so Starlette's)
reading of the part headers: the `Content-Disposition` header (name matched in
any case; the last one if repeated), its `name` parameter (parameter names in
any case, quoted or not, the RFC 2231 `name*` form ignored as RFC 7578 section
4.2 says) equal to exactly `model`, and no `filename` parameter (with one it is
a file, not a field). The disposition type is not checked: Starlette does not
check it either, so `attachment; name="model"` would still be its model.

Duplicates: parsers disagree on a repeated field (Starlette keeps the last,
Werkzeug and Go the first), so checking one and forwarding two is unsafe.
`refuse_second_model` wraps the streamed body and fails the upload, the way an
upload over the size limit fails, before the chunk in which a second part named
`model` begins; the upstream then never gets a complete body.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from proxy.asgi import Receive
from proxy.downstream import next_chunk, too_large
from proxy.errors import BadRequest

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_MODEL_BYTES = 256  # a longer value is no model name: returned cut, to be refused
SCAN_BYTES = 1 << 20  # no `model` field within the first MiB: give up looking

_UTF8 = codecs.lookup("utf-8").name


class _Parts:
    """python-multipart's parser, noting the parts named `model` and the first one's value."""

    def __init__(self, boundary: bytes) -> None:
        self.named_model = 0  # parts named `model` (fields or files) whose headers are done
        self.value: bytearray | None = None  # the first `model` field's value, as it arrives
        self.complete = False  # that value is whole
        self._reading = False  # the current part is that field
        self._field = bytearray()
        self._header = bytearray()
        self._disposition: bytes | None = None
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # FormParserError if too long

    @property
    def known(self) -> bool:
        """The model is known: its field is whole, or already too long to be a model."""
        return self.value is not None and (self.complete or len(self.value) > MAX_MODEL_BYTES)

    def model(self) -> str | None:
        """The value read (at most `MAX_MODEL_BYTES` + 1 bytes, whatever the chunking)."""
        if self.value is None:
            return None
        return self.value[: MAX_MODEL_BYTES + 1].decode("utf-8", "replace")[:MAX_MODEL_BYTES]

    def feed(self, chunk: bytes) -> None:
        """Parse one more chunk; FormParserError if the body is not well-formed multipart."""
        self._parser.write(chunk)

    def _part_begin(self) -> None:
        self._disposition = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = bytes(self._header)
        self._field.clear()
        self._header.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != b"model":
            return
        self.named_model += 1
        if self.value is None and b"filename" not in options:
            self.value = bytearray()
            self._reading = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._reading:
            assert self.value is not None
            self.value += data[start:end]

    def _part_end(self) -> None:
        if self._reading:
            self._reading = False
            self.complete = True


def _parts_for(content_type: bytes | None) -> _Parts | None:
    """A parser for a multipart/form-data body, or None if the header does not describe one.

    A `charset` other than UTF-8 is refused too: Starlette decodes part names
    with it, so bytes that are not `model` to us could be `model` to it.
    """
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None
    charset = params.get(b"charset")
    if charset is not None:
        try:
            if codecs.lookup(charset.decode("latin-1")).name != _UTF8:
                return None
        except LookupError:
            return None
    try:
        return _Parts(boundary)
    except FormParserError:  # boundary over the parser's limit
        return None


async def read_model_field(
    content_type: bytes,
    first: bytes,
    more: bool,
    receive: Receive,
    limit: int,
) -> tuple[str | None, list[bytes], bool]:
    """(model, chunks read so far, whether more body follows after them).

    Reads from `receive` only until the first `model` field is complete; the
    chunks returned, joined, are the body's first bytes (all of it if `more` is
    False), so the caller sends them and then streams the rest unchanged.

    - A value over `MAX_MODEL_BYTES` bytes or not UTF-8 comes back decoded with
      errors="replace" and cut to `MAX_MODEL_BYTES` characters (reading stops
      once it is too long): a name no allow-list holds, so it is refused.
    - None when there is no `model` field: the body ended, or the first
      `SCAN_BYTES` held none (never more than that plus one chunk is held), or
      the body is not well-formed multipart/form-data (no boundary, a parse
      error, a charset other than UTF-8). The caller applies its policy; a
      malformed body left to the upstream gets the upstream's 400.
    - Only the first `model` field is read; pair this with `refuse_second_model`
      on the rest of the body so the upstream cannot see another one.

    Raises `ClientGone` on a disconnect and the 413 of `proxy.downstream` once
    the body read passes `limit`, as `read_all` does.
    """
    size = len(first)
    if size > limit:
        raise too_large(limit)
    chunks = [first] if first else []
    parts = _parts_for(content_type)
    chunk = first
    while parts is not None:
        try:
            parts.feed(chunk)
        except FormParserError:
            break
        if parts.known:
            return parts.model(), chunks, more
        if not more or size >= SCAN_BYTES:
            break
        chunk, more = await next_chunk(receive, size, limit)
        size += len(chunk)
        if chunk:
            chunks.append(chunk)
    return None, chunks, more


async def refuse_second_model(
    content_type: bytes, body: AsyncIterator[bytes], failure: list[Exception]
) -> AsyncIterator[bytes]:
    """`body` (the whole upload, from its first byte) passed on unchanged, except that it
    fails with 400 before the chunk that completes the headers of a second part named
    `model` (a field or a file), or a chunk that is not well-formed multipart.

    As with `proxy.downstream.stream_body`, the cause also goes into `failure`
    (aiohttp wraps what a body iterator raises). Parsing the whole upload costs
    about as much as python-multipart's parse of it in Starlette.
    """
    parts = _parts_for(content_type)
    async for chunk in body:
        if parts is not None:
            try:
                parts.feed(chunk)
            except FormParserError:
                failure.append(BadRequest("The multipart/form-data body is malformed."))
                raise failure[0] from None
            if parts.named_model > 1:
                failure.append(BadRequest("The form has more than one `model` field."))
                raise failure[0]
        yield chunk
