"""HTML for the dashboard, escaped by construction, without a template engine.

Markup is built with :func:`h` (``h("td", name, class_="num")``): every child and attribute value
that is not already :class:`Safe` is escaped, so a caller id, a block reason or a model name read
from the store can never become markup. :class:`Safe` marks what is HTML already (the result of
:func:`h`, an SVG chart); nothing else makes a string safe, and no function here takes raw HTML
text from a caller. Number formats (:func:`money`, :func:`num`, :func:`pct`) and the page layout
(:func:`page`) live here too, shared by every page.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "Child",
    "Column",
    "Safe",
    "esc",
    "h",
    "join",
    "money",
    "num",
    "page",
    "pct",
    "table",
    "when",
]


class Safe(str):
    """Text that is HTML already: inserted as it is, never escaped again."""

    __slots__ = ()


#: what :func:`h` takes as children: text (escaped), numbers, ``Safe`` markup, None (nothing),
#: and iterables of these
Child = str | int | float | Safe | None | Iterable["Child"]
Attr = str | int | float | bool | None

_VOID = frozenset({"br", "hr", "img", "input", "link", "meta", "wbr", "col"})


def esc(value: object) -> Safe:
    """``value`` as HTML text: escaped (quotes too, so it may sit in an attribute), unless it
    is :class:`Safe` already."""
    if isinstance(value, Safe):
        return value
    return Safe(html.escape(str(value), quote=True))


def _children(children: Iterable[Child], out: list[str]) -> None:
    for child in children:
        if child is None or child is False:
            continue
        if isinstance(child, str | int | float):
            out.append(esc(child))
        else:
            _children(child, out)


def join(*children: Child) -> Safe:
    """Children side by side, each escaped unless :class:`Safe`."""
    out: list[str] = []
    _children(children, out)
    return Safe("".join(out))


def _attr_name(name: str) -> str:
    # class_ -> class, data_day -> data-day, aria_label -> aria-label
    return name.rstrip("_").replace("_", "-")


def h(tag: str, *children: Child, **attrs: Attr) -> Safe:
    """The element ``tag`` with ``children`` and ``attrs``: ``True`` is a bare attribute,
    ``None``/``False`` leaves it out; names as Python spells them (``class_``, ``data_day``)."""
    parts = [f"<{tag}"]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(f" {_attr_name(name)}")
        else:
            parts.append(f' {_attr_name(name)}="{esc(value)}"')
    parts.append(">")
    if tag in _VOID:
        return Safe("".join(parts))
    _children(children, parts)
    parts.append(f"</{tag}>")
    return Safe("".join(parts))


# -- numbers for people ---------------------------------------------------------------------------
def money(micros: int | float | None) -> str:
    """Micro-USD as dollars and cents: ``$1,234.56``; a non-zero amount under a cent is
    ``<$0.01`` rather than a misleading ``$0.00``."""
    if micros is None:
        return "–"
    usd = micros / 1_000_000
    if 0 < abs(usd) < 0.005:
        return "<$0.01" if usd > 0 else "-<$0.01"
    sign = "-" if usd < 0 else ""
    return f"{sign}${abs(usd):,.2f}"


def num(value: int | float | None) -> str:
    """A count with thousands separators: ``1,234,567``."""
    if value is None:
        return "–"
    return f"{value:,.0f}"


def pct(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}%"


def when(unix: float | None) -> str:
    """A moment as ``2026-12-03 14:05 UTC`` (the dashboard speaks UTC, like the logs)."""
    if unix is None:
        return "–"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- tables ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its heading, and whether it holds numbers (right-aligned)."""

    label: str
    numeric: bool = False


def table(
    columns: Sequence[Column],
    rows: Iterable[Sequence[Child]],
    *,
    caption: str | None = None,
    empty: str = "Nothing yet.",
    foot: Sequence[Child] | None = None,
    class_: str = "data",
    id_: str | None = None,
) -> Safe:
    """A data table: headings with ``scope``, numeric cells right-aligned; ``empty`` when
    there are no rows (the table is kept, so the page's layout and its tests do not move)."""
    head = h("tr", [h("th", c.label, scope="col", class_="num" if c.numeric else None)
                    for c in columns])  # fmt: skip
    body_rows = [
        h(
            "tr",
            [
                h("td", cell, class_="num" if c.numeric else None)
                for c, cell in zip(columns, row, strict=True)
            ],
        )  # fmt: skip
        for row in rows
    ]
    if not body_rows:
        body_rows = [h("tr", h("td", empty, colspan=len(columns), class_="empty"))]
    tfoot = None
    if foot is not None:
        cells = [
            h("th", cell, scope="row")
            if i == 0
            else h("td", cell, class_="num" if c.numeric else None)
            for i, (c, cell) in enumerate(zip(columns, foot, strict=True))
        ]
        tfoot = h("tfoot", h("tr", cells))
    return h(
        "table",
        h("caption", caption) if caption else None,
        h("thead", head),
        h("tbody", body_rows),
        tfoot,
        class_=class_,
        id=id_,
    )


# -- the page -------------------------------------------------------------------------------------
def page(
    title: str,
    body: Child,
    *,
    root: str,
    who: str | None = None,
    csrf: str = "",
    nav: Sequence[tuple[str, str, bool]] = (),
) -> bytes:
    """A whole HTML page: the stylesheet shipped in the package, a header with ``nav`` links
    (label, href, current?) and, for a signed-in admin, who they are and a logout button."""
    links = [
        h("a", label, href=href, aria_current="page" if current else None)
        for label, href, current in nav
    ]
    account = None
    if who is not None:
        account = h(
            "form",
            h("span", who, class_="who"),
            h("input", type="hidden", name="csrf", value=csrf),
            h("input", type="hidden", name="next", value=f"{root}/login"),
            h("button", "Log out", type="submit", class_="link"),
            method="post",
            action=f"{root}/logout",
            class_="account",
        )
    doc = join(
        Safe("<!doctype html>"),
        h(
            "html",
            h(
                "head",
                h("meta", charset="utf-8"),
                h("meta", name="viewport", content="width=device-width, initial-scale=1"),
                h("title", f"{title} · quota-middleware"),
                h("link", rel="stylesheet", href=f"{root}/ui/assets/dashboard.css"),
            ),
            h(
                "body",
                h(
                    "header",
                    h("a", "quota-middleware", href=f"{root}/ui/", class_="brand"),
                    h("nav", links) if links else None,
                    account,
                    class_="top",
                ),
                h("main", body),
            ),
            lang="en",
        ),
    )
    return doc.encode()
