"""The database: engine, migrations, sessions, and the cached lookups of the hot path.

SQLite (WAL mode, busy timeout: safe with several workers) is the embedded
default; the same code runs on PostgreSQL through `DATABASE_URL`. Schema
changes go through Alembic (`proxy/migrations`).

The proxy-key and tenant lookups are cached in-process for
`cache_ttl_seconds`. A change made through this process calls
`invalidate_*` so it takes effect here at once, even against a lookup that
was already reading the database: every invalidation bumps a generation
number, a load caches its answer only if no invalidation happened since it
started, and later callers never join a load that started before one. On
PostgreSQL, other workers and replicas are told at once (`proxy.invalidation`,
NOTIFY); on SQLite, or when a notification is missed, they see the change
within the TTL (plus one read). The cache holds ciphertext at most, never a
plaintext key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import event, exc, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlmodel import Session, col, create_engine, select

from proxy import database_url
from proxy.config import ConfigError, DatabaseConfig
from proxy.errors import StoreUnavailable
from proxy.models import ProxyKey, Tenant
from proxy.policy import Policy
from proxy.policy import parse as parse_policy
from proxy.security import hash_proxy_key

log = logging.getLogger("byok.store")

_MIGRATIONS = Path(__file__).parent / "migrations"
HEAD_REVISION = "0005"  # the newest revision in proxy/migrations/versions (a test checks)
_PG_MIGRATION_LOCK = 0x6279_6F6B  # "byok"
_MIGRATION_WAIT_MS = 600_000  # how long a second `migrate` waits for the first to finish
_MISS = object()
_MAX_CACHED = 100_000  # entries per cache; past this it starts over
_VALID_MEMORY = 3600.0  # seconds a key that authenticated counts as a real caller's


@dataclass(frozen=True)
class TenantSnapshot:
    """What the hot path needs of a tenant (cacheable: no plaintext)."""

    id: str
    tier: str
    key_status: str
    ciphertext: str | None
    policy: Policy | None = None

    def __repr__(self) -> str:
        return f"TenantSnapshot(id={self.id!r}, tier={self.tier!r}, key_status={self.key_status!r})"


@dataclass(frozen=True)
class Principal:
    """Who a proxy key belongs to, until when, and under which policy."""

    tenant_id: str
    key_id: str
    expires_at: float | None = None  # Unix time; None: never
    policy: Policy | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


# Errors that mean "the database is slow, locked, down or read-only", not "this request is
# wrong": a request that needs the database then gets 503 store_unavailable.
UNAVAILABLE = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


def make_engine(url: str, limits: DatabaseConfig | None = None) -> Engine:
    """Create the engine with bounded waits.

    SQLite gets WAL mode, foreign keys and a busy timeout of `lock_timeout`;
    PostgreSQL a `statement_timeout` and `lock_timeout` on every connection, a
    pre-ping (a terminated connection is replaced, not reported) and a pool of
    `pool_size` + `max_overflow` with a `pool_timeout` wait. A URL byok-proxy
    cannot use raises ConfigError (`proxy.database_url`).
    """
    limits = limits or DatabaseConfig()
    parsed = database_url.check(url)
    try:
        return _make_engine(parsed, limits)
    except (ImportError, exc.NoSuchModuleError):
        raise database_url.driver_missing(parsed) from None


def _make_engine(url: URL, limits: DatabaseConfig) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": limits.lock_timeout},
            pool_timeout=limits.pool_timeout,
            hide_parameters=True,
        )
        busy_ms = int(limits.lock_timeout * 1000)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "handle_error")
        def _readonly_is_a_lost_connection(context: Any) -> None:
            # A connection opened while the file was read-only stays read-only: throw the
            # pool away so the next connection sees the file as it is now.
            if "readonly database" in str(context.original_exception):
                context.is_disconnect = True

        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=limits.pool_size,
        max_overflow=limits.max_overflow,
        pool_timeout=limits.pool_timeout,
        connect_args={
            "connect_timeout": max(1, round(limits.pool_timeout)),
            # A server that stops answering (a partition, a hung host) is noticed by TCP
            # within ~15 s, so no thread waits on a dead connection for long.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(limits.call_timeout * 1000),
        },
        hide_parameters=True,
    )
    statement_ms = int(limits.statement_timeout * 1000)
    lock_ms = int(limits.lock_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _timeouts(dbapi_conn: Any, _record: Any) -> None:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET statement_timeout = {statement_ms}")
            cur.execute(f"SET lock_timeout = {lock_ms}")
        dbapi_conn.autocommit = autocommit

    return engine


def current_revision(engine: Engine) -> str | None:
    """The schema revision recorded in the database (None for an empty one)."""
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except exc.DBAPIError:
            return None


def known_revision(engine: Engine) -> str | None:
    """The schema revision (None: an empty database), refused in one line if it is newer
    than this byok-proxy: a later release migrated it, and this one would misread it."""
    try:
        revision = current_revision(engine)
    except UNAVAILABLE as error:
        raise database_url.unreachable(engine.url, error) from None
    if revision is not None and revision not in _revisions():
        raise ConfigError(
            f"the database schema is at revision {revision}, newer than this byok-proxy "
            f"({HEAD_REVISION}): upgrade byok-proxy, or point it at the right database"
        )
    return revision


def _revisions() -> set[str]:
    """The revisions in proxy/migrations/versions (each file is named after its id)."""
    return {path.name.split("_", 1)[0] for path in (_MIGRATIONS / "versions").glob("[0-9]*.py")}


def schema_is_current(url: str, limits: DatabaseConfig) -> bool:
    """Whether the database at `url` is at HEAD_REVISION, checked without Alembic. Any
    doubt (unreachable, empty, older, newer) answers False: `migrate` then says what
    is wrong, in its one line."""
    try:
        engine = make_engine(url, limits)
    except ConfigError:
        return False
    try:
        return known_revision(engine) == HEAD_REVISION
    except (ConfigError, exc.SQLAlchemyError):
        return False
    finally:
        engine.dispose()


def check_schema(engine: Engine) -> None:
    """A serving worker's startup check: HEAD_REVISION, or one line saying what to do.

    An empty database gets its schema (a first start without `serve`, e.g.
    `uvicorn --factory`); an older one is refused, never upgraded here: other
    replicas may still be serving it, so `byok-proxy migrate` upgrades it, once.
    """
    revision = known_revision(engine)
    if revision is None:
        migrate(engine)
    elif revision != HEAD_REVISION:
        raise older_schema(revision)


def older_schema(revision: str) -> ConfigError:
    """The one line for a schema older than this release: upgraded on purpose, once."""
    return ConfigError(
        f"the database schema is at revision {revision}, older than this byok-proxy "
        f"({HEAD_REVISION}): run `byok-proxy migrate` (once), then start the replicas "
        "(or start this one with `serve --migrate`)"
    )


def migrate(engine: Engine, upgrade: bool = True) -> str | None:
    """Bring the schema to HEAD_REVISION with Alembic (no-op, and no Alembic import, if there);
    returns the revision it found (None: an empty database).

    With `upgrade` False, only an empty database gets its schema; an older one is
    refused in one line (`serve` without --migrate: other replicas may still be
    serving that schema, so it is upgraded once, on purpose, by `byok-proxy migrate`).

    Alembic (and Mako) cost the serving process ~10 MB, so `serve` runs this
    in a short-lived `byok-proxy migrate` process and workers only check.
    Several processes may run it at once (`_serialised`). A database that
    cannot be opened, or whose schema is newer, raises ConfigError: one line.
    """
    found = known_revision(engine)
    if found == HEAD_REVISION:
        return found
    if found is not None and not upgrade:
        raise older_schema(found)
    from alembic import command
    from alembic.config import Config as AlembicConfig

    with engine.begin() as conn:
        _serialised(conn)
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return found


def _serialised(conn: Connection) -> None:
    """Take the migration lock, held until commit: a second `migrate` started at the same
    time waits for the first, then finds the schema at head (Alembic reads it under the
    lock). PostgreSQL: an advisory lock; SQLite: the database's write lock. The wait may
    be long; statements after it keep the usual lock wait, so DDL queued behind live
    replicas holds them up for `lock_timeout` at most."""
    wait = _MIGRATION_WAIT_MS
    if conn.dialect.name == "sqlite":
        usual = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {wait}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(usual or 0)}")
        return
    usual = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar()
    conn.execute(text(f"SET LOCAL lock_timeout = {wait}"))
    conn.execute(text("SET LOCAL statement_timeout = 0"))  # DDL on a big table takes long
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": usual})


def _epoch(value: datetime | None) -> float | None:
    """A stored timestamp (naive means UTC: SQLite drops the zone) as Unix time."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


_last_warning = [0.0]


def _unavailable(error: BaseException) -> StoreUnavailable:
    """The 503 for a database failure, logged (at most every 5 s: an outage is one event)."""
    if time.monotonic() - _last_warning[0] > 5:
        _last_warning[0] = time.monotonic()
        what = "timed out" if isinstance(error, TimeoutError) else type(error).__name__
        log.warning("database unavailable (%s): requests that need it get 503", what)
    return StoreUnavailable()


class Store:
    """Sessions plus the TTL-cached lookups used on every proxied request."""

    def __init__(
        self, engine: Engine, cache_ttl: float = 5.0, limits: DatabaseConfig | None = None
    ) -> None:
        self.engine = engine
        self.cache_ttl = cache_ttl
        self.limits = limits or DatabaseConfig()
        # Database calls get threads of their own, bounded: a slow database never takes the
        # threads other work needs, and callers queue here, not in the pool.
        self._limiter = anyio.CapacityLimiter(self.limits.concurrency)
        self._probe = anyio.CapacityLimiter(1)
        self._keys: dict[str, tuple[float, Principal | None]] = {}
        self._tenants: dict[str, tuple[float, TenantSnapshot | None]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._valid: dict[str, float] = {}  # digests of keys that authenticated: expiry
        self._generation = 0  # bumped by every invalidation
        self._lock = threading.Lock()  # generation check + cache write vs bump + clear
        self.loads = 0  # database lookups made (tests count them)

    @classmethod
    def connect(
        cls, url: str, cache_ttl: float = 5.0, limits: DatabaseConfig | None = None
    ) -> Store:
        return cls(make_engine(url, limits), cache_ttl, limits)

    def __repr__(self) -> str:
        return f"Store(dialect={self.engine.dialect.name!r})"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session; commit explicitly, rolled back on error."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` (blocking database work) in one of the store's threads.

        Raises StoreUnavailable (503, Retry-After) when the database is slow,
        locked, down or read-only; each wait is bounded by the database
        timeouts (`DatabaseConfig`), so this returns within `call_timeout`.
        """
        try:
            with anyio.fail_after(self.limits.call_timeout):
                # A thread stuck past the timeout is left to finish on its own (the
                # database timeouts and TCP keepalives end it); the caller gets its 503.
                return await anyio.to_thread.run_sync(
                    call, *args, limiter=self._limiter, abandon_on_cancel=True
                )
        except (*UNAVAILABLE, TimeoutError) as error:
            raise _unavailable(error) from None

    async def ready(self) -> None:
        """Raise StoreUnavailable unless the database takes a write within `ready_timeout`."""
        try:
            with anyio.fail_after(self.limits.ready_timeout):
                await anyio.to_thread.run_sync(
                    self.ping, limiter=self._probe, abandon_on_cancel=True
                )
        except (*UNAVAILABLE, TimeoutError) as error:
            raise _unavailable(error) from None

    def ping(self) -> None:
        """Raise if the database cannot be reached (SQLite: or cannot take a write now)."""
        path = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and path and not os.access(path, os.W_OK):
            # Connections opened earlier may still write; new ones cannot: not ready.
            raise exc.OperationalError("ping", None, PermissionError("database file read-only"))
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, or busy/read-only
                conn.exec_driver_sql("ROLLBACK")
            else:
                conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # --- cached lookups (hot path) -------------------------------------------------

    def _fresh(self, cache: dict[str, tuple[float, Any]], key: str) -> Any:
        hit = cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return _MISS

    def _load_principal(self, digest: str) -> Principal | None:
        generation = self._generation
        self.loads += 1
        with self.session() as s:
            row = s.exec(
                select(ProxyKey).where(
                    ProxyKey.key_hash == digest,
                    col(ProxyKey.revoked_at).is_(None),
                )
            ).first()
        found = (
            Principal(row.tenant_id, row.id, _epoch(row.expires_at), parse_policy(row.policy))
            if row
            else None
        )
        if found is not None:
            if len(self._valid) >= _MAX_CACHED:
                self._valid.clear()
            self._valid[digest] = time.monotonic() + _VALID_MEMORY
        with self._lock:
            if generation == self._generation:  # else a change raced this read: don't keep it
                if len(self._keys) >= _MAX_CACHED:  # unknown keys are cached too: stay bounded
                    self._keys.clear()
                self._keys[digest] = (time.monotonic() + self.cache_ttl, found)
        return found

    def _load_tenant(self, tenant_id: str) -> TenantSnapshot | None:
        generation = self._generation
        self.loads += 1
        with self.session() as s:
            row = s.get(Tenant, tenant_id)
        snap = (
            TenantSnapshot(
                row.id,
                row.tier,
                row.openai_key_status,
                row.openai_api_key_encrypted,
                parse_policy(row.policy),
            )
            if row
            else None
        )
        with self._lock:
            if generation == self._generation:
                if len(self._tenants) >= _MAX_CACHED:
                    self._tenants.clear()
                self._tenants[tenant_id] = (time.monotonic() + self.cache_ttl, snap)
        return snap

    def principal(self, proxy_key: str) -> Principal | None:
        """The tenant a proxy key belongs to, or None if unknown or revoked (blocking)."""
        digest = hash_proxy_key(proxy_key)
        found = self._fresh(self._keys, digest)
        return self._load_principal(digest) if found is _MISS else found

    def recently_valid(self, proxy_key: str) -> bool:
        """Whether this key authenticated here within `_VALID_MEMORY` seconds (no lookup).

        Lets the failed-authentication limit spare the keys of real callers; the
        key is still looked up as usual (a revocation still counts).
        """
        expiry = self._valid.get(hash_proxy_key(proxy_key))
        return expiry is not None and expiry > time.monotonic()

    async def principal_async(self, proxy_key: str) -> Principal | None:
        """`principal()` for the event loop: a cache hit costs no thread hop."""
        digest = hash_proxy_key(proxy_key)
        found = self._fresh(self._keys, digest)
        if found is _MISS:
            return await self._load_once(("key", digest), self._load_principal, digest)  # type: ignore[no-any-return]
        return found  # type: ignore[no-any-return]

    async def _load_once(self, key: tuple[str, str], load: Callable[[str], Any], arg: str) -> Any:
        """Run `load(arg)` in a thread, once for all callers missing the same entry at once."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.run(load, arg))
            self._inflight[key] = pending

            def forget(done: asyncio.Future[Any]) -> None:
                if self._inflight.get(key) is done:  # not a newer load after an invalidation
                    self._inflight.pop(key, None)

            pending.add_done_callback(forget)
        return await asyncio.shield(pending)

    def tenant(self, tenant_id: str) -> TenantSnapshot | None:
        """A snapshot of the tenant, or None if it does not exist (blocking)."""
        found = self._fresh(self._tenants, tenant_id)
        return self._load_tenant(tenant_id) if found is _MISS else found

    async def tenant_async(self, tenant_id: str) -> TenantSnapshot | None:
        """`tenant()` for the event loop: a cache hit costs no thread hop."""
        found = self._fresh(self._tenants, tenant_id)
        if found is _MISS:
            return await self._load_once(("tenant", tenant_id), self._load_tenant, tenant_id)  # type: ignore[no-any-return]
        return found  # type: ignore[no-any-return]

    def load_ciphertext(self, tenant_id: str) -> str | None:
        """The stored ciphertext of a tenant's OpenAI key (uncached)."""
        with self.session() as s:
            row = s.get(Tenant, tenant_id)
        return row.openai_api_key_encrypted if row else None

    def invalidate_tenant(self, tenant_id: str) -> None:
        """Forget the cached tenant so this replica sees a change at once."""
        with self._lock:
            self._generation += 1
            self._tenants.pop(tenant_id, None)
        self._inflight.pop(("tenant", tenant_id), None)

    def invalidate_key(self, digest: str) -> None:
        """Forget one cached proxy-key lookup, by the key's stored hash."""
        with self._lock:
            self._generation += 1
            self._keys.pop(digest, None)
        self._inflight.pop(("key", digest), None)

    def invalidate_keys(self) -> None:
        """Forget every cached proxy-key lookup (after a revocation or deletion)."""
        with self._lock:
            self._generation += 1
            self._keys.clear()
        for key in list(self._inflight):  # list(): atomic, callers may be in a thread
            if key[0] == "key":
                self._inflight.pop(key, None)

    def invalidate_all(self) -> None:
        """Forget every cached lookup (invalidation messages may have been missed)."""
        with self._lock:
            self._generation += 1
            self._keys.clear()
            self._tenants.clear()
        self._inflight.clear()
