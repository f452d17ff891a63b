"""Rate-limit window arithmetic: fixed UTC calendar windows, pure.

Kong's rate-limiting counts requests in fixed calendar windows in UTC: the
current second, minute, hour and day, the month from day 1 at 00:00 and the
year from 1 January. Everything here takes a POSIX timestamp (seconds, maybe
fractional) and returns integers; no clock, no I/O.
"""

from __future__ import annotations

import calendar
import datetime
import math
from typing import Dict, Tuple

__all__ = [
    "PERIODS",
    "EXPIRATION",
    "window_start",
    "window_end",
    "reset_seconds",
    "header_period",
]

#: Kong's periods, shortest first (``ORDERED_PERIODS``).
PERIODS: Tuple[str, ...] = ("second", "minute", "hour", "day", "month", "year")

#: Kong's nominal window lengths in seconds (``EXPIRATION``): the longest a
#: window lasts is below these plus one day, which is how long a counter is kept.
EXPIRATION: Dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}

_FIXED = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _utc(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(math.floor(now), tz=datetime.timezone.utc)


def _epoch(year: int, month: int, day: int = 1) -> int:
    return calendar.timegm((year, month, day, 0, 0, 0, 0, 0, 0))


def window_start(period: str, now: float) -> int:
    """The first second (POSIX) of the ``period`` window holding ``now``."""
    seconds = _FIXED.get(period)
    if seconds is not None:
        return int(math.floor(now)) // seconds * seconds
    moment = _utc(now)
    if period == "month":
        return _epoch(moment.year, moment.month)
    if period == "year":
        return _epoch(moment.year, 1)
    raise ValueError("unknown period %r" % (period,))


def window_end(period: str, now: float) -> int:
    """The first second (POSIX) after the ``period`` window holding ``now``."""
    seconds = _FIXED.get(period)
    if seconds is not None:
        return window_start(period, now) + seconds
    moment = _utc(now)
    if period == "month":
        if moment.month == 12:
            return _epoch(moment.year + 1, 1)
        return _epoch(moment.year, moment.month + 1)
    if period == "year":
        return _epoch(moment.year + 1, 1)
    raise ValueError("unknown period %r" % (period,))


def reset_seconds(period: str, now: float) -> int:
    """Whole seconds until the ``period`` window holding ``now`` ends (at least 1).

    This is what ``RateLimit-Reset`` and ``Retry-After`` say. Unlike Kong, a
    month is its real length (Kong counts every month as 30 days here).
    """
    return max(1, int(math.ceil(window_end(period, now) - now)))


def header_period(period: str) -> str:
    """The ``<Period>`` of ``X-RateLimit-Limit-<Period>``: ``minute`` -> ``Minute``."""
    return period.capitalize()
