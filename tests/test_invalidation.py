"""Instant invalidation: three real `serve` replicas on one PostgreSQL database.

The replicas cache for 300 s (`cache_ttl_seconds`), so a refusal within
`PROPAGATION` seconds of a change made elsewhere can only come from the
NOTIFY sent with it (`proxy.invalidation`). The database is created for this
module, so no other test's notifications reach these replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from conftest import fresh_postgres_database
from fake_openai import FakeOpenAI, start_fake
from helpers import ADMIN_TOKEN, GOOD_KEY, OTHER_KEY, REPO
from servers import free_port, serve, serve_env, until
from stack import TENANT_KEY
from test_spend import PRICES_YAML

from proxy import invalidation
from proxy.security import generate_master_key
from proxy.store import Store, migrate

# Seconds allowed from a committed change to its refusal on every replica. Generous, for a
# busy machine: the replicas cache for 300 s, so any refusal within it is the NOTIFY's doing
# (the measured figures, tens of milliseconds, come from bench/propagation.py).
PROPAGATION = 30.0
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Long enough that only a notification explains a refusal; lock waits long enough for the
# concurrent-registration test to hold a row while both registrations queue on it.
YAML = (
    "cache_ttl_seconds: 300\ndatabase:\n  lock_timeout: 30\n  statement_timeout: 30\n"
    "tiers:\n  trial:\n    daily_requests: 20\n"  # the allowance test's
    + PRICES_YAML  # the budget test's slow model, priced
)


@dataclass
class Replicas:
    """Three `serve` processes sharing one database, and what a test needs to drive them."""

    urls: list[str]
    pids: list[int]
    logs: list[Path]
    env: dict[str, str]
    database: str
    engine: sqlalchemy.Engine  # to the test's database, for pg_stat_activity
    fake: FakeOpenAI

    def tenant(self, tid: str, via: int = 0, openai_key: str | None = TENANT_KEY) -> dict[str, str]:
        """Create a tenant through replica `via` (with its OpenAI key); its creation answer."""
        r = httpx.post(
            self.urls[via] + "/api/v1/tenants",
            json={"name": tid, "tier": "pro", "id": tid},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        if openai_key is not None:
            self.register(tid, openai_key, via)
        return dict(r.json())

    def register(self, tid: str, openai_key: str, via: int) -> None:
        r = httpx.post(
            f"{self.urls[via]}/api/v1/tenants/{tid}/openai-key",
            json={"api_key": openai_key},
            headers=ADMIN,
            timeout=20,
        )
        assert r.status_code == 200, r.text

    def chat(
        self, key: str, replica: int, model: str = "gpt-4o-mini", **extra: object
    ) -> httpx.Response:
        return httpx.post(
            self.urls[replica] + "/v1/chat/completions",
            json={**CHAT, "model": model, **extra},
            headers={"Authorization": f"Bearer {key}"},
            timeout=20,
        )

    def waiting_on_locks(self) -> int:
        """How many of the database's backends wait for a lock now."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sqlalchemy.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = :db AND wait_event_type = 'Lock'"
                    ),
                    {"db": self.database},
                ).scalar_one()
            )

    def listener_backends(self) -> dict[int, int]:
        """Each replica's listener backend pid in pg_stat_activity, by replica pid."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT application_name, pid FROM pg_stat_activity "
                    "WHERE datname = :db AND application_name LIKE 'byok-invalidation:%'"
                ),
                {"db": self.database},
            ).all()
        return {int(name.split(":")[1]): pid for name, pid in rows}


def _refused_everywhere(
    replicas: Replicas, key: str, on: list[int], status: int, model: str = "gpt-4o-mini"
) -> float:
    """Poll replicas `on` until each answers `status`; seconds until the last did."""
    start = time.monotonic()
    waiting = set(on)

    def check() -> bool:
        for i in list(waiting):
            if replicas.chat(key, i, model).status_code == status:
                waiting.discard(i)
        return not waiting

    until(check, PROPAGATION, f"replicas {sorted(waiting)} still serve after {PROPAGATION}s")
    return time.monotonic() - start


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        name, url = stack.enter_context(fresh_postgres_database("byok_inv_"))
        fake, fake_server = start_fake()
        stack.enter_context(fake_server)
        env = serve_env(tmp, generate_master_key(), url, fake.base_url, YAML)
        urls, pids, logs = [], [], []
        for i in range(3):  # one at a time: each migrates the database on start
            port = free_port()
            logs.append(tmp / f"replica{i}.log")
            proc = stack.enter_context(serve([], env, tmp, port, logs[-1]))
            urls.append(f"http://127.0.0.1:{port}")
            pids.append(proc.pid)
        engine = sqlalchemy.create_engine(url)
        stack.callback(engine.dispose)
        ready = Replicas(urls, pids, logs, env, name, engine, fake)
        until(lambda: len(ready.listener_backends()) == 3, 30, "not every replica listens")
        yield ready


def test_a_key_revoked_through_one_replica_is_refused_by_the_others(replicas: Replicas) -> None:
    created = replicas.tenant("revoked-co")
    key = created["api_key"]
    for i in range(3):  # every replica now holds the key in its cache
        assert replicas.chat(key, i).status_code == 200
    r = httpx.delete(
        f"{replicas.urls[0]}/api/v1/tenants/revoked-co/api-keys/{created['api_key_id']}",
        headers=ADMIN,
    )
    assert r.status_code == 204
    _refused_everywhere(replicas, key, [1, 2], 401)


def test_an_openai_key_removed_through_one_replica_is_missing_on_the_others(
    replicas: Replicas,
) -> None:
    key = replicas.tenant("removed-co", via=1)["api_key"]
    for i in range(3):
        assert replicas.chat(key, i).status_code == 200
    r = httpx.delete(f"{replicas.urls[1]}/api/v1/tenants/removed-co/openai-key", headers=ADMIN)
    assert r.status_code == 204
    _refused_everywhere(replicas, key, [0, 2], 402)
    assert replicas.chat(key, 0).json()["error"]["code"] == "openai_key_missing"


def test_a_policy_changed_with_the_cli_is_enforced_by_every_replica(replicas: Replicas) -> None:
    """The CLI writes to the database directly, with no server involved: its NOTIFY alone
    tells the replicas."""
    key = replicas.tenant("policy-co", via=2)["api_key"]
    for i in range(3):
        assert replicas.chat(key, i, model="gpt-4.1").status_code == 200
    policy = json.dumps({"allowed_models": ["gpt-4o-mini"]})
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "tenants", "update", "policy-co", "--policy", policy],
        env={**os.environ, **replicas.env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _refused_everywhere(replicas, key, [0, 1, 2], 403, model="gpt-4.1")
    for i in range(3):
        assert replicas.chat(key, i).status_code == 200  # the allowed model still is


def test_a_replica_whose_listener_is_cut_reconnects(replicas: Replicas) -> None:
    before = replicas.listener_backends()
    victim = replicas.pids[2]
    with replicas.engine.connect() as conn:
        assert conn.execute(
            sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": before[victim]}
        ).scalar()
    until(
        lambda: replicas.listener_backends().get(victim, before[victim]) != before[victim],
        30,
        "replica 3 did not reconnect its listener",
    )
    after = replicas.listener_backends()
    assert {p: b for p, b in after.items() if p != victim} == {
        p: b for p, b in before.items() if p != victim
    }, "another replica's listener was touched"
    log = replicas.logs[2].read_text()
    assert log.count("invalidation listener lost its database connection") == 1, log

    created = replicas.tenant("after-cut-co")
    assert replicas.chat(created["api_key"], 2).status_code == 200  # cached on replica 3
    r = httpx.delete(
        f"{replicas.urls[0]}/api/v1/tenants/after-cut-co/api-keys/{created['api_key_id']}",
        headers=ADMIN,
    )
    assert r.status_code == 204
    _refused_everywhere(replicas, created["api_key"], [2], 401)


def test_concurrent_registrations_through_two_replicas_leave_one_key(replicas: Replicas) -> None:
    """Two registrations at once: both audited (one as the replacement of the other), and
    every replica then sends the one key that was stored last.

    The test holds the tenant's row lock until both registrations wait on it, so
    they meet at the worst moment every run, not by chance."""
    key = replicas.tenant("race-co", openai_key=None)["api_key"]
    threads = [
        threading.Thread(target=replicas.register, args=("race-co", GOOD_KEY, 0)),
        threading.Thread(target=replicas.register, args=("race-co", OTHER_KEY, 1)),
    ]
    with replicas.engine.connect() as holder:
        holder.execute(sqlalchemy.text("SELECT 1 FROM tenants WHERE id = 'race-co' FOR UPDATE"))
        for t in threads:
            t.start()
        until(lambda: replicas.waiting_on_locks() == 2, 30, "the registrations never met")
        holder.commit()
    for t in threads:
        t.join()
    events = httpx.get(f"{replicas.urls[2]}/api/v1/tenants/race-co/audit", headers=ADMIN).json()
    actions = [e["action"] for e in events["data"] if e["action"].startswith("openai_key.")]
    assert sorted(actions) == ["openai_key.replaced", "openai_key.set"], actions
    shown = httpx.get(f"{replicas.urls[2]}/api/v1/tenants/race-co", headers=ADMIN).json()
    last = next(e for e in events["data"] if e["action"] == "openai_key.replaced")
    assert json.dumps(shown).count(last["key_hint"]) == 1, shown  # the replacement is stored
    stored = GOOD_KEY if GOOD_KEY.endswith(last["key_hint"][-4:]) else OTHER_KEY
    for i in range(3):
        assert replicas.chat(key, i).status_code == 200
        assert replicas.fake.requests[-1].header("authorization") == f"Bearer {stored}"


def test_propagation_sample(replicas: Replicas) -> None:
    """Five revocations through replica 1, timed to the first refusal on replicas 2 and 3
    (`bench/propagation.py` runs fifty and prints p50/p99)."""
    from bench.propagation import measure

    seconds = measure(replicas.urls, ADMIN_TOKEN, samples=5)
    print(f"propagation over 5 revocations: max {max(seconds) * 1000:.1f} ms")
    assert max(seconds) < PROPAGATION


# --- the listener in-process ----------------------------------------------------------


async def _listening_store(database_url: str) -> tuple[Store, invalidation.Listener]:
    store = Store.connect(database_url, cache_ttl=300)
    await asyncio.to_thread(migrate, store.engine)
    listener = invalidation.Listener(store)
    await listener.start()
    return store, listener


def _announce(store: Store, tenant_id: str, commit: bool) -> None:
    with store.session() as s:
        invalidation.tenant_changed(s, tenant_id)
        if commit:
            s.commit()


async def _until_reloaded(store: Store, tenant_id: str) -> None:
    """Look the tenant up until that costs a database read (its entry was dropped)."""
    loads = store.loads
    deadline = time.monotonic() + PROPAGATION
    while store.loads == loads:
        assert time.monotonic() < deadline, f"{tenant_id} still cached"
        await store.tenant_async(tenant_id)
        await asyncio.sleep(0.01)


async def test_a_listener_applies_what_commits_and_nothing_rolled_back(database_url: str) -> None:
    store, listener = await _listening_store(database_url)
    try:
        await store.tenant_async("ghost")
        await store.tenant_async("other")
        if store.engine.dialect.name == "sqlite":  # no listener; announcing is a no-op
            assert not listener.listening
            await asyncio.to_thread(_announce, store, "ghost", True)
            return
        assert listener.listening
        await asyncio.to_thread(_announce, store, "ghost", False)
        await asyncio.to_thread(_announce, store, "other", True)
        await _until_reloaded(store, "other")
        loads = store.loads
        await store.tenant_async("ghost")
        assert store.loads == loads, "a rolled-back change was announced"

        def elsewhere() -> None:  # the same tenant id, changed in another schema
            with store.engine.begin() as conn:
                conn.execute(
                    sqlalchemy.text("SELECT pg_notify('byok_invalidate', 'x/tenant:ghost')")
                )
            with store.session() as s:
                invalidation.tenant_changed(s, "other")
                s.commit()

        await asyncio.to_thread(elsewhere)
        await _until_reloaded(store, "other")
        await store.tenant_async("ghost")
        assert store.loads == loads + 1, "another schema's change was applied"
    finally:
        await listener.aclose()
        store.dispose()


async def test_a_listener_reconnects_and_forgets_what_it_may_have_missed(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has no listener")
    store, listener = await _listening_store(database_url)
    try:
        await store.tenant_async("ghost")

        def cut() -> None:
            with store.engine.begin() as conn:
                assert conn.execute(
                    sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": listener.application_name},
                ).scalar()

        await asyncio.to_thread(cut)
        await _until_reloaded(store, "ghost")  # dropped on reconnecting, with no message
        assert listener.listening
        assert caplog.text.count("invalidation listener lost its database connection") == 1
        await asyncio.to_thread(_announce, store, "ghost", True)
        await _until_reloaded(store, "ghost")
    finally:
        await listener.aclose()
        store.dispose()


def _spread(replicas: Replicas, key: str, count: int) -> list[int]:
    """`count` slow chats (`pause`, max_tokens 10) at once, dealt round-robin over the
    three replicas; their statuses."""

    def one(i: int) -> int:
        return replicas.chat(key, i % 3, "pause", max_tokens=10).status_code

    with ThreadPoolExecutor(24) as pool:
        return list(pool.map(one, range(count)))


def _usage_lines(replicas: Replicas, tenant: str, count: int) -> list[dict[str, object]]:
    """The usage lines of `tenant` (the three replicas append to one file), once `count`."""
    path = Path(replicas.env["USAGE_LOG"])

    def lines() -> list[dict[str, object]]:
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [x for x in rows if x["tenant_id"] == tenant]

    until(lambda: len(lines()) >= count, 30, f"fewer than {count} usage lines for {tenant}")
    return lines()


def test_the_trial_allowance_holds_across_three_replicas(replicas: Replicas) -> None:
    """60 requests at once over three replicas on a 20-request daily allowance: exactly 20
    reach the upstream (the allowance is reserved in the database, row-locked)."""
    key = replicas.tenant("trial-3", openai_key=None)  # a trial tenant needs no key
    r = httpx.patch(
        f"{replicas.urls[0]}/api/v1/tenants/trial-3", json={"tier": "trial"}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    api_key = key["api_key"]
    statuses = _spread(replicas, api_key, 60)
    assert statuses.count(200) == 20 and statuses.count(402) == 40, statuses
    lines = _usage_lines(replicas, "trial-3", 60)
    assert sum(x["key_source"] == "platform" and x["status"] == 200 for x in lines) == 20


def test_a_hard_budget_holds_across_three_replicas(replicas: Replicas) -> None:
    """A nearly used budget, then 60 requests at once over the three replicas: spend stays
    within the README's bound (the limit plus one request's estimate per process)."""
    key = replicas.tenant("budget-3")["api_key"]
    limit = 0.0001  # about 17 requests of this size
    policy = {"policy": {"budgets": [{"period": "day", "limit_usd": limit, "hard": True}]}}
    r = httpx.patch(f"{replicas.urls[0]}/api/v1/tenants/budget-3", json=policy, headers=ADMIN)
    assert r.status_code == 200, r.text
    before = [replicas.chat(key, i % 3, "pause", max_tokens=10).status_code for i in range(12)]
    assert before == [200] * 12
    statuses = _spread(replicas, key, 60)
    assert set(statuses) == {200, 402}, statuses
    lines = _usage_lines(replicas, "budget-3", 72)
    spent = sum(float(x["cost_usd"] or 0) for x in lines)
    # One request's estimate (a body under 200 bytes plus max_tokens, at gpt-4o-mini's
    # output rate, the dearer) per process may overshoot; three processes.
    estimate = (200 + 10) * 0.60 / 1e6
    assert 0 < spent <= limit + 3 * estimate
    assert before.count(200) + statuses.count(200) == sum(x["status"] == 200 for x in lines)


def test_a_tenant_deleted_through_one_replica_is_gone_on_the_others(replicas: Replicas) -> None:
    """Deleting a tenant announces each of its proxy keys (not every key of every tenant)."""
    key = replicas.tenant("deleted-co")["api_key"]
    for i in range(3):
        assert replicas.chat(key, i).status_code == 200
    r = httpx.delete(f"{replicas.urls[0]}/api/v1/tenants/deleted-co", headers=ADMIN)
    assert r.status_code == 204, r.text
    _refused_everywhere(replicas, key, [1, 2], 401)
