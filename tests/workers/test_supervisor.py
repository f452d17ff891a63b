"""What the master gives the worker processes it starts."""

from __future__ import annotations


def test_pypy_workers_get_gc_settings_unless_some_are_chosen() -> None:
    """On PyPy the master gives its workers a 16 MB young generation and 4 MB major
    collection steps (their p99 depends on both); an operator's settings win;
    CPython gets nothing."""
    from kongtx.workers.supervisor import PYPY_INCREMENT_STEP, PYPY_NURSERY, worker_environment

    env = worker_environment({}, pypy=True)
    assert env["PYPY_GC_NURSERY"] == PYPY_NURSERY == "16MB"
    assert env["PYPY_GC_INCREMENT_STEP"] == PYPY_INCREMENT_STEP == "4MB"
    chosen = worker_environment({"PYPY_GC_NURSERY": "4MB", "PYPY_GC_INCREMENT_STEP": "64MB"},
                                pypy=True)
    assert (chosen["PYPY_GC_NURSERY"], chosen["PYPY_GC_INCREMENT_STEP"]) == ("4MB", "64MB")
    assert "PYPY_GC_NURSERY" not in worker_environment({}, pypy=False)
    assert "PYPY_GC_INCREMENT_STEP" not in worker_environment({}, pypy=False)
    env = worker_environment({"PYTHONPATH": "/elsewhere"}, pypy=False)
    assert env["PYTHONPATH"].endswith(":/elsewhere")
