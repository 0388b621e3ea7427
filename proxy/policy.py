"""A tenant's or proxy key's spend policy: budgets, rate limits, allowed models.

The admin API validates a policy with `PolicyIn` (SPEC section 9) and stores
it as JSON on the tenant or key row; the hot path reads it once per cache
load into a frozen `Policy`. Every field is optional: absent or null is no
limit. A request must pass the tenant's policy and its key's, both.

Allowed models are exact names or a prefix ending in `*`, compared without
regard to case (OpenAI's model ids are lower case; `GPT-4O` is `gpt-4o`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from proxy import routes
from proxy.errors import ModelNotAllowed

_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,126}\*?$")
_ONE_DAY = timedelta(days=1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BudgetIn(_Strict):
    period: Literal["day", "month"]
    limit_usd: float = Field(ge=0, le=1e9)
    hard: StrictBool = True

    @field_validator("limit_usd")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class RateLimitsIn(_Strict):
    rpm: StrictInt | None = Field(default=None, ge=1, le=10_000_000)
    tpm: StrictInt | None = Field(default=None, ge=1, le=10_000_000_000)


class PolicyIn(_Strict):
    """The policy object of SPEC section 9."""

    budgets: list[BudgetIn] | None = Field(default=None, max_length=2)
    rate_limits: RateLimitsIn | None = None
    allowed_models: list[str] | None = Field(default=None, max_length=200)

    @field_validator("budgets")
    @classmethod
    def _one_per_period(cls, value: list[BudgetIn] | None) -> list[BudgetIn] | None:
        if value is not None and len({b.period for b in value}) != len(value):
            raise ValueError("at most one budget per period (day, month)")
        return value

    @field_validator("allowed_models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not isinstance(name, str) or not _MODEL_PATTERN.match(name):
                raise ValueError(
                    "each entry is a model name (letters, digits, . _ : / -, up to 127 "
                    "characters), optionally ending in * to match a prefix"
                )
        return value


@dataclass(frozen=True, slots=True)
class Budget:
    period: str  # "day" | "month"
    limit_nanos: int  # 1e-9 USD
    hard: bool

    @property
    def limit_usd(self) -> float:
        return self.limit_nanos / 1e9


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy, as the hot path uses it."""

    budgets: tuple[Budget, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    allowed: tuple[str, ...] | None = None  # lower-cased; a trailing * matches a prefix
    # `allowed` split for `allows`: the exact names, and the prefixes of the patterns.
    _exact: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    _prefixes: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = self.allowed or ()
        object.__setattr__(self, "_exact", frozenset(e for e in entries if not e.endswith("*")))
        object.__setattr__(self, "_prefixes", tuple(e[:-1] for e in entries if e.endswith("*")))

    def allows(self, model: str) -> bool:
        """Whether `model` is on the allow-list (always, when there is none)."""
        if self.allowed is None:
            return True
        name = model.lower()
        return name in self._exact or name.startswith(self._prefixes)


def restricts_models(tenant: Policy | None, key: Policy | None) -> bool:
    """Whether the tenant's or the key's policy has an allow-list (the body must then name
    its model)."""
    return (tenant is not None and tenant.allowed is not None) or (
        key is not None and key.allowed is not None
    )


# POST routes that run no model, so they pass an allow-list without naming one. Any other
# POST (or PUT/PATCH) under an allow-list must name its model where the proxy can read it
# (JSON `model`, a multipart `model` field, or the query string): an unreadable body, a
# model nested inside it, or one implied by an assistant is refused, never waved through.
_MODEL_FREE_POSTS = frozenset(
    {
        "/v1/chat/completions/{id}",
        "/v1/moderations",
        "/v1/responses/{id}/cancel",
        "/v1/conversations",
        "/v1/conversations/{id}",
        "/v1/conversations/{id}/items",
        "/v1/files",
        "/v1/uploads",
        "/v1/uploads/{id}/parts",
        "/v1/uploads/{id}/complete",
        "/v1/uploads/{id}/cancel",
        "/v1/batches/{id}/cancel",
        "/v1/fine_tuning/jobs/{id}/cancel",
        "/v1/fine_tuning/jobs/{id}/pause",
        "/v1/fine_tuning/jobs/{id}/resume",
        "/v1/vector_stores",
        "/v1/vector_stores/{id}",
        "/v1/vector_stores/{id}/search",
        "/v1/vector_stores/{id}/files",
        "/v1/vector_stores/{id}/files/{id}",
        "/v1/vector_stores/{id}/file_batches",
        "/v1/vector_stores/{id}/file_batches/{id}/cancel",
        "/v1/assistants/{id}",
        "/v1/threads",
        "/v1/threads/{id}",
        "/v1/threads/{id}/messages",
        "/v1/threads/{id}/messages/{id}",
        "/v1/threads/{id}/runs/{id}",
        "/v1/threads/{id}/runs/{id}/cancel",
        "/v1/threads/{id}/runs/{id}/submit_tool_outputs",
        "/v1/containers",
        "/v1/containers/{id}/files",
        "/v1/evals",
        "/v1/evals/{id}",
    }
)


# Routes whose model the proxy cannot check from the request: a batch runs whatever
# its input file names, an eval run the models nested in its data source.
_UNCHECKABLE = {
    "/v1/batches": "Batches may run any model (their input file names it)",
    "/v1/evals/{id}/runs": "Eval runs name their models inside the data source",
}


def check_model(
    policies: tuple[Policy | None, ...],
    model: str | None,
    method: str,
    path: str,
    query_model: str | None = None,
) -> None:
    """Raise 403 `model_not_allowed` unless every policy allows the request's model.

    `model` is the body's; `query_model` the query string's, which names the model
    only on Realtime routes but, wherever it appears, must be allowed too. A request
    that names no model passes only if it runs none: a read, a delete, or a POST in
    `_MODEL_FREE_POSTS`. Batches and eval runs are refused whatever they name.
    """
    reading = method in routes.READ_METHODS
    route = "" if reading else routes.template(path)
    if route in _UNCHECKABLE:
        raise ModelNotAllowed(
            f"{_UNCHECKABLE[route]}, so they are refused for a tenant or key with an "
            "allowed_models list."
        )
    if model is None and route.startswith("/v1/realtime"):
        model, query_model = query_model, None
    if model is None and not reading and route not in _MODEL_FREE_POSTS:
        raise ModelNotAllowed(
            f"This tenant or proxy key may only use the models on its allowed_models list, "
            f"and the proxy could not read which model {method} {path[:200]} runs. Name it in "
            "the request's top-level `model` field (JSON, or a multipart form field).",
            param="model",
        )
    for name in (model, query_model):
        if name is None:
            continue
        for p in policies:
            if p is not None and not p.allows(name):
                shown = name if len(name) <= 128 else name[:128] + "..."
                raise ModelNotAllowed(
                    f"The model {shown!r} is not allowed for this tenant or proxy key; "
                    f"allowed: {', '.join(p.allowed or ()) or 'none'}.",
                    param="model",
                )


def parse(text: str | None) -> Policy | None:
    """The stored JSON of a policy as a `Policy`; None when there is none (or it is empty)."""
    if not text:
        return None
    raw = PolicyIn.model_validate_json(text)
    limits = raw.rate_limits or RateLimitsIn()
    policy = Policy(
        tuple(Budget(b.period, round(b.limit_usd * 1e9), b.hard) for b in raw.budgets or ()),
        limits.rpm,
        limits.tpm,
        None if raw.allowed_models is None else tuple(m.lower() for m in raw.allowed_models),
    )
    return None if policy == Policy() else policy


def dump(policy: PolicyIn | None) -> str | None:
    """The JSON stored for a policy (None when it sets nothing)."""
    if policy is None:
        return None
    data = policy.model_dump(exclude_none=True)
    return json.dumps(data, separators=(",", ":")) if data else None


def public(text: str | None) -> dict[str, object]:
    """The policy as the admin API shows it: every field, null where unset."""
    raw = PolicyIn.model_validate_json(text) if text else PolicyIn()
    return raw.model_dump()


def period_start(period: str, day: date) -> date:
    """The first day of the `period` ("day" or "month") that contains `day`."""
    return day if period == "day" else day.replace(day=1)


def period_end(period: str, start: date) -> datetime:
    """When a period that began on `start` ends (its budget resets), UTC midnight."""
    if period == "day":
        return datetime(start.year, start.month, start.day, tzinfo=UTC) + _ONE_DAY
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)
