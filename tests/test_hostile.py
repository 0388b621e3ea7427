"""Hostile input against a real `byok-proxy serve`: nothing a caller sends grows the
proxy's state, holds its event loop, or gets a 500."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from fake_openai import start_fake
from helpers import ADMIN_TOKEN, bearer
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, serve, serve_env
from stack import TENANT_KEY

from proxy.routes import OTHER, TEMPLATES


@pytest.fixture
def served(tmp_path: Path, master_key: str) -> Iterator[tuple[str, Path]]:
    """One `byok-proxy serve` worker on SQLite in front of the fake; (url, tmp_path)."""
    fake, server = start_fake()
    with server:
        env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", fake.base_url)
        env.pop("PROMETHEUS_MULTIPROC_DIR")
        port = free_port()
        with serve([], env, tmp_path, port, tmp_path / "serve.log"):
            yield f"http://127.0.0.1:{port}", tmp_path


def _tenant(url: str, tid: str) -> str:
    admin = bearer(ADMIN_TOKEN)
    r = httpx.post(url + "/api/v1/tenants", json={"name": tid, "tier": "pro", "id": tid}, headers=admin)
    assert r.status_code == 201, r.text
    key = str(r.json()["api_key"])
    r = httpx.post(
        f"{url}/api/v1/tenants/{tid}/openai-key", json={"api_key": TENANT_KEY}, headers=admin
    )
    assert r.status_code == 200, r.text
    return key


async def _flood(url: str, paths: list[str], headers: dict[str, str]) -> list[int]:
    """GET every path, 32 at a time; the statuses."""
    statuses: list[int] = []
    queue = iter(paths)
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for path in queue:
                async with session.get(url + path, headers=headers) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(*(worker() for _ in range(32)))
    return statuses


def _series(text: str) -> tuple[int, set[str]]:
    """Number of samples on the page, and every `path` label value."""
    count, paths = 0, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            count += 1
            if "path" in sample.labels:
                paths.add(sample.labels["path"])
    return count, paths


def test_random_paths_cannot_grow_metrics(served: tuple[str, Path]) -> None:
    url, _ = served
    key = _tenant(url, "acme")

    def paths(n: int) -> list[str]:
        shapes = ("/v1/rand{}", "/v1/files/{}", "/v1/{}/{}", "/v1/files/{}/content", "/v1/x/{}/y")
        return [
            shapes[i % len(shapes)].format(secrets.token_hex(4), secrets.token_hex(3))
            for i in range(n)
        ]

    asyncio.run(_flood(url, paths(1000), {}))
    first = httpx.get(url + "/metrics").text
    statuses = asyncio.run(_flood(url, paths(8000), {}))
    statuses += asyncio.run(_flood(url, paths(1000), bearer(key)))  # authenticated, too
    assert len(statuses) == 9000 and 500 not in statuses
    last = httpx.get(url + "/metrics")
    assert last.status_code == 200
    count_first, _ = _series(first)
    count_last, labels = _series(last.text)
    # Only route templates or `other`, however many distinct paths were asked for.
    assert labels <= {*TEMPLATES, OTHER}, labels - {*TEMPLATES, OTHER}
    assert OTHER in labels and "/v1/files/{id}" in labels
    # 10,000 distinct paths add a bounded handful of series (the authenticated tenant's).
    assert count_last - count_first < 200, (count_first, count_last)
    assert len(last.content) < 100_000
