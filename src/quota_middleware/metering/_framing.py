"""Byte-level half of :class:`~quota_middleware.usage.UsageParser`: decompression and framing.

Turns the relayed body chunks into complete payloads: SSE events, NDJSON lines, one JSON document
(or the elements of a streamed JSON array, or the tail of a document too big to keep whole). Each
payload goes to the parser's ``_event_data`` (SSE, NDJSON), ``_handle`` or ``_handle_one``.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from typing import Any, Literal

__all__ = ["Framing"]


class Framing:
    """Mixin holding the framing and decompression state of one response body."""

    # set by the parser
    _max: int
    _error: str | None
    _whole: bool
    _seen_usage: bool
    _text_kept: int

    def _init_framing(
        self, content_type: str | None, content_encoding: str | None, max_decompressed: int
    ) -> None:
        ctype = (content_type or "").split(";", 1)[0].strip().lower()
        self._framing: Literal["sse", "ndjson", "json"]
        if ctype == "text/event-stream":
            self._framing = "sse"
        elif ctype in ("application/x-ndjson", "application/jsonl", "application/ndjson"):
            self._framing = "ndjson"
        else:
            self._framing = "json"
        self._dead = False  # gave up: undecodable encoding or too much data
        #: the body was not valid JSON; its text was salvaged for an estimate
        self.salvaged = False
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

    # implemented by the parser: what to do with a complete payload

    def _event_data(self, payload: bytes) -> None:
        raise NotImplementedError

    def _handle(self, obj: object) -> None:
        raise NotImplementedError

    def _handle_one(self, obj: object) -> None:
        raise NotImplementedError

    def _add_text(self, text: object) -> None:
        raise NotImplementedError

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
        self._whole = True  # the tail of a whole document: its usage is the final one
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

    def _whole_doc(self, doc: bytes) -> None:
        """A whole non-streamed body: JSON, or JSON with invalid UTF-8 (decoded leniently: the
        usage in it is still the provider's), or a mislabelled stream, or a cut-off document
        whose text is salvaged for the estimate."""
        obj: Any = None
        for attempt in (doc, None):
            try:
                obj = json.loads(attempt if attempt is not None else doc.decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                continue
            self._whole = True
            self._handle(obj)
            self._whole = False
            return
        head = doc.lstrip()[:5]
        if head in (b"data:", b"event") or b"\n{" in doc:
            # mislabelled stream (no or wrong content type): read it as SSE or NDJSON
            self._framing = "sse" if head in (b"data:", b"event") else "ndjson"
            self._frame(doc + b"\n\n")
        if not self._seen_usage and not self._text_kept:
            self._salvage(doc)

    def _salvage(self, doc: bytes) -> None:
        """The generated text of a document that is not valid JSON (cut off mid-way): the
        string values of the text-carrying keys, the last one possibly unterminated."""
        self.salvaged = True
        text = doc.decode("utf-8", "replace")
        for m in _TEXT_VALUE.finditer(text):
            raw = m.group(1)
            if raw.endswith("\\") and not raw.endswith("\\\\"):
                raw = raw[:-1]  # half an escape where the body was cut
            try:
                value = json.loads('"' + raw + '"')
            except ValueError:
                value = raw  # a cut "\u12" or the like: the raw characters are close enough
            self._add_text(value)

    def _flush(self) -> None:
        if self._zmode == "deflate" and self._z is None and self._zhead:
            head, self._zhead = self._zhead, b""
            self._z = zlib.decompressobj(wbits=-15)
            self._inflate(head)
        if self._framing == "json":
            if self._array:
                self._drain_array()
            elif self._tail is not None:
                tail = b"".join(self._tail)
                self._parse_tail(tail)
                if not self._seen_usage:
                    self._salvage(tail)  # a big document cut short: what its tail says
            elif self._doc:
                doc = bytes(self._doc)
                self._doc = bytearray()
                self._whole_doc(doc)
            return
        if self._pending and not self._discard:
            line = bytes(self._pending)
            self._pending.clear()
            self._line(line)
        if self._framing == "sse":
            self._dispatch()  # a final event without its blank line still counts


_DECODER = json.JSONDecoder()
# String values that carry generated text, in any provider's body; the closing quote is optional
# (a cut-off body ends inside one)
_TEXT_VALUE = re.compile(
    r'"(?:content|text|thinking|arguments|response|refusal|reasoning_content|partial_json)"'
    r'\s*:\s*"((?:[^"\\]|\\.)*(?:\\)?)'
)
# A key of the document itself, not text inside a string (where its quotes would be escaped).
_USAGE_KEY = re.compile(rb'"(usage|usageMetadata)"\s*:\s*')
_COUNT_KEY = re.compile(rb'"(prompt_eval_count|eval_count)"\s*:\s*(\d{1,16})[,}\s]')
_MODEL_KEY = re.compile(rb'"(model|modelVersion)"\s*:\s*"([^"\\]{1,200})"')
