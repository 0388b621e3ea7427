"""What a `byok-proxy` command runs with: its configuration, asking only for the
secrets it uses, and a session on the database (an older schema refused).

With `--dev`, secrets come from `./.byok/` exactly as for `serve --dev` (made
there on first use). Without it, a secret the command never uses is not asked
for: `tenants list` needs neither `ENCRYPTION_KEY` nor `ADMIN_TOKEN`, only the
database. `proxy.config.load_config` insists on both, so a missing unused one
is filled with a stand-in that is never used, stored or shown.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from proxy.cli_output import CommandFailed, UsageError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlmodel import Session

    from proxy.config import Config

ENCRYPTION_KEY = "ENCRYPTION_KEY"
ADMIN_TOKEN = "ADMIN_TOKEN"  # noqa: S105 (the variable's name)


def command_config(
    args: argparse.Namespace, needs: Collection[str] = (), dev: bool | None = None
) -> Config:
    """The Config for a command that uses the secrets named in `needs` (`--dev`:
    `args.dev` unless `dev` says otherwise).

    Raises UsageError (exit 2) with load_config's one-line message.
    """
    from proxy.config import ConfigError, load_config
    from proxy.security import generate_master_key

    if dev is None:
        dev = bool(getattr(args, "dev", False))
    env = dict(os.environ)
    if not dev:
        stand_ins = {ENCRYPTION_KEY: generate_master_key, ADMIN_TOKEN: _unused_admin_token}
        for name, make in stand_ins.items():
            if name not in needs and not env.get(name):
                env[name] = make()
    try:
        return load_config(getattr(args, "config", None), env, dev=dev)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _unused_admin_token() -> str:
    return "unused-" + "x" * 32


@contextmanager
def session(args: argparse.Namespace, config: Config | None = None) -> Iterator[Session]:
    """A session on the database (its schema current); errors become one-line CommandFailed.

    `config`: one a command loaded with its ENCRYPTION_KEY; the vault functions
    (`proxy.security.encrypt_openai_key`) then use it. Without it, the command's
    own config, which needs no secret.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.errors import ProxyError
    from proxy.security import Vault, configure
    from proxy.store import Store, check_schema

    with_secrets = config is not None
    config = config or command_config(args)
    store = None
    try:
        store = Store.connect(config.database_url, limits=config.database)
        check_schema(store.engine)  # an older schema: `byok-proxy migrate` upgrades it
        if with_secrets:
            configure(Vault(config.keyring, store.load_ciphertext))
        with store.session() as s:
            yield s
    except ProxyError as exc:
        raise CommandFailed(exc.message) from None
    except SQLAlchemyError as exc:
        raise CommandFailed(_database_error(config, exc)) from None
    finally:
        if store is not None:
            store.dispose()


def _database_error(config: Config, exc: Exception) -> str:
    """One line naming the database (password hidden) and the driver's first line."""
    from sqlalchemy.engine import make_url

    where = make_url(config.database_url).render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()
    return f"database {where}: {reason[0] if reason else type(exc).__name__}"


def validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """`data` checked by an admin request model; UsageError naming the option and rule."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"--{where.replace('_', '-')}: {first['msg']}") from None
