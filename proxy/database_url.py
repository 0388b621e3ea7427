"""`DATABASE_URL` checked before the engine is made, and a database that cannot be opened
at startup explained: each as one `ConfigError` line saying what to fix.

The URL is only ever shown with its password masked (`***`), and a driver's
message is shown with the password cut out as well.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from proxy.config import ConfigError

EXAMPLES = "sqlite:///./byok.db or postgresql+psycopg://user:password@host:5432/dbname"
_BACKENDS = ("sqlite", "postgresql")

# A driver's words for a failed connection -> what to do about it (the first that matches).
_FIXES = (
    (
        re.compile(r'role ".*" does not exist'),
        "check the user name in DATABASE_URL, or create that role (createuser NAME)",
    ),
    ("connection refused", "is PostgreSQL running there? Check the host and port"),
    ("does not exist", "create the database (createdb NAME) or fix its name"),
    ("password authentication failed", "check the user and password"),
    ("no pg_hba.conf entry", "allow this client in pg_hba.conf or fix the user and host"),
    ("could not translate host name", "check the host name"),
    ("name or service not known", "check the host name"),
    ("timeout expired", "check the host and port, and that no firewall drops the connection"),
    ("unable to open database file", "check that the file's directory exists and is writable"),
    ("file is not a database", "point it at a byok-proxy SQLite file, or a new path"),
)


def _matches(words: str | re.Pattern[str], reason: str) -> bool:
    return bool(words.search(reason)) if isinstance(words, re.Pattern) else words in reason


def masked(url: URL) -> str:
    """The URL as it may be printed: password replaced by ***."""
    return url.render_as_string(hide_password=True)


def check(raw: str) -> URL:
    """The parsed URL of a database byok-proxy can use; ConfigError otherwise."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError, TypeError):  # ValueError: a port that is no number
        raise ConfigError(f"DATABASE_URL is not a database URL; use {EXAMPLES}") from None
    backend = url.get_backend_name()
    if backend == "postgres":
        raise ConfigError("DATABASE_URL: write postgresql+psycopg://... instead of postgres://...")
    if backend not in _BACKENDS:
        raise ConfigError(
            f"DATABASE_URL: database {backend!r} is not supported; byok-proxy runs on SQLite "
            f"or PostgreSQL: {EXAMPLES}"
        )
    if backend == "sqlite":
        _check_sqlite_path(url)
    return url


def _check_sqlite_path(url: URL) -> None:
    database = url.database
    # ":memory:" also covers file::memory: URIs; SQLAlchemy moves ?mode=memory to the query.
    if not database or ":memory:" in database or url.query.get("mode") == "memory":
        # Each connection, worker and CLI command would open a database of its own, empty.
        raise ConfigError(
            "DATABASE_URL: an in-memory SQLite database cannot be shared by the proxy's "
            "connections, workers and commands; give a file, e.g. sqlite:///./byok.db"
        )
    if database.startswith("file:"):
        return
    folder = Path(database).parent
    if not folder.is_dir():
        raise ConfigError(
            f"DATABASE_URL: the SQLite file's directory {str(folder)!r} does not exist "
            f"(or is not a directory); create it or fix DATABASE_URL"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"DATABASE_URL: the SQLite file's directory {str(folder)!r} is not writable "
            "(SQLite writes its journal beside the file); fix its permissions or the path"
        )


def driver_missing(url: URL) -> ConfigError:
    """The error for a URL whose driver is not installed (`postgresql+mysqlconnector`)."""
    return ConfigError(
        f"DATABASE_URL: the database driver {url.drivername!r} is not installed; use {EXAMPLES}"
    )


def unreachable(url: URL, error: BaseException) -> ConfigError:
    """The one-line error for a database that cannot be opened at startup."""
    original = getattr(error, "orig", None) or error
    reason = str(original).strip().splitlines()[0] if str(original).strip() else ""
    reason = reason.removeprefix("connection failed: ")
    if url.password:
        reason = reason.replace(str(url.password), "***")
    lowered = reason.lower()
    fix = next((fix for words, fix in _FIXES if _matches(words, lowered)), "check DATABASE_URL")
    return ConfigError(
        f"cannot open the database {masked(url)}: {reason or type(original).__name__}; "
        f"{fix} (DATABASE_URL)"
    )
