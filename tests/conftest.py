"""Shared fixtures: a database per test (SQLite and PostgreSQL), config, app and client.

PostgreSQL tests use `BYOK_TEST_PG_URL` (default: the project machines' local
server) in a fresh schema per test. They skip when it is unreachable, unless
`BYOK_REQUIRE_POSTGRES=1` (set by `.ci/run`), where that is a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from helpers import make_config
from stack import Stack

from proxy.app import ByokApp, create_app
from proxy.config import Config
from proxy.security import generate_master_key

PG_URL = os.environ.get("BYOK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _reachable_postgres(**options: Any) -> sqlalchemy.Engine:
    """An engine to the test server, or the test skips (fails under BYOK_REQUIRE_POSTGRES=1)."""
    try:
        engine = sqlalchemy.create_engine(PG_URL, **options)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:
        if os.environ.get("BYOK_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (BYOK_REQUIRE_POSTGRES=1) but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    return engine


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[tuple[str, str]]:
    """A new database of the caller's own on the test server: (its name, its URL); dropped
    after, its connections forced off."""
    admin = _reachable_postgres(isolation_level="AUTOCOMMIT")
    name = prefix + secrets.token_hex(6)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield name, sqlalchemy.make_url(PG_URL).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _postgres_schema_url() -> Iterator[str]:
    engine = _reachable_postgres()
    schema = "byok_test_" + secrets.token_hex(6)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite file or PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'byok.db'}"
    else:
        yield from _postgres_schema_url()


@pytest.fixture
def master_key() -> str:
    return generate_master_key()


@pytest.fixture
def config(database_url: str, master_key: str) -> Config:
    return make_config(database_url, master_key)


@pytest.fixture
async def app(config: Config) -> AsyncIterator[ByokApp]:
    """The app with its lifespan running (database migrated, clients open)."""
    application = create_app(config)
    async with application.lifespan():
        yield application


@pytest.fixture
async def client(app: ByokApp) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client (ASGI transport; respx does not intercept it)."""
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4711))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as c:
        yield c


@pytest.fixture
def stack(tmp_path: Path, master_key: str) -> Iterator[Stack]:
    """The real proxy on a free port in front of the fake OpenAI, on a fresh SQLite file."""
    with Stack.sqlite(tmp_path, master_key) as s:
        yield s
