"""Constants and small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

from proxy.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = "https://api.openai.test/v1"
ADMIN_TOKEN = "adm-" + "t" * 40
# Looks like an OpenAI key; used to prove no plaintext key leaks anywhere.
GOOD_KEY = "sk-test-GOODKEYabcdefghijklmnopqrstuvwxyz0123456789"
OTHER_KEY = "sk-test-OTHERKEYzyxwvutsrqponmlkjihgfedcba9876543210"


def make_config(database_url: str, master_key: str, path: Path | None = None, **env: str) -> Config:
    base = {
        "ENCRYPTION_KEY": master_key,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": UPSTREAM,
    }
    return load_config(path or REPO / "config.yaml", {**base, **env})


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
