"""The PostgreSQL driver module, the same on CPython and PyPy.

CPython uses psycopg2; PyPy uses psycopg2cffi, which this module registers under
the name ``psycopg2`` (``psycopg2cffi.compat.register()``) so that kongtx, txpostgres
and the processes kongtx starts all see one module. Import the driver from here::

    from kongtx._pg import psycopg2, is_unique_violation

psycopg2cffi has no ``psycopg2.errors`` module, so errors are told apart by their
SQLSTATE (``exc.pgcode``), which both drivers set.
"""

from __future__ import annotations

from typing import Any


def _patch_psycopg2cffi() -> None:
    """Makes psycopg2cffi raise ``OperationalError`` on a broken connection, as psycopg2 does.

    psycopg2 raises ``OperationalError`` for any failure that leaves the connection
    bad (the server went away mid-statement). psycopg2cffi 2.9 marks the connection
    closed the same way but raises the class of the result's SQLSTATE, which is plain
    ``DatabaseError`` when the server sent none: a lost connection would then not
    look like one.
    """
    from psycopg2cffi._impl import exceptions
    from psycopg2cffi._impl.connection import Connection

    if getattr(Connection, "_kongtx_patched", False):
        return
    create = Connection._create_exception

    def _create_exception(self: Any, *args: Any, **kwargs: Any) -> Any:
        exc = create(self, *args, **kwargs)
        if self.closed == 2 and not isinstance(exc, exceptions.OperationalError):
            exc.__class__ = exceptions.OperationalError  # same layout: keeps pgcode, pgerror, cursor
        return exc

    Connection._create_exception = _create_exception
    Connection._kongtx_patched = True


try:
    import psycopg2
except ImportError:  # PyPy: psycopg2cffi provides the same API
    from psycopg2cffi import compat

    compat.register()
    import psycopg2

if psycopg2.__name__ == "psycopg2cffi":
    _patch_psycopg2cffi()

__all__ = ["psycopg2", "UNIQUE_VIOLATION", "QUERY_CANCELED", "is_unique_violation", "is_query_canceled"]

#: SQLSTATE of a duplicate key in a unique index or constraint.
UNIQUE_VIOLATION = "23505"
#: SQLSTATE of a statement cancelled (``statement_timeout`` or ``pg_cancel_backend``).
QUERY_CANCELED = "57014"


def _pgcode(exc: BaseException) -> object:
    return getattr(exc, "pgcode", None) if isinstance(exc, psycopg2.Error) else None


def is_unique_violation(exc: BaseException) -> bool:
    """Whether ``exc`` is the driver's error for a duplicate key."""
    return _pgcode(exc) == UNIQUE_VIOLATION


def is_query_canceled(exc: BaseException) -> bool:
    """Whether ``exc`` is the driver's error for a cancelled statement."""
    return _pgcode(exc) == QUERY_CANCELED
