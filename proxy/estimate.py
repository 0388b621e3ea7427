"""The most a request may cost before it runs: what a hard budget holds (`proxy.spend`).

Prompt: the body's size in bytes (a token is at least one byte of text), unless
the request carries input the proxy cannot size from its body (`unseen_input`):
an image, a file, a previous response, a conversation, a stored prompt, or a
body over 1 MiB (read in pieces, never whole). Then it is the price table's
`max_input_tokens`: no model reads more than its context window.
Output: the request's own limit times its choices, else `default_output_tokens`
(`proxy.platform.requested_output`; the README's bound assumes the model stops
there).

Some requests cost more than their tokens, by amounts no response reports
(`unmetered`): tools OpenAI runs (web search, file search, code interpreter,
image generation, computer use, remote MCP: anything but the caller's own
`function`, `custom` and `local_shell` tools) and service tiers priced apart
from the table (`priority`, `scale`). A hard budget refuses them.
"""

from __future__ import annotations

from typing import Any

from proxy.prices import PriceTable
from proxy.request_json import CLIENT_TOOLS, SMALL

# Content parts and keys whose tokens the body's size does not bound.
_UNSEEN_TYPES = frozenset(
    {"image_url", "input_image", "input_file", "file", "item_reference", "image_generation_call"}
)
_UNSEEN_KEYS = frozenset({"file_id", "image_url", "file_url", "previous_response_id"})
_TOP_UNSEEN = frozenset({"previous_response_id", "conversation"})
_PLAIN_MESSAGE = frozenset({"role", "content", "name"})
_PRICED_TIERS = (None, "auto", "default")  # the table's prices are these tiers
_BOUNDED_TIERS = (*_PRICED_TIERS, "flex")  # flex costs less than the table: still a bound
_PRICED_APART = frozenset({"service_tier", "web_search_options", "tools"})  # what `unmetered` reads


def unseen_input(request: dict[str, Any] | None, size: int) -> bool:
    """Whether the request's prompt may hold more tokens than its body has bytes."""
    if size > SMALL or request is None:
        return size > SMALL
    if not _TOP_UNSEEN.isdisjoint(request) or isinstance(request.get("prompt"), dict):
        return True
    stack: list[Any] = [request.get("input"), request.get("prompt")]
    messages = request.get("messages")
    if type(messages) is list:
        for message in messages:  # plain text messages (the common case) need no walk
            if type(message) is not dict or not _PLAIN_MESSAGE.issuperset(message):
                stack.append(message)
            elif type(message.get("content")) is not str:
                stack.append(message.get("content"))
    else:
        stack.append(messages)
    while stack:
        value = stack.pop()
        if type(value) is dict:
            if value.get("type") in _UNSEEN_TYPES or not _UNSEEN_KEYS.isdisjoint(value):
                return True
            for item in value.values():
                if type(item) is dict or type(item) is list:
                    stack.append(item)
        elif type(value) is list:
            for item in value:
                if type(item) is dict or type(item) is list:
                    stack.append(item)
    return False


def unmetered(request: dict[str, Any] | None) -> str | None:
    """What makes the request cost more than its tokens, if anything (a short phrase)."""
    if request is None or _PRICED_APART.isdisjoint(request):
        return None
    tier = request.get("service_tier")
    if tier not in _BOUNDED_TIERS:
        return f"service_tier {str(tier)[:32]!r} (its prices are not in the table)"
    if request.get("web_search_options") is not None:
        return "web search (billed per call)"
    tools = request.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if not isinstance(kind, str) or kind not in CLIENT_TOOLS:
                return f"the hosted tool {str(kind)[:40]!r} (run and billed at OpenAI)"
    return None


def standard_tier(request: dict[str, Any] | None) -> bool:
    """Whether the table's prices are what the call costs (no tier priced apart)."""
    return request is None or request.get("service_tier") in _PRICED_TIERS


def hold_nanos(
    prices: PriceTable,
    model: str | None,
    request: dict[str, Any] | None,
    size: int,
    output: int,
) -> int | None:
    """The most a call to one of `USAGE_ENDPOINTS` may cost, in nanos, when it may write
    `output` tokens (`proxy.platform.requested_output`); None if its model is unpriced."""
    prompt = max(prices.max_input_tokens, size) if unseen_input(request, size) else size
    return prices.bound_nanos(model, prompt, output)
