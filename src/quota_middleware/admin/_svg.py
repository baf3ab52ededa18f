"""Charts as SVG rendered on the server: no JavaScript, no library, nothing fetched.

:func:`stacked_bars` draws one bar per label (a day), stacked by series (a model), with a
``<title>`` on each bar and each segment (the browser shows it as a tooltip; screen readers
read it), a y axis with round ticks, and :func:`legend` beside it. :func:`level_bar` is the
small horizontal bar of a budget's use. Every text that reaches the SVG goes through
``_html.h``, so it is escaped like the rest of the page. Colours are attributes, not styles: the
dashboard's Content-Security-Policy allows no inline style.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quota_middleware.admin._html import Safe, h

__all__ = ["PALETTE", "Series", "legend", "level_bar", "nice_ceiling", "stacked_bars"]

#: colour-blind friendly, distinct in print (Tableau 10)
PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Series:
    """One stacked series: its name and one value per label."""

    name: str
    values: Sequence[float]
    color: str | None = None


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-12):
            return float(step * power)
    return 10.0 * power  # pragma: no cover - the loop ends at 10


def _color(series: Series, i: int) -> str:
    return series.color or PALETTE[i % len(PALETTE)]


def _f(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def stacked_bars(
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    tick_label: Callable[[str], str] = lambda s: s,
    width: int = 760,
    height: int = 240,
    id_: str | None = None,
) -> Safe:
    """One bar per label, stacked by series; ``fmt`` formats values (axis, tooltips),
    ``tick_label`` the labels under the axis (every few of them when there are many).

    Each bar is ``<g class="bar" data-label=... data-total=...>`` (its total in the series'
    unit, unformatted, for tests and scripts), each segment a ``<rect class="seg">``."""
    for s in series:
        if len(s.values) != len(labels):
            raise ValueError(f"series {s.name!r} has {len(s.values)} values, not {len(labels)}")
    left, right, top, bottom = 64, 10, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    top_value = nice_ceiling(max(totals, default=0.0))
    parts: list[Safe] = [h("title", title)]
    # the y axis: four steps of round values, gridlines across the plot
    for k in range(5):
        value = top_value * k / 4
        y = top + plot_h - plot_h * k / 4
        parts.append(h("line", x1=left, x2=width - right, y1=_f(y), y2=_f(y),
                       class_="grid" if k else "axis"))  # fmt: skip
        parts.append(h("text", fmt(value), x=left - 6, y=_f(y + 4), class_="ytick",
                       text_anchor="end"))  # fmt: skip
    n = max(1, len(labels))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.72)
    every = max(1, math.ceil(n / 10))
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar_w) / 2
        segments: list[Safe] = []
        y = top + plot_h
        shown = [f"{label}: {fmt(totals[i])}"]
        for j, s in enumerate(series):
            value = s.values[i]
            if value <= 0:
                continue
            seg_h = plot_h * value / top_value
            y -= seg_h
            shown.append(f"{s.name}: {fmt(value)}")
            segments.append(
                h(
                    "rect",
                    h("title", f"{label} · {s.name}: {fmt(value)}"),
                    x=_f(x),
                    y=_f(y),
                    width=_f(bar_w),
                    height=_f(max(seg_h, 0.5)),
                    fill=_color(s, j),
                    class_="seg",
                    data_series=s.name,
                )  # fmt: skip
            )
        # an invisible full-height target, so a day's tooltip shows over its whole column
        hit = h("rect", x=_f(left + slot * i), y=top, width=_f(slot), height=plot_h,
                class_="hit", fill="transparent")  # fmt: skip
        parts.append(h("g", h("title", " · ".join(shown)), hit, segments, class_="bar",
                       data_label=label, data_total=_f(totals[i])))  # fmt: skip
        if i % every == 0:
            parts.append(h("text", tick_label(label), x=_f(left + slot * (i + 0.5)),
                           y=height - 8, class_="xtick", text_anchor="middle"))  # fmt: skip
    return h(
        "svg",
        parts,
        xmlns="http://www.w3.org/2000/svg",
        viewBox=f"0 0 {width} {height}",
        class_="chart",
        role="img",
        aria_label=title,
        preserveAspectRatio="xMidYMid meet",
        id=id_,
    )


def legend(series: Sequence[Series]) -> Safe:
    """The series' names beside a swatch of their colour."""
    items = [
        h(
            "li",
            h(
                "svg",
                h("rect", width=10, height=10, rx=2, fill=_color(s, i)),
                width=10,
                height=10,
                viewBox="0 0 10 10",
                aria_hidden="true",
            ),
            s.name,
        )  # fmt: skip
        for i, s in enumerate(series)
    ]
    return h("ul", items, class_="legend")


def level_bar(fraction: float, *, label: str) -> Safe:
    """A thin bar filled to ``fraction`` (0..1, drawn up to 1): green, amber from 80 %, red
    from 100 %."""
    shown = max(0.0, min(1.0, fraction))
    color = "#3b8d4f" if fraction < 0.8 else "#d08a00" if fraction < 1.0 else "#c8322b"
    return h(
        "svg",
        h("title", label),
        h("rect", width=100, height=8, fill="#e7e9ee"),
        h("rect", width=_f(100 * shown), height=8, fill=color, class_="fill"),
        viewBox="0 0 100 8",
        preserveAspectRatio="none",
        class_="level",
        role="img",
        aria_label=label,
    )
