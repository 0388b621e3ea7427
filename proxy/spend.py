"""Spend control on the hot path: one `admit()` before the upstream call, one `finish()` after.

`check_model()` applies the allow-lists of the tenant's policy and its proxy key's
(`proxy.policy`, 403; its verdicts remembered per tenant and key). `admit()` applies,
for both policies, the rate limits (`proxy.ratelimit`, 429), then the budgets
(`proxy.budgets`, 402), holding the request's estimated cost. `finish()` settles both with
what the request cost and adds the usage line to the ledger
(`proxy.ledger`). A background task (`run()`) writes the ledger and the
budgets' settled spend every `FLUSH_SECONDS` in one transaction, off the hot
path; nothing on it waits for the database unless a budget lease runs dry.

What a request costs (`charge`): the price of its usage when the upstream
reported usage; else nothing if the upstream was not reached or answered an
error whole; else (a stream cut, a client gone before the usage arrived) its
estimate, as the trial allowance does (`proxy.allowance.outcome`).

With a hard budget, only what the proxy can price is admitted: a model
missing from the price table is refused (403 `model_not_priced`), and so are
endpoints that start work whose cost never comes back in a response
(batches, fine-tuning, assistants runs, images, audio, realtime) and calls
with extras no usage reports (hosted tools, priority tiers; `proxy.estimate`):
403 `endpoint_not_metered`. Reads, deletes, file uploads and moderations cost
nothing and pass, even when the budget is used up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from proxy import allowance, budgets, ledger, policy
from proxy.budgets import Budgets, Hold, Lease, LeaseKey
from proxy.errors import ModelNotPriced, StoreUnavailable
from proxy.estimate import hold_nanos, unmetered
from proxy.platform import USAGE_ENDPOINTS, requested_output
from proxy.policy import Budget
from proxy.prices import PriceTable
from proxy.ratelimit import Limit, RateLimiter, Ticket
from proxy.routes import READ_METHODS
from proxy.store import Principal, Store, TenantSnapshot
from proxy.usage import UsageRecord

log = logging.getLogger("byok.spend")

FLUSH_SECONDS = 1.0
CLAIM_PAUSE = 1.0  # seconds a dry or failed claim is not tried again (a refused caller costs
# no database call)
_FREE_POSTS = ("/v1/moderations", "/v1/files", "/v1/uploads")
WARNING_HEADER = b"x-byok-budget-warning"
_MAX_PLANS = 10_000
_MAX_VERDICTS = 256  # allow-list verdicts remembered per plan


@dataclass(slots=True)
class _Plan:
    """What a tenant and proxy key are under: built once per pair of snapshots."""

    tenant: TenantSnapshot
    principal: Principal
    limits: tuple[Limit, ...]
    budgets: tuple[tuple[str, Budget], ...]
    hard: bool  # a hard budget among them (only those need the request's estimate)
    # Per budget, its lease (`Budgets.lease`) on `day`, asked again once given back.
    day: date | None = None
    leases: list[tuple[LeaseKey, Lease] | None] = field(default_factory=list)
    # Requests (model, method, path, query model) the allow-lists let through.
    allowed: set[tuple[str | None, str, str, str | None]] = field(default_factory=set)


@dataclass(slots=True)
class Admission:
    """What a request was admitted on: holds to settle and headers to add."""

    holds: list[Hold] = field(default_factory=list)
    ticket: Ticket | None = None
    headers: Sequence[tuple[bytes, bytes]] = ()
    header_names: frozenset[bytes] = frozenset()  # the names of `headers`


def _charge(record: UsageRecord, outcome: str) -> int | None:
    """What a finished request costs each budget it held on, in nanos (see the module
    docstring), given its `allowance.outcome` ("nothing" when refused); None when that
    is what each hold held (its estimate)."""
    if outcome == "usage":
        return record.cost_nanos
    return None if outcome == "reservation" else 0


def _free(path: str) -> bool:
    """Whether a write that is not a model call costs nothing (uploads, cancels...)."""
    return path.startswith(_FREE_POSTS) or path.endswith("/cancel")


class SpendControl:
    """Rate limits, budgets and the ledger of one worker."""

    def __init__(
        self,
        store: Store,
        prices: PriceTable,
        limiter: RateLimiter,
        default_output_tokens: int,
        on_spend: Callable[[UsageRecord], None] | None = None,
    ) -> None:
        self.store = store
        self.prices = prices
        self.limiter = limiter
        self.default_output = default_output_tokens
        self.ledger = ledger.Ledger()
        self.budgets = Budgets()
        self._on_spend = on_spend
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: dict[LeaseKey, tuple[float, bool]] = {}  # last claim: when, failed?
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._closing = False
        self._day: tuple[int, date] = (-1, date(1970, 1, 1))  # `_utc_today`'s last answer

    # --- the hot path ----------------------------------------------------------------

    def _utc_today(self) -> date:
        """Today's UTC date (`datetime.now(UTC).date()`, worked out once a day)."""
        number = int(time.time() // 86400)
        if number != self._day[0]:
            self._day = (number, datetime.fromtimestamp(number * 86400, UTC).date())
        return self._day[1]

    def _plan(self, tenant: TenantSnapshot, principal: Principal) -> _Plan:
        """The limits and budgets a tenant and key are under, built once per cache load
        (the snapshots are replaced when a policy changes)."""
        key = (id(tenant), id(principal))
        plan = self._plans.get(key)
        if plan is not None and plan.tenant is tenant and plan.principal is principal:
            return plan
        scoped = [
            (budgets.scope_name("tenant", tenant.id), tenant.policy),
            (budgets.scope_name("key", principal.key_id), principal.policy),
        ]
        budgeted = tuple((scope, b) for scope, p in scoped if p for b in p.budgets)
        plan = _Plan(
            tenant,
            principal,
            tuple(Limit(scope, p.rpm, p.tpm) for scope, p in scoped if p and (p.rpm or p.tpm)),
            budgeted,
            any(b.hard for _, b in budgeted),
        )
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan  # holds both snapshots, so their ids are not reused meanwhile
        return plan

    def check_model(
        self,
        tenant: TenantSnapshot,
        principal: Principal,
        model: str | None,
        method: str,
        path: str,
        query_model: str | None,
    ) -> None:
        """`proxy.policy.check_model` under the tenant's and key's allow-lists (403
        `model_not_allowed`), its verdict remembered for the same request shape."""
        plan = self._plan(tenant, principal)
        seen = (model, method, path, query_model)
        if seen in plan.allowed:
            return
        policy.check_model((tenant.policy, principal.policy), model, method, path, query_model)
        if len(plan.allowed) < _MAX_VERDICTS and len(path) <= 200:  # short strings only
            if len(model or "") <= 128 and len(query_model or "") <= 128:
                plan.allowed.add(seen)

    async def admit(
        self,
        tenant: TenantSnapshot,
        principal: Principal,
        record: UsageRecord,
        counts: dict[str, Any] | None,
        body_size: int,
    ) -> Admission | None:
        """Rate limits, then budgets, of a request about to go upstream; None if neither
        policy sets any. Raises the 429/402/403 of a refusal."""
        plan = self._plan(tenant, principal)
        limits, budgeted = plan.limits, plan.budgets
        if not limits and not budgeted:
            return None
        admission = Admission()
        # The request's output limit: for TPM and a hard budget's estimate only.
        limit, choices = requested_output(record.path, counts) if limits or plan.hard else (0, 0)
        if limits:
            # As OpenAI counts a request against TPM: its prompt, plus its output limit.
            metered = record.path in USAGE_ENDPOINTS
            tokens = body_size // 4 + (limit or 0) * choices if metered else 0
            if self.limiter.in_process:
                ticket = self.limiter.admit_here(limits, tokens)
            else:
                ticket = await self.limiter.admit(limits, tokens)
            if ticket is not None:
                admission.ticket, admission.headers = ticket, ticket.headers
                admission.header_names = ticket.shape.header_names
        if budgeted:
            estimate: int | ModelNotPriced = 0  # soft budgets count the cost at settle
            if plan.hard:
                output = (self.default_output if limit is None else limit) * choices
                estimate = self._estimate(record, counts, body_size, output)
            today = self._utc_today()
            try:
                # Held without awaiting while the leases have room; a lease that runs dry
                # claims more from the database (`_take`), then the rest go on.
                waiting = self._hold(admission, plan, today, estimate, 0)
                while waiting >= 0:
                    assert not isinstance(estimate, ModelNotPriced)  # else `_hold` raised
                    scope, budget = budgeted[waiting]
                    hold = await self._take(scope, budget, tenant.id, today, estimate)
                    admission.holds.append(hold)
                    plan.leases[waiting] = None  # `_take` may have been given a new one
                    waiting = self._hold(admission, plan, today, estimate, waiting + 1)
            except BaseException:
                self.finish(admission, record, refused=True)
                raise
        return admission

    def _estimate(
        self, record: UsageRecord, counts: dict[str, Any] | None, size: int, output: int
    ) -> int | ModelNotPriced:
        """The most a request may cost, in nanos (`proxy.estimate`), or the 403 a hard
        budget answers when that cannot be known."""
        method, path = record.method, record.path
        if method in READ_METHODS:
            return 0
        extra = None
        if path in USAGE_ENDPOINTS:
            extra = unmetered(counts)
            if extra is None:
                nanos = hold_nanos(self.prices, record.model, counts, size, output)
                if nanos is not None:
                    return nanos
                model = record.model if len(record.model or "") <= 128 else "(a long name)"
                return ModelNotPriced(
                    f"The model {model!r} has no price in the proxy's price table, so its "
                    "cost cannot be held against the hard budget. Add it under prices.models "
                    "in config.yaml, or use a priced model."
                )
        elif _free(path):
            return 0
        return ModelNotPriced(
            f"{method} {path[:200]} starts work whose cost the proxy cannot meter"
            f"{f' ({extra})' if extra else ''}, so it is refused while a hard budget is set.",
            code="endpoint_not_metered",
        )

    def _hold(
        self,
        admission: Admission,
        plan: _Plan,
        today: date,
        estimate: int | ModelNotPriced,
        first: int,
    ) -> int:
        """Hold the request on the plan's budgets from the `first`-th on, until one must
        claim from the database: its index (`_take` then holds it), or -1 when done."""
        if plan.day != today:
            plan.day, plan.leases = today, [None] * len(plan.budgets)
        now = time.monotonic()
        for i in range(first, len(plan.budgets)):
            scope, budget = plan.budgets[i]
            known = plan.leases[i]
            if known is None or known[1].retired:  # new, or given back since
                known = plan.leases[i] = self.budgets.lease(scope, budget, plan.tenant.id, today)
            key, lease = known
            lease.last_active = now
            if budget.hard:
                if isinstance(estimate, ModelNotPriced):
                    raise estimate
                if estimate:
                    if lease.available < estimate:
                        return i  # `_take`: claims, or holds what is left, or refuses
                    lease.held += estimate
                    lease.inflight += 1
                    admission.holds.append(Hold(key, lease, estimate))
                    continue
            elif lease.spent >= budget.limit_nanos:
                what = "daily" if budget.period == "day" else "monthly"
                warning = f"{scope} {what} soft budget ${budget.limit_usd:,.2f} exceeded"
                admission.headers = [*admission.headers, (WARNING_HEADER, warning.encode())]
                admission.header_names = admission.header_names | {WARNING_HEADER}
            # Nothing held: a soft budget counts the cost when the request settles, and
            # a request that costs nothing (a read) passes a used-up hard budget.
            lease.inflight += 1
            admission.holds.append(Hold(key, lease, 0))
        return -1

    async def _take(
        self, scope: str, budget: Budget, tenant_id: str, today: date, estimate: int
    ) -> Hold:
        """Hold `estimate` on the budget's current lease, or, for the last request that
        fits, what is left of it (one such request at a time: the README's bound)."""
        while True:
            key, lease = self.budgets.lease(scope, budget, tenant_id, today)
            if lease.available < estimate:
                async with lease.lock:
                    if lease.available < estimate and not lease.retired:
                        await self._claim(key, lease, estimate)
                if lease.retired:  # given back while this waited: ask the current lease
                    continue
            available = lease.available
            short = False
            if available >= estimate:
                held = estimate
            elif available > 0 and lease.exhausted and not lease.short:
                held, short = available, True
                lease.short = True
            else:
                raise budgets.exceeded(key, lease.budget)
            lease.held += held
            lease.inflight += 1
            return Hold(key, lease, held, short)

    async def _claim(self, key: LeaseKey, lease: Lease, estimate: int) -> None:
        paused = self._paused.get(key)
        if paused is not None and time.monotonic() - paused[0] < CLAIM_PAUSE:
            if paused[1]:  # the database failed a moment ago: no pile-up of waiting claims
                raise StoreUnavailable()
            lease.exhausted = True  # the database had nothing left a moment ago
            return
        limit = lease.budget.limit_nanos
        want = max(estimate - lease.available, limit // budgets.LEASE_SHARE, 1)

        def work() -> tuple[int, int]:
            with self.store.session() as s:
                return budgets.claim(s, key, want, limit)

        try:
            granted, spent = await self.store.run(work)
        except Exception:
            self._paused[key] = (time.monotonic(), True)
            raise
        lease.granted += granted
        lease.known_spent = spent
        lease.exhausted = granted < want
        if lease.exhausted:
            self._paused[key] = (time.monotonic(), False)
        else:
            self._paused.pop(key, None)

    def finish(
        self, admission: Admission | None, record: UsageRecord, refused: bool = False
    ) -> None:
        """Settle what `admission` held with what the request cost; count it in the ledger."""
        if not refused:
            self.ledger.add(record, record.cost_nanos)
            if record.api_key_id is not None:
                self.ledger.touch(record.api_key_id)
            if self._on_spend is not None:
                self._on_spend(record)
        if admission is None:
            return
        outcome = "nothing" if refused else allowance.outcome(record)
        if admission.holds:
            self.budgets.settle(admission.holds, _charge(record, outcome))
            admission.holds = []
        ticket, admission.ticket = admission.ticket, None
        if ticket is not None:
            usage = record.usage
            if outcome == "nothing":
                tokens: int | None = 0
            else:
                tokens = usage.tokens if usage is not None else None
            if not self.limiter.settle_here(ticket, tokens):  # a Redis call: off the path
                task = asyncio.ensure_future(self.limiter.settle(ticket, tokens))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # --- off the hot path ------------------------------------------------------------

    async def run(self) -> None:
        """Write the ledger and budgets every `FLUSH_SECONDS` until closed."""
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """One write of everything pending; on failure it stays pending (logged). One at
        a time: a write's releases are accounted only when it ends."""
        async with self._flushing:
            try:
                await self._flush()
            finally:
                self.ledger.report()  # rows dropped, by requests or this put-back: metric, ERROR

    async def _flush(self) -> None:
        batch = self.ledger.take()
        today = self._utc_today()
        now = time.monotonic()
        ops = self.budgets.flush_ops(now, today)
        if self._paused:
            self._paused = {k: v for k, v in self._paused.items() if now - v[0] < CLAIM_PAUSE}
        if not batch and not ops:
            return

        # `store.run` stops waiting after its call timeout while the thread goes on and
        # may still commit: the sums are kept for the next write only once this write
        # surely did not commit (else the next one would add them a second time).
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[dict[LeaseKey, int] | None] = loop.create_future()
        gate = threading.Lock()
        state = {"began": False, "given_up": False}

        def settle(spent: dict[LeaseKey, int] | None) -> None:
            if not committed.done():
                committed.set_result(spent)

        def work() -> dict[LeaseKey, int] | None:
            with gate:
                if state["given_up"]:  # the flush stopped waiting before this began
                    return None
                state["began"] = True
            written = None
            try:
                with self.store.session() as s:
                    ledger.write(s, batch)
                    spent = budgets.write(s, ops)
                    s.commit()
                    written = spent
                return written
            finally:
                try:
                    loop.call_soon_threadsafe(settle, written)
                except RuntimeError:  # the loop is closed: nobody is waiting
                    pass

        try:
            spent = await self.store.run(work)
        except Exception as exc:
            with gate:
                state["given_up"] = True
                began = state["began"]
            late = await committed if began else None  # a thread still out: its outcome
            if late is None:  # the database is away: keep everything for the next write
                self.ledger.restore(batch)
                self.budgets.apply(ops, {}, ok=False)
                if not isinstance(exc, StoreUnavailable):
                    log.error(
                        "usage ledger not written: %s (kept for the next write)",
                        type(exc).__name__,
                    )
                return
            spent = late  # committed after the store stopped waiting: written, once
        assert spent is not None
        self.budgets.apply(ops, spent, ok=True)

    async def aclose(self) -> None:
        """Settle what is pending, give every lease back, and write it all."""
        self._closing = True
        self._wake.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for lease in self.budgets.leases.values():
            lease.last_active = float("-inf")  # idle: handed back by this last write
        await self.flush()
        self._report_unwritten()
        await self.limiter.aclose()

    def _report_unwritten(self) -> None:
        """After the last write: one ERROR with what it could not write (counts only)."""
        rows, requests = self.ledger.unwritten()
        leases = [*self.budgets.leases.values(), *(lease for _, lease in self.budgets.retired)]
        sums = sum(1 for lease in leases if lease.used)
        reserved = sum(1 for lease in leases if lease.granted > lease.held)
        if rows or sums or reserved:
            log.error(
                "stopping with the database unavailable: %d usage ledger row(s) (%d "
                "request(s)) and %d budget sum(s) not written, %d budget reservation(s) not "
                "given back (reserved until their period ends); the usage log has the "
                "requests' lines",
                rows,
                requests,
                sums,
                reserved,
            )
