"""Configuration: environment over config.yaml, one-line errors, --dev secrets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from helpers import ADMIN_TOKEN, REPO

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
