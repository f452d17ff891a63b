"""What the master gives the worker processes it starts."""

from __future__ import annotations


def test_pypy_workers_get_a_larger_nursery_unless_one_is_chosen() -> None:
    """On PyPy the master gives its workers a 16 MB young generation (their p99
    depends on it); an operator's PYPY_GC_NURSERY wins; CPython gets nothing."""
    from kongtx.workers.supervisor import PYPY_NURSERY, worker_environment

    assert worker_environment({}, pypy=True)["PYPY_GC_NURSERY"] == PYPY_NURSERY == "16MB"
    assert worker_environment({"PYPY_GC_NURSERY": "4MB"}, pypy=True)["PYPY_GC_NURSERY"] == "4MB"
    assert "PYPY_GC_NURSERY" not in worker_environment({}, pypy=False)
    env = worker_environment({"PYTHONPATH": "/elsewhere"}, pypy=False)
    assert env["PYTHONPATH"].endswith(":/elsewhere")
