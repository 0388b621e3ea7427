"""`create_app(config)`: the one ASGI app serving the /v1 proxy, the admin API and health.

A bare ASGI dispatcher sits in front: the /v1 hot path pays for no framework,
the admin API is a Starlette app, and every response carries the proxy's
request id in `X-Byok-Request-Id`. Shared resources (database, HTTP clients)
are built in the lifespan and live on `ByokApp.runtime`, never at import.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp

from proxy import credentials, invalidation, security
from proxy.asgi import Message, Receive, Scope, Send, send_error, send_json
from proxy.auth_limit import FailedAuthLimit
from proxy.config import Config, load_config
from proxy.errors import NotFound, ServiceUnavailable, StoreUnavailable, Unauthorized
from proxy.forward import Forwarder
from proxy.logs import REQUEST_ID
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.ratelimit import RateLimiter
from proxy.replicas import Heartbeat
from proxy.runtime import Runtime
from proxy.spend import SpendControl
from proxy.store import Store, check_schema
from proxy.upstream import make_client
from proxy.usage_sink import UsageLog

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger("byok")

REQUEST_ID_HEADER = b"x-byok-request-id"


class RequestIds:
    """Request ids (also the usage line's `request_id`): a random per-process prefix and a
    counter, unique across workers and replicas without a syscall per request."""

    def __init__(self) -> None:
        self._prefix = "req_" + os.urandom(6).hex()
        self._next = itertools.count().__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():012x}"


class ByokApp:
    """The ASGI application; `runtime` exists between lifespan startup and shutdown."""

    def __init__(
        self, config: Config, *, serve_proxy: bool = True, serve_admin: bool = True
    ) -> None:
        self.config = config
        self.serve_proxy = serve_proxy
        self.serve_admin = serve_admin
        self._admin: Starlette | None = None  # the admin API, built on first use
        self.runtime: Runtime | None = None
        self.forwarder: Forwarder | None = None
        self.new_request_id = RequestIds()
        self._console_app: ASGIApp | None = None  # admin.console, built on first use
        self._serves_console = serve_admin and config.console

    @property
    def admin(self) -> Starlette:
        """The admin API app, imported and built on first use: a process that serves only
        `/v1` (the admin API on its own port) never loads it, and every process starts
        sooner (see README, Performance)."""
        if self._admin is None:
            from admin.app import create_admin_app

            self._admin = create_admin_app()
            self._admin.state.runtime = self.runtime
        return self._admin

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Runtime]:
        """Build the runtime (database, clients) and tear it down."""
        config = self.config
        unserved = credentials.fallback_without_platform_key(config)
        if unserved:
            log.warning(
                "tier(s) %s fall back to the platform key, but PLATFORM_OPENAI_KEY is not set: "
                "their tenants without a key of their own get 402 openai_key_missing",
                ", ".join(unserved),
            )
        store = Store.connect(config.database_url, config.cache_ttl_seconds, config.database)
        await run_in_threadpool(check_schema, store.engine)  # `serve` migrated it first
        upstream_client = make_client(config.upstream)
        metrics = Metrics()
        metrics.known_models = config.prices.knows
        usage_log = UsageLog(
            config.usage_log,
            on_drop=metrics.usage_dropped.inc,
            on_health=lambda ok: metrics.usage_log_writable.set(1 if ok else 0),
        )
        await usage_log.start()
        spend = SpendControl(
            store,
            config.prices,
            RateLimiter(config.rate_limits, metrics.rate_limiter_shared),
            config.platform_key.default_output_tokens,
            on_spend=metrics.spent,
        )
        spend.ledger.on_drop = metrics.ledger_rows_dropped.inc
        runtime = Runtime(
            config=config,
            store=store,
            vault=security.Vault(config.keyring, store.load_ciphertext),
            usage_log=usage_log,
            metrics=metrics,
            auth_limit=FailedAuthLimit(
                config.failed_auth_per_minute, metrics.auth_failures.inc, metrics.auth_blocked.inc
            ),
            spend=spend,
        )
        flusher = asyncio.create_task(spend.run())
        heartbeat = Heartbeat(store, config.keyring)  # rotate-keys reads it
        await heartbeat.start()
        listener = invalidation.Listener(store)  # PostgreSQL: other replicas' changes at once
        await listener.start()
        self.forwarder = Forwarder(runtime, upstream_client)
        self.runtime = runtime
        if self._admin is not None:
            self._admin.state.runtime = runtime
        security.configure(runtime.vault)  # the seed's module-level functions use it
        # Startup objects are long-lived: keep them out of every collection.
        gc.collect()
        gc.freeze()
        warming = _import_in_background("admin.app") if self.serve_admin else None
        try:
            yield runtime
        finally:
            self.runtime = None
            security.unconfigure(runtime.vault)
            await self.forwarder.drain()
            await spend.aclose()
            await flusher
            await upstream_client.close()
            await runtime.aclose()
            await usage_log.close()
            await heartbeat.aclose()
            await listener.aclose()
            store.dispose()
            if warming is not None:
                await asyncio.gather(warming, return_exceptions=True)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
                assert message["type"] == "lifespan.shutdown"
        except BaseException as exc:
            # uvicorn logs the message (once, without a traceback) and exits.
            await send({"type": "lifespan.startup.failed", "message": f"startup failed: {exc}"})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        request_id = self.new_request_id()
        REQUEST_ID.set(request_id)  # log lines of this request carry it
        rid_header = (REQUEST_ID_HEADER, request_id.encode())
        path: str = scope["path"]
        if path.startswith("/v1/") and self.forwarder is not None and self.serve_proxy:
            # The hot path adds the request id header itself (no send wrapper).
            await self.forwarder(scope, receive, send, request_id, rid_header)
            return
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        if self.runtime is None:
            await send_error(send_with_id, ServiceUnavailable("Not started.", code="not_ready"))
        elif path.startswith("/api/") and self.serve_admin:
            await self.admin(scope, receive, send_with_id)
        elif (path == "/console" or path.startswith("/console/")) and self._serves_console:
            await self._console()(scope, receive, send_with_id)
        elif path == "/healthz":
            await send_json(send_with_id, 200, b'{"status":"ok"}')
        elif path == "/readyz":
            await self._readyz(send_with_id)
        elif path == "/metrics":
            await self._metrics(scope, send_with_id)
        else:
            await send_error(send_with_id, NotFound(f"No such route: {path[:100]}"))

    def _console(self) -> ASGIApp:
        """The web console (`admin.console`), imported and built on first use."""
        if self._console_app is None:
            from admin.console import create_console_app

            self._console_app = create_console_app(self.admin, self.config)
        return self._console_app

    async def _metrics(self, scope: Scope, send: Send) -> None:
        assert self.runtime is not None
        if self.config.metrics_require_auth:
            given = security.bearer_token(dict(scope["headers"]).get(b"authorization", b""))
            if given is None or not security.tokens_equal(given, self.config.admin_token.reveal()):
                await send_error(send, Unauthorized("GET /metrics needs the admin token."))
                return
        # Off the loop: a large page takes a while to render, and requests must not wait.
        body = await asyncio.to_thread(self.runtime.metrics.render)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _readyz(self, send: Send) -> None:
        assert self.runtime is not None
        try:
            await self.runtime.store.ready()
        except StoreUnavailable:
            timeout = self.config.database.ready_timeout
            await send_error(
                send,
                ServiceUnavailable(
                    f"Database unreachable, or no answer within {timeout:g}s.", code="not_ready"
                ),
            )
            return
        usage_log = self.runtime.usage_log
        if not usage_log.writable:
            await send_error(
                send,
                ServiceUnavailable(
                    f"Usage log unwritable ({usage_log.problem}); {len(usage_log)} line(s) "
                    f"queued, {usage_log.dropped} dropped.",
                    code="usage_log_unwritable",
                ),
            )
            return
        await send_json(send, 200, json.dumps({"status": "ready"}).encode())


def _import_in_background(module: str) -> asyncio.Task[object]:
    """Import `module` on a thread: the admin API, when it shares the proxy's listener, is
    loaded after startup (`/healthz` answers sooner) and before its first request, most
    often. A failure is logged at once; the first request then answers 500."""

    def done(task: asyncio.Task[object]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("%s failed to load: %s", module, type(error).__name__)

    task = asyncio.create_task(asyncio.to_thread(importlib.import_module, module))
    task.add_done_callback(done)
    return task


def create_app(config: Config, *, serve_proxy: bool = True, serve_admin: bool = True) -> ByokApp:
    """The ASGI app for `config` (nothing is connected until the lifespan starts).

    By default one app serves both the /v1 proxy and the admin API; when the
    config binds the admin API to its own host/port, `serve` runs two apps.
    """
    return ByokApp(config, serve_proxy=serve_proxy, serve_admin=serve_admin)


def create_app_from_env() -> ByokApp:
    """Factory for `uvicorn --factory` and worker processes: config from the environment."""
    config = load_config(dev=os.environ.get("BYOK_DEV") == "1")
    return create_app(config, serve_admin=config.admin_port is None)


def create_admin_app_from_env() -> ByokApp:
    """Factory of the admin-only listener (when `admin.port` is set)."""
    return create_app(load_config(dev=os.environ.get("BYOK_DEV") == "1"), serve_proxy=False)
