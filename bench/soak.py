"""A soak run of byok-proxy: minutes of mixed traffic, key churn and a master-key rotation.

    python -m bench soak [--minutes N] [--json PATH] [--streams 500]

Not part of CI. Starts the bench's fake upstream (`bench/upstream.py`) and a real
`byok-proxy serve` (one worker, SQLite, usage log to a file, a fresh
ENCRYPTION_KEY, all in a temporary folder, loopback only), creates 5 `pro`
tenants with their own fake OpenAI keys and one `trial` tenant on
PLATFORM_OPENAI_KEY, then for N minutes (default 10; 0.5 is a smoke run):

- keeps about `--streams` streamed chat completions in flight (random chunk
  counts and spacing; some ask for usage; a share is closed by the client after
  a few chunks), plus plain chat completions and embeddings;
- replaces a random pro tenant's OpenAI key through the admin API every
  `--key-interval` seconds (each new key validated upstream with `/v1/models`);
- half-way, rotates the master key: a graceful restart of serve (SIGTERM, wait,
  start on the same port) with ENCRYPTION_KEY="new,old", then
  `byok-proxy rotate-keys` with the same environment while it serves.
  Requests refused at the connection during the restart are counted as
  "restart refusals", apart from everything else.

Then it stops serve gracefully and checks:

- usage lines written == requests made (requests that reached the proxy: got
  response headers), request ids matched one to one;
- no 5xx (and no other non-200), every body byte-correct (a stream the client
  cut: a prefix of the right bytes), no connection error outside the restart;
- RSS of the serving process (VmRSS) flat within 10%: the first serve's after
  warm-up (`warmup_seconds`: 30 s, or 10% of a shorter run, at least 20 s) against
  the last serve's at the end of traffic, and each serve process against itself
  when it ran at least 8 s past its own warm-up;
- rotate-keys exited 0 and every stored key is under the new master key;
- no plaintext OpenAI key, nor any 12-character fragment of one, in the
  proxy's output, rotate-keys' output, the usage log, the SQLite files (copied
  with their WAL before each shutdown, and after it), or anything the client
  received (headers of every response; every body not byte-identical to the fake
  upstream's keyless bytes, or a prefix of them for a stream the client cut).

Prints a table, writes JSON (default `bench/results/soak.json`), exits 0 when
every check passes, 1 otherwise. Stops only the processes it started and
deletes its temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.__main__ import ADMIN_TOKEN, Processes, cpu_seconds, free_port, pct, wait_up
from bench.upstream import COMPLETION, EMBEDDING, proxied_stream_bytes, stream_bytes
from proxy.security import Keyring, generate_master_key

ROOT = Path(__file__).resolve().parent.parent
PRO_TENANTS = [f"soak-pro-{i}" for i in range(1, 6)]
TRIAL_TENANT = "soak-trial"
KEY_ALPHABET = string.ascii_letters + string.digits
FRAGMENT = 12  # a run of this many characters of a key counts as a leak
_RUNS = re.compile(rb"[A-Za-z0-9_-]{%d,}" % FRAGMENT)  # what a key (or a piece of it) can be in

STREAM_CHUNKS = (5, 25)  # chunks per stream, uniform
STREAM_INTERVAL_MS = (100, 400)  # spacing of a stream's chunks, uniform
CUT_SHARE = 0.15  # streams the client closes after 1-3 blocks
USAGE_SHARE = 0.2  # streams that ask for the usage chunk themselves
SHUTDOWN_WAIT = 45.0  # serve's graceful shutdown is 30 s at most (config.yaml)
RESTART_GRACE = 1.0  # connection errors this long after serve is back still count as restart
RSS_MIN_SPAN = 8.0  # a serve process's own RSS is judged only over at least this many seconds
DB_FILES = ("byok.db", "byok.db-wal", "byok.db-shm")


def warmup_seconds(duration: float) -> float:
    """30 s, or 10% of a shorter run, but at least 20 s: at 500 streams the RSS of a fresh
    serve climbs for about 18 s before it levels off (measured), and a start figure taken
    on that climb would flag a leak that is not one. Never past 40% of the run (the
    restart is at 50%)."""
    return min(30.0, max(20.0, 0.1 * duration), 0.4 * duration)


def random_key(prefix: str = "sk-soak-") -> str:
    return prefix + "".join(secrets.choice(KEY_ALPHABET) for _ in range(40))


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class LeakScanner:
    """Finds any FRAGMENT-character piece of any registered key in bytes or files."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._fragments: set[bytes] = set()

    def add(self, key: str) -> None:
        self.keys.append(key)
        raw = key.encode()
        self._fragments.update(raw[i : i + FRAGMENT] for i in range(len(raw) - FRAGMENT + 1))

    def count(self, data: bytes) -> int:
        """How many runs of key characters in `data` hold a fragment of a key."""
        fragments = self._fragments
        hits = 0
        for match in _RUNS.finditer(data):
            run = match.group()
            if any(run[i : i + FRAGMENT] in fragments for i in range(len(run) - FRAGMENT + 1)):
                hits += 1
        return hits

    def count_file(self, path: Path) -> int:
        # Runs never hold a newline, so reading line by line never splits one.
        with path.open("rb") as fh:
            return sum(self.count(line) for line in fh)


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float  # monotonic, when /healthz first answered
    rss: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, MB)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, CPU seconds)

    def sample(self) -> None:
        """VmRSS and CPU time now (nothing once the process has ended)."""
        now = time.monotonic()
        mb = rss_mb(self.proc.pid)
        if mb is None or self.proc.poll() is not None:
            return
        self.rss.append((now, mb))
        with contextlib.suppress(OSError, IndexError, ValueError):
            self.cpu.append((now, cpu_seconds(self.proc.pid)))


@dataclass
class Stats:
    requests: int = 0  # /v1 requests that got response headers (reached the proxy)
    by_kind: Counter[str] = field(default_factory=Counter)
    status: Counter[int] = field(default_factory=Counter)
    request_ids: set[str] = field(default_factory=set)
    no_request_id: int = 0
    streams_full: int = 0
    streams_cut: int = 0  # closed by the client on purpose after a few blocks
    byte_incorrect: int = 0
    restart_refusals: int = 0  # connection refused/closed before headers, during the restart
    connection_errors: int = 0  # the same outside the restart window
    errors_after_headers: int = 0  # the response broke or timed out once started
    error_samples: list[str] = field(default_factory=list)
    odd_bodies: list[dict[str, Any]] = field(default_factory=list)
    client_leaks: int = 0
    in_flight_streams: int = 0
    # (monotonic start, ms): plain requests send to last byte; streams send to first block
    plain_ms: list[tuple[float, float]] = field(default_factory=list)
    first_block_ms: list[tuple[float, float]] = field(default_factory=list)
    concurrency: list[int] = field(default_factory=list)
    keys_ok: int = 0
    keys_failed: Counter[int] = field(default_factory=Counter)
    keys_refused: int = 0
    keys_errors: int = 0
    worker_crashes: int = 0  # client tasks that died of an exception (a bug of the soak)

    def sample_error(self, text: str) -> None:
        if len(self.error_samples) < 20:
            self.error_samples.append(text[:300])


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.duration = args.minutes * 60.0
        self.warmup = args.warmup if args.warmup is not None else warmup_seconds(self.duration)
        self.work = work
        self.procs = Processes(work)
        self.stats = Stats()
        self.scanner = LeakScanner()
        self.serves: list[Serve] = []
        self.restart_windows: list[list[float]] = []  # [start, end]; end inf while restarting
        self.stopping = False
        self.proxy_keys: dict[str, str] = {}
        self.old_master = generate_master_key()
        self.new_master = generate_master_key()
        self.platform_key = random_key("sk-soak-platform-")
        self.scanner.add(self.platform_key)
        self.rotation: dict[str, Any] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.usage_log = work / "usage.jsonl"
        self.db = work / "byok.db"
        self.t0 = 0.0
        self.upstream = ""
        self.client_cpu_pct: float | None = None

    # --- processes -------------------------------------------------------------------

    def env(self, encryption_key: str) -> dict[str, str]:
        env = {
            **os.environ,
            "ENCRYPTION_KEY": encryption_key,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "DATABASE_URL": f"sqlite:///{self.db}",
            "OPENAI_BASE_URL": self.upstream + "/v1",
            "USAGE_LOG": str(self.usage_log),
            "PLATFORM_OPENAI_KEY": self.platform_key,
            "BYOK_CONFIG": str(self.work / "config.yaml"),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env

    def write_config(self) -> None:
        """The repository's config.yaml, with a trial allowance the soak cannot use up."""
        config = yaml.safe_load((ROOT / "config.yaml").read_text())
        config["tiers"]["trial"].update(daily_requests=10**9, daily_tokens=10**12)
        config["log"]["level"] = self.args.log_level
        (self.work / "config.yaml").write_text(yaml.safe_dump(config))

    async def start_serve(self, encryption_key: str) -> Serve:
        log = self.work / f"serve-{len(self.serves) + 1}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(self.port)],
            env=self.env(encryption_key),
            cwd=self.work,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.procs.procs.append(proc)
        await asyncio.to_thread(wait_up, self.url + "/healthz", 30)
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}; see {log.name}")
        serve = Serve(proc, log, time.monotonic())
        self.serves.append(serve)
        return serve

    def snapshot_db(self) -> None:
        """Copy the SQLite files while serve runs: a clean shutdown checkpoints the WAL
        away, and what was in it must be searched for keys too."""
        n = len(self.serves)
        for name in DB_FILES:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.work / name, self.work / f"dbsnap-{n}-{name}")

    async def stop_serve(self, serve: Serve) -> int | None:
        self.snapshot_db()
        serve.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(serve.proc.wait, SHUTDOWN_WAIT)
        except subprocess.TimeoutExpired:
            serve.proc.kill()
            await asyncio.to_thread(serve.proc.wait, 10)
            return None

    def steady(self, t: float) -> bool:
        """Whether `t` is past the warm-up, and past the warm-up after each restart."""
        return t >= self.t0 + self.warmup and not any(
            a <= t <= b + self.warmup for a, b in self.restart_windows
        )

    def in_restart(self, t: float) -> bool:
        return any(a <= t <= b + RESTART_GRACE for a, b in self.restart_windows)

    # --- admin -----------------------------------------------------------------------

    async def admin(
        self, session: aiohttp.ClientSession, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with session.request(
            method, self.url + "/api/v1" + path, json=body, headers=headers
        ) as resp:
            data = await resp.read()
        self.stats.client_leaks += self.scanner.count(data) + self.scanner.count(
            b"\n".join(k + b": " + v for k, v in resp.raw_headers)
        )
        return resp.status, data

    async def setup_tenants(self, session: aiohttp.ClientSession) -> None:
        for tenant in [*PRO_TENANTS, TRIAL_TENANT]:
            tier = "trial" if tenant == TRIAL_TENANT else "pro"
            status, data = await self.admin(
                session, "POST", "/tenants", {"name": tenant, "tier": tier, "id": tenant}
            )
            if status != 201:
                raise RuntimeError(f"creating {tenant}: {status} {data[:300]!r}")
            self.proxy_keys[tenant] = json.loads(data)["api_key"]
        for tenant in PRO_TENANTS:
            key = random_key()
            self.scanner.add(key)
            status, data = await self.admin(
                session, "POST", f"/tenants/{tenant}/openai-key", {"api_key": key}
            )
            if status != 200:
                raise RuntimeError(f"registering {tenant}'s key: {status} {data[:300]!r}")

    async def key_churn(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping:
            await asyncio.sleep(self.args.key_interval)
            if self.stopping:
                return
            tenant = random.choice(PRO_TENANTS)
            key = random_key()
            self.scanner.add(key)
            try:
                status, _ = await self.admin(
                    session, "POST", f"/tenants/{tenant}/openai-key", {"api_key": key}
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if self.in_restart(time.monotonic()):
                    self.stats.keys_refused += 1
                else:
                    self.stats.keys_errors += 1
                    self.stats.sample_error(f"key replacement: {exc!r}")
                continue
            if status == 200:
                self.stats.keys_ok += 1
            else:
                self.stats.keys_failed[status] += 1

    # --- traffic ---------------------------------------------------------------------

    def _check_body(self, kind: str, status: int, data: bytes, expected: bytes, cut: bool) -> None:
        good = data == expected or (cut and expected.startswith(data))
        if status == 200 and good:
            return  # byte-identical to (a prefix of) the fake upstream's keyless bytes
        leaks = self.scanner.count(data)
        self.stats.client_leaks += leaks
        if status == 200:
            self.stats.byte_incorrect += 1
        if len(self.stats.odd_bodies) < 20:
            shown = "[withheld: holds key material]" if leaks else data[:300].decode("replace")
            self.stats.odd_bodies.append({"kind": kind, "status": status, "body": shown})

    async def one(
        self,
        session: aiohttp.ClientSession,
        kind: str,
        tenant: str,
    ) -> None:
        s = self.stats
        headers = {
            "Authorization": f"Bearer {self.proxy_keys[tenant]}",
            "Content-Type": "application/json",
        }
        cut = False
        if kind == "stream":
            chunks = random.randint(*STREAM_CHUNKS)
            interval = random.randint(*STREAM_INTERVAL_MS)
            wants_usage = random.random() < USAGE_SHARE
            cut = random.random() < CUT_SHARE
            body: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "soak"}],
                "max_tokens": 64,
                "stream": True,
            }
            if wants_usage:
                body["stream_options"] = {"include_usage": True}
                expected = stream_bytes(chunks, with_usage=True)
            else:
                expected = proxied_stream_bytes(chunks)
            url = f"{self.url}/v1/chat/completions?chunks={chunks}&interval_ms={interval}"
        elif kind == "chat":
            body = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "soak"}],
                "max_tokens": 64,
            }
            expected, url = COMPLETION, self.url + "/v1/chat/completions"
        else:
            body = {"model": "text-embedding-3-small", "input": "soak"}
            expected, url = EMBEDDING, self.url + "/v1/embeddings"
        payload = json.dumps(body, separators=(",", ":")).encode()
        got_headers = False
        if kind == "stream":
            s.in_flight_streams += 1
        started = time.monotonic()
        try:
            async with session.post(url, data=payload, headers=headers) as resp:
                got_headers = True
                s.requests += 1
                s.by_kind[f"{kind}:{'trial' if tenant == TRIAL_TENANT else 'pro'}"] += 1
                s.status[resp.status] += 1
                rid = resp.headers.get("X-Byok-Request-Id")
                if rid:
                    s.request_ids.add(rid)
                else:
                    s.no_request_id += 1
                s.client_leaks += self.scanner.count(
                    b"\n".join(k + b": " + v for k, v in resp.raw_headers)
                )
                received = bytearray()
                if kind == "stream" and cut and resp.status == 200:
                    blocks = random.randint(1, 3)
                    async for block in resp.content.iter_any():
                        if not received:
                            s.first_block_ms.append((started, (time.monotonic() - started) * 1000))
                        received += block
                        blocks -= 1
                        if not blocks:
                            break
                    resp.close()
                    s.streams_cut += 1
                else:
                    cut = False
                    async for block in resp.content.iter_any():
                        if kind == "stream" and not received:
                            s.first_block_ms.append((started, (time.monotonic() - started) * 1000))
                        received += block
                    if kind == "stream":
                        s.streams_full += 1
                    else:
                        s.plain_ms.append((started, (time.monotonic() - started) * 1000))
                self._check_body(kind, resp.status, bytes(received), expected, cut)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if got_headers:
                s.errors_after_headers += 1
                s.sample_error(f"{kind} after headers: {exc!r}")
            elif self.in_restart(time.monotonic()):
                s.restart_refusals += 1
            else:
                s.connection_errors += 1
                s.sample_error(f"{kind} before headers: {exc!r}")
            await asyncio.sleep(random.uniform(0.1, 0.3))  # no tight loop while refused
        finally:
            if kind == "stream":
                s.in_flight_streams -= 1

    def pick_tenant(self) -> str:
        return random.choice([*PRO_TENANTS, TRIAL_TENANT])

    async def stream_worker(self, session: aiohttp.ClientSession, i: int) -> None:
        await asyncio.sleep(2.0 * i / self.args.streams)  # ramp up over 2 s
        while not self.stopping:
            await self.one(session, "stream", self.pick_tenant())

    async def plain_worker(self, session: aiohttp.ClientSession) -> None:
        workers = self.args.plain_workers
        while not self.stopping:
            await self.one(session, random.choice(("chat", "embeddings")), self.pick_tenant())
            await asyncio.sleep(random.uniform(0, 2 * workers / self.args.plain_rate))

    async def sampler(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            serve = self.serves[-1]
            if not self.in_restart(now):
                serve.sample()
                if now - self.t0 > self.warmup:
                    self.stats.concurrency.append(self.stats.in_flight_streams)
            await asyncio.sleep(1.0)

    # --- rotation --------------------------------------------------------------------

    async def restart_and_rotate(self) -> None:
        """Graceful restart with ENCRYPTION_KEY="new,old", then rotate-keys while serving."""
        old = self.serves[-1]
        window = [time.monotonic(), float("inf")]
        self.restart_windows.append(window)
        old.sample()
        self.rotation["old_serve_exit"] = await self.stop_serve(old)
        stopped = time.monotonic()
        keyring = f"{self.new_master},{self.old_master}"
        await self.start_serve(keyring)
        window[1] = time.monotonic()
        self.rotation["restart_seconds"] = round(window[1] - window[0], 2)
        self.rotation["old_serve_drain_seconds"] = round(stopped - window[0], 2)
        self.rotation["new_serve_start_seconds"] = round(window[1] - stopped, 2)
        out = self.work / "rotate-keys.log"
        with out.open("wb") as fh:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.cli",
                "rotate-keys",
                env=self.env(keyring),
                cwd=self.work,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            rc: int | None = None
            try:
                rc = await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                pass
            finally:
                if proc.returncode is None:  # timed out, or the run is being cancelled
                    proc.kill()
                    await proc.wait()
        self.rotation["rotate_keys_exit"] = rc
        text = out.read_text(errors="replace")
        self.rotation["rotate_keys_output"] = (
            "[withheld: holds key material]"
            if self.scanner.count(text.encode())
            else [line for line in text.splitlines() if "rotate-keys" in line][-3:]
        )

    # --- the run ---------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.upstream = await asyncio.to_thread(self.procs.start_upstream)
        self.write_config()
        await self.start_serve(self.old_master)
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=5, sock_read=30)
        traffic_conn = aiohttp.TCPConnector(
            limit=self.args.streams + self.args.plain_workers + 50, keepalive_timeout=2
        )
        admin_conn = aiohttp.TCPConnector(limit=4, keepalive_timeout=2)
        async with (
            aiohttp.ClientSession(
                connector=traffic_conn, timeout=timeout, auto_decompress=False
            ) as session,
            aiohttp.ClientSession(connector=admin_conn, timeout=timeout) as admin,
        ):
            await self.setup_tenants(admin)
            self.t0 = time.monotonic()
            cpu0 = _own_cpu()
            tasks = [
                asyncio.create_task(self.stream_worker(session, i))
                for i in range(self.args.streams)
            ]
            tasks += [
                asyncio.create_task(self.plain_worker(session))
                for _ in range(self.args.plain_workers)
            ]
            side = [asyncio.create_task(self.key_churn(admin)), asyncio.create_task(self.sampler())]
            await asyncio.sleep(0.5 * self.duration)
            await self.restart_and_rotate()
            await asyncio.sleep(max(0.0, self.t0 + self.duration - time.monotonic()))
            final = self.serves[-1]
            final.sample()
            minutes_run = (time.monotonic() - self.t0) / 60
            self.client_cpu_pct = (_own_cpu() - cpu0) / (minutes_run * 60) * 100
            self.stopping = True
            drain_limit = STREAM_CHUNKS[1] * STREAM_INTERVAL_MS[1] / 1000 + 30
            done, pending = await asyncio.wait(tasks + side, timeout=drain_limit)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            drain_cancelled = len(pending)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self.stats.worker_crashes += 1
                    self.stats.sample_error(f"client task crashed: {task.exception()!r}")
        final_exit = await self.stop_serve(final)
        return self.report(minutes_run, drain_cancelled, final_exit)

    # --- checks ----------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        lines = unparseable = disconnected = 0
        ids: set[str] = set()
        statuses: Counter[int] = Counter()
        if self.usage_log.exists():
            with self.usage_log.open("rb") as fh:
                for raw in fh:
                    lines += 1
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        unparseable += 1
                        continue
                    ids.add(line.get("request_id"))
                    statuses[line.get("status")] += 1
                    disconnected += bool(line.get("client_disconnected"))
        return {
            "lines": lines,
            "unparseable": unparseable,
            "client_disconnected": disconnected,
            "status": dict(sorted(statuses.items(), key=lambda kv: str(kv[0]))),
            "ids_missing_from_log": len(self.stats.request_ids - ids),
            "ids_not_seen_by_client": len(ids - self.stats.request_ids),
        }

    def stored_kids(self) -> dict[str, int]:
        new_kid = Keyring.parse(self.new_master).primary_kid
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute(
                "SELECT openai_api_key_encrypted FROM tenants "
                "WHERE openai_api_key_encrypted IS NOT NULL"
            ).fetchall()
        finally:
            con.close()
        under_new = sum(Keyring.kid_of(c) == new_kid for (c,) in rows)
        return {"stored": len(rows), "under_new_key": under_new}

    def rss_report(self) -> dict[str, Any]:
        """Start: the first serve after warm-up; end: the last serve at the end of traffic.
        Each serve process is also judged on its own when its post-warm-up samples span
        RSS_MIN_SPAN seconds."""
        processes = []
        for serve in self.serves:
            t_ready = max(serve.started, self.t0) + self.warmup
            after = [(t, mb) for t, mb in serve.rss if t >= t_ready]
            start = after[0][1] if after else None
            end = serve.rss[-1][1] if serve.rss else None
            change = (end / start - 1) * 100 if start and end else None
            judged = len(after) > 1 and after[-1][0] - after[0][0] >= RSS_MIN_SPAN
            cpu = [(t, c) for t, c in serve.cpu if t >= t_ready] or serve.cpu
            cpu_pct = (
                (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0]) * 100
                if len(cpu) > 1 and cpu[-1][0] > cpu[0][0]
                else None
            )
            processes.append(
                {
                    "pid": serve.proc.pid,
                    "start_mb": start,
                    "end_mb": end,
                    "max_mb": max((mb for _, mb in serve.rss), default=None),
                    "change_pct": change,
                    "judged": judged,
                    "cpu_pct": cpu_pct,
                    "flat": change is not None and abs(change) <= 10 if judged else None,
                    "samples": [[round(t - self.t0, 1), round(mb, 1)] for t, mb in serve.rss],
                }
            )
        start = processes[0]["start_mb"] if processes else None
        end = processes[-1]["end_mb"] if processes else None
        change = (end / start - 1) * 100 if start and end else None
        flat = (
            change is not None
            and abs(change) <= 10
            and all(p["flat"] is not False for p in processes)
        )
        return {
            "start_mb": start,
            "end_mb": end,
            "change_pct": change,
            "flat": flat,
            "processes": processes,
        }

    def report(self, minutes_run: float, drain_cancelled: int, final_exit: int | None) -> dict:
        s = self.stats
        usage = self.usage()
        kids = self.stored_kids()
        scanned = [
            p
            for p in sorted(self.work.iterdir())
            if p.is_file()
            and p.name.startswith(("serve-", "rotate-", "usage", "byok.db", "dbsnap-"))
        ]
        leak_files = {p.name: self.scanner.count_file(p) for p in scanned}
        scanned_bytes = {p.name: p.stat().st_size for p in scanned}
        leak_files["client responses"] = s.client_leaks
        log_problems = {
            p.name: serve_log_problems(p) for p in scanned if p.name.startswith("serve-")
        }
        leaks = sum(leak_files.values())
        rss = self.rss_report()
        five_xx = sum(n for code, n in s.status.items() if code >= 500)
        non_200 = sum(n for code, n in s.status.items() if code != 200)
        conc = sorted(s.concurrency)
        plain = [ms for t, ms in s.plain_ms if self.steady(t)]
        first = [ms for t, ms in s.first_block_ms if self.steady(t)]
        checks = {
            "usage lines == requests made": usage["lines"] == s.requests
            and usage["ids_missing_from_log"] == 0
            and usage["ids_not_seen_by_client"] == 0
            and usage["unparseable"] == 0,
            "no 5xx": five_xx == 0,
            "no other non-200": non_200 - five_xx == 0,
            "bodies byte-correct": s.byte_incorrect == 0 and s.no_request_id == 0,
            "no connection errors outside restart": s.connection_errors == 0
            and s.errors_after_headers == 0
            and drain_cancelled == 0
            and s.worker_crashes == 0,
            "key replacements all 200": not s.keys_failed and s.keys_errors == 0 and s.keys_ok > 0,
            "rotate-keys exit 0": self.rotation.get("rotate_keys_exit") == 0,
            "all stored keys under new master key": kids["stored"] == len(PRO_TENANTS)
            and kids["under_new_key"] == kids["stored"],
            "serve exits gracefully": self.rotation.get("old_serve_exit") is not None
            and final_exit is not None,
            "RSS flat within 10%": rss["flat"],
            "no plaintext key material": leaks == 0,
            "no ERROR or traceback in serve logs": not any(log_problems.values()),
        }
        return {
            "minutes_requested": self.args.minutes,
            "minutes_run": round(minutes_run, 3),
            "warmup_seconds": self.warmup,
            "setup": {
                "target_concurrent_streams": self.args.streams,
                "plain_rate_per_s": self.args.plain_rate,
                "pro_tenants": len(PRO_TENANTS),
                "trial_tenants": 1,
                "key_interval_s": self.args.key_interval,
                "log_level": self.args.log_level,
            },
            "requests_made": s.requests,
            "requests_by_kind": dict(sorted(s.by_kind.items())),
            "status": {str(k): v for k, v in sorted(s.status.items())},
            "usage_log": usage,
            "responses_5xx": five_xx,
            "responses_non_200": non_200,
            "restart_refusals": s.restart_refusals,
            "connection_errors_outside_restart": s.connection_errors,
            "errors_after_headers": s.errors_after_headers,
            "drain_cancelled": drain_cancelled,
            "client_task_crashes": s.worker_crashes,
            "error_samples": s.error_samples,
            "odd_bodies": s.odd_bodies,
            "streams": {
                "completed": s.streams_full,
                "cut_by_client": s.streams_cut,
                "concurrency_min": conc[0] if conc else None,
                "concurrency_p50": conc[len(conc) // 2] if conc else None,
                "concurrency_max": conc[-1] if conc else None,
            },
            "latency_ms": {
                "plain_p50": _pct(plain, 50),
                "plain_p99": _pct(plain, 99),
                "stream_first_block_p50": _pct(first, 50),
                "stream_first_block_p99": _pct(first, 99),
                "note": "requests started past the warm-ups (start, after the restart)",
            },
            "byte_incorrect": s.byte_incorrect,
            "responses_without_request_id": s.no_request_id,
            "key_replacements": {
                "ok": s.keys_ok,
                "failed": {str(k): v for k, v in s.keys_failed.items()},
                "refused_during_restart": s.keys_refused,
                "errors": s.keys_errors,
            },
            "openai_keys_used": len(self.scanner.keys),
            "rotation": {**self.rotation, **kids, "final_serve_exit": final_exit},
            "rss": rss,
            "plaintext_key_hits": leak_files,
            "plaintext_key_hits_total": leaks,
            "scanned_file_bytes": scanned_bytes,
            "serve_log_errors": log_problems,
            "client_cpu_pct": self.client_cpu_pct,
            "checks": checks,
            "passed": all(checks.values()),
        }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve_log_problems(path: Path) -> int:
    """Lines of a serve log at ERROR or CRITICAL, and tracebacks."""
    with path.open("rb") as fh:
        return sum(
            b" ERROR " in line or b" CRITICAL " in line or line.startswith(b"Traceback")
            for line in fh
        )


def _pct(values: list[float], p: float) -> float | None:
    return pct(values, p) if values else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def table(r: dict[str, Any]) -> str:
    st, rot, use, lat = r["streams"], r["rotation"], r["usage_log"], r["latency_ms"]
    rows: list[tuple[str, str]] = [
        ("minutes run", f"{r['minutes_run']:.2f} (warm-up {r['warmup_seconds']:.0f} s)"),
        ("requests made (reached the proxy)", _fmt(r["requests_made"])),
        ("  by kind", ", ".join(f"{k} {v}" for k, v in r["requests_by_kind"].items())),
        ("  status", ", ".join(f"{k}: {v}" for k, v in r["status"].items())),
        ("usage lines written", _fmt(use["lines"])),
        (
            "  ids missing / unknown / unparseable",
            f"{use['ids_missing_from_log']} / {use['ids_not_seen_by_client']} / "
            f"{use['unparseable']}",
        ),
        ("  lines with client_disconnected", _fmt(use["client_disconnected"])),
        ("5xx responses", _fmt(r["responses_5xx"])),
        ("non-200 responses", _fmt(r["responses_non_200"])),
        ("restart refusals (never reached the proxy)", _fmt(r["restart_refusals"])),
        ("connection errors outside restart", _fmt(r["connection_errors_outside_restart"])),
        ("errors after headers", _fmt(r["errors_after_headers"])),
        (
            "streams completed / cut by client",
            f"{st['completed']} / {st['cut_by_client']}",
        ),
        (
            "concurrent streams min / p50 / max",
            f"{_fmt(st['concurrency_min'])} / {_fmt(st['concurrency_p50'])} / "
            f"{_fmt(st['concurrency_max'])}",
        ),
        (
            "latency p50 / p99 (ms), steady: plain; stream 1st block",
            f"{_fmt(lat['plain_p50'])} / {_fmt(lat['plain_p99'])}; "
            f"{_fmt(lat['stream_first_block_p50'])} / {_fmt(lat['stream_first_block_p99'])} "
            f"(client CPU {_fmt(r['client_cpu_pct'])}%)",
        ),
        ("byte-incorrect bodies", _fmt(r["byte_incorrect"])),
        (
            "key replacements ok / failed / refused in restart",
            f"{r['key_replacements']['ok']} / {sum(r['key_replacements']['failed'].values())} / "
            f"{r['key_replacements']['refused_during_restart']}",
        ),
        ("OpenAI keys used (incl. platform)", _fmt(r["openai_keys_used"])),
        (
            "restart (SIGTERM to serving again)",
            f"{_fmt(rot.get('restart_seconds'))} s (old serve drained in "
            f"{_fmt(rot.get('old_serve_drain_seconds'))} s, exit "
            f"{_fmt(rot.get('old_serve_exit'))}; new up in "
            f"{_fmt(rot.get('new_serve_start_seconds'))} s)",
        ),
        ("rotate-keys exit", _fmt(rot.get("rotate_keys_exit"))),
        ("  output", " | ".join(rot.get("rotate_keys_output") or []) or "-"),
        ("stored keys under new master key", f"{rot['under_new_key']}/{rot['stored']}"),
    ]
    rss = r["rss"]
    rows.append(
        (
            "RSS start (serve #1 after warm-up) -> end (MB)",
            f"{_fmt(rss['start_mb'])} -> {_fmt(rss['end_mb'])} ({_fmt(rss['change_pct'])}%)",
        )
    )
    for n, x in enumerate(rss["processes"], 1):
        verdict = "" if x["judged"] else ", too short after warm-up to judge"
        rows.append(
            (
                f"  serve #{n} (pid {x['pid']}) after warm-up -> end",
                f"{_fmt(x['start_mb'])} -> {_fmt(x['end_mb'])} "
                f"({_fmt(x['change_pct'])}%, max {_fmt(x['max_mb'])}{verdict}); "
                f"CPU {_fmt(x['cpu_pct'])}%",
            )
        )
    rows.append(
        (
            "serve log ERROR/traceback lines",
            ", ".join(f"{k} {v}" for k, v in r["serve_log_errors"].items()),
        )
    )
    rows.append(
        (
            "plaintext key hits",
            f"{r['plaintext_key_hits_total']} ("
            + ", ".join(f"{k} {v}" for k, v in r["plaintext_key_hits"].items())
            + ")",
        )
    )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    lines += [f"[{'PASS' if ok else 'FAIL'}] {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="run length (0.5: smoke)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "soak.json"))
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams")
    parser.add_argument("--plain-rate", type=float, default=40.0, help="plain requests/s")
    parser.add_argument("--plain-workers", type=int, default=8)
    parser.add_argument("--key-interval", type=float, default=3.0, help="seconds between keys")
    parser.add_argument("--log-level", default="DEBUG", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before the start RSS (default: auto)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (debug)")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = int(args.minutes * 60 + 360)  # the whole run, restart, drain, scans: never hangs

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"soak: still running after {limit} s; stopping")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    work = Path(tempfile.mkdtemp(prefix="byok-soak-"))
    soak = Soak(args, work)
    try:
        try:
            import uvloop
        except ImportError:
            result = asyncio.run(asyncio.wait_for(soak.run(), limit - 60))
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(asyncio.wait_for(soak.run(), limit - 60))
    except Exception as exc:  # report what broke; the finally below still cleans up
        print(f"soak: failed: {exc!r}", file=sys.stderr)
        for log in sorted(work.glob("serve-*.log")):
            with contextlib.suppress(OSError):
                tail = log.read_bytes()[-2000:]
                if not soak.scanner.count(tail):
                    text = tail.decode(errors="replace")
                    print(f"--- {log.name} (tail)\n{text}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        soak.procs.stop()
        if args.keep:
            print(f"soak: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {path}")
    return 0 if result["passed"] else 1
