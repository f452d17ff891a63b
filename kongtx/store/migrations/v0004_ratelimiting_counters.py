"""0004: ``ratelimiting_counters``, the rate-limiting ``cluster`` policy's counters.

One row per (counter key, window start); ``IStore.increment`` upserts it.
``expires_at`` (epoch seconds) lets the store purge finished windows.
"""

from __future__ import annotations

from kongtx.store.migrations import Migration

MIGRATION = Migration(
    "0004_ratelimiting_counters",
    (
        "CREATE TABLE IF NOT EXISTS ratelimiting_counters ("
        "key text NOT NULL, "
        "window_start bigint NOT NULL, "
        "value bigint NOT NULL, "
        "expires_at bigint NOT NULL, "
        "PRIMARY KEY (key, window_start))",
        "CREATE INDEX IF NOT EXISTS ratelimiting_counters_expires_idx "
        "ON ratelimiting_counters (expires_at)",
    ),
    ("ratelimiting_counters",),
)
