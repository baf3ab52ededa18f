"""Charge integrity through both adapters on every backend: an upstream's usage is input, not
truth. Negative, non-numeric, fractional, NaN and absurd counts, cut and undecodable bodies, and
streams that end before the provider's final usage are all charged from what was relayed,
flagged estimated with the reason, never free and never absurd. Each settled AI request yields
one Charge (hook and log line) under the request id the client sees."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

import bad_upstream
from ai_harness import AIHarness
from quota_middleware import AIRoute, Charge, Plan, QuotaConfig, TokenQuota
from quota_middleware.metering._estimate import count_tokens, parse_request

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
GEMINI = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
N = 400  # words relayed: ~800 tokens of text


def _config(**route: Any) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="p", limits=[TokenQuota(tokens=10_000_000, period="day", name="tpd")])],
        ai_routes=[
            AIRoute(path=CHAT, format="openai-chat", **route),
            AIRoute(path=MESSAGES, format="anthropic-messages", **route),
            AIRoute(path="/v1beta/models/*", format="gemini", **route),
        ],
    )


@pytest.fixture(params=["asgi", "wsgi"])
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def harness(adapter: str, backend: Any) -> Any:
    charges: list[Charge] = []
    h = AIHarness(adapter, backend, _config(), upstream=bad_upstream, on_settle=charges.append)
    h.charges = charges  # type: ignore[attr-defined]
    yield h
    h.close()


def _body(path: str, case: str, n: int = N, **extra: Any) -> dict[str, Any]:
    if path == MESSAGES:
        base: dict[str, Any] = {
            "model": "claude-sonnet-4-5", "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": "write words"}],
        }  # fmt: skip
    elif path == GEMINI:
        base = {"contents": [{"role": "user", "parts": [{"text": "write words"}]}]}
    else:
        base = {"model": "gpt-4o-mini", "max_tokens": 4000,
                "messages": [{"role": "user", "content": "write words"}]}  # fmt: skip
    return {**base, "x_case": case, "x_words": n, **extra}


def _prompt(path: str, body: dict[str, Any]) -> int:
    fmt = {CHAT: "openai-chat", MESSAGES: "anthropic-messages"}.get(path, "gemini")
    return parse_request(fmt, json.dumps(body).encode(), path=path).prompt_tokens  # type: ignore[arg-type]


def _text_tokens(n: int) -> int:
    return count_tokens(bad_upstream.text_of(n), "gpt-4o-mini")


@pytest.mark.parametrize(
    "case", ["negative", "string", "fraction", "nan", "huge_float", "huge_int"]
)
def test_invalid_or_absurd_usage_is_estimated_from_the_relayed_text(
    harness: Any, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = _body(CHAT, case)
    with caplog.at_level(logging.WARNING, logger="quota_middleware"):
        r = harness.post(body)
    assert r.status == 200 and r.json["choices"][0]["message"]["content"].startswith("w0 w1")
    usage = harness.usage()
    # never free (the negative case used to be charged 0/0), never absurd (1e30 used to empty
    # the quota): the prompt estimate and the tokens of the text actually relayed
    assert usage["input"] == _prompt(CHAT, body)
    assert usage["output"] == _text_tokens(N)
    assert usage["estimated"] == 1
    (charge,) = harness.charges
    assert charge.estimated and charge.reason == "usage_invalid"
    assert charge.output_tokens == _text_tokens(N) and 0 < charge.cost_micros < 10_000
    warning = [r.getMessage() for r in caplog.records if "usage_invalid" in r.getMessage()]
    assert warning and f"route={CHAT}" in warning[0] and "model=gpt-4o-mini" in warning[0]
    assert harness.mw.stats["usage_invalid"] == 1


def test_a_cut_off_json_body_is_charged_from_its_salvaged_text(harness: Any) -> None:
    body = _body(CHAT, "cut_json", n=2000)
    r = harness.post(body)
    assert r.status == 200
    usage = harness.usage()
    # half the body was relayed: about half of its ~4,000 tokens of text, not 0
    assert usage["estimated"] == 1 and usage["input"] == _prompt(CHAT, body)
    assert 0.4 * _text_tokens(2000) <= usage["output"] <= 0.6 * _text_tokens(2000)
    assert harness.charges[0].reason == "unparseable"


def test_invalid_utf8_in_a_json_body_still_charges_the_providers_usage(harness: Any) -> None:
    r = harness.post(_body(CHAT, "bad_utf8", n=2000))
    assert r.status == 200 and b"\xff" in r.raw  # relayed byte for byte
    usage = harness.usage()
    assert (usage["input"], usage["output"], usage["estimated"]) == (12, 2000, 0)


@pytest.mark.parametrize(
    ("path", "case"),
    [(MESSAGES, "cut"), (MESSAGES, "error_event"), (GEMINI, "cut"), (CHAT, "cut")],
)
def test_a_stream_without_its_final_usage_is_charged_the_larger_of_partial_and_estimate(
    harness: Any, path: str, case: str
) -> None:
    body = _body(path, case, stream=True, stream_options={"include_usage": True})
    r = harness.post(body, path=path)
    assert r.status == 200 and b"w398" in r.raw
    usage = harness.usage()
    # Anthropic's message_start says output_tokens: 1; Gemini's running count lags the text
    # (and its cut stream ends before the last word)
    assert usage["output"] >= _text_tokens(N - 1) > 400
    assert usage["input"] == (
        10 if path == GEMINI else 12 if path == MESSAGES else _prompt(path, body)
    )
    assert usage["estimated"] == 1
    assert harness.charges[0].reason == "incomplete"


@pytest.mark.parametrize("path", [MESSAGES, GEMINI, CHAT])
def test_a_complete_stream_is_charged_exactly(harness: Any, path: str) -> None:
    body = _body(path, "", stream=True, stream_options={"include_usage": True})
    assert harness.post(body, path=path).status == 200
    usage = harness.usage()
    expected_in = 10 if path == GEMINI else 12
    assert (usage["input"], usage["output"], usage["estimated"]) == (expected_in, N, 0)
    assert harness.charges[0].estimated is False and harness.charges[0].reason is None


def test_an_upstream_error_is_charged_nothing_and_counted_apart(harness: Any) -> None:
    r = harness.post(_body(CHAT, "status_500"))
    assert r.status == 500
    usage = harness.usage()
    assert usage["estimated"] == 0 and usage["errors"] == 1
    assert usage["input"] == usage["output"] == 0
    (charge,) = harness.charges
    assert charge.error and not charge.estimated and charge.cost_micros == 0


def test_request_id_comes_from_the_client_or_is_generated_and_is_echoed(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="quota_middleware.charges"):
        r = harness.post(_body(CHAT, "", 50), headers={"X-Request-Id": "req-abc.123"})
        generated = harness.post(_body(CHAT, "", 50))
        spoofed = harness.post(_body(CHAT, "", 50), headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] == "req-abc.123"
    assert generated.headers["x-request-id"] and generated.headers["x-request-id"] != "req-abc.123"
    assert spoofed.headers["x-request-id"] != "bad id\twith spaces"
    ids = [c.request_id for c in harness.charges]
    assert ids == [
        "req-abc.123",
        generated.headers["x-request-id"],
        spoofed.headers["x-request-id"],
    ]
    lines = [rec for rec in caplog.records if rec.name == "quota_middleware.charges"]
    assert len(lines) == 3
    text = lines[0].getMessage()
    for part in ("request_id=req-abc.123", "caller=192.0.2.10", f"route={CHAT}",
                 "provider=openai-chat", "model=gpt-4o-mini", "input_tokens=12",
                 "output_tokens=50", "estimated=False"):  # fmt: skip
        assert part in text, (part, text)
    assert lines[0].quota_charge["cost_micros"] == harness.charges[0].cost_micros  # type: ignore[attr-defined]


def test_a_repeated_client_request_id_does_not_skip_the_second_charge(harness: Any) -> None:
    for _ in range(2):
        harness.post(_body(CHAT, "", 50), headers={"X-Request-Id": "same"})
    assert harness.usage()["requests"] == 2 and harness.usage()["output"] == 100


def test_async_on_settle_hook_and_a_failing_hook(
    backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Charge] = []

    async def hook(charge: Charge) -> None:
        await asyncio.sleep(0)
        seen.append(charge)

    h = AIHarness("asgi", backend, _config(), upstream=bad_upstream, on_settle=hook)
    try:
        assert h.post(_body(CHAT, "", 50)).status == 200
        assert len(seen) == 1 and seen[0].output_tokens == 50
    finally:
        h.close()

    def broken(charge: Charge) -> None:
        raise RuntimeError("hook bug")

    for adapter in ("asgi", "wsgi"):
        h = AIHarness(adapter, backend, _config(), upstream=bad_upstream, on_settle=broken)
        try:
            with caplog.at_level(logging.ERROR, logger="quota_middleware"):
                assert h.post(_body(CHAT, ""), ip="192.0.2.77").status == 200
            assert any("on_settle hook failed" in r.getMessage() for r in caplog.records)
        finally:
            h.close()


def test_wsgi_refuses_a_coroutine_hook() -> None:
    from quota_middleware import WSGIQuotaMiddleware

    async def hook(charge: Charge) -> None: ...

    with pytest.raises(TypeError, match="plain function"):
        WSGIQuotaMiddleware(bad_upstream.wsgi_app, config=_config(), on_settle=hook)


def _uncapped(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "max_tokens"}


# -- the reservation as an upper bound: output cap written into the request, learned margins --
def test_the_reserved_output_cap_is_written_into_requests_without_one(
    adapter: str, backend: Any
) -> None:
    cfg = _config(write_output_cap=True, default_output_tokens=100, max_output_reserve=500)
    h = AIHarness(adapter, backend, cfg, upstream=bad_upstream)
    try:
        seen = json.loads(
            h.post(_uncapped(_body(CHAT, "echo"))).json["choices"][0]["message"]["content"]
        )
        assert seen["max_completion_tokens"] == 100 and seen["x_case"] == "echo"
        over = json.loads(
            h.post(_body(CHAT, "echo") | {"max_tokens": 9000}).json["choices"][0]["message"][
                "content"
            ]
        )
        assert over["max_tokens"] == 500  # the client's own field, brought down to the reserve
        under = json.loads(
            h.post(_body(CHAT, "echo") | {"max_tokens": 40}).json["choices"][0]["message"][
                "content"
            ]
        )
        assert under["max_tokens"] == 40 and "max_completion_tokens" not in under
        two = _uncapped(_body(CHAT, "echo")) | {"n": 2}
        reply = json.loads(h.post(two).json["choices"][0]["message"]["content"])
        assert reply["max_completion_tokens"] == 50  # the allowance covers both choices
    finally:
        h.close()


def test_input_margin_is_learned_from_settles_and_shared_through_the_store(
    adapter: str, backend: Any
) -> None:
    body = _body(CHAT, "", 5, stream=False)
    estimate = _prompt(CHAT, body)
    actual = estimate * 3 // 2  # the upstream's tokenizer counts 50 % more
    first = AIHarness(adapter, backend, _config(), upstream=bad_upstream)
    try:
        assert first.mw.engine.margins.factor("openai-chat", "gpt-4o-mini") == 1.0
        first.post(body | {"x_prompt": actual})
        learned = first.mw.engine.margins.factor("openai-chat", "gpt-4o-mini")
        assert learned == pytest.approx(actual / estimate, abs=0.002)
        # the next reservation carries the margin
        seen: list[Any] = []
        first.mw.on_settle = lambda charge: seen.append(charge)
        first.post(body | {"x_prompt": actual})
        assert first.mw.stats.get("estimated", 0) == 0
    finally:
        first.close()
    # another process (another middleware on the same store) reads it after its first settle
    second = AIHarness(adapter, backend, _config(), upstream=bad_upstream)
    try:
        second.post(body | {"x_prompt": actual}, ip="192.0.2.11")
        assert second.mw.engine.margins.factor("openai-chat", "gpt-4o-mini") == learned
        # a lower ratio seen later lowers the shared margin only slowly
        second.mw.engine.margins._next_sync = 0.0
        second.post(body | {"x_prompt": estimate}, ip="192.0.2.11")
        assert 1.3 < second.mw.engine.margins.factor("openai-chat", "gpt-4o-mini") <= learned
    finally:
        second.close()


def test_configured_margin_wins_and_is_bounded() -> None:
    with pytest.raises(Exception, match="input_margins"):
        QuotaConfig(plans=[Plan(name="p")], input_margins={"claude-*": 0.5})
    cfg = QuotaConfig(plans=[Plan(name="p")], input_margins={"claude-*": 1.3})
    from quota_middleware.core._engine import Engine

    engine = Engine(cfg)
    assert engine.margins.factor("anthropic-messages", "claude-sonnet-4-5") == 1.3
    engine.margins.observe("anthropic-messages", "claude-sonnet-4-5", 10, 19)
    assert engine.margins.factor("anthropic-messages", "claude-sonnet-4-5") == 1.3
    engine.margins.observe("openai-chat", "m", 10, 1000)  # absurd: capped
    assert engine.margins.factor("openai-chat", "m") == 2.0


# -- the hard stop -----------------------------------------------------------------------------
def _stop_config(tokens: int, **plan: Any) -> QuotaConfig:
    return QuotaConfig(
        plans=[Plan(name="p", hard_stop=True, **plan,
                    limits=[TokenQuota(tokens=tokens, period="day", name="tpd")])],
        ai_routes=[AIRoute(path=CHAT, format="openai-chat"),
                   AIRoute(path=MESSAGES, format="anthropic-messages"),
                   AIRoute(path="/v1beta/models/*", format="gemini")],
        learn_input_margins=False,
    )  # fmt: skip


@pytest.mark.parametrize("path", [CHAT, MESSAGES, GEMINI])
def test_hard_stop_ends_a_stream_that_ignores_max_tokens_when_the_quota_is_out(
    adapter: str, backend: Any, path: str
) -> None:
    quota = 600
    charges: list[Charge] = []
    h = AIHarness(adapter, backend, _stop_config(quota), upstream=bad_upstream,
                  on_settle=charges.append)  # fmt: skip
    try:
        body = _body(path, "", 2000, stream=True, max_tokens=50,
                     stream_options={"include_usage": True})  # fmt: skip
        r = h.post(body, path=path)
        assert r.status == 200
        assert b"w1999" not in r.raw  # ended long before the upstream was done
        tail = r.raw.rstrip()[-400:]
        if path == MESSAGES:
            assert b"event: error" in tail and b"rate_limit_error" in tail
        elif path == GEMINI:
            assert b"RESOURCE_EXHAUSTED" in tail
        else:
            assert b"insufficient_quota" in tail and tail.endswith(b"data: [DONE]")
        (charge,) = charges
        assert charge.stopped and charge.estimated and charge.reason == "hard_stop"
        usage = h.usage()
        # at most the chunk that crossed the quota (one word: ~2 tokens) over it, plus what
        # the provider counted of the prompt beyond our estimate (no margin learned here)
        prompt_error = max(0, usage["input"] - _prompt(path, body))
        assert quota - 10 <= usage["input"] + usage["output"] <= quota + prompt_error + 4
        assert h.mw.stats["hard_stops"] == 1
        # the next request is refused: the quota is spent (413 where the request's whole
        # reservation is more than the quota: Gemini's request sets no cap we read)
        assert h.post(body, path=path).status == (413 if path == GEMINI else 429)
    finally:
        h.close()


def test_hard_stop_grows_the_reservation_while_the_quota_has_room(
    adapter: str, backend: Any
) -> None:
    h = AIHarness(adapter, backend, _stop_config(1_000_000), upstream=bad_upstream)
    try:
        body = _body(CHAT, "", 2000, stream=True, max_tokens=50,
                     stream_options={"include_usage": True})  # fmt: skip
        r = h.post(body)
        assert r.status == 200 and b"w1999" in r.raw and b"insufficient_quota" not in r.raw
        usage = h.usage()
        # exact, not estimated; every extension was given back against the actual usage
        assert (usage["input"], usage["output"], usage["estimated"]) == (12, 2000, 0)
        (left,) = h.reader.remaining("192.0.2.10")
        assert left.used == 2012  # no reservation left behind
    finally:
        h.close()


def test_without_hard_stop_an_upstream_that_ignores_max_tokens_is_charged_in_full(
    adapter: str, backend: Any
) -> None:
    cfg = _stop_config(600)
    cfg = QuotaConfig(plans=[Plan(name="p", limits=cfg.plans[0].limits)],
                      ai_routes=cfg.ai_routes)  # fmt: skip
    h = AIHarness(adapter, backend, cfg, upstream=bad_upstream)
    try:
        body = _body(CHAT, "", 2000, stream=True, max_tokens=50,
                     stream_options={"include_usage": True})  # fmt: skip
        r = h.post(body)
        assert b"w1999" in r.raw
        assert h.usage()["output"] == 2000  # charged what it used: the quota is overspent
    finally:
        h.close()


# -- the settle buffer: no charge lost while the store is down ---------------------------------
class _Flaky:
    """A memory backend that fails every call while ``down`` (as an unreachable Redis)."""

    def __init__(self) -> None:
        from quota_middleware.backends.memory import MemoryBackend

        self.inner = MemoryBackend()
        self.down = False

    def run(self, call: Any) -> Any:
        from quota_middleware.errors import StorageError

        if self.down:
            raise StorageError("redis down (test)")
        return self.inner.run(call)

    async def run_async(self, call: Any) -> Any:
        return self.run(call)

    def close(self) -> None: ...

    async def aclose(self) -> None: ...

    # the AIHarness backend-factory surface
    def sync(self) -> _Flaky:
        return self

    def async_(self) -> _Flaky:
        return self


@pytest.mark.parametrize("kind", ["fail-open", "down-at-settle"])
def test_settles_the_store_missed_are_applied_once_it_answers(adapter: str, kind: str) -> None:
    store = _Flaky()
    h = AIHarness(adapter, store, _config(), upstream=bad_upstream)
    engine = h.mw.engine
    try:
        body = _body(CHAT, "", 20)
        if kind == "fail-open":
            store.down = True  # admitted without the store: nothing reserved
            for _ in range(3):
                assert h.post(body).status == 200
        else:
            # admitted with reservations; the store goes away before the settle
            original = engine.finish

            def finish(decision: Any, meter: Any) -> Any:
                store.down = True
                return original(decision, meter)

            engine.finish = finish
            for _ in range(3):
                store.down = False
                assert h.post(body).status == 200
            engine.finish = original
        assert len(engine.settle_buffer) == 3 and h.mw.stats["settle_buffered"] == 3
        kept = engine.settle_buffer._items[0]
        store.down = False
        assert h.post(body).status == 200  # its settle succeeds, then the buffer is drained
        assert len(engine.settle_buffer) == 0 and h.mw.stats["settle_replayed"] == 3
        usage = h.usage()
        assert (usage["requests"], usage["input"], usage["output"]) == (4, 48, 80)
        (left,) = h.reader.remaining("192.0.2.10")
        assert left.used == 4 * 32  # every quota charged, no reservation left behind
        # exactly once: the same settle replayed again (its reply was "lost") changes nothing
        engine.settle_buffer.push(*kept)
        assert h.post(body).status == 200
        assert h.usage()["requests"] == 5 and h.reader.remaining("192.0.2.10")[0].used == 5 * 32
    finally:
        h.close()


def test_the_settle_buffer_is_bounded_and_counts_what_it_drops() -> None:
    from quota_middleware import StorageConfig

    store = _Flaky()
    cfg = QuotaConfig(plans=_config().plans, ai_routes=_config().ai_routes,
                      storage=StorageConfig(settle_buffer=2))  # fmt: skip
    h = AIHarness("wsgi", store, cfg, upstream=bad_upstream)
    try:
        store.down = True
        for _ in range(5):
            assert h.post(_body(CHAT, "", 20)).status == 200
        buffer = h.mw.engine.settle_buffer
        assert len(buffer) == 2 and buffer.dropped == 3 and h.mw.stats["settle_dropped"] == 3
        store.down = False
        h.post(_body(CHAT, "", 20))
        assert h.usage()["requests"] == 3  # the two kept and this one
    finally:
        h.close()


def _sse_events(raw: bytes) -> list[str]:
    """The data of each SSE event; asserts every event is whole (one or more field lines)."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert all(line.startswith(("data: ", "event: ")) for line in lines), block
        out.append("".join(line[6:] for line in lines if line.startswith("data: ")))
    return out


@pytest.mark.parametrize("size", [37, 53, 1000])
def test_hard_stop_ends_the_stream_between_events_however_it_is_chunked(
    adapter: str, backend: Any, size: int
) -> None:
    h = AIHarness(adapter, backend, _stop_config(600), upstream=bad_upstream)
    try:
        body = _body(CHAT, "", 2000, stream=True, max_tokens=50, x_chunk=size,
                     stream_options={"include_usage": True})  # fmt: skip
        r = h.post(body)
        events = _sse_events(r.raw)
        for data in events[:-2]:
            assert "error" not in json.loads(data)  # whole chunks of the upstream's stream
        assert json.loads(events[-2])["error"]["code"] == "insufficient_quota"
        assert events[-1] == "[DONE]"
    finally:
        h.close()


def test_hard_stop_never_cuts_a_stream_whose_final_usage_has_arrived(
    adapter: str, backend: Any
) -> None:
    # a reasoning model: the text fits, the final usage (hidden reasoning) is far over the
    # quota; generation is over, so there is nothing to save by cutting: charge it exactly
    h = AIHarness(adapter, backend, _stop_config(600), upstream=bad_upstream)
    try:
        body = _body(CHAT, "", 50, stream=True, max_tokens=4000, x_reported=3000,
                     stream_options={"include_usage": True})  # fmt: skip
        r = h.post(body)
        assert r.raw.endswith(b"data: [DONE]\n\n") and b"insufficient_quota" not in r.raw
        usage = h.usage()
        assert (usage["output"], usage["estimated"]) == (3000, 0)
    finally:
        h.close()


def test_gemini_thoughts_count_in_the_running_output() -> None:
    from quota_middleware.metering._usage import UsageParser

    p = UsageParser("gemini", content_type="text/event-stream")
    p.feed(
        b'data: {"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":'
        b'{"promptTokenCount":3,"candidatesTokenCount":1,"thoughtsTokenCount":5000}}\n\n'
    )
    assert p.partial_output == 5001


def test_an_outage_longer_than_the_replay_attempts_loses_no_charge(adapter: str) -> None:
    from quota_middleware.base._flows import drive_sync

    store = _Flaky()
    h = AIHarness(adapter, store, _config(), upstream=bad_upstream)
    try:
        store.down = True
        assert h.post(_body(CHAT, "", 20)).status == 200
        for _ in range(20):  # twenty background drains while the store is still away
            drive_sync(h.mw.engine.drain(), store)
        assert len(h.mw.engine.settle_buffer) == 1 and h.mw.stats.get("settle_dropped", 0) == 0
        store.down = False
        drive_sync(h.mw.engine.drain(), store)
        assert h.usage()["requests"] == 1 and h.mw.stats["settle_buffered"] == 1
    finally:
        h.close()


def test_wsgi_hard_stop_closes_the_apps_iterable_once(backend: Any) -> None:
    closed: list[int] = []

    class App:
        @staticmethod
        def wsgi_app(environ: Any, start_response: Any) -> Any:
            inner = bad_upstream.wsgi_app(environ, start_response)

            class Body:
                def __iter__(self) -> Any:
                    return iter(inner)

                def close(self) -> None:
                    closed.append(1)

            return Body()

        asgi_app = bad_upstream.asgi_app

    h = AIHarness("wsgi", backend, _stop_config(600), upstream=App)
    try:
        body = _body(CHAT, "", 2000, stream=True, max_tokens=50,
                     stream_options={"include_usage": True})  # fmt: skip
        assert b"insufficient_quota" in h.post(body).raw
        assert closed == [1]
    finally:
        h.close()
