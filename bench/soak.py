"""The soak's pure pieces: the wrk Lua script that paces requests, and RSS trends.

wrk has no fixed-rate mode (that is wrk2). wrk does call a script's ``delay()``
before each request a connection sends, and waits that many milliseconds: the
script below hands each request the next free slot of a per-thread schedule
(one slot every ``threads * 1000 / rate`` ms), read from the monotonic clock
through LuaJIT's FFI. The total rate is then the chosen one as long as the
server keeps up; when it falls behind, a late request goes at once and the
schedule restarts from now (no burst to catch up), so the achieved rate, which
the report prints, shows it. Without the FFI the script falls back to a fixed
per-connection pause, which gives a rate somewhat below the chosen one.

Standard library only, like the rest of the harness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

#: The soak's targets: RSS change from start to end, in percent (either way).
RSS_CHANGE_TARGET_PCT = 5.0

_PACING_SCRIPT = """\
-- kongtx bench soak: about {rate:g} requests/s in total over {threads:d} wrk thread(s).
-- Every thread runs its own copy: one request every {interval:.6f} ms per thread.
local interval = {interval:.6f}
local fallback = {fallback:.3f}  -- ms a connection pauses when there is no clock
local ok, ffi = pcall(require, "ffi")
local now_ms = nil
if ok then
  ffi.cdef[[
    typedef struct {{ long tv_sec; long tv_nsec; }} kongtx_bench_timespec;
    int clock_gettime(int clk_id, kongtx_bench_timespec *tp);
  ]]
  local ts = ffi.new("kongtx_bench_timespec")
  now_ms = function()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1000000
  end
end
local next_slot = nil

function delay()
  if now_ms == nil then
    return fallback
  end
  local now = now_ms()
  local slot = next_slot
  if slot == nil or slot < now then
    slot = now
  end
  next_slot = slot + interval
  return slot - now
end
"""


def pacing_script(rate: float, threads: int, connections: int) -> str:
    """The wrk Lua script that paces ``threads`` threads to ``rate`` requests/s in total.

    ``connections`` (wrk ``-c``) only sets the fallback pause: each of a thread's
    connections waits ``connections_per_thread * interval`` ms between requests.
    """
    if rate <= 0:
        raise ValueError("the rate must be positive")
    if threads < 1 or connections < threads:
        raise ValueError("need at least one thread and one connection per thread")
    interval = threads * 1000.0 / rate
    per_thread = connections // threads
    return _PACING_SCRIPT.format(
        rate=rate, threads=threads, interval=interval, fallback=per_thread * interval
    )


def rate_held(achieved: float, rate: float) -> bool:
    """Whether the soak ran at the rate asked (within 5%): else the server fell behind."""
    return achieved >= 0.95 * rate


@dataclass(frozen=True)
class RssSample:
    """The server's RSS at one moment of the soak."""

    seconds: float
    per_process_mb: Tuple[float, ...]

    @property
    def total_mb(self) -> float:
        return sum(self.per_process_mb)


@dataclass(frozen=True)
class RssTrend:
    """What the samples say: start, end, change, extremes."""

    start_mb: float
    end_mb: float
    min_mb: float
    max_mb: float
    samples: int

    @property
    def change_pct(self) -> float:
        """(end - start) / start, in percent."""
        if self.start_mb <= 0:
            return 0.0
        return (self.end_mb - self.start_mb) / self.start_mb * 100.0

    @property
    def within_target(self) -> bool:
        return abs(self.change_pct) <= RSS_CHANGE_TARGET_PCT


def rss_trend(samples: Sequence[RssSample]) -> Optional[RssTrend]:
    """The trend of the samples in time order; None without samples."""
    if not samples:
        return None
    totals = [s.total_mb for s in samples]
    return RssTrend(totals[0], totals[-1], min(totals), max(totals), len(totals))


def format_per_process(per_process_mb: Sequence[float]) -> str:
    """``58.1+47.2+47.0``: the root process first, then its descendants."""
    return "+".join("%.1f" % mb for mb in per_process_mb) if per_process_mb else "?"


def format_trend(trend: Optional[RssTrend], sample_every: float) -> List[str]:
    """The soak report's RSS lines."""
    if trend is None:
        return ["  RSS: no sample (the server was gone)"]
    return [
        "  RSS total MB: start %.1f, end %.1f (%+.1f%%), min %.1f, max %.1f "
        "(%d samples, every %g s)"
        % (trend.start_mb, trend.end_mb, trend.change_pct, trend.min_mb, trend.max_mb,
           trend.samples, sample_every),
    ]


def trend_json(trend: Optional[RssTrend]) -> Optional[Dict[str, float]]:
    if trend is None:
        return None
    return {
        "start_mb": trend.start_mb,
        "end_mb": trend.end_mb,
        "change_pct": trend.change_pct,
        "min_mb": trend.min_mb,
        "max_mb": trend.max_mb,
        "samples": trend.samples,
    }
