"""The usage API: spend and tokens from the ledger (`proxy.ledger`), per tenant or for all.

`GET /api/v1/tenants/{id}/usage` (*self*) and `GET /api/v1/usage` (admin)
take `from` and `to` (UTC days, inclusive; default: today) and `group_by`
(`day`, `model` or `api_key`; default `day`). A trial tenant's answer also
has today's platform-key allowance, used and left.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session, col
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from admin.auth import authorize, runtime_of
from admin.tenants import get_tenant_or_404
from proxy.errors import ValidationFailed
from proxy.models import TrialAllowance, UsageLedger
from proxy.prices import usd

_GROUPS = {"day": "day", "model": "model", "api_key": "api_key_id"}
_MAX_DAYS = 3660


def _day(request: Request, name: str, default: date) -> date:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise ValidationFailed(f"{name}: a UTC day, YYYY-MM-DD", param=name) from None


def _query(request: Request) -> tuple[date, date, str]:
    today = datetime.now(UTC).date()
    start, end = _day(request, "from", today), _day(request, "to", today)
    if end < start or (end - start).days > _MAX_DAYS:
        raise ValidationFailed("to: on or after from, and within 10 years of it", param="to")
    group = request.query_params.get("group_by", "day")
    if group not in _GROUPS:
        raise ValidationFailed("group_by: one of day, model, api_key", param="group_by")
    return start, end, group


def _totals(
    session: Session, start: date, end: date, group: str, tenant_id: str | None
) -> dict[str, Any]:
    column = getattr(UsageLedger, _GROUPS[group])
    keys = [col(UsageLedger.tenant_id)] if tenant_id is None else []
    sums = [
        func.sum(col(UsageLedger.requests)),
        func.sum(col(UsageLedger.prompt_tokens)),
        func.sum(col(UsageLedger.completion_tokens)),
        func.sum(col(UsageLedger.cost_nanos)),
        func.sum(col(UsageLedger.unpriced)),
    ]
    query = select(*keys, column, *sums).where(
        col(UsageLedger.day) >= start, col(UsageLedger.day) <= end
    )
    if tenant_id is not None:
        query = query.where(col(UsageLedger.tenant_id) == tenant_id)
    query = query.group_by(*keys, column).order_by(*keys, column)
    data, total = [], _row(0, 0, 0, 0, 0)
    for row in session.execute(query).all():
        *labels, requests, prompt, completion, cost, unpriced = row
        counters = _row(requests, prompt, completion, cost, unpriced)
        for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            total[name] += counters[name]
        total["_nanos"] += int(cost or 0)
        total["unpriced_requests"] += counters["unpriced_requests"]
        label = labels[-1]
        value = label.isoformat() if isinstance(label, date) else (label or None)
        item = {group if group != "api_key" else "api_key_id": value, **counters}
        if tenant_id is None:
            item = {"tenant_id": labels[0], **item}
        item.pop("_nanos")
        data.append(item)
    total["cost_usd"] = usd(total.pop("_nanos"))
    return {"data": data, "total": total, "from": start.isoformat(), "to": end.isoformat()}


def _row(requests: Any, prompt: Any, completion: Any, cost: Any, unpriced: Any) -> dict[str, Any]:
    prompt, completion = int(prompt or 0), int(completion or 0)
    return {
        "requests": int(requests or 0),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": usd(int(cost or 0)),
        "unpriced_requests": int(unpriced or 0),
        "_nanos": int(cost or 0),
    }


async def tenant_usage(request: Request) -> Response:
    """One tenant's usage (self)."""
    await authorize(request, self_route=True)
    runtime = runtime_of(request)
    tenant_id = request.path_params["tenant_id"]
    start, end, group = _query(request)

    def work() -> dict[str, Any]:
        with runtime.store.session() as s:
            tenant = get_tenant_or_404(s, tenant_id)
            result = _totals(s, start, end, group, tenant_id)
            tier = runtime.config.tiers.get(tenant.tier)
            if tier is not None and tier.platform_fallback:
                today = datetime.now(UTC).date()
                used = s.get(TrialAllowance, (tenant_id, today))
                requests = used.requests if used else 0
                tokens = (used.tokens + used.reserved) if used else 0
                result["trial_allowance"] = {
                    "day": today.isoformat(),
                    "requests_used": requests,
                    "requests_left": max(0, tier.daily_requests - requests),
                    "tokens_used": tokens,
                    "tokens_left": max(0, tier.daily_tokens - tokens),
                }
            return result

    return JSONResponse(await runtime.store.run(work))


async def all_usage(request: Request) -> Response:
    """Every tenant's usage (admin), with `tenant_id` in each row."""
    await authorize(request)
    store = runtime_of(request).store
    start, end, group = _query(request)

    def work() -> dict[str, Any]:
        with store.session() as s:
            return _totals(s, start, end, group, None)

    return JSONResponse(await store.run(work))
