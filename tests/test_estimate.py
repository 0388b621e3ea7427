"""What a hard budget holds before a call (`proxy.estimate`): input the body does not
show, extras no response reports, and big bodies read in pieces."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.estimate import hold_nanos, standard_tier, unmetered, unseen_input
from proxy.platform import requested_output
from proxy.prices import MAX_INPUT_TOKENS, load_prices
from proxy.request_json import SMALL, read_large

PRICES = load_prices(
    {
        "as_of": "2025-08-07",
        "source": "https://platform.openai.com/docs/pricing",
        "models": {"m": {"input": 1.0, "output": 4.0}},
        "max_input_tokens": 1000,
    }
)


def _user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(parts)}]}


@pytest.mark.parametrize(
    "request_",
    [
        _user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
        _user({"type": "file", "file": {"file_id": "file-1"}}),
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "x"}]}]},
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        {"input": "hi", "previous_response_id": "resp_1"},
        {"input": "hi", "conversation": "conv_1"},
        {"prompt": {"id": "pmpt_1"}},
    ],
)
def test_input_beyond_the_body_is_noticed(request_: dict[str, Any]) -> None:
    assert unseen_input(request_, 100)
    assert hold_nanos(PRICES, "m", request_, 100, 10) == 1000 * 1000 + 10 * 4000


@pytest.mark.parametrize(
    "request_",
    [
        _user({"type": "text", "text": "image_url file_id"}),
        {"input": "previous_response_id"},
        {"prompt": "a plain completion prompt"},
        {"input": [{"role": "user", "content": "hello"}], "tools": [{"type": "function"}]},
    ],
)
def test_text_is_held_at_its_size(request_: dict[str, Any]) -> None:
    assert not unseen_input(request_, 100)
    assert hold_nanos(PRICES, "m", request_, 100, 10) == 100 * 1000 + 10 * 4000


def test_a_big_body_is_held_at_the_context_window() -> None:
    assert unseen_input({}, SMALL + 1) and unseen_input(None, SMALL + 1)
    assert not unseen_input(None, 100)
    assert load_prices(None).max_input_tokens == MAX_INPUT_TOKENS


@pytest.mark.parametrize(
    "request_,named",
    [
        ({"tools": [{"type": "function"}, {"type": "web_search_preview"}]}, "web_search"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "file_search"),
        ({"tools": [{"type": "code_interpreter"}]}, "code_interpreter"),
        ({"tools": [{"type": "image_generation"}]}, "image_generation"),
        ({"tools": [{"type": "computer_use_preview"}]}, "computer_use"),
        ({"tools": [{"type": "mcp", "server_url": "https://example.com"}]}, "mcp"),
        ({"tools": [{"type": ["function"]}]}, "function"),
        ({"web_search_options": {}}, "web search"),
        ({"service_tier": "priority"}, "priority"),
        ({"service_tier": "scale"}, "scale"),
    ],
)
def test_extras_no_response_reports_are_named(request_: dict[str, Any], named: str) -> None:
    reason = unmetered(request_)
    assert reason is not None and named in reason


def test_plain_requests_have_no_extras() -> None:
    for request_ in (
        None,
        {},
        {"tools": [{"type": "function"}, {"type": "custom"}, {"type": "local_shell"}]},
        {"service_tier": "auto"},
        {"service_tier": "flex"},
        {"web_search_options": None},
    ):
        assert unmetered(request_) is None
    assert standard_tier({"service_tier": "default"}) and not standard_tier(
        {"service_tier": "flex"}
    )


async def test_a_big_body_keeps_its_hosted_tools_and_tier() -> None:
    body = {
        "model": "m",
        "service_tier": "priority",
        "tools": [{"type": "function", "function": {"name": "f", "type": "x"}}] * 3
        + [{"name": "w", "type": "web_search"}],
        "web_search_options": {"search_context_size": "low"},
        "input": "x" * (SMALL + 10),
    }
    fields = await read_large(json.dumps(body).encode())
    assert fields is not None
    assert fields.counts["tools"] == [{"type": "web_search"}]
    assert fields.counts["service_tier"] == "priority"
    assert fields.counts["web_search_options"] is True


async def test_a_big_completions_body_counts_its_prompts() -> None:
    prompts = ["x" * 600] * 2048  # 2048 text prompts, over 1 MiB in all
    body = json.dumps({"model": "m", "prompt": prompts, "max_tokens": 10}).encode()
    fields = await read_large(body)
    assert fields is not None and len(body) > SMALL
    assert requested_output("/v1/completions", fields.counts) == (10, 2048)
    small = {"model": "m", "prompt": prompts[:3], "max_tokens": 10}
    assert requested_output("/v1/completions", small) == (10, 3)
    tokens = json.dumps({"prompt": [[1, 2], [3, 4]] * 100_000, "max_tokens": 1}).encode()
    fields = await read_large(tokens)
    assert fields is not None and requested_output("/v1/completions", fields.counts) == (
        1,
        200_000,
    )
