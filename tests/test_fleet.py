"""The app's rollups: every settle adds to the day's totals per model and to the rankings of
callers and tenants, and the fleet readers answer from them what a SCAN of every caller's usage
answers, on every backend (memory, fakeredis, Redis, the cluster)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ai_harness import AIHarness, chat, config
from quota_middleware import QuotaConfig
from quota_middleware.errors import InvalidArgument
from quota_middleware.fleet import (
    daily_totals,
    period_days,
    ranked,
    ranked_tenants,
    scan_keys,
    top_callers,
)


def _traffic(backend: Any, cfg: QuotaConfig, adapter: str = "wsgi") -> dict[str, int]:
    """AI requests from callers of different weights: caller i sends i + 1 requests."""
    h = AIHarness(adapter, backend, cfg)
    sent: dict[str, int] = {}
    try:
        for i in range(6):
            ip = f"192.0.2.{10 + i}"
            for _ in range(i + 1):
                assert h.post(chat(max_tokens=20 + i), ip=ip).status == 200
            sent[ip] = i + 1
    finally:
        h.close()
    return sent


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
def test_rankings_and_totals_match_a_scan_of_every_caller(backend: Any, adapter: str) -> None:
    cfg = config()
    sent = _traffic(backend, cfg, adapter)
    sync = backend.sync()
    _, days = period_days(cfg, "day")
    scanned = top_callers(sync, cfg, period="day", limit=None)
    for by in ("cost", "tokens", "requests"):
        rows, count = ranked(sync, cfg, days, by=by, limit=3)
        assert count == len(sent) == len(scanned)
        want = top_callers(sync, cfg, period="day", by=by, limit=3)
        assert [(r.caller, r.requests, r.input_tokens, r.output_tokens, r.cost_micros)
                for r in rows] == [(r.caller, r.requests, r.input_tokens, r.output_tokens,
                                    r.cost_micros) for r in want]  # fmt: skip
    rows, _ = ranked(sync, cfg, days, by="requests", limit=100)
    assert {r.caller: r.requests for r in rows} == sent
    assert rows[0].caller == "192.0.2.15" and rows[0].models == ("gpt-4o-mini",)
    [(day, models)] = daily_totals(sync, cfg, days).items()
    total = models["gpt-4o-mini"]
    assert total.requests == sum(sent.values())
    assert total.cost_micros == sum(r.cost_micros for r in scanned) > 0
    assert total.output_tokens == sum(r.output_tokens for r in scanned)
    assert ranked_tenants(sync, cfg, days) == [("default", total.cost_micros)]
    # the month so far: its own ranking by cost, the same numbers
    _, month = period_days(cfg, "month")
    rows, count = ranked(sync, cfg, month, by="cost", limit=2)
    assert count == 6 and [r.cost_micros for r in rows] == [r.cost_micros for r in scanned[:2]]


def test_spans_of_several_days_are_summed_and_keys_expire(backend: Any) -> None:
    cfg = config(usage_retention_days=2)
    _traffic(backend, cfg)
    sync = backend.sync()
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=i)).isoformat() for i in (2, 1, 0)]
    rows, count = ranked(sync, cfg, days, by="tokens", limit=10)
    assert count == 6 and rows[0].days == (today.isoformat(),)
    # the scratch key of the sum is gone again
    assert not [k for k in scan_keys(sync, "qm:{@app}:r:sum:*")]
    by_tenant, _ = ranked(sync, cfg, days, by="requests", limit=2, tenant="default")
    assert [r.requests for r in by_tenant] == [6, 5]
    assert ranked(sync, cfg, days, by="requests", tenant="other") == ([], 0)
    if backend.name in ("redis", "cluster"):
        client = sync.client
        key = f"qm:{{@app}}:r:{today.isoformat()}:cost"
        assert 0 < client.pttl(key) <= 2 * 86_400_000


def test_rollups_off_writes_no_app_keys(backend: Any) -> None:
    cfg = config(rollups=False)
    _traffic(backend, cfg)
    sync = backend.sync()
    assert scan_keys(sync, "qm:{@app}:*") == []
    assert daily_totals(sync, cfg, period_days(cfg, "day")[1]) == {}


def test_period_days() -> None:
    cfg = config()
    now = datetime(2026, 12, 3, 12, tzinfo=UTC)  # a Thursday
    assert period_days(cfg, "day", now) == ("2026-12-03", ["2026-12-03"])
    assert period_days(cfg, "week", now) == (
        "2026-W49", ["2026-11-30", "2026-12-01", "2026-12-02", "2026-12-03"]
    )  # fmt: skip
    assert period_days(cfg, "month", now)[1] == ["2026-12-01", "2026-12-02", "2026-12-03"]
    assert period_days(cfg, "day", now, zone="Pacific/Kiritimati")[0] == "2026-12-04"
    with pytest.raises(InvalidArgument):
        period_days(cfg, "year", now)
    with pytest.raises(InvalidArgument):
        ranked(None, cfg, ["2026-12-03"], by="money")  # type: ignore[arg-type]
