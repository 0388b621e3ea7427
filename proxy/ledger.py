"""The usage ledger: usage lines summed per tenant, proxy key, model and UTC day.

Every usage line with a tenant is added here as it is written (`add`, in
memory, on the event loop); `proxy.spend` takes the sums every second and
writes them in one transaction (`write`), off the hot path, adding to the
rows other workers and replicas write too. A write that fails keeps the sums
for the next one (`restore`), so nothing promised is lost while the database
is briefly away; past `MAX_PENDING` distinct rows the oldest are dropped and
counted (`dropped`).

The day is the UTC day of the usage line's `ts`, so the ledger's totals for a
period equal the usage log's lines for it. `cost_nanos` is in 1e-9 USD (exact
sums); requests of unknown price count in `unpriced`, not in the cost.

Also here: `last_used_at` of proxy keys, remembered at most once a minute
per key and written with the same transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy import update
from sqlmodel import Session, col

from proxy.models import ProxyKey, UsageLedger
from proxy.upsert import insert_for
from proxy.usage import UsageRecord

_TABLE = UsageLedger.__table__  # type: ignore[attr-defined]
_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nanos")
MAX_PENDING = 100_000  # distinct (tenant, key, model, day) rows held between writes
TOUCH_EVERY = 60.0  # seconds between two `last_used_at` writes of one key

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

    def add(self, record: UsageRecord, cost_nanos: int | None) -> None:
        """Count one finished request (a usage line with a tenant)."""
        if record.tenant_id is None:
            return
        day = datetime.fromtimestamp(record.ts, UTC).date()
        key = (record.tenant_id, day, record.api_key_id or "", _model_key(record.model))
        sums = self._pending.rows.get(key)
        if sums is None:
            if len(self._pending.rows) >= MAX_PENDING:
                self._pending.rows.pop(next(iter(self._pending.rows)))
                self.dropped += 1
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

    def take(self) -> Batch:
        """The sums so far, handed to a write; new requests count afresh."""
        batch, self._pending = self._pending, Batch()
        return batch

    def restore(self, batch: Batch) -> None:
        """Put back the sums of a write that failed."""
        for key, sums in batch.rows.items():
            mine = self._pending.rows.get(key)
            if mine is None:
                self._pending.rows[key] = sums
            else:
                for i, value in enumerate(sums):
                    mine[i] += value
        for key_id, when in batch.used.items():
            self._pending.used.setdefault(key_id, when)


def write(session: Session, batch: Batch) -> None:
    """Add `batch` to the ledger rows and key timestamps (inside the caller's transaction)."""
    insert = insert_for(session.bind.dialect.name)  # type: ignore[union-attr]
    for (tenant_id, day, key_id, model), sums in sorted(batch.rows.items()):
        values = dict(zip((*_COUNTERS, "unpriced"), sums, strict=True))
        stmt = insert(_TABLE).values(
            tenant_id=tenant_id, day=day, api_key_id=key_id, model=model, **values
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant_id", "day", "api_key_id", "model"],
            set_={name: _TABLE.c[name] + stmt.excluded[name] for name in values},
        )
        session.execute(stmt)
    for key_id, when in sorted(batch.used.items()):
        session.execute(
            update(ProxyKey).where(col(ProxyKey.id) == key_id).values(last_used_at=when)
        )
