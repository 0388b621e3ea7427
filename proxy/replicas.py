"""Which serving processes are running, and which master keys each can decrypt.

Every serving process (each `serve` worker, and the admin listener when it has its
own port) keeps one row in `replicas`: its host and pid, the ids of the keys in its
`ENCRYPTION_KEY` (the first one encrypts) and when it was last seen. `rotate-keys`
reads the live rows and refuses to re-encrypt under a key some running process
cannot decrypt: every request on that process would fail with
500 `key_decryption_failed`.

The heartbeat is off the hot path: a background task writes `last_seen` every
`HEARTBEAT_SECONDS` from a thread. A database error is logged once (until a
write succeeds again) and retried at the next beat; it never reaches serving.
A clean shutdown deletes the row; a process that dies stops counting as live
after `LIVE_BEATS` missed beats, and its row is deleted a day later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, update
from sqlmodel import col, select

from proxy.models import Replica, utcnow
from proxy.security import Keyring
from proxy.store import Store

log = logging.getLogger("byok.replicas")

HEARTBEAT_SECONDS = 10.0
LIVE_BEATS = 3  # a replica is live while its last beat is at most this many beats old
_FORGET_AFTER = timedelta(days=1)
_SHUTDOWN_WAIT = 5.0  # seconds the row's deletion may take at shutdown


@dataclass(frozen=True)
class ReplicaInfo:
    """One live serving process as `rotate-keys` sees it."""

    host: str
    pid: int
    key_ids: tuple[str, ...]
    primary_key_id: str

    def problem_with(self, primary_kid: str) -> str | None:
        """Why rotating to `primary_kid` would hurt this replica, or None if it would not."""
        keys = ",".join(self.key_ids)
        if primary_kid not in self.key_ids:
            return f"cannot decrypt key {primary_kid} (its key ids: {keys})"
        if self.primary_key_id != primary_kid:
            return (
                f"encrypts new keys with key {self.primary_key_id}, not {primary_kid} "
                f"(its key ids: {keys})"
            )
        return None


def _now(store: Store) -> Any:
    """The time beats are written and judged by: the database server's clock on
    PostgreSQL, so a replica whose own clock runs late is not taken for dead (its
    replicas share the one server); this host's clock on SQLite (one host anyway)."""
    return func.now() if store.engine.dialect.name == "postgresql" else utcnow()


def live_replicas(store: Store) -> list[ReplicaInfo]:
    """The processes whose last beat is recent enough (blocking)."""
    cutoff = _now(store) - timedelta(seconds=HEARTBEAT_SECONDS * LIVE_BEATS)
    with store.session() as s:
        rows = s.exec(
            select(Replica).where(col(Replica.last_seen) >= cutoff).order_by(Replica.host)
        ).all()
    return [ReplicaInfo(r.host, r.pid, tuple(r.key_ids.split(",")), r.primary_key_id) for r in rows]


class Heartbeat:
    """This process's row in `replicas`, kept fresh by a background task."""

    def __init__(self, store: Store, keyring: Keyring, interval: float = HEARTBEAT_SECONDS) -> None:
        self.store = store
        self.interval = interval
        self.host = socket.gethostname()[:200]
        self.pid = os.getpid()
        self.id = f"{self.host}-{self.pid}-{secrets.token_hex(4)}"
        self.key_ids = ",".join(keyring.kids)
        self.primary_key_id = keyring.primary_kid
        self.started_at = utcnow()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def beat(self) -> None:
        """Write `last_seen` now; insert the row if it is not there (blocking)."""
        now = _now(self.store)
        with self.store.session() as s:
            found = s.execute(
                update(Replica).where(col(Replica.id) == self.id).values(last_seen=now)
            ).rowcount  # type: ignore[attr-defined]
            if not found:
                s.execute(delete(Replica).where(col(Replica.last_seen) < now - _FORGET_AFTER))
                s.add(
                    Replica(
                        id=self.id,
                        host=self.host,
                        pid=self.pid,
                        key_ids=self.key_ids,
                        primary_key_id=self.primary_key_id,
                        started_at=self.started_at,
                        last_seen=now,
                    )
                )
            s.commit()

    def forget(self) -> None:
        """Delete this process's row (blocking)."""
        with self.store.session() as s:
            s.execute(delete(Replica).where(col(Replica.id) == self.id))
            s.commit()

    async def _beat_logged(self) -> None:
        try:
            await asyncio.to_thread(self.beat)
        except Exception as exc:  # noqa: BLE001 (any failure: retried at the next beat)
            if not self._failing:
                log.warning(
                    "replica heartbeat not recorded (%s); retrying every %gs",
                    type(exc).__name__,
                    self.interval,
                )
            self._failing = True
            return
        if self._failing:
            log.info("replica heartbeat recorded again")
        self._failing = False

    async def start(self) -> None:
        """Record this process now (before it serves), then keep the row fresh."""
        await self._beat_logged()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._beat_logged()

    async def aclose(self) -> None:
        """Stop beating and delete the row (a failure is logged, never raised)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(asyncio.to_thread(self.forget), _SHUTDOWN_WAIT)
        except Exception as exc:  # noqa: BLE001 (shutdown goes on; the row goes stale)
            log.warning("replica row not deleted at shutdown (%s)", type(exc).__name__)
