"""The streaming scanner: bytes in, :class:`~._patterns.Finding` values out, no I/O.

Speed comes from doing almost nothing per byte. A handful of regex passes, each starting with one
literal *pivot* character that CPython's regex engine finds at memchr speed, look for cheap
anchors: a key prefix (``sk-``, ``AIza``, ``gsk_``...), the start of an escape run, ``%XX%XX%XX``,
``atob(``/``fromCharCode(``/``.join(`` (pivot ``(``), a ``+`` between two literals, the base64 and
hex forms of the prefixes, reversed prefixes, ``&#``, ``sourcesContent``, and the names and
endpoint next to which a prefix-less key (Azure, Mistral) may stand. Each anchor is confirmed by a
fixed-width look-behind or a look-ahead inside the same C loop, so ordinary code produces almost no
anchors at all; only then does Python look closer: the key's exact structure
(:mod:`._patterns`) or a decoder (:mod:`._decode`), whose output is scanned again, one level
deeper.

Streaming: :meth:`Scanner.feed` takes chunks of any size; anchors are processed up to a fixed
look-ahead before the end of what was fed, and a fixed look-back is kept, so a key (or a hidden
form of it) across a chunk boundary is found and memory stays bounded whatever the file's size or
its line lengths.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from quota_middleware.errors import InvalidArgument
from quota_middleware.identity._keyformat import check_prefix
from quota_middleware.leaks import _decode as d
from quota_middleware.leaks._patterns import (
    ALNUM32_RE,
    AZURE_ENDPOINT,
    AZURE_NAME_RE,
    HEX32_RE,
    MISTRAL_NAME_RE,
    PREFIX_RES,
    VALUE_GAP_RE,
    Finding,
    check,
    check_own,
    fingerprint,
    match_sk,
    own_key_re,
)

MAX_DEPTH = 4
#: How far past the last anchor processed a decoder may read, and how much is kept behind.
LOOKAHEAD = 2 * d.SPAN + 512
LOOKBACK = d.SPAN + 512
#: The same key found twice this close (a reversed literal seen both as reversed text and through
#: its ``.split("").reverse().join("")``) is one finding: the one with fewer hiding steps.
SAME_PLACE = 512
SOURCE_MAP = "source map"


# -- anchors ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Anchor:
    name: str  # handler and, after "/", its argument
    literal: bytes
    pivot: bytes  # the character of ``literal`` its pass searches for
    ahead: bytes = b""  # a regex that must follow the literal


# Measured on this machine class: one regex pass whose pattern starts with a single literal
# character costs about 0.5 ms per MB whatever follows, a little more for a common character;
# folding every anchor into one alternation costs more than the passes it replaces (the engine
# tries each branch at every candidate position). So anchors share a few pivot characters, each
# rare in minified code (k z _ x 2 Q Z G N K), and each anchor is confirmed by fixed look-behinds
# and look-aheads inside the same C loop.


def _compile(
    anchors: Sequence[_Anchor],
) -> list[tuple[re.Pattern[bytes], dict[str, tuple[str, int, int]]]]:
    """One regex per pivot character: ``X(?:(?<=preX)(?=post)(?P<gN>)|...)``; each match's
    ``lastgroup`` names the anchor, its start is the pivot; the anchor starts ``len(pre) - 1``
    before and is ``len(literal)`` long."""
    groups: dict[bytes, list[tuple[_Anchor, int]]] = {}
    for a in anchors:
        groups.setdefault(a.pivot, []).append((a, a.literal.index(a.pivot)))
    passes = []
    for char, members in groups.items():
        alts, names = [], {}
        for n, (a, i) in enumerate(members):
            pre, post = a.literal[: i + 1], a.literal[i + 1 :]
            behind = rb"(?<=%s)" % re.escape(pre) if len(pre) > 1 else b""
            ahead = re.escape(post) + a.ahead
            group = f"g{char[0]}_{n}"
            alts.append(
                behind + (rb"(?=%s)" % ahead if ahead else b"") + rb"(?P<%s>)" % group.encode()
            )
            names[group] = (a.name, i, len(a.literal))
        rx = re.compile(re.escape(char) + rb"(?:" + rb"|".join(alts) + rb")")
        passes.append((rx, names))
    return passes


def _b64_anchor(prefixes: Iterable[bytes], shift: int, pivot: bytes) -> _Anchor:
    """The anchor for the base64 of ``prefixes`` at one alignment: the characters that depend on
    the prefix alone. The prefixes' encodings share their first 3 characters; the rest is a
    look-ahead, so the sk- families cost one anchor per alignment."""
    first = -(-8 * shift // 6)
    parts = []
    for prefix in prefixes:
        enc = base64.b64encode(b"\0" * shift + prefix + b"\0\0\0")
        parts.append(enc[first : (8 * (shift + len(prefix))) // 6])
    head = parts[0][:3]
    assert all(x.startswith(head) for x in parts), parts
    tails = b"|".join(re.escape(x[3:]) for x in parts)
    return _Anchor(f"b64/{first}", head, pivot, b"(?:%s)" % tails)


_SK_FAMILY = (b"sk-proj-", b"sk-svcacct-", b"sk-admin-", b"sk-ant-", b"sk-or-v1-")
_ESC = rb"(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|u\{[0-9A-Fa-f]{1,6}\})"
_END = rb"(?![A-Za-z0-9_-])"
_MISTRAL_NAMES = (b"istral_api_key", b"istral_key", b"istral-api-key", b"istralApiKey",
                  b"istralKey", b"ISTRAL_API_KEY", b"ISTRAL_KEY")  # fmt: skip


def _anchors(own: Sequence[str]) -> list[_Anchor]:
    a = [
        # the prefixes in plain sight, each with the shortest run of its alphabet after it
        _Anchor("sk", b"sk-", b"k", rb"[A-Za-z0-9_-]{32}"),
        _Anchor("prefix/AIza", b"AIza", b"z", rb"[A-Za-z0-9_-]{35}"),
        _Anchor("prefix/gsk_", b"gsk_", b"_", rb"[A-Za-z0-9]{48}"),
        _Anchor("prefix/xai-", b"xai-", b"x", rb"[A-Za-z0-9]{80}"),
        _Anchor("prefix/hf_", b"hf_", b"_", rb"[A-Za-z]{34}"),
        # base64 of the prefixes at alignment 0 (a key encoded alone); the sk- families also at
        # the two shifted alignments a longer encoded text (a JSON config, "Bearer sk-...") puts
        # them at. A decoding call (atob(...)) decodes its whole argument, whatever the alignment.
        _b64_anchor([b"sk-"], 0, b"2"),  # c2st
        _b64_anchor([b"AIza"], 0, b"Q"),  # QUl6Y
        _b64_anchor([b"gsk_"], 0, b"Z"),  # Z3NrX
        _b64_anchor([b"xai-"], 0, b"G"),  # eGFpL
        _b64_anchor([b"hf_"], 0, b"G"),  # aGZf
        _b64_anchor(_SK_FAMILY, 1, b"N"),  # NrL...
        _b64_anchor(_SK_FAMILY, 2, b"z"),  # zay1...
        # hex of sk- (Buffer.from(..., "hex") is a decoding call, whatever the key)
        _Anchor("hex", b"736b2d", b"2"),
        _Anchor("hex", b"736B2D", b"2"),
        # keys written backwards end with the reversed prefix
        _Anchor("rev", b"-ks", b"k", _END),
        _Anchor("rev", b"aziA", b"z", _END),
        _Anchor("rev", b"_ksg", b"_", _END),
        _Anchor("rev", b"-iax", b"x", _END),
        _Anchor("rev", b"_fh", b"_", _END),
        # prefix-less keys: the names they stand next to (the endpoint is a plain find)
        _Anchor("azure-name", b"zure", b"z"),
        _Anchor("azure-name", b"ZURE", b"Z"),
        _Anchor("azure-name", b"api-key", b"k"),
        _Anchor("azure-name", b"Api-Key", b"K"),
        _Anchor("azure-name", b"API-KEY", b"K"),
        *(
            _Anchor("mistral-name", n, b"K" if b"K" in n else b"k" if b"k" in n else b"_")
            for n in _MISTRAL_NAMES
        ),
    ]
    for prefix in own:
        p = prefix.encode("ascii") + b"_"
        a.append(_Anchor(f"own/{prefix}", p, b"_", rb"[0-9A-Za-z]{12}_"))
        a.append(_Anchor("rev", p[::-1], b"_", _END))
        b64 = _b64_anchor([p], 0, b"")
        shared = [c for c in b64.literal if bytes((c,)) in _PIVOTS]
        pivot = bytes((shared[0],)) if shared else bytes((min(b64.literal, key=_rank),))
        a.append(_Anchor(b64.name, b64.literal, pivot, b64.ahead))
    return a


_PIVOTS = (b"k", b"z", b"_", b"x", b"2", b"Q", b"Z", b"G", b"N", b"K")
# Printable characters by how rarely they occur in minified JavaScript, rarest first (counted over
# two real minified bundles, an editor and an archiver, 470 KB): the pivot of an anchor that has
# none of the shared ones.
_RARITY = (
    b"~@%`^'#JQZ*X7Yq986KG4Vj\\35<UzHWB>NPD2FI?OM/TL_+xAkRE-C$|1!S[]yb0:wv{&};pmgf\"duc=hl(),"
    b"a.osrnite"
)


def _rank(c: int) -> int:
    r = _RARITY.find(bytes((c,)))
    return len(_RARITY) if r < 0 else r


#: Anchors that are not one literal, each a pass of its own on its own rare pivot.
_SYNTAX = [
    # three escapes in a row (one level: JS source; two: JS inside a JSON string)
    (re.compile(rb"\\(?:(?P<esc>%s(?:\\%s){2})|(?P<esc2>\\%s(?:\\\\%s){2}))" % ((_ESC,) * 4))),
    re.compile(rb"%(?P<pct>[0-9A-Fa-f]{2}%[0-9A-Fa-f]{2}%[0-9A-Fa-f]{2})"),
    re.compile(rb"#(?<=&#)(?P<ent>)(?=[xX]?[0-9A-Fa-f]{2})"),
    # a call whose argument may decode: the ( after atob, Buffer.from, .join, fromCharCode,
    # fromCodePoint, .apply, decodeURIComponent, unescape; the C loop checks the 4 characters
    # before it, Python the whole name (see _CALL_NAMES)
    re.compile(
        rb"\((?<=(?:atob|from|join|Code|oint|pply|nent|cape)\()"
        rb"(?:(?<=join\()(?=\"\"|''|``|\\\"\\\")|(?<!join\())(?P<call>)"
    ),
    # a + between two literals, possibly JSON-escaped (\"...\"+\"...\")
    re.compile(rb"\+(?:(?<=[\"'`]\+)|(?<=[\"'`] \+))(?P<concat>)(?=\s*\\?[\"'`])"),
]
#: (name before the "(", handler kind); only .join("") puts pieces of one key together, so joins
#: with a separator (most joins in a bundle) are dropped by the pass itself
_CALL_NAMES = (
    (b"atob", "call"),
    (b"Buffer.from", "call"),
    (b".join", "join"),
    (b"fromCharCode", "fcc"),
    (b"fromCodePoint", "fcc"),
    (b"fromCharCode.apply", "fcc"),
    (b"decodeURIComponent", "call"),
    (b"unescape", "call"),
)
_CALLS_BY_TAIL: dict[bytes, list[tuple[bytes, str]]] = {}
for _fn, _kind in sorted(_CALL_NAMES, key=lambda c: -len(c[0])):
    _CALLS_BY_TAIL.setdefault(_fn[-4:], []).append((_fn, f"{_kind}/{_fn.decode()}"))
_SOURCES = b'"sourcesContent"'
_SPLIT = b".split("
_FINDS = ((_SOURCES, "sources"), (AZURE_ENDPOINT, "azure-endpoint"))
_B64_VALUE_RE = re.compile(rb"[A-Za-z0-9+/]{40,64}={0,2}(?![A-Za-z0-9+/=])")
_LEFT_KEY = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_TAG_RE = re.compile(rb"<[A-Za-z][A-Za-z0-9-]*\s")
_ATTR_RE = re.compile(rb"""[\w:.-]+\s*=\s*["']?\Z""")


@dataclass(slots=True)
class _Hit:
    offset: int
    rule: str
    key: str
    steps: tuple[str, ...]


class _Engine:
    """The anchor passes and their handlers, compiled once per set of own-key prefixes."""

    def __init__(self, own_prefixes: Sequence[str]) -> None:
        self.own = {p: own_key_re(p) for p in own_prefixes}
        self.passes = _compile(_anchors(own_prefixes))

    # one buffer ----------------------------------------------------------------------------------

    def scan(
        self,
        buf: bytes,
        lo: int,
        hi: int,
        depth: int = 0,
        hints: frozenset[str] = frozenset(),
        zones: list[list[int]] | None = None,
        resume: int = 0,
    ) -> tuple[list[_Hit], int]:
        """Hits for anchors at ``[lo, hi)`` of ``buf`` (decoders may read around), and the offset
        up to which the buffer was consumed by a decoder. ``zones`` (top level only) collects the
        ``sourcesContent`` arrays seen, as ``[start, end]`` (end -1: still open)."""
        events: list[tuple[int, str, int]] = []
        end = min(len(buf), hi + 256)
        for rx, names in self.passes:
            for m in rx.finditer(buf, lo, end):
                at = m.start()
                if at >= hi:
                    break
                name, back, length = names[m.lastgroup or ""]
                events.append((at - back, name, at - back + length))
        for rx in _SYNTAX:
            for m in rx.finditer(buf, lo, end):
                at = m.start()
                if at >= hi:
                    break
                group = m.lastgroup or ""
                if group == "call":
                    for fn, name in _CALLS_BY_TAIL[buf[at - 4 : at]]:
                        if at >= len(fn) and buf.endswith(fn, 0, at):
                            events.append((at - len(fn), name, at + 1))
                            break
                    continue
                events.append((at - 1 if group == "ent" else at, group, m.end()))
        for needle, name in _FINDS:
            i = buf.find(needle, lo, hi)
            while i >= 0:
                events.append((i, name, i + len(needle)))
                i = buf.find(needle, i + 1, hi)
        hits: list[_Hit] = []
        if hints and depth:
            hits.extend(self._hinted(buf, hints))
        if not events:
            return hits, resume
        events.sort()
        for pos, name, at in events:
            if name.startswith(("azure", "mistral", "sources")):
                self._context(buf, pos, at, name, hits, zones)
                continue
            if pos < resume:
                continue
            found = self._handle(buf, pos, at, name, depth, hits, zones)
            if found > resume:
                resume = found
        return hits, resume

    def _handle(
        self,
        buf: bytes,
        pos: int,
        at: int,
        name: str,
        depth: int,
        hits: list[_Hit],
        zones: list[list[int]] | None,
    ) -> int:
        """Handle the anchor at ``[pos, at)``; returns how far it consumed the buffer (0:
        nothing)."""
        kind, _, arg = name.partition("/")
        if kind in ("sk", "prefix") or kind == "own":
            if pos > 0 and buf[pos - 1] in _LEFT_KEY and not (pos >= 3 and buf[pos - 3] == 0x25):
                return 0  # "task-...", "xhf_...": the prefix is the middle of a word
            got = self._raw(buf, pos, kind, arg)
            if got is None:
                return 0
            rule, key, end = got
            hits.append(_Hit(pos, rule, key, self._attribute(buf, pos)))
            return end
        region: d.Region | None
        if kind == "b64":
            region = d.base64_at(buf, pos - int(arg))
        elif kind == "hex":
            region = d.hex_at(buf, pos)
        elif kind == "rev":
            region = d.reversed_at(buf, at)
        elif kind == "esc":
            region = d.escapes(buf, pos)
        elif kind == "esc2":
            region = d.json_window(buf, pos)
        elif kind == "pct":
            region = d.percent(buf, pos)
        elif kind == "ent":
            region = d.entities(buf, pos)
        elif kind == "concat":
            left = d._skip_ws_back(buf, pos, max(0, pos - 8)) - 1
            if left > 0 and buf[left - 1] == d.BACKSLASH:
                region = d.json_window(buf, pos)
            else:
                region = d.concatenation(buf, pos)
        elif kind == "join":
            region = d.joined(buf, at - 1)
        elif kind == "fcc":
            region = d.from_char_code(buf, at - 1)
        elif kind == "call":
            region = d.decoding_call(buf, at - 1, arg.encode())
        else:  # pragma: no cover - every anchor has a handler
            return 0
        if region is None and kind in ("call", "join") and b'\\"' in buf[pos : at + 8]:
            region = d.json_window(buf, pos)  # atob(\"...\"): code inside a JSON string
        if region is None:
            return 0
        self._descend(buf, region, depth, hits, zones)
        return region.end

    def _raw(self, buf: bytes, pos: int, kind: str, arg: str) -> tuple[str, str, int] | None:
        if kind == "sk":
            return match_sk(buf, pos)
        if kind == "prefix":
            rule, rx = PREFIX_RES[arg.encode()]
            m = rx.match(buf, pos)
            if m is None:
                return None
            key = m.group().decode("ascii")
            return (rule, key, m.end()) if check(rule, key) else None
        m = self.own[arg].match(buf, pos)
        if m is None:
            return None
        key = m.group().decode("ascii")
        return ("quota-middleware/api-key", key, m.end()) if check_own(key, arg) else None

    @staticmethod
    def _attribute(buf: bytes, pos: int) -> tuple[str, ...]:
        """``("HTML attribute",)`` for a key that is an attribute's value in a tag."""
        before = buf[max(0, pos - 64) : pos]
        if not _ATTR_RE.search(before):
            return ()
        lt = buf.rfind(b"<", max(0, pos - 2048), pos)
        if lt < 0 or _TAG_RE.match(buf, lt) is None:
            return ()
        # still inside that tag: no > and none of the characters code has between (a < b; ...)
        inside = buf[lt:pos]
        return (
            () if any(c in inside for c in (b">", b";", b"{", b"}", b"(")) else ("HTML attribute",)
        )

    def _descend(
        self,
        buf: bytes,
        region: d.Region,
        depth: int,
        hits: list[_Hit],
        zones: list[list[int]] | None,
    ) -> None:
        if depth >= MAX_DEPTH or not region.data:
            return
        hints = self._hints_around(buf, region) if len(region.data) <= 256 else frozenset()
        inner, _ = self.scan(region.data, 0, len(region.data), depth + 1, hints)
        steps = region.steps
        if region.escaped:
            inside = zones is not None and any(_in_zone(z, region.anchor) for z in zones)
            steps = (SOURCE_MAP,) if inside else ("JSON escapes",)
        raw = buf[region.start : region.end] if region.escaped else b""
        for h in inner:
            at = region.start + d.json_offset(raw, h.offset) if region.escaped else region.start
            hits.append(_Hit(at, h.rule, h.key, h.steps + steps))

    @staticmethod
    def _hints_around(buf: bytes, region: d.Region) -> frozenset[str]:
        window = buf[max(0, region.start - 400) : region.end + 100]
        hints = set()
        if AZURE_ENDPOINT in window or AZURE_NAME_RE.search(window):
            hints.add("azure")
        if MISTRAL_NAME_RE.search(window):
            hints.add("mistral")
        return frozenset(hints)

    @staticmethod
    def _hinted(data: bytes, hints: frozenset[str]) -> list[_Hit]:
        """A decoded value that is, as a whole, a prefix-less key whose name or endpoint stood
        next to the encoded form (``"api-key": atob("...")``)."""
        value = data.strip().strip(b"\"'`")
        out = []
        if "azure" in hints and HEX32_RE.fullmatch(value):
            key = value.decode("ascii")
            if check("azure/openai", key):
                out.append(_Hit(0, "azure/openai", key, ()))
        if "mistral" in hints and ALNUM32_RE.fullmatch(value):
            key = value.decode("ascii")
            if check("mistral/api", key):
                out.append(_Hit(0, "mistral/api", key, ()))
        return out

    def _context(
        self,
        buf: bytes,
        pos: int,
        at: int,
        name: str,
        hits: list[_Hit],
        zones: list[list[int]] | None,
    ) -> None:
        if name == "sources":
            if zones is not None:
                zones.append([pos, close_sources(buf, pos)])
            return
        if name == "azure-endpoint":
            for hm in HEX32_RE.finditer(buf, max(0, pos - 400), min(len(buf), pos + 400)):
                if buf.startswith(_SPLIT, hm.end() + 1) or buf.startswith(_SPLIT, hm.end() + 2):
                    continue  # reversed: the join's decoder reads it
                key = hm.group(1).decode("ascii")
                if check("azure/openai", key):
                    hits.append(_Hit(hm.start(), "azure/openai", key, self._attribute(buf, pos)))
            return
        rx, value_rx, rule = (
            (AZURE_NAME_RE, HEX32_RE, "azure/openai")
            if name == "azure-name"
            else (MISTRAL_NAME_RE, ALNUM32_RE, "mistral/api")
        )
        m = rx.search(buf, max(0, pos - 8), min(len(buf), pos + 40))
        if m is None:
            return
        gap = VALUE_GAP_RE.match(buf, m.end(), min(len(buf), m.end() + 48))
        if gap is None:
            return
        v = value_rx.match(buf, gap.end())
        if v is not None:
            if buf.startswith(_SPLIT, v.end() + 1) or buf.startswith(_SPLIT, v.end() + 2):
                return  # "...".split("").reverse().join(""): the join's decoder reads it
            key = v.group(1).decode("ascii")
            if check(rule, key):
                hits.append(_Hit(v.start(), rule, key, self._attribute(buf, v.start())))
            return
        # the value base64-encoded in place ("api-key": "NmQ0...")
        b = _B64_VALUE_RE.match(buf, gap.end())
        decoded = d.b64decode_loose(b.group()) if b is not None else None
        if b is not None and decoded and value_rx.fullmatch(decoded):
            key = decoded.decode("ascii")
            if check(rule, key):
                hits.append(_Hit(b.start(), rule, key, ("base64",)))


def close_sources(buf: bytes, start: int) -> int:
    """Where the ``sourcesContent`` array opened at ``start`` ends (its ``"]``), or -1."""
    i = start + len(_SOURCES)
    while True:
        j = buf.find(b'"]', i)
        if j < 0:
            return -1
        if d._unescaped(buf, j, i):
            return j + 2
        i = j + 1


def _in_zone(zone: list[int], at: int) -> bool:
    return zone[0] <= at and (zone[1] < 0 or at < zone[1])


def _dedupe(hits: list[_Hit]) -> list[_Hit]:
    """One hit per key and place: of two hits of the same key within :data:`SAME_PLACE`, the
    one with fewer hiding steps (then the earlier) stays."""
    hits.sort(key=lambda h: (h.offset, len(h.steps)))
    kept: list[_Hit] = []
    last: dict[str, int] = {}
    for h in hits:
        i = last.get(h.key)
        if i is not None and h.offset - kept[i].offset < SAME_PLACE:
            if len(h.steps) < len(kept[i].steps):
                kept[i] = h
            continue
        last[h.key] = len(kept)
        kept.append(h)
    kept.sort(key=lambda h: h.offset)
    return kept


# -- streaming -------------------------------------------------------------------------------------

_ENGINES: dict[tuple[str, ...], _Engine] = {}


def _engine(prefixes: tuple[str, ...]) -> _Engine:
    e = _ENGINES.get(prefixes)
    if e is None:
        e = _ENGINES[prefixes] = _Engine(prefixes)
    return e


class Scanner:
    """Finds leaked keys in a stream of bytes fed in chunks of any size.

    ``feed`` returns the findings it is sure of so far, ``close`` the rest; together each key
    found once per place, in the stream's coordinates (byte offset, 1-based line and byte
    column). Memory is the chunk plus a fixed overlap, whatever the stream's size.

    :param own_prefixes: prefixes of this library's API keys to look for (checksum verified).
    :param extra_steps: hiding steps added to every finding (outermost), e.g. ``(".env file",)``.
    """

    def __init__(
        self, *, own_prefixes: Sequence[str] = ("qm",), extra_steps: tuple[str, ...] = ()
    ) -> None:
        for p in own_prefixes:
            try:
                check_prefix(p, "own_prefixes")
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
        self._engine = _engine(tuple(own_prefixes))
        self._extra = extra_steps
        self._buf = b""
        self._base = 0  # stream offset of _buf[0]
        self._done = 0  # stream offset up to which anchors were processed
        self._resume = 0  # stream offset up to which a decoder consumed
        self._lines = 0  # newlines before _base
        self._line_start = 0  # stream offset where the line holding _base starts
        self._open_zone = False  # inside a sourcesContent array that has not closed yet
        self._recent: dict[str, list[int]] = {}
        self._closed = False
        self._fed = 0

    @property
    def scanned(self) -> int:
        """Bytes fed so far."""
        return self._fed

    def feed(self, data: bytes) -> list[Finding]:
        if self._closed:
            raise InvalidArgument("Scanner.feed after close")
        self._buf += data
        self._fed += len(data)
        hi = len(self._buf) - LOOKAHEAD
        if hi <= self._done - self._base:
            return []
        return self._run(hi)

    def close(self) -> list[Finding]:
        """The findings in what is left; the scanner takes no more input."""
        if self._closed:
            return []
        out = self._run(len(self._buf))
        self._closed = True
        self._buf = b""
        return out

    def _run(self, hi: int) -> list[Finding]:
        buf, base = self._buf, self._base
        lo = self._done - base
        zones: list[list[int]] = []
        if self._open_zone:
            zones.append([lo, close_sources(buf, lo - len(_SOURCES))])
        hits, resume = self._engine.scan(
            buf, lo, hi, zones=zones, resume=max(0, self._resume - base)
        )
        self._resume = base + resume
        self._done = base + hi
        self._open_zone = bool(zones) and zones[-1][1] < 0
        out = self._findings([h for h in _dedupe(hits) if self._new(h)], zones)
        cut = max(0, hi - LOOKBACK)
        if cut:
            nl = buf.count(b"\n", 0, cut)
            if nl:
                self._lines += nl
                self._line_start = base + buf.rfind(b"\n", 0, cut) + 1
            self._buf = buf[cut:]
            self._base = base + cut
            self._forget(self._base - LOOKAHEAD)
        return out

    def _new(self, h: _Hit) -> bool:
        at = self._base + h.offset
        seen = self._recent.setdefault(fingerprint(h.key), [])
        if any(abs(at - s) < SAME_PLACE for s in seen):
            return False
        seen.append(at)
        return True

    def _forget(self, before: int) -> None:
        for fp in list(self._recent):
            kept = [s for s in self._recent[fp] if s >= before]
            if kept:
                self._recent[fp] = kept
            else:
                del self._recent[fp]

    def _findings(self, hits: list[_Hit], zones: list[list[int]]) -> list[Finding]:
        """Hits (sorted by offset) as findings: lines counted once over the buffer, not per hit."""
        buf, base = self._buf, self._base
        out = []
        line, line_start, counted = self._lines + 1, self._line_start, 0
        for h in hits:
            nl = buf.count(b"\n", counted, h.offset)
            if nl:
                line += nl
                line_start = base + buf.rfind(b"\n", counted, h.offset) + 1
            counted = max(counted, h.offset)
            steps = h.steps
            if (not steps or steps[-1] != SOURCE_MAP) and any(_in_zone(z, h.offset) for z in zones):
                steps = (*steps, SOURCE_MAP)
            at = base + h.offset
            out.append(Finding(at, line, at - line_start + 1, h.rule, h.key, steps + self._extra))
        return out


def scan_bytes(
    data: bytes, *, own_prefixes: Sequence[str] = ("qm",), extra_steps: tuple[str, ...] = ()
) -> list[Finding]:
    """Every finding in ``data`` (one buffer, no streaming)."""
    s = Scanner(own_prefixes=own_prefixes, extra_steps=extra_steps)
    return s.feed(data) + s.close()
