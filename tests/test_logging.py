"""Logging and log rotation on a real `byok-proxy serve --workers 2`.

- Every process's lines (supervisor, workers, the migration run) come out in the
  configured format: `timestamp level logger: message`, or JSON lines with `ts`,
  `level`, `logger`, `message` and the request's `request_id`.
- SIGHUP makes every worker reopen USAGE_LOG (no worker is replaced): after `mv`,
  old lines stay in the moved file, new ones go to the new file, none lost or cut.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fake_openai import start_fake
from helpers import bearer
from servers import create_tenant, free_port, serve, serve_env, until, wait_until_up
from stack import PLATFORM_KEY, TENANT_KEY

from proxy.config import Config, ConfigError, load_config
from proxy.usage import UsageRecord
from proxy.usage_sink import UsageLog

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


def _worker_of(request_id: str) -> str:
    """The per-process prefix of a request id (`req_` + 12 hex digits): who answered."""
    return request_id[:16]


def _chat(url: str, key: str, expected: int = 200) -> str:
    """One chat completion on a new connection; its request id."""
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=bearer(key), timeout=30)
    assert r.status_code == expected, r.text
    return r.headers["x-byok-request-id"]


def _chats_until_both_workers(url: str, key: str, at_least: int) -> list[str]:
    """Send at least `at_least` requests, and more until two workers have answered."""
    ids: list[str] = []
    while len(ids) < at_least or len({_worker_of(i) for i in ids}) < 2:
        assert len(ids) < at_least + 100, "one worker answered every request"
        ids.append(_chat(url, key))
    return ids


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode().splitlines() if path.exists() else []


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (the name the file had when it was opened
    follows a rename: /proc shows the current one)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return False  # exited
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def test_sighup_reopens_the_usage_log_in_every_worker(tmp_path: Path, master_key: str) -> None:
    fake, fake_server = start_fake()
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db'}", fake.base_url)
    usage, moved = tmp_path / "usage.jsonl", tmp_path / "usage.jsonl.1"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with fake_server, serve(["--workers", "2"], env, tmp_path, port, log) as proc:
        key = create_tenant(url, "acme", openai_key=TENANT_KEY)
        before = _chats_until_both_workers(url, key, 20)
        until(lambda: len(_lines(usage)) == len(before), 30, "lines before rotation written")
        workers = {pid for pid in _children(proc.pid) if _holds_open(pid, usage)}
        assert len(workers) == 2

        usage.rename(moved)
        proc.send_signal(signal.SIGHUP)
        # Each worker reopens at once, before any new line: the path exists again and
        # no worker holds the moved file open.
        until(
            lambda: usage.exists() and not any(_holds_open(pid, moved) for pid in workers),
            30,
            "workers did not reopen the usage log on SIGHUP",
        )
        after = _chats_until_both_workers(url, key, 40)
        until(lambda: len(_lines(usage)) == len(after), 30, "lines after rotation written")
        assert proc.poll() is None
        assert {pid for pid in _children(proc.pid) if _holds_open(pid, usage)} == workers

    old, new = _lines(moved), _lines(usage)
    assert len(old) + len(new) == len(before) + len(after)
    assert sorted(json.loads(line)["request_id"] for line in old) == sorted(before)
    assert sorted(json.loads(line)["request_id"] for line in new) == sorted(after)
    assert "restarting" not in log.read_text()


def _upstream_unreachable(
    yaml: str, tmp_path: Path, master_key: str, admin_port: int | None = None
) -> tuple[list[str], str]:
    """`serve --workers 2` with `yaml`, its upstream a closed loopback port: one chat
    (502 upstream_unreachable, logged by a worker). Returns the output lines and the
    request's id."""
    closed = f"http://127.0.0.1:{free_port()}/v1"
    env = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db'}", closed, yaml)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with serve(["--workers", "2"], env, tmp_path, port, log):
        admin = url if admin_port is None else f"http://127.0.0.1:{admin_port}"
        wait_until_up(admin + "/healthz")
        key = create_tenant(admin, "trial-t", tier="trial")  # served with PLATFORM_OPENAI_KEY
        request_id = _chat(url, key, expected=502)
        until(lambda: "upstream unreachable" in log.read_text(), 30, "no worker logged it")
    return log.read_text().splitlines(), request_id


def test_json_lines_from_every_process(tmp_path: Path, master_key: str) -> None:
    """Two workers and the admin API's own listener: every line is JSON."""
    admin_port = free_port()
    yaml = f"logging:\n  format: json\nadmin:\n  port: {admin_port}\n"
    lines, request_id = _upstream_unreachable(yaml, tmp_path, master_key, admin_port)
    records = [json.loads(line) for line in lines if line]  # every line is JSON
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys(), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", record["ts"])
    workers = [r for r in records if r["message"].startswith("Started server process")]
    assert len(workers) == 3 and all(r["logger"] == "uvicorn.error" for r in workers)
    unreachable = [r for r in records if r["message"].startswith("upstream unreachable")]
    assert len(unreachable) == 1
    assert unreachable[0]["level"] == "WARNING" and unreachable[0]["logger"] == "byok.proxy"
    assert unreachable[0]["request_id"] == request_id
    assert not any("request_id" in r for r in workers)  # not while handling a request
    assert PLATFORM_KEY[8:20] not in "\n".join(lines)


def test_text_lines_from_workers(tmp_path: Path, master_key: str) -> None:
    lines, _ = _upstream_unreachable("", tmp_path, master_key)
    workers = [line for line in lines if "Started server process" in line]
    assert len(workers) == 2
    unreachable = [line for line in lines if "upstream unreachable" in line]
    assert len(unreachable) == 1
    for line in [*workers, *unreachable]:
        assert TEXT_LINE.match(line), line
    assert " WARNING byok.proxy: upstream unreachable: " in unreachable[0]


async def test_sighup_reopens_a_sink_in_this_process(tmp_path: Path) -> None:
    """One worker (`serve` without --workers) is the process that gets SIGHUP: it lives
    on and reopens its file."""
    path, moved = tmp_path / "u.jsonl", tmp_path / "u.jsonl.1"
    sink = UsageLog(str(path))
    await sink.start()
    try:
        sink.write(_record("before"))
        await _until(lambda: len(_lines(path)) == 1)
        path.rename(moved)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(path.exists)  # reopened before any new line
        sink.write(_record("after"))
        await _until(lambda: len(_lines(path)) == 1)
    finally:
        await sink.close()
    assert [json.loads(line)["request_id"] for line in _lines(moved)] == ["before"]
    assert [json.loads(line)["request_id"] for line in _lines(path)] == ["after"]
    # Closed (a worker shutting down), it ignores SIGHUP: by default it would end the
    # process before the last lines are written.
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def _record(request_id: str) -> UsageRecord:
    return UsageRecord(request_id, "POST", "/v1/chat/completions", 0.0, 1.7e9)


async def _until(check: Callable[[], bool], within: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("yaml", "environ", "expected"),
    [
        ("", {}, ("INFO", "text")),
        ("logging:\n  level: debug\n  format: JSON\n", {}, ("DEBUG", "json")),
        ("log:\n  level: WARNING\n", {}, ("WARNING", "text")),  # the older setting
        (
            "logging:\n  format: json\n",
            {"LOG_FORMAT": "text", "LOG_LEVEL": "error"},
            ("ERROR", "text"),
        ),
    ],
)
def test_logging_settings(
    tmp_path: Path, master_key: str, yaml: str, environ: dict[str, str], expected: tuple[str, str]
) -> None:
    config = _load(tmp_path, master_key, yaml, environ)
    assert (config.log_level, config.log_format) == expected


@pytest.mark.parametrize("yaml", ["logging:\n  format: xml\n", "logging:\n  level: LOUD\n"])
def test_bad_logging_settings_are_one_line(tmp_path: Path, master_key: str, yaml: str) -> None:
    with pytest.raises(ConfigError, match=r"^logging\.(format|level) .*must be"):
        _load(tmp_path, master_key, yaml, {})


def _load(tmp_path: Path, master_key: str, yaml: str, environ: dict[str, str]) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(yaml)
    env = {"ENCRYPTION_KEY": master_key, "ADMIN_TOKEN": "adm-" + "t" * 40, **environ}
    return load_config(path, env)


def test_cli_command_lines_are_json_too(tmp_path: Path, master_key: str) -> None:
    """A CLI command (here `migrate`, whose steps log at DEBUG) logs in the configured
    format as well."""
    (tmp_path / "c.yaml").write_text("logging:\n  format: json\n  level: debug\n")
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "migrate", "--config", str(tmp_path / "c.yaml")],
        env={
            **os.environ,
            "ENCRYPTION_KEY": master_key,
            "ADMIN_TOKEN": "adm-" + "t" * 40,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in done.stderr.splitlines() if line]
    assert lines, "migrate logged nothing"
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= json.loads(line).keys()
