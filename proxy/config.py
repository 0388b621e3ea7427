"""Typed configuration: `config.yaml` overlaid by environment variables, validated once.

`load_config()` is called once at startup (by the CLI or a test) and the frozen
`Config` it returns is passed down; nothing reads `os.environ` after that.
Every problem raises `ConfigError` with a one-line message saying how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml

from proxy.client_address import TrustedProxies, parse_networks
from proxy.keyformat import KeyFormatError, check_openai_key
from proxy.logs import FORMATS, LEVELS
from proxy.security import Keyring, Secret, generate_admin_token, generate_master_key

if TYPE_CHECKING:
    from proxy.config_schema import ConfigFile

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_DATABASE_URL = "sqlite:///./byok.db"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # JSON bodies, read whole
# Streamed uploads: OpenAI takes files up to 512 MB; one more MiB for the form around one.
DEFAULT_MAX_UPLOAD_BYTES = 513 * 1024 * 1024
MIN_ADMIN_TOKEN_LENGTH = 32
DEV_STATE_DIR = ".byok"


class ConfigError(Exception):
    """Configuration is missing or malformed; the message is one line, with the fix."""


@dataclass(frozen=True)
class TierPolicy:
    """What a tier may do without its own OpenAI key."""

    platform_fallback: bool = False
    daily_requests: int = 200
    daily_tokens: int = 200_000


# The platform key serves only stateless endpoints: on OpenAI, files, batches, vector
# stores, assistants, stored completions and responses belong to the key's project, so
# on a shared key every trial tenant would reach every other's.
DEFAULT_PLATFORM_ENDPOINTS = (
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/moderations",
    "POST /v1/responses",
    "GET /v1/models",
    "GET /v1/models/*",
)
_SEGMENT = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]*")  # what a trailing * matches


@dataclass(frozen=True)
class PlatformKeyPolicy:
    """What the platform key (trial fallback) may be used for, and how it is metered.

    `endpoints` are "METHOD /v1/path" entries; a trailing `*` matches one path
    segment (an id such as `gpt-4o-mini`: no slash, no dot segment, no escape).
    `default_output_tokens` is the output reserved for a request that states no
    `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    """

    endpoints: tuple[str, ...] = DEFAULT_PLATFORM_ENDPOINTS
    default_output_tokens: int = 4096

    def allows(self, method: str, raw_path: bytes) -> bool:
        """True if `method` on `raw_path` (as sent upstream, no query) is on the list."""
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return False
        entry = f"{method} {path}"
        for allowed in self.endpoints:
            if allowed.endswith("*"):
                rest = entry[len(allowed) - 1 :]
                if entry.startswith(allowed[:-1]) and _SEGMENT.fullmatch(rest):
                    return True
            elif entry == allowed:
                return True
        return False


# The tenant tiers, defined here only: the admin schemas, the CLI and `tiers:` use these.
Tier = Literal["trial", "pro", "enterprise"]
TIER_NAMES: tuple[str, ...] = get_args(Tier)

# By default only the trial tier may fall back to the platform key.
DEFAULT_TIERS = {name: TierPolicy(platform_fallback=name == "trial") for name in TIER_NAMES}


@dataclass(frozen=True)
class UpstreamConfig:
    """Where and how the proxy talks to OpenAI."""

    base_url: str = DEFAULT_BASE_URL
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    validation_timeout: float = 10.0
    pool_timeout: float = 10.0  # seconds to wait for a free pooled connection (then 504)
    allow_insecure: bool = False
    max_connections: int = 1000


@dataclass(frozen=True)
class DatabaseConfig:
    """How hard the proxy leans on its database, and how long it waits for it."""

    statement_timeout: float = 5.0  # seconds a statement may run (PostgreSQL)
    lock_timeout: float = 2.0  # seconds to wait for a lock (PostgreSQL lock, SQLite busy)
    pool_size: int = 10  # connections kept per worker
    max_overflow: int = 10  # extra connections under load; also bounds concurrent calls
    pool_timeout: float = 5.0  # seconds to wait for a pooled connection
    ready_timeout: float = 1.0  # /readyz answers "down" after this long

    @property
    def concurrency(self) -> int:
        """Database calls running at once per worker (one per connection)."""
        return self.pool_size + self.max_overflow

    @property
    def call_timeout(self) -> float:
        """The longest a request waits for one database call before a 503."""
        return self.pool_timeout + self.lock_timeout + self.statement_timeout


@dataclass(frozen=True)
class RateLimitConfig:
    """Where rate-limit counters live: Redis (`REDIS_URL`, shared by every worker and
    replica) or this process; and what to do while Redis cannot be reached."""

    redis_url: str | None = None  # REDIS_URL; None: counted per process
    fail_open: bool = True  # Redis down: count per process (open) or answer 503 (closed)
    redis_timeout: float = 0.25  # seconds one Redis call may take before it counts as down
    key_prefix: str = "byok:rl:"


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs, read once."""

    keyring: Keyring
    admin_token: Secret
    database_url: str = DEFAULT_DATABASE_URL
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    platform_openai_key: Secret | None = None
    usage_log: str = "-"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    failed_auth_per_minute: int = 60  # per client address; 0 turns the limit off
    cache_ttl_seconds: float = 5.0
    tiers: Mapping[str, TierPolicy] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    platform_key: PlatformKeyPolicy = field(default_factory=PlatformKeyPolicy)
    log_level: str = "INFO"
    log_format: str = "text"  # text or json (proxy.logs)
    metrics_require_auth: bool = False
    admin_host: str | None = None
    admin_port: int | None = None
    console: bool = True  # serve the web console under /console beside /api/
    shutdown_timeout_seconds: float = 30.0
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    prices: Any = None  # proxy.prices.PriceTable (set by load_config)


def _read_yaml(path: Path, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist (set BYOK_CONFIG or --config)")
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"config file {path} cannot be read ({why}); check BYOK_CONFIG") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def check_upstream_url(url: str, allow_insecure: bool) -> str:
    """Normalise the upstream base URL; refuse plaintext HTTP unless loopback or allowed."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"OPENAI_BASE_URL must be an http(s) URL, got {url!r}")
    if parts.query or parts.fragment or parts.username:
        raise ConfigError("OPENAI_BASE_URL must not carry credentials, a query or a fragment")
    if not parts.path.endswith("/v1"):
        raise ConfigError(f"OPENAI_BASE_URL must end in /v1, got {url!r}")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ConfigError(
            "OPENAI_BASE_URL uses plaintext http to a non-loopback host; keys would travel "
            "unencrypted (set upstream.allow_insecure: true in config.yaml to override)"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dev_secret(state_dir: Path, name: str, make: Any) -> str:
    """Read or create one generated dev secret, owner-only."""
    state_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    path = state_dir / name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make())
        print(
            f"byok-proxy --dev: generated {name} into {path.resolve()} "
            "(owner-only). DEV MODE: NOT FOR PRODUCTION.",
            file=sys.stderr,
        )
    return path.read_text().strip()


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    dev: bool = False,
    state_dir: str | Path = DEV_STATE_DIR,
) -> Config:
    """Build the Config from `config.yaml` (or `path`) and environment `env`.

    With `dev=True`, a missing ENCRYPTION_KEY / ADMIN_TOKEN is generated once
    into `state_dir` and reused on later starts.
    """
    from proxy.config_schema import read_config_file  # pydantic: not for --help / gen-key
    from proxy.prices import load_prices  # here: proxy.prices imports this module

    env = os.environ if env is None else env
    explicit = path is not None or "BYOK_CONFIG" in env
    cfg_path = Path(path or env.get("BYOK_CONFIG") or "config.yaml")
    file = read_config_file(_read_yaml(cfg_path, required=explicit))

    up = file.upstream
    upstream = UpstreamConfig(
        base_url=check_upstream_url(env.get("OPENAI_BASE_URL") or up.base_url, up.allow_insecure),
        connect_timeout=up.connect_timeout_seconds,
        read_timeout=up.read_timeout_seconds,
        validation_timeout=up.validation_timeout_seconds,
        pool_timeout=up.pool_timeout_seconds,
        allow_insecure=up.allow_insecure,
        max_connections=up.max_connections,
    )
    keyring, token = _secrets(env, dev, Path(state_dir))
    level, log_format = _logging_settings(
        file.logging.level or file.log.level, file.logging.format, env
    )
    return Config(
        keyring=keyring,
        admin_token=token,
        database_url=env.get("DATABASE_URL") or file.database_url or DEFAULT_DATABASE_URL,
        database=DatabaseConfig(**file.database.model_dump()),
        upstream=upstream,
        platform_openai_key=_platform_openai_key(env),
        usage_log=env.get("USAGE_LOG") or file.usage_log or "-",
        max_body_bytes=file.limits.max_body_bytes,
        max_upload_bytes=file.limits.max_upload_bytes,
        trusted_proxies=_trusted_proxies(file.trusted_proxies, env),
        failed_auth_per_minute=file.limits.failed_auth_per_minute,
        cache_ttl_seconds=file.cache_ttl_seconds,
        tiers={
            name: replace(policy, **file.tiers[name].model_dump(exclude_unset=True))
            if name in file.tiers
            else policy
            for name, policy in DEFAULT_TIERS.items()
        },
        platform_key=PlatformKeyPolicy(
            tuple(file.platform_key.allowed_endpoints), file.platform_key.default_output_tokens
        ),
        log_level=level,
        log_format=log_format,
        metrics_require_auth=file.metrics.require_admin_token,
        admin_host=file.admin.host or None,
        admin_port=file.admin.port,
        console=file.admin.console,
        rate_limits=_rate_limit_config(file, env),
        prices=load_prices(file.prices),
        shutdown_timeout_seconds=file.server.shutdown_timeout_seconds,
    )


def _secrets(env: Mapping[str, str], dev: bool, state: Path) -> tuple[Keyring, Secret]:
    """ENCRYPTION_KEY and ADMIN_TOKEN from `env` (or, with `dev`, generated into `state`)."""
    enc = env.get("ENCRYPTION_KEY") or ""
    token = env.get("ADMIN_TOKEN") or ""
    if dev and not enc:
        enc = _dev_secret(state, "encryption_key", generate_master_key)
    if dev and not token:
        token = _dev_secret(state, "admin_token", generate_admin_token)
    if not enc:
        raise ConfigError(
            "ENCRYPTION_KEY is not set; make one with `byok-proxy gen-key` (or use `serve --dev`)"
        )
    try:
        keyring = Keyring.parse(enc)
    except ValueError as exc:
        raise ConfigError(
            f"ENCRYPTION_KEY is malformed: {exc}; make one with `byok-proxy gen-key`"
        ) from None
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        what = "is not set" if not token else f"is shorter than {MIN_ADMIN_TOKEN_LENGTH} characters"
        raise ConfigError(f"ADMIN_TOKEN {what}; make one with `byok-proxy gen-key --admin-token`")
    return keyring, Secret(token)


def _platform_openai_key(env: Mapping[str, str]) -> Secret | None:
    """PLATFORM_OPENAI_KEY, held to the rule a tenant's key is held to; None if unset."""
    platform = (env.get("PLATFORM_OPENAI_KEY") or "").strip()
    if not platform:
        return None
    try:
        check_openai_key(platform)
    except KeyFormatError as exc:
        raise ConfigError(f"PLATFORM_OPENAI_KEY is malformed: {exc}") from None
    return Secret(platform)


def _rate_limit_config(file: ConfigFile, env: Mapping[str, str]) -> RateLimitConfig:
    url = (env.get("REDIS_URL") or "").strip() or None
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
    section = file.rate_limits
    return RateLimitConfig(
        redis_url=url,
        fail_open=section.fail == "open",
        redis_timeout=section.redis_timeout_seconds,
        key_prefix=section.key_prefix,
    )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where (1-based line and column), on one line."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _trusted_proxies(listed: list[str] | None, env: Mapping[str, str]) -> TrustedProxies:
    """`TRUSTED_PROXIES` (comma-separated) or `trusted_proxies:` (a list of CIDRs)."""
    if "TRUSTED_PROXIES" in env:
        entries = [e for e in env["TRUSTED_PROXIES"].split(",") if e.strip()]
        where = "TRUSTED_PROXIES"
    else:
        entries, where = listed or [], "config.yaml: trusted_proxies"
    try:
        return TrustedProxies(parse_networks(entries))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (e.g. 10.0.0.0/8 or 2001:db8::/32)") from None


def _logging_settings(
    level: str | None, fmt: str | None, env: Mapping[str, str]
) -> tuple[str, str]:
    """(level, format): LOG_LEVEL / LOG_FORMAT over config.yaml's, checked against proxy.logs."""
    level = env.get("LOG_LEVEL") or level or "INFO"
    if level.upper() not in LEVELS:
        raise ConfigError(
            f"logging.level (or LOG_LEVEL) must be DEBUG, INFO, WARNING or ERROR, got {level!r}"
        )
    fmt = env.get("LOG_FORMAT") or fmt or "text"
    if fmt.lower() not in FORMATS:
        raise ConfigError(f"logging.format (or LOG_FORMAT) must be text or json, got {fmt!r}")
    return level.upper(), fmt.lower()
