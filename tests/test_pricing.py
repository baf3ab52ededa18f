"""Price table lookups, overrides and exact integer cost math."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quota_middleware.errors import ConfigurationError, QuotaError
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import (
    DEFAULT_PRICES,
    PRICES_AS_OF,
    ModelPrice,
    PriceTable,
    UnpricedModel,
    cost_micros,
    price_for,
)

TABLE = PriceTable()


def test_table_is_dated_and_integer() -> None:
    assert re.fullmatch(r"20\d\d-\d\d-\d\d", PRICES_AS_OF)
    assert DEFAULT_PRICES["gpt-4o"] == ModelPrice(2_500_000, 10_000_000, 1_250_000)
    sonnet = DEFAULT_PRICES["claude-sonnet-4-5"]
    assert (sonnet.input, sonnet.output, sonnet.cached_input, sonnet.cache_write) == (
        3_000_000, 15_000_000, 300_000, 3_750_000
    )  # fmt: skip
    assert sonnet.cache_write_1h == 6_000_000 and sonnet.tier_above == 200_000
    pro = DEFAULT_PRICES["gemini-2.5-pro"]
    assert (pro.input, pro.output, pro.cached_input) == (1_250_000, 10_000_000, 125_000)
    assert pro.tier == ModelPrice(2_500_000, 15_000_000, 250_000)
    assert DEFAULT_PRICES["text-embedding-3-small"] == ModelPrice(20_000, 0)
    for price in DEFAULT_PRICES.values():
        assert all(isinstance(v, int) and v >= 0 for v in (price.input, price.output))


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5.1-2025-11-13", "gpt-5.1"),
        ("o3-2025-04-16", "o3"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("openai/gpt-4.1", "gpt-4.1"),
        ("ft:gpt-4o-mini-2024-07-18:acme::9abc", "gpt-4o-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
        ("gemini-2.5-pro", "gemini-2.5-pro"),
    ],
)
def test_lookup_families_and_dated_suffixes(model: str, family: str) -> None:
    assert TABLE.lookup(model) == DEFAULT_PRICES[family]


@pytest.mark.parametrize("model", [None, "", "llama3.2", "gpt-4ox", "o10", "claude-", "my-model"])
def test_lookup_unknown(model: str | None) -> None:
    assert TABLE.lookup(model) is None


def test_overrides_extend_and_replace() -> None:
    table = TABLE.with_overrides(
        {
            "my-model": {"input": 1.0, "output": 2, "cached_input": "0.5", "cache_write": 1.25},
            "gpt-4o": {"input": 2, "output": 8},
        }
    )
    assert table.lookup("my-model") == ModelPrice(1_000_000, 2_000_000, 500_000, 1_250_000)
    assert table.lookup("my-model-v2") == table.lookup("my-model")
    assert table.lookup("gpt-4o-2024-08-06") == ModelPrice(2_000_000, 8_000_000)
    assert TABLE.lookup("gpt-4o") == DEFAULT_PRICES["gpt-4o"]  # original untouched
    assert len(table) == len(TABLE) + 1 and "my-model" in table
    # precision below a micro-dollar per 1M rounds up
    tiny = PriceTable({}).with_overrides({"t": {"input": "0.0000001", "output": 0}})
    assert tiny.lookup("t") == ModelPrice(1, 0)


@pytest.mark.parametrize(
    "spec",
    [
        {"input": 1},
        {"output": 1},
        {"input": -1, "output": 1},
        {"input": "abc", "output": 1},
        {"input": True, "output": 1},
        {"input": float("nan"), "output": 1},
        {"input": 1, "output": 1, "cached": 1},
        "1.0",
    ],
)
def test_bad_overrides(spec: object) -> None:
    with pytest.raises(ConfigurationError):
        TABLE.with_overrides({"m": spec})  # type: ignore[dict-item]


def test_cost_exact_examples() -> None:
    # gpt-4o: 800 plain x $2.50 + 200 cached x $1.25 + 500 out x $10 = $0.00725
    gpt4o = DEFAULT_PRICES["gpt-4o"]
    assert cost_micros(Usage(1000, 500, cached_tokens=200), gpt4o) == 7_250
    # Anthropic stream fixture: 12 plain x $3 + 1024 read x $0.30 + 2048 write x $3.75
    # + 87 out x $15 = 9328.2 micro-USD -> 9329 (rounded up)
    sonnet = DEFAULT_PRICES["claude-sonnet-4-5"]
    usage = Usage(3084, 87, cached_tokens=1024, cache_write_tokens=2048)
    assert cost_micros(usage, sonnet) == 9_329
    # Gemini: 2048 plain x $1.25 + 8192 cached x $0.125 + 420 out (incl. thoughts) x $10
    assert (
        cost_micros(Usage(10240, 420, cached_tokens=8192), DEFAULT_PRICES["gemini-2.5-pro"])
        == 7_784
    )
    assert cost_micros(Usage(), gpt4o) == 0


def test_cost_rounds_up_and_cache_prices_default_to_input() -> None:
    nano = DEFAULT_PRICES["gpt-5-nano"]  # $0.05 / 1M input
    assert cost_micros(Usage(1, 0), nano) == 1  # 0.05 micro-USD -> 1
    assert cost_micros(Usage(20, 0), nano) == 1
    assert cost_micros(Usage(21, 0), nano) == 2
    flat = ModelPrice(input=1_000_000, output=0)
    assert cost_micros(Usage(100, 0, cached_tokens=40, cache_write_tokens=60), flat) == 100
    # inconsistent usage (cache counts above input) never goes negative
    assert cost_micros(Usage(10, 0, cached_tokens=40), flat) == 40


@given(
    inp=st.integers(0, 10**9),
    out=st.integers(0, 10**9),
    cached=st.integers(0, 10**9),
    price=st.builds(ModelPrice, st.integers(0, 10**8), st.integers(0, 10**8),
                    st.none() | st.integers(0, 10**8), st.none() | st.integers(0, 10**8)),
)  # fmt: skip
def test_cost_never_undercharges(inp: int, out: int, cached: int, price: ModelPrice) -> None:
    from fractions import Fraction

    cached = min(cached, inp)
    c = cost_micros(Usage(inp, out, cached_tokens=cached), price)
    cp = price.input if price.cached_input is None else price.cached_input
    exact = Fraction((inp - cached) * price.input + cached * cp + out * price.output, 10**6)
    assert exact <= c < exact + 1


def test_price_for_policies() -> None:
    default = ModelPrice(5_000_000, 5_000_000)
    assert price_for("gpt-4o-2024-08-06", TABLE, "refuse") == DEFAULT_PRICES["gpt-4o"]
    with pytest.raises(UnpricedModel) as exc:
        price_for("llama3.2", TABLE, "refuse")
    assert isinstance(exc.value, QuotaError) and exc.value.model == "llama3.2"
    with pytest.raises(UnpricedModel):
        price_for(None, TABLE)
    assert price_for("llama3.2", TABLE, "default", default) == default
    assert price_for("llama3.2", TABLE, "tokens-only") is None
    with pytest.raises(ConfigurationError):
        price_for("llama3.2", TABLE, "default", None)


# -- long-context tiers, 1-hour cache writes, LiteLLM price files ---------------------------------
def test_a_prompt_over_the_tier_prices_the_whole_request_at_it() -> None:
    pro = DEFAULT_PRICES["gemini-2.5-pro"]
    at = Usage(input_tokens=200_000, output_tokens=1_000)
    over = Usage(input_tokens=200_001, output_tokens=1_000)
    # 200k x $1.25/M + 1k x $10/M; one more prompt token: all of it x $2.50/M + 1k x $15/M
    assert cost_micros(at, pro) == 250_000 + 10_000
    assert cost_micros(over, pro) == -(-(200_001 * 2_500_000 + 1_000 * 15_000_000) // 10**6)
    cached = Usage(input_tokens=300_000, cached_tokens=100_000, output_tokens=0)
    assert cost_micros(cached, pro) == (200_000 * 2_500_000 + 100_000 * 250_000) // 10**6


def test_an_hours_cache_writes_cost_their_own_price() -> None:
    from quota_middleware.metering._usage import UsageParser

    # Anthropic's Messages response: writes split by TTL under usage.cache_creation
    body = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 1_000,
            "cache_creation_input_tokens": 3_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1_000,
                               "ephemeral_1h_input_tokens": 2_000},
        },
    }  # fmt: skip
    parser = UsageParser("anthropic-messages", content_type="application/json")
    parser.feed(json.dumps(body).encode())
    usage = parser.finish()
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (
        4_010, 3_000, 2_000
    )  # fmt: skip
    sonnet = DEFAULT_PRICES["claude-sonnet-4-5"]
    # 10 x $3 + 1,000 x $0.30 + 1,000 x $3.75 + 2,000 x $6 + 20 x $15, per 1M
    expected = (10 * 3 + 1_000 * 0.30 + 1_000 * 3.75 + 2_000 * 6 + 20 * 15) * 1e6 / 1e6
    assert cost_micros(usage, sonnet) == round(expected)
    # a model without a 1-hour price charges them at its cache-write price
    assert cost_micros(usage, ModelPrice(3_000_000, 15_000_000, 300_000, 3_750_000)) == round(
        10 * 3 + 1_000 * 0.30 + 3_000 * 3.75 + 20 * 15
    )


LITELLM = {
    "sample_spec": {"input_cost_per_token": 0, "output_cost_per_token": 0, "mode": "chat"},
    "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2.5e-06,
               "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
               "input_cost_per_token_batches": 1.25e-06, "max_input_tokens": 128000},
    "claude-sonnet-4-5": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                          "cache_read_input_token_cost": 3e-07,
                          "cache_creation_input_token_cost": 3.75e-06,
                          "cache_creation_input_token_cost_above_1hr": 6e-06,
                          "litellm_provider": "anthropic"},
    "vertex_ai/gemini-2.5-pro": {"input_cost_per_token": 1.25e-06,
                                 "input_cost_per_token_above_200k_tokens": 2.5e-06,
                                 "output_cost_per_token": 1e-05,
                                 "output_cost_per_token_above_200k_tokens": 1.5e-05,
                                 "cache_read_input_token_cost": 1.25e-07},
    "my-house-model": {"input_cost_per_token": "4e-06", "output_cost_per_token": 8e-06},
    "dall-e-3": {"output_cost_per_image": 0.04, "mode": "image_generation"},
    "broken": {"input_cost_per_token": -1, "output_cost_per_token": 1e-06},
    "nan-model": {"input_cost_per_token": "NaN", "output_cost_per_token": 1e-06},
}  # fmt: skip


def test_litellm_price_files_are_read_in_their_own_units() -> None:
    from quota_middleware.metering.pricing import litellm_prices

    prices = litellm_prices(LITELLM)
    assert prices["gpt-4o"] == ModelPrice(2_500_000, 10_000_000, 1_250_000)
    sonnet = prices["claude-sonnet-4-5"]
    assert (sonnet.cache_write, sonnet.cache_write_1h) == (3_750_000, 6_000_000)
    # the prefixed entry prices its bare name too, with its 200k tier
    pro = prices["gemini-2.5-pro"]
    assert pro is prices["vertex_ai/gemini-2.5-pro"]
    assert pro.tier_above == 200_000 and pro.tier == ModelPrice(2_500_000, 15_000_000)
    assert prices["my-house-model"] == ModelPrice(4_000_000, 8_000_000)
    # what is not priced per token, or not a number >= 0, is skipped, never charged at 0
    assert not {"sample_spec", "dall-e-3", "broken", "nan-model"} & set(prices)


def test_a_prices_file_sits_between_the_bundled_table_and_the_policys_prices(
    tmp_path: Path,
) -> None:
    from ai_harness import AIHarness, chat, config
    from quota_middleware import QuotaConfig

    path = tmp_path / "prices.json"
    path.write_text(json.dumps(LITELLM))
    (tmp_path / "policy.toml").write_text(
        'prices_file = "prices.json"\n'
        "[prices.gpt-4o]\ninput = 5\noutput = 20\n"
        "[plans.p]\n"
        '[[ai_routes]]\npath = "/v1/chat/completions"\nformat = "openai-chat"\n'
    )
    cfg = QuotaConfig.from_toml(tmp_path / "policy.toml")
    assert cfg.prices_file == str(tmp_path / "prices.json")
    from quota_middleware.core._meter import price_table

    table, _ = price_table(cfg)
    assert table.lookup("my-house-model") == ModelPrice(4_000_000, 8_000_000)  # from the file
    assert table.lookup("gpt-4o") == ModelPrice(5_000_000, 20_000_000)  # the policy's wins
    assert table.lookup("claude-3-opus") == DEFAULT_PRICES["claude-3-opus"]  # bundled
    # a request to a model only the file prices is charged at the file's price
    backend = _Backend()
    h = AIHarness("wsgi", backend, config(prices_file=str(path)))
    try:
        r = h.post(chat(model="my-house-model", x_prompt=1_000, x_completion=500))
        assert r.status == 200, r.raw
        assert h.usage()["cost"] == 1_000 * 4 + 500 * 8  # micro-USD
    finally:
        h.close()


class _Backend:
    def __init__(self) -> None:
        from quota_middleware.backends.memory import MemoryBackend

        self._b = MemoryBackend()

    def sync(self) -> Any:
        return self._b

    def async_(self) -> Any:
        return self._b


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"dall-e-3": {"output_cost_per_image": 0.04}}', "no model with a per-token price"),
    ],
)
def test_a_bad_prices_file_is_a_startup_error_naming_it(
    tmp_path: Path, content: str | None, match: str
) -> None:
    from ai_harness import config

    path = tmp_path / "prices.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=f"prices_file.*{match}"):
        config(prices_file=str(path))
