"""Tests for proxy.ratelimit: RPM/TPM windows in process, in a shared Redis, and with
Redis dying and coming back (a redis-server of our own on a free loopback port).

Tests that need the machine's Redis (127.0.0.1:6379) skip when it does not answer,
unless CI=true, where that is a failure. They use a key prefix of their own and
delete only their keys afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
WINDOW_START = 1_700_000_040.0  # a minute boundary (divisible by 60)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Pin the wall clock 40 s into a minute (20 s left); tests move it by setting [0]."""
    now = [WINDOW_START + 40.0]
    monkeypatch.setattr(ratelimit, "_now", lambda: now[0])
    return now


@pytest.fixture
async def local() -> AsyncIterator[RateLimiter]:
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


def headers(ticket_or_error: Ticket | RateLimitExceeded) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in ticket_or_error.headers}


# --- in process -------------------------------------------------------------------------


async def test_no_limits_admits_without_ticket(local: RateLimiter) -> None:
    assert await local.admit([], 10) is None
    assert await local.admit([Limit("tenant:a", None, None)], 10) is None
    assert local.shared is False


async def test_rpm_exact_under_concurrency(local: RateLimiter, clock: list[float]) -> None:
    admitted = await outcomes(local, [Limit("key:k1", 50, None)], 1, 200)
    assert sum(admitted) == 50


async def test_window_turns_and_old_windows_are_dropped(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("key:k1", 2, None)]
    assert sum(await outcomes(local, limits, 1, 5)) == 2
    clock[0] = WINDOW_START + 60.0  # the next minute
    assert sum(await outcomes(local, [Limit("key:k2", 1, None)], 1, 1)) == 1
    assert set(local._local._counts) == {"key:k2"}  # the old window's counters are gone
    assert sum(await outcomes(local, limits, 1, 5)) == 2


async def test_tpm_counts_estimates(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    assert sum(await outcomes(local, limits, 300, 5)) == 3  # 900 used, 300 more is too many
    assert await local.admit(limits, 100) is not None  # exactly 1000 fits
    with pytest.raises(RateLimitExceeded) as refused:
        await local.admit(limits, 1)
    assert refused.value.type == "tokens"
    assert refused.value.message == (
        "Rate limit reached for tenant acme on tokens per min (TPM): Limit 1000, Used 1000, "
        "Requested 1. Please try again in 20s."
    )


async def test_estimate_over_whole_tpm_runs_in_empty_window(
    local: RateLimiter, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await local.admit(limits, 5000)
    assert ticket is not None and headers(ticket)["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimitExceeded):
        await local.admit(limits, 5000)


async def test_settle_lower_lets_more_in(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    tickets = [await local.admit(limits, 400) for _ in range(2)]
    with pytest.raises(RateLimitExceeded):
        await local.admit(limits, 400)
    for ticket in tickets:
        assert ticket is not None
        await local.settle(ticket, 100)  # 200 used now
    assert tickets[0] is not None
    await local.settle(tickets[0], None)  # None keeps the estimate: no change
    assert sum(await outcomes(local, limits, 400, 3)) == 2  # 200 + 800


async def test_settle_higher_and_late_settle(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", None, 1000)]
    ticket = await local.admit(limits, 10)
    assert ticket is not None
    await local.settle(ticket, 1000)  # the real count used the whole window
    with pytest.raises(RateLimitExceeded):
        await local.admit(limits, 1)
    clock[0] = WINDOW_START + 61.0
    await local.settle(ticket, 0)  # its window is gone: nothing happens, nothing raises
    assert sum(await outcomes(local, limits, 1000, 2)) == 1


async def test_multiple_scopes_are_atomic(local: RateLimiter, clock: list[float]) -> None:
    tenant = Limit("tenant:acme", 3, None)
    key_a, key_b = Limit("key:key_a", 1, None), Limit("key:key_b", 5, None)
    assert await local.admit([tenant, key_a], 1) is not None
    for _ in range(3):  # key_a refuses: the tenant's counter must not move
        with pytest.raises(RateLimitExceeded) as refused:
            await local.admit([tenant, key_a], 1)
        assert "proxy key key_a on requests per min (RPM)" in refused.value.message
    assert sum(await outcomes(local, [tenant, key_b], 1, 5)) == 2  # tenant: 1 + 2 = 3
    with pytest.raises(RateLimitExceeded) as refused:
        await local.admit([tenant, key_b], 1)
    assert "for tenant acme on requests" in refused.value.message


async def test_multiple_scopes_atomic_on_tokens(local: RateLimiter, clock: list[float]) -> None:
    tenant = Limit("tenant:acme", None, 1000)
    small = Limit("key:small", None, 100)
    assert await local.admit([small], 100) is not None  # the key's tokens used up
    with pytest.raises(RateLimitExceeded):
        await local.admit([tenant, small], 500)  # refused by the key: tenant keeps 0
    ticket = await local.admit([tenant], 1000)
    assert ticket is not None and headers(ticket)["x-ratelimit-remaining-tokens"] == "0"


async def test_headers_on_admission(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("tenant:acme", 10, 10_000), Limit("key:key_0123", 3, 50_000)]
    ticket = await local.admit(limits, 1200)
    assert ticket is not None
    assert ticket.window == int(WINDOW_START // 60) and ticket.tokens == 1200
    assert ticket.headers == (
        (b"x-ratelimit-limit-requests", b"3"),  # the key has the least requests left
        (b"x-ratelimit-remaining-requests", b"2"),
        (b"x-ratelimit-reset-requests", b"20s"),
        (b"x-ratelimit-limit-tokens", b"10000"),  # the tenant has the least tokens left
        (b"x-ratelimit-remaining-tokens", b"8800"),
        (b"x-ratelimit-reset-tokens", b"20s"),
    )
    clock[0] = WINDOW_START + 42.5
    only_rpm = await local.admit([Limit("key:other", 5, None)], 1)
    assert only_rpm is not None
    assert headers(only_rpm) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "17.5s",
    }


async def test_refusal_message_and_headers(local: RateLimiter, clock: list[float]) -> None:
    limits = [Limit("key:key_0123", 3, 1000)]
    for _ in range(3):
        await local.admit(limits, 10)
    with pytest.raises(RateLimitExceeded) as refused:
        await local.admit(limits, 10)
    error = refused.value
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
        "x-ratelimit-reset-requests": "20s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "970",
        "x-ratelimit-reset-tokens": "20s",
    }


@pytest.mark.parametrize("into_window", [0.0, 0.3, 30.0, 59.4, 59.999])
async def test_retry_after_between_1_and_60(
    local: RateLimiter, clock: list[float], into_window: float
) -> None:
    clock[0] = WINDOW_START + into_window
    limits = [Limit("key:k", 0, None)]
    with pytest.raises(RateLimitExceeded) as refused:
        await local.admit(limits, 1)
    retry_after = int(headers(refused.value)["retry-after"])
    assert 1 <= retry_after <= 60
    assert retry_after == max(1, int(-(-(60 - into_window) // 1)))
    assert 1 <= int(headers(refused.value)["retry-after-ms"]) <= 60_000


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


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    _require_shared_redis()
    prefix = f"byok-test:{uuid4().hex}:"
    yield prefix
    await delete_prefix(SHARED_REDIS, prefix)


@pytest.fixture
async def pair(prefix: str) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    """Two limiters on one Redis: two processes, as far as the counters can tell.

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
    pair: tuple[RateLimiter, RateLimiter], prefix: str, clock: list[float]
) -> None:
    limits = [Limit("tenant:acme", 30, None)]
    a, b = pair
    results = await asyncio.gather(outcomes(a, limits, 1, 50), outcomes(b, limits, 1, 50))
    assert a.shared and b.shared  # every admit was counted in Redis
    assert sum(results[0]) + sum(results[1]) == 30
    client = aioredis.Redis.from_url(SHARED_REDIS)
    try:
        key = f"{prefix}tenant:acme:{int(WINDOW_START // 60)}:r"
        assert int(await client.get(key) or 0) == 30
        assert 0 < await client.ttl(key) <= 120
        assert await client.exists(key.removesuffix(":r") + ":t") == 0  # no tpm: not counted
    finally:
        await client.aclose()


async def test_redis_tpm_settle_and_atomic_scopes(
    pair: tuple[RateLimiter, RateLimiter], prefix: str, clock: list[float]
) -> None:
    a, b = pair
    tenant = Limit("tenant:acme", 100, 1000)
    key_a, key_b = Limit("key:a", 1, None), Limit("key:b", None, 1000)
    first = await a.admit([tenant, key_a], 600)
    assert first is not None and first.in_redis
    assert headers(first)["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(RateLimitExceeded) as refused:
        await b.admit([tenant, key_a], 10)  # key_a's rpm: the tenant is not charged
    assert refused.value.type == "requests"
    with pytest.raises(RateLimitExceeded) as refused:
        await b.admit([tenant, key_b], 500)
    assert refused.value.type == "tokens"
    assert "Used 600, Requested 500" in refused.value.message
    await b.settle(first, 100)  # settled by the other process: the count is shared
    second = await b.admit([tenant, key_b], 500)
    assert second is not None
    assert headers(second)["x-ratelimit-remaining-tokens"] == "400"  # 1000 - 100 - 500
    assert headers(second)["x-ratelimit-remaining-requests"] == "98"


async def test_redis_settle_never_recreates_an_expired_window(
    pair: tuple[RateLimiter, RateLimiter], prefix: str, clock: list[float]
) -> None:
    a, _ = pair
    ticket = await a.admit([Limit("tenant:acme", None, 1000)], 10)
    assert ticket is not None
    client = aioredis.Redis.from_url(SHARED_REDIS)
    try:
        key = f"{prefix}tenant:acme:{ticket.window}:t"
        assert int(await client.get(key) or 0) == 10
        await client.delete(key)  # as if it had expired
        await a.settle(ticket, 500)
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


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
            assert await client.get(f"t:key:k:{ticket.window}:r") == b"1"
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
