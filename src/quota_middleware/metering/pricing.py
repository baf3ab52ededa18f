"""Model prices and the cost of one response, in integer micro-dollars.

Prices are stored as integer micro-USD per 1M tokens ($2.50 / 1M tokens -> ``2_500_000``), so the
cost of a request is exact integer arithmetic: ``ceil(sum(tokens * price) / 1_000_000)`` micro-USD,
rounded up once per request so that nothing is ever undercharged.

The bundled table is a dated snapshot (:data:`PRICES_AS_OF`); prices change, so deployments should
override or extend it from configuration (:meth:`PriceTable.with_overrides`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from quota_middleware.errors import ConfigurationError, QuotaError
from quota_middleware.metering._usage import Usage

__all__ = [
    "DEFAULT_PRICES",
    "PRICES_AS_OF",
    "ModelPrice",
    "PriceTable",
    "UnpricedModel",
    "UnpricedPolicy",
    "cost_micros",
    "litellm_prices",
    "load_litellm_prices",
    "price_for",
]

PRICES_AS_OF = "2026-01-15"
_PER_MILLION = 1_000_000

UnpricedPolicy = Literal["refuse", "default", "tokens-only"]


class UnpricedModel(QuotaError):
    """A response came from a model with no price, and the policy is ``"refuse"``."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        super().__init__(f"no price for model {model!r}")


def _micros(usd: object, where: str) -> int:
    """USD per 1M tokens (number or numeric string) -> integer micro-USD per 1M, rounded up."""
    if isinstance(usd, bool):
        raise ConfigurationError(where, "must be a number of USD per 1M tokens")
    try:
        value = Decimal(str(usd))
    except (InvalidOperation, ValueError):
        raise ConfigurationError(where, f"{usd!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ConfigurationError(where, f"{usd!r} must be a finite number >= 0")
    return math.ceil(value * _PER_MILLION)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Integer micro-USD per 1M tokens. Missing cache prices fall back to the input price."""

    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None
    #: audio tokens (OpenAI Realtime, audio models): missing prices fall back to the text ones
    audio_input: int | None = None
    audio_output: int | None = None
    cached_audio_input: int | None = None
    #: cache writes kept for an hour (Anthropic: 2x input); missing: ``cache_write``
    cache_write_1h: int | None = None
    #: a long-context tier (Gemini 2.5 Pro, Claude Sonnet 4 with 1M context): a request whose
    #: prompt is over ``tier_above`` tokens has every token priced by ``tier``
    tier_above: int | None = None
    tier: ModelPrice | None = None

    @classmethod
    def from_usd(
        cls,
        input: object,
        output: object,
        cached_input: object = None,
        cache_write: object = None,
        *,
        audio_input: object = None,
        audio_output: object = None,
        cached_audio_input: object = None,
        cache_write_1h: object = None,
        tier_above: object = None,
        tier: ModelPrice | None = None,
        where: str = "price",
    ) -> ModelPrice:
        """Prices in USD per 1M tokens, as written in configuration."""

        def opt(value: object, name: str) -> int | None:
            return None if value is None else _micros(value, f"{where}.{name}")

        if (tier_above is None) != (tier is None):
            raise ConfigurationError(f"{where}.tier_above", "give the tier's threshold and prices")
        if tier_above is not None and (
            not isinstance(tier_above, int) or isinstance(tier_above, bool) or tier_above < 1
        ):
            raise ConfigurationError(f"{where}.tier_above", "a number of prompt tokens >= 1")
        return cls(
            input=_micros(input, f"{where}.input"),
            output=_micros(output, f"{where}.output"),
            cached_input=opt(cached_input, "cached"),
            cache_write=opt(cache_write, "write"),
            audio_input=opt(audio_input, "audio_input"),
            audio_output=opt(audio_output, "audio_output"),
            cached_audio_input=opt(cached_audio_input, "cached_audio_input"),
            cache_write_1h=opt(cache_write_1h, "cache_write_1h"),
            tier_above=tier_above,
            tier=tier,
        )


def _p(
    inp: str, out: str, cached: str | None = None, write: str | None = None,
    write_1h: str | None = None, *, above: int | None = None, tier: ModelPrice | None = None,
) -> ModelPrice:  # fmt: skip
    return ModelPrice.from_usd(inp, out, cached, write, cache_write_1h=write_1h,
                               tier_above=above, tier=tier)  # fmt: skip


def _rt(text: tuple[str, str, str], audio: tuple[str, str, str]) -> ModelPrice:
    """A Realtime model: (input, cached input, output) for text, then for audio."""
    return ModelPrice.from_usd(text[0], text[2], text[1], audio_input=audio[0],
                               cached_audio_input=audio[1], audio_output=audio[2])  # fmt: skip


# USD per 1M tokens: input, output, cached input (cache read), cache write (, 1-hour write).
# "ref" = reference/provider-usage.md §D (LiteLLM 1.110.2 snapshot). Every other row is the
# provider's public list price as we know it for standard (non-batch, non-priority) requests;
# verify against the provider's pricing page before relying on it, or load a current price file
# (``prices_file``, LiteLLM's format). Gemini 2.5 Pro / 3 Pro and Claude Sonnet 4 / 4.5 price a
# prompt over 200k tokens (the whole request) at a higher tier.
# Claude Sonnet 4 / 4.5 with the 1M-token context window, over 200k prompt tokens
_SONNET_LONG = _p("6", "22.50", "0.60", "7.50", "12")
DEFAULT_PRICES: dict[str, ModelPrice] = {
    # OpenAI
    "gpt-5": _p("1.25", "10", "0.125"),
    "gpt-5.1": _p("1.25", "10", "0.125"),
    "gpt-5-mini": _p("0.25", "2", "0.025"),
    "gpt-5-nano": _p("0.05", "0.40", "0.005"),
    "gpt-4.1": _p("2", "8", "0.50"),
    "gpt-4.1-mini": _p("0.40", "1.60", "0.10"),
    "gpt-4.1-nano": _p("0.10", "0.40", "0.025"),
    "gpt-4o": _p("2.50", "10", "1.25"),  # ref
    # Realtime: text and audio tokens at their own prices (longer names win over "gpt-4o")
    "gpt-realtime": _rt(("4", "0.40", "16"), ("32", "0.40", "64")),
    "gpt-realtime-mini": _rt(("0.60", "0.06", "2.40"), ("10", "0.30", "20")),
    "gpt-4o-realtime-preview": _rt(("5", "2.50", "20"), ("40", "2.50", "80")),
    "gpt-4o-mini-realtime-preview": _rt(("0.60", "0.30", "2.40"), ("10", "0.30", "20")),
    "gpt-4o-mini": _p("0.15", "0.60", "0.075"),
    "gpt-4-turbo": _p("10", "30"),
    "gpt-4": _p("30", "60"),
    "gpt-3.5-turbo": _p("0.50", "1.50"),
    "o1": _p("15", "60", "7.50"),
    "o1-mini": _p("1.10", "4.40", "0.55"),
    "o3": _p("2", "8", "0.50"),
    "o3-mini": _p("1.10", "4.40", "0.55"),
    "o4-mini": _p("1.10", "4.40", "0.275"),
    "text-embedding-3-small": _p("0.02", "0"),  # ref
    "text-embedding-3-large": _p("0.13", "0"),
    "text-embedding-ada-002": _p("0.10", "0"),
    # Anthropic: cache write = 5-minute TTL price (1.25x input); cache read = 0.1x input
    "claude-opus-4-5": _p("5", "25", "0.50", "6.25", "10"),
    "claude-opus-4-1": _p("15", "75", "1.50", "18.75", "30"),
    "claude-opus-4": _p("15", "75", "1.50", "18.75", "30"),
    "claude-sonnet-4-5": _p(
        "3", "15", "0.30", "3.75", "6", above=200_000, tier=_SONNET_LONG
    ),  # ref
    "claude-sonnet-4": _p("3", "15", "0.30", "3.75", "6", above=200_000, tier=_SONNET_LONG),
    "claude-3-7-sonnet": _p("3", "15", "0.30", "3.75", "6"),
    "claude-3-5-sonnet": _p("3", "15", "0.30", "3.75", "6"),
    "claude-haiku-4-5": _p("1", "5", "0.10", "1.25", "2"),
    "claude-3-5-haiku": _p("0.80", "4", "0.08", "1", "1.6"),
    "claude-3-haiku": _p("0.25", "1.25", "0.03", "0.30", "0.50"),
    "claude-3-opus": _p("15", "75", "1.50", "18.75", "30"),
    # Google Gemini (AI Studio / Vertex standard); thoughts are billed at the output price
    "gemini-3-pro-preview": _p("2", "12", "0.20", above=200_000, tier=_p("4", "18", "0.40")),
    "gemini-2.5-pro": _p("1.25", "10", "0.125", above=200_000, tier=_p("2.50", "15", "0.25")),
    "gemini-2.5-flash": _p("0.30", "2.50", "0.03"),
    "gemini-2.5-flash-lite": _p("0.10", "0.40", "0.01"),
    "gemini-2.0-flash": _p("0.10", "0.40", "0.025"),
    "gemini-2.0-flash-lite": _p("0.075", "0.30"),
}

# A dated or variant suffix must start at one of these, so "gpt-4" never prices "gpt-4o-x".
_BOUNDARY = frozenset("-.:@_/")
# Route prefixes seen in model names: "models/…" (Gemini), "openai/…", "anthropic.claude-…"
# (Bedrock, optionally with a region like "us."), "ft:gpt-4o-mini:org::id" (fine-tunes).
_PROVIDER_PREFIX = re.compile(r"^(?:.*/)?(?:(?:[a-z]+\.)?anthropic\.|ft:)?")


def normalise_model(model: str) -> str:
    return _PROVIDER_PREFIX.sub("", model.strip().lower(), count=1)


class PriceTable:
    """Model name -> :class:`ModelPrice`, matched exactly or by the longest known prefix."""

    __slots__ = ("_by_length", "_prices")

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = {
            k.lower(): v for k, v in (DEFAULT_PRICES if prices is None else prices).items()
        }
        self._by_length = sorted(self._prices, key=len, reverse=True)

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.lookup(model) is not None

    def lookup(self, model: str | None) -> ModelPrice | None:
        """``gpt-4o-2024-08-06`` -> ``gpt-4o``; ``claude-sonnet-4-5-20250929`` -> its family."""
        if not model:
            return None
        for name in (model.strip().lower(), normalise_model(model)):
            exact = self._prices.get(name)
            if exact is not None:
                return exact
            for known in self._by_length:
                if name.startswith(known) and name[len(known)] in _BOUNDARY:
                    return self._prices[known]
        return None

    def with_prices(self, prices: Mapping[str, ModelPrice]) -> PriceTable:
        """A new table with ``prices`` added or replacing these (e.g. :func:`litellm_prices`)."""
        return PriceTable({**self._prices, **{k.lower(): v for k, v in prices.items()}})

    def with_overrides(self, overrides: Mapping[str, Mapping[str, object]]) -> PriceTable:
        """A new table with models added or replaced, from USD per 1M tokens:
        ``{"my-model": {"input": 1.0, "output": 2.0, "cached_input": 0.5, "cache_write": 1.25}}``.
        """
        prices = dict(self._prices)
        for model, spec in overrides.items():
            where = f"prices.{model}"
            if not isinstance(model, str) or not model.strip():
                raise ConfigurationError("prices", f"model name {model!r} must be a string")
            if not isinstance(spec, Mapping):
                raise ConfigurationError(where, "must be a table of USD per 1M tokens")
            unknown = set(spec) - {"input", "output", "cached_input", "cache_write",
                                   "audio_input", "audio_output", "cached_audio_input",
                                   "cache_write_1h"}  # fmt: skip
            if unknown:
                raise ConfigurationError(where, f"unknown keys {sorted(unknown)}")
            if "input" not in spec or "output" not in spec:
                raise ConfigurationError(where, "needs both 'input' and 'output'")
            prices[model.strip().lower()] = ModelPrice.from_usd(
                spec["input"],
                spec["output"],
                spec.get("cached_input"),
                spec.get("cache_write"),
                audio_input=spec.get("audio_input"),
                audio_output=spec.get("audio_output"),
                cached_audio_input=spec.get("cached_audio_input"),
                cache_write_1h=spec.get("cache_write_1h"),
                where=where,
            )
        return PriceTable(prices)


# LiteLLM's per-token fields (model_prices_and_context_window.json) -> ours
_LITELLM_FIELDS = (
    ("input_cost_per_token", "input"),
    ("output_cost_per_token", "output"),
    ("cache_read_input_token_cost", "cached_input"),
    ("cache_creation_input_token_cost", "cache_write"),
    ("cache_creation_input_token_cost_above_1hr", "cache_write_1h"),
    ("input_cost_per_audio_token", "audio_input"),
    ("output_cost_per_audio_token", "audio_output"),
    ("cache_read_input_audio_token_cost", "cached_audio_input"),
)
_LITELLM_TIER = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")
_litellm_cache: dict[tuple[str, int, int], dict[str, ModelPrice]] = {}


def _per_million(value: object) -> int | None:
    """USD per token -> integer micro-USD per 1M tokens, rounded up; None for what is not a
    finite number >= 0 (the file is input: such an entry is skipped, never charged at 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not d.is_finite() or d < 0:
        return None
    return math.ceil(d * _PER_MILLION * _PER_MILLION)


def _litellm_entry(spec: Mapping[str, object]) -> ModelPrice | None:
    values: dict[str, int] = {}
    for src, dst in _LITELLM_FIELDS:
        if src in spec and spec[src] is not None:
            v = _per_million(spec[src])
            if v is None:
                return None
            values[dst] = v
    if "input" not in values or "output" not in values:
        return None  # images, audio-only or search entries: nothing per token to charge
    tier_above, tier = None, None
    # the lowest long-context tier LiteLLM lists (``..._above_200k_tokens``)
    tiers = sorted(int(m.group(1)) for k in spec if (m := _LITELLM_TIER.match(str(k))))
    if tiers:
        k = tiers[0]
        t_in = _per_million(spec.get(f"input_cost_per_token_above_{k}k_tokens"))
        t_out = _per_million(spec.get(f"output_cost_per_token_above_{k}k_tokens",
                                      spec.get("output_cost_per_token")))  # fmt: skip
        t_cached = spec.get(f"cache_read_input_token_cost_above_{k}k_tokens")
        t_write = spec.get(f"cache_creation_input_token_cost_above_{k}k_tokens")
        if t_in is None or t_out is None:
            return None
        tier_above = k * 1000
        tier = ModelPrice(
            input=t_in, output=t_out,
            cached_input=_per_million(t_cached) if t_cached is not None else None,
            cache_write=_per_million(t_write) if t_write is not None else None,
        )  # fmt: skip
    return ModelPrice(
        input=values["input"], output=values["output"],
        cached_input=values.get("cached_input"), cache_write=values.get("cache_write"),
        audio_input=values.get("audio_input"), audio_output=values.get("audio_output"),
        cached_audio_input=values.get("cached_audio_input"),
        cache_write_1h=values.get("cache_write_1h"), tier_above=tier_above, tier=tier,
    )  # fmt: skip


def litellm_prices(data: Mapping[str, object]) -> dict[str, ModelPrice]:
    """The prices of a table in LiteLLM's published format (``model_prices_and_context_window
    .json``: model -> USD per token). Entries without a per-token input and output price
    (images, search, ``sample_spec``) or with a value that is not a number >= 0 are skipped. A
    provider-prefixed name (``gemini/gemini-2.5-pro``) also prices its bare name when the file
    has no entry of that name (the first such entry wins)."""
    out: dict[str, ModelPrice] = {}
    bare: dict[str, ModelPrice] = {}
    for model, spec in data.items():
        if model == "sample_spec" or not isinstance(spec, Mapping) or not str(model).strip():
            continue
        price = _litellm_entry(spec)
        if price is None:
            continue
        name = str(model).strip().lower()
        out[name] = price
        if "/" in name:
            bare.setdefault(name.rsplit("/", 1)[1], price)
    for name, price in bare.items():
        out.setdefault(name, price)
    return out


def load_litellm_prices(path: str | os.PathLike[str]) -> dict[str, ModelPrice]:
    """:func:`litellm_prices` of a JSON file, read once per process per file version."""
    try:
        st = os.stat(path)
        key = (os.fspath(path), st.st_mtime_ns, st.st_size)
        cached = _litellm_cache.get(key)
        if cached is not None:
            return cached
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        where = os.fspath(path)
        raise ConfigurationError("prices_file", f"cannot read {where!r}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigurationError("prices_file", f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigurationError("prices_file", "must be a JSON object of models")
    prices = litellm_prices(data)
    if not prices:
        raise ConfigurationError("prices_file", "no model with a per-token price in it")
    _litellm_cache.clear()  # one file version kept: a reload replaces it
    _litellm_cache[key] = prices
    return prices


def cost_micros(usage: Usage, price: ModelPrice) -> int:
    """Cost of one response in integer micro-USD, rounded up.

    Uncached input at the input price, cache reads at the cached price, cache writes at the
    cache-write price (both default to the input price; an hour's writes at their own price),
    output (reasoning included) at the output price; a prompt over the model's long-context
    threshold prices the whole request at that tier.
    """
    if price.tier is not None and price.tier_above is not None:
        if usage.input_tokens > price.tier_above:
            price = price.tier
    cached = max(usage.cached_tokens, 0)
    write = max(usage.cache_write_tokens, 0)
    write_1h = min(max(usage.cache_write_1h_tokens, 0), write)
    # audio tokens are subsets of the input, cached and output counts, priced on their own
    audio_in = min(max(usage.audio_input_tokens, 0), max(usage.input_tokens, 0))
    cached_audio = min(max(usage.cached_audio_tokens, 0), cached, audio_in)
    audio_out = min(max(usage.audio_output_tokens, 0), max(usage.output_tokens, 0))
    plain = max(usage.input_tokens - cached - write - (audio_in - cached_audio), 0)
    cached_price = price.input if price.cached_input is None else price.cached_input
    write_price = price.input if price.cache_write is None else price.cache_write
    write_1h_price = write_price if price.cache_write_1h is None else price.cache_write_1h
    audio_in_price = price.input if price.audio_input is None else price.audio_input
    cached_audio_price = (
        cached_price if price.cached_audio_input is None else price.cached_audio_input
    )
    audio_out_price = price.output if price.audio_output is None else price.audio_output
    scaled = (
        plain * price.input
        + (cached - cached_audio) * cached_price
        + (write - write_1h) * write_price
        + write_1h * write_1h_price
        + (audio_in - cached_audio) * audio_in_price
        + cached_audio * cached_audio_price
        + (max(usage.output_tokens, 0) - audio_out) * price.output
        + audio_out * audio_out_price
    )
    return -(-scaled // _PER_MILLION)


def price_for(
    model: str | None,
    table: PriceTable,
    policy: UnpricedPolicy = "refuse",
    default_price: ModelPrice | None = None,
) -> ModelPrice | None:
    """The price to charge ``model`` at, under the unpriced-model ``policy``.

    ``"refuse"`` raises :class:`UnpricedModel`; ``"default"`` returns ``default_price``;
    ``"tokens-only"`` returns ``None`` (tokens are counted, cost is 0).
    """
    price = table.lookup(model)
    if price is not None:
        return price
    if policy == "tokens-only":
        return None
    if policy == "default":
        if default_price is None:
            raise ConfigurationError("pricing.default_price", "required by policy 'default'")
        return default_price
    raise UnpricedModel(model)
