"""Incremental, sans-IO parsers that read token usage out of AI responses as they stream past.

One :class:`UsageParser` per response. Feed it every body chunk exactly as it is relayed; call
:meth:`UsageParser.finish` once at the end. The parser never raises on bad input, never blocks and
keeps its memory under ``max_buffer``: metering must never break or slow down the relayed response.

Provider semantics (DESIGN §5, reference/provider-usage.md §A) are normalised into :class:`Usage`:
``input_tokens`` is every prompt token including cache reads and writes, ``output_tokens`` every
generated token including reasoning. Counts are cumulative at every provider that repeats them, so
the last value seen for a field wins; nothing is ever summed across chunks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from quota_middleware.metering._framing import Framing
from quota_middleware.metering._providers import (
    _KIND_OF_FORMAT,
    _MAX_COUNT,
    Providers,
    _detect,
    _Kind,
)

__all__ = ["Format", "Usage", "UsageParser", "clean_model"]

Format = Literal[
    "openai-chat",
    "openai-completions",
    "openai-responses",
    "openai-embeddings",
    "anthropic-messages",
    "gemini",
    "ollama",
    "auto",
]


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


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one response, normalised across providers.

    ``cached_tokens``, ``cache_write_tokens`` are subsets of ``input_tokens``; ``reasoning_tokens``
    is a subset of ``output_tokens``. ``input_missing`` is set when the provider omitted the prompt
    count (Ollama skips ``prompt_eval_count`` on a KV-cache hit): the caller should substitute its
    prompt estimate instead of charging zero.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    estimated: bool = False
    error: str | None = None
    input_missing: bool = False
    #: why the usage is ``estimated``: ``"no_usage"`` (a stream that was not asked to report
    #: it), ``"incomplete"`` (the provider's final usage never arrived: a cut stream, an error
    #: event, a client that went away), ``"usage_invalid"`` (negative, fractional, non-numeric or
    #: implausibly large counts), ``"unparseable"`` (a body that is not valid JSON),
    #: ``"input_missing"`` (Ollama omitted the prompt count)
    reason: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


# Cheap byte pre-checks: an event without any of these cannot change usage, error or model.
_INTERESTING = (b"usage", b"Usage", b'"error"', b"eval_count", b'"done"')
_TEXTY = (
    b'"content"', b'"text"', b'"delta"', b'"response"', b'"thinking"', b'"reasoning', b'"refusal"'
)  # fmt: skip


class UsageParser(Providers, Framing):
    """Reads usage from one response body, chunk by chunk.

    Framing comes from ``content_type``: ``text/event-stream`` is SSE, ``application/x-ndjson``
    and ``application/jsonl`` are NDJSON, anything else one JSON document (or a JSON array of
    chunks, as Gemini streams without ``alt=sse``). ``content_encoding`` gzip/deflate is
    decompressed for parsing only; an encoding we cannot decode (br, zstd) makes the parser give
    up quietly.

    The byte side (decompression, framing) is :class:`~quota_middleware._framing.Framing`, the
    per-provider handlers are :class:`~quota_middleware._providers.Providers`.
    """

    def __init__(
        self,
        format: Format,
        *,
        content_type: str | None,
        content_encoding: str | None = None,
        max_buffer: int = 1 << 20,
        collect_text: bool = True,
        max_decompressed: int = 1 << 28,
    ) -> None:
        self._kind: _Kind | None = _KIND_OF_FORMAT.get(format)
        self._max = max(int(max_buffer), 64)
        self._collect = collect_text
        self._init_framing(content_type, content_encoding, max_decompressed)
        # results
        self._fields: dict[str, int] = {}
        self._seen_usage = False
        self._invalid: str | None = None
        self._complete = False
        self._whole = False
        self._model: str | None = None
        self._error: str | None = None
        self._text: list[str] = []
        self._text_kept = 0
        self.text_chars = 0  #: generated characters seen, including any beyond the kept text

    # ------------------------------------------------------------------ public

    @property
    def model(self) -> str | None:
        return self._model

    @property
    def error(self) -> str | None:
        """Provider error seen in the body, even when no usage came with it."""
        return self._error

    @property
    def complete(self) -> bool:
        """The provider's final usage was seen (a whole document's, a stream's last event)."""
        return self._complete

    @property
    def invalid(self) -> str | None:
        """The first usage count that was not a valid count (``"prompt_tokens=-5"``), if any."""
        return self._invalid

    @property
    def partial_output(self) -> int:
        """The output count reported so far (cumulative providers report it as they go),
        Gemini's thoughts included, as in the final usage."""
        out = self._fields.get("out", 0)
        return out + self._fields.get("reasoning", 0) if self._kind == "gemini" else out

    @property
    def at_boundary(self) -> bool:
        """No event, line or array element is half-received: bytes can be added to the body
        here without landing inside one (the hard stop's error event)."""
        if self._framing == "json":
            return not bytes(self._doc).strip(b" \t\r\n,")
        return not self._pending and not self._data and not self._skip_lf

    @property
    def framing(self) -> str:
        """``"sse"``, ``"ndjson"`` or ``"json"`` (a document, or a streamed JSON array)."""
        return self._framing

    @property
    def json_array(self) -> bool:
        return self._array is True

    @property
    def encoded(self) -> bool:
        """The body has a content encoding (gzip, deflate, or one we cannot read)."""
        return self._zmode != "none" or (self._dead and not self._seen_usage)

    def text_pieces(self, start: int) -> list[str]:
        """The kept pieces of generated text from index ``start`` on (for incremental counts)."""
        return self._text[start:]

    def output_text(self) -> str:
        """Generated text seen so far (bounded to ``max_buffer`` characters), for estimates."""
        return "".join(self._text)

    def feed(self, chunk: bytes) -> None:
        if self._dead or not chunk:
            return
        try:
            if self._zmode != "none":
                self._inflate(bytes(chunk))
            else:
                self._frame(bytes(chunk))
        except Exception:  # metering must never break the relayed response
            self._dead = True

    def finish(self) -> Usage | None:
        try:
            if not self._dead:
                self._flush()
        except Exception:
            pass
        if not self._seen_usage:
            return None
        return self._normalise()

    # --------------------------------------------------------------- objects

    def _event_data(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            return
        if (
            self._model is not None
            and not (self._collect and any(k in payload for k in _TEXTY))
            and not any(k in payload for k in _INTERESTING)
        ):
            return
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return
        self._handle(obj)

    def _handle(self, obj: object) -> None:
        if isinstance(obj, list):
            for item in obj[:10_000]:
                self._handle_one(item)
        else:
            self._handle_one(obj)

    def _handle_one(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        kind = self._kind
        if kind is None:
            kind = _detect(obj)
            if kind is None:
                self._generic_error(obj)
                return
            self._kind = kind
        try:
            if kind == "openai":
                self._openai(obj)
            elif kind == "responses":
                self._responses(obj)
            elif kind == "anthropic":
                self._anthropic(obj)
            elif kind == "gemini":
                self._gemini(obj)
            else:
                self._ollama(obj)
        except (TypeError, AttributeError, ValueError, KeyError, IndexError):
            pass  # wrong types deep inside one object; the rest of the stream still counts

    def _set_model(self, model: object) -> None:
        if isinstance(model, str):
            cleaned = clean_model(model.removeprefix("models/"))
            if cleaned is not None:
                self._model = cleaned

    # ------------------------------------------------------------- normalise

    def _normalise(self) -> Usage:
        f = self._fields
        kind = self._kind
        inp, out = f.get("in"), f.get("out", 0)
        cached, write, reasoning = f.get("cached", 0), f.get("write", 0), f.get("reasoning", 0)
        missing = inp is None
        inp = inp or 0
        if kind == "anthropic":
            # Anthropic's input_tokens is only the uncached part; cache counts are on top
            inp = inp + cached + write
        elif kind == "gemini":
            inp += f.get("tool", 0)
            out += reasoning  # thoughtsTokenCount is billed as output but not in candidates
        elif kind in ("openai", "responses"):
            # Gemini's OpenAI-compatible endpoint leaves thoughts out of completion_tokens but
            # counts them in total_tokens: charge from the total when it is larger
            total = f.get("total")
            if total is not None and total > inp + out:
                reasoning = max(reasoning, total - inp - out)
                out = total - inp
        cached, write = min(cached, inp), min(write, inp)
        if inp > _MAX_COUNT or out > _MAX_COUNT:  # sums of valid counts can still overflow
            self._invalid = self._invalid or "sum over 2**53"
        return Usage(
            input_tokens=min(inp, _MAX_COUNT),
            output_tokens=min(out, _MAX_COUNT),
            cached_tokens=cached,
            cache_write_tokens=write,
            reasoning_tokens=min(reasoning, out),
            model=self._model,
            error=self._error,
            input_missing=missing and kind == "ollama",
        )
