"""The hard stop, sans-IO: a streamed AI response may not outgrow its reservation while a token
quota or budget has no room for more.

After each relayed chunk of a stream, :func:`overrun` compares the request's usage so far (the
prompt reserve plus the output counted from the relayed text, or the provider's running count
when higher) with what each of its quota and budget holds reserved. Past a reservation,
:func:`top_up` asks the ``extend`` script for more room (a step, so a long stream does not pay a
round trip per chunk; the bare need when the step does not fit). When even that is refused, the
adapter ends the stream with :func:`stop_event` (a final error event in the provider's own
format), closes the upstream and settles what was relayed. So an upstream that ignores
``max_tokens`` overshoots a full quota by at most the chunk that crossed it.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

from quota_middleware.base._scripts import Op, ScriptCall
from quota_middleware.core._decision import Decision, Hold
from quota_middleware.core._extension import plan_extend_holds, run_extend
from quota_middleware.core._meter import AIRequest, Meter
from quota_middleware.metering._usage import Usage
from quota_middleware.metering.pricing import cost_micros

__all__ = ["overrun", "stop_event", "top_up"]

#: the least a top-up asks for, in tokens
_STEP_MIN = 256


def _holds(decision: Decision) -> list[Hold]:
    return [h for h in decision.holds if h.kind == Op.QUOTA and h.ledger is not None]


def overrun(decision: Decision, meter: Meter) -> list[tuple[Hold, int]] | None:
    """Each quota or budget hold the usage relayed so far has outgrown, with by how much
    (tokens, or micro-dollars for budgets); None while every one fits, or for what the hard
    stop does not cover: a whole JSON document, a response whose final usage has arrived (the
    provider is done: nothing left to save), a request admitted without the store or without
    any quota or budget."""
    ai, parser = decision.ai, meter.parser
    if ai is None or parser is None or decision.degraded or parser.complete:
        return None
    if parser.framing == "json" and not parser.json_array:
        return None
    holds = _holds(decision)
    if not holds:
        return None
    # cheap bound first: a token is at least one byte, a character at most four
    if not _short(ai, holds, max(4 * parser.text_chars, parser.partial_output)):
        return None
    short = _short(ai, holds, meter.running_output())
    return short or None


def _short(ai: AIRequest, holds: list[Hold], out: int) -> list[tuple[Hold, int]]:
    tokens = _prompt(ai) + out
    cost: int | None = None
    found = []
    for h in holds:
        if h.param == 1:
            cost = _cost(ai, out) if cost is None else cost
            used = cost
        else:
            used = tokens
        if used > h.charged:
            found.append((h, used - h.charged))
    return found


def _prompt(ai: AIRequest) -> int:
    return max(ai.prompt_reserve, ai.min_tokens)  # the prompt with its learned margin


def _cost(ai: AIRequest, out: int) -> int:
    if ai.price is None:
        return 0
    return cost_micros(Usage(input_tokens=_prompt(ai), output_tokens=out), ai.price)


def _fits(ai: AIRequest, out: int, token_room: int | None, cost_room: int | None) -> bool:
    if token_room is not None and _prompt(ai) + out > token_room:
        return False
    return cost_room is None or _cost(ai, out) <= cost_room


def top_up(
    decision: Decision, meter: Meter, *, now_arg: str, fail_open: bool
) -> Generator[ScriptCall, Any, bool]:
    """Whether the stream may go on: True while the reservation fits or was grown, False when a
    quota or budget has no room (stop the stream). When the store cannot be asked, the plan's
    ``on_error`` decides (``fail_open``)."""
    short = overrun(decision, meter)
    if short is None:
        return True
    ai = decision.ai
    assert ai is not None
    lease_us = int(ai.route.lease * 1_000_000)
    # A step of half the output allowance (in each hold's unit), so a long stream does not pay
    # a round trip per chunk; only the holds that ran short grow.
    tokens = max(ai.output_reserve // 2, _STEP_MIN)
    cost = _cost(ai, tokens) - _cost(ai, 0)
    steps = [(h, max(need, cost if h.param == 1 else tokens)) for h, need in short]
    call = plan_extend_holds(decision, steps, lease_us, now_arg)
    granted = yield from run_extend(decision, call)
    if granted is False and steps != short:
        # the step does not fit: what is needed right now still may
        call = plan_extend_holds(decision, short, lease_us, now_arg)
        granted = yield from run_extend(decision, call)
    if granted is None:
        return fail_open
    return granted


_MESSAGE = "Your token quota or spend budget has no room for the rest of this response."


def stop_event(fmt: str, meter: Meter) -> bytes:
    """The last bytes of a stream ended by the hard stop: the provider's own error event, so its
    SDK raises a clear error instead of seeing a truncated stream. Nothing for an encoded body
    (an event cannot be spliced into a compressed stream; the stream just ends)."""
    parser = meter.parser
    if parser is None or parser.encoded:
        return b""
    if parser.framing == "ndjson":
        return json.dumps({"error": _MESSAGE}).encode() + b"\n"
    gemini = {"error": {"code": 429, "message": _MESSAGE, "status": "RESOURCE_EXHAUSTED"}}
    if parser.framing == "json":  # a streamed JSON array (Gemini without alt=sse)
        return b",\r\n" + json.dumps(gemini).encode() + b"\r\n]"
    if fmt == "anthropic-messages":
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": _MESSAGE}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    if fmt == "openai-responses":
        event: dict[str, object] = {"type": "error", "code": "insufficient_quota",
                                    "message": _MESSAGE, "param": None}  # fmt: skip
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    if fmt == "gemini":
        return b"data: " + json.dumps(gemini).encode() + b"\n\n"
    body = {"error": {"message": _MESSAGE, "type": "insufficient_quota",
                      "code": "insufficient_quota", "param": None}}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"
