"""What an upstream refusal (401, 429) means for the caller and for the stored key.

- 429 with `insufficient_quota`: the tenant's OpenAI account is out of credit
  (402 `openai_quota_exceeded`); any other 429 passes through.
- 401: OpenAI answers 401 for a bad key, but also for a good key used badly
  (`mismatched_organization`: the caller sent a wrong `OpenAI-Organization`;
  a restricted key missing a scope). Only the first kind marks the stored key
  `invalid` (`KEY_REJECTED_CODES`); the second answers the caller 401 with the
  upstream's code and its message scrubbed of key material, and the key stays
  active, so one misconfigured service cannot lock out the whole tenant.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.errors import UpstreamUnauthorized
from proxy.scrub import scrub
from proxy.streaming import Inflater

# OpenAI's codes for "this key itself is unusable" (invalid, revoked or expired; the
# account deactivated; the key's owner no longer in any organization).
KEY_REJECTED_CODES = frozenset({"invalid_api_key", "account_deactivated", "no_organization"})
_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_MESSAGE = 500
MAX_ERROR_TEXT = 256 * 1024  # most bytes an error body may inflate to (then: unreadable)
_HINTS = {
    "mismatched_organization": (
        "The OpenAI-Organization header sent with this request does not match the "
        "organization of the tenant's OpenAI key. Fix or remove that header in the calling "
        "service; the stored key is still active."
    ),
    "invalid_organization": (
        "The OpenAI-Organization header sent with this request names an organization that "
        "does not exist. Fix or remove that header; the stored key is still active."
    ),
    "invalid_project": (
        "The OpenAI-Project header sent with this request does not match the tenant's key. "
        "Fix or remove that header; the stored key is still active."
    ),
}
_DEFAULT_HINT = (
    "OpenAI refused this request with the tenant's key (for a restricted key: a permission "
    "or scope this endpoint needs is missing; grant it in the OpenAI dashboard). The stored "
    "key is still active."
)


def error_object(body: bytes, encoding: str | None) -> dict[str, Any]:
    """The `error` object of an upstream error body (gzip/deflate or plain), or {}."""
    decoded = Inflater(encoding, MAX_ERROR_TEXT).whole(body)
    if decoded is None:
        return {}
    body = decoded
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return {}
    return error if isinstance(error, dict) else {}


def quota_exceeded(error: dict[str, Any]) -> bool:
    """An upstream 429 that means "out of credit", not "slow down"."""
    return "insufficient_quota" in (error.get("code"), error.get("type"))


def key_rejected(error: dict[str, Any]) -> bool:
    """An upstream 401 that says the key itself is bad (mark it invalid)."""
    return error.get("code") in KEY_REJECTED_CODES


def unauthorized(error: dict[str, Any], sent_key: str) -> UpstreamUnauthorized:
    """The caller's 401 for an upstream 401 that is not about the key itself."""
    code = error.get("code")
    code = code if isinstance(code, str) and _CODE.fullmatch(code) else None
    kind = error.get("type")
    kind = kind if isinstance(kind, str) and _CODE.fullmatch(kind) else None
    message = _HINTS.get(code or "", _DEFAULT_HINT)
    said = error.get("message")
    if isinstance(said, str) and said.strip():
        message += " OpenAI said: " + scrub(said, (sent_key,))[:_MAX_MESSAGE]
    return UpstreamUnauthorized(message, code=code, type_=kind)


def relayable(body: bytes, encoding: str | None, sent_key: str, complete: bool) -> bytes | None:
    """An upstream error body as it may reach the caller: None when it can go unchanged,
    else the body to send instead (plain, no Content-Encoding).

    Every error body, on every status, passes through `scrub`: some upstreams echo the
    key they were sent. A body that holds no key goes byte for byte; one that does goes
    scrubbed; one the proxy cannot read whole (over 64 KiB, an unknown coding) is
    replaced by an error saying so, since it cannot be checked.
    """
    inflater = Inflater(encoding, MAX_ERROR_TEXT)
    decoded = inflater.whole(body) if complete else None
    if decoded is None:
        return _unreadable()
    text = decoded.decode("utf-8", "replace")
    clean = scrub(text, (sent_key,))
    if clean == text and not inflater.compressed:
        return None
    return clean.encode("utf-8")


def _unreadable() -> bytes:
    return json.dumps(
        {
            "error": {
                "message": "The upstream's error body could not be checked for key material "
                "(over 64 KiB, inflating past 256 KiB, or in an unknown encoding), so the "
                "proxy does not relay it.",
                "type": "upstream_error",
                "param": None,
                "code": "upstream_error_unreadable",
            }
        }
    ).encode()
