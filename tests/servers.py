"""Real servers for end-to-end tests: free loopback ports and `byok-proxy serve` processes."""

from __future__ import annotations

import http.client
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx

_PORTS_FROM = 20000  # below the kernel's ephemeral range (32768-60999 by default)
_PORTS_PER_WORKER = 1500
_next_port = itertools.count(random.randrange(_PORTS_PER_WORKER))


def _ephemeral_from() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_BELOW_EPHEMERAL = _PORTS_FROM + 8 * _PORTS_PER_WORKER <= _ephemeral_from()


def free_port() -> int:
    """An unused TCP port on loopback, for a server a test is about to start.

    Not the kernel's `bind(("127.0.0.1", 0))`: that port comes from the ephemeral range,
    where, before the server binds it, an in-process fake or an outgoing connection of
    another test may be given the same port, and the test then talks to the wrong server.
    Ports here come from below that range, a block of its own for each xdist worker, so no
    other test and no ephemeral allocation can take one in the meantime."""
    if not _BELOW_EPHEMERAL:  # an unusual ip_local_port_range: the kernel's choice, then
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = _PORTS_FROM + (int(worker) if worker.isdigit() else 0) % 8 * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = base + next(_next_port) % _PORTS_PER_WORKER
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in this worker's block")


def wait_until_up(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 180
) -> None:
    """Poll `url` until it answers; fail at once if `proc` dies.

    The deadline is generous because a loaded 2-core machine can take many seconds
    to start a server; a server that is not coming fails through `proc` exiting.
    Each poll is one stdlib connection (no client object built per poll: that would
    take CPU from the server being waited for), spaced out as the wait grows."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
        try:
            conn.request("GET", parts.path or "/")
            conn.getresponse().read()
            return
        except OSError:  # refused, reset, or not answering yet
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.25)


@contextmanager
def serve(
    args: list[str], env: Mapping[str, str], cwd: Path, port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `byok-proxy serve --port PORT ARGS` in `cwd`, output to `log`; stop it after."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "ENCRYPTION_KEY",
            "ADMIN_TOKEN",
            "DATABASE_URL",
            "BYOK_CONFIG",
            "OPENAI_BASE_URL",
            "PLATFORM_OPENAI_KEY",
            "USAGE_LOG",
        )
    }
    full_env.update(env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args],
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serving_pids(prom_dir: Path) -> set[int]:
    """Pids of the workers that have counted a request (prometheus-client multiprocess files)."""
    return {int(path.stem.rsplit("_", 1)[1]) for path in prom_dir.glob("counter_*.db")}


def until_both_workers(prom_dir: Path, request: Callable[[], int], expected: int) -> int:
    """Send `request` (each on a new connection) until two workers have answered one;
    each must answer `expected`. Returns how many were sent."""
    sent = 0
    while len(serving_pids(prom_dir)) < 2:
        assert sent < 100, "one worker answered every request"
        assert request() == expected
        sent += 1
    return sent


def serve_env(
    tmp_path: Path, master_key: str, database_url: str, upstream: str, yaml: str = ""
) -> dict[str, str]:
    """Environment for a `byok-proxy serve` test process, with `yaml` as its config.yaml and a
    folder for prometheus' multiprocess files (tmp_path/prom)."""
    from helpers import ADMIN_TOKEN
    from stack import PLATFORM_KEY

    (tmp_path / "config.yaml").write_text(yaml)
    (tmp_path / "prom").mkdir(exist_ok=True)
    return {
        "ENCRYPTION_KEY": master_key,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": upstream,
        "PLATFORM_OPENAI_KEY": PLATFORM_KEY,
        "BYOK_CONFIG": str(tmp_path / "config.yaml"),
        "USAGE_LOG": str(tmp_path / "usage.jsonl"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }


def create_tenant(url: str, tid: str, tier: str = "pro", openai_key: str | None = None) -> str:
    """Create a tenant through the admin API of the proxy at `url` (registering
    `openai_key` if given); return its proxy key."""
    from helpers import ADMIN_TOKEN

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.post(
        url + "/api/v1/tenants", json={"name": tid, "tier": tier, "id": tid}, headers=admin
    )
    assert r.status_code == 201, r.text
    if openai_key is not None:
        registered = httpx.post(
            f"{url}/api/v1/tenants/{tid}/openai-key", json={"api_key": openai_key}, headers=admin
        )
        assert registered.status_code == 200, registered.text
    return str(r.json()["api_key"])


def until(check: Callable[[], bool], within: float, what: str) -> None:
    """Poll `check` every 50 ms until it holds; fail saying `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
