"""Worker processes: a master that binds the proxy's sockets and serves the
Admin API, and ``nginx_worker_processes`` workers that serve the proxy.

* :mod:`kongtx.workers.channel`: the framed JSON channel between them.
* :mod:`kongtx.workers.sockets`: the proxy's listening sockets, one
  ``SO_REUSEPORT`` socket per worker slot, held by the master.
* :mod:`kongtx.workers.supervisor`: the master's side (spawn, restart,
  forward change events, answer store reads, reload, drain).
* :mod:`kongtx.workers.remote`: the worker's store, reading through the master.
* :mod:`kongtx.workers.main`: the worker process's entry point.

See ``docs/workers.md``.
"""
