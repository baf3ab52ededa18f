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
import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

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

# Counts go to Lua as integers; anything above 2**53 would lose precision there.
_MAX_COUNT = (1 << 53) - 1
_MAX_ERROR_CHARS = 500


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

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


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
# Cheap byte pre-checks: an event without any of these cannot change usage, error or model.
_INTERESTING = (b"usage", b"Usage", b'"error"', b"eval_count", b'"done"')
_TEXTY = (b'"content"', b'"text"', b'"delta"', b'"response"', b'"thinking"', b'"reasoning')


def _count(value: object) -> int | None:
    """A usage count from untrusted JSON: ints and integral floats, clamped to [0, 2**53)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return min(max(value, 0), _MAX_COUNT)
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return min(max(int(value), 0), _MAX_COUNT)
    return None


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


class UsageParser:
    """Reads usage from one response body, chunk by chunk.

    Framing comes from ``content_type``: ``text/event-stream`` is SSE, ``application/x-ndjson``
    and ``application/jsonl`` are NDJSON, anything else one JSON document (or a JSON array of
    chunks, as Gemini streams without ``alt=sse``). ``content_encoding`` gzip/deflate is
    decompressed for parsing only; an encoding we cannot decode (br, zstd) makes the parser give
    up quietly.
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
        ctype = (content_type or "").split(";", 1)[0].strip().lower()
        self._framing: Literal["sse", "ndjson", "json"]
        if ctype == "text/event-stream":
            self._framing = "sse"
        elif ctype in ("application/x-ndjson", "application/jsonl", "application/ndjson"):
            self._framing = "ndjson"
        else:
            self._framing = "json"
        self._dead = False  # gave up: undecodable encoding or too much data
        # decompression
        enc = (content_encoding or "").strip().lower()
        self._zmode: Literal["none", "gzip", "deflate"] = "none"
        self._z: Any = None
        self._zhead = b""  # first bytes of a deflate body, until we know zlib vs raw
        self._zleft = max(int(max_decompressed), 0)
        self._zdone = False
        if enc in ("gzip", "x-gzip"):
            self._zmode, self._z = "gzip", zlib.decompressobj(wbits=47)
        elif enc == "deflate":
            self._zmode = "deflate"
        elif enc not in ("", "identity"):
            self._dead = True
        # line framing
        self._pending = bytearray()
        self._discard = False  # inside an over-long line: drop bytes until the next newline
        self._skip_lf = False  # last chunk ended in CR; a leading LF belongs to that CRLF
        # SSE event being assembled
        self._data: list[bytes] = []
        self._data_len = 0
        self._event = b""
        # whole-document JSON (and JSON-array streaming)
        self._doc = bytearray()
        self._array: bool | None = None  # None until the first non-blank byte is seen
        self._tail: deque[bytes] | None = None
        self._tail_len = 0
        # results
        self._fields: dict[str, int] = {}
        self._seen_usage = False
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

    # ------------------------------------------------------------ decompress

    def _inflate(self, data: bytes) -> None:
        if self._zdone:
            return  # bytes after the end of the compressed stream are junk
        if self._z is None:
            # "deflate" is zlib-wrapped per RFC 9110, but some servers send raw deflate
            self._zhead += data
            if len(self._zhead) < 2:
                return
            cmf, flg = self._zhead[0], self._zhead[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
            self._z = zlib.decompressobj(wbits=15 if wrapped else -15)
            data, self._zhead = self._zhead, b""
        while data:
            # bounded steps so a small compressed chunk cannot balloon into one huge buffer
            out = self._z.decompress(data, 65536)
            data = self._z.unconsumed_tail
            self._zleft -= len(out)
            if self._zleft < 0:
                self._dead = True
                return
            if out:
                self._frame(out)
            if self._z.eof:
                rest = self._z.unused_data
                if self._zmode == "gzip" and rest[:2] == b"\x1f\x8b":
                    self._z = zlib.decompressobj(wbits=47)  # concatenated gzip members
                    data = rest
                else:
                    self._zdone = True
                    return

    # --------------------------------------------------------------- framing

    def _frame(self, data: bytes) -> None:
        if self._framing == "json":
            self._feed_doc(data)
            return
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            # CR, LF and CRLF all end a line; a CR at the very end may be half of a CRLF
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        nl = data.find(b"\n")
        if nl < 0:
            self._hold(data)
            return
        if self._discard:
            self._discard = False
        elif self._pending:
            if len(self._pending) + nl <= self._max:
                self._pending += data[:nl]
                self._line(bytes(self._pending))
            self._pending.clear()
        elif nl <= self._max:
            self._line(data[:nl])
        start = nl + 1
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if nl - start > self._max:
                start = nl + 1
                continue
            self._line(data[start:nl])
            start = nl + 1
        if start < len(data):
            self._hold(data[start:])

    def _hold(self, part: bytes) -> None:
        if self._discard:
            return
        if len(self._pending) + len(part) > self._max:
            self._pending.clear()
            self._discard = True
            return
        self._pending += part

    def _line(self, line: bytes) -> None:
        if self._framing == "ndjson":
            if line.strip():
                self._event_data(line)
            return
        if not line:
            self._dispatch()
            return
        if line[0] == 0x3A:  # ":" comment, e.g. OpenRouter keep-alives
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data_len += len(value) + 1
            if self._data_len > self._max:
                self._data.clear()
                self._data_len = self._max + 1  # stays oversized until the event ends
                return
            self._data.append(value)
        elif name == b"event":
            self._event = value

    def _dispatch(self) -> None:
        data, oversized = self._data, self._data_len > self._max
        self._data, self._data_len = [], 0
        event, self._event = self._event, b""
        if oversized or not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if event == b"error":
            # Anthropic's / Responses' mid-stream error; its JSON below says what went wrong
            self._error = self._error or "error"
        self._event_data(payload)

    def _feed_doc(self, data: bytes) -> None:
        if self._array is None:
            head = data.lstrip()
            if not head:
                return
            self._array = head[:1] == b"["
            data = head[1:] if self._array else head
        if self._tail is not None:
            self._keep_tail(data)
            return
        if len(self._doc) + len(data) > self._max:
            if self._array:
                self._dead = True  # one array element too big: give up quietly
                return
            # Too big to parse whole (e.g. a batch of embeddings). Usage and model sit at the
            # end of every provider's document, so keep only the last max_buffer bytes.
            self._tail = deque([bytes(self._doc)])
            self._tail_len = len(self._doc)
            self._doc = bytearray()
            self._keep_tail(data)
            return
        self._doc += data
        if self._array and b"}" in data:
            self._drain_array()

    def _keep_tail(self, data: bytes) -> None:
        assert self._tail is not None
        if len(data) > self._max:
            data = data[-self._max :]
        self._tail.append(data)
        self._tail_len += len(data)
        while self._tail_len - len(self._tail[0]) >= self._max:
            self._tail_len -= len(self._tail.popleft())

    def _parse_tail(self, tail: bytes) -> None:
        """Read the last ``"usage"``/``"usageMetadata"``, Ollama counts and model in ``tail``."""
        obj: dict[str, Any] = {}
        usage = None
        for match in _USAGE_KEY.finditer(tail):
            usage = match
        if usage is not None:
            try:
                value, _ = _DECODER.raw_decode(tail[usage.end() :].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                value = None
            obj[usage.group(1).decode()] = value
        for m in _COUNT_KEY.finditer(tail):
            obj[m.group(1).decode()] = int(m.group(2))
        if not obj:
            return
        for m in _MODEL_KEY.finditer(tail):
            obj[m.group(1).decode()] = m.group(2).decode("utf-8", "replace")
        self._handle_one(obj)

    def _drain_array(self) -> None:
        """Decode complete elements of a streamed JSON array (``[{…}\\r\\n,{…}]``)."""
        end = self._doc.rfind(b"}") + 1
        if not end:
            return
        # "}" is ASCII, so the prefix ends on a character boundary; surrogateescape round-trips
        # any invalid bytes so byte offsets can be recovered exactly
        text = bytes(self._doc[:end]).decode("utf-8", "surrogateescape")
        pos = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            try:
                obj, pos_end = _DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError):
                break  # incomplete element: wait for more bytes
            self._handle(obj)
            pos = pos_end
        if pos:
            del self._doc[: len(text[:pos].encode("utf-8", "surrogateescape"))]

    def _flush(self) -> None:
        if self._zmode == "deflate" and self._z is None and self._zhead:
            head, self._zhead = self._zhead, b""
            self._z = zlib.decompressobj(wbits=-15)
            self._inflate(head)
        if self._framing == "json":
            if self._array:
                self._drain_array()
            elif self._tail is not None:
                self._parse_tail(b"".join(self._tail))
            elif self._doc:
                doc = bytes(self._doc)
                self._doc = bytearray()
                try:
                    obj = json.loads(doc)
                except (ValueError, RecursionError):
                    # mislabelled stream (no or wrong content type): try it as SSE or NDJSON
                    self._framing = "sse" if doc.lstrip()[:5] in (b"data:", b"event") else "ndjson"
                    self._frame(doc + b"\n\n")
                else:
                    self._handle(obj)
            return
        if self._pending and not self._discard:
            line = bytes(self._pending)
            self._pending.clear()
            self._line(line)
        if self._framing == "sse":
            self._dispatch()  # a final event without its blank line still counts

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

    def _generic_error(self, obj: dict[str, Any]) -> bool:
        err = obj.get("error")
        if err:
            self._error = _error_text(err)
            return True
        if obj.get("type") == "error":
            self._error = _error_text(obj)
            return True
        return False

    def _set_model(self, model: object) -> None:
        if isinstance(model, str):
            cleaned = clean_model(model.removeprefix("models/"))
            if cleaned is not None:
                self._model = cleaned

    def _merge(self, usage: object, fields: tuple[tuple[str, str], ...]) -> None:
        """Later non-null values replace earlier ones: every provider reports cumulative counts."""
        if not isinstance(usage, dict):
            return
        for src, dst in fields:
            n = _count(usage.get(src))
            if n is not None:
                self._fields[dst] = n
                self._seen_usage = True

    def _merge_detail(self, usage: dict[str, Any], outer: str, inner: str, dst: str) -> None:
        detail = usage.get(outer)
        if isinstance(detail, dict):
            n = _count(detail.get(inner))
            if n is not None:
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
        if isinstance(usage, dict):
            self._merge(usage, _OPENAI_FIELDS)
            self._merge_detail(usage, "prompt_tokens_details", "cached_tokens", "cached")
            self._merge_detail(usage, "completion_tokens_details", "reasoning_tokens", "reasoning")
        if not self._collect:
            return
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            self._add_text(choice.get("text"))
            for key in ("delta", "message"):
                msg = choice.get(key)
                if isinstance(msg, dict):
                    self._add_text(msg.get("content"))
                    self._add_text(msg.get("reasoning_content"))
                    self._add_text(msg.get("reasoning"))
                    calls = msg.get("tool_calls")
                    if isinstance(calls, list):
                        for call in calls:
                            fn = call.get("function") if isinstance(call, dict) else None
                            if isinstance(fn, dict):
                                self._add_text(fn.get("arguments"))

    def _responses_usage(self, response: dict[str, Any]) -> None:
        self._set_model(response.get("model"))
        usage = response.get("usage")
        if isinstance(usage, dict):
            self._merge(usage, _RESPONSES_FIELDS)
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
            self._responses_usage(obj)
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
            self._responses_usage(response)
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
            self._merge(obj.get("usage"), _ANTHROPIC_FIELDS)
            return
        if t == "error" or "error" in obj:
            self._error = _error_text(obj.get("error"))
            return
        if t == "message" or t is None:  # non-streaming body (or its tail)
            self._set_model(obj.get("model"))
            self._merge(obj.get("usage"), _ANTHROPIC_FIELDS)
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
        self._merge(obj.get("usageMetadata"), _GEMINI_FIELDS)
        if not self._collect:
            return
        candidates = obj.get("candidates")
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
        self._merge(obj, _OLLAMA_FIELDS)
        if not self._collect:
            return
        self._add_text(obj.get("response"))
        self._add_text(obj.get("thinking"))
        msg = obj.get("message")
        if isinstance(msg, dict):
            self._add_text(msg.get("content"))
            self._add_text(msg.get("thinking"))

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


_DECODER = json.JSONDecoder()
# A key of the document itself, not text inside a string (where its quotes would be escaped).
_USAGE_KEY = re.compile(rb'"(usage|usageMetadata)"\s*:\s*')
_COUNT_KEY = re.compile(rb'"(prompt_eval_count|eval_count)"\s*:\s*(\d{1,16})[,}\s]')
_MODEL_KEY = re.compile(rb'"(model|modelVersion)"\s*:\s*"([^"\\]{1,200})"')
