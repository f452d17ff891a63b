"""Tests of kongtx.store: the IStore contract and each backend."""
