"""Instant cache invalidation across replicas: PostgreSQL NOTIFY out, LISTEN in.

Every change that must take effect at once (a proxy key revoked or updated, an
OpenAI key set, removed or marked invalid, a tenant's tier or policy changed, a
tenant deleted, with each of its keys) calls `key_changed` or `tenant_changed` inside
the transaction that makes it. `pg_notify` is transactional: the message is
delivered when the change commits, and never for one rolled back. The callers
are the service functions shared by the admin API and the CLI, so a change made
with the CLI directly on the database is announced too.

Every serving process on PostgreSQL runs a `Listener`: its own connection
(autocommit, `LISTEN byok_invalidate`) in a background task that drops the
named entries from the store's caches. The hot path never sees it: a cache hit
stays a dict lookup. A listener that loses its connection logs once, leaves the
caches to `cache_ttl_seconds` meanwhile, and reconnects with backoff; once
listening again it drops every cached entry, since it may have missed messages.

Payloads name what changed, never a secret: `tenant:<id>`, `key:<sha-256 of
the proxy key>` (what the database stores), each prefixed with the schema the
change was made in (`public/tenant:acme`): the channel
is database-wide, and a listener ignores other schemas' messages.

SQLite (one machine) keeps the TTL alone: publishing is a no-op, no listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncGenerator

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlmodel import Session

from proxy.store import Store

log = logging.getLogger("byok.invalidation")

CHANNEL = "byok_invalidate"
APPLICATION_NAME = "byok-invalidation:{pid}"  # pg_stat_activity tells the listeners apart
RECONNECT_FIRST = 0.2  # seconds before the first reconnection attempt; doubles each failure
RECONNECT_MAX = 10.0  # the longest wait between attempts
CONNECT_TIMEOUT = 5  # seconds; also how long startup waits for the first LISTEN
# Tagged with the schema it was made in: deployments that share one database in different
# schemas (and the tests) share the channel, and each listener keeps only its own.
_NOTIFY = text("SELECT pg_notify(:channel, current_schema() || '/' || :payload)")


def tenant_changed(session: Session, tenant_id: str) -> None:
    """Announce, when `session` commits, that the tenant's cached snapshot is stale."""
    _publish(session, f"tenant:{tenant_id}")


def key_changed(session: Session, key_hash: str) -> None:
    """Announce, when `session` commits, that one proxy key's cached lookup is stale."""
    _publish(session, f"key:{key_hash}")


def _publish(session: Session, payload: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_NOTIFY, {"channel": CHANNEL, "payload": payload})


def apply(store: Store, payload: str) -> None:
    """Drop what `payload` (`kind:name`) names from the store's caches (unknown: everything)."""
    kind, _, name = payload.partition(":")
    if kind == "tenant" and name:
        store.invalidate_tenant(name)
    elif kind == "key" and name:
        store.invalidate_key(name)
    else:
        store.invalidate_all()


class Listener:
    """The background task that LISTENs on its own connection and applies what it hears."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.application_name = APPLICATION_NAME.format(pid=os.getpid())
        self._conninfo = _conninfo(store.engine.url)
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start listening (PostgreSQL only); wait at most CONNECT_TIMEOUT for the first LISTEN."""
        if self.store.engine.dialect.name != "postgresql":
            return
        self._task = asyncio.create_task(self._run(), name="byok-invalidation")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), CONNECT_TIMEOUT)

    @property
    def listening(self) -> bool:
        """Whether LISTEN is in place now (False on SQLite, and while reconnecting)."""
        return self._listening.is_set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        pause = RECONNECT_FIRST
        lost = False
        while True:
            try:
                # aclosing: the connection closes at once when applying a message fails
                async with contextlib.aclosing(self._listen()) as payloads:
                    async for payload in payloads:
                        if lost:
                            log.info("invalidation listener reconnected; caches cleared")
                            lost = False
                        pause = RECONNECT_FIRST
                        if payload is not None:
                            apply(self.store, payload)
            except Exception as error:  # any failure: the TTL covers until we are back
                if not lost:
                    lost = True
                    log.warning(
                        "invalidation listener lost its database connection (%s): caches "
                        "fall back to cache_ttl_seconds until it reconnects",
                        type(error).__name__,
                    )
            self._listening.clear()
            # Jittered: after a failover every process reconnects (and reloads) not at once.
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))  # noqa: S311 (timing)
            pause = min(pause * 2, RECONNECT_MAX)

    async def _listen(self) -> AsyncGenerator[str | None, None]:
        """Connect, LISTEN, clear the caches, then yield each payload (None once listening)."""
        import psycopg  # the driver; only PostgreSQL deployments load it here

        conn = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            application_name=self.application_name,
            connect_timeout=CONNECT_TIMEOUT,
            # A server that stops answering (a partition) is noticed within ~15 s.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        async with conn:
            row = await (await conn.execute("SELECT current_schema()")).fetchone()
            mine = f"{row[0] if row else ''}/"
            await conn.execute(f"LISTEN {CHANNEL}")
            # Messages sent while we were not listening are lost: forget everything once.
            self.store.invalidate_all()
            self._listening.set()
            yield None
            async for notice in conn.notifies():
                if notice.payload.startswith(mine):
                    yield notice.payload[len(mine) :]
        raise ConnectionError("notification stream ended")


def _conninfo(url: URL) -> str:
    """The libpq URI of the store's database (SQLAlchemy's driver name dropped)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)
