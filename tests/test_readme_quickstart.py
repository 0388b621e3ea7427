"""The README's offline first try, run as written: its `<!-- quickstart-offline -->` shell
blocks in a fresh folder, with the real entry points (`python -m bench.upstream`,
`byok-proxy serve --dev`, curl, the openai SDK), checking that both completions stream.

Only the README's two fixed ports are changed, to free ones, so the test never meets
another server; everything else runs literally."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from helpers import REPO
from servers import free_port, wait_until_up

UPSTREAM_PORT, PROXY_PORT = "9100", "8080"  # as the README writes them
BLOCK = re.compile(r"<!-- quickstart-offline(: background)? -->\n```sh\n(.*?)```", re.S)
SEPARATOR = "@@ next block @@"
TOKENS = [f"tok{i} " for i in range(20)]
# The fake sleeps 20 ms between chunks: the first and last of 20 arrive >= 380 ms apart
# when streamed, within a few ms when a stage buffers the whole answer.
STREAMED_SPREAD = 0.3
# What a newcomer's shell would not have set, or would point somewhere else.
UNSET = (
    "ENCRYPTION_KEY",
    "ADMIN_TOKEN",
    "DATABASE_URL",
    "BYOK_CONFIG",
    "BYOK_DEV",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "PLATFORM_OPENAI_KEY",
    "USAGE_LOG",
    "REDIS_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "PYTHONUNBUFFERED",  # a terminal is line-buffered; the README must flush itself
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def quickstart_blocks() -> tuple[list[str], list[str]]:
    """The marked shell blocks of the README's first section: (background, one-shot)."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Quickstart")
    section = readme[start : readme.index("\n## ", start)]
    background, oneshot = [], []
    for match in BLOCK.finditer(section):
        (background if match.group(1) else oneshot).append(match.group(2))
    return background, oneshot


def on_free_ports(block: str, ports: dict[str, str]) -> str:
    """`block` with the README's ports replaced by `ports`' values."""
    pattern = r"\b(" + "|".join(ports) + r")\b"
    return re.sub(pattern, lambda m: ports[m.group(1)], block)


def newcomer_env() -> dict[str, str]:
    """A fresh shell's environment, with the project's virtualenv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextmanager
def in_background(
    block: str, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `block` as a terminal would until the test ends, then stop its process group."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", block],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group `proc` leads (Ctrl-C in its terminal), SIGKILL if it hangs."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_timed(
    script: str, cwd: Path, env: dict[str, str]
) -> tuple[int, list[tuple[float, bytes]], str]:
    """Run `script`, noting when each piece of its stdout arrived: (exit code, pieces, stderr)."""
    proc = subprocess.Popen(
        ["bash", "-eo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    pieces: list[tuple[float, bytes]] = []
    errors = bytearray()
    deadline = time.monotonic() + 300
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, pieces)
        selector.register(proc.stderr, selectors.EVENT_READ, errors)
        while selector.get_map():
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the README's commands did not end: {errors.decode()}")
            for key, _ in selector.select(timeout=1):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                elif key.data is pieces:
                    pieces.append((time.monotonic(), data))
                else:
                    errors += data
    return proc.wait(), pieces, errors.decode(errors="replace")


def split_blocks(pieces: list[tuple[float, bytes]]) -> list[tuple[str, list[float]]]:
    """Each block's output, with the arrival time of each of its characters."""
    text, times = "", []
    for at, data in pieces:
        chunk = data.decode(errors="replace")
        text += chunk
        times += [at] * len(chunk)
    blocks, start = [], 0
    for part in text.split(SEPARATOR + "\n"):
        blocks.append((part, times[start : start + len(part)]))
        start += len(part) + len(SEPARATOR) + 1
    return blocks


def assert_streamed(output: str, times: list[float]) -> None:
    """Every token came, in order, and the first and last arrived as far apart as the
    fake sent them."""
    positions = [output.index(token, output.index(TOKENS[0])) for token in TOKENS]
    assert positions == sorted(positions), output
    spread = times[positions[-1]] - times[positions[0]]
    assert spread >= STREAMED_SPREAD, f"arrived all at once ({spread:.3f} s): {output}"


def test_blocks_are_marked_and_use_the_two_ports() -> None:
    background, oneshot = quickstart_blocks()
    assert len(background) == 2 and len(oneshot) == 2
    assert "python -m bench.upstream" in background[0] and UPSTREAM_PORT in background[0]
    assert "byok-proxy serve --dev" in background[1] and PROXY_PORT in background[1]
    assert "curl -N" in oneshot[0] and "from openai import OpenAI" in oneshot[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's walkthrough uses curl")
def test_offline_walkthrough_streams_a_completion(tmp_path: Path) -> None:
    background, oneshot = quickstart_blocks()
    upstream_port = free_port()
    proxy_port = free_port()
    while proxy_port == upstream_port:
        proxy_port = free_port()
    ports = {UPSTREAM_PORT: str(upstream_port), PROXY_PORT: str(proxy_port)}
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")  # a clone has it
    env = newcomer_env()

    with ExitStack() as stack:
        upstream, proxy = (
            stack.enter_context(
                in_background(on_free_ports(block, ports), tmp_path, env, tmp_path / f"bg{i}.log")
            )
            for i, block in enumerate(background)
        )
        try:
            wait_until_up(f"http://127.0.0.1:{upstream_port}/v1/models", upstream)
            wait_until_up(f"http://127.0.0.1:{proxy_port}/healthz", proxy)
        except (RuntimeError, TimeoutError) as exc:
            logs = "".join(p.read_text() for p in sorted(tmp_path.glob("bg*.log")))
            raise AssertionError(f"{exc}\n{logs}") from None
        script = f"\necho '{SEPARATOR}'\n".join(on_free_ports(b, ports) for b in oneshot)
        code, pieces, errors = run_timed(script, tmp_path, env)

    assert code == 0, errors
    (curl_out, curl_times), (sdk_out, sdk_times) = split_blocks(pieces)
    assert '"status":"active"' in curl_out, curl_out  # the key passed the fake's /models
    assert_streamed(curl_out, curl_times)
    assert curl_out.rstrip().endswith("data: [DONE]"), curl_out
    assert '"choices":[]' not in curl_out, "curl saw the usage chunk it did not ask for"
    assert_streamed(sdk_out, sdk_times)
    assert sdk_out.endswith("".join(TOKENS) + "\n32 tokens\n"), sdk_out
