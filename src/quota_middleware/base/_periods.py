"""Calendar periods in a plan's time zone. The period id goes into the key name, so a new day
or month is simply a new key: no reset job, ever."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


def period_of(kind: str, now_us: int, zone: ZoneInfo) -> tuple[str, int]:
    """``("d2026-11-28", end_us)`` or ``("m2026-11", end_us)`` for the instant ``now_us``."""
    local = datetime.fromtimestamp(now_us / 1_000_000, zone)
    if kind == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        # add a day on the calendar, then re-localise: DST days are 23 or 25 hours long
        end = (start + timedelta(days=1)).replace(tzinfo=None).replace(tzinfo=zone)
        pid = f"d{local:%Y-%m-%d}"
    else:
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        end = start.replace(year=year, month=month)
        pid = f"m{local:%Y-%m}"
    return pid, int(end.timestamp() * 1_000_000)


def day_id(now_us: int, zone: ZoneInfo) -> str:
    return f"{datetime.fromtimestamp(now_us / 1_000_000, zone):%Y-%m-%d}"
