"""The HTTP server layer against hostile connections (proxy.server), on the real server.

Each test starts `byok-proxy serve` (one worker: uvicorn serves in the `serve`
process itself) in front of the fake OpenAI, and attacks it with raw sockets on
loopback, bounded in bytes and time.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
from fake_openai import FakeOpenAI, start_fake
from helpers import ADMIN_TOKEN
from servers import free_port, serve, serve_env, wait_until_up

from proxy.server import HttpLimits, out_of_descriptors

HOST = "127.0.0.1"
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


@dataclass
class Served:
    pid: int
    port: int
    fake: FakeOpenAI
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextmanager
def running(
    tmp_path: Path, master_key: str, env: dict[str, str] | None = None, yaml: str = ""
) -> Iterator[Served]:
    fake, fake_server = start_fake()
    full_env = serve_env(
        tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", fake.base_url, yaml
    )
    full_env.update(env or {})
    port = free_port()
    log = tmp_path / "serve.log"
    with fake_server, serve([], full_env, tmp_path, port, log) as proc:
        yield Served(proc.pid, port, fake, log)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # answered `Connection: close`, then closed the connection

    @property
    def error(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/json"
        error: dict[str, object] = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
        return error


def read_answer(sock: socket.socket, timeout: float = 5.0) -> Answer:
    """One HTTP response from `sock`, then whether the server closed the connection
    (within `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer (got {data!r})"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the body"
        rest += chunk
    body, extra = rest[:length], rest[length:]
    closed = False
    if headers.get("connection") == "close":  # then it must close, within `timeout`
        try:
            closed = not extra and sock.recv(1) == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return Answer(int(lines[0].split()[1]), headers, body, closed)


def ask(port: int, request: bytes, timeout: float = 5.0) -> Answer:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_answer(sock, timeout)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def create_tenant(url: str) -> str:
    r = httpx.post(
        url + "/api/v1/tenants",
        json={"name": "T", "tier": "trial", "id": "t"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 201, r.text
    key: str = r.json()["api_key"]
    return key


# --- head size ------------------------------------------------------------------------


def test_endless_header_is_refused_while_the_server_stays_responsive(
    tmp_path: Path, master_key: str
) -> None:
    per_socket = 32 * 1024 * 1024  # 4 sockets x 3 rounds x up to 32 MiB of header value
    rounds = 3
    chunk = b"a" * (1024 * 1024)
    answers: list[Answer | str] = []
    with running(tmp_path, master_key) as served:
        baseline = rss_kib(served.pid)

        def attack() -> None:
            for _ in range(rounds):
                with socket.create_connection((HOST, served.port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy.test\r\nX-Big: ")
                    sent, deadline = 0, time.monotonic() + 8
                    while sent < per_socket and time.monotonic() < deadline:
                        readable, writable, _ = select.select([sock], [sock], [], 0.5)
                        if readable:
                            break  # the server answered (or closed)
                        if writable:
                            try:
                                sent += sock.send(chunk)
                            except OSError:
                                break
                    try:
                        answers.append(read_answer(sock, timeout=2))
                    except (OSError, AssertionError) as exc:
                        answers.append(f"no answer after {sent} bytes: {exc!r}")

        attackers = [threading.Thread(target=attack) for _ in range(4)]
        for t in attackers:
            t.start()
        probes: list[float] = []
        peak = baseline
        while any(t.is_alive() for t in attackers) or len(probes) < 10:
            started = time.monotonic()
            with httpx.Client() as client:
                assert client.get(served.url + "/healthz", timeout=5).status_code == 200
            probes.append(time.monotonic() - started)
            peak = max(peak, rss_kib(served.pid))
            assert len(probes) < 2000
        for t in attackers:
            t.join()

        assert len(answers) == 4 * rounds
        for answer in answers:
            assert isinstance(answer, Answer), answer
            assert answer.status == 431 and answer.closed
            assert answer.headers["connection"] == "close"
            assert answer.error["code"] == "request_header_too_large"
            assert answer.error["type"] == "invalid_request_error"
        assert max(probes) < 1.0, probes
        assert peak - baseline < 48 * 1024, f"RSS grew by {(peak - baseline) // 1024} MiB"


def test_head_limits_are_per_request_and_spare_bodies(tmp_path: Path, master_key: str) -> None:
    with running(tmp_path, master_key) as served:
        # 101 headers (Host + 100): 431; 100 headers: served.
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(100))
        answer = ask(served.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
        assert answer.status == 431 and answer.closed
        assert answer.error["code"] == "request_header_too_large"
        assert "headers" in str(answer.error["message"])
        ok = ask(served.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + many[:-10] + b"\r\n")
        assert ok.status == 200

        # A URL over 16 KiB: 414.
        answer = ask(
            served.port, b"GET /healthz?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        assert answer.status == 414 and answer.closed
        assert answer.error["code"] == "request_uri_too_long"

        # One header over 64 KiB, sent whole: 431.
        big = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        answer = ask(served.port, big)
        assert answer.status == 431 and answer.error["code"] == "request_header_too_large"

        # A 60 KiB head followed by a 300 KiB body in the same writes is within the limit,
        # and the count starts again for the next request on the connection.
        head = b"X-Big: " + b"a" * 60_000 + b"\r\n"
        post = b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n" + head
        with socket.create_connection((HOST, served.port), timeout=5) as sock:
            for _ in range(2):
                sock.sendall(post + b"\r\n" + b"b" * 300_000)
                answer = read_answer(sock, timeout=0.5)
                assert answer.status not in (400, 414, 431) and not answer.closed, answer
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n")
            assert read_answer(sock, timeout=0.5).status == 200


# --- head timeout ---------------------------------------------------------------------


def test_silent_and_half_sent_connections_are_closed(tmp_path: Path, master_key: str) -> None:
    env = {"BYOK_HTTP_HEAD_TIMEOUT": "1"}
    with running(tmp_path, master_key, env) as served:
        silent = socket.create_connection((HOST, served.port), timeout=10)
        half = socket.create_connection((HOST, served.port), timeout=10)
        trickle = socket.create_connection((HOST, served.port), timeout=10)
        started = time.monotonic()
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        try:
            # A byte a second: the timeout counts from the start, not from the last byte.
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: lo":
                trickle.sendall(bytes([byte]))
                readable, _, _ = select.select([trickle], [], [], 0.3)
                if readable:
                    break
            answer = read_answer(trickle, timeout=8)
            assert answer.status == 408 and answer.closed
            assert answer.error["code"] == "request_timeout"

            answer = read_answer(half, timeout=8)
            assert answer.status == 408 and answer.closed
            assert answer.error["code"] == "request_timeout"

            assert silent.recv(1) == b""  # closed without a word
            assert 0.8 < time.monotonic() - started < 8
        finally:
            for sock in (silent, half, trickle):
                sock.close()
        # A keep-alive connection: the clock starts again after the response.
        with socket.create_connection((HOST, served.port), timeout=10) as sock:
            sock.sendall(HEALTH)
            assert read_answer(sock, timeout=0.5).status == 200
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            answer = read_answer(sock, timeout=8)
            assert answer.status == 408 and answer.closed


# --- connection cap -------------------------------------------------------------------


def test_connections_over_the_cap_get_503(tmp_path: Path, master_key: str) -> None:
    env = {"BYOK_HTTP_MAX_CONNECTIONS": "20"}
    with running(tmp_path, master_key, env) as served:
        held: list[socket.socket] = []
        try:
            for _ in range(20):  # each one served, and kept open (keep-alive)
                sock = socket.create_connection((HOST, served.port), timeout=5)
                held.append(sock)
                sock.sendall(HEALTH)
                answer = read_answer(sock, timeout=0.3)
                assert answer.status == 200
            answer = ask(served.port, HEALTH)
            assert answer.status == 503 and answer.closed
            assert answer.headers["retry-after"] == "1"
            assert answer.error["code"] == "too_many_connections"
            assert answer.error["type"] == "server_error"
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while (answer := ask(served.port, HEALTH)).status == 503:
            assert time.monotonic() < deadline, "still refused after the others closed"
            time.sleep(0.05)
        assert answer.status == 200


# --- unparseable requests -------------------------------------------------------------


SMUGGLED = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
INNER = b'{"model": "m", "messages": []}'
SMUGGLING = {
    "cl_and_te": SMUGGLED
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer %s\r\n\r\n"
    + b"%x\r\n" % len(INNER)
    + INNER
    + b"\r\n0\r\n\r\n",
    "two_content_lengths": SMUGGLED
    + b"Content-Length: %d\r\nContent-Length: 0\r\nAuthorization: Bearer %%s\r\n\r\n" % len(INNER)
    + INNER,
    "te_not_chunked_last": SMUGGLED
    + b"Transfer-Encoding: chunked, identity\r\nAuthorization: Bearer %s\r\n\r\n"
    + b"%x\r\n" % len(INNER)
    + INNER
    + b"\r\n0\r\n\r\n",
}


def test_request_smuggling_gets_json_400_and_never_reaches_upstream(
    tmp_path: Path, master_key: str
) -> None:
    with running(tmp_path, master_key) as served:
        key = create_tenant(served.url).encode()
        honest = SMUGGLED + b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n" % (
            len(INNER),
            key,
        )
        assert ask(served.port, honest + INNER).status == 200
        assert len(served.fake.requests) == 1  # the fake records what reaches it
        for name, template in SMUGGLING.items():
            answer = ask(served.port, template.replace(b"%s", key))
            assert answer.status == 400 and answer.closed, name
            assert answer.headers["connection"] == "close"
            assert answer.error["code"] == "invalid_http_request", name
        assert len(served.fake.requests) == 1


# --- admin listener -------------------------------------------------------------------


def test_admin_listener_ignores_x_forwarded_for(tmp_path: Path, master_key: str) -> None:
    admin_port = free_port()
    with running(tmp_path, master_key, yaml=f"admin:\n  port: {admin_port}\n") as served:
        admin = f"http://{HOST}:{admin_port}"
        wait_until_up(admin + "/api/v1/tenants")
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        forged = {**auth, "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
        r = httpx.post(
            admin + "/api/v1/tenants",
            json={"name": "T", "tier": "trial", "id": "t"},
            headers=forged,
        )
        assert r.status_code == 201, r.text
        assert "date" not in r.headers and "server" not in r.headers
        events = httpx.get(admin + "/api/v1/tenants/t/audit", headers=auth).json()["data"]
        assert events and {e["source_ip"] for e in events} == {"127.0.0.1"}
        # The admin listener has the same protocol: JSON 400 for an unparseable request.
        answer = ask(admin_port, SMUGGLING["two_content_lengths"].replace(b"%s", b"x"))
        assert answer.status == 400 and answer.error["code"] == "invalid_http_request"
        assert served.port != admin_port


# --- body limits: JSON (read whole) vs streamed uploads --------------------------------

LIMITS = "limits:\n  max_body_bytes: 1000\n  max_upload_bytes: 5000\n"


def test_streamed_uploads_have_their_own_larger_limit(tmp_path: Path, master_key: str) -> None:
    from servers import create_tenant as create_with_key
    from stack import TENANT_KEY

    with running(tmp_path, master_key, yaml=LIMITS) as served:
        key = create_with_key(served.url, "up", openai_key=TENANT_KEY)
        auth = {"Authorization": f"Bearer {key}"}

        def upload(body: bytes | Iterator[bytes], content_type: str | None) -> httpx.Response:
            headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
            return httpx.post(served.url + "/v1/files", content=body, headers=headers)

        # Over the JSON limit, under the upload limit: multipart (with a Content-Length),
        # chunked octets, and a body with no content type all reach the upstream whole.
        form = httpx.Request(
            "POST", "http://x", files={"file": ("a.jsonl", b"f" * 3000)}, data={"purpose": "batch"}
        )
        multipart = upload(form.read(), form.headers["content-type"])
        assert multipart.status_code == 200, multipart.text
        assert served.fake.requests[-1].body == form.read()
        chunked = upload(iter([b"o" * 2000, b"o" * 2000]), "application/octet-stream")
        assert chunked.status_code == 200, chunked.text
        assert served.fake.requests[-1].body == b"o" * 4000
        assert upload(b"n" * 4000, None).status_code == 200
        seen = len(served.fake.requests)

        # JSON bodies keep the lower limit.
        json_body = json.dumps({"model": "m", "messages": [], "pad": "j" * 2000}).encode()
        for body in (json_body, iter([json_body])):
            answer = httpx.post(
                served.url + "/v1/chat/completions",
                content=body,
                headers={**auth, "Content-Type": "application/json"},
            )
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"]["code"] == "request_too_large"
            assert "1000-byte" in answer.json()["error"]["message"]

        # Over the upload limit: 413 in OpenAI's shape, declared or found while streaming.
        for body in (b"u" * 6000, iter([b"u" * 3000] * 2)):
            over = upload(body, "application/octet-stream")
            assert over.status_code == 413, over.text
            error = over.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "request_too_large" and "5000-byte" in error["message"]
            assert error["type"] == "invalid_request_error"
        # Nothing over a limit arrived whole (a streamed one may have started upstream:
        # the proxy forwards as it reads, then cuts the upstream request short).
        assert all(len(r.body) < 6000 for r in served.fake.requests[seen:])

        # One chunk already over the limit (no Content-Length): refused before any upstream
        # connection, so the upstream sees none of it (the cut-short uploads above may still
        # be landing there: this one is told apart by its bytes).
        over = upload(iter([b"w" * 6000]), "application/octet-stream")
        assert over.status_code == 413, over.text
        time.sleep(0.5)  # what a forwarded start would need to reach the fake
        assert not any(r.body.startswith(b"w") for r in served.fake.requests)


# --- units ----------------------------------------------------------------------------


def test_out_of_descriptors() -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    enfile = OSError(errno.ENFILE, "Too many open files in system")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert out_of_descriptors(emfile) and out_of_descriptors(enfile)
    assert not out_of_descriptors(refused) and not out_of_descriptors(ValueError("x"))

    key = aiohttp.client_reqrep.ConnectionKey("api.openai.com", 443, True, True, None, None, None)
    assert out_of_descriptors(aiohttp.ClientConnectorError(key, emfile))
    assert not out_of_descriptors(aiohttp.ClientConnectorError(key, refused))

    class Wrapped(Exception):  # carries the OSError only as `os_error`, like aiohttp's
        def __init__(self, os_error: OSError) -> None:
            super().__init__("connect failed")
            self.os_error = os_error

    assert out_of_descriptors(Wrapped(emfile)) and not out_of_descriptors(Wrapped(refused))

    def raised(outer: BaseException, inner: BaseException, cause: bool) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                if cause:
                    raise outer from exc
                raise outer  # noqa: B904 (an implicit __context__ is the point)
        except BaseException as exc:
            return exc

    wrapped = aiohttp.ClientConnectorError(key, emfile)
    assert out_of_descriptors(raised(RuntimeError("upstream"), wrapped, cause=True))
    assert out_of_descriptors(raised(RuntimeError("upstream"), enfile, cause=False))
    assert not out_of_descriptors(raised(RuntimeError("upstream"), refused, cause=True))
    assert out_of_descriptors(ExceptionGroup("many", [ValueError("a"), emfile]))
    cyclic = RuntimeError("a")
    cyclic.__context__ = RuntimeError("b")
    cyclic.__context__.__context__ = cyclic
    assert not out_of_descriptors(cyclic)


def test_http_limits_from_env() -> None:
    assert HttpLimits.from_env({}) == HttpLimits()
    limits = HttpLimits(max_head_bytes=1000, head_timeout=1.5, max_connections=7)
    assert HttpLimits.from_env(limits.to_env()) == limits
    assert HttpLimits.from_env({"BYOK_HTTP_MAX_HEADERS": " 12 "}).max_headers == 12
    with pytest.raises(ValueError, match="BYOK_HTTP_MAX_CONNECTIONS"):
        HttpLimits.from_env({"BYOK_HTTP_MAX_CONNECTIONS": "many"})
    with pytest.raises(ValueError, match="BYOK_HTTP_MAX_HEAD_BYTES"):
        HttpLimits.from_env({"BYOK_HTTP_MAX_HEAD_BYTES": "0"})
    assert 1 <= HttpLimits(max_connections=10**9).connection_cap() < 10**9
    assert HttpLimits(max_connections=5).connection_cap() == 5


def test_a_streamed_body_over_the_limit_in_its_first_chunk_sends_nothing() -> None:
    """uvicorn may hand several network reads over as one first chunk: a first chunk
    already past the upload limit is refused before any of it goes upstream."""
    import asyncio

    from proxy.downstream import stream_body
    from proxy.errors import RequestTooLarge

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def consume(first: bytes) -> tuple[list[bytes], list[Exception]]:
        sent: list[bytes] = []
        failure: list[Exception] = []
        with pytest.raises(RequestTooLarge):
            async for chunk in stream_body(receive, first, 5000, failure):
                sent.append(chunk)
        return sent, failure

    sent, failure = asyncio.run(consume(b"u" * 6000))
    assert sent == [] and isinstance(failure[0], RequestTooLarge)
