"""The usage report (`byok-proxy usage`): totals per group from usage lines, in a time window.

A window edge is an instant (UTC): a day (`2026-12-01`, its midnight), an
RFC 3339 time, `today` / `yesterday` (their midnight), or a duration back from
now (`30m`, `24h`, `7d`, `2w`). `since` is inclusive, `until` exclusive, as
journalctl reads them: `--since yesterday --until today` is all of yesterday.

A line that is not a JSON object with a readable `ts` is malformed: counted as
such, never as a request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

GROUPS = ("tenant", "model", "day", "path", "key_source", "api_key")
COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")
_DURATION = re.compile(r"([1-9][0-9]{0,5})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
EDGE_FORMS = "a date (2026-12-01), an RFC 3339 time, today, yesterday or a duration (30m, 24h, 7d)"


def parse_edge(text: str, now: datetime) -> datetime:
    """The instant `text` names (see the module docstring); ValueError if it names none."""
    word = text.strip().lower()
    midnight = datetime.combine(now.astimezone(UTC).date(), time(), UTC)
    if word == "today":
        return midnight
    if word == "yesterday":
        return midnight - timedelta(days=1)
    duration = _DURATION.fullmatch(word)
    if duration:
        return now - timedelta(seconds=int(duration[1]) * _UNIT_SECONDS[duration[2]])
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", word):
        return datetime.combine(date.fromisoformat(word), time(), UTC)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}[t ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(z|[+-]\d{2}:\d{2})?", word):
        return _aware(datetime.fromisoformat(word.upper()))
    raise ValueError(f"expected {EDGE_FORMS}")


def _aware(value: datetime) -> datetime:
    """A time without a zone is UTC (the usage log's zone)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass
class Report:
    """Totals per group (sorted by group), their sum, and the malformed lines seen."""

    by: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    total: dict[str, Any] = field(default_factory=dict)
    malformed: int = 0


def summarise(
    lines: Iterable[str],
    by: Sequence[str] = ("tenant", "model"),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Report:
    """Add up the usage lines whose `ts` is in [since, until) per group of `by`."""
    totals: dict[tuple[str, ...], dict[str, Any]] = {}
    malformed = 0
    for text in lines:
        if not text.strip():
            continue
        parsed = _parse_line(text)
        if parsed is None:
            malformed += 1
            continue
        line, ts = parsed
        if (since and ts < since) or (until and ts >= until):
            continue
        groups = {
            "tenant": line.get("tenant_id"),
            "model": line.get("model"),
            "day": ts.astimezone(UTC).date().isoformat(),
            "path": line.get("path"),
            "key_source": line.get("key_source"),
            "api_key": line.get("api_key_id"),
        }
        key = tuple(str(groups[g] or "-") for g in by)
        _add(totals.setdefault(key, _zero()), line)
    report = Report(by, malformed=malformed, total=_zero())
    for key, row in sorted(totals.items()):
        report.rows.append({**dict(zip(by, key, strict=True)), **row})
        for column in COLUMNS:
            report.total[column] += row[column]
    return report


def _parse_line(text: str) -> tuple[dict[str, Any], datetime] | None:
    """The line and its instant, or None if it is not a usage line."""
    try:
        line = json.loads(text)
        return line, _aware(datetime.fromisoformat(line["ts"]))
    except (ValueError, KeyError, TypeError):
        return None


def _zero() -> dict[str, Any]:
    return {**dict.fromkeys(COLUMNS[:-1], 0), "cost_usd": Decimal(0)}


def _add(row: dict[str, Any], line: dict[str, Any]) -> None:
    row["requests"] += 1
    status = line.get("status")
    if not isinstance(status, int) or status >= 400 or line.get("error_code"):
        row["errors"] += 1
    for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = line.get(column)
        if isinstance(value, int) and not isinstance(value, bool):
            row[column] += value
    cost = line.get("cost_usd")
    if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost):
        row["cost_usd"] += Decimal(str(cost))  # exact sums of the log's decimal text
