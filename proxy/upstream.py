"""The upstream side: the pooled HTTP client, the fixed target URL, faithful request headers.

The client is aiohttp, not httpx: on these machines httpx's connection pool
costs about 2.4 ms of CPU per request at 64 concurrent requests (its pool
bookkeeping grows with the square of the pool, encode/httpcore#1035), while
aiohttp's costs a small fraction of that (see README, Performance). It is set
up to add nothing the caller did not send (no default `Accept`,
`Accept-Encoding`, `User-Agent` or `Content-Type`), keep no cookies between
tenants, never follow redirects, and pass compressed bodies through as-is.

The upstream URL is `OPENAI_BASE_URL` plus the caller's path below `/v1/`,
taken from the raw request target. A path that could climb out of `/v1/`
(dot segments, encoded slashes or backslashes, encoded dots) is refused, so no
request can send a tenant's key anywhere but the configured upstream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import aiohttp
from yarl import URL

from proxy.asgi import connection_tokens
from proxy.config import UpstreamConfig
from proxy.errors import BadRequest

# Cookie: OpenAI's API takes none, and the console's session cookie (Path=/, by its
# __Host- prefix) could otherwise ride along on a browser's call to /v1 on its origin.
_NEVER_FORWARD = frozenset({b"host", b"authorization", b"content-length", b"expect", b"cookie"})
_ORG_HEADERS = frozenset({b"openai-organization", b"openai-project"})
# %2e (.), %2f (/), %5c (\), raw backslash: ways to smuggle a dot segment or a slash.
_SUSPICIOUS = re.compile(rb"%(2e|2f|5c)|\\", re.IGNORECASE)


def make_client(config: UpstreamConfig) -> aiohttp.ClientSession:
    """The one pooled client of a worker (made in the lifespan)."""
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=config.max_connections,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=config.pool_timeout + config.connect_timeout,  # a pool wait, then connect
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        auto_decompress=False,
        trust_env=False,
        requote_redirect_url=False,
    )


def target_url(base_url: str, raw_path: bytes, query: bytes) -> URL:
    """The upstream URL for a `/v1/...` request target; 400 for anything that could escape."""
    if not raw_path.startswith(b"/v1/"):
        raise BadRequest("The request path must start with /v1/.", code="invalid_path")
    rest = raw_path[4:]  # after b"/v1/"
    if (b"%" in rest or b"\\" in rest or b"." in rest) and (
        _SUSPICIOUS.search(rest) or any(seg in (b".", b"..") for seg in rest.split(b"/"))
    ):
        raise BadRequest(
            "The request path may not contain dot segments or encoded slashes.",
            code="invalid_path",
        )
    url = f"{base_url}/{rest.decode('latin-1')}"
    if query:
        url += "?" + query.decode("latin-1")
    return URL(url, encoded=True)


def request_headers(
    headers: Sequence[tuple[bytes, bytes]], authorization: str, *, keep_org: bool = True
) -> list[tuple[str, str]]:
    """The caller's headers minus hop-by-hop and credentials, plus the upstream key.

    `Content-Length` is set by the client from the body it sends. With
    `keep_org=False` (platform key), the caller may not pick an OpenAI
    organization or project.
    """
    drop = connection_tokens(headers) | _NEVER_FORWARD
    if not keep_org:
        drop = drop | _ORG_HEADERS
    try:
        # UTF-8 both ways: the client writes str headers as UTF-8, so these bytes go on
        # exactly as they came. Bytes that are not UTF-8 could not: refused, not altered.
        out = [
            (name.decode("latin-1"), value.decode("utf-8"))
            for name, value in headers
            if name.lower() not in drop
        ]
    except UnicodeDecodeError:
        raise BadRequest(
            "A request header value is not valid UTF-8; the proxy passes header bytes on "
            "unchanged and cannot pass these.",
            code="invalid_header",
        ) from None
    out.append(("Authorization", authorization))
    return out


_READABLE = frozenset({"gzip", "deflate", "identity"})


def readable_accept_encoding(headers: list[tuple[str, str]], *, identity: bool) -> None:
    """Narrow `Accept-Encoding` (in place) to codings the proxy can read for usage.

    The proxy must find `usage` in every response (it bills the platform key and
    feeds the usage log), and it reads gzip and deflate, not br or zstd. With
    `identity=True` (streams, the platform key) it asks for no compression.
    A request without the header is left without it (nothing is added).
    """
    for i, (name, value) in enumerate(headers):
        if name.lower() == "accept-encoding":
            if identity:
                headers[i] = (name, "identity")
                continue
            kept = [
                t.strip() for t in value.split(",") if t.split(";")[0].strip().lower() in _READABLE
            ]
            headers[i] = (name, ", ".join(kept) or "identity")
            return


def response_headers(
    headers: Sequence[tuple[bytes, bytes]],
    extra: tuple[bytes, bytes],
    *,
    body_changed: bool,
    length: int | None = None,
    added: Sequence[tuple[bytes, bytes]] = (),
    added_names: frozenset[bytes] | None = None,
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers to pass back, then `extra` (our request id) and `added`
    (rate-limit state, budget warnings), which replace the upstream's of the same name
    (`added_names`: those names, when the caller knows them already).

    All but hop-by-hop headers, repeats and order kept. When the proxy changes
    the body (the removed usage chunk), `Content-Length` goes too; with
    `length` (a replaced, plain body) it is set to that, and `Content-Encoding` goes.
    """
    drop = connection_tokens(headers)
    if body_changed:
        drop = drop | {b"content-length"}
    if length is not None:
        drop = drop | {b"content-encoding"}
    if added:
        drop = drop | (added_names or {name for name, _ in added})
    kept = [(name, value) for name, value in headers if name.lower() not in drop]
    if length is not None:
        kept.append((b"content-length", str(length).encode()))
    kept.append(extra)
    kept += added
    return kept
