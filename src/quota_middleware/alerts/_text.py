"""Alert events as text for people: Slack messages, the log, ``alerts tail``."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from quota_middleware.base._events import AlertEvent


# -- human-readable text -------------------------------------------------------------------------
def _amount(value: int | None, unit: str) -> str:
    if value is None:
        return "?"
    if unit == "usd_micros":
        usd = value / 1_000_000
        # cents hide small budgets ("$0.00 / $0.00"): show micro-dollars below a dollar
        return f"${usd:,.2f}" if usd >= 1 or usd == 0 else f"${usd:.6f}".rstrip("0")
    return f"{value:,}"


def _who(event: AlertEvent) -> str:
    who = f"caller {event.caller}"
    if event.tenant and event.tenant != "default":
        who += f" (tenant {event.tenant})"
    return who


def format_text(event: AlertEvent) -> str:
    """One line for people: Slack messages, the log, ``alerts tail``."""
    pct = f"{event.threshold}%" if event.threshold is not None else "?"
    if event.type == "threshold":
        money = event.unit == "usd_micros"
        what = "budget" if money else "token quota"
        unit = "" if money else " tokens"
        icon = ":no_entry:" if (event.threshold or 0) >= 100 else ":warning:"
        return (
            f"{icon} {_who(event)} used {pct} of {what} {event.limit} "
            f"({_amount(event.used, event.unit)} / {_amount(event.limit_value, event.unit)}{unit})"
            f" for {event.period}"
        )
    if event.type == "app_threshold":
        icon = ":rotating_light:" if (event.threshold or 0) >= 100 else ":warning:"
        return (
            f"{icon} app spend reached {pct} of app budget {event.limit} "
            f"({_amount(event.used, event.unit)} / {_amount(event.limit_value, event.unit)})"
            f" for {event.period}"
        )
    if event.type == "spike":
        try:
            hour = datetime.fromtimestamp(int(event.period) * 3600, UTC)
            when = hour.strftime("%Y-%m-%d %H:00 UTC")
        except (TypeError, ValueError, OverflowError):
            when = event.period
        return (
            f":chart_with_upwards_trend: usage spike: {_who(event)} used "
            f"{_amount(event.used, event.unit)} tokens in the hour from {when}"
        )
    if event.type == "test":
        return ":white_check_mark: quota-middleware test alert: this sink is reachable"
    return f":bell: {event.type} alert {event.id}"


_EMOJI = re.compile(r":[a-z_]+: ")


def plain_text(event: AlertEvent) -> str:
    """:func:`format_text` without Slack's emoji codes, for logs and terminals."""
    return _EMOJI.sub("", format_text(event), count=1)
