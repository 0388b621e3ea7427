"""The HTTP server layer's defences against hostile connections (uvicorn + httptools).

uvicorn's httptools protocol trusts the peer more than a public listener can:

- llhttp has no limit on the size of a request's head, and the header value of
  a request that never ends grows by repeated concatenation (quadratic), so a
  few sockets sending an endless header starve the worker and its memory;
- the keep-alive timer starts only after a response, so a connection that sends
  nothing, or half a head, stays open for ever (file descriptors run out);
- nothing caps the open connections of a worker;
- a request llhttp cannot parse (request smuggling: Content-Length with
  Transfer-Encoding, two Content-Lengths...) gets a plain-text 400, where every
  other error of ours is in OpenAI's shape.

`HardenedHttpToolsProtocol` keeps all parsing in httptools and adds, per worker:

- head limits: bytes of the request line and headers (counted in `data_received`
  before they are fed to the parser, which is never fed more), number of headers,
  length of the URL. Over a limit: 431 (414 for the URL), then close;
- a head timeout: from the connection's start (and from the end of the previous
  response on keep-alive) until the head is complete. A connection that sent
  nothing is closed silently, one with a partial head gets 408, then close.
  uvicorn's own `timeout_keep_alive` still closes idle keep-alive connections
  (whichever of the two runs out first; with the defaults, keep-alive at 5 s);
- a connection cap: over it, a new connection gets 503 `too_many_connections`
  with `Retry-After: 1` at once, and nothing it sends is parsed or dispatched;
- uvicorn's 400 for an unparseable request, answered as JSON `invalid_http_request`.

Every refusal is JSON in OpenAI's error shape with `Connection: close`; the
server then shuts its side for writing and discards what the client still sends
for at most `LINGER_SECONDS`, so the client reads the answer instead of a reset.

Settings are an `HttpLimits`. uvicorn builds the protocol from a class, possibly
in spawned worker processes, so the class reads its limits from environment
variables (``BYOK_HTTP_*``, see `ENV`) once per process, falling back to the
defaults. `protocol_class(limits)` exports limits to the environment (for the
workers to inherit) and returns the class to pass as ``uvicorn.run(http=...)``;
`protocol_class()` checks the environment's values now, in the parent, so a typo
fails at start-up rather than on every connection.

`out_of_descriptors` tells whether an exception (an upstream connection attempt,
say) failed because the process or system ran out of file descriptors.

`run` is `uvicorn.run` with SIGHUP meaning "reopen the usage log" in every worker
(log rotation), where uvicorn's supervisor would replace every worker.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import resource
import signal
import time
from asyncio.events import TimerHandle
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("byok.server")

# Environment variable of each `HttpLimits` field (set by the CLI parent, read by workers).
ENV: Mapping[str, str] = {
    "max_head_bytes": "BYOK_HTTP_MAX_HEAD_BYTES",
    "max_headers": "BYOK_HTTP_MAX_HEADERS",
    "max_url_bytes": "BYOK_HTTP_MAX_URL_BYTES",
    "head_timeout": "BYOK_HTTP_HEAD_TIMEOUT",
    "max_connections": "BYOK_HTTP_MAX_CONNECTIONS",
    "fd_reserve": "BYOK_HTTP_FD_RESERVE",
    "body_idle_timeout": "BYOK_HTTP_BODY_IDLE_TIMEOUT",
}

DEFAULT_MAX_HEAD_BYTES = 64 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_URL_BYTES = 16 * 1024
DEFAULT_HEAD_TIMEOUT = 10.0
DEFAULT_BODY_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_FD_RESERVE = 256  # descriptors kept for upstream sockets, the database, log files
FD_SHARE = 0.9  # connections never take more than this share of RLIMIT_NOFILE (minus reserve)
LINGER_SECONDS = 1.0  # after a refusal: how long to discard what the client still sends
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True)
class HttpLimits:
    """Limits of the HTTP server layer, per worker process."""

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES  # request line + headers, per request
    max_headers: int = DEFAULT_MAX_HEADERS
    max_url_bytes: int = DEFAULT_MAX_URL_BYTES
    head_timeout: float = DEFAULT_HEAD_TIMEOUT  # seconds to receive a head; 0 disables
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open connections; see connection_cap()
    fd_reserve: int = DEFAULT_FD_RESERVE
    body_idle_timeout: float = DEFAULT_BODY_IDLE_TIMEOUT  # longest silence inside a body

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name not in ("head_timeout", "fd_reserve")):
                raise ValueError(f"{ENV[f.name]}: must be positive, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HttpLimits:
        """The limits set in `environ` (default `os.environ`); defaults for the rest."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            text = environ.get(ENV[f.name], "").strip()
            if not text:
                continue
            try:
                values[f.name] = float(text) if f.name.endswith("timeout") else int(text)
            except ValueError:
                raise ValueError(f"{ENV[f.name]}: not a number: {text!r}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment variables that make `from_env` return these limits."""
        return {ENV[f.name]: str(getattr(self, f.name)) for f in fields(self)}

    def connection_cap(self) -> int:
        """`max_connections`, lowered to FD_SHARE of RLIMIT_NOFILE's soft limit minus
        `fd_reserve` (never below 1)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, int(soft * FD_SHARE) - self.fd_reserve))


@functools.cache
def _process_limits() -> tuple[HttpLimits, int]:
    """This process's limits and connection cap, read once (workers inherit the env)."""
    limits = HttpLimits.from_env()
    return limits, limits.connection_cap()


def protocol_class(limits: HttpLimits | None = None) -> type[HardenedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)``.

    With `limits`, exports them to `os.environ` first (worker processes inherit it);
    without, checks the environment's values now (raising ValueError on a bad one).
    """
    if limits is not None:
        os.environ.update(limits.to_env())
        _process_limits.cache_clear()
    else:
        HttpLimits.from_env()
    return HardenedHttpToolsProtocol


def error_body(message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    """An error in OpenAI's shape, as JSON bytes."""
    error = {"message": message, "type": type_, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class _Refusal:
    status: int
    code: str
    message: str
    type_: str = "invalid_request_error"
    headers: tuple[tuple[bytes, bytes], ...] = ()


class _LimitExceeded(Exception):
    """Raised from a parser callback to stop httptools (it re-raises HttpParserError)."""


_last_logged: dict[int, float] = {}
_suppressed: dict[int, int] = {}


class HardenedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits, a head timeout, a connection cap
    and JSON refusals (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits, self.connection_cap = _process_limits()
        self._reading_head = True  # between a message's end (or the start) and its head's end
        self._head_bytes = 0  # fed to the parser while reading the current head
        self._header_count = 0
        self._message_begun = False
        self._head_timer: TimerHandle | None = None
        self._in_body = False  # between a head and the end of its body
        self._body_seen = 0.0  # loop time of the last piece of body
        self._linger_timer: TimerHandle | None = None
        self._refused = False  # answered a refusal: discard everything from now on
        self._pending: _Refusal | None = None  # set by a parser callback over a limit

    # --- connection ----------------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.connection_cap:
            self._refuse(
                _Refusal(
                    503,
                    "too_many_connections",
                    "The server has too many open connections; retry shortly.",
                    "server_error",
                    ((b"retry-after", b"1"),),
                )
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: discard
        while data:
            if not self._reading_head:
                super().data_received(data)
                return
            room = self.limits.max_head_bytes - self._head_bytes
            if len(data) > room:
                chunk, data = data[:room], data[room:]
            else:
                chunk, data = data, b""
            self._head_bytes += len(chunk)
            if chunk:
                super().data_received(chunk)
            if self._refused or self.transport.is_closing():
                return
            if self._reading_head and data:
                self._refuse(
                    _Refusal(
                        431,
                        "request_header_too_large",
                        "The request's headers are larger than "
                        f"{self.limits.max_head_bytes} bytes.",
                    )
                )
                return

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when httptools raised: a limit of ours, or an unparseable request."""
        refusal = self._pending or _Refusal(
            400,
            "invalid_http_request",
            "The request is not valid HTTP/1.1 (malformed or ambiguous framing).",
        )
        self._refuse(refusal)

    def shutdown(self) -> None:
        if self._refused:
            self.transport.close()
        else:
            super().shutdown()

    # --- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._message_begun = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._pending = _Refusal(
                414,
                "request_uri_too_long",
                f"The request's URL is longer than {self.limits.max_url_bytes} bytes.",
            )
            raise _LimitExceeded

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._pending = _Refusal(
                431,
                "request_header_too_large",
                f"The request has more than {self.limits.max_headers} headers.",
            )
            raise _LimitExceeded
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # The head timer keeps running through the body (no timer per request): when it
        # fires mid-body it re-arms for as long as the body keeps arriving.
        self._in_body, self._body_seen = True, self.loop.time()
        self._reading_head = False
        self._message_begun = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_head_timer()
        self._in_body = False
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Nothing in flight any more (the newest request is answered): wait for a head.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._arm_head_timer()

    # --- head timeout --------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if self.limits.head_timeout > 0:
            self._head_timer = self.loop.call_later(
                self.limits.head_timeout, self._head_timeout_handler
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout_handler(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._refused:
            return
        if self._in_body:
            idle = self.loop.time() - self._body_seen
            left = self.limits.body_idle_timeout - idle
            if left > 0:
                self._head_timer = self.loop.call_later(left, self._head_timeout_handler)
                return
            if self.cycle is not None and self.cycle.response_started:
                self.transport.close()
                return
            self._refuse(
                _Refusal(
                    408,
                    "request_timeout",
                    f"No part of the request body arrived for {self.limits.body_idle_timeout:g}s.",
                )
            )
            return
        if self._head_bytes or self._message_begun:
            self._refuse(
                _Refusal(
                    408,
                    "request_timeout",
                    f"The request's headers did not arrive within {self.limits.head_timeout:g}s.",
                )
            )
        else:
            self.transport.close()  # sent nothing: nothing to answer

    # --- refusals ------------------------------------------------------------------

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer `refusal` with Connection: close, then linger and close."""
        self._refused = True
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self._log(refusal)
        body = error_body(refusal.message, refusal.code, refusal.type_)
        content = [STATUS_LINE[refusal.status]]
        for name, value in [*self.server_state.default_headers, *refusal.headers]:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            # A pipelined head went wrong mid-response: an answer now would land
            # inside that response's bytes. Cut the connection instead.
            transport.close()
            return
        transport.write(b"".join(content))
        # Closing with unread input would send a reset, which can destroy the answer
        # before the client reads it: shut our side, discard input a short while.
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                transport.close()
                return
            self._linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def _log(self, refusal: _Refusal) -> None:
        """A warning per refusal status, at most every 5 s per worker (with how many
        were not logged), so an attack cannot flood the log."""
        now = time.monotonic()
        status = refusal.status
        if now - _last_logged.get(status, -1e9) < 5.0:
            _suppressed[status] = _suppressed.get(status, 0) + 1
            return
        _last_logged[status] = now
        more = _suppressed.pop(status, 0)
        prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.warning(
            "%sHTTP %d %s%s",
            prefix,
            status,
            refusal.code,
            f" ({more} more since the last report)" if more else "",
        )


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether `exc`, or an exception behind it (``__cause__``, ``__context__``,
    aiohttp's ``os_error``, an exception group's members), is EMFILE or ENFILE."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _OUT_OF_DESCRIPTORS:
            return True
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, BaseException):
            todo.append(os_error)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return False


def run(app: str, **options: Any) -> None:
    """`uvicorn.run(app, **options)`, where SIGHUP makes each worker reopen its usage log.

    With one worker, the worker is this process and listens for SIGHUP itself
    (`UsageLog.start`). With several, uvicorn's supervisor would answer SIGHUP by
    replacing every worker: streams longer than the shutdown timeout cut, caches and
    in-process counters lost, for a log rotation. `_Supervisor` forwards it instead.
    """
    if (options.get("workers") or 1) <= 1:
        # Until the usage log listens for it, a SIGHUP (a log rotation) must not end
        # this, the only, process.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        uvicorn.run(app, **options)
        return
    config = uvicorn.Config(app, **options)
    try:
        _Supervisor(config, sockets=[config.bind_socket()]).run()
    except KeyboardInterrupt:
        pass


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, forwarding SIGHUP to the workers instead of replacing them."""

    def handle_hup(self) -> None:
        # Only to workers that are serving: one still starting does not listen for SIGHUP
        # yet (it would die of it); it opens the usage log's path when it starts, and
        # each flush reopens the path if the file was moved away meanwhile.
        ready = [
            worker.pid
            for worker in self.processes
            if worker.pid is not None and worker.is_ready(self.config.timeout_worker_healthcheck)
        ]
        log.info("SIGHUP: %d worker(s) reopen the usage log", len(ready))
        for pid in ready:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass  # exited meanwhile; its replacement opens the path afresh
