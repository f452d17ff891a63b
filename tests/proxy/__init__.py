"""Tests for kongtx.proxy."""
