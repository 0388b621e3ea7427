"""The trial allowance is counted in the database, so every worker and replica shares it."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from stack import Stack

CHAT = b'{"model":"m","messages":[],"max_tokens":1}'
# What a platform-key request reserves (proxy.platform.estimate_tokens): its body's bytes
# plus its output limit. The fake charges 18 tokens a call.
RESERVED = len(CHAT) + 1


@pytest.mark.parametrize(
    ("yaml", "allowed"),
    [
        ("tiers:\n  trial:\n    daily_requests: 3\n", 3),
        # Admitted while settled + 43 reserved <= 100: at 0, 18, 36, 54 settled; not at 72.
        ("tiers:\n  trial:\n    daily_tokens: 100\n", 4),
    ],
)
def test_allowance_shared_by_two_replicas(
    tmp_path: Path, database_url: str, master_key: str, yaml: str, allowed: int
) -> None:
    with Stack(tmp_path, database_url, master_key, yaml=yaml) as stack:
        stack.add_replica()
        key = stack.tenant("trial-co", tier="trial", key=None)
        assert RESERVED == 43
        outcomes = []
        for i in range(6):
            r = httpx.post(
                stack.urls[i % 2] + "/v1/chat/completions",
                content=CHAT,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            if r.status_code == 200:
                outcomes.append("ok")
            else:
                assert r.status_code == 402, r.text
                assert r.json()["error"]["code"] == "trial_quota_exceeded"
                outcomes.append("refused")
        assert outcomes == ["ok"] * allowed + ["refused"] * (6 - allowed)
        assert sum(r.path == "/v1/chat/completions" for r in stack.fake.requests) == allowed


def test_pro_tier_never_falls_back(tmp_path: Path, master_key: str) -> None:
    with Stack.sqlite(tmp_path, master_key) as stack:
        for tier in ("pro", "enterprise"):
            key = stack.tenant(f"{tier}-co", tier=tier, key=None)
            with pytest.raises(openai.APIStatusError) as info:
                stack.sdk(key).chat.completions.create(model="m", messages=[])
            assert info.value.status_code == 402
            assert isinstance(info.value.body, dict)
            assert info.value.body["code"] == "openai_key_missing"
        assert not any(r.path == "/v1/chat/completions" for r in stack.fake.requests)


def test_allowance_across_two_workers(tmp_path: Path, database_url: str, master_key: str) -> None:
    """`byok-proxy serve --workers 2`: the allowance holds whichever worker answers."""
    import httpx
    from fake_openai import start_fake
    from helpers import ADMIN_TOKEN
    from servers import free_port, serve, serve_env, until_both_workers

    fake, fake_server = start_fake()
    env = serve_env(
        tmp_path,
        master_key,
        database_url,
        fake.base_url,
        "tiers:\n  trial:\n    daily_requests: 3\n",
    )
    port = free_port()
    with fake_server, serve(["--workers", "2"], env, tmp_path, port, tmp_path / "serve.log"):
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(
            url + "/api/v1/tenants",
            json={"name": "T", "tier": "trial"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        key = r.json()["api_key"]

        def chat() -> int:
            with httpx.Client() as client:  # a new connection each time
                return client.post(
                    url + "/v1/chat/completions",
                    json={"model": "m", "messages": []},
                    headers={"Authorization": f"Bearer {key}"},
                ).status_code

        statuses = [chat() for _ in range(8)]
        # Both workers really answered (allowance spent: every further request is a 402).
        until_both_workers(tmp_path / "prom", chat, 402)
    assert statuses == [200] * 3 + [402] * 5
    assert sum(r.path == "/v1/chat/completions" for r in fake.requests) == 3
    log = (tmp_path / "serve.log").read_text()
    assert log.count("Started server process") == 2, log


def test_revocation_reaches_other_replicas_within_the_ttl(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    """Revoked through replica 0: refused there at once, on replica 1 within cache_ttl_seconds."""
    import time

    with Stack(tmp_path, database_url, master_key, yaml="cache_ttl_seconds: 1\n") as stack:
        stack.add_replica()
        key = stack.tenant("acme")
        for replica in (0, 1):  # both replicas now hold the key in their caches
            stack.sdk(key, replica).chat.completions.create(model="m", messages=[])
        key_id = stack.admin.get("/api/v1/tenants/acme/audit").json()["data"][-2]["key_hint"]
        assert stack.admin.delete(f"/api/v1/tenants/acme/api-keys/{key_id}").status_code == 204
        revoked_at = time.monotonic()
        with pytest.raises(openai.AuthenticationError):
            stack.sdk(key, 0).chat.completions.create(model="m", messages=[])
        while True:
            try:
                stack.sdk(key, 1).chat.completions.create(model="m", messages=[])
            except openai.AuthenticationError:
                break
            assert time.monotonic() - revoked_at < 1.5, "replica 1 still honours a revoked key"
            time.sleep(0.05)


def test_any_tier_can_be_given_the_fallback(tmp_path: Path, master_key: str) -> None:
    from stack import PLATFORM_KEY

    yaml = "tiers:\n  pro:\n    platform_fallback: true\n    daily_requests: 1\n"
    with Stack.sqlite(tmp_path, master_key, yaml=yaml) as stack:
        key = stack.tenant("pro-co", tier="pro", key=None)
        stack.sdk(key).chat.completions.create(model="m", messages=[])
        assert stack.fake.requests[-1].header("authorization") == f"Bearer {PLATFORM_KEY}"
        with pytest.raises(openai.APIStatusError) as info:
            stack.sdk(key).chat.completions.create(model="m", messages=[])
        assert isinstance(info.value.body, dict)
        assert info.value.body["code"] == "trial_quota_exceeded"


def test_a_refused_body_costs_no_allowance(tmp_path: Path, master_key: str) -> None:
    import httpx

    yaml = "limits:\n  max_body_bytes: 1000\ntiers:\n  trial:\n    daily_requests: 1\n"
    with Stack.sqlite(tmp_path, master_key, yaml=yaml) as stack:
        key = stack.tenant("trial-co", tier="trial", key=None)
        big = httpx.post(
            stack.url + "/v1/chat/completions",
            content=iter([b"x" * 5000]),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert big.status_code == 413
        stack.sdk(key).chat.completions.create(model="m", messages=[])  # the one allowed


def test_a_failed_settlement_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tenant already has its answer: a database error while settling must not spoil it
    (the reservation then stays held, on the platform's side), and it is said loudly."""
    import logging

    import sqlalchemy

    from proxy.allowance import Reservation, settle, today

    broken = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}")
    with caplog.at_level(logging.ERROR, logger="byok.allowance"):
        settle(broken, Reservation("trial-co", today(), 44), 18)
    assert "trial allowance of tenant trial-co not settled" in caplog.text
    broken.dispose()
