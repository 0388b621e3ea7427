"""The hot path's cached lookups: one database read per miss, and no stale refill.

Both tests run the real proxy (uvicorn on a loopback port) on SQLite and
PostgreSQL, and hold a lookup inside its database read with a gate, so the
race is made to happen rather than hoped for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from stack import Stack

from proxy.store import Store


class Gate:
    """Holds the next database read of `store` after its query, until released."""

    def __init__(self, store: Store) -> None:
        self.armed = False
        self.reached = threading.Event()
        self.release = threading.Event()
        real = store.session

        @contextmanager
        def session() -> Iterator[Any]:
            with real() as s:
                yield s
            if self.armed and threading.current_thread() is not threading.main_thread():
                self.armed = False
                self.reached.set()
                assert self.release.wait(10), "gate never released"

        store.session = session  # type: ignore[method-assign]


def _chat(client: openai.OpenAI) -> str:
    try:
        client.chat.completions.create(model="m", messages=[])
        return "ok"
    except openai.AuthenticationError:
        return "refused"


def test_a_revocation_racing_a_lookup_is_honoured_at_once(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    """A proxy-key lookup that read the database before a revocation must not put the
    revoked key back in the cache: the next request after the revocation is refused."""
    with Stack(tmp_path, database_url, master_key, yaml="cache_ttl_seconds: 30\n") as stack:
        key = stack.tenant("acme")
        key_id = stack.admin.get("/api/v1/tenants/acme/audit").json()["data"][-2]["key_hint"]
        store = stack.apps[0].runtime.store
        gate = Gate(store)
        gate.armed = True
        outcome: list[str] = []
        first = threading.Thread(target=lambda: outcome.append(_chat(stack.sdk(key))))
        first.start()
        assert gate.reached.wait(10)  # the lookup has read "active" and is about to cache it
        assert stack.admin.delete(f"/api/v1/tenants/acme/api-keys/{key_id}").status_code == 204
        gate.release.set()
        first.join(10)
        assert outcome == ["ok"]  # it was in flight before the revocation
        assert _chat(stack.sdk(key)) == "refused"
        assert _chat(stack.sdk(key)) == "refused"


def test_concurrent_misses_share_one_database_read(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    with Stack(tmp_path, database_url, master_key) as stack:
        key = stack.tenant("acme")
        store = stack.apps[0].runtime.store
        store.invalidate_keys()
        store.invalidate_tenant("acme")
        gate = Gate(store)
        gate.armed = True
        before = store.loads
        outcomes: list[str] = []
        threads = [
            threading.Thread(target=lambda: outcomes.append(_chat(stack.sdk(key))))
            for _ in range(20)
        ]
        for t in threads:
            t.start()
        assert gate.reached.wait(10)
        # Let every request arrive and miss the cache while the first read is held.
        time.sleep(0.5)
        gate.release.set()
        for t in threads:
            t.join(20)
        assert outcomes == ["ok"] * 20
        # One read of the proxy key, one of the tenant, for twenty cold requests.
        assert store.loads - before == 2, store.loads - before


def test_a_key_removal_racing_a_tenant_lookup_is_honoured_at_once(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    """The tenant side of the same race: a tenant read that saw the OpenAI key before it
    was removed must not cache it; the next request answers 402 openai_key_missing."""
    with Stack(tmp_path, database_url, master_key, yaml="cache_ttl_seconds: 30\n") as stack:
        key = stack.tenant("acme", tier="pro")
        assert _chat(stack.sdk(key)) == "ok"  # the proxy key is cached now
        store = stack.apps[0].runtime.store
        store.invalidate_tenant("acme")
        gate = Gate(store)
        gate.armed = True  # holds the next read: the tenant's
        outcome: list[str] = []
        first = threading.Thread(target=lambda: outcome.append(_chat(stack.sdk(key))))
        first.start()
        assert gate.reached.wait(10)
        assert stack.admin.delete("/api/v1/tenants/acme/openai-key").status_code == 204
        gate.release.set()
        first.join(10)
        assert outcome == ["ok"]
        with pytest.raises(openai.APIStatusError) as info:
            stack.sdk(key).chat.completions.create(model="m", messages=[])
        assert info.value.status_code == 402
        assert isinstance(info.value.body, dict)
        assert info.value.body["code"] == "openai_key_missing"


async def test_a_stuck_database_call_is_cut_off_at_the_call_timeout(tmp_path: Path) -> None:
    import time as clock

    from proxy.config import DatabaseConfig
    from proxy.errors import StoreUnavailable
    from proxy.store import Store

    limits = DatabaseConfig(statement_timeout=0.2, lock_timeout=0.2, pool_timeout=0.2)
    store = Store.connect(f"sqlite:///{tmp_path / 'db.sqlite'}", limits=limits)
    started = clock.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.run(clock.sleep, 3)  # a hung server: the thread never returns in time
    assert clock.monotonic() - started < 2
    store.dispose()
