"""A mixed proxy scenario at DEBUG: no plaintext OpenAI key in a log, response or usage line."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest
from helpers import assert_clean as assert_free_of
from helpers import secret_forms
from stack import PLATFORM_KEY, TENANT_KEY, Stack

REVOKED = "sk-test-REVOKEDkeyabcdefghijklmnopqrstuvwxyz12345"
SECRETS = secret_forms(TENANT_KEY, PLATFORM_KEY, REVOKED)


def assert_clean(where: str, data: str | bytes) -> None:
    assert_free_of(where, data, SECRETS)


def test_mixed_scenario_leaks_nothing(
    tmp_path: Path, master_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack = Stack(tmp_path, f"sqlite:///{tmp_path / 'e2e.db'}", master_key)
    bodies: list[bytes] = []
    try:
        acme = stack.tenant("acme")
        trial = stack.tenant("trial-co", tier="trial", key=None)
        bad = stack.tenant("bad-co", key=REVOKED)
        stack.fake.revoked.add(REVOKED)
        client = stack.sdk(acme)
        raw = client.chat.completions.with_raw_response.create(model="m", messages=[])
        bodies.append(raw.http_response.content)
        r, raw = stack.stream_raw(acme, {"model": "m", "messages": [], "stream": True})
        bodies.append(raw + repr(r.headers.raw).encode())
        for key, model in (
            (trial, "m"),
            (bad, "m"),
            (bad, "m"),
            (acme, "rate-limited"),
            ("byok-nope", "m"),
        ):
            r = httpx.post(
                stack.url + "/v1/chat/completions",
                json={"model": model, "messages": []},
                headers={"Authorization": f"Bearer {key}"},
            )
            bodies.append(r.content + repr(r.headers.raw).encode())
        stack.fake.revoked.add(PLATFORM_KEY)
        with pytest.raises(openai.APIStatusError):
            stack.sdk(trial).models.list()
        r = stack.admin.get("/api/v1/tenants/bad-co/audit")
        bodies.append(r.content)
        stack.usage(8)
    finally:
        stack.close()

    assert any(r.levelno == logging.DEBUG for r in caplog.records), "DEBUG logging was not on"
    for record in caplog.records:
        assert_clean(f"log line of {record.name}", record.getMessage())
    assert_clean("captured logs", caplog.text)
    for body in bodies:
        assert_clean("a response", body)
    assert_clean("the usage log", stack.usage_path.read_bytes())
    assert_clean("the database", (tmp_path / "e2e.db").read_bytes())
