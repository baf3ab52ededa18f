"""Model prices and the cost of one response, in integer micro-dollars.

Prices are stored as integer micro-USD per 1M tokens ($2.50 / 1M tokens -> ``2_500_000``), so the
cost of a request is exact integer arithmetic: ``ceil(sum(tokens * price) / 1_000_000)`` micro-USD,
rounded up once per request so that nothing is ever undercharged.

The bundled table is a dated snapshot (:data:`PRICES_AS_OF`); prices change, so deployments should
override or extend it from configuration (:meth:`PriceTable.with_overrides`).
"""

from __future__ import annotations

import math
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
        where: str = "price",
    ) -> ModelPrice:
        """Prices in USD per 1M tokens, as written in configuration."""

        def opt(value: object, name: str) -> int | None:
            return None if value is None else _micros(value, f"{where}.{name}")

        return cls(
            input=_micros(input, f"{where}.input"),
            output=_micros(output, f"{where}.output"),
            cached_input=opt(cached_input, "cached"),
            cache_write=opt(cache_write, "write"),
            audio_input=opt(audio_input, "audio_input"),
            audio_output=opt(audio_output, "audio_output"),
            cached_audio_input=opt(cached_audio_input, "cached_audio_input"),
        )


def _p(inp: str, out: str, cached: str | None = None, write: str | None = None) -> ModelPrice:
    return ModelPrice.from_usd(inp, out, cached, write)


def _rt(text: tuple[str, str, str], audio: tuple[str, str, str]) -> ModelPrice:
    """A Realtime model: (input, cached input, output) for text, then for audio."""
    return ModelPrice.from_usd(text[0], text[2], text[1], audio_input=audio[0],
                               cached_audio_input=audio[1], audio_output=audio[2])  # fmt: skip


# USD per 1M tokens: input, output, cached input (cache read), cache write.
# "ref" = reference/provider-usage.md §D (LiteLLM 1.110.2 snapshot). Every other row is the
# provider's public list price as we know it for standard (non-batch, non-priority) requests;
# verify against the provider's pricing page before relying on it. Gemini 2.5 Pro and 3 Pro have
# a higher tier above 200k prompt tokens that is not modelled (the table uses the lower tier).
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
    "claude-opus-4-5": _p("5", "25", "0.50", "6.25"),
    "claude-opus-4-1": _p("15", "75", "1.50", "18.75"),
    "claude-opus-4": _p("15", "75", "1.50", "18.75"),
    "claude-sonnet-4-5": _p("3", "15", "0.30", "3.75"),  # ref
    "claude-sonnet-4": _p("3", "15", "0.30", "3.75"),
    "claude-3-7-sonnet": _p("3", "15", "0.30", "3.75"),
    "claude-3-5-sonnet": _p("3", "15", "0.30", "3.75"),
    "claude-haiku-4-5": _p("1", "5", "0.10", "1.25"),
    "claude-3-5-haiku": _p("0.80", "4", "0.08", "1"),
    "claude-3-haiku": _p("0.25", "1.25", "0.03", "0.30"),
    "claude-3-opus": _p("15", "75", "1.50", "18.75"),
    # Google Gemini (AI Studio / Vertex standard); thoughts are billed at the output price
    "gemini-3-pro-preview": _p("2", "12", "0.20"),
    "gemini-2.5-pro": _p("1.25", "10", "0.125"),  # ref
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
                                   "audio_input", "audio_output", "cached_audio_input"}  # fmt: skip
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
                where=where,
            )
        return PriceTable(prices)


def cost_micros(usage: Usage, price: ModelPrice) -> int:
    """Cost of one response in integer micro-USD, rounded up.

    Uncached input at the input price, cache reads at the cached price, cache writes at the
    cache-write price (both default to the input price), output (reasoning included) at the
    output price.
    """
    cached = max(usage.cached_tokens, 0)
    write = max(usage.cache_write_tokens, 0)
    # audio tokens are subsets of the input, cached and output counts, priced on their own
    audio_in = min(max(usage.audio_input_tokens, 0), max(usage.input_tokens, 0))
    cached_audio = min(max(usage.cached_audio_tokens, 0), cached, audio_in)
    audio_out = min(max(usage.audio_output_tokens, 0), max(usage.output_tokens, 0))
    plain = max(usage.input_tokens - cached - write - (audio_in - cached_audio), 0)
    cached_price = price.input if price.cached_input is None else price.cached_input
    write_price = price.input if price.cache_write is None else price.cache_write
    audio_in_price = price.input if price.audio_input is None else price.audio_input
    cached_audio_price = (
        cached_price if price.cached_audio_input is None else price.cached_audio_input
    )
    audio_out_price = price.output if price.audio_output is None else price.audio_output
    scaled = (
        plain * price.input
        + (cached - cached_audio) * cached_price
        + write * write_price
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
