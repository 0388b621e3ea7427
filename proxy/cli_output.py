"""What the `byok-proxy` command prints: tables for people, JSON for scripts, one-line errors.

Exit codes, the same for every command (the README lists them):
0 done; 1 the operation failed (not found, already exists, refused by OpenAI,
a database error); 2 usage or configuration error (a bad option or value, a
missing or malformed setting, a database that cannot be opened); 130
interrupted. A command raises `CommandFailed` (or `UsageError`);
`proxy.cli.main` prints its one line and exits with its code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

OK = 0
FAILED = 1
USAGE = 2


class CommandFailed(Exception):
    """The operation could not be done; the message is one line, for the operator."""

    exit_code = FAILED


class UsageError(CommandFailed):
    """The command line or the configuration is wrong."""

    exit_code = USAGE


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (what `--json` prints)."""
    print(json.dumps(data, indent=2))


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    right: int = 0,
    footer: Sequence[object] | None = None,
) -> str:
    """A plain-text table: a header, a rule, one line per row, and a `footer` line
    (totals) under a second rule; the last `right` columns right-aligned (numbers).
    None shows as `-`."""
    cells = [[_cell(v) for v in row] for row in rows]
    total = [_cell(v) if v != "" else "" for v in footer] if footer is not None else None
    every = [*cells, total] if total is not None else cells
    widths = [max([len(h), *(len(r[i]) for r in every)]) for i, h in enumerate(headers)]
    first_right = len(headers) - right

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if i >= first_right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    closing = [rule, line(total)] if total is not None else []
    return "\n".join([line(headers), rule, *(line(r) for r in cells), *closing])


def fields(record: Mapping[str, object]) -> str:
    """One `name: value` line per field (a single record for people); nested
    mappings are flattened as `parent.child`."""
    flat: list[tuple[str, object]] = []
    for name, value in record.items():
        if isinstance(value, Mapping):
            flat += [(f"{name}.{k}", v) for k, v in value.items()]
        else:
            flat.append((name, value))
    width = max(len(n) for n, _ in flat)
    return "\n".join(f"{(n + ':').ljust(width + 1)} {_cell(v)}" for n, v in flat)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def note(message: str) -> None:
    """A line for the operator on stderr (stdout stays parseable)."""
    print(f"byok-proxy: {message}", file=sys.stderr)
