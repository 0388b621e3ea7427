"""The `byok-proxy` command: parses arguments and hands over, and `serve` migrates first.

Commands: serve, migrate, gen-key, rotate-keys, tenants (create, list, show,
update, delete, set-key, remove-key), keys (issue, list, revoke), audit, usage.
`byok-proxy COMMAND --help` describes each. Exit codes are the same for all
(`proxy.cli_output`): 0 done, 1 the operation failed, 2 usage or configuration error.

Imports are lazy: `--help` and `gen-key` load neither the app, SQLAlchemy nor
aiohttp, and `serve` loads only what serving needs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from admin import cli_keys, cli_tenants
from proxy import cli_usage
from proxy.cli_args import Parser, Version, about, common, positive_int, worker_count
from proxy.cli_context import ADMIN_TOKEN, ENCRYPTION_KEY, command_config
from proxy.cli_output import CommandFailed, note
from proxy.config import ConfigError

if TYPE_CHECKING:
    from proxy.config import Config


def _config(
    args: argparse.Namespace, dev: bool = False, needs: Collection[str] = (ENCRYPTION_KEY,)
) -> Config:
    """The command's Config (`proxy.cli_context`); a bad one ends the command with exit 2."""
    return command_config(args, needs, dev=dev)


def _setup_logging(level: str, fmt: str = "text") -> dict[str, object]:
    """Configure this process's logging (proxy.logs); return it for uvicorn's `log_config`,
    which applies it in every worker too."""
    from proxy.logs import setup

    return setup(level, fmt)


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import protocol_class, run
    from proxy.store import schema_is_current

    config = _config(args, dev=args.dev, needs=(ENCRYPTION_KEY, ADMIN_TOKEN))
    log_config = _setup_logging(config.log_level, config.log_format)
    if args.dev:
        print(
            "byok-proxy: DEV MODE. Generated secrets live in ./.byok/ (owner-only); "
            "do not use this for production.\n"
            f"byok-proxy: admin token: {config.admin_token.reveal()}",
            file=sys.stderr,
        )
    # The schema, once, before workers start (so they never race on it): made in an empty
    # database; an older one upgraded only with --migrate (or --dev). One worker
    # is this process: it checks the schema itself (a restart on a current one starts
    # nothing more) and the child inherits what that imported. With several, this
    # process only supervises: the child checks, so that it stays small.
    if args.workers > 1 or not schema_is_current(config.database_url, config.database):
        migrated = _migrate_in_child(args)
        if migrated:
            return migrated
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
            args=(
                config.admin_host or args.host,
                config.admin_port,
                config.log_level,
                config.log_format,
            ),
            name="byok-admin",
            daemon=True,
        )
        admin.start()
    run(  # uvicorn.run, with SIGHUP reopening the usage log in every worker
        "proxy.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=config.log_level.lower(),
        log_config=log_config,
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


def _migrate_in_child(args: argparse.Namespace) -> int:
    """`byok-proxy migrate` in a forked child; its exit code.

    A child, so that the server never loads Alembic (~10 MB); forked, not a new
    interpreter, so that it starts with what `serve` has imported already (~0.5 s
    sooner on a first start)."""
    argv = ["migrate", *(["--config", args.config] if args.config else [])]
    if not (args.migrate or args.dev):
        argv.append("--only-empty")
    child = multiprocessing.get_context("fork").Process(
        target=_migrate_child, args=(argv, args.dev), name="byok-migrate"
    )
    child.start()
    child.join()
    code = child.exitcode or 0
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _migrate_child(argv: list[str], dev: bool) -> None:
    if dev:
        os.environ["BYOK_DEV"] = "1"
    sys.exit(main(argv))


def _serve_admin(host: str, port: int, log_level: str, log_format: str) -> None:
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
    uvicorn.run(
        "proxy.app:create_admin_app_from_env",
        factory=True,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=_setup_logging(log_level, log_format),
        server_header=False,
        date_header=False,
        ws="none",
        proxy_headers=False,  # the admin listener never trusts X-Forwarded-For
        http=protocol_class(),
        timeout_keep_alive=5,
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    import json

    from proxy.store import HEAD_REVISION, make_engine, migrate

    config = _config(args, dev=args.dev or os.environ.get("BYOK_DEV") == "1", needs=())
    _setup_logging(config.log_level, config.log_format)
    engine = make_engine(config.database_url)
    try:
        found = migrate(engine, upgrade=not args.only_empty)
    finally:
        engine.dispose()
    if args.only_empty:  # run by `serve`, which says nothing of a schema already there
        return 0
    if found == HEAD_REVISION:
        done = f"the schema is already at revision {HEAD_REVISION}; nothing to do"
    elif found is None:
        done = f"created the schema at revision {HEAD_REVISION} in an empty database"
    else:
        done = f"upgraded the schema from revision {found} to {HEAD_REVISION}"
    if args.json:
        print(json.dumps({"revision": HEAD_REVISION, "found": found}))
    else:
        print(f"byok-proxy migrate: {done}")
    return 0


def cmd_gen_key(args: argparse.Namespace) -> int:
    from proxy.security import generate_admin_token, generate_master_key

    print(generate_admin_token() if args.admin_token else generate_master_key())
    return 0


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    from proxy.rotation import run_rotate_keys
    from proxy.store import Store, check_schema

    config = _config(args, dev=args.dev)
    _setup_logging(config.log_level, config.log_format)
    store = Store.connect(config.database_url)
    summary: dict[str, object] = {}
    try:
        check_schema(store.engine)  # an older schema: `byok-proxy migrate` upgrades it
        code = run_rotate_keys(
            store,
            config.keyring,
            force=args.force,
            batch_size=args.batch_size,
            out=sys.stderr if args.json else sys.stdout,  # --json: the lines go to stderr
            err=sys.stderr,
            summary=summary,
        )
    finally:
        store.dispose()
    if args.json:
        import json

        print(json.dumps({**summary, "exit_code": code}))
    return code


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="byok-proxy",
        description=about(
            """
            byok-proxy: a multi-tenant OpenAI-compatible proxy where each tenant brings its
            own OpenAI key. `byok-proxy COMMAND --help` describes a command.

            Exit codes (every command): 0 done; 1 the operation failed (not found,
            already exists, refused by OpenAI, a database error); 2 usage or
            configuration error (a bad option or value, a missing or malformed
            setting, a database that cannot be opened); 130 interrupted.
            """
        ),
    )
    parser.add_argument("--version", action=Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    database, as_json = common()

    serve = sub.add_parser(
        "serve",
        help="run the proxy and the admin API",
        description=about(
            """
            Run the proxy (/v1), the admin API (/api/v1), /healthz, /readyz and /metrics
            on one port (the admin API on its own port if config.yaml sets admin.port).
            An empty database gets its schema first; an older schema is refused unless
            --migrate is given (other replicas may still be serving it: upgrade it once,
            with `byok-proxy migrate`). ENCRYPTION_KEY and ADMIN_TOKEN must be
            set, except with --dev, which makes them once into ./.byok/ and prints the
            admin token: for a first try on your machine, never for production.
            """
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on")
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="worker processes: 1 or more, or auto (one per CPU this process may use)",
    )
    serve.add_argument("--config", default=None)
    serve.add_argument(
        "--dev",
        action="store_true",
        help="make missing secrets into ./.byok/, and upgrade an older schema (not for production)",
    )
    serve.add_argument(
        "--migrate",
        action="store_true",
        help="upgrade an older database schema before serving (default: refuse it)",
    )
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser(
        "gen-key",
        help="print a new ENCRYPTION_KEY (or ADMIN_TOKEN)",
        description=about(
            """
            Print a fresh random secret on stdout: a Fernet master key for ENCRYPTION_KEY,
            or with --admin-token a token for ADMIN_TOKEN. Nothing is stored; keep the
            value in your secret store (an ENCRYPTION_KEY that is lost makes every stored
            OpenAI key unreadable).
            """
        ),
    )
    gen.add_argument("--admin-token", action="store_true", help="print an admin token instead")
    gen.set_defaults(func=cmd_gen_key)

    migrate = sub.add_parser(
        "migrate",
        help="bring the database schema up to date",
        description=about(
            """
            Bring the database schema (DATABASE_URL) up to the version this release needs.
            Safe to run again, and while replicas serve, and by two at once (they take
            turns). Run it once per upgrade, before starting the new release's replicas:
            `serve` makes the schema of an empty database by itself, but refuses an older
            one unless given --migrate.
            """
        ),
        parents=[database, as_json],
    )
    migrate.add_argument("--only-empty", action="store_true", help=argparse.SUPPRESS)
    migrate.set_defaults(func=cmd_migrate)

    rotate = sub.add_parser(
        "rotate-keys",
        help="re-encrypt every stored key under the first key",
        parents=[database, as_json],
    )
    rotate.add_argument(
        "--force",
        action="store_true",
        help="go ahead although a running replica cannot decrypt the first key "
        "(its requests will fail) (default: refuse)",
    )
    rotate.add_argument(
        "--batch-size",
        type=positive_int,
        default=500,
        help="tenants re-encrypted per transaction (default: 500)",
    )
    rotate.set_defaults(func=cmd_rotate_keys)
    rotate.description = about(
        """
        Re-encrypt every stored OpenAI key under the first key of ENCRYPTION_KEY
        (ENCRYPTION_KEY=new,old). Run it only once every running replica has the new
        key: it refuses, naming the replicas, while a live one lacks it (unless
        --force). It never prompts, is safe to re-run after a crash, and audits each
        key it re-encrypts. The README's "Key vault" section has the whole runbook.
        """
    )

    cli_tenants.add_commands(sub, [database], [database, as_json])
    cli_keys.add_commands(sub, [database], [database, as_json])
    cli_usage.add_command(sub, [as_json])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `byok-proxy` console script."""
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:  # raised past loading too (e.g. the database URL): one line
        print(f"byok-proxy: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        note(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        note("interrupted")
        return 130
    except BrokenPipeError:  # `byok-proxy ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
