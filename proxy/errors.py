"""Every error byok-proxy itself answers with, and its one renderer.

Callers use the official OpenAI SDKs, which raise a proper exception only for
OpenAI's error shape, so every error here renders as::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

The tree (status code in brackets)::

    ProxyError                      [500] internal_error
    ├── BadRequest                  [400] invalid_json / invalid_request
    ├── Unauthorized                [401] unauthorized
    │   ├── InvalidProxyKey         [401] invalid_proxy_key
    │   └── UpstreamUnauthorized    [401] the upstream's code (key fine, request not)
    ├── PaymentRequired             [402] (abstract: the tenant must act)
    │   ├── OpenAIKeyMissing        [402] openai_key_missing
    │   ├── OpenAIKeyInvalid        [402] openai_key_invalid
    │   ├── OpenAIQuotaExceeded     [402] openai_quota_exceeded
    │   ├── TrialQuotaExceeded      [402] trial_quota_exceeded
    │   ├── PlatformKeyNotAllowed   [402] platform_key_not_allowed
    │   └── BudgetExceeded          [402] budget_exceeded (a hard budget used up)
    ├── Forbidden                   [403] forbidden
    │   ├── ModelNotAllowed         [403] model_not_allowed (outside the allow-list)
    │   └── ModelNotPriced          [403] model_not_priced (hard budget, no price known)
    ├── NotFound                    [404] not_found
    ├── MethodNotAllowed            [405] method_not_allowed
    ├── Conflict                    [409] tenant_exists
    ├── RequestTooLarge             [413] request_too_large
    ├── TooManyFailedAuthentications [429] too_many_failed_authentications (Retry-After)
    ├── RateLimitExceeded           [429] rate_limit_exceeded (Retry-After, x-ratelimit-*)
    ├── ValidationFailed            [422] invalid_request / invalid_key_format
    │   └── OpenAIKeyForbidden      [422] openai_key_forbidden
    ├── KeyDecryptionFailed         [500] key_decryption_failed
    ├── UpstreamUnreachable         [502] upstream_unreachable
    ├── PlatformKeyRejected         [502] platform_key_rejected
    ├── OpenAIUnreachable           [503] openai_unreachable (key validation)
    ├── ServiceUnavailable          [503] not_ready
    │   ├── StoreUnavailable        [503] store_unavailable (database slow or down; Retry-After)
    │   ├── ProxyOverloaded         [503] proxy_overloaded (out of file descriptors; Retry-After)
    │   └── RateLimiterUnavailable  [503] rate_limiter_unavailable (Redis down, fail-closed)
    └── UpstreamTimeout             [504] upstream_timeout

Messages are written by us. The one that carries upstream words
(`UpstreamUnauthorized`) carries them scrubbed (`proxy.scrub`): OpenAI's 401
text echoes fragments of the key.
"""

from __future__ import annotations

import json
from typing import Any


class ProxyError(Exception):
    """Base of every error answered to a client; carries status, type and code."""

    status_code = 500
    type = "server_error"
    code = "internal_error"
    message = "Internal error."
    headers: tuple[tuple[bytes, bytes], ...] = ()  # sent with the error (e.g. Retry-After)

    def __init__(
        self, message: str | None = None, *, param: str | None = None, code: str | None = None
    ) -> None:
        self.message = message or self.message
        self.param = param
        if code is not None:
            self.code = code
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The error in OpenAI's shape."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def render(self) -> bytes:
        """The error body as JSON bytes."""
        return json.dumps(self.body()).encode()


class BadRequest(ProxyError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status_code = 401
    type = "invalid_request_error"
    code = "unauthorized"
    message = (
        "Missing or invalid bearer token: send the admin token, or the tenant's own proxy "
        "key on the routes a tenant may use."
    )


class InvalidProxyKey(Unauthorized):
    code = "invalid_proxy_key"
    message = (
        "Missing, unknown or revoked proxy key. Send 'Authorization: Bearer byok-...' "
        "with a key issued by POST /api/v1/tenants/{id}/api-keys."
    )


class PaymentRequired(ProxyError):
    status_code = 402
    type = "insufficient_quota"
    code = "payment_required"


class OpenAIKeyMissing(PaymentRequired):
    code = "openai_key_missing"


class OpenAIKeyInvalid(PaymentRequired):
    code = "openai_key_invalid"


class OpenAIQuotaExceeded(PaymentRequired):
    code = "openai_quota_exceeded"


class TrialQuotaExceeded(PaymentRequired):
    code = "trial_quota_exceeded"


class PlatformKeyNotAllowed(PaymentRequired):
    code = "platform_key_not_allowed"


class ProxyKeyExpired(Unauthorized):
    code = "proxy_key_expired"
    message = "This proxy key has expired; ask the operator for a new one."


class BudgetExceeded(PaymentRequired):
    code = "budget_exceeded"


class UpstreamUnauthorized(Unauthorized):
    """An upstream 401 that is not about the key itself (organization header, scope)."""

    def __init__(self, message: str, *, code: str | None, type_: str | None) -> None:
        super().__init__(message, code=code)
        self.code = code  # type: ignore[assignment]  # the upstream's, possibly None
        if type_:
            self.type = type_


class Forbidden(ProxyError):
    status_code = 403
    type = "invalid_request_error"
    code = "forbidden"
    message = "This credential may not use this route."


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class ModelNotPriced(Forbidden):
    code = "model_not_priced"


class NotFound(ProxyError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"
    message = "Not found."


class MethodNotAllowed(ProxyError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    message = "Method not allowed on this route."


class Conflict(ProxyError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTooLarge(ProxyError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class TooManyFailedAuthentications(ProxyError):
    status_code = 429
    type = "rate_limit_exceeded"
    code = "too_many_failed_authentications"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "Too many failed authentications from this address; keys not already known to "
            f"the proxy are refused for {retry_after} s. Check the proxy key you send."
        )
        self.headers = ((b"retry-after", str(retry_after).encode()),)


class RateLimitExceeded(ProxyError):
    """Over a tenant's or key's requests or tokens per minute; `type` is `requests` or
    `tokens` as in OpenAI's own 429, and the headers are OpenAI's (`proxy.ratelimit`)."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(message)
        self.type = kind
        self.headers = headers


class ValidationFailed(ProxyError):
    status_code = 422
    type = "invalid_request_error"
    code = "invalid_request"


class OpenAIKeyForbidden(ValidationFailed):
    code = "openai_key_forbidden"


class KeyDecryptionFailed(ProxyError):
    code = "key_decryption_failed"
    message = (
        "The stored OpenAI key could not be decrypted (wrong ENCRYPTION_KEY or tampered "
        "data). The operator has been alerted; re-register the key if this persists."
    )


class UpstreamUnreachable(ProxyError):
    status_code = 502
    code = "upstream_unreachable"
    message = "The upstream OpenAI API could not be reached."


class PlatformKeyRejected(ProxyError):
    status_code = 502
    code = "platform_key_rejected"
    message = "The platform's OpenAI key was rejected upstream; the operator must replace it."


class OpenAIUnreachable(ProxyError):
    status_code = 503
    code = "openai_unreachable"
    message = "OpenAI could not be reached to validate the key; nothing was stored. Retry later."


class ServiceUnavailable(ProxyError):
    status_code = 503
    code = "service_unavailable"


RETRY_SOON = ((b"retry-after", b"1"),)  # a 503 the caller may retry in a second


class StoreUnavailable(ServiceUnavailable):
    code = "store_unavailable"
    message = (
        "The proxy's database is slow or unreachable, and this request needs it. "
        "Retry after the number of seconds in Retry-After."
    )
    headers = RETRY_SOON


class RateLimiterUnavailable(ServiceUnavailable):
    code = "rate_limiter_unavailable"
    message = (
        "The proxy's rate limiter (Redis) is unreachable and the proxy is set to refuse "
        "requests then (rate_limits.fail: closed). Retry after the number of seconds in "
        "Retry-After."
    )
    headers = RETRY_SOON


class ProxyOverloaded(ServiceUnavailable):
    code = "proxy_overloaded"
    message = (
        "The proxy has run out of file descriptors (too many open connections) and could not "
        "reach the upstream. Retry after the number of seconds in Retry-After."
    )
    headers = RETRY_SOON


class UpstreamTimeout(ProxyError):
    status_code = 504
    code = "upstream_timeout"
    message = "The upstream OpenAI API did not answer in time."
