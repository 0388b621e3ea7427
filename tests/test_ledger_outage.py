"""The usage ledger and budget sums while the database is away (`proxy.ledger`, `proxy.spend`).

Each test drives `SpendControl.finish` / `flush` / `aclose` by hand against a real
database (SQLite file or PostgreSQL schema of its own) and breaks only its own
store: its `run` raises, or its write is slowed past the store's call timeout.
What is checked: nothing added is lost or written twice across failed writes,
the in-memory bound holds and its drops are counted, logged once and metered,
and a shutdown that cannot write says how much it leaves unwritten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers import make_config
from sqlalchemy import func, select
from sqlmodel import Session

from proxy import ledger, policy
from proxy.errors import StoreUnavailable
from proxy.metrics import Metrics
from proxy.models import BudgetSpend, ProxyKey, Tenant, UsageLedger
from proxy.ratelimit import RateLimiter
from proxy.spend import SpendControl
from proxy.store import Principal, Store, TenantSnapshot, migrate
from proxy.streaming import Usage
from proxy.usage import UsageRecord

_ids = itertools.count()
KEY_ID = "key_outage_1"  # a real proxy key row (see `_spend`), so `last_used_at` is written
METRIC = "byok_ledger_rows_dropped_total"


async def _spend(database_url: str, master_key: str, **limits: float) -> SpendControl:
    config = make_config(database_url, master_key)
    store = Store.connect(config.database_url, 1.0, dataclasses.replace(config.database, **limits))
    migrate(store.engine)
    with Session(store.engine) as s:
        s.add(Tenant(id="acme", name="Acme", tier="pro"))
        s.flush()
        s.add(ProxyKey(id=KEY_ID, tenant_id="acme", key_hash="0" * 64))
        s.commit()
    return SpendControl(
        store, config.prices, RateLimiter(config.rate_limits), default_output_tokens=4096
    )


@pytest.fixture
async def spend(database_url: str, master_key: str) -> AsyncIterator[SpendControl]:
    control = await _spend(database_url, master_key)
    yield control
    await control.limiter.aclose()
    control.store.engine.dispose()


def record(tenant: str, model: str, prompt: int, completion: int, cost: int | None) -> UsageRecord:
    r = UsageRecord(f"req_{next(_ids)}", "POST", "/v1/chat/completions", 0.0, time.time())
    r.tenant_id, r.api_key_id, r.model = tenant, KEY_ID, model
    r.status = r.upstream_status = 200
    r.usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    r.cost_nanos = cost
    return r


class Expected:
    """What the ledger table must hold: per (tenant, model), computed from the records."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], list[int]] = {}

    def add(self, r: UsageRecord) -> None:
        assert r.tenant_id and r.model and r.usage
        sums = self.rows.setdefault((r.tenant_id, r.model), [0, 0, 0, 0, 0])
        sums[0] += 1
        sums[1] += r.usage.prompt_tokens or 0
        sums[2] += r.usage.completion_tokens or 0
        sums[3] += r.cost_nanos or 0
        sums[4] += 1 if r.cost_nanos is None else 0


def finish(spend: SpendControl, expected: Expected, *records: UsageRecord) -> None:
    for r in records:
        spend.finish(None, r)
        expected.add(r)


def table(spend: SpendControl) -> dict[tuple[str, str], list[int]]:
    """The ledger table, as `Expected.rows` (every row of one key and today)."""
    c = UsageLedger
    with spend.store.session() as s:
        found = s.execute(
            select(
                c.tenant_id,
                c.model,
                c.api_key_id,
                c.day,
                c.requests,
                c.prompt_tokens,
                c.completion_tokens,
                c.cost_nanos,
                c.unpriced,
            )
        ).all()
    today = datetime.now(UTC).date()
    assert all(row.api_key_id == KEY_ID and row.day == today for row in found)
    return {(row[0], row[1]): list(row[4:]) for row in found}


def failing_store(spend: SpendControl) -> Callable[[], None]:
    """Make every database call of `spend` fail as an outage does; returns the undo."""
    real = spend.store.run

    async def down(call: Callable[..., Any], *args: Any) -> Any:
        raise StoreUnavailable()

    spend.store.run = down  # type: ignore[method-assign]

    def recover() -> None:
        spend.store.run = real  # type: ignore[method-assign]

    return recover


SOFT = TenantSnapshot(
    "acme",
    "pro",
    "active",
    None,
    policy.parse(
        policy.dump(
            policy.PolicyIn.model_validate(
                {"budgets": [{"period": "day", "limit_usd": 100.0, "hard": False}]}
            )
        )
    ),
)


async def test_a_failed_write_keeps_every_row_and_the_next_one_writes_it_once(
    spend: SpendControl,
) -> None:
    expected = Expected()
    budget_spend = 0
    # Some usage, written normally: the outage starts with rows already in the table.
    finish(spend, expected, record("acme", "gpt-4o-mini", 10, 5, 1_000))
    await spend.flush()
    assert table(spend) == expected.rows

    recover = failing_store(spend)
    for i in range(3):  # three failed writes; usage goes on between them
        finish(
            spend,
            expected,
            record("acme", "gpt-4o-mini", 10 + i, 5, 1_000 + i),
            record("acme", "gpt-4.1", 7, 3, None),  # unpriced
            record(f"tenant-{i}", "gpt-4o-mini", 1, 1, 17),  # a new row each time
        )
        r = record("acme", "gpt-4o", 2, 2, 333)  # under a soft budget: its sum waits too
        admission = await spend.admit(SOFT, Principal("acme", KEY_ID), r, {}, 10)
        spend.finish(admission, r)
        expected.add(r)
        budget_spend += 333
        await spend.flush()
    assert spend.ledger.dropped == 0
    assert spend.ledger.pending_rows == 6
    recover()
    assert table(spend) == {("acme", "gpt-4o-mini"): [1, 10, 5, 1_000, 0]}  # nothing yet

    await spend.flush()  # the database is back: everything, once
    assert table(spend) == expected.rows
    assert not spend.ledger.take()
    await spend.flush()
    await spend.flush()
    assert table(spend) == expected.rows  # no second copy
    with spend.store.session() as s:
        assert s.execute(select(func.sum(BudgetSpend.spent_nanos))).scalar_one() == budget_spend
        used = s.get(ProxyKey, KEY_ID)
        assert used is not None and used.last_used_at is not None


async def test_a_write_the_store_gave_up_on_is_not_written_twice(
    database_url: str, master_key: str
) -> None:
    """The store's call timeout answers the flush while its thread goes on and commits:
    the flush must not put those sums back (the next write would add them again)."""
    spend = await _spend(
        database_url, master_key, pool_timeout=0.2, lock_timeout=0.2, statement_timeout=1.0
    )
    assert spend.store.limits.call_timeout == pytest.approx(1.4)
    real = ledger.write
    slow: list[bool] = []

    def slow_write(session: Any, batch: ledger.Batch) -> None:
        if not slow:
            slow.append(True)
            time.sleep(2.0)  # past the call timeout, before any statement: nothing locked
        real(session, batch)

    expected = Expected()
    try:
        ledger.write = slow_write  # type: ignore[assignment]
        finish(spend, expected, record("acme", "gpt-4o-mini", 10, 5, 1_000))
        finish(spend, expected, record("beta", "gpt-4o-mini", 3, 1, 77))
        await spend.flush()
        await asyncio.sleep(2.0)  # whatever thread is still out there has finished by now
        await spend.flush()
        await spend.flush()
        assert slow
        assert table(spend) == expected.rows
    finally:
        ledger.write = real  # type: ignore[assignment]
        await spend.limiter.aclose()
        spend.store.engine.dispose()


async def test_past_the_bound_rows_are_dropped_counted_logged_once_and_metered(
    spend: SpendControl, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ledger, "MAX_PENDING", 5)
    metrics = Metrics()
    spend.ledger.on_drop = metrics.ledger_rows_dropped.inc  # as the app wires it
    expected = Expected()
    recover = failing_store(spend)
    caplog.set_level(logging.INFO, logger="byok")

    def metered() -> float:
        return metrics.registry.get_sample_value(METRIC) or 0.0

    for i in range(5):
        finish(spend, expected, record(f"old-{i}", "gpt-4o-mini", 1, 1, 10))
    await spend.flush()
    assert spend.ledger.dropped == 0 and metered() == 0
    for i in range(3):  # three new rows: the three oldest make room
        finish(spend, expected, record(f"new-{i}", "gpt-4o-mini", 2, 2, 20))
        finish(spend, expected, record(f"new-{i}", "gpt-4o-mini", 2, 2, 20))
    assert spend.ledger.dropped == 3
    assert metered() == 0  # counted at the next flush, never per request
    await spend.flush()
    assert metered() == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "3 row(s)" in message and "3 request(s)" in message, message
    assert KEY_ID not in message and "old-" not in message and "acme" not in message

    # Rows that arrive while a failing write is out count against the same bound.
    async def meanwhile(call: Callable[..., Any], *args: Any) -> Any:
        for i in range(4):
            finish(spend, expected, record(f"late-{i}", "gpt-4o-mini", 3, 3, 30))
        raise StoreUnavailable()

    down = spend.store.run
    spend.store.run = meanwhile  # type: ignore[method-assign]
    await spend.flush()
    spend.store.run = down  # type: ignore[method-assign]
    assert spend.ledger.pending_rows == 5
    assert spend.ledger.dropped == 7
    # Requests dropped: old-0..2 (1 each), then old-3, old-4 (1 each), new-0, new-1 (2 each).
    assert spend.ledger.dropped_requests == 3 + 6
    assert metered() == 7  # the put-back's drops, reported by the write that made them
    await spend.flush()
    assert metered() == 7
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # at most one line per DROP_LOG_SECONDS, however many flushes

    recover()
    await spend.flush()
    written = table(spend)
    # The newest five rows, whole; the seven dropped ones absent (never half a row).
    assert set(written) == {("new-2", "gpt-4o-mini")} | {
        (f"late-{i}", "gpt-4o-mini") for i in range(4)
    }
    for row, sums in written.items():
        assert sums == expected.rows[row]
    assert metered() == 7


async def test_aclose_during_an_outage_logs_what_was_not_written(
    spend: SpendControl, caplog: pytest.LogCaptureFixture
) -> None:
    expected = Expected()
    caplog.set_level(logging.INFO, logger="byok")
    failing_store(spend)
    finish(spend, expected, record("acme", "gpt-4o-mini", 1, 1, 5))
    finish(spend, expected, record("acme", "gpt-4.1", 1, 1, 5))
    finish(spend, expected, record("beta", "gpt-4.1", 1, 1, 5))
    r = record("acme", "gpt-4o", 2, 2, 333)
    spend.finish(await spend.admit(SOFT, Principal("acme", KEY_ID), r, {}, 10), r)
    await spend.aclose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "4 usage ledger row(s) (4 request(s))" in message, message
    assert "1 budget sum(s)" in message, message
    assert KEY_ID not in message and "acme" not in message


async def test_aclose_that_writes_everything_logs_no_error(
    spend: SpendControl, caplog: pytest.LogCaptureFixture
) -> None:
    expected = Expected()
    caplog.set_level(logging.INFO, logger="byok")
    finish(spend, expected, record("acme", "gpt-4o-mini", 1, 1, 5))
    await spend.aclose()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert table(spend) == expected.rows


def test_a_dropped_row_counts_every_request_it_summed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "MAX_PENDING", 1)
    sums = ledger.Ledger()
    for _ in range(3):
        sums.add(record("first", "gpt-4o-mini", 1, 1, 10), 10)
    sums.add(record("second", "gpt-4o-mini", 1, 1, 10), 10)  # the first row makes room
    assert (sums.dropped, sums.dropped_requests) == (1, 3)
