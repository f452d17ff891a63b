"""Unit tests of the bundled plugins."""
