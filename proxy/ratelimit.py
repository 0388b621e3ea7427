"""Requests and tokens per minute (RPM, TPM) for a tenant and a proxy key, as token buckets.

The algorithm is OpenAI's (GCRA, the "leaky bucket as a meter"): each scope has a
bucket per limited dimension that holds at most `rpm` requests (`tpm` tokens) and
drains continuously at rpm/60 (tpm/60) a second. A request costs 1 in the requests
bucket and its token estimate in the tokens bucket (an estimate over the whole `tpm`
counts as `tpm`, so such a request can still run on an empty bucket), and is
admitted only if every bucket it falls under has room for that. `settle` adds the
real token count minus the estimate whenever the response ends (never below empty;
more than estimated may take the bucket past full: later requests wait it out).

The bound: at most `rpm` requests in a burst and `rpm` a minute sustained, so in any
60 s at most 2 x rpm (a full bucket plus 60 s of drain), as with OpenAI; likewise
for tokens. A refusal says when this request would fit (`Retry-After`,
`retry-after-ms`; at rpm 60 a second at most), so the SDKs' own retry can wait it.

Atomicity: `admit` checks every bucket of every scope, then adds to all of them or
to none (a refused request costs no scope anything). With Redis that is one Lua
script per request, so however many tasks, workers and replicas share the server, a
bucket never admits past its limit. In process there is no `await` between the
check and the add, which on one event loop is the same guarantee.

Where the buckets live: in Redis when `REDIS_URL` is set, shared by every worker and
replica, a hash `{key_prefix}{scope}:r` (`:t`) with the level `l` and the time `t`
in microseconds of Redis's own clock (`TIME`), so replicas with skewed clocks agree;
it expires a second after it would be empty, so idle scopes vanish. Without Redis,
per process: with N workers a tenant may get up to N times its limits.

Redis down: any Redis error opens a breaker for one second, during which Redis is
not tried at all (a dead Redis costs callers nothing), after which one request
probes it again. While it is down, fail open (`rate_limits.fail: open`) counts per
process as if there were no Redis; fail closed refuses with 503
`rate_limiter_unavailable`. Going down and coming back are logged once each and
reported to `on_backend`.

Refusals are OpenAI's: 429 with `type` `requests` or `tokens`, `Retry-After`,
`retry-after-ms` and the `x-ratelimit-*` headers (`reset`: until the bucket is empty
again), which admitted responses carry too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.config import RateLimitConfig
from proxy.errors import RateLimiterUnavailable, RateLimitExceeded

if TYPE_CHECKING:  # redis is imported only when REDIS_URL is set (start-up time)
    import redis.asyncio as aioredis

log = logging.getLogger("byok.ratelimit")

SLACK = 1e-9  # relative to a limit: rounding in the drain never refuses a request that fits
SWEEP_SECONDS = 60.0  # how often the per-process buckets drop those that are empty
REDIS_CONNECTIONS = 50  # per process; more requests at once wait for one
_MAX_SHAPES = 10_000  # sequences of limits remembered
BREAKER_SECONDS = 1.0  # after a Redis failure, how long before Redis is tried again

Headers = tuple[tuple[bytes, bytes], ...]
# Per limit, two buckets side by side: [requests, tokens, requests, tokens, ...].
Caps = list[int | None]  # each bucket's limit (None: that dimension is not limited)
_DIMS = ("requests", "tokens")
_HEADER_NAMES: tuple[tuple[bytes, bytes, bytes], ...] = tuple(
    (
        f"x-ratelimit-limit-{dim}".encode(),
        f"x-ratelimit-remaining-{dim}".encode(),
        f"x-ratelimit-reset-{dim}".encode(),
    )
    for dim in _DIMS
)


@dataclass(frozen=True, slots=True)
class Limit:
    """The per-minute limits of one scope; None means no limit on that dimension."""

    scope: str  # e.g. "tenant:acme" or "key:key_0123"
    rpm: int | None  # requests per minute, None = no limit
    tpm: int | None  # tokens per minute, None = no limit


@dataclass(frozen=True, slots=True)
class _Shape:
    """A sequence of limits prepared once (`RateLimiter._shape`) for every request under it:
    the limits that limit something, each bucket's cap, and what the hot path loops over."""

    limits: Sequence[Limit]  # the sequence it was made for (held: its id stays its own)
    active: tuple[Limit, ...]
    caps: Caps  # per active limit: its requests bucket's cap, then its tokens bucket's
    # Per limited bucket: its index in `caps`, its dimension (0 requests, 1 tokens), its
    # scope, its cap, and the level it may reach (the cap plus rounding slack).
    buckets: tuple[tuple[int, int, str, int, float], ...]
    # Per limited dimension: its header names and, per limited bucket, its index in
    # `caps`, its cap, the cap plus rounding slack, and the cap as the header writes it.
    header_plan: tuple[
        tuple[tuple[bytes, bytes, bytes], tuple[tuple[int, int, float, bytes], ...]], ...
    ]
    tpms: tuple[int, ...]  # the tpm of each limit with one (the buckets settle corrects)
    token_scopes: tuple[str, ...]  # and their scopes
    header_names: frozenset[bytes]  # the names of the headers `_headers` writes

    @classmethod
    def of(cls, limits: Sequence[Limit]) -> _Shape:
        active = tuple(lim for lim in limits if lim.rpm is not None or lim.tpm is not None)
        caps: Caps = [cap for lim in active for cap in (lim.rpm, lim.tpm)]
        buckets = tuple(
            (i, i & 1, active[i >> 1].scope, cap, cap + cap * SLACK)
            for i, cap in enumerate(caps)
            if cap is not None
        )
        plan = tuple(
            (names, limited)
            for dim, names in enumerate(_HEADER_NAMES)
            if (
                limited := tuple(
                    (i, cap, cap + cap * SLACK, b"%d" % cap)
                    for i, cap in enumerate(caps)
                    if i % 2 == dim and cap is not None
                )
            )
        )
        timed = [lim for lim in active if lim.tpm is not None]
        return cls(
            limits,
            active,
            caps,
            buckets,
            plan,
            tuple(lim.tpm for lim in timed if lim.tpm is not None),
            tuple(lim.scope for lim in timed),
            frozenset(name for names, _ in plan for name in names),
        )

    def costs(self, tokens: int) -> list[int]:
        """Per bucket, what a request of `tokens` (an estimate) costs in it."""
        return [cost for lim in self.active for cost in (1, _cost(lim, tokens))]


@dataclass(slots=True)
class Ticket:
    """What admit() granted; settle() corrects its token count."""

    shape: _Shape
    tokens: int  # the estimate the request was admitted on
    headers: Headers  # x-ratelimit-* to add to the response
    in_redis: bool = False  # counted in Redis (else in this process): settle goes there too


_now = time.monotonic  # the per-process buckets' clock (the tests move it by hand)


def _cost(limit: Limit, tokens: int) -> int:
    """Tokens this request counts against `limit`: the estimate, capped at its tpm."""
    return tokens if limit.tpm is None else min(tokens, limit.tpm)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go style): 20ms, 1s, 17.5s, 6m0s."""
    ms = round(seconds * 1000)
    if ms <= 0:
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


def _headers(shape: _Shape, levels: Sequence[float]) -> Headers:
    """The x-ratelimit-* headers: per dimension, the bucket with the least remaining;
    its reset is the time until it is empty again."""
    out: Headers = ()
    for names, buckets in shape.header_plan:
        best_left = -1
        for i, cap, most, cap_text in buckets:
            left = int(most - levels[i])  # whole units left (int() floors what is kept)
            if left < 0:
                left = 0
            if best_left < 0 or left < best_left:
                best_left, best, best_cap, best_text = left, i, cap, cap_text
        seconds = levels[best] * 60 / best_cap
        ms = round(seconds * 1000)  # as `format_duration` writes it, the usual cases inlined
        if ms <= 0:
            reset = b"0s"
        elif ms < 1000:
            reset = b"%dms" % ms
        else:
            reset = format_duration(seconds).encode()
        out += ((names[0], best_text), (names[1], b"%d" % best_left), (names[2], reset))
    return out


def _refusal(shape: _Shape, costs: Sequence[int], levels: Sequence[float]) -> RateLimitExceeded:
    """The 429, naming the bucket this request waits longest for (`levels`: before it)."""
    limits, caps = shape.active, shape.caps
    waits = [
        -1.0 if cap is None else (levels[i] + costs[i] - cap) * 60 / cap
        for i, cap in enumerate(caps)
    ]
    worst = max(range(len(waits)), key=waits.__getitem__)  # the first one on a tie
    wait, cap, kind = waits[worst], caps[worst], _DIMS[worst % 2]
    assert cap is not None
    what = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    used = max(0, math.ceil(levels[worst] - cap * SLACK))
    message = (
        f"Rate limit reached for {_describe(limits[worst // 2].scope)} on {what}: "
        f"Limit {cap}, Used {used}, Requested {costs[worst]}. "
        f"Please try again in {format_duration(wait)}."
    )
    retry = (
        (b"retry-after", str(max(1, math.ceil(wait))).encode()),
        (b"retry-after-ms", str(max(1, math.ceil(wait * 1000))).encode()),
    )
    return RateLimitExceeded(message, kind, retry + _headers(shape, levels))


_Outcome = tuple[bool, list[float]]  # admitted, and the levels (after it if so, else before)


class _LocalBuckets:
    """The buckets of this process: per dimension, scope -> [level, measured at, limit]."""

    def __init__(self) -> None:
        self._dims: tuple[dict[str, list[float]], ...] = ({}, {})
        self._swept = _now()

    def admit(self, shape: _Shape, tokens: int) -> _Outcome:
        """Check every bucket for a request of `tokens`, then add to all of them (no
        await: atomic on one loop). A request costs 1 in a requests bucket and its
        tokens, at most the cap, in a tokens bucket (`_Shape.costs`)."""
        now = _now()
        if now - self._swept > SWEEP_SECONDS:
            self._sweep(now)
        dims = self._dims
        levels = [0.0] * len(shape.caps)
        found: list[tuple[list[float] | None, int]] = []  # per bucket: it, and the cost
        fits = True
        for i, dim, scope, cap, most in shape.buckets:
            bucket = dims[dim].get(scope)
            cost = (tokens if tokens < cap else cap) if dim else 1
            found.append((bucket, cost))
            level = 0.0
            if bucket is not None:  # drained since it was last measured
                level = bucket[0] - (now - bucket[1]) * bucket[2] / 60
                if level < 0.0:
                    level = 0.0
            levels[i] = level
            if level + cost > most:
                fits = False
        if fits:
            for (i, dim, scope, cap, _most), (bucket, cost) in zip(
                shape.buckets, found, strict=True
            ):
                level = levels[i] = levels[i] + cost
                if bucket is None:
                    dims[dim][scope] = [level, now, cap]
                else:
                    bucket[0], bucket[1], bucket[2] = level, now, cap
        return fits, levels

    def settle(self, shape: _Shape, estimate: int, actual: int) -> None:
        """Add `actual` minus what `estimate` cost to the shape's token buckets (never
        below empty)."""
        now = _now()
        buckets = self._dims[1]
        for scope, tpm in zip(shape.token_scopes, shape.tpms, strict=True):
            delta = actual - (estimate if estimate < tpm else tpm)
            if not delta:
                continue
            bucket = buckets.get(scope)
            if bucket is None:
                if delta > 0:
                    buckets[scope] = [float(delta), now, tpm]
                continue
            level = bucket[0] - max(0.0, now - bucket[1]) * bucket[2] / 60
            level = (level if level > 0.0 else 0.0) + delta
            bucket[0], bucket[1], bucket[2] = (level if level > 0.0 else 0.0), now, tpm

    def _level(self, dim: int, scope: str, now: float) -> float:
        bucket = self._dims[dim].get(scope)
        if bucket is None:
            return 0.0
        level, then, cap = bucket
        return max(0.0, level - max(0.0, now - then) * cap / 60)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for dim, buckets in enumerate(self._dims):
            for scope in [s for s in buckets if self._level(dim, s, now) <= 0]:
                del buckets[scope]


# Shared by both scripts: a bucket's level now, and storing one (expiring a second
# after it would be empty). Times are microseconds of Redis's clock (TIME before a
# write needs Redis 5 or later, which replicates a script's effects, not the script).
_LUA_BUCKET = """
local time = redis.call('TIME')
local now = time[1] * 1000000 + time[2]
local function level_of(key, cap)
  local got = redis.call('HMGET', key, 'l', 't')
  if not got[1] then return 0 end
  local drained = math.max(0, now - tonumber(got[2])) * cap / 60000000
  return math.max(0, tonumber(got[1]) - drained)
end
local function store(key, level, cap)
  redis.call('HSET', key, 'l', level, 't', now)
  redis.call('PEXPIRE', key, math.ceil(level * 60000 / cap) + 1000)
end
"""

# KEYS: per limit, its requests bucket then its tokens bucket.
# ARGV: per bucket, its limit (-1: not limited) and this request's cost in it.
# Returns {1 admitted or 0 refused, then each bucket's level: after this request if
# admitted, before it if refused} (levels as strings: Lua numbers would be truncated).
_ADMIT_LUA = (
    _LUA_BUCKET
    + """
local levels, fits = {}, 1
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  levels[i] = cap < 0 and 0 or level_of(key, cap)
  if cap >= 0 and levels[i] + tonumber(ARGV[2 * i]) > cap + cap * $SLACK then fits = 0 end
end
local out = {fits}
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  if fits == 1 and cap >= 0 then
    levels[i] = levels[i] + tonumber(ARGV[2 * i])
    store(key, levels[i], cap)
  end
  out[i + 1] = string.format('%.17g', levels[i])
end
return out
""".replace("$SLACK", repr(SLACK))
)

# KEYS: token buckets; ARGV: per bucket, its limit and the tokens to add (or take off).
_SETTLE_LUA = (
    _LUA_BUCKET
    + """
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  local level = math.max(0, level_of(key, cap) + tonumber(ARGV[2 * i]))
  if level > 0 then store(key, level, cap) else redis.call('DEL', key) end
end
return 0
"""
)


class RateLimiter:
    """Admits requests under their scopes' RPM/TPM, in Redis or in this process."""

    def __init__(
        self, config: RateLimitConfig, on_backend: Callable[[bool], None] | None = None
    ) -> None:
        self._config = config
        self._on_backend = on_backend
        self._local = _LocalBuckets()
        self._shapes: dict[int, _Shape] = {}
        self._redis: aioredis.Redis | None = None
        # No Redis configured: `admit_here` then admits without awaiting.
        self.in_process = not config.redis_url
        self._healthy = True  # Redis answered last time (or was never tried)
        self._retry_at = 0.0  # monotonic time before which Redis is not tried
        self._errors: tuple[type[BaseException], ...] = ()  # what a Redis failure raises
        if config.redis_url:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError

            self._errors = (RedisError, OSError)  # OSError: timeouts and socket errors
            # No client-side retries: the breaker decides when Redis is tried again. A
            # blocking pool: a burst of requests waits for a connection (as long as a
            # call may take) rather than failing, which would count as Redis down.
            pool = aioredis.BlockingConnectionPool.from_url(
                config.redis_url,
                max_connections=REDIS_CONNECTIONS,
                timeout=config.redis_timeout,
                socket_timeout=config.redis_timeout,
                socket_connect_timeout=config.redis_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._redis = aioredis.Redis.from_pool(pool)
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
        shape = self._shape(limits)
        if not shape.active:
            return None
        tokens = max(0, tokens)
        costs = shape.costs(tokens)
        outcome: _Outcome | None = None
        in_redis = False
        if self._try_redis():
            try:
                outcome = await self._admit_redis(shape, costs)
                in_redis = True
                self._redis_ok()
            except self._errors as exc:
                self._redis_failed(exc)
        if outcome is None:
            if self._redis is not None and not self._config.fail_open:
                raise RateLimiterUnavailable()
            outcome = self._local.admit(shape, tokens)
        admitted, levels = outcome
        if not admitted:
            raise _refusal(shape, costs, levels)
        return Ticket(shape, tokens, _headers(shape, levels), in_redis)

    def admit_here(self, limits: Sequence[Limit], tokens: int) -> Ticket | None:
        """`admit` in this process's buckets, without a coroutine (no Redis configured)."""
        shape = self._shape(limits)
        if not shape.active:
            return None
        tokens = max(0, tokens)
        admitted, levels = self._local.admit(shape, tokens)
        if not admitted:
            raise _refusal(shape, shape.costs(tokens), levels)
        return Ticket(shape, tokens, _headers(shape, levels))

    def _shape(self, limits: Sequence[Limit]) -> _Shape:
        """`limits` prepared for admitting (remembered for the same sequence of limits,
        which `proxy.spend` keeps per tenant and key)."""
        shape = self._shapes.get(id(limits))
        if shape is not None and shape.limits is limits:
            return shape
        shape = _Shape.of(limits)
        if len(self._shapes) >= _MAX_SHAPES:
            self._shapes.clear()
        self._shapes[id(limits)] = shape
        return shape

    def settle_here(self, ticket: Ticket, actual_tokens: int | None) -> bool:
        """Settle what needs no Redis call (nothing to correct, or counted in this
        process) at once; False when `settle` must still be awaited for Redis."""
        if actual_tokens is None or not ticket.shape.tpms:
            return True
        actual = actual_tokens if actual_tokens > 0 else 0
        if ticket.in_redis:
            return not any(self._deltas(ticket, actual))
        self._local.settle(ticket.shape, ticket.tokens, actual)
        return True

    @staticmethod
    def _deltas(ticket: Ticket, actual: int) -> list[int]:
        """Per token bucket of the ticket, the tokens to add (`actual` minus its cost)."""
        tokens = ticket.tokens
        return [actual - (tokens if tokens < tpm else tpm) for tpm in ticket.shape.tpms]

    async def settle(self, ticket: Ticket, actual_tokens: int | None) -> None:
        """Add `actual_tokens` minus the ticket's estimate to its token buckets, however
        late; None (not known) keeps the estimate. Never raises."""
        if actual_tokens is None or self.settle_here(ticket, actual_tokens):
            return
        deltas = self._deltas(ticket, actual_tokens if actual_tokens > 0 else 0)
        if not self._try_redis():
            return  # Redis is down: that correction is lost (its buckets drain regardless)
        shape = ticket.shape
        keys = [self._key(scope, "t") for scope in shape.token_scopes]
        args = [x for tpm, delta in zip(shape.tpms, deltas, strict=True) for x in (tpm, delta)]
        try:
            await self._settle_script(keys=keys, args=args)
            self._redis_ok()
        except self._errors as exc:
            self._redis_failed(exc)
        except Exception:  # settle runs after the response: never let it raise
            log.exception("rate limiter: settling tokens failed")

    async def aclose(self) -> None:
        """Close the Redis connection pool (if any)."""
        if self._redis is not None:
            await self._redis.aclose()

    async def _admit_redis(self, shape: _Shape, costs: list[int]) -> _Outcome:
        keys = [self._key(lim.scope, dim) for lim in shape.active for dim in ("r", "t")]
        caps = shape.caps
        args = [x for i, cap in enumerate(caps) for x in (-1 if cap is None else cap, costs[i])]
        reply: list[Any] = await self._admit_script(keys=keys, args=args)
        return reply[0] == 1, [float(level) for level in reply[1:]]

    def _key(self, scope: str, dim: str) -> str:
        return f"{self._config.key_prefix}{scope}:{dim}"

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
