"""The usage ledger: usage lines summed per tenant, proxy key, model and UTC day.

Every usage line with a tenant is added here as it is written (`add`, in
memory, on the event loop); `proxy.spend` takes the sums every second and
writes them in one transaction (`write`), off the hot path, adding to the
rows other workers and replicas write too. A write that fails keeps the sums
for the next one (`restore`), so nothing promised is lost while the database
is briefly away; past `MAX_PENDING` distinct rows (sums held and put back
together) the oldest are dropped and counted (`dropped`, `dropped_requests`).
Each flush calls `report()`: the drops since the last one go to the
`byok_ledger_rows_dropped_total` metric (`on_drop`) and, at the first drop and
then at most every `DROP_LOG_SECONDS`, to one ERROR line (counts only).

The day is the UTC day of the usage line's `ts`, so the ledger's totals for a
period equal the usage log's lines for it. `cost_nanos` is in 1e-9 USD (exact
sums); requests of unknown price count in `unpriced`, not in the cost.

Also here: `last_used_at` of proxy keys, remembered at most once a minute
per key and written with the same transaction.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy import bindparam, update
from sqlmodel import Session

from proxy.models import ProxyKey, UsageLedger
from proxy.upsert import insert_for
from proxy.usage import UsageRecord

log = logging.getLogger("byok.ledger")

_TABLE = UsageLedger.__table__  # type: ignore[attr-defined]
_KEYS = ProxyKey.__table__  # type: ignore[attr-defined]
_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nanos")
_COLUMNS = ("tenant_id", "day", "api_key_id", "model", *_COUNTERS, "unpriced")
MAX_PENDING = 100_000  # distinct (tenant, key, model, day) rows held between writes
TOUCH_EVERY = 60.0  # seconds between two `last_used_at` writes of one key
DROP_LOG_SECONDS = 10.0  # at most one "rows dropped" ERROR line this often (the first at once)

Row = tuple[str, date, str, str]  # tenant_id, day, api_key_id ("" = none), model ("" = none)


@dataclass
class Batch:
    """Sums taken for one write."""

    rows: dict[Row, list[int]] = field(default_factory=dict)  # _COUNTERS + unpriced
    used: dict[str, datetime] = field(default_factory=dict)  # key id -> last used

    def __bool__(self) -> bool:
        return bool(self.rows or self.used)


def _model_key(model: str | None) -> str:
    """The ledger's name for a model: lower case (as priced), printable ASCII only (a lone
    surrogate or a NUL from a caller must never fail the shared write), 128 at most."""
    if not model:
        return ""
    name = model.lower()[:128]
    return name if name.isascii() and name.isprintable() else "other"


class Ledger:
    """This worker's sums not yet written."""

    def __init__(self) -> None:
        self._pending = Batch()
        self._touched: dict[str, float] = {}  # key id -> monotonic time of the last touch
        self.dropped = 0  # rows dropped because the database was away too long
        self.dropped_requests = 0  # the requests counted in those rows
        self.on_drop: Callable[[int], None] | None = None  # rows dropped, at each report()
        self._metered = 0  # `dropped` as last handed to on_drop
        self._logged = 0  # `dropped` as last logged
        self._last_log = float("-inf")

    @property
    def pending_rows(self) -> int:
        """Rows held, not yet written."""
        return len(self._pending.rows)

    def add(self, record: UsageRecord, cost_nanos: int | None) -> None:
        """Count one finished request (a usage line with a tenant)."""
        if record.tenant_id is None:
            return
        day = datetime.fromtimestamp(record.ts, UTC).date()
        key = (record.tenant_id, day, record.api_key_id or "", _model_key(record.model))
        sums = self._pending.rows.get(key)
        if sums is None:
            if len(self._pending.rows) >= MAX_PENDING:
                oldest = self._pending.rows.pop(next(iter(self._pending.rows)))
                self.dropped += 1
                self.dropped_requests += oldest[0]
            sums = self._pending.rows[key] = [0] * (len(_COUNTERS) + 1)
        usage = record.usage
        sums[0] += 1
        if usage is not None:
            sums[1] += usage.prompt_tokens or 0
            sums[2] += usage.completion_tokens or 0
            sums[3] += usage.cached_tokens or 0
        if cost_nanos is None:
            if usage is not None and usage.tokens:
                sums[5] += 1  # tokens used at a price we do not know
        else:
            sums[4] += cost_nanos

    def touch(self, key_id: str) -> None:
        """Note that a key was used now (written at most every `TOUCH_EVERY` seconds)."""
        now = time.monotonic()
        last = self._touched.get(key_id)
        if last is None or now - last >= TOUCH_EVERY:
            if len(self._touched) >= MAX_PENDING:
                self._touched.clear()
            self._touched[key_id] = now
            self._pending.used[key_id] = datetime.now(UTC)

    def unwritten(self) -> tuple[int, int]:
        """(rows, requests) held, not yet written."""
        return len(self._pending.rows), sum(sums[0] for sums in self._pending.rows.values())

    def take(self) -> Batch:
        """The sums so far, handed to a write; new requests count afresh."""
        batch, self._pending = self._pending, Batch()
        return batch

    def restore(self, batch: Batch) -> None:
        """Put back the sums of a write that failed (whose write surely did not commit).

        They come first (older), the rows added while it was out after them; the bound
        holds for both together, so the oldest past `MAX_PENDING` are dropped here."""
        rows = batch.rows
        for key, sums in self._pending.rows.items():
            mine = rows.get(key)
            if mine is None:
                rows[key] = sums
            else:
                for i, value in enumerate(sums):
                    mine[i] += value
        excess = len(rows) - MAX_PENDING
        if excess > 0:
            for key in list(itertools.islice(rows, excess)):
                self.dropped_requests += rows.pop(key)[0]
            self.dropped += excess
        self._pending.rows = rows
        for key_id, when in batch.used.items():
            self._pending.used.setdefault(key_id, when)

    def report(self) -> None:
        """Hand the rows dropped since the last call to `on_drop` (the metric) and log
        them: at the first drop, then at most every `DROP_LOG_SECONDS`. Once per flush,
        never per request; counts only (no tenant, key or model)."""
        if self.dropped == self._metered:
            return
        if self.on_drop is not None:
            self.on_drop(self.dropped - self._metered)
        self._metered = self.dropped
        now = time.monotonic()
        if now - self._last_log >= DROP_LOG_SECONDS:
            log.error(
                "USAGE LEDGER ROWS DROPPED: the database has not taken the ledger for too "
                "long and this worker holds %d row(s) at most; %d row(s) dropped since the "
                "last report, %d row(s) (%d request(s)) since start; %d row(s) pending. The "
                "usage log still has their lines.",
                MAX_PENDING,
                self.dropped - self._logged,
                self.dropped,
                self.dropped_requests,
                len(self._pending.rows),
            )
            self._logged, self._last_log = self.dropped, now


def write(session: Session, batch: Batch) -> None:
    """Add `batch` to the ledger rows and key timestamps (inside the caller's transaction).

    One statement each, executed over all rows (executemany: 100,000 rows take seconds,
    not the minute and more of one statement per row), in key order so that workers
    writing the same rows lock them in the same order."""
    if batch.rows:
        insert = insert_for(session.bind.dialect.name)  # type: ignore[union-attr]
        stmt = insert(_TABLE)
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant_id", "day", "api_key_id", "model"],
            set_={name: _TABLE.c[name] + stmt.excluded[name] for name in _COLUMNS[4:]},
        )
        rows = sorted(batch.rows.items())
        session.execute(
            stmt, [dict(zip(_COLUMNS, (*key, *sums), strict=True)) for key, sums in rows]
        )
    if batch.used:
        touch = (
            update(_KEYS)
            .where(_KEYS.c.id == bindparam("key_id"))
            .values(last_used_at=bindparam("when"))
        )
        session.execute(touch, [{"key_id": k, "when": w} for k, w in sorted(batch.used.items())])
