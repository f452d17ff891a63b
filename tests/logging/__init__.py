"""Tests of kongtx's own logs (kongtx.logging)."""
