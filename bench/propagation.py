"""How fast a revocation reaches the other replicas (PostgreSQL NOTIFY, `proxy.invalidation`).

    python -m bench.propagation [--samples 50] [--database-url postgresql+psycopg://...]

Creates a fresh database on the given server (default: the local test server),
starts the fake upstream and three `byok-proxy serve` replicas on it with
`cache_ttl_seconds: 300` (so only a notification explains a refusal), issues
`samples` proxy keys to one tenant and makes replicas 2 and 3 cache each one.
Then, key by key: revoke it through replica 1's admin API and poll replicas 2
and 3 until each answers 401. A sample is the time from the revocation's 204
(the change is committed) to a replica's first 401; prints p50/p99 over all.
Not part of CI; `tests/test_invalidation.py` runs a five-sample version.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import sqlalchemy

from bench.__main__ import ADMIN_TOKEN, TENANT_KEY, free_port, pct, wait_up
from proxy.security import generate_master_key

DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GIVE_UP = 10.0  # seconds a replica may keep serving a revoked key before the run fails
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def measure(urls: list[str], admin_token: str, samples: int) -> list[float]:
    """Revoke `samples` keys through `urls[0]`; seconds to the first 401 on each other replica."""
    admin = httpx.Client(base_url=urls[0], headers={"Authorization": f"Bearer {admin_token}"})
    others = [httpx.Client(base_url=url, timeout=10) for url in urls[1:]]
    tenant = "prop-" + secrets.token_hex(4)
    try:
        created = admin.post("/api/v1/tenants", json={"name": tenant, "tier": "pro", "id": tenant})
        created.raise_for_status()
        admin.post(
            f"/api/v1/tenants/{tenant}/openai-key", json={"api_key": TENANT_KEY}, timeout=20
        ).raise_for_status()
        keys = [(created.json()["api_key_id"], created.json()["api_key"])]
        for _ in range(samples - 1):
            issued = admin.post(f"/api/v1/tenants/{tenant}/api-keys")
            issued.raise_for_status()
            keys.append((issued.json()["id"], issued.json()["api_key"]))
        for _, key in keys:  # every other replica caches every key
            for client in others:
                assert _status(client, key) == 200
        seconds: list[float] = []
        for key_id, key in keys:
            admin.delete(f"/api/v1/tenants/{tenant}/api-keys/{key_id}").raise_for_status()
            committed = time.monotonic()
            refused: dict[int, float] = {}  # replica's index in `others`: seconds
            while len(refused) < len(others):
                for i, client in enumerate(others):
                    if i not in refused and _status(client, key) == 401:
                        refused[i] = time.monotonic() - committed
                if time.monotonic() - committed > GIVE_UP:
                    raise AssertionError(f"a replica serves a key revoked {GIVE_UP:g}s ago")
            seconds.extend(refused.values())
        return seconds
    finally:
        admin.close()
        for client in others:
            client.close()


def _status(client: httpx.Client, key: str) -> int:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    return r.status_code


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on `server_url`'s server (its URL); dropped after."""
    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = "byok_prop_" + secrets.token_hex(4)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield sqlalchemy.make_url(server_url).set(database=name).render_as_string(False)
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
        engine.dispose()


@contextmanager
def started(command: list[str], env: dict[str, str], log: Path, url: str) -> Iterator[None]:
    """Run `command` until the block ends; wait until `url` answers first."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_up(url)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__)
    parser.add_argument("--samples", type=int, default=50, help="revocations (default: 50)")
    parser.add_argument(
        "--database-url", default=DEFAULT_DATABASE, help=f"server (default: {DEFAULT_DATABASE})"
    )
    args = parser.parse_args()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = stack.enter_context(fresh_database(args.database_url))
        upstream_port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        stack.enter_context(
            started(
                [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)],
                dict(os.environ),
                work / "upstream.log",
                upstream + "/v1/models",
            )
        )
        (work / "config.yaml").write_text("cache_ttl_seconds: 300\n")
        env = {
            **os.environ,
            "ENCRYPTION_KEY": generate_master_key(),
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "DATABASE_URL": database,
            "OPENAI_BASE_URL": upstream + "/v1",
            "USAGE_LOG": str(work / "usage.jsonl"),
            "BYOK_CONFIG": str(work / "config.yaml"),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        urls = []
        for i in range(3):  # one at a time: each migrates the database on start
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            serve = [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)]
            stack.enter_context(
                started(serve, env, work / f"replica{i}.log", urls[-1] + "/healthz")
            )
        seconds = measure(urls, ADMIN_TOKEN, args.samples)
    ms = [s * 1000 for s in seconds]
    print(
        f"{args.samples} revocations, {len(ms)} samples (2 other replicas each): "
        f"p50 {pct(ms, 50):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
