"""Prometheus metrics (prometheus-client): requests, latency, upstream latency, tokens, streams.

Label values come from bounded sets (an OpenAI route template or `other`;
a tenant only once it has authenticated), so no caller can grow the page.
Rendering runs in a thread, off the event loop. Each app gets its own
registry. With several workers, `byok-proxy serve` sets
`PROMETHEUS_MULTIPROC_DIR` so every worker's counts are summed at scrape time
(prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from proxy.routes import template
from proxy.usage import UsageRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The proxy's metrics on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "byok_requests",
            "Requests to /v1 by tenant, status and OpenAI route (`other` if none)",
            ["tenant", "status", "path"],
            registry=r,
        )
        self.latency = Histogram(
            "byok_request_duration_seconds",
            "Time from request to end of response",
            ["path"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "byok_upstream_ttfb_seconds",
            "Time to the upstream's response headers",
            ["path"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "byok_tokens",
            "Tokens by tenant and kind (prompt/completion)",
            ["tenant", "kind"],
            registry=r,
        )
        self.open_streams = Gauge(
            "byok_open_streams", "Event streams in flight", registry=r, multiprocess_mode="livesum"
        )
        self.auth_failures = Counter(
            "byok_auth_failures",
            "Requests refused for a missing, unknown or revoked credential",
            registry=r,
        )
        self.auth_blocked = Counter(
            "byok_auth_blocked",
            "Requests refused because their address failed to authenticate too often",
            registry=r,
        )
        self.usage_dropped = Counter(
            "byok_usage_lines_dropped",
            "Usage lines dropped because the usage log sink did not keep up",
            registry=r,
        )
        self.ledger_rows_dropped = Counter(
            "byok_ledger_rows_dropped",
            "Usage ledger rows (per tenant, key, model and day) dropped because the database "
            "was away so long that the worker's buffer filled; counted at each flush",
            registry=r,
        )
        self.usage_log_writable = Gauge(
            "byok_usage_log_writable",
            "1 while the usage log can be written, 0 while it cannot",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.usage_log_writable.set(1)
        self.spend = Counter(
            "byok_spend_usd",
            "Cost of requests in USD by tenant and model (models outside the price table: other)",
            ["tenant", "model"],
            registry=r,
        )
        self.model_tokens = Counter(
            "byok_model_tokens",
            "Tokens by tenant, model (priced models; else other) and kind (prompt/completion)",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.refusals = Counter(
            "byok_policy_refusals",
            "Requests refused by spend control, by reason (the error code)",
            ["reason"],
            registry=r,
        )
        self.limiter_shared = Gauge(
            "byok_rate_limiter_redis_up",
            "1 while rate limits are counted in Redis, 0 while Redis is unreachable",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.limiter_shared.set(1)
        self.known_models: Any = None  # set by the app: the price table's `knows`

    def rate_limiter_shared(self, up: bool) -> None:
        self.limiter_shared.set(1 if up else 0)

    def policy_refused(self, reason: str) -> None:
        """Count a spend-control refusal (`rate_limit_requests`, `budget_exceeded`, ...)."""
        self._child(self.refusals, reason).inc()

    def spent(self, record: UsageRecord) -> None:
        """Count a finished request's cost and tokens by model (bounded: known models only)."""
        usage = record.usage
        if usage is None or record.tenant_id is None:
            return
        known = self.known_models
        name = (record.model or "").lower()
        model = name if known is not None and known(name) else "other"
        if record.cost_nanos:
            self._child(self.spend, record.tenant_id, model).inc(record.cost_nanos / 1e9)
        if usage.prompt_tokens:
            self._child(self.model_tokens, record.tenant_id, model, "prompt").inc(
                usage.prompt_tokens
            )
        if usage.completion_tokens:
            self._child(self.model_tokens, record.tenant_id, model, "completion").inc(
                usage.completion_tokens
            )

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (labels() is the costly part of a count)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: UsageRecord) -> None:
        """Count one finished request."""
        # Bounded label values only: a route template, a tenant that authenticated.
        family = template(record.path)
        tenant = record.tenant_id or "unknown"
        self._child(self.requests, tenant, str(record.status), family).inc()
        if record.duration_ms is not None:
            self._child(self.latency, family).observe(record.duration_ms / 1000)
        if record.ttfb_ms is not None:
            self._child(self.upstream_latency, family).observe(record.ttfb_ms / 1000)
        usage = record.usage
        if usage is not None:
            if usage.prompt_tokens:
                self._child(self.tokens, tenant, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self._child(self.tokens, tenant, "completion").inc(usage.completion_tokens)

    def render(self) -> bytes:
        """The text exposition (all workers' counts in multiprocess mode)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
