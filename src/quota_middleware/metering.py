"""AI routes, sans-IO: what a request reserves before the app runs, and what it is charged after.

:func:`prepare` reads the buffered request body (model, prompt tokens, output cap) and prices it;
:class:`Meter` watches the response body go by and turns it into a :class:`~.usage.Usage`, from
the provider's own numbers when the response carries them, or estimated with tiktoken from the
prompt and the relayed text when it does not (a stream without ``include_usage``, a client that
went away).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from .config import AIRoute, Plan, QuotaConfig
from .estimate import RequestEstimate, count_tokens, parse_request
from .limits import model_matches
from .pricing import ModelPrice, PriceTable, UnpricedModel, cost_micros, price_for
from .usage import Usage, UsageParser


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

    @property
    def model(self) -> str | None:
        return self.estimate.model


class ModelNotAllowed(Exception):
    def __init__(self, model: str | None) -> None:
        self.model = model
        super().__init__(f"model {model!r} is not allowed on this plan")


def price_table(config: QuotaConfig) -> tuple[PriceTable, ModelPrice | None]:
    table = PriceTable().with_overrides(config.prices) if config.prices else PriceTable()
    default = None
    if config.default_price:
        default = _price_from(config.default_price)
    return table, default


def _price_from(spec: Mapping[str, float]) -> ModelPrice:
    return ModelPrice.from_usd(
        spec.get("input"), spec.get("output"), spec.get("cached_input"), spec.get("cache_write"),
        where="default_price",
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
) -> AIRequest:
    """Estimate and price one AI request. Raises :class:`ModelNotAllowed` or
    :class:`~.pricing.UnpricedModel` (only when a budget applies and the policy is ``refuse``)."""
    est = parse_request(route.format, body, path=path)
    if plan.models is not None and not model_matches(plan.models, est.model):
        raise ModelNotAllowed(est.model)
    allowance = min(est.max_output_tokens or route.default_output_tokens, route.max_output_reserve)
    if est.format == "openai-embeddings":
        allowance = 0
    prompt = max(1, est.prompt_tokens)
    price: ModelPrice | None = table.lookup(est.model)
    if price is None and budgeted:
        price = price_for(est.model, table, config.unpriced, default_price)
    reserve_cost = min_cost = 0
    if price is not None:
        reserve_cost = cost_micros(Usage(input_tokens=prompt, output_tokens=allowance), price)
        min_cost = max(1, cost_micros(Usage(input_tokens=prompt), price))
    return AIRequest(
        route=route,
        estimate=est,
        price=price,
        reserve_tokens=prompt + allowance,
        min_tokens=prompt,
        reserve_cost=reserve_cost,
        min_cost=min(min_cost, reserve_cost) if reserve_cost else 0,
    )


class Meter:
    """Feeds the response body to the usage parser as it is relayed; never raises, never buffers
    the body (only the parser's bounded line buffer)."""

    __slots__ = ("ai", "parser", "status", "bytes_seen")

    def __init__(self, ai: AIRequest) -> None:
        self.ai = ai
        self.parser: UsageParser | None = None
        self.status = 200
        self.bytes_seen = 0

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
        """The usage to charge. Provider numbers when present; otherwise tiktoken counts of the
        prompt and of the text relayed so far, marked ``estimated``. An upstream error response
        without usage is charged nothing: providers do not bill those."""
        usage = self.parser.finish() if self.parser is not None else None
        est = self.ai.estimate
        if usage is not None:
            if usage.input_missing:
                usage = replace(usage, input_tokens=est.prompt_tokens, estimated=True)
            if usage.model is None:
                usage = replace(usage, model=est.model)
            return usage
        error = self.parser.error if self.parser is not None else None
        if self.status >= 400 or self.parser is None:
            return Usage(model=est.model, estimated=True, error=error)
        text = self.parser.output_text()
        return Usage(
            input_tokens=est.prompt_tokens,
            output_tokens=count_tokens(text, est.model) if text else 0,
            model=self.parser.model or est.model,
            estimated=True,
            error=error,
        )

    def cost(self, usage: Usage) -> int:
        # Priced at the requested model: the answer often names a dated variant of it, and the
        # reservation was priced the same way.
        return cost_micros(usage, self.ai.price) if self.ai.price is not None else 0


__all__ = ["AIRequest", "Meter", "ModelNotAllowed", "UnpricedModel", "prepare", "price_table"]
