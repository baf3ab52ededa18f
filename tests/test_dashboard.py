"""The dashboard (``quota_middleware.admin._dashboard``): its HTML and SVG helpers, its pages as
functions of a store seeded with a month of traffic, the pages and forms through the admin app,
and the whole thing in a real headless Chromium against uvicorn on a real redis-server.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them); selenium drives them through ``/usr/bin/chromedriver`` and never downloads a browser
(``SE_OFFLINE=1``). Without them it is skipped locally and fails under ``CI=true``. Its
screenshots go to the test's tmp dir; with ``QM_SCREENSHOTS=docs`` they are also copied to
``docs/`` (the README's images).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import pytest

from _seed import Seeded, seed_config, seed_month
from quota_middleware.admin._dashboard import (
    read_caller,
    read_overview,
    render_caller,
    render_login,
    render_overview,
)
from quota_middleware.admin._html import Column, Safe, esc, h, join, money, num, table
from quota_middleware.admin._http import HTTPError
from quota_middleware.admin._svg import Series, nice_ceiling, stacked_bars
from quota_middleware.backends.memory import MemoryBackend
from quota_middleware.config import QuotaConfig
from quota_middleware.controls import Controls
from quota_middleware.fleet import daily_totals, period_days, ranked


# -- a tiny HTML reader for the tests: elements by id / class, their text and attributes ----------
class Page(HTMLParser):
    """The elements of an HTML page as (tag, attrs, text inside) — enough to find numbers."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[int] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("meta", "link", "input", "br", "hr", "img", "rect", "line"):
            self._open.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            i = self._open.pop()
            if self.elements[i][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for i in self._open:
            self.elements[i][2].append(data)

    def find(self, *, id: str | None = None, cls: str | None = None, tag: str | None = None
             ) -> list[tuple[str, dict[str, str], str]]:  # fmt: skip
        out = []
        for t, attrs, text in self.elements:
            if id is not None and attrs.get("id") != id:
                continue
            if cls is not None and cls not in attrs.get("class", "").split():
                continue
            if tag is not None and t != tag:
                continue
            out.append((t, attrs, "".join(text)))
        return out

    def one(self, **kw: Any) -> tuple[str, dict[str, str], str]:
        found = self.find(**kw)
        assert len(found) == 1, (kw, len(found))
        return found[0]


def _dollars(text: str) -> int:
    """``$1,234.56`` -> micro-USD (to the cent)."""
    m = re.search(r"\$([\d,]+\.\d\d)", text)
    assert m is not None, text
    return round(float(m.group(1).replace(",", "")) * 100) * 10_000


def _cents(micros: int) -> int:
    return round(micros / 10_000)


# -- the HTML and SVG helpers ---------------------------------------------------------------------
def test_markup_is_escaped_unless_it_is_markup_already() -> None:
    evil = '<script>alert("x")</script>'
    cell = h("td", evil, title=evil, class_="num", data_day="2026-12-03", hidden=True,
             missing=None)  # fmt: skip
    assert "<script>" not in cell
    assert cell == (
        '<td title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" class="num" '
        'data-day="2026-12-03" hidden>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</td>'
    )
    assert join(h("b", "1"), "<i>", None, [2, ["&"]]) == "<b>1</b>&lt;i&gt;2&amp;"
    assert esc(Safe("<b>kept</b>")) == "<b>kept</b>"
    assert h("input", value='"><x') == '<input value="&quot;&gt;&lt;x">'
    t = table([Column("who"), Column("n", True)], [["<a>", num(1234)]], foot=["total", "9"])
    assert '<td class="num">1,234</td>' in t and "&lt;a&gt;" in t and "<tfoot>" in t
    assert "Nothing yet." in table([Column("a")], [])


def test_money_and_counts_read_as_people_write_them() -> None:
    assert money(1_234_560_000) == "$1,234.56"
    assert money(0) == "$0.00"
    assert money(4_000) == "<$0.01"
    assert money(-2_500_000) == "-$2.50"
    assert money(None) == "–"
    assert num(1234567) == "1,234,567"
    assert [nice_ceiling(v) for v in (0, 0.7, 1, 3.2, 4_100_000)] == [1, 1, 1, 5, 5_000_000]


def test_stacked_bars_draw_one_bar_per_label_with_tooltips() -> None:
    days = ["2026-12-01", "2026-12-02", "2026-12-03"]
    svg = stacked_bars(days, [Series("gpt-4o", [1, 0, 3]), Series("<b>evil</b>", [2, 0, 1])],
                       title="spend & more", fmt=lambda v: f"{v:g}")  # fmt: skip
    root = ET.fromstring(svg)  # well-formed XML: every text escaped
    ns = "{http://www.w3.org/2000/svg}"
    bars = [g for g in root.iter(f"{ns}g") if g.get("class") == "bar"]
    assert [b.get("data-label") for b in bars] == days
    assert [b.get("data-total") for b in bars] == ["3", "0", "4"]
    assert [len([r for r in b if r.get("class") == "seg"]) for b in bars] == [2, 0, 2]
    assert bars[0].findtext(f"{ns}title") == "2026-12-01: 3 · gpt-4o: 1 · <b>evil</b>: 2"
    assert root.findtext(f"{ns}title") == "spend & more"
    # the tallest bar reaches the top of the axis (4 -> a nice 5), the others in proportion
    heights = [sum(float(r.get("height", 0)) for r in b if r.get("class") == "seg") for b in bars]
    assert heights[2] / heights[0] == pytest.approx(4 / 3, rel=0.01)
    with pytest.raises(ValueError):
        stacked_bars(days, [Series("short", [1])], title="x")


# -- the pages as functions of a seeded store ------------------------------------------------------
@pytest.fixture(scope="module")
def seeded_memory() -> tuple[QuotaConfig, MemoryBackend, Seeded]:
    cfg = seed_config()
    backend = MemoryBackend()
    return cfg, backend, seed_month(backend, cfg, callers=50)


def test_overview_shows_what_the_traffic_spent(seeded_memory: Any) -> None:
    cfg, backend, seeded = seeded_memory
    now = datetime.now(UTC)
    o = read_overview(cfg, backend, period="week", now=now)
    html = render_overview(o, root="/admin", who="token:12345678", csrf="c")
    page = Page(html.decode())
    # spend today / this week / this month: what the seed settled on those days
    for period in ("day", "week", "month"):
        _, days = period_days(cfg, period, now)
        want = sum(seeded.per_day.get(d, 0) for d in days)
        [(_, attrs, text)] = [
            e for e in page.find(cls="value") if e[1].get("data-period") == period
        ]
        assert int(attrs["data-micros"]) == want > 0
        assert _cents(_dollars(text)) == _cents(want)
    # the chart: 30 bars, one per day, their totals those of the days
    bars = page.find(cls="bar", tag="g")
    assert len(bars) == 30
    assert [b[1]["data-label"] for b in bars] == list(o.chart_days)
    for _, attrs, _text in bars:
        assert round(float(attrs["data-total"])) == seeded.per_day.get(attrs["data-label"], 0)
    # the table beneath it: the same days, the same totals
    rows = [e for e in page.find(tag="tr") if e[2].startswith("20")]
    assert len([r for r in rows if re.match(r"\d{4}-\d\d-\d\d", r[2])]) >= 30
    # top callers of the week, linked to their pages below the mount
    top, count = ranked(backend, cfg, period_days(cfg, "week", now)[1], limit=20)
    links = [a for a in page.find(tag="a") if "/admin/ui/callers/" in a[1].get("href", "")]
    assert [a[2] for a in links[: len(top)]] == [r.caller for r in top]
    assert f"{count} callers had usage" in html.decode()
    # alerts and the spike the seed fired
    assert seeded.spiker is not None
    spikes = page.one(id="spikes")[2]
    assert "used" in spikes and seeded.spiker[1] in spikes
    assert "threshold" in page.one(id="alerts")[2]
    # switches are links (no script): every period and metric
    hrefs = {a[1].get("href", "") for a in page.find(tag="a")}
    for q in ("period=day", "period=month", "by=tokens", "by=requests"):
        assert any(q in x for x in hrefs), q
    assert "<script" not in html.decode()


def test_what_changed_this_week(seeded_memory: Any) -> None:
    cfg, backend, seeded = seeded_memory
    o = read_overview(cfg, backend, period="day")
    w = o.week
    assert w.spend == sum(seeded.per_day.get(d, 0) for d in w.days)
    assert w.spend_before == sum(seeded.per_day.get(d, 0) for d in w.before_days)
    assert len(w.before_days) == len(w.days)
    # growers really grew, sorted by growth; new callers were not in last week's top 10
    growth = [g.caller.cost_micros - g.before for g in w.growers]
    assert growth == sorted(growth, reverse=True) and all(x > 0 for x in growth)
    before, _ = ranked(backend, cfg, w.before_days, limit=10)
    assert not {(r.tenant, r.caller) for r in w.new_in_top} & {(r.tenant, r.caller) for r in before}


def test_caller_page_shows_its_usage_and_what_is_left(seeded_memory: Any) -> None:
    cfg, backend, seeded = seeded_memory
    _, month = period_days(cfg, "month")
    [top], _ = ranked(backend, cfg, month, limit=1)
    v = read_caller(cfg, backend, top.tenant, top.caller)
    page = Page(render_caller(v, root="", who="token:1", csrf="tok").decode())
    bars = page.find(cls="bar", tag="g")
    assert len(bars) == 30
    total = sum(round(float(b[1]["data-total"])) for b in bars)
    assert total == sum(r.cost_micros for r in v.records)
    assert int(page.one(id="caller-cost")[1]["data-micros"]) == total
    # what is left: the plan's month budget, its use this month
    [usd] = [e for e in page.find(cls="budget") if e[1].get("data-limit") == "usd-month"]
    assert int(usd[1]["data-used"]) == top.cost_micros and int(usd[1]["data-allowed"]) == 4_000_000
    # the forms carry the CSRF token and post below the caller's own path
    forms = page.find(tag="form")
    actions = {f[1]["action"] for f in forms}
    base = f"/ui/callers/{top.tenant}/{top.caller}"
    assert {f"{base}/block", f"{base}/override", "/logout"} <= actions
    tokens = [e[1]["value"] for e in page.find(tag="input") if e[1].get("name") == "csrf"]
    assert tokens and set(tokens) == {"tok"}
    options = {e[1]["value"] for e in page.find(tag="option")}
    assert {"rpm", "tokens-day", "usd-month"} <= options


def test_ids_and_reasons_from_the_store_are_escaped() -> None:
    cfg = seed_config()
    backend = MemoryBackend()
    evil = '<img src=x onerror="alert(1)">'
    Controls(cfg, backend).block(evil, tenant="acme", reason="<script>alert(2)</script>")
    Controls(cfg, backend).set_limit(evil, "usd-month", 9, tenant="acme")
    html = render_caller(read_caller(cfg, backend, "acme", evil), root="", who=evil, csrf="c")
    text = html.decode()
    assert "<img src=x" not in text and "<script>alert" not in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    assert "/ui/callers/acme/%3Cimg%20src%3Dx%20onerror%3D%22alert%281%29%22%3E/unblock" in text
    login = render_login("", next_='/ui/"><script>', failed=True).decode()
    assert "<script>" not in login


def test_bad_switches_are_400s_naming_the_field(seeded_memory: Any) -> None:
    cfg, backend, _ = seeded_memory
    with pytest.raises(HTTPError) as e:
        read_overview(cfg, backend, period="year")
    assert (e.value.status, e.value.field) == (400, "period")
    with pytest.raises(HTTPError) as e:
        read_overview(cfg, backend, by="money")
    assert (e.value.status, e.value.field) == (400, "by")
    with pytest.raises(HTTPError) as e:
        read_caller(cfg, backend, "acme", "x", plan="gold")
    assert (e.value.status, e.value.field) == (400, "plan")


def test_daily_totals_of_the_seed_match_what_it_sent(seeded_memory: Any) -> None:
    cfg, backend, seeded = seeded_memory
    totals = daily_totals(backend, cfg, seeded.days)
    assert {d: sum(c.cost_micros for c in m.values()) for d, m in totals.items()} == {
        d: v for d, v in seeded.per_day.items() if v
    }
    assert sum(c.requests for m in totals.values() for c in m.values()) == seeded.requests
