"""The byok-proxy benchmark: byok-proxy against a bare pass-through, interleaved, in one run.

    python -m bench [--quick] [--json PATH]

Starts the fast fake upstream (`bench/upstream.py`), the reference (`bench/reference.py`:
a bare ASGI pass-through on uvicorn with one aiohttp session, the floor for any Python
design) and two real `byok-proxy serve` processes (one worker each, SQLite, the admin
API on its own port as in production, a tenant with its own registered key, usage log
to a file, metrics on): "byok-proxy", whose tenant has a hard budget, a rate limit and a
model allow-list (SPEC section 9), and "plain", the same without them. Then, taking
turns so that none always runs on a warmer or cooler machine:

- latency at concurrency 1 (wrk), p50 and p99, direct and through each;
- requests/s at concurrency 64 (wrk) and each server's CPU ms per request
  (utime+stime from /proc);
- spend control's cost: byok-proxy and "plain" at concurrency 64, back to back in
  `SPEND_PAIRS` pairs, each pair's ratio of CPU ms per request, and their median;
- 200 concurrent streams of 20 chunks 20 ms apart (asyncio client): time to
  first chunk, CPU ms per stream, byte-correct streams;
- byok-proxy's peak RSS (VmHWM) and start-up time (`serve` started to `/healthz`
  answering);
- a scale run: 5,000 concurrent slow streams through a fresh proxy: errors, peak RSS.

Every goal is judged against the reference measured in the same run (machines here
differ from day to day by a factor of three in absolute speed) and printed with
PASS or FAIL. JSON goes to `bench/results/latest.json` unless `--json` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import yaml

from bench.report import goals, table
from bench.upstream import proxied_stream_bytes, stream_bytes
from proxy.cpus import usable_cpus
from proxy.security import generate_master_key

ADMIN_TOKEN = "adm-" + "b" * 40
TENANT_KEY = "sk-bench-" + "k" * 40
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
# The benchmark tenant's policy in the "with spend control" run (SPEC section 9): limits
# high enough never to refuse, so every request pays for the checks.
POLICY = {
    "budgets": [{"period": "day", "limit_usd": 1_000_000.0, "hard": True}],
    "rate_limits": {"rpm": 10_000_000, "tpm": 10_000_000_000},
    "allowed_models": ["gpt-4o-mini*", "gpt-4.1*"],
}

SPEND_PAIRS = 10  # back-to-back rounds of the proxy with and without its policy

LUA = f"""wrk.method = "POST"
wrk.body = '{CHAT_BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 180) -> None:
    """Poll `url` every 10 ms until it answers (start-up times are read off this wait).

    Each poll is one stdlib connection, cheap enough not to slow the server it waits
    for; the deadline is generous because a busy machine can take many seconds."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
        try:
            conn.request("GET", parts.path or "/")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.01)
        finally:
            conn.close()
    raise TimeoutError(url)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class Proxy:
    """A started `byok-proxy serve`: where, its serving process, the tenant's proxy key,
    and the seconds from starting `serve` to `/healthz` answering."""

    url: str
    pid: int
    key: str
    startup_s: float


class Processes:
    """The upstream and proxy processes of one run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_upstream(self) -> str:
        port = free_port()
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.upstream", "--port", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_up(url + "/v1/models")
        return url

    def start_reference(self, upstream: str) -> tuple[str, int]:
        """The bare pass-through (`bench/reference.py`); returns (url, pid)."""
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.reference", "--port", str(port), "--upstream", upstream],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_up(url + "/v1/models")
        return url, proc.pid

    def _serve_env(
        self, folder: Path, upstream: str, upstream_connections: int | None = None
    ) -> tuple[dict[str, str], int]:
        """The environment of a `serve` in `folder` (made if new); returns it and the
        admin API's port (a listener of its own, as in production)."""
        admin_port = free_port()
        folder.mkdir(exist_ok=True)
        config = yaml.safe_load(
            (Path(__file__).resolve().parent.parent / "config.yaml").read_text()
        )
        config.setdefault("admin", {}).update(host="127.0.0.1", port=admin_port)
        if upstream_connections is not None:
            config.setdefault("upstream", {})["max_connections"] = upstream_connections
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        key_file = folder / "encryption.key"
        if not key_file.exists():
            key_file.write_text(generate_master_key())
        env = {
            **os.environ,
            "ENCRYPTION_KEY": key_file.read_text(),
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "DATABASE_URL": f"sqlite:///{folder / 'byok.db'}",
            "OPENAI_BASE_URL": upstream + "/v1",
            "USAGE_LOG": str(folder / "usage.jsonl"),
            "BYOK_CONFIG": str(folder / "config.yaml"),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if upstream_connections is not None:  # as many callers as upstream connections
            env["BYOK_HTTP_MAX_CONNECTIONS"] = str(upstream_connections)
        return env, admin_port

    def _serve(
        self, folder: Path, env: dict[str, str], args: tuple[str, ...] = ()
    ) -> tuple[subprocess.Popen[bytes], str, float]:
        """Start `byok-proxy serve` in `folder`; returns it, its URL and the seconds from
        starting it to `/healthz` answering."""
        port = free_port()
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args],
            env=env,
            cwd=folder,
            stdout=open(folder / "serve.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_up(url + "/healthz")
        return proc, url, time.monotonic() - started

    def start_proxy(
        self,
        upstream: str,
        name: str,
        policy: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        connections: int | None = None,
    ) -> Proxy:
        """A fresh `byok-proxy serve ARGS` (empty database) with a tenant (under `policy`,
        if given)."""
        folder = self.work / name
        env, admin_port = self._serve_env(folder, upstream, connections)
        proc, url, startup = self._serve(folder, env, args)
        admin_url = f"http://127.0.0.1:{admin_port}"
        wait_up(admin_url + "/healthz")
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        key = httpx.post(
            admin_url + "/api/v1/tenants",
            headers=admin,
            json={"name": "Bench", "tier": "pro", "id": "bench"},
        ).json()["api_key"]
        r = httpx.post(
            admin_url + "/api/v1/tenants/bench/openai-key",
            headers=admin,
            json={"api_key": TENANT_KEY},
        )
        r.raise_for_status()
        if policy is not None:
            r = httpx.patch(
                admin_url + "/api/v1/tenants/bench", headers=admin, json={"policy": policy}
            )
            r.raise_for_status()
        return Proxy(url, proc.pid, key, startup)

    def start_ups(self, upstream: str, restarts: int) -> tuple[float, list[float]]:
        """Seconds from `serve` to `/healthz`: a first start on an empty database (it
        creates the schema), then `restarts` starts on the same, current one."""
        folder = self.work / "startup"
        times = []
        for _ in range(restarts + 1):
            env, _admin_port = self._serve_env(folder, upstream)
            proc, _url, took = self._serve(folder, env)
            times.append(took)
            proc.terminate()
            proc.wait(30)
        return times[0], times[1:]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(
    url: str, key: str | None, connections: int, seconds: float, script: Path
) -> dict[str, float]:
    """One wrk run: requests/s and latency p50/p99 in ms."""
    threads = 1 if connections == 1 else 2
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{int(seconds)}s",
        "--latency",
        "-s",
        str(script),
    ]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(
        [*cmd, url + "/v1/chat/completions"], capture_output=True, text=True, check=True
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    cut = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if cut:  # connections refused, reset or timed out count too
        result["errors"] += sum(float(n) for n in cut.groups())
    return result


async def streams(
    url: str, key: str | None, count: int, chunks: int, interval_ms: int, ramp_seconds: float = 0.0
) -> dict[str, Any]:
    """`count` concurrent streams; first-chunk and total times, errors, byte-correct count."""
    expected = proxied_stream_bytes(chunks) if key else stream_bytes(chunks, with_usage=False)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    target = f"{url}/v1/chat/completions?chunks={chunks}&interval_ms={interval_ms}"
    firsts: list[float] = []
    totals: list[float] = []
    errors = correct = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        statuses: dict[int, int] = {}

        async def one(i: int) -> None:
            nonlocal errors, correct
            if ramp_seconds:
                await asyncio.sleep(ramp_seconds * i / count)
            start = time.perf_counter()
            try:
                async with session.post(target, data=body, headers=headers) as resp:
                    received = bytearray()
                    first = None
                    async for block in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - start
                        received += block
                    totals.append(time.perf_counter() - start)
                    if first is not None:  # an empty answer has no first chunk
                        firsts.append(first)
                    correct += resp.status == 200 and bytes(received) == expected
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return {
        "first_ms": [x * 1000 for x in firsts],
        "total_ms": [x * 1000 for x in totals],
        "errors": errors,
        "correct": correct,
        "statuses": statuses,
        "count": count,
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(quick: bool) -> dict[str, Any]:
    seconds = 1.0 if quick else 5.0
    rounds = 1 if quick else 4
    n_streams = 20 if quick else 200
    n_scale = 100 if quick else 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the plain-request runs: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="byok-bench-"))
    procs = Processes(work)
    script = work / "post.lua"
    script.write_text(LUA)
    try:
        upstream = procs.start_upstream()
        ref_url, ref_pid = procs.start_reference(upstream)
        proxy = procs.start_proxy(upstream, "proxy", POLICY)
        plain = procs.start_proxy(upstream, "plain")
        # name -> (url, pid, proxy key); "direct" is the upstream itself.
        targets = {
            "direct": (upstream, None, None),
            "reference": (ref_url, ref_pid, None),
            "proxy": (proxy.url, proxy.pid, proxy.key),
            "plain": (plain.url, plain.pid, plain.key),
        }
        for _ in range(2):  # warm up every path (connections, caches, page-ins)
            for url, _pid, key in targets.values():
                wrk(url, key, 8, 1, script)

        def timed(name: str, connections: int) -> dict[str, float]:
            """One wrk run against `name`, with the server's CPU ms per request."""
            url, pid, key = targets[name]
            before = cpu_seconds(pid) if pid else 0.0
            figures = wrk(url, key, connections, seconds, script)
            if pid:
                spent = cpu_seconds(pid) - before
                figures["cpu_ms"] = spent * 1000 / max(1.0, figures["rps"] * seconds)
            return figures

        c1: dict[str, list[dict[str, float]]] = {n: [] for n in ("direct", "reference", "proxy")}
        c64: dict[str, list[dict[str, float]]] = {n: [] for n in ("direct", "reference", "proxy")}
        for i in range(rounds):
            # The servers take turns going first: none always runs on a warmer or
            # cooler machine than another.
            for name in rotated(["direct", "reference", "proxy"], i):
                c1[name].append(timed(name, 1))
            for name in rotated(["direct", "reference", "proxy"], i):
                c64[name].append(timed(name, 64))

        # Spend control's cost: the proxy with and without its policy, back to back in
        # pairs (the one going first alternates). The difference sought is a few percent,
        # less than the machine drifts between rounds; each pair's ratio cancels that.
        spend_pairs: list[dict[str, dict[str, float]]] = []
        for i in range(2 if quick else SPEND_PAIRS):
            spend_pairs.append({name: timed(name, 64) for name in rotated(["proxy", "plain"], i)})

        stream_runs: dict[str, list[dict[str, Any]]] = {
            n: [] for n in ("direct", "reference", "proxy")
        }
        for i in range(2 if not quick else 1):
            for name in rotated(["direct", "reference", "proxy"], i):
                url, pid, key = targets[name]
                before = cpu_seconds(pid) if pid else 0.0
                run_ = asyncio.run(streams(url, key, n_streams, 20, 20))
                if pid:
                    run_["cpu_ms"] = (cpu_seconds(pid) - before) * 1000 / n_streams
                stream_runs[name].append(run_)
        proxy_rss, reference_rss = peak_rss_mb(proxy.pid), peak_rss_mb(ref_pid)

        # Throughput with one worker per CPU (`--workers auto`), against one worker.
        multi = procs.start_proxy(upstream, "multi", POLICY, ("--workers", "auto"))
        targets["multi"] = (multi.url, None, multi.key)
        wrk(multi.url, multi.key, 8, 1, script)
        workers: dict[str, list[dict[str, float]]] = {"proxy": [], "multi": []}
        for i in range(1 if quick else 2):
            for name in rotated(["proxy", "multi"], i):
                workers[name].append(timed(name, 64))

        # Sized for it, as an operator would: the connection cap per worker (1,000 by
        # default) and the upstream pool raised above the streams it must hold.
        scale_proxy = procs.start_proxy(upstream, "scale", connections=n_scale + 1000)
        scale = asyncio.run(
            streams(
                scale_proxy.url,
                scale_proxy.key,
                n_scale,
                10,
                500,
                ramp_seconds=2.0 if not quick else 0.2,
            )
        )
        scale_rss = peak_rss_mb(scale_proxy.pid)
        first_start, restarts = procs.start_ups(upstream, 1 if quick else 3)
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(runs: list[dict[str, float]], field: str) -> float:
        return median([r[field] for r in runs])

    def added(side: str, field: str) -> float:
        """The median over rounds of `side`'s figure minus direct's in the same round."""
        return median([s[field] - d[field] for d, s in zip(c1["direct"], c1[side], strict=True)])

    spend_ratios = [
        p["proxy"]["cpu_ms"] / p["plain"]["cpu_ms"] if p["plain"]["cpu_ms"] > 0 else float("inf")
        for p in spend_pairs
    ]

    def first(side: str, p: float = 50) -> float:
        return median([pct(r["first_ms"], p) for r in stream_runs[side]])

    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
        },
        "quick": quick,
        "c1": {
            **{f"{n}_p50_ms": med(c1[n], "p50_ms") for n in c1},
            **{f"{n}_p99_ms": med(c1[n], "p99_ms") for n in c1},
            "reference_added_p50_ms": added("reference", "p50_ms"),
            "proxy_added_p50_ms": added("proxy", "p50_ms"),
        },
        "c64": {
            **{f"{n}_rps": med(c64[n], "rps") for n in c64},
            **{f"{n}_cpu_ms_per_request": med(c64[n], "cpu_ms") for n in c64 if n != "direct"},
            "errors": sum(r["errors"] for r in c64["proxy"])
            + sum(pair[n]["errors"] for pair in spend_pairs for n in pair),
            "workers_auto": usable_cpus(),
            "one_worker_rps": med(workers["proxy"], "rps"),
            "workers_auto_rps": med(workers["multi"], "rps"),
            "workers_auto_errors": sum(r["errors"] for r in workers["multi"]),
        },
        "spend": {
            "pairs": len(spend_pairs),
            "policed_cpu_ms_per_request": median([p["proxy"]["cpu_ms"] for p in spend_pairs]),
            "plain_cpu_ms_per_request": median([p["plain"]["cpu_ms"] for p in spend_pairs]),
            "ratio": median(spend_ratios),
            "ratios": spend_ratios,
        },
        "streams": {
            "count": n_streams,
            **{f"{n}_first_p50_ms": first(n) for n in stream_runs},
            **{f"{n}_first_p99_ms": first(n, 99) for n in stream_runs},
            **{
                f"{n}_cpu_ms_per_stream": med(stream_runs[n], "cpu_ms")
                for n in ("reference", "proxy")
            },
            **{f"{n}_correct": min(r["correct"] for r in stream_runs[n]) for n in stream_runs},
            "errors": sum(r["errors"] for r in stream_runs["proxy"]),
        },
        "proxy_peak_rss_mb": proxy_rss,
        "reference_peak_rss_mb": reference_rss,
        "startup_s": median(restarts),
        "restarts_s": restarts,
        "first_start_s": first_start,
        "scale": {
            "streams": n_scale,
            "errors": scale["count"] - scale["correct"],  # cut, refused or wrong
            "correct": scale["correct"],
            "peak_rss_mb": scale_rss,
        },
    }
    result["goals"] = goals(result)
    return result


def rotated(names: list[str], i: int) -> list[str]:
    """`names` starting at the i-th: who goes first changes every round."""
    k = i % len(names)
    return names[k:] + names[:k]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    if sys.argv[1:2] == ["soak"]:  # `python -m bench soak --minutes N` (bench/soak.py)
        import bench.soak

        sys.exit(bench.soak.main(sys.argv[2:]))
    parser = argparse.ArgumentParser(description="byok-proxy benchmark")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "latest.json"))
    args = parser.parse_args()
    result = run(args.quick)
    print(table(result))
    print(
        f"\nmachine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, "
        f"Python {result['machine']['python']}"
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
