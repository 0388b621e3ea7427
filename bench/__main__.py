"""The byok-proxy benchmark: direct-to-upstream vs through the proxy, interleaved, in one run.

    python -m bench [--quick] [--json PATH]

Starts the fast fake upstream (`bench/upstream.py`) and a real `byok-proxy serve`
(one worker, SQLite, a tenant with its own registered key, usage log to a file,
metrics on), then measures, alternating direct and proxied rounds:

- latency at concurrency 1 (wrk), p50 and p99;
- requests/s at concurrency 64 (wrk) and the proxy's CPU ms per request
  (utime+stime from /proc);
- 200 concurrent streams of 20 chunks 20 ms apart (asyncio client): time to
  first chunk (p50, p99), total time, CPU ms per stream, byte-correct streams;
- the proxy's peak RSS (VmHWM);
- a scale run: 5,000 concurrent slow streams through a fresh proxy: errors, peak RSS.

Prints a table and writes JSON (default `bench/results/latest.json`).
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.upstream import proxied_stream_bytes, stream_bytes
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
    """Poll `url` until it answers: one client for every poll, spaced out as the wait
    grows (a busy machine can take many seconds to start a server)."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                client.get(url)
                return
            except httpx.TransportError:
                time.sleep(pause)
                pause = min(pause * 1.5, 0.25)
    raise TimeoutError(url)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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

    def start_proxy(
        self, upstream: str, name: str, policy: dict[str, Any] | None = None
    ) -> tuple[str, int, str]:
        """A fresh `byok-proxy serve` with a tenant (under `policy`, if given); returns
        (url, pid, proxy key)."""
        port = free_port()
        folder = self.work / name
        folder.mkdir()
        env = {
            **os.environ,
            "ENCRYPTION_KEY": generate_master_key(),
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "DATABASE_URL": f"sqlite:///{folder / 'byok.db'}",
            "OPENAI_BASE_URL": upstream + "/v1",
            "USAGE_LOG": str(folder / "usage.jsonl"),
            "BYOK_CONFIG": str(Path(__file__).resolve().parent.parent / "config.yaml"),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)],
            env=env,
            cwd=folder,
            stdout=open(folder / "serve.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_up(url + "/healthz")
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        key = httpx.post(
            url + "/api/v1/tenants",
            headers=admin,
            json={"name": "Bench", "tier": "pro", "id": "bench"},
        ).json()["api_key"]
        r = httpx.post(
            url + "/api/v1/tenants/bench/openai-key", headers=admin, json={"api_key": TENANT_KEY}
        )
        r.raise_for_status()
        if policy is not None:
            r = httpx.patch(url + "/api/v1/tenants/bench", headers=admin, json={"policy": policy})
            r.raise_for_status()
        return url, proc.pid, key

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
                    firsts.append(first or 0.0)
                    correct += resp.status == 200 and bytes(received) == expected
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return {
        "first_ms": [x * 1000 for x in firsts],
        "total_ms": [x * 1000 for x in totals],
        "errors": errors,
        "correct": correct,
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
        proxy, pid, key = procs.start_proxy(upstream, "proxy")
        policed, policed_pid, policed_key = procs.start_proxy(upstream, "policed", POLICY)
        for _ in range(2):  # warm up both paths (connections, caches, JIT-free but page-ins)
            wrk(upstream, None, 8, 1, script)
            wrk(proxy, key, 8, 1, script)
            wrk(policed, policed_key, 8, 1, script)

        c1: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        c64: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        cpu_per_request: list[float] = []
        policed_cpu: list[float] = []
        policed_errors = 0
        for i in range(rounds):
            c1["direct"].append(wrk(upstream, None, 1, seconds, script))
            c1["proxy"].append(wrk(proxy, key, 1, seconds, script))
            c64["direct"].append(wrk(upstream, None, 64, seconds, script))
            # The two proxies take turns going first: neither always runs on a warmer or
            # cooler machine than the other.
            for which in ("plain", "policed") if i % 2 == 0 else ("policed", "plain"):
                if which == "plain":
                    before = cpu_seconds(pid)
                    result = wrk(proxy, key, 64, seconds, script)
                    ms = (cpu_seconds(pid) - before) * 1000 / (result["rps"] * seconds)
                    cpu_per_request.append(ms)
                    c64["proxy"].append(result)
                else:
                    before = cpu_seconds(policed_pid)
                    result = wrk(policed, policed_key, 64, seconds, script)
                    ms = (cpu_seconds(policed_pid) - before) * 1000 / (result["rps"] * seconds)
                    policed_cpu.append(ms)
                    policed_errors += int(result["errors"])

        stream_runs: dict[str, list[dict[str, Any]]] = {"direct": [], "proxy": []}
        cpu_per_stream: list[float] = []
        for _ in range(2 if not quick else 1):
            stream_runs["direct"].append(asyncio.run(streams(upstream, None, n_streams, 20, 20)))
            before = cpu_seconds(pid)
            stream_runs["proxy"].append(asyncio.run(streams(proxy, key, n_streams, 20, 20)))
            cpu_per_stream.append((cpu_seconds(pid) - before) * 1000 / n_streams)
        main_rss = peak_rss_mb(pid)

        scale_proxy, scale_pid, scale_key = procs.start_proxy(upstream, "scale")
        scale = asyncio.run(
            streams(
                scale_proxy, scale_key, n_scale, 10, 500, ramp_seconds=2.0 if not quick else 0.2
            )
        )
        scale_rss = peak_rss_mb(scale_pid)
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(runs: list[dict[str, float]], field: str) -> float:
        return median([r[field] for r in runs])

    def stream_stat(side: str, field: str, p: float) -> float:
        return median([pct(r[field], p) for r in stream_runs[side]])

    added_c1 = [p["p50_ms"] - d["p50_ms"] for d, p in zip(c1["direct"], c1["proxy"], strict=True)]
    added_c1_p99 = [
        p["p99_ms"] - d["p99_ms"] for d, p in zip(c1["direct"], c1["proxy"], strict=True)
    ]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
        },
        "quick": quick,
        "c1": {
            "direct_p50_ms": med(c1["direct"], "p50_ms"),
            "proxy_p50_ms": med(c1["proxy"], "p50_ms"),
            "direct_p99_ms": med(c1["direct"], "p99_ms"),
            "proxy_p99_ms": med(c1["proxy"], "p99_ms"),
            "added_p50_ms": median(added_c1),
            "added_p99_ms": median(added_c1_p99),
        },
        "c64": {
            "direct_rps": med(c64["direct"], "rps"),
            "proxy_rps": med(c64["proxy"], "rps"),
            "proxy_cpu_ms_per_request": median(cpu_per_request),
            "errors": sum(r["errors"] for r in c64["proxy"]),
            "policed_cpu_ms_per_request": median(policed_cpu),
            "policed_errors": policed_errors,
        },
        "streams": {
            "count": n_streams,
            "direct_first_p50_ms": stream_stat("direct", "first_ms", 50),
            "proxy_first_p50_ms": stream_stat("proxy", "first_ms", 50),
            "direct_first_p99_ms": stream_stat("direct", "first_ms", 99),
            "proxy_first_p99_ms": stream_stat("proxy", "first_ms", 99),
            "direct_total_p50_ms": stream_stat("direct", "total_ms", 50),
            "proxy_total_p50_ms": stream_stat("proxy", "total_ms", 50),
            "proxy_cpu_ms_per_stream": median(cpu_per_stream),
            "correct": min(r["correct"] for r in stream_runs["proxy"]),
            "direct_correct": min(r["correct"] for r in stream_runs["direct"]),
            "errors": sum(r["errors"] for r in stream_runs["proxy"]),
        },
        "proxy_peak_rss_mb": main_rss,
        "scale": {
            "streams": n_scale,
            "errors": scale["errors"],
            "correct": scale["correct"],
            "peak_rss_mb": scale_rss,
        },
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(r: dict[str, Any]) -> str:
    c1, c64, s, sc = r["c1"], r["c64"], r["streams"], r["scale"]
    rows = [
        (
            "latency c=1 p50 (ms)",
            c1["direct_p50_ms"],
            c1["proxy_p50_ms"],
            f"+{c1['added_p50_ms']:.3f} ms",
            "added <= 0.3 ms",
        ),
        (
            "latency c=1 p99 (ms)",
            c1["direct_p99_ms"],
            c1["proxy_p99_ms"],
            f"+{c1['added_p99_ms']:.3f} ms",
            "",
        ),
        (
            "requests/s c=64",
            c64["direct_rps"],
            c64["proxy_rps"],
            f"x{c64['proxy_rps'] / c64['direct_rps']:.2f}",
            "",
        ),
        ("proxy CPU ms/request c=64", None, c64["proxy_cpu_ms_per_request"], "", "<= 0.15 ms"),
        (
            "  with budget + rate limit + allow-list",
            None,
            c64["policed_cpu_ms_per_request"],
            f"x{c64['policed_cpu_ms_per_request'] / c64['proxy_cpu_ms_per_request']:.2f}",
            "<= x1.15",
        ),
        (
            f"{s['count']} streams: first chunk p50 (ms)",
            s["direct_first_p50_ms"],
            s["proxy_first_p50_ms"],
            f"+{s['proxy_first_p50_ms'] - s['direct_first_p50_ms']:.2f} ms",
            "added <= 40 ms",
        ),
        (
            f"{s['count']} streams: first chunk p99 (ms)",
            s["direct_first_p99_ms"],
            s["proxy_first_p99_ms"],
            f"+{s['proxy_first_p99_ms'] - s['direct_first_p99_ms']:.2f} ms",
            "",
        ),
        (
            f"{s['count']} streams: total p50 (ms)",
            s["direct_total_p50_ms"],
            s["proxy_total_p50_ms"],
            f"+{s['proxy_total_p50_ms'] - s['direct_total_p50_ms']:.2f} ms",
            "",
        ),
        ("proxy CPU ms/stream", None, s["proxy_cpu_ms_per_stream"], "", "<= 0.8 ms"),
        ("streams byte-correct", None, f"{s['correct']}/{s['count']}", "", "all"),
        ("proxy peak RSS (MB)", None, r["proxy_peak_rss_mb"], "", "<= 80 MB"),
        (f"scale: {sc['streams']} slow streams errors", None, sc["errors"], "", "0"),
        ("scale: peak RSS (MB)", None, sc["peak_rss_mb"], "", "<= 300 MB"),
    ]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    header = ("metric", "direct", "byok-proxy", "added / ratio", "target")
    body = [tuple(cell(c) if i in (1, 2) else str(c) for i, c in enumerate(row)) for row in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
