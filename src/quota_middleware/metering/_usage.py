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

from quota_middleware.metering._framing import (
    Document,
    Event,
    Framer,
    Payload,
    Salvage,
    salvage_text,
)
from quota_middleware.metering._providers import (
    _MAX_COUNT,
    HANDLERS,
    Accumulator,
    _Kind,
    clean_model,
    detect,
    kind_of,
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
    "openai-realtime",
    "auto",
]


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
    #: audio tokens (OpenAI Realtime): subsets of ``input_tokens``, ``cached_tokens`` and
    #: ``output_tokens``, priced at the model's audio prices
    audio_input_tokens: int = 0
    cached_audio_tokens: int = 0
    audio_output_tokens: int = 0
    #: the part of ``cache_write_tokens`` cached for an hour (Anthropic), at its own price
    cache_write_1h_tokens: int = 0
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


class UsageParser:
    """Reads usage from one response body, chunk by chunk.

    Framing comes from ``content_type``: ``text/event-stream`` is SSE, ``application/x-ndjson``
    and ``application/jsonl`` are NDJSON, anything else one JSON document (or a JSON array of
    chunks, as Gemini streams without ``alt=sse``). ``content_encoding`` gzip/deflate is
    decompressed for parsing only; an encoding we cannot decode (br, zstd) makes the parser give
    up quietly.

    Two peers do the work: a :class:`~quota_middleware.metering._framing.Framer` turns bytes into
    payloads, and the provider's handler (:data:`~quota_middleware.metering._providers.HANDLERS`)
    reads each decoded object into an
    :class:`~quota_middleware.metering._providers.Accumulator`. One chunk goes one way: framer,
    then handler, then the accumulator, read by :meth:`finish`.
    """

    __slots__ = ("_acc", "_framer", "_kind", "salvaged")

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
        self._kind: _Kind | None = kind_of(format)
        self._framer = Framer(
            content_type,
            content_encoding,
            max_buffer=max_buffer,
            max_decompressed=max_decompressed,
        )
        self._acc = Accumulator(max_text=max(int(max_buffer), 64), collect=collect_text)
        #: the body was not valid JSON; its text was salvaged for an estimate
        self.salvaged = False

    # ------------------------------------------------------------------ public

    @property
    def model(self) -> str | None:
        return self._acc.model

    @property
    def error(self) -> str | None:
        """Provider error seen in the body, even when no usage came with it."""
        return self._acc.error

    @property
    def complete(self) -> bool:
        """The provider's final usage was seen (a whole document's, a stream's last event)."""
        return self._acc.complete

    @property
    def invalid(self) -> str | None:
        """The first usage count that was not a valid count (``"prompt_tokens=-5"``), if any."""
        return self._acc.invalid

    @property
    def text_chars(self) -> int:
        """Generated characters seen, including any beyond the kept text."""
        return self._acc.text_chars

    @property
    def partial_output(self) -> int:
        """The output count reported so far (cumulative providers report it as they go),
        Gemini's thoughts included, as in the final usage."""
        fields = self._acc.fields
        out = fields.get("out", 0)
        return out + fields.get("reasoning", 0) if self._kind == "gemini" else out

    @property
    def at_boundary(self) -> bool:
        """No event, line or array element is half-received: bytes can be added to the body
        here without landing inside one (the hard stop's error event)."""
        return self._framer.at_boundary

    @property
    def framing(self) -> str:
        """``"sse"``, ``"ndjson"`` or ``"json"`` (a document, or a streamed JSON array)."""
        return self._framer.framing

    @property
    def json_array(self) -> bool:
        return self._framer.array is True

    @property
    def encoded(self) -> bool:
        """The body has a content encoding (gzip, deflate, or one we cannot read)."""
        return self._framer.zmode != "none" or (self._framer.dead and not self._acc.seen_usage)

    def text_pieces(self, start: int) -> list[str]:
        """The kept pieces of generated text from index ``start`` on (for incremental counts)."""
        return self._acc.text[start:]

    def output_text(self) -> str:
        """Generated text seen so far (bounded to ``max_buffer`` characters), for estimates."""
        return "".join(self._acc.text)

    def feed(self, chunk: bytes) -> None:
        payloads = self._framer.feed(chunk)
        if payloads:
            self._take(payloads)

    def finish(self) -> Usage | None:
        self._take(self._framer.finish())
        if not self._acc.seen_usage:
            return None
        return normalise(self._acc, self._kind)

    # --------------------------------------------------------------- payloads

    def _take(self, payloads: list[Payload]) -> None:
        acc = self._acc
        try:
            for p in payloads:
                if type(p) is Event:
                    if p.error:
                        acc.error = acc.error or "error"
                    self._event(p.data)
                elif type(p) is Document:
                    acc.whole = p.whole
                    self._handle(p.value)
                    acc.whole = False
                elif type(p) is Salvage and not acc.seen_usage and not acc.text_kept:
                    self.salvaged = True
                    for piece in salvage_text(p.doc):
                        acc.add_text(piece)
        except Exception:  # metering must never break the relayed response
            self._framer.dead = True

    def _event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            return
        if (
            self._acc.model is not None
            and not (self._acc.collect and any(k in payload for k in _TEXTY))
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
            kind = detect(obj)
            if kind is None:
                self._acc.generic_error(obj)
                return
            self._kind = kind
        try:
            HANDLERS[kind](self._acc, obj)
        except (TypeError, AttributeError, ValueError, KeyError, IndexError):
            pass  # wrong types deep inside one object; the rest of the stream still counts


def normalise(acc: Accumulator, kind: _Kind | None) -> Usage:
    """The accumulated raw counts as a :class:`Usage`, in each provider's billing semantics."""
    f = acc.fields
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
        acc.invalid = acc.invalid or "sum over 2**53"
    return Usage(
        input_tokens=min(inp, _MAX_COUNT),
        output_tokens=min(out, _MAX_COUNT),
        cached_tokens=cached,
        cache_write_tokens=write,
        reasoning_tokens=min(reasoning, out),
        audio_input_tokens=min(f.get("audio_in", 0), inp),
        cached_audio_tokens=min(f.get("cached_audio", 0), cached, f.get("audio_in", 0)),
        audio_output_tokens=min(f.get("audio_out", 0), out),
        cache_write_1h_tokens=min(f.get("write_1h", 0), write),
        model=acc.model,
        error=acc.error,
        input_missing=missing and kind == "ollama",
    )
