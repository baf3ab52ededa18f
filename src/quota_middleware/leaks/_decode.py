"""Seeing through what people wrongly trust as hiding a key.

Each decoder is called at an anchor the scanner's cheap passes found (``atob(``, ``\\x73\\x6b``,
``"+"``, ...), reads a bounded window around it, and returns a :class:`Region`: where the hidden
text starts and ends in the scanned buffer, and what it decodes to. The scanner scans that decoded
text again (the same passes, one level deeper), so layers compose: base64 inside concatenated
literals inside a source map's ``sourcesContent`` is three regions, each found the same way.

All of it is pure: bytes in, bytes out, no I/O. Windows are bounded (:data:`SPAN`), so a decoder's
cost does not grow with the file, and a streaming scanner can keep a fixed overlap.

:func:`encoded_forms` is the other direction, for a guard that knows the keys it must not send:
the byte strings a given key takes when encoded the ways a response could carry it.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

#: How far a decoder reads from its anchor, each way. A key is at most ~170 bytes; its most
#: verbose hiding (``\\u0073`` per character, or ``String.fromCharCode``) about 6x that.
SPAN = 4096
BACKSLASH = 0x5C


@dataclass(frozen=True, slots=True)
class Region:
    """Decoded text found at ``[start, end)`` of the buffer.

    ``steps`` are the hiding steps this region undoes, innermost (applied to the key first)
    first. With ``escaped`` the data is ``buf[start:end]`` with JSON string escapes undone,
    character for character, so a finding inside maps back to its exact offset
    (:func:`json_offset`); otherwise a finding inside is reported at ``start``."""

    start: int
    end: int
    data: bytes
    steps: tuple[str, ...]
    escaped: bool = False
    anchor: int = -1  # where the anchor that found it was (JSON windows)


# -- string literals -------------------------------------------------------------------------------


def _unescaped(buf: bytes, i: int, lo: int) -> bool:
    """Whether ``buf[i]`` is preceded by an even number of backslashes (so not escaped)."""
    k = i
    while k > lo and buf[k - 1] == BACKSLASH:
        k -= 1
    return (i - k) % 2 == 0


def closing_quote(buf: bytes, start: int, quote: int, limit: int = SPAN) -> int:
    """The index of the unescaped ``quote`` that closes a literal whose text starts at ``start``,
    or -1 (none within ``limit``, or a newline first for ``'`` and ``"``)."""
    q = bytes((quote,))
    end = min(len(buf), start + limit)
    i = start
    while True:
        j = buf.find(q, i, end)
        if j < 0:
            return -1
        if _unescaped(buf, j, start):
            if quote != 0x60 and buf.find(b"\n", start, j) >= 0:
                return -1
            return j
        i = j + 1


def opening_quote(buf: bytes, close: int, quote: int, limit: int = SPAN) -> int:
    """The index of the quote that opens the literal closed at ``close``, or -1."""
    q = bytes((quote,))
    lo = max(0, close - limit)
    i = close
    while True:
        j = buf.rfind(q, lo, i)
        if j < 0:
            return -1
        if _unescaped(buf, j, lo):
            if quote != 0x60 and buf.find(b"\n", j, close) >= 0:
                return -1
            return j
        i = j


_JS_ESCAPE_RE = re.compile(
    rb"\\(?:x([0-9A-Fa-f]{2})|u\{([0-9A-Fa-f]{1,6})\}|u([0-9A-Fa-f]{4})|(\r\n|[\s\S]))"
)
_SIMPLE = {b"n": "\n", b"t": "\t", b"r": "\r", b"b": "\b", b"f": "\f", b"v": "\v", b"0": "\0"}


def _js_char(m: re.Match[bytes]) -> bytes:
    hexa = m.group(1) or m.group(2) or m.group(3)
    if hexa is not None:
        cp = int(hexa, 16)
        if cp > 0x10FFFF:
            return m.group()
        return chr(cp).encode("utf-8", "surrogatepass")
    other = m.group(4)
    if other in (b"\n", b"\r\n", b"\r"):
        return b""  # a line continuation
    return _SIMPLE.get(other, other.decode("latin-1")).encode("utf-8")


def js_unescape(raw: bytes) -> bytes:
    """A JavaScript string literal's text with its escapes undone (``\\x73``, ``\\u0073``,
    ``\\u{73}``, ``\\n``, ``\\"``, ...), as UTF-8."""
    if b"\\" not in raw:
        return raw
    return _JS_ESCAPE_RE.sub(_js_char, raw)


_JSON_ESCAPE_RE = re.compile(rb'\\(?:u([0-9A-Fa-f]{4})|(["\\/bfnrt]))')
_JSON_SIMPLE = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n",
                b"r": b"\r", b"t": b"\t"}  # fmt: skip


def _json_char(m: re.Match[bytes]) -> bytes:
    if m.group(1) is not None:
        return chr(int(m.group(1), 16)).encode("utf-8", "surrogatepass")
    return _JSON_SIMPLE[m.group(2)]


def json_unescape(raw: bytes) -> bytes:
    """Text inside a JSON string with its escapes undone (one level)."""
    return _JSON_ESCAPE_RE.sub(_json_char, raw) if b"\\" in raw else raw


def json_offset(raw: bytes, decoded_at: int) -> int:
    """The offset in ``raw`` of the byte at ``decoded_at`` in ``json_unescape(raw)``: each escape
    before it was longer in ``raw`` than what it decoded to."""
    shrink = 0
    for m in _JSON_ESCAPE_RE.finditer(raw):
        if m.start() - shrink >= decoded_at:
            break
        shrink += len(m.group()) - len(_json_char(m))
    return decoded_at + shrink


# -- the decoders, one per hiding form ------------------------------------------------------------

_WS = b" \t\r\n"


def _skip_ws(buf: bytes, i: int, end: int) -> int:
    while i < end and buf[i] in _WS:
        i += 1
    return i


def _skip_ws_back(buf: bytes, i: int, lo: int) -> int:
    """``i`` moved back over whitespace: ``buf[i-1]`` is then not whitespace."""
    while i > lo and buf[i - 1] in _WS:
        i -= 1
    return i


def literal_at(buf: bytes, i: int) -> tuple[int, int] | None:
    """(text start, closing quote index) of a string literal opening at ``buf[i]``."""
    if i >= len(buf) or buf[i] not in b"\"'`":
        return None
    close = closing_quote(buf, i + 1, buf[i])
    return None if close < 0 else (i + 1, close)


def _literal_chain(buf: bytes, i: int) -> tuple[list[bytes], int, int] | None:
    """Literals joined by ``+`` from ``buf[i]``: (raw texts, text start, end after the last)."""
    first = literal_at(buf, i)
    if first is None:
        return None
    pieces = [buf[first[0] : first[1]]]
    end = first[1] + 1
    limit = min(len(buf), i + SPAN)
    while True:
        j = _skip_ws(buf, end, limit)
        if j >= limit or buf[j] != 0x2B:  # +
            break
        nxt = literal_at(buf, _skip_ws(buf, j + 1, limit))
        if nxt is None:
            break
        pieces.append(buf[nxt[0] : nxt[1]])
        end = nxt[1] + 1
    return pieces, first[0], end


def concatenation(buf: bytes, plus: int) -> Region | None:
    """``"sk-pr" + "oj-..." + ...``: at a ``+`` between two literals, the whole chain joined."""
    left_close = _skip_ws_back(buf, plus, max(0, plus - 8)) - 1
    if left_close < 0 or buf[left_close] not in b"\"'`":
        return None
    start = left_close
    lo = max(0, plus - SPAN)
    # walk back over earlier "..." + links
    while True:
        open_ = opening_quote(buf, start, buf[start])
        if open_ < 0:
            return None
        prev = _skip_ws_back(buf, open_, lo)
        if prev - 1 > lo and buf[prev - 1] == 0x2B:
            before = _skip_ws_back(buf, prev - 1, lo) - 1
            if before > lo and buf[before] in b"\"'`":
                start = before
                continue
        first = open_
        break
    chain = _literal_chain(buf, first)
    if chain is None or len(chain[0]) < 2:
        return None
    pieces, text_start, end = chain
    return Region(text_start, end, b"".join(pieces), ("concatenation",))


def _array_pieces(buf: bytes, close: int) -> tuple[list[bytes], int] | None:
    """The literals of an array literal whose ``]`` is at ``close``: (raw texts, ``[`` index)."""
    open_ = buf.rfind(b"[", max(0, close - SPAN), close)
    if open_ < 0:
        return None
    pieces: list[bytes] = []
    i = _skip_ws(buf, open_ + 1, close)
    while i < close:
        lit = literal_at(buf, i)
        if lit is None or lit[1] >= close:
            return None
        pieces.append(buf[lit[0] : lit[1]])
        i = _skip_ws(buf, lit[1] + 1, close)
        if i < close:
            if buf[i] != 0x2C:  # ,
                return None
            i = _skip_ws(buf, i + 1, close)
    return (pieces, open_) if len(pieces) >= 2 else None


_SPLIT_EMPTY = (b'.split("")', b".split('')", b".split(``)")
_REVERSE = b".reverse()"


def joined(buf: bytes, paren: int) -> Region | None:
    """``[...].join("")``, ``[...].reverse().join("")`` and ``"...".split("").reverse().join("")``:
    at the ``(`` of ``.join(``."""
    # the separator: .join("") / .join('') / .join("-"); .join() joins with commas
    j = _skip_ws(buf, paren + 1, len(buf))
    if j < len(buf) and buf[j] == 0x29:  # )
        sep, end = b",", j + 1
    else:
        lit = literal_at(buf, j)
        if lit is None:
            return None
        sep = buf[lit[0] : lit[1]]
        end = _skip_ws(buf, lit[1] + 1, len(buf)) + 1
    head = paren - len(b".join")
    reverse = buf.endswith(_REVERSE, max(0, head - len(_REVERSE)), head)
    if reverse:
        head -= len(_REVERSE)
    for split in _SPLIT_EMPTY:
        if buf.endswith(split, max(0, head - len(split)), head):
            close = head - len(split) - 1
            if close < 0 or buf[close] not in b"\"'`":
                return None
            open_ = opening_quote(buf, close, buf[close])
            if open_ < 0:
                return None
            text = js_unescape(buf[open_ + 1 : close]).decode("utf-8", "replace")
            chars = text[::-1] if reverse else text
            steps = ("reversed string",) if reverse else ("split and joined",)
            return Region(open_ + 1, end, sep.join(c.encode() for c in chars), steps)
    close = head - 1
    if close < 0 or buf[close] != 0x5D:  # ]
        return None
    arr = _array_pieces(buf, close)
    if arr is None:
        return None
    pieces, open_ = arr
    if reverse:
        pieces.reverse()
    step = "joined array, reversed" if reverse else "joined array"
    return Region(open_, end, sep.join(pieces), (step,))


_ESCAPE_RUN_RE = re.compile(
    rb"(?:\\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|u\{[0-9A-Fa-f]{1,6}\})|[A-Za-z0-9_+/=.:-])+"
)
_KEY_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _back_over(buf: bytes, i: int, chars: frozenset[int], limit: int = 256) -> int:
    lo = max(0, i - limit)
    while i > lo and buf[i - 1] in chars:
        i -= 1
    return i


def escapes(buf: bytes, pos: int) -> Region | None:
    """``"\\x73\\x6b\\x2d..."``, ``"\\u0073..."``, ``"\\u{73}..."``: a run of escapes (and the
    plain key characters around them) undone."""
    start = _back_over(buf, pos, _KEY_CHARS)
    m = _ESCAPE_RUN_RE.match(buf, start, min(len(buf), pos + SPAN))
    if m is None:
        return None
    raw = m.group()
    step = "hex escapes" if b"\\x" in raw else "unicode escapes"
    if b"\\x" in raw and b"\\u" in raw:
        step = "hex and unicode escapes"
    return Region(start, m.end(), js_unescape(raw), (step,))


_PERCENT_RUN_RE = re.compile(rb"(?:%[0-9A-Fa-f]{2}|%u[0-9A-Fa-f]{4}|[A-Za-z0-9_.~-])+")
_PCT_U_RE = re.compile(rb"%u([0-9A-Fa-f]{4})")


def percent(buf: bytes, pos: int) -> Region | None:
    """``%73%6B%2D...``: URL-encoding (and ``escape()``'s ``%uXXXX``) undone."""
    start = _back_over(buf, pos, _KEY_CHARS)
    m = _PERCENT_RUN_RE.match(buf, start, min(len(buf), pos + SPAN))
    if m is None:
        return None
    raw = _PCT_U_RE.sub(lambda u: chr(int(u.group(1), 16)).encode("utf-8", "replace"), m.group())
    return Region(start, m.end(), unquote_to_bytes(raw), ("URL-encoding",))


_INT_RE = re.compile(rb"0[xX][0-9A-Fa-f]+|\d+")
_NUM_ARRAY_END = b"].map("


def _codes(text: bytes) -> bytes | None:
    out = []
    for m in _INT_RE.finditer(text):
        n = int(m.group(), 0)
        if n > 0x10FFFF:
            return None
        out.append(chr(n))
    if len(out) < 8:
        return None
    return "".join(out).encode("utf-8", "surrogatepass")


def from_char_code(buf: bytes, paren: int) -> Region | None:
    """``String.fromCharCode(115, 107, 45, ...)`` (also ``.apply(null, [...])`` and
    ``[115, ...].map(c => String.fromCharCode(c))``): at the call's ``(``."""
    close = buf.find(b")", paren, min(len(buf), paren + SPAN))
    if close < 0:
        return None
    args = buf[paren + 1 : close]
    data = _codes(args)
    if data is not None:
        start = buf.rfind(b"String", max(0, paren - 32), paren)
        return Region(start if start >= 0 else paren, close + 1, data, ("fromCharCode",))
    # [115, 107, ...].map(c => String.fromCharCode(c)): the numbers come before
    at = buf.rfind(_NUM_ARRAY_END, max(0, paren - 128), paren)
    if at < 0:
        return None
    open_ = buf.rfind(b"[", max(0, at - SPAN), at)
    if open_ < 0:
        return None
    data = _codes(buf[open_ + 1 : at])
    if data is None:
        return None
    return Region(open_, close + 1, data, ("fromCharCode",))


_B64_RUN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")
_B64_RUN_RE = re.compile(rb"[A-Za-z0-9+/_-]*={0,2}")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def b64decode_loose(text: bytes) -> bytes | None:
    """Standard or URL-safe base64, padding optional; ``None`` if it is not base64."""
    text = text.translate(_URLSAFE).rstrip(b"=")
    text = text[: len(text) - len(text) % 4] if len(text) % 4 == 1 else text
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def base64_at(buf: bytes, group: int) -> Region | None:
    """A base64 run whose 4-character group at ``group`` starts the encoding of a key prefix:
    decoded from there (and a little before, for context) up to :data:`SPAN` characters on."""
    if group < 0:
        return None
    run_start = _back_over(buf, group, _B64_RUN, 64)
    start = group - (group - run_start) // 4 * 4
    m = _B64_RUN_RE.match(buf, group, min(len(buf), group + SPAN))
    end = m.end() if m is not None else group
    data = b64decode_loose(buf[start:end])
    if not data:
        return None
    return Region(group, end, data, ("base64",))


_HEX_RUN_RE = re.compile(rb"(?:[0-9a-fA-F]{2})+")


def hex_at(buf: bytes, pos: int) -> Region | None:
    """A plain hex string (``736b2d70726f6a2d...``) that starts with a key prefix's hex."""
    m = _HEX_RUN_RE.match(buf, pos, min(len(buf), pos + SPAN))
    if m is None:
        return None
    return Region(pos, m.end(), binascii.unhexlify(m.group()), ("hex",))


def reversed_at(buf: bytes, end: int) -> Region | None:
    """A key written backwards (``...-jorp-ks``): the run of key characters ending at ``end``."""
    start = _back_over(buf, end, _KEY_CHARS, 300)
    if end - start < 20:
        return None
    return Region(start, end, buf[start:end][::-1], ("reversed string",))


_ENTITY_RUN_RE = re.compile(rb"(?:&#[xX][0-9A-Fa-f]{1,6};|&#\d{1,7};|[A-Za-z0-9_-])+")


def entities(buf: bytes, pos: int) -> Region | None:
    """``&#115;&#107;&#45;...`` (HTML character references, e.g. in an attribute)."""
    start = _back_over(buf, pos, _KEY_CHARS)
    m = _ENTITY_RUN_RE.match(buf, start, min(len(buf), pos + SPAN))
    if m is None:
        return None
    text = html.unescape(m.group().decode("ascii"))
    return Region(start, m.end(), text.encode("utf-8", "replace"), ("HTML entities",))


def _call_argument(buf: bytes, paren: int) -> tuple[list[bytes], int, int] | None:
    return _literal_chain(buf, _skip_ws(buf, paren + 1, min(len(buf), paren + 64)))


_ENCODING_ARG_RE = re.compile(rb"""\s*,\s*["'`](base64url|base64|hex)["'`]""")


def decoding_call(buf: bytes, paren: int, name: bytes) -> Region | None:
    """``atob("...")``, ``Buffer.from("...", "base64" | "hex")``, ``decodeURIComponent("...")``,
    ``unescape("...")``: the literal argument (or ``+``-joined literals) decoded."""
    chain = _call_argument(buf, paren)
    if chain is None:
        return None
    pieces, start, end = chain
    text = js_unescape(b"".join(pieces))
    if name == b"Buffer.from":
        m = _ENCODING_ARG_RE.match(buf, end)
        if m is None:
            return None
        how = m.group(1)
        end = m.end()
        if how == b"hex":
            try:
                data: bytes | None = binascii.unhexlify(text.strip())
            except (binascii.Error, ValueError):
                return None
            step = "hex"
        else:
            data, step = b64decode_loose(text.strip()), "base64"
    elif name == b"atob":
        data, step = b64decode_loose(text.strip()), "base64"
    else:
        raw = _PCT_U_RE.sub(lambda u: chr(int(u.group(1), 16)).encode("utf-8", "replace"), text)
        data, step = unquote_to_bytes(raw), "URL-encoding"
    if not data:
        return None
    raw = b"".join(pieces)
    escaped = ("hex escapes",) if b"\\x" in raw else ("unicode escapes",) if b"\\u" in raw else ()
    joined_ = ("concatenation",) if len(pieces) > 1 else ()
    return Region(start, end, data, (step, *escaped, *joined_))


def json_window(buf: bytes, pos: int) -> Region | None:
    """Code inside a JSON string (a source map's ``sourcesContent``, a bundled JSON module): the
    window around ``pos`` with one level of JSON escapes undone, cut where no escape is split."""
    start = max(0, pos - SPAN)
    while start > 0 and buf[start - 1] == BACKSLASH:
        start -= 1
    end = min(len(buf), pos + SPAN)
    while end < len(buf) and not _unescaped(buf, end, start):
        end += 1  # never end between a backslash and what it escapes
    raw = buf[start:end]
    return Region(start, end, json_unescape(raw), (), escaped=True, anchor=pos)


# -- the other direction: the forms a known key takes ----------------------------------------------


def encoded_forms(key: str) -> list[tuple[str, bytes]]:
    """(encoding, bytes) for a known key: raw, base64 at the three alignments (the part that does
    not depend on neighbouring bytes), URL-safe base64, hex (both cases), JSON/JS ``\\u`` and
    ``\\x`` escapes. What an egress guard searches a response body for."""
    raw = key.encode("utf-8")
    forms: list[tuple[str, bytes]] = [("raw", raw)]
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw + b"\0\0\0")
        first = -(-8 * shift // 6)
        last = (8 * (shift + len(raw))) // 6
        part = enc[first:last]
        forms.append((f"base64+{shift}", part))
        urlsafe = part.translate(bytes.maketrans(b"+/", b"-_"))
        if urlsafe != part:
            forms.append((f"base64url+{shift}", urlsafe))
    forms.append(("hex", raw.hex().encode()))
    forms.append(("HEX", raw.hex().upper().encode()))
    forms.append(("\\u escapes", "".join(f"\\u{b:04x}" for b in raw).encode()))
    forms.append(("\\x escapes", "".join(f"\\x{b:02x}" for b in raw).encode()))
    return forms
