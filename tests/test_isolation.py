"""Tenants stay apart: the platform key's allow-list, nothing stored on it, the 401 split.

Every test runs the real proxy in front of the fake OpenAI, which keeps files
and stored responses per key (as OpenAI keeps them per project), answers
`mismatched_organization` and missing-scope 401s, and echoes keys in them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from stack import PLATFORM_KEY, TENANT_KEY, Stack

OTHER_KEY = "sk-test-OTHERtenantKEYabcdefghijklmnopqrstuvw5678"


def _code(exc: openai.APIStatusError) -> str | None:
    assert isinstance(exc.body, dict)
    return exc.body.get("code")


def _refused(call: object, *args: object, **kw: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call(*args, **kw)  # type: ignore[operator]
    return info.value


def test_trial_tenants_cannot_reach_stateful_endpoints_on_the_platform_key(
    stack: Stack,
) -> None:
    """Trial A's file would be B's to list and delete on a shared key: both are refused,
    before any upstream call, for every stateful family."""
    a = stack.sdk(stack.tenant("trial-a", tier="trial", key=None))
    b = stack.sdk(stack.tenant("trial-b", tier="trial", key=None))
    before = len(stack.fake.requests)
    attempts = [
        (a.files.create, {"file": ("a.jsonl", b"{}\n"), "purpose": "batch"}),
        (b.files.list, {}),
        (b.files.delete, {"file_id": "file-1"}),
        (
            a.batches.create,
            {"input_file_id": "f", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ),
        (a.fine_tuning.jobs.create, {"model": "gpt-4o-mini", "training_file": "f"}),
        (a.vector_stores.create, {"name": "v"}),
        (a.chat.completions.list, {}),  # stored chat completions: GET /v1/chat/completions
        (a.responses.retrieve, {"response_id": "resp_1"}),
        (a.images.generate, {"prompt": "p"}),
        (a.audio.speech.create, {"model": "tts-1", "voice": "alloy", "input": "x"}),
    ]
    for call, kw in attempts:
        err = _refused(call, **kw)
        assert err.status_code == 402 and _code(err) == "platform_key_not_allowed", err.body
        assert "register your own openai key to use this endpoint" in err.message.lower()
    assert len(stack.fake.requests) == before  # no upstream call for any of them
    lines = stack.usage(len(attempts))
    assert {line["error_code"] for line in lines[-len(attempts) :]} == {"platform_key_not_allowed"}

    # The default allow-list still works on the platform key.
    assert a.chat.completions.create(model="m", messages=[]).usage.total_tokens == 18
    assert a.embeddings.create(model="e", input="x").usage.total_tokens == 5
    assert a.models.list().data[0].id == "gpt-4o-mini"
    a.models.retrieve("gpt-4o-mini")
    assert stack.fake.requests[-1].path == "/v1/models/gpt-4o-mini"
    assert stack.fake.requests[-1].header("authorization") == f"Bearer {PLATFORM_KEY}"


def test_files_stay_per_tenant_with_their_own_keys(stack: Stack) -> None:
    """With their own keys, two tenants see only their own files (the fake keeps them per key)."""
    a = stack.sdk(stack.tenant("acme", key=TENANT_KEY))
    b = stack.sdk(stack.tenant("bravo", key=OTHER_KEY))
    mine = a.files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert [f.id for f in a.files.list().data] == [mine.id]
    assert b.files.list().data == []
    with pytest.raises(openai.NotFoundError):
        b.files.delete(mine.id)
    assert [f.id for f in a.files.list().data] == [mine.id]


def test_allow_list_is_configurable(tmp_path: Path, master_key: str) -> None:
    yaml = "platform_key:\n  allowed_endpoints:\n    - GET /v1/models\n"
    with Stack.sqlite(tmp_path, master_key, yaml=yaml) as stack:
        client = stack.sdk(stack.tenant("trial-a", tier="trial", key=None))
        assert client.models.list().data
        err = _refused(client.chat.completions.create, model="m", messages=[])
        assert err.status_code == 402 and _code(err) == "platform_key_not_allowed"
        assert stack.fake.requests[-1].path == "/v1/models"


def test_nothing_is_stored_upstream_on_the_platform_key(stack: Stack) -> None:
    """Responses are stored by OpenAI unless `store: false`: the proxy says it, byte-splice,
    and refuses what would store or read a stored object."""
    key = stack.tenant("trial-a", tier="trial", key=None)
    client = stack.sdk(key)
    reply = client.responses.create(model="gpt-4o-mini", input="hi")
    assert reply.usage is not None and reply.usage.total_tokens == 13
    sent = stack.fake.requests[-1]
    assert sent.json["store"] is False and sent.body.startswith(b'{"store":false,')
    assert stack.fake.stored == {}

    refusals = [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
    ]
    before = len(stack.fake.requests)
    for extra, param in refusals:
        err = _refused(client.responses.create, model="gpt-4o-mini", input="hi", **extra)
        assert err.status_code == 402 and _code(err) == "platform_key_not_allowed"
        assert isinstance(err.body, dict) and err.body["param"] == param
    err = _refused(client.chat.completions.create, model="m", messages=[], store=True)
    assert _code(err) == "platform_key_not_allowed"
    assert len(stack.fake.requests) == before

    # A tenant with its own key keeps OpenAI's default: its responses are stored, its own.
    own = stack.sdk(stack.tenant("acme"))
    own.responses.create(model="gpt-4o-mini", input="hi")
    assert list(stack.fake.stored.values()) == [TENANT_KEY]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        # Last-wins parsers read store=false here; another parser could read true.
        (
            b'{"model":"m","input":"x","store":true,"store":false}',
            "application/json",
            400,
            "invalid_json",
        ),
        (
            b'{"model":"m","input":"x","store":null}',
            "application/json",
            402,
            "platform_key_not_allowed",
        ),
        (
            b'{"model":"m","input":"x","previous_response_id":"resp_1"}',
            "text/plain",
            402,
            "platform_key_not_allowed",
        ),
        (
            b'{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}',
            "application/json",
            402,
            "platform_key_not_allowed",
        ),
        (
            b'{"model":"m","input":"x","tools":[{"type":"code_interpreter","container":"cntr_1"}]}',
            "application/json",
            402,
            "platform_key_not_allowed",
        ),
        (
            b'{"model":"m","input":"x","tools":[{"type":"file_search","vector_store_ids":["vs_1"]}]}',
            "application/json",
            402,
            "platform_key_not_allowed",
        ),
        (
            b'{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]}',
            "application/json",
            402,
            "platform_key_not_allowed",
        ),
        (b"not json", "application/json", 400, "invalid_json"),
        ('{"model":"m","input":"x"}'.encode("utf-16"), "application/json", 400, "invalid_json"),
    ],
)
def test_platform_bodies_are_checked_whatever_they_claim_to_be(
    stack: Stack, body: bytes, content_type: str, status: int, code: str
) -> None:
    key = stack.tenant("trial-a", tier="trial", key=None)
    before = len(stack.fake.requests)
    r = httpx.post(
        stack.url + "/v1/responses",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert len(stack.fake.requests) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("HEAD", "/v1/chat/completions"),
        ("GET", "/v1/models//files"),
        ("GET", "/v1/models/gpt-4o/files"),
        ("GET", "/v1/models/%66iles"),
        ("GET", "/v1/files?purpose=batch"),
    ],
)
def test_allow_list_matches_exactly(stack: Stack, method: str, path: str) -> None:
    key = stack.tenant("trial-a", tier="trial", key=None)
    before = len(stack.fake.requests)
    r = httpx.request(method, stack.url + path, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code in (400, 402), r.text
    if method != "HEAD":
        assert r.json()["error"]["code"] in ("platform_key_not_allowed", "invalid_path")
    assert len(stack.fake.requests) == before


def _key_fragments(key: str) -> list[str]:
    return [key, key[:8], key[-4:], key[8:20], "****", "***"]


def test_a_wrong_organization_header_does_not_invalidate_the_key(stack: Stack) -> None:
    key = stack.tenant("acme")
    wrong = openai.OpenAI(
        base_url=stack.url + "/v1", api_key=key, organization="org-wrong", max_retries=0
    )
    err = _refused(wrong.chat.completions.create, model="m", messages=[])
    assert isinstance(err, openai.AuthenticationError) and err.status_code == 401
    assert _code(err) == "mismatched_organization"
    assert "OpenAI-Organization" in err.message
    raw = err.response.text
    for fragment in _key_fragments(TENANT_KEY):
        assert fragment not in raw, fragment

    scoped = _refused(stack.sdk(key).chat.completions.create, model="no-scope", messages=[])
    assert scoped.status_code == 401 and _code(scoped) is None
    assert "Missing scopes: model.request" in scoped.message
    for fragment in _key_fragments(TENANT_KEY):
        assert fragment not in scoped.response.text, fragment

    # The key is still active: the next well-formed call goes through.
    assert stack.sdk(key).chat.completions.create(model="m", messages=[]).id
    tenant = stack.admin.get("/api/v1/tenants/acme").json()
    assert tenant["openai_key"]["status"] == "active"
    actions = [e["action"] for e in stack.admin.get("/api/v1/tenants/acme/audit").json()["data"]]
    assert "openai_key.invalidated" not in actions
    assert [line["status"] for line in stack.usage(3)[-3:]] == [401, 401, 200]


def test_only_the_key_that_failed_is_marked_invalid(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    """A request in flight with the old key gets 401 after the tenant registered a new one:
    the new key must stay active (the "is this still the key that failed" guard)."""
    with Stack(tmp_path, database_url, master_key) as stack:
        key = stack.tenant("acme", key=TENANT_KEY)
        outcome: list[int] = []

        def old_request() -> None:
            try:
                stack.sdk(key).chat.completions.create(model="gate", messages=[])
                outcome.append(200)
            except openai.APIStatusError as exc:
                outcome.append(exc.status_code)

        worker = threading.Thread(target=old_request)
        worker.start()
        deadline = time.monotonic() + 20
        while not any(r.body and b'"gate"' in r.body for r in stack.fake.requests):
            assert time.monotonic() < deadline, "the old key's request never reached upstream"
            worker.join(0.01)
        stack.register("acme", OTHER_KEY)  # replaced while the old key's call is upstream
        stack.fake.revoked.add(TENANT_KEY)  # ...and the old key is revoked at OpenAI
        stack.fake.release.set()
        worker.join(10)
        assert outcome == [402]
        assert stack.admin.get("/api/v1/tenants/acme").json()["openai_key"]["status"] == "active"
        stack.fake.release.clear()
        assert stack.sdk(key).chat.completions.create(model="m", messages=[]).id
        assert stack.fake.requests[-1].header("authorization") == f"Bearer {OTHER_KEY}"
