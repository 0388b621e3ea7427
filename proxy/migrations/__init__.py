"""Alembic migrations of the byok-proxy schema (run by `proxy.store.migrate`)."""
