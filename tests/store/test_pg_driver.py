"""kongtx/_pg.py: one driver module and one way to read its errors, on CPython and PyPy."""

from __future__ import annotations

import sys

import pytest

from kongtx._pg import is_query_canceled, is_unique_violation, psycopg2
from tests.pg import Database, fresh_database  # noqa: F401 (fixture)


def test_the_driver_is_importable_as_psycopg2():
    """``import psycopg2`` anywhere (txpostgres, child processes) gives the module kongtx uses."""
    assert sys.modules["psycopg2"] is psycopg2


def test_duplicate_key_is_a_unique_violation_and_nothing_else(fresh_database: Database):
    """A duplicate key is recognised by its SQLSTATE; a NOT NULL violation is not one."""
    conn = fresh_database.connect()
    try:
        cur = conn.cursor()
        cur.execute("CREATE TABLE t (name text UNIQUE NOT NULL)")
        cur.execute("INSERT INTO t VALUES ('a')")
        with pytest.raises(psycopg2.IntegrityError) as duplicate:
            cur.execute("INSERT INTO t VALUES ('a')")
        assert is_unique_violation(duplicate.value)
        assert not is_query_canceled(duplicate.value)
        with pytest.raises(psycopg2.IntegrityError) as null:
            cur.execute("INSERT INTO t VALUES (NULL)")
        assert not is_unique_violation(null.value)
    finally:
        conn.close()


def test_statement_timeout_is_a_cancelled_query(fresh_database: Database):
    """A statement stopped by ``statement_timeout`` is a cancelled query, not a lost connection."""
    conn = fresh_database.connect()
    try:
        cur = conn.cursor()
        cur.execute("SET statement_timeout = 50")
        with pytest.raises(psycopg2.OperationalError) as cancelled:
            cur.execute("SELECT pg_sleep(5)")
        assert is_query_canceled(cancelled.value)
        assert not conn.closed
    finally:
        conn.close()


def test_a_lost_connection_is_an_operational_error(fresh_database: Database):
    """When the server ends the session mid-statement the error is an OperationalError
    and the connection is closed (psycopg2's behaviour, which psycopg2cffi is made to share)."""
    conn = fresh_database.connect()
    try:
        cur = conn.cursor()
        with pytest.raises(psycopg2.OperationalError) as lost:
            cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        assert not is_query_canceled(lost.value)
        assert conn.closed
    finally:
        conn.close()
