"""config.yaml's schema: one frozen pydantic model per section, strict types, no unknown keys.

`read_config_file(raw)` checks the parsed YAML mapping and returns a `ConfigFile`;
`proxy.config.load_config` overlays the environment on it and builds the `Config`.
A problem raises `ConfigError` with one line naming its dotted path, e.g.
"config.yaml: 'limits.max_body_bytes' must be an integer, got 'abc'".
Strict means what YAML wrote is what is used: no "5" for 5, no `true` for 1; an
integer is still accepted where a number of seconds is expected. A setting left
empty (`key:` or `null`) takes its default. This module loads pydantic, so only
`load_config` imports it (`--help` and `gen-key` never do).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from proxy.config import (
    DEFAULT_BASE_URL,
    DEFAULT_DATABASE_URL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PLATFORM_ENDPOINTS,
    ConfigError,
    DatabaseConfig,
    RateLimitConfig,
    Tier,
    TierPolicy,
    UpstreamConfig,
)


class _Section(BaseModel):
    """A mapping in config.yaml: only its own keys, each of its declared type."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, data: Any) -> Any:
        if data is None:  # a section with nothing under it (as `tiers: {pro: }`)
            return {}
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class UpstreamSection(_Section):
    base_url: str = DEFAULT_BASE_URL
    connect_timeout_seconds: float = UpstreamConfig.connect_timeout
    read_timeout_seconds: float = UpstreamConfig.read_timeout
    validation_timeout_seconds: float = UpstreamConfig.validation_timeout
    pool_timeout_seconds: float = UpstreamConfig.pool_timeout
    allow_insecure: bool = UpstreamConfig.allow_insecure
    max_connections: int = UpstreamConfig.max_connections


class LimitsSection(_Section):
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    failed_auth_per_minute: int = 60


class DatabaseSection(_Section):
    """The names of `DatabaseConfig`'s fields; a zero pool or timeout would hang or fail."""

    statement_timeout: float = Field(default=DatabaseConfig.statement_timeout, gt=0)
    lock_timeout: float = Field(default=DatabaseConfig.lock_timeout, gt=0)
    pool_size: int = Field(default=DatabaseConfig.pool_size, gt=0)
    max_overflow: int = Field(default=DatabaseConfig.max_overflow, ge=0)
    pool_timeout: float = Field(default=DatabaseConfig.pool_timeout, gt=0)
    ready_timeout: float = Field(default=DatabaseConfig.ready_timeout, gt=0)


class TierSection(_Section):
    """What is set here overrides the tier's own default (`proxy.config.DEFAULT_TIERS`)."""

    platform_fallback: bool = TierPolicy.platform_fallback
    daily_requests: int = TierPolicy.daily_requests
    daily_tokens: int = TierPolicy.daily_tokens


# A `platform_key.allowed_endpoints` entry: "METHOD /v1/path", maybe ending in *.
_ENDPOINT = re.compile(r"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) (/v1/[A-Za-z0-9_./{}-]*\*?)")


def _endpoint(entry: str) -> str:
    if not _ENDPOINT.fullmatch(entry):
        raise ValueError(
            "must look like 'POST /v1/chat/completions' (a trailing * matches one path segment)"
        )
    return entry


class PlatformKeySection(_Section):
    allowed_endpoints: list[Annotated[str, AfterValidator(_endpoint)]] = Field(
        default_factory=lambda: list(DEFAULT_PLATFORM_ENDPOINTS)
    )
    default_output_tokens: int = Field(default=4096, ge=0)


class LoggingSection(_Section):
    """Checked against `proxy.logs` after LOG_LEVEL / LOG_FORMAT are overlaid."""

    level: str | None = None
    format: str | None = None


class LegacyLogSection(_Section):
    """The older `log: {level: ...}`, read when `logging.level` is not set."""

    level: str | None = None


class MetricsSection(_Section):
    require_admin_token: bool = False


class AdminSection(_Section):
    host: str | None = None
    port: int | None = None
    console: bool = True  # the web console under /console (admin.console)


class ServerSection(_Section):
    shutdown_timeout_seconds: float = 30.0


class RateLimitsSection(_Section):
    fail: Literal["open", "closed"] = "open"
    redis_timeout_seconds: float = RateLimitConfig.redis_timeout
    key_prefix: str = RateLimitConfig.key_prefix


class ConfigFile(_Section):
    """The whole file; environment variables are overlaid by `load_config`, not here."""

    database_url: str = DEFAULT_DATABASE_URL
    database: DatabaseSection = DatabaseSection()
    usage_log: str = "-"
    upstream: UpstreamSection = UpstreamSection()
    limits: LimitsSection = LimitsSection()
    cache_ttl_seconds: float = 5.0
    tiers: dict[Tier, TierSection] = Field(default_factory=dict)
    platform_key: PlatformKeySection = PlatformKeySection()
    logging: LoggingSection = LoggingSection()
    log: LegacyLogSection = LegacyLogSection()
    metrics: MetricsSection = MetricsSection()
    admin: AdminSection = AdminSection()
    server: ServerSection = ServerSection()
    rate_limits: RateLimitsSection = RateLimitsSection()
    trusted_proxies: list[str] | None = None  # CIDRs, parsed with TRUSTED_PROXIES
    prices: Any = None  # checked by proxy.prices.load_prices, with its own messages


def read_config_file(raw: Mapping[str, Any]) -> ConfigFile:
    """The checked contents of config.yaml's top-level mapping `raw`."""
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc) from None


# What a value of each type looks like, for "must be ...".
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}
_UNKNOWN = ("extra_forbidden", "invalid_key")


def config_error(exc: ValidationError) -> ConfigError:
    """The first problem pydantic found, as one line in config.yaml's terms."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = first["loc"]
    if first["type"] in _UNKNOWN or loc[-1:] == ("[key]",):
        return _unknown_settings(errors, loc)
    kind = first["type"]
    if kind in _EXPECTED:
        must = f"must be {_EXPECTED[kind]}"
    elif kind == "value_error":
        must = str(first["ctx"]["error"])
    else:
        must = first["msg"].replace("Input should be", "must be", 1)
    got = repr(first["input"])
    got = got if len(got) <= 80 else got[:77] + "..."
    return ConfigError(f"config.yaml: '{_dotted(loc)}' {must}, got {got}")


def _unknown_settings(errors: list[Any], loc: tuple[int | str, ...]) -> ConfigError:
    """Every unknown key beside the first one found, in one line."""
    parent = loc[:-2] if loc[-1] == "[key]" else loc[:-1]
    names = sorted(
        str(e["loc"][len(parent)])
        for e in errors
        if len(e["loc"]) > len(parent)
        and e["loc"][: len(parent)] == parent
        and (e["type"] in _UNKNOWN or e["loc"][-1] == "[key]")
    )
    under = f" under '{_dotted(parent)}'" if parent else ""
    return ConfigError(f"config.yaml: unknown setting(s) {names}{under}")


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('platform_key', 'allowed_endpoints', 2) -> platform_key.allowed_endpoints[2]"""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text
