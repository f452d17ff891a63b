"""0001: the ``cluster_events`` table every node writes its changes to and polls."""

from __future__ import annotations

from kongtx.store.migrations import Migration

MIGRATION = Migration(
    "0001_cluster_events",
    (
        "CREATE TABLE IF NOT EXISTS cluster_events ("
        "id uuid PRIMARY KEY, "
        "node_id text NOT NULL, "
        "at timestamptz NOT NULL DEFAULT now(), "
        "channel text NOT NULL, "
        "data text NOT NULL)",
        "CREATE INDEX IF NOT EXISTS cluster_events_at_idx ON cluster_events (at)",
        "CREATE INDEX IF NOT EXISTS cluster_events_channel_idx ON cluster_events (channel, at)",
    ),
    ("cluster_events",),
)
