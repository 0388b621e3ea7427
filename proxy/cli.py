"""The `byok-proxy` command: parses arguments and hands over; no logic of its own.

byok-proxy serve [--host H] [--port P] [--workers N] [--config F] [--dev]
byok-proxy gen-key [--admin-token]
byok-proxy rotate-keys [--config F]
byok-proxy tenants create --name N --tier T [--id ID]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from proxy.config import Config, ConfigError, load_config
from proxy.security import generate_master_key


def _config(args: argparse.Namespace, dev: bool = False) -> Config:
    try:
        return load_config(args.config, dev=dev)
    except ConfigError as exc:
        print(f"byok-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.server import protocol_class

    config = _config(args, dev=args.dev)
    _setup_logging(config.log_level)
    if args.dev:
        print(
            "byok-proxy: DEV MODE. Generated secrets live in ./.byok/ (owner-only); "
            "do not use this for production.\n"
            f"byok-proxy: admin token: {config.admin_token.reveal()}",
            file=sys.stderr,
        )
    # Migrate once, before workers start (so they never race on the schema), in a
    # short-lived process so the server never loads Alembic.
    migrated = subprocess.run(  # noqa: S603 (our own interpreter and module)
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "migrate",
            *(["--config", args.config] if args.config else []),
        ],
        env={**os.environ, **({"BYOK_DEV": "1"} if args.dev else {})},
        check=False,
    )
    if migrated.returncode:
        return migrated.returncode
    # Workers rebuild the config from the environment (see create_app_from_env).
    if args.config:
        os.environ["BYOK_CONFIG"] = args.config
    if args.dev:
        os.environ["BYOK_DEV"] = "1"
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers add up their metrics through files here (prometheus-client multiprocess).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="byok-metrics-")
    if config.admin_port is not None:
        admin = multiprocessing.Process(
            target=_serve_admin,
            args=(config.admin_host or args.host, config.admin_port, config.log_level),
            name="byok-admin",
            daemon=True,
        )
        admin.start()
    uvicorn.run(
        "proxy.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=int(config.shutdown_timeout_seconds),
        server_header=False,
        date_header=False,
        access_log=False,  # the usage log has one line per request, with more in it
        ws="none",  # no websockets here; loading the library costs memory
        proxy_headers=False,  # X-Forwarded-* from callers are not trusted
        http=protocol_class(),  # head limits, head timeout, connection cap (proxy.server)
        timeout_keep_alive=5,
    )
    return 0


def _serve_admin(host: str, port: int, log_level: str) -> None:
    """The admin API on its own listener (a child process of `serve`).

    uvicorn ends `serve` by re-raising SIGTERM, which skips atexit hooks, so the
    child asks the kernel to send it SIGTERM when its parent dies.
    """
    import ctypes
    import signal

    import uvicorn

    from proxy.server import protocol_class

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    _setup_logging(log_level)
    uvicorn.run(
        "proxy.app:create_admin_app_from_env",
        factory=True,
        host=host,
        port=port,
        log_level=log_level.lower(),
        server_header=False,
        date_header=False,
        ws="none",
        proxy_headers=False,  # the admin listener never trusts X-Forwarded-For
        http=protocol_class(),
        timeout_keep_alive=5,
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from proxy.store import make_engine, migrate

    config = _config(args, dev=os.environ.get("BYOK_DEV") == "1")
    _setup_logging(config.log_level)
    engine = make_engine(config.database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return 0


def cmd_gen_key(args: argparse.Namespace) -> int:
    if args.admin_token:
        print("adm-" + secrets.token_urlsafe(32))
    else:
        print(generate_master_key())
    return 0


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    from proxy.rotation import rotate_all
    from proxy.store import Store, migrate

    config = _config(args)
    _setup_logging(config.log_level)
    store = Store.connect(config.database_url)
    migrate(store.engine)
    report = rotate_all(store, config.keyring)
    print(
        f"rotate-keys: {report.rotated} re-encrypted, {report.current} already current, "
        f"{report.failed} failed (primary key id {config.keyring.primary_kid})"
    )
    if report.remaining:
        print(
            f"rotate-keys: {report.remaining} stored key(s) are still under an old master key "
            "(undecryptable, or written meanwhile by a replica without the new key). Keep the "
            "old key in ENCRYPTION_KEY; restart every replica with the new key first, then "
            "re-run rotate-keys.",
            file=sys.stderr,
        )
    return 0 if report.complete else 1


def cmd_tenants_create(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from admin.schemas import TenantCreate
    from admin.tenants import create_tenant_row
    from proxy.audit import SYSTEM
    from proxy.errors import ProxyError
    from proxy.store import Store, migrate

    try:
        TenantCreate(name=args.name, tier=args.tier, id=args.id)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        print(f"byok-proxy: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    config = _config(args)
    store = Store.connect(config.database_url)
    migrate(store.engine)
    try:
        with store.session() as s:
            tenant, _key, plaintext = create_tenant_row(s, SYSTEM, args.name, args.tier, args.id)
    except ProxyError as exc:
        print(f"byok-proxy: {exc.message}", file=sys.stderr)
        return 1
    print(f"tenant {tenant.id} ({tenant.tier}) created.")
    print(f"proxy key (shown once): {plaintext}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from proxy.usage import GROUPS, format_table, summarise

    by = [g.strip() for g in args.by.split(",") if g.strip()]
    unknown = [g for g in by if g not in GROUPS]
    if unknown or not by:
        print(f"byok-proxy: --by takes a comma list of {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    try:
        with open(args.logfile, encoding="utf-8") as fh:
            rows, skipped = summarise(fh, by, args.since)
    except OSError as exc:
        print(f"byok-proxy: cannot read {args.logfile}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"rows": rows, "skipped_lines": skipped}, indent=2))
    else:
        print(format_table(rows, by))
        if skipped:
            print(f"({skipped} unreadable lines skipped)", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byok-proxy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy and admin API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--config", default=None, help="config.yaml path (default $BYOK_CONFIG)")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="generate missing secrets into ./.byok (not for production)",
    )
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("gen-key", help="print a new ENCRYPTION_KEY (or ADMIN_TOKEN)")
    gen.add_argument("--admin-token", action="store_true", help="print an admin token instead")
    gen.set_defaults(func=cmd_gen_key)

    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument("--config", default=None)
    migrate.set_defaults(func=cmd_migrate)

    rotate = sub.add_parser("rotate-keys", help="re-encrypt every stored key under the first key")
    rotate.add_argument("--config", default=None)
    rotate.set_defaults(func=cmd_rotate_keys)

    tenants = sub.add_parser("tenants", help="manage tenants")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    create = tsub.add_parser("create", help="create a tenant; prints its proxy key once")
    create.add_argument("--name", required=True)
    create.add_argument("--tier", required=True, choices=["trial", "pro", "enterprise"])
    create.add_argument("--id", default=None)
    create.add_argument("--config", default=None)
    create.set_defaults(func=cmd_tenants_create)
    usage = sub.add_parser("usage", help="summarise a usage log per tenant and model")
    usage.add_argument("logfile")
    usage.add_argument("--since", default=None, help="ISO date or time (UTC), e.g. 2026-11-01")
    usage.add_argument(
        "--by", default="tenant,model", help="comma list of: tenant, model, day, path, key_source"
    )
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(func=cmd_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `byok-proxy` console script."""
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
