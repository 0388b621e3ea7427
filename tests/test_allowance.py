"""The trial allowance is counted in the database, so every worker and replica shares it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from stack import Stack


@pytest.mark.parametrize(
    ("yaml", "allowed"),
    [
        ("tiers:\n  trial:\n    daily_requests: 3\n", 3),
        # 18 tokens per call: after two calls (36) the 30-token allowance is spent.
        ("tiers:\n  trial:\n    daily_tokens: 30\n", 2),
    ],
)
def test_allowance_shared_by_two_replicas(
    tmp_path: Path, database_url: str, master_key: str, yaml: str, allowed: int
) -> None:
    stack = Stack(tmp_path, database_url, master_key, yaml=yaml)
    try:
        stack.add_replica()
        key = stack.tenant("trial-co", tier="trial", key=None)
        outcomes = []
        for i in range(6):
            client = stack.sdk(key, replica=i % 2)
            try:
                client.chat.completions.create(model="m", messages=[])
                outcomes.append("ok")
            except openai.APIStatusError as exc:
                assert exc.status_code == 402
                assert isinstance(exc.body, dict) and exc.body["code"] == "trial_quota_exceeded"
                outcomes.append("refused")
        assert outcomes == ["ok"] * allowed + ["refused"] * (6 - allowed)
        assert sum(r.path == "/v1/chat/completions" for r in stack.fake.requests) == allowed
    finally:
        stack.close()


def test_pro_tier_never_falls_back(tmp_path: Path, master_key: str) -> None:
    stack = Stack(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", master_key)
    try:
        for tier in ("pro", "enterprise"):
            key = stack.tenant(f"{tier}-co", tier=tier, key=None)
            with pytest.raises(openai.APIStatusError) as info:
                stack.sdk(key).chat.completions.create(model="m", messages=[])
            assert info.value.status_code == 402
        assert not any(r.path == "/v1/chat/completions" for r in stack.fake.requests)
    finally:
        stack.close()
