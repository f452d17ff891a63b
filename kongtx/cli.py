"""The ``kongtx`` command: operator verbs modelled on Kong's CLI (``check``, ``version``).

Each verb is a small function registered in ``VERBS`` with a routine that adds its
arguments; later verbs (``migrations``, ``reload``, ``health``, ``config``) are added the
same way. ``main`` returns the exit status instead of exiting so tests can call it
in-process; errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from typing import Any, Callable, List, Optional, Sequence, TextIO, Tuple

import attr

import kongtx
from kongtx.config import ConfigError, load_config

#: Printed by ``check`` when no configuration file was found.
DEFAULTS_LABEL = "<defaults>"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Verb:
    """A sub-command: its name, one-line help, argument set-up and the routine to run."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO, TextIO], int]


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "conf",
        nargs="?",
        default=None,
        metavar="CONF",
        help="configuration file (default: /etc/kong/kong.conf, then /etc/kong.conf)",
    )
    parser.add_argument("-p", "--prefix", default=None, help="override the prefix directory")


def _run_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Load and validate the configuration (file, ``KONG_*`` env, ``--prefix``)."""
    try:
        config = load_config(args.conf, prefix=args.prefix)
    except ConfigError as e:
        err.write(f"Error: {e}\n")
        return 1
    where = config.source_path if config.source_path is not None else DEFAULTS_LABEL
    out.write(f"configuration at {where} is valid\n")
    return 0


def _configure_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-a", "--all", action="store_true", help="also print the versions of dependencies"
    )


def _run_version(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print kongtx's version, or with ``-a`` the versions kongtx is built from."""
    if not args.all:
        out.write(f"{kongtx.__version__}\n")
        return 0
    import twisted

    lines: List[Tuple[str, str]] = [
        ("kongtx", kongtx.__version__),
        ("Kong Admin API", kongtx.KONG_VERSION),
        ("Twisted", twisted.__version__),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]
    for label, value in lines:
        out.write(f"{label}: {value}\n")
    return 0


# -- migrations ---------------------------------------------------------------------

MIGRATION_COMMANDS = ("bootstrap", "up", "list", "status", "reset")
#: Exit statuses of ``list``/``status`` (Kong's): not bootstrapped, pending migrations.
EXIT_NOT_BOOTSTRAPPED = 3
EXIT_PENDING = 5

NEEDS_POSTGRES = "'kongtx migrations' needs database = postgres (this configuration uses '{database}')"
NOT_A_TTY = "not a tty: invoke 'reset' non-interactively with the --yes flag"
CONFIRM_RESET = "Are you sure? This operation is irreversible. [Y/n] "
NEEDS_BOOTSTRAP = (
    "Database needs bootstrapping or is older than Kong 1.0.\n\n"
    "To start a new installation from scratch, run 'kongtx migrations bootstrap'."
)


def _configure_migrations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("command", choices=MIGRATION_COMMANDS, metavar="COMMAND",
                        help="bootstrap | up | list | status | reset")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="assume yes to prompts (reset)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("-c", "--conf", default=None, help="configuration file")
    parser.add_argument("-p", "--prefix", default=None, help="override the prefix directory")


def _run_migrations(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Load the configuration, then run the command on the reactor (``task.react``)."""
    try:
        config = load_config(args.conf, prefix=args.prefix)
    except ConfigError as e:
        err.write(f"Error: {e}\n")
        return 1
    if config.database != "postgres":
        err.write("Error: " + NEEDS_POSTGRES.format(database=config.database) + "\n")
        return 1
    if args.command == "reset" and not args.yes:
        if not sys.stdin.isatty():
            err.write(f"Error: {NOT_A_TTY}\n")
            return 1
        out.write(CONFIRM_RESET)
        out.flush()
        if sys.stdin.readline().strip().lower() not in ("", "y", "yes"):
            out.write("Canceled\n")
            return 0
    from twisted.internet import defer, task

    from kongtx.store.postgres import PgSettings

    settings = PgSettings.from_config(config)
    quiet_out = _Discard() if args.quiet else out

    def run(reactor: Any) -> "defer.Deferred[None]":
        async def go() -> None:
            code = await migrations_command(args.command, settings, reactor, quiet_out, err)
            if code:
                raise SystemExit(code)

        return defer.Deferred.fromCoroutine(go())

    try:
        task.react(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


async def migrations_command(
    command: str, settings: Any, reactor: Any, out: Any, err: Any, migrations: Any = None
) -> int:
    """Runs one ``kongtx migrations`` command on a running reactor; returns the exit status.

    Errors (database unreachable, not bootstrapped ...) are one ``Error: ...`` line on ``err``.
    """
    from kongtx.store import migrations as runner
    from kongtx.store.interface import StoreError

    where = f"database '{settings.database}'"
    try:
        if command == "bootstrap":
            out.write("Bootstrapping database...\n")
            ran = await runner.bootstrap(settings, reactor, migrations)
            if not ran:
                out.write("Database already bootstrapped\n")
                return 0
            for name in ran:
                out.write(f"migrated up to: {name} on {where}\n")
            out.write(f"{len(ran)} migrations processed\n{len(ran)} executed\nDatabase is up-to-date\n")
            return 0
        if command == "up":
            ran = await runner.up(settings, reactor, migrations)
            if not ran:
                out.write("Database is already up-to-date\n")
                return 0
            for name in ran:
                out.write(f"migrated up to: {name} on {where}\n")
            out.write(f"{len(ran)} migrations processed\n{len(ran)} executed\nDatabase is up-to-date\n")
            return 0
        if command in ("list", "status"):
            executed, pending = await runner.status(settings, reactor, migrations)
            if not executed:
                out.write(NEEDS_BOOTSTRAP + "\n")
                return EXIT_NOT_BOOTSTRAPPED
            if command == "list":
                out.write("Executed migrations:\n" + "".join(f"  {n}\n" for n in executed))
                if pending:
                    out.write("Pending migrations:\n" + "".join(f"  {n}\n" for n in pending))
                    out.write("Run 'kongtx migrations up' to proceed\n")
                    return EXIT_PENDING
                out.write("Database is up-to-date\n")
                return 0
            if pending:
                out.write(f"Database has pending migrations: {', '.join(pending)}\n")
                return EXIT_PENDING
            out.write(f"Database is up-to-date ({len(executed)} migrations executed)\n")
            return 0
        if command == "reset":
            if await runner.reset(settings, reactor, migrations):
                out.write("Database successfully reset\n")
            else:
                out.write("Database not bootstrapped, nothing to reset\n")
            return 0
        err.write(f"Error: unknown migrations command '{command}'\n")
        return 1
    except StoreError as e:
        err.write(f"Error: {' '.join(str(e).split())}\n")
        return 1
    except Exception as e:  # never a traceback on the operator's terminal
        err.write(f"Error: {type(e).__name__}: {' '.join(str(e).split())}\n")
        return 1


def _configure_conf_and_prefix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--conf", default=None, help="configuration file")
    parser.add_argument("-p", "--prefix", default=None, help="override the prefix directory")


def _signal_node(args: argparse.Namespace, signum: int, err: TextIO) -> Optional[Tuple[Any, int]]:
    """Load the configuration (``args.conf``, ``args.prefix``) and send *signum* to
    the node running in its prefix (``pids/kongtx.pid``); returns (config, pid), or
    ``None`` after writing the one-line error."""
    from kongtx.logging.setup import NotRunning, running_pid

    try:
        config = load_config(getattr(args, "conf", None), prefix=args.prefix)
        pid = running_pid(config.prefix)
        os.kill(pid, signum)
    except (ConfigError, NotRunning) as e:
        err.write(f"Error: {e}\n")
        return None
    except OSError as e:
        err.write(f"Error: cannot signal kongtx: {e.strerror or e}\n")
        return None
    return config, pid


def _run_reopen_logs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Signal the node running in the prefix (``pids/kongtx.pid``) to reopen its log
    files (``SIGUSR1``), e.g. from logrotate's ``postrotate``."""
    signalled = _signal_node(args, signal.SIGUSR1, err)
    if signalled is None:
        return 1
    out.write(f"Log files reopened (signalled process {signalled[1]})\n")
    return 0


def _run_reload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Check the configuration, then ask the node running in the prefix to apply it
    (``SIGHUP``): new workers start with it and the old ones drain. A configuration
    that does not load is refused here, before anything is signalled."""
    signalled = _signal_node(args, signal.SIGHUP, err)
    if signalled is None:
        return 1
    out.write(f"kongtx reloaded (signalled process {signalled[1]})\n")
    return 0


def _alive(pid: int) -> bool:
    """Whether *pid* still runs (an exited process its parent has not reaped yet,
    a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open("/proc/%d/stat" % (pid,)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _configure_quit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prefix", default=None, help="override the prefix directory")
    parser.add_argument("-t", "--timeout", type=float, default=None,
                        help="seconds to wait before giving up (default: "
                             "nginx_main_worker_shutdown_timeout + 5)")


def _run_quit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Stop the node running in the prefix gracefully (``SIGQUIT``: in-flight
    requests finish) and wait for it to exit."""
    import time

    signalled = _signal_node(args, signal.SIGQUIT, err)
    if signalled is None:
        return 1
    config, pid = signalled
    timeout = args.timeout
    if timeout is None:
        timeout = config.nginx_main_worker_shutdown_timeout + 5
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            out.write("kongtx stopped (gracefully)\n")
            return 0
        time.sleep(0.1)
    err.write(f"Error: kongtx (process {pid}) is still running after {timeout:g}s\n")
    return 1


VERBS: Tuple[Verb, ...] = (
    Verb("check", "check the validity of a configuration file", _configure_check, _run_check),
    Verb("version", "print the kongtx version", _configure_version, _run_version),
    Verb("migrations", "manage database schema migrations (Postgres)",
         _configure_migrations, _run_migrations),
    Verb("reopen-logs", "make the running node reopen its log files (after logrotate)",
         _configure_conf_and_prefix, _run_reopen_logs),
    Verb("reload", "apply a changed configuration to the running node without "
         "dropping connections", _configure_conf_and_prefix, _run_reload),
    Verb("quit", "stop the running node gracefully (in-flight requests finish)",
         _configure_quit, _run_quit),
)


def build_parser(verbs: Sequence[Verb] = VERBS) -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per verb."""
    parser = argparse.ArgumentParser(
        prog="kongtx", description="kongtx: a Kong-compatible API gateway on Twisted."
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in verbs:
        verb_parser = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        verb.configure(verb_parser)
        verb_parser.set_defaults(run=verb.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``kongtx`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # argparse reports usage errors (and --help) by exiting
        return e.code if isinstance(e.code, int) else 1
    run = getattr(args, "run", None)
    if run is None:
        parser.print_usage(sys.stderr)
        return 1
    return int(run(args, sys.stdout, sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
