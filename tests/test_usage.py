"""Usage parsers: recorded provider streams fed at every split, garbage, caps, encodings."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ai_harness import AIHarness, chat, config
from quota_middleware.metering._usage import Format, Usage, UsageParser, clean_model

STREAMS = Path(__file__).parent / "data" / "streams"
SSE = "text/event-stream"
JSON = "application/json"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Case:
    format: Format
    content_type: str | None
    usage: Usage | None
    text: str
    error: str | None = None
    encoding: str | None = None


# Expected values computed by hand from the recordings and the provider rules (DESIGN §5).
CASES: dict[str, Case] = {
    "openai_chat.json": Case(
        "openai-chat",
        JSON,
        Usage(1486, 651, cached_tokens=1408, reasoning_tokens=512, model="gpt-5-2025-08-07"),
        "Bonjour, le monde !",
    ),
    # gzip of the same body: identical result
    "openai_chat.json.gz": Case(
        "openai-chat",
        "application/json; charset=utf-8",
        Usage(1486, 651, cached_tokens=1408, reasoning_tokens=512, model="gpt-5-2025-08-07"),
        "Bonjour, le monde !",
        encoding="gzip",
    ),
    # Azure-style metadata chunk first (empty model, choices: []), usage only in the last chunk
    "openai_chat_usage.sse": Case(
        "openai-chat", SSE, Usage(24, 58, model="gpt-4o-2024-08-06"), "Héllo wörld 🌍"
    ),
    "openai_chat_nousage.sse": Case("openai-chat", SSE, None, "The answer is 42."),
    "openai_chat_error.sse": Case(
        "openai-chat",
        SSE,
        None,
        "Partial answ",
        error="server_error: The server had an error while processing your request. "
        "Sorry about that!",
    ),
    "openai_completions.json": Case(
        "openai-completions",
        JSON,
        Usage(5, 7, model="gpt-3.5-turbo-instruct"),
        "\n\nThis is indeed a test",
    ),
    "openai_embeddings.json": Case(
        "openai-embeddings", JSON, Usage(8, 0, model="text-embedding-3-small"), ""
    ),
    "openai_responses.json": Case(
        "openai-responses",
        JSON,
        Usage(36, 87, reasoning_tokens=64, model="o4-mini-2025-04-16"),
        "In a peaceful grove beneath a silver moon...",
    ),
    "openai_responses.sse": Case(
        "openai-responses",
        "text/event-stream; charset=utf-8",
        Usage(2150, 9, cached_tokens=2048, model="gpt-4.1-mini-2025-04-14"),
        "Hi there! Ça va ?",
    ),
    "anthropic_message.json": Case(
        "anthropic-messages",
        JSON,
        Usage(2095, 503, model="claude-sonnet-4-5-20250929"),
        "Hi! My name is Claude.",
    ),
    # input = 12 uncached + 1024 cache read + 2048 cache write; output from message_delta (87),
    # not 1 + 87
    "anthropic_stream.sse": Case(
        "anthropic-messages",
        SSE,
        Usage(
            3084,
            87,
            cached_tokens=1024,
            cache_write_tokens=2048,
            model="claude-sonnet-4-5-20250929",
        ),
        "Let me think.Hello! Grüße.",
    ),
    "anthropic_error.sse": Case(
        "anthropic-messages",
        SSE,
        Usage(
            3084,
            1,
            cached_tokens=1024,
            cache_write_tokens=2048,
            model="claude-sonnet-4-5-20250929",
            error="overloaded_error: Overloaded",
        ),
        "Hello",
        error="overloaded_error: Overloaded",
    ),
    # output = candidates 120 + thoughts 300; cached is inside the prompt count
    "gemini.json": Case(
        "gemini",
        JSON,
        Usage(10240, 420, cached_tokens=8192, reasoning_tokens=300, model="gemini-2.5-pro"),
        "A cached answer.",
    ),
    # CRLF framing; last cumulative usageMetadata wins (44 + 186), the Vertex-style
    # {"trafficType"} chunk in the middle changes nothing
    "gemini_stream.sse": Case(
        "gemini",
        SSE,
        Usage(5, 230, reasoning_tokens=186, model="gemini-2.5-flash-preview-05-20"),
        "Here you go! **Italian:** Ciao — 你好",
    ),
    "gemini_array.json": Case(
        "gemini",
        JSON,
        Usage(5, 230, reasoning_tokens=186, model="gemini-2.5-flash-preview-05-20"),
        "Here you go! **Italian:** Ciao — 你好",
    ),
    "ollama_chat.ndjson": Case(
        "ollama", NDJSON, Usage(26, 282, model="llama3.2"), "The sky is blue."
    ),
    # prompt served from the KV cache: prompt_eval_count absent -> "unknown", not 0
    "ollama_generate_cached.ndjson": Case(
        "ollama", NDJSON, Usage(0, 290, model="llama3.2", input_missing=True), "Hi again"
    ),
}
NAMES = sorted(CASES)


def _data(name: str) -> bytes:
    return (STREAMS / name).read_bytes()


def _parse(case: Case, chunks: list[bytes], fmt: Format | None = None) -> UsageParser:
    p = UsageParser(
        fmt or case.format, content_type=case.content_type, content_encoding=case.encoding
    )
    for c in chunks:
        p.feed(c)
    return p


def _check(case: Case, p: UsageParser) -> None:
    assert p.finish() == case.usage
    assert p.output_text() == case.text
    assert p.error == case.error


@pytest.mark.parametrize("auto", [False, True], ids=["explicit", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_recorded_whole(name: str, auto: bool) -> None:
    case = CASES[name]
    _check(case, _parse(case, [_data(name)], "auto" if auto else None))


@pytest.mark.parametrize("name", NAMES)
def test_recorded_every_split(name: str) -> None:
    case, data = CASES[name], _data(name)
    for i in range(len(data) + 1):
        p = _parse(case, [data[:i], data[i:]])
        assert (p.finish(), p.output_text(), p.error) == (case.usage, case.text, case.error), i


@pytest.mark.parametrize("name", NAMES)
def test_recorded_byte_by_byte(name: str) -> None:
    case, data = CASES[name], _data(name)
    _check(case, _parse(case, [data[i : i + 1] for i in range(len(data))]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), cuts=st.lists(st.integers(0, 4000), max_size=30))
def test_recorded_random_chunkings(name: str, cuts: list[int]) -> None:
    case, data = CASES[name], _data(name)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    _check(case, _parse(case, chunks))


def test_cr_only_line_endings() -> None:
    case = CASES["openai_chat_usage.sse"]
    data = _data("openai_chat_usage.sse").replace(b"\n", b"\r")
    for i in range(len(data) + 1):
        assert _parse(case, [data[:i], data[i:]]).finish() == case.usage


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    # "\r" then "\n" in the next chunk must not make an extra blank line inside the event
    p = UsageParser("openai-chat", content_type=SSE)
    for part in (b'data: {"usage":\r', b'\ndata: {"prompt_tokens":3}}\r', b"\n\r\n"):
        p.feed(part)
    assert p.finish() == Usage(3, 0)


def test_multiline_data_and_comments() -> None:
    body = (
        b": keep-alive\n"
        b"event: message_delta\n"
        b'data: {"type":"message_delta",\n'
        b'data:  "usage":{"output_tokens":7}}\n'
        b"\n"
    )
    p = UsageParser("anthropic-messages", content_type=SSE)
    p.feed(body)
    assert p.finish() == Usage(0, 7)


def test_last_value_wins_never_sums() -> None:
    # vLLM continuous_usage_stats and repeated Anthropic message_delta are cumulative
    p = UsageParser("openai-chat", content_type=SSE)
    for n in range(1, 6):
        u = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
        p.feed(b"data: " + json.dumps({"choices": [], "usage": u}).encode() + b"\n\n")
    assert p.finish() == Usage(10, 5)
    p = UsageParser("anthropic-messages", content_type=SSE)
    start = {"type": "message_start", "message": {"model": "m", "usage": {"output_tokens": 1}}}
    p.feed(b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n")
    for out in (5, 9):
        ev = {"type": "message_delta", "usage": {"input_tokens": 40, "output_tokens": out}}
        p.feed(b"event: message_delta\ndata: " + json.dumps(ev).encode() + b"\n\n")
    assert p.finish() == Usage(40, 9, model="m")


def test_anthropic_input_arrives_in_message_delta_only() -> None:
    events = [
        {"type": "message_start", "message": {"model": "claude-x", "usage": {"output_tokens": 1}}},
        {"type": "message_delta", "usage": {"input_tokens": None, "output_tokens": 3}},
        {"type": "message_delta", "usage": {"input_tokens": 900, "cache_read_input_tokens": 100}},
    ]
    p = UsageParser("anthropic-messages", content_type=SSE)
    for ev in events:
        p.feed(b"data: " + json.dumps(ev).encode() + b"\n\n")
    assert p.finish() == Usage(1000, 3, cached_tokens=100, model="claude-x")


def test_gemini_openai_compat_total_larger_than_sum() -> None:
    body = {"model": "gemini-2.5-flash", "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                                   "total_tokens": 40}}  # fmt: skip
    p = UsageParser("openai-chat", content_type=JSON)
    p.feed(json.dumps(body).encode())
    assert p.finish() == Usage(10, 30, reasoning_tokens=25, model="gemini-2.5-flash")


@pytest.mark.parametrize("terminal", ["response.incomplete", "response.failed"])
def test_responses_terminal_events_carry_usage(terminal: str) -> None:
    resp = {"model": "gpt-5", "status": terminal.split(".")[1], "usage": {"input_tokens": 7,
            "output_tokens": 11, "total_tokens": 18}}  # fmt: skip
    if terminal == "response.failed":
        resp["error"] = {"code": "server_error", "message": "boom"}
    body = (
        b"event: error\n"
        b'data: {"type":"error","code":"server_error","message":"boom","param":null}\n\n'
        if terminal == "response.failed"
        else b""
    )
    body += (
        f"event: {terminal}\ndata: ".encode()
        + json.dumps({"type": terminal, "response": resp}).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    p = UsageParser("auto", content_type=SSE)
    p.feed(body)
    u = p.finish()
    assert u is not None and (u.input_tokens, u.output_tokens, u.model) == (7, 11, "gpt-5")
    assert u.error == ("server_error: boom" if terminal == "response.failed" else None)


def test_error_bodies() -> None:
    p = UsageParser("ollama", content_type=NDJSON)
    p.feed(b'{"model":"llama3.2","response":"a","done":false}\n{"error":"model crashed"}\n')
    assert p.finish() is None and p.error == "model crashed"
    p = UsageParser("auto", content_type=JSON)
    p.feed(b'{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}')
    assert p.finish() is None and p.error == "429: Quota exceeded"


def test_wrong_types_and_out_of_range_numbers() -> None:
    bodies = [
        b'{"object":"chat.completion","usage":"x"}',
        b'{"object":"chat.completion","usage":null}',
        b'{"object":"chat.completion","usage":{"prompt_tokens":"12","completion_tokens":true}}',
        b'{"object":"chat.completion","usage":[1,2]}',
        b'{"object":"chat.completion","choices":"nope","model":7}',
    ]
    for body in bodies:
        p = UsageParser("openai-chat", content_type=JSON)
        p.feed(body)
        assert p.finish() is None, body
    # string and boolean counts make the usage invalid, not zero
    p = UsageParser("openai-chat", content_type=JSON)
    p.feed(bodies[2])
    assert p.finish() is None and p.invalid == "prompt_tokens=12"
    # negative, infinite and oversized counts are invalid (never clamped into a free request
    # or an empty quota); the valid ones are still read
    p = UsageParser("openai-chat", content_type=JSON)
    p.feed(b'{"usage":{"prompt_tokens":-5,"completion_tokens":1e400,"total_tokens":3.0,'
           b'"prompt_tokens_details":{"cached_tokens":99999999999999999999999999}}}')  # fmt: skip
    u = p.finish()
    assert u is not None and p.invalid == "prompt_tokens=-5" and p.complete
    p = UsageParser("openai-chat", content_type=JSON)
    p.feed(b'{"usage":{"prompt_tokens":' + b"9" * 5000 + b',"completion_tokens":2}}')
    assert p.finish() is None  # int too long for Python's parser: dropped, not raised
    p = UsageParser("gemini", content_type=JSON)
    p.feed(b'{"usageMetadata":{"promptTokenCount":99999999999999999999,"thoughtsTokenCount":2.7}}')
    p.finish()
    assert p.invalid == "promptTokenCount=99999999999999999999"
    p = UsageParser("gemini", content_type=JSON)
    p.feed(b'{"usageMetadata":{"promptTokenCount":12.0,"candidatesTokenCount":3}}')
    u = p.finish()  # an integral float is a count
    assert u is not None and (u.input_tokens, u.output_tokens) == (12, 3) and p.invalid is None


def test_deep_nesting_does_not_raise() -> None:
    for ctype in (JSON, SSE, NDJSON):
        p = UsageParser("auto", content_type=ctype)
        p.feed(b"data: " * (ctype == SSE) + b"[" * 200_000 + b"\n\n")
        assert p.finish() is None


def test_overlong_line_is_dropped_and_parsing_resumes() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * 5000 + b'"}}]}\n\n'
    for chunk in (64, 1000, 10_000):
        p = UsageParser("openai-chat", content_type=SSE, max_buffer=1024)
        data = big + usage
        for i in range(0, len(data), chunk):
            p.feed(data[i : i + chunk])
        assert p.finish() == Usage(4, 2), chunk
        assert p.output_text() == ""
    # a huge multi-line event is dropped as a whole, the next one still counts
    p = UsageParser("openai-chat", content_type=SSE, max_buffer=1024)
    p.feed(b"data: [\n" * 400 + b"\n" + usage)
    assert p.finish() == Usage(4, 2)
    # NDJSON too
    p = UsageParser("ollama", content_type=NDJSON, max_buffer=1024)
    p.feed(b'{"response":"' + b"y" * 4000 + b'"}\n{"done":true,"eval_count":5}\n')
    assert p.finish() == Usage(0, 5, input_missing=True)


def test_json_document_over_cap_without_usage_in_tail() -> None:
    p = UsageParser("openai-chat", content_type=JSON, max_buffer=1024)
    p.feed(b'{"usage":{"prompt_tokens":1},"pad":"' + b"z" * 2000 + b'"}')
    assert p.finish() is None


def test_output_text_is_bounded_but_counted() -> None:
    p = UsageParser("openai-chat", content_type=SSE, max_buffer=100)
    for _ in range(50):
        p.feed(b'data: {"choices":[{"delta":{"content":"abcdefghij"}}]}\n\n')
    assert len(p.output_text()) == 100 and p.text_chars == 500
    q = UsageParser("openai-chat", content_type=SSE, collect_text=False)
    q.feed(_data("openai_chat_usage.sse"))
    assert q.output_text() == "" and q.finish() == CASES["openai_chat_usage.sse"].usage


def test_truncated_and_mislabelled_bodies() -> None:
    data = _data("openai_chat.json")
    p = UsageParser("openai-chat", content_type=JSON)
    p.feed(data[:-40])
    assert p.finish() is None
    # an SSE stream sent without a content type is still read
    case = CASES["anthropic_stream.sse"]
    p = UsageParser("anthropic-messages", content_type=None)
    p.feed(_data("anthropic_stream.sse"))
    assert p.finish() == case.usage
    p = UsageParser("ollama", content_type="application/json")
    p.feed(_data("ollama_chat.ndjson"))
    assert p.finish() == CASES["ollama_chat.ndjson"].usage


@pytest.mark.parametrize("wbits", [15, -15], ids=["zlib", "raw"])
def test_deflate(wbits: int) -> None:
    data = _data("gemini_stream.sse")
    comp = zlib.compressobj(wbits=wbits)
    body = comp.compress(data) + comp.flush()
    case = CASES["gemini_stream.sse"]
    for i in range(len(body) + 1):
        p = UsageParser("gemini", content_type=SSE, content_encoding="deflate")
        p.feed(body[:i])
        p.feed(body[i:])
        assert p.finish() == case.usage, i


def test_gzip_stream_members_and_trailing_junk() -> None:
    data = _data("openai_chat_usage.sse")
    half = len(data) // 2
    body = gzip.compress(data[:half]) + gzip.compress(data[half:]) + b"\x00junk"
    p = UsageParser("openai-chat", content_type=SSE, content_encoding="gzip")
    for i in range(0, len(body), 7):
        p.feed(body[i : i + 7])
    assert p.finish() == CASES["openai_chat_usage.sse"].usage


def test_undecodable_encodings_give_up_quietly() -> None:
    for enc in ("br", "zstd"):
        p = UsageParser("openai-chat", content_type=JSON, content_encoding=enc)
        p.feed(_data("openai_chat.json"))
        assert p.finish() is None
    p = UsageParser("openai-chat", content_type=JSON, content_encoding="gzip")
    p.feed(b"not gzip at all")
    assert p.finish() is None


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b"data: " + b"a" * (8 << 20))
    p = UsageParser(
        "openai-chat", content_type=SSE, content_encoding="gzip", max_decompressed=1 << 20
    )
    p.feed(bomb)
    assert p.finish() is None


CTYPES = [SSE, JSON, NDJSON, None, "text/plain"]
FORMATS: list[Format] = [
    "openai-chat", "openai-completions", "openai-responses", "openai-embeddings",
    "anthropic-messages", "gemini", "ollama", "auto",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=8),
    fmt=st.sampled_from(FORMATS),
    ctype=st.sampled_from(CTYPES),
    enc=st.sampled_from([None, "gzip", "deflate", "identity"]),
)
def test_garbage_never_raises(
    chunks: list[bytes], fmt: Format, ctype: str | None, enc: str | None
) -> None:
    p = UsageParser(fmt, content_type=ctype, content_encoding=enc, max_buffer=256)
    for c in chunks:
        p.feed(c)
    p.finish()
    p.output_text()


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.binary(max_size=8)), max_size=6),
    fmt=st.sampled_from(FORMATS),
)
def test_mutated_recordings_never_raise(
    name: str, edits: list[tuple[int, bytes]], fmt: Format
) -> None:
    case = CASES[name]
    data = bytearray(_data(name))
    for pos, junk in edits:
        pos %= len(data) + 1
        data[pos : pos + len(junk)] = junk
    p = UsageParser(fmt, content_type=case.content_type, content_encoding=case.encoding)
    p.feed(bytes(data))
    u = p.finish()
    assert u is None or min(u.input_tokens, u.output_tokens, u.cached_tokens) >= 0


def test_feed_cost_per_chunk() -> None:
    """Budget check (generous, the VM is noisy): a typical 100-300 byte SSE chunk."""
    data = _data("openai_chat_usage.sse")
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    n, best = 200, float("inf")
    for _ in range(5):
        p = UsageParser("openai-chat", content_type=SSE)
        t0 = time.perf_counter()
        for _ in range(n):
            for e in events[1:5]:  # the content deltas
                p.feed(e)
        best = min(best, (time.perf_counter() - t0) / (n * 4))
    assert best < 100e-6, f"{best * 1e6:.1f} µs per chunk"


@pytest.mark.parametrize(
    ("fmt", "doc", "expected"),
    [
        (
            "openai-embeddings",
            {"object": "list", "data": [{"embedding": [0.0123456789] * 4000}] * 8,
             "model": "text-embedding-3-small", "usage": {"prompt_tokens": 80, "total_tokens": 80}},
            Usage(80, 0, model="text-embedding-3-small"),
        ),
        (
            "auto",
            {"type": "message", "model": "claude-haiku-4-5", "content": [
                {"type": "text", "text": '"usage": {"input_tokens": 1} ' * 9000}],
             "usage": {"input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 5}},
            Usage(7, 5, cached_tokens=4),  # model is at the top, out of the kept tail
        ),
        (
            "auto",
            {"model": "nomic-embed-text", "embeddings": [[0.25] * 30000], "prompt_eval_count": 9},
            Usage(9, 0, input_missing=False),
        ),
    ],
)  # fmt: skip
def test_document_over_cap_reads_usage_from_its_tail(
    fmt: Format, doc: dict[str, object], expected: Usage
) -> None:
    data = json.dumps(doc).encode()
    assert len(data) > 1 << 17
    p = UsageParser(fmt, content_type=JSON, max_buffer=1 << 16)
    for i in range(0, len(data), 4096):
        p.feed(data[i : i + 4096])
    assert p.finish() == expected


def test_finish_is_idempotent() -> None:
    for name in NAMES:
        case = CASES[name]
        p = _parse(case, [_data(name)])
        assert p.finish() == p.finish() == case.usage


SURROGATE_BODY = (
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}], "x_prompt": 3}'
)


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
def test_unencodable_model_name_is_dropped_not_fatal(adapter: str, backend: Any) -> None:
    """A lone surrogate is valid JSON: it used to hang the whole Redis batch (ASGI) or escape to
    the server unsettled (WSGI)."""
    h = AIHarness(adapter, backend, config(unpriced="tokens-only"))
    try:
        r = h.post(SURROGATE_BODY)
        assert r.status == 200
        assert h.usage()["requests"] == 1  # charged, under the model "unknown"
        assert h.post(chat(x_prompt=5, x_completion=5)).status == 200
    finally:
        h.close()
    assert clean_model("\ud800") is None and clean_model("x" * 201) is None
    assert clean_model("gpt-4o") == "gpt-4o"
