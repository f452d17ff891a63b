"""Rate-limit window arithmetic: fixed UTC calendar windows (pure, table-driven)."""

from __future__ import annotations

import calendar

import pytest

from kongtx import ratelimit


def ts(*parts: int) -> int:
    """POSIX seconds of a UTC date-time (year, month, day, hour, minute, second)."""
    full = list(parts) + [0] * (6 - len(parts))
    return calendar.timegm(tuple(full) + (0, 0, 0))  # type: ignore[arg-type]


NOW = ts(2024, 2, 29, 13, 45, 30) + 0.25  # a leap day, a quarter second in


@pytest.mark.parametrize(
    "period, now, start, end",
    [
        ("second", NOW, ts(2024, 2, 29, 13, 45, 30), ts(2024, 2, 29, 13, 45, 31)),
        ("minute", NOW, ts(2024, 2, 29, 13, 45), ts(2024, 2, 29, 13, 46)),
        ("hour", NOW, ts(2024, 2, 29, 13), ts(2024, 2, 29, 14)),
        ("day", NOW, ts(2024, 2, 29), ts(2024, 3, 1)),
        ("month", NOW, ts(2024, 2, 1), ts(2024, 3, 1)),
        ("year", NOW, ts(2024, 1, 1), ts(2025, 1, 1)),
        # December rolls the month over into the next year.
        ("month", ts(2023, 12, 31, 23, 59, 59), ts(2023, 12, 1), ts(2024, 1, 1)),
        ("year", ts(2023, 12, 31, 23, 59, 59), ts(2023, 1, 1), ts(2024, 1, 1)),
        # The first second of a window belongs to it.
        ("month", ts(2024, 3, 1), ts(2024, 3, 1), ts(2024, 4, 1)),
        ("year", ts(2025, 1, 1), ts(2025, 1, 1), ts(2026, 1, 1)),
        ("minute", ts(2024, 1, 1, 0, 1), ts(2024, 1, 1, 0, 1), ts(2024, 1, 1, 0, 2)),
        ("day", ts(2024, 1, 1) - 0.5, ts(2023, 12, 31), ts(2024, 1, 1)),
    ],
)
def test_windows_are_utc_calendar_windows(period: str, now: float, start: int, end: int) -> None:
    """Every period's window starts and ends on UTC calendar boundaries."""
    assert ratelimit.window_start(period, now) == start
    assert ratelimit.window_end(period, now) == end


@pytest.mark.parametrize(
    "period, now, seconds",
    [
        ("second", NOW, 1),
        ("minute", NOW, 30),
        ("minute", ts(2024, 1, 1, 0, 0, 59) + 0.9, 1),
        ("minute", ts(2024, 1, 1, 0, 1), 60),
        ("hour", NOW, 14 * 60 + 30),
        ("day", ts(2024, 5, 5, 23, 0), 3600),
        ("month", ts(2024, 2, 28), 2 * 86400),  # leap year: 29 days in February
        ("month", ts(2023, 2, 28), 86400),
        ("year", ts(2024, 12, 31, 23, 59, 59), 1),
    ],
)
def test_reset_seconds_until_the_window_ends(period: str, now: float, seconds: int) -> None:
    """reset_seconds rounds up to whole seconds and is never below 1."""
    assert ratelimit.reset_seconds(period, now) == seconds


def test_header_periods_and_order() -> None:
    """Periods run shortest first and name their headers with a capital letter."""
    assert ratelimit.PERIODS == ("second", "minute", "hour", "day", "month", "year")
    assert [ratelimit.header_period(p) for p in ratelimit.PERIODS] == [
        "Second", "Minute", "Hour", "Day", "Month", "Year"]


def test_unknown_period_is_an_error() -> None:
    """A period outside Kong's six raises ValueError."""
    with pytest.raises(ValueError):
        ratelimit.window_start("week", NOW)
