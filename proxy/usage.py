"""The usage line: one JSON object per /v1 request, written when the request ends.

Fields (stable; documented in the README for dashboard authors): `ts`,
`request_id`, `tenant_id`, `method`, `path`, `model`, `stream`, `status`,
`upstream_status`, `duration_ms`, `ttfb_ms`, `prompt_tokens`,
`completion_tokens`, `total_tokens`, `key_source`, `error_code`,
`client_disconnected`, `cost_usd` (null when the price is unknown: `proxy.prices`),
`api_key_id` (null when no key was recognised).

Caller-chosen fields (`path`, `model`) are cut to a bounded length, so a
line always stays under 4 KiB and is written whole (`proxy.usage_sink`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]

from proxy.streaming import Usage


@dataclass(slots=True)
class UsageRecord:
    """What is known about one proxied request; filled in as it goes."""

    request_id: str
    method: str
    path: str
    started: float  # time.perf_counter() at arrival
    ts: float  # time.time() at arrival
    tenant_id: str | None = None
    model: str | None = None
    stream: bool = False
    status: int | None = None
    upstream_status: int | None = None
    duration_ms: float | None = None
    ttfb_ms: float | None = None
    usage: Usage | None = None
    key_source: str | None = None
    error_code: str | None = None
    client_disconnected: bool = False
    api_key_id: str | None = None
    cost_nanos: int | None = None  # 1e-9 USD, from `proxy.prices`
    table_priced: bool = True  # False: a service tier the price table does not cover

    def line(self) -> bytes:
        """The JSON line (with newline); hand-assembled, it runs once per request."""
        usage = self.usage or _NO_USAGE
        seconds = int(self.ts)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        millis = int((self.ts - seconds) * 1000)
        return (
            f'{{"ts":"{ts}.{millis:03d}Z","request_id":{_str(self.request_id)},'
            f'"tenant_id":{_str(self.tenant_id)},"method":{_str(self.method)},'
            f'"path":{_capped(self.path, _MAX_PATH)},"model":{_capped(self.model, _MAX_MODEL)},'
            f'"stream":{_BOOL[self.stream]},"status":{_num(self.status)},'
            f'"upstream_status":{_num(self.upstream_status)},'
            f'"duration_ms":{_num(self.duration_ms)},"ttfb_ms":{_num(self.ttfb_ms)},'
            f'"prompt_tokens":{_num(usage.prompt_tokens)},'
            f'"completion_tokens":{_num(usage.completion_tokens)},'
            f'"total_tokens":{_num(usage.total_tokens)},"key_source":{_str(self.key_source)},'
            f'"error_code":{_str(self.error_code)},'
            f'"client_disconnected":{_BOOL[self.client_disconnected]},'
            f'"cost_usd":{_usd(self.cost_nanos)},"api_key_id":{_str(self.api_key_id)}}}\n'
        ).encode()


_NO_USAGE = Usage()
_MAX_PATH = 256  # characters (and 1 KiB escaped): a line stays under 4 KiB (`proxy.usage_sink`)
_MAX_MODEL = 128  # characters (and 512 bytes escaped)
_BOOL = {True: "true", False: "false"}


def _str(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _capped(value: str | None, chars: int) -> str:
    """`value` as JSON, cut to `chars` characters and to `chars * 4` bytes once escaped
    (non-ASCII is \\u-escaped, up to 12 bytes a character): a line stays under 4 KiB."""
    if value is None:
        return "null"
    budget = chars * 4
    text = encode_basestring_ascii(value[:chars])
    while len(text) > budget:
        chars //= 2
        text = encode_basestring_ascii(value[:chars])
    return text  # type: ignore[no-any-return]


def _usd(nanos: int | None) -> str:
    """Nano-USD as a JSON number of dollars, exact to the nano (no float rounding noise)."""
    if nanos is None:
        return "null"
    whole, frac = divmod(nanos, 1_000_000_000)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)


def _num(value: float | None) -> str:
    return "null" if value is None else repr(value)
