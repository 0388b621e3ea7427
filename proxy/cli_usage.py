"""`byok-proxy usage`: the usage report (`proxy.usage_report`) of a log file or stdin."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.cli_args import Parents, about
from proxy.cli_output import CommandFailed, UsageError, note, print_json, table


def cmd_usage(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from proxy.usage_report import COLUMNS, EDGE_FORMS, GROUPS, parse_edge, summarise

    by = [g.strip() for g in args.by.split(",") if g.strip()]
    if not by or any(g not in GROUPS for g in by):
        raise UsageError(f"--by takes a comma list of {', '.join(GROUPS)}")
    now = datetime.now(UTC)
    edges = {}
    for name in ("since", "until"):
        text = getattr(args, name)
        try:
            edges[name] = parse_edge(text, now) if text is not None else None
        except ValueError:
            raise UsageError(f"--{name}: expected {EDGE_FORMS}; got {text!r}") from None
    try:
        if args.logfile == "-":
            report = summarise(sys.stdin, by, **edges)
        else:
            with open(args.logfile, encoding="utf-8", errors="replace") as fh:
                report = summarise(fh, by, **edges)
    except OSError as exc:
        raise CommandFailed(f"cannot read {args.logfile}: {exc.strerror}") from None
    if args.json:
        print_json(
            {
                "rows": [_json_costs(r) for r in report.rows],
                "total": _json_costs(report.total),
                "malformed_lines": report.malformed,
                **{k: v.isoformat() if v else None for k, v in edges.items()},
            }
        )
    else:
        rows = [[r[h] for h in (*by, *COLUMNS)] for r in report.rows]
        footer = ["TOTAL", *[""] * (len(by) - 1), *(report.total[c] for c in COLUMNS)]
        print(table([*by, *COLUMNS], rows, right=len(COLUMNS), footer=footer))
    if report.malformed:
        plural = "s" if report.malformed != 1 else ""
        note(f"{report.malformed} malformed line{plural} skipped")
    return 0


def _json_costs(row: dict[str, Any]) -> dict[str, Any]:
    """A report row for JSON: the exact decimal cost as a number."""
    return {**row, "cost_usd": float(row["cost_usd"])}


def add_command(sub: Any, parents: Parents) -> None:
    """Register `usage` (`parents`: its `--json`)."""
    usage = sub.add_parser(
        "usage",
        parents=parents,
        help="summarise a usage log per tenant and model",
        description=about(
            """
            Add up a usage log (USAGE_LOG: one JSON line per /v1 request) per group:
            requests, errors, tokens and cost, with a total line. LOGFILE `-` reads
            standard input to its end (e.g. `zcat usage.jsonl.1.gz | byok-proxy usage -`),
            then prints. --since and --until take a date (2026-12-01, its midnight UTC),
            an RFC 3339 time, today, yesterday, or a duration back from now (30m, 24h,
            7d); --since is inclusive, --until exclusive. Lines that are not usage lines
            are counted and reported as malformed, never added up.
            """
        ),
    )
    usage.add_argument("logfile", help="the usage log, or - for standard input")
    usage.add_argument("--since", default=None, help="leave out lines before this (default: all)")
    usage.add_argument("--until", default=None, help="leave out lines from this on (default: all)")
    usage.add_argument(
        "--by",
        default="tenant,model",
        help="comma list of: tenant, model, day, path, key_source, api_key",
    )
    usage.set_defaults(func=cmd_usage)
