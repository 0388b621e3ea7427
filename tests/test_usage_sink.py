"""The usage log sink under faults: several workers on one pipe, a removed directory, a full
disk, a stalled sink, a crash. Every line arrives whole; what cannot be written is counted."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fake_openai import start_fake
from helpers import bearer
from servers import create_tenant, free_port, serve, serve_env, until, wait_until_up
from stack import TENANT_KEY

from proxy import usage_sink
from proxy.usage import UsageRecord
from proxy.usage_sink import UsageLog

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _tenant(url: str, tid: str = "acme") -> str:
    return create_tenant(url, tid, openai_key=TENANT_KEY)


def _chat(client: httpx.Client, url: str, key: str) -> str:
    r = client.post(url + "/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.headers["x-byok-request-id"]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


@pytest.fixture
def upstream() -> Iterator[str]:
    fake, server = start_fake()
    with server:
        yield fake.base_url


def test_four_workers_on_one_pipe_write_whole_lines(
    tmp_path: Path, master_key: str, upstream: str
) -> None:
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", upstream)
    env["USAGE_LOG"] = "-"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "USAGE_LOG")}
    full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "4"],
        cwd=tmp_path,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    out = bytearray()

    def read() -> None:  # a slow reader: the pipe is often full, so big writes would split
        assert proc.stdout is not None
        while block := proc.stdout.read1(2048):
            out.extend(block)
            time.sleep(0.01)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until_up(url + "/healthz", proc, timeout=120)
        key = _tenant(url)
        # Long lines (a long path, a long model name) make each batch far over 4 KiB.
        body = {**CHAT, "model": "m" * 120}

        def burst(_: int) -> int:
            with httpx.Client(timeout=30) as client:
                for _ in range(250):
                    r = client.post(
                        url + "/v1/chat/completions?x=1", json=body, headers=bearer(key)
                    )
                    assert r.status_code == 200
            return 250

        with ThreadPoolExecutor(8) as pool:
            sent = sum(pool.map(burst, range(8)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=30)
    lines = [line for line in bytes(out).split(b"\n") if line]
    parsed = [json.loads(line) for line in lines]  # every line whole
    chats = [p for p in parsed if p.get("path") == "/v1/chat/completions"]
    assert len(chats) == sent == 2000
    assert len({p["request_id"] for p in chats}) == sent


def test_removed_log_directory_is_reported_and_healed(
    tmp_path: Path, master_key: str, upstream: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", upstream)
    env["USAGE_LOG"] = str(logs / "usage.jsonl")
    env.pop("PROMETHEUS_MULTIPROC_DIR")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve([], env, tmp_path, port, tmp_path / "serve.log"), httpx.Client() as client:
        key = _tenant(url)
        _chat(client, url, key)
        shutil.rmtree(logs)
        during = [_chat(client, url, key) for _ in range(20)]  # still served
        until(lambda: client.get(url + "/readyz").status_code != 200, 10, "readyz never noticed")
        r = client.get(url + "/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "usage_log_unwritable"
        assert "byok_usage_log_writable 0.0" in client.get(url + "/metrics").text
        logs.mkdir()
        after = [_chat(client, url, key) for _ in range(5)]
        until(lambda: client.get(url + "/readyz").status_code == 200, 10, "never healed")
        assert "byok_usage_log_writable 1.0" in client.get(url + "/metrics").text
        deadline = time.monotonic() + 10
        while True:
            written = {line["request_id"] for line in _lines(logs / "usage.jsonl")}
            if set(during + after) <= written or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert set(during + after) <= written  # queued while unwritable, written once healed


def test_full_disk_leaves_no_half_line_and_loses_nothing(
    tmp_path: Path, master_key: str, upstream: str
) -> None:
    usage = tmp_path / "usage.jsonl"
    usage.write_bytes(b'{"prefill":true}\n' * 30_000)  # ~510 KB
    limit = usage.stat().st_size + 8_000  # room for a dozen lines, then "disk full"
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", upstream)
    env.pop("PROMETHEUS_MULTIPROC_DIR")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve([], env, tmp_path, port, tmp_path / "serve.log") as proc, httpx.Client() as client:
        key = _tenant(url)
        # The file-size limit stands in for a full disk: writes past it are cut short, then
        # fail (EFBIG), like ENOSPC. The database files stay far below it.
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        sent = [_chat(client, url, key) for _ in range(60)]
        until(lambda: client.get(url + "/readyz").status_code != 200, 10, "readyz never noticed")
        assert usage.stat().st_size <= limit
        for line in usage.read_bytes().split(b"\n")[:-1]:
            json.loads(line)  # nothing half-written
        assert usage.read_bytes().endswith(b"\n")
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        until(lambda: client.get(url + "/readyz").status_code == 200, 10, "never healed")
        sent.append(_chat(client, url, key))
        deadline = time.monotonic() + 10
        while True:
            lines = _lines(usage)
            written = [x["request_id"] for x in lines if "request_id" in x]
            if set(sent) <= set(written) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert sorted(x for x in written if x in set(sent)) == sorted(sent)  # each once, none lost


def test_lines_of_finished_requests_survive_a_crash(
    tmp_path: Path, master_key: str, upstream: str
) -> None:
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db.sqlite'}", upstream)
    env.pop("PROMETHEUS_MULTIPROC_DIR")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve([], env, tmp_path, port, tmp_path / "serve.log") as proc, httpx.Client() as client:
        key = _tenant(url)
        sent = [_chat(client, url, key) for _ in range(50)]
        time.sleep(5 * usage_sink.FLUSH_SECONDS)  # the documented worst case, with margin
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    written = {line["request_id"] for line in _lines(tmp_path / "usage.jsonl")}
    assert set(sent) <= written


def _record(i: int) -> UsageRecord:
    return UsageRecord(f"req_{i}", "POST", "/v1/chat/completions", 0.0, 1.7e9)


async def test_a_stalled_sink_drops_counts_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    drops: list[int] = []
    log = UsageLog(str(tmp_path / "nowhere" / "u.jsonl"), max_queued=10, on_drop=drops.append)
    await log.start()
    assert not log.writable and log.problem and "cannot open" in log.problem
    for i in range(15):
        log.write(_record(i))
    assert len(log) == 10 and log.dropped == 5 and sum(drops) == 5
    assert any("USAGE LINES DROPPED" in r.message for r in caplog.records)
    (tmp_path / "nowhere").mkdir()
    await log.close()  # the queued lines are written once the sink is back
    assert [x["request_id"] for x in _lines(tmp_path / "nowhere" / "u.jsonl")] == [
        f"req_{i}" for i in range(10)
    ]


async def test_a_short_write_is_cut_back_to_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "u.jsonl"
    log = UsageLog(str(path))
    await log.start()
    room = [1000]  # bytes the "disk" still takes
    real_write = os.write

    def disk(fd: int, data: bytes) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: room[0]]))
        room[0] -= n
        return n

    monkeypatch.setattr(usage_sink.os, "write", disk)
    for i in range(20):
        log.write(_record(i))
    log._flush()
    assert not log.writable
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data) <= 1000
    first = [x["request_id"] for x in _lines(path)]
    room[0] = 10**9
    await log.close()
    assert [x["request_id"] for x in _lines(path)] == [f"req_{i}" for i in range(20)]
    assert first == [f"req_{i}" for i in range(len(first))]


def test_a_line_fits_one_atomic_write_whatever_the_caller_sends() -> None:
    record = UsageRecord("req_1", "POST", "/v1/" + "\U0001f600" * 5000, 0.0, 1.7e9)
    record.model, record.tenant_id = "\U0001f600\u0000" * 5000, "t" * 63
    line = record.line()
    assert len(line) < usage_sink._ATOMIC
    assert json.loads(line)["path"].startswith("/v1/\U0001f600")
