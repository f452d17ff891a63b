"""The baseline: Twisted's stock ReverseProxyResource in front of the bench upstream.

Run by ``bench/harness.py`` with the interpreter under test::

    python bench/stock_proxy.py --port 8001 --upstream-port 8000

The proxy is stock: a ``twisted.web`` Site whose root is
``ReverseProxyResource("127.0.0.1", upstream_port, b"")``. The only things set are
the ones kongtx is also given in the benchmark: no access log, and only errors are
logged (to stderr).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line: listening port, upstream port, interface."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--upstream-host", default="127.0.0.1")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Listen and proxy every request to the upstream until stopped."""
    args = parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.web.proxy import ReverseProxyResource
    from twisted.web.server import Site

    errors_only = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)],
    )
    globalLogBeginner.beginLoggingTo([errors_only], redirectStandardIO=False)

    root = ReverseProxyResource(
        args.upstream_host, args.upstream_port, b"", reactor=reactor
    )
    site = Site(root)
    # kongtx runs with KONG_PROXY_ACCESS_LOG=off; give the baseline the same.
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(args.port, site, interface=args.interface)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
