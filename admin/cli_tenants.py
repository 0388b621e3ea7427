"""`byok-proxy tenants ...`: the admin API's tenant and OpenAI-key operations, run
directly on the database, without a running server or `ADMIN_TOKEN`.

Changes are audited with actor `system`, like every change the CLI makes. A
running proxy sees them at once on PostgreSQL (`proxy.invalidation`), within its cache
TTL (`cache_ttl_seconds`) on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from typing import TYPE_CHECKING, Any

from proxy.cli_args import Parents, about
from proxy.cli_context import ENCRYPTION_KEY, command_config, session, validated
from proxy.cli_output import CommandFailed, UsageError, fields, print_json, table
from proxy.config import TIER_NAMES

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.security import Secret

MAX_KEY_INPUT = 8192  # characters read from stdin for set-key (a key is at most 512)


def tenants_create(args: argparse.Namespace) -> int:
    from admin.schemas import TenantCreate, tenant_created
    from admin.tenants import create_tenant_row
    from proxy.audit import SYSTEM

    body = validated(TenantCreate, {"name": args.name, "tier": args.tier, "id": args.id})
    with session(args) as s:
        tenant, key, plaintext = create_tenant_row(s, SYSTEM, body.name, body.tier, body.id)
    if args.json:
        print_json(tenant_created(tenant, key, plaintext))
    else:
        print(f"tenant {tenant.id} ({tenant.tier}) created.")
        print(f"proxy key {key.id} (shown once): {plaintext}")
    return 0


def tenants_list(args: argparse.Namespace) -> int:
    from admin.schemas import tenant_public
    from admin.tenants import tenant_rows

    with session(args) as s:
        tenants = [tenant_public(t) for t in tenant_rows(s)]
    if args.json:
        print_json({"data": tenants})
    else:
        headers = ("id", "name", "tier", "openai_key", "hint", "created_at")
        rows = [
            (t["id"], t["name"], t["tier"], t["openai_key"]["status"], t["openai_key"]["hint"])
            + (t["created_at"],)
            for t in tenants
        ]
        print(table(headers, rows))
    return 0


def tenants_show(args: argparse.Namespace) -> int:
    from admin.schemas import tenant_public
    from admin.tenants import get_tenant_or_404

    with session(args) as s:
        _show(tenant_public(get_tenant_or_404(s, args.tenant)), args.json)
    return 0


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(record)
    else:
        print(fields(record))


def tenants_update(args: argparse.Namespace) -> int:
    from admin.schemas import TenantUpdate, tenant_public
    from admin.tenants import update_tenant_row
    from proxy.audit import SYSTEM

    changes: dict[str, Any] = {}
    for name in ("name", "tier"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_policy:
        changes["policy"] = None
    elif args.policy is not None:
        try:
            changes["policy"] = json.loads(args.policy)
        except ValueError:
            raise UsageError("--policy: not valid JSON") from None
    if not changes:
        raise UsageError("nothing to change: give --name, --tier, --policy or --no-policy")
    body = validated(TenantUpdate, changes)
    with session(args) as s:
        _show(tenant_public(update_tenant_row(s, SYSTEM, args.tenant, body)), args.json)
    return 0


def tenants_delete(args: argparse.Namespace) -> int:
    from admin.tenants import delete_tenant_row
    from proxy.audit import SYSTEM

    if not args.yes:
        _confirm(f"Delete tenant {args.tenant}, its proxy keys and its stored OpenAI key?")
    with session(args) as s:
        delete_tenant_row(s, SYSTEM, args.tenant)
    if args.json:
        print_json({"id": args.tenant, "deleted": True})
    else:
        print(f"tenant {args.tenant} deleted.")
    return 0


def _confirm(question: str) -> None:
    """Ask on a terminal; elsewhere (a script) refuse: it must say --yes."""
    if not sys.stdin.isatty():
        raise UsageError("refusing to delete without --yes (standard input is not a terminal)")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise CommandFailed("not deleted.")


def tenants_set_key(args: argparse.Namespace) -> int:
    from admin.keys import REJECTIONS, audit_rejection, store_openai_key
    from admin.schemas import INVALID_KEY_FORMAT
    from admin.tenants import get_tenant_or_404
    from proxy.audit import SYSTEM
    from proxy.errors import ProxyError
    from proxy.keyformat import KeyFormatError, check_openai_key
    from proxy.security import encrypt_openai_key, key_hint

    config = command_config(args, needs=(ENCRYPTION_KEY,))
    with session(args, config) as s:
        get_tenant_or_404(s, args.tenant)  # before asking for the key
        s.rollback()  # no transaction stays open while the operator types
        raw = _read_key(args.tenant)
        try:
            key = check_openai_key(raw)
            asyncio.run(_validate(config, key, args.tenant))
        except KeyFormatError as exc:  # a refusal is audited with why, never the key
            audit_rejection(s, SYSTEM, args.tenant, INVALID_KEY_FORMAT)
            raise CommandFailed(str(exc)) from None
        except ProxyError as refusal:
            if refusal.code in REJECTIONS:
                audit_rejection(s, SYSTEM, args.tenant, refusal.code)
            raise
        del raw
        ciphertext = encrypt_openai_key(key.reveal(), args.tenant)
        hint = key_hint(key.reveal())
        del key
        result = store_openai_key(s, SYSTEM, args.tenant, ciphertext, hint)
    if args.json:
        print_json(result)
    else:
        print(f"OpenAI key {hint} of tenant {args.tenant} validated and stored (encrypted).")
    return 0


def _read_key(tenant_id: str) -> str:
    """The key from standard input (a pipe or file) or a hidden prompt; never an argument,
    which would stay in the shell's history and the process list."""
    if sys.stdin.isatty():
        raw = getpass.getpass(f"OpenAI API key for tenant {tenant_id} (input hidden): ")
    else:
        raw = sys.stdin.read(MAX_KEY_INPUT)
    if not raw.strip():
        raise UsageError("no key given: pipe it on standard input or type it at the prompt")
    return raw


async def _validate(config: Config, key: Secret, tenant_id: str) -> None:
    """One GET /models with the key, as the admin API does (same client settings)."""
    import httpx

    from admin.keys import validate_with_openai

    async with httpx.AsyncClient(
        timeout=httpx.Timeout(config.upstream.validation_timeout),
        follow_redirects=False,
        trust_env=False,
    ) as client:
        await validate_with_openai(client, config.upstream, key, tenant_id)


def tenants_remove_key(args: argparse.Namespace) -> int:
    from admin.keys import remove_openai_key
    from proxy.audit import SYSTEM

    with session(args) as s:
        removed = remove_openai_key(s, SYSTEM, args.tenant)
    if args.json:
        print_json({"tenant_id": args.tenant, "removed": bool(removed)})
        return 0
    what = "removed" if removed else "had none stored; nothing to do"
    print(f"OpenAI key of tenant {args.tenant}: {what}.")
    return 0


def add_commands(sub: Any, plain: Parents, listing: Parents) -> None:
    """Register `tenants ACTION` (`listing`: the parents of the actions with `--json`)."""
    tenants = sub.add_parser(
        "tenants",
        help="create, list, show, update and delete tenants; set their OpenAI key",
        description=about(
            """
            Manage tenants directly on the database (no running server, no ADMIN_TOKEN):
            what the admin API's /api/v1/tenants routes do, audited with actor `system`.
            Running proxies see a change at once on PostgreSQL, within their cache TTL on
            SQLite.
            """
        ),
    )
    tsub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")

    create = tsub.add_parser(
        "create",
        parents=listing,
        help="create a tenant; prints its first proxy key once",
        description=about(
            """
            Create a tenant and its first proxy key (byok-...). The key is printed once
            and stored only as a hash: hand it to the tenant's services now. Register the
            tenant's OpenAI key next with `tenants set-key`.
            """
        ),
    )
    create.add_argument("--name", required=True, help="display name")
    create.add_argument("--tier", required=True, choices=TIER_NAMES, help="tenant tier")
    create.add_argument(
        "--id",
        default=None,
        help="tenant id, [a-z0-9][a-z0-9_-]{0,62} (default: generated, t + 12 hex digits)",
    )
    create.set_defaults(func=tenants_create)

    listed = tsub.add_parser(
        "list",
        parents=listing,
        help="list tenants",
        description=about(
            """
            List every tenant, oldest first, with its tier and the state of its OpenAI key
            (none, active or invalid, and its hint sk-...abcd; never the key).
            """
        ),
    )
    listed.set_defaults(func=tenants_list)

    show = tsub.add_parser(
        "show",
        parents=listing,
        help="show one tenant",
        description=about(
            """
            Show one tenant: name, tier, policy, and its OpenAI key's state (status, hint,
            when it was validated and changed). The key itself is never shown.
            """
        ),
    )
    show.add_argument("tenant", help="tenant id")
    show.set_defaults(func=tenants_show)

    update = tsub.add_parser(
        "update",
        parents=listing,
        help="change a tenant's name, tier or policy",
        description=about(
            """
            Change a tenant's name, tier or policy (budgets, rate limits, allowed models,
            as the admin API's PATCH takes them). Only what you give changes; a change
            is audited (tenant.updated, policy.updated). Prints the tenant.
            """
        ),
    )
    update.add_argument("tenant", help="tenant id")
    update.add_argument("--name", default=None, help="new display name (default: unchanged)")
    update.add_argument(
        "--tier", default=None, choices=TIER_NAMES, help="new tier (default: unchanged)"
    )
    policy = update.add_mutually_exclusive_group()
    policy.add_argument(
        "--policy",
        default=None,
        metavar="JSON",
        help='the whole new policy, e.g. \'{"allowed_models": ["gpt-4o-mini"]}\' '
        "(default: unchanged)",
    )
    policy.add_argument("--no-policy", action="store_true", help="remove the tenant's policy")
    update.set_defaults(func=tenants_update)

    delete = tsub.add_parser(
        "delete",
        parents=listing,
        help="delete a tenant and its keys",
        description=about(
            """
            Delete a tenant, its proxy keys (they stop working) and its stored OpenAI key.
            Its audit events stay. Asks for confirmation on a terminal; a script must
            pass --yes.
            """
        ),
    )
    delete.add_argument("tenant", help="tenant id")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(func=tenants_delete)

    set_key = tsub.add_parser(
        "set-key",
        parents=listing,
        help="register a tenant's OpenAI key (from stdin or a hidden prompt)",
        description=about(
            """
            Register (or replace) a tenant's OpenAI key. The key is read from standard
            input when it is a pipe or file (`byok-proxy tenants set-key acme < key.txt`),
            else from a hidden prompt; never from an argument, which would stay in your
            shell history. It is checked like the admin API checks it (format, then one
            GET /models call to the upstream), encrypted with ENCRYPTION_KEY and stored,
            with its audit event in the same commit. A refused key changes nothing.
            """
        ),
    )
    set_key.add_argument("tenant", help="tenant id")
    set_key.set_defaults(func=tenants_set_key)

    remove_key = tsub.add_parser(
        "remove-key",
        parents=listing,
        help="remove a tenant's stored OpenAI key",
        description=about(
            """
            Remove a tenant's stored OpenAI key (audited). Its requests then use the
            platform key if its tier falls back to it, else get 402. Doing it twice is fine.
            """
        ),
    )
    remove_key.add_argument("tenant", help="tenant id")
    remove_key.set_defaults(func=tenants_remove_key)
