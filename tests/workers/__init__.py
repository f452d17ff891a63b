"""Tests of kongtx.workers and draining."""
