"""Operations: health, readiness, Prometheus metrics, several workers, graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
from fake_openai import STREAM_CHUNKS, start_fake
from helpers import ADMIN_TOKEN
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, serve, serve_env, until, until_both_workers
from stack import Stack

from proxy.cpus import usable_cpus

SHUTDOWN_YAML = "server:\n  shutdown_timeout_seconds: 20\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_count(text: str, tenant: str, status: str, path: str) -> float:
    key = ("byok_requests_total", (("path", path), ("status", status), ("tenant", tenant)))
    return samples(text).get(key, 0.0)


def tokens_count(text: str, tenant: str, kind: str) -> float:
    return samples(text).get(("byok_tokens_total", (("kind", kind), ("tenant", tenant))), 0.0)


def test_health_and_readiness(stack: Stack) -> None:
    assert httpx.get(stack.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(stack.url + "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert r.headers["x-byok-request-id"].startswith("req_")


def test_readiness_fails_without_database(tmp_path: Path, master_key: str) -> None:
    db = tmp_path / "gone" / "e2e.db"
    db.parent.mkdir()
    stack = Stack(tmp_path, f"sqlite:///{db}", master_key)
    try:
        assert httpx.get(stack.url + "/readyz").status_code == 200
        stack.apps[0].runtime.store.engine.dispose()
        for f in db.parent.iterdir():
            f.unlink()
        db.parent.rmdir()
        r = httpx.get(stack.url + "/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert httpx.get(stack.url + "/healthz").status_code == 200
    finally:
        db.parent.mkdir()
        stack.close()


def test_metrics_move_with_requests(stack: Stack) -> None:
    key = stack.tenant("acme")
    before = httpx.get(stack.url + "/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    for _ in range(3):
        httpx.post(
            stack.url + "/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"Authorization": f"Bearer {key}"},
        )
    httpx.post(
        stack.url + "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"Authorization": "Bearer byok-nope"},
    )
    after = httpx.get(stack.url + "/metrics").text
    assert (
        requests_count(after, "acme", "200", "/v1/chat/completions")
        - requests_count(before.text, "acme", "200", "/v1/chat/completions")
        == 3
    )
    assert requests_count(after, "unknown", "401", "/v1/chat/completions") == 1
    assert tokens_count(after, "acme", "prompt") - tokens_count(before.text, "acme", "prompt") == 33
    assert tokens_count(after, "acme", "completion") == 21
    hist = samples(after)
    assert hist[("byok_request_duration_seconds_count", (("path", "/v1/chat/completions"),))] == 4
    assert hist[("byok_upstream_ttfb_seconds_count", (("path", "/v1/chat/completions"),))] == 3
    assert ("byok_open_streams", ()) in hist


def test_metrics_can_require_the_admin_token(tmp_path: Path, master_key: str) -> None:
    with Stack.sqlite(
        tmp_path, master_key, yaml="metrics:\n  require_admin_token: true\n"
    ) as stack:
        r = httpx.get(stack.url + "/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = httpx.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200


def test_metrics_add_up_across_workers(tmp_path: Path, database_url: str, master_key: str) -> None:
    fake, fake_server = start_fake()
    env = serve_env(tmp_path, master_key, database_url, fake.base_url, SHUTDOWN_YAML)
    port = free_port()
    with fake_server, serve(["--workers", "2"], env, tmp_path, port, tmp_path / "serve.log"):
        url = f"http://127.0.0.1:{port}"
        key = httpx.post(
            url + "/api/v1/tenants",
            json={"name": "T", "tier": "trial", "id": "t"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ).json()["api_key"]

        def models() -> int:
            with httpx.Client() as client:  # a new connection each time
                return client.get(
                    url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
                ).status_code

        sent = until_both_workers(tmp_path / "prom", models, 200)
        for _ in range(4):  # whichever worker answers the scrape, it reports all of them
            with httpx.Client() as client:
                scrape = client.get(url + "/metrics").text
                assert requests_count(scrape, "t", "200", "/v1/models") == sent
    lines = (tmp_path / "usage.jsonl").read_text().splitlines()
    assert len(lines) == sent


def test_sigterm_lets_streams_finish(tmp_path: Path, master_key: str) -> None:
    """SIGTERM mid-stream: new connections refused, the stream completes, its line is written."""
    fake, fake_server = start_fake()
    env = serve_env(
        tmp_path, master_key, f"sqlite:///{tmp_path / 's.db'}", fake.base_url, SHUTDOWN_YAML
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    received: list[bytes] = []
    with fake_server, serve([], env, tmp_path, port, tmp_path / "serve.log") as proc:
        key = httpx.post(
            url + "/api/v1/tenants",
            json={"name": "T", "tier": "trial", "id": "t"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ).json()["api_key"]

        def stream() -> None:
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                timeout=30,
                json={"model": "hold", "messages": [], "stream": True},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                for block in r.iter_raw():
                    received.append(block)

        reader = threading.Thread(target=stream)
        reader.start()
        assert fake.first_chunk_sent.wait(10)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                httpx.get(url + "/healthz", timeout=1)
                time.sleep(0.05)
            except httpx.ConnectError:
                refused = True
            except (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError):
                pass  # queued just before the listener closed, and never served: try again
        assert refused, "new connections were still accepted after SIGTERM"
        assert proc.poll() is None, "the server quit with a stream in flight"
        fake.release.set()
        reader.join(10)
        assert proc.wait(15) is not None
    body = b"".join(received)
    assert body.count(b"data: ") == STREAM_CHUNKS + 3 and body.endswith(b"data: [DONE]\n\n")
    lines = [json.loads(x) for x in (tmp_path / "usage.jsonl").read_text().splitlines()]
    streamed = [x for x in lines if x["stream"]]
    assert len(streamed) == 1 and streamed[0]["status"] == 200
    assert streamed[0]["total_tokens"] == 18 and streamed[0]["client_disconnected"] is False


def _worker_children(pid: int) -> int:
    """How many uvicorn worker processes (multiprocessing spawn children) `pid` has."""
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        count += ppid == pid and b"spawn_main" in cmdline
    return count


def test_workers_auto_starts_one_per_usable_cpu(
    tmp_path: Path, database_url: str, master_key: str
) -> None:
    cpus = usable_cpus()
    env = serve_env(tmp_path, master_key, database_url, "http://127.0.0.1:9/v1")
    port = free_port()
    with serve(["--workers", "auto"], env, tmp_path, port, tmp_path / "serve.log") as proc:
        expected = cpus if cpus > 1 else 0  # one worker runs in the `serve` process itself
        until(lambda: _worker_children(proc.pid) == expected, 60, "worker count")
        for _ in range(10):  # and stays there: no extra worker appears late
            assert _worker_children(proc.pid) == expected
            time.sleep(0.05)
