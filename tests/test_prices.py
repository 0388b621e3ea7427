"""The price table: the shipped config.yaml block, exact costs, snapshot lookup, bad entries."""

from __future__ import annotations

import datetime
from fractions import Fraction
from typing import Any

import pytest
import yaml
from helpers import REPO

from proxy.config import ConfigError
from proxy.prices import Price, PriceTable, load_prices, usd
from proxy.streaming import Usage


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    section = yaml.safe_load((REPO / "config.yaml").read_text())["prices"]
    return load_prices(section)


def _table(**models: dict[str, Any]) -> PriceTable:
    return load_prices({"as_of": "2025-08-07", "source": "https://x.test/p", "models": models})


def _nanos(usd_per_1m: str, tokens: int) -> Fraction:
    """The exact nano-USD of `tokens` tokens at a price written as a decimal string."""
    return Fraction(usd_per_1m) * 1000 * tokens


def test_shipped_table_parses_and_is_dated(shipped: PriceTable) -> None:
    datetime.date.fromisoformat(shipped.as_of)
    assert shipped.source.startswith("https://")
    for model in ("gpt-5", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "o3", "o4-mini", "gpt-4"):
        assert shipped.knows(model), model
    for model in ("text-embedding-3-small", "omni-moderation-latest", "text-moderation-latest"):
        assert shipped.knows(model), model
    for model in ("whisper-1", "tts-1", "tts-1-hd", "dall-e-3", "dall-e-2"):
        assert shipped.lookup(model) is not None and not shipped.knows(model), model


def test_plain_cost_is_exact(shipped: PriceTable) -> None:
    # gpt-4o-mini: 0.15 in, 0.60 out per 1M → 150 and 600 nano-USD per token.
    cost = shipped.cost_nanos("gpt-4o-mini", Usage(1000, 500, 1500))
    assert cost == 1000 * 150 + 500 * 600 == 450_000
    assert usd(cost) == pytest.approx(0.00045)
    assert shipped.cost_nanos("  GPT-4o-Mini ", Usage(1000, 500, 1500)) == cost


def test_rounding_is_half_up_and_deterministic() -> None:
    table = _table(m={"input": 0.0005, "output": 0.0015})  # 0.5 and 1.5 nano per token
    assert table.cost_nanos("m", Usage(1, 0)) == 1  # 0.5 rounds up
    assert table.cost_nanos("m", Usage(0, 1)) == 2  # 1.5 rounds up
    assert table.cost_nanos("m", Usage(3, 0)) == 2  # 1.5
    assert [table.cost_nanos("m", Usage(7, 3)) for _ in range(3)] == [8, 8, 8]  # 3.5 + 4.5


def test_cached_input_is_billed_at_cached_price(shipped: PriceTable) -> None:
    # gpt-4.1: 2.00 in, 0.50 cached, 8.00 out.
    usage = Usage(10_000, 200, 10_200, cached_tokens=8_000)
    expected = _nanos("2.00", 2_000) + _nanos("0.50", 8_000) + _nanos("8.00", 200)
    assert shipped.cost_nanos("gpt-4.1", usage) == expected == 9_600_000


def test_cached_without_cached_price_is_billed_at_input() -> None:
    table = _table(m={"input": 5, "output": 15})
    assert table.cost_nanos("m", Usage(100, 0, cached_tokens=60)) == 100 * 5000


def test_cached_greater_than_prompt_is_clamped() -> None:
    table = _table(m={"input": 1, "cached_input": 0.1, "output": 2})
    # cached 900 > prompt 100: all 100 prompt tokens at the cached price, none negative.
    assert table.cost_nanos("m", Usage(100, 10, cached_tokens=900)) == 100 * 100 + 10 * 2000


def test_negative_counts_are_clamped_to_zero() -> None:
    table = _table(m={"input": 1, "output": 2})
    assert table.cost_nanos("m", Usage(-5, 10, cached_tokens=-3)) == 10 * 2000


def test_embeddings_have_no_output_price(shipped: PriceTable) -> None:
    # text-embedding-3-small: 0.02 per 1M → 20 nano per token; completion tokens cost 0.
    assert shipped.cost_nanos("text-embedding-3-small", Usage(1234, None, 1234)) == 24_680
    assert shipped.cost_nanos("text-embedding-3-small", Usage(1234, 99)) == 24_680
    assert shipped.cost_nanos("omni-moderation-latest", Usage(500, 0)) == 0


def test_snapshot_is_priced_as_its_family(shipped: PriceTable) -> None:
    usage = Usage(1000, 1000)
    assert shipped.cost_nanos("gpt-4o-mini-2024-07-18", usage) == shipped.cost_nanos(
        "gpt-4o-mini", usage
    )
    assert shipped.lookup("gpt-4-0613") == shipped.lookup("gpt-4")
    assert shipped.lookup("gpt-3.5-turbo-0125") == shipped.lookup("gpt-3.5-turbo")
    assert shipped.lookup("gpt-4o-2024-08-06") == shipped.lookup("gpt-4o")


def test_listed_snapshot_beats_its_family(shipped: PriceTable) -> None:
    usage = Usage(1000, 1000)
    snapshot = shipped.cost_nanos("gpt-4o-2024-05-13", usage)
    family = shipped.cost_nanos("gpt-4o", usage)
    assert snapshot == 1000 * 5000 + 1000 * 15000
    assert family is not None and snapshot is not None and snapshot > family


def test_no_prefix_matching() -> None:
    table = _table(**{"gpt-4o": {"input": 2.5, "output": 10}})
    assert table.lookup("gpt-4o-mini") is None
    assert table.lookup("gpt-4o-evil") is None
    assert table.lookup("gpt-4o-mini-2024-07-18") is None  # family gpt-4o-mini: unknown
    assert table.lookup("ft:gpt-4o-2024-08-06:org::abc123") is None
    assert table.lookup("ft:gpt-4o-2024-08-06") is None
    assert table.lookup("gpt-4o-2024-08-06-2024-08-06") is None  # one suffix only
    assert table.cost_nanos("gpt-4o-mini", Usage(10, 10)) is None


def test_shipped_mini_is_not_priced_as_its_big_sibling(shipped: PriceTable) -> None:
    assert shipped.lookup("gpt-4o-mini") != shipped.lookup("gpt-4o")
    assert shipped.cost_nanos("gpt-4o-mini", Usage(1000, 1000)) == 1000 * 150 + 1000 * 600


def test_unknown_and_unmetered_give_none(shipped: PriceTable) -> None:
    usage = Usage(10, 10, 20)
    assert shipped.cost_nanos("no-such-model", usage) is None
    assert shipped.cost_nanos(None, usage) is None
    assert shipped.cost_nanos("", usage) is None
    assert shipped.cost_nanos("whisper-1", usage) is None
    assert shipped.cost_nanos("dall-e-3", usage) is None
    assert shipped.bound_nanos("whisper-1", 100, 100) is None
    assert shipped.bound_nanos("no-such-model", 100, 100) is None
    assert not shipped.knows("no-such-model")


def test_no_usage_gives_none(shipped: PriceTable) -> None:
    assert shipped.cost_nanos("gpt-4o", None) is None
    assert shipped.cost_nanos("gpt-4o", Usage()) is None
    assert shipped.cost_nanos("gpt-4o", Usage(total_tokens=30)) is None
    assert usd(None) is None


def test_empty_table() -> None:
    table = load_prices(None)
    assert (table.as_of, table.source, dict(table.models)) == ("", "", {})
    assert table.cost_nanos("gpt-4o", Usage(1, 1)) is None
    assert load_prices({"as_of": "2025-01-01", "source": "https://x.test"}).models == {}


def test_estimate_bounds_the_cost(shipped: PriceTable) -> None:
    for model in ("gpt-4o", "gpt-4o-mini", "o1", "text-embedding-3-small", "gpt-5-nano"):
        for prompt, completion in ((1000, 0), (0, 1000), (700, 300), (3, 4)):
            estimate = shipped.bound_nanos(model, prompt, completion)
            cost = shipped.cost_nanos(model, Usage(prompt, completion))
            assert estimate is not None and cost is not None
            assert estimate >= cost, (model, prompt, completion)
    assert shipped.bound_nanos("gpt-4o", 1000, 1000) == 1000 * 2_500 + 1000 * 10_000
    assert _table(m={"input": 0.0005}).bound_nanos("m", 1, 0) == 1  # rounded up


def test_yaml_date_and_case() -> None:
    table = load_prices(
        {
            "as_of": datetime.date(2025, 8, 7),
            "source": "https://x.test/p",
            "models": {"GPT-Thing": {"input": 1}},
        }
    )
    assert table.as_of == "2025-08-07"
    assert table.lookup("gpt-thing") == Price(input=1)


@pytest.mark.parametrize(
    ("section", "names"),
    [
        ({"models": {"gpt-4o": {"input": -1}}}, "prices.models.gpt-4o.input"),
        ({"models": {"gpt-4o": {"input": True}}}, "prices.models.gpt-4o.input"),
        ({"models": {"gpt-4o": {"input": "2.5"}}}, "prices.models.gpt-4o.input"),
        ({"models": {"gpt-4o": {"input": float("nan")}}}, "prices.models.gpt-4o.input"),
        ({"models": {"gpt-4o": {"input": 1, "output": float("inf")}}}, "gpt-4o.output"),
        ({"models": {"gpt-4o": {"input": 1, "cached_input": -0.5}}}, "gpt-4o.cached_input"),
        ({"models": {"gpt-4o": {"input": 1, "ouput": 2}}}, "prices.models.gpt-4o"),
        ({"models": {"gpt-4o": {"output": 2}}}, "prices.models.gpt-4o.input"),
        ({"models": {"gpt-4o": {}}}, "prices.models.gpt-4o"),
        ({"models": {"gpt-4o": 2.5}}, "prices.models.gpt-4o"),
        ({"models": {"whisper-1": {"per_minute": -1}}}, "prices.models.whisper-1.per_minute"),
        ({"models": {"GPT-4o": {"input": 1}, "gpt-4o": {"input": 2}}}, "prices.models.gpt-4o"),
        ({"models": {"bad\nname": {"input": 1}}}, "prices.models"),
        ({"models": {12: {"input": 1}}}, "prices.models"),
        ({"models": ["gpt-4o"]}, "prices.models"),
        ({"modles": {}}, "prices"),
        ({"as_of": "yesterday"}, "prices.as_of"),
        ({"as_of": "2025-13-01"}, "prices.as_of"),
        ({"as_of": None}, "prices.as_of"),
        ({"source": "platform.openai.com/docs/pricing"}, "prices.source"),
        ({"source": None}, "prices.source"),
    ],
)
def test_bad_entries_raise_one_line(section: dict[str, Any], names: str) -> None:
    full = {"as_of": "2025-08-07", "source": "https://x.test/p", **section}
    with pytest.raises(ConfigError) as caught:
        load_prices(full)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith("config.yaml: ")
    assert names in message


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="'prices' must be a mapping"):
        load_prices(["gpt-4o"])  # type: ignore[arg-type]


def test_usage_reads_cached_tokens() -> None:
    chat = {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 6},
    }
    responses = {
        "input_tokens": 10,
        "output_tokens": 2,
        "input_tokens_details": {"cached_tokens": 4},
    }
    assert Usage.from_object(chat) == Usage(10, 2, None, 6)
    assert Usage.from_object(responses) == Usage(10, 2, None, 4)
    flagged = {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": True}}
    assert Usage.from_object(flagged) == Usage(1)
    assert Usage.from_object({"prompt_tokens": 1, "prompt_tokens_details": None}) == Usage(1)
    assert Usage.from_object({"prompt_tokens": 1, "prompt_tokens_details": [6]}) == Usage(1)
