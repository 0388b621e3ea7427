"""The end-to-end stack: the real proxy (uvicorn, loopback port) in front of the fake OpenAI."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
from fake_openai import FakeOpenAI, ServerThread, start_fake
from helpers import ADMIN_TOKEN, make_config

from proxy.app import create_app
from proxy.config import Config

PLATFORM_KEY = "sk-test-PLATFORMkeyABCDEFGHIJKLMNOPQRSTUVWXYZ0123"
TENANT_KEY = "sk-test-TENANTkeyabcdefghijklmnopqrstuvwxyz987654"


class Stack:
    """A fake upstream plus one or more proxy replicas sharing one database."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        master_key: str,
        yaml: str = "",
        upstream: str | None = None,
        **env: str,
    ) -> None:
        self.tmp = tmp
        self.exits = ExitStack()
        self.fake, fake_server = start_fake()
        self.exits.enter_context(fake_server)
        self.usage_path = tmp / "usage.jsonl"
        config_path = tmp / "config.yaml"
        config_path.write_text(yaml)
        self.config: Config = make_config(
            database_url,
            master_key,
            config_path,
            OPENAI_BASE_URL=upstream or self.fake.base_url,
            USAGE_LOG=str(self.usage_path),
            PLATFORM_OPENAI_KEY=PLATFORM_KEY,
            **env,
        )
        self.apps: list[Any] = []
        self.urls: list[str] = []
        self.add_replica()
        self.url = self.urls[0]
        self.admin = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )

    def add_replica(self) -> str:
        """Start another proxy process-alike (own app, caches and engine) on the same database."""
        app = create_app(self.config)
        server = self.exits.enter_context(ServerThread(app, like_serve=True))
        self.apps.append(app)
        self.urls.append(f"http://127.0.0.1:{server.port}")
        return self.urls[-1]

    @classmethod
    def sqlite(cls, tmp: Path, master_key: str, **kw: Any) -> Stack:
        """A stack on a fresh SQLite file in `tmp`."""
        return cls(tmp, f"sqlite:///{tmp / 'e2e.db'}", master_key, **kw)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.admin.close()
        self.exits.close()

    # --- tenants --------------------------------------------------------------------

    def tenant(self, tid: str, tier: str = "pro", key: str | None = TENANT_KEY) -> str:
        """Create a tenant (and register its OpenAI key); return its proxy key."""
        r = self.admin.post("/api/v1/tenants", json={"name": tid, "tier": tier, "id": tid})
        assert r.status_code == 201, r.text
        proxy_key = str(r.json()["api_key"])
        if key is not None:
            self.register(tid, key)
        return proxy_key

    def register(self, tid: str, key: str) -> None:
        r = self.admin.post(f"/api/v1/tenants/{tid}/openai-key", json={"api_key": key})
        assert r.status_code == 200, r.text

    def sdk(self, key: str, replica: int = 0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.urls[replica] + "/v1", api_key=key, max_retries=0, timeout=20
        )

    def async_sdk(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def stream_raw(
        self, key: str, body: dict[str, Any], path: str = "/v1/chat/completions", **headers: str
    ) -> tuple[httpx.Response, bytes]:
        """POST `body` without the SDK and read the answer as it streams: the response and
        every byte received, undecoded."""
        with httpx.stream(
            "POST",
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {key}", **headers},
        ) as r:
            raw = b"".join(r.iter_raw())
        return r, raw

    # --- usage log ------------------------------------------------------------------

    def usage(self, count: int, timeout: float = 5) -> list[dict[str, Any]]:
        """Wait for at least `count` usage lines; return them all."""
        deadline = time.monotonic() + timeout
        lines: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if self.usage_path.exists():
                lines = [json.loads(x) for x in self.usage_path.read_text().splitlines() if x]
                if len(lines) >= count:
                    return lines
            time.sleep(0.02)
        raise AssertionError(f"expected {count} usage lines, got {len(lines)}")

    @property
    def upstream(self) -> FakeOpenAI:
        return self.fake
