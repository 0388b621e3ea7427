"""A tenant's spend for a chosen period: cost and tokens by day, by model and by proxy
key (tables, drawn as charts by console.js), totals, a CSV download, and a trial
tenant's allowance for today. All from the usage API (`GET /tenants/{id}/usage`)."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from admin.console.api import path
from admin.console.context import Console, Problem, console_of, month_start_and_today
from admin.console.render import error_page, page
from admin.console.session import Session

GROUPS = {"day": "By day", "model": "By model", "api_key": "By proxy key"}
_LABEL = {"day": "day", "model": "model", "api_key": "api_key_id"}
_COUNTERS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "unpriced_requests",
)
MAX_FILLED_DAYS = 400  # a chart by day shows the days without usage too, up to this many


def _period(request: Request) -> tuple[str, str]:
    start, today = month_start_and_today()
    try:
        first = date.fromisoformat(request.query_params.get("from", start))
        last = date.fromisoformat(request.query_params.get("to", today))
    except ValueError:
        raise Problem(error_page(request, 422, "A period is two dates, YYYY-MM-DD.")) from None
    if last < first:
        first, last = last, first
    return first.isoformat(), last.isoformat()


async def _usage(
    request: Request, console: Console, session: Session, tenant_id: str, group: str
) -> dict[str, Any]:
    start, end = _period(request)
    return dict(
        await console.need(
            request,
            session,
            "GET",
            path("tenants", tenant_id, "usage"),
            query={"from": start, "to": end, "group_by": group},
        )
    )


def _presets(today: date) -> list[tuple[str, str, str]]:
    return [
        ("This month", today.replace(day=1).isoformat(), today.isoformat()),
        ("Last 7 days", (today - timedelta(days=6)).isoformat(), today.isoformat()),
        ("Last 30 days", (today - timedelta(days=29)).isoformat(), today.isoformat()),
    ]


def _filled_days(rows: list[dict[str, Any]], start: str, end: str) -> list[dict[str, Any]]:
    """One row per day of the period, zeros where the ledger has none (short periods)."""
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    if (last - first).days >= MAX_FILLED_DAYS:
        return rows
    seen = {row["day"]: row for row in rows}
    out = []
    day = first
    while day <= last:
        empty = {"day": day.isoformat(), **dict.fromkeys(_COUNTERS, 0)}
        out.append(seen.get(day.isoformat(), empty))
        day += timedelta(days=1)
    return out


async def spend_page(request: Request) -> Response:
    """Spend for a chosen period: charts and tables by day, model and proxy key."""
    console = console_of(request)
    session = await console.session(request)
    tenant_id = request.path_params["tenant_id"]
    tenant = await console.need(request, session, "GET", path("tenants", tenant_id))
    start, end = _period(request)
    reports = {g: await _usage(request, console, session, tenant_id, g) for g in GROUPS}
    reports["day"]["data"] = _filled_days(reports["day"]["data"], start, end)
    keys = await console.as_key_manager(request, session, tenant_id, "GET")
    names = {k["id"]: k["name"] or k["id"] for k in keys.body["data"]} if keys.ok else {}
    for row in reports["api_key"]["data"]:
        key_id = row["api_key_id"]
        row["label"] = names.get(key_id, f"{key_id} (revoked)") if key_id else "(no key)"
    return page(
        request,
        "spend.html",
        title=f"Spend of {tenant['name']}",
        tenant=tenant,
        start=start,
        end=end,
        reports=reports,
        groups=GROUPS,
        total=reports["day"]["total"],
        trial=reports["day"].get("trial_allowance"),
        presets=_presets(date.fromisoformat(month_start_and_today()[1])),
        charts=True,
    )


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ is quoted with '.
    (Model names come from callers.)"""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


async def usage_csv(request: Request) -> Response:
    """One of the spend tables as CSV (cells a spreadsheet would run are quoted)."""
    console = console_of(request)
    session = await console.session(request)
    tenant_id = request.path_params["tenant_id"]
    group = request.query_params.get("group_by", "day")
    if group not in GROUPS:
        return error_page(request, 422, "group_by: one of day, model, api_key.")
    report = await _usage(request, console, session, tenant_id, group)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([_LABEL[group], *_COUNTERS])
    for row in report["data"]:
        writer.writerow([_cell(row[_LABEL[group]] or ""), *(row[c] for c in _COUNTERS)])
    writer.writerow(["total", *(report["total"][c] for c in _COUNTERS)])
    name = f"usage-{tenant_id}-{report['from']}-{report['to']}-by-{group}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )
