"""Schema migrations with several replicas (`proxy.store.migrate`, `check_schema`), run
through the real `byok-proxy` entry point on SQLite and on a fresh PostgreSQL schema:
concurrent migrators, a schema newer or older than the code, an upgrade from 0001."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from fake_openai import FakeOpenAI, start_fake
from helpers import ADMIN_TOKEN, GOOD_KEY, OTHER_KEY, make_config
from servers import free_port, serve, serve_env

from proxy import store as store_module
from proxy.app import create_app
from proxy.config import ConfigError
from proxy.security import Keyring, hash_proxy_key, key_hint, new_proxy_key
from proxy.store import HEAD_REVISION, make_engine, migrate

BYOK_PROXY = str(Path(sys.executable).parent / "byok-proxy")
PROXY_VARIABLES = ("ENCRYPTION_KEY", "ADMIN_TOKEN", "DATABASE_URL", "BYOK_CONFIG", "BYOK_DEV")
NEWER = "0007"


def _env(database_url: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    return {**base, "DATABASE_URL": database_url, **extra}


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BYOK_PROXY, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _upgrade(database_url: str, revision: str) -> None:
    """Alembic upgrade of the database to `revision`, as `proxy.store.migrate` runs it."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(store_module._MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


OLDER_0001 = (
    f"the database schema is at revision 0001, older than this byok-proxy "
    f"({HEAD_REVISION}): run `byok-proxy migrate` (once), then start the replicas "
    "(or start this one with `serve --migrate`)"
)


def _revision(database_url: str) -> str | None:
    """The schema revision the database records."""
    engine = make_engine(database_url)
    try:
        return store_module.current_revision(engine)
    finally:
        engine.dispose()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    upstream, server = start_fake()
    with server:
        yield upstream


def test_the_revisions_on_disk_are_alembics() -> None:
    """`known_revision` reads revision ids from file names; they must be Alembic's ids."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(store_module._MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    assert store_module._revisions() == {r.revision for r in script.walk_revisions()}
    assert script.get_current_head() == HEAD_REVISION


def test_two_migrate_processes_at_once_leave_one_schema_at_head(
    database_url: str, tmp_path: Path
) -> None:
    env = _env(database_url)
    first, second = _start(["migrate"], tmp_path, env), _start(["migrate"], tmp_path, env)
    results = [_finish(first), _finish(second)]

    assert results == [(0, ""), (0, "")], results
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            tables = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert versions == [(HEAD_REVISION,)]
    assert {"tenants", "proxy_keys", "audit_events", "replicas", "console_sessions"} <= tables


def _newer_schema(database_url: str) -> None:
    """A schema migrated by a later release: a revision this byok-proxy does not have."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER})
    finally:
        engine.dispose()


def test_a_newer_schema_is_refused_in_one_line_by_every_database_command(
    database_url: str, tmp_path: Path, master_key: str
) -> None:
    _newer_schema(database_url)
    env = _env(database_url, ENCRYPTION_KEY=master_key, ADMIN_TOKEN=ADMIN_TOKEN)
    commands = (["migrate"], ["serve", "--port", str(free_port())], ["tenants", "list"])
    results = [_finish(_start(args, tmp_path, env)) for args in commands]

    expected = (
        f"byok-proxy: the database schema is at revision {NEWER}, newer than this byok-proxy "
        f"({HEAD_REVISION}): upgrade byok-proxy, or point it at the right database"
    )
    for args, (code, err) in zip(commands, results, strict=True):
        assert (code, err.strip().splitlines()) == (2, [expected]), (args, err)


async def test_a_worker_refuses_a_newer_schema(database_url: str, master_key: str) -> None:
    _newer_schema(database_url)
    with pytest.raises(ConfigError, match=f"^the database schema is at revision {NEWER}, newer"):
        async with create_app(make_config(database_url, master_key)).lifespan():
            pass


async def test_a_worker_refuses_an_older_schema_and_says_to_migrate(
    database_url: str, master_key: str
) -> None:
    """Workers only check: an older schema may still be served by the replicas of the
    previous release, so it is upgraded by one `byok-proxy migrate`, never by a worker."""
    _upgrade(database_url, "0001")
    with pytest.raises(ConfigError) as refused:
        async with create_app(make_config(database_url, master_key)).lifespan():
            pass

    assert str(refused.value) == OLDER_0001
    assert _revision(database_url) == "0001"  # untouched


# --- the upgrade from the first revision ---------------------------------------------

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _first_release_rows(master_key: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Rows as the first release (revision 0001) wrote them, and the proxy keys issued."""
    keyring = Keyring.parse(master_key)
    keys = {"acme": new_proxy_key(), "globex": new_proxy_key(), "revoked": new_proxy_key()}
    tenant = {"created_at": WHEN, "updated_at": WHEN, "openai_key_validated_at": None}
    rows = {
        "tenants": [
            {
                **tenant,
                "id": tid,
                "name": tid.title(),
                "tier": "pro",
                "openai_api_key_encrypted": keyring.encrypt(key, tid),
                "openai_key_status": "active",
                "openai_key_hint": key_hint(key),
                "openai_key_updated_at": WHEN,
            }
            for tid, key in (("acme", GOOD_KEY), ("globex", OTHER_KEY))
        ]
        + [
            {
                **tenant,
                "id": "initech",
                "name": "Initech",
                "tier": "trial",
                "openai_api_key_encrypted": None,
                "openai_key_status": "none",
                "openai_key_hint": None,
                "openai_key_updated_at": None,
            }
        ],
        "proxy_keys": [
            {"id": "key_acme", "tenant_id": "acme", "revoked_at": None},
            {"id": "key_globex", "tenant_id": "globex", "revoked_at": None},
            {"id": "key_revoked", "tenant_id": "acme", "revoked_at": WHEN},
        ],
        "audit_events": [
            {
                "id": n,
                "ts": WHEN,
                "tenant_id": tid,
                "action": action,
                "actor": "admin",
                "key_hint": hint,
                "request_id": f"req_{n}",
                "source_ip": "203.0.113.7",
            }
            for n, (tid, action, hint) in enumerate(
                [
                    ("acme", "tenant.created", None),
                    ("acme", "openai_key.set", key_hint(GOOD_KEY)),
                    ("globex", "tenant.created", None),
                    ("globex", "openai_key.set", key_hint(OTHER_KEY)),
                    ("initech", "tenant.created", None),
                    ("acme", "proxy_key.revoked", None),
                ],
                start=1,
            )
        ],
    }
    for row in rows["proxy_keys"]:
        row.update(created_at=WHEN, key_hash=hash_proxy_key(keys[row["id"].removeprefix("key_")]))
    return rows, keys


def _read(database_url: str, names: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables `names`, only the columns named (the 0001 ones), in key order."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            tables = sa.MetaData()
            tables.reflect(conn, only=list(names))
            return {
                name: [
                    tuple(row)
                    for row in conn.execute(
                        sa.select(*(tables.tables[name].c[c] for c in columns)).order_by(
                            tables.tables[name].c[columns[0]]
                        )
                    )
                ]
                for name, columns in names.items()
            }
    finally:
        engine.dispose()


def test_an_upgrade_from_the_first_revision_keeps_and_serves_every_row(
    database_url: str, tmp_path: Path, master_key: str, fake: FakeOpenAI
) -> None:
    _upgrade(database_url, "0001")
    rows, proxy_keys = _first_release_rows(master_key)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:  # INSERTs built from the 0001 tables as they are
            tables = sa.MetaData()
            tables.reflect(conn)
            for name, values in rows.items():
                conn.execute(tables.tables[name].insert(), values)
    finally:
        engine.dispose()
    columns = {name: list(values[0]) for name, values in rows.items()}
    before = _read(database_url, columns)

    code, err = _finish(_start(["migrate"], tmp_path, _env(database_url)))

    assert (code, err) == (0, "")
    assert _read(database_url, columns) == before
    assert [len(v) for v in before.values()] == [3, 3, 6]
    env = serve_env(tmp_path, master_key, database_url, fake.base_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve([], env, tmp_path, port, tmp_path / "serve.log"):
        for tenant, key in (("acme", GOOD_KEY), ("globex", OTHER_KEY)):
            chat = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {proxy_keys[tenant]}"},
                timeout=30,
            )
            assert chat.status_code == 200, chat.text
            assert fake.keys_seen()[-1] == f"Bearer {key}"
        revoked = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {proxy_keys['revoked']}"},
            timeout=30,
        )
        assert revoked.status_code == 401
        audit = httpx.get(
            url + "/api/v1/tenants/acme/audit",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
    assert audit.status_code == 200, audit.text
    assert {"tenant.created", "openai_key.set", "proxy_key.revoked"} <= {
        event["action"] for event in audit.json()["data"]
    }


def test_cli_database_commands_refuse_an_older_schema_too(
    database_url: str, tmp_path: Path, master_key: str
) -> None:
    """Only `migrate` upgrades: a newer CLI run against a live database mid-rollout must not
    upgrade it under the replicas still serving the old schema."""
    _upgrade(database_url, "0001")
    env = _env(database_url, ENCRYPTION_KEY=master_key, ADMIN_TOKEN=ADMIN_TOKEN)
    for args in (["tenants", "list"], ["rotate-keys"]):
        code, err = _finish(_start(args, tmp_path, env))
        assert code != 0 and "older than this byok-proxy" in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert _revision(database_url) == "0001"  # untouched


def test_serve_refuses_an_older_schema_unless_told_to_migrate(
    database_url: str, tmp_path: Path, master_key: str, fake: FakeOpenAI
) -> None:
    """A replica of a new release started against the old schema, which replicas of the
    previous release may still be serving, refuses in one line; `serve --migrate` (an
    operator's explicit choice) upgrades it and serves."""
    _upgrade(database_url, "0001")
    env = serve_env(tmp_path, master_key, database_url, fake.base_url)
    port = free_port()
    code, err = _finish(_start(["serve", "--port", str(port)], tmp_path, env))
    assert code == 2, err
    assert err.strip().splitlines() == [f"byok-proxy: {OLDER_0001}"]
    assert _revision(database_url) == "0001"  # untouched

    with serve(["--migrate"], env, tmp_path, port, tmp_path / "serve.log"):
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200
    assert _revision(database_url) == HEAD_REVISION
