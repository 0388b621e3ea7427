"""Budget leases in one worker (`proxy.budgets`, `proxy.spend`) against a real database.

Each test drives `SpendControl.admit` / `finish` / `flush` by hand (no background
writer), so the interleavings that matter are made to happen: a request that
arrives while a lease is being given back, a stream that outlives its lease's
idle time, a limit lowered under a worker's grant, a read on a used-up budget,
a database that fails a claim.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

import pytest
from helpers import make_config
from sqlalchemy import select

from proxy import policy
from proxy.budgets import IDLE_SECONDS, Hold
from proxy.errors import BudgetExceeded, ModelNotAllowed, StoreUnavailable
from proxy.models import BudgetSpend
from proxy.ratelimit import RateLimiter
from proxy.spend import Admission, SpendControl
from proxy.store import Principal, Store, TenantSnapshot, migrate
from proxy.streaming import Usage
from proxy.usage import UsageRecord

BODY = 100  # bytes of every chat request below
MAX_TOKENS = 10
_ids = itertools.count()


@pytest.fixture
async def spend(database_url: str, master_key: str) -> AsyncIterator[SpendControl]:
    config = make_config(database_url, master_key)
    store = Store.connect(config.database_url, 1.0, config.database)
    migrate(store.engine)
    control = SpendControl(
        store, config.prices, RateLimiter(config.rate_limits), default_output_tokens=4096
    )
    yield control
    await control.limiter.aclose()
    store.engine.dispose()


def tenant(budget: dict[str, Any]) -> TenantSnapshot:
    return TenantSnapshot("acme", "pro", "active", None, policy.parse(_policy(budget)))


def _policy(budget: dict[str, Any]) -> str:
    return policy.dump(policy.PolicyIn.model_validate({"budgets": [budget]})) or ""


KEY = Principal("acme", "key_1")


def chat(model: str = "gpt-4o-mini", method: str = "POST", path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    record = UsageRecord(f"req_{next(_ids)}", method, path, time.perf_counter(), time.time())
    record.model = model
    return record


async def admit(spend: SpendControl, snap: TenantSnapshot, record: UsageRecord) -> Admission:
    admission = await spend.admit(snap, KEY, record, {"max_tokens": MAX_TOKENS}, BODY)
    assert admission is not None
    return admission


def finish_with_cost(
    spend: SpendControl, admission: Admission, record: UsageRecord, nanos: int
) -> None:
    record.status = record.upstream_status = 200
    record.usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    record.cost_nanos = nanos
    spend.finish(admission, record)


def row(spend: SpendControl) -> tuple[int, int]:
    with spend.store.session() as s:
        found = s.execute(select(BudgetSpend.spent_nanos, BudgetSpend.reserved_nanos)).all()
    assert len(found) <= 1
    return (found[0][0], found[0][1]) if found else (0, 0)


def held_everywhere(spend: SpendControl) -> tuple[int, int]:
    """(granted, held) summed over this worker's leases, current and retired."""
    leases = list(spend.budgets.leases.values()) + [lease for _, lease in spend.budgets.retired]
    return sum(x.granted for x in leases), sum(x.held for x in leases)


def make_idle(spend: SpendControl) -> None:
    for lease in spend.budgets.leases.values():
        lease.last_active -= IDLE_SECONDS + 1


def during_next_write(spend: SpendControl, act: Callable[[], Any]) -> list[bool]:
    """Run the coroutine `act()` while the next database call of `spend` is under way."""
    real = spend.store.run
    done: list[bool] = []

    async def run(call: Callable[..., Any], *args: Any) -> Any:
        if not done:
            done.append(True)
            await act()
        return await real(call, *args)

    spend.store.run = run  # type: ignore[method-assign]
    return done


async def test_a_request_arriving_while_a_lease_is_given_back_stays_covered(
    spend: SpendControl,
) -> None:
    snap = tenant({"period": "day", "limit_usd": 1.0})
    first = chat()
    finish_with_cost(spend, await admit(spend, snap, first), first, 1000)
    await spend.flush()
    make_idle(spend)
    late: list[Admission] = []

    async def arrive() -> None:
        late.append(await admit(spend, snap, chat()))

    during_next_write(spend, arrive)
    await spend.flush()  # gives the idle lease back; a request arrives meanwhile
    await spend.flush()
    granted, held = held_everywhere(spend)
    spent, reserved = row(spend)
    assert held > 0 and late
    # The database still reserves everything this worker holds for requests in flight.
    assert reserved == granted >= held
    finish_with_cost(spend, late[0], chat(), 500)
    await spend.flush()
    assert row(spend)[0] == spent + 500


async def test_a_stream_outliving_its_soft_lease_is_still_counted(spend: SpendControl) -> None:
    snap = tenant({"period": "month", "limit_usd": 5.0, "hard": False})
    record = chat()
    admission = await admit(spend, snap, record)
    make_idle(spend)
    await spend.flush()
    await spend.flush()  # the stream runs on past its lease's idle time
    finish_with_cost(spend, admission, record, 12_345)
    await spend.flush()
    await spend.flush()
    assert row(spend)[0] == 12_345


async def test_a_lowered_limit_shrinks_what_the_worker_may_hold(spend: SpendControl) -> None:
    record = chat()
    running = await admit(spend, tenant({"period": "day", "limit_usd": 1.0}), record)
    assert row(spend)[1] >= 1_000_000_000 // 50  # a lease of a fiftieth of $1
    lowered = tenant({"period": "day", "limit_usd": 0.0005})
    estimate = spend.prices.bound_nanos("gpt-4o-mini", BODY, MAX_TOKENS)
    assert estimate is not None
    admitted = 0
    for _ in range(60):  # never settled: 60 holds would be far over the new limit
        try:
            admission = await admit(spend, lowered, chat())
        except BudgetExceeded:
            await spend.flush()
            spend._paused.clear()  # noqa: SLF001 (skip the second's pause after a dry claim)
            continue
        admitted += sum(h.nanos for h in admission.holds)
    held_before = running.holds[0].nanos
    assert 0 < admitted <= 500_000 + estimate
    # The old lease gave back all but what the running request holds.
    granted, held = held_everywhere(spend)
    assert row(spend)[1] == granted >= held == admitted + held_before


async def test_one_request_at_a_time_is_admitted_short(spend: SpendControl) -> None:
    snap = tenant({"period": "day", "limit_usd": 0.00005})  # 50,000 nanos
    estimate = spend.prices.bound_nanos("gpt-4o-mini", BODY, MAX_TOKENS)
    assert estimate == 21_000
    first, second, third = chat(), chat(), chat()
    a = await admit(spend, snap, first)
    await admit(spend, snap, second)
    short = await admit(spend, snap, third)  # the last that fits: 8,000 of its 21,000
    assert short.holds[0].nanos == 8_000
    finish_with_cost(spend, a, first, 100)  # a cheap answer frees most of its hold
    with pytest.raises(BudgetExceeded):  # but a second short request is not admitted
        await admit(spend, snap, chat())
    finish_with_cost(spend, short, third, 100)
    assert (await admit(spend, snap, chat())).holds[0].nanos > 0  # now it may be


async def test_a_lease_given_back_during_a_claim_is_not_held_on(spend: SpendControl) -> None:
    snap = tenant({"period": "day", "limit_usd": 1.0})
    key = ("tenant:acme", "day", datetime.now(UTC).date())

    async def retire() -> None:  # as a period's end or an idle spell would, meanwhile
        spend.budgets._retire(key, spend.budgets.leases[key])  # noqa: SLF001

    during_next_write(spend, retire)
    admission = await admit(spend, snap, chat())
    hold = admission.holds[0]
    assert not hold.lease.retired and hold.nanos > 0
    await spend.flush()
    await spend.flush()
    granted, held = held_everywhere(spend)
    assert row(spend)[1] == granted >= held == hold.nanos


async def test_writes_never_overlap_so_nothing_is_given_back_twice(spend: SpendControl) -> None:
    record = chat()
    finish_with_cost(
        spend, await admit(spend, tenant({"period": "day", "limit_usd": 1.0}), record), record, 7
    )
    make_idle(spend)
    await asyncio.gather(spend.flush(), spend.aclose())
    spent, reserved = row(spend)
    assert (spent, reserved) == (7, 0)


async def test_a_read_passes_a_used_up_hard_budget(spend: SpendControl) -> None:
    snap = tenant({"period": "day", "limit_usd": 0.000001})
    record = chat()
    finish_with_cost(spend, await admit(spend, snap, record), record, 5_000)
    await spend.flush()
    with pytest.raises(BudgetExceeded):
        await admit(spend, snap, chat())
    calls = during_next_write(spend, lambda: asyncio.sleep(0))
    read = chat(model="", method="GET", path="/v1/models")
    spend.finish(await admit(spend, snap, read), read)
    assert not calls  # no claim for a request that costs nothing


async def test_a_failed_claim_pauses_claims(spend: SpendControl) -> None:
    calls = 0

    async def failing(call: Callable[..., Any], *args: Any) -> Any:
        nonlocal calls
        calls += 1
        raise StoreUnavailable()

    spend.store.run = failing  # type: ignore[method-assign]
    snap = tenant({"period": "day", "limit_usd": 1.0})
    for _ in range(5):
        with pytest.raises(StoreUnavailable):
            await admit(spend, snap, chat())
    assert calls == 1


async def test_input_the_body_does_not_show_is_held_at_the_context_window(
    spend: SpendControl,
) -> None:
    snap = tenant({"period": "day", "limit_usd": 0.01})
    image = {
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    }
    record = chat()
    admission = await spend.admit(snap, KEY, record, image, BODY)
    assert admission is not None
    # gpt-4o-mini at the table's max_input_tokens is far over $0.01: everything is held
    assert admission.holds[0].nanos == 10_000_000
    with pytest.raises(BudgetExceeded):  # so a request beside it finds nothing left
        await admit(spend, snap, chat())
    finish_with_cost(spend, admission, record, 3_000)
    await admit(spend, snap, chat())  # what the image request did not use came back


async def test_allow_list_verdicts_are_remembered_only_when_allowed_and_short(
    spend: SpendControl,
) -> None:
    text = policy.dump(policy.PolicyIn.model_validate({"allowed_models": ["gpt-4o-mini*"]}))
    snap = TenantSnapshot("acme", "pro", "active", None, policy.parse(text))
    path = "/v1/chat/completions"
    for _ in range(2):  # the second answer comes from the remembered verdict
        spend.check_model(snap, KEY, "gpt-4o-mini", "POST", path, None)
    with pytest.raises(ModelNotAllowed):
        spend.check_model(snap, KEY, "gpt-4o", "POST", path, None)
    with pytest.raises(ModelNotAllowed):  # refusals are never remembered as allowed
        spend.check_model(snap, KEY, "gpt-4o", "POST", path, None)
    spend.check_model(snap, KEY, "gpt-4o-mini-" + "x" * 200, "POST", path, None)
    assert spend._plan(snap, KEY).allowed == {("gpt-4o-mini", "POST", path, None)}
    for i in range(300):  # a bounded memory whatever a tenant sends
        spend.check_model(snap, KEY, f"gpt-4o-mini-{i}", "POST", path, None)
    assert len(spend._plan(snap, KEY).allowed) == 256


async def _two_requests_settled(spend: SpendControl, snap: TenantSnapshot) -> Hold:
    """Two requests admitted and settled: the first claims a lease, the second holds on
    the lease its plan remembers (the path every request takes once a lease has room)."""
    for _ in range(2):
        record = chat()
        admission = await admit(spend, snap, record)
        hold = admission.holds[0]
        finish_with_cost(spend, admission, record, 1000)
    return hold


async def test_a_new_utc_day_holds_on_the_new_days_lease(spend: SpendControl) -> None:
    snap = tenant({"period": "day", "limit_usd": 1.0})
    held_today = await _two_requests_settled(spend, snap)
    today = held_today.key[2]
    tomorrow = date.fromordinal(today.toordinal() + 1)
    spend._day = (spend._day[0], tomorrow)  # the clock has passed midnight (UTC)
    hold = (await admit(spend, snap, chat())).holds[0]
    assert hold.key[2] == tomorrow and hold.lease is not held_today.lease
    assert hold.lease.used == 0  # today's spend is not counted against tomorrow


async def test_a_lease_given_back_is_never_held_on_again(spend: SpendControl) -> None:
    snap = tenant({"period": "day", "limit_usd": 1.0})
    before = await _two_requests_settled(spend, snap)
    make_idle(spend)
    late: list[Hold] = []

    async def arrive() -> None:  # while the retired lease is being written back
        late.append((await admit(spend, snap, chat())).holds[0])

    during_next_write(spend, arrive)
    await spend.flush()  # gives the idle lease back (retired); a request arrives meanwhile
    assert before.lease.retired and late
    assert not late[0].lease.retired and spend.budgets.leases[late[0].key] is late[0].lease
