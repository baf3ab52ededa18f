"""Per-provider half of :class:`~quota_middleware.usage.UsageParser`: reads usage, model, errors
and generated text out of one decoded JSON object of each provider's shape.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["Providers"]

# Counts go to Lua as integers; anything above 2**53 would lose precision there.
_MAX_COUNT = (1 << 53) - 1
_MAX_ERROR_CHARS = 500

# Kinds of response body; the three OpenAI "chat-like" formats share one usage shape.
_Kind = Literal["openai", "responses", "anthropic", "gemini", "ollama"]
_KIND_OF_FORMAT: dict[str, _Kind] = {
    "openai-chat": "openai",
    "openai-completions": "openai",
    "openai-embeddings": "openai",
    "openai-responses": "responses",
    "anthropic-messages": "anthropic",
    "gemini": "gemini",
    "ollama": "ollama",
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


def _detect(obj: dict[str, Any]) -> _Kind | None:
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


class Providers:
    """Mixin holding the per-provider handlers; results go to the parser's fields."""

    # set by the parser
    _max: int
    _collect: bool
    _fields: dict[str, int]
    _seen_usage: bool
    _error: str | None
    #: the first count that was not a valid count ("prompt_tokens=-5"), if any
    _invalid: str | None
    #: the provider's terminal usage was seen (not only a partial count from a stream's start)
    _complete: bool
    #: the object being handled is a whole (non-streamed) response document
    _whole: bool
    _text: list[str]
    _text_kept: int
    text_chars: int

    # implemented by the parser
    def _set_model(self, model: object) -> None:
        raise NotImplementedError

    def _generic_error(self, obj: dict[str, Any]) -> bool:
        err = obj.get("error")
        if err:
            self._error = _error_text(err)
            return True
        if obj.get("type") == "error":
            self._error = _error_text(obj)
            return True
        return False

    def _merge(self, usage: object, fields: tuple[tuple[str, str], ...]) -> bool:
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
                self._invalid = self._invalid or f"{src}={str(value)[:40]}"
                continue
            self._fields[dst] = n
            self._seen_usage = True
        return present

    def _merge_detail(self, usage: dict[str, Any], outer: str, inner: str, dst: str) -> None:
        detail = usage.get(outer)
        if isinstance(detail, dict):
            value = detail.get(inner)
            if value is None:
                return
            n = _count(value)
            if n is None:
                self._invalid = self._invalid or f"{outer}.{inner}={str(value)[:40]}"
            else:
                self._fields[dst] = n

    def _add_text(self, text: object) -> None:
        if not self._collect or not isinstance(text, str) or not text:
            return
        self.text_chars += len(text)
        room = self._max - self._text_kept
        if room > 0:
            piece = text[:room]
            self._text.append(piece)
            self._text_kept += len(piece)

    # OpenAI chat / completions / embeddings, and every "OpenAI-compatible" server
    def _openai(self, obj: dict[str, Any]) -> None:
        self._generic_error(obj)
        self._set_model(obj.get("model"))
        usage = obj.get("usage")
        choices = obj.get("choices")
        if isinstance(usage, dict) and self._merge(usage, _OPENAI_FIELDS):
            self._merge_detail(usage, "prompt_tokens_details", "cached_tokens", "cached")
            self._merge_detail(usage, "completion_tokens_details", "reasoning_tokens", "reasoning")
            # Streams carry their final usage in a last chunk without choices. Servers that
            # repeat a running count on every chunk (vLLM's continuous usage stats) end with
            # that chunk too when asked for usage; a finish reason alone is not the end (with
            # n > 1 the other choices go on)
            if self._whole or not choices:
                self._complete = True
        if not self._collect or not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            self._add_text(choice.get("text"))
            for key in ("delta", "message"):
                msg = choice.get(key)
                if isinstance(msg, dict):
                    self._add_text(msg.get("content"))
                    self._add_text(msg.get("refusal"))
                    self._add_text(msg.get("reasoning_content"))
                    self._add_text(msg.get("reasoning"))
                    calls = msg.get("tool_calls")
                    if isinstance(calls, list):
                        for call in calls:
                            fn = call.get("function") if isinstance(call, dict) else None
                            if isinstance(fn, dict):
                                self._add_text(fn.get("arguments"))

    def _responses_usage(self, response: dict[str, Any], final: bool) -> None:
        self._set_model(response.get("model"))
        usage = response.get("usage")
        if isinstance(usage, dict) and self._merge(usage, _RESPONSES_FIELDS):
            if final:
                self._complete = True
            self._merge_detail(usage, "input_tokens_details", "cached_tokens", "cached")
            self._merge_detail(usage, "output_tokens_details", "reasoning_tokens", "reasoning")
        err = response.get("error")
        if err:
            self._error = _error_text(err)
        elif response.get("status") == "failed":
            self._error = self._error or "response.failed"

    def _responses(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if not isinstance(t, str):  # the non-streaming body is the response object itself
            self._responses_usage(obj, self._whole)
            self._generic_error(obj)
            output = obj.get("output")
            if self._collect and isinstance(output, list):
                for item in output:
                    content = item.get("content") if isinstance(item, dict) else None
                    if isinstance(content, list):
                        for part in content:
                            if isinstance(part, dict):
                                self._add_text(part.get("text"))
                    elif isinstance(item, dict):
                        self._add_text(item.get("arguments"))
            return
        if t == "error":
            self._error = _error_text(obj)
            return
        if t.endswith(".delta") and "audio" not in t:
            self._add_text(obj.get("delta"))
            return
        response = obj.get("response")
        if isinstance(response, dict):
            self._responses_usage(response, t in _RESPONSES_FINAL)
        if t == "response.failed" and not self._error:
            self._error = "response.failed"

    def _anthropic(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if t == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._add_text(delta.get("text"))
                self._add_text(delta.get("thinking"))
                self._add_text(delta.get("partial_json"))
            return
        if t == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self._set_model(msg.get("model"))
                self._merge(msg.get("usage"), _ANTHROPIC_FIELDS)
            return
        if t == "message_delta":
            # message_start's usage is partial (output_tokens: 1); this one is final
            if self._merge(obj.get("usage"), _ANTHROPIC_FIELDS):
                self._complete = True
            return
        if t == "error" or "error" in obj:
            self._error = _error_text(obj.get("error"))
            return
        if t == "message" or t is None:  # non-streaming body (or its tail)
            self._set_model(obj.get("model"))
            if self._merge(obj.get("usage"), _ANTHROPIC_FIELDS) and self._whole:
                self._complete = True
            content = obj.get("content")
            if isinstance(content, list):
                for block in content:
                    if isinstance(block, dict):
                        self._add_text(block.get("text"))
                        self._add_text(block.get("thinking"))

    def _gemini(self, obj: dict[str, Any]) -> None:
        self._generic_error(obj)
        self._set_model(obj.get("modelVersion") or obj.get("model"))
        # Vertex puts {"trafficType": ...} without counts on early chunks: missing = no update
        candidates = obj.get("candidates")
        if self._merge(obj.get("usageMetadata"), _GEMINI_FIELDS):
            # counts are cumulative on every chunk; the last one carries the finish reason
            # (or a blocked prompt's feedback)
            feedback = obj.get("promptFeedback")
            blocked = isinstance(feedback, dict) and bool(feedback.get("blockReason"))
            if self._whole or blocked or _finished(candidates, "finishReason"):
                self._complete = True
        if not self._collect:
            return
        if isinstance(candidates, list):
            for cand in candidates:
                content = cand.get("content") if isinstance(cand, dict) else None
                parts = content.get("parts") if isinstance(content, dict) else None
                if isinstance(parts, list):
                    for part in parts:
                        if isinstance(part, dict):
                            self._add_text(part.get("text"))

    def _ollama(self, obj: dict[str, Any]) -> None:
        self._generic_error(obj)
        self._set_model(obj.get("model"))
        # /api/generate and /api/chat end with done: true; /api/embed answers one document
        if self._merge(obj, _OLLAMA_FIELDS) and (obj.get("done") is True or self._whole):
            self._complete = True
        if not self._collect:
            return
        self._add_text(obj.get("response"))
        self._add_text(obj.get("thinking"))
        msg = obj.get("message")
        if isinstance(msg, dict):
            self._add_text(msg.get("content"))
            self._add_text(msg.get("thinking"))
