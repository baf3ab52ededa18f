"""The provider side of usage parsing: one function per provider shape over an accumulator.

Each handler (:data:`HANDLERS`) reads usage, model, errors and generated text out of one decoded
JSON object of its provider's shape into an :class:`Accumulator`; :func:`normalise` (in the
parser) turns the accumulated raw fields into a :class:`~quota_middleware.metering.Usage`.
Nothing here knows about bytes, framing or compression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

__all__ = ["HANDLERS", "Accumulator", "clean_model", "detect", "kind_of"]

# Counts go to Lua as integers; anything above 2**53 would lose precision there.
_MAX_COUNT = (1 << 53) - 1
_MAX_ERROR_CHARS = 500

# Kinds of response body; the three OpenAI "chat-like" formats share one usage shape.
_Kind = Literal["openai", "responses", "anthropic", "gemini", "ollama", "realtime"]
_KIND_OF_FORMAT: dict[str, _Kind] = {
    "openai-chat": "openai",
    "openai-completions": "openai",
    "openai-embeddings": "openai",
    "openai-responses": "responses",
    "anthropic-messages": "anthropic",
    "gemini": "gemini",
    "ollama": "ollama",
    "openai-realtime": "realtime",
}
_ANTHROPIC_EVENTS = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "ping",
    }
)
# Responses stream events whose response object carries the final usage
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Provider field name -> our field. Each provider keeps its raw fields; normalised in finish().
_OPENAI_FIELDS = (
    ("prompt_tokens", "in"),
    ("completion_tokens", "out"),
    ("total_tokens", "total"),
)
_RESPONSES_FIELDS = (("input_tokens", "in"), ("output_tokens", "out"), ("total_tokens", "total"))
_ANTHROPIC_FIELDS = (
    ("input_tokens", "in"),
    ("output_tokens", "out"),
    ("cache_read_input_tokens", "cached"),
    ("cache_creation_input_tokens", "write"),
)
_GEMINI_FIELDS = (
    ("promptTokenCount", "in"),
    ("candidatesTokenCount", "out"),
    ("thoughtsTokenCount", "reasoning"),
    ("cachedContentTokenCount", "cached"),
    ("toolUsePromptTokenCount", "tool"),
)
_OLLAMA_FIELDS = (
    ("prompt_eval_count", "in"),
    ("eval_count", "out"),
    ("prompt_eval_cached_count", "cached"),
)


def kind_of(format: str) -> _Kind | None:
    """The body shape of a route's declared format; None for "auto" (detected per object)."""
    return _KIND_OF_FORMAT.get(format)


def clean_model(value: object) -> str | None:
    """A model name fit to become a key field, a log line or a metrics label, else None.

    Model names come from request and response bodies: valid JSON can carry lone surrogates
    (unencodable), control characters or megabytes of text.
    """
    if not isinstance(value, str) or not value or len(value) > 200 or not value.isprintable():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _count(value: object) -> int | None:
    """A usage count from untrusted JSON, or None when it is not one: a non-negative integer
    (an integral float such as ``12.0`` is accepted) no larger than 2**53 - 1. Negative,
    fractional, NaN, infinite, boolean, string and oversized values are invalid: clamping them
    would turn ``-1000000`` into a free request and ``1e30`` into an empty quota."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= _MAX_COUNT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= _MAX_COUNT:
        return int(value)
    return None


def _finished(choices: object, key: str) -> bool:
    """Whether any choice/candidate of a streamed chunk carries its finish reason."""
    if not isinstance(choices, list):
        return False
    return any(isinstance(c, dict) and c.get(key) for c in choices)


def _error_text(err: object, fallback: str = "error") -> str:
    if isinstance(err, dict):
        kind = err.get("type") or err.get("code") or err.get("status") or fallback
        msg = err.get("message")
        text = f"{kind}: {msg}" if isinstance(msg, str) and msg else str(kind)
    elif isinstance(err, str) and err:
        text = err
    else:
        text = fallback
    return text[:_MAX_ERROR_CHARS]


def detect(obj: dict[str, Any]) -> _Kind | None:
    """Guess the provider from one JSON object (format="auto")."""
    t = obj.get("type")
    if isinstance(t, str):
        if t.startswith("response."):
            return "responses"
        if t in _ANTHROPIC_EVENTS or (t == "message" and "content" in obj):
            return "anthropic"
    o = obj.get("object")
    if o == "response":
        return "responses"
    if isinstance(o, str) and (o.startswith(("chat.completion", "text_completion")) or o == "list"):
        return "openai"
    if "candidates" in obj or "usageMetadata" in obj or "modelVersion" in obj:
        return "gemini"
    if "done" in obj or "eval_count" in obj or "prompt_eval_count" in obj:
        return "ollama"
    if "choices" in obj:
        return "openai"
    usage = obj.get("usage")
    if isinstance(usage, dict):
        if "prompt_tokens" in usage:
            return "openai"
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
            return "anthropic"
        if "input_tokens_details" in usage or "output_tokens_details" in usage:
            return "responses"
    return None


class Accumulator:
    """What the objects of one response body said so far."""

    __slots__ = (
        "collect", "complete", "error", "fields", "invalid", "max_text", "model",
        "seen_usage", "text", "text_chars", "text_kept", "whole",
    )  # fmt: skip

    def __init__(self, *, max_text: int, collect: bool) -> None:
        self.max_text = max_text
        self.collect = collect
        #: raw counts under our field names ("in", "out", "cached", ...), normalised at the end
        self.fields: dict[str, int] = {}
        self.seen_usage = False
        #: the first count that was not a valid count ("prompt_tokens=-5"), if any
        self.invalid: str | None = None
        #: the provider's terminal usage was seen (not only a partial count from a stream's start)
        self.complete = False
        #: the object being handled is a whole (non-streamed) response document
        self.whole = False
        self.model: str | None = None
        self.error: str | None = None
        self.text: list[str] = []
        self.text_kept = 0
        self.text_chars = 0  # generated characters seen, including any beyond the kept text

    def set_model(self, model: object) -> None:
        if isinstance(model, str):
            cleaned = clean_model(model.removeprefix("models/"))
            if cleaned is not None:
                self.model = cleaned

    def generic_error(self, obj: dict[str, Any]) -> bool:
        err = obj.get("error")
        if err:
            self.error = _error_text(err)
            return True
        if obj.get("type") == "error":
            self.error = _error_text(obj)
            return True
        return False

    def merge(self, usage: object, fields: tuple[tuple[str, str], ...]) -> bool:
        """Later non-null values replace earlier ones: every provider reports cumulative counts.
        A present value that is not a valid count marks the whole usage invalid. True when any
        field was present."""
        if not isinstance(usage, dict):
            return False
        present = False
        for src, dst in fields:
            value = usage.get(src)
            if value is None:
                continue  # absent or null: no update (Vertex sends counts on later chunks only)
            present = True
            n = _count(value)
            if n is None:
                self.invalid = self.invalid or f"{src}={str(value)[:40]}"
                continue
            self.fields[dst] = n
            self.seen_usage = True
        return present

    def merge_detail(self, usage: dict[str, Any], outer: str, inner: str, dst: str) -> None:
        detail = usage.get(outer)
        if isinstance(detail, dict):
            value = detail.get(inner)
            if value is None:
                return
            n = _count(value)
            if n is None:
                self.invalid = self.invalid or f"{outer}.{inner}={str(value)[:40]}"
            else:
                self.fields[dst] = n

    def add_text(self, text: object) -> None:
        if not self.collect or not isinstance(text, str) or not text:
            return
        self.text_chars += len(text)
        room = self.max_text - self.text_kept
        if room > 0:
            piece = text[:room]
            self.text.append(piece)
            self.text_kept += len(piece)


# OpenAI chat / completions / embeddings, and every "OpenAI-compatible" server
def _openai(acc: Accumulator, obj: dict[str, Any]) -> None:
    acc.generic_error(obj)
    acc.set_model(obj.get("model"))
    usage = obj.get("usage")
    choices = obj.get("choices")
    if isinstance(usage, dict) and acc.merge(usage, _OPENAI_FIELDS):
        acc.merge_detail(usage, "prompt_tokens_details", "cached_tokens", "cached")
        acc.merge_detail(usage, "completion_tokens_details", "reasoning_tokens", "reasoning")
        # Streams carry their final usage in a last chunk without choices. Servers that
        # repeat a running count on every chunk (vLLM's continuous usage stats) end with
        # that chunk too when asked for usage; a finish reason alone is not the end (with
        # n > 1 the other choices go on)
        if acc.whole or not choices:
            acc.complete = True
    if not acc.collect or not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        acc.add_text(choice.get("text"))
        for key in ("delta", "message"):
            msg = choice.get(key)
            if isinstance(msg, dict):
                acc.add_text(msg.get("content"))
                acc.add_text(msg.get("refusal"))
                acc.add_text(msg.get("reasoning_content"))
                acc.add_text(msg.get("reasoning"))
                calls = msg.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        fn = call.get("function") if isinstance(call, dict) else None
                        if isinstance(fn, dict):
                            acc.add_text(fn.get("arguments"))


def _responses_usage(acc: Accumulator, response: dict[str, Any], final: bool) -> None:
    acc.set_model(response.get("model"))
    usage = response.get("usage")
    if isinstance(usage, dict) and acc.merge(usage, _RESPONSES_FIELDS):
        if final:
            acc.complete = True
        acc.merge_detail(usage, "input_tokens_details", "cached_tokens", "cached")
        acc.merge_detail(usage, "output_tokens_details", "reasoning_tokens", "reasoning")
    err = response.get("error")
    if err:
        acc.error = _error_text(err)
    elif response.get("status") == "failed":
        acc.error = acc.error or "response.failed"


def _responses(acc: Accumulator, obj: dict[str, Any]) -> None:
    t = obj.get("type")
    if not isinstance(t, str):  # the non-streaming body is the response object itself
        _responses_usage(acc, obj, acc.whole)
        acc.generic_error(obj)
        output = obj.get("output")
        if acc.collect and isinstance(output, list):
            for item in output:
                content = item.get("content") if isinstance(item, dict) else None
                if isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict):
                            acc.add_text(part.get("text"))
                elif isinstance(item, dict):
                    acc.add_text(item.get("arguments"))
        return
    if t == "error":
        acc.error = _error_text(obj)
        return
    if t.endswith(".delta") and "audio" not in t:
        acc.add_text(obj.get("delta"))
        return
    response = obj.get("response")
    if isinstance(response, dict):
        _responses_usage(acc, response, t in _RESPONSES_FINAL)
    if t == "response.failed" and not acc.error:
        acc.error = "response.failed"


def _anthropic_usage(acc: Accumulator, usage: object) -> bool:
    """Anthropic's usage, with the part of the cache writes made for an hour (their own price):
    ``cache_creation.ephemeral_1h_input_tokens``, a subset of ``cache_creation_input_tokens``."""
    present = acc.merge(usage, _ANTHROPIC_FIELDS)
    if isinstance(usage, dict):
        acc.merge_detail(usage, "cache_creation", "ephemeral_1h_input_tokens", "write_1h")
    return present


def _anthropic(acc: Accumulator, obj: dict[str, Any]) -> None:
    t = obj.get("type")
    if t == "content_block_delta":
        delta = obj.get("delta")
        if isinstance(delta, dict):
            acc.add_text(delta.get("text"))
            acc.add_text(delta.get("thinking"))
            acc.add_text(delta.get("partial_json"))
        return
    if t == "message_start":
        msg = obj.get("message")
        if isinstance(msg, dict):
            acc.set_model(msg.get("model"))
            _anthropic_usage(acc, msg.get("usage"))
        return
    if t == "message_delta":
        # message_start's usage is partial (output_tokens: 1); this one is final
        if _anthropic_usage(acc, obj.get("usage")):
            acc.complete = True
        return
    if t == "error" or "error" in obj:
        acc.error = _error_text(obj.get("error"))
        return
    if t == "message" or t is None:  # non-streaming body (or its tail)
        acc.set_model(obj.get("model"))
        if _anthropic_usage(acc, obj.get("usage")) and acc.whole:
            acc.complete = True
        content = obj.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict):
                    acc.add_text(block.get("text"))
                    acc.add_text(block.get("thinking"))


def _gemini(acc: Accumulator, obj: dict[str, Any]) -> None:
    acc.generic_error(obj)
    acc.set_model(obj.get("modelVersion") or obj.get("model"))
    # Vertex puts {"trafficType": ...} without counts on early chunks: missing = no update
    candidates = obj.get("candidates")
    if acc.merge(obj.get("usageMetadata"), _GEMINI_FIELDS):
        # counts are cumulative on every chunk; the last one carries the finish reason
        # (or a blocked prompt's feedback)
        feedback = obj.get("promptFeedback")
        blocked = isinstance(feedback, dict) and bool(feedback.get("blockReason"))
        if acc.whole or blocked or _finished(candidates, "finishReason"):
            acc.complete = True
    if not acc.collect:
        return
    if isinstance(candidates, list):
        for cand in candidates:
            content = cand.get("content") if isinstance(cand, dict) else None
            parts = content.get("parts") if isinstance(content, dict) else None
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, dict):
                        acc.add_text(part.get("text"))


def _ollama(acc: Accumulator, obj: dict[str, Any]) -> None:
    acc.generic_error(obj)
    acc.set_model(obj.get("model"))
    # /api/generate and /api/chat end with done: true; /api/embed answers one document
    if acc.merge(obj, _OLLAMA_FIELDS) and (obj.get("done") is True or acc.whole):
        acc.complete = True
    if not acc.collect:
        return
    acc.add_text(obj.get("response"))
    acc.add_text(obj.get("thinking"))
    msg = obj.get("message")
    if isinstance(msg, dict):
        acc.add_text(msg.get("content"))
        acc.add_text(msg.get("thinking"))


_REALTIME_FIELDS = (("input_tokens", "in"), ("output_tokens", "out"), ("total_tokens", "total"))
#: Realtime server events whose ``delta`` is generated text (a transcript, for audio)
_REALTIME_TEXT = frozenset(
    {
        "response.text.delta", "response.output_text.delta", "response.audio_transcript.delta",
        "response.output_audio_transcript.delta", "response.function_call_arguments.delta",
    }
)  # fmt: skip


def _realtime(acc: Accumulator, obj: dict[str, Any]) -> None:
    """OpenAI Realtime server events, one response's worth (the connection feeds each
    response's events to its own parser): ``response.done`` carries its usage, text and audio
    apart; the deltas carry its text for an estimate when the response never completes."""
    t = obj.get("type")
    if t in _REALTIME_TEXT:
        acc.add_text(obj.get("delta"))
        return
    if t in ("session.created", "session.updated"):
        session = obj.get("session")
        if isinstance(session, dict):
            acc.set_model(session.get("model"))
        return
    if t == "error":
        acc.error = _error_text(obj.get("error"))
        return
    if t != "response.done":
        return
    response = obj.get("response")
    if not isinstance(response, dict):
        return
    acc.set_model(response.get("model"))
    usage = response.get("usage")
    if isinstance(usage, dict) and acc.merge(usage, _REALTIME_FIELDS):
        acc.complete = True
        acc.merge_detail(usage, "input_token_details", "cached_tokens", "cached")
        acc.merge_detail(usage, "input_token_details", "audio_tokens", "audio_in")
        acc.merge_detail(usage, "output_token_details", "audio_tokens", "audio_out")
        details = usage.get("input_token_details")
        if isinstance(details, dict):
            acc.merge_detail(details, "cached_tokens_details", "audio_tokens", "cached_audio")
    status = response.get("status")
    if status == "failed":
        details = response.get("status_details")
        err = details.get("error") if isinstance(details, dict) else None
        acc.error = _error_text(err, "response.failed")


HANDLERS: dict[_Kind, Callable[[Accumulator, dict[str, Any]], None]] = {
    "openai": _openai,
    "responses": _responses,
    "anthropic": _anthropic,
    "gemini": _gemini,
    "ollama": _ollama,
    "realtime": _realtime,
}
