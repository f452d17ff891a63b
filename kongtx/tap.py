"""``twistd kongtx``: command-line options and the service tree. Wiring only.

``makeService`` loads the configuration (``--conf``, ``--prefix`` and ``KONG_*``
environment variables), prepares the prefix directory and returns the master's
:class:`~kongtx.node.KongtxService`: it opens the store, builds the first
snapshot, serves the Admin API and runs ``nginx_worker_processes`` worker
processes that serve the proxy (``kongtx.workers``).

A configuration problem stops start-up with one line naming the property.
"""

from __future__ import annotations

import os
import socket

from twisted.application import service
from twisted.python import usage

from kongtx.config import Config, ConfigError, load_config
from kongtx.node import KongtxService, StartupError, fail

__all__ = ["Options", "makeService", "prepare_prefix", "check_database",
           "preflight_listeners", "KongtxService", "StartupError"]


class Options(usage.Options):
    synopsis = "[--conf FILE] [--prefix DIR]"
    longdesc = (
        "Run the kongtx gateway: the proxy and the Kong-compatible Admin API. Every "
        "kong.conf property can also be set with a KONG_<NAME> environment variable."
    )
    optParameters = [
        ["conf", "c", None, "Configuration file in kong.conf format."],
        ["prefix", "p", None, "Prefix directory (overrides the 'prefix' property)."],
    ]


def makeService(options: Options) -> service.IService:
    """Build the service tree; exit with one line on a configuration problem."""

    def read_config() -> Config:
        return load_config(options["conf"], os.environ, options["prefix"])

    try:
        config = read_config()
        prepare_prefix(config)
        preflight_listeners(config)
        check_database(config)
    except (ConfigError, StartupError) as exc:
        raise fail(str(exc))
    from twisted.internet import reactor

    return KongtxService(config, reactor, role="master", load_config=read_config)


def prepare_prefix(config: Config) -> None:
    """Create the prefix directory (and ``logs/``, ``ssl/``) if needed."""
    for path in (config.prefix, config.prefix_path("logs"), config.prefix_path("ssl")):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StartupError("prefix: cannot create %s: %s" % (path, exc.strerror))
        if not os.access(path, os.W_OK):
            raise StartupError("prefix: %s is not writable" % (path,))


def check_database(config: Config) -> None:
    """Refuse to start on a Postgres database that needs ``kongtx migrations``.

    Runs before the reactor (blocking is fine here). An unreachable database is not
    an error: the node starts from its last known configuration if it has one.
    """
    if config.database != "postgres":
        return
    from kongtx.store.interface import StoreUnavailable
    from kongtx.store.migrations import schema_problem_blocking
    from kongtx.store.postgres import PgSettings

    try:
        problem = schema_problem_blocking(PgSettings.from_config(config))
    except StoreUnavailable:
        return
    if problem is not None:
        raise StartupError(problem)


def preflight_listeners(config: Config) -> None:
    """Bind and release every configured address once, before twistd redirects
    output and daemonises, so "address in use" reaches the operator as one line."""
    for prop in ("proxy_listen", "admin_listen"):
        for spec in getattr(config, prop):
            family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((spec.host, spec.port))
            except OSError as exc:
                raise StartupError("%s: cannot listen on %s:%d: %s"
                                   % (prop, spec.host, spec.port, exc.strerror or exc))
            finally:
                probe.close()
