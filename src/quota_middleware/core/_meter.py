"""AI routes, sans-IO: what a request reserves before the app runs, and what it is charged after.

:func:`prepare` reads the buffered request body (model, prompt tokens, output cap) and prices it;
:class:`Meter` watches the response body go by and turns it into a :class:`~.usage.Usage`, from
the provider's own numbers when the response carries them, or estimated with tiktoken from the
prompt and the relayed text when it does not (a stream without ``include_usage``, a client that
went away).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from quota_middleware.config import AIRoute, Plan, QuotaConfig
from quota_middleware.core._margins import InputMargins
from quota_middleware.errors import ModelNotAllowed
from quota_middleware.limits import model_matches
from quota_middleware.metering._estimate import (
    RequestEstimate,
    count_tokens,
    parse_request,
    with_output_cap,
)
from quota_middleware.metering._usage import Usage, UsageParser
from quota_middleware.metering.pricing import (
    ModelPrice,
    PriceTable,
    UnpricedModel,
    cost_micros,
    load_litellm_prices,
    price_for,
)


@dataclass(frozen=True, slots=True)
class AIRequest:
    """One admitted AI request: what it asked for and what was reserved for it."""

    route: AIRoute
    estimate: RequestEstimate
    price: ModelPrice | None
    #: tokens wanted up front (prompt + output allowance) and the least that must fit (prompt)
    reserve_tokens: int
    min_tokens: int
    #: the same in micro-dollars (0 when the model is counted in tokens only)
    reserve_cost: int
    min_cost: int
    #: the input margin the prompt estimate was multiplied by (see :mod:`.margins`), and the
    #: prompt tokens reserved with it
    margin: float = 1.0
    prompt_reserve: int = 0
    #: the request body with its output cap written in (``AIRoute.write_output_cap``), to be
    #: sent to the app instead of the client's; None when unchanged
    body: bytes | None = None

    @property
    def output_reserve(self) -> int:
        """Output tokens reserved up front (the reservation beyond the prompt's)."""
        return self.reserve_tokens - max(self.prompt_reserve, self.min_tokens)

    @property
    def model(self) -> str | None:
        return self.estimate.model


# An output count above CAP_FACTOR x the request's cap + CAP_SLACK is not believed. Loose on
# purpose: some servers count thinking outside the cap, and a false alarm costs an estimate.
_CAP_FACTOR = 4
_CAP_SLACK = 65_536


def price_table(config: QuotaConfig) -> tuple[PriceTable, ModelPrice | None]:
    table = PriceTable()
    if config.prices_file is not None:
        table = table.with_prices(load_litellm_prices(config.prices_file))
    if config.prices:
        table = table.with_overrides(config.prices)
    default = None
    if config.default_price:
        default = _price_from(config.default_price)
    return table, default


def _price_from(spec: Mapping[str, float]) -> ModelPrice:
    return ModelPrice.from_usd(
        spec.get("input"), spec.get("output"), spec.get("cached_input"), spec.get("cache_write"),
        audio_input=spec.get("audio_input"), audio_output=spec.get("audio_output"),
        cached_audio_input=spec.get("cached_audio_input"), where="default_price",
    )  # fmt: skip


def prepare(
    route: AIRoute,
    path: str,
    body: bytes,
    plan: Plan,
    config: QuotaConfig,
    table: PriceTable,
    default_price: ModelPrice | None,
    *,
    budgeted: bool,
    margins: InputMargins | None = None,
) -> AIRequest:
    """Estimate and price one AI request. Raises :class:`ModelNotAllowed` or
    :class:`~.pricing.UnpricedModel` (only when a budget applies and the policy is ``refuse``).

    The prompt reserve is the estimate times the model's input margin; the output reserve is
    the request's cap, or ``default_output_tokens`` without one, at most ``max_output_reserve``.
    With ``write_output_cap`` a request without a cap, or with one above that, gets the
    reserved cap written into its body, so the upstream stops where the reservation ends."""
    est = parse_request(route.format, body, path=path)
    if plan.models is not None and not model_matches(plan.models, est.model):
        raise ModelNotAllowed(est.model)
    allowance = min(est.max_output_tokens or route.default_output_tokens, route.max_output_reserve)
    new_body = None
    if est.format == "openai-embeddings":
        allowance = 0
    elif route.write_output_cap and est.format != "auto":
        per_choice = max(1, allowance // est.choices)
        if est.max_output_tokens is None or per_choice * est.choices < est.max_output_tokens:
            new_body = with_output_cap(est.format, body, per_choice)
            if new_body is not None:
                allowance = per_choice * est.choices
    margin = margins.factor(est.format, est.model) if margins is not None else 1.0
    # The margin grows what is reserved, not what must fit: a prompt whose plain estimate fits
    # what is left is still admitted (with its reservation cut short), never refused as too big.
    prompt = max(1, est.prompt_tokens)
    prompt_reserve = max(prompt, math.ceil(est.prompt_tokens * margin))
    price: ModelPrice | None = table.lookup(est.model)
    if price is None and budgeted:
        price = price_for(est.model, table, config.unpriced, default_price)
    reserve_cost = min_cost = 0
    if price is not None:
        reserve_cost = cost_micros(
            Usage(input_tokens=prompt_reserve, output_tokens=allowance), price
        )
        min_cost = max(1, cost_micros(Usage(input_tokens=prompt), price))
    return AIRequest(
        route=route,
        estimate=est,
        price=price,
        reserve_tokens=prompt_reserve + allowance,
        min_tokens=prompt,
        reserve_cost=reserve_cost,
        min_cost=min(min_cost, reserve_cost) if reserve_cost else 0,
        margin=margin,
        prompt_reserve=prompt_reserve,
        body=new_body,
    )


class Meter:
    """Feeds the response body to the usage parser as it is relayed; never raises, never buffers
    the body (only the parser's bounded line buffer)."""

    __slots__ = (
        "ai", "parser", "status", "bytes_seen", "invalid", "stopped", "_pieces", "_counted",
        "_counted_chars",
    )  # fmt: skip

    def __init__(self, ai: AIRequest) -> None:
        self.ai = ai
        self.parser: UsageParser | None = None
        self.status = 200
        self.bytes_seen = 0
        #: what made the provider's usage unusable, once :meth:`finish` found out
        self.invalid: str | None = None
        #: the hard stop ended this stream (the quota or budget had no room for more)
        self.stopped = False
        # incremental count of the relayed text, for the hard stop
        self._pieces = 0
        self._counted = 0
        self._counted_chars = 0

    def start(self, status: int, content_type: str | None, content_encoding: str | None) -> None:
        self.status = status
        self.parser = UsageParser(
            self.ai.estimate.format,
            content_type=content_type,
            content_encoding=content_encoding,
        )

    def feed(self, chunk: bytes) -> None:
        if chunk and self.parser is not None:
            self.bytes_seen += len(chunk)
            self.parser.feed(chunk)

    def finish(self) -> Usage:
        """The usage to charge. The provider's numbers when its final usage arrived and is
        valid and plausible; otherwise an estimate, marked ``estimated`` with its ``reason``:
        the larger of any partial counts and tiktoken counts of the prompt and of the text
        actually relayed. An upstream error response without usage is charged nothing
        (providers do not bill those) and is not an estimate."""
        parser = self.parser
        est = self.ai.estimate
        if parser is None:
            return Usage(model=est.model, error="no response")
        usage = parser.finish()
        model = parser.model or est.model
        if usage is None and self.status >= 400 and parser.invalid is None:
            return Usage(model=model, error=parser.error or f"status {self.status}")
        reason: str | None = None
        if parser.invalid is not None:
            reason, self.invalid = "usage_invalid", parser.invalid
        elif usage is not None and (why := self._implausible(usage)) is not None:
            reason, self.invalid = "usage_invalid", why
        elif usage is not None:
            if usage.model is None:
                usage = replace(usage, model=est.model)
            if not parser.complete or self.stopped:
                # a partial count (Anthropic's message_start, Gemini's running total) is a
                # floor, not the charge: generation went on past it
                return replace(
                    usage,
                    input_tokens=max(usage.input_tokens, est.prompt_tokens),
                    output_tokens=max(usage.output_tokens, self.text_tokens()),
                    estimated=True,
                    reason="hard_stop" if self.stopped else "incomplete",
                )
            if usage.input_missing:
                return replace(
                    usage, input_tokens=est.prompt_tokens, estimated=True, reason="input_missing"
                )
            return usage
        elif self.stopped:
            reason = "hard_stop"
        elif parser.salvaged:
            reason = "unparseable"
        else:
            reason = "incomplete" if est.include_usage else "no_usage"
        return Usage(
            input_tokens=est.prompt_tokens,
            output_tokens=self.text_tokens(),
            model=model,
            estimated=True,
            error=parser.error,
            reason=reason,
        )

    def running_output(self) -> int:
        """Output tokens relayed so far, counted piece by piece as the text arrives (a little
        above a count of the whole text: merges across pieces are missed), at least what the
        provider reported so far."""
        parser = self.parser
        if parser is None:
            return 0
        pieces = parser.text_pieces(self._pieces)
        if pieces:
            model = self.ai.estimate.model
            self._counted += sum(count_tokens(p, model) for p in pieces)
            self._counted_chars += sum(len(p) for p in pieces)
            self._pieces += len(pieces)
        n = _scaled(self._counted, self._counted_chars, parser.text_chars)
        return max(n, parser.partial_output)

    def text_tokens(self) -> int:
        """Tokens of the generated text relayed so far. The parser keeps at most its buffer
        of text; past that, the count is scaled by the characters it saw."""
        parser = self.parser
        if parser is None:
            return 0
        text = parser.output_text()
        if not text:
            return 0
        return _scaled(count_tokens(text, self.ai.estimate.model), len(text), parser.text_chars)

    def _implausible(self, usage: Usage) -> str | None:
        """Why a valid-looking usage cannot be true, if it cannot: more tokens than any model
        takes or produces (``AIRoute.max_usage_tokens``), or far more output than the
        request allowed (providers stop at the cap; reasoning and thinking count inside it)."""
        bound = self.ai.route.max_usage_tokens
        if usage.input_tokens > bound or usage.output_tokens > bound:
            return f"over max_usage_tokens ({usage.input_tokens}+{usage.output_tokens})"
        cap = self.ai.estimate.max_output_tokens
        if cap and usage.output_tokens > _CAP_FACTOR * cap + _CAP_SLACK:
            return f"output_tokens={usage.output_tokens} for a cap of {cap}"
        return None

    def cost(self, usage: Usage) -> int:
        # Priced at the requested model: the answer often names a dated variant of it, and the
        # reservation was priced the same way.
        return cost_micros(usage, self.ai.price) if self.ai.price is not None else 0


def _scaled(tokens: int, counted_chars: int, seen_chars: int) -> int:
    """``tokens`` counted over ``counted_chars`` of text, scaled up to the ``seen_chars`` the
    parser saw (it keeps at most its buffer of text)."""
    if counted_chars and seen_chars > counted_chars:
        return -(-tokens * seen_chars // counted_chars)
    return tokens


__all__ = ["AIRequest", "Meter", "ModelNotAllowed", "UnpricedModel", "prepare", "price_table"]
