"""`byok-proxy keys ...` and `byok-proxy audit`: a tenant's proxy keys and its audit
events, through the admin API's own functions, directly on the database.
"""

from __future__ import annotations

import argparse
from typing import Any

from proxy.cli_args import Parents, about
from proxy.cli_context import session, validated
from proxy.cli_output import UsageError, print_json, table


def keys_issue(args: argparse.Namespace) -> int:
    from admin.schemas import ApiKeyCreate, api_key_public
    from admin.tenants import issue_api_key_row
    from proxy.audit import SYSTEM

    spec = validated(ApiKeyCreate, {"name": args.name, "expires_at": args.expires_at})
    with session(args) as s:
        row, plaintext = issue_api_key_row(s, SYSTEM, args.tenant, spec)
    if args.json:
        print_json({**api_key_public(row), "api_key": plaintext})
    else:
        print(f"proxy key {row.id} issued for tenant {args.tenant}.")
        print(f"proxy key (shown once): {plaintext}")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    from admin.schemas import api_key_public
    from admin.tenants import api_key_rows

    with session(args) as s:
        keys = [api_key_public(k) for k in api_key_rows(s, args.tenant)]
    if args.json:
        print_json({"data": keys})
    else:
        headers = ("id", "name", "created_at", "expires_at", "last_used_at")
        print(table(headers, [[k[h] for h in headers] for k in keys]))
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from admin.tenants import revoke_api_key_row
    from proxy.audit import SYSTEM

    with session(args) as s:
        revoke_api_key_row(s, SYSTEM, args.tenant, args.key_id)
    if args.json:
        print_json({"id": args.key_id, "tenant_id": args.tenant, "revoked": True})
    else:
        print(f"proxy key {args.key_id} of tenant {args.tenant} revoked.")
    return 0


def audit_list(args: argparse.Namespace) -> int:
    from admin.tenants import audit_events

    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit: an integer from 1 to 1000")
    with session(args) as s:
        events = audit_events(s, args.tenant, args.limit)
    if args.json:
        print_json({"data": events})
    else:
        headers = ("ts", "action", "actor", "key_hint", "request_id", "source_ip")
        print(table(headers, [[e[h] for h in headers] for e in events]))
    return 0


def add_commands(sub: Any, plain: Parents, listing: Parents) -> None:
    """Register `keys issue|list|revoke` and `audit` (`listing`: with `--json`)."""
    keys = sub.add_parser(
        "keys",
        help="issue, list and revoke a tenant's proxy keys",
        description=about(
            """
            Manage a tenant's proxy keys (byok-...), the keys its services send to the
            proxy, directly on the database. A revoked key stops working on every replica
            at once on PostgreSQL, within the cache TTL on SQLite.
            """
        ),
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    issue = ksub.add_parser(
        "issue",
        parents=listing,
        help="issue another proxy key; prints it once",
        description=about(
            """
            Issue another proxy key for a tenant (for a new service, or to rotate a key:
            issue, deploy, then revoke the old one). The key is printed once and stored
            only as a hash.
            """
        ),
    )
    issue.add_argument("tenant", help="tenant id")
    issue.add_argument("--name", default=None, help="a label for the key (default: none)")
    issue.add_argument(
        "--expires-at",
        default=None,
        metavar="TIME",
        help="RFC 3339 time with a zone, e.g. 2027-01-01T00:00:00Z (default: never)",
    )
    issue.set_defaults(func=keys_issue)

    listed = ksub.add_parser(
        "list",
        parents=listing,
        help="list a tenant's proxy keys",
        description=about(
            """
            List a tenant's proxy keys that are not revoked: id, label, when made, when
            they expire and when last used. Never the key itself (only its hash is kept).
            """
        ),
    )
    listed.add_argument("tenant", help="tenant id")
    listed.set_defaults(func=keys_list)

    revoke = ksub.add_parser(
        "revoke",
        parents=listing,
        help="revoke a proxy key",
        description=about(
            """
            Revoke one of a tenant's proxy keys by its id (key_..., from `keys list`).
            Calls with it are refused with 401 from then on. Doing it twice is fine.
            """
        ),
    )
    revoke.add_argument("tenant", help="tenant id")
    revoke.add_argument("key_id", help="proxy key id (key_...)")
    revoke.set_defaults(func=keys_revoke)

    audit = sub.add_parser(
        "audit",
        parents=listing,
        help="list a tenant's audit events",
        description=about(
            """
            List a tenant's audit events, newest first, as GET /api/v1/tenants/ID/audit
            does: what changed (tenant, OpenAI key, proxy keys, policy), when, by whom
            (admin, tenant, or system for the CLI), from where, and the key's hint (never
            the key). Events outlive a deleted tenant.
            """
        ),
    )
    audit.add_argument("tenant", help="tenant id")
    audit.add_argument("--limit", type=int, default=100, help="most events shown (1 to 1000)")
    audit.set_defaults(func=audit_list)
