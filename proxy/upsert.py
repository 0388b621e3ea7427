"""`INSERT ... ON CONFLICT` for the database in use (SQLite or PostgreSQL).

The dialect's module is imported when first asked for: a SQLite deployment never
loads PostgreSQL's (~2 MB), and PostgreSQL's engine has loaded its own already.
"""

from __future__ import annotations

from typing import Any


def insert_for(dialect: str) -> Any:
    """The `insert` construct of `dialect` ("postgresql" or "sqlite"), which has
    `on_conflict_do_update` / `on_conflict_do_nothing`."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert
