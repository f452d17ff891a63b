"""The ``kongtx`` command: operator verbs modelled on Kong's CLI (``check``, ``version``).

Each verb is a small function registered in ``VERBS`` with a routine that adds its
arguments; later verbs (``migrations``, ``reload``, ``health``, ``config``) are added the
same way. ``main`` returns the exit status instead of exiting so tests can call it
in-process; errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

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


VERBS: Tuple[Verb, ...] = (
    Verb("check", "check the validity of a configuration file", _configure_check, _run_check),
    Verb("version", "print the kongtx version", _configure_version, _run_version),
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
