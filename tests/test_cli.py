"""The `byok-proxy` command, run as a real process (`python -m proxy.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from fake_openai import FakeOpenAI, start_fake
from helpers import ADMIN_TOKEN, GOOD_KEY, OTHER_KEY, REPO
from servers import free_port, serve

from proxy.cli_args import worker_count
from proxy.cpus import usable_cpus
from proxy.security import Keyring, generate_master_key
from proxy.store import HEAD_REVISION

SECRETS = ("ENCRYPTION_KEY", "ADMIN_TOKEN", "DATABASE_URL", "BYOK_CONFIG", "OPENAI_BASE_URL")


def run(
    args: list[str], cwd: Path, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`byok-proxy ARGS` in `cwd`, with none of the proxy's variables but `env`."""
    base = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "BYOK_DEV"}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=cwd,
        env={**base, **env},
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stderr, which must be a single line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    """A fake OpenAI upstream on a loopback port."""
    upstream, server = start_fake()
    with server:
        yield upstream


def test_gen_key(tmp_path: Path) -> None:
    result = run(["gen-key"], tmp_path)
    assert result.returncode == 0
    Keyring.parse(result.stdout.strip())
    token = run(["gen-key", "--admin-token"], tmp_path).stdout.strip()
    assert len(token) >= 32 and token.startswith("adm-")


def test_version(tmp_path: Path) -> None:
    result = run(["--version"], tmp_path)
    assert result.returncode == 0 and re.fullmatch(r"byok-proxy \d+\.\d+\.\d+\S*\n", result.stdout)


@pytest.mark.parametrize("command", [["--help"], ["gen-key"]])
def test_help_and_gen_key_load_no_server_code(tmp_path: Path, command: list[str]) -> None:
    """Startup cost: neither the app, SQLAlchemy, aiohttp nor the web stack is imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "proxy.cli", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    loaded = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "proxy.config" in loaded  # the check reads the import log right
    heavy = {"proxy.app", "sqlalchemy", "sqlmodel", "aiohttp", "starlette", "uvicorn", "httpx"}
    assert not heavy & loaded


COMMANDS = [
    ["serve"],
    ["gen-key"],
    ["migrate"],
    ["rotate-keys"],
    ["tenants", "create"],
    ["tenants", "list"],
    ["tenants", "show"],
    ["tenants", "update"],
    ["tenants", "delete"],
    ["tenants", "set-key"],
    ["tenants", "remove-key"],
    ["keys", "issue"],
    ["keys", "list"],
    ["keys", "revoke"],
    ["audit"],
    ["usage"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_describes_the_command_and_every_default(tmp_path: Path, command: list[str]) -> None:
    result = run([*command, "--help"], tmp_path)
    assert result.returncode == 0
    head, _, options = result.stdout.partition("\noptions:\n")
    description = head.split("\n\n")[1]
    assert len(description.split()) >= 15, f"no description paragraph: {head}"
    entries = re.split(r"\n(?=  -)", options.strip())
    assert len(entries) >= 2
    for entry in entries:
        if entry.lstrip().startswith("-h, --help"):
            continue
        text = " ".join(entry.split())
        assert "(default" in text or "(required)" in text, f"{command}: {text}"


def test_workers_zero_is_refused(tmp_path: Path) -> None:
    result = run(["serve", "--workers", "0"], tmp_path)
    assert result.returncode == 2
    assert "--workers: must be 1 or more" in result.stderr


def test_workers_auto_and_the_cpus_it_counts(tmp_path: Path) -> None:
    assert worker_count("auto") == worker_count("AUTO") == usable_cpus() >= 1
    assert worker_count("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be 1 or more.*\(or auto\)"):
        worker_count("0")
    affinity = len(os.sched_getaffinity(0))
    root = tmp_path / "cgroup"
    own = root / "system.slice" / "byok.service"
    own.mkdir(parents=True)

    def cpus() -> int:
        return usable_cpus(root, "/system.slice/byok.service")

    assert cpus() == affinity  # no cpu.max anywhere: no quota
    (root / "cpu.max").write_text("max 100000\n")
    assert cpus() == affinity
    (own / "cpu.max").write_text("50000 100000\n")  # systemd CPUQuota=50%: one worker
    assert cpus() == 1
    (own / "cpu.max").write_text("150000 100000\n")  # --cpus 1.5: rounded up
    assert cpus() == min(affinity, 2)
    (own / "cpu.max").write_text("6400000 100000\n")  # more than we may run on
    assert cpus() == affinity
    (root / "system.slice" / "cpu.max").write_text("100000 100000\n")  # a parent's quota
    assert cpus() == 1
    assert usable_cpus(root, "/") == affinity  # the root's "max" only


def test_serve_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    result = run(["serve", "--port", str(free_port())], tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert "ENCRYPTION_KEY" in line and "byok-proxy gen-key" in line
    result = run(["serve"], tmp_path, ENCRYPTION_KEY="bad")
    assert result.returncode == 2 and "malformed" in result.stderr
    result = run(["serve"], tmp_path, ENCRYPTION_KEY=generate_master_key(), ADMIN_TOKEN="short")
    assert result.returncode == 2 and "ADMIN_TOKEN" in one_line(result)


def test_readme_first_tenant_after_serve_dev(tmp_path: Path, fake: FakeOpenAI) -> None:
    """The README's "A first tenant", on the CLI, next to a running `serve --dev`: no
    variable set, secrets from ./.byok/; then a call through the proxy works."""
    port = free_port()
    upstream = {"OPENAI_BASE_URL": fake.base_url}
    with serve(["--dev"], upstream, tmp_path, port, tmp_path / "serve.log"):
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        create = ["tenants", "create", "--dev", "--name", "Acme", "--tier", "pro", "--id", "acme"]
        created = run(create, tmp_path)
        assert created.returncode == 0, created.stderr
        proxy_key = re.search(r"byok-\S+", created.stdout)
        assert proxy_key and "acme" in created.stdout
        stored = run(["tenants", "set-key", "--dev", "acme"], tmp_path, GOOD_KEY + "\n", **upstream)
        assert stored.returncode == 0, stored.stderr
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=proxy_key[0], max_retries=5
        )
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        assert fake.requests[-1].header("authorization") == f"Bearer {GOOD_KEY}"
        token = (tmp_path / ".byok" / "admin_token").read_text().strip()
        listed = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/tenants/acme",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert listed.json()["openai_key"]["status"] == "active"
    output = (tmp_path / "serve.log").read_text()
    assert "NOT FOR PRODUCTION" in output and token in output


def test_database_commands_need_no_admin_token(tmp_path: Path) -> None:
    """Only the commands that use a secret ask for it; none but serve asks for ADMIN_TOKEN."""
    db = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    create = ["tenants", "create", "--name", "Acme", "--tier", "trial", "--id", "acme"]
    assert run(create, tmp_path, **db).returncode == 0
    assert run(["tenants", "list"], tmp_path, **db).returncode == 0
    migrated = run(["migrate"], tmp_path, **db)
    assert migrated.returncode == 0
    assert migrated.stdout.startswith("byok-proxy migrate: the schema is already at revision")
    assert json.loads(run(["migrate", "--json"], tmp_path, **db).stdout)["found"] is not None
    summary = json.loads(run(["migrate", "--json"], tmp_path, **db).stdout)
    assert (summary["found"], summary["revision"]) == (HEAD_REVISION, HEAD_REVISION)
    fresh = {"DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    created = run(["migrate"], tmp_path, **fresh)
    assert created.returncode == 0 and "created" in created.stdout, created.stdout
    no_key = run(["tenants", "set-key", "acme"], tmp_path, GOOD_KEY, **db)
    assert no_key.returncode == 2 and "ENCRYPTION_KEY is not set" in one_line(no_key)
    assert not (tmp_path / ".byok").exists()  # without --dev nothing is made


def test_tenant_and_key_commands(tmp_path: Path, database_url: str) -> None:
    """Every control-plane command, its --json, and the exit codes (SQLite and PostgreSQL)."""
    db = {"DATABASE_URL": database_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run(list(args), tmp_path, **db)

    def as_json(*args: str) -> dict[str, object]:
        result = cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, object] = json.loads(result.stdout)
        return data

    created = as_json("tenants", "create", "--name", "Acme", "--tier", "pro", "--id", "acme")
    assert created["id"] == "acme" and str(created["api_key"]).startswith("byok-")
    dup = cli("tenants", "create", "--name", "Acme", "--tier", "pro", "--id", "acme")
    assert dup.returncode == 1 and "already exists" in one_line(dup)
    bad_id = cli("tenants", "create", "--name", "A", "--tier", "pro", "--id", "Bad Id")
    assert bad_id.returncode == 2 and "--id" in one_line(bad_id)
    assert cli("tenants", "create", "--name", "A", "--tier", "gold").returncode == 2

    table = cli("tenants", "list")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == [
        "id",
        "name",
        "tier",
    ]
    assert [t["id"] for t in as_json("tenants", "list")["data"]] == ["acme"]  # type: ignore[index]
    shown = as_json("tenants", "show", "acme")
    assert shown["openai_key"] == {
        "status": "none",
        "hint": None,
        "validated_at": None,
        "updated_at": None,
    }
    missing = cli("tenants", "show", "nobody")
    assert missing.returncode == 1 and one_line(missing) == "byok-proxy: No such tenant."

    policy = '{"allowed_models": ["gpt-4o-mini"]}'
    updated = as_json("tenants", "update", "acme", "--tier", "enterprise", "--policy", policy)
    assert updated["tier"] == "enterprise"
    assert updated["policy"]["allowed_models"] == ["gpt-4o-mini"]  # type: ignore[index]
    assert cli("tenants", "update", "acme").returncode == 2
    assert cli("tenants", "update", "acme", "--policy", "{nope").returncode == 2

    issued = as_json(
        "keys", "issue", "acme", "--name", "ci", "--expires-at", "2030-01-01T00:00:00Z"
    )
    assert issued["name"] == "ci" and str(issued["api_key"]).startswith("byok-")
    keys = as_json("keys", "list", "acme")["data"]
    assert [k["id"] for k in keys] == [created["api_key_id"], issued["id"]]  # type: ignore[index]
    assert as_json("keys", "revoke", "acme", str(issued["id"])) == {
        "id": issued["id"],
        "tenant_id": "acme",
        "revoked": True,
    }
    assert len(as_json("keys", "list", "acme")["data"]) == 1  # type: ignore[arg-type]
    assert cli("keys", "revoke", "acme", "key_nope").returncode == 1

    assert cli("tenants", "remove-key", "acme").returncode == 0  # none stored: still fine
    assert as_json("tenants", "remove-key", "acme") == {"tenant_id": "acme", "removed": False}
    assert cli("tenants", "delete", "acme").returncode == 2  # a script must say --yes
    assert as_json("tenants", "delete", "acme", "--yes") == {"id": "acme", "deleted": True}
    assert cli("tenants", "delete", "acme", "--yes").returncode == 1

    events = as_json("audit", "acme")["data"]
    assert [e["action"] for e in events][:3] == [  # type: ignore[index]
        "tenant.deleted",
        "api_key.revoked",
        "api_key.issued",
    ]
    assert {e["actor"] for e in events} == {"system"}  # type: ignore[union-attr]
    assert len(as_json("audit", "acme", "--limit", "2")["data"]) == 2  # type: ignore[arg-type]
    assert cli("audit", "acme", "--limit", "0").returncode == 2
    assert cli("audit", "nobody").returncode == 1


def test_set_key_from_stdin_validates_encrypts_and_never_shows_the_key(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
        "ENCRYPTION_KEY": generate_master_key(),
        "OPENAI_BASE_URL": fake.base_url,
    }
    outputs: list[str] = []

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = run(list(args), tmp_path, stdin, **env)
        outputs.extend([result.stdout, result.stderr])
        return result

    assert (
        cli("tenants", "create", "--name", "Acme", "--tier", "pro", "--id", "acme").returncode == 0
    )
    stored = cli("tenants", "set-key", "acme", "--json", stdin=f"  {GOOD_KEY}\n")
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["hint"] == f"sk-...{GOOD_KEY[-4:]}"
    assert [r.path for r in fake.requests] == ["/v1/models"]  # one validation call
    assert fake.requests[0].header("authorization") == f"Bearer {GOOD_KEY}"

    fake.revoked.add(OTHER_KEY)
    refused = cli("tenants", "set-key", "acme", stdin=OTHER_KEY)
    assert refused.returncode == 1 and "rejected" in one_line(refused)
    assert cli("tenants", "set-key", "acme", stdin="sk-short").returncode == 1
    assert cli("tenants", "set-key", "acme").returncode == 2  # nothing on stdin
    assert cli("tenants", "set-key", "nobody", stdin=GOOD_KEY).returncode == 1
    shown = json.loads(cli("tenants", "show", "acme", "--json").stdout)
    assert shown["openai_key"]["status"] == "active"  # the refused key changed nothing
    assert shown["openai_key"]["hint"] == f"sk-...{GOOD_KEY[-4:]}"
    actions = [e["action"] for e in json.loads(cli("audit", "acme", "--json").stdout)["data"]]
    assert actions[2] == "openai_key.set"  # then both refusals, audited with why
    assert actions[:2] == ["openai_key.rejected.format", "openai_key.rejected.invalid"]

    removed = cli("tenants", "remove-key", "acme")
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert json.loads(cli("audit", "acme", "--json").stdout)["data"][0]["action"] == (
        "openai_key.removed"
    )
    for text in outputs:
        assert GOOD_KEY not in text and OTHER_KEY not in text
        assert GOOD_KEY[8:24] not in text
    assert GOOD_KEY.encode() not in (tmp_path / "k.db").read_bytes()


def test_set_key_prompts_on_a_terminal_without_echo(tmp_path: Path, fake: FakeOpenAI) -> None:
    """On a terminal the key is asked for with echo off (getpass); the screen never shows it."""
    import pty
    import select

    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}",
        "ENCRYPTION_KEY": generate_master_key(),
        "OPENAI_BASE_URL": fake.base_url,
    }
    created = run(
        ["tenants", "create", "--name", "A", "--tier", "pro", "--id", "acme"], tmp_path, **env
    )
    assert created.returncode == 0, created.stderr
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal
        os.chdir(tmp_path)
        os.execve(
            sys.executable,
            [sys.executable, "-m", "proxy.cli", "tenants", "set-key", "acme"],
            {**base, **env},
        )
    screen = b""
    typed = False
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        assert ready, f"no output from the command: {screen!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        screen += chunk
        if not typed and b"(input hidden)" in screen:
            os.write(fd, GOOD_KEY.encode() + b"\n")
            typed = True
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert b"validated and stored" in screen
    assert GOOD_KEY.encode() not in screen


def _usage_line(ts: datetime, tenant: str, tokens: int) -> str:
    return json.dumps(
        {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "tenant_id": tenant,
            "model": "gpt-4o-mini",
            "status": 200,
            "prompt_tokens": tokens,
            "completion_tokens": 0,
            "total_tokens": tokens,
            "cost_usd": 0.0000015,
            "error_code": None,
        }
    )


def test_usage_windows_stdin_and_malformed_lines(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    log = "\n".join(
        [
            _usage_line(midnight - timedelta(days=10), "old", 1000),
            _usage_line(midnight - timedelta(days=3), "week", 100),
            _usage_line(midnight - timedelta(hours=12), "yesterday", 10),
            _usage_line(now - timedelta(minutes=5), "today", 1),
            "not json",
            '{"ts": "bad", "tenant_id": "x"}',
            "[1, 2]",
            "",
        ]
    )
    path = tmp_path / "usage.jsonl"
    path.write_text(log)

    def tenants(*args: str, stdin: str | None = None) -> dict[str, int]:
        result = run(["usage", *args, "--by", "tenant", "--json"], tmp_path, stdin)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["malformed_lines"] == 3
        return {r["tenant"]: r["total_tokens"] for r in report["rows"]}

    assert tenants(str(path)) == {"old": 1000, "week": 100, "yesterday": 10, "today": 1}
    assert tenants(str(path), "--since", "yesterday") == {"yesterday": 10, "today": 1}
    assert tenants(str(path), "--since", "yesterday", "--until", "today") == {"yesterday": 10}
    assert tenants(str(path), "--since", "today") == {"today": 1}
    assert tenants(str(path), "--since", "30m") == {"today": 1}
    assert set(tenants(str(path), "--since", "7d")) == {"week", "yesterday", "today"}
    day = (midnight - timedelta(days=3)).date().isoformat()
    assert set(tenants(str(path), "--since", day)) == {"week", "yesterday", "today"}
    assert tenants(str(path), "--until", f"{day}T00:00:00Z") == {"old": 1000}
    last_day = tenants("-", "--since", "24h", stdin=log)
    assert "today" in last_day and set(last_day) <= {"yesterday", "today"}

    table = run(["usage", str(path), "--by", "day"], tmp_path)
    assert table.returncode == 0 and "bad" not in table.stdout
    assert table.stdout.splitlines()[-1].split()[:3] == ["TOTAL", "4", "0"]
    assert one_line(table) == "byok-proxy: 3 malformed lines skipped"

    for value in ("last week", "2026-13-01", "0d", "24", "tomorrow"):
        refused = run(["usage", str(path), "--since", value], tmp_path)
        assert refused.returncode == 2, value
        assert "--since: expected a date" in one_line(refused)
    assert run(["usage", str(path), "--by", "colour"], tmp_path).returncode == 2
    missing = run(["usage", str(tmp_path / "nope")], tmp_path)
    assert missing.returncode == 1 and "cannot read" in one_line(missing)


def test_rotate_keys_is_registered(tmp_path: Path) -> None:
    """rotate-keys itself is tested in test_rotation.py; here: it asks for no ADMIN_TOKEN."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}",
        "ENCRYPTION_KEY": generate_master_key(),
        "BYOK_CONFIG": str(REPO / "config.yaml"),
    }
    result = run(["rotate-keys"], tmp_path, **env)
    assert result.returncode == 0, result.stderr


def test_admin_api_on_its_own_port(tmp_path: Path) -> None:
    proxy_port, admin_port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(f"admin:\n  host: 127.0.0.1\n  port: {admin_port}\n")
    env = {
        "ENCRYPTION_KEY": generate_master_key(),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
    }
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with serve([], env, tmp_path, proxy_port, tmp_path / "serve.log"):
        from servers import wait_until_up

        wait_until_up(f"http://127.0.0.1:{admin_port}/healthz")
        r = httpx.get(f"http://127.0.0.1:{admin_port}/api/v1/tenants", headers=headers)
        assert r.status_code == 200
        r = httpx.get(f"http://127.0.0.1:{proxy_port}/api/v1/tenants", headers=headers)
        assert r.status_code == 404
        r = httpx.get(f"http://127.0.0.1:{admin_port}/v1/models", headers=headers)
        assert r.status_code == 404
        r = httpx.get(f"http://127.0.0.1:{proxy_port}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_proxy_key"
