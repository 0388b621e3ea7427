"""Configuration: environment over config.yaml, one-line errors, --dev secrets."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import ADMIN_TOKEN, REPO
from sqlalchemy.engine import make_url

from proxy.config import ConfigError, load_config
from proxy.security import Secret, generate_master_key


def env(**extra: str) -> dict[str, str]:
    return {"ENCRYPTION_KEY": generate_master_key(), "ADMIN_TOKEN": ADMIN_TOKEN, **extra}


def test_defaults_from_shipped_config_yaml() -> None:
    config = load_config(REPO / "config.yaml", env())
    assert config.upstream.base_url == "https://api.openai.com/v1"
    assert config.database_url == "sqlite:///./byok.db"
    assert config.max_body_bytes == 64 * 1024 * 1024
    assert config.cache_ttl_seconds == 5
    assert config.tiers["trial"].platform_fallback is True
    assert config.tiers["trial"].daily_requests == 200
    assert config.tiers["trial"].daily_tokens == 200_000
    assert config.tiers["pro"].platform_fallback is False
    assert config.usage_log == "-" and config.platform_openai_key is None


def test_environment_overrides_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "database_url: sqlite:///from-yaml.db\nusage_log: yaml.log\n"
        "upstream:\n  base_url: https://yaml.example/v1\n"
    )
    config = load_config(path, env())
    assert config.database_url == "sqlite:///from-yaml.db"
    assert config.upstream.base_url == "https://yaml.example/v1"
    config = load_config(
        path,
        env(
            DATABASE_URL="sqlite:///env.db",
            USAGE_LOG="env.log",
            OPENAI_BASE_URL="https://env.example/v1/",
            PLATFORM_OPENAI_KEY="sk-platform-abcdefghijklmnop",
        ),
    )
    assert config.database_url == "sqlite:///env.db" and config.usage_log == "env.log"
    assert config.upstream.base_url == "https://env.example/v1"
    assert isinstance(config.platform_openai_key, Secret)
    assert "sk-platform" not in repr(config)


def test_byok_config_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache_ttl_seconds: 1.5\n")
    assert load_config(None, env(BYOK_CONFIG=str(path))).cache_ttl_seconds == 1.5
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, env(BYOK_CONFIG=str(tmp_path / "missing.yaml")))


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"ADMIN_TOKEN": ADMIN_TOKEN}, "ENCRYPTION_KEY is not set"),
        ({"ADMIN_TOKEN": ADMIN_TOKEN, "ENCRYPTION_KEY": "nope"}, "ENCRYPTION_KEY is malformed"),
        ({"ENCRYPTION_KEY": generate_master_key()}, "ADMIN_TOKEN is not set"),
        ({"ENCRYPTION_KEY": generate_master_key(), "ADMIN_TOKEN": "short"}, "shorter than 32"),
    ],
)
def test_missing_or_malformed_secrets(variables: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "config.yaml", variables)
    text = str(info.value)
    assert message in text and "byok-proxy gen-key" in text and "\n" not in text


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://api.openai.com/v1", True),
        ("http://127.0.0.1:9000/v1", True),
        ("http://localhost:9000/v1", True),
        ("http://[::1]:9000/v1", True),
        ("http://api.openai.com/v1", False),
        ("ftp://x/v1", False),
        ("https://api.openai.com/", False),
        ("https://user:pw@api.openai.com/v1", False),
    ],
)
def test_upstream_must_be_https_unless_loopback(url: str, ok: bool) -> None:
    if ok:
        assert load_config(REPO / "config.yaml", env(OPENAI_BASE_URL=url)).upstream.base_url
    else:
        with pytest.raises(ConfigError):
            load_config(REPO / "config.yaml", env(OPENAI_BASE_URL=url))


def test_insecure_upstream_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  allow_insecure: true\n")
    config = load_config(path, env(OPENAI_BASE_URL="http://10.0.0.5/v1"))
    assert config.upstream.base_url == "http://10.0.0.5/v1"


@pytest.mark.parametrize(
    "text",
    [
        "unknown_thing: 1\n",
        "upstream:\n  bogus: 1\n",
        "tiers:\n  gold: {}\n",
        "cache_ttl_seconds: soon\n",
        "limits:\n  max_body_bytes: true\n",
        "log:\n  level: LOUD\n",
        "[unclosed\n",
        "- a list\n",
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env())
    assert "\n" not in str(info.value)


def load_text(tmp_path: Path, text: str) -> str:
    """The ConfigError line that config.yaml `text` gives (it must give one)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env())
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "tiers:\n  trial:\n    daily_requests: many\n",
            "config.yaml: 'tiers.trial.daily_requests' must be an integer, got 'many'",
        ),
        (
            "database:\n  lock_timeout: 2s\n",
            "config.yaml: 'database.lock_timeout' must be a number, got '2s'",
        ),
        (
            "upstream:\n  allow_insecure: 'no'\n",
            "config.yaml: 'upstream.allow_insecure' must be true or false, got 'no'",
        ),
        (
            "rate_limits:\n  fail: maybe\n",
            "config.yaml: 'rate_limits.fail' must be 'open' or 'closed', got 'maybe'",
        ),
        (
            "platform_key:\n  allowed_endpoints: [POST /v1/embeddings, GET /admin]\n",
            "config.yaml: 'platform_key.allowed_endpoints[1]' must look like "
            "'POST /v1/chat/completions' (a trailing * matches one path segment), got 'GET /admin'",
        ),
    ],
)
def test_wrong_type_in_a_section_names_its_dotted_path(
    tmp_path: Path, text: str, line: str
) -> None:
    assert load_text(tmp_path, text) == line


# Every mapping in config.yaml, and where an unknown key under it is reported.
SECTIONS = {
    "upstream": "upstream:\n  x: 1\n",
    "limits": "limits:\n  x: 1\n",
    "database": "database:\n  x: 1\n",
    "tiers": "tiers:\n  x: {}\n",
    "tiers.trial": "tiers:\n  trial: {x: 1}\n",
    "platform_key": "platform_key:\n  x: 1\n",
    "logging": "logging:\n  x: 1\n",
    "log": "log:\n  x: 1\n",
    "metrics": "metrics:\n  x: 1\n",
    "admin": "admin:\n  x: 1\n",
    "server": "server:\n  x: 1\n",
    "rate_limits": "rate_limits:\n  x: 1\n",
    "prices": "prices:\n  x: 1\n",
}


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_in_each_section_is_refused(tmp_path: Path, section: str) -> None:
    line = load_text(tmp_path, SECTIONS[section])
    assert line.startswith(f"config.yaml: unknown setting(s) ['x'] under '{section}'"), line


def test_every_section_of_the_shipped_file_is_checked_for_unknown_keys() -> None:
    import yaml

    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    assert {name for name, value in shipped.items() if isinstance(value, dict)} <= set(SECTIONS)


@pytest.mark.parametrize(
    "text",
    [
        "limits:\n  max_body_bytes: true\n",
        "limits:\n  failed_auth_per_minute: false\n",
        "database:\n  pool_size: true\n",
        "tiers:\n  pro:\n    daily_tokens: yes\n",
        "upstream:\n  max_connections: true\n",
        "admin:\n  port: true\n",
        "cache_ttl_seconds: true\n",
    ],
)
def test_a_bool_is_not_a_number(tmp_path: Path, text: str) -> None:
    line = load_text(tmp_path, text)
    assert re.search(r"' must be (an integer|a number), got (True|False)$", line), line


def test_an_integer_is_a_number_of_seconds(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache_ttl_seconds: 2\nupstream:\n  read_timeout_seconds: 30\n")
    config = load_config(path, env())
    assert config.cache_ttl_seconds == 2.0 and isinstance(config.cache_ttl_seconds, float)
    assert isinstance(config.upstream.read_timeout, float)


def test_an_empty_setting_takes_its_default(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  base_url:\ntiers:\n  pro:\n  trial: {daily_requests: 5}\n")
    config = load_config(path, env())
    assert config.upstream.base_url == "https://api.openai.com/v1"
    assert config.tiers["trial"].daily_requests == 5
    assert config.tiers["trial"].platform_fallback is True  # the tier's own default kept


def test_an_empty_database_url_or_usage_log_takes_its_default(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('database_url: ""\nusage_log: ""\n')
    config = load_config(path, env())
    assert (config.database_url, config.usage_log) == ("sqlite:///./byok.db", "-")


def test_dev_generates_secrets_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / ".byok"
    first = load_config(REPO / "config.yaml", {}, dev=True, state_dir=state)
    assert "NOT FOR PRODUCTION" in capsys.readouterr().err
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("encryption_key", "admin_token"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    second = load_config(REPO / "config.yaml", {}, dev=True, state_dir=state)
    assert first.admin_token == second.admin_token
    assert first.keyring.kids == second.keyring.kids
    assert capsys.readouterr().err == ""
    # Explicit environment wins over the generated secrets.
    third = load_config(REPO / "config.yaml", env(), dev=True, state_dir=state)
    assert third.admin_token.reveal() == ADMIN_TOKEN


# --- startup failures through the real command: one line, what to fix, no password ---

PASSWORD = "s3cretPW-4711"
BYOK = Path(sys.executable).parent / "byok-proxy"


def _postgres_server() -> str | None:
    """host:port of the tests' PostgreSQL server, if it answers."""
    from conftest import PG_URL

    url = make_url(PG_URL)
    try:
        socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=2).close()
    except OSError:
        return None
    return f"{url.host or '127.0.0.1'}:{url.port or 5432}"


def run_cli(args: list[str], cwd: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`byok-proxy ARGS` in `cwd` with valid secrets and `variables`, bounded in time."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BYOK_CONFIG")}
    return subprocess.run(  # noqa: S603 (our own console script)
        [str(BYOK), *args],
        cwd=cwd,
        env={**base, **env(), **variables},
        capture_output=True,
        text=True,
        timeout=120,  # a command that fails to fail would serve on
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def bad_database_urls(tmp: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (DATABASE_URL, words its error line must hold)."""
    unused_port = 1  # tcpmux: nothing listens there
    blocker = tmp / "a-file"
    blocker.write_text("")
    urls = {
        "refused": (
            f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{unused_port}/test",
            ("Connection refused", "postgres:***@", "port", "DATABASE_URL"),
        ),
        "mysql": (f"mysql://u:{PASSWORD}@127.0.0.1/db", ("'mysql' is not supported",)),
        "postgres-scheme": (f"postgres://u:{PASSWORD}@127.0.0.1/db", ("postgresql+psycopg://",)),
        "no-driver": (f"postgresql+pg8000://u:{PASSWORD}@127.0.0.1/db", ("not installed",)),
        "malformed": (f"postgresql+psycopg://u:{PASSWORD}@host:port/db", ("not a database URL",)),
        "sqlite-no-dir": (f"sqlite:///{tmp / 'missing' / 'byok.db'}", ("does not exist",)),
        "sqlite-not-a-dir": (f"sqlite:///{blocker / 'byok.db'}", ("not a directory",)),
        "sqlite-blank": ("sqlite://", ("in-memory", "sqlite:///./byok.db")),
        "sqlite-empty-path": ("sqlite:///", ("in-memory",)),
        "sqlite-memory": ("sqlite:///:memory:", ("in-memory",)),
        "sqlite-memory-uri": ("sqlite:///file:x?mode=memory&uri=true", ("in-memory",)),
    }
    server = _postgres_server()
    if server is not None:
        urls["missing-database"] = (
            f"postgresql+psycopg://postgres:{PASSWORD}@{server}/byok_no_such_database",
            ('"byok_no_such_database" does not exist', "createdb"),
        )
        urls["missing-role"] = (
            f"postgresql+psycopg://byok_no_such_role:{PASSWORD}@{server}/test",
            ('"byok_no_such_role" does not exist', "createuser"),
        )
    return urls


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_bad_database_url_is_one_line(tmp_path: Path, command: str) -> None:
    args = [command] if command == "migrate" else ["serve", "--port", "0"]
    for name, (url, words) in bad_database_urls(tmp_path).items():
        result = run_cli(args, tmp_path, DATABASE_URL=url)
        line = assert_one_line(result, *words)
        assert line.startswith("byok-proxy: "), (name, line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_sqlite_directory_not_writable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    result = run_cli(["migrate"], tmp_path, DATABASE_URL=f"sqlite:///{folder / 'byok.db'}")
    assert_one_line(result, "not writable")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("limits:\n  max_body_bytes: [1,\n", ("not valid YAML", "line 3")),
        ("upstream:\n  base_url: x\n  read_timeout_seconds: 1\n\tbad: tab\n", ("line 4",)),
        ("limitz:\n  max_body_bytes: 1\n", ("unknown setting", "limitz")),
        ("limits:\n  max_upload_bytes: lots\n", ("limits.max_upload_bytes", "must be an integer")),
        ("trusted_proxies: [10.0.0.0/33]\n", ("trusted_proxies", "10.0.0.0/33")),
    ],
)
def test_bad_config_file_is_one_line(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    (tmp_path / "c.yaml").write_text(text)
    assert_one_line(run_cli(["migrate"], tmp_path, BYOK_CONFIG="c.yaml"), *words)


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_unreadable_byok_config_is_one_line(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "conf"
    if kind == "directory":
        target.mkdir()
    else:
        target.write_bytes(b"\xff\xfe\x00junk")
    result = run_cli(["serve", "--port", "0"], tmp_path, BYOK_CONFIG=str(target))
    assert_one_line(result, "cannot be read", "BYOK_CONFIG")


def test_yaml_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache_ttl_seconds: 5\nlimits: {max_body_bytes: 1\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1"):
        load_config(path, env())


def test_upload_limit_defaults_above_the_json_limit() -> None:
    config = load_config(REPO / "config.yaml", env())
    assert config.max_upload_bytes == 513 * 1024 * 1024 > 512 * 1000 * 1000
    assert config.max_body_bytes == 64 * 1024 * 1024
    assert not config.trusted_proxies.networks


def test_fallback_tier_without_platform_key_warns_and_says_so(
    tmp_path: Path, master_key: str
) -> None:
    from fake_openai import start_fake
    from servers import create_tenant, free_port, serve, serve_env

    fake, fake_server = start_fake()
    variables = serve_env(tmp_path, master_key, f"sqlite:///{tmp_path / 'db'}", fake.base_url)
    del variables["PLATFORM_OPENAI_KEY"]
    port, log = free_port(), tmp_path / "serve.log"
    with fake_server, serve([], variables, tmp_path, port, log):
        url = f"http://127.0.0.1:{port}"
        key = create_tenant(url, "triala", tier="trial")
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
    assert reply.status_code == 402
    error = reply.json()["error"]
    assert error["code"] == "openai_key_missing"
    assert "platform key" in error["message"] and "not configured" in error["message"]
    assert "must bring" not in error["message"]
    assert not fake.requests
    warnings = [line for line in log.read_text().splitlines() if "PLATFORM_OPENAI_KEY" in line]
    assert len(warnings) == 1 and "trial" in warnings[0] and "WARNING" in warnings[0]


def test_fallback_tiers_without_platform_key() -> None:
    from proxy.credentials import fallback_without_platform_key

    config = load_config(REPO / "config.yaml", env())
    assert fallback_without_platform_key(config) == ["trial"]
    with_key = load_config(REPO / "config.yaml", env(PLATFORM_OPENAI_KEY="sk-" + "p" * 30))
    assert fallback_without_platform_key(with_key) == []
