"""The /v1 hot path: proxy key → tenant → OpenAI key → upstream → response → usage line.

Plain ASGI, no framework. Per request it does: one header pass, two cached
lookups, one decryption, one upstream call on a pooled connection, and a scan
of the response for usage (see `proxy.streaming`). Bodies stream both ways;
only JSON request bodies are read whole (they are small, and `model`/`stream`
come from them).

The caller's side (body within the limit, disconnect watch) is in
`proxy.downstream`; when the caller goes away, the request is cancelled and
the upstream response closed in a `finally` at once (the tenant pays for
every token generated after that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from proxy import allowance, credentials, platform, policy, rejections
from proxy.asgi import Receive, Scope, Send, send_error
from proxy.credentials import Credential
from proxy.downstream import (
    ClientGone,
    DisconnectWatch,
    read_all,
    stream_body,
    too_large,
)
from proxy.errors import (
    BadRequest,
    InvalidProxyKey,
    KeyDecryptionFailed,
    OpenAIQuotaExceeded,
    PlatformKeyRejected,
    ProxyError,
    ProxyKeyExpired,
    ProxyOverloaded,
    RequestTooLarge,
    StoreUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.estimate import standard_tier
from proxy.multipart_model import read_model_field, refuse_second_model
from proxy.request_json import (
    SMALL,
    Fields,
    ask_for_usage,
    fields_of,
    parse_small,
    read_large,
)
from proxy.runtime import Runtime
from proxy.security import PROXY_KEY_PREFIX, bearer_token
from proxy.server import out_of_descriptors
from proxy.spend import Admission
from proxy.streaming import BodyUsage, SSEScanner
from proxy.upstream import (
    readable_accept_encoding,
    request_headers,
    response_headers,
    target_url,
)
from proxy.usage import UsageRecord

log = logging.getLogger("byok.proxy")

_USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_MAX_ERROR_BODY = 64 * 1024
_POLICY_CODES = frozenset(
    {
        "budget_exceeded",
        "rate_limit_exceeded",
        "model_not_allowed",
        "model_not_priced",
        "endpoint_not_metered",
        "proxy_key_expired",
        "rate_limiter_unavailable",
    }
)
_WHOLE_BODY_BYTES = 256 * 1024  # plain responses up to this size are sent in one piece


def _is_json(content_type: bytes | None) -> bool:
    """`application/json` or `...+json`, in any case, with any parameters."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _is_multipart(content_type: bytes | None) -> bool:
    return content_type is not None and content_type[:19].lower() == b"multipart/form-data"


async def _one(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk


def _query_model(query: bytes) -> str | None:
    """A `model` in the query string (the Realtime API names its model there)."""
    if b"model" not in query.lower():
        return None
    from urllib.parse import parse_qsl

    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name.lower() == "model":
            return value
    return None


def _upstream_error(exc: BaseException) -> ProxyError:
    """Our error for a failed upstream exchange (504 on a timeout, 503 when this worker is
    out of file descriptors, else 502)."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout()
    if out_of_descriptors(exc):
        log.error("out of file descriptors: raise the limit (ulimit -n) or lower the caps")
        return ProxyOverloaded()
    log.warning("upstream unreachable: %s", type(exc).__name__)
    return UpstreamUnreachable()


async def _read_capped(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """A small (error) body, whole, or its first 64 KiB; and whether it was whole."""
    chunks, size = [], 0
    async for block in response.content.iter_any():
        chunks.append(block)
        size += len(block)
        if size > _MAX_ERROR_BODY:
            return b"".join(chunks), False
    return b"".join(chunks), True


async def _inflate_rest(body: BodyUsage) -> None:
    """Scan what a block that inflates big still holds, a step at a time, letting the
    loop run between steps."""
    while body.pending:
        await asyncio.sleep(0)
        body.more()


@dataclass(slots=True)
class _Call:
    """One upstream call, as decided: where, with which key, what body."""

    url: URL
    credential: Credential
    ciphertext: str | None  # the tenant's stored key (to mark it invalid on a 401)
    body: bytes | AsyncIterator[bytes] | None
    streamed_body: bool
    length: bytes | None  # the caller's Content-Length of a streamed upload
    upload_failure: list[Exception]
    strip_usage: bool
    settle: Callable[[], Awaitable[None]] | None = None  # the allowance, before the last byte
    added_headers: Sequence[tuple[bytes, bytes]] = ()  # spend control's, on the response
    added_names: frozenset[bytes] = frozenset()  # their names


async def _before_last_send(call: _Call, watcher: DisconnectWatch) -> None:
    """Settle the allowance (the tenant's next request then sees it) and stop watching the
    caller (uvicorn reports a disconnect once the last message is sent)."""
    if call.settle is not None:
        await call.settle()
    watcher.stop()


class Forwarder:
    """The /v1 handler; one per worker, holding the runtime and the upstream client."""

    def __init__(self, runtime: Runtime, client: aiohttp.ClientSession) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.store = runtime.store
        self.client = client
        self.spend = runtime.spend
        self._settling: set[asyncio.Future[None]] = set()
        self._large_parses = asyncio.Semaphore(2)  # big bodies parsed at once (CPU-bound)

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        rid_header: tuple[bytes, bytes],
    ) -> None:
        record = UsageRecord(
            request_id, scope["method"], scope["path"], time.perf_counter(), time.time()
        )
        admitted: list[Admission] = []
        try:
            await self._forward(scope, receive, send, record, rid_header, admitted)
        except ProxyError as exc:
            if exc.code in _POLICY_CODES:
                reason = f"rate_limit_{exc.type}" if exc.status_code == 429 else exc.code
                self.runtime.metrics.policy_refused(str(reason))
            elif isinstance(exc, InvalidProxyKey):
                self.runtime.auth_limit.failed(self.config.trusted_proxies.client(scope))
            elif isinstance(exc, KeyDecryptionFailed):
                log.error(
                    "KEY DECRYPTION FAILED for tenant %s (request %s): wrong ENCRYPTION_KEY or "
                    "tampered ciphertext; the tenant cannot make requests",
                    record.tenant_id,
                    request_id,
                )
            record.status, record.error_code = exc.status_code, exc.code
            if not record.client_disconnected:
                added = admitted[0].headers if admitted else ()  # rate-limit state, warnings
                await send_error(send, exc, (rid_header, *added))
        except ClientGone:
            record.client_disconnected = True
            record.status = record.status or 499
        except Exception as exc:
            # Never a traceback (it could hold request data), never a bare 500. An upstream
            # cut mid-response has its code already; returning leaves the response
            # unfinished, so uvicorn closes the connection and the client sees the cut.
            if record.error_code is None:
                log.error("request %s failed: %s", request_id, type(exc).__name__)
                record.error_code = ProxyError.code
            if record.status is None:  # nothing sent yet: answer in OpenAI's shape
                record.status = ProxyError.status_code
                await send_error(send, ProxyError(), (rid_header,))
        finally:
            record.duration_ms = round((time.perf_counter() - record.started) * 1000, 3)
            if record.usage is not None and record.table_priced:
                record.cost_nanos = self.config.prices.cost_nanos(record.model, record.usage)
            self.spend.finish(admitted[0] if admitted else None, record)
            self.runtime.usage_log.write(record)
            self.runtime.metrics.observe(record)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: UsageRecord,
        rid_header: tuple[bytes, bytes],
        admitted: list[Admission],
    ) -> None:
        token = length = content_type = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = bearer_token(value)
            elif name == b"content-length":
                length, has_body = value, True
            elif name == b"content-type":
                content_type = value
            elif name == b"transfer-encoding":
                has_body = True

        if not token or not token.startswith(PROXY_KEY_PREFIX):
            raise InvalidProxyKey()
        guards = self.runtime.auth_limit
        client = self.config.trusted_proxies.client(scope)  # the TCP peer unless trusted
        if guards.over(client) and not self.store.recently_valid(token):
            raise guards.refuse()  # no database lookup for guesses
        principal = await self.store.principal_async(token)
        tenant = await self.store.tenant_async(principal.tenant_id) if principal else None
        if tenant is None:
            raise InvalidProxyKey()
        record.tenant_id = tenant.id
        record.api_key_id = principal.key_id  # type: ignore[union-attr]
        assert principal is not None
        if principal.expired(time.time()):
            raise ProxyKeyExpired()
        restricted = policy.restricts_models(tenant.policy, principal.policy)

        raw_path = scope.get("raw_path") or scope["path"].encode()
        url = target_url(self.config.upstream.base_url, raw_path, scope.get("query_string", b""))

        choice = credentials.choose(self.config, tenant)  # the 402s, at once
        on_platform = not isinstance(choice, Credential)
        if on_platform and not self.config.platform_key.allows(scope["method"], raw_path):
            raise platform.not_allowed(tenant.id, scope["method"], scope["path"])
        # JSON bodies are read whole (model, stream, usage splice); so is every body on the
        # platform key, which must be a JSON object (`proxy.platform`), and, under a model
        # allow-list, every body but a multipart upload (its `model` field is read). Those
        # get the JSON limit; the rest stream through, within the (larger) upload limit.
        multipart = _is_multipart(content_type)
        is_json = on_platform or _is_json(content_type) or (restricted and not multipart)
        limit = self.config.max_body_bytes if is_json else self.config.max_upload_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large(limit)

        body: bytes | AsyncIterator[bytes] | None = None
        request: dict[str, Any] | None = None
        counts: dict[str, Any] | None = None
        upload_failure: list[Exception] = []
        strip_usage = False
        streamed_body = False
        if has_body:
            first = await receive()
            if first["type"] == "http.disconnect":
                raise ClientGone()
            chunk = first.get("body", b"")
            if len(chunk) > limit:  # refused before any upstream connection is made
                raise too_large(limit)
            if restricted and multipart and not on_platform:
                assert content_type is not None
                record.model, held, more = await read_model_field(
                    content_type, chunk, bool(first.get("more_body")), receive, limit
                )
                chunk = b"".join(held)
                rest = stream_body(receive, chunk, limit, upload_failure) if more else _one(chunk)
                body = refuse_second_model(content_type, rest, upload_failure)
                streamed_body = True
            elif not first.get("more_body"):
                body = chunk
            elif is_json:
                body = await read_all(receive, chunk, limit)
            else:
                body = stream_body(receive, chunk, limit, upload_failure)
                streamed_body = True
            if on_platform:
                assert isinstance(body, bytes)
                if len(body) > SMALL:  # parsed whole, with every key checked: kept small
                    raise RequestTooLarge(
                        f"On the platform's trial key a request body is limited to {SMALL} bytes."
                    )
                body, request = platform.check_body(tenant.id, scope["path"], body)
            if is_json and isinstance(body, bytes):
                body, strip_usage, counts = await self._inspect_json(body, request, scope, record)
        elif on_platform and scope["method"] in ("POST", "PUT", "PATCH"):
            platform.check_body(tenant.id, scope["path"], b"")  # 400: a JSON body is needed
        if restricted:
            self.spend.check_model(
                tenant,
                principal,
                record.model,
                scope["method"],
                scope["path"],
                _query_model(query) if (query := scope.get("query_string")) else None,
            )
        size = len(body) if isinstance(body, bytes) else 0
        if tenant.policy is not None or principal.policy is not None:
            admission = await self.spend.admit(tenant, principal, record, counts, size)
            if admission is not None:
                admitted.append(admission)

        reservation = None
        if not isinstance(choice, Credential):
            # Reserved only now, so a request refused for its body costs no allowance.
            estimate = platform.estimate_tokens(
                scope["path"], request, size, self.config.platform_key.default_output_tokens
            )
            reservation = await self.store.run(
                allowance.reserve, self.store.engine, tenant.id, choice, estimate
            )
            if reservation is None:
                raise credentials.trial_exhausted(tenant, choice)
            assert self.config.platform_openai_key is not None
            choice = Credential(self.config.platform_openai_key, "platform")
        record.key_source = choice.source
        call = _Call(
            url, choice, tenant.ciphertext, body, streamed_body, length, upload_failure, strip_usage
        )
        if admitted and admitted[0].headers:
            call.added_headers, call.added_names = admitted[0].headers, admitted[0].header_names
        if reservation is not None:
            # Settled before the response's last byte (the tenant's next request sees it),
            # or, if the request ends any other way, when it ends.
            call.settle = self._settler(reservation, record)
        try:
            await self._exchange(scope, receive, send, record, rid_header, call)
        finally:
            if call.settle is not None:
                await call.settle()

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: UsageRecord,
        rid_header: tuple[bytes, bytes],
        call: _Call,
    ) -> None:
        """Send the request upstream with the call's key and relay the answer."""
        choice, streamed_body, length = call.credential, call.streamed_body, call.length
        headers = request_headers(
            scope["headers"], "Bearer " + choice.secret.reveal(), keep_org=choice.source == "byok"
        )
        if streamed_body and length is not None:
            headers.append(("Content-Length", length.decode()))
        readable_accept_encoding(headers, identity=record.stream or choice.source == "platform")

        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        watcher = None if streamed_body else DisconnectWatch(receive, loop, task, record)
        response = None
        try:
            try:
                response = await self.client.request(
                    scope["method"],
                    call.url,
                    headers=headers,
                    data=call.body,
                    allow_redirects=False,
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                if streamed_body and call.upload_failure:  # the caller's upload, not upstream
                    raise call.upload_failure[0] from None
                error = _upstream_error(exc)
                record.error_code = error.code
                raise error from None
            record.ttfb_ms = round((time.perf_counter() - record.started) * 1000, 3)
            record.upstream_status = response.status
            if watcher is None:
                watcher = DisconnectWatch(receive, loop, task, record)
            await self._respond(response, send, record, call, watcher, rid_header)
        except asyncio.CancelledError:
            if record.client_disconnected:
                task.uncancel()
                raise ClientGone() from None
            raise
        finally:
            if watcher is not None:
                watcher.stop()
            if response is not None:
                response.close()

    def _settler(
        self, reservation: allowance.Reservation, record: UsageRecord
    ) -> Callable[[], Awaitable[None]]:
        """Settles `reservation` with what `record` shows, once, even if the task is cancelled."""
        job: asyncio.Future[None] | None = None

        async def settle() -> None:
            nonlocal job
            if job is None:
                charge = allowance.charged(reservation, record)
                job = asyncio.ensure_future(self._settle(reservation, charge))
                self._settling.add(job)
                job.add_done_callback(self._settling.discard)
            await asyncio.shield(job)

        return settle

    async def _settle(self, reservation: allowance.Reservation, charge: int) -> None:
        """Settle on the store's threads, bounded like every database call; never raises."""
        try:
            await self.store.run(allowance.settle, self.store.engine, reservation, charge)
        except StoreUnavailable:
            log.error(
                "trial allowance of tenant %s not settled (database unavailable); "
                "its reservation stands until the UTC day ends",
                reservation.tenant_id,
            )

    async def drain(self) -> None:
        """Wait for settlements still running (at shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def _respond(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        record: UsageRecord,
        call: _Call,
        watcher: DisconnectWatch,
        rid_header: tuple[bytes, bytes],
    ) -> None:
        choice, ciphertext, strip_usage = call.credential, call.ciphertext, call.strip_usage
        status = response.status
        if status == 401:
            if choice.source == "platform":
                log.error("the upstream rejected PLATFORM_OPENAI_KEY (401); replace it")
                raise PlatformKeyRejected()
            error_body, _ = await _read_capped(response)
            error = rejections.error_object(error_body, response.headers.get("Content-Encoding"))
            if not rejections.key_rejected(error):
                raise rejections.unauthorized(error, choice.secret.reveal())
            if ciphertext is not None and record.tenant_id is not None:
                await self.store.run(
                    credentials.mark_invalid,
                    self.store,
                    record.tenant_id,
                    ciphertext,
                    record.request_id,
                )
            raise credentials.invalid_key_error(record.tenant_id or "")
        if status >= 400:
            # Read whole (bounded), checked for the quota case, scrubbed of key material.
            encoding = response.headers.get("Content-Encoding")
            try:
                error_body, complete = await _read_capped(response)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise _upstream_error(exc) from None
            if status == 429 and rejections.quota_exceeded(
                rejections.error_object(error_body, encoding)
            ):
                raise OpenAIQuotaExceeded(
                    "The OpenAI account behind this key is out of credit (insufficient_quota). "
                    "Add credit or raise the limit in OpenAI billing, or register another key at "
                    f"{credentials.register_hint(record.tenant_id or '')}."
                )
            replaced = rejections.relayable(error_body, encoding, choice.secret.reveal(), complete)
            if replaced is None:
                headers = response_headers(
                    response.raw_headers,
                    rid_header,
                    body_changed=False,
                    added=call.added_headers,
                    added_names=call.added_names,
                )
            else:
                error_body = replaced
                headers = response_headers(
                    response.raw_headers,
                    rid_header,
                    body_changed=True,
                    length=len(error_body),
                    added=call.added_headers,
                    added_names=call.added_names,
                )
            record.status = status
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await _before_last_send(call, watcher)
            await send({"type": "http.response.body", "body": error_body})
            return

        sse = response.content_type == "text/event-stream"
        headers = response_headers(
            response.raw_headers,
            rid_header,
            body_changed=strip_usage and sse,
            added=call.added_headers,
            added_names=call.added_names,
        )
        record.status = status
        size = response.content_length
        if not sse and size is not None and size <= _WHOLE_BODY_BYTES:
            # A small body: read it, then answer in one go (one send instead of three;
            # an upstream failure while reading still becomes a clean 502/504).
            try:
                data = await response.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise _upstream_error(exc) from None
            whole = BodyUsage(response.headers.get("Content-Encoding"))
            whole.feed(data)
            if whole.pending:  # checked here: no coroutine per request when nothing waits
                await _inflate_rest(whole)
            record.usage = whole.usage()
            await _before_last_send(call, watcher)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return

        encoding = response.headers.get("Content-Encoding")
        scanner = SSEScanner(strip_usage, encoding) if sse else None
        body_usage = None if sse else BodyUsage(encoding)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if sse:
            self.runtime.metrics.open_streams.inc()
        try:
            async for block in response.content.iter_any():
                if scanner is not None:
                    block = scanner.feed(block)
                    if not block:
                        continue
                else:
                    assert body_usage is not None
                    body_usage.feed(block)
                    if body_usage.pending:
                        await _inflate_rest(body_usage)
                await send({"type": "http.response.body", "body": block, "more_body": True})
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are out: the client sees the connection cut, the usage line the cause.
            record.error_code = _upstream_error(exc).code
            raise
        finally:
            if sse:
                self.runtime.metrics.open_streams.dec()
            # However the stream ends (a client gone after the usage chunk included),
            # the usage already seen is what the request cost.
            if scanner is not None:
                record.usage = scanner.usage
            elif body_usage is not None:
                record.usage = body_usage.seen()
        rest = scanner.finish() if scanner is not None else b""
        record.usage = scanner.usage if scanner is not None else body_usage.usage()  # type: ignore[union-attr]
        await _before_last_send(call, watcher)
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    async def _inspect_json(
        self, body: bytes, request: dict[str, Any] | None, scope: Scope, record: UsageRecord
    ) -> tuple[bytes, bool, dict[str, Any] | None]:
        """Note `model` and `stream`; make streamed chat completions ask for usage.
        Also returns the fields a cost estimate reads (`proxy.platform.estimate_tokens`).

        `request` is the body already parsed (platform key), else None. A body
        that is not a JSON object goes as it is: the upstream answers 400 in its
        own words.
        """
        if request is None and len(body) <= SMALL:
            request = parse_small(body)
        fields: Fields | None
        if request is not None:
            fields = fields_of(request)
        else:  # big, or too deep for json.loads: in pieces, a few at a time per worker
            async with self._large_parses:
                found = await read_large(body)
            if found is None:
                if len(body) > SMALL and scope["path"] in _USAGE_PATHS:
                    raise BadRequest(
                        "A chat or completions body over 1 MiB must be strict JSON (RFC 8259: "
                        "no NaN or Infinity) for the proxy to meter it.",
                        code="invalid_json",
                    )
                return body, False, None
            fields = found
        record.model = fields.model if isinstance(fields.model, str) else None
        record.stream = fields.streams
        counts = request if request is not None else fields.counts
        if "service_tier" in counts:
            record.table_priced = standard_tier(counts)
        if record.stream and scope["method"] == "POST" and scope["path"] in _USAGE_PATHS:
            return (*ask_for_usage(body, fields), counts)
        return body, False, counts
