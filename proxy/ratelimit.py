"""Requests and tokens per minute (RPM, TPM) for a tenant and a proxy key.

Windows: counters live in fixed one-minute windows, the UTC unix minute
(`int(time.time()) // 60`); every counter starts again at zero when the minute
turns. A request is admitted only if, for every `Limit` it falls under, the
requests already counted are below `rpm` and the tokens counted plus its
estimate are within `tpm` (an estimate bigger than the whole `tpm` counts as
`tpm`, so such a request can still run in an empty window). Only the
dimensions that have a limit are counted. Once the response is known,
`settle` replaces the estimate with the real count.

Atomicity: `admit` checks and increments every scope at once, or none of them
(a refused request costs no scope anything). With Redis this is one Lua script
per request, so however many tasks, workers and replicas share the server, a
window never admits more than `rpm`. In process there is no `await` between
the check and the increment, which on one event loop is the same guarantee.

Where the counters live: in Redis when `REDIS_URL` is set (keys
`{key_prefix}{scope}:{window}:r` and `:t`, expiring after two minutes), shared
by every worker and replica. Without Redis they are counted per process: with
N workers a tenant may get up to N times its limits.

Redis down: any Redis error opens a breaker for one second, during which
Redis is not tried at all (a dead Redis costs callers nothing), after which
one request probes it again. While it is down, fail open
(`rate_limits.fail: open`) counts per process as if there were no Redis;
fail closed refuses with 503 `rate_limiter_unavailable`. Going down and
coming back are logged once each and reported to `on_backend`.

Refusals are OpenAI's: 429 with `type` `requests` or `tokens`, `Retry-After`
(seconds until the window ends) and the `x-ratelimit-*` headers, which
admitted responses carry too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config import RateLimitConfig
from proxy.errors import RateLimiterUnavailable, RateLimitExceeded

log = logging.getLogger("byok.ratelimit")

WINDOW_SECONDS = 60
KEY_TTL_SECONDS = 120  # a window's keys outlive it, so a late settle still finds them
BREAKER_SECONDS = 1.0  # after a Redis failure, how long before Redis is tried again
REDIS_ERRORS = (RedisError, OSError)  # OSError covers TimeoutError and socket errors

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Limit:
    """The per-minute limits of one scope; None means no limit on that dimension."""

    scope: str  # e.g. "tenant:acme" or "key:key_0123"
    rpm: int | None  # requests per minute, None = no limit
    tpm: int | None  # tokens per minute, None = no limit


@dataclass(slots=True)
class Ticket:
    """What admit() granted; settle() corrects its token count."""

    window: int  # the minute it was counted in (unix time // 60)
    limits: tuple[Limit, ...]
    tokens: int  # tokens counted at admission (the estimate)
    headers: Headers  # x-ratelimit-* to add to the response
    in_redis: bool = False  # counted in Redis (else in this process): settle goes there too


@dataclass(frozen=True, slots=True)
class _Usage:
    """One scope's counters in the window, as read before this request."""

    requests: int
    tokens: int


def _now() -> float:
    """The wall clock (UTC unix seconds); windows must agree across processes."""
    return time.time()


def _cost(limit: Limit, tokens: int) -> int:
    """Tokens this request counts against `limit`: the estimate, capped at its tpm."""
    return tokens if limit.tpm is None else min(tokens, limit.tpm)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go style): 20ms, 1s, 17.5s, 6m0s."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _describe(scope: str) -> str:
    """A scope as a message names it: 'tenant acme', 'proxy key key_0123'."""
    kind, _, name = scope.partition(":")
    if kind == "tenant" and name:
        return f"tenant {name}"
    if kind == "key" and name:
        return f"proxy key {name}"
    return scope


def _headers(
    limits: Sequence[Limit], usage: Sequence[_Usage], left: float, extra: Sequence[int] = ()
) -> Headers:
    """The x-ratelimit-* headers: per dimension, the scope with the least remaining.

    `extra` is what this request added to each scope (its cost) when admitted."""
    reset = format_duration(left).encode()
    out: list[tuple[bytes, bytes]] = []
    for dim in ("requests", "tokens"):
        best: tuple[int, int] | None = None  # (remaining, limit)
        for i, (limit, used) in enumerate(zip(limits, usage, strict=True)):
            cap = limit.rpm if dim == "requests" else limit.tpm
            if cap is None:
                continue
            taken = used.requests if dim == "requests" else used.tokens
            if extra:
                taken += 1 if dim == "requests" else extra[i]
            remaining = max(0, cap - taken)
            if best is None or remaining < best[0]:
                best = (remaining, cap)
        if best is not None:
            out.append((f"x-ratelimit-limit-{dim}".encode(), str(best[1]).encode()))
            out.append((f"x-ratelimit-remaining-{dim}".encode(), str(best[0]).encode()))
            out.append((f"x-ratelimit-reset-{dim}".encode(), reset))
    return tuple(out)


def _refusal(
    limits: Sequence[Limit], usage: Sequence[_Usage], index: int, kind: str, cost: int, left: float
) -> RateLimitExceeded:
    """The 429 for `limits[index]` refusing on `kind` ('requests' or 'tokens')."""
    limit, used = limits[index], usage[index]
    if kind == "requests":
        what, cap, taken, asked = "requests per min (RPM)", limit.rpm, used.requests, 1
    else:
        what, cap, taken, asked = "tokens per min (TPM)", limit.tpm, used.tokens, cost
    message = (
        f"Rate limit reached for {_describe(limit.scope)} on {what}: Limit {cap}, "
        f"Used {taken}, Requested {asked}. Please try again in {format_duration(left)}."
    )
    retry = (
        (b"retry-after", str(max(1, math.ceil(left))).encode()),
        (b"retry-after-ms", str(max(1, math.ceil(left * 1000))).encode()),
    )
    return RateLimitExceeded(message, kind, retry + _headers(limits, usage, left))


@dataclass(frozen=True, slots=True)
class _Refused:
    """Which limit refused (its index in the limits) and on what."""

    index: int
    kind: str  # "requests" or "tokens"


_Outcome = tuple[list[_Usage], _Refused | None]  # usage before this request, and any refusal


class _LocalCounters:
    """Counters of the current window in this process; older windows are dropped."""

    def __init__(self) -> None:
        self._window = -1
        self._counts: dict[str, list[int]] = {}  # scope -> [requests, tokens]

    def _roll(self, window: int) -> None:
        if window > self._window:
            self._window = window
            self._counts = {}

    def admit(self, window: int, limits: Sequence[Limit], tokens: int) -> _Outcome:
        """Check every limit, then count in all of them (no await: atomic on one loop)."""
        self._roll(window)
        usage = [_Usage(*self._counts.get(limit.scope, (0, 0))) for limit in limits]
        refused = _first_refusal(limits, usage, tokens)
        if refused is not None:
            return usage, refused
        for limit in limits:
            counts = self._counts.setdefault(limit.scope, [0, 0])
            if limit.rpm is not None:
                counts[0] += 1
            if limit.tpm is not None:
                counts[1] += _cost(limit, tokens)
        return usage, None

    def settle(self, window: int, limits: Sequence[Limit], deltas: Sequence[int]) -> None:
        """Add `deltas` to the token counters, if the window is still the current one."""
        if window != self._window:
            return
        for limit, delta in zip(limits, deltas, strict=True):
            counts = self._counts.get(limit.scope)
            if counts is not None and limit.tpm is not None:
                counts[1] += delta


def _first_refusal(
    limits: Sequence[Limit], usage: Sequence[_Usage], tokens: int
) -> _Refused | None:
    """The first limit this request would break, checking requests before tokens."""
    for i, (limit, used) in enumerate(zip(limits, usage, strict=True)):
        if limit.rpm is not None and used.requests >= limit.rpm:
            return _Refused(i, "requests")
        if limit.tpm is not None and used.tokens + _cost(limit, tokens) > limit.tpm:
            return _Refused(i, "tokens")
    return None


# KEYS: per limit, its requests key then its tokens key.
# ARGV: ttl, then per limit: rpm, tpm, cost (-1 = no limit on that dimension).
# Returns {0 or refusing index (1-based), 0 ok / 1 requests / 2 tokens, r1, t1, r2, t2, ...}
# with the counters as read before this request.
_ADMIT_LUA = """
local ttl = tonumber(ARGV[1])
local n = #KEYS / 2
local out = {0, 0}
for i = 1, n do
  out[1 + 2 * i] = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  out[2 + 2 * i] = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
end
for i = 1, n do
  local rpm = tonumber(ARGV[3 * i - 1])
  local tpm = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  if rpm >= 0 and out[1 + 2 * i] >= rpm then
    out[1] = i; out[2] = 1; return out
  end
  if tpm >= 0 and out[2 + 2 * i] + cost > tpm then
    out[1] = i; out[2] = 2; return out
  end
end
for i = 1, n do
  if tonumber(ARGV[3 * i - 1]) >= 0 then
    redis.call('INCR', KEYS[2 * i - 1])
    redis.call('EXPIRE', KEYS[2 * i - 1], ttl)
  end
  if tonumber(ARGV[3 * i]) >= 0 then
    redis.call('INCRBY', KEYS[2 * i], ARGV[3 * i + 1])
    redis.call('EXPIRE', KEYS[2 * i], ttl)
  end
end
return out
"""

# KEYS: token counters; ARGV: the delta for each. An expired window is not recreated.
_SETTLE_LUA = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[i])
  end
end
return 0
"""


class RateLimiter:
    """Admits requests under their scopes' RPM/TPM, in Redis or in this process."""

    def __init__(
        self, config: RateLimitConfig, on_backend: Callable[[bool], None] | None = None
    ) -> None:
        self._config = config
        self._on_backend = on_backend
        self._local = _LocalCounters()
        self._redis: aioredis.Redis | None = None
        self._healthy = True  # Redis answered last time (or was never tried)
        self._retry_at = 0.0  # monotonic time before which Redis is not tried
        if config.redis_url:
            # No client-side retries: the breaker decides when Redis is tried again.
            self._redis = aioredis.Redis.from_url(
                config.redis_url,
                socket_timeout=config.redis_timeout,
                socket_connect_timeout=config.redis_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._admit_script = self._redis.register_script(_ADMIT_LUA)
            self._settle_script = self._redis.register_script(_SETTLE_LUA)

    @property
    def shared(self) -> bool:
        """True when counting in Redis (shared by every process), False when per process."""
        return self._redis is not None and self._healthy

    async def admit(self, limits: Sequence[Limit], tokens: int) -> Ticket | None:
        """Count one request of `tokens` (an estimate) in every scope, or refuse it.

        Returns None when nothing limits it; raises RateLimitExceeded (429) or, with
        Redis down and fail closed, RateLimiterUnavailable (503)."""
        active = tuple(lim for lim in limits if lim.rpm is not None or lim.tpm is not None)
        if not active:
            return None
        tokens = max(0, tokens)
        now = _now()
        window = int(now // WINDOW_SECONDS)
        left = (window + 1) * WINDOW_SECONDS - now
        outcome: _Outcome | None = None
        in_redis = False
        if self._try_redis():
            try:
                outcome = await self._admit_redis(window, active, tokens)
                in_redis = True
                self._redis_ok()
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
        if outcome is None:
            if self._redis is not None and not self._config.fail_open:
                raise RateLimiterUnavailable()
            outcome = self._local.admit(window, active, tokens)
        usage, refused = outcome
        if refused is not None:
            cost = _cost(active[refused.index], tokens)
            raise _refusal(active, usage, refused.index, refused.kind, cost, left)
        costs = [_cost(lim, tokens) for lim in active]
        return Ticket(window, active, tokens, _headers(active, usage, left, costs), in_redis)

    async def settle(self, ticket: Ticket, actual_tokens: int | None) -> None:
        """Replace the ticket's estimate by `actual_tokens` in its window; never raises."""
        if actual_tokens is None:
            return
        actual = max(0, actual_tokens)
        limits = [lim for lim in ticket.limits if lim.tpm is not None]
        deltas = [actual - _cost(lim, ticket.tokens) for lim in limits]
        if not any(deltas):
            return
        if not ticket.in_redis:
            self._local.settle(ticket.window, limits, deltas)
            return
        if not self._try_redis():
            return  # Redis is down: that correction is lost, the window ends soon anyway
        keys = [self._key(lim.scope, ticket.window, "t") for lim in limits]
        try:
            await self._settle_script(keys=keys, args=deltas)
            self._redis_ok()
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
        except Exception:  # settle runs after the response: never let it raise
            log.exception("rate limiter: settling tokens failed")

    async def aclose(self) -> None:
        """Close the Redis connection pool (if any)."""
        if self._redis is not None:
            await self._redis.aclose()

    async def _admit_redis(self, window: int, limits: tuple[Limit, ...], tokens: int) -> _Outcome:
        keys: list[str] = []
        args: list[int] = [KEY_TTL_SECONDS]
        for lim in limits:
            keys += [self._key(lim.scope, window, "r"), self._key(lim.scope, window, "t")]
            args += [
                -1 if lim.rpm is None else lim.rpm,
                -1 if lim.tpm is None else lim.tpm,
                _cost(lim, tokens),
            ]
        reply: list[Any] = await self._admit_script(keys=keys, args=args)
        counts = [int(x) for x in reply[2:]]
        usage = [_Usage(counts[2 * i], counts[2 * i + 1]) for i in range(len(limits))]
        index, kind = int(reply[0]), int(reply[1])
        if index:
            return usage, _Refused(index - 1, "requests" if kind == 1 else "tokens")
        return usage, None

    def _key(self, scope: str, window: int, dim: str) -> str:
        return f"{self._config.key_prefix}{scope}:{window}:{dim}"

    def _try_redis(self) -> bool:
        """Whether to call Redis now: configured, and the breaker closed or due a probe."""
        if self._redis is None:
            return False
        if self._healthy:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + BREAKER_SECONDS  # this call probes; the others keep away
        return True

    def _redis_failed(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + BREAKER_SECONDS
        if not self._healthy:
            return
        self._healthy = False
        then = "counting per process" if self._config.fail_open else "refusing requests"
        # Only the exception's type: its text may carry the URL and its password.
        log.warning(
            "rate limiter: Redis unreachable (%s); %s until it is back", type(exc).__name__, then
        )
        if self._on_backend is not None:
            self._on_backend(False)

    def _redis_ok(self) -> None:
        if self._healthy:
            return
        self._healthy = True
        log.warning("rate limiter: Redis is back; counting in Redis again")
        if self._on_backend is not None:
            self._on_backend(True)
