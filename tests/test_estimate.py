"""Offline tokenizer and request-body estimates."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quota_middleware.metering import _estimate as estimate
from quota_middleware.metering._estimate import (
    IMAGE_TOKENS,
    RequestEstimate,
    TokenizerUnavailable,
    count_tokens,
    detect_format,
    encoding_for_model,
    get_encoding,
    parse_request,
)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("network access attempted")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No sockets, an empty tiktoken cache, and encodings rebuilt from scratch."""
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    saved = dict(estimate._encodings)
    estimate._encodings.clear()
    yield
    assert list(tmp_path.iterdir()) == []  # nothing was cached or downloaded
    estimate._encodings.update(saved)


def _enc(text: str, name: str) -> list[int]:
    return list(get_encoding(name).encode_ordinary(text))


def test_offline_load_and_known_ids(offline: None) -> None:
    assert _enc("hello world", "cl100k_base") == [15339, 1917]
    assert _enc("hello world", "o200k_base") == [24912, 2375]
    assert count_tokens("hello world", "gpt-4") == 2
    assert count_tokens("hello world", "gpt-4o") == 2
    assert count_tokens("", "gpt-4o") == 0


def test_special_tokens_in_user_text_are_plain_text() -> None:
    n = count_tokens("a <|endoftext|> b", "gpt-4o")
    assert n > 3  # markup split into ordinary tokens, not one special token, and no ValueError


def test_encodings_are_shared_and_thread_safe(offline: None) -> None:
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(get_encoding("cl100k_base"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(g is got[0] for g in got)


def test_corrupt_vocabulary_is_refused_and_estimates_fall_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha, pat, special = estimate._SPECS["cl100k_base"]
    monkeypatch.setitem(estimate._SPECS, "cl100k_base", ("0" * 64, pat, special))
    monkeypatch.setattr(estimate, "_encodings", {})
    monkeypatch.setattr(estimate, "_failures", {})
    with pytest.raises(TokenizerUnavailable, match="sha256"):
        get_encoding("cl100k_base")
    with pytest.raises(TokenizerUnavailable):  # remembered, not retried on every request
        get_encoding("cl100k_base")
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x" * 400}]})
    est = parse_request("openai-chat", body.encode())
    assert est.estimated_from_bytes and est.prompt_tokens == -(-len(body) // 4)
    assert count_tokens("x" * 41, "gpt-4") == 11  # settle-time counting degrades, never raises
    with pytest.raises(TokenizerUnavailable):
        get_encoding("p50k_base")


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1-preview", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("openai/gpt-4", "cl100k_base"),
        ("claude-sonnet-4-5", "o200k_base"),
        ("gemini-2.5-pro", "o200k_base"),
        ("llama3.2", "o200k_base"),
        (None, "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str | None, name: str) -> None:
    assert encoding_for_model(model) == name


def _req(fmt: Any, body: Any, path: str = "") -> RequestEstimate:
    return parse_request(fmt, json.dumps(body).encode(), path=path)


def test_openai_chat() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "name": "bob", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9000}},
            ]},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "max_completion_tokens": 300,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    est = _req("openai-chat", body, "/v1/chat/completions")
    text = (
        count_tokens("You are terse.", "gpt-4o")
        + count_tokens("What is in this image?", "gpt-4o")
        + count_tokens("bob", "gpt-4o")
        + count_tokens(json.dumps(body["tools"], separators=(",", ":")), "gpt-4o")
    )
    assert est == RequestEstimate(
        model="gpt-4o",
        prompt_tokens=text + 2 * 4 + 1 + 3 + IMAGE_TOKENS,
        max_output_tokens=600,
        stream=True,
        include_usage=True,
        format="openai-chat",
        choices=2,  # n=2: the cap of 300 per choice is 600 in all
        opaque=True,  # an image, counted at a fixed size
    )
    # streaming without include_usage: the response will carry no usage
    body2 = {"model": "gpt-4", "messages": [{"role": "user", "content": "hello world"}],
             "stream": True, "max_tokens": 5}  # fmt: skip
    est = _req("auto", body2, "/v1/chat/completions")
    assert (est.prompt_tokens, est.max_output_tokens, est.stream, est.include_usage) == (
        2 + 4 + 3,
        5,
        True,
        False,
    )


def test_completions_and_embeddings() -> None:
    est = _req("openai-completions", {"model": "gpt-3.5-turbo-instruct", "prompt": ["hello world",
               "hello world"], "max_tokens": 16})  # fmt: skip
    assert (est.prompt_tokens, est.max_output_tokens, est.include_usage) == (4, 16, True)
    est = _req("openai-completions", {"model": "davinci-002", "prompt": [1, 2, 3]})
    assert est.prompt_tokens == 3
    est = _req("openai-embeddings", {"model": "text-embedding-3-small", "input": "hello world"})
    assert (est.prompt_tokens, est.max_output_tokens) == (2, 0)
    est = _req("auto", {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]]},
               "/v1/embeddings")  # fmt: skip
    assert (est.format, est.prompt_tokens) == ("openai-embeddings", 5)


def test_responses() -> None:
    body = {
        "model": "o4-mini",
        "instructions": "hello world",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello world"},
                                         {"type": "input_image", "image_url": "https://x/y.png"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "hello world"},
        ],
        "max_output_tokens": 1000,
        "stream": True,
    }  # fmt: skip
    est = _req("auto", body, "/v1/responses")
    assert est.format == "openai-responses"
    assert (est.prompt_tokens, est.max_output_tokens, est.stream, est.include_usage) == (
        3 * 2 + 2 * 4 + IMAGE_TOKENS,
        1000,
        True,
        True,
    )
    assert _req("openai-responses", {"model": "gpt-5", "input": "hello world"}).prompt_tokens == 2


def test_anthropic() -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "hello world", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                               "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                          "content": "hello world"},
                                         {"type": "image", "source": {"type": "base64",
                                                                      "data": "AAAA"}}]},
        ],
        "stream": True,
    }  # fmt: skip
    est = _req("auto", body, "/v1/messages")
    expected = 2 * 3 + count_tokens('{"a":1}', "claude") + 3 * 4 + 3 + IMAGE_TOKENS
    assert est == RequestEstimate("claude-sonnet-4-5", expected, 1024, True, True,
                                  "anthropic-messages", opaque=True)  # fmt: skip


def test_gemini_model_and_stream_from_path() -> None:
    body = {
        "systemInstruction": {"parts": [{"text": "hello world"}]},
        "contents": [{"role": "user", "parts": [{"text": "hello world"},
                                                 {"inlineData": {"mimeType": "image/png",
                                                                 "data": "AAAA"}}]}],
        "generationConfig": {"maxOutputTokens": 256},
    }  # fmt: skip
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    est = _req("auto", body, path)
    assert est == RequestEstimate(
        "gemini-2.5-flash",
        4 + 258,
        256,
        True,
        True,
        "gemini",
        opaque=True,  # an image
    )
    vertex = (
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro"
        ":generateContent"
    )
    est = _req("auto", body, vertex)
    assert (est.model, est.stream, est.format) == ("gemini-2.5-pro", False, "gemini")


def test_ollama() -> None:
    est = _req("auto", {"model": "llama3.2", "prompt": "hello world", "system": "hello world",
                        "options": {"num_predict": 64}}, "/api/generate")  # fmt: skip
    assert est == RequestEstimate("llama3.2", 4, 64, True, True, "ollama")
    est = _req("ollama", {"model": "llama3.2", "messages": [{"role": "user", "content":
               "hello world"}], "stream": False, "options": {"num_predict": -1}})  # fmt: skip
    assert (est.prompt_tokens, est.max_output_tokens, est.stream) == (2 + 4 + 3, None, False)


@pytest.mark.parametrize(
    ("path", "body", "fmt"),
    [
        ("/v1/chat/completions", None, "openai-chat"),
        ("/openai/deployments/x/chat/completions?api-version=2024-10-21", None, "openai-chat"),
        ("/v1/completions", None, "openai-completions"),
        ("/v1/responses", None, "openai-responses"),
        ("/v1/embeddings", None, "openai-embeddings"),
        ("/v1/messages", None, "anthropic-messages"),
        ("/v1beta/models/gemini-2.5-pro:generateContent", None, "gemini"),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", None, "gemini"),
        ("/api/generate", None, "ollama"),
        ("/api/chat", None, "ollama"),
        ("/proxy", {"contents": []}, "gemini"),
        ("/proxy", {"messages": [], "system": "s"}, "anthropic-messages"),
        ("/proxy", {"messages": []}, "openai-chat"),
        ("/proxy", {"model": "text-embedding-3-large", "input": "x"}, "openai-embeddings"),
        ("/proxy", {"model": "gpt-5", "input": "x"}, "openai-responses"),
        ("/proxy", {"prompt": "x"}, "openai-completions"),
        ("/proxy", {"prompt": "x", "options": {}}, "ollama"),
        ("/proxy", {"foo": 1}, "auto"),
        ("/proxy", None, "auto"),
    ],
)
def test_detect_format(path: str, body: object, fmt: str) -> None:
    assert detect_format(path, body) == fmt


def test_garbage_bodies_estimate_from_bytes() -> None:
    for body in (b"", b"not json", b"\xff\xfe\x00", b"[1,2,3]", b'"str"', b"[" * 100_000):
        est = parse_request("openai-chat", body)
        assert est.estimated_from_bytes and est.prompt_tokens == -(-len(body) // 4)
    # well-formed JSON with wrong types inside: counted as far as it makes sense, no exception
    est = _req("openai-chat", {"messages": "x", "max_tokens": "9", "stream": "yes"})
    assert (est.prompt_tokens, est.max_output_tokens, est.stream) == (0, None, False)
    est = _req("anthropic-messages", {"messages": [None, 5, {"content": [None, 7]}],
                                      "max_tokens": True})  # fmt: skip
    assert est.max_output_tokens is None and est.prompt_tokens == 3 * 4 + 3
    est = _req("auto", {"weird": ["hello world", {"deep": "hello world"}], "model": "gpt-4"})
    assert est.format == "auto" and est.prompt_tokens == 4


@settings(max_examples=200, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(
                st.sampled_from(["messages", "content", "input", "prompt", "parts", "contents",
                                 "system", "text", "type", "max_tokens", "options", "tools",
                                 "generationConfig", "stream_options", "n", "model"]),
                c, max_size=5),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    fmt=st.sampled_from(["openai-chat", "openai-completions", "openai-responses",
                         "openai-embeddings", "anthropic-messages", "gemini", "ollama", "auto"]),
)  # fmt: skip
def test_parse_request_never_raises(body: bytes, fmt: Any) -> None:
    est = parse_request(fmt, body, path="/x")
    assert est.prompt_tokens >= 0


def test_estimate_cost_per_kb() -> None:
    """Generous budget; the report quotes the measured figure."""
    prose = "The quick brown fox jumps over the lazy dog; naïve café, 你好, 42. " * 400
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prose}]})
    parse_request("openai-chat", body.encode())  # warm
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        parse_request("openai-chat", body.encode())
        best = min(best, time.perf_counter() - t0)
    per_kb = best / (len(body) / 1024)
    assert per_kb < 2e-3, f"{per_kb * 1e6:.0f} µs per KB"
