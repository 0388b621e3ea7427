"""What the platform key (trial fallback) may be used for: tenants must stay apart on it.

On OpenAI, files, batches, fine-tunes, vector stores, assistants, stored chat
completions and stored responses belong to the key's project: on a key shared
by every trial tenant, each could read and delete the others'. So:

- only the endpoints of `platform_key.allowed_endpoints` (stateless ones by
  default) are served; anything else answers 402 `platform_key_not_allowed`
  without an upstream call;
- nothing is stored upstream on the platform key: a Responses request gets
  `"store":false` spliced in (OpenAI's default is to store), and a request
  that asks to store (`store` present and not `false`) or to use a stored
  object (`previous_response_id`, `conversation`, and at any depth
  `item_reference` items, `file_id`, `vector_store_ids`, a container by id)
  is refused the same way;
- a request body on the platform key must be one JSON object, in UTF-8, with
  no repeated key (two parsers that disagree on `{"store": false,
  "store": true}` would be a way around the rule).
"""

from __future__ import annotations

import json
import math
from typing import Any

from proxy.errors import BadRequest, PlatformKeyNotAllowed
from proxy.request_json import PROMPT_LISTS

# Endpoints that report token usage; what they cost is read from it.
USAGE_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"}
)
_REFERENCES = ("previous_response_id", "conversation")
_STORE_PATHS = frozenset({"/v1/responses", "/v1/chat/completions"})


def _hint(tenant_id: str) -> str:
    return f"POST /api/v1/tenants/{tenant_id}/openai-key"


def not_allowed(tenant_id: str, method: str, path: str) -> PlatformKeyNotAllowed:
    return PlatformKeyNotAllowed(
        f"{method} {path[:100]} is not available on the platform's shared trial key. "
        "Register your own OpenAI key to use this endpoint (bring your own key: "
        f"{_hint(tenant_id)})."
    )


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("repeated key")
    return obj


def check_body(tenant_id: str, path: str, body: bytes) -> tuple[bytes, dict[str, Any]]:
    """The body to send on the platform key and its parsed object; raises when refused."""
    try:
        request = json.loads(body.decode("utf-8"), object_pairs_hook=_no_repeats)
    except (UnicodeDecodeError, ValueError, RecursionError):
        request = None
    if not isinstance(request, dict):
        raise BadRequest(
            "On the platform's trial key a request body must be one JSON object in UTF-8, "
            "without repeated keys.",
            code="invalid_json",
        )
    for name in _REFERENCES:
        if request.get(name) is not None:
            raise PlatformKeyNotAllowed(
                f"'{name}' reads a stored object, and nothing is stored on the platform's "
                "shared trial key. Send the whole conversation in the request, or register "
                f"your own OpenAI key ({_hint(tenant_id)}).",
                param=name,
            )
    found = _stored_reference(request)
    if found is not None:
        raise PlatformKeyNotAllowed(
            f"'{found}' refers to an object stored upstream (a file, vector store, container "
            "or stored item); on the platform's shared trial key those would be every trial "
            f"tenant's. Send the content itself, or register your own OpenAI key "
            f"({_hint(tenant_id)}).",
            param=found,
        )
    if path in _STORE_PATHS:
        store = request.get("store")
        if "store" in request and store is not False:
            raise PlatformKeyNotAllowed(
                "'store' must be false on the platform's shared trial key: stored objects "
                "would be shared with every other trial tenant. Register your own OpenAI key "
                f"to store them ({_hint(tenant_id)}).",
                param="store",
            )
        if "store" not in request and path == "/v1/responses":
            start = body.index(b"{") + 1
            splice = b'"store":false,' if request else b'"store":false'
            body = body[:start] + splice + body[start:]
            request["store"] = False
    return body, request


# Fields, at any depth, that name an object stored in the key's project.
_REFERENCE_FIELDS = frozenset({"file_id", "file_ids", "vector_store_ids", "container_id"})


def _stored_reference(value: Any, depth: int = 0) -> str | None:
    """The first field of `value` that points at a stored object, or None."""
    if depth > 64:
        return "body"  # nothing OpenAI accepts is this deep
    if isinstance(value, dict):
        if value.get("type") == "item_reference":
            return "item_reference"
        container = value.get("container")
        if container is not None and not isinstance(container, dict):
            return "container"
        for name, item in value.items():
            if name in _REFERENCE_FIELDS and item is not None:
                return name
            found = _stored_reference(item, depth + 1)
            if found is not None:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _stored_reference(item, depth + 1)
            if found is not None:
                return found
    return None


def _count(value: Any) -> int | None:
    """A non-negative count (an integral float counts too: OpenAI accepts 8.0)."""
    if value is None:
        return None
    if type(value) is int:
        return value if value >= 0 else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        return None
    return math.ceil(value)


def estimate_tokens(
    path: str, request: dict[str, Any] | None, body_size: int, default_output: int
) -> int:
    """Tokens to reserve before a platform-key call: an upper bound for text prompts.

    Prompt: the body's size in bytes (a token is at least one byte of text).
    Output: the request's own limit (`max_completion_tokens`, `max_tokens`,
    `max_output_tokens`), else `default_output`, times `n` choices.
    Endpoints that report no usage (models, moderations) reserve nothing.
    """
    if path not in USAGE_ENDPOINTS:
        return 0
    limit, choices = requested_output(path, request)
    return body_size + (default_output if limit is None else limit) * choices


_OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def requested_output(path: str, request: dict[str, Any] | None) -> tuple[int | None, int]:
    """The output a request may make: its own limit per choice (None: it states none) and
    its number of choices; (0, 0) for one that makes none (embeddings, no JSON body)."""
    if path == "/v1/embeddings" or request is None or path not in USAGE_ENDPOINTS:
        return 0, 0
    limit = None
    for name in _OUTPUT_LIMITS:
        value = request.get(name)
        if value is not None:
            limit = _count(value)
            if limit is not None:
                break
    n, best_of = request.get("n"), request.get("best_of")
    choices = 1
    if n is not None or best_of is not None:
        choices = max(_count(n) or 1, _count(best_of) or 1)
    if path == "/v1/completions":
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt:
            if not all(isinstance(p, int) for p in prompt):  # a list of prompts, not of tokens
                choices *= len(prompt)
        else:  # a body over 1 MiB, read in pieces, counts them (`proxy.request_json`)
            choices *= max(_count(request.get(PROMPT_LISTS)) or 1, 1)
    return limit, choices
