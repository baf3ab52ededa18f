"""Generated corpora for the leaked-key scanner: fake keys, the hiding forms, minified bundles.

Used by bench/bench_scan.py and tests/test_scan.py. Nothing here is a real key: every key is made
at run time from a seeded generator in the provider's published shape (prefix, length, alphabet,
OpenAI's marker, Anthropic's ``AA`` tail, this library's checksum), so the repository holds no
string that looks like a key (which would also trip push protection).

- :func:`make_key` / :data:`RULES`: one fake key per rule.
- :data:`HIDINGS`: name -> (expected "how hidden" label, function key -> JS snippet).
- :func:`bundle`: realistic minified JavaScript of a given size, with snippets planted in it.
- :func:`lookalikes`: text full of things that look like keys and are not.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable, Iterator

from quota_middleware.identity._keyformat import _ALPHABET, _checksum

B64URL = string.ascii_letters + string.digits + "_-"
ALNUM = string.ascii_letters + string.digits
HEX = "0123456789abcdef"


def _s(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _openai(rng: random.Random, kind: str, n: int) -> str:
    return f"sk-{kind}-{_s(rng, B64URL, n)}T3BlbkFJ{_s(rng, B64URL, n)}"


def _own(rng: random.Random, prefix: str = "qm") -> str:
    body = f"{prefix}_{_s(rng, _ALPHABET, 12)}_{_s(rng, _ALPHABET, 32)}"
    return body + _checksum(body)


#: rule -> generator of one structurally valid fake key
RULES: dict[str, Callable[[random.Random], str]] = {
    "openai/project": lambda r: _openai(r, "proj", 74),
    "openai/service-account": lambda r: _openai(r, "svcacct", 74),
    "openai/admin": lambda r: _openai(r, "admin", 58),
    "openai/legacy": lambda r: f"sk-{_s(r, ALNUM, 20)}T3BlbkFJ{_s(r, ALNUM, 20)}",
    "anthropic/api": lambda r: f"sk-ant-api03-{_s(r, B64URL, 93)}AA",
    "anthropic/admin": lambda r: f"sk-ant-admin01-{_s(r, B64URL, 93)}AA",
    "google/api": lambda r: f"AIzaSy{_s(r, B64URL, 33)}",
    "azure/openai": lambda r: _s(r, HEX, 32),
    "groq/api": lambda r: f"gsk_{_s(r, ALNUM, 52)}",
    "openrouter/api": lambda r: f"sk-or-v1-{_s(r, HEX, 64)}",
    "xai/api": lambda r: f"xai-{_s(r, ALNUM, 80)}",
    "huggingface/token": lambda r: f"hf_{_s(r, string.ascii_letters, 34)}",
    "deepseek/api": lambda r: f"sk-{_s(r, HEX, 32)}",
    "mistral/api": lambda r: _s(r, ALNUM, 32),
    "quota-middleware/api-key": _own,
}


def make_key(rule: str, rng: random.Random) -> str:
    return RULES[rule](rng)


def context(rule: str, value: str) -> str:
    """``value`` (a key or an expression yielding it) where its provider's code would put it;
    the prefix-less keys (Azure, Mistral) need the name or endpoint that tells them apart."""
    if rule == "azure/openai":
        return (
            'fetch("https://contoso.openai.azure.com/openai/deployments/gpt4o/chat/completions",'
            '{method:"POST",headers:{"api-key":' + value + "}})"
        )
    if rule == "mistral/api":
        return "const mistralApiKey=" + value + ";"
    return "const apiKey=" + value + ";"


def _q(text: str) -> str:
    return '"' + text + '"'


def _pieces(key: str, rng: random.Random, n: int = 4) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(key)), n - 1))
    return [key[a:b] for a, b in zip([0, *cuts], [*cuts, len(key)], strict=True)]


def _b64(key: str) -> str:
    return base64.b64encode(key.encode()).decode()


#: name -> (the scanner's "how hidden" label, key -> JS expression or statement)
HIDINGS: dict[str, tuple[str, Callable[[str, random.Random], str]]] = {
    "plain": ("plain", lambda k, r: _q(k)),
    "atob": ("base64", lambda k, r: f"atob({_q(_b64(k))})"),
    "buffer": ("base64", lambda k, r: f'Buffer.from({_q(_b64(k))},"base64").toString()'),
    "base64 string": ("base64", lambda k, r: _q(_b64(k))),
    "buffer hex": ("hex", lambda k, r: f'Buffer.from({_q(k.encode().hex())},"hex").toString()'),
    "hex escapes": ("hex escapes", lambda k, r: _q("".join(f"\\x{ord(c):02x}" for c in k))),
    "unicode escapes": ("unicode escapes", lambda k, r: _q("".join(f"\\u{ord(c):04x}" for c in k))),
    "url-encoding": (
        "URL-encoding",
        lambda k, r: f"decodeURIComponent({_q(''.join(f'%{ord(c):02X}' for c in k))})",
    ),
    "fromCharCode": (
        "fromCharCode",
        lambda k, r: f"String.fromCharCode({','.join(str(ord(c)) for c in k)})",
    ),
    "reversed": ("reversed string", lambda k, r: f'{_q(k[::-1])}.split("").reverse().join("")'),
    "concatenation": ("concatenation", lambda k, r: "+".join(_q(p) for p in _pieces(k, r))),
    "joined array": (
        "joined array",
        lambda k, r: "[" + ",".join(_q(p) for p in _pieces(k, r)) + '].join("")',
    ),
    "base64 > concatenation": (
        "base64 > concatenation",
        lambda k, r: "atob(" + "+".join(_q(p) for p in _pieces(_b64(k), r, 3)) + ")",
    ),
}


# -- minified JavaScript --------------------------------------------------------------------------

_IDS = list("etnriosaulcfdphmgvyb") + ["_e", "$t", "Te", "Ne", "Qe", "Ze"]
_PROPS = (
    "length prototype createElement addEventListener querySelector className style push call "
    "apply then catch value children props state setState render exports default map filter "
    "reduce forEach indexOf slice concat toString join split replace test keys assign "
    "defineProperty current ref key type data error message status headers body json text url "
    "method getAttribute setAttribute innerHTML textContent useState useEffect memo jsx"
).split()
_WORDS = (
    "loading button modal header container active disabled primary secondary btn btn-primary "
    "sk-loading sk-spinner sk-circle task-list risk-high desk-top mask-image ask-me Submit "
    "Cancel OK application/json Content-Type GET POST Authorization Bearer width height auto "
    "none block flex center hidden visible #fff #1a2b3c rgba(0,0,0,.5) 100% 0 1px solid"
).split()


class _Js:
    """A small generator of code that looks like a production bundle: short identifiers, dense
    punctuation, string tables, numbers, regex literals with \\u escapes, JSON blobs, data URLs."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def ident(self) -> str:
        r = self.r
        return r.choice(_IDS) + (r.choice(_IDS) if r.random() < 0.3 else "")

    def expr(self) -> str:
        r, i = self.r, self.ident
        k = r.random()
        if k < 0.25:
            return f"{i()}.{r.choice(_PROPS)}({i()},{r.randint(0, 999)})"
        if k < 0.45:
            return _q(r.choice(_WORDS))
        if k < 0.6:
            return f"{i()}[{r.randint(0, 64)}]*{r.random():.3f}"
        if k < 0.7:
            return f"{i()}?{i()}:{_q(r.choice(_WORDS))}"
        if k < 0.8:
            return f"{_q(r.choice(_WORDS))}+{i()}+{_q(r.choice(_WORDS))}"
        if k < 0.9:
            return f"({i()}=>{i()}.{r.choice(_PROPS)})"
        return f"{i()}&&{i()}!=={i()}||{i()}%{r.randint(2, 64)}"

    def stmt(self, depth: int = 0) -> str:
        r, i, e = self.r, self.ident, self.expr
        k = r.random()
        if k < 0.2:
            return f"var {i()}={e()},{i()}={e()};"
        if k < 0.35:
            return f"{i()}.{r.choice(_PROPS)}={e()};"
        if k < 0.45 and depth < 3:
            body = "".join(self.stmt(depth + 1) for _ in range(r.randint(1, 4)))
            return f"function {i()}({i()},{i()}){{{body}return {e()}}}"
        if k < 0.55:
            return f"if({e()}){{{i()}({e()})}}else {i()}={e()};"
        if k < 0.63:
            return f"for(var {i()}=0;{i()}<{i()}.length;{i()}++){i()}.push({e()});"
        if k < 0.7:
            return (
                f"{i()}({{{i()}:{e()},className:{_q(r.choice(_WORDS) + ' ' + r.choice(_WORDS))}}});"
            )
        if k < 0.74:
            return f"{i()}=[{','.join(str(r.randint(0, 255)) for _ in range(r.randint(2, 12)))}];"
        if k < 0.77:
            return f"{i()}=/^[\\w\\u00a0-\\uffff-]+$/.test({i()});"
        if k < 0.8:
            return f'{i()}=[{e()},{e()}].join(",");'
        if k < 0.81:
            return f"{i()}={_q(self.uuid())};"
        if k < 0.815:
            return f"{i()}.integrity={_q(self.sri())};"
        if k < 0.818:
            return f"{i()}.src={_q(self.data_url(r.randint(200, 3000)))};"
        return f"return {e()};"

    def uuid(self) -> str:
        h = _s(self.r, HEX, 32)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def sri(self) -> str:
        return "sha384-" + base64.b64encode(self.r.randbytes(48)).decode()

    def data_url(self, n: int) -> str:
        return "data:image/png;base64," + base64.b64encode(self.r.randbytes(n)).decode()

    def chunk(self, size: int) -> str:
        out, n = [], 0
        while n < size:
            s = self.stmt()
            out.append(s)
            n += len(s)
        return "".join(out)


def bundle(size: int, plants: list[str], seed: int = 0) -> bytes:
    """``size`` bytes (about) of one-line minified JavaScript with each of ``plants`` inserted at
    evenly spread places, each as its own statement."""
    rng = random.Random(seed)
    js = _Js(rng)
    gap = size // (len(plants) + 1)
    parts = []
    for p in plants:
        parts.append(js.chunk(gap))
        parts.append(p if p.endswith((";", "}", ")")) else p + ";")
    parts.append(js.chunk(size - gap * len(plants)))
    return "".join(parts).encode()


def source_map(sources: dict[str, str]) -> bytes:
    """A source map whose ``sourcesContent`` holds ``sources`` (JSON-escaped, as bundlers write)."""
    names = list(sources)
    return json.dumps(
        {
            "version": 3,
            "file": "app.min.js",
            "sources": names,
            "sourcesContent": [sources[n] for n in names],
            "names": [],
            "mappings": "AAAA,SAASA,EAAE" * 50,
        }
    ).encode()


def lookalikes(seed: int = 0) -> Iterator[str]:
    """Lines full of strings a naive scanner reports and this one must not."""
    r = random.Random(seed)
    js = _Js(r)
    yield '<div class="sk-loading sk-spinner sk-fading-circle"></div>'
    yield 'const k="sk-...";const p="sk-proj-XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX";'
    yield 'OPENAI_API_KEY="sk-proj-' + "X" * 74 + "T3BlbkFJ" + "X" * 74 + '"'
    yield 'OPENAI_API_KEY="sk-your-key-here" ANTHROPIC_API_KEY="sk-ant-api03-..."'
    yield "key = 'sk-proj-" + "your_api_key_goes_here_" * 6 + "'"
    yield "hf_token = 'hf_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
    yield "def hf_requiredCharacteristicTypesForDisplayMetadata(): pass"
    yield "x.hf_generatedByHomeAppForDebuggingPur = 1"
    yield "GROQ_API_KEY=gsk_" + "x" * 52
    yield "AIzaSyXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
    yield 'const AIzaName="AIzaSy-your-google-api-key-here-000000"'
    yield "the risk-assessment, task-runner and desk-booking modules"
    for _ in range(20):
        yield f'<script src="/a.js" integrity="{js.sri()}" crossorigin="anonymous"></script>'
        yield f'{{"id":"{js.uuid()}","commit":"{_s(r, HEX, 40)}","etag":"{_s(r, HEX, 32)}"}}'
        yield f'<img src="{js.data_url(r.randint(100, 4000))}">'
        header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
        payload = base64.urlsafe_b64encode(json.dumps({"sub": js.uuid()}).encode()).decode()
        sig = base64.urlsafe_b64encode(r.randbytes(32)).decode().rstrip("=")
        yield f"Authorization: Bearer {header}.{payload.rstrip('=')}.{sig}"
        yield f"md5 {_s(r, HEX, 32)} sha1 {_s(r, HEX, 40)} sha256 {_s(r, HEX, 64)}"
        yield f"color:#{_s(r, HEX, 6)};background:url(data:image/svg+xml;base64,{_b64('<svg/>')})"
    # a 32-hex value that is not next to anything Azure, and an api_key that is not Azure's
    yield f'const cacheKey="{_s(r, HEX, 32)}";'
    yield f'sessionStorage.setItem("token","{_s(r, ALNUM, 32)}")'
    # a quota-middleware-shaped key whose checksum is wrong
    fake = _own(r)
    yield f'QM_KEY="{fake[:-6]}{"A" * 6 if not fake.endswith("AAAAAA") else "B" * 6}"'
    yield js.chunk(20000)
