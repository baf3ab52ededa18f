"""The byte side of usage parsing: decompression and framing, as a sans-IO reader.

:class:`Framer` turns the relayed body chunks into complete payloads, the way h11's readers
turn bytes into events: ``feed(chunk)`` and ``finish()`` return what became complete. A payload
is an :class:`Event` (the raw bytes of one SSE event's data or one NDJSON line), a
:class:`Document` (an object already decoded: a whole JSON body, an element of a streamed JSON
array, or what the tail of a document too big to keep whole says), or a :class:`Salvage` (a
body that is not valid JSON, whose text the parser may salvage for an estimate). The framer
knows nothing about providers; it never raises and keeps its memory under ``max_buffer``.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Document", "Event", "Framer", "Payload", "Salvage", "salvage_text"]


# Payloads are plain slotted dataclasses, not frozen ones: one is built per streamed event, and a
# frozen dataclass's __init__ is measurably slower on that path.
@dataclass(slots=True)
class Event:
    """One SSE event's data (its lines joined) or one NDJSON line, not yet decoded."""

    data: bytes
    #: an SSE ``event: error`` (Anthropic's and Responses' mid-stream error)
    error: bool = False


@dataclass(slots=True)
class Document:
    """A decoded JSON value: a whole body or one element of a streamed JSON array."""

    value: Any
    #: a whole (non-streamed) response document, or its tail: its usage is the final one
    whole: bool = False


@dataclass(slots=True)
class Salvage:
    """A body that is not valid JSON (cut off mid-way): salvage its text if nothing before it
    in the body counted."""

    doc: bytes


Payload = Event | Document | Salvage


class Framer:
    """Framing and decompression state of one response body."""

    def __init__(
        self,
        content_type: str | None,
        content_encoding: str | None = None,
        *,
        max_buffer: int = 1 << 20,
        max_decompressed: int = 1 << 28,
    ) -> None:
        self._max = max(int(max_buffer), 64)
        ctype = (content_type or "").split(";", 1)[0].strip().lower()
        self.framing: Literal["sse", "ndjson", "json"]
        if ctype == "text/event-stream":
            self.framing = "sse"
        elif ctype in ("application/x-ndjson", "application/jsonl", "application/ndjson"):
            self.framing = "ndjson"
        else:
            self.framing = "json"
        #: gave up: undecodable encoding, too much data, or an error while framing
        self.dead = False
        # decompression
        enc = (content_encoding or "").strip().lower()
        self.zmode: Literal["none", "gzip", "deflate"] = "none"
        self._z: Any = None
        self._zhead = b""  # first bytes of a deflate body, until we know zlib vs raw
        self._zleft = max(int(max_decompressed), 0)
        self._zdone = False
        if enc in ("gzip", "x-gzip"):
            self.zmode, self._z = "gzip", zlib.decompressobj(wbits=47)
        elif enc == "deflate":
            self.zmode = "deflate"
        elif enc not in ("", "identity"):
            self.dead = True
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
        self.array: bool | None = None  # None until the first non-blank byte is seen
        self._tail: deque[bytes] | None = None
        self._tail_len = 0
        self._out: list[Payload] = []

    @property
    def at_boundary(self) -> bool:
        """No event, line or array element is half-received."""
        if self.framing == "json":
            return not bytes(self._doc).strip(b" \t\r\n,")
        return not self._pending and not self._data and not self._skip_lf

    def feed(self, chunk: bytes) -> list[Payload]:
        """The payloads that ``chunk`` completes (none once the framer is dead)."""
        if self.dead or not chunk:
            return []
        try:
            if self.zmode != "none":
                self._inflate(bytes(chunk))
            else:
                self._frame(bytes(chunk))
        except Exception:  # metering must never break the relayed response
            self.dead = True
        return self._take()

    def finish(self) -> list[Payload]:
        """The payloads the end of the body completes (a last line, event or document)."""
        if not self.dead:
            try:
                self._flush()
            except Exception:
                self.dead = True
        return self._take()

    def _take(self) -> list[Payload]:
        out, self._out = self._out, []
        return out

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
                self.dead = True
                return
            if out:
                self._frame(out)
            if self._z.eof:
                rest = self._z.unused_data
                if self.zmode == "gzip" and rest[:2] == b"\x1f\x8b":
                    self._z = zlib.decompressobj(wbits=47)  # concatenated gzip members
                    data = rest
                else:
                    self._zdone = True
                    return

    # --------------------------------------------------------------- framing

    def _frame(self, data: bytes) -> None:
        if self.framing == "json":
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
        if self.framing == "ndjson":
            if line.strip():
                self._out.append(Event(line))
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
        # event: error is Anthropic's / Responses' mid-stream error; its JSON says what went wrong
        self._out.append(Event(payload, error=event == b"error"))

    def _feed_doc(self, data: bytes) -> None:
        if self.array is None:
            head = data.lstrip()
            if not head:
                return
            self.array = head[:1] == b"["
            data = head[1:] if self.array else head
        if self._tail is not None:
            self._keep_tail(data)
            return
        if len(self._doc) + len(data) > self._max:
            if self.array:
                self.dead = True  # one array element too big: give up quietly
                return
            # Too big to parse whole (e.g. a batch of embeddings). Usage and model sit at the
            # end of every provider's document, so keep only the last max_buffer bytes.
            self._tail = deque([bytes(self._doc)])
            self._tail_len = len(self._doc)
            self._doc = bytearray()
            self._keep_tail(data)
            return
        self._doc += data
        if self.array and b"}" in data:
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
        self._out.append(Document(obj, whole=True))  # the tail of a whole document

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
            self._out.append(Document(obj))
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
            self._out.append(Document(obj, whole=True))
            return
        head = doc.lstrip()[:5]
        if head in (b"data:", b"event") or b"\n{" in doc:
            # mislabelled stream (no or wrong content type): read it as SSE or NDJSON
            self.framing = "sse" if head in (b"data:", b"event") else "ndjson"
            self._frame(doc + b"\n\n")
        self._out.append(Salvage(doc))

    def _flush(self) -> None:
        if self.zmode == "deflate" and self._z is None and self._zhead:
            head, self._zhead = self._zhead, b""
            self._z = zlib.decompressobj(wbits=-15)
            self._inflate(head)
        if self.framing == "json":
            if self.array:
                self._drain_array()
            elif self._tail is not None:
                tail = b"".join(self._tail)
                self._parse_tail(tail)
                self._out.append(Salvage(tail))  # a big document cut short: what its tail says
            elif self._doc:
                doc = bytes(self._doc)
                self._doc = bytearray()
                self._whole_doc(doc)
            return
        if self._pending and not self._discard:
            line = bytes(self._pending)
            self._pending.clear()
            self._line(line)
        if self.framing == "sse":
            self._dispatch()  # a final event without its blank line still counts


def salvage_text(doc: bytes) -> list[str]:
    """The generated text of a document that is not valid JSON (cut off mid-way): the string
    values of the text-carrying keys, the last one possibly unterminated."""
    pieces: list[str] = []
    for m in _TEXT_VALUE.finditer(doc.decode("utf-8", "replace")):
        raw = m.group(1)
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            raw = raw[:-1]  # half an escape where the body was cut
        try:
            value = json.loads('"' + raw + '"')
        except ValueError:
            value = raw  # a cut "\u12" or the like: the raw characters are close enough
        pieces.append(value)
    return pieces


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
