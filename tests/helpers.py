"""Constants and small helpers shared by the tests."""

from __future__ import annotations

import time
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


def secret_forms(*keys: str) -> list[str]:
    """What must never be seen of these plaintext keys: each whole, and its secret part."""
    return [*keys, *(key[8:28] for key in keys)]


def assert_clean(where: str, data: str | bytes, secrets: list[str]) -> None:
    """No plaintext key of `secrets` (see `secret_forms`) in `data`, said `where`."""
    blob = data.encode() if isinstance(data, str) else data
    for secret in secrets:
        assert secret.encode() not in blob, f"plaintext key in {where}"


def clear_of_the_minute_ending(margin: float = 20.0) -> None:
    """Wait, if need be, until the failed-auth limiter's current one-minute window
    (`proxy.auth_limit`: monotonic time // 60, the same clock in every process here) has
    more than `margin` seconds left, so that a test's run of failures falls in one window."""
    from proxy.auth_limit import WINDOW

    left = WINDOW - time.monotonic() % WINDOW
    if left < margin:
        time.sleep(left + 0.05)
