"""The console's sessions in the database (`console_sessions`), so that signing out ends
a session everywhere: a copied cookie names a row that says it is over.

A row is made at sign-in and read on every console request (by primary key);
the session ends when it is signed out, at `expires_at` (`SESSION_SECONDS` after
sign-in) or once unused for `IDLE_SECONDS`. Its last use is written at most
every `REFRESH_SECONDS`, so browsing costs a read, not a write. Rows that ended
more than a day ago are deleted at sign-in. The work runs on the store's own
threads (`Store.run`): a database outage raises StoreUnavailable, which the
console answers with its 503 page.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, update
from sqlmodel import col

from admin.console import session as timing
from proxy.models import ConsoleSession
from proxy.store import Store

KEEP_ENDED = timedelta(days=1)  # rows past their expiry this long are deleted at sign-in


def _now() -> datetime:
    return datetime.fromtimestamp(timing.clock(), UTC)


def _utc(value: datetime) -> datetime:
    """A stored timestamp (naive means UTC: SQLite drops the zone)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class SessionRecords:
    """Starts, checks and ends console sessions in the store of the serving app."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store  # the runtime's store, which exists once the app has started

    async def start(self) -> str:
        """A new session's id, its row written (and old rows deleted)."""
        session_id = secrets.token_urlsafe(24)
        store = self._store()
        await store.run(_start, store, session_id, _now())
        return session_id

    async def alive(self, session_id: str) -> bool:
        """Whether the session may still be used (and, if so, note that it was)."""
        store = self._store()
        alive: bool = await store.run(_check, store, session_id, _now())
        return alive

    async def end(self, session_id: str) -> None:
        store = self._store()
        await store.run(_end, store, session_id, _now())


def _start(store: Store, session_id: str, now: datetime) -> None:
    with store.session() as s:
        s.execute(delete(ConsoleSession).where(col(ConsoleSession.expires_at) < now - KEEP_ENDED))
        s.add(
            ConsoleSession(
                id=session_id,
                created_at=now,
                expires_at=now + timedelta(seconds=timing.SESSION_SECONDS),
                last_seen_at=now,
            )
        )
        s.commit()


def _check(store: Store, session_id: str, now: datetime) -> bool:
    with store.session() as s:
        row = s.get(ConsoleSession, session_id)
        if row is None or row.signed_out_at is not None or _utc(row.expires_at) <= now:
            return False
        idle = now - _utc(row.last_seen_at)
        if idle >= timedelta(seconds=timing.IDLE_SECONDS):
            return False
        if idle >= timedelta(seconds=timing.REFRESH_SECONDS):
            s.execute(
                update(ConsoleSession)
                .where(col(ConsoleSession.id) == session_id)
                .values(last_seen_at=now)
            )
            s.commit()
        return True


def _end(store: Store, session_id: str, now: datetime) -> None:
    with store.session() as s:
        s.execute(
            update(ConsoleSession)
            .where(
                col(ConsoleSession.id) == session_id,
                col(ConsoleSession.signed_out_at).is_(None),
            )
            .values(signed_out_at=now)
        )
        s.commit()
