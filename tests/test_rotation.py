"""`rotate-keys` and the replica heartbeat: refusal while a running replica lacks the new
key (two real `serve` processes on one PostgreSQL database), counts, the new key put last,
progress, resuming after a crash (and after SIGKILL at a random point), rotation while two
replicas serve traffic, and no key material in any output."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import _postgres_schema_url
from helpers import ADMIN_TOKEN, GOOD_KEY, REPO
from servers import free_port, serve, serve_env
from sqlalchemy import func
from sqlmodel import select

from proxy.models import AuditEvent, ProxyKey, Replica, Tenant, utcnow
from proxy.replicas import Heartbeat, live_replicas
from proxy.security import Keyring, generate_master_key, hash_proxy_key, key_hint, new_proxy_key
from proxy.store import Store, migrate


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema."""
    yield from _postgres_schema_url()


def seeded(database_url: str, ring: Keyring, count: int, start: int = 0) -> Store:
    """A migrated store with `count` tenants whose OpenAI key is encrypted under `ring`."""
    store = Store.connect(database_url)
    migrate(store.engine)
    with store.session() as s:
        for n in range(start, start + count):
            tid = f"t{n:04d}"
            s.add(
                Tenant(
                    id=tid,
                    name=tid,
                    tier="pro",
                    openai_api_key_encrypted=ring.encrypt(GOOD_KEY, tid),
                    openai_key_status="active",
                    openai_key_hint=key_hint(GOOD_KEY),
                )
            )
        s.commit()
    return store


def by_kid(store: Store) -> dict[str, int]:
    with store.session() as s:
        stored = s.exec(select(Tenant.openai_api_key_encrypted)).all()
    counts: dict[str, int] = {}
    for c in stored:
        counts[Keyring.kid_of(c or "")] = counts.get(Keyring.kid_of(c or ""), 0) + 1
    return counts


def rotated_events(store: Store) -> list[str]:
    with store.session() as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "openai_key.rotated"))
        return sorted(e.tenant_id for e in events)


def rotated_count(store: Store) -> int:
    with store.session() as s:
        return s.exec(select(func.count()).where(AuditEvent.action == "openai_key.rotated")).one()


def assert_each_decrypts_under(store: Store, keys: str) -> None:
    """Every stored key decrypts, for its own tenant, with `keys` alone, to the key stored."""
    ring = Keyring.parse(keys)
    with store.session() as s:
        rows = s.exec(select(Tenant.id, Tenant.openai_api_key_encrypted)).all()
    for tid, ciphertext in rows:
        assert ring.decrypt(ciphertext or "", tid).reveal() == GOOD_KEY, tid


def rotate_env(database_url: str, keys: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENCRYPTION_KEY", "ADMIN_TOKEN")}
    env.update(
        ENCRYPTION_KEY=keys,
        ADMIN_TOKEN=ADMIN_TOKEN,
        DATABASE_URL=database_url,
        BYOK_CONFIG=str(REPO / "config.yaml"),
    )
    return env


def rotate(
    database_url: str, keys: str, *args: str, code: str | None = None, stderr: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """Run `byok-proxy rotate-keys ARGS` (or `python -c CODE`, which runs it) for real."""
    command = ["-c", code] if code else ["-m", "proxy.cli", "rotate-keys", *args]
    return subprocess.run(
        [sys.executable, *command],
        env=rotate_env(database_url, keys),
        text=True,
        timeout=300,
        stdout=subprocess.PIPE,
        stderr=stderr,
        check=False,
    )


def assert_no_secrets(result: subprocess.CompletedProcess[str], *keys: str) -> None:
    output = (result.stdout or "") + (result.stderr or "")
    for secret in (GOOD_KEY, GOOD_KEY[-12:], *keys):
        assert secret not in output


def test_json_summary_for_scripts(tmp_path: Path) -> None:
    """--json: one JSON object on stdout (the human lines go to stderr)."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    store = seeded(db, Keyring.parse(old), 4)
    result = rotate(db, f"{new},{old}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "primary_key_id": Keyring.parse(new).primary_kid,
        "replicas_not_ready": 0,
        "stored": 4,
        "re_encrypted": 4,
        "skipped": 0,
        "left": 0,
        "written_meanwhile_under_old_keys": 0,
        "exit_code": 0,
    }
    assert "4 re-encrypted" in result.stderr
    assert_no_secrets(result, old, new)
    store.dispose()


def test_counts_skips_and_leaves(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new, lost = generate_master_key(), generate_master_key(), generate_master_key()
    ring_old, ring_new, ring_lost = Keyring.parse(old), Keyring.parse(new), Keyring.parse(lost)
    store = seeded(db, ring_old, 4)
    seeded(db, ring_new, 2, start=4).dispose()
    seeded(db, ring_lost, 1, start=6).dispose()

    first = rotate(db, f"{new},{old}")
    assert first.returncode == 1, first.stderr
    assert f"encrypting with key {ring_new.primary_kid} (#1 in ENCRYPTION_KEY)" in first.stdout
    assert f"4 under key {ring_old.primary_kid} (#2 in ENCRYPTION_KEY)" in first.stdout
    assert (
        f"4 re-encrypted, 2 skipped (already under key {ring_new.primary_kid}), 1 left"
        in first.stdout
    )
    assert (
        f"left 1: made with key id {ring_lost.primary_kid}, which is not in ENCRYPTION_KEY"
        in first.stderr
    )
    assert "t0006" in first.stderr
    assert by_kid(store) == {ring_new.primary_kid: 6, ring_lost.primary_kid: 1}
    assert rotated_events(store) == ["t0000", "t0001", "t0002", "t0003"]
    assert_no_secrets(first, old, new, lost)

    with store.session() as s:  # the lost one goes: the next run is complete
        gone = s.get(Tenant, "t0006")
        s.delete(gone)
        s.commit()
    again = rotate(db, new)
    assert again.returncode == 0, again.stderr
    assert "0 re-encrypted, 6 skipped" in again.stdout and "0 left" in again.stdout
    store.dispose()


def test_new_key_put_last_is_not_a_silent_no_op(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    ring_old, ring_new = Keyring.parse(old), Keyring.parse(new)
    store = seeded(db, ring_old, 3)
    result = rotate(db, f"{old},{new}")
    assert result.returncode == 1
    assert f"encrypting with key {ring_old.primary_kid} (#1 in ENCRYPTION_KEY)" in result.stdout
    assert (
        f"all 3 stored keys were already under key {ring_old.primary_kid} (#1 in ENCRYPTION_KEY)"
        f", and key {ring_new.primary_kid} (#2 in ENCRYPTION_KEY) encrypts none of them"
    ) in result.stderr
    assert "it must come first" in result.stderr
    assert by_kid(store) == {ring_old.primary_kid: 3} and rotated_events(store) == []
    assert_no_secrets(result, old, new)
    store.dispose()


CRASH_AFTER_ONE_BATCH = """
import os, sys
import proxy.rotation as rotation
real = rotation._rotate_batch
def crash(*args):
    real(*args)
    os._exit(9)
rotation._rotate_batch = crash
from proxy.cli import main
sys.exit(main(["rotate-keys", "--batch-size", "10"]))
"""


def test_a_crashed_run_is_finished_by_the_next(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    store = seeded(db, Keyring.parse(old), 25)
    kid_old, kid_new = Keyring.parse(old).primary_kid, Keyring.parse(new).primary_kid
    crashed = rotate(db, f"{new},{old}", code=CRASH_AFTER_ONE_BATCH)
    assert crashed.returncode == 9, crashed.stderr
    assert by_kid(store) == {kid_new: 10, kid_old: 15}  # the first batch, with its events
    assert rotated_events(store) == [f"t{n:04d}" for n in range(10)]

    rerun = rotate(db, f"{new},{old}", "--batch-size", "10")
    assert rerun.returncode == 0, rerun.stderr
    assert "15 re-encrypted, 10 skipped" in rerun.stdout and "0 left" in rerun.stdout
    assert by_kid(store) == {kid_new: 25}
    assert rotated_events(store) == [f"t{n:04d}" for n in range(25)]  # one each
    store.dispose()


def test_progress_lines_off_a_terminal_and_a_bar_on_one(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    seeded(db, Keyring.parse(old), 25).dispose()
    piped = rotate(db, f"{new},{old}", "--batch-size", "10")
    assert piped.returncode == 0, piped.stderr
    assert "rotate-keys: 25/25 stored keys done (100%)\n" in piped.stderr
    assert "\r" not in piped.stderr

    seeded(db, Keyring.parse(old), 25, start=25).dispose()
    leader, follower = pty.openpty()
    try:
        on_tty = rotate(db, f"{new},{old}", "--batch-size", "10", stderr=follower)
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's writer is gone and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert on_tty.returncode == 0
    assert b"\rrotate-keys: 10/50 stored keys done (20%)" in seen
    assert b"\rrotate-keys: 50/50 stored keys done (100%)" in seen


def add_replica(store: Store, keys: str, pid: int, seen_ago: float = 0.0) -> None:
    ring = Keyring.parse(keys)
    with store.session() as s:
        s.add(
            Replica(
                id=f"far-{pid}",
                host="far",
                pid=pid,
                key_ids=",".join(ring.kids),
                primary_key_id=ring.primary_kid,
                last_seen=utcnow() - timedelta(seconds=seen_ago),
            )
        )
        s.commit()


def test_refusal_reads_live_rows_only_and_force_overrides(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    kid_old, kid_new = Keyring.parse(old).primary_kid, Keyring.parse(new).primary_kid
    store = seeded(db, Keyring.parse(old), 2)
    add_replica(store, old, 111)
    add_replica(store, f"{old},{new}", 222)
    add_replica(store, old, 333, seen_ago=31)  # three beats missed: not live
    add_replica(store, f"{new},{old}", 444)
    refused = rotate(db, f"{new},{old}")
    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert (
        f"rotate-keys: replica on host far, pid 111: cannot decrypt key {kid_new} "
        f"(its key ids: {kid_old})" in lines
    )
    assert (
        f"rotate-keys: replica on host far, pid 222: encrypts new keys with key {kid_old}, "
        f"not {kid_new} (its key ids: {kid_old},{kid_new})"
    ) in lines
    assert "pid 333" not in refused.stderr and "pid 444" not in refused.stderr
    assert "refused: 2 running replica(s)" in refused.stderr
    assert by_kid(store) == {kid_old: 2}

    forced = rotate(db, f"{new},{old}", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "pid 111" in forced.stderr and "2 re-encrypted" in forced.stdout
    assert by_kid(store) == {kid_new: 2}
    store.dispose()


async def test_heartbeat_records_refreshes_and_forgets(database_url: str) -> None:
    store = Store.connect(database_url)
    migrate(store.engine)
    ring = Keyring.parse(f"{generate_master_key()},{generate_master_key()}")
    beat = Heartbeat(store, ring, interval=0.05)
    await beat.start()
    try:
        (me,) = live_replicas(store)
        assert (me.host, me.pid) == (socket.gethostname(), os.getpid())
        assert me.key_ids == tuple(ring.kids) and me.primary_key_id == ring.primary_kid
        with store.session() as s:
            first = s.get(Replica, beat.id).last_seen  # type: ignore[union-attr]
        deadline = time.monotonic() + 30  # beats every 0.05 s; generous for a busy machine
        while True:
            with store.session() as s:
                if s.get(Replica, beat.id).last_seen > first:  # type: ignore[union-attr]
                    break
            assert time.monotonic() < deadline, "last_seen never moved"
            await asyncio.sleep(0.05)
    finally:
        await beat.aclose()
    assert live_replicas(store) == []
    store.dispose()


async def test_a_heartbeat_failure_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.connect(f"sqlite:///{tmp_path / 'r.db'}")  # not migrated: no table
    beat = Heartbeat(store, Keyring.parse(generate_master_key()), interval=0.01)
    with caplog.at_level(logging.WARNING, logger="byok.replicas"):
        await beat.start()
        await asyncio.sleep(0.2)
        await beat.aclose()
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        warnings.count("replica heartbeat not recorded (OperationalError); retrying every 0.01s")
        == 1
    )
    assert any("not deleted at shutdown" in w for w in warnings)
    store.dispose()


def test_refusal_with_two_real_replicas_on_one_postgres(tmp_path: Path, pg_url: str) -> None:
    """Replica A runs new,old; B runs old only: rotate-keys refuses naming B; once B runs
    new,old it succeeds. Then a newer key neither has: refused naming both; --force goes."""
    old, new, newer = (generate_master_key() for _ in range(3))
    kid_old, kid_new = Keyring.parse(old).primary_kid, Keyring.parse(new).primary_kid
    store = seeded(pg_url, Keyring.parse(old), 3)
    dirs = {name: tmp_path / name for name in ("a", "b", "b2")}
    for d in dirs.values():
        d.mkdir()

    def env(name: str, keys: str) -> dict[str, str]:
        return serve_env(dirs[name], keys, pg_url, "https://api.openai.test/v1")

    host = socket.gethostname()
    a_port, b_port = free_port(), free_port()
    with serve([], env("a", f"{new},{old}"), dirs["a"], a_port, dirs["a"] / "log") as a:
        with serve([], env("b", old), dirs["b"], b_port, dirs["b"] / "log") as b:
            assert {(r.host, r.pid) for r in live_replicas(store)} == {(host, a.pid), (host, b.pid)}
            refused = rotate(pg_url, f"{new},{old}")
            assert refused.returncode == 1
            assert (
                f"rotate-keys: replica on host {host}, pid {b.pid}: cannot decrypt key {kid_new} "
                f"(its key ids: {kid_old})"
            ) in refused.stderr.splitlines()
            assert f"pid {a.pid}" not in refused.stderr
            assert by_kid(store) == {kid_old: 3}
        assert [r.pid for r in live_replicas(store)] == [a.pid]  # B's row left with it
        with serve([], env("b2", f"{new},{old}"), dirs["b2"], b_port, dirs["b2"] / "log") as b2:
            done = rotate(pg_url, f"{new},{old}")
            assert done.returncode == 0, done.stderr
            assert "3 re-encrypted, 0 skipped" in done.stdout and "0 left" in done.stdout
            assert by_kid(store) == {kid_new: 3}

            refused = rotate(pg_url, f"{newer},{new},{old}")
            assert refused.returncode == 1
            assert f"pid {a.pid}:" in refused.stderr and f"pid {b2.pid}:" in refused.stderr
            forced = rotate(pg_url, f"{newer},{new},{old}", "--force")
            assert forced.returncode == 0, forced.stderr
            assert "3 re-encrypted" in forced.stdout
    for result in (refused, done, forced):
        assert_no_secrets(result, old, new, newer)
    for d in dirs.values():
        log = (d / "log").read_text()
        assert all(k not in log for k in (old, new, newer, GOOD_KEY))
    assert live_replicas(store) == []
    store.dispose()


def test_a_replica_whose_clock_runs_late_still_counts_as_live(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, beats are timed by the database server: a replica host 40 s behind
    (more than the 30 s liveness window) must not be taken for dead by rotate-keys."""
    import proxy.replicas

    store = Store.connect(pg_url)
    migrate(store.engine)
    late = utcnow() - timedelta(seconds=40)
    with monkeypatch.context() as m:  # the replica's host; rotate-keys runs on a right one
        m.setattr(proxy.replicas, "utcnow", lambda: late)
        beat = Heartbeat(store, Keyring.parse(generate_master_key()))
        beat.beat()
    assert [(r.host, r.pid) for r in live_replicas(store)] == [(beat.host, beat.pid)]
    beat.forget()
    store.dispose()


def test_the_new_key_put_last_on_every_replica_too_is_not_called_complete(
    tmp_path: Path,
) -> None:
    """Every running replica and rotate-keys given ENCRYPTION_KEY=old,new (the new key
    last everywhere): the replicas all encrypt with the old key, as after a finished
    rotation, but no rotation ever ran here, so it is the order that is wrong: exit 1."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    store = seeded(db, Keyring.parse(old), 3)
    add_replica(store, f"{old},{new}", pid=4242)
    result = rotate(db, f"{old},{new}")
    assert result.returncode == 1, result.stdout
    assert "rotation already complete" not in result.stdout
    assert "it must come first" in result.stderr
    assert rotated_events(store) == []
    assert_no_secrets(result, old, new)
    store.dispose()


def test_a_rerun_after_a_finished_rotation_exits_0(tmp_path: Path) -> None:
    """Every key already under the first one, and the running replicas encrypt with it:
    a finished rotation (not the new key put last), so a re-run is a success."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    old, new = generate_master_key(), generate_master_key()
    store = seeded(db, Keyring.parse(old), 3)
    add_replica(store, f"{new},{old}", pid=4242)
    assert rotate(db, f"{new},{old}").returncode == 0
    again = rotate(db, f"{new},{old}")
    assert again.returncode == 0, again.stderr
    assert "rotation already complete" in again.stdout and "can be removed" in again.stdout
    assert_no_secrets(again, old, new)
    store.dispose()


def test_sigkill_at_a_random_point_then_a_rerun_finishes(pg_url: str) -> None:
    """SIGKILL a real `rotate-keys` once a random number of batches has committed (so it
    dies mid-batch or between two), then re-run it: every key ends under the new key
    exactly once, each still decrypts, one audit event per re-encrypted key."""
    total, batch = 600, 5
    old, new = generate_master_key(), generate_master_key()
    kid_old, kid_new = Keyring.parse(old).primary_kid, Keyring.parse(new).primary_kid
    store = seeded(pg_url, Keyring.parse(old), total)
    seed = random.randrange(1_000_000)
    kill_after = random.Random(seed).randrange(1, total // 3)
    run = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "rotate-keys", "--batch-size", str(batch)],
        env=rotate_env(pg_url, f"{new},{old}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180  # generous: a loaded machine imports slowly
        while rotated_count(store) < kill_after:
            assert run.poll() is None, f"rotate-keys exited {run.returncode} before the kill"
            assert time.monotonic() < deadline, "rotate-keys made no progress"
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait()
    assert run.returncode == -signal.SIGKILL, f"seed {seed}"
    done = rotated_count(store)
    assert kill_after <= done < total, f"seed {seed}: the kill did not land mid-run"
    assert by_kid(store) == {kid_new: done, kid_old: total - done}  # keys and events together

    rerun = rotate(pg_url, f"{new},{old}", "--batch-size", str(batch))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{total - done} re-encrypted, {done} skipped" in rerun.stdout
    assert "0 left" in rerun.stdout
    assert by_kid(store) == {kid_new: total}
    assert_each_decrypts_under(store, new)  # none lost, none encrypted twice
    assert rotated_events(store) == [f"t{n:04d}" for n in range(total)]  # once each
    store.dispose()


def issue_proxy_keys(store: Store, tenant_ids: list[str]) -> dict[str, str]:
    """One proxy key per tenant, written straight to the store: tenant id -> plaintext."""
    keys = {tid: new_proxy_key() for tid in tenant_ids}
    with store.session() as s:
        for tid, key in keys.items():
            s.add(ProxyKey(id=f"key_{tid}", tenant_id=tid, key_hash=hash_proxy_key(key)))
        s.commit()
    return keys


class Traffic:
    """Chat completions from `workers` threads, each to a random tenant on the replicas
    in turn, until stopped or `limit` requests each; every non-200 is kept."""

    def __init__(self, urls: list[str], keys: dict[str, str], workers: int, limit: int) -> None:
        self.urls, self.keys, self.limit = urls, list(keys.values()), limit
        self.stop = threading.Event()
        self.done: list[float] = []  # when each answered request finished (monotonic)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(workers)]

    def _run(self, n: int) -> None:
        import httpx

        pick = random.Random(n)
        with httpx.Client(timeout=60) as client:
            for sent in range(self.limit):
                if self.stop.is_set():
                    return
                url = self.urls[(n + sent) % len(self.urls)]
                key = pick.choice(self.keys)
                try:
                    r = client.post(
                        url + "/v1/chat/completions",
                        json={
                            "model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": "hi"}],
                        },
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    if r.status_code != 200:
                        self.failures.append(f"{url}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{url}: {type(exc).__name__}")
                self.done.append(time.monotonic())

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_rotation_while_two_replicas_serve_traffic(tmp_path: Path, pg_url: str) -> None:
    """300 tenants, two real `serve` replicas with new,old on one PostgreSQL schema, chat
    completions for random tenants through both while `rotate-keys --batch-size 25` runs:
    no request fails, every key ends under the new one, one audit event per tenant."""
    from fake_openai import start_fake

    total = 300
    old, new = generate_master_key(), generate_master_key()
    kid_new = Keyring.parse(new).primary_kid
    store = seeded(pg_url, Keyring.parse(old), total)
    keys = issue_proxy_keys(store, [f"t{n:04d}" for n in range(total)])
    fake, fake_server = start_fake()
    yaml = "cache_ttl_seconds: 0.1\n"  # replicas re-read rows, rotated ones too, all along
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    envs = [serve_env(d, f"{new},{old}", pg_url, fake.base_url, yaml) for d in dirs]
    ports = [free_port(), free_port()]
    with (
        fake_server,
        serve([], envs[0], dirs[0], ports[0], dirs[0] / "log"),
        serve([], envs[1], dirs[1], ports[1], dirs[1] / "log"),
        Traffic([f"http://127.0.0.1:{p}" for p in ports], keys, workers=4, limit=1500) as traffic,
    ):
        run = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "rotate-keys", "--batch-size", "25"],
            env=rotate_env(pg_url, f"{new},{old}"),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        while not rotated_count(store) and run.poll() is None:
            time.sleep(0.005)
        first_batch = time.monotonic()  # from here to its exit, old and new keys are mixed
        out, err = run.communicate(timeout=300)
        finished = time.monotonic()
        traffic.stop.set()
    during = sum(first_batch <= t <= finished for t in traffic.done)
    assert run.returncode == 0, err
    assert f"{total} re-encrypted, 0 skipped" in out and "0 left" in out
    assert traffic.failures == []
    assert during >= 5, f"only {during} requests were answered while keys were re-encrypted"
    assert by_kid(store) == {kid_new: total}
    assert_each_decrypts_under(store, new)
    assert rotated_events(store) == sorted(keys)
    assert all(k not in out + err for k in (old, new, GOOD_KEY))
    store.dispose()
