"""The price table: what a call cost, in integer nano-USD, from its model and usage.

The table is the `prices:` section of config.yaml: OpenAI's standard (not batch,
not priority) list prices, copied from `source` on the date `as_of`. It is data,
not code: when OpenAI changes a price, the operator edits config.yaml.

- Units: prices are USD per 1M tokens (`input`, `cached_input`, `output`), as
  OpenAI publishes them; costs are integer nano-USD (1e-9 USD), computed with
  exact fractions and rounded half up once, so the same usage always gives the
  same integer and sums of costs add up. `usd()` is the one conversion to USD.
- Cached input: the part of the prompt served from OpenAI's prompt cache
  (`prompt_tokens_details.cached_tokens`) is billed at `cached_input`, or at
  `input` when the model has no cached price. A model with no `output` price
  (embeddings, moderations) bills its completion tokens at 0.
- Snapshots: a dated name (`gpt-4o-mini-2024-07-18`, `gpt-4-0613`) is priced
  as its family (`gpt-4o-mini`, `gpt-4`) unless the snapshot is listed itself
  (`gpt-4o-2024-05-13` costs more than `gpt-4o`). No other prefix matching:
  `gpt-4o-mini` is never priced as `gpt-4o`, fine-tunes (`ft:...`) are unknown.
- Unknown → None: a model not in the table, one priced only per minute, image
  or character (the proxy meters tokens, not those), or a response without
  usage, has cost None (`cost_usd: null`), never a guess: a wrong number in a
  bill or a budget is worse than an honest "unknown".
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any, NamedTuple

from proxy.config import ConfigError
from proxy.streaming import Usage

# `-YYYY-MM-DD` or `-MMDD` at the end of a model name: a dated snapshot of a family.
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})\Z")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_NANOS_PER_USD_PER_1M_TOKENS = 1000  # USD per 1M tokens → nano-USD per token
_HALF = Fraction(1, 2)

# Each price field and the unit it is given in (for error messages).
# The most input tokens any OpenAI model reads (gpt-4.1's context window): what a hard
# budget holds for a prompt the proxy cannot size from the body (`proxy.estimate`).
MAX_INPUT_TOKENS = 1_047_576
_MAX_NAMES = 4096  # model strings remembered by the table's lookup

_UNITS = {
    "input": "USD per 1M tokens",
    "cached_input": "USD per 1M tokens",
    "output": "USD per 1M tokens",
    "per_minute": "USD per minute of audio",
    "per_image": "USD per image",
    "per_1m_characters": "USD per 1M characters",
}


@dataclass(frozen=True, slots=True)
class Price:
    """One model's list prices. Token prices are USD per 1M tokens: `cached_input`
    None bills cached tokens at `input`; `output` None means the model has no output
    tokens (completion tokens cost 0); `input` None means the model is priced per unit
    only (`per_minute`, `per_image`, `per_1m_characters`), which the proxy does not meter."""

    input: float | None = None
    cached_input: float | None = None
    output: float | None = None
    per_minute: float | None = None
    per_image: float | None = None
    per_1m_characters: float | None = None

    @property
    def per_token(self) -> bool:
        """Whether a cost can be computed from token counts."""
        return self.input is not None


class _Rates(NamedTuple):
    """A token-priced model's prices as exact nano-USD per token."""

    input: Fraction
    cached_input: Fraction
    output: Fraction


def _nanos_per_token(usd_per_1m: float) -> Fraction:
    # The decimal the operator wrote (0.075), not the binary float nearest to it.
    return Fraction(repr(usd_per_1m)) * _NANOS_PER_USD_PER_1M_TOKENS


def _rates(price: Price) -> _Rates | None:
    if price.input is None:
        return None
    input_rate = _nanos_per_token(price.input)
    cached = input_rate if price.cached_input is None else _nanos_per_token(price.cached_input)
    output = Fraction(0) if price.output is None else _nanos_per_token(price.output)
    return _Rates(input_rate, cached, output)


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + _HALF)


def _normalise(model: str | None) -> str:
    return model.strip().lower() if isinstance(model, str) else ""


class PriceTable:
    """The dated table of model prices, and the cost of a call from its usage."""

    def __init__(
        self,
        models: Mapping[str, Price] | None = None,
        as_of: str = "",
        source: str = "",
        max_input_tokens: int = MAX_INPUT_TOKENS,
    ) -> None:
        self.as_of = as_of
        self.source = source
        self.max_input_tokens = max_input_tokens
        self.models: Mapping[str, Price] = MappingProxyType(
            {_normalise(name): price for name, price in (models or {}).items()}
        )
        self._rates = {name: _rates(price) for name, price in self.models.items()}
        # Whole nanos per token, rounded up: bounds in integer arithmetic (hot path).
        self._ceilings = {
            name: (math.ceil(rates.input), math.ceil(rates.output))
            for name, rates in self._rates.items()
            if rates is not None
        }
        self._names: dict[str, str | None] = {}  # model as sent -> table entry (bounded)
        # Rates that are whole nanos per token (prices with at most 3 decimals): exact
        # costs in integer arithmetic, the Fractions kept for the rest.
        self._whole = {
            name: (int(r.input), int(r.cached_input), int(r.output))
            for name, r in self._rates.items()
            if r is not None and all(x.denominator == 1 for x in r)
        }

    def __repr__(self) -> str:
        return f"PriceTable({len(self.models)} models, as_of={self.as_of!r})"

    def _name(self, model: str | None) -> str | None:
        """The table entry `model` is priced as: itself, else its snapshot's family."""
        if model is None:
            return None
        try:
            return self._names[model]
        except KeyError:
            pass
        found = self._entry(model)
        if len(model) <= 128:  # a caller's model string: kept only if short
            if len(self._names) >= _MAX_NAMES:
                self._names.clear()
            self._names[model] = found
        return found

    def _entry(self, model: str) -> str | None:
        name = _normalise(model)
        if not name:
            return None
        if name in self.models:
            return name
        suffix = _SNAPSHOT.search(name)
        if suffix is not None and name[: suffix.start()] in self.models:
            return name[: suffix.start()]
        return None

    def lookup(self, model: str | None) -> Price | None:
        """The price of `model` (exact name, else its snapshot's family); None if unknown."""
        name = self._name(model)
        return None if name is None else self.models[name]

    def knows(self, model: str | None) -> bool:
        """Whether `model` is in the table and priced per token (so it has a cost)."""
        name = self._name(model)
        return name is not None and self._rates[name] is not None

    def cost_nanos(self, model: str | None, usage: Usage | None) -> int | None:
        """The cost of one call in nano-USD, rounded half up; None when the model is
        unknown or priced per unit only, or the usage gives no token counts."""
        name = self._name(model)
        rates = None if name is None else self._rates[name]
        if rates is None or usage is None:
            return None
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return None
        prompt = max(usage.prompt_tokens or 0, 0)
        completion = max(usage.completion_tokens or 0, 0)
        cached = min(max(usage.cached_tokens or 0, 0), prompt)
        whole = self._whole.get(name)  # type: ignore[arg-type]
        if whole is not None:
            return (prompt - cached) * whole[0] + cached * whole[1] + completion * whole[2]
        exact = (
            (prompt - cached) * rates.input
            + cached * rates.cached_input
            + completion * rates.output
        )
        return _round_half_up(exact)

    def bound_nanos(self, model: str | None, prompt_tokens: int, output_tokens: int) -> int | None:
        """An upper bound, before the call, of what a call can cost when its prompt is at
        most `prompt_tokens` and its output at most `output_tokens` (uncached prices,
        rounded up to whole nanos per token); None when the model has no token price."""
        name = self._name(model)
        ceilings = None if name is None else self._ceilings.get(name)
        if ceilings is None:
            return None
        return max(prompt_tokens, 0) * ceilings[0] + max(output_tokens, 0) * ceilings[1]


def usd(nanos: int | None) -> float | None:
    """Nano-USD as USD (the one conversion used for usage lines and the API)."""
    return None if nanos is None else nanos / 1e9


def load_prices(section: Mapping[str, Any] | None) -> PriceTable:
    """The table from config.yaml's `prices:` section (`as_of`, `source`, `models`);
    an absent section gives an empty table (every cost None). Raises ConfigError
    with a one-line message naming the bad entry and the fix."""
    if section is None:
        return PriceTable()
    if not isinstance(section, Mapping):
        raise ConfigError("config.yaml: 'prices' must be a mapping (as_of, source, models)")
    unknown = set(section) - {"as_of", "source", "models", "max_input_tokens"}
    if unknown:
        raise ConfigError(
            f"config.yaml: unknown setting(s) {sorted(map(str, unknown))} under 'prices' "
            "(allowed: as_of, source, models, max_input_tokens)"
        )
    max_input = section.get("max_input_tokens", MAX_INPUT_TOKENS)
    if isinstance(max_input, bool) or not isinstance(max_input, int) or max_input < 1:
        raise ConfigError(
            "config.yaml: prices.max_input_tokens must be a whole number of tokens >= 1 "
            "(the largest context window among the models your tenants use)"
        )
    as_of = _as_of(section.get("as_of"))
    source = section.get("source")
    if not isinstance(source, str) or not re.match(r"https?://\S+\Z", source.strip()):
        raise ConfigError(
            "config.yaml: prices.source must be the URL the prices were copied from "
            "(e.g. https://platform.openai.com/docs/pricing)"
        )
    models = section.get("models")
    if models is None:
        models = {}
    if not isinstance(models, Mapping):
        raise ConfigError("config.yaml: prices.models must be a mapping of model name to prices")
    table: dict[str, Price] = {}
    for raw_name, entry in models.items():
        name = _normalise(raw_name)
        if not name or any(c.isspace() for c in name):
            raise ConfigError(
                f"config.yaml: prices.models has a bad model name {str(raw_name)[:80]!r} "
                "(use the model id, e.g. gpt-4o-mini)"
            )
        if name in table:
            raise ConfigError(
                f"config.yaml: prices.models.{name} is listed twice (names ignore case)"
            )
        table[name] = _price(name, entry)
    return PriceTable(table, as_of=as_of, source=source.strip(), max_input_tokens=max_input)


def _as_of(value: Any) -> str:
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value.isoformat()  # YAML reads an unquoted 2025-08-07 as a date
    if isinstance(value, str) and _DATE.fullmatch(value.strip()):
        try:
            return datetime.date.fromisoformat(value.strip()).isoformat()
        except ValueError:
            pass
    raise ConfigError(
        "config.yaml: prices.as_of must be the date the prices were taken, as YYYY-MM-DD"
    )


def _price(name: str, entry: Any) -> Price:
    where = f"config.yaml: prices.models.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping of prices, e.g. {{input: 2.5, output: 10}}")
    unknown = set(entry) - set(_UNITS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(map(str, unknown))} (allowed: {', '.join(_UNITS)})"
        )
    values: dict[str, float | None] = {}
    for key, unit in _UNITS.items():
        value = entry.get(key)
        if value is None:
            values[key] = None
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(f"{where}.{key} must be a number >= 0 ({unit})")
        values[key] = value
    price = Price(**values)
    if price.input is None:
        if price.cached_input is not None or price.output is not None:
            raise ConfigError(f"{where}.input is missing (cached_input and output need it)")
        if price.per_minute is None and price.per_image is None and price.per_1m_characters is None:
            raise ConfigError(
                f"{where} gives no price (set input/output per 1M tokens, or per_minute, "
                "per_image or per_1m_characters)"
            )
    return price
