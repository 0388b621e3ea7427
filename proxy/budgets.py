"""Budgets in USD per UTC day or month, per tenant and per proxy key: reserve, then settle.

The shared count is a `budget_spend` row per budget and period: `spent_nanos`
(settled) and `reserved_nanos` (leased by workers). A hard budget is never
leased beyond its limit: `claim()` locks the row and grants at most
`limit - spent - reserved`. Each worker admits requests against its own
lease without a database round trip (`Lease`): a request holds its
estimated cost (`proxy.spend`), and when it ends the hold becomes what it
cost (`settle`). Every second `proxy.spend` writes the settled amounts and
returns idle leases (`flush_ops` / `apply`), in the ledger's transaction.

Bound on overshoot (README, "Controlling spend"): the sum of holds never
exceeds the limit, and a request is admitted on less than its estimate only
when its worker's lease holds less than the estimate and the database has
nothing more to grant, and only while no other such request runs on that
lease; that worker then refuses until a hold is released.
So a period's spend exceeds the limit by at most one request's estimate per
worker process (across replicas), plus whatever requests cost beyond their
estimates (none for text with `max_tokens` set: the estimate is then an
upper bound). Leases of a worker that crashed stay reserved until the period
ends (at most `LEASE_SHARE` of the limit each): a budget errs on the
tenant's side. Soft budgets are only counted: crossing one adds a header and,
once per period, an audit event.

A lease stops taking holds ("retires") when its period ends, when it has
been idle for `IDLE_SECONDS`, or when its budget's limit is lowered; a fresh
lease then claims under the new terms. A retired lease gives back only what
no request in flight holds (`granted - held`), so a reservation in the
database always covers every hold; it is dropped once its last request has
settled and been written. Holds point at their lease, so a request's cost is
never lost however long it runs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy import select, update
from sqlmodel import Session, col

from proxy import audit
from proxy.errors import BudgetExceeded
from proxy.models import BudgetSpend
from proxy.policy import Budget, period_end, period_start
from proxy.upsert import insert_for

_TABLE = BudgetSpend.__table__  # type: ignore[attr-defined]
LEASE_SHARE = 50  # a lease asks for 1/50 of the limit (or the estimate, if more)
IDLE_SECONDS = 5.0  # a lease unused this long is given back

LeaseKey = tuple[str, str, date]  # scope, period, period start


@dataclass(slots=True)
class Lease:
    """This worker's share of one budget in one period."""

    tenant_id: str
    budget: Budget
    granted: int = 0  # reserved for this worker in the database
    held: int = 0  # held by requests in flight
    used: int = 0  # settled here, not yet written
    flushing: int = 0  # settled here, being written
    known_spent: int = 0  # the database's spent_nanos when last seen
    exhausted: bool = False  # the last claim got less than it asked for
    inflight: int = 0  # requests holding on it (soft budgets and 0-cost ones included)
    short: bool = False  # a request admitted on less than its estimate is running
    retired: bool = False  # takes no new holds (`Budgets._retire`)
    last_active: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def available(self) -> int:
        return self.granted - self.held - self.used - self.flushing

    @property
    def spent(self) -> int:
        """Spend in this period as this worker knows it."""
        return self.known_spent + self.used + self.flushing


@dataclass(slots=True)
class Hold:
    """What one request holds on one lease (0 for a soft budget or a free request)."""

    key: LeaseKey
    lease: Lease
    nanos: int
    short: bool = False  # admitted on less than its estimate (one at a time per lease)


@dataclass(frozen=True, slots=True)
class Op:
    """One row's change in a write: spent += `spent`, reserved -= `released`."""

    key: LeaseKey
    lease: Lease
    spent: int
    released: int
    soft_limit: int | None  # for the soft budget's crossing check


def scope_name(kind: str, owner: str) -> str:
    return f"{kind}:{owner}"


def _describe(scope: str) -> str:
    kind, _, owner = scope.partition(":")
    return f"tenant {owner}" if kind == "tenant" else f"proxy key {owner}"


def exceeded(key: LeaseKey, budget: Budget) -> BudgetExceeded:
    scope, period, start = key
    resets = period_end(period, start).strftime("%Y-%m-%dT%H:%M:%SZ")
    what = "daily" if period == "day" else "monthly"
    return BudgetExceeded(
        f"The {what} budget of {_describe(scope)} (${budget.limit_usd:,.2f}, hard) is used up; "
        f"it resets at {resets}. Raise it with PATCH on the tenant or key (policy.budgets), "
        "or wait."
    )


class Budgets:
    """This worker's leases, and the database calls that fill and settle them."""

    def __init__(self) -> None:
        self.leases: dict[LeaseKey, Lease] = {}  # the leases requests take holds on
        self.retired: list[tuple[LeaseKey, Lease]] = []  # giving back; settling late holds

    def lease(
        self, scope: str, budget: Budget, tenant_id: str, today: date
    ) -> tuple[LeaseKey, Lease]:
        key = (scope, budget.period, period_start(budget.period, today))
        lease = self.leases.get(key)
        if lease is None:
            lease = self.leases[key] = Lease(tenant_id, budget)
        elif lease.budget is not budget and lease.budget != budget:  # the policy changed
            if budget.limit_nanos < lease.budget.limit_nanos or budget.hard != lease.budget.hard:
                self._retire(key, lease)  # what it was granted may exceed the new limit
                lease = self.leases[key] = Lease(tenant_id, budget)
            else:
                lease.budget, lease.exhausted = budget, False
        lease.last_active = time.monotonic()
        return key, lease

    def _retire(self, key: LeaseKey, lease: Lease) -> None:
        del self.leases[key]
        lease.retired = True
        self.retired.append((key, lease))

    def settle(self, holds: list[Hold], charge: int | None) -> None:
        """Turn each hold into what its request cost: `charge`, or, if None, what it held."""
        for hold in holds:
            cost = hold.nanos if charge is None else charge
            lease = hold.lease
            lease.held -= hold.nanos
            lease.inflight -= 1
            if hold.short:
                lease.short = False
            lease.used += cost
            if cost < hold.nanos:
                lease.exhausted = False  # something came back: claim again next time

    def flush_ops(self, now: float, today: date) -> list[Op]:
        """What to write now: settled spend, and what retired leases give back."""
        for key, lease in list(self.leases.items()):
            over = key[2] != period_start(key[1], today)
            if over or (now - lease.last_active > IDLE_SECONDS and lease.inflight == 0):
                self._retire(key, lease)
        ops = []
        for key, lease in self.leases.items():
            ops += self._op(key, lease, min(lease.used, lease.granted - lease.held))
        keep = []
        for key, lease in self.retired:
            ops += self._op(key, lease, lease.granted - lease.held)
            if lease.granted or lease.inflight or lease.used or lease.flushing:
                keep.append((key, lease))
        self.retired = keep
        return ops

    @staticmethod
    def _op(key: LeaseKey, lease: Lease, released: int) -> list[Op]:
        spent, lease.flushing, lease.used = lease.used, lease.used, 0
        released = max(0, released)
        if not spent and not released:
            return []
        soft = None if lease.budget.hard else lease.budget.limit_nanos
        return [Op(key, lease, spent, released, soft)]

    def apply(self, ops: list[Op], spent_now: dict[LeaseKey, int], ok: bool) -> None:
        """Account a write of `ops` (ok) or put its amounts back (failed)."""
        for op in ops:
            lease = op.lease
            lease.flushing -= op.spent
            if ok:
                lease.granted -= op.released
                lease.known_spent = spent_now.get(op.key, lease.known_spent)
            else:
                lease.used += op.spent


def claim(session: Session, key: LeaseKey, want: int, limit: int) -> tuple[int, int]:
    """Reserve up to `want` nanos of a hard budget for this worker: (granted, spent).

    The row is locked (PostgreSQL `FOR UPDATE`; SQLite: the first write takes the
    database's write lock), read, and grown by at most what the limit leaves.
    """
    scope, period, start = key
    where = (_TABLE.c.scope == scope) & (_TABLE.c.period == period) & (_TABLE.c.start == start)
    insert = insert_for(session.bind.dialect.name)  # type: ignore[union-attr]
    session.execute(
        insert(_TABLE)
        .values(scope=scope, period=period, start=start, spent_nanos=0, reserved_nanos=0)
        .on_conflict_do_nothing()
    )
    query = select(_TABLE.c.spent_nanos, _TABLE.c.reserved_nanos).where(where)
    if session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
        query = query.with_for_update()
    spent, reserved = session.execute(query).one()
    granted = max(0, min(want, limit - spent - reserved))
    if granted:
        session.execute(
            update(_TABLE).where(where).values(reserved_nanos=_TABLE.c.reserved_nanos + granted)
        )
    session.commit()
    return granted, spent


def write(session: Session, ops: list[Op]) -> dict[LeaseKey, int]:
    """Apply `ops` (inside the caller's transaction); spent_nanos of each row after.

    A soft budget crossed for the first time in its period gets its audit event
    (`budget.soft_exceeded`) here, once across every worker and replica.
    """
    insert = insert_for(session.bind.dialect.name)  # type: ignore[union-attr]
    spent_now = {}
    for op in sorted(ops, key=lambda o: o.key):
        scope, period, start = op.key
        new = insert(_TABLE).values(
            scope=scope, period=period, start=start, spent_nanos=op.spent, reserved_nanos=0
        )
        stmt = new.on_conflict_do_update(
            index_elements=["scope", "period", "start"],
            set_={
                "spent_nanos": _TABLE.c.spent_nanos + op.spent,
                "reserved_nanos": _TABLE.c.reserved_nanos - op.released,
            },
        ).returning(_TABLE.c.spent_nanos)
        spent = session.execute(stmt).scalar_one()
        spent_now[op.key] = spent
        if op.soft_limit is not None and spent >= op.soft_limit:
            first = session.execute(
                update(BudgetSpend)
                .where(
                    col(BudgetSpend.scope) == scope,
                    col(BudgetSpend.period) == period,
                    col(BudgetSpend.start) == start,
                    col(BudgetSpend.warned_at).is_(None),
                )
                .values(warned_at=datetime.now(UTC))
            ).rowcount  # type: ignore[attr-defined]
            if first:
                hint = scope if scope.startswith("key:") else f"{period} budget"
                tenant_id = op.lease.tenant_id
                audit.record(session, audit.SYSTEM, tenant_id, "budget.soft_exceeded", hint[:40])
    return spent_now
