"""Measure `rotate-keys` at scale while two real replicas serve traffic (not run in CI).

Creates its own PostgreSQL database, fills it with N tenants whose OpenAI keys are
encrypted under an old master key (a process pool encrypts, each key bound to its
tenant by HKDF; COPY writes), starts the fast fake upstream (`bench.upstream`) and
two `byok-proxy serve` replicas with `ENCRYPTION_KEY=new,old`, drives chat
completions at them at a bounded rate, first alone (a baseline) and then while
`rotate-keys --batch-size B` runs, checks that every key ends under the new key
with one audit event each, prints the figures, and drops the database.

    python scripts/rotation_scale.py --tenants 100000 --batch-size 500

The database load is read from `pg_stat_database` for the created database only:
it counts every client of it (the replicas' traffic too), hence the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.security import (  # noqa: E402 (after the path is set)
    Keyring,
    generate_admin_token,
    generate_master_key,
    hash_proxy_key,
    key_hint,
    new_proxy_key,
)
from proxy.store import Store, migrate  # noqa: E402

OPENAI_KEY = "sk-scale-" + "x" * 40  # the same fake OpenAI key for every tenant
STATS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "blks_read", "blks_hit")
CHUNK = 5000


def _encrypt_chunk(master_key: str, start: int, stop: int) -> list[tuple[str, str]]:
    ring = Keyring.parse(master_key)
    return [(tid, ring.encrypt(OPENAI_KEY, tid)) for tid in map(tenant_id, range(start, stop))]


def tenant_id(n: int) -> str:
    return f"scale-{n:07d}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def database(server: str) -> Iterator[str]:
    """A new, empty database on `server` (a libpq URL without a database); dropped after."""
    name = "byok_scale_" + secrets.token_hex(4)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def fill(dsn: str, old_key: str, tenants: int, traffic_tenants: int) -> list[str]:
    """Write the tenants (keys under `old_key`) and proxy keys for the first
    `traffic_tenants`; return those proxy keys."""
    now = datetime.now(UTC)
    hint = key_hint(OPENAI_KEY)
    chunks = [(s, min(s + CHUNK, tenants)) for s in range(0, tenants, CHUNK)]
    with (
        ProcessPoolExecutor() as pool,
        psycopg.connect(dsn) as conn,
        conn.cursor() as cur,
        cur.copy(
            "COPY tenants (id, name, tier, created_at, updated_at, openai_api_key_encrypted,"
            " openai_key_status, openai_key_hint) FROM STDIN"
        ) as copy,
    ):
        futures = [pool.submit(_encrypt_chunk, old_key, s, e) for s, e in chunks]
        for future in futures:
            for tid, ciphertext in future.result():
                copy.write_row((tid, tid, "pro", now, now, ciphertext, "active", hint))
    proxy_keys = [new_proxy_key() for _ in range(traffic_tenants)]
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor() as cur,
        cur.copy("COPY proxy_keys (id, tenant_id, key_hash, created_at) FROM STDIN") as copy,
    ):
        for n, key in enumerate(proxy_keys):
            copy.write_row((f"key_scale{n:07d}", tenant_id(n), hash_proxy_key(key), now))
    return proxy_keys


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: exited with {proc.returncode} before answering")
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.2)


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path, health: str) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and modules)
            [sys.executable, *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_up(health, proc)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stats(dsn: str, name: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute(
            f"SELECT {', '.join(STATS)} FROM pg_stat_database WHERE datname = %s",  # noqa: S608
            (name,),
        ).fetchone()
    assert row is not None
    return dict(zip(STATS, row, strict=True))


class Traffic:
    """Chat completions at `rate` per second (random tenants, the two replicas in turn);
    counts answers by status in the current `phase`."""

    def __init__(self, urls: list[str], keys: list[str], rate: float) -> None:
        self.urls, self.keys, self.rate = urls, keys, rate
        self.phase = "baseline"
        self.counts: Counter[tuple[str, str]] = Counter()
        self.latencies: dict[str, list[float]] = {}

    async def _one(self, client: httpx.AsyncClient, n: int) -> None:
        phase = self.phase
        started = time.perf_counter()
        try:
            r = await client.post(
                self.urls[n % len(self.urls)] + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {secrets.choice(self.keys)}"},
            )
            outcome = str(r.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        self.counts[phase, outcome] += 1
        self.latencies.setdefault(phase, []).append(time.perf_counter() - started)

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=64)
        async with (
            httpx.AsyncClient(timeout=60, limits=limits) as client,
            asyncio.TaskGroup() as tg,
        ):
            n = 0
            start = time.monotonic()
            while not stop.is_set():
                tg.create_task(self._one(client, n))
                n += 1
                await asyncio.sleep(max(0.0, start + n / self.rate - time.monotonic()))

    def served(self, phase: str) -> tuple[int, int]:
        """(answered 200, everything else) in `phase`."""
        ok = self.counts[phase, "200"]
        return ok, sum(c for (p, _), c in self.counts.items() if p == phase) - ok

    def p99_ms(self, phase: str) -> float:
        values = sorted(self.latencies.get(phase, [0.0]))
        return values[int(len(values) * 0.99) - 1 if len(values) > 1 else 0] * 1000


async def measure(
    traffic: Traffic, dsn: str, name: str, env: dict[str, str], batch: int, baseline: float
) -> tuple[float, dict[str, int], dict[str, int], str]:
    """Run the baseline, then rotate-keys; return (rotation wall time, baseline stats
    delta, rotation stats delta, rotate-keys' output)."""
    stop = asyncio.Event()
    driver = asyncio.create_task(traffic.run(stop))
    await asyncio.sleep(2)  # warm the replicas' connections
    traffic.counts.clear()
    traffic.latencies.clear()
    before = await asyncio.to_thread(stats, dsn, name)
    await asyncio.sleep(baseline)
    middle = await asyncio.to_thread(stats, dsn, name)
    traffic.phase = "rotation"
    started = time.monotonic()
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "rotate-keys",
        "--batch-size",
        str(batch),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await run.communicate()
    wall = time.monotonic() - started
    traffic.phase = "after"
    after = await asyncio.to_thread(stats, dsn, name)
    stop.set()
    await driver
    if run.returncode != 0:
        raise SystemExit(f"rotate-keys exited {run.returncode}:\n{output.decode()}")
    base = {k: middle[k] - before[k] for k in STATS}
    rot = {k: after[k] - middle[k] for k in STATS}
    return wall, base, rot, output.decode()


def verify(url: str, new_key: str, tenants: int) -> None:
    """Every stored key under the new key; one `openai_key.rotated` event per tenant."""
    store = Store.connect(url)
    with store.engine.connect() as conn:
        kids: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT substr(openai_api_key_encrypted, 4, 8), count(*)"
                    " FROM tenants GROUP BY 1"
                )
            ).all()
        )
        events = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT tenant_id) FROM audit_events"
                " WHERE action = 'openai_key.rotated'"
            )
        ).one()
    store.dispose()
    primary = Keyring.parse(new_key).primary_kid
    assert kids == {primary: tenants}, f"stored keys by key id: {kids}"
    assert tuple(events) == (tenants, tenants), f"rotated events (all, distinct): {events}"


def report(
    args: argparse.Namespace, fill_s: float, wall: float, base: dict[str, int], rot: dict[str, int]
) -> None:
    per_s = {k: v / args.baseline_seconds for k, v in base.items()}
    print(f"tenants: {args.tenants}, batch size: {args.batch_size}, traffic: {args.rate} req/s")
    print(f"generated and written in {fill_s:.1f} s")
    print(f"rotation: {wall:.1f} s wall, {args.tenants / wall:,.0f} tenants/s")
    print("database load (pg_stat_database deltas for this database, all clients):")
    print(f"  {'':14}{'rotation':>12}{'per s':>10}{'baseline/s':>12}")
    for k in STATS:
        print(f"  {k:14}{rot[k]:>12,}{rot[k] / wall:>10,.0f}{per_s[k]:>12,.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=100_000, help="default: 100000")
    parser.add_argument("--batch-size", type=int, default=500, help="default: 500")
    parser.add_argument("--rate", type=float, default=100, help="requests/s; default: 100")
    parser.add_argument(
        "--traffic-tenants", type=int, default=1000, help="tenants sending; default: 1000"
    )
    parser.add_argument("--baseline-seconds", type=float, default=10, help="default: 10")
    parser.add_argument(
        "--server",
        default="postgresql://postgres@127.0.0.1:5432",
        help="PostgreSQL server (no database: one is created and dropped); "
        "default: postgresql://postgres@127.0.0.1:5432",
    )
    args = parser.parse_args()
    old, new = generate_master_key(), generate_master_key()
    tmp = Path(tempfile.mkdtemp(prefix="byok-scale-"))
    with database(args.server) as name, ExitStack() as running:
        dsn = f"{args.server}/{name}"
        url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        store = Store.connect(url)
        migrate(store.engine)
        store.dispose()
        started = time.monotonic()
        keys = fill(dsn, old, args.tenants, min(args.traffic_tenants, args.tenants))
        fill_s = time.monotonic() - started
        print(f"{args.tenants} tenants written in {fill_s:.1f} s", flush=True)

        (tmp / "config.yaml").write_text("")
        base_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PROMETHEUS_MULTIPROC_DIR", "PLATFORM_OPENAI_KEY")
        }
        upstream_port = free_port()
        base_env.update(
            ENCRYPTION_KEY=f"{new},{old}",
            ADMIN_TOKEN=generate_admin_token(),
            DATABASE_URL=url,
            BYOK_CONFIG=str(tmp / "config.yaml"),
            OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
            USAGE_LOG=str(tmp / "usage.jsonl"),
        )
        running.enter_context(
            process(
                ["-m", "bench.upstream", "--port", str(upstream_port)],
                base_env,
                tmp / "upstream.log",
                f"http://127.0.0.1:{upstream_port}/v1/models",
            )
        )
        urls = []
        for n in range(2):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            running.enter_context(
                process(
                    ["-m", "proxy.cli", "serve", "--port", str(port)],
                    base_env,
                    tmp / f"replica{n}.log",
                    urls[-1] + "/healthz",
                )
            )
        traffic = Traffic(urls, keys, args.rate)
        wall, base, rot, output = asyncio.run(
            measure(traffic, dsn, name, base_env, args.batch_size, args.baseline_seconds)
        )
        running.close()
        verify(url, new, args.tenants)
    for line in output.splitlines():  # its own lines, without the progress lines
        if "stored keys done (" not in line:
            print(line)
    report(args, fill_s, wall, base, rot)
    for phase in ("baseline", "rotation"):
        ok, failed = traffic.served(phase)
        p99 = traffic.p99_ms(phase)
        print(f"requests during {phase}: {ok} served, {failed} failed, p99 {p99:.0f} ms")
    failures = {o: c for (p, o), c in traffic.counts.items() if o != "200"}
    if failures:
        print(f"failures by status: {failures}")
    print(f"logs: {tmp}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
