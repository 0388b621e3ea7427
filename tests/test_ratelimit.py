"""Tests for proxy.ratelimit: token buckets in process (on a fake clock), in a shared
Redis (on Redis's clock), and with Redis dying and coming back (a redis-server of our
own on a free loopback port).

Tests that need the machine's Redis (127.0.0.1:6379) skip when it does not answer,
unless CI=true, where that is a failure. They use a key prefix of their own and
delete only their keys afterwards. Redis's clock cannot be stopped, so those tests
allow for what a bucket drains in the time they measure themselves taking.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from servers import free_port

from proxy import ratelimit
from proxy.config import RateLimitConfig
from proxy.errors import RateLimiterUnavailable, RateLimitExceeded
from proxy.ratelimit import Limit, RateLimiter, Ticket, format_duration

SHARED_REDIS = "redis://127.0.0.1:6379/0"
START = 1000.0  # the fake clock's start (seconds; the per-process buckets use a monotonic clock)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock for the per-process buckets; tests move it by setting [0]."""
    now = [START]
    monkeypatch.setattr(ratelimit, "_now", lambda: now[0])
    return now


@pytest.fixture
async def local(clock: list[float]) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(RateLimitConfig())
    yield limiter
    await limiter.aclose()


async def outcomes(limiter: RateLimiter, limits: list[Limit], tokens: int, n: int) -> list[bool]:
    """Run `n` admits at once; True for each one admitted."""

    async def one() -> bool:
        try:
            return await limiter.admit(limits, tokens) is not None
        except RateLimitExceeded:
            return False

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def refused(limiter: RateLimiter, limits: list[Limit], tokens: int) -> RateLimitExceeded:
    """The refusal of one more request (failing the test if it is admitted)."""
    with pytest.raises(RateLimitExceeded) as info:
        await limiter.admit(limits, tokens)
    return info.value


def headers(ticket_or_error: Ticket | RateLimitExceeded | None) -> dict[str, str]:
    assert ticket_or_error is not None
    return {k.decode(): v.decode() for k, v in ticket_or_error.headers}


# --- in process -------------------------------------------------------------------------


async def test_no_limits_admits_without_ticket(local: RateLimiter) -> None:
    assert await local.admit([], 10) is None
    assert await local.admit([Limit("tenant:a", None, None)], 10) is None
    assert local.shared is False


async def test_burst_of_rpm_then_refused_under_concurrency(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("key:k1", 50, None)]
    assert sum(await outcomes(local, limits, 1, 200)) == 50
    error = await refused(local, limits, 1)
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.message == (
        "Rate limit reached for proxy key k1 on requests per min (RPM): Limit 50, Used 50, "
        "Requested 1. Please try again in 1.2s."
    )


@pytest.mark.parametrize("rpm", [6, 7, 50, 600])
async def test_refill_after_60_over_rpm_lets_exactly_one_more_in(
    local: RateLimiter, clock: list[float], rpm: int
) -> None:
    limits = [Limit("key:k", rpm, None)]
    assert sum(await outcomes(local, limits, 1, rpm + 5)) == rpm
    clock[0] = START + 60 / rpm - 0.001
    await refused(local, limits, 1)
    clock[0] = START + 60 / rpm  # exactly one request has drained
    assert sum(await outcomes(local, limits, 1, 5)) == 1
    clock[0] = START + 3 * 60 / rpm  # two more
    assert sum(await outcomes(local, limits, 1, 5)) == 2


async def test_sustained_rate_and_at_most_two_rpm_in_any_minute(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", 10, None)]
    admitted: list[float] = []
    for step in range(3600):  # every 50 ms for three minutes, requests until one is refused
        clock[0] = START + step * 0.05
        while True:
            try:
                await local.admit(limits, 1)
            except RateLimitExceeded:
                break
            admitted.append(step * 0.05)
    assert admitted[:10] == [0.0] * 10  # the burst
    busiest = max(sum(t <= s < t + 60 for s in admitted) for t in admitted)
    assert busiest == 19  # the burst, then one every 6 s: never over 2 x rpm
    assert sum(60 <= s < 180 for s in admitted) == 20  # sustained: rpm per minute


async def test_retry_after_is_the_time_until_the_request_fits(
    local: RateLimiter, clock: list[float]
) -> None:
    fast = [Limit("key:fast", 60, None)]
    assert sum(await outcomes(local, fast, 1, 60)) == 60
    error = await refused(local, fast, 1)
    assert (headers(error)["retry-after"], headers(error)["retry-after-ms"]) == ("1", "1000")
    clock[0] = START + 0.25
    error = await refused(local, fast, 1)
    assert (headers(error)["retry-after"], headers(error)["retry-after-ms"]) == ("1", "750")
    assert error.message.endswith("Please try again in 750ms.")

    slow = [Limit("key:slow", 3, None)]
    clock[0] = START
    assert sum(await outcomes(local, slow, 1, 3)) == 3
    clock[0] = START + 12.5
    error = await refused(local, slow, 1)
    assert (headers(error)["retry-after"], headers(error)["retry-after-ms"]) == ("8", "7500")

    tokens = [Limit("tenant:t", None, 600)]  # drains 10 tokens a second
    assert await local.admit(tokens, 600) is not None
    error = await refused(local, tokens, 100)
    assert error.type == "tokens"
    assert (headers(error)["retry-after"], headers(error)["retry-after-ms"]) == ("10", "10000")


async def test_refusal_names_the_bucket_waited_for_longest(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", 2, 1000)]
    assert sum(await outcomes(local, limits, 495, 2)) == 2  # requests full, 990 tokens
    error = await refused(local, limits, 1000)  # requests: 30 s; tokens: 59.4 s
    assert error.type == "tokens"
    assert error.message == (
        "Rate limit reached for tenant acme on tokens per min (TPM): Limit 1000, Used 990, "
        "Requested 1000. Please try again in 59.4s."
    )
    assert headers(error)["retry-after"] == "60"
    assert headers(error)["retry-after-ms"] == "59400"


async def test_headers_on_admission(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", 10, 10_000), Limit("key:key_0123", 3, 50_000)]
    ticket = await local.admit(limits, 1200)
    assert ticket is not None and ticket.tokens == 1200 and not ticket.in_redis
    assert ticket.headers == (
        (b"x-ratelimit-limit-requests", b"3"),  # the key has the least requests left
        (b"x-ratelimit-remaining-requests", b"2"),
        (b"x-ratelimit-reset-requests", b"20s"),  # until its bucket is empty again
        (b"x-ratelimit-limit-tokens", b"10000"),  # the tenant has the least tokens left
        (b"x-ratelimit-remaining-tokens", b"8800"),
        (b"x-ratelimit-reset-tokens", b"7.2s"),
    )
    clock[0] = START + 10  # the key's bucket: 1 - 0.5 drained, + 1
    again = await local.admit(limits, 1)
    assert headers(again)["x-ratelimit-remaining-requests"] == "1"  # floor(3 - 1.5)
    assert headers(again)["x-ratelimit-reset-requests"] == "30s"
    only_rpm = await local.admit([Limit("key:other", 5, None)], 1)
    assert headers(only_rpm) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12s",
    }


async def test_refusal_message_and_headers(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("key:key_0123", 3, 1000)]
    for _ in range(3):
        await local.admit(limits, 10)
    error = await refused(local, limits, 10)
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert error.message == (
        "Rate limit reached for proxy key key_0123 on requests per min (RPM): Limit 3, "
        "Used 3, Requested 1. Please try again in 20s."
    )
    assert headers(error) == {
        "retry-after": "20",
        "retry-after-ms": "20000",
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "970",
        "x-ratelimit-reset-tokens": "1.8s",
    }


async def test_tpm_counts_estimates(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    assert sum(await outcomes(local, limits, 300, 5)) == 3  # 900 used, 300 more is too many
    assert await local.admit(limits, 100) is not None  # exactly 1000 fits
    error = await refused(local, limits, 1)
    assert error.type == "tokens"
    assert error.message == (
        "Rate limit reached for tenant acme on tokens per min (TPM): Limit 1000, Used 1000, "
        "Requested 1. Please try again in 60ms."
    )
    assert headers(error)["x-ratelimit-remaining-tokens"] == "0"
    assert headers(error)["x-ratelimit-reset-tokens"] == "1m0s"


async def test_estimate_over_whole_tpm_runs_on_an_empty_bucket(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await local.admit(limits, 5000)
    assert headers(ticket)["x-ratelimit-remaining-tokens"] == "0"
    error = await refused(local, limits, 5000)
    assert "Requested 1000. Please try again in 1m0s." in error.message
    clock[0] = START + 60
    assert await local.admit(limits, 5000) is not None


async def test_settle_lower_lets_more_in(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    tickets = [await local.admit(limits, 400) for _ in range(2)]
    await refused(local, limits, 400)
    for ticket in tickets:
        assert ticket is not None
        await local.settle(ticket, 100)  # 200 in the bucket now
    assert tickets[0] is not None
    await local.settle(tickets[0], None)  # None keeps the estimate: no change
    assert sum(await outcomes(local, limits, 400, 3)) == 2  # 200 + 800


async def test_late_settle_is_still_applied(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await local.admit(limits, 10)
    assert ticket is not None
    clock[0] = START + 120  # long drained (and swept on the next admit)
    assert await local.admit([Limit("tenant:other", 1, None)], 1) is not None
    await local.settle(ticket, 1000)  # the stream ended: 990 more than estimated
    error = await refused(local, limits, 20)
    assert "Used 990, Requested 20" in error.message
    second = await local.admit(limits, 10)  # full
    assert second is not None
    await local.settle(second, 1010)  # 1000 more: past full, the next request waits longer
    error = await refused(local, limits, 1)
    assert "Used 2000, Requested 1. Please try again in 1m0.06s." in error.message
    assert headers(error)["retry-after"] == "61"
    assert headers(error)["x-ratelimit-remaining-tokens"] == "0"
    assert headers(error)["x-ratelimit-reset-tokens"] == "2m0s"


async def test_settle_never_takes_a_bucket_below_empty(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await local.admit(limits, 500)
    assert ticket is not None
    clock[0] = START + 30  # drained to empty
    await local.settle(ticket, 0)  # 500 less, but not below zero
    assert await local.admit(limits, 1000) is not None
    await refused(local, limits, 1)


async def test_multiple_scopes_are_atomic(local: RateLimiter, clock: list[float]) -> None:
    tenant = Limit("tenant:acme", 3, None)
    key_a, key_b = Limit("key:key_a", 1, None), Limit("key:key_b", 5, None)
    assert await local.admit([tenant, key_a], 1) is not None
    for _ in range(3):  # key_a refuses: the tenant's bucket must not fill
        error = await refused(local, [tenant, key_a], 1)
        assert "proxy key key_a on requests per min (RPM)" in error.message
    assert sum(await outcomes(local, [tenant, key_b], 1, 5)) == 2  # tenant: 1 + 2 = 3
    error = await refused(local, [tenant, key_b], 1)
    assert "for tenant acme on requests" in error.message


async def test_multiple_scopes_atomic_on_tokens(local: RateLimiter, clock: list[float]) -> None:
    tenant = Limit("tenant:acme", None, 1000)
    small = Limit("key:small", None, 100)
    assert await local.admit([small], 100) is not None  # the key's tokens used up
    await refused(local, [tenant, small], 500)  # refused by the key: the tenant keeps 0
    ticket = await local.admit([tenant], 1000)
    assert headers(ticket)["x-ratelimit-remaining-tokens"] == "0"


async def test_idle_buckets_are_dropped(local: RateLimiter, clock: list[float]) -> None:
    await local.admit([Limit("tenant:a", 5, 100), Limit("key:b", 5, None)], 10)
    clock[0] = START + ratelimit.SWEEP_SECONDS + 1
    await local.admit([Limit("tenant:c", 5, None)], 10)
    assert [set(buckets) for buckets in local._local._dims] == [{"tenant:c"}, set()]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (0.0004, "0s"),
        (1, "1s"),
        (17.5, "17.5s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- the machine's Redis, shared by two limiters ------------------------------------------


def _require_shared_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(SHARED_REDIS, socket_timeout=1, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis required (CI=true) but unreachable at {SHARED_REDIS}: {exc!r}")
        pytest.skip(f"no Redis answering at {SHARED_REDIS} (set CI=true to make this a failure)")


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete this test's keys (SCAN on its own prefix; nothing else is touched)."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def drained(cap: int, since: float) -> int:
    """The most a bucket of `cap` a minute can have drained since `since` (monotonic), in
    whole units: what Redis's running clock may let in beyond a burst."""
    return math.floor(cap * (time.monotonic() - since) / 60)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    _require_shared_redis()
    prefix = f"byok-test:{uuid4().hex}:"
    yield prefix
    await delete_prefix(SHARED_REDIS, prefix)


@pytest.fixture
async def redis_client(prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(SHARED_REDIS)
    yield client
    await client.aclose()


@pytest.fixture
async def pair(prefix: str) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    """Two limiters on one Redis: two processes, as far as the buckets can tell.

    A generous timeout: a burst of first calls on a busy machine must not trip the
    breaker (these tests are about atomicity, not faults); none may have tripped."""
    config = RateLimitConfig(redis_url=SHARED_REDIS, key_prefix=prefix, redis_timeout=10.0)
    events: list[bool] = []
    limiters = (RateLimiter(config, events.append), RateLimiter(config, events.append))
    yield limiters
    assert events == [], "a limiter lost Redis during the test"
    for limiter in limiters:
        await limiter.aclose()


async def test_redis_rpm_exact_across_two_limiters(
    pair: tuple[RateLimiter, RateLimiter],
    prefix: str,
    redis_client: aioredis.Redis,
    clock: list[float],
) -> None:
    limits = [Limit("tenant:acme", 50, None)]
    a, b = pair
    started = time.monotonic()
    results = await asyncio.gather(outcomes(a, limits, 1, 100), outcomes(b, limits, 1, 100))
    admitted = sum(results[0]) + sum(results[1])
    assert a.shared and b.shared  # every admit was counted in Redis
    assert 50 <= admitted <= 50 + drained(50, started)  # one bucket between the two
    key = f"{prefix}tenant:acme:r"
    level, stamp = await redis_client.hmget(key, ["l", "t"])
    assert 0 < float(level) <= 50 + 50 * ratelimit.SLACK
    seconds, micros = await redis_client.time()  # stamped on Redis's clock, not ours
    assert abs(seconds * 1_000_000 + micros - int(stamp)) < 30_000_000
    assert 0 < await redis_client.pttl(key) <= 61_000  # a second after it would be empty
    assert await redis_client.exists(f"{prefix}tenant:acme:t") == 0  # no tpm: no bucket


async def test_redis_refill_and_retry_after(
    pair: tuple[RateLimiter, RateLimiter], prefix: str
) -> None:
    a, b = pair
    limits = [Limit("key:k", 60, None)]  # a request drains every second
    for _ in range(5):  # (a machine so slow that a second passes in between: again)
        await outcomes(a, limits, 1, 80)  # the bucket is full
        try:
            await b.admit(limits, 1)
        except RateLimitExceeded as exc:
            error = exc
            break
    else:
        pytest.fail("a full bucket admitted a request, five times")
    wait_ms = int(headers(error)["retry-after-ms"])
    assert 0 < wait_ms <= 1000 and headers(error)["retry-after"] == "1"
    assert headers(error)["x-ratelimit-remaining-requests"] == "0"
    await asyncio.sleep(wait_ms / 1000)
    assert await b.admit(limits, 1) is not None  # told when it fits, and it does


async def test_redis_tpm_settle_and_atomic_scopes(
    pair: tuple[RateLimiter, RateLimiter], prefix: str
) -> None:
    a, b = pair
    tenant = Limit("tenant:acme", 100, 1000)
    key_a, key_b = Limit("key:a", 1, None), Limit("key:b", None, 1000)
    started = time.monotonic()
    first = await a.admit([tenant, key_a], 900)
    assert first is not None and first.in_redis
    assert headers(first)["x-ratelimit-remaining-tokens"] == "100"
    error = await refused(b, [tenant, key_a], 10)  # key_a's rpm: the tenant is not charged
    assert error.type == "requests"
    error = await refused(b, [tenant, key_b], 500)
    assert error.type == "tokens"
    used = re.search(r"Used (\d+), Requested 500", error.message)
    assert used is not None and 900 - drained(1000, started) - 1 <= int(used[1]) <= 900
    await b.settle(first, 100)  # settled by the other process: the bucket is shared
    second = await b.admit([tenant, key_b], 500)
    remaining = int(headers(second)["x-ratelimit-remaining-tokens"])
    assert 400 <= remaining <= 400 + drained(1000, started)  # 1000 - 100 - 500
    assert (
        98 <= int(headers(second)["x-ratelimit-remaining-requests"]) <= 98 + drained(100, started)
    )


async def test_redis_late_settle_is_still_applied(
    pair: tuple[RateLimiter, RateLimiter], prefix: str, redis_client: aioredis.Redis
) -> None:
    a, b = pair
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await a.admit(limits, 10)
    assert ticket is not None
    key = f"{prefix}tenant:acme:t"
    await redis_client.delete(key)  # as if it had drained and expired
    await a.settle(ticket, 0)  # less than estimated, on an empty bucket: nothing to store
    assert await redis_client.exists(key) == 0
    started = time.monotonic()
    await a.settle(ticket, 910)  # 900 more than estimated, however late
    level = float(await redis_client.hget(key, "l") or 0)
    assert 900 - drained(1000, started) - 1 <= level <= 900
    assert 0 < await redis_client.pttl(key) <= 55_000  # a second after it would be empty
    await refused(b, limits, 600)


# --- Redis dying and coming back ----------------------------------------------------------


class RedisServer:
    """A redis-server process of our own on a loopback port (with a password, so the
    tests can check it never reaches a log line), stopped by its PID."""

    password = "hunter2-secret"

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--save", "", "--appendonly", "no"]
            + ["--bind", "127.0.0.1", "--requirepass", self.password],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    await client.ping()
                    return
                except (aioredis.RedisError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server required (CI=true) but not installed")
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port())
    try:
        yield server
    finally:
        server.kill()


class ConnectCounter:
    """Counts connection attempts of every redis.asyncio connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = aioredis.connection.AbstractConnection.connect

        async def connect(conn: aioredis.connection.AbstractConnection) -> None:
            self.count += 1
            await original(conn)

        monkeypatch.setattr(aioredis.connection.AbstractConnection, "connect", connect)


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_redis_down_and_back(
    own_redis: RedisServer,
    fail_open: bool,
    clock: list[float],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="byok.ratelimit")
    await own_redis.start()
    events: list[bool] = []
    config = RateLimitConfig(redis_url=own_redis.url, fail_open=fail_open, key_prefix="t:")
    limiter = RateLimiter(config, on_backend=events.append)
    limits = [Limit("key:k", 5, None)]
    try:
        for _ in range(3):
            ticket = await limiter.admit(limits, 1)
            assert ticket is not None and ticket.in_redis
        assert limiter.shared and events == []

        own_redis.kill()
        killed_at = time.monotonic()
        if fail_open:
            ticket = await limiter.admit(limits, 1)  # counted in this process now
            assert ticket is not None and not ticket.in_redis
        else:
            with pytest.raises(RateLimiterUnavailable):
                await limiter.admit(limits, 1)
        assert events == [False] and not limiter.shared
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        then = "counting per process" if fail_open else "refusing requests"
        assert warnings[0].getMessage() == (
            f"rate limiter: Redis unreachable (ConnectionError); {then} until it is back"
        )
        assert "hunter2" not in caplog.text and "127.0.0.1" not in caplog.text

        # While the breaker is open, Redis is not even tried.
        connects = ConnectCounter(monkeypatch)
        started = time.monotonic()
        for _ in range(20):
            try:
                await limiter.admit([Limit("key:other", 1000, None)], 1)
            except RateLimiterUnavailable:
                assert not fail_open
        assert time.monotonic() - killed_at < ratelimit.BREAKER_SECONDS  # still open
        assert connects.count == 0
        assert time.monotonic() - started < 0.5  # loose: no timeouts were waited for
        if fail_open:  # counted per process from zero, and enforced: 1 + 4 = 5
            assert sum(await outcomes(limiter, limits, 1, 6)) == 4
        assert events == [False] and len(caplog.records) == 1

        await own_redis.start()
        deadline = time.monotonic() + 10
        while events[-1] is False:  # probe until the breaker lets one through
            assert time.monotonic() < deadline, "the limiter never went back to Redis"
            try:
                await limiter.admit([Limit("key:probe", 1000, None)], 1)
            except RateLimiterUnavailable:
                assert not fail_open
            await asyncio.sleep(0.02)
        assert time.monotonic() - killed_at >= ratelimit.BREAKER_SECONDS
        assert events == [False, True] and limiter.shared
        assert "Redis is back" in caplog.records[-1].getMessage()

        ticket = await limiter.admit(limits, 1)  # the new, empty Redis counts again
        assert ticket is not None and ticket.in_redis
        assert headers(ticket)["x-ratelimit-remaining-requests"] == "4"
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            assert float(await client.hget("t:key:k:r", "l") or 0) == 1.0
        finally:
            await client.aclose()
    finally:
        await limiter.aclose()
        own_redis.kill()


async def test_redis_unreachable_from_start_fails_fast(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    events: list[bool] = []
    config = RateLimitConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.2)
    limiter = RateLimiter(config, on_backend=events.append)
    try:
        assert sum(await outcomes(limiter, [Limit("key:k", 3, None)], 1, 10)) == 3
        assert events == [False]
    finally:
        await limiter.aclose()


async def test_settle_on_a_drained_bucket_counts_from_empty(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await local.admit(limits, 500)
    assert ticket is not None
    clock[0] = START + 40  # drained past empty (it would be -166 tokens), not swept yet
    await local.settle(ticket, 900)  # 400 more than estimated: from empty, 400 in it
    after = await local.admit(limits, 1)
    assert headers(after)["x-ratelimit-remaining-tokens"] == "599"
